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


K8S_TEMPLATE = (
    Path(__file__).resolve().parents[1] / "deploy" / "k8s" / "base" / "base-job-template.json"
)


def test_monitor_deployment_on_a_kubernetes_pool(
    prefect_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15 item 4: on a kubernetes pool (given its template as the cluster's worker does)
    the deploy step stores job variables a Job needs (image, envFrom) instead of the process
    pool's env and working folder, drops the former process deployment's pull step, and the
    Job the worker would build from the stored pool and deployment is a valid Job."""
    import asyncio

    import kubernetes_validate
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    from cvops import cluster
    from cvops.config import MonitorConfig, load_config, parse_config
    from cvops.flows.deploy_flow import schedule_monitoring
    from cvops.settings import Settings

    data = load_config("configs/full_flow.yaml", check_flow_module=False).to_dict()
    data["deploy"]["prefect"] = {"deployment_name": "k8s-monitor"}
    cfg = parse_config(data, check_flow_module=False)
    monitor = MonitorConfig(pool_name="k8s-pool", cron="0 5 * * *")
    for name in ("CVOPS_K8S_IMAGE", "CVOPS_K8S_NAMESPACE"):
        monkeypatch.delenv(name, raising=False)
    image = "registry.example.com/cvops:1.2.3"
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        # the same deployment first on a process pool, as before the cluster
        before = deploy.schedule_monitor(
            "k8s-monitor", "k8s-process-pool", "0 4 * * *", {}, {"X": "1"}, str(tmp_path)
        )
        cluster.ensure_pool("k8s-pool", cluster.job_template(K8S_TEMPLATE, image="old:0"))
        cluster.ensure_pool("k8s-pool", cluster.job_template(K8S_TEMPLATE, image=image))
        with pytest.raises(cluster.ClusterSettingsError, match="type 'process'"):
            cluster.ensure_pool("k8s-process-pool", cluster.job_template(K8S_TEMPLATE))

        summary = schedule_monitoring.fn(cfg, Settings(), monitor)
        with get_client(sync_client=True) as client:
            pool = client.read_work_pool("k8s-pool")
            stored = client.read_deployment_by_name("drift_detection_evidently/k8s-monitor")
        assert pool.type == "kubernetes"
        assert pool.base_job_template["variables"]["properties"]["image"]["default"] == image
        assert str(stored.id) == before  # updated in place
        assert stored.work_pool_name == "k8s-pool"
        assert stored.entrypoint == deploy.MONITOR_ENTRYPOINT
        assert not stored.pull_steps
        settings = cluster.KubernetesJobSettings()
        assert stored.job_variables == {"image": image, "env_from": cluster.env_from(settings)}
        assert stored.parameters["workspace"] == settings.evidently_workspace
        assert stored.parameters["last_n"] == monitor.last_n
        assert [s.schedule.cron for s in stored.schedules] == ["0 5 * * *"]
        assert f"kubernetes pool k8s-pool (Jobs on {image})" in summary

        # explicit settings win over the pool's defaults
        monkeypatch.setenv("CVOPS_K8S_IMAGE", "registry.example.com/cvops:2.0.0")
        monkeypatch.setenv("CVOPS_K8S_NAMESPACE", "ml")
        monkeypatch.setenv("CVOPS_K8S_ENV_FROM_SECRETS", "cvops-db,cvops-s3")
        schedule_monitoring.fn(cfg, Settings(), monitor)

        async def job_of_a_run() -> dict:
            async with get_client() as client:
                deployment = await client.read_deployment_by_name(
                    "drift_detection_evidently/k8s-monitor"
                )
                flow_run = await client.create_flow_run_from_deployment(deployment.id)
                configuration = await KubernetesWorkerJobConfiguration.resolve_for_flow_run(
                    flow_run,
                    client=client,
                    work_pool=await client.read_work_pool("k8s-pool"),
                    worker_name="test-worker",
                    deployment=deployment,
                )
                return configuration.job_manifest

        job = asyncio.run(job_of_a_run())
    pod = job["spec"]["template"]["spec"]
    for extra in ("parallelism", "completions"):  # prefect-kubernetes' own pod-spec fields
        assert pod.pop(extra) == 1
    for version in ("1.30.0", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(job, version, strict=True)
    assert job["metadata"]["namespace"] == "ml"
    (container,) = pod["containers"]
    assert container["image"] == "registry.example.com/cvops:2.0.0"
    assert container["envFrom"] == [
        {"configMapRef": {"name": "cvops-config"}},
        {"secretRef": {"name": "cvops-db"}},
        {"secretRef": {"name": "cvops-s3"}},
    ]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PREFECT_API_URL"] == prefect_server
    assert not {"CVOPS_SERVICE_DB_URL", "CENTRAL_STORAGE_PATH", "X"} & env.keys()
