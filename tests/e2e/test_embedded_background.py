"""Item 7: `cvops run` on embedded defaults (no service URL, no Prefect server) deploys to a
background model service it starts, schedules the monitor in a background scheduler (Prefect
ephemeral mode), says so, and `cvops background --stop` leaves no process behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy import select

from cvops import background
from cvops.monitor.schedule import REGISTERED
from cvops.records.schema import DriftReport, make_engine
from tests.service.conftest import free_port, image_bytes, package

pytestmark = pytest.mark.slow

NAME = "embedded_demo"
ENV_DROP = ("PREFECT_API_URL", "PREFECT_HOME", "CVOPS_SERVICE_URL", "CVOPS_SERVICE_ADMIN_TOKEN")


def processes_with(key: str, value: str) -> list[int]:
    """Live processes whose environment has key=value (everything our processes started)."""
    needle = f"{key}={value}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes().split(b"\0"):
                stat = (environ.parent / "stat").read_text().rsplit(")", 1)[1].split()
                if stat[0] != "Z":
                    found.append(int(environ.parent.name))
        except (OSError, IndexError):
            continue
    return found


def cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cvops.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=600,
    )


def wait_for(check, timeout_s: float, what: str, poll_s: float = 1) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")


def test_run_starts_service_and_scheduler_then_stop_leaves_nothing(tmp_path: Path) -> None:
    storage, state = tmp_path / "central_storage", tmp_path / "state"
    package(storage, NAME, None, seed=4)
    config = tmp_path / "deploy.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "flow_module": "cvops.flows.deploy_flow",
                "model": {
                    "model_name": NAME,
                    "input_size": {"w": 50, "h": 50},
                    "classes": ["circle", "square", "triangle"],
                },
                "deploy": {"prefect": {"deployment_name": "embedded"}},
                "monitor": {"cron": "* * * * *", "last_n": 50, "workspace": "evidently"},
            }
        )
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ENV_DROP}
    env.update(
        CENTRAL_STORAGE_PATH=str(storage),
        CVOPS_STATE_DIR=str(state),
        CVOPS_BACKGROUND="true",
        CVOPS_SERVICE_PORT=str(port),
    )
    try:
        result = cli(["run", str(config)], env, tmp_path)
        out = result.stdout + result.stderr
        assert result.returncode == 0, out[-5000:]
        url = f"http://127.0.0.1:{port}"
        assert f"{url} serves {NAME}" in result.stdout
        assert "served by a background scheduler (Prefect ephemeral mode" in result.stdout
        assert "stop with `cvops background --stop`" in result.stdout
        run = background.run_dir(state)
        assert str(run / "service.log") in result.stdout
        assert str(run / "monitor-scheduler.log") in result.stdout

        # the background service answers and serves the deployed model
        assert httpx.get(f"{url}/ready", timeout=5).status_code == 200
        for seed in range(5):
            files = {"file": ("x.png", image_bytes(seed=seed), "image/png")}
            response = httpx.post(f"{url}/predict", files=files, timeout=60)
            assert response.status_code == 200 and response.json()["model_name"] == NAME

        # the scheduler registered its deployment and runs it on the cron (every minute here):
        # a scheduled monitor run writes drift_reports rows to the service DB
        scheduler = background.Background(background.SCHEDULER, state)
        assert scheduler.alive()
        wait_for(lambda: REGISTERED in scheduler.log_file.read_text(), 240, "registration")
        engine = make_engine(f"sqlite:///{state / 'service' / 'service.db'}")

        def reported() -> bool:
            with engine.connect() as conn:
                return conn.execute(select(DriftReport.run_id).limit(1)).first() is not None

        wait_for(reported, 300, "a scheduled monitor run", poll_s=5)
        engine.dispose()
        assert "next run at" in scheduler.log_file.read_text()
        # the run finishes with its Evidently report in the config's (cwd-relative) workspace
        reports = tmp_path / "evidently" / "reports"
        wait_for(lambda: any(reports.glob("*.html")), 180, "the scheduled run's report")

        shown = cli(["background"], env, tmp_path)
        assert "service pid" in shown.stdout and "monitor-scheduler pid" in shown.stdout
        stopped = cli(["background", "--stop"], env, tmp_path)
        assert stopped.returncode == 0, stopped.stderr[-3000:]
        assert "stopped: service, monitor-scheduler" in stopped.stdout
    finally:
        background.stop_all(state)
    wait_for(lambda: not processes_with("CVOPS_STATE_DIR", str(state)), 30, "no process left")
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health_check", timeout=2)


def test_rollback_reaches_the_background_service(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """`cvops rollback` with no service URL configured: the registry alias, the background
    service (its URL and generated token) and the Prefect Variable all go back to v1."""
    from mlflow.tracking import MlflowClient

    from cvops import deploy
    from cvops.settings import Settings

    storage, state = tmp_path / "central_storage", tmp_path / "state"
    name = "embedded_rollback"
    package(storage, name, "1", seed=1)
    package(storage, name, "2", seed=2)
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    client.create_registered_model(name)
    for _ in range(2):
        client.create_model_version(name, source=str(storage))
    deploy.promote(client, name, "1")
    deploy.promote(client, name, "2")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ENV_DROP}
    env.update(
        CENTRAL_STORAGE_PATH=str(storage),
        CVOPS_STATE_DIR=str(state),
        CVOPS_SERVICE_PORT=str(port),
        MLFLOW_TRACKING_URI=mlflow_uri,
    )
    for key in ENV_DROP:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = tmp_path / "model.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "flow_module": "cvops.flows.deploy_flow",
                "model": {
                    "model_name": name,
                    "input_size": {"w": 50, "h": 50},
                    "classes": ["circle", "square", "triangle"],
                },
            }
        )
    )
    try:
        url, started = deploy.ensure_local_service(Settings(), f"{name}-v2.yaml")
        assert started

        def served() -> set[str]:
            files = {"file": ("x.png", image_bytes(), "image/png")}
            return {
                httpx.post(f"{url}/predict", files=files, timeout=60).json()["model_version"]
                for _ in range(4)
            }

        assert served() == {"2"}
        result = cli(["rollback", "--config", str(config)], env, tmp_path)
        assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
        assert f"{url} serves v1" in result.stdout
        assert served() == {"1"}
        assert deploy.champion_version(client, name) == "1"
        assert deploy.champion_version(client, name, deploy.PREVIOUS) == "2"
        # a second rollback swaps back: the previous champion is v2 now
        again = cli(["rollback", "--config", str(config)], env, tmp_path)
        assert again.returncode == 0 and f"{url} serves v2" in again.stdout, again.stderr[-3000:]
        assert served() == {"2"}
    finally:
        background.stop_all(state)
    wait_for(lambda: not processes_with("CVOPS_STATE_DIR", str(state)), 30, "no process left")


class ForeignHandler(BaseHTTPRequestHandler):
    """Another project's model service on the port: healthy, 401 to everything else (its
    admin token is not ours); every request remembered."""

    def _deny(self) -> None:
        self.server.seen.append((self.command, self.path))  # type: ignore[attr-defined]
        healthy = self.command == "GET" and self.path in ("/health_check", "/ready")
        body = b'{"status": "ok", "model_loaded": true}' if healthy else b'{"detail": "no"}'
        self.send_response(200 if healthy else 401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_POST = _deny

    def log_message(self, *args: object) -> None:
        pass


def test_run_leaves_a_foreign_server_on_the_port_alone(tmp_path: Path) -> None:
    """Issue 12 item 4: something else answers on CVOPS_SERVICE_PORT. The run starts its own
    service on another loopback port, says so, never sends the stranger a PUT, a later deploy
    reuses that service, and `cvops background --stop` stops it."""
    from cvops import deploy
    from cvops.settings import Settings

    storage, state = tmp_path / "central_storage", tmp_path / "state"
    metadata_file = package(storage, NAME, None, seed=4)
    config = tmp_path / "deploy.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "flow_module": "cvops.flows.deploy_flow",
                "model": {
                    "model_name": NAME,
                    "input_size": {"w": 50, "h": 50},
                    "classes": ["circle", "square", "triangle"],
                },
                "deploy": {"prefect": {"deployment_name": "embedded"}},
                "monitor": {"cron": "0 0 1 1 *", "workspace": "evidently"},
            }
        )
    )
    foreign = ThreadingHTTPServer(("127.0.0.1", 0), ForeignHandler)
    foreign.seen = []  # type: ignore[attr-defined]
    threading.Thread(target=foreign.serve_forever, daemon=True).start()
    taken = foreign.server_address[1]
    env = {k: v for k, v in os.environ.items() if k not in ENV_DROP}
    env.update(
        CENTRAL_STORAGE_PATH=str(storage),
        CVOPS_STATE_DIR=str(state),
        CVOPS_BACKGROUND="true",
        CVOPS_SERVICE_PORT=str(taken),
    )
    try:
        result = cli(["run", str(config)], env, tmp_path)
        out = result.stdout + result.stderr
        assert result.returncode == 0, out[-5000:]
        assert not [r for r in foreign.seen if r[0] != "GET"], foreign.seen  # type: ignore[attr-defined]
        found = re.search(rf"http://127\.0\.0\.1:(\d+) serves {NAME}", result.stdout)
        assert found, result.stdout[-3000:]
        port = int(found[1])
        url = f"http://127.0.0.1:{port}"
        assert port != taken
        # one line says where and why
        assert f"Port {taken} on 127.0.0.1 is held by another program" in out, out[-5000:]
        assert f"model service on {url} instead" in out

        record = background.service_record(state)
        assert record is not None and record.port == port
        health = httpx.get(f"{url}/health_check", timeout=5).json()
        assert health["instance_id"] == record.instance_id and health["model_name"] == NAME

        # a later deploy (and rollback, the monitor's retraining) finds it there: no second one
        settings = Settings(
            state_dir=state, central_storage_path=storage, service_port=taken, background=True
        )
        pid = background.Background(background.SERVICE, state).pid()
        assert deploy.ensure_local_service(settings, metadata_file) == (url, False)
        assert background.Background(background.SERVICE, state).pid() == pid
        assert deploy.local_service(settings) == (url, background.service_token(state))

        shown = cli(["background"], env, tmp_path)
        assert f"service pid {pid}" in shown.stdout and url in shown.stdout, shown.stdout
        stopped = cli(["background", "--stop"], env, tmp_path)
        assert "stopped: service, monitor-scheduler" in stopped.stdout, stopped.stderr[-3000:]
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/health_check", timeout=2)
        assert not [r for r in foreign.seen if r[0] != "GET"], foreign.seen  # type: ignore[attr-defined]
    finally:
        background.stop_all(state)
        foreign.shutdown()
        foreign.server_close()
    wait_for(lambda: not processes_with("CVOPS_STATE_DIR", str(state)), 30, "no process left")
