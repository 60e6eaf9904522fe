"""Nothing is lost when Postgres goes away: a real Postgres 15 is stopped during a burst of
requests to real gunicorn workers and restarted; every prediction lands exactly once."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.pg import PostgresCluster, wait_until
from tests.service.conftest import ServiceProcess, image_bytes

pytestmark = pytest.mark.slow


def db_ids(url: str, table: str, column: str = "id") -> list[str]:
    engine = create_engine("postgresql+psycopg://" + url.removeprefix("postgresql://"))
    try:
        with engine.connect() as conn:
            return [row[0] for row in conn.execute(text(f"SELECT {column} FROM {table}"))]
    finally:
        engine.dispose()


def test_db_outage_during_burst_loses_nothing(
    postgres: PostgresCluster, storage_root: Path, tmp_path: Path
) -> None:
    url = postgres.create_database("service")
    sent: list[str] = []
    statuses: list[int] = []
    lock = threading.Lock()

    with ServiceProcess(storage_root, tmp_path, workers=2, CVOPS_SERVICE_DB_URL=url) as service:

        def burst(n: int, seed: int) -> None:
            with httpx.Client(base_url=service.base, timeout=30) as client:
                for i in range(n):
                    r = client.post(
                        "/predict", files={"file": ("x.png", image_bytes(seed=seed + i))}
                    )
                    with lock:
                        statuses.append(r.status_code)
                        if r.status_code == 200:
                            sent.append(r.json()["prediction_id"])

        def run_burst(n: int, seed: int) -> list[threading.Thread]:
            threads = [threading.Thread(target=burst, args=(n, seed + 100 * k)) for k in range(4)]
            for t in threads:
                t.start()
            return threads

        warmup = run_burst(5, 0)
        for t in warmup:
            t.join()
        assert wait_until(lambda: len(db_ids(url, "predictions")) == 20, 20)

        during = run_burst(15, 1000)
        postgres.stop()  # the database disappears mid-burst
        for t in during:
            t.join()
        assert httpx.get(f"{service.base}/health_check").status_code == 200
        after_outage = run_burst(5, 5000)
        for t in after_outage:
            t.join()
        metrics = httpx.get(f"{service.base}/metrics").text
        postgres.start()

        assert wait_until(lambda: len(db_ids(url, "predictions")) >= len(sent), 60, 0.5)
        assert wait_until(lambda: len(db_ids(url, "api_log")) >= len(sent), 30, 0.5)

    assert statuses.count(200) == len(statuses) == 20 + 60 + 20
    assert "cvops_spool_pending" in metrics
    stored = db_ids(url, "predictions")
    assert len(stored) == len(set(stored)) == len(sent)
    assert set(stored) == set(sent)
    logged = db_ids(url, "api_log", "prediction_id")
    assert sorted(p for p in logged if p) == sorted(sent)
    assert "DB unavailable" in service.log_path.read_text() or "unavailable" in (
        service.log_path.read_text()
    )
