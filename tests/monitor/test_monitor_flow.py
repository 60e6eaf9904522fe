"""The monitor flow as Prefect runs it (ephemeral API), with a real webhook receiver."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from cvops.flows import monitor_flow
from tests.monitor.test_check import insert, setup  # noqa: F401 (fixture)


@pytest.fixture()
def webhook():
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers["Content-Length"])
            received.append(json.loads(self.rfile.read(length)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook", received
    server.shutdown()


def config(metadata_file: str, hook: str, workspace: str) -> dict:
    return {
        "flow_module": "cvops.flows.monitor_flow",
        "model": {
            "model_name": metadata_file.removesuffix(".yaml"),
            "input_size": {"w": 50, "h": 50},
            "classes": ["a", "b", "c"],
        },
        "monitor": {"last_n": 200, "webhook_url": hook, "workspace": workspace},
    }


@pytest.mark.slow
def test_flow_no_drift_then_drift_with_webhook(setup, webhook, monkeypatch) -> None:  # noqa: F811
    storage, metadata_file, url, engine = setup
    hook, received = webhook
    monkeypatch.setenv("CENTRAL_STORAGE_PATH", str(storage.root))
    monkeypatch.setenv("CVOPS_SERVICE_DB_URL", url)
    insert(engine, 200)
    workspace = str(storage.root.parent / "evidently")
    calm = monitor_flow.start(config(metadata_file, hook, workspace))
    assert calm["drifted"] is False and calm["sample_size"] == 200 and received == []
    insert(engine, 200, shift=0.6)
    alarm = monitor_flow.start(config(metadata_file, hook, workspace))
    assert alarm["drifted"] is True
    assert len(received) == 1 and received[0]["event"] == "drift_detected"
    assert received[0]["run_id"] == alarm["run_id"] and received[0]["drifted_tests"]

    from evidently.ui.workspace import Workspace

    ws = Workspace(workspace)
    projects = ws.search_project("cvops-drift-monitoring")
    assert len(projects) == 1
    assert len(ws.list_runs(projects[0].id)) == 2
    assert Path(alarm["report"]).is_file() and "mon" in Path(alarm["report"]).read_text()
