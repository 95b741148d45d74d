"""The worker's side of ``WorkerService.Connect`` (foundation layer: plait.worker).

One :class:`WorkerSession` per worker process speaks the protocol of
``proto/plait/v1/worker_service.proto`` over a ``grpc.aio`` bidirectional stream and hands the
leases it is granted to :class:`~plait.worker.executor.Executor` objects. Both the Python SDK's
:class:`plait.Worker` and the worker daemon (``plait.workerd``) use it.

The rules it keeps (see docs/workerd.md):

* **Self-fencing.** Each heartbeat's local monotonic send time is remembered; the ``Ack`` that
  echoes heartbeat *N* moves the fence deadline to ``send_time(N) + lease_ttl`` (a ``Welcome``
  does the same for the ``Hello`` it answers). At ``deadline - kill_grace - margin`` every running
  attempt is killed, connected or not, and reports ``CANCELLED``; fencing decides its fate
  (:mod:`plait.worker.fence`). Each move of the deadline also goes to the executors that take
  it (``FenceAware``: workerd's keeper kills by it even while this process is frozen).
* **Credits are deltas.** The coordinator starts from ``slots - sum(slots of Hello.running)``;
  every slot freed after that ``Hello`` goes back in a ``Credit`` (coalesced per loop turn).
* **Ack means durable.** A result is kept until a ``ResultAck`` for its (lease, token) and is
  re-sent after every reconnect (:mod:`plait.worker.attempts`).
* **Batching.** Starts and results that happen in one loop turn leave in one message each;
  progress reports (``ActionProgress``, latest details per lease) at most once per
  ``SessionConfig.progress_interval``.
* **Live logs.** What attempts write goes out in ``ActionLogs``, bounded, at most once per
  ``plait.live_logs.LOG_INTERVAL``, and a followed stream's rest before its result
  (:mod:`plait.live_logs`).
* **Adaptive concurrency.** With ``SessionConfig.adaptive`` set, a :class:`LoadProbe` is read
  every interval and freed slots are withheld while the host is overloaded
  (:mod:`plait.worker.adaptive`); the coordinator only ever sees smaller credits.
* **Identity continuity.** The last ``Welcome.resume_token`` goes back in ``Hello.resume_token``
  on every reconnect, so the coordinator lets the new stream replace this worker's previous one
  while that still looks live. It is a secret and never logged.
* **Refused reports.** A lease named in ``Ack.refused`` (its start or progress was refused: this
  session does not hold it) is killed like a cancelled one, if it runs here.
* **Several coordinators.** ``SessionConfig.coordinator`` may list a leader and its standbys,
  comma-separated; a standby's ``NOT_LEADER`` refusal is followed to the leader it names at once,
  anything else rotates addresses with the backoff (:mod:`plait.worker.connect`).

This module is the session core: Hello/Welcome, heartbeats, dispatch of coordinator messages,
batching, self-fencing and drain. Attempts and their results live in
:mod:`plait.worker.attempts`, the fence deadline in :mod:`plait.worker.fence`, the writer, the
per-turn batches and the progress throttle in :mod:`plait.worker.outgoing`, adaptive concurrency
in :mod:`plait.worker.adaptive`, the stream lifecycle and reconnects in
:mod:`plait.worker.connect` (``ProtocolError`` is re-exported from there), and the config and
counters in :mod:`plait.worker.session_config` (re-exported here).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Sequence

from plait.clock import Clock, SystemClock
from plait.durations import from_proto as duration_from_proto
from plait.hlc import HybridLogicalClock
from plait.live_logs import LOG_INTERVAL, LiveOutput, logs_messages
from plait.v1 import worker_service_pb2 as pb
from plait.worker.adaptive import AdaptiveSlots, Adjustment, LoadProbe, SystemLoadProbe
from plait.worker.attempts import AttemptBook, AttemptObserver
from plait.worker.backoff import Backoff
from plait.worker.connect import CoordinatorLinks, ProtocolError, StreamHandlers
from plait.worker.executor import Executor
from plait.worker.fence import SelfFence
from plait.worker.outgoing import (
    ConnectStream,
    Outbox,
    ProgressThrottle,
    progress_messages,
    result_messages,
)
from plait.worker.session_config import (
    DEFAULT_AGENT,
    WORKER_ID_RE,
    SessionConfig,
    SessionStats,
)
from plait.worker.spans import ExecuteTracing
from plait.worker.stamps import CoordinatorStamps

__all__ = [
    "DEFAULT_AGENT",
    "WORKER_ID_RE",
    "ProtocolError",
    "SessionConfig",
    "SessionStats",
    "WorkerSession",
]

log = logging.getLogger(__name__)

# How long reports may wait for company while queued leases keep every slot busy (seconds).
RESULT_BATCH = 0.002


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
        load_probe: LoadProbe | None = None,
        tracing: ExecuteTracing | None = None,
        observer: AttemptObserver | None = None,
    ) -> None:
        """``tracing`` opens the attempts' execute spans (default: none exported);
        ``observer`` hears of every attempt that ends (workerd's metrics)."""
        self.config = config
        self.stats = SessionStats()
        self._clock = clock or SystemClock()
        self._hlc = hlc or HybridLogicalClock(self._clock)
        self._stamps = CoordinatorStamps(self._hlc, self._clock, self.stats, config.worker_id)
        self._backoff = backoff or Backoff(config.reconnect_initial, config.reconnect_max)
        self._outbox = Outbox()
        self._book = AttemptBook(
            config.worker_id,
            config.effective_slots,
            executors,
            clock=self._clock,
            hlc=self._hlc,
            stats=self.stats,
            kill_grace=lambda: self.kill_grace,
            on_started=self._outbox.started,
            on_finished=self._on_finished,
            flush_soon=self._schedule_flush,
            on_progress=self._on_progress,
            on_output=self._on_output,
            tracing=tracing,
            observer=observer,
        )
        probe: LoadProbe | None = None
        if config.adaptive is not None:
            probe = load_probe or SystemLoadProbe(cpus=config.resources.get("cpu"))
        self._adaptive = AdaptiveSlots(self._book.slots, config.adaptive, self.stats, probe)
        self._progress = ProgressThrottle(
            self._clock, config.progress_interval.total_seconds(), self._schedule_flush
        )
        # Live logs (plait.live_logs): running attempts' output, sent at most once per interval.
        self._output = LiveOutput()
        self._output_throttle = ProgressThrottle(self._clock, LOG_INTERVAL, self._schedule_flush)
        # Timing: RELIABILITY.md defaults until the coordinator's Welcome sets them.
        self.heartbeat_interval = 5.0
        self.lease_ttl = 30.0
        self.kill_grace = 10.0
        self.session_id = ""
        # Welcome.resume_token of the last stream, sent back in the next Hello. A secret.
        self._resume_token = ""
        self._flush_scheduled = False
        self._flush_timer: asyncio.TimerHandle | None = None
        self._stream: ConnectStream | None = None
        self._hb_seq = 0
        self._fence = SelfFence()
        self._fence_pushed = (-math.inf, 0.0)  # (deadline, margin) the executors last heard
        self._last_grant_seq = 0
        self._last_ack_seq = 0  # highest Ack.heartbeat_sequence heard on this stream
        self._draining = False
        self._stopping = False
        self._done = asyncio.Event()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._links: CoordinatorLinks | None = None

    # ----------------------------------------------------------------- public view

    @property
    def address(self) -> str:
        """The coordinator address in use (or dialled next)."""
        return self._links.address if self._links is not None else self.config.coordinator

    @property
    def slots(self) -> int:
        """Total slots advertised in Hello."""
        return self._book.slots

    @property
    def free_slots(self) -> int:
        """Slots not held by a running attempt."""
        return self._book.slots - self._book.used

    @property
    def running(self) -> list[str]:
        """Lease ids of attempts still running."""
        return list(self._book.attempts)

    @property
    def unacked(self) -> list[tuple[str, int]]:
        """(lease_id, fencing_token) of results not yet acknowledged."""
        return list(self._book.unacked)

    @property
    def connected(self) -> bool:
        """Whether a stream is up and welcomed."""
        return self._stream is not None

    @property
    def fence_deadline(self) -> float:
        """Monotonic time by which every attempt must be dead unless a newer ack arrives."""
        return self._fence.deadline

    @property
    def offered_slots(self) -> int:
        """The offered limit: ``slots`` unless adaptive concurrency has lowered it."""
        return self._adaptive.credit.limit

    @property
    def withheld_slots(self) -> int:
        """Freed slots not credited back since the last Hello (the limit is below the offer)."""
        return self._adaptive.credit.withheld

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
        self._outbox.forget_credit()
        log.info(
            "draining (%s): %d attempt(s) running, %d result(s) awaiting ack",
            reason,
            len(self._book.attempts),
            len(self._book.unacked),
        )
        self._maybe_finish()

    def stop(self, reason: str = "worker stopping") -> None:
        """Kill every running attempt and return as soon as they are dead (no ack wait)."""
        if self._stopping:
            return
        self._stopping = True
        self._draining = True
        self._outbox.forget_credit()
        if self._book.attempts:
            log.warning("stopping: killing %d attempt(s)", len(self._book.attempts))
        self._book.cancel_all(reason)
        self._maybe_finish()

    async def run(self) -> None:
        """Serves until drained or stopped, reconnecting after every stream failure."""
        self._loop = asyncio.get_running_loop()
        size = self.config.max_message_bytes
        options = [
            ("grpc.max_send_message_length", size),
            ("grpc.max_receive_message_length", size),
        ]
        links = self._links = CoordinatorLinks(
            self.config.coordinator,
            self._backoff,
            options,
            tls=self.config.tls,
            token=self.config.token,
            worker_id=self.config.worker_id,
        )
        handlers = StreamHandlers(
            hello=self._send_hello,
            observe=self._observe,
            welcome=self._on_welcome,
            receive=self._dispatch,
            heartbeats=self._heartbeat_loop,
            close_timeout=self._close_timeout,
            closed=self._stream_closed,
        )
        fence = asyncio.create_task(self._fence_loop(), name="plait-worker-fence")
        background = [fence]
        if self._adaptive.probe is not None:
            background.append(
                asyncio.create_task(self._adaptive.run(self.adapt), name="plait-worker-adaptive")
            )
        try:
            welcome_timeout = self.config.welcome_timeout.total_seconds()
            await links.serve(handlers, self._done, welcome_timeout=welcome_timeout)
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            self._progress.cancel()
            self._output_throttle.cancel()
            if self._book.attempts:
                self.stop("worker exiting")
                await self._wait_idle(self.kill_grace + 2.0)
            await links.close()

    # ----------------------------------------------------------------- stream (connect.py runs it)

    def _close_timeout(self) -> float:
        timeout = self.config.close_timeout.total_seconds()
        return min(timeout, 1.0) if self._stopping else timeout

    def _stream_closed(self) -> None:
        self._stream = None
        self._fence.forget_heartbeats()

    async def _heartbeat_loop(self, stream: ConnectStream) -> None:
        while True:
            self._send_heartbeat(stream)
            await asyncio.sleep(self.heartbeat_interval)

    def _send(self, stream: ConnectStream, msg: pb.ConnectRequest) -> None:
        self._hlc.stamp(msg.hlc)
        stream.queue.put_nowait(msg)

    def _send_hello(self, stream: ConnectStream) -> float:
        cfg = self.config
        hello = pb.Hello(
            worker_id=cfg.worker_id,
            labels=dict(cfg.labels),
            slots=self._book.slots,
            handlers=self._book.handlers,
            exec_enabled=self._book.runs_exec,
            running=self._book.held_reports(),
            agent=cfg.agent,
            hostname=cfg.hostname,
            resources=dict(cfg.resources),
            resume_token=self._resume_token,
            prefetch=cfg.prefetch,
            accepts_batch=True,
        )
        # The coordinator's ledger restarts from this Hello: slots - running.
        self._outbox.reset()
        self._adaptive.reset()
        self._last_grant_seq = 0
        self._last_ack_seq = 0
        self._fence.forget_heartbeats()
        sent = self._clock.monotonic()
        self._send(stream, pb.ConnectRequest(hello=hello))
        return sent

    def _on_welcome(self, welcome: pb.Welcome, hello_sent: float, stream: ConnectStream) -> None:
        if welcome.HasField("heartbeat_interval"):
            self.heartbeat_interval = duration_from_proto(
                welcome.heartbeat_interval
            ).total_seconds()
        if welcome.HasField("lease_ttl"):
            self.lease_ttl = duration_from_proto(welcome.lease_ttl).total_seconds()
        if welcome.HasField("kill_grace"):
            self.kill_grace = duration_from_proto(welcome.kill_grace).total_seconds()
        if welcome.HasField("max_clock_offset"):
            offset = duration_from_proto(welcome.max_clock_offset).total_seconds()
            self._hlc.max_offset_ms = max(1, round(offset * 1000))
        self.session_id = welcome.session_id
        self._resume_token = welcome.resume_token
        self._book.prefetch = welcome.prefetch
        # Welcome answers Hello: every lease it adopts is renewed no earlier than Hello was sent.
        self._fence.welcomed(hello_sent, self.lease_ttl)
        self._push_fence()
        not_adopted = "the coordinator does not adopt this lease (superseded or unknown)"
        killed = sum(self._book.cancel(r.lease_id, not_adopted, "lease_lost") for r in welcome.kill)
        self._book.drop_results(welcome.kill)  # never re-sent: they could not commit
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
            len(self._book.unacked),
        )
        if self._book.unacked:
            self._send_results(stream, list(self._book.unacked.values()))
        self._outbox.forget_results()
        self._flush()
        self._maybe_finish()

    def _send_heartbeat(self, stream: ConnectStream) -> None:
        self._hb_seq += 1
        seq = self._hb_seq
        hb = pb.Heartbeat(
            leases=self._book.held_reports(),
            last_grant_sequence=self._last_grant_seq,
            free_slots=max(0, self.free_slots),
            sequence=seq,
            last_ack_sequence=self._last_ack_seq,
        )
        # Taken before the send, so the fence deadline derived from it is never late.
        self._fence.heartbeat_sent(seq, self._clock.monotonic())
        self.stats.heartbeats_sent += 1
        self._send(stream, pb.ConnectRequest(heartbeat=hb))

    def _send_results(
        self,
        stream: ConnectStream,
        results: Sequence[pb.ActionResult],
        credit: int = 0,
        started: Sequence[pb.LeaseReport] = (),
    ) -> None:
        """Sends results in ActionFinished chunks; ``credit`` and ``started`` ride with the
        first chunk."""
        for msg in result_messages(results, credit, started):
            self._send(stream, msg)
        self.stats.results_sent += len(results)

    # ----------------------------------------------------------------- incoming

    def _observe(self, msg: pb.ConnectResponse) -> None:
        self._stamps.observe(msg.hlc)

    def _dispatch(self, msg: pb.ConnectResponse) -> None:
        self._observe(msg)
        if msg.WhichOneof("message") == "batch":
            for inner in msg.batch.messages:
                self._handle(inner)
        else:
            self._handle(msg)

    def _handle(self, msg: pb.ConnectResponse) -> None:
        kind = msg.WhichOneof("message")
        if kind == "ack":
            self._on_ack(msg.ack)
        elif kind == "lease_grant":
            self._on_grant(msg.lease_grant)
        elif kind == "cancel_lease":
            for c in msg.cancel_lease.leases:
                self._book.cancelled(c)
        elif kind == "drain":
            self.drain(f"coordinator: {msg.drain.reason or 'drain'}")
        elif kind == "welcome":
            log.warning("ignoring a second Welcome on session %s", self.session_id)
        else:
            log.warning("ignoring an unknown coordinator message (%s)", kind)

    def _on_ack(self, ack: pb.Ack) -> None:
        # Echoed in the next heartbeat: the coordinator's proof that this session hears it.
        self._last_ack_seq = max(self._last_ack_seq, ack.heartbeat_sequence)
        self._fence.acked(ack.heartbeat_sequence, self.lease_ttl)
        self._push_fence()
        self._book.acked(ack.results)
        if ack.refused:
            self._book.refused(ack.refused)
        if self._draining:
            self._maybe_finish()

    def _on_grant(self, grant: pb.LeaseGrant) -> None:
        for lease in grant.leases:
            self._book.take(lease)
        self._last_grant_seq = max(self._last_grant_seq, grant.sequence)

    # ----------------------------------------------------------------- outgoing batches

    def _on_finished(self, result: pb.ActionResult, freed_slots: int) -> None:
        self._output.finish(result.lease_id)
        credit = 0 if self._draining else self._adaptive.freed(freed_slots)
        self._outbox.finished(result, credit)
        self._schedule_flush()
        if not self._book.attempts and not self._book.queue:  # (a queued lease starts next)
            self._idle.set()
            if self._draining:
                self._maybe_finish()

    def _schedule_flush(self) -> None:
        # What happens in this loop turn leaves together on the next one; while queued leases
        # keep the slots busy (prefetch), up to RESULT_BATCH later: nothing waits on it.
        # Start reports alone wait as long: an attempt that ends meanwhile needs none (its
        # result implies it), so a quick action costs one message and one commit, not two.
        loop = self._loop or asyncio.get_running_loop()
        if self._book.queue or self._outbox.only_starts:
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._flush_timer = loop.call_later(RESULT_BATCH, self._flush)
            return
        if self._flush_timer is not None:  # the queue ran dry: what waits leaves now
            self._flush_timer.cancel()
            self._flush_timer = None
            self._flush_scheduled = False
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._flush_timer = None
        stream = self._stream
        if stream is None:
            # Covered after the next Welcome: Hello.running and the re-send of unacked results.
            self._outbox.forget_reports()
            self._output.clear()
            return
        started, finished, credit = self._outbox.take(draining=self._draining)
        if started and not finished:
            self._send(stream, pb.ConnectRequest(action_started=pb.ActionStarted(leases=started)))
        if self._outbox.has_progress:
            self._flush_progress(stream)
        if self._output.final or self._output.waiting:
            # Before the results: a follower sees a stream's end before the attempt's.
            loop = self._loop or asyncio.get_running_loop()
            running = self._output.waiting and self._output_throttle.ready(loop)
            for msg in logs_messages(self._output.take(running=running)):
                self._send(stream, msg)
        if finished:
            # The credit rides with the results, so the coordinator can lease the next actions
            # in the same commit (ActionFinished.credit), and so do the starts of queued leases
            # that took the freed slots (ActionFinished.started): one message.
            self._send_results(stream, finished, credit, started)
        elif credit > 0:
            self._send(stream, pb.ConnectRequest(credit=pb.Credit(slots=credit)))

    def _on_progress(self, report: pb.LeaseProgress) -> None:
        self._outbox.progress(report)
        self._schedule_flush()

    def _on_output(self, lease_id: str, token: int, stream: int, data: bytes) -> None:
        self._output.add(lease_id, token, stream, data)
        self._schedule_flush()

    def _flush_progress(self, stream: ConnectStream) -> None:
        """Sends queued progress, at most once per ``progress_interval`` (else later)."""
        if not self._progress.ready(self._loop or asyncio.get_running_loop()):
            return
        reports = self._outbox.take_progress()
        for msg in progress_messages(reports):
            self._send(stream, msg)
        self.stats.progress_sent += len(reports)

    def _maybe_finish(self) -> None:
        if self._done.is_set() or not self._draining or self._book.attempts or self._book.queue:
            return
        if self._book.unacked and not self._stopping:
            return
        self._flush()
        if self._stream is not None:
            reason = "stopping" if self._stopping else "drained"
            self._send(self._stream, pb.ConnectRequest(goodbye=pb.Goodbye(reason=reason)))
        log.info("%s: leaving", "stopped" if self._stopping else "drained")
        self._done.set()

    async def _wait_idle(self, limit: float) -> None:
        self._idle.clear()
        if self._book.attempts:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), limit)

    # ----------------------------------------------------------------- self-fencing

    def check_fence(self) -> float:
        """Kills attempts whose leases may be lost soon; returns seconds until the next check.

        Runs from the session's own task; exposed so tests can drive it with a manual clock.
        """
        now = self._clock.monotonic()
        check = self._fence.check(
            now,
            kill_grace=self.kill_grace,
            margin=self._fence_margin(),
            heartbeat_interval=self.heartbeat_interval,
        )
        if check.kill and (killed := self._book.self_fence()):
            self.stats.self_fenced += killed
            self.stats.self_fences += 1
            log.warning(
                "self-fencing: no heartbeat acknowledged in time (leases may be lost in %.2fs);"
                " killed %d attempt(s), queued leases handed back",
                max(0.0, self._fence.deadline - now),
                killed,
            )
        stream = self._stream
        if stream is not None and check.abort:
            stream.abort(f"no heartbeat acknowledged for a lease TTL ({self.lease_ttl:.3g}s)")
        return check.next_check

    def _fence_margin(self) -> float:
        """The head start self-fencing keeps: ``fence_margin``, else one heartbeat interval."""
        if self.config.fence_margin is not None:
            return self.config.fence_margin.total_seconds()
        return self.heartbeat_interval

    def _push_fence(self) -> None:
        """Hands a moved fence deadline to the executors (workerd's keeper kills by it even
        while this process is frozen and cannot run :meth:`check_fence`)."""
        pushed = (self._fence.deadline, self._fence_margin())
        if pushed[0] > -math.inf and pushed != self._fence_pushed:
            self._fence_pushed = pushed
            self._book.fence_deadline(*pushed)

    async def _fence_loop(self) -> None:
        while True:
            self._wake.clear()
            delay = self.check_fence()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(delay, 0.005))

    # ----------------------------------------------------------------- adaptive concurrency

    def adapt(self) -> Adjustment:
        """Takes one load reading and moves the offered limit (AIMD); returns the decision.

        Runs every ``SessionConfig.adaptive.interval`` from the session's own task; exposed so
        tests can drive it with an injected :class:`LoadProbe`. Without adaptive concurrency it
        changes nothing.
        """
        adj = self._adaptive.adapt()
        if adj.release and not self._draining:
            self._outbox.credit(adj.release)
            self._schedule_flush()
        return adj
