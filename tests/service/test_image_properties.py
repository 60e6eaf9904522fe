"""Image properties per prediction (issue 16 item 1): measured off the request path by the spool
flusher, on the model input, with the same functions as the reference data; and the schema
revision that stores them (0008) on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import time

import numpy as np
import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import inspect, text

from cvops.data.properties import IMAGE_PROPERTIES, input_properties, properties_frame
from cvops.model.preprocess import preprocess_image, resize_and_scale_matrices
from cvops.records.schema import MIGRATIONS, Prediction, make_engine, upgrade_schema
from cvops.service.images import read_upload
from cvops.service.recording import Recorder
from tests.service.conftest import image_bytes
from tests.service.test_api import wait_for_rows


def stored_props(url: str) -> dict[str, dict[str, float] | None]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, image_props FROM predictions")).all()
    finally:
        engine.dispose()
    return {i: json.loads(p) if isinstance(p, str) else p for i, p in rows}


def test_each_prediction_stores_the_properties_of_its_model_input(client, settings) -> None:
    data = image_bytes("JPEG", size=(120, 80), seed=3)
    answer = client.post("/predict", files={"file": ("a.jpg", data, "image/jpeg")})
    assert answer.status_code == 200
    assert wait_for_rows(settings.resolved_db_url, "predictions", 1) == 1
    deadline = time.monotonic() + 10
    while (props := stored_props(settings.resolved_db_url)[answer.json()["prediction_id"]]) is None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert list(props) == list(IMAGE_PROPERTIES)
    assert (props["width"], props["height"]) == (120, 80) and props["aspect"] == 1.5
    rgb, _ = read_upload(data, 10**8)
    expected = input_properties(resize_and_scale_matrices(rgb, (50, 50)), 120, 80)
    assert props == pytest.approx(expected)


def test_reference_and_live_properties_agree(tmp_path) -> None:
    """The reference side (training's tf.data preprocessing, header sizes from the files) and
    the live side (the service's resize matrices) measure the same image alike."""
    path = tmp_path / "img.png"
    path.write_bytes(image_bytes("PNG", size=(97, 61), seed=4))
    reference = properties_frame(
        [preprocess_image(path.read_bytes(), (50, 50)).numpy()[None]], [path]
    )
    rgb, _ = read_upload(path.read_bytes(), 10**8)
    live = input_properties(resize_and_scale_matrices(rgb, (50, 50)), 97, 61)
    assert reference.iloc[0].to_dict() == pytest.approx({f"prop_{k}": v for k, v in live.items()})


def test_flusher_measures_held_inputs_and_bounds_memory(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    x = np.random.default_rng(0).random((50, 50, 3), dtype=np.float32)
    recorder = Recorder(url, tmp_path / "spool", input_buffer_bytes=int(1.5 * x.nbytes))
    ids = ["00000000-0000-0000-0000-00000000000" + str(i) for i in range(3)]
    for i in ids:
        recorder.keep_input(i, x, 64, 32)
    assert recorder.inputs_dropped == 2  # only the first fits
    record = {"model_name": "m", "prediction_json": {}, "uae_feats": [0.0], "bbsd_feats": [1.0]}
    recorder.start()
    recorder.record(
        [
            ("prediction", {**record, "id": i, "created_on": "2026-01-01T00:00:00+00:00"})
            for i in ids
        ]
    )
    recorder.stop()
    props = stored_props(url)
    assert props[ids[0]] == pytest.approx(input_properties(x, 64, 32))
    assert props[ids[1]] is None and props[ids[2]] is None
    assert recorder._inputs == {} and recorder._inputs_bytes == 0


def _migrate(engine, target: str, down: bool = False) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        (command.downgrade if down else command.upgrade)(cfg, target)


def _check_0008(engine) -> None:
    """0007 rows survive 0008 (no properties), new rows carry them; 0008 downgrades cleanly."""
    _migrate(engine, "0007")
    old = {
        "id": "old",
        "model_name": "m",
        "prediction_json": {},
        "uae_feats": [0.0],
        "bbsd_feats": [1.0],
        "created_on": dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    }
    with engine.begin() as conn:  # only the columns revision 0007 has
        conn.execute(Prediction.__table__.insert().values(**old))
    upgrade_schema(engine)
    upgrade_schema(engine)  # idempotent: every worker runs it
    tables = inspect(engine)
    assert "image_props" in {c["name"] for c in tables.get_columns("predictions")}
    assert {"run_id", "sentence", "top_cause", "details"} <= {
        c["name"] for c in tables.get_columns("drift_causes")
    }
    with engine.connect() as conn:
        assert conn.execute(text("SELECT image_props FROM predictions")).scalar_one() is None
    _migrate(engine, "0007", down=True)
    tables = inspect(engine)
    assert "drift_causes" not in tables.get_table_names()
    assert "image_props" not in {c["name"] for c in tables.get_columns("predictions")}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT id FROM predictions")).scalar_one() == "old"


def test_migration_0008_on_sqlite(tmp_path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        _check_0008(engine)
    finally:
        engine.dispose()


def test_migration_0008_on_postgres(postgres) -> None:
    engine = make_engine(postgres.url())
    try:
        _check_0008(engine)
    finally:
        engine.dispose()
