"""Ranked drift causes on real images (issue 16 item 5): demo shapes, a small CNN trained for a
few seconds, the shipped shift scenarios, the monitor's own run over a prediction database.

Rows are written as the service writes them (features from the model, image properties from
`cvops.data.properties.input_properties`, the upload and its Grad-CAM overlay as base64),
without running the service: its property path has its own tests (tests/service).
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import uuid
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sqlalchemy import text

from cvops.config import DriftDetectionConfig, InputSize, MonitorConfig
from cvops.data.demo import generate_demo_dataset
from cvops.data.properties import IMAGE_PROPERTIES, image_size, input_properties, properties_frame
from cvops.data.shift import generate_shift_scenarios
from cvops.model.build import build_model
from cvops.model.drift import build_bbsd, build_hidden, build_uae, reference_frame
from cvops.model.gradcam import gradcam, gradient_model, heatmap_to_image, overlay
from cvops.model.pipeline import make_dataset
from cvops.model.train import save_package
from cvops.monitor.causes import CAUSE_ALPHA, NO_SINGLE_CAUSE, PREDICTION_CAUSE, explain_drift
from cvops.monitor.run import run_monitor
from cvops.records.schema import make_engine, upgrade_schema
from cvops.service.recording import Recorder, write_batch
from cvops.storage import CentralStorage, ModelMetadata, utc_now

CLASSES = ["circle", "square", "triangle", "star"]
SIZE = (50, 50)
WINDOW = 200


@dataclass
class World:
    storage: CentralStorage
    metadata_file: str
    model: keras.Model
    uae: keras.Model
    hidden: keras.Model
    scenarios: Path
    manifest: pd.DataFrame


def _images(paths: list[str]) -> np.ndarray:
    ds = make_dataset(paths, [0] * len(paths), SIZE, 64)
    return np.concatenate([x.numpy() for x, _ in ds])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("causes")
    data = root / "data"
    csv = generate_demo_dataset(
        data, n_train_per_class=100, n_test_per_class=60, seed=16, classes=CLASSES
    )
    scenarios = root / "scenarios"
    generate_shift_scenarios(
        data / "test",
        scenarios,
        annotations=csv,
        seed=16,
        scenarios=("brightness", "class_prior"),
        severities=("high",),
    )
    train = sorted((data / "train").rglob("*.jpg"))
    labels = np.array([CLASSES.index(p.parent.name) for p in train])
    x = _images([str(p) for p in train])
    keras.utils.set_random_seed(16)
    model = build_model(SIZE, len(CLASSES), backbone="small_cnn")
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    fit = model.fit(x, labels, epochs=6, batch_size=32, verbose=0)
    print("train accuracy", fit.history["accuracy"][-1])
    uae, bbsd = build_uae(SIZE, 32, seed=16), build_bbsd(model)
    hidden = build_hidden(model, "features")
    assert hidden is not None
    props = properties_frame([x], [str(p) for p in train])
    ref = reference_frame(
        uae.predict(x, verbose=0),
        bbsd.predict(x, verbose=0),
        labels,
        CLASSES,
        hidden.predict(x, verbose=0),
        props,
    )
    drift = DriftDetectionConfig(hidden_layer="features")
    names = CentralStorage.artifact_names("shapes", drift)
    files = save_package(root / "build", "shapes", names, model, uae, bbsd, ref)
    meta = ModelMetadata(
        model_name="shapes",
        input_size=InputSize(w=SIZE[1], h=SIZE[0]),
        classes=CLASSES,
        drift_detection=drift,
        version="1",
        created_on=utc_now(),
        **names,
    )
    storage = CentralStorage(root / "cs")
    metadata_file = storage.publish(files, meta).name
    manifest = pd.read_csv(scenarios / "manifest.csv")
    return World(storage, metadata_file, model, uae, hidden, scenarios, manifest)


def window_rows(world: World, scenario: str, severity: str, seed: int) -> list[dict]:
    """WINDOW prediction rows for images of one scenario, as the service stores them."""
    pool = world.manifest[
        (world.manifest["scenario"] == scenario) & (world.manifest["severity"] == severity)
    ]
    picked = pool.sample(n=WINDOW, replace=len(pool) < WINDOW, random_state=seed)
    paths = [str(world.scenarios / p) for p in picked["path"]]
    x = _images(paths)
    probs, cams = (t.numpy() for t in gradcam(gradient_model(world.model), x))
    uae, hidden = world.uae.predict(x, verbose=0), world.hidden.predict(x, verbose=0)
    now = dt.datetime.now(dt.UTC)
    rows = []
    for i, path in enumerate(paths):
        raw = Path(path).read_bytes()
        rgb = np.asarray(Image.open(path).convert("RGB"))
        heat = heatmap_to_image(cams[i], rgb.shape[1], rgb.shape[0])
        buf = io.BytesIO()
        Image.fromarray(overlay(rgb, heat)).save(buf, "PNG")
        width, height = image_size(path)
        rows.append(
            {
                "id": str(uuid.uuid4()),
                "model_name": "shapes",
                "model_version": "1",
                "input_img": base64.b64encode(raw).decode("ascii"),
                "overlaid_img": base64.b64encode(buf.getvalue()).decode("ascii"),
                "prediction_json": {"predicted_class": CLASSES[int(probs[i].argmax())]},
                "uae_feats": uae[i].tolist(),
                "bbsd_feats": probs[i].tolist(),
                "hidden_feats": hidden[i].tolist(),
                "image_props": input_properties(x[i], width, height),
                "created_on": (now - dt.timedelta(milliseconds=i)).isoformat(),
            }
        )
    return rows


def monitor(world: World, tmp_path: Path, scenario: str, severity: str, seed: int = 0):
    url = f"sqlite:///{tmp_path / f'{scenario}.db'}"
    engine = make_engine(url)
    upgrade_schema(engine)
    write_batch(engine, [("prediction", r) for r in window_rows(world, scenario, severity, seed)])
    engine.dispose()
    return run_monitor(world.storage, world.metadata_file, url, last_n=WINDOW), url


@pytest.fixture(scope="module")
def brightness(world: World, tmp_path_factory: pytest.TempPathFactory):
    return monitor(world, tmp_path_factory.mktemp("brightness"), "brightness", "high")


def test_brightness_shift_ranks_brightness_first(brightness) -> None:
    check, url = brightness
    causes = check.causes
    assert causes is not None and check.drifted
    top = causes.properties[0]
    assert causes.top_cause == "brightness" and top.name == "brightness"
    assert top.significant and top.direction == 1 and top.change > 0.3
    assert causes.sentence.startswith("Images are brighter")
    # a cause is named at the stricter cause level, the verdict at alpha (MonitorConfig)
    assert causes.alpha == CAUSE_ALPHA == MonitorConfig().cause_alpha < MonitorConfig().alpha
    # the images that show it: thumbnails of the upload and its Grad-CAM overlay
    assert len(causes.examples) == 8
    assert all(e.image and e.image.startswith("data:image/jpeg;base64,") for e in causes.examples)
    assert all(e.overlay and e.predicted_class in CLASSES for e in causes.examples)
    engine = make_engine(url)
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT sentence, top_cause, details FROM drift_causes WHERE run_id = :r"),
            {"r": check.run_id},
        ).one()
    engine.dispose()
    assert row.sentence == causes.sentence and row.top_cause == "brightness"
    print("brightness:", causes.sentence)


def test_class_prior_shift_ranks_the_prediction_shift_first(world: World, tmp_path) -> None:
    check, _ = monitor(world, tmp_path, "class_prior", "high")
    causes = check.causes
    assert causes is not None
    assert causes.top_cause == PREDICTION_CAUSE and causes.ranked_causes[0] == PREDICTION_CAUSE
    assert causes.prediction is not None and causes.prediction.significant
    assert causes.prediction.towards(), causes.prediction.classes
    assert not [p.name for p in causes.properties if p.significant]
    print("class prior:", causes.sentence)


def monitor_through_flusher(
    world: World, tmp_path: Path, storage: CentralStorage | None, keep: bool = True
):
    """The brightness window written by the service's spool flusher: images moved to
    `storage` (CVOPS_SERVICE_STORE_IMAGES=central_storage), or not kept at all (`none`)."""
    rows = window_rows(world, "brightness", "high", seed=0)
    if not keep:
        for row in rows:
            row["input_img"] = row["overlaid_img"] = None
    url = f"sqlite:///{tmp_path / 'flushed.db'}"
    recorder = Recorder(url, tmp_path / "spool", fsync=False, image_storage=storage)
    recorder.start()
    recorder.record([("prediction", r) for r in rows])
    recorder.stop()  # flushes the spool
    return run_monitor(world.storage, world.metadata_file, url, last_n=WINDOW), url


def test_examples_come_from_central_storage_when_images_are_not_in_the_db(
    world: World, tmp_path: Path
) -> None:
    check, url = monitor_through_flusher(world, tmp_path, world.storage)
    engine = make_engine(url)
    with engine.connect() as conn:
        inline = conn.execute(text("SELECT COUNT(input_img) FROM predictions")).scalar_one()
    engine.dispose()
    assert inline == 0  # the rows reference the objects
    causes = check.causes
    assert causes is not None and causes.top_cause == "brightness"
    assert len(causes.examples) == 8 and not causes.notes
    assert all(e.image and e.image.startswith("data:image/jpeg;base64,") for e in causes.examples)
    assert all(e.overlay and e.overlay.startswith("data:image/") for e in causes.examples)


def test_examples_without_stored_images_keep_their_ids_and_say_why(
    world: World, tmp_path: Path
) -> None:
    check, _ = monitor_through_flusher(world, tmp_path, None, keep=False)
    causes = check.causes
    assert causes is not None and causes.top_cause == "brightness"  # the causes stand
    assert len(causes.examples) == 8 and all(e.image is None for e in causes.examples)
    assert causes.notes == [
        "8 of 8 example images were not stored (the service ran with "
        "CVOPS_SERVICE_STORE_IMAGES=none): ids only; set it to db or central_storage to see them"
    ]


def test_unshifted_traffic_gives_no_cause(world: World, tmp_path: Path) -> None:
    check, _ = monitor(world, tmp_path, "none", "none")
    causes = check.causes
    assert causes is not None
    assert causes.top_cause is None and causes.sentence == NO_SINGLE_CAUSE
    assert causes.ranked_causes == [] and not causes.notes
    assert {p.name for p in causes.properties} == set(IMAGE_PROPERTIES)


def test_reference_without_properties_degrades_to_the_embedding_verdict(
    world: World, tmp_path: Path
) -> None:
    """A package from before the properties: the verdict as before, causes from the
    predictions only, and a note saying why."""
    meta_path = world.storage.metadata_path(world.metadata_file)
    from cvops.storage import read_metadata

    ref_path = world.storage.resolve(read_metadata(meta_path).reference_data_path)
    full = pd.read_parquet(ref_path)
    try:
        full[[c for c in full.columns if not c.startswith("prop_")]].to_parquet(ref_path)
        check, _ = monitor(world, tmp_path, "brightness", "high")
    finally:
        full.to_parquet(ref_path)
    causes = check.causes
    assert causes is not None and check.drifted
    assert causes.properties == [] and causes.top_cause != "brightness"
    assert any("no image properties" in n for n in causes.notes)


def test_explain_drift_is_a_plain_function() -> None:
    """What a benchmark calls: arrays in, a report out; old rows without properties too."""
    rng = np.random.default_rng(0)
    ref = pd.DataFrame({p: rng.normal(100, 10, 500) for p in IMAGE_PROPERTIES})
    win = pd.DataFrame({p: rng.normal(100, 10, 200) for p in IMAGE_PROPERTIES})
    win["sharpness"] *= 0.5
    labels = list(rng.choice(CLASSES, 500))
    report = explain_drift(
        classes=CLASSES,
        reference_properties=ref,
        window_properties=win,
        reference_labels=labels,
        window_predicted=list(rng.choice(CLASSES, 200)),
    )
    assert report.top_cause == "blur" and report.properties[0].effect.startswith(
        "sharpness \u22124"
    )
    assert report.prediction is not None and report.prediction.basis == "labels"
    assert report.tests == len(IMAGE_PROPERTIES) + 1
    none = explain_drift(
        classes=CLASSES,
        reference_properties=ref,
        window_properties=pd.DataFrame([{}] * 200, columns=list(IMAGE_PROPERTIES)),
    )
    assert none.sentence == NO_SINGLE_CAUSE and len(none.notes) == 2


def test_causes_reach_report_webhook_cli_and_prometheus(
    world: World, brightness, tmp_path: Path, monkeypatch
) -> None:
    """The same causes in the self-contained HTML report, the webhook payload, `cvops drift
    show` and the service's `cvops_drift_property_score` gauge."""
    from typer.testing import CliRunner

    from cvops.cli import app
    from cvops.flows.monitor_flow import alert_payload
    from cvops.monitor.check import load_reference
    from cvops.monitor.evidently_report import build_snapshot, write_html
    from cvops.records.schema import latest_drift_cause
    from cvops.service.metrics import ServiceMetrics
    from cvops.storage import read_metadata

    check, url = brightness
    meta = read_metadata(world.storage.metadata_path(world.metadata_file))
    snapshot = build_snapshot(check, load_reference(world.storage, meta), evidently_mmd=False)
    html = write_html(snapshot, tmp_path / "report.html", check.causes).read_text()
    assert "Why did it drift?" in html and check.causes.sentence.split(" (")[0] in html
    assert html.count('src="data:image/jpeg;base64,') == 16  # 8 uploads + 8 overlays
    payload = alert_payload(check)
    assert payload["likely_cause"] == check.causes.sentence
    assert payload["causes"]["ranked_causes"][0] == "brightness"
    assert payload["causes"]["examples"][0]["image"] is None  # ids, not images, in JSON

    monkeypatch.setenv("CVOPS_SERVICE_DB_URL", url)
    shown = CliRunner().invoke(app, ["drift", "show", check.run_id[:8]])
    assert shown.exit_code == 0, shown.output
    assert "brightness" in shown.output and check.run_id in shown.output
    missing = CliRunner().invoke(app, ["drift", "show", "ffffffff"])
    assert missing.exit_code == 1

    metrics = ServiceMetrics()
    engine = make_engine(url)
    metrics.set_drift_causes("shapes", latest_drift_cause(engine, "shapes").details)
    engine.dispose()
    body = metrics.render()[0].decode()
    top = check.causes.properties[0]
    assert (
        f'cvops_drift_property_score{{model="shapes",property="brightness"}} {top.statistic}'
        in body
    )
