"""nginx in front of the service: the template renders, and Debian's nginx really proxies."""

from __future__ import annotations

import json
import logging
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cvops.service.limits import too_large_response
from cvops.service.nginx import (
    SITE_TEMPLATE,
    NginxConfig,
    NginxConfigError,
    nginx_variables,
    render,
    template_text,
    write_config,
)
from cvops.service.settings import ServiceSettings
from tests.nginx_helpers import StubUpstream, running, wait_up
from tests.service.conftest import ServiceProcess, free_port, image_bytes

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
NEEDED = {"NGINX_PORT": "8081", "SERVICE_UPSTREAM": "127.0.0.1:8080"}
BODY_LIMIT = "CVOPS_SERVICE_MAX_BODY_BYTES"


def test_template_substitutes_only_placeholders(tmp_path: Path) -> None:
    config = write_config(tmp_path / "ngx", {**NEEDED, BODY_LIMIT: "3000000"}, env={})
    site = (config.conf.parent / "default.conf").read_text()
    assert "listen 127.0.0.1:8081;" in site
    assert "server 127.0.0.1:8080;" in site
    assert "client_max_body_size 3000000;" in site
    for header in ("Host", "X-Real-IP", "X-Forwarded-For", "X-Forwarded-Proto"):
        assert f"proxy_set_header {header} $" in site
    assert "$remote_addr" in site and "$proxy_add_x_forwarded_for" in site  # nginx's own vars
    assert "${" not in site
    main = config.conf.read_text()
    assert "daemon off;" in main and "\nuser " not in main
    for temp in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        assert f"{temp}_temp_path tmp/{temp};" in main
    # The environment fills what is not passed explicitly.
    env_config = write_config(tmp_path / "env", env={**NEEDED, "NGINX_PORT": "9099"})
    assert "listen 127.0.0.1:9099;" in (env_config.conf.parent / "default.conf").read_text()


def test_missing_or_unsafe_variable_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NginxConfigError, match="missing variable.*SERVICE_UPSTREAM"):
        write_config(tmp_path, {"NGINX_PORT": "8081"}, env={})
    with pytest.raises(NginxConfigError, match="NGINX_PROXY_TIMEOUT"):
        values = nginx_variables({**NEEDED, "NGINX_PROXY_TIMEOUT": "1s; x"}, env={})
        render(template_text(SITE_TEMPLATE), values)
    with pytest.raises(NginxConfigError, match=BODY_LIMIT):
        nginx_variables({**NEEDED, BODY_LIMIT: "1M; x"}, env={})


def site_text(config: NginxConfig) -> str:
    return (config.conf.parent / "default.conf").read_text()


def test_body_limit_is_the_service_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One limit: nginx refuses exactly what the service would, from the service's setting."""
    default = ServiceSettings.model_fields["max_body_bytes"].default
    assert f"client_max_body_size {default};" in site_text(
        write_config(tmp_path / "default", NEEDED, env={})
    )
    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.setenv(BODY_LIMIT, "4096")
    monkeypatch.delenv("NGINX_MAX_BODY_SIZE", raising=False)
    assert ServiceSettings().max_body_bytes == 4096
    from_env = write_config(tmp_path / "env", NEEDED)  # the environment, as the service reads it
    assert "client_max_body_size 4096;" in site_text(from_env)
    assert "(limit 4096 bytes)" in site_text(from_env)
    # An explicit nginx size is accepted only when it says the same; otherwise a clear error.
    same = write_config(tmp_path / "same", {**NEEDED, "NGINX_MAX_BODY_SIZE": "4k"})
    assert "client_max_body_size 4096;" in site_text(same)
    with pytest.raises(NginxConfigError, match=f"NGINX_MAX_BODY_SIZE=200M.*{BODY_LIMIT}=4096"):
        write_config(
            tmp_path / "differ", NEEDED, env={"NGINX_MAX_BODY_SIZE": "200M", BODY_LIMIT: "4096"}
        )
    with pytest.raises(NginxConfigError, match=BODY_LIMIT):
        write_config(tmp_path / "bad", {**NEEDED, BODY_LIMIT: "0"}, env={})


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    if not shutil.which("nginx"):
        pytest.fail("nginx is not installed (make system-deps)")
    config = write_config(tmp_path / "ngx", {**NEEDED, "NGINX_PORT": str(free_port())}, env={})
    assert "syntax is ok" in config.check()


# --- real nginx in front of a stand-in upstream (fast) ----------------------------------------


def test_body_over_the_service_limit_is_refused_by_nginx(nginx_binary: str, prefix: Path) -> None:
    """nginx answers 413 itself, in the service's JSON shape, before a byte reaches the service."""
    limit = 100_000
    with StubUpstream() as upstream:
        port = free_port()
        config = write_config(
            prefix,
            {"NGINX_PORT": str(port), "SERVICE_UPSTREAM": upstream.address},
            env={BODY_LIMIT: str(limit)},
            nginx=nginx_binary,
        )
        with running(config, port) as base:
            at_limit = httpx.post(f"{base}/predict", content=b"x" * limit, timeout=30)
            assert at_limit.status_code == 200 and upstream.seen[-1] == ("POST", "/predict", limit)
            reached = len(upstream.seen)
            for body in (b"x" * (limit + 1), iter([b"x" * limit, b"y"])):  # declared, chunked
                over = httpx.post(f"{base}/predict", content=body, timeout=30)
                assert over.status_code == 413, over.text
                assert over.headers["content-type"] == "application/json"
                assert over.json() == json.loads(too_large_response(limit).body)  # the service's
            assert len(upstream.seen) == reached, "a refused body reached the service"
        assert f"client_max_body_size {limit};" in site_text(config)


def test_logs_and_temp_dirs_are_private(nginx_binary: str, prefix: Path) -> None:
    """Logs (client addresses, paths) and buffered uploads are readable by their owner only."""
    (prefix / "logs").mkdir()
    (prefix / "logs" / "access.log").write_text("from an older config\n")
    (prefix / "logs" / "access.log").chmod(0o644)
    with StubUpstream() as upstream:
        port = free_port()
        config = write_config(
            prefix,
            {"NGINX_PORT": str(port), "SERVICE_UPSTREAM": upstream.address},
            env={},
            nginx=nginx_binary,
        )
        with running(config, port) as base:
            big = httpx.post(f"{base}/predict", content=os.urandom(200_000), timeout=30)
            assert big.status_code == 200  # buffered to tmp/client_body by a worker
            assert "buffered to a temporary file" in config.error_log.read_text()
    modes = {
        path: path.stat().st_mode & 0o777
        for path in (
            prefix / "logs",
            config.error_log,
            config.access_log,
            prefix / "tmp",
            prefix / "tmp" / "client_body",
            prefix / "tmp" / "proxy",
        )
    }
    expected = {path: 0o600 if path.is_file() else 0o700 for path in modes}
    assert modes == expected, {str(p): oct(m) for p, m in modes.items()}
    assert "POST /predict" in config.access_log.read_text()
    if os.geteuid() == 0:  # a root master's workers (`nobody`) own the folders they write
        nobody = pwd.getpwnam("nobody").pw_uid
        assert (prefix / "tmp").stat().st_uid == nobody


# --- real nginx in front of real gunicorn workers -------------------------------------------


@pytest.fixture(scope="module")
def nginx_binary() -> str:
    if not shutil.which("nginx"):
        done = subprocess.run(
            [str(REPO / "scripts" / "install-system-deps.sh"), "nginx"],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0 or not shutil.which("nginx"):
            pytest.fail(f"nginx missing and not installable: {done.stderr}")
    return str(shutil.which("nginx"))


@pytest.fixture()
def prefix() -> Iterator[Path]:
    """Outside pytest's 0700 tmp: a root master's workers run as `nobody` and must reach it."""
    path = Path(tempfile.mkdtemp(prefix="cvops-nginx-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_prediction_through_nginx(
    nginx_binary: str, prefix: Path, storage_root: Path, tmp_path: Path
) -> None:
    limit = {BODY_LIMIT: str(1024 * 1024)}
    with ServiceProcess(storage_root, tmp_path, **limit) as service:
        port = free_port()
        config = write_config(
            prefix,
            {
                "NGINX_PORT": str(port),
                "SERVICE_UPSTREAM": f"127.0.0.1:{service.port}",
                "NGINX_WORKER_PROCESSES": "2",
            },
            env=limit,
            nginx=nginx_binary,
        )
        base = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            config.command(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_up(base, proc, config)
            workers = children(proc.pid)
            assert len(workers) == 2

            health = httpx.get(f"{base}/health_check", timeout=10)
            assert health.status_code == 200
            assert health.json()["model_name"] == "shapes_a"
            assert "X-Cvops-Worker" in health.headers  # answered by the service

            small = image_bytes("PNG", size=(64, 48), seed=3)
            direct = httpx.post(f"{service.base}/predict", files={"file": ("a.png", small)})
            proxied = httpx.post(f"{base}/predict", files={"file": ("a.png", small)}, timeout=60)
            assert proxied.status_code == 200, proxied.text
            body = proxied.json()
            assert (body["model_name"], body["model_version"]) == ("shapes_a", "1")
            assert body["predicted_class"] == direct.json()["predicted_class"]
            assert body["prediction"] == pytest.approx(direct.json()["prediction"], abs=1e-5)

            # Larger than the client body buffer: nginx spools it to PREFIX/tmp as `nobody`.
            large = image_bytes("PNG", size=(320, 320), seed=4)
            assert 100_000 < len(large) < 1_000_000
            answer = httpx.post(f"{base}/predict", files={"file": ("b.png", large)}, timeout=60)
            assert answer.status_code == 200, answer.text
            assert "buffered to a temporary file" in config.error_log.read_text()

            metrics = httpx.get(f"{base}/metrics", timeout=10)
            assert metrics.status_code == 200
            assert "# TYPE" in metrics.text

            too_big = os.urandom(1_500_000)
            refused = httpx.post(f"{base}/predict", files={"file": ("c.png", too_big)}, timeout=60)
            assert refused.status_code == 413
            assert "X-Cvops-Worker" not in refused.headers  # nginx refused it, not the service
            assert "too large" in refused.json()["detail"]
        finally:
            subprocess.run(config.stop_command, check=False, capture_output=True)
            try:
                returncode = proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                raise
        assert returncode == 0
        assert not config.pid_file.exists()
        left = [pid for pid in {proc.pid, *workers} if alive(pid)]
        assert not left, f"nginx processes left: {left}"
        assert "access.log" in os.listdir(prefix / "logs")
