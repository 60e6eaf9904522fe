"""`cvops up / down / status / logs`: bring the local stack up in order, wait for health, report.

Order: Postgres (then its three databases), then every server at once, then the Prefect worker
once the Prefect server answers. A server that does not come up is reported with the reason
supervisord gives and the tail of its log; the others keep running so `cvops logs` can help.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import time
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from cvops.stack.postgres import LocalPostgres, StackError
from cvops.stack.programs import (
    Secrets,
    Service,
    client_env,
    missing_system_packages,
    prepare_label_studio,
    services,
    write_configs,
)
from cvops.stack.settings import PORT_VARIABLES, StackSettings, read_env_file
from cvops.stack.supervisor import Supervisor, clean_environment

log = logging.getLogger(__name__)

SECRETS_FILE = "secrets.env"
CLIENT_ENV_FILE = "client.env"
FAILED_STATES = {"FATAL", "EXITED", "BACKOFF", "UNKNOWN"}


@dataclass
class ServiceStatus:
    name: str
    title: str
    state: str
    healthy: bool
    url: str | None
    pid: int | None = None


def _write_private(path: Path, values: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()), encoding="utf-8")


def resolve_secrets(settings: StackSettings) -> Secrets:
    """Secrets from `.env` where set, else generated once and kept in the stack folder."""
    stored_path = settings.stack_dir / SECRETS_FILE
    stored = read_env_file(stored_path)
    wanted = {
        "POSTGRES_PASSWORD": settings.postgres_password,
        "JUPYTER_PASSWORD": settings.jupyter_password,
        "CVOPS_SERVICE_ADMIN_TOKEN": settings.service_admin_token,
        "LABEL_STUDIO_PASSWORD": settings.label_studio_password,
        "CVOPS_LABEL_STUDIO_TOKEN": settings.label_studio_token,
    }
    values = {key: value.get_secret_value() for key, value in wanted.items() if value is not None}
    generated = {
        key: stored.get(key) or secrets.token_urlsafe(18) for key in wanted if key not in values
    }
    if generated != {key: stored.get(key) for key in generated}:
        _write_private(stored_path, generated)
    values.update(generated)
    return Secrets(
        postgres_password=values["POSTGRES_PASSWORD"],
        jupyter_password=values["JUPYTER_PASSWORD"],
        service_admin_token=values["CVOPS_SERVICE_ADMIN_TOKEN"],
        label_studio_password=values["LABEL_STUDIO_PASSWORD"],
        label_studio_token=values["CVOPS_LABEL_STUDIO_TOKEN"],
    )


def port_holder(host: str, port: int) -> str | None:
    """Who listens on host:port ('pid 123 (nginx)'), or None when the port is free."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            return None
        except OSError:
            pass
    try:
        for conn in psutil.net_connections(kind="tcp"):
            listening = conn.laddr and conn.status == psutil.CONN_LISTEN
            if listening and conn.laddr.port == port and conn.pid:
                return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
    except (psutil.Error, PermissionError):
        pass
    return "another process"


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log yet)"
    return "\n".join(text.splitlines()[-lines:])


class LocalStack:
    def __init__(self, settings: StackSettings | None = None, project_dir: Path | None = None):
        self.settings = settings or StackSettings()
        self.project_dir = (project_dir or Path.cwd()).resolve()
        self.supervisor = Supervisor(self.settings.stack_dir)

    # ---- what runs -------------------------------------------------------------------------
    def _services(self, secrets_: Secrets) -> list[Service]:
        return services(self.settings, secrets_, self.project_dir)

    def log_file(self, name: str) -> Path:
        return self.supervisor.log_dir / f"{name}.log"

    def client_env(self) -> dict[str, str]:
        return client_env(self.settings, resolve_secrets(self.settings))

    # ---- up --------------------------------------------------------------------------------
    def _preflight(self) -> None:
        missing = missing_system_packages()
        if missing:
            raise StackError(
                f"missing system packages: {' '.join(missing)}; install them with: "
                f"sudo apt-get install -y {' '.join(missing)}   (or: make setup-stack)"
            )
        busy = []
        for name, port in self.settings.ports().items():
            holder = port_holder(self.settings.bind_host, port)
            if holder:
                busy.append(
                    f"port {port} ({name}) is in use by {holder}; stop it or set "
                    f"{PORT_VARIABLES[name]} in .env"
                )
        if busy:
            raise StackError("cannot start the stack:\n  " + "\n  ".join(busy))

    def up(
        self, timeout_s: float = 300, on_progress: Callable[[str], None] | None = None
    ) -> list[ServiceStatus]:
        """Start what is not running and wait until every service is healthy."""
        progress = on_progress or log.info
        secrets_ = resolve_secrets(self.settings)
        if self.supervisor.running():
            all_services = self._services(secrets_)
            statuses = self.status(all_services)
            if all(st.healthy for st in statuses):
                progress("the stack is already up; nothing to do")
                return statuses
        else:
            self._preflight()
            self.settings.stack_dir.mkdir(parents=True, exist_ok=True)
            pg = LocalPostgres(self.settings, secrets_.postgres_password)
            pg.prepare()
            write_configs(self.settings, secrets_)
            prepare_label_studio(self.settings, progress)
            all_services = self._services(secrets_)
            self.supervisor.write_config([s.program for s in all_services if s.program])
            env = clean_environment(os.environ)
            self.supervisor.start_daemon(env)
            progress(f"supervisord started ({self.supervisor.conf})")
        _write_private(
            self.settings.stack_dir / CLIENT_ENV_FILE, client_env(self.settings, secrets_)
        )

        deadline = time.monotonic() + timeout_s
        for phase in (0, 1, 2):
            batch = [s for s in all_services if s.phase == phase]
            for service in batch:
                if service.program:
                    self.supervisor.start(service.name)
            self._wait_healthy(batch, deadline, progress)
            if phase == 0:
                LocalPostgres(self.settings, secrets_.postgres_password).ensure_databases()
        return self.status(all_services)

    def _wait_healthy(
        self, batch: list[Service], deadline: float, progress: Callable[[str], None]
    ) -> None:
        pending = {s.name: s for s in batch}
        started = time.monotonic()
        while pending:
            processes = self.supervisor.processes()
            for name, service in list(pending.items()):
                owner = service.owner
                state = processes.get(owner, {}).get("statename", "UNKNOWN")
                if state == "BACKOFF":
                    continue  # supervisord retries; FATAL follows if it keeps failing
                if state in FAILED_STATES:
                    reason = processes.get(owner, {}).get("spawnerr") or state
                    raise StackError(
                        f"{service.title} ({name}) failed to start: {reason}\n"
                        f"--- last lines of {self.log_file(owner)} ---\n"
                        f"{log_tail(self.log_file(owner))}"
                    )
                if state == "RUNNING" and service.healthy():
                    progress(f"{service.title} is up ({time.monotonic() - started:.1f} s)")
                    del pending[name]
            if pending and time.monotonic() > deadline:
                name, service = next(iter(pending.items()))
                owner = service.owner
                raise StackError(
                    f"{service.title} ({name}) did not become healthy in time "
                    f"(still waiting for: {', '.join(pending)})\n"
                    f"--- last lines of {self.log_file(owner)} ---\n"
                    f"{log_tail(self.log_file(owner))}"
                )
            if pending:
                time.sleep(0.5)

    # ---- status / down ---------------------------------------------------------------------
    def status(self, all_services: list[Service] | None = None) -> list[ServiceStatus]:
        if not self.supervisor.running():
            return []
        secrets_ = resolve_secrets(self.settings)
        all_services = all_services or self._services(secrets_)
        processes = self.supervisor.processes()
        result = []
        for service in all_services:
            info = processes.get(service.owner, {})
            state = info.get("statename", "UNKNOWN")
            result.append(
                ServiceStatus(
                    name=service.name,
                    title=service.title,
                    state=state,
                    healthy=state == "RUNNING" and service.healthy(),
                    url=service.url,
                    pid=info.get("pid") or None,
                )
            )
        return result

    def _stop_worker_and_crash_its_runs(self) -> list[str]:
        """Runs of a stopped process worker would stay "Running" for ever in Prefect (a known
        Prefect issue): stop the worker first, then mark its unfinished runs CRASHED."""
        import httpx

        try:
            self.supervisor.rpc().stopProcess("prefect-worker", True)
        except (OSError, xmlrpc.client.Fault):
            return []
        api = client_env(self.settings, resolve_secrets(self.settings))["PREFECT_API_URL"]
        query = {
            "flow_runs": {"state": {"type": {"any_": ["RUNNING", "PENDING"]}}},
            "work_pools": {"name": {"any_": [self.settings.monitor_pool_name]}},
        }
        crashed = []
        try:
            runs = httpx.post(f"{api}/flow_runs/filter", json=query, timeout=10).json()
            for run in runs:
                state = {
                    "type": "CRASHED",
                    "name": "Crashed",
                    "message": "the stack was stopped (cvops down) while this run was going on",
                }
                httpx.post(
                    f"{api}/flow_runs/{run['id']}/set_state",
                    json={"state": state, "force": True},
                    timeout=10,
                )
                crashed.append(run["id"])
        except (httpx.HTTPError, ValueError) as err:
            log.warning("could not mark the worker's unfinished runs as crashed: %s", err)
        if crashed:
            log.info("marked %d unfinished flow run(s) CRASHED", len(crashed))
        return crashed

    def down(self, timeout_s: float = 120) -> list[int]:
        """Stop everything; returns pids that had to be killed after supervisord's shutdown."""
        if self.supervisor.pid() is None:
            return []
        groups = set()
        try:
            for info in self.supervisor.processes().values():
                if info.get("pid"):
                    groups.add(info["pid"])
        except OSError:
            pass
        descendants: set[int] = set()
        for pid in groups:
            with contextlib.suppress(psutil.Error):
                descendants.update(p.pid for p in psutil.Process(pid).children(recursive=True))
        self._stop_worker_and_crash_its_runs()
        self.supervisor.shutdown(timeout_s)
        leftovers = []
        for pid in groups | descendants:
            try:
                proc = psutil.Process(pid)
            except psutil.NoSuchProcess:
                continue
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            log.warning("killing leftover process %d (%s)", pid, proc.name())
            proc.kill()
            leftovers.append(pid)
        return leftovers
