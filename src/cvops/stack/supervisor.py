"""supervisord as the stack's process manager: config file, daemon start, XML-RPC control.

supervisord rather than honcho: it keeps running when one program dies (honcho stops them
all), restarts crashed programs, runs Postgres as another user (`user=`), keeps one log per
program and answers status and start/stop over a private unix socket.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Variables we never pass on from the shell that ran `cvops up`: the stack sets its own.
FOREIGN_ENV_PREFIXES = ("PREFECT_", "MLFLOW_", "CVOPS_SERVICE_", "PROMETHEUS_MULTIPROC_DIR")


@dataclass(frozen=True)
class Program:
    """One supervised process of the stack."""

    name: str
    command: list[str]
    directory: Path
    env: Mapping[str, str] = field(default_factory=dict)
    user: str | None = None
    stop_signal: str = "TERM"
    stop_as_group: bool = True
    start_secs: int = 3
    stop_wait_secs: int = 20


def program_section(
    program: Program, log_dir: Path, priority: int, env_file: Path | None = None
) -> str:
    """One `[program:x]`; its environment (if any) comes from `env_file` via the launcher."""
    argv = program.command
    if env_file is not None:
        argv = [sys.executable, "-m", "cvops.stack.launch", str(env_file), "--", *argv]
    command = shlex.join(argv).replace("%", "%%")
    lines = [
        f"[program:{program.name}]",
        f"command={command}",
        f"directory={program.directory}",
        "autostart=false",
        "autorestart=unexpected",
        f"startsecs={program.start_secs}",
        "startretries=2",
        f"stopsignal={program.stop_signal}",
        f"stopwaitsecs={program.stop_wait_secs}",
        f"stopasgroup={'true' if program.stop_as_group else 'false'}",
        "killasgroup=true",
        "redirect_stderr=true",
        f"stdout_logfile={log_dir / (program.name + '.log')}",
        "stdout_logfile_maxbytes=20MB",
        "stdout_logfile_backups=2",
        f"priority={priority}",
    ]
    if program.user:
        lines.append(f"user={program.user}")
    return "\n".join(lines) + "\n"


class Supervisor:
    """The stack's supervisord: where its files live and how to talk to it."""

    def __init__(self, stack_dir: Path) -> None:
        self.stack_dir = stack_dir
        self.conf = stack_dir / "supervisord.conf"
        self.socket = stack_dir / "supervisor.sock"
        self.pid_file = stack_dir / "supervisord.pid"
        self.log_dir = stack_dir / "logs"

    def write_config(self, programs: list[Program]) -> Path:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        header = f"""; Written by `cvops up`; edits are overwritten. Control: `cvops status`.
[unix_http_server]
file={self.socket}
chmod=0700

[supervisord]
logfile={self.log_dir / "supervisord.log"}
logfile_maxbytes=10MB
logfile_backups=2
pidfile={self.pid_file}
childlogdir={self.log_dir}
identifier=cvops
nodaemon=false
minfds=4096

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{self.socket}
"""
        env_dir = self.stack_dir / "env"
        env_dir.mkdir(mode=0o700, exist_ok=True)
        sections = []
        for i, program in enumerate(programs):
            env_file = None
            if program.env:
                env_file = env_dir / f"{program.name}.json"
                fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w", encoding="utf-8") as out:
                    json.dump({k: str(v) for k, v in program.env.items()}, out)
            sections.append(program_section(program, self.log_dir, 10 * (i + 1), env_file))
        self.conf.write_text(header + "\n" + "\n".join(sections), encoding="utf-8")
        return self.conf

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return pid

    def rpc(self) -> Any:
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(None, None, f"unix://{self.socket}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor

    def running(self) -> bool:
        if self.pid() is None or not self.socket.exists():
            return False
        try:
            return self.rpc().getState()["statename"] == "RUNNING"
        except (OSError, xmlrpc.client.Fault):
            return False

    def start_daemon(self, env: Mapping[str, str], timeout_s: float = 30) -> None:
        supervisord = Path(sys.executable).with_name("supervisord")
        done = subprocess.run(
            [str(supervisord), "-c", str(self.conf)],
            env=dict(env),
            capture_output=True,
            text=True,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            raise RuntimeError(f"supervisord did not start: {done.stderr or done.stdout}")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.running():
                return
            time.sleep(0.2)
        raise RuntimeError(f"supervisord did not answer on {self.socket} in {timeout_s:.0f} s")

    def processes(self) -> dict[str, dict[str, Any]]:
        return {info["name"]: info for info in self.rpc().getAllProcessInfo()}

    def start(self, name: str) -> None:
        try:
            self.rpc().startProcess(name, False)
        except xmlrpc.client.Fault as fault:
            if "ALREADY_STARTED" not in fault.faultString:
                raise

    def shutdown(self, timeout_s: float = 90) -> bool:
        """Stop every program (supervisord waits for each), then supervisord itself."""
        pid = self.pid()
        if pid is None:
            return True
        try:
            self.rpc().shutdown()
        except (OSError, xmlrpc.client.Fault) as err:
            log.warning("supervisord did not take the shutdown call (%s); sending TERM", err)
            os.kill(pid, 15)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.pid() is None:
                return True
            time.sleep(0.2)
        return False


def clean_environment(base: Mapping[str, str]) -> dict[str, str]:
    """The shell's environment without settings that would point programs elsewhere."""
    return {k: v for k, v in base.items() if not k.startswith(FOREIGN_ENV_PREFIXES)}
