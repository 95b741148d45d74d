"""The worker's side of ``WorkerService.Connect`` (foundation layer: plait.worker).

One :class:`WorkerSession` per worker process speaks the protocol of
``proto/plait/v1/worker_service.proto`` over a ``grpc.aio`` bidirectional stream and hands the
leases it is granted to :class:`~plait.worker.executor.Executor` objects. Both the Python SDK's
:class:`plait.Worker` and the worker daemon (``plait.workerd``) use it.

The rules it keeps (see docs/workerd.md):

* **Self-fencing.** Each heartbeat's local monotonic send time is remembered; the ``Ack`` that
  echoes heartbeat *N* moves the fence deadline to ``send_time(N) + lease_ttl`` (a ``Welcome``
  does the same for the ``Hello`` it answers). At ``deadline - kill_grace - margin`` every running
  attempt is killed, connected or not, and reports ``CANCELLED``; fencing decides its fate.
* **Credits are deltas.** The coordinator starts from ``slots - sum(slots of Hello.running)``;
  every slot freed after that ``Hello`` goes back in a ``Credit`` (coalesced per loop turn).
* **Ack means durable.** A result is kept until a ``ResultAck`` for its (lease, token) and is
  re-sent after every reconnect.
* **Batching.** Starts and results that happen in one loop turn leave in one message each.
* **Several coordinators.** ``SessionConfig.coordinator`` may list a leader and its standbys,
  comma-separated; a standby's ``NOT_LEADER`` refusal is followed to the leader it names at once,
  anything else rotates addresses with the backoff (:mod:`plait.worker.connect`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import grpc

from plait import __version__
from plait.clock import Clock, SystemClock
from plait.durations import from_proto as duration_from_proto
from plait.endpoints import not_leader_of, parse_targets
from plait.hlc import ClockOffsetError, HybridLogicalClock
from plait.v1 import worker_service_pb2 as pb
from plait.v1 import worker_service_pb2_grpc as pb_grpc
from plait.worker.backoff import Backoff
from plait.worker.connect import CoordinatorLinks
from plait.worker.executor import (
    DEFAULT_ERROR_CODE,
    SUCCEEDED,
    AttemptHandle,
    AttemptResult,
    Code,
    Executor,
)

log = logging.getLogger(__name__)

WORKER_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_BATCH_BYTES = 3 << 20  # ActionFinished chunks stay well under the 4 MiB message limit
_OFFSET_LOG_EVERY = 10.0  # seconds between warnings about a coordinator clock too far ahead
DEFAULT_AGENT = f"plait-python/{__version__}"


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """How a worker introduces itself and (re)connects. Timing comes from the coordinator."""

    worker_id: str
    coordinator: str = "127.0.0.1:7450"
    """``HOST:PORT`` of the coordinator, or of a leader and its standbys, comma-separated."""
    slots: int = 0
    """Total slots; 0 means ``os.cpu_count()``."""
    labels: Mapping[str, str] = field(default_factory=dict)
    agent: str = DEFAULT_AGENT
    hostname: str = field(default_factory=socket.gethostname)
    reconnect_initial: timedelta = timedelta(milliseconds=200)
    reconnect_max: timedelta = timedelta(seconds=10)
    welcome_timeout: timedelta = timedelta(seconds=10)
    """How long to wait for the ``Welcome`` after sending ``Hello``."""
    close_timeout: timedelta = timedelta(seconds=5)
    """How long to wait for the coordinator to end the stream after ``Goodbye``."""
    fence_margin: timedelta | None = None
    """Extra head start for self-fencing; ``None`` means one heartbeat interval."""
    max_message_bytes: int = 4 << 20

    def __post_init__(self) -> None:
        if not WORKER_ID_RE.fullmatch(self.worker_id):
            raise ValueError(
                f"worker_id {self.worker_id!r} must be 1 to 128 characters of [A-Za-z0-9_.-]"
            )
        if self.slots < 0:
            raise ValueError(f"slots must be >= 1 (or 0 for the CPU count), got {self.slots}")
        parse_targets(self.coordinator, "coordinator")  # TargetError is a ValueError

    @property
    def effective_slots(self) -> int:
        """``slots``, or the CPU count when it is 0."""
        return self.slots or os.cpu_count() or 1


@dataclass(slots=True)
class SessionStats:
    """Counters a caller may export; the session only increments them."""

    connects: int = 0
    heartbeats_sent: int = 0
    results_sent: int = 0
    results_acked: int = 0
    results_refused: int = 0
    over_grants: int = 0
    self_fenced: int = 0
    clock_offset_errors: int = 0


class ProtocolError(Exception):
    """The coordinator broke the protocol (the stream is dropped and re-opened)."""


class _Attempt:
    """One running attempt; also the :class:`AttemptContext` its executor reports through."""

    __slots__ = (
        "_session",
        "cancelling",
        "done",
        "handle",
        "lease_id",
        "slots",
        "started",
        "token",
    )

    def __init__(
        self, session: WorkerSession, lease_id: str, token: int, slots: int, started: float
    ) -> None:
        self._session = session
        self.lease_id = lease_id
        self.token = token
        self.slots = slots
        self.started = started
        self.handle: AttemptHandle | None = None
        self.done = False
        self.cancelling = False

    @property
    def kill_grace(self) -> float:
        return self._session.kill_grace

    def report(self, result: AttemptResult) -> None:
        self._session._finish(self, result)


class _Stream:
    """One Connect call: a single writer task drains the queue, so writes never interleave."""

    __slots__ = ("abort_reason", "call", "queue")

    def __init__(self, call: Any) -> None:
        self.call = call
        self.queue: asyncio.Queue[pb.ConnectRequest | None] = asyncio.Queue()
        self.abort_reason = ""

    async def write_loop(self) -> None:
        while True:
            msg = await self.queue.get()
            if msg is None:
                await self.call.done_writing()
                return
            await self.call.write(msg)

    def abort(self, reason: str) -> None:
        if not self.abort_reason:
            self.abort_reason = reason
            self.call.cancel()


class WorkerSession:
    """A worker's connection to the coordinator: Hello, heartbeats, leases, results, drain.

    Run it with ``await session.run()``; it reconnects with full-jitter backoff on any stream
    error and returns after :meth:`drain` (or a coordinator ``Drain``) has finished, or after
    :meth:`stop`. Every method must be called on the event loop that runs :meth:`run`.
    """

    def __init__(
        self,
        config: SessionConfig,
        executors: Sequence[Executor],
        *,
        clock: Clock | None = None,
        hlc: HybridLogicalClock | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.config = config
        self.stats = SessionStats()
        self._clock = clock or SystemClock()
        self._hlc = hlc or HybridLogicalClock(self._clock)
        self._slots = config.effective_slots
        self._backoff = backoff or Backoff(config.reconnect_initial, config.reconnect_max)
        self._exec: Executor | None = None
        self._by_handler: dict[str, Executor] = {}
        for ex in executors:
            if ex.runs_exec and self._exec is None:
                self._exec = ex
            for name in ex.handlers:
                if name in self._by_handler:
                    raise ValueError(f"handler {name!r} is served by two executors")
                self._by_handler[name] = ex
        # Timing: RELIABILITY.md defaults until the coordinator's Welcome sets them.
        self.heartbeat_interval = 5.0
        self.lease_ttl = 30.0
        self.kill_grace = 10.0
        self.session_id = ""
        self._attempts: dict[str, _Attempt] = {}
        self._used = 0
        self._unacked: dict[tuple[str, int], pb.ActionResult] = {}
        self._out_started: list[pb.LeaseReport] = []
        self._out_finished: list[pb.ActionResult] = []
        self._out_credit = 0
        self._flush_scheduled = False
        self._stream: _Stream | None = None
        self._hb_seq = 0
        self._hb_sent: dict[int, float] = {}
        self._fence_deadline = -math.inf
        self._last_grant_seq = 0
        self._last_offset_log = -math.inf
        self._draining = False
        self._stopping = False
        self._done = asyncio.Event()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._links: CoordinatorLinks | None = None
        self._end_error: BaseException | None = None

    # ----------------------------------------------------------------- public view

    @property
    def address(self) -> str:
        """The coordinator address in use (or dialled next)."""
        return self._links.address if self._links is not None else self.config.coordinator

    @property
    def slots(self) -> int:
        """Total slots advertised in Hello."""
        return self._slots

    @property
    def free_slots(self) -> int:
        """Slots not held by a running attempt."""
        return self._slots - self._used

    @property
    def running(self) -> list[str]:
        """Lease ids of attempts still running."""
        return list(self._attempts)

    @property
    def unacked(self) -> list[tuple[str, int]]:
        """(lease_id, fencing_token) of results not yet acknowledged."""
        return list(self._unacked)

    @property
    def connected(self) -> bool:
        """Whether a stream is up and welcomed."""
        return self._stream is not None

    @property
    def fence_deadline(self) -> float:
        """Monotonic time by which every attempt must be dead unless a newer ack arrives."""
        return self._fence_deadline

    @property
    def draining(self) -> bool:
        """Whether the session takes no new work and leaves once its results are acked."""
        return self._draining

    # ----------------------------------------------------------------- control

    def drain(self, reason: str = "drain requested") -> None:
        """Take no new work; finish running attempts, get results acked, say Goodbye, return."""
        if self._draining:
            return
        self._draining = True
        self._out_credit = 0
        log.info(
            "draining (%s): %d attempt(s) running, %d result(s) awaiting ack",
            reason,
            len(self._attempts),
            len(self._unacked),
        )
        self._maybe_finish()

    def stop(self, reason: str = "worker stopping") -> None:
        """Kill every running attempt and return as soon as they are dead (no ack wait)."""
        if self._stopping:
            return
        self._stopping = True
        self._draining = True
        self._out_credit = 0
        if self._attempts:
            log.warning("stopping: killing %d attempt(s)", len(self._attempts))
        for att in list(self._attempts.values()):
            self._cancel(att, reason)
        self._maybe_finish()

    async def run(self) -> None:
        """Serves until drained or stopped, reconnecting after every stream failure."""
        self._loop = asyncio.get_running_loop()
        size = self.config.max_message_bytes
        options = [
            ("grpc.max_send_message_length", size),
            ("grpc.max_receive_message_length", size),
        ]
        links = self._links = CoordinatorLinks(self.config.coordinator, self._backoff, options)
        fence = asyncio.create_task(self._fence_loop(), name="plait-worker-fence")
        try:
            while not self._done.is_set():
                ended_by = await self._connect_once(links.stub())
                if self._done.is_set():
                    break
                delay = links.next_delay(ended_by)
                log.info("reconnecting to %s in %.2fs", links.address, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._done.wait(), delay)
        finally:
            fence.cancel()
            await asyncio.gather(fence, return_exceptions=True)
            if self._attempts:
                self.stop("worker exiting")
                await self._wait_idle(self.kill_grace + 2.0)
            await links.close()

    # ----------------------------------------------------------------- connection

    async def _connect_once(self, stub: pb_grpc.WorkerServiceStub) -> BaseException | None:
        """One stream from Hello to its end; logs why it ended and returns the error, if any."""
        self._end_error = None
        # grpc.aio allows a stream call without a request iterator (then call.write/read);
        # the generated stubs only type the iterator form.
        connect: Any = stub.Connect
        call = connect()
        stream = _Stream(call)
        writer = asyncio.create_task(stream.write_loop(), name="plait-worker-writer")
        tasks: list[asyncio.Task[Any]] = [writer]
        try:
            hello_sent = self._send_hello(stream)
            first = await asyncio.wait_for(call.read(), self.config.welcome_timeout.total_seconds())
            if first is grpc.aio.EOF:
                raise ProtocolError("the coordinator closed the stream before Welcome")
            self._observe(first)
            if first.WhichOneof("message") != "welcome":
                raise ProtocolError(f"expected Welcome, got {first.WhichOneof('message')}")
            self._on_welcome(first.welcome, hello_sent, stream)
            if self._links is not None:
                self._links.connected()
            reader = asyncio.create_task(self._read_loop(call), name="plait-worker-reader")
            heartbeats = asyncio.create_task(self._heartbeat_loop(stream))
            done = asyncio.create_task(self._done.wait())
            tasks += [reader, heartbeats, done]
            await asyncio.wait({reader, writer, done}, return_when=asyncio.FIRST_COMPLETED)
            if self._done.is_set() and not writer.done():
                await self._close_gracefully(stream, writer, reader)
            elif not self._done.is_set():
                self._log_stream_end(stream, reader, writer)
        except (grpc.aio.AioRpcError, ProtocolError, TimeoutError, OSError) as err:
            self._log_error(err)
        finally:
            self._stream = None
            self._hb_sent.clear()
            for task in tasks:
                task.cancel()
            call.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return self._end_error

    async def _close_gracefully(
        self, stream: _Stream, writer: asyncio.Task[None], reader: asyncio.Task[None]
    ) -> None:
        timeout = self.config.close_timeout.total_seconds()
        if self._stopping:
            timeout = min(timeout, 1.0)
        stream.queue.put_nowait(None)
        # Wait for the coordinator to end the stream after Goodbye; past the timeout the
        # caller cancels the call.
        await asyncio.wait({writer, reader}, timeout=timeout)

    def _log_stream_end(
        self, stream: _Stream, reader: asyncio.Task[None], writer: asyncio.Task[None]
    ) -> None:
        if stream.abort_reason:
            log.warning("dropping the stream to %s: %s", self.address, stream.abort_reason)
            return
        for task in (reader, writer):
            if task.done() and not task.cancelled() and task.exception() is not None:
                self._log_error(task.exception())
                return
        log.warning("the coordinator at %s closed the stream", self.address)

    def _log_error(self, err: BaseException | None) -> None:
        self._end_error = err
        standby = not_leader_of(err) if err is not None else None
        if standby is not None:
            log.info("coordinator at %s refused the stream: %s", self.address, standby.message)
        elif isinstance(err, grpc.aio.AioRpcError):
            log.warning(
                "connection to %s failed: %s: %s",
                self.address,
                err.code().name,
                err.details(),
            )
        elif isinstance(err, TimeoutError):
            log.warning("no Welcome from %s in time", self.address)
        else:
            log.warning("connection to %s failed: %s", self.address, err)

    async def _read_loop(self, call: Any) -> None:
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                return
            self._dispatch(msg)

    async def _heartbeat_loop(self, stream: _Stream) -> None:
        while True:
            self._send_heartbeat(stream)
            await asyncio.sleep(self.heartbeat_interval)

    def _send(self, stream: _Stream, msg: pb.ConnectRequest) -> None:
        self._hlc.stamp(msg.hlc)
        stream.queue.put_nowait(msg)

    def _send_hello(self, stream: _Stream) -> float:
        cfg = self.config
        hello = pb.Hello(
            worker_id=cfg.worker_id,
            labels=dict(cfg.labels),
            slots=self._slots,
            handlers=sorted(self._by_handler),
            exec_enabled=self._exec is not None,
            running=[
                pb.LeaseReport(lease_id=a.lease_id, fencing_token=a.token)
                for a in self._attempts.values()
            ],
            agent=cfg.agent,
            hostname=cfg.hostname,
        )
        # The coordinator's ledger restarts from this Hello: slots - running.
        self._out_credit = 0
        self._out_started.clear()
        self._out_finished.clear()
        self._last_grant_seq = 0
        self._hb_sent.clear()
        sent = self._clock.monotonic()
        self._send(stream, pb.ConnectRequest(hello=hello))
        return sent

    def _on_welcome(self, welcome: pb.Welcome, hello_sent: float, stream: _Stream) -> None:
        if welcome.HasField("heartbeat_interval"):
            self.heartbeat_interval = duration_from_proto(
                welcome.heartbeat_interval
            ).total_seconds()
        if welcome.HasField("lease_ttl"):
            self.lease_ttl = duration_from_proto(welcome.lease_ttl).total_seconds()
        if welcome.HasField("kill_grace"):
            self.kill_grace = duration_from_proto(welcome.kill_grace).total_seconds()
        self.session_id = welcome.session_id
        # Welcome answers Hello: every lease it adopts is renewed no earlier than Hello was sent.
        self._fence_deadline = max(self._fence_deadline, hello_sent + self.lease_ttl)
        killed = 0
        for report in welcome.kill:
            att = self._attempts.get(report.lease_id)
            if att is not None:
                killed += 1
                self._cancel(
                    att, "the coordinator does not adopt this lease (superseded or unknown)"
                )
        self._stream = stream
        self._backoff.reset()
        self.stats.connects += 1
        self._wake.set()
        log.info(
            "connected to %s as %s (session %s): heartbeat %.3gs, lease TTL %.3gs, kill grace"
            " %.3gs; %d lease(s) adopted, %d killed, %d result(s) to re-send",
            self.address,
            self.config.worker_id,
            self.session_id,
            self.heartbeat_interval,
            self.lease_ttl,
            self.kill_grace,
            len(welcome.adopted),
            killed,
            len(self._unacked),
        )
        if self._unacked:
            self._send_results(stream, list(self._unacked.values()))
        self._out_finished.clear()
        self._flush()
        self._maybe_finish()

    def _send_heartbeat(self, stream: _Stream) -> None:
        self._hb_seq += 1
        seq = self._hb_seq
        leases = [
            pb.LeaseReport(lease_id=a.lease_id, fencing_token=a.token)
            for a in self._attempts.values()
        ]
        leases += [pb.LeaseReport(lease_id=lid, fencing_token=tok) for lid, tok in self._unacked]
        hb = pb.Heartbeat(
            leases=leases,
            last_grant_sequence=self._last_grant_seq,
            free_slots=max(0, self._slots - self._used),
            sequence=seq,
        )
        # Taken before the send, so the fence deadline derived from it is never late.
        self._hb_sent[seq] = self._clock.monotonic()
        self.stats.heartbeats_sent += 1
        self._send(stream, pb.ConnectRequest(heartbeat=hb))

    def _send_results(
        self, stream: _Stream, results: Sequence[pb.ActionResult], credit: int = 0
    ) -> None:
        """Sends results in ActionFinished chunks; ``credit`` rides with the first chunk."""
        batch: list[pb.ActionResult] = []
        size = 0
        for r in results:
            approx = (
                len(r.outputs_json)
                + len(r.stdout_tail)
                + len(r.stderr_tail)
                + len(r.error.message)
                + 128
            )
            if batch and size + approx > _BATCH_BYTES:
                finished = pb.ActionFinished(results=batch, credit=credit)
                self._send(stream, pb.ConnectRequest(action_finished=finished))
                batch, size, credit = [], 0, 0
            batch.append(r)
            size += approx
        if batch:
            finished = pb.ActionFinished(results=batch, credit=credit)
            self._send(stream, pb.ConnectRequest(action_finished=finished))
        self.stats.results_sent += len(results)

    # ----------------------------------------------------------------- incoming

    def _observe(self, msg: pb.ConnectResponse) -> None:
        try:
            self._hlc.observe_proto(msg.hlc)
        except ClockOffsetError as err:
            self.stats.clock_offset_errors += 1
            now = self._clock.monotonic()
            if now - self._last_offset_log >= _OFFSET_LOG_EVERY:
                self._last_offset_log = now
                log.warning(
                    "coordinator HLC: %s (%d such message(s) so far)",
                    err,
                    self.stats.clock_offset_errors,
                )

    def _dispatch(self, msg: pb.ConnectResponse) -> None:
        self._observe(msg)
        kind = msg.WhichOneof("message")
        if kind == "ack":
            self._on_ack(msg.ack)
        elif kind == "lease_grant":
            self._on_grant(msg.lease_grant)
        elif kind == "cancel_lease":
            for c in msg.cancel_lease.leases:
                att = self._attempts.get(c.lease_id)
                if att is not None:
                    reason = pb.CancelReason.Name(c.reason)
                    self._cancel(
                        att, f"cancelled by the coordinator ({reason}) {c.message}".strip()
                    )
        elif kind == "drain":
            self.drain(f"coordinator: {msg.drain.reason or 'drain'}")
        elif kind == "welcome":
            log.warning("ignoring a second Welcome on session %s", self.session_id)
        else:
            log.warning("ignoring an unknown coordinator message (%s)", kind)

    def _on_ack(self, ack: pb.Ack) -> None:
        seq = ack.heartbeat_sequence
        if seq:
            sent = self._hb_sent.get(seq)
            if sent is not None:
                deadline = sent + self.lease_ttl
                self._fence_deadline = max(self._fence_deadline, deadline)
                for s in [s for s in self._hb_sent if s <= seq]:
                    del self._hb_sent[s]
        for r in ack.results:
            key = (r.lease_id, r.fencing_token)
            if key not in self._unacked:
                continue
            code = r.status.code
            if code == Code.OK:
                self.stats.results_acked += 1
            elif code == Code.FAILED_PRECONDITION:
                self.stats.results_refused += 1
                log.warning(
                    "result of lease %s (token %d) refused: %s",
                    r.lease_id,
                    r.fencing_token,
                    r.status.message,
                )
            else:
                # Not committed and not refused: keep it for the next reconnect.
                log.warning(
                    "result of lease %s (token %d) not committed (code %d: %s); keeping it",
                    r.lease_id,
                    r.fencing_token,
                    code,
                    r.status.message,
                )
                continue
            del self._unacked[key]
        if self._draining:
            self._maybe_finish()

    def _on_grant(self, grant: pb.LeaseGrant) -> None:
        for lease in grant.leases:
            self._start(lease)
        self._last_grant_seq = max(self._last_grant_seq, grant.sequence)

    # ----------------------------------------------------------------- attempts

    def _start(self, lease: pb.Lease) -> None:
        lid, token = lease.lease_id, lease.fencing_token
        if lid in self._attempts or (lid, token) in self._unacked:
            log.warning("ignoring a second grant of lease %s (token %d)", lid, token)
            return
        need = lease.action.slots or 1
        att = _Attempt(self, lid, token, need, self._clock.monotonic())
        if self._used + need > self._slots:
            self.stats.over_grants += 1
            log.error(
                "over-grant (protocol error): lease %s needs %d slot(s), %d of %d free;"
                " reporting it FAILED",
                lid,
                need,
                self._slots - self._used,
                self._slots,
            )
            # It never held a slot, so no credit comes back for it.
            att.slots = 0
            self._finish(
                att,
                AttemptResult.failed(
                    f"worker {self.config.worker_id} was granted a lease needing {need} slot(s)"
                    f" with {self._slots - self._used} of {self._slots} free (over-grant)",
                    code=Code.RESOURCE_EXHAUSTED,
                ),
            )
            return
        self._attempts[lid] = att
        self._used += need
        executor = self._route(lease)
        if isinstance(executor, str):
            self._finish(att, AttemptResult.failed(executor, code=Code.UNIMPLEMENTED))
            return
        self._out_started.append(pb.LeaseReport(lease_id=lid, fencing_token=token))
        try:
            att.handle = executor.start(lease, att)
        except Exception as err:
            log.exception("could not start lease %s", lid)
            self._finish(
                att,
                AttemptResult.failed(
                    f"worker could not start the attempt: {err}", code=Code.INTERNAL
                ),
            )
            return
        self._schedule_flush()

    def _route(self, lease: pb.Lease) -> Executor | str:
        kind = lease.action.WhichOneof("kind")
        if kind == "exec":
            return self._exec or f"worker {self.config.worker_id} does not run exec actions"
        if kind == "handler":
            name = lease.action.handler
            return self._by_handler.get(name) or (
                f"worker {self.config.worker_id} does not serve handler {name!r}"
            )
        return f"action {lease.action.id!r} has neither exec nor handler"

    def _cancel(self, att: _Attempt, reason: str) -> None:
        if att.cancelling or att.done:
            return
        att.cancelling = True
        if att.handle is not None:
            att.handle.cancel(reason)

    def _finish(self, att: _Attempt, result: AttemptResult) -> None:
        if att.done:
            return
        att.done = True
        self._attempts.pop(att.lease_id, None)
        if att.slots:
            self._used -= att.slots
            if not self._draining:
                self._out_credit += att.slots
        outcome = result.outcome
        r = pb.ActionResult(
            lease_id=att.lease_id,
            fencing_token=att.token,
            outcome=outcome,
            outputs_json=result.outputs_json or ("{}" if outcome == SUCCEEDED else ""),
            exit_code=result.exit_code,
            stdout_tail=result.stdout_tail,
            stderr_tail=result.stderr_tail,
        )
        if outcome != SUCCEEDED or result.error:
            r.error.code = result.error_code or DEFAULT_ERROR_CODE.get(outcome, Code.UNKNOWN)
            r.error.message = result.error
        r.duration.FromNanoseconds(int((self._clock.monotonic() - att.started) * 1e9))
        self._hlc.stamp(r.finished_hlc)
        self._unacked[(att.lease_id, att.token)] = r
        self._out_finished.append(r)
        self._schedule_flush()
        if not self._attempts:
            self._idle.set()
            if self._draining:
                self._maybe_finish()

    def _schedule_flush(self) -> None:
        # Everything that happens in this loop turn leaves together on the next one.
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop = self._loop or asyncio.get_running_loop()
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        stream = self._stream
        if stream is None:
            # Covered after the next Welcome: Hello.running and the re-send of unacked results.
            self._out_started.clear()
            self._out_finished.clear()
            return
        if self._out_started:
            # An attempt that already finished needs no start report: its result implies it
            # (and the coordinator journals one event fewer).
            if self._out_finished:
                done = {r.lease_id for r in self._out_finished}
                self._out_started = [s for s in self._out_started if s.lease_id not in done]
            if self._out_started:
                msg = pb.ConnectRequest(action_started=pb.ActionStarted(leases=self._out_started))
                self._send(stream, msg)
            self._out_started = []
        if self._out_finished:
            # The credit rides with the results, so the coordinator can lease the next actions
            # in the same commit (ActionFinished.credit).
            credit = 0 if self._draining else self._out_credit
            self._send_results(stream, self._out_finished, credit)
            self._out_finished = []
            self._out_credit = 0
        if self._out_credit > 0 and not self._draining:
            self._send(stream, pb.ConnectRequest(credit=pb.Credit(slots=self._out_credit)))
        self._out_credit = 0

    def _maybe_finish(self) -> None:
        if self._done.is_set() or not self._draining or self._attempts:
            return
        if self._unacked and not self._stopping:
            return
        self._flush()
        if self._stream is not None:
            reason = "stopping" if self._stopping else "drained"
            self._send(self._stream, pb.ConnectRequest(goodbye=pb.Goodbye(reason=reason)))
        log.info("%s: leaving", "stopped" if self._stopping else "drained")
        self._done.set()

    async def _wait_idle(self, limit: float) -> None:
        self._idle.clear()
        if self._attempts:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), limit)

    # ----------------------------------------------------------------- self-fencing

    def check_fence(self) -> float:
        """Kills attempts whose leases may be lost soon; returns seconds until the next check.

        Runs from the session's own task; exposed so tests can drive it with a manual clock.
        """
        now = self._clock.monotonic()
        margin = (
            self.config.fence_margin.total_seconds()
            if self.config.fence_margin is not None
            else self.heartbeat_interval
        )
        kill_at = self._fence_deadline - self.kill_grace - margin
        if now >= kill_at:
            victims = [a for a in self._attempts.values() if not a.cancelling]
            if victims:
                self.stats.self_fenced += len(victims)
                log.warning(
                    "self-fencing: no heartbeat acknowledged in time (leases may be lost in"
                    " %.2fs); killing %d attempt(s)",
                    max(0.0, self._fence_deadline - now),
                    len(victims),
                )
                for att in victims:
                    self._cancel(att, "self-fenced: the lease could not be renewed in time")
        stream = self._stream
        if stream is not None and now >= self._fence_deadline:
            stream.abort(f"no heartbeat acknowledged for a lease TTL ({self.lease_ttl:.3g}s)")
        if kill_at > now:
            return min(kill_at - now, self.heartbeat_interval)
        return self.heartbeat_interval

    async def _fence_loop(self) -> None:
        while True:
            self._wake.clear()
            delay = self.check_fence()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(delay, 0.005))
