"""The gunicorn worker of `cvops serve`: uvicorn's, but the workers share connections out
evenly instead of by who woke first.

Why: the workers share one listening socket, and uvloop (libuv) accepts every pending
connection in one go. Clients that open their keep-alive connections together (a load
generator, a proxy's pool of upstream connections) then mostly land on whichever worker the
scheduler ran first, and stay there: at concurrency 32 on 2 workers and 2 cores, one worker
held about 2/3 of the connections in most runs and all 32 in some, with the other worker's
core left to the first one's helpers. Accepting one connection per turn of the event loop is
not enough on its own: with the client busy on one core, the worker that runs on the other
wins every race.

So each worker accepts one connection at a time and, through a board in shared memory (one
slot per worker: its pid and its open connections), leaves a connection to a worker that
holds fewer: it stops listening for `DEFER_S`, and takes the connection itself if it is still
waiting then (that worker is busy or gone). A connection thus waits at most `DEFER_S` longer.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import mmap
import os
import socket
import ssl
import struct
import sys
from collections.abc import Callable
from typing import Any

from gunicorn.arbiter import Arbiter
from uvicorn import Server
from uvicorn_worker import UvicornWorker

log = logging.getLogger(__name__)

# accept() errors that are about this process's resources, not the connection: stop accepting
# for a moment instead of spinning on a socket that stays readable (as asyncio does)
RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_RETRY_DELAY_S = 1.0
DEFER_S = 0.002  # how long a worker ahead leaves a connection to one with fewer


class ConnectionBoard:
    """Open connections per worker, in anonymous shared memory the master maps before it forks
    the workers. The master hands out the slots (`reserve` before a fork, `release` when the
    worker exits); each worker writes only its own slot and reads the others'."""

    SLOT = struct.Struct("=ii")  # pid (0: free, -1: reserved for a worker being forked), count

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._memory = mmap.mmap(-1, self.SLOT.size * slots)  # MAP_SHARED: seen across forks

    def _read(self, slot: int) -> tuple[int, int]:
        return self.SLOT.unpack_from(self._memory, slot * self.SLOT.size)

    def _write(self, slot: int, pid: int, count: int) -> None:
        self.SLOT.pack_into(self._memory, slot * self.SLOT.size, pid, count)

    def reserve(self) -> int | None:
        """A free slot for the next worker (master only); None when all are taken: that worker
        then accepts without looking at the others."""
        for slot in range(self.slots):
            if self._read(slot)[0] == 0:
                self._write(slot, -1, 0)
                return slot
        return None

    def release(self, slot: int) -> None:
        self._write(slot, 0, 0)

    def claim(self, slot: int, pid: int) -> None:
        self._write(slot, pid, 0)

    def publish(self, slot: int, pid: int, count: int) -> None:
        self._write(slot, pid, count)

    def fewest_elsewhere(self, slot: int) -> int | None:
        """The fewest connections any other live worker holds; None when there is none."""
        counts = [
            count
            for other in range(self.slots)
            if other != slot
            for pid, count in [self._read(other)]
            if pid > 0
        ]
        return min(counts, default=None)


class FairAcceptor:
    """Accepts at most one connection each time the event loop finds the socket readable, and
    leaves it to another worker holding fewer connections (see the module's docstring). It
    stands in uvicorn's list of servers: `close` stops accepting at shutdown."""

    def __init__(
        self,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.Protocol],
        tls: ssl.SSLContext | None,
        ahead: Callable[[], bool],
        accepted: Callable[[], None],
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._factory = protocol_factory
        self._tls = tls
        self._ahead = ahead
        self._accepted = accepted
        self.starting: set[asyncio.Task[None]] = set()  # accepted, protocol not made yet
        self._closed = False
        sock.setblocking(False)
        self._listen()

    def _listen(self) -> None:
        if not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._accept_one)

    def _pause(self, seconds: float, then: Callable[[], None]) -> None:
        self._loop.remove_reader(self._sock.fileno())
        self._loop.call_later(seconds, then)

    def _accept_one(self) -> None:
        if self._ahead():
            self._pause(DEFER_S, self._after_deferral)
        else:
            self._accept()

    def _after_deferral(self) -> None:
        """Take a connection still waiting (the worker behind is busy or gone), then listen."""
        if not self._closed and self._accept():
            self._listen()

    def _accept(self) -> bool:
        """Accept one connection if one is waiting; False when accepting is paused."""
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return True  # another worker took it, or the client gave up
        except OSError as err:
            if err.errno not in RESOURCE_ERRORS:
                raise
            log.error(
                "Cannot accept connections (%s); retrying in %.0f s", err, ACCEPT_RETRY_DELAY_S
            )
            self._pause(ACCEPT_RETRY_DELAY_S, self._listen)
            return False
        conn.setblocking(False)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = self._loop.create_task(self._connect(conn))
        self.starting.add(task)
        task.add_done_callback(self.starting.discard)
        self._accepted()
        return True

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn, ssl=self._tls)
        except Exception as err:  # a TLS handshake that failed, a peer already gone
            log.debug("Connection dropped before it started: %s", err)
            conn.close()

    def close(self) -> None:
        self._closed = True
        self._loop.remove_reader(self._sock.fileno())

    async def wait_closed(self) -> None:
        if self.starting:
            await asyncio.gather(*self.starting, return_exceptions=True)


class FairAcceptServer(Server):
    """uvicorn's server with `FairAcceptor`s in place of the event loop's own servers."""

    def __init__(self, config: Any, board: ConnectionBoard | None, slot: int | None) -> None:
        super().__init__(config)
        self._board = board if slot is not None else None
        self._slot = slot if slot is not None else -1
        self._pid = 0

    def _open_connections(self) -> int:
        """Connections open, and those accepted whose protocol has not started yet."""
        starting = sum(len(acceptor.starting) for acceptor in self.servers)
        return len(self.server_state.connections) + starting

    def _publish(self) -> None:
        if self._board is not None:
            self._board.publish(self._slot, self._pid, self._open_connections())

    def _ahead(self) -> bool:
        if self._board is None:
            return False
        fewest = self._board.fewest_elsewhere(self._slot)
        return fewest is not None and self._open_connections() > fewest

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if sockets is None:  # not under gunicorn: uvicorn binds and accepts itself
            await super().startup(sockets)
            return
        await super().startup(sockets=[])  # the lifespan (the app's start-up), no listener
        self._pid = os.getpid()
        self._publish()
        config = self.config
        loop = asyncio.get_running_loop()
        counted = counted_protocol(config.http_protocol_class, self._publish)

        def create_protocol() -> asyncio.Protocol:  # as uvicorn's own `startup` makes them
            return counted(  # type: ignore[no-any-return]
                config=config,
                server_state=self.server_state,
                app_state=self.lifespan.state,
                _loop=loop,
            )

        self.servers = [
            FairAcceptor(sock, create_protocol, config.ssl, self._ahead, self._publish)
            for sock in sockets
        ]


def counted_protocol(protocol_class: type, on_change: Callable[[], None]) -> type:
    """`protocol_class` that calls `on_change` once a connection opened or closed (uvicorn's
    protocols add and remove themselves in the server's set of connections)."""

    class Counted(protocol_class):  # type: ignore[valid-type, misc]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            on_change()

        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            on_change()

    return Counted


class FairAcceptWorker(UvicornWorker):  # type: ignore[misc]
    """Set by `cvops serve`; `self.app.connection_board` and `self.connection_slot` come from
    the master (`ServiceServer`, its `pre_fork` hook)."""

    async def _serve(self) -> None:
        self.config.app = self.wsgi
        board = getattr(self.app, "connection_board", None)
        server = FairAcceptServer(self.config, board, getattr(self, "connection_slot", None))
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
