"""WorkerSession adaptive concurrency (credit withheld under load, released on recovery) and
progress heartbeats batched onto the stream.
"""

from __future__ import annotations

import json
from datetime import timedelta

from plait.v1 import worker_service_pb2 as pb
from plait.worker.adaptive import AdaptiveConfig
from tests.integration.worker_session_support import (
    HEALTHY,
    OVERLOADED,
    FakeProbe,
    Harness,
    connected,
    handler_lease,
    next_heartbeat,
)

# ---------------------------------------------------------------- adaptive concurrency


async def test_adaptive_concurrency_withholds_then_releases_credit(h: Harness) -> None:
    probe = FakeProbe()
    # The interval is an hour: the test drives every reading through session.adapt().
    session = h.start_session(
        slots=4, load_probe=probe, adaptive=AdaptiveConfig(interval=timedelta(hours=1))
    )
    stream = await connected(h)
    assert session.stats.offered_slots == 4 and session.adapt().limit == 4  # healthy, at slots
    stream.grant(*(handler_lease("blocked", f"b{i}") for i in range(4)))
    await h.coord.wait_for(lambda: len(session.running) == 4)

    probe.reading = OVERLOADED
    assert [session.adapt().limit for _ in range(3)] == [2, 1, 1]  # halves, never below 1
    assert session.stats.offered_slots == 1 and session.stats.adaptive_decreases == 2

    # All four finish: only one slot goes back; three are withheld (running < limit again).
    h.release.set()
    await h.coord.wait_for(lambda: len(stream.results) == 4 and stream.credit == 1)
    await next_heartbeat(h, session)  # any further Credit would have arrived first
    assert stream.credit == 1
    assert session.withheld_slots == 3 and session.stats.withheld_slots == 3

    # Recovery: +1 per reading, each step credited at once, never above the slots.
    probe.reading = HEALTHY
    for expected in (2, 3, 4):
        adj = session.adapt()
        assert (adj.limit, adj.release) == (expected, 1)
        await h.coord.wait_for(lambda expected=expected: stream.credit == expected)
    adj = session.adapt()
    assert (adj.limit, adj.release) == (4, 0)
    await next_heartbeat(h, session)  # a Credit beyond the slots would have arrived first
    assert stream.credit == 4 and session.withheld_slots == 0
    assert sum(c.slots for c in stream.of("credit")) == 3  # the releases were plain Credits


async def test_adaptive_limit_survives_a_reconnect(h: Harness) -> None:
    probe = FakeProbe()
    session = h.start_session(
        slots=4, load_probe=probe, adaptive=AdaptiveConfig(interval=timedelta(hours=1))
    )
    first = await connected(h)
    probe.reading = OVERLOADED
    assert session.adapt().limit == 2
    first.end()
    await h.coord.wait_for(lambda: len(h.coord.streams) == 2 and h.coord.stream.of("heartbeat"))
    second = h.coord.stream
    # Hello restarts the coordinator's ledger from every slot; the limit is re-imposed by
    # withholding the first freed slots.
    assert second.hello is not None and second.hello.slots == 4
    second.grant(*(handler_lease("noop", f"n{i}") for i in range(4)))
    await h.coord.wait_for(lambda: len(second.results) == 4 and second.credit == 2)
    await next_heartbeat(h, session)  # a Credit for a withheld slot would have arrived first
    assert second.credit == 2 and session.withheld_slots == 2


# ---------------------------------------------------------------- progress heartbeats


async def test_progress_heartbeats_are_batched_onto_the_stream(h: Harness) -> None:
    session = h.start_session(progress_interval=timedelta(milliseconds=150))
    stream = await connected(h)
    child = handler_lease("progress", "p1", token=3)
    child.inputs_json = json.dumps({"input": None, "item": {"name": "a"}, "needs": {}})
    stream.grant(child, handler_lease("progress_sync", "p2", token=4))

    def progress() -> list[pb.LeaseProgress]:
        return [p for m in stream.of("action_progress") for p in m.leases]

    # The handler reports 20 times over ~0.2 s+; the coordinator sees the latest at the end.
    await h.coord.wait_for(
        lambda: any(
            p.lease_id == "p1" and json.loads(p.details_json) == {"pct": 100} for p in progress()
        )
    )
    messages = stream.of("action_progress")
    assert len(messages) <= 5  # throttled: at most one ActionProgress per 150 ms
    for m in messages:
        assert len({p.lease_id for p in m.leases}) == len(m.leases)  # latest per lease only
    p1 = [p for p in progress() if p.lease_id == "p1"]
    assert all(p.fencing_token == 3 for p in p1) and len(p1) < 20
    pcts = [json.loads(p.details_json)["pct"] for p in p1]
    assert pcts == sorted(pcts)

    # The sync handler's heartbeat (from a pool thread) arrived; its oversized one was refused.
    (p2,) = [p for p in progress() if p.lease_id == "p2"]
    assert p2.fencing_token == 4 and json.loads(p2.details_json) == {"pct": 50, "sync": True}
    r2 = await h.coord.wait_for(lambda: next((r for r in stream.results if r.lease_id == "p2"), 0))
    assert "over the 64 KiB (65536-byte) limit" in json.loads(r2.outputs_json)["refused"]

    h.release.set()
    r1 = await h.coord.wait_for(lambda: next((r for r in stream.results if r.lease_id == "p1"), 0))
    assert json.loads(r1.outputs_json) == {"item": {"name": "a"}}  # ctx.item
    assert session.stats.progress_sent == len(progress())
