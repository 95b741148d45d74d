"""Results and report refusals (pure core, the lease aggregate of SchedulerState).

A result commits only if it comes from the session holding the lease and its fencing token is
the action's current one (compare-and-set); the same result twice gets the same ack; an older
token from the worker that held it is refused, journalled and counted; a report from any other
session is refused with ``LEASE_NOT_HELD`` and journalled nowhere. Like the rest of the core
this does no I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from google.rpc import code_pb2, error_details_pb2, status_pb2

from plait.coordinator.core import attempts, hedges, liveness, prefetch
from plait.coordinator.core import transitions as t
from plait.coordinator.core.model import ActionRecord, Outcome, WorkerRecord
from plait.coordinator.core.sessions import (
    action_for_lease_id,
    requeue_after_loss,
    retry,
)
from plait.errors import ERROR_DOMAIN
from plait.hlc import HlcTimestamp
from plait.jsonlimits import outputs_problem
from plait.v1 import hlc_pb2
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb

if TYPE_CHECKING:
    from plait.coordinator.core.state import CoreConfig, SchedulerState

E = pb  # EVENT_TYPE_* as module constants: enum-wrapper attribute access is slow
O = wpb  # noqa: E741  (ACTION_OUTCOME_* constants)
LEASE_NOT_HELD = "LEASE_NOT_HELD"
# ErrorInfo.reason of each refusal of a holder's result (docs/protocol.md, "Refusals").
REFUSALS = {
    "superseded": "LEASE_SUPERSEDED",
    "cancelled": "ACTION_CANCELLED",
    "not_live": "LEASE_NOT_LIVE",
    "unknown_lease": "LEASE_UNKNOWN",
}
# Outcomes by which a worker reports that it stopped an attempt (not a result to commit).
ENDED_AS_ASKED = frozenset({wpb.ACTION_OUTCOME_CANCELLED, wpb.ACTION_OUTCOME_TIMED_OUT})


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
    if res.outcome in ENDED_AS_ASKED:
        # The worker confirms it stopped an attempt whose lease already ended (cancelled,
        # timed out, superseded, lost): nothing to commit and nothing wrong, so OK.
        ack.status.code = code_pb2.OK
        return
    reason = refusal_reason(a, token)
    if a is None:
        message = f"unknown lease {res.lease_id!r}"
    elif a.token > token:
        message = f"lease token {token} superseded by {a.token}"
    else:
        message = f"lease {res.lease_id!r} is no longer live (action {t.S.Name(a.state)})"  # type: ignore[arg-type]
    ack.status.code = code_pb2.FAILED_PRECONDITION
    ack.status.message = message
    info = error_details_pb2.ErrorInfo(reason=REFUSALS[reason], domain=ERROR_DOMAIN)
    info.metadata["lease_id"] = res.lease_id
    if a is not None:
        info.metadata["current_token"] = str(a.token)
    ack.status.details.add().Pack(info)
    out.observe(
        "stale_result",
        worker_id=w.worker_id,
        detail=reason,
        lease_id=res.lease_id,
    )
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


def _finished_stamp(res: wpb.ActionResult, remote: HlcTimestamp) -> hlc_pb2.HlcTimestamp:
    """The worker's stamp for the attempt's end: ``finished_hlc`` when set and not after the
    message's own stamp (a batch of results carries one envelope stamp), else the envelope's."""
    f = res.finished_hlc
    if f.physical_ms and (f.physical_ms, f.logical) <= remote:
        return hlc_pb2.HlcTimestamp(physical_ms=f.physical_ms, logical=f.logical)
    return hlc_pb2.HlcTimestamp(physical_ms=remote.physical_ms, logical=remote.logical)


def refusal_reason(a: ActionRecord | None, token: int) -> str:
    """Why a holder's result was refused, typed (``plait_results_refused_total{reason}``).

    ``cancelled``: the action was cancelled, so this is an ordinary late result; ``superseded``:
    a newer token exists and the action goes on (a zombie attempt); ``not_live``: the lease
    ended otherwise (lost, timed out, the action finished); ``unknown_lease``: no such action.
    """
    if a is None:
        return "unknown_lease"
    if a.state == t.CANCELLED:
        return "cancelled"
    if a.token > token:
        return "superseded"
    return "not_live"


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
    if outcome == O.ACTION_OUTCOME_CANCELLED and prefetch.handed_back(lease):
        if not hedges.end_one(st, lease, prefetch.RECLAIMED, out, cancel=False):
            requeue_after_loss(st, lease, E.EVENT_REASON_RECLAIMED, prefetch.RECLAIMED, out)
        return
    seconds = res.duration.ToNanoseconds() / 1e9
    prefetch.ran(w, seconds)
    out.observe(
        "action_duration",
        worker_id=w.worker_id,
        value=seconds,
        lease_id=lease.lease_id,
    )
    outputs = res.outputs_json or "{}"
    problem = check_outputs(outputs, st.config) if outcome == O.ACTION_OUTCOME_SUCCEEDED else None
    if (outcome != O.ACTION_OUTCOME_SUCCEEDED or problem) and a.hedge is not None:
        # Hedged: this attempt did not make it, but the other one still runs.
        ended = "failed" if problem is None else problem
        hedges.end_one(st, lease, f"attempt {lease.attempt} {ended}", out, cancel=False)
        return
    if outcome == O.ACTION_OUTCOME_CANCELLED:
        # The worker gave the attempt up (self-fencing) while its lease was still current.
        words = "the worker cancelled the attempt (self-fencing)"
        requeue_after_loss(st, lease, E.EVENT_REASON_SELF_FENCED, words, out)
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
        worker_hlc=_finished_stamp(res, remote),
    )
    error = res.error if res.HasField("error") else None
    why: int = E.EVENT_REASON_ATTEMPT_FAILED
    error_type = res.error_type
    if outcome == O.ACTION_OUTCOME_SUCCEEDED:
        if problem is None:
            liveness.succeeded(st, w.worker_id)
            hedges.cancel_sibling(st, a, lease, out)  # a hedge race: the loser is fenced
            # Applying it keeps the outputs (in memory when small: core.outputs).
            st.finish_action(
                a, t.SUCCEEDED, E.EVENT_TYPE_ACTION_FINISHED, out, outputs_json=outputs, **fields
            )
            return
        outcome = O.ACTION_OUTCOME_FAILED
        why, error_type = E.EVENT_REASON_INVALID_OUTPUTS, ""
        error = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=problem)
    if error is None:
        error = status_pb2.Status(code=code_pb2.UNKNOWN, message=f"exit code {res.exit_code}")
    if outcome == O.ACTION_OUTCOME_TIMED_OUT:
        why = E.EVENT_REASON_RUN_TIMEOUT  # the worker's own timeout
    if attempts.may_retry(a, res.exit_code, outcome, error, error_type):
        retry(st, a, why, error, w.worker_id, res)
        return
    state = t.TIMED_OUT if outcome == O.ACTION_OUTCOME_TIMED_OUT else t.FAILED
    st.finish_action(
        a,
        state,
        E.EVENT_TYPE_ACTION_FINISHED,
        out,
        why=why,
        error=error,
        error_type=error_type,
        reason=error.message,
        **fields,
    )


def check_outputs(outputs: str, config: CoreConfig) -> str | None:
    """Why outputs are unacceptable (size, nesting, not a JSON object), or None; never raises.

    The worker servicer checks size and nesting against the configured limits before a result
    becomes a stimulus; this is the core's own check, and its backstop, against the same
    configured limits (``CoreConfig.max_output_bytes``, ``max_json_depth``) by the rule the
    worker SDK applies too (:func:`plait.jsonlimits.outputs_problem`).
    """
    return outputs_problem(
        outputs, max_bytes=config.max_output_bytes, max_depth=config.max_json_depth
    )
