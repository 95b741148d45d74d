"""The connection lifecycle of a worker session (foundation layer: plait.worker).

:class:`CoordinatorLinks` runs a :class:`~plait.worker.session.WorkerSession`'s streams: it
opens one ``WorkerService.Connect`` call at a time, waits for the ``Welcome`` that answers the
session's ``Hello``, feeds what the coordinator sends to the session while the session's
heartbeats run, closes the stream gracefully when the session is done, logs why a stream ended,
and dials again. The session's side of each step comes in as :class:`StreamHandlers`.

A worker may be given several coordinator addresses (a leader and its warm standbys,
comma-separated). :class:`CoordinatorLinks` keeps one ``grpc.aio`` channel per address and,
after each stream ends, decides where and when to dial again:

* a standby's ``NOT_LEADER`` refusal that names the leader is followed **at once**, with no
  backoff (a few times in a row at most, so two standbys with stale hints cannot spin);
* anything else (an unreachable address, a dropped stream, a standby that knows no leader yet)
  moves to the next address after the session's full-jitter backoff.

A hint naming an address outside the list is followed only with TLS and after the address's
certificate has proved it a coordinator (:mod:`plait.endpoints`); that handshake runs in a
thread, so the event loop keeps serving attempts and the fence meanwhile.

With ``tls`` the channels are TLS (mTLS with a client certificate); with a ``token`` every
``Connect`` carries ``authorization: Bearer <token>``. A stream refused with ``ALREADY_EXISTS``
(another live session holds this worker id) or ended with ``ABORTED`` (a newer session of the
same worker replaced it) is logged and dialled again with the backoff like any other failure.

The reconnect delay is the session's backoff alone. A channel keeps its own subchannel backoff
(gRPC's: 1 s growing by 1.6 up to 120 s), and a call on a channel in that backoff fails at once
without dialling, so a worker whose coordinator was down for a few seconds would come back only
when gRPC's timer, not ours, allowed it. So a failed stream closes its channel and the next
attempt dials on a fresh one with its own subchannel (``grpc.use_local_subchannel_pool``), and
the channels' own reconnect backoff is capped at the session's (for a channel that stays up).

Everything else about reconnecting -- ``Hello.running`` re-adoption, re-sending unacked
results, the self-fencing clock -- is the session's and does not depend on which address
answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from plait import security
from plait.endpoints import Endpoints, not_leader_of
from plait.security import TlsFiles
from plait.v1 import worker_service_pb2 as pb
from plait.v1 import worker_service_pb2_grpc as pb_grpc
from plait.worker.backoff import Backoff
from plait.worker.outgoing import ConnectStream

__all__ = ["CoordinatorLinks", "ProtocolError", "StreamHandlers", "reconnect_options"]

log = logging.getLogger(__name__)
# The session's logger for stream lifecycle lines: they always came from it, and log formats
# print the name.
session_log = logging.getLogger("plait.worker.session")


class ProtocolError(Exception):
    """The coordinator broke the protocol (the stream is dropped and re-opened)."""


@dataclass(frozen=True, slots=True)
class StreamHandlers:
    """The session's side of one stream, called by :meth:`CoordinatorLinks.serve`."""

    hello: Callable[[ConnectStream], float]
    """Queues ``Hello`` on a fresh stream; returns the monotonic time it was sent."""
    observe: Callable[[pb.ConnectResponse], None]
    """Takes the HLC of the first coordinator message (before it is checked to be Welcome)."""
    welcome: Callable[[pb.Welcome, float, ConnectStream], None]
    """Takes the ``Welcome`` (and the Hello send time); the stream is up from now on."""
    receive: Callable[[pb.ConnectResponse], None]
    """Takes every later coordinator message."""
    heartbeats: Callable[[ConnectStream], Coroutine[Any, Any, None]]
    """Sends heartbeats on the stream until cancelled."""
    close_timeout: Callable[[], float]
    """Seconds to wait for the coordinator to end the stream after Goodbye."""
    closed: Callable[[], None]
    """The stream is gone (whatever the reason)."""


class CoordinatorLinks:
    """The worker's channels to each coordinator address, and the choice of the next one."""

    __slots__ = (
        "_backoff",
        "_channels",
        "_ended_by",
        "_metadata",
        "_options",
        "_redirects",
        "_tls",
        "_worker_id",
        "endpoints",
    )

    def __init__(
        self,
        coordinator: str,
        backoff: Backoff,
        options: Sequence[tuple[str, int]] = (),
        *,
        tls: TlsFiles | None = None,
        token: str = "",
        worker_id: str = "",
    ) -> None:
        self.endpoints = Endpoints(coordinator, field="coordinator", tls=tls)
        self._backoff = backoff
        self._options: list[tuple[str, Any]] = [
            *options,
            *reconnect_options(backoff),
            *security.channel_options_for(tls),
            # No BDP probes: the coordinator would answer each heartbeat's probe with a PING
            # ACK, another wake-up on both sides; worker messages fit the default window.
            ("grpc.http2.bdp_probe", 0),
        ]
        self._tls = tls
        self._metadata = security.bearer_metadata(token)
        self._worker_id = worker_id
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._redirects = 0
        self._ended_by: BaseException | None = None

    @property
    def address(self) -> str:
        """The address the next stream goes to."""
        return self.endpoints.current

    def stub(self) -> pb_grpc.WorkerServiceStub:
        """A stub on the current address's channel (opened on first use, then kept)."""
        address = self.endpoints.current
        channel = self._channels.get(address)
        if channel is None:
            if self._tls is None:
                channel = grpc.aio.insecure_channel(address, options=self._options)
            else:
                creds = security.channel_credentials(self._tls)
                channel = grpc.aio.secure_channel(address, creds, options=self._options)
            self._channels[address] = channel
        return pb_grpc.WorkerServiceStub(channel)

    def connected(self) -> None:
        """A coordinator welcomed the worker: redirects start counting afresh."""
        self._redirects = 0

    async def check_hint(self, err: BaseException | None) -> None:
        """Checks the certificate of an unlisted leader a standby named, off the event loop.

        :meth:`next_delay` follows such a hint only after this check passed; the handshake
        takes up to two seconds, which must not stall the attempts and the fence.
        """
        standby = not_leader_of(err) if err is not None else None
        address = self.endpoints.unlisted(standby.leader if standby is not None else None)
        if address is not None and self._redirects <= len(self.endpoints):
            await asyncio.to_thread(self.endpoints.check_hint, address)

    def next_delay(self, err: BaseException | None) -> float:
        """After a stream ended (``err``: why, if it failed): moves on; seconds to wait first.

        An unlisted leader is followed only if :meth:`check_hint` passed it just before.
        """
        standby = not_leader_of(err) if err is not None else None
        leader = standby.leader if standby is not None else None
        was = self.endpoints.current
        # A leader is followed at once, but only a few times in a row: hints that keep naming
        # coordinators which refuse us are stale, and then the backoff applies.
        if (
            leader
            and leader != was
            and self._redirects <= len(self.endpoints)
            and self.endpoints.follow(leader, blocking=False)
        ):
            self._redirects += 1
            log.info("coordinator at %s is a standby; following the leader at %s", was, leader)
            return 0.0
        if len(self.endpoints) > 1 or was not in self.endpoints.addresses:
            self.endpoints.rotate()
        return self._backoff.next_delay()

    async def forget(self, address: str) -> None:
        """Closes ``address``'s channel: the next stream there dials on a fresh one.

        A fresh channel dials at once, whereas the old one would keep failing calls until
        gRPC's own subchannel backoff ran out.
        """
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close()

    async def close(self) -> None:
        """Closes every channel."""
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()

    # ----------------------------------------------------------------- streams

    async def serve(
        self, handlers: StreamHandlers, done: asyncio.Event, *, welcome_timeout: float
    ) -> None:
        """Runs one stream after another, with the reconnect delay between, until ``done``."""
        while not done.is_set():
            address = self.address
            ended_by = await self._stream_once(handlers, done, welcome_timeout)
            if done.is_set():
                break
            await self.forget(address)
            await self.check_hint(ended_by)
            delay = self.next_delay(ended_by)
            session_log.info("reconnecting to %s in %.2fs", self.address, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), delay)

    async def _stream_once(
        self, handlers: StreamHandlers, done: asyncio.Event, welcome_timeout: float
    ) -> BaseException | None:
        """One stream from Hello to its end; logs why it ended and returns the error, if any."""
        self._ended_by = None
        # grpc.aio allows a stream call without a request iterator (then call.write/read);
        # the generated stubs only type the iterator form.
        connect: Any = self.stub().Connect
        call = connect(metadata=self._metadata)
        stream = ConnectStream(call)
        writer = asyncio.create_task(stream.write_loop(), name="plait-worker-writer")
        tasks: list[asyncio.Task[Any]] = [writer]
        try:
            await self._accepted(call, welcome_timeout)
            hello_sent = handlers.hello(stream)
            first = await asyncio.wait_for(call.read(), welcome_timeout)
            if first is grpc.aio.EOF:
                raise ProtocolError("the coordinator closed the stream before Welcome")
            handlers.observe(first)
            if first.WhichOneof("message") != "welcome":
                raise ProtocolError(f"expected Welcome, got {first.WhichOneof('message')}")
            handlers.welcome(first.welcome, hello_sent, stream)
            self.connected()
            reader = asyncio.create_task(
                _read_loop(call, handlers.receive), name="plait-worker-reader"
            )
            heartbeats = asyncio.create_task(handlers.heartbeats(stream))
            finished = asyncio.create_task(done.wait())
            tasks += [reader, heartbeats, finished]
            await asyncio.wait({reader, writer, finished}, return_when=asyncio.FIRST_COMPLETED)
            if done.is_set() and not writer.done():
                await _close_gracefully(stream, writer, reader, handlers.close_timeout())
            elif not done.is_set():
                self._log_stream_end(stream, reader, writer)
        except (grpc.aio.AioRpcError, ProtocolError, TimeoutError, OSError) as err:
            self._log_error(err)
        finally:
            handlers.closed()
            for task in tasks:
                task.cancel()
            call.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return self._ended_by

    @staticmethod
    async def _accepted(call: Any, welcome_timeout: float) -> None:
        """Waits until the coordinator accepts the stream, before Hello is written.

        The coordinator sends initial metadata once it has authorized the stream; a refusal
        (UNAUTHENTICATED, PERMISSION_DENIED, a standby's UNAVAILABLE) ends the call first, and
        reading then raises it with its real status. Writing Hello into a call being refused
        can make gRPC report INTERNAL instead. A coordinator that sends no early metadata (an
        older one) costs at most a second here.
        """
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(call.initial_metadata(), min(1.0, welcome_timeout))
        if call.done():
            await call.read()  # raises the refusal (AioRpcError) with its status

    def _log_stream_end(
        self, stream: ConnectStream, reader: asyncio.Task[None], writer: asyncio.Task[None]
    ) -> None:
        if stream.abort_reason:
            session_log.warning("dropping the stream to %s: %s", self.address, stream.abort_reason)
            return
        for task in (reader, writer):
            if task.done() and not task.cancelled() and task.exception() is not None:
                self._log_error(task.exception())
                return
        session_log.warning("the coordinator at %s closed the stream", self.address)

    def _log_error(self, err: BaseException | None) -> None:
        self._ended_by = err
        standby = not_leader_of(err) if err is not None else None
        if standby is not None:
            session_log.info(
                "coordinator at %s refused the stream: %s", self.address, standby.message
            )
        elif isinstance(err, grpc.aio.AioRpcError):
            self._log_rpc_error(err)
        elif isinstance(err, TimeoutError):
            session_log.warning("no Welcome from %s in time", self.address)
        else:
            session_log.warning("connection to %s failed: %s", self.address, err)

    def _log_rpc_error(self, err: grpc.aio.AioRpcError) -> None:
        code = err.code()
        if code == grpc.StatusCode.ALREADY_EXISTS:
            # Two processes configured with one worker id, or this worker's previous stream not
            # yet seen to be gone by the coordinator: retrying with the backoff covers both.
            session_log.error(
                "worker id %s is already connected from another session; the coordinator at"
                " %s refused this one (%s). Retrying with backoff; if another process uses"
                " this id, give each worker its own --id",
                self._worker_id or "?",
                self.address,
                err.details(),
            )
        elif code == grpc.StatusCode.ABORTED:
            session_log.warning(
                "the coordinator at %s replaced this session of worker %s by a newer one (%s);"
                " reconnecting",
                self.address,
                self._worker_id or "?",
                err.details(),
            )
        elif code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            session_log.error(
                "the coordinator at %s refused the worker's credentials: %s: %s",
                self.address,
                code.name,
                err.details(),
            )
        else:
            session_log.warning(
                "connection to %s failed: %s: %s", self.address, code.name, err.details()
            )


def reconnect_options(backoff: Backoff) -> list[tuple[str, Any]]:
    """Channel arguments that cap gRPC's own subchannel reconnect backoff at ``backoff``'s.

    ``grpc.min_reconnect_backoff_ms`` is left alone: gRPC uses it as the minimum connect
    timeout (20 s), and lowering it would cut TLS handshakes on a slow network short.
    """
    return [
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.initial_reconnect_backoff_ms", max(1, round(backoff.initial * 1000))),
        ("grpc.max_reconnect_backoff_ms", max(1, round(backoff.maximum * 1000))),
    ]


async def _read_loop(call: Any, receive: Callable[[pb.ConnectResponse], None]) -> None:
    while True:
        msg = await call.read()
        if msg is grpc.aio.EOF:
            return
        receive(msg)


async def _close_gracefully(
    stream: ConnectStream,
    writer: asyncio.Task[None],
    reader: asyncio.Task[None],
    wait_seconds: float,
) -> None:
    stream.queue.put_nowait(None)
    # Wait for the coordinator to end the stream after Goodbye; past the timeout the
    # caller cancels the call.
    await asyncio.wait({writer, reader}, timeout=wait_seconds)
