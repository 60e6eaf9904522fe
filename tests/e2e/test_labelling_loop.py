"""Issue 17 item 4: the labelling loop end to end, every part real.

A tiny model trained by `cvops run` on the demo repo, shifted traffic through the service's
`POST /predict` (recorded with its images in the prediction DB), `cvops label push --n 40` to a
Label Studio server on loopback, the 40 tasks answered through Label Studio's API as a labeller
would (the demo's ground truth: the class folder each image came from), `cvops label pull
--retrain`: feedback rows, dataset tag v2.1.0 holding those images, the full flow on it and the
promotion gate's decision in MLflow; then a pull with nothing new.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient
from mlflow.tracking import MlflowClient
from PIL import Image
from sqlalchemy import func, select

from cvops.data.demo import CLASSES, generate_demo_dataset
from cvops.data.demo_repo import build_demo_repo
from cvops.data.versioning import list_tags
from cvops.labelling.client import LabelStudio
from cvops.records.schema import Feedback, LabellingTask, Prediction, make_engine
from cvops.service.app import create_app
from cvops.service.settings import ServiceSettings
from cvops.storage import read_metadata

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CLASSES_3 = list(CLASSES[:3])
TRAFFIC_PER_CLASS = 20  # 60 predictions, 40 of them labelled
BRIGHTNESS = 1.7  # cvops.data.shift "brightness/high": the class stays what it was


def cvops(*args: str, env: dict[str, str], cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "cvops.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result.stdout


def shifted_png(path: Path) -> bytes:
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels * BRIGHTNESS, 0, 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_label_retrain_promote(tmp_path: Path, label_studio) -> None:
    root = tmp_path
    storage = root / "central_storage"
    repo = root / "datasets" / "demo-shapes"
    build_demo_repo(
        repo,
        storage / "dvc_remote" / "demo-shapes",
        v1_train_per_class=8,
        v2_train_per_class=10,
        test_per_class=4,
        classes=CLASSES_3,
    )
    cfg = yaml.safe_load((REPO / "configs" / "full_flow.yaml").read_text())
    cfg["model"]["classes"] = CLASSES_3
    cfg["model"]["drift_detection"]["reference_data_n_sample"] = 20
    cfg["dataset"].update(ds_root=str(root / "datasets"), dvc_tag="v2.0.0")
    cfg["train"]["hparams"].update(epochs=2, batch_size=8)
    cfg["train"]["validation"] = {"enabled": False}
    cfg.pop("monitor", None)
    cfg["labelling"] = {"n": 40, "strategy": "entropy", "random_share": 0.1}
    config = root / "full_flow.yaml"
    config.write_text(yaml.safe_dump(cfg))
    db_url = f"sqlite:///{root / 'service.db'}"
    env = {
        **os.environ,
        "CENTRAL_STORAGE_PATH": str(storage),
        "CVOPS_STATE_DIR": str(root / ".cvops"),
        "CVOPS_SERVICE_DB_URL": db_url,
        "CVOPS_BACKGROUND": "false",
        "CVOPS_LABEL_STUDIO_URL": label_studio.url,
        "CVOPS_LABEL_STUDIO_TOKEN": label_studio.token,
    }
    env.pop("CVOPS_SERVICE_URL", None)
    cvops("run", str(config), env=env, cwd=root)
    name = cfg["model"]["model_name"]
    first = read_metadata(storage / "models" / f"{name}.yaml")

    # shifted traffic through the service; the truth is the folder each image came from
    traffic = root / "traffic"
    generate_demo_dataset(
        traffic, n_train_per_class=0, n_test_per_class=TRAFFIC_PER_CLASS, seed=11, classes=CLASSES_3
    )
    truth: dict[str, str] = {}
    settings = ServiceSettings(
        central_storage_path=storage,
        state_dir=root / ".cvops" / "service",
        metadata_file=f"{name}.yaml",
        db_url=db_url,
        batch_max_wait_ms=2,
    )
    engine = make_engine(db_url)
    with TestClient(create_app(settings)) as client:
        for path in sorted((traffic / "test").rglob("*.jpg")):
            answer = client.post(
                "/predict", files={"file": ("x.png", shifted_png(path), "image/png")}
            )
            assert answer.status_code == 200, answer.text
            truth[answer.json()["prediction_id"]] = path.parent.name
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                stored = conn.execute(select(func.count()).select_from(Prediction)).scalar_one()
            if stored == len(truth):
                break
            time.sleep(0.5)
    assert stored == len(truth) == 3 * TRAFFIC_PER_CLASS

    out = cvops("label", "push", "--config", str(config), env=env, cwd=root)
    assert "sent 40 of 60" in out and "random 4" in out and "entropy 36" in out

    with LabelStudio(label_studio.url, label_studio.token) as studio:
        project = studio.find_project(f"cvops {name}")
        tasks = studio.tasks(project["id"])
        assert len(tasks) == 40
        for task in tasks:
            assert task["predictions"][0]["model_version"] == f"{name} v{first.version}"
            studio.annotate(task["id"], truth[task["data"]["prediction_id"]])

    before = list_tags(repo)
    out = cvops("label", "pull", "--config", str(config), "--retrain", env=env, cwd=root)
    assert "40 labels pulled" in out and "dataset version v2.1.0" in out
    assert list_tags(repo) == [*before, "v2.1.0"]
    with engine.connect() as conn:
        labels = dict(conn.execute(select(Feedback.prediction_id, Feedback.label)).all())
        tagged = conn.execute(
            select(func.count())
            .select_from(LabellingTask)
            .where(LabellingTask.dataset_tag == "v2.1.0")
        ).scalar_one()
    assert len(labels) == 40 and all(truth[p] == label for p, label in labels.items())
    assert tagged == 40
    added = list((repo / "images" / "train").rglob("ls_*.png"))
    assert len(added) == 40 and all(
        truth[p.stem.removeprefix("ls_")] == p.parent.name for p in added
    )

    second = read_metadata(storage / "models" / f"{name}.yaml")
    assert second.data_version["tag"] == "v2.1.0" and second.version != first.version
    db = root / ".cvops" / "mlflow" / "mlflow.db"
    mlflow = MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    run = mlflow.get_run(second.mlflow_run_id)
    assert run.data.tags["data.tag"] == "v2.1.0"
    assert run.data.tags["promotion.decision"] in {"promote", "reject"}
    assert run.data.tags["promotion.champion_before"] == str(first.version)
    print("promotion:", run.data.tags["promotion.decision"], run.data.tags["promotion.reason"])

    out = cvops("label", "pull", "--config", str(config), env=env, cwd=root)
    assert "nothing new" in out and list_tags(repo)[-1] == "v2.1.0"
    engine.dispose()
