"""Resources, semaphores, max_parallel, priorities and the timeouts of the pure core."""

from __future__ import annotations

import pytest

from plait.errors import InvalidArgumentError
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb
from tests.unit.core_driver import Driver, grants, independent
from tests.unit.test_validate import refused


def hello(
    d: Driver, session: str, worker: str, slots: int = 8, **resources: float
) -> list[wpb.Lease]:
    hello = wpb.Hello(worker_id=worker, slots=slots, handlers=["h"], resources=resources)
    return grants(d.hello_with(session, hello))


def test_resources_are_never_leased_past_what_a_worker_offers() -> None:
    d = Driver()
    s = independent(4)
    for a in s.actions:
        a.resources["gpu"] = 1
    d.submit(s)
    assert hello(d, "s0", "cpu-only", slots=8) == []
    leased = hello(d, "s1", "gpu-box", slots=8, gpu=2)
    assert len(leased) == 2  # 2 GPUs, 8 slots
    assert len(grants(d.finish("s1", leased[0]))) == 1  # its GPU is free again at once
    assert grants(d.msg("s1", credit=wpb.Credit(slots=1))) == []  # slots alone do not help


def test_semaphore_permits_are_shared_across_workflows() -> None:
    d = Driver()
    for wf in ("wf-1", "wf-2"):
        s = independent(3)
        for a in s.actions:
            a.semaphores.add(name="db", permits=1, capacity=2)
        d.submit(s, wf)
    leased = hello(d, "s1", "w1", slots=10)
    assert len(leased) == 2
    assert d.st.semaphores["db"] == (2, 2)
    (next_one,) = grants(d.finish("s1", leased[0]))  # the permit passes on at once
    assert d.st.semaphores["db"] == (2, 2)
    for lease in [leased[1], next_one]:
        d.finish("s1", lease)
    assert d.st.semaphores["db"][1] == 2  # the last two waiting took them
    assert sum(1 for a in d.st.leases.values() if a.action.spec.semaphores) == 2


def test_semaphores_are_taken_all_at_once_or_not_at_all() -> None:
    d = Driver()
    s = pb.WorkflowSpec(name="locks")
    a = s.actions.add(id="ab", handler="h")
    a.semaphores.add(name="A")
    a.semaphores.add(name="B")
    s.actions.add(id="b", handler="h").semaphores.add(name="B")
    d.submit(s)
    (first,) = hello(d, "s1", "w1", slots=4)
    assert d.st.semaphores.get("A", (1, 0))[1] == (1 if first.action_id == "ab" else 0)
    # Whichever got B, the other waits holding nothing: no hold-and-wait.
    assert sum(held for _, held in d.st.semaphores.values()) == len(
        [r for r in first.action.semaphores]
    )


def test_workflow_max_parallel() -> None:
    d = Driver()
    s = independent(10)
    s.max_parallel = 3
    d.submit(s)
    assert len(hello(d, "s1", "w1", slots=10)) == 3


def test_map_width_limit() -> None:
    d = Driver()
    s = pb.WorkflowSpec(name="map")
    s.actions.add(id="list", handler="h")
    m = s.actions.add(id="m", handler="h", needs=["list"])
    m.map.over = "list.items"
    m.map.max_parallel = 2
    d.submit(s)
    (lst,) = hello(d, "s1", "w1", slots=10)
    children = grants(d.finish("s1", lst, outputs='{"items": [1, 2, 3, 4, 5]}'))
    assert len(children) == 2


def test_higher_priority_workflow_goes_first() -> None:
    d = Driver()
    d.submit(independent(5), "wf-low")
    urgent = independent(5)
    urgent.priority = 10
    d.submit(urgent, "wf-urgent")
    leased = hello(d, "s1", "w1", slots=5)
    assert {lease.workflow_id for lease in leased} == {"wf-urgent"}


def test_queue_timeout_fails_an_action_nobody_can_run_saying_why() -> None:
    d = Driver()
    s = independent(1, handler="nobody-serves-this")
    s.actions[0].queue_timeout.FromSeconds(3)
    d.submit(s)
    hello(d, "s1", "w1")
    d.advance(2.0)
    assert d.state("a0") == "ACTION_STATE_READY"
    d.advance(1.5)
    a = d.st.workflows["wf-1"].actions["a0"]
    assert d.state("a0") == "ACTION_STATE_TIMED_OUT"
    assert "queue timeout of 3s" in a.reason and "no connected worker can run it" in a.reason


def test_workflow_deadline_cancels_what_is_left_and_fails() -> None:
    d = Driver()
    s = independent(2)
    s.deadline.FromSeconds(4)
    d.submit(s)
    hello(d, "s1", "w1", slots=1)
    for i in range(5):
        d.advance(1.0)
        d.heartbeat("s1", [], seq=i + 1, last_grant=0)
    wf = d.st.workflows["wf-1"]
    assert wf.state == pb.WORKFLOW_STATE_FAILED and wf.reason.startswith("deadline of 4s")
    assert {d.state("a0"), d.state("a1")} == {"ACTION_STATE_CANCELLED"}


def test_heartbeat_timeout_needs_progress_reports() -> None:
    d = Driver()
    s = independent(2)
    for a in s.actions:
        a.heartbeat_timeout.FromSeconds(2)
    d.submit(s)
    leases = {lease.action_id: lease for lease in hello(d, "s1", "w1", slots=2)}
    for i in range(4):
        d.advance(1.0)
        # a0 reports progress; a1 stays silent.
        p = wpb.ActionProgress()
        p.leases.add(lease_id=leases["a0"].lease_id, fencing_token=1, details_json='{"pct": 1}')
        d.msg("s1", action_progress=p)
        d.heartbeat("s1", list(leases.values()), seq=i + 1)
    assert d.state("a0") == "ACTION_STATE_LEASED"
    assert d.state("a1") == "ACTION_STATE_TIMED_OUT"
    assert "heartbeat_timeout" in d.st.workflows["wf-1"].actions["a1"].reason


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda a: a.join.MergeFrom(pb.JoinPolicy(kind=pb.JOIN_KIND_AT_LEAST)), "join"),
        (
            lambda a: a.join.MergeFrom(pb.JoinPolicy(kind=pb.JOIN_KIND_AT_LEAST, at_least_count=5)),
            "join.at_least_count",
        ),
        (
            lambda a: a.join.MergeFrom(
                pb.JoinPolicy(kind=pb.JOIN_KIND_AT_LEAST, at_least_fraction=1.5)
            ),
            "join.at_least_fraction",
        ),
        (lambda a: setattr(a.map, "over", "nope.items"), "map.over"),
        (lambda a: a.resources.__setitem__("gpu", -1), "resources['gpu']"),
        (lambda a: a.semaphores.add(name="x", permits=3, capacity=2), "semaphores[0].permits"),
        (lambda a: a.queue_timeout.FromSeconds(0), "queue_timeout"),
    ],
)
def test_bad_pattern_fields_are_refused_naming_the_field(mutate: object, field: str) -> None:
    s = pb.WorkflowSpec(name="t")
    s.actions.add(id="a", handler="h")
    b = s.actions.add(id="b", handler="h", needs=["a"])
    mutate(b)  # type: ignore[operator]
    err: InvalidArgumentError = refused(s)
    assert any(v.field == f"spec.actions[1].{field}" for v in err.violations), err.violations


def test_status_names_the_limit_a_ready_action_waits_on() -> None:
    from plait.coordinator.core import views

    d = Driver()
    s = independent(3)
    for a in s.actions:
        a.semaphores.add(name="db", capacity=1)
    d.submit(s)
    hello(d, "s1", "w1", slots=8)
    status = views.workflow_status(d.st, d.st.workflows["wf-1"])
    reasons = sorted(a.reason for a in status.actions)
    assert reasons[0].startswith("attempt 1 on w1")
    assert reasons[1:] == ["waiting for semaphore 'db' (1 of 1 permits held)"] * 2
