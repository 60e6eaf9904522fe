"""The whole loop on S3-compatible object storage, against a real S3 server process (moto):
dataset (DVC remote in the bucket) -> train -> package -> serve -> monitor -> rollback.

The service runs as "another host": its own state folder (its model cache), sharing with the
training side only the bucket and the prediction database. Nothing goes to a local
`central_storage` folder; MLflow's artifacts go to the bucket too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy import select

from cvops.data.demo import CLASSES
from cvops.data.demo_repo import build_demo_repo
from cvops.records.schema import DriftReport, make_engine
from cvops.storage import CentralStorage
from tests.s3 import S3Server
from tests.service.conftest import ServiceProcess, image_bytes

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CLASSES_3 = CLASSES[:3]
TOKEN = "s3cret"
ENV_DROP = ("PREFECT_HOME", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "CVOPS_SERVICE_URL")


def cvops(args: list[str], env: dict[str, str], cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=900,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-6000:]
    return out


def keras_gets(server: S3Server, bucket: str, since: int) -> list[str]:
    return [p for m, p in server.requests(bucket, since) if m == "GET" and ".keras" in p]


def test_train_package_serve_monitor_rollback_on_s3(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    url = f"s3://{s3_bucket}/central"
    project = tmp_path / "project"
    db_url = f"sqlite:///{tmp_path / 'predictions.db'}"
    env = {k: v for k, v in os.environ.items() if k not in ENV_DROP}
    env.update(
        CENTRAL_STORAGE_PATH=url,
        CVOPS_STATE_DIR=str(project / ".cvops"),
        CVOPS_BACKGROUND="false",
        CVOPS_SERVICE_DB_URL=db_url,
        CVOPS_SERVICE_ADMIN_TOKEN=TOKEN,
        TF_NUM_INTEROP_THREADS="1",
    )
    bucket = CentralStorage(url).fs

    # the dataset's DVC remote is in the bucket; the checkout of v1.0.0 must pull from it
    repo = project / "datasets" / "demo-shapes"
    build_demo_repo(
        repo,
        f"{url}/dvc_remote/demo-shapes",
        v1_train_per_class=8,
        v2_train_per_class=10,
        test_per_class=4,
        classes=CLASSES_3,
    )
    assert f"endpointurl = {s3_server.endpoint}" in (repo / ".dvc" / "config").read_text()
    assert bucket.find(f"{s3_bucket}/central/dvc_remote/demo-shapes")
    shutil.rmtree(repo / ".dvc" / "cache")

    cfg = yaml.safe_load((REPO / "configs" / "full_flow.yaml").read_text())
    cfg["model"]["classes"] = CLASSES_3
    cfg["model"]["drift_detection"]["reference_data_n_sample"] = 20
    cfg["dataset"]["dvc_tag"] = "v1.0.0"
    cfg["train"]["hparams"].update(epochs=1, batch_size=8)
    cfg["deploy"]["promotion"]["max_drop"] = 1.0  # the second (untrained) model serves too
    name = cfg["model"]["model_name"]

    host_b = tmp_path / "host-b"
    host_b.mkdir()
    with ServiceProcess(url, host_b, workers=1, model=None, CVOPS_SERVICE_DB_URL=db_url) as service:
        cfg["deploy"]["service_url"] = service.base
        config = project / "configs" / "full_flow.yaml"
        config.parent.mkdir()
        config.write_text(yaml.safe_dump(cfg))
        runs = []
        for _ in range(2):  # v1, then v2 (the champion; v1 becomes `previous`)
            mark = s3_server.mark()
            out = cvops([str(REPO / "run_flow.py"), "--config", str(config)], env, project)
            assert f"central storage : {url}" in out
            health = httpx.get(f"{service.base}/health_check", timeout=10).json()
            runs.append((health["model_version"], health["mlflow_run_id"]))
            # the service host downloaded the new version's three models once
            assert len(keras_gets(s3_server, s3_bucket, mark)) >= 3
        assert [v for v, _ in runs] == ["1", "2"]
        for seed in range(12):
            answer = httpx.post(
                f"{service.base}/predict?heatmaps=false",
                files={"file": ("x.png", image_bytes(seed=seed), "image/png")},
                timeout=60,
            )
            assert answer.status_code == 200 and answer.json()["model_version"] == "2"

        # the monitor reads the reference parquet from the bucket
        monitor_out = cvops(
            ["-m", "cvops.cli", "monitor", "--config", str(config), "--last-n", "50"],
            env,
            project,
        )
        assert "over 12 predictions" in monitor_out, monitor_out[-3000:]
        engine = make_engine(db_url)
        with engine.connect() as conn:
            reports = conn.execute(select(DriftReport.model_version)).scalars().all()
        engine.dispose()
        assert reports and set(reports) == {"2"}
        cache = project / ".cvops" / "cache" / "central_storage" / "sha256"
        assert list(cache.rglob(f"{name}_ref_data.parquet"))

        # rollback: the service host still has v1 in its cache: no model is downloaded again
        mark = s3_server.mark()
        out = cvops(["-m", "cvops.cli", "rollback", "--config", str(config)], env, project)
        assert f"Rolled back {name} to v1 (run {runs[0][1]}" in out
        health = httpx.get(f"{service.base}/health_check", timeout=10).json()
        assert (health["model_version"], health["mlflow_run_id"]) == runs[0]
        assert keras_gets(s3_server, s3_bucket, mark) == []

    # everything lives in the bucket: packages, versions, reference data, MLflow artifacts
    objects = bucket.find(f"{s3_bucket}/central")
    relative = {o.removeprefix(f"{s3_bucket}/central/") for o in objects}
    for expected in (
        f"models/{name}.yaml",
        f"models/{name}.keras",
        f"ref_data/{name}_ref_data.parquet",
    ):
        assert expected in relative
    for version, run_id in runs:
        assert f"models/{name}-v{version}-{run_id[:8]}.yaml" in relative
    assert any(o.startswith("mlartifacts/") for o in relative), sorted(relative)[:20]
    assert not (project / "central_storage").exists()
    assert not (project / ".cvops" / "mlflow" / "artifacts").exists()
