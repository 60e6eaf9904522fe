"""The monitor deployment against a real Prefect server (SQLite), created twice (update)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cvops import deploy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = tmp_path_factory.mktemp("prefect-server")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(home)
    log = open(home / "server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, (home / "server.log").read_text()[-2000:]
        time.sleep(1)
    else:
        raise RuntimeError("Prefect server did not start")
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)
    log.close()


def test_monitor_deployment_created_and_updated(prefect_server: str, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    params = {"last_days": 7, "last_n": 500, "evidently_project": "cvops-drift-monitoring"}
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        assert deploy.prefect_server_configured()
        first = deploy.schedule_monitor(
            "drift_detection_evidently",
            "test-model-pool",
            "0 6 * * 1",
            params,
            {"CENTRAL_STORAGE_PATH": str(tmp_path)},
            str(tmp_path),
        )
        second = deploy.schedule_monitor(
            "drift_detection_evidently",
            "test-model-pool",
            "0 7 * * 1",
            {**params, "last_n": 300},
            {"CENTRAL_STORAGE_PATH": str(tmp_path)},
            str(tmp_path),
        )
        assert first == second  # updated in place, not duplicated
        with get_client(sync_client=True) as client:
            pool = client.read_work_pool("test-model-pool")
            found = client.read_deployment_by_name(
                "drift_detection_evidently/drift_detection_evidently"
            )
    assert pool.type == "process"
    assert found.work_pool_name == "test-model-pool"
    assert found.parameters == {**params, "last_n": 300}
    assert [s.schedule.cron for s in found.schedules] == ["0 7 * * 1"]
    assert found.job_variables["env"] == {"CENTRAL_STORAGE_PATH": str(tmp_path)}
    assert found.entrypoint == deploy.MONITOR_ENTRYPOINT
