"""`label push` / `pull` find the uploads wherever the service kept them
(CVOPS_SERVICE_STORE_IMAGES): in the row (db), in central storage (central_storage), or
nowhere (none: counted, and the command says why)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from cvops.labelling.loop import PushResult, candidate_pool, stored_images
from cvops.records.images import IMAGE_KEY
from cvops.records.schema import Prediction, make_engine
from cvops.storage import CentralStorage
from tests.labelling.test_loop import CLASSES_3, flush_predictions, insert_predictions

NOT_STORED = "no image stored (CVOPS_SERVICE_STORE_IMAGES=none)"


def check_stored_images(url: str, tmp_path: Path) -> None:
    storage = CentralStorage(tmp_path / "central_storage")
    stored = flush_predictions(url, tmp_path / "spool", storage, 4, model_name="m")
    engine = make_engine(url)
    try:
        inline = insert_predictions(engine, 2, model_name="m", seed=1)  # db
        lost = insert_predictions(engine, 3, model_name="m", seed=2, images=False)  # none
        with engine.connect() as conn:
            rows = {r.id: r for r in conn.execute(Prediction.__table__.select())}
        assert all(rows[r["id"]].input_img is None for r in stored)  # the flusher moved them
        assert all(rows[r["id"]].prediction_json[IMAGE_KEY] for r in stored)

        pool = candidate_pool(engine, "m", "1", CLASSES_3, limit=100)
        assert set(pool.ids) == {r["id"] for r in stored} | set(inline)
        assert pool.without_image == 3

        images, missing = stored_images(engine, [*pool.ids, *lost], storage)
        for row in stored:  # the bytes the service was sent, from central storage
            assert base64.b64decode(images[row["id"]]) == base64.b64decode(row["input_img"])
        assert all(images[pid] == rows[pid].input_img for pid in inline)
        assert missing == dict.fromkeys(lost, NOT_STORED)

        # no storage to read from, or an object gone: skipped, with the reason
        first, second = stored[0]["id"], stored[1]["id"]
        _, missing = stored_images(engine, [first], None)
        assert "in central storage, and none was given" in missing[first]
        (tmp_path / "central_storage" / rows[second].prediction_json[IMAGE_KEY]).unlink()
        images, missing = stored_images(engine, [first, second], storage)
        assert list(images) == [first] and "FileNotFoundError" in missing[second]
    finally:
        engine.dispose()


def test_central_storage_uploads_are_candidates_and_read_back(tmp_path: Path) -> None:
    check_stored_images(f"sqlite:///{tmp_path / 'service.db'}", tmp_path)


@pytest.mark.slow
def test_central_storage_uploads_on_postgres(postgres_url: str, tmp_path: Path) -> None:
    check_stored_images(postgres_url, tmp_path)  # the key is read with ->> there


def test_push_result_says_how_many_were_skipped_and_why() -> None:
    sent = PushResult(3, 9, {"entropy": 8, "random": 1}, 40, 5, "entropy", unreadable=1)
    assert sent.describe() == (
        "sent 9 of 40 candidate predictions to Label Studio project 3 (entropy 8, random 1); "
        "5 predictions skipped: no image stored (served with CVOPS_SERVICE_STORE_IMAGES=none; "
        "set it to db or central_storage to label them); 1 picked predictions skipped: their "
        "image in central storage could not be read (see the log)"
    )
    nothing = PushResult(None, 0, {}, 0, 7, "entropy").describe()
    assert nothing.startswith("nothing to send: 0 unlabelled predictions with images; 7 ")
    assert "CVOPS_SERVICE_STORE_IMAGES=none" in nothing
    assert PushResult(3, 2, {"random": 2}, 2, 0, "random").describe().endswith("(random 2)")
