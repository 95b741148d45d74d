"""Rebuilding the scheduling core from its journal (pure core).

A restarted (or newly elected) coordinator folds every journalled event, in sequence order,
into a fresh :class:`~plait.coordinator.core.state.SchedulerState`. Each event re-applies the
transition it recorded, through the same transition table; nothing is decided and nothing is
recorded. What was live when the previous writer stopped comes back as it was, with two
deliberate differences:

* every live lease gets a fresh TTL from the replay instant: its worker could not reach us
  while we were down, which says nothing about whether it is alive;
* its holder appears as a disconnected worker, so the worker's reconnect (``Hello.running``)
  re-adopts the lease when its fencing token is current, and expiry re-queues it otherwise.

Timers are state the transitions arm, through the same methods the live path calls
(:meth:`~SchedulerState.ready_up`, :meth:`~SchedulerState.arm_lease_timers`,
:meth:`~SchedulerState.create_workflow`), given the time the event happened: its wall-clock
age at the replay instant, taken off the replay instant's monotonic time. So a queue timeout,
run timeout, hedge threshold, workflow deadline or retry backoff that was running when the
previous writer stopped ends when it would have (or at once, if that is past). The one timer
the journal cannot date is progress (``heartbeat_timeout``): reports are not journalled, so it
restarts from the replay instant, like the TTL.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from google.rpc import code_pb2

from plait.coordinator.core import hedges, joins, limits, retry, sessions
from plait.coordinator.core import transitions as t
from plait.coordinator.core.events import Instant
from plait.coordinator.core.model import ActionRecord, LeaseRecord, WorkerRecord
from plait.coordinator.core.state import SchedulerState
from plait.hlc import HlcTimestamp
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb

E = pb  # EVENT_TYPE_* constants


def replay(st: SchedulerState, events: Iterable[pb.HistoryEvent], at: Instant) -> int:
    """Folds ``events`` (in sequence order) into ``st``; returns how many were applied."""
    st._clock.wall, st._clock.mono = at.wall_ms, at.monotonic
    st.now = at.monotonic
    n = 0
    for ev in events:
        if ev.sequence <= st.sequence:
            raise ValueError(f"journal out of order: {ev.sequence} after {st.sequence}")
        st.sequence = ev.sequence
        _apply(st, ev, happened_at(ev, at))
        n += 1
    return n


def happened_at(ev: pb.HistoryEvent, at: Instant) -> float:
    """When ``ev`` happened on the monotonic clock of the replay instant ``at``.

    Its wall-clock age (never negative: a wall clock set back makes it now) taken off ``at``.
    """
    if not ev.HasField("recorded_at"):
        return at.monotonic
    age_ms = max(0, at.wall_ms - ev.recorded_at.ToMilliseconds())
    return at.monotonic - age_ms / 1000


def _ghost(st: SchedulerState, worker_id: str) -> WorkerRecord:
    """The record of a worker known only from the journal: gone, until it says hello again."""
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


def _end_lease(st: SchedulerState, a: ActionRecord) -> None:
    while a.lease is not None:  # both, when hedged
        sessions.drop_lease(st, a.lease)


def _apply(st: SchedulerState, ev: pb.HistoryEvent, when: float) -> None:
    typ = ev.type
    if typ == E.EVENT_TYPE_WORKFLOW_SUBMITTED:
        st.create_workflow(ev, when)
        return
    wf = st.workflows.get(ev.workflow_id)
    if wf is None:
        raise ValueError(f"event {ev.sequence} names unknown workflow {ev.workflow_id!r}")
    if typ == E.EVENT_TYPE_WORKFLOW_RETRIED:
        ids = json.loads(ev.outputs_json or "[]")
        retry.reset(st, wf, [wf.actions[i] for i in ids], when)
        return
    if typ == E.EVENT_TYPE_WORKFLOW_CANCEL_REQUESTED:
        wf.cancel_requested = True
        return
    if typ == E.EVENT_TYPE_WORKFLOW_FINISHED:
        wf.state = ev.workflow_state
        wf.reason = ev.message
        wf.finished_hlc = HlcTimestamp(ev.hlc.physical_ms, ev.hlc.logical)
        wf.finished_wall_ms = ev.recorded_at.ToMilliseconds()
        return
    _apply_action(st, wf.actions[ev.action_id], ev, when)


def _apply_leased(st: SchedulerState, a: ActionRecord, ev: pb.HistoryEvent, when: float) -> None:
    hedge = a.lease is not None  # a second live lease: speculation
    if not hedge:
        st.set_state(a, t.LEASED)
        _dequeue(st, a)
    a.token, a.attempt, a.worker_id = ev.fencing_token, ev.attempt, ev.worker_id
    sessions.record_holder(a, a.token, ev.worker_id)
    w = _ghost(st, ev.worker_id)
    # Granted when it was; the TTL still restarts now, from the ghost worker's last renewal.
    lease = LeaseRecord(ev.lease_id, a, w, a.token, a.attempt, 0, when, a.slots)
    lease.last_progress = st.now  # progress reports are not journalled: restart the wait
    if hedge:
        a.hedge = lease
    else:
        a.lease = lease
    w.leases[lease.lease_id] = lease
    st.leases[lease.lease_id] = lease
    limits.acquire(st, lease)
    st.arm_lease_timers(lease, when, hedge=hedge)


def _dequeue(st: SchedulerState, a: ActionRecord) -> None:
    """Takes a leased action out of its workflow's ready queue, as dispatch did live.

    Left there, it would be dispatched the moment it is READY again (a retry's backoff not
    waited). It is near the front: dispatch takes from the first few.
    """
    wf = a.workflow
    try:
        wf.ready.remove(a)
    except ValueError:
        return
    if not wf.ready and wf in st.active:
        st.active.remove(wf)


def _apply_action(st: SchedulerState, a: ActionRecord, ev: pb.HistoryEvent, when: float) -> None:
    typ = ev.type
    if typ == E.EVENT_TYPE_ACTION_LEASED:
        _apply_leased(st, a, ev, when)
    elif typ == E.EVENT_TYPE_ACTION_STARTED:
        if a.state == t.LEASED:
            st.set_state(a, t.RUNNING)
        started = st.leases.get(ev.lease_id)
        if started is not None:
            started.started = True
    elif typ == E.EVENT_TYPE_ACTION_READY:
        if a.state == t.READY:
            return  # journals before 0.1's last change also recorded READY at submit
        st.set_state(a, t.READY)
        st.ready_up(a, when)
    elif typ == E.EVENT_TYPE_ACTION_MAPPED:
        st.set_state(a, t.RUNNING)
        items = json.loads(ev.outputs_json or "[]")
        joins.make_children(st, a, [json.dumps(i, separators=(",", ":")) for i in items], when)
    elif typ == E.EVENT_TYPE_LEASE_LOST and a.hedge is not None and ev.lease_id in st.leases:
        sessions.drop_lease(st, st.leases[ev.lease_id])  # one of two hedged attempts ended
    elif typ in (E.EVENT_TYPE_LEASE_LOST, E.EVENT_TYPE_ACTION_RETRY_SCHEDULED):
        _end_lease(st, a)
        st.set_state(a, t.READY)
        if typ == E.EVENT_TYPE_LEASE_LOST:
            if ev.message != sessions.UNDELIVERED:  # the one loss not charged to the budget
                a.lease_losses += 1
            a.not_before = 0.0
        else:
            a.failures += 1
            a.not_before = when + ev.backoff.ToNanoseconds() / 1e9
        st.ready_up(a, when)
    elif typ in (
        E.EVENT_TYPE_ACTION_FINISHED,
        E.EVENT_TYPE_ACTION_CANCELLED,
        E.EVENT_TYPE_ACTION_SKIPPED,
    ):
        _observe(st, a, ev, when)
        _apply_end(st, a, ev)
    # STALE_RESULT_REFUSED changes nothing.


def _observe(st: SchedulerState, a: ActionRecord, ev: pb.HistoryEvent, when: float) -> None:
    """A committed success's run time, as the live core sampled it (hedge thresholds)."""
    if ev.action_state != t.SUCCEEDED or not ev.HasField("worker_hlc"):
        return
    lease = st.leases.get(ev.lease_id)
    if lease is not None:
        hedges.record_duration(st, a, when - lease.granted_at)


def _apply_end(st: SchedulerState, a: ActionRecord, ev: pb.HistoryEvent) -> None:
    _end_lease(st, a)
    joins.close_item(a)
    st.set_state(a, ev.action_state)
    a.error = ev.error if ev.HasField("error") else None
    a.reason = ev.message
    a.exit_code = ev.exit_code
    if ev.worker_id:
        a.worker_id = ev.worker_id
    if ev.HasField("worker_hlc"):  # committed from a worker's result (not decided by us)
        a.committed_token = ev.fencing_token
    if ev.lease_id and ev.action_state in (t.FAILED, t.TIMED_OUT):
        a.failures += 1  # an attempt failed (a lease-loss budget failure names no lease)
    elif ev.action_state == t.FAILED and ev.error.code == code_pb2.UNAVAILABLE:
        a.lease_losses += 1  # the loss that spent the lease-loss budget (sessions)
    a.workflow.remaining -= 1
    if ev.action_state == t.SUCCEEDED:
        # Kept as live: in memory when small, else by this event's sequence (core.outputs).
        st.outputs.keep(a, ev.outputs_json, ev.sequence, live=False)
        for d in a.dependents:
            d.unmet -= 1
    else:
        for d in a.dependents:
            d.failed_needs += 1
