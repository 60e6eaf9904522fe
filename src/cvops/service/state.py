"""Everything one worker needs, created at start-up and closed at shutdown (no module state)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from sqlalchemy.exc import SQLAlchemyError

from cvops.records.images import ImageStore
from cvops.records.schema import latest_drift_cause, latest_drift_rows, upgrade_schema
from cvops.service.batching import MicroBatcher
from cvops.service.metrics import ServiceMetrics
from cvops.service.model_store import LoadedModel, ModelLoadError, load_model
from cvops.service.recording import Recorder, TurnCommit, refusal_reason
from cvops.service.replicas import Desired, ModelState, ReplicaReport, ReplicaRow
from cvops.service.settings import ServiceSettings
from cvops.storage import open_storage

log = logging.getLogger(__name__)
T = TypeVar("T")
LOAD_RETRY_S = 10.0  # a replica that could not load the desired model tries again this often


@dataclass(frozen=True)
class InferenceItem:
    model: LoadedModel
    image: np.ndarray  # model input (h, w, 3) float32


@dataclass(frozen=True)
class InferenceResult:
    probs: np.ndarray
    uae: np.ndarray
    bbsd: np.ndarray
    hidden: np.ndarray  # empty when the model has no hidden-feature layer
    cam: np.ndarray
    step_s: float = 0.0  # the model call of this item's batch (the rest of its wait is queue)

    @classmethod
    def of_row(cls, outputs: tuple[np.ndarray, ...], row: int, step_s: float) -> InferenceResult:
        """One item's share of a model call's outputs (probs, uae, bbsd, hidden, cams)."""
        probs, uae, bbsd, hidden, cams = outputs
        return cls(probs[row], uae[row], bbsd[row], hidden[row], cams[row], step_s)


def run_batch(items: Sequence[InferenceItem]) -> list[InferenceResult]:
    """One model call per distinct model in the batch (a reload can straddle a batch)."""
    results: list[InferenceResult | None] = [None] * len(items)
    groups: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(id(item.model), []).append(i)
    for indices in groups.values():
        model = items[indices[0]].model
        started = time.perf_counter()
        outputs = model.infer(np.stack([items[i].image for i in indices]))
        step_s = time.perf_counter() - started
        for row, i in enumerate(indices):
            results[i] = InferenceResult.of_row(outputs, row, step_s)
    return results  # type: ignore[return-value]


class ModelStateUnavailable(RuntimeError):
    """The model-state database cannot be reached: a model swap would reach only this replica,
    so none is made."""


def settle_heap() -> None:
    """Take what is alive once a model is served (TensorFlow, Keras, the model: ~440k objects)
    out of the cyclic garbage collector's view. Otherwise every full collection walks all of
    it with the GIL held: 270-460 ms, six times per worker in one `make bench-serve` run, each
    time stalling every request of the worker. Unfrozen and collected first, so a model a
    reload replaced is freed rather than frozen (one such pause per model load)."""
    started = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    log.info(
        "Heap settled in %.0f ms (%d objects frozen)",
        1000 * (time.perf_counter() - started),
        gc.get_freeze_count(),
    )


class ServiceState:
    """One replica (a worker process) of a deployment.

    Start-up model: the deployment's desired model in the prediction database; when it has none
    yet, `settings.metadata_file` or the newest package, published as the desired one. With the
    database down the replica still starts and serves that fallback model; the watcher follows
    (or publishes) the desired model once the database answers. While the database is down
    every replica keeps serving its model and answering; only `PUT /update_model` is refused.
    """

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.storage = open_storage(settings)
        self.metrics = ServiceMetrics()
        self.model: LoadedModel | None = None
        self.generation = 0
        self.load_error: str | None = None  # why the desired generation is not served
        self.inference_executor = ThreadPoolExecutor(1, thread_name_prefix="inference")
        self.loader_executor = ThreadPoolExecutor(1, thread_name_prefix="model-loader")
        # database calls of the model-state protocol, off the event loop and never queued
        # behind a model load
        self.state_executor = ThreadPoolExecutor(1, thread_name_prefix="model-state")
        self.predictions_in_flight = 0  # /predict requests between their upload and answer
        self.batcher: MicroBatcher[InferenceItem, InferenceResult] = MicroBatcher(
            run_batch,
            self.inference_executor,
            max_size=settings.batch_max_size,
            max_wait_s=settings.batch_max_wait_ms / 1000,
            on_batch=self.metrics.batch_size.observe,
            alone=lambda: self.predictions_in_flight <= 1,
        )
        self.recorder = Recorder(
            settings.resolved_db_url,
            settings.spool_dir,
            fsync=settings.spool_fsync,
            on_dead_letter=lambda kind: self.metrics.dead_letters.labels(kind).inc(),
            input_buffer_bytes=int(settings.property_buffer_mb * 1024 * 1024),
            image_storage=(
                self.storage if settings.store_images is ImageStore.CENTRAL_STORAGE else None
            ),
        )
        self.spool_writes = TurnCommit(self.recorder)
        self.replicas = ModelState(self.recorder.engine, settings.deployment, settings.replica_host)
        self._schema_ready = False
        self._db_reachable = True
        self._next_prune = 0.0
        self._failed_at: float | None = None  # when loading the desired generation failed
        self._tasks: list[asyncio.Task[None]] = []
        self._reload_lock = asyncio.Lock()

    @property
    def replica_id(self) -> str:
        return self.replicas.replica_id

    def not_ready_reason(self) -> str | None:
        """Why a load balancer should not send requests here (None: ready)."""
        if self.load_error is not None:
            serving = self.model.metadata_file if self.model else "no model"
            return f"{self.load_error} (still serving {serving})"
        if self.model is None:
            return "no model loaded yet"
        return None

    async def start(self) -> None:
        self.batcher.start()
        self.recorder.start()
        try:
            desired = await self._db(self._desired_or_seed, self._startup_choice())
        except Exception as err:  # noqa: BLE001 - whatever the database did, serve
            log.debug("model state at start", exc_info=True)
            self._db_down(err)
            fallback = self._startup_choice()
            if fallback is not None:
                await self._load_unpublished(fallback)
        else:
            if desired is not None:
                await self._follow(desired.generation, desired.metadata_file)
        if self.model is None and self.load_error is None:
            log.warning("No model in %s/models yet: not ready", self.storage.url)
        # Registered now, so that the first PUT waits for this replica too.
        await self._beat()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._watch(), name="model-watch"),
            loop.create_task(self._heartbeat(), name="replica-heartbeat"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.batcher.stop()
        try:
            await self._db(self.replicas.leave)
        except SQLAlchemyError as err:  # its heartbeat lapses instead
            log.debug("replica row not removed: %s", err)
        await asyncio.get_running_loop().run_in_executor(None, self.recorder.stop)
        self.inference_executor.shutdown(wait=False)
        self.loader_executor.shutdown(wait=False)
        self.state_executor.shutdown(wait=False)

    def _startup_choice(self) -> str | None:
        return self.settings.metadata_file or self.storage.newest_metadata_file()

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.state_executor, fn, *args)

    def _ensure_schema(self) -> None:
        if not self._schema_ready:
            upgrade_schema(self.recorder.engine)
            self._schema_ready = True

    def _desired_or_seed(self, candidate: str | None) -> Desired | None:
        """The desired model; when there is none yet, `candidate` becomes it."""
        self._ensure_schema()
        desired = self.replicas.desired()
        if desired is None and candidate is not None:
            desired = self.replicas.seed(candidate)
        return desired

    def _publish(self, metadata_file: str) -> Desired:
        self._ensure_schema()
        return self.replicas.publish(metadata_file)

    def _db_down(self, err: BaseException) -> None:
        if self._db_reachable:
            log.warning(
                "Model state DB unreachable (%s): serving %s until it answers",
                refusal_reason(err),
                self.model.metadata_file if self.model else "no model",
            )
        self._db_reachable = False

    def _db_up(self) -> None:
        if not self._db_reachable:
            log.info("Model state DB reachable again")
        self._db_reachable = True

    async def _load(self, metadata_file: str) -> LoadedModel:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.loader_executor, load_model, self.storage, metadata_file
        )

    def _swap(self, model: LoadedModel, generation: int) -> None:
        if self.model is not None:
            # set, not remove: in multiprocess mode a removed child keeps its last value
            self.metrics.model_info.labels(self.model.name, self.model.version).set(0)
        self.model = model
        self.generation = generation
        self.load_error = None
        self._failed_at = None
        self.metrics.model_info.labels(model.name, model.version).set(1)
        settle_heap()

    async def _load_unpublished(self, metadata_file: str) -> None:
        """The start-up model while the database is down (generation 0: any desired
        generation found later is followed)."""
        async with self._reload_lock:
            try:
                self._swap(await self._load(metadata_file), 0)
            except ModelLoadError as err:
                log.error("Cannot load start-up model %s: %s", metadata_file, err.reason)

    async def _follow(self, generation: int, metadata_file: str, retry: bool = False) -> None:
        """Load the desired model; on failure keep serving the old one, but not ready (and
        try again every LOAD_RETRY_S: object storage may have failed only for a moment)."""
        async with self._reload_lock:
            if generation < self.generation or (generation == self.generation and not retry):
                return
            self._failed_at = None
            try:
                model = await self._load(metadata_file)
            except ModelLoadError as err:
                self._failed_at = time.monotonic()
                log.error(
                    "Cannot follow model %s (generation %d): %s — keeping %s",
                    metadata_file,
                    generation,
                    err.reason,
                    self.model.metadata_file if self.model else "no model",
                )
                self.generation = generation
                self.load_error = (
                    f"cannot load the desired model {metadata_file} (generation {generation}): "
                    f"{err.reason}"
                )
            else:
                self._swap(model, generation)
        await self._beat()

    def _report(self) -> ReplicaReport:
        model = self.model
        return ReplicaReport(
            generation=self.generation,
            ok=self.load_error is None,
            detail=self.load_error or (None if model else "no model yet"),
            metadata_file=model.metadata_file if model else None,
            model_version=model.version if model else None,
        )

    def _send_report(self, report: ReplicaReport) -> None:
        self._ensure_schema()
        self.replicas.report(report)
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + 60
            if pruned := self.replicas.prune(self.settings.replica_prune_s):
                log.info("Deleted %d rows of replicas silent for long", pruned)

    async def _beat(self) -> None:
        try:
            await self._db(self._send_report, self._report())
        except SQLAlchemyError as err:
            self._db_down(err)
        else:
            self._db_up()

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            try:
                await self._beat()
            except Exception:  # the heartbeat must outlive any single failure
                log.exception("replica heartbeat error")

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        next_drift_refresh = 0.0
        while True:
            await asyncio.sleep(self.settings.reload_poll_s)
            try:
                candidate = self.model.metadata_file if self.model else None
                try:
                    desired = await self._db(self._desired_or_seed, candidate)
                except SQLAlchemyError as err:
                    self._db_down(err)
                else:
                    self._db_up()
                    if desired is not None and desired.generation > self.generation:
                        await self._follow(desired.generation, desired.metadata_file)
                    elif (
                        desired is not None
                        and self._failed_at is not None
                        and time.monotonic() - self._failed_at >= LOAD_RETRY_S
                    ):
                        await self._follow(desired.generation, desired.metadata_file, retry=True)
                self.metrics.spool_pending.set(self.recorder.pending())
                if self.model is not None and loop.time() >= next_drift_refresh:
                    next_drift_refresh = loop.time() + self.settings.drift_refresh_s
                    await loop.run_in_executor(None, self._refresh_drift, self.model.name)
            except Exception:  # the watcher must outlive any single failure
                log.exception("model watcher error")

    def _refresh_drift(self, model_name: str) -> None:
        """Latest monitor results as gauges (the DB may be down: then keep the old values)."""
        try:
            self.metrics.set_drift(latest_drift_rows(self.recorder.engine, model_name))
            cause = latest_drift_cause(self.recorder.engine, model_name)
            self.metrics.set_drift_causes(model_name, cause.details if cause else None)
        except SQLAlchemyError as err:
            log.debug("drift gauges not refreshed: %s", err)

    async def update_model(
        self, metadata_file: str, wait_s: float | None = None
    ) -> dict[str, object]:
        """Load here first (a bad model changes nothing), publish the next generation, then
        wait until every live replica on any host serves it (or `wait_s` passed)."""
        wait_s = self.settings.update_wait_s if wait_s is None else wait_s
        async with self._reload_lock:
            model = await self._load(metadata_file)  # raises ModelLoadError
            try:
                desired = await self._db(self._publish, metadata_file)
            except SQLAlchemyError as err:
                self._db_down(err)
                raise ModelStateUnavailable(
                    f"the model state database is unreachable ({refusal_reason(err)}): no "
                    "replica changed model; retry when it answers"
                ) from None
            self._swap(model, desired.generation)
        await self._beat()
        deadline = time.monotonic() + wait_s
        live: list[ReplicaRow] = []
        known = False
        while True:
            try:
                live = await self._db(self.replicas.live, self.settings.heartbeat_lapse_s)
                known = True
            except SQLAlchemyError as err:  # keep asking until the deadline
                self._db_down(err)
            behind = [r for r in live if r.generation < desired.generation]
            if (known and not behind) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        failed = [r for r in live if r.generation == desired.generation and not r.ok]
        return {
            "model_name": model.name,
            "model_version": model.version,
            "metadata_file": metadata_file,
            "mlflow_run_id": model.run_id,
            "generation": desired.generation,
            "workers": len(live),
            "workers_pending": [r.pid for r in behind],
            "workers_failed": {r.pid: r.detail or "" for r in failed},
            "replicas": [r.id for r in live],
            "replicas_pending": [r.id for r in behind],
            "replicas_failed": {r.id: r.detail or "" for r in failed},
        }
