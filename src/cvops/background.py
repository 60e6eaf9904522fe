"""Detached background processes of embedded mode (model service, monitor scheduler).

Embedded defaults have no supervisor, yet a deployed model must keep being served and watched
after `cvops run` returns. Each process is started in its own session (pid = process group)
with a pid file and a log file under `<CVOPS_STATE_DIR>/run/`, so any later command can find,
check and stop it, children (gunicorn workers, flow runs) included.

The service's port may be taken by another program (another project's stack, anything on
8080): cvops then serves on a free loopback port instead, and records port and instance id in
`run/service.json`. Its `/health_check` returns that id, so a deploy only ever talks to a
service it recognises as this state folder's own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

log = logging.getLogger(__name__)

SERVICE = "service"
SCHEDULER = "monitor-scheduler"
NAMES = (SERVICE, SCHEDULER)
INSTANCE_ENV = "CVOPS_SERVICE_INSTANCE_ID"  # ServiceSettings.instance_id of the service


def run_dir(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir).resolve() / "run"


@dataclass(frozen=True)
class Background:
    """One named background process under `run_dir(state_dir)`."""

    name: str
    state_dir: Path

    @property
    def pid_file(self) -> Path:
        return run_dir(self.state_dir) / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return run_dir(self.state_dir) / f"{self.name}.log"

    @property
    def record_file(self) -> Path:
        """What else later commands need to know about the process (the service: its port)."""
        return run_dir(self.state_dir) / f"{self.name}.json"

    def pid(self) -> int | None:
        """The recorded pid if that process (group leader) is still alive."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None
        return pid if _group_alive(pid) else None

    def alive(self) -> bool:
        return self.pid() is not None

    def start(
        self, cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> int:
        """Start `cmd` detached (new session), output appended to the log file."""
        run_dir(self.state_dir).mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as out:
            out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                cmd,
                env=env,
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pid_file.write_text(f"{proc.pid}\n{' '.join(cmd)}\n")
        log.info("Started %s in the background: pid %d, log %s", self.name, proc.pid, self.log_file)
        return proc.pid

    def stop(self, timeout_s: float = 60) -> bool:
        """SIGTERM the leader (it shuts its children down cleanly), then whatever is left of
        its process group; SIGKILL after `timeout_s`."""
        pid = self.pid()
        self.pid_file.unlink(missing_ok=True)
        self.record_file.unlink(missing_ok=True)
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _leader_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        _signal_group(pid, signal.SIGTERM)
        while _group_alive(pid) and time.monotonic() < deadline + 10:
            time.sleep(0.2)
        if _group_alive(pid):
            log.warning("%s (pid %d) ignored SIGTERM: killing it", self.name, pid)
            _signal_group(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while _group_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
        log.info("Stopped %s (pid %d)", self.name, pid)
        return True


def _leader_alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    """True while any process of the group is running (zombies of our own children reaped)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, os.WNOHANG)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _has_live_member(pgid)


def _has_live_member(pgid: int) -> bool:
    """killpg(0) also succeeds on zombies; on Linux look at the members' states."""
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def service_token(state_dir: Path) -> str:
    """Admin token of the embedded service: CVOPS_SERVICE_ADMIN_TOKEN, else a generated one
    kept (mode 0600) in the run folder so later deploys can reload the same service."""
    if token := os.environ.get("CVOPS_SERVICE_ADMIN_TOKEN"):
        return token
    path = run_dir(state_dir) / "service.token"
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token)
    return token


def cvops_command(*args: str) -> list[str]:
    """`cvops ...` with this interpreter, whatever is on PATH."""
    return [sys.executable, "-m", "cvops.cli", *args]


def stop_all(state_dir: Path) -> list[str]:
    return [name for name in NAMES if Background(name, state_dir).stop()]


STOP_HINT = "cvops background --stop"


def describe(state_dir: Path) -> str:
    """One line: what runs in the background, where the service answers, logs, how to stop."""
    parts = []
    record = service_record(state_dir)
    for name in NAMES:
        process = Background(name, state_dir)
        if (pid := process.pid()) is not None:
            where = f" on {record.url}" if name == SERVICE and record else ""
            parts.append(f"{name} pid {pid}{where} (log {process.log_file})")
    if not parts:
        return "no cvops background processes"
    return f"running in the background: {'; '.join(parts)}; stop with `{STOP_HINT}`"


@dataclass(frozen=True)
class ServiceRecord:
    """Where this state folder's background service listens and how it identifies itself."""

    pid: int
    port: int
    instance_id: str | None  # None: started by a cvops without instance ids (trust the pid)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def service_record(state_dir: Path) -> ServiceRecord | None:
    """The running background service's record; None when none runs (a record left by a dead
    process says nothing: its port may belong to someone else by now)."""
    process = Background(SERVICE, state_dir)
    if (pid := process.pid()) is None:
        return None
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        data = json.loads(process.record_file.read_text())
        if int(data["pid"]) == pid:
            return ServiceRecord(pid, int(data["port"]), str(data["instance_id"]))
    # started before records existed: the port is on its command line (pid file, line 2)
    with contextlib.suppress(OSError, ValueError, IndexError):
        cmd = process.pid_file.read_text().split()
        return ServiceRecord(pid, int(cmd[cmd.index("--port") + 1]), None)
    return None


def answering_instance(url: str, path: str = "/health_check") -> str | None:
    """The instance id of whatever answers `url + path` with 200 ('' if it names none); None
    when nothing does (refused, an error status, not JSON)."""
    try:
        response = httpx.get(f"{url.rstrip('/')}{path}", timeout=2)
        if response.status_code != 200:
            return None
        data = response.json()
    except (httpx.HTTPError, ValueError):
        return None
    return str(data.get("instance_id") or "") if isinstance(data, dict) else ""


def _matches(record: ServiceRecord, seen: str | None) -> bool:
    return seen is not None and (record.instance_id is None or seen == record.instance_id)


def is_ours(record: ServiceRecord, path: str = "/health_check") -> bool:
    """Whether `path` on the recorded port answers 200 with the recorded instance id."""
    return _matches(record, answering_instance(record.url, path))


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_service(
    state_dir: Path,
    preferred_port: int,
    command: Callable[[int], list[str]],
    wait_s: float = 300,
) -> tuple[str, bool]:
    """This state folder's background service, ready: the recorded one if it answers as
    itself, else `command(port)` started on `preferred_port`, or on a free loopback port when
    another program holds that one (said in one warning). Returns (URL, started now)."""
    process = Background(SERVICE, state_dir)
    record = service_record(state_dir)
    if record is not None:
        seen = answering_instance(record.url)
        if _matches(record, seen):
            return record.url, False
        if seen is not None:  # another server answers where ours should: ours cannot serve
            log.warning("%s answers as another service: restarting ours", record.url)
            process.stop()
            record = None
    elif process.alive():  # no record to find it by: replace it
        process.stop()
    started = record is None
    if record is None:
        port = preferred_port
        if port_in_use(port):
            port = free_port()
            log.warning(
                "Port %d on 127.0.0.1 is held by another program (not this project's model "
                "service): starting the local model service on http://127.0.0.1:%d instead "
                "(CVOPS_SERVICE_PORT picks the port; CVOPS_SERVICE_URL deploys to a service "
                "of your own)",
                preferred_port,
                port,
            )
        instance_id = secrets.token_hex(8)
        env = {
            **os.environ,
            "CVOPS_SERVICE_ADMIN_TOKEN": service_token(state_dir),
            INSTANCE_ENV: instance_id,
        }
        pid = process.start(command(port), env=env)
        record = ServiceRecord(pid, port, instance_id)
        tmp = process.record_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": pid, "port": port, "instance_id": instance_id}) + "\n")
        os.replace(tmp, process.record_file)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:  # alive but silent: a service still starting, wait
        if is_ours(record, "/ready"):
            return record.url, started
        if not process.alive():
            break
        time.sleep(1)
    process.stop()
    tail = process.log_file.read_text(errors="replace")[-2000:] if process.log_file.exists() else ""
    raise RuntimeError(f"the local model service did not become ready on {record.url}:\n{tail}")
