"""`cvops serve`: gunicorn with uvicorn workers, each building its own app after the fork.

The master never imports TensorFlow (forking a process with TF threads is unsafe); it only
decides the start-up model, prepares the shared folders and then forks the workers.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication
from sqlalchemy.exc import SQLAlchemyError

from cvops.records.schema import make_engine, upgrade_schema
from cvops.service.replicas import ModelState
from cvops.service.settings import ServiceSettings
from cvops.service.worker import ConnectionBoard
from cvops.storage import SERVED_ARTIFACTS, open_storage

log = logging.getLogger(__name__)


def _pre_fork(server: Any, worker: Any) -> None:
    """In the master, before a worker is forked: its slot on the connection board."""
    worker.connection_slot = server.app.connection_board.reserve()


def _child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
    if getattr(worker, "connection_slot", None) is not None:
        server.app.connection_board.release(worker.connection_slot)


class ServiceServer(BaseApplication):  # type: ignore[misc]
    def __init__(self, settings: ServiceSettings, options: dict[str, Any]) -> None:
        self.settings = settings
        self.options = options
        # room for every worker twice over: gunicorn can run more for a while (TTIN, reloads)
        self.connection_board = ConnectionBoard(slots=4 * int(options.get("workers", 1)) + 4)
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from cvops.service.app import create_app

        return create_app(self.settings)


def prepare(settings: ServiceSettings, metadata_file: str | None) -> str | None:
    """Shared state before forking: metrics folder, schema, and the model the workers start on:
    the deployment's desired model in the database; when it has none yet, `metadata_file` or
    the newest package, published as the desired one. With the database down, that fallback
    (the workers catch up when it answers)."""
    metrics_dir = settings.service_dir / "prometheus"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    storage = open_storage(settings)
    candidate = metadata_file or settings.metadata_file
    engine = make_engine(settings.resolved_db_url)
    try:
        upgrade_schema(engine)  # once here, not raced by the workers
        state = ModelState(engine, settings.deployment, settings.replica_host)
        desired = state.desired()
        if desired is None:
            candidate = candidate or storage.newest_metadata_file()
            desired = state.seed(candidate) if candidate else None
        elif candidate and candidate != desired.metadata_file:
            log.warning(
                "Starting on %s, the model this deployment (%s) serves, not %s: "
                "PUT /update_model/%s to change it for every replica",
                desired.metadata_file,
                settings.deployment,
                candidate,
                candidate,
            )
        chosen = desired.metadata_file if desired else None
    except SQLAlchemyError as err:
        chosen = candidate or storage.newest_metadata_file()
        log.warning(
            "Model state DB unreachable (%s): starting on %s", err, chosen or "no model yet"
        )
    finally:
        engine.dispose()
    if chosen and storage.remote:
        # Download once here, before the workers start together on an empty cache
        try:
            storage.fetch(chosen, *SERVED_ARTIFACTS)
        except Exception as err:  # each worker reports it again when it loads
            log.warning("Cannot prefetch %s from %s: %s", chosen, storage.url, err)
    return chosen


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cgroup_cpu_limit(cpu_max: Path | None = None) -> int | None:
    """Whole CPUs a cgroup v2 quota allows (a Kubernetes CPU limit), rounded up; None: no quota.

    Why: a pod limited to 2 CPUs on a 64-core node still sees 64 cores in its CPU set, and 64
    workers throttled to 2 CPUs serve far worse than 2.
    """
    try:
        quota, period = (cpu_max or CGROUP_CPU_MAX).read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def usable_cores() -> int:
    """Cores this process may use: its CPU set, capped by a cgroup CPU quota (containers)."""
    cores = len(os.sched_getaffinity(0))
    limit = cgroup_cpu_limit()
    return min(cores, limit) if limit else cores


def resolve_workers(workers: int | str) -> int:
    """`auto`: one worker per usable core. Each worker's Python (HTTP, decoding, heatmaps)
    holds its own GIL, and the model step runs on the worker's own TensorFlow threads; on
    2 cores, 2 workers of 1 TensorFlow thread each outran 1 worker of 2 (benchmarks/serve.py)."""
    if workers == "auto":
        return usable_cores()
    count = int(workers)
    if count < 1:
        raise ValueError("workers must be at least 1 or 'auto'")
    return count


def tf_threads_per_worker(workers: int) -> int:
    return max(1, usable_cores() // workers)


def inter_op_threads(intra_op_threads: int) -> int:
    """Two at least (where two cores exist): the step's independent ops (the Grad-CAM gradient
    beside the UAE and BBSD heads) then run at once. A lone request's step took 4.7 instead
    of 6.3 ms on 2 cores with 1 intra-op thread per worker; at concurrency 32 the extra
    threads mostly wait, and throughput stayed within run-to-run noise (issue 14)."""
    return min(usable_cores(), max(2, intra_op_threads))


def serve(
    settings: ServiceSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    workers: int | str = "auto",
    metadata_file: str | None = None,
    timeout_s: int = 120,
) -> None:
    workers = resolve_workers(workers)
    if settings.tf_threads is None:  # share the cores out, else every worker takes them all
        settings = settings.model_copy(update={"tf_threads": max(1, usable_cores() // workers)})
    if settings.tf_inter_op_threads is None:
        settings = settings.model_copy(
            update={"tf_inter_op_threads": inter_op_threads(settings.tf_threads or 1)}
        )
    chosen = prepare(settings, metadata_file)
    # the workers' start-up model when they cannot reach the database
    settings = settings.model_copy(update={"metadata_file": chosen})
    log.info(
        "Serving %s on http://%s:%d with %d workers of %d TensorFlow threads (%d inter-op)",
        chosen or "no model yet",
        host,
        port,
        workers,
        settings.tf_threads,
        settings.tf_inter_op_threads,
    )
    options = {
        "bind": f"{host}:{port}",
        "workers": workers,
        "worker_class": "cvops.service.worker.FairAcceptWorker",
        "timeout": timeout_s,
        "graceful_timeout": 30,
        "keepalive": 5,
        "pre_fork": _pre_fork,
        "child_exit": _child_exit,
        "accesslog": None,
        "loglevel": "info",
    }
    ServiceServer(settings, options).run()
