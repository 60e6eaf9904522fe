"""Micro-batching groups concurrent requests and isolates failures."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from cvops.service.batching import MicroBatcher


def run(coro):
    return asyncio.run(coro)


def test_concurrent_items_share_batches_and_keep_their_results() -> None:
    sizes: list[int] = []

    async def main() -> list[int]:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(
                lambda xs: [x * 10 for x in xs],
                pool,
                max_size=4,
                max_wait_s=0.05,
                on_batch=sizes.append,
            )
            batcher.start()
            results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
            await batcher.stop()
            return results

    assert run(main()) == [i * 10 for i in range(10)]
    assert sum(sizes) == 10 and max(sizes) == 4 and len(sizes) <= 4


def test_lone_request_waits_at_most_max_wait() -> None:
    async def main() -> float:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(lambda xs: xs, pool, max_size=64, max_wait_s=0.02)
            batcher.start()
            loop = asyncio.get_running_loop()
            start = loop.time()
            await batcher.submit(1)
            elapsed = loop.time() - start
            await batcher.stop()
            return elapsed

    assert run(main()) < 0.5


def test_failed_batch_fails_its_callers_and_batcher_survives() -> None:
    async def main() -> int:
        calls = {"n": 0}

        def fn(xs):
            calls["n"] += 1
            if calls["n"] == 1:
                raise ValueError("boom")
            return xs

        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(fn, pool, max_size=8, max_wait_s=0.01)
            batcher.start()
            with pytest.raises(ValueError, match="boom"):
                await batcher.submit(1)
            result = await batcher.submit(2)
            await batcher.stop()
            return result

    assert run(main()) == 2
