"""A TCP proxy that can partition a link, for the system tests (issue 11).

:class:`TcpProxy` listens on ``127.0.0.1:<port>`` and forwards every accepted connection to one
upstream address (a coordinator), byte for byte, in its own thread and asyncio loop, so a
synchronous test drives it with plain method calls. Each direction of the link can be held:

* ``to_server``: bytes from the client (a worker) to the upstream (the coordinator);
* ``to_client``: bytes from the upstream back to the client.

A held direction keeps *reading* (so neither side sees a full socket buffer or a reset) but
forwards nothing: bytes, a half-close (FIN) and a reset alike wait in order, per connection,
and are delivered when the direction is released — like a partition after which TCP
retransmission delivers what was sent meanwhile. Holds are per proxy, so they apply to
connections made while held, too (the TCP handshake itself always completes: the proxy
accepts locally and dials upstream at once).

:meth:`TcpProxy.flap` holds both directions for ``down`` seconds out of every ``period`` for
``duration`` seconds, in the background; :meth:`TcpProxy.reset` closes every connection
abruptly (RST on both sides). Every control call returns once the proxy's loop has applied it,
so "held" means no byte crosses from then on. :meth:`TcpProxy.close` (or leaving the ``with``
block) stops listening, resets what is left and joins the thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar

__all__ = ["DIRECTIONS", "Direction", "FlapReport", "TcpProxy"]

Direction = Literal["to_server", "to_client"]
DIRECTIONS: Final[tuple[Direction, Direction]] = ("to_server", "to_client")
T = TypeVar("T")

_CHUNK = 64 * 1024
# Chunks read but not yet forwarded, per connection and direction: past this (64 MiB) the
# proxy stops reading, and TCP flow control pushes back on the sender as a real link would.
_MAX_QUEUED_CHUNKS = 1024
_CALL_TIMEOUT_S = 10.0


class _Eof:
    """The sender half-closed its side (FIN)."""


class _Abort:
    """The sender's side broke (reset or error): reset the receiver too."""


_EOF: Final = _Eof()
_ABORT: Final = _Abort()
_Item = bytes | _Eof | _Abort


@dataclass
class FlapReport:
    """What one :meth:`TcpProxy.flap` did."""

    cycles: int = 0
    """Times both directions were held."""
    held_s: float = 0.0
    """Seconds both directions spent held, in all."""


def _abort_writer(writer: asyncio.StreamWriter) -> None:
    """Closes a connection with a RST (SO_LINGER 0), dropping anything unsent."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class _Link:
    """One accepted connection and its upstream twin."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    pending: dict[Direction, int] = field(default_factory=lambda: dict.fromkeys(DIRECTIONS, 0))
    done: set[Direction] = field(default_factory=set)

    def writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.client, self.server) if w is not None]

    def abort(self) -> None:
        for writer in self.writers():
            _abort_writer(writer)
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``upstream`` (``host:port``), with partition controls.

    Use as a context manager, or call :meth:`start` and :meth:`close`.
    """

    def __init__(self, upstream: str, *, listen_host: str = "127.0.0.1") -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream_host = host.strip("[]")
        self.upstream_port = int(port)
        self.listen_host = listen_host
        self.port = 0
        self.accepted = 0
        """Connections accepted so far (all time)."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"tcpproxy->{upstream}", daemon=True
        )
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._open: dict[Direction, asyncio.Event] = {}
        self._flap: concurrent.futures.Future[FlapReport] | None = None
        self._closed = False

    # ----- lifecycle ---------------------------------------------------------------------

    def start(self) -> TcpProxy:
        """Starts the loop thread and listens on an ephemeral port."""
        self._thread.start()
        self._run(self._start())
        return self

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def address(self) -> str:
        """``host:port`` that clients dial instead of the upstream."""
        return f"{self.listen_host}:{self.port}"

    def close(self) -> None:
        """Stops listening, resets every connection, ends the loop and joins its thread."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            try:
                self._run(self._shutdown())
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(_CALL_TIMEOUT_S)
        if not self._thread.is_alive():
            self._loop.close()

    # ----- controls (any thread) -----------------------------------------------------------

    def hold(self, *directions: Direction) -> None:
        """Stops forwarding in ``directions`` (both when none are named) until released."""
        self._call(self._set(directions or DIRECTIONS, held=True))

    def release(self, *directions: Direction) -> None:
        """Forwards again in ``directions`` (both when none are named), queued bytes first."""
        self._call(self._set(directions or DIRECTIONS, held=False))

    def held(self, direction: Direction) -> bool:
        """Whether ``direction`` is held right now."""
        return self._call(self._is_held(direction))

    def flap(
        self, period: float = 2.0, down: float = 1.0, duration: float = 30.0
    ) -> concurrent.futures.Future[FlapReport]:
        """Holds both directions for ``down`` of every ``period`` seconds, for ``duration``
        seconds, starting now, in the background; both are released at the end (or when the
        returned future is cancelled, or by :meth:`stop_flap`)."""
        if not 0 < down < period:
            raise ValueError(f"need 0 < down < period, got down={down} period={period}")
        if self._flap is not None and not self._flap.done():
            raise RuntimeError("already flapping")
        self._flap = asyncio.run_coroutine_threadsafe(
            self._flapping(period, down, duration), self._loop
        )
        return self._flap

    def stop_flap(self) -> None:
        """Ends a running flap early (both directions are released)."""
        if self._flap is not None:
            self._flap.cancel()
            with contextlib.suppress(concurrent.futures.CancelledError, TimeoutError):
                self._flap.result(_CALL_TIMEOUT_S)
            # The future is cancelled at once; the loop releases the link just after.
            self.release()

    def reset(self) -> int:
        """Closes every open connection abruptly (RST to both ends); returns how many."""
        return self._call(self._reset())

    def open_connections(self) -> int:
        """Connections currently open through the proxy."""
        return self._call(self._count())

    def pending(self, direction: Direction) -> int:
        """Bytes read in ``direction`` and not yet forwarded (held back), over all links."""
        return self._call(self._pending(direction))

    # ----- loop side -----------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed or not self._thread.is_alive():
            coro.close()
            raise RuntimeError("the proxy is not running")
        return self._run(coro)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(_CALL_TIMEOUT_S)

    async def _start(self) -> None:
        for direction in DIRECTIONS:
            self._open[direction] = asyncio.Event()
            self._open[direction].set()
        self._server = await asyncio.start_server(self._accept, self.listen_host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._flap is not None:
            self._flap.cancel()
        await self._reset()
        if self._server is not None:
            await self._server.wait_closed()
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    async def _set(self, directions: Iterable[Direction], *, held: bool) -> None:
        for direction in directions:
            if direction not in self._open:
                raise ValueError(f"unknown direction {direction!r}; use one of {DIRECTIONS}")
            if held:
                self._open[direction].clear()
            else:
                self._open[direction].set()

    async def _is_held(self, direction: Direction) -> bool:
        return not self._open[direction].is_set()

    async def _reset(self) -> int:
        links = list(self._links)
        for link in links:
            link.abort()
        self._links.clear()
        tasks = [t for link in links for t in link.tasks]
        await asyncio.gather(*tasks, return_exceptions=True)
        return len(links)

    async def _count(self) -> int:
        return len(self._links)

    async def _pending(self, direction: Direction) -> int:
        return sum(link.pending[direction] for link in self._links)

    async def _flapping(self, period: float, down: float, duration: float) -> FlapReport:
        report = FlapReport()
        clock = self._loop.time
        end = clock() + duration
        try:
            while (now := clock()) < end:
                await self._set(DIRECTIONS, held=True)
                report.cycles += 1
                await asyncio.sleep(min(down, end - now))
                report.held_s += clock() - now
                await self._set(DIRECTIONS, held=False)
                await asyncio.sleep(max(0.0, min(period - down, end - clock())))
        finally:
            await self._set(DIRECTIONS, held=False)
        return report

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        link = _Link(client=writer)
        self._links.add(link)
        try:
            up_reader, up_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
        except OSError:
            self._links.discard(link)
            _abort_writer(writer)
            return
        link.server = up_writer
        if link not in self._links:  # reset while dialling
            link.abort()
            return
        pipes: tuple[tuple[Direction, asyncio.StreamReader, asyncio.StreamWriter], ...] = (
            ("to_server", reader, up_writer),
            ("to_client", up_reader, writer),
        )
        for direction, src, dst in pipes:
            queue: asyncio.Queue[_Item] = asyncio.Queue(_MAX_QUEUED_CHUNKS)
            link.tasks.append(asyncio.create_task(self._read(link, direction, src, queue)))
            link.tasks.append(asyncio.create_task(self._write(link, direction, dst, queue)))

    async def _read(
        self,
        link: _Link,
        direction: Direction,
        src: asyncio.StreamReader,
        queue: asyncio.Queue[_Item],
    ) -> None:
        while True:
            try:
                data = await src.read(_CHUNK)
            except (OSError, asyncio.IncompleteReadError):
                await queue.put(_ABORT)
                return
            if not data:
                await queue.put(_EOF)
                return
            link.pending[direction] += len(data)
            await queue.put(data)

    async def _write(
        self,
        link: _Link,
        direction: Direction,
        dst: asyncio.StreamWriter,
        queue: asyncio.Queue[_Item],
    ) -> None:
        gate = self._open[direction]
        while True:
            item = await queue.get()
            # Nothing awaits between the gate opening and the write, so a hold applied on the
            # loop stops every byte that was not yet handed to the kernel.
            await gate.wait()
            if isinstance(item, _Abort):
                self._links.discard(link)
                link.abort()
                return
            if isinstance(item, _Eof):
                with contextlib.suppress(OSError, RuntimeError):
                    if dst.can_write_eof():
                        dst.write_eof()
                link.done.add(direction)
                if len(link.done) == len(DIRECTIONS):
                    self._links.discard(link)
                    for writer in link.writers():
                        writer.close()
                return
            link.pending[direction] -= len(item)
            try:
                dst.write(item)
                await dst.drain()
            except OSError:
                self._links.discard(link)
                link.abort()
                return
