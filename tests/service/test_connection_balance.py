"""`cvops serve`'s workers share keep-alive connections out evenly (`cvops.service.worker`)."""

from __future__ import annotations

import collections
import os
import socket
from pathlib import Path

from cvops.service.worker import ConnectionBoard
from tests.service.conftest import ServiceProcess


def test_the_board_hands_out_slots_and_reports_the_fewest_connections_elsewhere() -> None:
    board = ConnectionBoard(slots=3)
    first, second, third = board.reserve(), board.reserve(), board.reserve()
    assert [first, second, third] == [0, 1, 2]
    assert board.reserve() is None  # full: that worker accepts without looking
    assert board.fewest_elsewhere(0) is None  # reserved slots are workers still booting
    board.claim(1, pid=101)
    board.claim(2, pid=102)
    board.publish(1, 101, 5)
    board.publish(2, 102, 3)
    assert board.fewest_elsewhere(0) == 3
    assert board.fewest_elsewhere(2) == 5  # its own slot does not count
    board.release(2)  # its worker exited
    assert board.fewest_elsewhere(0) == 5
    assert board.reserve() == 2


def test_the_board_is_shared_with_forked_workers() -> None:
    board = ConnectionBoard(slots=2)
    slot = board.reserve()
    assert slot is not None
    pid = os.fork()
    if pid == 0:  # the worker: publishes its connections, as a forked gunicorn worker does
        board.claim(slot, os.getpid())
        board.publish(slot, os.getpid(), 7)
        os._exit(0)
    os.waitpid(pid, 0)
    assert board.fewest_elsewhere(slot + 1) == 7


def worker_of_each_connection(port: int, connections: int) -> collections.Counter[str]:
    """Open the connections together (as a load generator or a proxy's pool does), then ask
    on each which worker holds it."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(connections)]
    try:
        for sock in socks:
            sock.sendall(b"GET /health_check HTTP/1.1\r\nHost: cvops\r\n\r\n")
        workers: collections.Counter[str] = collections.Counter()
        for sock in socks:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(65536)
                assert chunk, "connection closed before the answer"
                head += chunk
            lines = head.split(b"\r\n\r\n")[0].decode().lower().split("\r\n")
            assert lines[0].startswith("http/1.1 200")
            worker = next(ln for ln in lines if ln.startswith("x-cvops-worker:"))
            workers[worker.split(":")[1].strip()] += 1
        return workers
    finally:
        for sock in socks:
            sock.close()


def test_connections_opened_together_are_shared_by_both_workers(
    storage_root: Path, tmp_path: Path
) -> None:
    """With uvloop's own accept, 16 connections opened together landed 16/0 or 14/2 in about
    half of the rounds (one worker busy, one idle, for as long as the connections live); each
    worker now takes at most one more than the other holds, unless that one is busy."""
    with ServiceProcess(storage_root, tmp_path, workers=2) as service:
        splits = [worker_of_each_connection(service.port, 16) for _ in range(5)]
    for split in splits:
        assert len(split) == 2 and min(split.values()) >= 4, splits
