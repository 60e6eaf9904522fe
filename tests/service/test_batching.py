"""Micro-batching groups concurrent requests and isolates failures."""

from __future__ import annotations

import asyncio
import threading
import time
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


def test_a_lone_item_runs_on_the_loop_only_when_alone_and_fast() -> None:
    """Where `fn` ran: the event loop's thread for a lone item while nothing else is in
    flight; the executor for a batch of two, while others are in flight, and after a lone
    call slower than `inline_max_s` (until a lone call is fast again)."""
    threads: list[tuple[int, str]] = []
    delay = {"s": 0.0}
    others = {"in_flight": False}

    def fn(xs: list[int]) -> list[int]:
        time.sleep(delay["s"])
        threads.append((len(xs), threading.current_thread().name))
        return [x * 10 for x in xs]

    async def main() -> list[int]:
        loop_thread = threading.current_thread().name
        with ThreadPoolExecutor(1, thread_name_prefix="inference") as pool:
            batcher = MicroBatcher(
                fn,
                pool,
                max_size=8,
                max_wait_s=0.0,
                alone=lambda: not others["in_flight"],
                inline_max_s=0.05,
            )
            batcher.start()
            results = [await batcher.submit(1)]  # alone: on the loop
            results += await asyncio.gather(batcher.submit(2), batcher.submit(3))  # a batch of 2
            others["in_flight"] = True
            results.append(await batcher.submit(4))  # not alone
            others["in_flight"] = False
            delay["s"] = 0.1
            results.append(await batcher.submit(5))  # alone, on the loop, but slow
            delay["s"] = 0.0
            results.append(await batcher.submit(6))  # after a slow lone call: the executor
            results.append(await batcher.submit(7))  # fast again: the loop
            await batcher.stop()
        where = [("loop" if name == loop_thread else "executor") for _, name in threads]
        assert [n for n, _ in threads] == [1, 2, 1, 1, 1, 1]
        assert where == ["loop", "executor", "executor", "loop", "executor", "loop"]
        return results

    assert run(main()) == [10, 20, 30, 40, 50, 60, 70]


def test_run_alone_only_where_a_lone_item_would_run_on_the_loop() -> None:
    """`run_alone` runs its call on the event loop and counts a batch of one where a lone item
    would run there; None while others are in flight and after a lone call slower than
    `inline_max_s` (until a lone call is fast again)."""
    batches: list[int] = []
    others = {"in_flight": False}

    def slow() -> str:
        time.sleep(0.1)
        return "slow"

    async def main() -> list[object]:
        loop_thread = threading.current_thread().name
        with ThreadPoolExecutor(1, thread_name_prefix="inference") as pool:
            batcher = MicroBatcher(
                lambda xs: [x * 10 for x in xs],
                pool,
                max_wait_s=0.0,
                on_batch=batches.append,
                alone=lambda: not others["in_flight"],
                inline_max_s=0.05,
            )
            batcher.start()
            got: list[object] = []
            called = batcher.run_alone(lambda: threading.current_thread().name)
            assert called is not None and called[1] >= 0
            got.append(called[0] == loop_thread)
            others["in_flight"] = True
            got.append(batcher.run_alone(lambda: "not alone"))
            others["in_flight"] = False
            got.append(batcher.run_alone(slow)[0])  # type: ignore[index]
            got.append(batcher.run_alone(lambda: "after a slow call"))
            got.append(await batcher.submit(1))  # a fast lone item on the loop: fast again
            got.append(batcher.run_alone(lambda: "fast again")[0])  # type: ignore[index]
            await batcher.stop()
        return got

    assert run(main()) == [True, None, "slow", None, 10, "fast again"]
    assert batches == [1, 1, 1, 1]
