"""A worker that reconnects with its running attempts keeps their resources in use.

Found while building the core's rebuild path (issue 8): ``on_hello`` re-adopted the leases a
worker still ran but started its resource use at zero, so a worker offering ``cpu: 2`` that
reconnected while running a ``cpu: 2`` action was leased a second one at once.
"""

from __future__ import annotations

from plait.coordinator.core.model import Outcome
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb
from tests.unit.core_driver import Driver, grants


def hello(d: Driver, session: str, running: list[wpb.Lease]) -> Outcome:
    hello = wpb.Hello(
        worker_id="w1",
        slots=4,
        handlers=["h"],
        resources={"cpu": 2.0},
        running=[
            wpb.LeaseReport(lease_id=l.lease_id, fencing_token=l.fencing_token, slots=1)
            for l in running
        ],
    )
    return d.hello_with(session, hello)


def two_cpu_actions() -> pb.WorkflowSpec:
    return pb.WorkflowSpec(
        name="cpu",
        actions=[pb.ActionSpec(id=f"a{i}", handler="h", resources={"cpu": 2.0}) for i in range(2)],
    )


def test_resources_of_adopted_leases_stay_in_use_after_a_reconnect() -> None:
    d = Driver()
    hello(d, "s1", [])
    out = d.submit(two_cpu_actions())
    [lease] = grants(out, "s1")  # cpu 2 of 2: the second action waits
    d.close("s1")

    # The same worker, back on a new stream, still running it.
    out = hello(d, "s2", [lease])
    assert grants(out, "s2") == [], "leased a cpu-2 action to a worker whose 2 cpus are in use"
    w = d.st.workers["w1"]
    assert list(w.leases) == [lease.lease_id] and w.used == {"cpu": 2.0}
    assert grants(d.advance(0.1), "s2") == []

    out = d.finish("s2", lease)  # its cpus free again: the other action goes to it
    granted = grants(out, "s2") + grants(d.advance(0.1), "s2")
    assert [g.action_id for g in granted] == ["a1" if lease.action_id == "a0" else "a0"]
