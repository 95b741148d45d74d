"""Join policies, failure propagation, map fan-out and early endings in the pure core."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from plait.coordinator.core import joins
from plait.coordinator.core.events import Instant
from plait.coordinator.core.replay import replay
from plait.coordinator.core.state import SchedulerState
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb
from tests.unit.core_driver import CONFIG, Driver, grants, messages, snapshot

OK, FAIL = wpb.ACTION_OUTCOME_SUCCEEDED, wpb.ACTION_OUTCOME_FAILED


def fan(width: int, join: pb.JoinPolicy | None = None, fail_fast: bool = False) -> pb.WorkflowSpec:
    s = pb.WorkflowSpec(name="fan", fail_fast=fail_fast)
    for i in range(width):
        s.actions.add(id=f"b{i}", handler="h")
    j = s.actions.add(id="join", handler="h", needs=[f"b{i}" for i in range(width)])
    if join is not None:
        j.join.CopyFrom(join)
    return s


def start(d: Driver, spec: pb.WorkflowSpec, slots: int = 16) -> dict[str, wpb.Lease]:
    d.hello("s1", "w1", slots=slots)
    return {lease.action_id: lease for lease in grants(d.submit(spec))}


def finish(d: Driver, lease: wpb.Lease, outcome: int = OK, outputs: str = "{}") -> list[wpb.Lease]:
    out = d.finish("s1", lease, outcome=outcome, outputs=outputs)
    more = grants(out)
    more += grants(d.msg("s1", credit=wpb.Credit(slots=1)))
    return more


def test_all_skips_on_first_failure_with_the_reason() -> None:
    d = Driver()
    leases = start(d, fan(3))
    finish(d, leases["b0"], FAIL)
    assert d.state("join") == "ACTION_STATE_SKIPPED"
    assert "needs 'b0', which ended FAILED" in d.st.workflows["wf-1"].actions["join"].reason


def test_any_runs_at_first_success_and_sees_every_branch() -> None:
    d = Driver()
    leases = start(d, fan(3, pb.JoinPolicy(kind=pb.JOIN_KIND_ANY)))
    assert finish(d, leases["b0"], FAIL) == []
    (joined,) = finish(d, leases["b1"], OK, '{"v": 1}')
    needs = json.loads(joined.inputs_json)["needs"]
    assert needs["b0"]["state"] == "ACTION_STATE_FAILED" and "error" in needs["b0"]
    assert needs["b1"] == {"state": "ACTION_STATE_SUCCEEDED", "outputs": {"v": 1}}
    assert needs["b2"]["state"] == "ACTION_STATE_LEASED"


def test_any_with_cancel_remaining_cancels_and_fences_the_rest() -> None:
    d = Driver()
    leases = start(d, fan(3, pb.JoinPolicy(kind=pb.JOIN_KIND_ANY, cancel_remaining=True)))
    out = d.finish("s1", leases["b0"])
    cancelled = {
        c.lease_id for m in messages(out, "s1", "cancel_lease") for c in m.cancel_lease.leases
    }
    assert cancelled == {leases["b1"].lease_id, leases["b2"].lease_id}
    assert d.state("b1") == "ACTION_STATE_CANCELLED" and d.state("join") == "ACTION_STATE_LEASED"
    (joined,) = grants(out)
    d.finish("s1", joined)
    assert d.st.workflows["wf-1"].state == pb.WORKFLOW_STATE_SUCCEEDED  # losers not needed


def test_quorum_count_and_fraction() -> None:
    for join in (
        pb.JoinPolicy(kind=pb.JOIN_KIND_AT_LEAST, at_least_count=2),
        pb.JoinPolicy(kind=pb.JOIN_KIND_AT_LEAST, at_least_fraction=0.6),
    ):
        d = Driver()
        leases = start(d, fan(3, join))
        finish(d, leases["b0"], FAIL)
        assert finish(d, leases["b1"]) == []
        (joined,) = finish(d, leases["b2"])
        assert joined.action_id == "join"
        d.finish("s1", joined)
        wf = d.st.workflows["wf-1"]
        assert wf.state == pb.WORKFLOW_STATE_PARTIALLY_SUCCEEDED and "b0 FAILED" in wf.reason


def test_quorum_that_can_no_longer_be_met_skips_naming_the_failures() -> None:
    d = Driver()
    leases = start(d, fan(3, pb.JoinPolicy(kind=pb.JOIN_KIND_AT_LEAST, at_least_count=2)))
    finish(d, leases["b0"], FAIL)
    finish(d, leases["b1"], FAIL)
    join = d.st.workflows["wf-1"].actions["join"]
    assert d.state("join") == "ACTION_STATE_SKIPPED"
    assert join.reason == "join needs 2 of 3 to succeed; 2 did not (b0, b1)"
    assert d.st.workflows["wf-1"].state == pb.WORKFLOW_STATE_RUNNING  # b2 still runs


def test_fail_fast_cancels_running_siblings_and_fails_at_once() -> None:
    d = Driver()
    leases = start(d, fan(3, fail_fast=True))
    out = d.finish("s1", leases["b0"], outcome=FAIL)
    assert len([c for m in messages(out, "s1", "cancel_lease") for c in m.cancel_lease.leases]) == 2
    wf = d.st.workflows["wf-1"]
    assert wf.state == pb.WORKFLOW_STATE_FAILED and wf.reason.startswith("fail_fast: b0 FAILED")


def map_spec(items_path: str = "list.items", join: pb.JoinPolicy | None = None) -> pb.WorkflowSpec:
    s = pb.WorkflowSpec(name="map")
    s.actions.add(id="list", handler="h")
    m = s.actions.add(id="resize", handler="h", needs=["list"])
    m.map.over = items_path
    if join is not None:
        m.join.CopyFrom(join)
    s.actions.add(id="index", handler="h", needs=["resize"])
    return s


def test_map_makes_one_child_per_item_and_joins_their_outputs() -> None:
    d = Driver()
    (lst,) = start(d, map_spec()).values()
    children = finish(d, lst, OK, '{"items": ["a.png", "b.png", {"n": 3}]}')
    assert sorted(c.action_id for c in children) == ["resize.0", "resize.1", "resize.2"]
    items = [json.loads(c.inputs_json)["item"] for c in sorted(children, key=lambda c: c.action_id)]
    assert items == ["a.png", "b.png", {"n": 3}]
    assert d.state("resize") == "ACTION_STATE_RUNNING"
    index = []
    for c in children:
        index += finish(d, c, OK, json.dumps({"out": c.action_id}))
    (ix,) = index
    outs = json.loads(ix.inputs_json)["needs"]["resize"]["outputs"]["items"]
    assert [o["out"] for o in outs] == ["resize.0", "resize.1", "resize.2"]


def test_map_over_something_not_a_list_fails_the_map_with_the_reason() -> None:
    d = Driver()
    (lst,) = start(d, map_spec()).values()
    finish(d, lst, OK, '{"items": 7}')
    resize = d.st.workflows["wf-1"].actions["resize"]
    assert d.state("resize") == "ACTION_STATE_FAILED" and "expected a list" in resize.reason
    assert d.state("index") == "ACTION_STATE_SKIPPED"


def test_map_child_failure_fails_the_map_under_all() -> None:
    d = Driver()
    (lst,) = start(d, map_spec()).values()
    children = {c.action_id: c for c in finish(d, lst, OK, '{"items": [1, 2, 3]}')}
    finish(d, children["resize.1"], FAIL)
    assert d.state("resize") == "ACTION_STATE_FAILED"
    assert d.state("resize.0") == "ACTION_STATE_CANCELLED"
    assert d.st.workflows["wf-1"].state == pb.WORKFLOW_STATE_FAILED


def test_empty_map_succeeds_with_no_items() -> None:
    d = Driver()
    (lst,) = start(d, map_spec()).values()
    (ix,) = finish(d, lst, OK, '{"items": []}')
    assert json.loads(ix.inputs_json)["needs"]["resize"]["outputs"] == {"items": []}


def test_map_and_joins_survive_replay() -> None:
    d = Driver()
    (lst,) = start(
        d, map_spec(join=pb.JoinPolicy(kind=pb.JOIN_KIND_AT_LEAST, at_least_count=1))
    ).values()
    children = finish(d, lst, OK, '{"items": [1, 2]}')
    finish(d, children[0], FAIL)
    fresh = SchedulerState(CONFIG)
    replay(fresh, d.records, Instant(d.mono, d.wall))
    assert snapshot(fresh) == snapshot(d.st)


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 8),
    kind=st.sampled_from([pb.JOIN_KIND_ALL, pb.JOIN_KIND_ANY, pb.JOIN_KIND_AT_LEAST]),
    m=st.integers(1, 8),
    outcomes=st.lists(st.booleans(), min_size=8, max_size=8),
)
def test_join_verdict_matches_its_definition(
    n: int, kind: int, m: int, outcomes: list[bool]
) -> None:
    """Whatever order the needs end in, the join is met exactly when enough succeeded, and
    given up exactly when too few still can."""
    d = Driver()
    join = pb.JoinPolicy(kind=kind, at_least_count=min(m, n))
    leases = start(d, fan(n, join))
    need = {pb.JOIN_KIND_ALL: n, pb.JOIN_KIND_ANY: 1}.get(kind, min(m, n))
    ok = failed = 0
    for i in range(n):
        good = outcomes[i]
        finish(d, leases[f"b{i}"], OK if good else FAIL)
        ok += good
        failed += not good
        state = d.state("join")
        if ok >= need:
            assert state in ("ACTION_STATE_LEASED", "ACTION_STATE_READY"), (ok, failed, need)
            break
        if n - failed < need:
            assert state == "ACTION_STATE_SKIPPED", (ok, failed, need)
            break
        assert state == "ACTION_STATE_PENDING"
    assert joins.required(d.st.workflows["wf-1"].actions["join"], n) == need


def test_design_example_index_joins_over_the_map_items() -> None:
    """DESIGN §8: `index` needs the map `resize` with `join: {at_least: 0.9}`: 9 of 10 items."""
    d = Driver()
    s = map_spec()
    s.actions[2].join.kind = pb.JOIN_KIND_AT_LEAST
    s.actions[2].join.at_least_fraction = 0.9
    (lst,) = start(d, s).values()
    children = finish(d, lst, OK, json.dumps({"items": list(range(10))}))
    finish(d, children[0], FAIL)  # 1 of 10 fails: 90 % still possible
    assert d.state("resize") == "ACTION_STATE_RUNNING"
    index = []
    for c in children[1:]:
        index += finish(d, c)
    (ix,) = index
    items = json.loads(ix.inputs_json)["needs"]["resize"]["outputs"]["items"]
    assert items[0] is None and len(items) == 10
    d.finish("s1", ix)
    assert d.st.workflows["wf-1"].state == pb.WORKFLOW_STATE_PARTIALLY_SUCCEEDED


def test_a_race_whose_losers_were_cancelled_succeeds() -> None:
    d = Driver()
    leases = start(d, fan(3, pb.JoinPolicy(kind=pb.JOIN_KIND_ANY, cancel_remaining=True)))
    (joined,) = grants(d.finish("s1", leases["b2"]))
    d.finish("s1", joined)
    assert d.st.workflows["wf-1"].state == pb.WORKFLOW_STATE_SUCCEEDED


def pipeline_spec(max_in_flight: int = 0) -> pb.WorkflowSpec:
    s = pb.WorkflowSpec(name="etl")
    s.actions.add(id="list", handler="h")
    p = s.actions.add(id="etl", needs=["list"])
    p.pipeline.over = "list.items"
    p.pipeline.max_in_flight = max_in_flight
    for stage in ("fetch", "parse", "load"):
        p.pipeline.stages.add(id=stage, handler="h")
    s.actions.add(id="report", handler="h", needs=["etl"])
    return s


def test_pipeline_has_no_barrier_between_stages() -> None:
    d = Driver()
    (lst,) = start(d, pipeline_spec()).values()
    first = {c.action_id: c for c in finish(d, lst, OK, '{"items": ["a", "b"]}')}
    assert set(first) == {"etl.0.fetch", "etl.1.fetch"}
    (parse0,) = finish(d, first["etl.0.fetch"], OK, '{"raw": "a"}')
    assert parse0.action_id == "etl.0.parse"  # item 0 in stage 2 while item 1 is in stage 1
    assert d.state("etl.1.fetch") == "ACTION_STATE_LEASED"
    inputs = json.loads(parse0.inputs_json)
    assert inputs["item"] == "a" and inputs["needs"]["etl.0.fetch"]["outputs"] == {"raw": "a"}


def test_pipeline_bounds_items_in_flight_and_joins_last_stages() -> None:
    d = Driver()
    (lst,) = start(d, pipeline_spec(max_in_flight=2)).values()
    leased = finish(d, lst, OK, '{"items": [1, 2, 3, 4]}')
    assert sorted(c.action_id for c in leased) == ["etl.0.fetch", "etl.1.fetch"]
    pending = {c.action_id: c for c in leased}
    report = []
    while pending:
        lid, lease = pending.popitem()
        for nxt in finish(d, lease, OK, json.dumps({"by": lid})):
            if nxt.action_id == "report":
                report.append(nxt)
            else:
                pending[nxt.action_id] = nxt
        assert d.st.workflows["wf-1"].actions["etl"].in_flight <= 2
    (rep,) = report
    items = json.loads(rep.inputs_json)["needs"]["etl"]["outputs"]["items"]
    assert [i["by"] for i in items] == [f"etl.{i}.load" for i in range(4)]


def test_pipeline_stage_failure_skips_the_rest_of_that_item_only() -> None:
    d = Driver()
    (lst,) = start(d, pipeline_spec()).values()
    first = {c.action_id: c for c in finish(d, lst, OK, '{"items": ["a", "b"]}')}
    finish(d, first["etl.0.fetch"], FAIL)
    assert d.state("etl.0.parse") == "ACTION_STATE_SKIPPED"
    assert d.state("etl.0.load") == "ACTION_STATE_SKIPPED"
    assert d.state("etl") == "ACTION_STATE_FAILED"  # join all over the items
    fresh = SchedulerState(CONFIG)
    replay(fresh, d.records, Instant(d.mono, d.wall))
    assert snapshot(fresh) == snapshot(d.st)
