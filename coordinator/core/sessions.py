"""Worker sessions, leases and results (pure core, the worker aggregate of SchedulerState).

Functions here take the :class:`~plait.coordinator.core.state.SchedulerState` and an
:class:`Outcome`; like the rest of the core they do no I/O. The rules they implement:

* a lease lives ``lease_ttl`` after the later of its grant and the worker's last heartbeat,
  judged on the coordinator's monotonic clock;
* a result commits only if its fencing token is the action's current one (compare-and-set);
  the same result twice gets the same ack; an older token is refused and counted;
* heartbeats list every lease held, and reconciliation runs both ways;
* a reconnecting worker re-adopts the leases whose tokens are still current.
"""

from __future__ import annotations

import heapq
import hmac
import json
from typing import TYPE_CHECKING, Any

from google.rpc import code_pb2, error_details_pb2, status_pb2

from plait.coordinator.core import hedges, limits
from plait.coordinator.core import transitions as t
from plait.coordinator.core.events import DrainRequested, WorkerMessageReceived, WorkerStreamClosed
from plait.coordinator.core.model import (
    ActionRecord,
    LeaseRecord,
    Outcome,
    WorkerRecord,
)
from plait.errors import ERROR_DOMAIN
from plait.hlc import ClockOffsetError, HlcTimestamp
from plait.v1 import hlc_pb2
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb

if TYPE_CHECKING:
    from plait.coordinator.core.state import SchedulerState

E = pb  # EVENT_TYPE_* as module constants: enum-wrapper attribute access is slow
O = wpb  # noqa: E741  (ACTION_OUTCOME_* constants)
R = wpb  # CANCEL_REASON_* constants
OK = status_pb2.Status(code=code_pb2.OK)
UNDELIVERED = "granted just before a coordinator restart; the worker never had it"
MAX_OUTPUT_BYTES = 1024 * 1024
LEASE_NOT_HELD = "LEASE_NOT_HELD"


def on_worker_message(st: SchedulerState, s: WorkerMessageReceived, out: Outcome) -> None:
    """Routes one stream message; the servicer guarantees the first one is ``hello``."""
    st._out = out
    msg = s.message
    kind = msg.WhichOneof("message")
    if kind == "hello":
        on_hello(st, s, out)
        return
    w = st.by_session.get(s.session_id)
    if w is None:  # replaced by a newer session of the same worker: ignore its stragglers
        return
    w.last_seen = st.now
    remote = observe_hlc(st, w, msg, out)
    if kind == "action_finished":
        finished = msg.action_finished
        for res in finished.results:
            on_result(st, w, s.session_id, res, remote, out)
        if finished.credit:
            w.free = min(w.slots, w.free + finished.credit)
    elif kind == "heartbeat":
        on_heartbeat(st, w, msg.heartbeat, out)
    elif kind == "credit":
        w.free = min(w.slots, w.free + msg.credit.slots)
    elif kind == "action_started":
        on_started(st, w, msg.action_started, remote, out)
    elif kind == "goodbye":
        w.draining = True
        w.said_goodbye = True
    elif kind == "action_progress":
        for p in msg.action_progress.leases:
            lease = w.leases.get(p.lease_id)
            if lease is not None and lease.token == p.fencing_token:
                lease.last_progress = st.now
            else:
                refuse_report(st, w, p.lease_id, p.fencing_token, "progress", out)


def not_held_status(st: SchedulerState, lease_id: str, token: int) -> status_pb2.Status:
    """FAILED_PRECONDITION for a report about a lease the reporting session does not hold.

    Names the lease and its holder (the worker id, or "nobody" once it has ended), with a
    ``google.rpc.ErrorInfo`` (reason LEASE_NOT_HELD) so workers match on details, not text.
    """
    live = st.leases.get(lease_id)
    a = action_for_lease_id(st, lease_id)
    if live is not None and live.token == token:
        holder = live.worker.worker_id
    elif a is not None and a.holders and token in a.holders:
        holder = a.holders[token] + " (ended)"
    else:
        holder = "nobody"
    status = status_pb2.Status(
        code=code_pb2.FAILED_PRECONDITION,
        message=f"lease {lease_id!r} (token {token}) is not held by this session; holder: {holder}",
    )
    info = error_details_pb2.ErrorInfo(reason=LEASE_NOT_HELD, domain=ERROR_DOMAIN)
    info.metadata["lease_id"] = lease_id
    info.metadata["holder"] = holder
    status.details.add().Pack(info)
    return status


def refuse_report(
    st: SchedulerState, w: WorkerRecord, lease_id: str, token: int, what: str, out: Outcome
) -> None:
    """Answers a start or progress report for a lease this session does not hold.

    Nothing is journalled: the report is not the holder's, so no workflow's history changes.
    """
    status = not_held_status(st, lease_id, token)
    ref = out.ack(w.session_id).refused.add(lease_id=lease_id, fencing_token=token)
    ref.status.CopyFrom(status)
    out.observe("report_refused", worker_id=w.worker_id, detail=what, lease_id=lease_id)


def on_started(
    st: SchedulerState,
    w: WorkerRecord,
    started: wpb.ActionStarted,
    remote: HlcTimestamp,
    out: Outcome,
) -> None:
    """Attempts the worker started: LEASED -> RUNNING, journalled with the worker's stamp.

    A start for a lease this session does not hold is refused (``Ack.refused``), unjournalled.
    """
    for r in started.leases:
        lease = w.leases.get(r.lease_id)
        if lease is None or lease.token != r.fencing_token:
            refuse_report(st, w, r.lease_id, r.fencing_token, "started", out)
            continue
        if not lease.started:
            lease.started = True
            a = lease.action
            if a.state == t.LEASED:  # a hedge may start while the other attempt runs
                st.set_state(a, t.RUNNING)
            ev = st.record(
                a.workflow,
                E.EVENT_TYPE_ACTION_STARTED,
                a,
                worker_id=w.worker_id,
                lease_id=lease.lease_id,
            )
            ev.worker_hlc.physical_ms, ev.worker_hlc.logical = remote


def observe_hlc(
    st: SchedulerState, w: WorkerRecord, msg: wpb.ConnectRequest, out: Outcome
) -> HlcTimestamp:
    """Merges the worker's HLC unless it is too far ahead (then counts it)."""
    remote = HlcTimestamp(msg.hlc.physical_ms, msg.hlc.logical)
    w.last_hlc = remote
    try:
        st.hlc.observe(remote)
    except ClockOffsetError as e:
        w.clock_rejections += 1
        out.observe("clock_offset", worker_id=w.worker_id, value=e.offset_ms)
    return remote


def may_replace(old: WorkerRecord, s: WorkerMessageReceived) -> bool:
    """Whether a new stream may take over a live session of the same worker id.

    Only a stream authenticated as that worker (its certificate or token names it) or one
    that presents the live session's resume token (the same worker process reconnecting before
    the old stream's death was noticed). Anyone else could otherwise evict a worker and adopt
    its leases just by saying its name.
    """
    hello = s.message.hello
    if s.identity and s.identity == hello.worker_id:
        return True
    token = hello.resume_token
    return bool(token) and bool(old.resume_token) and hmac.compare_digest(token, old.resume_token)


def on_hello(st: SchedulerState, s: WorkerMessageReceived, out: Outcome) -> None:
    """Welcomes a worker: re-adopts what it still runs, kills what it must not."""
    msg = s.message
    session_id = s.session_id
    hello = msg.hello
    revoked = st.revoked.get(hello.worker_id)
    if revoked is not None:
        out.close(session_id, code_pb2.PERMISSION_DENIED, revoked.refusal(hello.worker_id))
        out.observe("hello_refused", worker_id=hello.worker_id, detail=s.peer)
        return
    old = st.workers.get(hello.worker_id)
    if old is not None and old.connected:
        if not may_replace(old, s):
            out.close(
                session_id,
                code_pb2.ALREADY_EXISTS,
                f"worker id {hello.worker_id!r} is connected (session {old.session_id}); a new"
                " stream may replace it only when authenticated as that worker or with the"
                " live session's resume token",
            )
            out.observe("hello_refused", worker_id=hello.worker_id, detail=s.peer)
            return
        # The same worker, proven, reconnecting before the old stream's death was noticed.
        st.by_session.pop(old.session_id, None)
        out.close(
            old.session_id,
            code_pb2.ABORTED,
            f"replaced by session {session_id} of worker {hello.worker_id!r}"
            + (f" from {s.peer}" if s.peer else ""),
        )
    w = WorkerRecord(
        worker_id=hello.worker_id,
        session_id=session_id,
        hello=hello,
        labels=dict(hello.labels),
        handlers=frozenset(hello.handlers),
        exec_enabled=hello.exec_enabled,
        resources=dict(hello.resources),
        slots=hello.slots,
        free=hello.slots,
        connected_at_wall_ms=st.hlc.last.physical_ms,
        last_renewed=st.now,
        last_seen=st.now,
        resume_token=s.resume_token,
        identity=s.identity,
    )
    st.workers[w.worker_id] = w
    st.by_session[session_id] = w
    observe_hlc(st, w, msg, out)
    reported = {r.lease_id: r for r in hello.running}
    if old is not None:
        w.clock_rejections = old.clock_rejections
        replayed = old.session_id == ""  # known only from the journal: we restarted
        for lease in list(old.leases.values()):
            if lease.lease_id in reported:
                continue
            if replayed:
                # Journalled, then the coordinator stopped before (or while) sending it: the
                # worker never had it. Not the worker's fault, so not charged to the budget.
                lose_lease(st, lease, UNDELIVERED, out, cancel=False, charge=False)
            else:
                lose_lease(st, lease, "worker reconnected without it", out, cancel=False)
    welcome_msg = wpb.ConnectResponse()
    welcome = welcome_msg.welcome
    welcome.heartbeat_interval.FromTimedelta(st.config.heartbeat_interval)
    welcome.lease_ttl.FromTimedelta(st.config.lease_ttl)
    welcome.kill_grace.FromTimedelta(st.config.kill_grace)
    welcome.session_id = session_id
    welcome.resume_token = s.resume_token
    for r in hello.running:
        w.free -= r.slots  # 0 for a finished attempt whose result is not yet acked
        held = st.leases.get(r.lease_id)
        if (
            held is not None
            and held.token == r.fencing_token
            and held.worker.worker_id == w.worker_id
        ):
            held.worker = w
            held.grant_seq = 0
            w.leases[held.lease_id] = held
            welcome.adopted.append(r)
        else:
            welcome.kill.append(r)
    # `free` may start negative (a worker that came back with fewer slots than it still runs):
    # its credits pay the deficit off before anything new is leased.
    out.send(session_id, welcome_msg)
    out.observe("worker_connected", worker_id=w.worker_id)


def on_heartbeat(st: SchedulerState, w: WorkerRecord, hb: wpb.Heartbeat, out: Outcome) -> None:
    """Renews every lease the worker holds and reconciles both ways."""
    w.last_renewed = st.now
    reported = {r.lease_id: r.fencing_token for r in hb.leases}
    for lease in list(w.leases.values()):
        if lease.lease_id not in reported and lease.grant_seq <= hb.last_grant_sequence:
            # Granted, delivered (by sequence), yet not held: the worker never ran it.
            lose_lease(
                st, lease, "worker did not report the lease", out, cancel=False, restore_credit=True
            )
    for lease_id, token in reported.items():
        if lease_id in w.leases:
            continue
        a = action_for_lease_id(st, lease_id)
        if a is not None and a.committed_token == token:
            continue  # finished; its ack is on the way
        why = (
            R.CANCEL_REASON_SUPERSEDED
            if a is not None and a.token > token
            else (R.CANCEL_REASON_UNKNOWN_LEASE)
        )
        cancel = wpb.ConnectResponse()
        cancel.cancel_lease.leases.add(
            lease_id=lease_id,
            fencing_token=token,
            reason=why,
            message="the coordinator does not hold this lease for you",
        )
        out.send(w.session_id, cancel)
    out.ack(w.session_id).heartbeat_sequence = hb.sequence


def action_for_lease_id(st: SchedulerState, lease_id: str) -> ActionRecord | None:
    """The action a lease id (``workflow/action/token``) names, if it exists."""
    parts = lease_id.rsplit("/", 2)
    if len(parts) != 3:
        return None
    wf = st.workflows.get(parts[0])
    return wf.actions.get(parts[1]) if wf is not None else None


def grant(
    st: SchedulerState, w: WorkerRecord, a: ActionRecord, out: Outcome, *, hedge: bool = False
) -> None:
    """Leases ``a`` to ``w`` with a new fencing token; the grant is sent after the commit.

    ``hedge``: a second attempt beside the running one (speculation); the state stays.
    """
    a.token += 1
    a.attempt += 1
    wf_id = a.workflow.workflow_id
    lease_id = f"{wf_id}/{a.spec.id}/{a.token}"
    if w.session_id not in out._grants:
        w.grant_seq += 1
    g = out.grant(w.session_id, w.grant_seq)
    lease = LeaseRecord(lease_id, a, w, a.token, a.attempt, w.grant_seq, st.now, a.slots)
    if hedge:
        a.hedge = lease
    else:
        st.set_state(a, t.LEASED)
        a.lease = lease
    a.worker_id = w.worker_id
    record_holder(a, a.token, w.worker_id)
    w.leases[lease_id] = lease
    st.leases[lease_id] = lease
    w.free -= a.slots
    limits.acquire(st, lease)
    lease.last_progress = st.now
    st.record(a.workflow, E.EVENT_TYPE_ACTION_LEASED, a, worker_id=w.worker_id, lease_id=lease_id)
    lp = g.leases.add(
        lease_id=lease_id,
        state=wpb.LeaseState.LEASE_STATE_PENDING,
        workflow_id=wf_id,
        action_id=a.spec.id,
        attempt=a.attempt,
        fencing_token=a.token,
        inputs_json=st.inputs_json(a),
        idempotency_key=a.key,
    )
    lp.action.CopyFrom(a.spec)
    lp.ttl.CopyFrom(st._ttl_pb)
    timeout = st.run_timeout(a)
    if timeout > 0:
        heapq.heappush(st.deadlines, (st.now + timeout, st.sequence, lease_id))
    arm_progress(st, lease)
    if not hedge:
        hedges.arm(st, lease)


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
    time_out(st, lease, f"no progress for {hb:g}s (heartbeat_timeout)", out)


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
    reason: str,
    out: Outcome,
    *,
    cancel: bool,
    restore_credit: bool = False,
    charge: bool = True,
) -> None:
    """A lease is lost: fence the holder, then re-queue the action (or fail it past budget)."""
    if hedges.end_one(st, lease, reason, out):
        return
    drop_lease(st, lease)
    w = lease.worker
    if restore_credit:
        w.free = min(w.slots, w.free + lease.slots)
    if cancel and w.connected:
        out.cancel(w.session_id, lease, R.CANCEL_REASON_SUPERSEDED, reason)
    requeue_after_loss(st, lease.action, reason, w.worker_id, out, charge=charge)


def requeue_after_loss(
    st: SchedulerState,
    a: ActionRecord,
    reason: str,
    worker_id: str,
    out: Outcome,
    *,
    charge: bool = True,
) -> None:
    """Re-queues an action whose lease was lost (charged to its lease-loss budget)."""
    if charge:
        a.lease_losses += 1
    out.observe("lease_lost", worker_id=worker_id, detail=reason)
    budget = st.config.lease_loss_budget
    if a.lease_losses > budget:
        err = status_pb2.Status(
            code=code_pb2.UNAVAILABLE,
            message=f"lost {a.lease_losses} leases (lease_loss_budget {budget}); last: {reason}",
        )
        st.finish_action(
            a,
            t.FAILED,
            E.EVENT_TYPE_ACTION_FINISHED,
            error=err,
            reason=err.message,
            worker_id=worker_id,
        )
        return
    a.not_before = 0.0
    st.make_ready(a, E.EVENT_TYPE_LEASE_LOST, message=reason, worker_id=worker_id)


def expire_leases(st: SchedulerState, out: Outcome) -> None:
    """Loses every lease not renewed within the TTL; forgets departed workers."""
    now, ttl = st.now, st.ttl
    for w in list(st.workers.values()):
        if w.leases and now - w.last_renewed > ttl:
            for lease in list(w.leases.values()):
                if max(lease.granted_at, w.last_renewed) + ttl < now:
                    lose_lease(
                        st, lease, f"lease expired: no heartbeat for {ttl:g}s", out, cancel=True
                    )
        if not w.connected and not w.leases and st.workers.get(w.worker_id) is w:
            del st.workers[w.worker_id]


def on_run_timeout(st: SchedulerState, lease_id: str, out: Outcome) -> None:
    lease = st.leases.get(lease_id)
    if lease is None:
        return
    seconds = st.run_timeout(lease.action)
    time_out(st, lease, f"run timeout of {seconds:g}s exceeded", out)


def time_out(st: SchedulerState, lease: LeaseRecord, why: str, out: Outcome) -> None:
    """An attempt ran out of time: fence it, then retry or end the action TIMED_OUT."""
    if hedges.end_one(st, lease, why, out):
        return
    a = lease.action
    lease_id = lease.lease_id
    drop_lease(st, lease)
    msg = f"{why} (attempt {a.attempt})"
    if lease.worker.connected:
        out.cancel(lease.worker.session_id, lease, R.CANCEL_REASON_TIMEOUT, msg)
    err = status_pb2.Status(code=code_pb2.DEADLINE_EXCEEDED, message=msg)
    a.failures += 1
    if st.may_retry(a, 0, O.ACTION_OUTCOME_TIMED_OUT):
        retry(st, a, err, lease.worker.worker_id)
    else:
        st.finish_action(
            a,
            t.TIMED_OUT,
            E.EVENT_TYPE_ACTION_FINISHED,
            error=err,
            reason=msg,
            worker_id=lease.worker.worker_id,
            lease_id=lease_id,
        )


def retry(
    st: SchedulerState,
    a: ActionRecord,
    err: status_pb2.Status,
    worker_id: str,
    res: wpb.ActionResult | None = None,
) -> None:
    delay = st.retry_delay(a)
    a.not_before = st.now + delay
    st.make_ready(
        a,
        E.EVENT_TYPE_ACTION_RETRY_SCHEDULED,
        error=err,
        worker_id=worker_id,
        message=f"attempt {a.attempt} failed; retrying in {delay:.3g}s",
        exit_code=res.exit_code if res else 0,
        stdout_tail=res.stdout_tail if res else "",
        stderr_tail=res.stderr_tail if res else "",
    )
    st._out.records[-1].backoff.FromNanoseconds(int(delay * 1e9))


def _refuse(
    st: SchedulerState, w: WorkerRecord, res: wpb.ActionResult, ack: wpb.ResultAck, out: Outcome
) -> None:
    """Answers a result that cannot commit; journals it only when it is the holder's own."""
    a = action_for_lease_id(st, res.lease_id)
    token = res.fencing_token
    holder = a.holders.get(token) if a is not None and a.holders else None
    if holder != w.worker_id:
        # Not a result this worker was ever granted (a forged lease id, a guessed token):
        # refused without a word in any workflow's history.
        ack.status.CopyFrom(not_held_status(st, res.lease_id, token))
        out.observe("report_refused", worker_id=w.worker_id, detail="result", lease_id=res.lease_id)
        return
    if a is not None and a.committed_token == token and token:
        ack.status.code = code_pb2.OK  # the same result again: the same ack
        return
    if a is None:
        message = f"unknown lease {res.lease_id!r}"
    elif a.token > token:
        message = f"lease token {token} superseded by {a.token}"
    else:
        message = f"lease {res.lease_id!r} is no longer live (action {t.S.Name(a.state)})"  # type: ignore[arg-type]
    ack.status.code = code_pb2.FAILED_PRECONDITION
    ack.status.message = message
    out.observe("stale_result", worker_id=w.worker_id, detail=message, lease_id=res.lease_id)
    if a is not None:
        ev = st.record(
            a.workflow,
            E.EVENT_TYPE_STALE_RESULT_REFUSED,
            a,
            worker_id=w.worker_id,
            lease_id=res.lease_id,
            message=message,
        )
        ev.fencing_token = token
        ev.error.CopyFrom(ack.status)


def on_result(
    st: SchedulerState,
    w: WorkerRecord,
    session_id: str,
    res: wpb.ActionResult,
    remote: HlcTimestamp,
    out: Outcome,
) -> None:
    """Commits a result whose token is current; refuses stale ones (compare-and-set)."""
    ack = out.ack(session_id).results.add(lease_id=res.lease_id, fencing_token=res.fencing_token)
    lease = st.leases.get(res.lease_id)
    if lease is not None and lease.worker.session_id != session_id:
        # Live, but another session holds it: only the holder may report on a lease.
        ack.status.CopyFrom(not_held_status(st, res.lease_id, res.fencing_token))
        out.observe("report_refused", worker_id=w.worker_id, detail="result", lease_id=res.lease_id)
        return
    if lease is None or lease.token != res.fencing_token:
        _refuse(st, w, res, ack, out)
        return
    a = lease.action
    outcome = res.outcome
    out.observe(
        "action_duration",
        worker_id=w.worker_id,
        value=res.duration.ToNanoseconds() / 1e9,
        lease_id=lease.lease_id,
    )
    outputs = res.outputs_json or "{}"
    problem = check_outputs(outputs) if outcome == O.ACTION_OUTCOME_SUCCEEDED else None
    if (outcome != O.ACTION_OUTCOME_SUCCEEDED or problem) and a.hedge is not None:
        # Hedged: this attempt did not make it, but the other one still runs.
        ended = "failed" if problem is None else problem
        hedges.end_one(st, lease, f"attempt {lease.attempt} {ended}", out, cancel=False)
        return
    drop_lease(st, lease)
    a.worker_id = w.worker_id
    a.exit_code = res.exit_code
    if outcome == O.ACTION_OUTCOME_CANCELLED:
        # The worker gave the attempt up (self-fencing) while its lease was still current.
        requeue_after_loss(
            st, a, "the worker cancelled the attempt (self-fencing)", w.worker_id, out
        )
        return
    fields: dict[str, Any] = dict(
        worker_id=w.worker_id,
        lease_id=lease.lease_id,
        fencing_token=res.fencing_token,
        exit_code=res.exit_code,
        stdout_tail=res.stdout_tail,
        stderr_tail=res.stderr_tail,
        # The worker's own stamp, kept beside ours; it also marks the outcome as committed
        # from a result (replay restores committed_token from it).
        worker_hlc=hlc_pb2.HlcTimestamp(physical_ms=remote.physical_ms, logical=remote.logical),
    )
    error = res.error if res.HasField("error") else None
    if outcome == O.ACTION_OUTCOME_SUCCEEDED:
        if problem is None:
            hedges.observe(st, lease)
            hedges.cancel_sibling(st, a, out)  # a hedge race: the loser is fenced
            a.committed_token = res.fencing_token
            a.outputs_json = outputs
            st.finish_action(
                a, t.SUCCEEDED, E.EVENT_TYPE_ACTION_FINISHED, outputs_json=outputs, **fields
            )
            return
        outcome = O.ACTION_OUTCOME_FAILED
        error = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=problem)
    if error is None:
        error = status_pb2.Status(code=code_pb2.UNKNOWN, message=f"exit code {res.exit_code}")
    a.failures += 1
    if st.may_retry(a, res.exit_code, outcome, error):
        retry(st, a, error, w.worker_id, res)
        return
    a.committed_token = res.fencing_token
    state = t.TIMED_OUT if outcome == O.ACTION_OUTCOME_TIMED_OUT else t.FAILED
    st.finish_action(
        a, state, E.EVENT_TYPE_ACTION_FINISHED, error=error, reason=error.message, **fields
    )


def check_outputs(outputs: str) -> str | None:
    """Why outputs are unacceptable (size, not a JSON object), or None."""
    if len(outputs) > MAX_OUTPUT_BYTES:
        return f"outputs are {len(outputs)} bytes; the limit max_output_bytes is {MAX_OUTPUT_BYTES}"
    if outputs == "{}":
        return None
    try:
        value = json.loads(outputs)
    except ValueError as e:
        return f"outputs are not valid JSON: {e}"
    if not isinstance(value, dict):
        return "outputs must be a JSON object"
    return None


def on_stream_closed(st: SchedulerState, s: WorkerStreamClosed, out: Outcome) -> None:
    st._out = out
    w = st.by_session.pop(s.session_id, None)
    if w is None:
        return
    w.connected = False
    out.observe("worker_disconnected", worker_id=w.worker_id)
    if w.said_goodbye:
        for lease in list(w.leases.values()):
            lose_lease(st, lease, "worker left", out, cancel=False)
    # Otherwise its leases keep their TTL: the worker may come back and re-adopt them.
    if not w.leases and st.workers.get(w.worker_id) is w:
        del st.workers[w.worker_id]


def on_drain(st: SchedulerState, s: DrainRequested, out: Outcome) -> None:
    st._out = out
    w = st.workers.get(s.worker_id)
    if w is None or not w.connected:
        out.reply(s.reply, KeyError(s.worker_id))
        return
    w.draining = True
    msg = wpb.ConnectResponse()
    msg.drain.reason = "drain requested by an operator"
    out.send(w.session_id, msg)
    out.reply(s.reply, True)
