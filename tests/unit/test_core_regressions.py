"""Core bugs the fuzz suite (tests/integration/test_fuzz.py) found, pinned down on the pure core."""

from __future__ import annotations

from dataclasses import replace

from plait.coordinator.core.events import WorkerStreamClosed
from plait.v1 import workflow_pb2 as pb
from tests.unit.core_driver import CONFIG, Driver


def test_a_lease_dropped_by_fail_fast_is_not_lost_again() -> None:
    """A worker leaves holding two leases of a fail_fast workflow: losing the first fails its
    action past the lease-loss budget, fail_fast cancels the second (dropping its lease), and
    the loop over the worker's leases must not lose that one again (it raised
    IllegalTransitionError CANCELLED -> FAILED, which stopped the coordinator)."""
    d = Driver(replace(CONFIG, lease_loss_budget=0))
    spec = pb.WorkflowSpec(
        name="ff",
        fail_fast=True,
        actions=[pb.ActionSpec(id="a", handler="h"), pb.ActionSpec(id="b", handler="h")],
    )
    d.submit(spec)
    d.hello("s1", "w1", slots=2)
    assert len(d.st.by_session["s1"].leases) == 2
    d.msg("s1", goodbye={"reason": "bye"})

    d.handle(WorkerStreamClosed("closed", "s1"))

    wf = d.st.workflows["wf-1"]
    assert wf.state == pb.WORKFLOW_STATE_FAILED
    states = sorted(pb.ActionState.Name(a.state) for a in wf.actions.values())
    assert states == ["ACTION_STATE_CANCELLED", "ACTION_STATE_FAILED"]
    ends = [
        e
        for e in d.records
        if e.type in (pb.EVENT_TYPE_ACTION_FINISHED, pb.EVENT_TYPE_ACTION_CANCELLED)
    ]
    assert len(ends) == 2
