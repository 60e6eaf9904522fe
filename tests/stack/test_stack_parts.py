"""The stack's parts without the whole stack: settings errors, preflight (busy port, missing
package), secrets, and a real supervisord reporting a program that fails to start."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from cvops.cli import app
from cvops.service.nginx import NginxConfig
from cvops.stack import programs
from cvops.stack.manager import LocalStack, log_tail, resolve_secrets
from cvops.stack.postgres import StackError
from cvops.stack.programs import Service
from cvops.stack.settings import StackSettings
from cvops.stack.supervisor import Program
from tests.nginx_helpers import StubUpstream, free_port, running

REPO = Path(__file__).resolve().parents[2]


def test_env_example_holds_the_defaults() -> None:
    example = StackSettings(_env_file=REPO / ".env.example")
    assert example.ports() == StackSettings(_env_file=None).ports()
    assert example.service_max_body_bytes == StackSettings(_env_file=None).service_max_body_bytes
    assert example.service_store_images == StackSettings(_env_file=None).service_store_images
    assert example.postgres_password is None  # empty secret: generated, not ""


def test_invalid_setting_is_one_message_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_PORT", "fifty")
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 2
    assert "invalid setting MLFLOW_PORT" in result.output and "Traceback" not in result.output


def test_busy_port_names_holder_and_setting(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        stack = LocalStack(StackSettings(_env_file=None, state_dir=tmp_path, mlflow_port=port))
        with pytest.raises(StackError) as err:
            stack._preflight()
    message = str(err.value)
    assert f"port {port} (mlflow)" in message and "MLFLOW_PORT" in message
    assert "pid " in message  # the process holding it: this test's own


def test_missing_system_package_gives_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(programs, "SYSTEM_TOOLS", {"prometheus": "no-such-tool-cvops"})
    stack = LocalStack(StackSettings(_env_file=None, state_dir=tmp_path))
    with pytest.raises(StackError, match=r"sudo apt-get install -y prometheus"):
        stack._preflight()


def test_secrets_generated_once_private_and_env_wins(tmp_path: Path) -> None:
    settings = StackSettings(_env_file=None, state_dir=tmp_path)
    first, second = resolve_secrets(settings), resolve_secrets(settings)
    assert first == second and len(first.postgres_password) >= 20
    assert len({first.postgres_password, first.jupyter_password, first.service_admin_token}) == 3
    stored = settings.stack_dir / "secrets.env"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    explicit = StackSettings(_env_file=None, state_dir=tmp_path, postgres_password="chosen")
    assert resolve_secrets(explicit).postgres_password == "chosen"
    assert resolve_secrets(explicit).jupyter_password == first.jupyter_password


def test_failing_program_reported_with_reason_and_log_tail(tmp_path: Path) -> None:
    stack = LocalStack(StackSettings(_env_file=None, state_dir=tmp_path))
    tricky = 'a%b"c\\d'
    crasher = Program(
        "crasher",
        [sys.executable, "-c", "print('cannot bind 127.0.0.1:5050: in use'); raise SystemExit(3)"],
        directory=tmp_path,
        start_secs=1,
    )
    echo = Program(
        "echo",
        [
            sys.executable,
            "-c",
            "import os, time; print('X=' + os.environ['X'], flush=True); time.sleep(60)",
        ],
        directory=tmp_path,
        env={"X": tricky},
        start_secs=1,
    )
    stack.supervisor.write_config([crasher, echo])
    stack.supervisor.start_daemon({"PATH": "/usr/bin:/bin"})
    try:
        stack.supervisor.start("echo")
        stack.supervisor.start("crasher")
        service = Service(crasher, "Crasher", healthy=lambda: False)
        with pytest.raises(StackError) as err:
            stack._wait_healthy([service], time.monotonic() + 60, lambda _: None)
        assert "Crasher (crasher) failed to start" in str(err.value)
        assert "cannot bind 127.0.0.1:5050: in use" in str(err.value)
        deadline = time.monotonic() + 20
        while "X=" not in log_tail(stack.log_file("echo")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert f"X={tricky}" in log_tail(stack.log_file("echo"))  # quoting survived
        echo_pid = stack.supervisor.processes()["echo"]["pid"]
    finally:
        killed = stack.down()
    assert killed == [] and stack.supervisor.pid() is None
    with pytest.raises(ProcessLookupError):
        os.kill(echo_pid, 0)


# --- the stack's nginx: API port and web UI port ----------------------------------------------


@pytest.fixture()
def open_state_dir() -> Iterator[Path]:
    """Outside pytest's 0700 tmp: a root master's nginx workers (`nobody`) must reach it."""
    path = Path(tempfile.mkdtemp(prefix="cvops-stack-nginx-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def stack_with_stub(state_dir: Path, upstream: StubUpstream, **fields: object) -> StackSettings:
    return StackSettings(
        _env_file=None,
        state_dir=state_dir,
        service_port=upstream.port,
        nginx_port=free_port(),
        webui_port=free_port(),
        **fields,
    )


def stack_nginx(settings: StackSettings) -> NginxConfig:
    programs.write_nginx_config(settings)
    prefix = settings.stack_dir / "nginx"
    return NginxConfig(prefix, prefix / "conf" / "nginx.conf", shutil.which("nginx") or "nginx")


def test_webui_port_serves_only_the_page_and_predict(open_state_dir: Path) -> None:
    """The UI port is public-facing: the page and /predict, never admin, metrics or the docs."""
    if not shutil.which("nginx"):
        pytest.fail("nginx is not installed (make system-deps)")
    with StubUpstream() as upstream:
        settings = stack_with_stub(open_state_dir, upstream)
        config = stack_nginx(settings)
        with running(config, settings.webui_port) as ui:
            for path in ("/", "/ui"):
                page = httpx.get(ui + path, timeout=10)
                assert page.status_code == 200 and upstream.paths()[-1] == path
            for path in ("/predict", "/predict/"):
                answer = httpx.post(ui + path, files={"file": ("a.png", b"png")}, timeout=10)
                assert answer.status_code == 200 and upstream.paths()[-1] == path
            reached = len(upstream.seen)
            refused = [
                ("GET", "/metrics"),
                ("PUT", "/update_model/x.yaml"),
                ("GET", "/docs"),
                ("GET", "/openapi.json"),
                ("GET", "/health_check"),
                ("POST", "/feedback/0f8fad5b-d9cb-469f-a165-70867728950e"),
                ("GET", "/predict/../metrics"),
                ("GET", "/%6detrics"),
                ("GET", "/predictx"),
            ]
            for method, path in refused:
                answer = httpx.request(method, ui + path, timeout=10)
                assert answer.status_code == 404, (method, path, answer.text)
                assert answer.json() == {"detail": "Not Found"}
            assert len(upstream.seen) == reached, upstream.seen[reached:]
            # The API port still serves everything.
            api = f"http://127.0.0.1:{settings.nginx_port}"
            assert httpx.get(api + "/metrics", timeout=10).status_code == 200
            assert upstream.paths()[-1] == "/metrics"


def test_store_images_reaches_the_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CVOPS_SERVICE_STORE_IMAGES from `.env` (old spellings too) is the service's setting."""
    monkeypatch.setenv("CVOPS_SERVICE_STORE_IMAGES", "false")
    settings = StackSettings(_env_file=None, state_dir=tmp_path)
    secrets = programs.Secrets("pg", "jupyter", "token")
    service = next(s for s in programs.services(settings, secrets, REPO) if s.name == "service")
    assert service.program is not None
    assert service.program.env["CVOPS_SERVICE_STORE_IMAGES"] == "none"


def test_one_body_limit_for_service_and_nginx(
    open_state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CVOPS_SERVICE_MAX_BODY_BYTES sets the service's limit and both nginx ports'."""
    monkeypatch.setenv("CVOPS_SERVICE_MAX_BODY_BYTES", "50000")
    if not shutil.which("nginx"):
        pytest.fail("nginx is not installed (make system-deps)")
    with StubUpstream() as upstream:
        settings = stack_with_stub(open_state_dir, upstream)
        assert settings.service_max_body_bytes == 50_000
        secrets = programs.Secrets("pg", "jupyter", "token")
        service = next(s for s in programs.services(settings, secrets, REPO) if s.name == "service")
        assert service.program is not None
        assert service.program.env["CVOPS_SERVICE_MAX_BODY_BYTES"] == "50000"
        config = stack_nginx(settings)
        with running(config, settings.webui_port):
            for port in (settings.nginx_port, settings.webui_port):
                base = f"http://127.0.0.1:{port}"
                assert httpx.post(f"{base}/predict", content=b"x" * 50_000).status_code == 200
                over = httpx.post(f"{base}/predict", content=b"x" * 50_001)
                assert over.status_code == 413
                assert over.json() == {"detail": "request body too large (limit 50000 bytes)"}
