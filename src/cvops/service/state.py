"""Everything one worker needs, created at start-up and closed at shutdown (no module state)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from sqlalchemy.exc import SQLAlchemyError

from cvops.records.images import ImageStore
from cvops.records.schema import latest_drift_cause, latest_drift_rows
from cvops.service.batching import MicroBatcher
from cvops.service.metrics import ServiceMetrics
from cvops.service.model_store import LoadedModel, ModelLoadError, load_model
from cvops.service.recording import Recorder
from cvops.service.settings import ServiceSettings
from cvops.service.sync import ModelSync
from cvops.storage import open_storage

log = logging.getLogger(__name__)


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


def run_batch(items: Sequence[InferenceItem]) -> list[InferenceResult]:
    """One model call per distinct model in the batch (a reload can straddle a batch)."""
    results: list[InferenceResult | None] = [None] * len(items)
    groups: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(id(item.model), []).append(i)
    for indices in groups.values():
        model = items[indices[0]].model
        started = time.perf_counter()
        probs, uae, bbsd, hidden, cams = model.infer(np.stack([items[i].image for i in indices]))
        step_s = time.perf_counter() - started
        for row, i in enumerate(indices):
            results[i] = InferenceResult(
                probs[row], uae[row], bbsd[row], hidden[row], cams[row], step_s
            )
    return results  # type: ignore[return-value]


class ServiceState:
    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.storage = open_storage(settings)
        self.metrics = ServiceMetrics()
        self.sync = ModelSync(settings.model_pointer)
        self.model: LoadedModel | None = None
        self.generation = 0
        self.inference_executor = ThreadPoolExecutor(1, thread_name_prefix="inference")
        self.loader_executor = ThreadPoolExecutor(1, thread_name_prefix="model-loader")
        self.batcher: MicroBatcher[InferenceItem, InferenceResult] = MicroBatcher(
            run_batch,
            self.inference_executor,
            max_size=settings.batch_max_size,
            max_wait_s=settings.batch_max_wait_ms / 1000,
            on_batch=self.metrics.batch_size.observe,
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
        self._watcher: asyncio.Task[None] | None = None
        self._reload_lock = asyncio.Lock()

    async def start(self) -> None:
        self.batcher.start()
        self.recorder.start()
        pointer = self.sync.read()
        if pointer is None:
            first = self.settings.metadata_file or self.storage.newest_metadata_file()
            if first is None:
                log.warning("No model in %s/models yet: not ready", self.storage.url)
                # Still count as a live worker, so the first PUT waits for this one too.
                self.sync.ack(0, ok=True, detail="no model yet")
            else:
                pointer = self.sync.publish(first)
        if pointer is not None:
            await self._follow(pointer.generation, pointer.metadata_file)
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="model-watch")

    async def close(self) -> None:
        if self._watcher:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self.batcher.stop()
        self.sync.leave()
        await asyncio.get_running_loop().run_in_executor(None, self.recorder.stop)
        self.inference_executor.shutdown(wait=False)
        self.loader_executor.shutdown(wait=False)

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
        self.metrics.model_info.labels(model.name, model.version).set(1)

    async def _follow(self, generation: int, metadata_file: str) -> None:
        """Load what the pointer says; on failure keep serving the old model."""
        async with self._reload_lock:
            if generation <= self.generation:
                return
            try:
                model = await self._load(metadata_file)
            except ModelLoadError as err:
                log.error(
                    "Cannot follow model %s (generation %d): %s — keeping %s",
                    metadata_file,
                    generation,
                    err.reason,
                    self.model.metadata_file if self.model else "no model",
                )
                self.generation = generation
                self.sync.ack(generation, ok=False, detail=err.reason)
                return
            self._swap(model, generation)
            self.sync.ack(generation, ok=True)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        next_drift_refresh = 0.0
        while True:
            await asyncio.sleep(self.settings.reload_poll_s)
            try:
                pointer = self.sync.read()
                if pointer and pointer.generation > self.generation:
                    await self._follow(pointer.generation, pointer.metadata_file)
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

    async def update_model(self, metadata_file: str, wait_s: float = 30.0) -> dict[str, object]:
        """Load here first (a bad model changes nothing), then make every worker follow."""
        async with self._reload_lock:
            model = await self._load(metadata_file)  # raises ModelLoadError
            pointer = self.sync.publish(metadata_file)
            self._swap(model, pointer.generation)
            self.sync.ack(pointer.generation, ok=True)
        deadline = time.monotonic() + wait_s
        while True:
            acks = self.sync.acks()
            behind = [a.pid for a in acks if a.generation < pointer.generation]
            if not behind or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        failed = {a.pid: a.detail for a in acks if a.generation == pointer.generation and not a.ok}
        return {
            "model_name": model.name,
            "model_version": model.version,
            "metadata_file": metadata_file,
            "mlflow_run_id": model.run_id,
            "generation": pointer.generation,
            "workers": len(acks),
            "workers_pending": behind,
            "workers_failed": failed,
        }
