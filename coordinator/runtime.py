"""The coordinator's event loop (edge layer): feeds the pure core, journals, then delivers.

One asyncio task owns the :class:`~plait.coordinator.core.state.SchedulerState`. Servicers
:meth:`Runtime.post` stimuli; the loop takes everything that has arrived as one batch, lets the
core decide, appends the resulting history in **one transaction** (group commit: while a commit
is in flight, new stimuli pile up and become the next, larger batch), and only after the commit
sends lease grants, acks and cancellations, answers RPCs and publishes events to watchers. So no
transition is visible outside before it is durable, and a fencing token is on disk before any
worker sees it.

Deciding and committing fail differently. Only a failed commit stops the coordinator (the state
is then ahead of the journal). An exception while the core handles a batch is a bug met by one
stimulus: nothing of the batch was committed or delivered, but the state may be half applied,
so the core is rebuilt from the journal (:mod:`~plait.coordinator.core.rebuild` carries the live
worker sessions over), the stimulus that raised ends its RPC or stream with INTERNAL, and the
rest of the batch is handled again. A core that keeps failing stops the process after all.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from google.rpc import code_pb2

from plait.clock import Clock
from plait.coordinator.config import CoordinatorConfig
from plait.coordinator.core import rebuild
from plait.coordinator.core.events import (
    Instant,
    Stimulus,
    TimePassed,
    WorkerMessageReceived,
    WorkerReinstated,
    WorkerRevoked,
    WorkerStreamClosed,
)
from plait.coordinator.core.model import Outcome, Revocation, SessionEnd
from plait.coordinator.core.outputs import OutputStore
from plait.coordinator.core.replay import replay
from plait.coordinator.core.state import CoreConfig, SchedulerState
from plait.coordinator.journal.store import JournalHead, JournalStore
from plait.coordinator.live_logs import LiveLogs
from plait.coordinator.metrics import CoordinatorMetrics, StateGauges
from plait.coordinator.observations import Observations, call_on_loop, state_gauges
from plait.coordinator.retention import Retention
from plait.coordinator.services.errors import InputRefusals, InternalErrors, Throttle
from plait.coordinator.tracing import Tracing
from plait.coordinator.watchers import Watchers
from plait.errors import NotFoundError, NotLeaderError, PlaitError, UnavailableError
from plait.hlc import HlcTimestamp
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb

log = logging.getLogger(__name__)
# What a worker's outbox carries: a message, the coordinator ending the stream with a status (or
# the servicer with a refusal), or None (the stream ended by itself).
Outbound = wpb.ConnectResponse | SessionEnd | PlaitError | None

E = pb  # EVENT_TYPE_* as module constants: enum-wrapper attribute access is slow
_CEILING_STEP_MS = 1000  # how far ahead each stored HLC ceiling reaches
# A core that fails more often than this is broken, not unlucky: the process stops.
_REBUILDS_ALLOWED = 3
_REBUILD_WINDOW = 60.0  # seconds
# How long a /metrics scrape waits for the event loop to copy the state gauges; a loop busier
# than this answers without them (the scrape still returns every counter).
_SCRAPE_WAIT = 2.0


class Runtime:
    """Owns the core, the journal and the delivery of everything the core decides."""

    def __init__(
        self,
        config: CoordinatorConfig,
        store: JournalStore,
        clock: Clock,
        metrics: CoordinatorMetrics,
        tracing: Tracing,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.metrics = metrics
        self.tracing = tracing
        self.on_fatal = on_fatal
        self.core: SchedulerState | None = None
        self._inbox: list[Stimulus] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sessions: dict[str, asyncio.Queue[Outbound]] = {}
        self.watchers = Watchers(store)
        # Running attempts' output, never journalled.
        self.live_logs = LiveLogs(kept=metrics.live_log_bytes, dropped=metrics.live_log_dropped)
        self._durable = 0
        self._durable_cond = asyncio.Condition()
        self._ids = itertools.count(1)
        self._stopping = False
        self._no_sessions = asyncio.Event()
        self.tick_interval = min(0.05, config.heartbeat_interval.total_seconds() / 5)
        self._max_offset_ms = int(config.max_clock_offset.total_seconds() * 1000)
        self._ceiling = 0
        self.retention = Retention(config.retention.total_seconds(), store, clock)
        self.leader_hint: str | None = None
        self.replayed_events = 0
        self.replay_seconds = 0.0
        self.refusals = InputRefusals(clock, metrics.input_refused)
        self.errors = InternalErrors(clock, metrics.internal_errors)
        self.observations = Observations(metrics, tracing, clock)
        self._handling: Stimulus | None = None  # the stimulus the core is handling
        self._inflight: asyncio.Task[None] | None = None  # the commit of the last batch
        self._inflight_out = Outcome()
        self._rebuilding = False
        self._rebuilds: deque[float] = deque()
        self._failure: Exception = RuntimeError("no failure")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scrape_log = Throttle(clock)
        metrics.read_state_from(self.scrape_state)

    # ---- lifecycle --------------------------------------------------------------------

    async def start(self, head: JournalHead) -> None:
        """Rebuilds the state from the journal (opened by the caller) and starts the loop."""
        core = self._new_core(head.hlc_floor)
        started = self.clock.monotonic()
        self.replayed_events = await self._load(core, written_until_ms=head.last_hlc.physical_ms)
        self.replay_seconds = self.clock.monotonic() - started
        # Sequences are never reused, even when pruning removed the newest rows.
        core.sequence = max(core.sequence, head.last_sequence)
        self._ceiling = head.hlc_ceiling_ms
        self._durable = core.sequence
        self.core = core
        self._loop = asyncio.get_running_loop()
        self.metrics.term.set(self.store.term)
        self.metrics.leader.set(1)
        self._task = asyncio.create_task(self._run(), name="plait-runtime")

    def _new_core(self, hlc_floor: HlcTimestamp) -> SchedulerState:
        return SchedulerState(
            CoreConfig(
                heartbeat_interval=self.config.heartbeat_interval,
                lease_ttl=self.config.lease_ttl,
                kill_grace=self.config.kill_grace,
                lease_loss_budget=self.config.lease_loss_budget,
                max_prefetch=self.config.max_prefetch,
                max_lease_bytes=self.config.limits.max_lease_bytes,
                max_output_bytes=self.config.limits.max_output_bytes,
                max_json_depth=self.config.limits.max_json_depth,
            ),
            max_clock_offset_ms=self._max_offset_ms,
            hlc_floor=hlc_floor,
            outputs=OutputStore(self.store, self.config.output_cache_bytes),
        )

    async def _load(self, core: SchedulerState, *, written_until_ms: int = 0) -> int:
        """Replays the journal and the revocations into ``core``; returns the events applied.

        Replay re-arms each timer from its event's age. That age is measured up to
        ``written_until_ms`` (the previous writer's last HLC reading, when this is a restart or
        a failover) rather than this host's wall clock, whenever that is earlier: a successor
        whose clock runs ahead must not fire timers early, so the time no coordinator was
        running is not counted (clocks of different hosts are not trusted to measure it).
        """
        wall = self.clock.wall_ms()
        if written_until_ms > 0:
            wall = min(wall, written_until_ms)
        at = Instant(self.clock.monotonic(), wall)
        applied = 0
        # The cyclic collector stays off for the whole journal, not only page by page
        # (core.replay): between pages it would still scan the growing state for no garbage.
        collecting = gc.isenabled()
        gc.disable()
        try:
            async for events in self.store.replay():
                applied += replay(core, events, at)
                await asyncio.sleep(0)  # a long replay must not starve the gRPC server
        finally:
            if collecting:
                gc.enable()
        core.revoked = {
            worker_id: Revocation.from_json(record)
            for worker_id, record in (await self.store.revocations()).items()
        }
        self.tracing.resume(core)  # spans from now on continue the journalled workflows' traces
        return applied

    async def stop(self) -> None:
        """Handles what has arrived, commits it, and stops the loop."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        for q in self._sessions.values():
            q.put_nowait(None)
        self.watchers.close()
        self.live_logs.close()
        self.metrics.leader.set(0)

    @property
    def state(self) -> SchedulerState:
        """The core; a standby (no core yet) answers NotLeaderError naming the leader."""
        if self.core is None:
            raise NotLeaderError(self.leader_hint)
        if self._rebuilding:
            raise UnavailableError(
                "the coordinator is rebuilding its state from the journal; retry shortly"
            )
        return self.core

    # ---- stimuli in -------------------------------------------------------------------

    def post(self, stimulus: Stimulus) -> None:
        """Queues a stimulus for the next batch."""
        if self._stopping:
            raise UnavailableError("the coordinator is shutting down")
        if self.core is None:
            raise NotLeaderError(self.leader_hint)
        self._inbox.append(stimulus)
        self._wake.set()

    async def call(self, make: Callable[[asyncio.Future[Any]], Stimulus]) -> Any:
        """Posts a stimulus carrying a reply future; returns the reply once it is durable."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.post(make(fut))
        return await fut

    def stamp(self, msg: Any) -> None:
        """Stamps a reply's ``hlc`` with the coordinator's clock now (servicers call this, on
        the event loop, instead of touching the core's clock)."""
        self.state.stamp(msg, Instant(self.clock.monotonic(), self.clock.wall_ms()))

    def merge_hlc(self, msg: Any) -> None:
        """Merges a client's HLC stamp, if it has one (one too far ahead is not merged)."""
        if msg.physical_ms:
            at = Instant(self.clock.monotonic(), self.clock.wall_ms())
            self.state.merge_remote(HlcTimestamp(msg.physical_ms, msg.logical), at)

    def next_id(self, prefix: str) -> str:
        """A cause id for a stimulus, unique within this process."""
        return f"{prefix}-{next(self._ids)}"

    async def durable(self, sequence: int) -> None:
        """Waits until every event up to ``sequence`` is committed."""
        if self._durable >= sequence:
            return
        async with self._durable_cond:
            await self._durable_cond.wait_for(lambda: self._durable >= sequence)

    # ---- revocation -----------------------------------------------------------------------

    async def revoke_worker(self, worker_id: str, reason: str, by: str) -> tuple[bool, int]:
        """Revokes a worker id: durable in the store first, then the core cuts it off.

        Returns whether it was connected and how many leases were queued again.
        """
        if self.core is None:
            raise NotLeaderError(self.leader_hint)
        record = Revocation(reason, by, self.clock.wall_ms())
        await self.store.set_revocation(worker_id, record.to_json())
        result: tuple[bool, int] = await self.call(
            lambda reply: WorkerRevoked(self.next_id("revoke"), worker_id, record, reply)
        )
        log.warning(
            "worker %s revoked by %s: %s (%d leases queued again)",
            worker_id,
            by,
            reason or "no reason given",
            result[1],
            extra={"worker_id": worker_id},
        )
        return result

    async def reinstate_worker(self, worker_id: str, by: str) -> bool:
        """Accepts a revoked worker id again (removed from the store first)."""
        if self.core is None:
            raise NotLeaderError(self.leader_hint)
        await self.store.set_revocation(worker_id, None)
        was: bool = await self.call(
            lambda reply: WorkerReinstated(self.next_id("reinstate"), worker_id, reply)
        )
        if was:
            log.warning("worker %s reinstated by %s", worker_id, by, extra={"worker_id": worker_id})
        return was

    # ---- worker sessions ----------------------------------------------------------------

    def open_session(self) -> tuple[str, asyncio.Queue[Outbound]]:
        if self.core is None:
            raise NotLeaderError(self.leader_hint)
        session_id = self.next_id("session")
        q: asyncio.Queue[Outbound] = asyncio.Queue()
        self._sessions[session_id] = q
        return session_id, q

    def close_session(self, session_id: str) -> None:
        if self._sessions.pop(session_id, None) is not None and not self._stopping:
            self.post(WorkerStreamClosed(self.next_id("closed"), session_id))
        if not self._sessions:
            self._no_sessions.set()

    async def sessions_closed(self) -> None:
        """Returns once every worker stream has ended (callers bound it with a timeout)."""
        if self._sessions:
            self._no_sessions.clear()
            await self._no_sessions.wait()

    # ---- watchers -------------------------------------------------------------------------

    def watch(
        self, workflow_id: str, after: int, follow: bool
    ) -> AsyncIterator[list[pb.HistoryEvent]]:
        """Replays the history after ``after`` from the journal, then live events, in batches."""
        if workflow_id not in self.state.workflows:
            raise NotFoundError(f"workflow {workflow_id!r} not found")
        return self.watchers.watch(workflow_id, after, follow)

    # ---- the loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        """Decide, commit, deliver, with the commit of one batch overlapping the deciding of
        the next: batch N+1 is decided while N's transaction is in flight, then N's results
        are delivered and N+1's commit starts (one transaction at a time, in order, and nothing
        of a batch leaves before its own commit)."""
        loop = asyncio.get_running_loop()
        next_tick = 0.0
        self._inflight = None
        while True:
            if not self._inbox and not self._stopping:
                timer = loop.call_later(
                    max(0.0, next_tick - self.clock.monotonic()), self._wake.set
                )
                await self._wake.wait()
                timer.cancel()
            self._wake.clear()
            try:
                if self._inflight is not None and self._inflight.done():
                    await self._delivered()
                now = self.clock.monotonic()
                if not self._inbox and now < next_tick and not self._stopping:
                    continue  # woken by the commit alone
                batch, self._inbox = self._inbox, []
                if now >= next_tick:
                    batch.append(TimePassed(self.next_id("tick")))
                    next_tick = now + self.tick_interval
                at = Instant(now, self.clock.wall_ms())
                self.state.committed = self._durable if self._inflight is not None else None
                out = self._decide(batch, at)
                await self._delivered()  # the previous batch's commit: done before the next
                if out is None:  # a stimulus raised: recover (or give up) before going on
                    await self._recover(batch, at)
                    continue
                if out.records or self._next_ceiling() is not None:
                    self._inflight = asyncio.ensure_future(self._commit(out))
                    self._inflight_out = out
                    self._inflight.add_done_callback(lambda _: self._wake.set())
                else:  # nothing to make durable (heartbeats, queries): out at once, in order
                    self._deliver_safely(out)
                self._retention(now)
                if self._stopping and not self._inbox:
                    await self._delivered()
                    return
            except Exception as e:  # logged and handed to on_fatal: the task ends quietly
                self._fail(e)
                return

    async def _delivered(self) -> None:
        """Waits for the commit in flight (if any) and delivers what its batch decided."""
        task, self._inflight = self._inflight, None
        if task is None:
            return
        await task  # a failed commit raises: the coordinator stops
        self._deliver_safely(self._inflight_out)

    def _retention(self, now: float) -> None:
        if self.retention.due(now):
            try:
                self.retention.sweep(self.state, self.watchers)
            except Exception as e:  # retention waits for the next sweep
                self.errors.failed("retention", e)

    def _fail(self, err: Exception) -> None:
        """Stops the coordinator: the journal failed (or the core could not be recovered)."""
        if isinstance(err, _CoreBroken):
            log.critical("%s; the coordinator must stop", err.args[0])
        elif isinstance(err, OSError) and err.errno == errno.ENOSPC:  # one line, no traceback
            log.critical(
                "journal commit failed: disk full (ENOSPC) at %s; stopping (free space, then"
                " restart: the journal is replayed)",
                err.filename or "the journal",
            )
        else:  # the state is ahead of the journal: nothing more may be decided on it
            log.critical(
                "journal commit failed; the coordinator must stop (a restart replays the"
                " journal): %s: %s",
                type(err).__name__,
                err,
                exc_info=err,
            )
        if self.on_fatal is not None:
            self.on_fatal(err)

    async def _commit(self, out: Outcome) -> None:
        """Appends ``out``'s records (and a new HLC ceiling, if due) in one transaction."""
        ceiling = self._next_ceiling()
        if not out.records and ceiling is None:
            return
        started = self.clock.monotonic()
        await self.store.append(out.records, hlc_ceiling_ms=ceiling)
        self.metrics.journal_commit.observe(self.clock.monotonic() - started)
        self.metrics.journal_batch.observe(len(out.records))
        if ceiling is not None:
            self._ceiling = ceiling
        if out.records:
            async with self._durable_cond:
                self._durable = out.records[-1].sequence
                self._durable_cond.notify_all()

    def _decide(self, batch: list[Stimulus], at: Instant) -> Outcome | None:
        """The core's outcome for ``batch``; None when handling it raised (``_handling`` then
        names the stimulus that did, or is None when it was the dispatch after them)."""
        try:
            return self.state.handle_batch(self._tracked(batch), at)
        except Exception as e:
            self._failure = e
            return None

    def _tracked(self, batch: list[Stimulus]) -> Iterator[Stimulus]:
        for s in batch:
            self._handling = s
            yield s
        self._handling = None

    async def _recover(self, batch: list[Stimulus], at: Instant) -> None:
        """After the core raised on ``batch``: rebuild it from the journal, end the culprit's
        RPC or stream with INTERNAL, carry live sessions over and queue the rest again."""
        culprit, self._handling = self._handling, None
        err = self._failure
        what = f"{type(culprit).__name__} {culprit.cause}" if culprit else "dispatch"
        self.errors.failed("core", err, what)
        self.metrics.core_rebuilds.inc()
        now = self.clock.monotonic()
        self._rebuilds.append(now)
        while self._rebuilds and now - self._rebuilds[0] > _REBUILD_WINDOW:
            self._rebuilds.popleft()
        if len(self._rebuilds) > _REBUILDS_ALLOWED:
            raise _CoreBroken(
                f"the scheduling core raised {len(self._rebuilds)} times within"
                f" {_REBUILD_WINDOW:g}s (last: {type(err).__name__}: {err} handling {what})"
            ) from err
        old = self.state
        log.error(
            "rebuilding the scheduling core from the journal after %s: %s in %s",
            type(err).__name__,
            err,
            what,
        )
        self._rebuilding = True
        try:
            core = self._new_core(old.hlc.last)
            await self._load(core)
        except Exception as e:  # the journal cannot be read back: nothing to rebuild from
            raise _CoreBroken(f"rebuilding the core after an error in {what} failed: {e}") from e
        finally:
            self._rebuilding = False
        core.sequence = max(core.sequence, self._durable)
        failed_session = ""
        if isinstance(culprit, WorkerMessageReceived):
            failed_session = culprit.session_id
        elif culprit is not None:
            reply = getattr(culprit, "reply", None)
            if isinstance(reply, asyncio.Future) and not reply.done():
                reply.set_exception(PlaitError(f"internal error handling {what}; see the log"))
        again = [
            s
            for s in batch
            if s is not culprit
            and not isinstance(s, TimePassed)
            and not (isinstance(s, WorkerMessageReceived) and s.session_id == failed_session)
        ]
        fresh = {  # sessions whose hello is still to be handled (this batch's, or newer)
            s.session_id
            for s in (*again, *self._inbox)
            if isinstance(s, WorkerMessageReceived) and s.message.HasField("hello")
        }
        carried = [
            sid
            for sid in old.by_session
            if sid in self._sessions and sid not in fresh and sid != failed_session
        ]
        try:
            out = core.handle_batch(rebuild.rehellos(old, carried), at)
            rebuild.drop_welcomes(out, carried)
            rebuild.carry_over(old, core, carried)
        except Exception as e:
            raise _CoreBroken(f"carrying sessions over after an error in {what} failed: {e}") from e
        self.core = core
        await self._commit(out)
        self._deliver_safely(out)
        for sid, q in self._sessions.items():
            if sid == failed_session:
                why = f"internal error handling {what}; see the coordinator's log"
                q.put_nowait(SessionEnd(sid, code_pb2.INTERNAL, why))
            elif sid not in core.by_session and sid not in fresh:
                q.put_nowait(
                    SessionEnd(
                        sid,
                        code_pb2.UNAVAILABLE,
                        "the coordinator rebuilt its state after an internal error; reconnect",
                    )
                )
        self._inbox[:0] = again
        self._wake.set()

    def _next_ceiling(self) -> int | None:
        """A new HLC ceiling to store with this commit, when readings may soon pass the old one.

        Every reading this coordinator hands out before its next commit is at most the current
        reading plus ``max_clock_offset`` (a merged remote stamp), so keeping the stored ceiling
        above that means a successor that starts above the ceiling never goes backwards.
        """
        top = self.state.hlc.last.physical_ms + self._max_offset_ms
        if top < self._ceiling:
            return None
        return top + _CEILING_STEP_MS

    def _deliver_safely(self, out: Outcome) -> None:
        """:meth:`_deliver`; if it raises (a bug), RPCs it did not answer get INTERNAL."""
        try:
            self._deliver(out)
        except Exception as e:  # committed already: the state is sound, only delivery failed
            self.errors.failed("deliver", e)
            for token, _ in out.replies:
                fut: asyncio.Future[Any] = token  # type: ignore[assignment]
                if not fut.done():
                    fut.set_exception(PlaitError("internal error delivering the reply"))

    def _deliver(self, out: Outcome) -> None:
        core = self.state
        self.observations.observe_records(core, out.records, self.clock.monotonic())
        self.watchers.publish(out.records)
        if out.logs:  # before the records: an attempt's output is in before its end closes it
            self.live_logs.keep(out.logs)
        self.live_logs.delivered(out.records)
        for session_id, msgs in out.sends.items():
            q = self._sessions.get(session_id)
            if q is None:
                continue
            for msg in msgs:
                if msg.HasField("lease_grant"):
                    w = core.by_session.get(session_id)
                    self.observations.tracing.on_grant(msg.lease_grant, w.worker_id if w else "")
                core.hlc.stamp(msg.hlc)
                q.put_nowait(msg)
        for end in out.closes:
            q = self._sessions.get(end.session_id)
            if q is not None:
                q.put_nowait(end)
        for token, value in out.replies:
            fut: asyncio.Future[Any] = token  # type: ignore[assignment]
            if fut.done():
                continue
            if isinstance(value, KeyError):
                fut.set_exception(NotFoundError(f"{value.args[0]!r} not found"))
            elif isinstance(value, BaseException):
                fut.set_exception(value)
            else:
                fut.set_result(value)
        self.observations.observe(out.observations, core)
        m = self.metrics
        m.workers_connected.set(len(core.by_session))
        m.workers_revoked.set(len(core.revoked))
        m.ready_actions.set(sum(len(wf.ready) for wf in core.active) + len(core.delayed))

    # ---- gauges at scrape time ----------------------------------------------------------------

    def scrape_state(self) -> StateGauges | None:
        """The state gauges, copied on the event loop; None without a core (a standby).

        A scrape runs on the metrics server's thread while the loop changes the core, so the
        copy is made on the loop, between two batches (consistent, and nothing is paid between
        scrapes); the scraping thread waits for it at most ``_SCRAPE_WAIT`` seconds.
        """
        loop = self._loop
        if loop is None or self.core is None or loop.is_closed():
            return None
        try:
            return call_on_loop(loop, self._state_gauges, _SCRAPE_WAIT)
        except RuntimeError:  # the loop closed meanwhile
            return None
        except Exception as e:  # a slow loop (TimeoutError) or a bug: the counters still go
            if self._scrape_log.first(("scrape",)):
                log.warning(
                    "state gauges left out of a /metrics scrape: %s: %s", type(e).__name__, e
                )
            return None

    def _state_gauges(self) -> StateGauges | None:
        core = self.core
        if core is None or self._rebuilding:
            return None
        return state_gauges(core, self.clock.monotonic(), self.clock.wall_ms())


class _CoreBroken(Exception):
    """The core kept raising: recovering again would only repeat it."""
