"""Detached background processes of embedded mode (model service, monitor scheduler).

Embedded defaults have no supervisor, yet a deployed model must keep being served and watched
after `cvops run` returns. Each process is started in its own session (pid = process group)
with a pid file and a log file under `<CVOPS_STATE_DIR>/run/`, so any later command can find,
check and stop it, children (gunicorn workers, flow runs) included.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SERVICE = "service"
SCHEDULER = "monitor-scheduler"
NAMES = (SERVICE, SCHEDULER)


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
    """One line: what runs in the background, its logs, and how to stop it."""
    parts = []
    for name in NAMES:
        process = Background(name, state_dir)
        if (pid := process.pid()) is not None:
            parts.append(f"{name} pid {pid} (log {process.log_file})")
    if not parts:
        return "no cvops background processes"
    return f"running in the background: {'; '.join(parts)}; stop with `{STOP_HINT}`"
