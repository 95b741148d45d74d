"""Speculative execution: hedged attempts (pure core, the hedge aggregate).

An action with ``speculate`` whose attempt runs past a threshold (a fixed time, or the 95th
percentile of that action's observed successful attempts) gets a second lease on another
worker, with the next fencing token. Whichever succeeds first commits; the other lease is
cancelled and fenced. While both run, one failing (or being lost) ends only that lease, and is
journalled as a LEASE_LOST naming it; the action goes on with the other.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from typing import TYPE_CHECKING

from plait.coordinator.core import limits, liveness
from plait.coordinator.core import transitions as t
from plait.coordinator.core.model import ActionRecord, LeaseRecord, Outcome
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb

if TYPE_CHECKING:
    from plait.coordinator.core.state import SchedulerState

SAMPLES = 100  # durations kept per action for the p95
MIN_SAMPLES = 5


def key(a: ActionRecord) -> str:
    """What durations are pooled by: the action's id (a map's children pool under the map)."""
    return (a.parent or a).spec.id


def record_duration(st: SchedulerState, a: ActionRecord, seconds: float) -> None:
    """Adds one successful run time (grant to committed result, coordinator clock) to ``a``'s
    samples; applying the success does it (:mod:`.apply`)."""
    if a.spec.HasField("speculate"):
        st.durations.setdefault(key(a), deque(maxlen=SAMPLES)).append(seconds)


def threshold(st: SchedulerState, a: ActionRecord) -> float | None:
    """Seconds after which an attempt of ``a`` is hedged, or None (not yet known/asked)."""
    sp = a.spec.speculate
    if sp.after_p95:
        samples = st.durations.get(key(a))
        if samples is not None and len(samples) >= MIN_SAMPLES:
            ordered = sorted(samples)
            return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
    if sp.HasField("after"):
        return sp.after.ToNanoseconds() / 1e9
    return None


def arm(st: SchedulerState, lease: LeaseRecord, when: float) -> None:
    """Schedules the hedge check of a primary lease granted at ``when``, if its action asks
    for speculation."""
    a = lease.action
    if not a.spec.HasField("speculate") or a.hedge is not None:
        return
    after = threshold(st, a)
    if after is not None:
        heapq.heappush(st.hedge_deadlines, (when + after, st.sequence, lease.lease_id))


def due(st: SchedulerState, lease_id: str) -> None:
    """A primary ran past its threshold: ask dispatch for a hedge."""
    lease = st.leases.get(lease_id)
    if lease is None:
        return
    a = lease.action
    # lease.token == a.token: no hedge was granted beside it yet (one that ended leaves the
    # token higher), so a replayed check of a primary already hedged stays quiet.
    if (
        a.lease is lease
        and a.hedge is None
        and lease.token == a.token
        and a.state in (t.LEASED, t.RUNNING)
    ):
        st.hedges_wanted.append(a)


def dispatch(st: SchedulerState, out: Outcome) -> None:
    """Grants the hedges asked for, each on a worker other than its primary's."""
    from plait.coordinator.core import sessions

    still: list[ActionRecord] = []
    for a in st.hedges_wanted:
        primary = a.lease
        if primary is None or a.hedge is not None or a.state not in (t.LEASED, t.RUNNING):
            continue
        w = next(
            (
                w
                for w in st.workers.values()
                if w is not primary.worker and liveness.may_lease(st, w) and limits.fits(st, a, w)
            ),
            None,
        )
        if w is None:
            still.append(a)  # no other worker has room now: try at the next dispatch
        else:
            sessions.grant(st, w, a, out, hedge=True)
    st.hedges_wanted = still


def end_one(
    st: SchedulerState, lease: LeaseRecord, why: str, out: Outcome, *, cancel: bool = True
) -> bool:
    """Ends ``lease`` alone when the other attempt still runs (LEASE_LOST, HEDGE_ENDED, not
    charged to any budget); False if it is the only one."""
    a = lease.action
    if a.hedge is None or lease not in (a.lease, a.hedge):
        return False
    if cancel and lease.worker.connected:
        out.cancel(lease.worker.session_id, lease, wpb.CANCEL_REASON_SUPERSEDED, why)
    st.emit(
        a.workflow,
        pb.EVENT_TYPE_LEASE_LOST,
        a,
        lease_id=lease.lease_id,
        worker_id=lease.worker.worker_id,
        message=f"{why}; the other attempt continues",
        reason=pb.EVENT_REASON_HEDGE_ENDED,
    )
    return True


def cancel_sibling(st: SchedulerState, a: ActionRecord, won: LeaseRecord, out: Outcome) -> None:
    """Before ``won``'s result commits, cancels the attempt that lost the race (its lease
    ends, fenced, when the commit is applied)."""
    for lease in (a.lease, a.hedge):
        if lease is not None and lease is not won and lease.worker.connected:
            out.cancel(
                lease.worker.session_id,
                lease,
                wpb.CANCEL_REASON_SUPERSEDED,
                "another attempt of this action committed first",
            )
