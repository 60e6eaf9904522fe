"""Item 6: the scheduled monitor as users run it, all parts real.

A Prefect server (SQLite) and a process worker, a gunicorn model service on a tiny trained
package, the deploy flow against that service, traffic through `POST /predict`, and the
deployment triggered twice: un-shifted traffic must give "no drift", strongly shifted traffic
"drift", each with an Evidently report in the workspace.

Why this is not flaky: every input is fixed (seeded demo images, seeded training, seeded UAE,
seeded permutations in the monitor), and each window holds exactly one batch of traffic
(`last_n` = batch size, newest rows first), so both verdicts are deterministic up to float
rounding in batched inference. The un-shifted verdict is a draw from a test calibrated to
alarm on 5% of un-shifted windows: with these seeds it does not (the test prints every score
and threshold, so a changed seed shows its margin). The shift (brightness x1.7 on the same
held-out images) is detected by UAE-MMD in 100% of windows from n=100 on in
benchmarks/results/drift_power.md; the window here is 150.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import Row, func, select
from sqlalchemy.engine import Engine

from cvops.monitor.stats import DEFAULT_METHODS
from cvops.records.schema import DriftReport, Prediction, make_engine
from tests.service.conftest import ServiceProcess, package
from tests.test_prefect_deploy import prefect_server  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow

NAME = "shapes_e2e"
POOL = "e2e-model-pool"
DEPLOYMENT = "drift-e2e"
PROJECT = "e2e-drift"
PER_CLASS_TEST = 50  # 3 classes: a window of 150 predictions
BRIGHTNESS = 1.7  # cvops.data.shift "brightness/high"
# Variables the flow run needs; the worker does NOT get them: the deployment must carry them.
PROJECT_ENV = ("CENTRAL_STORAGE_PATH", "CVOPS_STATE_DIR", "CVOPS_SERVICE_DB_URL")


def train_package(storage: Path, data: Path, classes: list[str]) -> str:
    """A tiny trained package through the training code path (2 epochs on 300 images)."""
    from cvops.config import DriftDetectionConfig, InputSize, parse_config
    from cvops.data.images import index_split, select_classes
    from cvops.model.train import Splits, build_detectors, fit_model, save_package
    from cvops.storage import CentralStorage, ModelMetadata, utc_now

    cfg = parse_config(
        {
            "flow_module": "cvops.flows.train_flow",
            "seed": 3,
            "model": {"model_name": NAME, "input_size": {"w": 50, "h": 50}, "classes": classes},
            "dataset": {"ds_root": str(data.parent), "ds_name": data.name},
            "train": {
                "hparams": {"epochs": 2, "batch_size": 32, "init_lr": 0.002},
                "mlflow": {"exp_name": "unused"},
            },
        }
    )
    train = select_classes(index_split(data, "train"), classes)
    splits = Splits(train=train, val=train.iloc[:0], test=train.iloc[:0])
    model, _ = fit_model(cfg, splits)
    uae, bbsd, ref = build_detectors(cfg, model, splits)
    drift = DriftDetectionConfig()
    names = CentralStorage.artifact_names(NAME, drift)
    files = save_package(storage / "_build" / NAME, NAME, names, model, uae, bbsd, ref)
    meta = ModelMetadata(
        model_name=NAME,
        input_size=InputSize(w=50, h=50),
        classes=classes,
        drift_detection=drift,
        backbone=cfg.model.backbone,
        weights=cfg.model.weights,
        created_on=utc_now(),
        **names,
    )
    return CentralStorage(storage).publish(files, meta).name


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from cvops.data.demo import CLASSES, generate_demo_dataset

    root = tmp_path_factory.mktemp("prefect-monitoring")
    classes = CLASSES[:3]
    data = root / "data"
    generate_demo_dataset(
        data, n_train_per_class=100, n_test_per_class=PER_CLASS_TEST, seed=11, classes=classes
    )
    storage = root / "central_storage"
    metadata_file = train_package(storage, data, classes)
    package(storage, "placeholder", "1", seed=1)  # what the service serves before the deploy
    test_images = sorted((data / "test").rglob("*.jpg"))
    assert len(test_images) == 3 * PER_CLASS_TEST
    return {
        "root": root,
        "storage": storage,
        "metadata_file": metadata_file,
        "images": test_images,
        "db_url": f"sqlite:///{root / 'service.db'}",
        "workspace": root / "evidently",
    }


@pytest.fixture(scope="module")
def worker(prefect_server: str, project: dict) -> Iterator[Path]:  # noqa: F811
    """`prefect worker start --type process`, in another folder, without the project's env."""
    home = project["root"] / "worker"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in PROJECT_ENV}
    env.update(
        PREFECT_API_URL=prefect_server,
        PREFECT_HOME=str(home / "prefect"),
        PREFECT_WORKER_QUERY_SECONDS="2",
    )
    log_path = home / "worker.log"
    log = open(log_path, "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "prefect"),
            "worker",
            "start",
            "--pool",
            POOL,
            "--type",
            "process",
        ],
        cwd=home,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    yield log_path
    os.killpg(proc.pid, signal.SIGTERM)  # the worker and any flow-run process it started
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    log.close()


def jpeg(path: Path, brightness: float | None) -> bytes:
    if brightness is None:
        return path.read_bytes()
    from cvops.data.shift import adjust_brightness

    image = adjust_brightness(np.asarray(Image.open(path).convert("RGB")), brightness)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def send_traffic(base: str, images: list[Path], brightness: float | None, engine: Engine) -> None:
    """POST every image to /predict, then wait until the service has recorded all of them."""
    with engine.connect() as conn:
        before = conn.execute(select(func.count()).select_from(Prediction)).scalar_one()

    def post(path: Path) -> None:
        files = {"file": (path.name, jpeg(path, brightness), "image/jpeg")}
        response = httpx.post(f"{base}/predict", files=files, timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["model_name"] == NAME

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(post, images))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            count = conn.execute(select(func.count()).select_from(Prediction)).scalar_one()
        if count == before + len(images):
            return
        time.sleep(0.5)
    raise AssertionError(f"only {count - before} of {len(images)} predictions were recorded")


def trigger(engine: Engine, worker_log: Path) -> tuple[str, list[Row]]:
    """Run the deployment through the worker; its drift_reports rows."""
    from prefect.deployments import run_deployment

    with engine.connect() as conn:
        seen = set(conn.execute(select(DriftReport.run_id).distinct()).scalars())
    flow_run = run_deployment(name=f"drift_detection_evidently/{DEPLOYMENT}", timeout=600)
    assert flow_run.state is not None and flow_run.state.is_completed(), (
        f"{flow_run.state}\n{worker_log.read_text()[-5000:]}"
    )
    with engine.connect() as conn:
        rows = list(conn.execute(DriftReport.__table__.select()))  # type: ignore[attr-defined]
    run_ids = {r.run_id for r in rows} - seen
    assert len(run_ids) == 1, run_ids
    (run_id,) = run_ids
    new = [r for r in rows if r.run_id == run_id]
    for r in new:
        print(f"{r.embedding}/{r.method}: score {r.score:.4g} threshold {r.threshold:.4g}")
    return run_id, new


def verdict(rows: list[Row]) -> str:
    """The monitor's rule: drift when an alarm test (DEFAULT_METHODS) fired."""
    fired = [r for r in rows if r.drifted and r.method in DEFAULT_METHODS.get(r.embedding, ())]
    return "drift" if fired else "no drift"


def test_deploy_then_scheduled_monitor_no_drift_then_drift(
    prefect_server: str,  # noqa: F811
    worker: Path,
    project: dict,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from evidently.ui.workspace import Workspace
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.variables import Variable

    from cvops.flows import deploy_flow

    root, storage, db_url = project["root"], project["storage"], project["db_url"]
    n = len(project["images"])
    config = {
        "flow_module": "cvops.flows.deploy_flow",
        "model": {
            "model_name": NAME,
            "input_size": {"w": 50, "h": 50},
            "classes": ["circle", "square", "triangle"],
        },
        "deploy": {"prefect": {"deployment_name": DEPLOYMENT}},
        "monitor": {
            "last_n": n,  # the window is exactly the newest batch of traffic
            "last_days": 1,
            "pool_name": POOL,
            "evidently_project": PROJECT,
            "workspace": "evidently",  # relative: resolved in the project folder at deploy
        },
    }
    with ServiceProcess(
        storage, root, workers=2, model="placeholder.yaml", CVOPS_SERVICE_DB_URL=db_url
    ) as service:
        config["deploy"]["service_url"] = service.base
        monkeypatch.chdir(root)  # the project folder: the deployment's source
        monkeypatch.setenv("CENTRAL_STORAGE_PATH", str(storage))
        monkeypatch.setenv("CVOPS_STATE_DIR", str(root / "state"))
        monkeypatch.setenv("CVOPS_SERVICE_DB_URL", db_url)
        monkeypatch.setenv("CVOPS_SERVICE_ADMIN_TOKEN", "s3cret")
        monkeypatch.setenv("PREFECT_API_URL", prefect_server)
        with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
            result = deploy_flow.start(config)
            assert "is champion" in result["deploy"], result
            assert f"serves {NAME}" in result["deploy"]
            assert Variable.get("current_model_metadata_file") == project["metadata_file"]
            assert Variable.get("monitor_pool_name") == POOL
            with get_client(sync_client=True) as client:
                found = client.read_deployment_by_name(f"drift_detection_evidently/{DEPLOYMENT}")
            assert found.work_pool_name == POOL
            assert found.parameters["last_n"] == n
            assert found.parameters["workspace"] == str(root / "evidently")
            assert found.job_variables["env"]["CVOPS_SERVICE_DB_URL"] == db_url
            assert found.job_variables["env"]["CENTRAL_STORAGE_PATH"] == str(storage)

            engine = make_engine(db_url)
            send_traffic(service.base, project["images"], None, engine)
            calm_id, calm = trigger(engine, worker)
            assert {r.sample_size for r in calm if r.embedding != "labels"} == {n}
            assert verdict(calm) == "no drift"

            send_traffic(service.base, project["images"], BRIGHTNESS, engine)
            alarm_id, alarm = trigger(engine, worker)
            assert {r.sample_size for r in alarm if r.embedding != "labels"} == {n}
            assert verdict(alarm) == "drift"
            assert any(r.drifted for r in alarm if (r.embedding, r.method) == ("uae", "mmd"))
            engine.dispose()

    workspace = Workspace(str(root / "evidently"))
    projects = workspace.search_project(PROJECT)
    assert len(projects) == 1 and len(workspace.list_runs(projects[0].id)) == 2
    for run_id in (calm_id, alarm_id):
        report = root / "evidently" / "reports" / f"{run_id}.html"
        assert report.is_file() and NAME in report.read_text()
