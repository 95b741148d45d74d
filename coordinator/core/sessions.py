"""Leases (pure core, the lease aggregate of SchedulerState).

Functions here take the :class:`~plait.coordinator.core.state.SchedulerState` and an
:class:`Outcome`; like the rest of the core they do no I/O. Granting (a new fencing token,
durable before the grant is sent), losing (fence the holder, re-queue within the lease-loss
budget), expiry, run and progress timeouts. The rules they implement:

* a lease lives ``lease_ttl`` after the later of its grant and the worker's last heartbeat,
  judged on the coordinator's monotonic clock;
* fencing tokens only grow; each token remembers the worker it was granted to, so only that
  worker's late result is journalled as stale.

Stream messages are :mod:`~plait.coordinator.core.workers`'; results
:mod:`~plait.coordinator.core.results`'.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

from google.protobuf import duration_pb2
from google.rpc import code_pb2, status_pb2

from plait.coordinator.core import attempts, hedges, lease_size, limits, liveness
from plait.coordinator.core import transitions as t
from plait.coordinator.core.model import (
    ActionRecord,
    LeaseRecord,
    Outcome,
    WorkerRecord,
)
from plait.coordinator.core.workflow_env import add_workflow_env
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb

if TYPE_CHECKING:
    from plait.coordinator.core.state import SchedulerState

E = pb  # EVENT_TYPE_* as module constants: enum-wrapper attribute access is slow
O = wpb  # noqa: E741  (ACTION_OUTCOME_* constants)
R = wpb  # CANCEL_REASON_* constants
UNDELIVERED = "granted just before a coordinator restart; the worker never had it"
UNDELIVERED_STREAM = "granted as the worker's stream broke; the worker never had it"
# Lease losses that are nobody's fault, so not charged to the lease-loss budget.
UNCHARGED: frozenset[int] = frozenset(
    {
        E.EVENT_REASON_UNDELIVERED,
        E.EVENT_REASON_WORKER_REVOKED,
        E.EVENT_REASON_HEDGE_ENDED,
        E.EVENT_REASON_RECLAIMED,
    }
)


# Losses that say nothing about the action when its start was never reported: the lease
# expired, or the worker handed it back, before it ran. (A worker that comes back as a new
# process without it, NOT_READOPTED, is still charged: an action that kills its worker at once
# may do so before its start report leaves.)
NEVER_RAN: frozenset[int] = frozenset({E.EVENT_REASON_LEASE_EXPIRED, E.EVENT_REASON_SELF_FENCED})


def charged(why: int, started: bool = True) -> bool:
    """Whether a lease lost for ``why`` (an EventReason) counts against the lease-loss budget;
    ``started``: whether the lease's start was reported (ACTION_STARTED)."""
    return why not in UNCHARGED and (started or why not in NEVER_RAN)


def lease_id_for(workflow_id: str, action_id: str, token: int) -> str:
    """The id of an action's lease with fencing ``token``: ``workflow/action/token``."""
    return f"{workflow_id}/{action_id}/{token}"


def action_for_lease_id(st: SchedulerState, lease_id: str) -> ActionRecord | None:
    """The action a lease id (``workflow/action/token``) names, if it exists."""
    parts = lease_id.rsplit("/", 2)
    if len(parts) != 3:
        return None
    wf = st.workflows.get(parts[0])
    return wf.actions.get(parts[1]) if wf is not None else None


def grant(
    st: SchedulerState,
    w: WorkerRecord,
    a: ActionRecord,
    out: Outcome,
    *,
    hedge: bool = False,
    inputs: tuple[str, int] | None = None,
) -> None:
    """Leases ``a`` to ``w`` with a new fencing token; the grant is sent after the commit.

    ``hedge``: a second attempt beside the running one (speculation); the state stays.
    ``inputs``: the lease's inputs and size, when dispatch has built (and checked) them.
    """
    inputs_json, lease_bytes = inputs or lease_size.lease_inputs(st, a)
    token = a.token + 1
    wf_id = a.workflow.workflow_id
    lease_id = lease_id_for(wf_id, a.spec.id, token)
    g = out.grant(w, lease_bytes)  # first: the lease remembers the grant's sequence
    st.emit(
        a.workflow,
        E.EVENT_TYPE_ACTION_LEASED,
        a,
        action_state=a.state if hedge else t.LEASED,
        attempt=a.attempt + 1,
        fencing_token=token,
        worker_id=w.worker_id,
        lease_id=lease_id,
    )
    w.free -= a.slots  # the worker's credit: session state, not journalled
    lp = g.leases.add(
        lease_id=lease_id,
        workflow_id=wf_id,
        action_id=a.spec.id,
        attempt=a.attempt,
        fencing_token=a.token,
        inputs_json=inputs_json,
        idempotency_key=a.key,
    )
    lp.action.CopyFrom(a.spec)
    lp.action.slots = a.slots  # the effective value: an unset spec means 1
    add_workflow_env(lp.action, a.workflow.spec.env)
    lp.ttl.CopyFrom(st._ttl_pb)


def record_holder(a: ActionRecord, token: int, worker_id: str) -> None:
    """Remembers which worker a token was granted to (who may report on it later)."""
    if a.holders is None:
        a.holders = {}
    a.holders[token] = worker_id


def arm_progress(st: SchedulerState, lease: LeaseRecord) -> None:
    """Schedules the heartbeat_timeout check of a lease whose action asks for one."""
    spec = lease.action.spec
    if spec.HasField("heartbeat_timeout"):
        hb = spec.heartbeat_timeout.ToTimedelta().total_seconds()
        heapq.heappush(
            st.progress_deadlines, (lease.last_progress + hb, st.sequence, lease.lease_id)
        )


def check_progress(st: SchedulerState, lease_id: str, out: Outcome) -> None:
    """Fails an attempt that reported no progress within its heartbeat_timeout."""
    lease = st.leases.get(lease_id)
    if lease is None:
        return
    hb = lease.action.spec.heartbeat_timeout.ToTimedelta().total_seconds()
    if lease.last_progress + hb > st.now:  # progress arrived since: check again later
        arm_progress(st, lease)
        return
    why = f"no progress for {hb:g}s (heartbeat_timeout)"
    time_out(st, lease, E.EVENT_REASON_PROGRESS_TIMEOUT, why, out)


def drop_lease(st: SchedulerState, lease: LeaseRecord) -> None:
    """Forgets a lease everywhere (it is no longer live) and releases what it held."""
    if st.leases.pop(lease.lease_id, None) is not None:
        limits.release(st, lease)
    lease.worker.leases.pop(lease.lease_id, None)
    a = lease.action
    if a.lease is lease:  # a hedge, if any, becomes the primary
        a.lease, a.hedge = a.hedge, None
    elif a.hedge is lease:
        a.hedge = None


def lose_lease(
    st: SchedulerState,
    lease: LeaseRecord,
    why: int,
    reason: str,
    out: Outcome,
    *,
    cancel: bool,
    restore_credit: bool = False,
) -> None:
    """A lease is lost for ``why`` (an EventReason; ``reason`` in words): fence the holder,
    then re-queue the action (or fail it past its lease-loss budget)."""
    if st.leases.get(lease.lease_id) is not lease:
        return  # dropped already: a loss earlier in the same loop failed a fail_fast workflow
    w = lease.worker
    if restore_credit:
        w.free = min(w.slots, w.free + lease.slots)
    if cancel and w.connected:
        out.cancel(w.session_id, lease, R.CANCEL_REASON_SUPERSEDED, reason)
    if hedges.end_one(st, lease, reason, out, cancel=False):
        return
    requeue_after_loss(st, lease, why, reason, out)


def requeue_after_loss(
    st: SchedulerState, lease: LeaseRecord, why: int, reason: str, out: Outcome
) -> None:
    """Re-queues an action whose lease was lost, or fails it once a charged loss passes its
    lease-loss budget (losses for an UNCHARGED reason never do)."""
    a, worker_id = lease.action, lease.worker.worker_id
    lease_id = lease.lease_id
    out.observe("lease_lost", worker_id=worker_id, detail=reason, reason=why, lease_id=lease_id)
    liveness.lost(st, worker_id, why)
    budget = st.config.lease_loss_budget
    losses = a.lease_losses + charged(why, lease.started)
    if losses > budget:
        err = status_pb2.Status(
            code=code_pb2.UNAVAILABLE,
            message=f"lost {losses} leases (lease_loss_budget {budget}); last: {reason}",
        )
        st.finish_action(
            a,
            t.FAILED,
            E.EVENT_TYPE_ACTION_FINISHED,
            out,
            why=E.EVENT_REASON_LEASE_LOSS_BUDGET,
            error=err,
            reason=err.message,
            worker_id=worker_id,
            lease_id=lease.lease_id,
        )
        return
    st.make_ready(
        a,
        E.EVENT_TYPE_LEASE_LOST,
        message=reason,
        reason=why,
        worker_id=worker_id,
        lease_id=lease.lease_id,
    )


def expire_leases(st: SchedulerState, out: Outcome) -> None:
    """Loses every lease not renewed within the TTL; forgets departed workers."""
    now, ttl = st.now, st.ttl
    for w in list(st.workers.values()):
        if w.leases and now - w.last_renewed > ttl:
            for lease in list(w.leases.values()):
                if max(lease.granted_at, w.last_renewed) + ttl < now:
                    lose_lease(
                        st,
                        lease,
                        E.EVENT_REASON_LEASE_EXPIRED,
                        f"lease expired: no heartbeat for {ttl:g}s",
                        out,
                        cancel=True,
                    )
        if not w.connected and not w.leases and st.workers.get(w.worker_id) is w:
            del st.workers[w.worker_id]


def on_run_timeout(st: SchedulerState, lease_id: str, out: Outcome) -> None:
    lease = st.leases.get(lease_id)
    if lease is None:
        return
    seconds = attempts.run_timeout(lease.action)
    time_out(st, lease, E.EVENT_REASON_RUN_TIMEOUT, f"run timeout of {seconds:g}s exceeded", out)


def time_out(st: SchedulerState, lease: LeaseRecord, why: int, reason: str, out: Outcome) -> None:
    """An attempt ran out of time (``why``: RUN_TIMEOUT or PROGRESS_TIMEOUT): fence it, then
    retry or end the action TIMED_OUT."""
    a = lease.action
    msg = f"{reason} (attempt {lease.attempt})"
    if lease.worker.connected:
        out.cancel(lease.worker.session_id, lease, R.CANCEL_REASON_TIMEOUT, msg)
    if hedges.end_one(st, lease, reason, out, cancel=False):
        return
    err = status_pb2.Status(code=code_pb2.DEADLINE_EXCEEDED, message=msg)
    if attempts.may_retry(a, 0, O.ACTION_OUTCOME_TIMED_OUT):
        retry(st, a, why, err, lease.worker.worker_id)
    else:
        st.finish_action(
            a,
            t.TIMED_OUT,
            E.EVENT_TYPE_ACTION_FINISHED,
            out,
            why=why,
            error=err,
            reason=msg,
            worker_id=lease.worker.worker_id,
            lease_id=lease.lease_id,
        )


def retry(
    st: SchedulerState,
    a: ActionRecord,
    why: int,
    err: status_pb2.Status,
    worker_id: str,
    res: wpb.ActionResult | None = None,
) -> None:
    """Schedules the next attempt after a failed one (``why``: how it failed), after a
    backoff the event carries, so replay waits it out too."""
    delay = st.retry_delay(a)
    backoff = duration_pb2.Duration()
    backoff.FromNanoseconds(int(delay * 1e9))
    st.make_ready(
        a,
        E.EVENT_TYPE_ACTION_RETRY_SCHEDULED,
        reason=why,
        error=err,
        error_type=res.error_type if res else "",
        worker_id=worker_id,
        message=f"attempt {a.attempt} failed; retrying in {delay:.3g}s",
        exit_code=res.exit_code if res else 0,
        stdout_tail=res.stdout_tail if res else "",
        stderr_tail=res.stderr_tail if res else "",
        backoff=backoff,
    )
