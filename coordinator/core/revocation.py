"""Revoked worker ids (pure core, the worker aggregate of SchedulerState).

An operator revokes a worker id when its host or credentials can no longer be trusted: its
stream ends ``PERMISSION_DENIED``, its leases are fenced and queued again at once (not charged
to the actions' lease-loss budgets: the worker did nothing wrong that the action should pay
for), and every later ``Hello`` with that id is refused until it is reinstated. The runtime
makes the revocation durable in the store before the core hears of it, and loads the set on
start, so a restart or a failover never lets a revoked worker back in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from google.rpc import code_pb2

from plait.coordinator.core import sessions
from plait.coordinator.core.events import WorkerReinstated, WorkerRevoked
from plait.coordinator.core.model import Outcome
from plait.v1 import workflow_pb2 as pb

if TYPE_CHECKING:
    from plait.coordinator.core.state import SchedulerState


def on_revoked(st: SchedulerState, s: WorkerRevoked, out: Outcome) -> None:
    """Cuts the worker off: fence and re-queue its leases, end its stream, refuse its id."""
    st.revoked[s.worker_id] = s.revocation
    w = st.workers.get(s.worker_id)
    was_connected = w is not None and w.connected
    requeued = 0
    if w is not None:
        for lease in list(w.leases.values()):
            sessions.lose_lease(
                st,
                lease,
                pb.EVENT_REASON_WORKER_REVOKED,
                f"worker revoked: {s.revocation.reason}",
                out,
                cancel=True,
            )
            requeued += 1
        if w.connected:
            st.by_session.pop(w.session_id, None)
            w.connected = False
            out.close(w.session_id, code_pb2.PERMISSION_DENIED, s.revocation.refusal(s.worker_id))
            out.observe("worker_disconnected", worker_id=w.worker_id)
        if st.workers.get(s.worker_id) is w:
            del st.workers[s.worker_id]
    out.reply(s.reply, (was_connected, requeued))


def on_reinstated(st: SchedulerState, s: WorkerReinstated, out: Outcome) -> None:
    """Accepts the worker id again."""
    out.reply(s.reply, st.revoked.pop(s.worker_id, None) is not None)
