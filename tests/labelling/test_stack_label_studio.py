"""Label Studio in `cvops up`: its program (own venv, loopback, secrets in the environment, the
stack's Postgres) and the client settings; the program itself run on a real PostgreSQL 15."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from cvops.labelling.server import LABEL_STUDIO_VERSION, ensure_venv, healthy
from cvops.labelling.settings import LabelStudioSettings
from cvops.stack import programs
from cvops.stack.manager import resolve_secrets
from cvops.stack.settings import StackSettings
from tests.label_studio import cache_dir
from tests.pg import PostgresCluster, _free_port


def label_studio_of(settings: StackSettings) -> programs.Service:
    secrets = resolve_secrets(settings)
    (service,) = [
        s for s in programs.services(settings, secrets, Path.cwd()) if s.name == "label-studio"
    ]
    return service


def test_program_binds_loopback_keeps_secrets_off_the_command_line(tmp_path: Path) -> None:
    settings = StackSettings(_env_file=None, state_dir=tmp_path, label_studio_port=18123)
    secrets = resolve_secrets(settings)
    assert secrets == resolve_secrets(settings)  # generated once
    assert len(secrets.label_studio_token) >= 20 and len(secrets.label_studio_password) >= 20
    service = label_studio_of(settings)
    program = service.program
    assert program is not None and service.url == "http://127.0.0.1:18123"
    cmd = " ".join(program.command)
    assert "--internal-host 127.0.0.1" in cmd and "--port 18123" in cmd
    assert program.command[0] == str(settings.label_studio_dir / "venv" / "bin" / "label-studio")
    for secret in (secrets.label_studio_token, secrets.label_studio_password):
        assert secret not in cmd
    env = program.env
    assert env["LABEL_STUDIO_USER_TOKEN"] == secrets.label_studio_token
    assert env["DJANGO_DB"] == "default" and env["POSTGRE_NAME"] == "label_studio"
    assert env["POSTGRE_PASSWORD"] == secrets.postgres_password
    assert env["LABEL_STUDIO_BASE_DATA_DIR"] == str(settings.label_studio_dir / "data")
    client = programs.client_env(settings, secrets)
    assert client["CVOPS_LABEL_STUDIO_URL"] == service.url
    assert client["CVOPS_LABEL_STUDIO_TOKEN"] == secrets.label_studio_token


def test_client_settings_name_the_missing_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CVOPS_LABEL_STUDIO_URL", "LABEL_STUDIO_URL", "CVOPS_LABEL_STUDIO_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    with pytest.raises(ValueError, match="CVOPS_LABEL_STUDIO_URL"):
        LabelStudioSettings(_env_file=None).require()
    monkeypatch.setenv("CVOPS_LABEL_STUDIO_URL", "http://127.0.0.1:1")
    with pytest.raises(ValueError, match="CVOPS_LABEL_STUDIO_TOKEN"):
        LabelStudioSettings(_env_file=None).require()
    monkeypatch.setenv("CVOPS_LABEL_STUDIO_TOKEN", "t0ken")
    assert LabelStudioSettings(_env_file=None).require() == ("http://127.0.0.1:1", "t0ken")


@pytest.mark.slow
def test_stack_program_runs_on_postgres() -> None:
    """The stack's command and environment, started as supervisord would, on Postgres."""
    venv = cache_dir() / f"label-studio-{LABEL_STUDIO_VERSION}"
    ensure_venv(venv)
    cluster = PostgresCluster()
    cluster.start()
    root = Path(tempfile.mkdtemp(prefix="cvops-ls-stack-"))
    proc = None
    try:
        cluster.create_database("label_studio")
        settings = StackSettings(
            _env_file=None,
            state_dir=root,
            postgres_port=cluster.port,
            postgres_user="postgres",  # the test cluster's superuser (trust auth)
            label_studio_port=_free_port(),
        )
        settings.label_studio_dir.mkdir(parents=True)
        (settings.label_studio_dir / "venv").symlink_to(venv)
        service = label_studio_of(settings)
        program = service.program
        assert program is not None
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(root), **program.env}
        log = (root / "label-studio.log").open("wb")
        proc = subprocess.Popen(
            program.command,
            env=env,
            cwd=settings.label_studio_dir,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        started = time.monotonic()
        while not healthy(service.url) and time.monotonic() - started < 400:
            assert proc.poll() is None, (root / "label-studio.log").read_text()[-3000:]
            time.sleep(1)
        assert service.healthy(), (root / "label-studio.log").read_text()[-3000:]
        print(f"Label Studio on Postgres healthy after {time.monotonic() - started:.0f} s")
        token = program.env["LABEL_STUDIO_USER_TOKEN"]
        answer = httpx.get(
            f"{service.url}/api/projects", headers={"Authorization": f"Token {token}"}
        )
        assert answer.status_code == 200, answer.text
        assert httpx.get(f"{service.url}/api/projects").status_code == 401
        assert not (settings.label_studio_dir / "data" / "label_studio.sqlite3").exists()
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        cluster.destroy()
        shutil.rmtree(root, ignore_errors=True)
