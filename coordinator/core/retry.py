"""``plait retry``: re-running what did not succeed (pure core, the retry aggregate).

A workflow that ended FAILED, PARTIALLY_SUCCEEDED or CANCELLED can be retried: every action
that did not succeed goes back to PENDING (a map whose children partly failed goes back to
RUNNING with only those children reset), with fresh retry and lease-loss budgets. Succeeded
actions keep their committed outputs, and fencing tokens keep growing, so a straggling result
of an earlier attempt is still refused. One WORKFLOW_RETRIED event records the reset; the
readiness that follows is journalled as usual, so replay applies the reset and nothing more.
The retried run gets its own workflow deadline, from the retry.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from plait.coordinator.core import joins
from plait.coordinator.core import transitions as t
from plait.coordinator.core.model import ActionRecord, Outcome, WorkflowRecord
from plait.spec.rules import fans_out
from plait.v1 import workflow_pb2 as pb

if TYPE_CHECKING:
    from plait.coordinator.core.state import SchedulerState

RETRYABLE = frozenset(
    {
        pb.WORKFLOW_STATE_FAILED,
        pb.WORKFLOW_STATE_PARTIALLY_SUCCEEDED,
        pb.WORKFLOW_STATE_CANCELLED,
    }
)


def to_reset(wf: WorkflowRecord) -> list[ActionRecord]:
    """Every action that did not succeed, in spec order (map children after their parent).

    A race's losers (cancelled because a join no longer needed them) stay as they are.
    """
    return [
        a
        for a in wf.actions.values()
        if a.state in t.TERMINAL
        and a.state != t.SUCCEEDED
        and not (a.state == t.CANCELLED and a.reason_code == pb.EVENT_REASON_NOT_NEEDED)
    ]


def reset(st: SchedulerState, wf: WorkflowRecord, actions: list[ActionRecord], when: float) -> None:
    """Puts ``actions`` back to PENDING (a partly-run map: RUNNING) and reopens the workflow,
    retried at ``when`` (its deadline starts again then)."""
    wf.state = pb.WORKFLOW_STATE_RUNNING
    wf.cancel_requested = False
    wf.failing = ""
    wf.reason = ""
    wf.finished_wall_ms = 0
    st.arm_deadline(wf, when)
    chosen = {id(a) for a in actions}
    for a in actions:
        mapped = a.children is not None
        st.set_state(a, t.RUNNING if mapped else t.PENDING)
        a.failures = a.lease_losses = 0
        a.error = None
        a.reason = ""
        a.reason_code = pb.EVENT_REASON_UNSPECIFIED
        a.committed_token = 0
        a.outputs_json = ""
        a.not_before = 0.0
        a.finished_wall_ms = 0
        if not mapped:
            a.started_wall_ms = 0
        wf.remaining += 1
    # Recount every join over the needs' (and children's) states as they are now.
    for a in wf.actions.values():
        if id(a) in chosen or any(id(n) in chosen for n in a.needs):
            over = a.children if a.children is not None else a.needs
            a.unmet = sum(1 for n in over if n.state != t.SUCCEEDED)
            a.failed_needs = sum(
                1 for n in over if n.state in t.TERMINAL and n.state != t.SUCCEEDED
            )


def retry_workflow(st: SchedulerState, wf: WorkflowRecord, out: Outcome) -> list[str]:
    """Decides a retry (applying it resets, :func:`reset`); readies what can run now.
    Returns the ids reset."""
    actions = to_reset(wf)
    ids = [a.spec.id for a in actions]
    st.emit(
        wf,
        pb.EVENT_TYPE_WORKFLOW_RETRIED,
        workflow_state=pb.WORKFLOW_STATE_RUNNING,
        outputs_json=json.dumps(ids),
        message=f"re-running {len(ids)} actions",
    )
    for a in actions:
        if a.state != t.PENDING:
            continue
        # A map child or a pipeline item's first stage runs on its parent's (met) needs; a
        # later stage waits for the stage before it, like any other action for its needs.
        child_may_run = a.parent is not None and a.stage <= 0
        if child_may_run or joins.verdict(a) == joins.READY:
            if fans_out(a.spec):  # a pipeline too: it runs as its items, never on a worker
                joins.expand(st, a, out)
            else:
                st.make_ready(a, pb.EVENT_TYPE_ACTION_READY)
    return ids
