"""Install and run Label Studio next to cvops, in its own virtual environment.

Label Studio pins its own Django, DRF and many more packages that cannot share cvops' lock, so
it gets a venv of its own (created once, from the package index, ~20 s with uv, ~0.8 GB) under
a folder the caller owns: the stack's state folder for `cvops up`, a cache folder for tests.
It starts headless: admin user, password and legacy API token from the environment
(`LABEL_STUDIO_USERNAME` / `_PASSWORD` / `_USER_TOKEN`, never on a command line where `ps`
shows them), no browser, bound to a loopback address, data in `data_dir`, on SQLite or on a
Postgres database (`DJANGO_DB=default` and `POSTGRE_*`).

Measured on 2 busy cores: first start (database migrations) ~100 s, later starts ~30 s,
~0.35-0.4 GB RSS (Django's single-process server).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

log = logging.getLogger(__name__)

LABEL_STUDIO_VERSION = "1.23.2"
MARKER = ".cvops-label-studio"


class LabelStudioInstallError(RuntimeError):
    """The Label Studio environment could not be created; the message has the installer's."""


def executable(venv: Path) -> Path:
    return venv / "bin" / "label-studio"


def _uv() -> str | None:
    beside = Path(sys.executable).with_name("uv")
    return str(beside) if beside.is_file() else shutil.which("uv")


def ensure_venv(venv: Path, version: str = LABEL_STUDIO_VERSION) -> Path:
    """`venv` with `label-studio==version` (created or upgraded when needed, under a lock so
    that two processes never install into it at once); returns the `label-studio` script."""
    venv = venv.expanduser().resolve()
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = venv / MARKER
        if marker.is_file() and marker.read_text().strip() == version:
            return executable(venv)
        started = time.monotonic()
        log.info("Installing Label Studio %s into %s (once)", version, venv)
        python = f"{sys.version_info.major}.{sys.version_info.minor}"
        uv = _uv()
        if uv:
            steps = [
                [uv, "venv", "--quiet", "--allow-existing", "--python", python, str(venv)],
                [uv, "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"),
                 f"label-studio=={version}"],
            ]  # fmt: skip
        else:
            steps = [
                [sys.executable, "-m", "venv", str(venv)],
                [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                 f"label-studio=={version}"],
            ]  # fmt: skip
        for step in steps:
            proc = subprocess.run(
                step, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False
            )
            if proc.returncode != 0:
                raise LabelStudioInstallError(
                    f"installing Label Studio {version} into {venv} failed ({' '.join(step[:3])}"
                    f" ..., exit {proc.returncode}):\n{(proc.stderr or proc.stdout)[-3000:]}"
                )
        marker.write_text(version + "\n")
        log.info("Label Studio %s installed in %.0f s", version, time.monotonic() - started)
        return executable(venv)


@dataclass(frozen=True)
class Postgres:
    """The database Label Studio keeps its projects in, when not SQLite."""

    host: str
    port: int
    name: str
    user: str
    password: str


def command(label_studio: Path, host: str, port: int) -> list[str]:
    """`label-studio start` headless on `host:port` (no secrets: those are in `env`)."""
    return [
        str(label_studio),
        "start",
        "--no-browser",
        "--internal-host",
        host,
        "--port",
        str(port),
        "--enable-legacy-api-token",  # a fixed token (USER_TOKEN) that clients can be given
        "--log-level",
        "WARNING",
    ]


def environment(
    data_dir: Path,
    username: str,
    password: str,
    token: str,
    *,
    postgres: Postgres | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Label Studio's settings as environment variables: the admin user it creates at start
    (and keeps), its token, data folder, database; sign-up without an invitation off."""
    env = {
        k: v
        for k, v in (os.environ if base is None else base).items()
        if not k.startswith(("LABEL_STUDIO_", "DJANGO_", "POSTGRE_", "VIRTUAL_ENV", "PYTHON"))
    }
    env.update(
        LABEL_STUDIO_BASE_DATA_DIR=str(data_dir),
        LABEL_STUDIO_USERNAME=username,
        LABEL_STUDIO_PASSWORD=password,
        LABEL_STUDIO_USER_TOKEN=token,
        LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",
        LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK="true",
        LABEL_STUDIO_COLLECT_ANALYTICS="false",
        SENTRY_DSN="",
        FRONTEND_SENTRY_DSN="",
        PYTHONUNBUFFERED="1",
    )
    if postgres is None:
        env["DJANGO_DB"] = "sqlite"
    else:
        env.update(
            DJANGO_DB="default",
            POSTGRE_HOST=postgres.host,
            POSTGRE_PORT=str(postgres.port),
            POSTGRE_NAME=postgres.name,
            POSTGRE_USER=postgres.user,
            POSTGRE_PASSWORD=postgres.password,
        )
    return env


def healthy(url: str, timeout: float = 3.0) -> bool:
    try:
        return httpx.get(f"{url.rstrip('/')}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


class LabelStudioProcess:
    """A Label Studio server this process starts and stops (tests, benchmarks); the stack
    runs the same command under supervisord instead."""

    def __init__(
        self,
        label_studio: Path,
        data_dir: Path,
        port: int,
        *,
        username: str,
        password: str,
        token: str,
        host: str = "127.0.0.1",
        postgres: Postgres | None = None,
    ) -> None:
        self.url = f"http://{host}:{port}"
        self.token = token
        self.username = username
        self.log_file = data_dir / "label-studio.log"
        self._cmd = command(label_studio, host, port)
        self._env = environment(data_dir, username, password, token, postgres=postgres)
        self._data_dir = data_dir
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 300.0) -> float:
        """Start and wait until `/health` answers; returns the seconds it took."""
        self._data_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with open(self.log_file, "ab") as out:
            self._proc = subprocess.Popen(
                self._cmd,
                env=self._env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self._data_dir,
                start_new_session=True,
            )
        while time.monotonic() - started < timeout:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"Label Studio exited with {self._proc.returncode} while starting:\n"
                    + self.log_tail()
                )
            if healthy(self.url):
                return time.monotonic() - started
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"Label Studio not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def stop(self, timeout: float = 20.0) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
