"""What the local stack runs: one `Service` per server, with its command, health check and URL.

Every server gets its settings through environment variables (never passwords on a command
line, where `ps` would show them) and binds to `CVOPS_BIND_HOST`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from cvops.stack.postgres import LocalPostgres, StackError, bin_dir
from cvops.stack.settings import StackSettings
from cvops.stack.supervisor import Program
from cvops.storage import join_location, location_text, s3_endpoint

HEALTH_TIMEOUT_S = 3.0


def venv_tool(name: str) -> str:
    """A console script of this environment (mlflow, prefect, ...), whatever PATH says."""
    return str(Path(sys.executable).with_name(name))


def http_ok(url: str, expect: int = 200) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return httpx.get(url, timeout=HEALTH_TIMEOUT_S).status_code == expect
        except httpx.HTTPError:
            return False

    return check


def prefect_worker_online(api_url: str, pool: str) -> Callable[[], bool]:
    """The worker counts as up once the Prefect server lists it as ONLINE on the pool."""
    from cvops.deploy import pool_has_online_worker

    return lambda: pool_has_online_worker(pool, api_url)


@dataclass(frozen=True)
class Service:
    program: Program | None  # None: served by another program (the web UI, by nginx)
    title: str
    healthy: Callable[[], bool]
    url: str | None = None
    phase: int = 1  # 0: first (Postgres); 1: the servers; 2: needs phase-1 servers healthy
    alias: str | None = None

    @property
    def name(self) -> str:
        return self.program.name if self.program else str(self.alias)

    @property
    def owner(self) -> str:
        """The supervised program whose state this service has (nginx serves the web UI)."""
        return self.program.name if self.program else "nginx"


@dataclass(frozen=True)
class Secrets:
    postgres_password: str
    jupyter_password: str
    service_admin_token: str
    label_studio_password: str = ""
    label_studio_token: str = ""


def client_env(settings: StackSettings, secrets: Secrets) -> dict[str, str]:
    """What a cvops command (flow, monitor, notebook) needs to use this stack."""
    s = settings
    pg = LocalPostgres(s, secrets.postgres_password)
    host = s.bind_host
    return {
        "CVOPS_STATE_DIR": str(s.state_dir.resolve()),
        "CENTRAL_STORAGE_PATH": location_text(s.central_storage_path),
        "MLFLOW_TRACKING_URI": f"http://{host}:{s.mlflow_port}",
        "PREFECT_API_URL": f"http://{host}:{s.prefect_port}/api",
        "CVOPS_SERVICE_URL": f"http://{host}:{s.nginx_port}",
        "CVOPS_SERVICE_ADMIN_TOKEN": secrets.service_admin_token,
        "CVOPS_SERVICE_DB_URL": pg.url(s.postgres_service_db),
        "CVOPS_EVIDENTLY_WORKSPACE": str(s.evidently_workspace),
        "CVOPS_LABEL_STUDIO_URL": f"http://{host}:{s.label_studio_port}",
        "CVOPS_LABEL_STUDIO_TOKEN": secrets.label_studio_token,
    }


def mlflow_s3_env(settings: StackSettings) -> dict[str, str]:
    """MLflow's S3 endpoint for artifacts in object storage: its own MLFLOW_S3_ENDPOINT_URL
    (the stack's programs do not inherit MLFLOW_* variables) or AWS_ENDPOINT_URL."""
    if not isinstance(settings.central_storage_path, str):
        return {}
    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or s3_endpoint()
    return {"MLFLOW_S3_ENDPOINT_URL": endpoint} if endpoint else {}


def _prometheus_config(settings: StackSettings) -> str:
    host = settings.bind_host
    jobs = {
        "prometheus": settings.prometheus_port,
        "cvops-service": settings.service_port,
        "node": settings.node_exporter_port,
    }
    lines = [
        "# Written by `cvops up`.",
        "global:",
        "  scrape_interval: 5s",
        "  evaluation_interval: 15s",
        "scrape_configs:",
    ]
    for job, port in jobs.items():
        lines += [
            f"  - job_name: {job}",
            "    static_configs:",
            f"      - targets: ['{host}:{port}']",
        ]
    return "\n".join(lines) + "\n"


KERNEL_NAME = "cvops"


def _kernel_spec() -> dict[str, object]:
    """The project environment as a named kernel, whatever `python` is on PATH."""
    return {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python (cvops)",
        "language": "python",
        "metadata": {"debugger": True},
    }


def _jupyter_config(settings: StackSettings, password: str) -> dict[str, object]:
    from jupyter_server.auth import passwd

    return {
        "ServerApp": {
            "open_browser": False,
            "allow_root": os.geteuid() == 0,
            "root_dir": str(Path.cwd()),
        },
        "PasswordIdentityProvider": {"hashed_password": passwd(password)},
        "MappingKernelManager": {"default_kernel_name": KERNEL_NAME},
    }


def write_configs(settings: StackSettings, secrets: Secrets) -> None:
    """The files the servers read (Prometheus, Jupyter, nginx) and the folders they need;
    written once per start of supervisord, never while the programs run."""
    s = settings
    prometheus_dir = s.stack_dir / "prometheus"
    prometheus_dir.mkdir(parents=True, exist_ok=True)
    (prometheus_dir / "prometheus.yml").write_text(_prometheus_config(s), encoding="utf-8")

    jupyter_dir = s.stack_dir / "jupyter"
    (jupyter_dir / "config").mkdir(parents=True, exist_ok=True)
    jupyter_conf = jupyter_dir / "config" / "jupyter_server_config.json"
    jupyter_conf.write_text(json.dumps(_jupyter_config(s, secrets.jupyter_password), indent=2))
    jupyter_conf.chmod(0o600)
    kernel_dir = jupyter_dir / "data" / "kernels" / KERNEL_NAME
    kernel_dir.mkdir(parents=True, exist_ok=True)
    (kernel_dir / "kernel.json").write_text(json.dumps(_kernel_spec(), indent=2))
    s.evidently_workspace.mkdir(parents=True, exist_ok=True)
    if isinstance(s.central_storage_path, Path):  # object storage needs no folder
        s.central_storage_path.resolve().mkdir(parents=True, exist_ok=True)
    write_nginx_config(s)


def services(settings: StackSettings, secrets: Secrets, project_dir: Path) -> list[Service]:
    """Every server of the stack (pure: `write_configs` writes what they read)."""
    s = settings
    host = s.bind_host
    pg = LocalPostgres(s, secrets.postgres_password)
    client = client_env(s, secrets)
    stack = s.stack_dir
    prefect_api = client["PREFECT_API_URL"]
    prometheus_dir = stack / "prometheus"
    prometheus_conf = prometheus_dir / "prometheus.yml"
    jupyter_dir = stack / "jupyter"

    cvops_env = {**client, "PYTHONUNBUFFERED": "1"}
    nginx_prefix = stack / "nginx"
    result = [
        Service(
            Program(
                "postgres",
                pg.command(),
                directory=Path("/"),
                user=pg.user,
                stop_signal="INT",  # "fast" shutdown: roll back clients, write a checkpoint
                stop_as_group=False,  # the postmaster stops its own backends
                start_secs=2,
                stop_wait_secs=60,
            ),
            "Postgres 15",
            pg.ready,
            url=f"postgresql://{s.postgres_user}@{host}:{s.postgres_port}",
            phase=0,
        ),
        Service(
            Program(
                "mlflow",
                [
                    venv_tool("mlflow"),
                    "server",
                    "--host",
                    host,
                    "--port",
                    str(s.mlflow_port),
                    "--workers",
                    "1",
                ],
                directory=project_dir,
                env={
                    "MLFLOW_BACKEND_STORE_URI": pg.url(s.postgres_mlflow_db),
                    # a folder, or s3://... (the server reads AWS_* from its environment)
                    "MLFLOW_ARTIFACTS_DESTINATION": str(
                        join_location(s.central_storage_path, "mlartifacts")
                    ),
                    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                    **mlflow_s3_env(s),
                },
            ),
            "MLflow",
            http_ok(f"http://{host}:{s.mlflow_port}/health"),
            url=f"http://{host}:{s.mlflow_port}",
        ),
        Service(
            Program(
                "prefect-server",
                [
                    venv_tool("prefect"),
                    "server",
                    "start",
                    "--host",
                    host,
                    "--port",
                    str(s.prefect_port),
                ],
                directory=project_dir,
                env={
                    "PREFECT_HOME": str(stack / "prefect"),
                    "PREFECT_API_DATABASE_CONNECTION_URL": pg.url(
                        s.postgres_prefect_db, driver="asyncpg"
                    ),
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "DO_NOT_TRACK": "1",
                },
            ),
            "Prefect server",
            http_ok(f"{prefect_api}/health"),
            url=f"http://{host}:{s.prefect_port}",
        ),
        Service(
            Program(
                "service",
                [
                    sys.executable,
                    "-m",
                    "cvops.cli",
                    "serve",
                    "--host",
                    host,
                    "--port",
                    str(s.service_port),
                    "--workers",
                    str(s.service_workers),
                ],
                directory=project_dir,
                # the one body limit: nginx (both ports) refuses the same bodies up front
                env={
                    **cvops_env,
                    "CVOPS_SERVICE_MAX_BODY_BYTES": str(s.service_max_body_bytes),
                    "CVOPS_SERVICE_STORE_IMAGES": s.service_store_images.value,
                },
                stop_wait_secs=40,
            ),
            "Model service (gunicorn)",
            http_ok(f"http://{host}:{s.service_port}/health_check"),
            url=f"http://{host}:{s.service_port}",
        ),
        Service(
            Program(
                "nginx",
                _nginx_command(s, nginx_prefix),
                directory=nginx_prefix,
                stop_signal="QUIT",  # graceful: finish requests in flight
            ),
            "Model API (nginx)",
            http_ok(f"http://{host}:{s.nginx_port}/health_check"),
            url=f"http://{host}:{s.nginx_port}",
        ),
        Service(
            None,  # nginx serves it; listed apart for its own health check and URL
            "Web UI",
            http_ok(f"http://{host}:{s.webui_port}/"),
            url=f"http://{host}:{s.webui_port}",
            alias="webui",
        ),
        Service(
            Program(
                "evidently-ui",
                [
                    venv_tool("evidently"),
                    "ui",
                    "--workspace",
                    str(s.evidently_workspace),
                    "--host",
                    host,
                    "--port",
                    str(s.evidently_ui_port),
                ],
                directory=project_dir,
                env={"DO_NOT_TRACK": "1"},
            ),
            "Evidently UI",
            http_ok(f"http://{host}:{s.evidently_ui_port}/"),
            url=f"http://{host}:{s.evidently_ui_port}",
        ),
        Service(
            Program(
                "prometheus",
                [
                    shutil.which("prometheus") or "/usr/bin/prometheus",
                    f"--config.file={prometheus_conf}",
                    f"--storage.tsdb.path={prometheus_dir / 'data'}",
                    f"--web.listen-address={host}:{s.prometheus_port}",
                ],
                directory=prometheus_dir,
            ),
            "Prometheus",
            http_ok(f"http://{host}:{s.prometheus_port}/-/ready"),
            url=f"http://{host}:{s.prometheus_port}",
        ),
        Service(
            Program(
                "node-exporter",
                [
                    shutil.which("prometheus-node-exporter") or "/usr/bin/prometheus-node-exporter",
                    f"--web.listen-address={host}:{s.node_exporter_port}",
                ],
                directory=Path("/"),
            ),
            "Node exporter",
            http_ok(f"http://{host}:{s.node_exporter_port}/metrics"),
            url=f"http://{host}:{s.node_exporter_port}/metrics",
        ),
        Service(
            Program(
                "jupyter",
                [
                    venv_tool("jupyter"),
                    "lab",
                    "--ip",
                    host,
                    "--port",
                    str(s.jupyter_port),
                    "--no-browser",
                ],
                directory=project_dir,
                env={
                    **cvops_env,
                    "JUPYTER_CONFIG_DIR": str(jupyter_dir / "config"),
                    "JUPYTER_DATA_DIR": str(jupyter_dir / "data"),
                    "JUPYTER_RUNTIME_DIR": str(jupyter_dir / "runtime"),
                    "IPYTHONDIR": str(jupyter_dir / "ipython"),
                },
            ),
            "Jupyter Lab",
            http_ok(f"http://{host}:{s.jupyter_port}/api"),
            url=f"http://{host}:{s.jupyter_port}/lab",
        ),
        Service(
            Program(
                "prefect-worker",
                [
                    venv_tool("prefect"),
                    "worker",
                    "start",
                    "--pool",
                    s.monitor_pool_name,
                    "--type",
                    "process",
                    "--name",
                    "cvops-local-worker",
                ],
                directory=project_dir,
                env={**cvops_env, "PREFECT_HOME": str(stack / "prefect-worker")},
            ),
            f"Prefect worker ({s.monitor_pool_name})",
            prefect_worker_online(prefect_api, s.monitor_pool_name),
            phase=2,
        ),
        label_studio_service(s, secrets),
    ]
    return result


def label_studio_service(settings: StackSettings, secrets: Secrets) -> Service:
    """Label Studio from its own venv (`prepare_label_studio`), on the stack's Postgres, with
    the admin user and API token of the stack secrets (environment, never the command line)."""
    from cvops.labelling import server

    s = settings
    data = s.label_studio_dir / "data"
    database = server.Postgres(
        s.bind_host,
        s.postgres_port,
        s.postgres_label_studio_db,
        s.postgres_user,
        secrets.postgres_password,
    )
    env = server.environment(
        data,
        s.label_studio_username,
        secrets.label_studio_password,
        secrets.label_studio_token,
        postgres=database,
        base={},
    )
    url = f"http://{s.bind_host}:{s.label_studio_port}"
    return Service(
        Program(
            "label-studio",
            server.command(
                server.executable(s.label_studio_dir / "venv"), s.bind_host, s.label_studio_port
            ),
            directory=s.label_studio_dir,
            env=env,
            start_secs=5,
            stop_wait_secs=30,
        ),
        f"Label Studio {server.LABEL_STUDIO_VERSION}",
        http_ok(f"{url}/health"),
        url=url,
    )


def prepare_label_studio(
    settings: StackSettings, progress: Callable[[str], None] | None = None
) -> None:
    """Label Studio's venv (installed from the package index on the first `cvops up`, ~20 s
    with uv) and data folder (its first start then migrates its database, ~100 s)."""
    from cvops.labelling import server

    venv = settings.label_studio_dir / "venv"
    if not (venv / server.MARKER).is_file() and progress:
        progress(f"installing Label Studio {server.LABEL_STUDIO_VERSION} into {venv} (once)")
    server.ensure_venv(venv)
    (settings.label_studio_dir / "data").mkdir(parents=True, exist_ok=True)


def _nginx_command(settings: StackSettings, prefix: Path) -> list[str]:
    from cvops.service.nginx import NginxConfig

    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return NginxConfig(prefix=prefix, conf=prefix / "conf" / "nginx.conf", nginx=nginx).command()


def write_nginx_config(settings: StackSettings) -> None:
    """nginx in front of the service (the whole API), plus the web UI's own port (the page and
    /predict only); both with the service's body limit."""
    from cvops.service import nginx

    s = settings
    values = {
        "SERVICE_UPSTREAM": f"{s.bind_host}:{s.service_port}",
        "NGINX_PORT": str(s.nginx_port),
        "NGINX_LISTEN_HOST": s.bind_host,
        "WEBUI_PORT": str(s.webui_port),
        nginx.BODY_LIMIT: str(s.service_max_body_bytes),
    }
    config = nginx.write_config(
        s.stack_dir / "nginx", values, env={}, nginx=shutil.which("nginx") or "nginx"
    )
    extra = config.prefix / "conf" / "extra"
    extra.mkdir(exist_ok=True)
    variables = nginx.nginx_variables(values, env={})
    webui = nginx.render(nginx.template_text(nginx.WEBUI_TEMPLATE), variables, "webui")
    (extra / "webui.conf").write_text(webui, encoding="utf-8")


SYSTEM_TOOLS = {
    "nginx": "nginx",
    "prometheus": "prometheus",
    "prometheus-node-exporter": "prometheus-node-exporter",
}


def missing_system_packages() -> list[str]:
    """Debian packages the stack needs that are not installed (checked before anything starts)."""
    missing = []
    try:
        bin_dir()
    except StackError:
        missing.append("postgresql")
    extra_path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin"])
    for package, tool in SYSTEM_TOOLS.items():
        if shutil.which(tool, path=extra_path) is None:
            missing.append(package)
    return missing
