"""push -> label in a real Label Studio -> pull: records, feedback rows, dataset versions."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import io
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select
from sqlalchemy.engine import Engine

from cvops.config import LabellingConfig, parse_config
from cvops.data.demo import CLASSES
from cvops.data.demo_repo import build_demo_repo
from cvops.data.versioning import current_version, list_tags
from cvops.labelling import loop
from cvops.labelling.client import LabelStudio
from cvops.monitor.check import feedback_labels
from cvops.records.schema import LabellingTask, Prediction, make_engine, upgrade_schema
from cvops.service.recording import Recorder
from cvops.storage import CentralStorage

pytestmark = pytest.mark.slow
CLASSES_3 = list(CLASSES[:3])


def png_b64(rng: np.random.Generator, side: int = 24) -> str:
    pixels = rng.integers(0, 255, size=(side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def insert_predictions(engine: Engine, n: int, **kwargs: Any) -> list[str]:
    rows = prediction_rows(n, **kwargs)
    with engine.begin() as conn:
        conn.execute(Prediction.__table__.insert(), rows)
    return [r["id"] for r in rows]


def flush_predictions(
    url: str, spool_dir: Path, storage: CentralStorage | None, n: int, **kwargs: Any
) -> list[dict[str, Any]]:
    """Predictions written by the service's spool flusher, their uploads moved to `storage`
    (CVOPS_SERVICE_STORE_IMAGES=central_storage; the rows keep only the keys); the records."""
    rows = prediction_rows(n, **kwargs)
    for row in rows:
        row["created_on"] = row["created_on"].isoformat()
    recorder = Recorder(url, spool_dir, fsync=False, image_storage=storage)
    recorder.start()
    recorder.record([("prediction", dict(r)) for r in rows])
    recorder.stop()  # flushes the spool
    return rows


def prediction_rows(
    n: int,
    *,
    model_name: str,
    version: str = "1",
    classes: list[str] = CLASSES_3,
    seed: int = 0,
    images: bool = True,
) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    now = dt.datetime.now(dt.UTC)
    rows = []
    for i in range(n):
        probs = rng.dirichlet(np.ones(len(classes)))
        rows.append(
            {
                "id": str(uuid.uuid4()),
                "model_name": model_name,
                "model_version": version,
                "input_img": png_b64(rng) if images else None,
                "prediction_json": {
                    "prediction": dict(zip(classes, probs.tolist(), strict=True)),
                    "predicted_class": classes[int(np.argmax(probs))],
                },
                "uae_feats": rng.normal(size=4).tolist(),
                "bbsd_feats": probs.tolist(),
                "hidden_feats": None,
                "created_on": now - dt.timedelta(seconds=i),
            }
        )
    return rows


@pytest.fixture()
def engine(tmp_path: Path) -> Engine:
    engine = make_engine(f"sqlite:///{tmp_path / 'service.db'}")
    upgrade_schema(engine)
    yield engine
    engine.dispose()


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    repo = tmp_path / "datasets" / "shapes"
    build_demo_repo(
        repo,
        tmp_path / "central_storage" / "dvc_remote" / "shapes",
        v1_train_per_class=2,
        v2_train_per_class=3,
        test_per_class=1,
        classes=CLASSES_3,
    )
    return repo


def flow_config(repo: Path, model_name: str):
    return parse_config(
        {
            "flow_module": "cvops.flows.full_flow",
            "model": {
                "model_name": model_name,
                "input_size": {"w": 24, "h": 24},
                "classes": CLASSES_3,
            },
            "dataset": {"ds_root": str(repo.parent), "ds_name": repo.name, "dvc_tag": "v2.0.0"},
        },
        check_flow_module=False,
    )


def test_push_pull_relabel_round_trip(engine, dataset, studio: LabelStudio) -> None:
    name = f"shapes-{uuid.uuid4().hex[:8]}"
    meta = SimpleNamespace(model_name=name, version="1", classes=CLASSES_3)
    ids = insert_predictions(engine, 30, model_name=name)
    insert_predictions(engine, 5, model_name=name, seed=1, images=False)  # not labellable
    insert_predictions(engine, 5, model_name=name, version="0", seed=2)  # an older model
    cfg = LabellingConfig(n=10, strategy="least_confidence", random_share=0.2, seed=1)

    first = loop.push(engine, studio, meta, cfg)
    assert first.sent == 10 and first.arms == {"random": 2, "least_confidence": 8}
    assert first.pool == 30 and first.without_image == 5
    second = loop.push(engine, studio, meta, cfg)
    assert second.sent == 10 and second.project_id == first.project_id

    with engine.connect() as conn:
        records = conn.execute(select(LabellingTask)).all()
    sent = {r.prediction_id for r in records}
    assert len(sent) == 20 and sent <= set(ids)  # never twice, only the current model's
    tasks = studio.tasks(first.project_id)
    assert len(tasks) == 20
    task = tasks[0]
    assert task["data"]["image"].startswith("data:image/png;base64,")
    by_id = {r.prediction_id: r for r in records}
    record = by_id[task["data"]["prediction_id"]]
    (prediction,) = task["predictions"]
    assert prediction["result"][0]["value"]["choices"] == [record.predicted]
    assert prediction["score"] == pytest.approx(record.confidence)

    # a labeller answers 8 tasks: 6 with a class, 1 with unknown; 1 answer is skipped
    answers = {}
    for i, t in enumerate(tasks[:7]):
        label = CLASSES_3[i % 3] if i < 6 else "other / unknown"
        answers[t["data"]["prediction_id"]] = (studio.annotate(t["id"], label), label)
    flow = flow_config(dataset, name)
    before = list_tags(dataset)
    result = loop.pull(engine, studio, flow, cfg)
    assert (result.changes, result.added, result.unknown) == (7, 6, 1)
    assert result.base_tag == "v2.0.0" and result.tag == "v2.1.0"
    assert list_tags(dataset) == [*before, "v2.1.0"]
    version = current_version(dataset)
    assert version.tag == "v2.1.0" and not version.dirty
    labels = feedback_labels(engine, list(answers))
    assert labels == {pid: label for pid, (_, label) in answers.items()}
    added = sorted((dataset / "images" / "train").rglob("ls_*.png"))
    assert len(added) == 6
    with (dataset / "annotation_df.csv").open() as fh:
        rows = {r["path"]: r for r in csv.DictReader(fh)}
    for path in added:
        row = rows[path.relative_to(dataset).as_posix()]
        assert row["class"] == path.parent.name and row["split"] == "train"
        assert row["width"] == "24"

    again = loop.pull(engine, studio, flow, cfg)
    assert again.changes == 0 and again.tag is None and list_tags(dataset)[-1] == "v2.1.0"

    # relabel one image: it moves to its new class folder in the next version
    pid, (annotation_id, old) = next(iter(answers.items()))
    new = CLASSES_3[(CLASSES_3.index(old) + 1) % 3]
    studio.update_annotation(annotation_id, new)
    moved = loop.pull(engine, studio, flow, cfg)
    assert (moved.changes, moved.moved, moved.added, moved.tag) == (1, 1, 0, "v2.2.0")
    assert feedback_labels(engine, [pid]) == {pid: new}
    assert list((dataset / "images" / "train" / new).glob(f"ls_{pid}.png"))
    assert not list((dataset / "images" / "train" / old).glob(f"ls_{pid}.png"))
    assert not current_version(dataset).dirty


def test_unknown_class_files_unknown_images_and_pull_without_project(
    engine, dataset, studio: LabelStudio, tmp_path: Path
) -> None:
    """Also: images the service kept in central storage (CVOPS_SERVICE_STORE_IMAGES=
    central_storage) are pushed and pulled like those in the rows."""
    name = f"shapes-{uuid.uuid4().hex[:8]}"
    flow = flow_config(dataset, name)
    cfg = LabellingConfig(n=2, strategy="margin", random_share=0.0, unknown_class=CLASSES_3[2])
    assert loop.pull(engine, studio, flow, cfg).changes == 0  # no project yet
    meta = SimpleNamespace(model_name=name, version="1", classes=CLASSES_3)
    storage = CentralStorage(tmp_path / "central_storage")
    rows = flush_predictions(str(engine.url), tmp_path / "spool", storage, 4, model_name=name)
    pushed = loop.push(engine, studio, meta, cfg, storage=storage)
    assert (pushed.sent, pushed.pool, pushed.unreadable) == (2, 4, 0)
    uploads = {r["id"]: r["input_img"] for r in rows}
    for task in studio.tasks(pushed.project_id):
        assert (
            task["data"]["image"]
            == f"data:image/png;base64,{uploads[task['data']['prediction_id']]}"
        )
        studio.annotate(task["id"], "other / unknown")
    result = loop.pull(engine, studio, flow, cfg, storage)
    assert (result.added, result.unknown, result.tag) == (2, 2, "v2.1.0")
    added = list((dataset / "images" / "train" / CLASSES_3[2]).glob("ls_*"))
    assert len(added) == 2
    assert {base64.b64encode(p.read_bytes()).decode() for p in added} <= set(uploads.values())
