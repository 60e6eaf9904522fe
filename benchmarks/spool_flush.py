"""Rows/s one Postgres takes from N replicas' spool flushers at once.

Each of N processes (a replica's flusher: its own engine and spool, the service's own code)
fills its spool with `--requests` requests' records (a `predictions` row without images, as
with CVOPS_SERVICE_STORE_IMAGES=none or central_storage, and its `api_log` row), waits for the
others, then writes them with `Recorder.drain` (the flusher's batches of 200, ON CONFLICT DO
NOTHING). Rows/s = all rows written / wall time from the common start to the last finish.
Against a throwaway Postgres 15 on loopback (tests/pg.py), so the database shares the cores
with the flushers: a lower bound for a database on its own machine.

    .venv/bin/python benchmarks/spool_flush.py --replicas 1 2 4 8 --requests 4000
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing as mp
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cvops.records.schema import make_engine, upgrade_schema  # noqa: E402
from cvops.service.recording import Recorder, Spool  # noqa: E402
from tests.pg import PostgresCluster  # noqa: E402


def records(i: int) -> list[tuple[str, dict]]:
    pid = str(uuid.uuid4())
    now = dt.datetime.now(dt.UTC).isoformat()
    return [
        (
            "prediction",
            {
                "id": pid,
                "model_name": "bench",
                "model_version": "1",
                "input_img": None,
                "raw_hm_img": None,
                "overlaid_img": None,
                "prediction_json": {"prediction": {"a": 0.9, "b": 0.1}, "predicted_class": "a"},
                "uae_feats": [0.1 * (i % 7)] * 32,
                "bbsd_feats": [0.9, 0.1],
                "hidden_feats": [0.5] * 64,
                "created_on": now,
            },
        ),
        (
            "api_log",
            {
                "id": str(uuid.uuid4()),
                "method": "POST",
                "url": "/predict",
                "status": 200,
                "message": None,
                "timespan": 0.01,
                "created_on": now,
                "prediction_id": pid,
            },
        ),
    ]


def flusher(url: str, folder: str, n: int, start: mp.Barrier, out: mp.Queue) -> None:  # type: ignore[type-arg]
    spool = Spool(Path(folder) / f"spool-{uuid.uuid4().hex[:8]}.db", fsync=False)
    spool.put_groups([records(i) for i in range(n)])
    recorder = Recorder(url, Path(folder), spool=spool)
    start.wait()
    began = time.monotonic()
    moved = recorder.drain()
    out.put((moved, began, time.monotonic()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--requests", type=int, default=4000, help="requests per replica")
    args = parser.parse_args()
    cluster = PostgresCluster()
    cluster.start()
    try:
        print("replicas  rows      seconds  rows/s  (predictions + api_log, batches of 200)")
        for n in args.replicas:
            url = cluster.create_database(f"flush_{n}")
            engine = make_engine(url)
            upgrade_schema(engine)
            engine.dispose()
            ctx = mp.get_context("spawn")
            start, out = ctx.Barrier(n), ctx.Queue()
            procs = [
                ctx.Process(
                    target=flusher,
                    args=(url, tempfile.mkdtemp(prefix="cvops-flush-"), args.requests, start, out),
                )
                for _ in range(n)
            ]
            for p in procs:
                p.start()
            results = [out.get(timeout=600) for _ in procs]
            for p in procs:
                p.join(60)
            rows = sum(moved for moved, _, _ in results)
            seconds = max(e for _, _, e in results) - min(b for _, b, _ in results)
            print(f"{n:8}  {rows:8}  {seconds:7.2f}  {rows / seconds:6.0f}")
    finally:
        cluster.destroy()


if __name__ == "__main__":
    main()
