"""CVOPS_SERVICE_STORE_IMAGES=central_storage: the spool flusher moves each prediction's upload
and Grad-CAM overlay to central storage (a folder, or S3 on a moto server) before writing the
row that references them; a storage outage keeps the records spooled and they land once."""

from __future__ import annotations

import base64
import time
import uuid
from pathlib import Path

import boto3
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from cvops.monitor.causes import CauseReport, Example
from cvops.monitor.check import add_thumbnails
from cvops.records.images import ImageStore, image_extension
from cvops.records.schema import make_engine
from cvops.service.app import create_app
from cvops.service.recording import Recorder
from cvops.service.settings import ServiceSettings
from cvops.storage import CentralStorage
from tests.s3 import S3Server, s3_bucket, s3_server  # noqa: F401 - fixtures
from tests.service.conftest import image_bytes, package
from tests.service.test_api import wait_for_rows

CREATED = "2026-01-02T23:59:59+00:00"


def prediction(prediction_id: str, upload: bytes, overlay: bytes | None) -> dict:
    """A prediction record as `routes.prediction_record` spools it with images kept."""
    return {
        "id": prediction_id,
        "model_name": "shapes_a",
        "model_version": "1",
        "input_img": base64.b64encode(upload).decode("ascii"),
        "raw_hm_img": base64.b64encode(overlay).decode("ascii") if overlay else None,
        "overlaid_img": base64.b64encode(overlay).decode("ascii") if overlay else None,
        "prediction_json": {"prediction": {"a": 1.0}, "predicted_class": "a"},
        "uae_feats": [0.0],
        "bbsd_feats": [1.0],
        "created_on": CREATED,
    }


def rows(url: str) -> dict[str, tuple]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            found = conn.execute(
                text(
                    "SELECT id, input_img, raw_hm_img, overlaid_img, prediction_json"
                    " FROM predictions"
                )
            ).all()
    finally:
        engine.dispose()
    return {r.id: r for r in found}


def keys_of(row) -> dict:
    import json

    data = row.prediction_json
    return json.loads(data) if isinstance(data, str) else data


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ImageStore.DB),  # the default keeps the old behaviour
        ("true", ImageStore.DB),
        ("false", ImageStore.NONE),
        ("db", ImageStore.DB),
        ("central_storage", ImageStore.CENTRAL_STORAGE),
        ("none", ImageStore.NONE),
    ],
)
def test_store_images_setting_keeps_the_old_boolean_values(value, expected, monkeypatch) -> None:
    monkeypatch.delenv("CVOPS_SERVICE_STORE_IMAGES", raising=False)
    if value is not None:
        monkeypatch.setenv("CVOPS_SERVICE_STORE_IMAGES", value)
    settings = ServiceSettings(_env_file=None)
    assert settings.store_images is expected
    assert settings.keeps_images is (expected is not ImageStore.NONE)


def test_file_types_come_from_their_signature() -> None:
    assert image_extension(image_bytes("JPEG")) == "jpg"
    assert image_extension(image_bytes("PNG")) == "png"
    assert image_extension(image_bytes("WEBP")) == "webp"
    assert image_extension(b"not an image") == "img"


def test_flusher_moves_images_to_a_local_central_storage(tmp_path: Path) -> None:
    storage = CentralStorage(tmp_path / "cs")
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    jpeg, png = image_bytes("JPEG", seed=1), image_bytes("PNG", seed=2)
    with_overlay, without = str(uuid.uuid4()), str(uuid.uuid4())
    recorder = Recorder(url, tmp_path / "spool", image_storage=storage)
    recorder.start()
    try:
        recorder.record(
            [
                ("prediction", prediction(with_overlay, jpeg, png)),
                ("prediction", prediction(without, png, None)),
            ]
        )
        assert wait_for_rows(url, "predictions", 2) == 2
    finally:
        recorder.stop()
    stored = rows(url)
    day = "images/shapes_a/2026-01-02"
    first, second = stored[with_overlay], stored[without]
    assert (first.input_img, first.raw_hm_img, first.overlaid_img) == (None, None, None)
    assert keys_of(first) == {
        "prediction": {"a": 1.0},
        "predicted_class": "a",
        "image_key": f"{day}/{with_overlay}.jpg",
        "overlay_key": f"{day}/{with_overlay}.overlay.png",
    }
    assert storage.read_bytes(f"{day}/{with_overlay}.jpg") == jpeg  # the upload as sent
    assert storage.read_bytes(f"{day}/{with_overlay}.overlay.png") == png
    assert keys_of(second)["image_key"] == f"{day}/{without}.png" and "overlay_key" not in keys_of(
        second
    )
    assert sorted(p.name for p in (tmp_path / "cs" / day).iterdir()) == sorted(
        [f"{with_overlay}.jpg", f"{with_overlay}.overlay.png", f"{without}.png"]
    )


def test_a_storage_outage_keeps_records_spooled_and_they_land_once(
    s3_server: S3Server,  # noqa: F811
    s3_bucket: str,  # noqa: F811 - sets the AWS variables
    tmp_path: Path,
) -> None:
    """The bucket does not exist yet (storage refuses every PUT): no row is written and the
    record stays in the spool; once the bucket is there the retry stores the images, then the
    row, once; the same record spooled again changes nothing."""
    bucket = f"cvops-{uuid.uuid4().hex[:12]}"
    storage = CentralStorage(f"s3://{bucket}/central")
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upload, overlay = image_bytes("PNG", seed=3), image_bytes("PNG", seed=4)
    pid = str(uuid.uuid4())
    recorder = Recorder(url, tmp_path / "spool", image_storage=storage)
    recorder.start()
    try:
        recorder.record([("prediction", prediction(pid, upload, overlay))])
        time.sleep(2)
        assert recorder.pending() == 1 and wait_for_rows(url, "predictions", 1, timeout=0.5) == 0
        client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=bucket)
        assert wait_for_rows(url, "predictions", 1, timeout=30) == 1
        recorder.record([("prediction", prediction(pid, upload, overlay))])  # a re-sent batch
        deadline = time.monotonic() + 10
        while recorder.pending():
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        recorder.stop()
    assert list(rows(url)) == [pid]
    key = f"images/shapes_a/2026-01-02/{pid}"
    assert keys_of(rows(url)[pid])["image_key"] == f"{key}.png"
    listed = client.list_objects_v2(Bucket=bucket)["Contents"]
    assert sorted(o["Key"] for o in listed) == [f"central/{key}.overlay.png", f"central/{key}.png"]
    assert storage.read_bytes(f"{key}.png") == upload
    # the monitor's cause examples read them back from the bucket
    report = CauseReport("x", None, 0.05, 1, examples=[Example(pid, 1.0), Example("gone", 0.5)])
    engine = make_engine(url)
    try:
        assert add_thumbnails(engine, report, storage) == 1
    finally:
        engine.dispose()
    shown = report.examples[0]
    assert shown.image and shown.image.startswith("data:image/jpeg;base64,") and shown.overlay
    assert report.notes == []  # an id without a row (pruned) is not a storage problem


def test_service_keeps_uploads_in_central_storage(tmp_path: Path) -> None:
    """`/predict` with store_images=central_storage: the answer as before; the row has no
    base64 image and references the upload, byte for byte, in central storage."""
    package(tmp_path / "cs", "shapes_a", "1", seed=1)
    settings = ServiceSettings(
        central_storage_path=tmp_path / "cs",
        state_dir=tmp_path / "state",
        metadata_file="shapes_a.yaml",
        store_images="central_storage",
        _env_file=None,
    )
    data = image_bytes("JPEG", size=(90, 70), seed=5)
    with TestClient(create_app(settings)) as client:
        answer = client.post("/predict", files={"file": ("a.jpg", data, "image/jpeg")})
        assert answer.status_code == 200 and answer.json()["overlaid_img"]
        assert wait_for_rows(settings.resolved_db_url, "predictions", 1) == 1
    row = rows(settings.resolved_db_url)[answer.json()["prediction_id"]]
    assert row.input_img is None and row.overlaid_img is None
    keys = keys_of(row)
    storage = CentralStorage(tmp_path / "cs")
    assert keys["image_key"].endswith(f"/{row.id}.jpg") and keys["image_key"].startswith(
        "images/shapes_a/"
    )
    assert storage.read_bytes(keys["image_key"]) == data
    assert storage.read_bytes(keys["overlay_key"]).startswith(b"\x89PNG")
