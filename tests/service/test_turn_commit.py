"""`TurnCommit`: the requests that finish in one turn of the event loop share one spool commit,
each returns only once its records are on disk, and one request's cancellation or
a spool failure is handled per request."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvops.service.recording import Recorder, Records, TurnCommit
from tests.service.test_poison_records import prediction


@pytest.fixture
def recorder(tmp_path: Path) -> Iterator[Recorder]:
    recorder = Recorder(f"sqlite:///{tmp_path / 'service.db'}", tmp_path / "spool")
    try:
        yield recorder  # the flusher is not started: what the writer spools stays there
    finally:
        recorder.stop()


def spooled_ids(recorder: Recorder) -> list[str]:
    return [payload["id"] for _, _, payload in recorder.spool.take(1000)]


def test_requests_of_one_turn_share_one_commit(recorder: Recorder) -> None:
    commits: list[int] = []
    write_groups = recorder.write_groups

    def counted(groups: list[Records]) -> None:  # the real commit, counted
        commits.append(len(groups))
        write_groups(groups)

    recorder.write_groups = counted  # type: ignore[method-assign]
    turn = TurnCommit(recorder)
    together = [[prediction(i)] for i in range(10)]
    later = [prediction(10)]

    async def requests() -> None:
        await asyncio.gather(*(turn.write(records) for records in together))
        # every one of them returned: all ten are on disk already
        assert len(spooled_ids(recorder)) == 10
        await turn.write(later)

    asyncio.run(requests())
    assert commits == [10, 1]
    assert spooled_ids(recorder) == [r[0][1]["id"] for r in [*together, later]]  # in order


def test_a_cancelled_request_leaves_the_others_waiting_and_its_records_spooled(
    recorder: Recorder,
) -> None:
    turn = TurnCommit(recorder)
    first, second = [prediction(0)], [prediction(1)]

    async def requests() -> None:
        cancelled = asyncio.create_task(turn.write(first))
        waiting = asyncio.create_task(turn.write(second))
        await asyncio.sleep(0)  # both have handed their records in
        cancelled.cancel()
        await waiting  # not cancelled with it
        with pytest.raises(asyncio.CancelledError):
            await cancelled

    asyncio.run(requests())
    assert spooled_ids(recorder) == [first[0][1]["id"], second[0][1]["id"]]


def test_a_spool_failure_reaches_every_request_of_the_turn(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(groups: list[Records]) -> None:  # a fault this test cannot cause for real
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(recorder.spool, "put_groups", disk_full)
    turn = TurnCommit(recorder)

    async def requests() -> list[BaseException | None]:
        return await asyncio.gather(
            *(turn.write([prediction(i)]) for i in range(3)), return_exceptions=True
        )

    outcomes = asyncio.run(requests())
    assert [type(o) for o in outcomes] == [OSError] * 3
    monkeypatch.undo()
    asyncio.run(turn.write([prediction(3)]))  # the next turn writes again
    assert len(spooled_ids(recorder)) == 1
