"""The stack's MLflow server with its artifacts in object storage (`--artifacts-destination`
under central storage): started as `cvops up` configures it, against a moto server process."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient

from cvops.stack import programs
from cvops.stack.settings import StackSettings
from cvops.storage import CentralStorage
from tests.s3 import S3Server
from tests.service.conftest import free_port

REPO = Path(__file__).resolve().parents[2]


def test_stack_settings_point_mlflow_and_clients_at_the_bucket(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    url = f"s3://{s3_bucket}/central"
    settings = StackSettings(_env_file=None, state_dir=tmp_path, central_storage_path=url)
    secrets = programs.Secrets("pg", "jupyter", "token")
    assert programs.client_env(settings, secrets)["CENTRAL_STORAGE_PATH"] == url
    server = next(s for s in programs.services(settings, secrets, REPO) if s.name == "mlflow")
    assert server.program is not None
    assert server.program.env["MLFLOW_ARTIFACTS_DESTINATION"] == f"{url}/mlartifacts"
    assert server.program.env["MLFLOW_S3_ENDPOINT_URL"] == s3_server.endpoint
    programs.write_configs(settings, secrets)
    assert not (Path.cwd() / url).exists() and not Path("s3:").exists()
    local = StackSettings(_env_file=None, state_dir=tmp_path, central_storage_path=tmp_path / "cs")
    mlflow_local = next(s for s in programs.services(local, secrets, REPO) if s.name == "mlflow")
    assert mlflow_local.program is not None
    assert "MLFLOW_S3_ENDPOINT_URL" not in mlflow_local.program.env


@pytest.mark.slow
def test_mlflow_server_stores_artifacts_in_the_bucket(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    url = f"s3://{s3_bucket}/central"
    settings = StackSettings(_env_file=None, state_dir=tmp_path, central_storage_path=url)
    secrets = programs.Secrets("pg", "jupyter", "token")
    server = next(s for s in programs.services(settings, secrets, REPO) if s.name == "mlflow")
    assert server.program is not None
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(server.program.env)
    env["MLFLOW_BACKEND_STORE_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"  # no Postgres here
    command = [*server.program.command]
    command[command.index("--port") + 1] = str(port)
    log = open(tmp_path / "mlflow.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, (tmp_path / "mlflow.log").read_text()[-3000:]
            time.sleep(0.5)
        client = MlflowClient(tracking_uri=base)
        experiment = client.create_experiment("s3-artifacts")
        run = client.create_run(experiment)
        (tmp_path / "note.txt").write_text("in the bucket")
        client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"), "notes")
        assert [a.path for a in client.list_artifacts(run.info.run_id, "notes")] == [
            "notes/note.txt"
        ]
        stored = CentralStorage(url).fs.find(f"{s3_bucket}/central/mlartifacts")
        assert any(o.endswith(f"{run.info.run_id}/artifacts/notes/note.txt") for o in stored)
        assert os.environ.get("MLFLOW_TRACKING_URI") != base  # nothing leaks to later tests
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
        log.close()
