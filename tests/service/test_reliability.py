"""The reliability probe from outside testing, as a test: against `cvops serve` (2 real gunicorn
workers) on a real Postgres 15, send bad uploads, the two poison records (a NUL in the path, a
method longer than the old column), a Postgres stop and a worker SIGKILL under load; then every
200 has its `predictions` row and its `api_log` row exactly once and nothing is dead-lettered."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.pg import PostgresCluster, wait_until
from tests.service.conftest import ServiceProcess, image_bytes
from tests.service.test_postgres_durability import db_ids

pytestmark = pytest.mark.slow


def ico_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "ICO")
    return buf.getvalue()


# (name, multipart field, payload, expected status)
BAD_UPLOADS = [
    ("empty", "file", b"", 422),
    ("text", "file", b"definitely not an image", 422),
    ("truncated JPEG", "file", image_bytes("JPEG", size=(200, 150))[:300], 422),
    ("truncated PNG", "file", image_bytes("PNG", size=(200, 150))[:300], 422),
    ("over the pixel limit", "file", image_bytes("PNG", size=(8000, 6000)), 413),
    ("unsupported format", "file", ico_bytes(), 415),
    ("over the body limit", "file", b"\xff" * (21 * 1024 * 1024), 413),
    ("no file field", "other", image_bytes(), 422),
]


class Load:
    """Threads posting images; remembers the id of every 200 and every other outcome."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.ok: list[str] = []
        self.failed: Counter[str] = Counter()
        self.lock = threading.Lock()

    def _send(self, n: int, seed: int) -> None:
        with httpx.Client(base_url=self.base, timeout=60) as client:
            for i in range(n):
                try:
                    r = client.post(
                        "/predict", files={"file": ("x.png", image_bytes(seed=seed + i))}
                    )
                except httpx.HTTPError as err:  # a worker killed mid-request
                    with self.lock:
                        self.failed[type(err).__name__] += 1
                    continue
                with self.lock:
                    if r.status_code == 200:
                        self.ok.append(r.json()["prediction_id"])
                    else:
                        self.failed[str(r.status_code)] += 1

    def burst(self, n: int, seed: int, clients: int = 4) -> list[threading.Thread]:
        threads = [
            threading.Thread(target=self._send, args=(n, seed + 1000 * k)) for k in range(clients)
        ]
        for t in threads:
            t.start()
        return threads


def join(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.join()


def workers(service: ServiceProcess) -> list[int]:
    """Pids of the service's live workers (their replica rows; heartbeats resume within
    seconds after a database outage)."""
    deadline = time.monotonic() + 15
    while not (pids := [r.pid for r in service.replicas()]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return pids


def test_every_200_has_its_row_exactly_once(
    postgres: PostgresCluster, storage_root: Path, tmp_path: Path
) -> None:
    url = postgres.create_database("service")
    load = Load("")
    with ServiceProcess(storage_root, tmp_path, workers=2, CVOPS_SERVICE_DB_URL=url) as service:
        load.base = service.base
        with httpx.Client(base_url=service.base, timeout=60) as client:
            # the poison records, several times so that both workers log them
            for _ in range(6):
                assert client.get("/x%00").status_code == 404
                assert client.request("UNSUBSCRIBE", "/predict").status_code == 405
            for name, field, payload, status in BAD_UPLOADS:
                r = client.post("/predict", files={field: ("x.png", payload)})
                assert r.status_code == status, (name, r.status_code, r.text)
                assert r.json()["detail"], name
        join(load.burst(5, 0))
        assert wait_until(lambda: len(db_ids(url, "predictions")) == len(load.ok), 30)

        during = load.burst(15, 100_000)
        time.sleep(0.5)
        postgres.stop()  # the database disappears mid-burst
        join(during)
        postgres.start()

        during = load.burst(15, 200_000)
        time.sleep(1.0)
        victim = workers(service)[0]
        os.kill(victim, signal.SIGKILL)  # a worker dies mid-burst
        join(during)
        join(load.burst(5, 300_000))  # the replacement worker serves

        assert wait_until(lambda: len(db_ids(url, "predictions")) >= len(load.ok), 60, 0.5)
        assert wait_until(lambda: len(db_ids(url, "api_log")) >= len(load.ok) + 12, 60, 0.5)
        time.sleep(1.0)  # anything still to come would be a duplicate

    assert len(load.ok) >= 4 * (5 + 15 + 5), (len(load.ok), load.failed)
    stored = db_ids(url, "predictions")
    assert len(stored) == len(set(stored))  # exactly once
    assert set(stored) >= set(load.ok)  # every 200
    # and nothing else but requests whose answer died with the killed worker: spooled, then
    # killed before the answer left (the client saw the connection drop, not a 200)
    dropped = sum(n for outcome, n in load.failed.items() if not outcome.isdigit())
    assert len(set(stored) - set(load.ok)) <= dropped, (len(stored), len(load.ok), load.failed)
    logged = [p for p in db_ids(url, "api_log", "prediction_id") if p]
    assert sorted(logged) == sorted(stored)  # each with its api_log row, once
    methods = Counter(db_ids(url, "api_log", "method"))
    assert methods["UNSUBSCRIBE"] == 6
    assert Counter(db_ids(url, "api_log", "url"))["/x%00"] == 6
    assert db_ids(url, "dead_letters") == []


def test_a_worker_killed_right_after_answering_loses_no_row(
    postgres: PostgresCluster, storage_root: Path, tmp_path: Path
) -> None:
    """The record is on disk before the answer leaves: SIGKILL the worker the moment its 200
    arrives; its replacement adopts the spool and the row lands."""
    url = postgres.create_database("service")
    answered = []
    with ServiceProcess(storage_root, tmp_path, workers=1, CVOPS_SERVICE_DB_URL=url) as service:
        for i in range(5):
            r = httpx.post(
                f"{service.base}/predict",
                files={"file": ("x.png", image_bytes(seed=i))},
                timeout=60,
            )
            killed = int(r.headers["X-Cvops-Worker"])
            os.kill(killed, signal.SIGKILL)
            assert r.status_code == 200
            answered.append(r.json()["prediction_id"])
            assert wait_until(lambda k=killed: ready_worker(service) not in (None, k), 60)
        assert wait_until(lambda: set(db_ids(url, "predictions")) >= set(answered), 30)
    assert sorted(db_ids(url, "predictions")) == sorted(answered)


def ready_worker(service: ServiceProcess) -> int | None:
    """The pid of a worker answering /ready, None while none does."""
    try:
        r = httpx.get(f"{service.base}/ready", timeout=2)
    except httpx.HTTPError:
        return None
    return int(r.headers["X-Cvops-Worker"]) if r.status_code == 200 else None
