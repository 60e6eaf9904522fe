"""The stack's own Postgres 15 cluster: initialised once, run in the foreground by supervisord.

Postgres refuses to run as root, so when `cvops up` runs as root the cluster's files belong to
the `postgres` user and supervisord starts it with `user=postgres`. The stack user (from `.env`)
is the cluster's superuser, with a password for TCP and trust only on the private socket.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from cvops.stack.settings import StackSettings

log = logging.getLogger(__name__)

SYSTEM_USER = "postgres"


class StackError(RuntimeError):
    """Something `cvops up` cannot fix by itself; the message says what to do."""


def bin_dir() -> Path:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    if not candidates:
        raise StackError(
            "PostgreSQL server binaries not found; install them with: "
            "sudo apt-get install -y postgresql   (or: make setup-stack)"
        )
    return candidates[-1].parent


def run_as_user() -> str | None:
    """The unprivileged user Postgres runs as, or None to run as ourselves."""
    return SYSTEM_USER if os.geteuid() == 0 else None


class LocalPostgres:
    def __init__(self, settings: StackSettings, password: str) -> None:
        self.settings = settings
        self.password = password
        self.root = settings.stack_dir / "postgres"
        self.data = self.root / "data"
        self.socket_dir = self.root / "run"
        self.user = run_as_user()

    @property
    def initialised(self) -> bool:
        return (self.data / "PG_VERSION").exists()

    def _chown(self, path: Path) -> None:
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _check_reachable(self) -> None:
        """The postgres user must be able to walk down to its folders (e.g. not under /root)."""
        if not self.user:
            return
        blocked = [p for p in self.root.parents if not os.stat(p).st_mode & 0o001]
        if blocked:
            raise StackError(
                f"Postgres runs as '{self.user}' but cannot enter {blocked[0]} (no o+x); "
                f"run `chmod o+x {blocked[0]}` or set CVOPS_STATE_DIR to a folder others can "
                "traverse"
            )

    def prepare(self) -> None:
        """Create the folders and run initdb the first time; later calls change nothing."""
        for folder in (self.root, self.socket_dir):
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o700 if folder == self.socket_dir else 0o755)
            self._chown(folder)
        self._check_reachable()
        if self.initialised:
            return
        with tempfile.NamedTemporaryFile("w", dir=self.root, delete=False) as pwfile:
            pwfile.write(self.password + "\n")
        pw_path = Path(pwfile.name)
        self._chown(pw_path)
        try:
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                self.settings.postgres_user,
                f"--pwfile={pw_path}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
            )
        finally:
            pw_path.unlink(missing_ok=True)
        log.info("Postgres cluster initialised in %s", self.data)

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(bin_dir() / tool), *args]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        done = subprocess.run(
            cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd="/", check=False
        )
        if done.returncode != 0:
            shutil.rmtree(self.data, ignore_errors=True)
            raise StackError(f"{tool} failed: {done.stderr.strip() or done.stdout.strip()}")

    def command(self) -> list[str]:
        s = self.settings
        return [
            str(bin_dir() / "postgres"),
            "-D",
            str(self.data),
            "-p",
            str(s.postgres_port),
            "-k",
            str(self.socket_dir),
            "-c",
            f"listen_addresses={s.bind_host}",
        ]

    def url(self, database: str, driver: str = "psycopg") -> str:
        s = self.settings
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return (
            f"{scheme}://{s.postgres_user}:{self.password}@{s.bind_host}:{s.postgres_port}/"
            f"{database}"
        )

    def ensure_databases(self) -> list[str]:
        """Create the MLflow, Prefect, service and Label Studio databases where missing;
        returns new ones."""
        import psycopg

        s = self.settings
        wanted = [
            s.postgres_mlflow_db,
            s.postgres_prefect_db,
            s.postgres_service_db,
            s.postgres_label_studio_db,
        ]
        created = []
        conninfo = self.url("postgres", driver="")
        with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as conn:
            existing = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
            for name in wanted:
                if name not in existing:
                    conn.execute(f'CREATE DATABASE "{name}"')  # names validated by settings
                    created.append(name)
        if created:
            log.info("Created databases %s", ", ".join(created))
        return created

    def ready(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.url("postgres", driver=""), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False
