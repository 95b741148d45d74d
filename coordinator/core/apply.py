"""Applying a history event to the scheduling core: the one place state changes (pure core).

The core decides, then applies. Handling a stimulus *decides* what happened, as typed
:class:`~plait.v1.workflow_pb2.HistoryEvent` records (an ``EventType``, a typed
``EventReason``, the action's new state); :func:`apply` then performs each one on the
in-memory state through :data:`APPLY`, the table that points every event type at the function
that performs it. Live handling is decide + journal + apply (``SchedulerState.emit``); replay
after a restart is apply alone, over the journal (:mod:`~plait.coordinator.core.replay`). So a
restarted coordinator is in the state the live one was in, by construction, timers included:
they are state that the functions here arm, given ``when`` (the monotonic time the event
happened: now, live; its journalled age taken off the replay instant, on replay).

What an event does *not* carry is not applied here: a worker's credit and session (live
only; replay knows a lease's holder as a disconnected "ghost" until it says hello again), and
every effect (grants, acks, cancels, replies, observations), which the deciding code puts in
the :class:`~plait.coordinator.core.model.Outcome` it returns.

Nothing here reads ``message``: meaning is in the typed fields.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from plait.coordinator.core import hedges, joins, limits, retry, sessions
from plait.coordinator.core import transitions as t
from plait.coordinator.core.model import ActionRecord, LeaseRecord, WorkerRecord, WorkflowRecord
from plait.hlc import HlcTimestamp
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb

if TYPE_CHECKING:
    from plait.coordinator.core.state import SchedulerState

E = pb  # EVENT_TYPE_* and EVENT_REASON_* constants
# Action states as module constants: every event reads some, and each `t.X` is two lookups.
READY, LEASED, RUNNING = t.READY, t.LEASED, t.RUNNING
SUCCEEDED, FAILED, TIMED_OUT = t.SUCCEEDED, t.FAILED, t.TIMED_OUT
LEASE_LOSS_BUDGET = E.EVENT_REASON_LEASE_LOSS_BUDGET

Apply = Callable[["SchedulerState", pb.HistoryEvent, float], None]


def apply(st: SchedulerState, ev: pb.HistoryEvent, when: float) -> None:
    """Performs ``ev`` on ``st``; ``when`` is the monotonic time it happened."""
    try:
        fn = APPLY[ev.type]
    except KeyError:
        raise ValueError(f"event {ev.sequence}: no transition for event type {ev.type}") from None
    fn(st, ev, when)


# ---- workflow events -------------------------------------------------------------------------


def _submitted(st: SchedulerState, ev: pb.HistoryEvent, when: float) -> None:
    """Builds the workflow the event carries: its actions PENDING, the ones that need nothing
    READY (implied by WORKFLOW_SUBMITTED, so not journalled again), and its deadline, all from
    ``when``. The spec was validated before it was journalled, so it is not validated here."""
    spec = ev.spec
    wf = WorkflowRecord(
        workflow_id=ev.workflow_id,
        spec=spec,
        idempotency_key=ev.idempotency_key,
        submitted_wall_ms=ev.recorded_at.ToMilliseconds(),
        submitted_hlc=HlcTimestamp(ev.hlc.physical_ms, ev.hlc.logical),
        traceparent=ev.traceparent,
    )
    st.workflows[wf.workflow_id] = wf
    if wf.idempotency_key:
        st.by_idempotency_key[wf.idempotency_key] = wf.workflow_id
    # One pass over the specs (each protobuf field read once), one over the records.
    actions = wf.actions
    default_priority = spec.priority
    prioritized = default_priority != 0
    for a_spec in spec.actions:
        priority = a_spec.priority
        if priority:
            prioritized = True
        actions[a_spec.id] = ActionRecord(
            workflow=wf,
            spec=a_spec,
            slots=a_spec.slots or 1,
            priority=priority or default_priority,
        )
    if prioritized:
        st.prioritized = True  # from now on dispatch looks for the highest priority
    wf.remaining = len(actions)
    set_state, ready_up = st.set_state, st.ready_up
    for a in actions.values():
        names = a.spec.needs
        if names:
            a.needs = needs = list(map(actions.__getitem__, names))  # in C: 100,000s of them
            a.unmet = len(needs)
            for n in needs:
                n.dependents.append(a)
        else:
            set_state(a, READY)
            ready_up(a, when)
    st.arm_deadline(wf, when)


def _workflow(st: SchedulerState, ev: pb.HistoryEvent) -> WorkflowRecord:
    wf = st.workflows.get(ev.workflow_id)
    if wf is None:
        raise ValueError(f"event {ev.sequence} names unknown workflow {ev.workflow_id!r}")
    return wf


def _cancel_requested(st: SchedulerState, ev: pb.HistoryEvent, when: float) -> None:
    _workflow(st, ev).cancel_requested = True


def _retried(st: SchedulerState, ev: pb.HistoryEvent, when: float) -> None:
    wf = _workflow(st, ev)
    ids = json.loads(ev.outputs_json or "[]")
    retry.reset(st, wf, [wf.actions[i] for i in ids], when)


def _workflow_finished(st: SchedulerState, ev: pb.HistoryEvent, when: float) -> None:
    wf = _workflow(st, ev)
    wf.state = ev.workflow_state
    wf.reason = ev.message
    wf.finished_hlc = HlcTimestamp(ev.hlc.physical_ms, ev.hlc.logical)
    wf.finished_wall_ms = ev.recorded_at.ToMilliseconds()


# ---- action events ---------------------------------------------------------------------------


def _action(st: SchedulerState, ev: pb.HistoryEvent) -> ActionRecord:
    wf = st.workflows.get(ev.workflow_id)  # _workflow, inlined: nearly every event asks
    if wf is None:
        raise ValueError(f"event {ev.sequence} names unknown workflow {ev.workflow_id!r}")
    a = wf.actions.get(ev.action_id)
    if a is None:
        raise ValueError(f"event {ev.sequence} names unknown action {ev.action_id!r}")
    return a


def _ready(st: SchedulerState, ev: pb.HistoryEvent, when: float) -> None:
    a = _action(st, ev)
    if a.state == READY:
        return  # journals before 0.1's last change also recorded READY at submit
    st.set_state(a, READY)
    st.ready_up(a, when)


def _holder(st: SchedulerState, worker_id: str) -> WorkerRecord:
    """The lease holder's record: the live worker, or, on replay, a "ghost" known only from
    the journal (disconnected, no slots) until it says hello again and re-adopts."""
    w = st.workers.get(worker_id)
    if w is None:
        w = WorkerRecord(
            worker_id=worker_id,
            session_id="",
            hello=wpb.Hello(worker_id=worker_id),
            labels={},
            handlers=frozenset(),
            exec_enabled=False,
            slots=0,
            free=0,
            connected_at_wall_ms=0,
            last_renewed=st.now,
            last_seen=st.now,
            connected=False,
        )
        st.workers[worker_id] = w
    return w


def _leased(st: SchedulerState, ev: pb.HistoryEvent, when: float) -> None:
    a = _action(st, ev)
    hedge = a.lease is not None  # a second live lease beside the first: speculation
    if not hedge:
        st.set_state(a, LEASED)
        st.dequeue(a)
    token, attempt, worker_id = ev.fencing_token, ev.attempt, ev.worker_id
    a.token, a.attempt, a.worker_id = token, attempt, worker_id
    sessions.record_holder(a, token, worker_id)
    w = _holder(st, worker_id)
    # Granted when it happened; its TTL and progress wait run from now (on replay: the worker
    # could not reach us while we were down, which says nothing about whether it is alive).
    lease_id = ev.lease_id
    lease = LeaseRecord(lease_id, a, w, token, attempt, w.grant_seq, when, a.slots)
    lease.last_progress = st.now
    if hedge:
        a.hedge = lease
    else:
        a.lease = lease
    w.leases[lease_id] = lease
    st.leases[lease_id] = lease
    limits.acquire(st, lease)
    st.arm_lease_timers(lease, when, hedge=hedge)


def _started(st: SchedulerState, ev: pb.HistoryEvent, when: float) -> None:
    a = _action(st, ev)
    if a.state == LEASED:  # a hedge may start while the other attempt runs
        st.set_state(a, RUNNING)
        a.started_wall_ms = _wall_ms(ev)
    lease = st.leases.get(ev.lease_id)
    if lease is not None:
        lease.started = True


def _mapped(st: SchedulerState, ev: pb.HistoryEvent, when: float) -> None:
    a = _action(st, ev)
    st.set_state(a, RUNNING)
    a.started_wall_ms = _wall_ms(ev)
    items = json.loads(ev.outputs_json or "[]")
    joins.make_children(st, a, [json.dumps(i, separators=(",", ":")) for i in items], when)


def _end_leases(st: SchedulerState, a: ActionRecord) -> None:
    lease = a.lease
    while lease is not None:  # both, when hedged
        sessions.drop_lease(st, lease)
        lease = a.lease


def _lease_lost(st: SchedulerState, ev: pb.HistoryEvent, when: float) -> None:
    a = _action(st, ev)
    lost = st.leases.get(ev.lease_id)
    if a.hedge is not None and lost is not None:
        sessions.drop_lease(st, lost)  # one of two hedged attempts ended; the other runs on
        return
    started = lost is not None and lost.started
    _end_leases(st, a)
    st.set_state(a, READY)
    if sessions.charged(ev.reason, started):
        a.lease_losses += 1
    a.lost_by = ev.worker_id
    a.not_before = 0.0
    st.ready_up(a, when)


def _retry_scheduled(st: SchedulerState, ev: pb.HistoryEvent, when: float) -> None:
    a = _action(st, ev)
    _end_leases(st, a)
    st.set_state(a, READY)
    a.failures += 1
    a.exit_code = ev.exit_code  # the failed attempt's, shown while the next one waits
    a.not_before = when + ev.backoff.ToNanoseconds() / 1e9
    st.ready_up(a, when)


def _ended(st: SchedulerState, ev: pb.HistoryEvent, when: float) -> None:
    """FINISHED, CANCELLED or SKIPPED: the action's terminal state, counted in its dependents'
    joins (what they then do is decided by the live core and journalled as their own events)."""
    a = _action(st, ev)
    state = ev.action_state
    lease_id = ev.lease_id
    committed = ev.HasField("worker_hlc")  # committed from a worker's result, not decided by us
    if state == SUCCEEDED and committed:
        won = st.leases.get(lease_id)
        if won is not None:  # its run time, for hedge thresholds (p95)
            hedges.record_duration(st, a, when - won.granted_at)
    if a.lease is not None:
        _end_leases(st, a)
    joins.close_item(a)
    st.set_state(a, state)
    a.finished_wall_ms = _wall_ms(ev)
    a.error = ev.error if ev.HasField("error") else None
    a.reason = ev.message
    a.reason_code = reason = ev.reason
    a.exit_code = ev.exit_code
    worker_id = ev.worker_id
    if worker_id:
        a.worker_id = worker_id
    if committed:
        a.committed_token = ev.fencing_token
    if reason == LEASE_LOSS_BUDGET:
        a.lease_losses += 1  # the loss that spent the budget (not a failed attempt)
    elif lease_id and state in (FAILED, TIMED_OUT):
        a.failures += 1  # an attempt failed (one that names no lease was never attempted)
    a.workflow.remaining -= 1
    if state == SUCCEEDED:
        # In memory when small, else by this event's sequence (core.outputs).
        st.outputs.keep(a, ev.outputs_json, ev.sequence)
        for d in a.dependents:
            d.unmet -= 1
    else:
        for d in a.dependents:
            d.failed_needs += 1


def _wall_ms(ev: pb.HistoryEvent) -> int:
    """The event's coordinator wall time in ms (Timestamp.ToMilliseconds without its checks)."""
    rec = ev.recorded_at
    return rec.seconds * 1000 + rec.nanos // 1_000_000


def _nothing(st: SchedulerState, ev: pb.HistoryEvent, when: float) -> None:
    """STALE_RESULT_REFUSED: journalled for the record; no state changes."""


APPLY: dict[int, Apply] = {
    E.EVENT_TYPE_WORKFLOW_SUBMITTED: _submitted,
    E.EVENT_TYPE_WORKFLOW_CANCEL_REQUESTED: _cancel_requested,
    E.EVENT_TYPE_WORKFLOW_RETRIED: _retried,
    E.EVENT_TYPE_WORKFLOW_FINISHED: _workflow_finished,
    E.EVENT_TYPE_ACTION_READY: _ready,
    E.EVENT_TYPE_ACTION_LEASED: _leased,
    E.EVENT_TYPE_ACTION_STARTED: _started,
    E.EVENT_TYPE_ACTION_MAPPED: _mapped,
    E.EVENT_TYPE_LEASE_LOST: _lease_lost,
    E.EVENT_TYPE_ACTION_RETRY_SCHEDULED: _retry_scheduled,
    E.EVENT_TYPE_ACTION_FINISHED: _ended,
    E.EVENT_TYPE_ACTION_CANCELLED: _ended,
    E.EVENT_TYPE_ACTION_SKIPPED: _ended,
    E.EVENT_TYPE_STALE_RESULT_REFUSED: _nothing,
}
"""Every event type -> the function that performs it. An event type missing here cannot be
journalled (``apply`` raises), so a new one cannot be recorded without saying what it does."""
