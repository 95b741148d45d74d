"""ForkJoin: fork and join facts from real commits of the pure core."""

from __future__ import annotations

import json

from plait.coordinator.forkjoin import Fork
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb
from tests.unit.core_driver import grants
from tests.unit.trace_support import Traced, fork_join_spec, run_fork_join


def test_fork_then_at_least_join_with_a_failed_branch() -> None:
    t = Traced()
    leases = run_fork_join(t, fail="b2")
    assert t.forks == [Fork("wf-1", "a", "dependents", 3, ["b1", "b2", "b3"])]
    [j] = t.joins
    assert (j.action_id, j.kind, j.required, j.of, j.outcome, j.over) == (
        "j",
        "at_least",
        2,
        3,
        "met",
        "needs",
    )
    assert j.succeeded == ["b1", "b3"] and j.failed == ["b2"]
    assert j.wait_seconds == 2.0  # b1 ended at +1, b3 met the join at +3
    assert j.needs == [
        ("b1", "ACTION_STATE_SUCCEEDED", leases["b1"].lease_id),
        ("b2", "ACTION_STATE_FAILED", leases["b2"].lease_id),
        ("b3", "ACTION_STATE_SUCCEEDED", leases["b3"].lease_id),
    ]
    assert t.d.st.workflows["wf-1"].state != pb.WORKFLOW_STATE_RUNNING
    assert t.fj.pending() == 0  # forgotten when the workflow finished


def test_all_join_is_impossible_at_the_first_failure() -> None:
    t = Traced()
    d = t.d
    t.feed(d.hello("s1", "w1", slots=4))
    out = t.feed(d.submit(fork_join_spec(kind=pb.JOIN_KIND_ALL)))
    out = t.feed(d.done("s1", grants(out)[0]))
    b = {x.action_id: x for x in grants(out)}
    d.mono += 1
    t.feed(d.done("s1", b["b1"]))
    assert t.joins == [] and t.fj.pending() > 0  # waiting since b1 ended
    d.mono += 4
    t.feed(d.done("s1", b["b2"], outcome=wpb.ACTION_OUTCOME_FAILED))
    [j] = t.joins
    assert (j.kind, j.required, j.of, j.outcome) == ("all", 3, 3, "impossible")
    assert j.failed == ["b2"] and j.succeeded == ["b1"] and j.wait_seconds == 4.0
    assert j.needs[2] == ("b3", "ACTION_STATE_LEASED", "")  # still open: no attempt to link


def test_any_join_with_cancel_remaining_does_not_count_the_cancelled_as_failed() -> None:
    spec = fork_join_spec(kind=pb.JOIN_KIND_ANY)
    spec.actions[-1].join.cancel_remaining = True
    t = Traced()
    d = t.d
    t.feed(d.hello("s1", "w1", slots=4))
    out = t.feed(d.submit(spec))
    out = t.feed(d.done("s1", grants(out)[0]))
    b = {x.action_id: x for x in grants(out)}
    out = t.feed(d.done("s1", b["b2"]))
    [j] = t.joins
    assert (j.kind, j.required, j.outcome, j.succeeded, j.failed) == ("any", 1, "met", ["b2"], [])
    # b1 and b3 were cancelled in the same commit, after the join was met.
    assert [n[:2] for n in j.needs] == [
        ("b1", "ACTION_STATE_RUNNING"),
        ("b2", "ACTION_STATE_SUCCEEDED"),
        ("b3", "ACTION_STATE_RUNNING"),
    ]
    assert d.state("b1") == "ACTION_STATE_CANCELLED"


def test_map_forks_into_children_and_joins_over_them() -> None:
    spec = pb.WorkflowSpec(name="map")
    spec.actions.add(id="a", handler="h")
    spec.actions.add(id="m", handler="h", needs=["a"], map=pb.MapSpec(over="a.items"))
    spec.actions.add(id="z", handler="h", needs=["m"])
    t = Traced()
    d = t.d
    t.feed(d.hello("s1", "w1", slots=8))
    out = t.feed(d.submit(spec))
    out = t.feed(d.done("s1", grants(out)[0], outputs=json.dumps({"items": [1, 2, 3]})))
    assert t.forks == [Fork("wf-1", "m", "map", 3, ["m.0", "m.1", "m.2"])]
    children = grants(out)
    assert sorted(x.action_id for x in children) == ["m.0", "m.1", "m.2"]
    for i, x in enumerate(children):
        d.mono += 1
        outcome = wpb.ACTION_OUTCOME_FAILED if i == 1 else wpb.ACTION_OUTCOME_SUCCEEDED
        out = t.feed(d.done("s1", x, outcome=outcome))
    [j] = t.joins
    assert (j.action_id, j.over, j.kind, j.of, j.outcome) == (
        "m",
        "children",
        "all",
        3,
        "impossible",
    )
    assert j.failed == ["m.1"] and j.wait_seconds == 1.0
    # m.2 was cancelled because the join could no longer be met: still open when it was decided.
    assert j.needs == [
        ("m.0", "ACTION_STATE_SUCCEEDED", children[0].lease_id),
        ("m.1", "ACTION_STATE_FAILED", children[1].lease_id),
        ("m.2", "ACTION_STATE_RUNNING", ""),
    ]
    assert t.fj.pending() == 0
