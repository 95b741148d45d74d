"""Dispatch: leasing ready actions to workers' credited slots (pure core).

Fair across workflows (a ring of workflows with ready actions, each taking a turn), highest
priority first where a workflow uses priorities, and within a workflow FIFO among what the
worker can run (labels, handlers, resources, semaphores, pipeline windows: :mod:`.limits`).
Each grant is decided by :func:`~plait.coordinator.core.sessions.grant` (ACTION_LEASED,
applied at once) with the lease's inputs built here, sized first (:mod:`.lease_size`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from plait.coordinator.core import hedges, lease_size, limits, liveness, prefetch, sessions
from plait.coordinator.core import transitions as t
from plait.coordinator.core.model import ActionRecord, Outcome, WorkerRecord, WorkflowRecord

if TYPE_CHECKING:
    from plait.coordinator.core.state import SchedulerState


def dispatch(st: SchedulerState, out: Outcome) -> None:
    """Leases ready actions against workers' credited slots, fairly across workflows; then,
    while any remain ready, prefetches them to workers that take queued leases, one lease per
    worker in turn (:mod:`.prefetch`)."""
    if st.hedges_wanted:
        hedges.dispatch(st, out)
    if not st.active:
        return
    granted = True
    while granted:  # again while a round granted anything: an action one worker passed over
        granted = False  # (not straight back to the worker that lost it) may fit it now
        for w in sorted(st.workers.values(), key=lambda w: -w.free):
            if w.free <= 0 or not liveness.may_lease(st, w):
                continue
            granted = _fill(st, w, out, 0, w.free) > 0 or granted
            if not st.active:
                return
    takers = prefetch.candidates(st)
    while takers and st.active:
        takers = [w for w in takers if _fill(st, w, out, w.depth, 1) and w.free > -w.depth]


def _fill(st: SchedulerState, w: WorkerRecord, out: Outcome, extra: int, most: int) -> int:
    """Grants ``w`` up to ``most`` ready actions that fit its free slots plus ``extra``
    (prefetch), taking turns across workflows; returns how many it granted."""
    misses = 0
    granted = 0
    while w.free + extra > 0 and st.active and misses < len(st.active):
        if st.prioritized and misses == 0:
            _front_highest_priority(st)
        wf = st.active[0]
        a = _take_fitting(st, wf, w, extra)
        if a is None:
            st.active.rotate(-1)
            misses += 1
            continue
        misses = 0
        if not wf.ready:
            st.active.popleft()
        else:
            st.active.rotate(-1)
        inputs = lease_size.checked_inputs(st, a, out)
        if inputs is not None:
            sessions.grant(st, w, a, out, inputs=inputs)
            granted += 1
            if granted >= most:
                break
    return granted


def _front_highest_priority(st: SchedulerState) -> None:
    """Rotates the fair ring to the next workflow whose head has the highest priority."""
    active = st.active
    best, at = None, 0
    for i, wf in enumerate(active):
        if wf.ready and (best is None or wf.ready[0].priority > best):
            best, at = wf.ready[0].priority, i
    active.rotate(-at)


SCAN = 64  # how deep a worker looks into one workflow's queue for an action it can run


def _take_fitting(
    st: SchedulerState, wf: WorkflowRecord, w: WorkerRecord, extra: int = 0
) -> ActionRecord | None:
    ready = wf.ready
    while ready and ready[0].state != t.READY:  # cancelled while queued: drop lazily
        ready.popleft().queued = False
    for i, a in enumerate(ready):
        if i >= SCAN:
            return None
        if (
            a.state == t.READY
            and not (extra and a.priority)  # prefetch never takes a prioritized action
            and limits.fits(st, a, w, extra)
            and not (a.lost_by and liveness.avoid(st, a, w))
        ):
            if i == 0:
                ready.popleft()
            else:
                del ready[i]
            a.queued = False
            return a
    return None
