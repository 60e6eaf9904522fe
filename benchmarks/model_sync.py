"""How fast a model swap reaches every replica through the database, and what it costs.

Two parts, both against a throwaway Postgres 15 on loopback (tests/pg.py):

protocol  simulated replicas (threads, one engine each) running the service's own ModelState
          calls, no model load: the time from a publish to every replica having seen and
          reported the new generation, by polling every `--poll-s` (the service's
          reload_poll_s) or by LISTEN/NOTIFY; and the database cost: milliseconds per poll
          and per heartbeat (client side), transactions/s the server counts at rest
          (pg_stat_database) for N replicas.
serve     real `cvops serve` processes (1 worker each, own state folder and host name),
          sharing Postgres and a local central storage: the time `PUT /update_model` takes
          (it returns once every live replica serves the model) for 1, 2, 4, 8 replicas.

    .venv/bin/python benchmarks/model_sync.py protocol --replicas 1 2 4 8 32
    .venv/bin/python benchmarks/model_sync.py serve --replicas 1 2 4 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import psycopg
from sqlalchemy import text

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cvops.records.schema import make_engine, upgrade_schema  # noqa: E402
from cvops.service.replicas import ModelState, ReplicaReport  # noqa: E402
from tests.pg import PostgresCluster  # noqa: E402

CHANNEL = "cvops_model_state"


class SimReplica(threading.Thread):
    """The service's watcher without the model: poll (or wait for a notification), read the
    desired row, report; heartbeat every `heartbeat_s`."""

    def __init__(self, url: str, i: int, mode: str, poll_s: float, heartbeat_s: float = 2.0):
        super().__init__(daemon=True)
        self.engine = make_engine(url)
        self.state = ModelState(self.engine, "bench", f"sim-{i}", pid=i)
        self.url, self.mode, self.poll_s, self.heartbeat_s = url, mode, poll_s, heartbeat_s
        self.generation = 0
        self.seen: dict[int, float] = {}
        self.poll_ms: list[float] = []
        self.report_ms: list[float] = []
        self.stop = threading.Event()

    def _read(self) -> None:
        started = time.perf_counter()
        desired = self.state.desired()
        self.poll_ms.append(1000 * (time.perf_counter() - started))
        if desired and desired.generation > self.generation:
            self.generation = desired.generation
            self._report()
            self.seen[desired.generation] = time.perf_counter()

    def _report(self) -> None:
        started = time.perf_counter()
        self.state.report(ReplicaReport(self.generation))
        self.report_ms.append(1000 * (time.perf_counter() - started))

    def run(self) -> None:
        self._report()
        next_beat = time.monotonic() + self.heartbeat_s
        listener = None
        if self.mode == "notify":
            listener = psycopg.connect(self.url, autocommit=True)
            listener.execute(f"LISTEN {CHANNEL}")
        while not self.stop.is_set():
            if listener is None:
                self.stop.wait(self.poll_s)
                self._read()
            else:
                for _ in listener.notifies(timeout=0.5, stop_after=1):
                    self._read()
            if time.monotonic() >= next_beat:
                next_beat += self.heartbeat_s
                self._report()
        if listener is not None:
            listener.close()
        self.engine.dispose()


def transactions(url: str) -> int:
    engine = make_engine(url)
    with engine.connect() as conn:
        value = conn.execute(
            text(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database "
                "WHERE datname = current_database()"
            )
        ).scalar_one()
    engine.dispose()
    return int(value)


def protocol(cluster: PostgresCluster, counts: list[int], poll_s: float, swaps: int) -> None:
    print(f"protocol: Postgres 15 on loopback, poll every {poll_s} s, heartbeat 2 s, {swaps} swaps")
    print("mode    replicas  swap ms mean  swap ms max  poll ms  report ms  server tx/s at rest")
    for mode in ("poll", "notify"):
        for n in counts:
            url = cluster.create_database(f"sync_{mode}_{n}")
            engine = make_engine(url)
            upgrade_schema(engine)
            publisher = ModelState(engine, "bench", "publisher")
            publisher.publish("m.yaml")
            replicas = [SimReplica(url, i, mode, poll_s) for i in range(n)]
            for r in replicas:
                r.start()
            time.sleep(3)
            before, t0 = transactions(url), time.monotonic()
            time.sleep(10)
            rest = (transactions(url) - before - 1) / (time.monotonic() - t0)
            latencies = []
            notifier = psycopg.connect(url, autocommit=True) if mode == "notify" else None
            for _ in range(swaps):
                time.sleep(poll_s * 1.37)  # not in step with the polls
                started = time.perf_counter()
                generation = publisher.publish("m.yaml").generation
                if notifier is not None:
                    notifier.execute(f"NOTIFY {CHANNEL}, '{generation}'")
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and not all(
                    generation in r.seen for r in replicas
                ):
                    time.sleep(0.001)
                latencies.append(1000 * (max(r.seen[generation] for r in replicas) - started))
            if notifier is not None:
                notifier.close()
            for r in replicas:
                r.stop.set()
            for r in replicas:
                r.join(5)
            poll_ms = statistics.mean(m for r in replicas for m in r.poll_ms)
            report_ms = statistics.mean(m for r in replicas for m in r.report_ms)
            print(
                f"{mode:7} {n:8}  {statistics.mean(latencies):12.1f}  {max(latencies):11.1f}"
                f"  {poll_ms:7.2f}  {report_ms:9.2f}  {rest:19.1f}"
            )
            engine.dispose()


def serve(cluster: PostgresCluster, counts: list[int], swaps: int) -> None:
    from tests.service.conftest import ServiceProcess, package

    root = Path(tempfile.mkdtemp(prefix="cvops-sync-bench-"))
    storage = root / "storage"
    package(storage, "shapes_a", "1", seed=1)
    package(storage, "shapes_b", "7", seed=2, size=40)
    print(f"serve: cvops serve x N (1 worker each) on {os.cpu_count()} cores, one Postgres")
    print("replicas  PUT s mean  PUT s max  workers counted")
    for n in counts:
        db_url = cluster.create_database(f"serve_{n}")
        with ExitStack() as stack:
            hosts = []
            for i in range(n):
                folder = root / f"n{n}-host-{i}"
                folder.mkdir()
                hosts.append(
                    stack.enter_context(
                        ServiceProcess(
                            storage,
                            folder,
                            workers=1,
                            CVOPS_SERVICE_DB_URL=db_url,
                            CVOPS_SERVICE_REPLICA_HOST=f"host-{i}",
                            CVOPS_SERVICE_TF_THREADS="1",
                        )
                    )
                )
            times, counted = [], set()
            for k in range(swaps):
                model = ("shapes_b.yaml", "shapes_a.yaml")[k % 2]
                started = time.perf_counter()
                r = httpx.put(
                    f"{hosts[k % n].base}/update_model/{model}",
                    headers={"Authorization": "Bearer s3cret"},
                    timeout=120,
                )
                times.append(time.perf_counter() - started)
                assert r.status_code == 200 and not r.json()["workers_pending"], r.text
                counted.add(r.json()["workers"])
                time.sleep(1)
            print(f"{n:8}  {statistics.mean(times):10.2f}  {max(times):9.2f}  {sorted(counted)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["protocol", "serve"])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--poll-s", type=float, default=0.25)
    parser.add_argument("--swaps", type=int, default=20)
    args = parser.parse_args()
    cluster = PostgresCluster()
    cluster.start()
    try:
        if args.part == "protocol":
            protocol(cluster, args.replicas, args.poll_s, args.swaps)
        else:
            serve(cluster, args.replicas, args.swaps)
    finally:
        cluster.destroy()


if __name__ == "__main__":
    main()
