"""Embedded mode finds its own background service by recorded port and instance id, and never
mistakes another program on the port for it (issue 12 item 4). A stand-in service (a few lines
of http.server answering /health_check and /ready with its instance id) keeps these fast; the
real service runs in tests/e2e/test_embedded_background.py."""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cvops import background

STAND_IN = """
import json, os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"status": "ok", "model_loaded": True,
                           "instance_id": os.environ.get("CVOPS_SERVICE_INSTANCE_ID")}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

HTTPServer(("127.0.0.1", int(sys.argv[2])), H).serve_forever()
"""


def stand_in(port: int) -> list[str]:
    return [sys.executable, "-c", STAND_IN, "--port", str(port)]


class Foreign(BaseHTTPRequestHandler):
    """Another program: /health_check 200 with its own JSON, 401 to everything else."""

    def _answer(self) -> None:
        self.server.seen.append((self.command, self.path))  # type: ignore[attr-defined]
        healthy = self.command == "GET" and self.path == "/health_check"
        body = b'{"status": "ok", "instance_id": "theirs"}' if healthy else b"{}"
        self.send_response(200 if healthy else 401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def foreign() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Foreign)
    server.seen = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture()
def state(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "state"
    background.stop_all(tmp_path / "state")


def test_port_held_by_another_program_gets_ours_elsewhere_and_it_is_reused(
    state: Path, foreign: ThreadingHTTPServer, caplog: pytest.LogCaptureFixture
) -> None:
    taken = foreign.server_address[1]
    with caplog.at_level(logging.WARNING, logger="cvops.background"):
        url, started = background.ensure_service(state, taken, stand_in, wait_s=30)
    assert started and url != f"http://127.0.0.1:{taken}"
    assert f"Port {taken} on 127.0.0.1 is held by another program" in caplog.text
    assert url in caplog.text
    assert foreign.seen == []  # type: ignore[attr-defined]
    record = background.service_record(state)
    assert record is not None and record.url == url and record.instance_id
    pid = record.pid
    # the next deploy finds it at the recorded port: no second service
    assert background.ensure_service(state, taken, stand_in, wait_s=30) == (url, False)
    assert background.Background(background.SERVICE, state).pid() == pid
    assert f"on {url}" in background.describe(state)
    assert background.stop_all(state) == [background.SERVICE]
    assert background.service_record(state) is None
    assert not background.Background(background.SERVICE, state).record_file.exists()


def test_own_service_on_the_default_port_is_reused(state: Path) -> None:
    port = background.free_port()
    url, started = background.ensure_service(state, port, stand_in, wait_s=30)
    assert (url, started) == (f"http://127.0.0.1:{port}", True)
    assert background.ensure_service(state, port, stand_in, wait_s=30) == (url, False)


def test_stale_record_whose_port_is_now_foreign(state: Path, foreign: ThreadingHTTPServer) -> None:
    """A record left by a dead service says nothing, even where its port answers now."""
    taken = foreign.server_address[1]
    process = background.Background(background.SERVICE, state)
    background.run_dir(state).mkdir(parents=True)
    dead = 2**22 + 12345  # above pid_max's default: never a live process
    process.pid_file.write_text(f"{dead}\nserve --port {taken}\n")
    process.record_file.write_text(json.dumps({"pid": dead, "port": taken, "instance_id": "x"}))
    assert background.service_record(state) is None
    url, started = background.ensure_service(state, taken, stand_in, wait_s=30)
    assert started and url != f"http://127.0.0.1:{taken}"
    assert not [r for r in foreign.seen if r[0] != "GET"]  # type: ignore[attr-defined]


def test_recorded_port_answering_as_another_service_restarts_ours(
    state: Path, foreign: ThreadingHTTPServer
) -> None:
    """Ours is alive but something else answers at its recorded port: not ours to talk to."""
    from types import SimpleNamespace

    from cvops import deploy

    url, _ = background.ensure_service(state, background.free_port(), stand_in, wait_s=30)
    process = background.Background(background.SERVICE, state)
    pid = process.pid()
    taken = foreign.server_address[1]
    process.record_file.write_text(json.dumps({"pid": pid, "port": taken, "instance_id": "ours"}))
    assert deploy.local_service(SimpleNamespace(state_dir=state)) is None
    new_url, started = background.ensure_service(state, taken, stand_in, wait_s=30)
    assert started and new_url != f"http://127.0.0.1:{taken}"
    assert process.pid() != pid
    assert deploy.local_service(SimpleNamespace(state_dir=state)) == (
        new_url,
        background.service_token(state),
    )


def test_service_started_before_records_is_found_by_its_command_line(state: Path) -> None:
    """A background service of an older cvops (pid file, no record, no instance id)."""
    port = background.free_port()
    process = background.Background(background.SERVICE, state)
    pid = process.start(stand_in(port))
    record = background.service_record(state)
    assert record == background.ServiceRecord(pid, port, None)
    url = f"http://127.0.0.1:{port}"
    for _ in range(50):
        if background.is_ours(record, "/ready"):
            break
        threading.Event().wait(0.1)
    assert background.ensure_service(state, port, stand_in, wait_s=30) == (url, False)
