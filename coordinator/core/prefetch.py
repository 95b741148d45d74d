"""Prefetch: leases granted beyond a worker's free slots, and taking them back (pure core).

At one slot per worker every action otherwise pays a whole serial round trip (result, commit,
grant, start) during which the worker idles. A worker that asks for it (``Hello.prefetch``) may
instead hold up to ``Welcome.prefetch`` slots' worth of leases beyond its credited free slots;
it queues them and starts each the moment a slot frees. The rules:

* **Free slots first.** Dispatch fills every worker's free slots before it prefetches anything
  (:func:`candidates` feeds its second pass), and hands prefetched leases out one at a time
  round the workers, so a short queue is spread rather than piled on the first worker.
* **Adaptive depth.** How far beyond its free slots a worker is granted follows its recent
  attempts: enough work to cover :data:`HORIZON` seconds of its slots (``slots x HORIZON /
  mean run time``), at least one slot's worth, at most ``Welcome.prefetch``. Until the first
  result it is ``min(slots, Welcome.prefetch)``. No-ops at one slot get the whole limit; minute
  long actions one lease.
* **Not to a worker that loses leases.** A worker that lost a lease (expired, self-fenced,
  not re-adopted, not reported) gets no prefetch for ten lease TTLs, so a flapping link costs
  what the worker runs, not a queue as well. (A lease that expires, or is handed back, before
  its start was reported is not charged to its action's lease-loss budget: it never ran.)
* **A queued lease is a lease.** It is granted with a fencing token, renewed by heartbeats,
  reconciled, lost on expiry and self-fenced like any other; the worker runs at most ``slots``
  at once. Its resources and semaphores are held from the grant.
* **No head-of-line blocking.** A lease its worker has not reported started
  :data:`RECLAIM_AFTER` seconds after the grant, while another worker that may be leased to has
  free slots it fits, is asked back (``CANCEL_REASON_RECLAIMED``). A worker that has not
  started it hands it back as a ``CANCELLED`` result without running it: the lease ends
  uncharged (``LEASE_LOST``, ``EVENT_REASON_RECLAIMED``) and the action goes to the free worker.
  One that has started it ignores the request; its start report says so.

Like the rest of the core this does no I/O and reads no clock.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from plait.coordinator.core import liveness
from plait.coordinator.core.model import ActionRecord, LeaseRecord, Outcome, WorkerRecord
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb

if TYPE_CHECKING:
    from plait.coordinator.core.state import SchedulerState

E = pb  # EVENT_REASON_* as module constants
HORIZON = 0.05  # seconds of a worker's slots its prefetch depth aims to cover
RECLAIM_AFTER = 0.5  # seconds a granted lease may wait unstarted before it is asked back
_ALPHA = 0.2  # weight of the newest run time in the worker's mean
RECLAIMED = "handed back unstarted: a worker with a free slot can run it now (prefetch)"


def welcome(st: SchedulerState, w: WorkerRecord, hello: wpb.Hello) -> int:
    """Sets the session's prefetch limit and first depth; returns ``Welcome.prefetch``."""
    w.prefetch = min(hello.prefetch, st.config.max_prefetch)
    w.depth = min(w.slots, w.prefetch)
    return w.prefetch


def ran(w: WorkerRecord, seconds: float) -> None:
    """An attempt of ``w`` ran ``seconds``: updates its mean run time and prefetch depth."""
    if not w.prefetch:
        return
    mean = seconds if w.mean_run < 0 else w.mean_run + _ALPHA * (seconds - w.mean_run)
    w.mean_run = mean
    want = w.slots * HORIZON / mean if mean > 0 else math.inf
    w.depth = w.prefetch if want >= w.prefetch else max(1, math.ceil(want))


def queued(w: WorkerRecord) -> int:
    """Slots' worth of leases granted beyond the worker's free slots (its queue, at most)."""
    return max(0, -w.free)


def candidates(st: SchedulerState) -> list[WorkerRecord]:
    """Workers that may be granted one more lease beyond their free slots now: not one that
    lost a lease lately (its queue would only be lost with it)."""
    quiet = st.no_prefetch_until
    return [
        w
        for w in st.workers.values()
        if w.depth > 0
        and w.free > -w.depth
        and (not quiet or quiet.get(w.worker_id, 0.0) <= st.now)
        and liveness.may_lease(st, w)
    ]


def reclaim(st: SchedulerState, out: Outcome) -> None:
    """Asks back leases waiting unstarted in a worker's queue while another worker is free."""
    quiet = st.no_prefetch_until
    for worker_id in [k for k, until in quiet.items() if until <= st.now]:
        del quiet[worker_id]
    holders = [w for w in st.workers.values() if w.free < 0 and w.connected and w.leases]
    if not holders:
        return
    idle = [w for w in st.workers.values() if w.free > 0 and liveness.may_lease(st, w)]
    if not idle:
        return
    room = {w.worker_id: w.free for w in idle}
    horizon = st.now - RECLAIM_AFTER
    for w in holders:
        asked = sum(1 for lease in w.leases.values() if lease.reclaiming and not lease.started)
        if asked >= queued(w):
            continue  # its queue is being asked back already
        waiting = [
            lease
            for lease in w.leases.values()
            if not lease.started and not lease.reclaiming and lease.granted_at <= horizon
        ]
        # The newest first: they are the back of the worker's queue, the last it would start.
        for lease in sorted(waiting, key=lambda lease: -lease.granted_at)[: queued(w) - asked]:
            taker = _taker(lease.action, w, idle, room)
            if taker is None:
                continue
            room[taker.worker_id] -= lease.slots
            lease.reclaiming = True
            out.cancel(w.session_id, lease, wpb.CANCEL_REASON_RECLAIMED, RECLAIMED)


def _taker(
    a: ActionRecord, holder: WorkerRecord, idle: list[WorkerRecord], room: dict[str, int]
) -> WorkerRecord | None:
    """Another idle worker that could run ``a`` (slots, handler or exec, selector)."""
    spec = a.spec
    for x in idle:
        if x is holder or room[x.worker_id] < a.slots:
            continue
        if spec.handler:
            if spec.handler not in x.handlers:
                continue
        elif not x.exec_enabled:
            continue
        if spec.selector and not all(x.labels.get(k) == v for k, v in spec.selector.items()):
            continue
        return x
    return None


def handed_back(lease: LeaseRecord) -> bool:
    """Whether a CANCELLED result of ``lease`` is its worker handing a reclaimed lease back
    (asked back, never reported started), rather than the worker giving up a running attempt."""
    return lease.reclaiming and not lease.started
