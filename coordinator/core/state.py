"""The coordinator's scheduling core (pure core): stimuli in, an :class:`Outcome` out.

``SchedulerState.handle_batch`` takes a batch of stimuli and the :class:`Instant` they are
handled at, changes the in-memory state, and returns the history records to journal, the
messages to send to workers and the replies to give clients. It does no I/O and reads no clock:
the runtime commits the records first and only then delivers the rest, so nothing outside sees
a transition before it is durable.

Workflows and their actions live here; the worker side (sessions, leases, results) is in
:mod:`plait.coordinator.core.sessions`, split out by aggregate.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

from google.protobuf import duration_pb2
from google.rpc import code_pb2, status_pb2

from plait.coordinator.core import (
    apply,
    attempts,
    dispatch,
    hedges,
    joins,
    liveness,
    prefetch,
    retry,
    revocation,
    sessions,
    workers,
)
from plait.coordinator.core import outputs as o
from plait.coordinator.core import transitions as t
from plait.coordinator.core.events import (
    CancelRequested,
    DrainRequested,
    Instant,
    RetryRequested,
    Stimulus,
    TimePassed,
    WorkerMessageReceived,
    WorkerReinstated,
    WorkerRevoked,
    WorkerStreamClosed,
    WorkflowSubmitted,
)
from plait.coordinator.core.input_limits import Limits
from plait.coordinator.core.model import (
    ActionRecord,
    LeaseRecord,
    Outcome,
    Revocation,
    WorkerRecord,
    WorkflowRecord,
)
from plait.errors import FailedPreconditionError
from plait.hlc import ZERO, ClockOffsetError, HlcTimestamp, HybridLogicalClock
from plait.v1 import hlc_pb2
from plait.v1 import workflow_pb2 as pb

E = pb  # EVENT_TYPE_* as module constants: enum-wrapper attribute access is slow
W = pb  # WORKFLOW_STATE_* constants
STATE_NAME = t.STATE_NAME


@dataclass(frozen=True, slots=True)
class CoreConfig:
    """The settings the pure core needs (a subset of CoordinatorConfig)."""

    heartbeat_interval: timedelta = timedelta(seconds=5)
    lease_ttl: timedelta = timedelta(seconds=30)
    kill_grace: timedelta = timedelta(seconds=10)
    lease_loss_budget: int = 3
    max_prefetch: int = 32  # leases granted beyond a worker's free slots, at most (in slots)
    # A lease's inputs plus its action spec, in bytes; larger fails the action at grant time.
    max_lease_bytes: int = Limits().max_lease_bytes
    # What a succeeded result's outputs may be (results.check_outputs): the configured limits.
    max_output_bytes: int = Limits().max_output_bytes
    max_json_depth: int = Limits().max_json_depth


class _EventClock:
    """Feeds the HLC the time that arrived with the batch, so the core never reads a clock."""

    __slots__ = ("mono", "wall")

    def __init__(self) -> None:
        self.wall = 0
        self.mono = 0.0

    def wall_ms(self) -> int:
        return self.wall

    def monotonic(self) -> float:
        return self.mono


class SchedulerState:
    """All workflows, actions, leases and workers of one coordinator."""

    def __init__(
        self,
        config: CoreConfig,
        *,
        max_clock_offset_ms: int = 500,
        hlc_floor: HlcTimestamp = ZERO,
        last_sequence: int = 0,
        rng: random.Random | None = None,
        max_map_items: int = 100_000,
        outputs: o.OutputStore | None = None,
    ) -> None:
        self.config = config
        self.max_map_items = max_map_items
        self.outputs = outputs or o.OutputStore()
        self.ttl = config.lease_ttl.total_seconds()
        self._clock = _EventClock()
        self.hlc = HybridLogicalClock(self._clock, max_clock_offset_ms, floor=hlc_floor)
        self.sequence = last_sequence
        self.rng = rng or random.Random()
        self.workflows: dict[str, WorkflowRecord] = {}
        self.by_idempotency_key: dict[str, str] = {}
        self.workers: dict[str, WorkerRecord] = {}
        self.by_session: dict[str, WorkerRecord] = {}
        self.revoked: dict[str, Revocation] = {}  # worker ids refused until reinstated
        self.streaks: dict[str, liveness.Streak] = {}  # worker ids losing leases in a row
        self.no_prefetch_until: dict[str, float] = {}  # worker ids that lost a lease lately
        self.hear_window = liveness.HEAR_WINDOW * config.heartbeat_interval.total_seconds()
        self.leases: dict[str, LeaseRecord] = {}
        self.active: deque[WorkflowRecord] = deque()  # workflows with ready actions, fair ring
        # Timers are state: each transition that starts one arms it through one method
        # (ready_up, arm_queue_timeout, arm_lease_timers, arm_deadline), which replay calls
        # too, with the time the journalled transition happened, so a restart keeps them.
        # (due, seq, tie, action): retry backoff heap
        self.delayed: list[tuple[float, int, int, ActionRecord]] = []
        self.deadlines: list[tuple[float, int, str]] = []  # run-timeout heap (lease ids)
        self.semaphores: dict[str, tuple[int, int]] = {}  # name -> (capacity, permits held)
        self.prioritized = False  # some workflow uses priorities (costlier dispatch)
        self.hedge_deadlines: list[tuple[float, int, str]] = []  # (due, seq, primary lease id)
        self.hedges_wanted: list[ActionRecord] = []
        # The journal sequence committed so far, as the runtime last said (None: everything
        # decided before the current batch, as when each batch is committed before the next).
        self.committed: int | None = None
        self.durations: dict[str, deque[float]] = {}  # successful run times, for p95 hedges
        # (due, seq, tie, action, token at ready): queue (schedule-to-start) timeouts
        self.queue_deadlines: list[tuple[float, int, int, ActionRecord, int]] = []
        self._tie = itertools.count()  # actions do not compare: heap entries never reach them
        self.workflow_deadlines: list[tuple[float, int, str]] = []  # (due, seq, workflow id)
        self.progress_deadlines: list[tuple[float, int, str]] = []  # heartbeat_timeout
        self.now = 0.0
        self.cause = ""
        # The events decided in the batch being handled, in order: the Outcome's records,
        # journalled by the runtime before anything else of the outcome is delivered.
        self.decided: list[pb.HistoryEvent] = []
        self._ttl_pb = duration_pb2.Duration()
        self._ttl_pb.FromTimedelta(config.lease_ttl)

    # ---- entry point -------------------------------------------------------------------

    def handle_batch(self, stimuli: Iterable[Stimulus], at: Instant) -> Outcome:
        """Applies a batch of stimuli at one instant and returns what must happen next."""
        self._clock.wall, self._clock.mono = at.wall_ms, at.monotonic
        self.now = at.monotonic
        # Outputs of batches committed by now may be evicted (read back from the journal).
        self.outputs.cache.durable(self.committed)
        out = Outcome(self.config.max_lease_bytes)
        self.decided = out.records
        ticked = False
        for s in stimuli:
            self.cause = s.cause
            if isinstance(s, WorkerMessageReceived):
                workers.on_worker_message(self, s, out)
            elif isinstance(s, WorkflowSubmitted):
                self.on_submit(s, out)
            elif isinstance(s, TimePassed):
                self.on_time_passed(out)
                ticked = True
            elif isinstance(s, CancelRequested):
                self.on_cancel(s, out)
            elif isinstance(s, RetryRequested):
                self.on_retry(s, out)
            elif isinstance(s, WorkerStreamClosed):
                workers.on_stream_closed(self, s, out)
            elif isinstance(s, DrainRequested):
                workers.on_drain(self, s, out)
            elif isinstance(s, WorkerRevoked):
                revocation.on_revoked(self, s, out)
            elif isinstance(s, WorkerReinstated):
                revocation.on_reinstated(self, s, out)
        self.cause = "dispatch"
        dispatch.dispatch(self, out)
        if ticked:  # after dispatch: only workers it left with free slots take reclaimed leases
            prefetch.reclaim(self, out)
        self.decided = []
        return out

    @property
    def wall_ms(self) -> int:
        """The coordinator wall time (ms) that arrived with the batch being handled."""
        return self._clock.wall

    # ---- history ------------------------------------------------------------------------

    def record_workflow(self, workflow_id: str, type_: int, **fields: object) -> pb.HistoryEvent:
        """:meth:`record` for a workflow event before the workflow record exists."""
        self.sequence += 1
        ev = pb.HistoryEvent(**fields)  # type: ignore[arg-type]
        ev.sequence = self.sequence
        ev.workflow_id = workflow_id
        ev.type = type_  # type: ignore[assignment]
        ev.cause = self.cause
        ev.hlc.physical_ms, ev.hlc.logical = self.hlc.now()
        ev.recorded_at.FromMilliseconds(self._clock.wall)
        self.decided.append(ev)
        return ev

    def emit(
        self, wf: WorkflowRecord, type_: int, a: ActionRecord | None = None, **fields: object
    ) -> pb.HistoryEvent:
        """Decided: records the event (:meth:`record`) and applies it (:func:`.apply.apply`).

        The one way the live core changes what the journal holds: replay applies the same
        event the same way. ``action_state`` is the state the event moves the action to.
        """
        ev = self.record(wf, type_, a, **fields)
        apply.apply(self, ev, self.now)
        return ev

    def record(
        self, wf: WorkflowRecord, type_: int, a: ActionRecord | None = None, **fields: object
    ) -> pb.HistoryEvent:
        """Appends a history event stamped with the next sequence and the coordinator's HLC.

        Only for events that change no state (STALE_RESULT_REFUSED); the rest are
        :meth:`emit`-ted. An action event names the action's state, attempt and token unless
        ``fields`` give them.
        """
        # Hot path (several events per action): plain attribute stores, no kwargs unpacking
        # unless extra fields are given.
        self.sequence += 1
        ts = self.hlc.now()
        ev = pb.HistoryEvent(**fields) if fields else pb.HistoryEvent()  # type: ignore[arg-type]
        ev.sequence = self.sequence
        ev.workflow_id = wf.workflow_id
        ev.type = type_  # type: ignore[assignment]
        ev.cause = self.cause
        hlc = ev.hlc
        hlc.physical_ms, hlc.logical = ts
        wall = self._clock.wall
        rec = ev.recorded_at
        rec.seconds, rec.nanos = wall // 1000, (wall % 1000) * 1_000_000
        if a is not None:
            ev.action_id = a.spec.id
            if not fields or "action_state" not in fields:
                ev.action_state = a.state  # type: ignore[assignment]
            if not fields or "attempt" not in fields:
                ev.attempt = a.attempt
            if not fields or "fencing_token" not in fields:  # a result names its own token
                ev.fencing_token = a.token
        self.decided.append(ev)
        return ev

    def stamp(self, msg: hlc_pb2.HlcTimestamp, at: Instant) -> None:
        """Stamps a reply (``msg``) with the coordinator's HLC read at ``at``."""
        self._clock.wall, self._clock.mono = at.wall_ms, at.monotonic
        self.hlc.stamp(msg)

    def merge_remote(self, remote: HlcTimestamp, at: Instant) -> bool:
        """Merges a client's HLC stamp read at ``at``; False (not merged) when it is too far
        ahead of our clock."""
        self._clock.wall, self._clock.mono = at.wall_ms, at.monotonic
        try:
            self.hlc.observe(remote)
        except ClockOffsetError:
            return False
        return True

    def set_state(self, a: ActionRecord, new: int) -> None:
        """Moves an action through the transition table (anything else raises)."""
        if (a.state, new) not in t.TRANSITIONS:  # (the key is built only for the error)
            t.check_transition(a.state, new, a.key)
        a.state = new

    # ---- workflows ----------------------------------------------------------------------

    def on_submit(self, s: WorkflowSubmitted, out: Outcome) -> None:
        if s.idempotency_key and s.idempotency_key in self.by_idempotency_key:
            out.reply(s.reply, (self.by_idempotency_key[s.idempotency_key], False))
            return
        ev = self.record_workflow(
            s.workflow_id,
            E.EVENT_TYPE_WORKFLOW_SUBMITTED,
            workflow_state=W.WORKFLOW_STATE_RUNNING,
            idempotency_key=s.idempotency_key,
            traceparent=s.traceparent,
        )
        ev.spec.CopyFrom(s.spec)
        apply.apply(self, ev, self.now)  # apply._submitted builds it
        out.reply(s.reply, (s.workflow_id, True))

    def arm_deadline(self, wf: WorkflowRecord, when: float) -> None:
        """Starts the workflow's deadline for the run (submission or retry) begun at ``when``.

        Judged on our monotonic clock; replay gives the journalled event's time.
        """
        wf.run_seq = self.sequence
        if wf.spec.HasField("deadline"):
            d = wf.spec.deadline
            due = when + d.seconds + d.nanos / 1e9
            heapq.heappush(self.workflow_deadlines, (due, self.sequence, wf.workflow_id))

    def forget(self, workflow_ids: Iterable[str]) -> None:
        """Drops finished workflows from memory (retention); their journal rows go separately."""
        for workflow_id in workflow_ids:
            wf = self.workflows.pop(workflow_id, None)
            if wf is not None and self.by_idempotency_key.get(wf.idempotency_key) == workflow_id:
                del self.by_idempotency_key[wf.idempotency_key]

    def make_ready(self, a: ActionRecord, type_: int, **fields: object) -> None:
        """PENDING/LEASED/RUNNING -> READY (ACTION_READY, LEASE_LOST, RETRY_SCHEDULED): applied
        as replay applies it (any lease ends; queued fairly; a retry waits out its backoff)."""
        self.emit(a.workflow, type_, a, action_state=t.READY, **fields)

    def ready_up(self, a: ActionRecord, when: float) -> None:
        """What becoming READY at ``when`` starts (live and replay alike): the queue timeout,
        and the wait in the backoff heap or the place in the fair queue."""
        a.ready_seq = self.sequence
        a.ready_at = max(when, a.not_before)  # schedule-to-start counts from here
        self.arm_queue_timeout(a, when)
        if a.not_before > self.now:
            heapq.heappush(self.delayed, (a.not_before, self.sequence, next(self._tie), a))
        else:
            self.enqueue(a)

    def enqueue(self, a: ActionRecord) -> None:
        """Queues a ready action: higher priority first within its workflow, FIFO otherwise."""
        if a.queued:
            return  # still queued from before (e.g. cancelled while queued, then retried)
        a.queued = True
        wf = a.workflow
        if not wf.ready:
            self.active.append(wf)
        if a.priority > 0 and wf.ready and a.priority > wf.ready[0].priority:
            wf.ready.appendleft(a)
        else:
            wf.ready.append(a)

    def dequeue(self, a: ActionRecord) -> None:
        """Takes a leased action out of its workflow's ready queue, if it is still there.

        Live, dispatch has taken it already (O(1) here); on replay nothing dispatched, and
        left there it would be dispatched the moment it is READY again (a backoff not waited).
        """
        if not a.queued:
            return
        a.queued = False
        wf = a.workflow
        try:
            wf.ready.remove(a)
        except ValueError:
            return
        if not wf.ready and wf in self.active:
            self.active.remove(wf)

    def arm_queue_timeout(self, a: ActionRecord, when: float) -> None:
        """Starts the schedule-to-start clock of an action ready since ``when``, if it has a
        queue timeout."""
        qt = a.spec.queue_timeout
        if a.spec.HasField("queue_timeout"):
            due = when + qt.seconds + qt.nanos / 1e9
            entry = (due, self.sequence, next(self._tie), a, a.token)
            heapq.heappush(self.queue_deadlines, entry)

    def arm_lease_timers(self, lease: LeaseRecord, when: float, *, hedge: bool) -> None:
        """What a lease granted at ``when`` starts (live and replay alike): its run timeout,
        its progress check (heartbeat_timeout, from ``lease.last_progress``) and, for a
        primary, the hedge check."""
        timeout = attempts.run_timeout(lease.action)
        if timeout > 0:
            heapq.heappush(self.deadlines, (when + timeout, self.sequence, lease.lease_id))
        sessions.arm_progress(self, lease)
        if not hedge:
            hedges.arm(self, lease, when)

    def on_cancel(self, s: CancelRequested, out: Outcome) -> None:
        wf = self.workflows.get(s.workflow_id)
        if wf is None:
            out.reply(s.reply, KeyError(s.workflow_id))
            return
        if wf.state == W.WORKFLOW_STATE_RUNNING and not wf.cancel_requested:
            self.emit(
                wf,
                E.EVENT_TYPE_WORKFLOW_CANCEL_REQUESTED,
                message=s.reason,
                reason=E.EVENT_REASON_USER_CANCEL,
            )
            why = s.reason or "workflow cancelled"
            for a in list(wf.actions.values()):
                if a.state not in t.TERMINAL:
                    joins.end_early(self, a, why, E.EVENT_REASON_USER_CANCEL, out)
        out.reply(s.reply, wf.state)

    def on_retry(self, s: RetryRequested, out: Outcome) -> None:
        wf = self.workflows.get(s.workflow_id)
        if wf is None:
            out.reply(s.reply, KeyError(s.workflow_id))
        elif wf.state not in retry.RETRYABLE:
            state_name = pb.WorkflowState.Name(wf.state)  # type: ignore[arg-type]
            name = state_name.removeprefix("WORKFLOW_STATE_")
            out.reply(
                s.reply,
                FailedPreconditionError(
                    f"workflow {wf.workflow_id} is {name}: only a workflow that ended without"
                    " success can be retried"
                ),
            )
        else:
            out.reply(s.reply, retry.retry_workflow(self, wf, out))

    def finish_action(
        self,
        a: ActionRecord,
        state: int,
        type_: int,
        out: Outcome,
        *,
        why: int = 0,
        error: status_pb2.Status | None = None,
        reason: str = "",
        **fields: object,
    ) -> None:
        """Moves an action to a terminal state, then decides what that means for its
        dependents (:func:`.joins.propagate`), a fail_fast workflow, and the workflow's end.

        ``why``: the typed EventReason; ``reason``: the same in words, for people.
        """
        self.terminal(a, state, type_, why, error, reason, fields)
        wf = a.workflow
        joins.propagate(self, a, out)
        if state in (t.FAILED, t.TIMED_OUT) and wf.spec.fail_fast and a.parent is None:
            joins.fail_fast(self, wf, a, out)
        if wf.remaining == 0 and wf.state == W.WORKFLOW_STATE_RUNNING:
            self.finish_workflow(wf, out)

    def terminal(
        self,
        a: ActionRecord,
        state: int,
        type_: int,
        why: int,
        error: status_pb2.Status | None,
        reason: str,
        fields: dict[str, object],
    ) -> None:
        """Decides an action's terminal state (no propagation): FINISHED, CANCELLED, SKIPPED."""
        if error is not None:
            fields["error"] = error
        self.emit(a.workflow, type_, a, action_state=state, message=reason, reason=why, **fields)

    def finish_workflow(self, wf: WorkflowRecord, out: Outcome) -> None:
        """Ends a workflow whose actions all ended: the verdict names every one that failed."""
        # An action a met join cancelled (a race's losers) was not needed: not a failure.
        bad = [
            a
            for a in wf.actions.values()
            if a.state != t.SUCCEEDED
            and not (a.state == t.CANCELLED and a.reason_code == E.EVENT_REASON_NOT_NEEDED)
        ]
        listed = "; ".join(
            f"{a.spec.id} {STATE_NAME[a.state].removeprefix('ACTION_STATE_')}"
            + (f": {a.reason}" if a.reason else "")
            for a in bad
            if a.parent is None or a.state != t.CANCELLED
        )
        sinks_ok = all(a.state == t.SUCCEEDED for a in wf.actions.values() if not a.dependents)
        reason = ""
        if wf.cancel_requested:
            state = W.WORKFLOW_STATE_CANCELLED
            reason = "cancelled" + (f"; {listed}" if listed else "")
        elif wf.failing:
            state = W.WORKFLOW_STATE_FAILED
            reason = f"{wf.failing}; {listed}"
        elif not bad:
            state = W.WORKFLOW_STATE_SUCCEEDED
        elif sinks_ok:
            state = W.WORKFLOW_STATE_PARTIALLY_SUCCEEDED
            reason = "tolerated by joins: " + listed
        else:
            state = W.WORKFLOW_STATE_FAILED
            reason = listed
        self.emit(wf, E.EVENT_TYPE_WORKFLOW_FINISHED, workflow_state=state, message=reason)
        out.observe("workflow_finished", detail=pb.WorkflowState.Name(state))

    def queue_timed_out(self, a: ActionRecord, out: Outcome) -> None:
        """A ready action not started within its queue timeout fails, saying why it waited."""
        from plait.coordinator.core.views import why_waiting  # views builds on this module

        live = [w for w in self.workers.values() if w.connected and not w.draining]
        qt = a.spec.queue_timeout.ToTimedelta().total_seconds()
        why = f"queue timeout of {qt:g}s: not started ({why_waiting(self, a, live)})"
        err = status_pb2.Status(code=code_pb2.DEADLINE_EXCEEDED, message=why)
        self.finish_action(
            a,
            t.TIMED_OUT,
            E.EVENT_TYPE_ACTION_FINISHED,
            out,
            why=E.EVENT_REASON_QUEUE_TIMEOUT,
            error=err,
            reason=why,
        )

    # ---- results, retries -----------------------------------------------------------------

    def retry_delay(self, a: ActionRecord) -> float:
        """The backoff before ``a``'s next attempt, in seconds (:mod:`.attempts`)."""
        return attempts.retry_delay(a, self.rng)

    # ---- dispatch ---------------------------------------------------------------------------

    def on_time_passed(self, out: Outcome) -> None:
        now = self.now
        while self.delayed and self.delayed[0][0] <= now:
            _, seq, _, a = heapq.heappop(self.delayed)
            if a.state == t.READY and a.ready_seq == seq:  # not from an earlier readiness
                self.enqueue(a)
        while self.deadlines and self.deadlines[0][0] <= now:
            _, _, lease_id = heapq.heappop(self.deadlines)
            sessions.on_run_timeout(self, lease_id, out)
        while self.hedge_deadlines and self.hedge_deadlines[0][0] <= now:
            _, _, lease_id = heapq.heappop(self.hedge_deadlines)
            hedges.due(self, lease_id)
        while self.progress_deadlines and self.progress_deadlines[0][0] <= now:
            _, _, lease_id = heapq.heappop(self.progress_deadlines)
            sessions.check_progress(self, lease_id, out)
        while self.queue_deadlines and self.queue_deadlines[0][0] <= now:
            _, seq, _, a, token = heapq.heappop(self.queue_deadlines)
            if (
                a.state == t.READY
                and a.ready_seq == seq  # armed by this readiness, not one before a retry
                and a.token == token
                and a.workflow.state == W.WORKFLOW_STATE_RUNNING
            ):
                self.queue_timed_out(a, out)
        while self.workflow_deadlines and self.workflow_deadlines[0][0] <= now:
            _, seq, workflow_id = heapq.heappop(self.workflow_deadlines)
            wf = self.workflows.get(workflow_id)
            # (only the current run's: a retried workflow's deadline starts again)
            if wf is not None and wf.state == W.WORKFLOW_STATE_RUNNING and wf.run_seq == seq:
                d = wf.spec.deadline.ToTimedelta().total_seconds()
                joins.end_workflow_early(
                    self, wf, f"deadline of {d:g}s exceeded", E.EVENT_REASON_DEADLINE, out
                )
        sessions.expire_leases(self, out)
        workers.close_silent(self, out)
        liveness.forget_streaks(self)
