"""Micro-batching: concurrent requests in one worker share one model call, off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
V = TypeVar("V")


class MicroBatcher(Generic[T, R]):
    """Collects up to `max_size` items or waits at most `max_wait_s` after the first one,
    then runs `fn(items)` in `executor` and hands each caller its own result.

    A lone item runs on the event loop itself when `alone()` says nothing else is in flight
    and the last lone call took at most `inline_max_s`: a request on its own gains nothing
    from the executor, and the hand-over to its thread and back costs two thread wake-ups
    (~0.4 ms of a 4 ms step, issue 14). Anything else in flight keeps the executor, so the
    loop goes on preparing the next batch meanwhile; a slow model (a lone call over the limit)
    never blocks the loop."""

    def __init__(
        self,
        fn: Callable[[Sequence[T]], Sequence[R]],
        executor: Executor,
        *,
        max_size: int = 16,
        max_wait_s: float = 0.005,
        on_batch: Callable[[int], None] | None = None,
        alone: Callable[[], bool] | None = None,
        inline_max_s: float = 0.02,
    ) -> None:
        self._fn = fn
        self._executor = executor
        self._max_size = max_size
        self._max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._alone = alone
        self._inline_max_s = inline_max_s
        self._lone_s = 0.0  # how long the last lone item's call took (either way)
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    def inline_allowed(self) -> bool:
        """Whether a lone call would run on the event loop now: nothing else in flight and
        the last lone call within `inline_max_s`."""
        return self._lone_s <= self._inline_max_s and self._alone is not None and self._alone()

    def run_alone(self, fn: Callable[[], V]) -> tuple[V, float] | None:
        """(fn(), its seconds) run on the event loop now where `inline_allowed`, counted as a
        batch of one; None otherwise. For a caller whose model call does more than the batch
        function (one upload decoded, resized and inferred in one TensorFlow call)."""
        if not self.inline_allowed():
            return None
        with self._timed_lone_call():
            value = fn()
        if self._on_batch:
            self._on_batch(1)
        return value, self._lone_s

    @contextlib.contextmanager
    def _timed_lone_call(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self._lone_s = time.perf_counter() - started

    async def _collect(self) -> list[tuple[T, asyncio.Future[R]]]:
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._max_wait_s
        while len(batch) < self._max_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            live = [(item, fut) for item, fut in batch if not fut.cancelled()]
            if not live:
                continue
            if self._on_batch:
                self._on_batch(len(live))
            try:
                results = await self._call([item for item, _ in live], loop)
            except Exception as err:  # every waiting caller gets the error, the loop lives on
                log.exception("batch of %d failed", len(live))
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            for (_, fut), result in zip(live, results, strict=True):
                if not fut.done():
                    fut.set_result(result)

    async def _call(self, items: list[T], loop: asyncio.AbstractEventLoop) -> Sequence[R]:
        if len(items) > 1:
            return await loop.run_in_executor(self._executor, self._fn, items)
        with self._timed_lone_call():
            if self.inline_allowed():
                return self._fn(items)
            return await loop.run_in_executor(self._executor, self._fn, items)
