"""The local full stack, for real: `cvops up` on non-default ports, the full flow against it,
traffic through nginx, a monitor run on the stack's Prefect worker, `cvops down` with no
process left, and the data still there after the next `cvops up`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import psycopg
import pytest
import yaml

from cvops.data.demo import CLASSES
from cvops.data.demo_repo import build_demo_repo
from cvops.stack.settings import PORT_VARIABLES, read_env_file
from tests.pg import wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CLASSES_3 = CLASSES[:3]
PORT_NAMES = list(PORT_VARIABLES.values())


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def clean_env() -> dict[str, str]:
    """The test process's env minus what would point cvops elsewhere (temp state dirs)."""
    drop = ("CVOPS_", "PREFECT_", "MLFLOW_", "CENTRAL_STORAGE_PATH")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


class Project:
    def __init__(self, root: Path, ports: dict[str, int]) -> None:
        self.root = root
        self.ports = ports
        self.env = clean_env()

    def cvops(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cvops.cli", *args],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )

    def url(self, name: str, path: str = "") -> str:
        return f"http://127.0.0.1:{self.ports[name]}{path}"

    def client_env(self) -> dict[str, str]:
        return read_env_file(self.root / ".cvops" / "stack" / "client.env")

    def pg(self, database: str) -> psycopg.Connection:
        url = self.client_env()["CVOPS_SERVICE_DB_URL"].replace("postgresql+psycopg", "postgresql")
        return psycopg.connect(url.rsplit("/", 1)[0] + f"/{database}", autocommit=True)


def stack_processes(root: Path) -> list[psutil.Process]:
    """Processes started for this project: the project path is in their command line or cwd."""
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        if proc.pid == os.getpid():
            continue
        text = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["cwd"] or "")
        if str(root) in text and proc.status() != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


@pytest.fixture(scope="module")
def project() -> Iterator[Project]:
    # Not pytest's tmp_path: its parents are private (0700) and Postgres runs as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="cvops-stack-"))
    root.chmod(0o755)
    ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES)), strict=True))
    lines = [f"{name}={port}" for name, port in ports.items()]
    lines += ["SERVICE_WORKERS=1", "POSTGRES_PASSWORD=pg-test-pw", "CVOPS_SERVICE_ADMIN_TOKEN=tkn"]
    (root / ".env").write_text("\n".join(lines) + "\n")
    proj = Project(root, ports)
    try:
        yield proj
    finally:
        proj.cvops("down", timeout=180)
        for proc in stack_processes(root):
            proc.kill()


def test_up_runs_every_service_healthy(project: Project) -> None:
    started = time.monotonic()
    up = project.cvops("up", "--timeout", "400")
    cold = time.monotonic() - started
    assert up.returncode == 0, up.stdout + up.stderr
    print(f"cvops up (cold): {cold:.1f} s")
    for title in ("Postgres 15", "MLflow", "Prefect server", "Evidently UI", "Jupyter Lab"):
        assert title in up.stdout
    assert "failing" not in up.stdout
    status = project.cvops("status")
    assert status.returncode == 0 and status.stdout.count(" ok ") >= 11, status.stdout

    again_started = time.monotonic()
    again = project.cvops("up")
    assert again.returncode == 0 and "already up" in again.stderr
    assert time.monotonic() - again_started < 30

    assert httpx.get(project.url("MLFLOW_PORT", "/health")).text.strip() == "OK"
    assert httpx.get(project.url("PREFECT_PORT", "/api/health")).json() is True
    assert httpx.get(project.url("JUPYTER_PORT", "/api")).status_code == 200
    # Jupyter's API needs the password; without it: 403, not an open notebook server
    assert httpx.get(project.url("JUPYTER_PORT", "/api/kernelspecs")).status_code == 403
    secrets = read_env_file(project.root / ".cvops" / "stack" / "secrets.env")
    with httpx.Client(base_url=project.url("JUPYTER_PORT")) as jupyter:
        jupyter.get("/login")
        login = jupyter.post(
            "/login",
            data={"password": secrets["JUPYTER_PASSWORD"], "_xsrf": jupyter.cookies["_xsrf"]},
        )
        assert login.status_code == 302
        kernels = jupyter.get("/api/kernelspecs").json()
    assert kernels["default"] == "cvops"
    assert kernels["kernelspecs"]["cvops"]["spec"]["argv"][0] == sys.executable
    page = httpx.get(project.url("WEBUI_PORT", "/"))
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    # Label Studio: on the stack's Postgres, the generated token in the clients' settings
    assert "Label Studio" in up.stdout
    client = project.client_env()
    assert client["CVOPS_LABEL_STUDIO_URL"] == project.url("LABEL_STUDIO_PORT")
    token = {"Authorization": f"Token {client['CVOPS_LABEL_STUDIO_TOKEN']}"}
    projects = httpx.get(project.url("LABEL_STUDIO_PORT", "/api/projects"), headers=token)
    assert projects.status_code == 200, projects.text
    with project.pg(project.client_env()["CVOPS_SERVICE_DB_URL"].rsplit("/", 1)[1]) as conn:
        databases = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
    assert "label_studio" in databases


def test_full_flow_against_the_stack(project: Project) -> None:
    storage = project.root / "central_storage"
    build_demo_repo(
        project.root / "datasets" / "demo-shapes",
        storage / "dvc_remote" / "demo-shapes",
        v1_train_per_class=8,
        v2_train_per_class=10,
        test_per_class=6,
        classes=CLASSES_3,
    )
    cfg = yaml.safe_load((REPO / "configs" / "full_flow.yaml").read_text())
    cfg["model"]["classes"] = CLASSES_3
    cfg["model"]["drift_detection"]["reference_data_n_sample"] = 20
    cfg["train"]["hparams"].update(epochs=2, batch_size=8)
    (project.root / "full_flow.yaml").write_text(yaml.safe_dump(cfg))

    run = project.cvops("run", "full_flow.yaml")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert f"127.0.0.1:{project.ports['MLFLOW_PORT']}/#/experiments" in run.stdout
    assert f"http://127.0.0.1:{project.ports['NGINX_PORT']} serves" in run.stdout

    with project.pg("mlflow") as conn:
        finished = conn.execute("SELECT count(*) FROM runs WHERE status = 'FINISHED'").fetchone()
        assert finished[0] >= 2  # the training and the evaluation run

    deployment = httpx.get(
        project.url(
            "PREFECT_PORT",
            "/api/deployments/name/drift_detection_evidently/drift_detection_evidently",
        )
    )
    assert deployment.status_code == 200
    assert deployment.json()["work_pool_name"] == "production-model-pool"
    # the Postgres password stays out of Prefect's database: a 0600 libpq password file
    # (the monitor run below connects through it)
    password = "pg-test-pw"  # the fixture's .env
    job_env = deployment.json()["job_variables"]["env"]
    assert password not in deployment.text
    passfile = Path(job_env["PGPASSFILE"])
    assert passfile.stat().st_mode & 0o777 == 0o600 and password in passfile.read_text()

    images = sorted((project.root / "datasets/demo-shapes/images/test").rglob("*.jpg"))
    ids = []
    for image in images:
        reply = httpx.post(
            project.url("NGINX_PORT", "/predict"),
            files={"file": (image.name, image.read_bytes(), "image/jpeg")},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        ids.append(reply.json()["prediction_id"])

    def logged() -> bool:
        with project.pg("cvops_service") as conn:
            rows = conn.execute("SELECT id FROM predictions").fetchall()
        return {str(r[0]) for r in rows} >= set(ids)

    assert wait_until(logged, timeout=30)

    def scraped() -> bool:
        reply = httpx.get(
            project.url("PROMETHEUS_PORT", "/api/v1/query"),
            params={"query": 'sum(cvops_requests_total{route="/predict"})'},
        ).json()
        result = reply["data"]["result"]
        return bool(result) and float(result[0]["value"][1]) >= len(ids)

    assert wait_until(scraped, timeout=40, interval=1)


def test_monitor_deployment_runs_on_the_stack_worker(project: Project) -> None:
    env = project.client_env()
    script = (
        "from prefect.deployments import run_deployment\n"
        "run = run_deployment('drift_detection_evidently/drift_detection_evidently', timeout=300)\n"
        "print(run.state.type.value)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=project.root,
        env={**project.env, "PREFECT_API_URL": env["PREFECT_API_URL"]},
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("COMPLETED"), done.stderr[-3000:]
    with project.pg("cvops_service") as conn:
        rows = conn.execute("SELECT count(*) FROM drift_reports").fetchone()
    assert rows[0] >= 1
    workspace = project.root / ".cvops" / "evidently"
    assert list(workspace.glob("reports/*.html"))
    projects = httpx.get(project.url("EVIDENTLY_UI_PORT", "/api/projects")).json()
    assert "cvops-drift-monitoring" in {p["name"] for p in projects}


def run_state(project: Project, run_id: str) -> str:
    reply = httpx.get(project.url("PREFECT_PORT", f"/api/flow_runs/{run_id}"), timeout=10)
    return reply.json()["state"]["type"]


def test_down_leaves_nothing_and_data_survives(project: Project) -> None:
    # A monitor run in flight when the stack stops must not stay "Running" for ever.
    script = (
        "from prefect.deployments import run_deployment\n"
        "run = run_deployment('drift_detection_evidently/drift_detection_evidently', timeout=0)\n"
        "print(run.id)\n"
    )
    env = {**project.env, "PREFECT_API_URL": project.client_env()["PREFECT_API_URL"]}
    submitted = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    run_id = submitted.stdout.strip().splitlines()[-1]
    assert wait_until(lambda: run_state(project, run_id) in {"PENDING", "RUNNING"}, 120, 0.3)

    down = project.cvops("down", timeout=180)
    assert down.returncode == 0 and "no process left behind" in down.stdout, down.stdout
    assert stack_processes(project.root) == []
    for port in project.ports.values():
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine
            probe.bind(("127.0.0.1", port))  # raises if anything still listens
    assert project.cvops("status").returncode == 3

    started = time.monotonic()
    up = project.cvops("up", "--timeout", "400")
    print(f"cvops up (warm): {time.monotonic() - started:.1f} s")
    assert up.returncode == 0, up.stdout + up.stderr
    with project.pg("mlflow") as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] >= 2
    assert run_state(project, run_id) == "CRASHED"
    served = httpx.get(project.url("NGINX_PORT", "/ready"), timeout=10)
    assert served.status_code == 200  # the service restarts on the deployed model
    assert project.cvops("down", timeout=180).returncode == 0
    assert stack_processes(project.root) == []
