"""A restart after any batch rebuilds the live state; after any event, a consistent one.

Each scenario drives the live core through one kind of action (plain handler and exec, map,
pipeline, hedged, retried with backoff, lease lost and re-leased, queue, run and progress
timeouts, the joins, fail_fast, cancel, ``plait retry``, a deadline) and keeps the live state
after every batch (:class:`~tests.unit.core_driver.RecordingDriver`). Then every prefix of its
journal is replayed into a fresh core at the instant of the batch it ends in:

* a prefix that ends at a batch boundary (what a crash between two commits leaves) must
  rebuild exactly the live state after that batch, timers included;
* a prefix that ends inside a batch (a batch is committed whole, but a journal cut anywhere
  must still load) must replay without error into a consistent state.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from plait.coordinator.core.events import RetryRequested
from plait.coordinator.core.model import Outcome
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb
from tests.unit.core_driver import (
    RecordingDriver,
    broken_invariants,
    deep_snapshot,
    differences,
    grants,
    replayed,
    same_timers,
    timers,
)

OK = wpb.ACTION_OUTCOME_SUCCEEDED
FAIL = wpb.ACTION_OUTCOME_FAILED
E = pb.EventType
ITEMS3 = '{"items": [1, 2, 3]}'


def _one(out: Outcome, session: str | None = None) -> wpb.Lease:
    (lease,) = grants(out, session)
    return lease


def _by_action(out: Outcome) -> dict[str, wpb.Lease]:
    return {lease.action_id: lease for lease in grants(out)}


def _session(d: RecordingDriver, lease: wpb.Lease) -> str:
    """The session of the worker holding ``lease``."""
    return d.st.leases[lease.lease_id].worker.session_id


def _retry(d: RecordingDriver, wf_id: str = "wf-1") -> tuple[object, Outcome]:
    """``plait retry``: its reply, and the outcome (the grants that followed)."""
    out = d.handle(RetryRequested("retry", wf_id, reply=object()))
    return out.replies[0][1], out


def _wf_state(d: RecordingDriver, wf_id: str = "wf-1") -> str:
    return pb.WorkflowState.Name(d.st.workflows[wf_id].state)  # type: ignore[arg-type]


# ---- scenarios: each drives a RecordingDriver and returns the event types it must cover ------


def plain(d: RecordingDriver) -> set[int]:
    """A handler, an exec action and a handler in a chain, with starts reported; a duplicate
    submission by idempotency key; a result re-sent after its ack."""
    d.hello_with("s1", wpb.Hello(worker_id="w1", slots=2, handlers=["h"], exec_enabled=True))
    s = pb.WorkflowSpec(name="plain")
    s.actions.add(id="a0", handler="h", input_json='{"n": 1}')
    s.actions.add(id="a1", needs=["a0"]).exec.argv.extend(["true"])
    s.actions.add(id="a2", handler="h", needs=["a1"])
    a0 = _one(d.submit(s, key="k1"))
    d.submit(s, "wf-dup", key="k1")  # the same key: the same workflow, nothing journalled
    d.started("s1", a0)
    d.advance(0.5)
    a1 = _one(d.done("s1", a0, outputs='{"x": 1}'))
    d.started("s1", a1)
    a2 = _one(d.done("s1", a1, exit_code=0))
    d.done("s1", a1)  # re-sent: acked again, nothing journalled
    d.done("s1", a2, outputs='{"y": 2}')
    assert _wf_state(d) == "WORKFLOW_STATE_SUCCEEDED"
    return {E.EVENT_TYPE_ACTION_STARTED, E.EVENT_TYPE_ACTION_READY, E.EVENT_TYPE_WORKFLOW_FINISHED}


def mapped(d: RecordingDriver) -> set[int]:
    """A map over three items, two at a time (max_parallel), one child failing; its dependent
    runs on the map's at_least join."""
    s = pb.WorkflowSpec(name="map")
    s.actions.add(id="src", handler="h")
    m = s.actions.add(id="fan", handler="h", needs=["src"])
    m.map.over = "src.items"
    m.map.max_parallel = 2
    m.join.kind = pb.JOIN_KIND_AT_LEAST
    m.join.at_least_count = 2
    s.actions.add(id="after", handler="h", needs=["fan"])
    d.hello("s1", "w1", slots=4)
    src = _one(d.submit(s))
    children = _by_action(d.done("s1", src, outputs=ITEMS3))
    assert sorted(children) == ["fan.0", "fan.1"]  # max_parallel
    d.started("s1", children["fan.0"])
    third = _one(d.done("s1", children["fan.0"], outputs='{"v": 0}'))
    assert third.action_id == "fan.2"
    d.done("s1", children["fan.1"], outcome=FAIL, exit_code=3)
    after = _one(d.done("s1", third, outputs='{"v": 2}'))
    assert d.state("fan") == "ACTION_STATE_SUCCEEDED"
    d.done("s1", after)
    assert _wf_state(d) == "WORKFLOW_STATE_PARTIALLY_SUCCEEDED"
    return {E.EVENT_TYPE_ACTION_MAPPED}


def pipeline(d: RecordingDriver) -> set[int]:
    """A two-stage pipeline over three items, one item in flight at a time; a stage retried."""
    s = pb.WorkflowSpec(name="pipe")
    s.actions.add(id="src", handler="h")
    p = s.actions.add(id="pipe", needs=["src"])
    p.pipeline.over = "src.items"
    p.pipeline.max_in_flight = 1
    p.pipeline.stages.add(id="one", handler="h")
    two = p.pipeline.stages.add(id="two", handler="h")
    two.retry.max_attempts = 2
    two.retry.initial_backoff.FromMilliseconds(500)
    two.retry.jitter = 0.0
    d.hello("s1", "w1", slots=2)
    src = _one(d.submit(s))
    first = _one(d.done("s1", src, outputs=ITEMS3))
    assert first.action_id == "pipe.0.one"  # in flight: one item at a time
    second = _one(d.done("s1", first))
    assert second.action_id == "pipe.0.two"
    d.done("s1", second, outcome=FAIL)  # retried in 0.5 s
    again = _one(d.advance(0.6))
    nxt = _one(d.done("s1", again))
    for _ in range(3):  # items 1 and 2, stage by stage
        nxt = _one(d.done("s1", nxt))
    d.done("s1", nxt)
    assert _wf_state(d) == "WORKFLOW_STATE_SUCCEEDED"
    return {E.EVENT_TYPE_ACTION_MAPPED, E.EVENT_TYPE_ACTION_RETRY_SCHEDULED}


def hedged(d: RecordingDriver) -> set[int]:
    """Speculation: a hedge that wins the race; a primary that fails beside its hedge; a map
    whose children hedge at the p95 of the durations its earlier children took."""
    s = pb.WorkflowSpec(name="hedge")
    for aid in ("win", "lose"):
        a = s.actions.add(id=aid, handler="h")
        a.speculate.after.FromSeconds(2)
        a.timeout.FromSeconds(30)
    d.hello("s1", "w1", slots=2)
    first = _by_action(d.submit(s))
    d.started("s1", first["win"], first["lose"])
    d.advance(1.0)
    d.hello("s2", "w2", slots=2)
    hedges = _by_action(d.advance(1.5))  # past 2 s: each gets a second attempt on w2
    assert {h.fencing_token for h in hedges.values()} == {2}
    d.heartbeat("s1", list(first.values()))
    d.done("s2", hedges["win"], outputs='{"by": "hedge"}')  # the hedge commits; w1's is fenced
    d.done("s1", first["lose"], outcome=FAIL)  # one attempt fails: the other goes on
    d.started("s2", hedges["lose"])
    d.done("s2", hedges["lose"])
    assert _wf_state(d) == "WORKFLOW_STATE_SUCCEEDED"

    d.close("s1")
    d.close("s2")
    m = pb.WorkflowSpec(name="p95")
    m.actions.add(id="src", handler="h")
    fan = m.actions.add(id="fan", handler="h", needs=["src"])
    fan.map.over = "src.items"
    fan.speculate.after_p95 = True
    d.submit(m, "wf-2")
    src = _one(d.hello("s3", "w3", slots=1))  # one at a time
    nxt = _one(d.done("s3", src, outputs='{"items": [0, 1, 2, 3, 4, 5, 6]}'))
    for i in range(5):  # five samples, 0.1 s to 0.5 s: the p95 is 0.5 s
        d.advance(0.1 * (i + 1))
        nxt = _one(d.done("s3", nxt))
    last = _one(d.hello("s4", "w4", slots=2))  # the seventh child, and room for a hedge
    hedge = _one(d.advance(0.6), "s4")  # the sixth child runs past the p95
    assert hedge.action_id == nxt.action_id and hedge.fencing_token == 2
    d.done("s3", nxt)  # the first attempt wins this time
    d.done("s4", last)
    assert _wf_state(d, "wf-2") == "WORKFLOW_STATE_SUCCEEDED"
    return {E.EVENT_TYPE_LEASE_LOST}


def backoff(d: RecordingDriver) -> set[int]:
    """Retries with exponential backoff (no jitter), the last attempt succeeding."""
    s = pb.WorkflowSpec(name="retry")
    a = s.actions.add(id="a0", handler="h")
    a.retry.max_attempts = 3
    a.retry.initial_backoff.FromSeconds(2)
    a.retry.backoff_multiplier = 2.0
    a.retry.jitter = 0.0
    s.actions.add(id="a1", handler="h", needs=["a0"])
    d.hello("s1", "w1", slots=1)
    first = _one(d.submit(s))
    d.done("s1", first, outcome=FAIL, exit_code=1)  # retry in 2 s
    assert grants(d.advance(1.0)) == []
    second = _one(d.advance(1.2))
    d.done("s1", second, outcome=FAIL, exit_code=1)  # retry in 4 s
    d.advance(2.0)
    d.heartbeat("s1", [])
    d.advance(1.0)
    d.heartbeat("s1", [])  # echoes the ack of the one before: it still hears the coordinator
    third = _one(d.advance(1.1))
    assert third.fencing_token == 3
    a1 = _one(d.done("s1", third))
    d.done("s1", a1)
    assert _wf_state(d) == "WORKFLOW_STATE_SUCCEEDED"
    return {E.EVENT_TYPE_ACTION_RETRY_SCHEDULED}


def lease_lost(d: RecordingDriver) -> set[int]:
    """Leases expire (no heartbeat for the TTL) and go to another worker; a closed stream's
    lease is re-adopted on reconnect; an action that loses more leases than its budget fails."""
    s = pb.WorkflowSpec(name="lost")
    s.actions.add(id="a0", handler="h")
    s.actions.add(id="a1", handler="h")
    d.hello("s1", "w1", slots=2)
    first = _by_action(d.submit(s))
    d.advance(2.0)
    d.heartbeat("s1", list(first.values()))
    d.advance(3.0)
    d.msg("s1", credit=wpb.Credit(slots=0))  # not silent, so its stream stays open
    d.advance(2.5)  # but the TTL (5 s) passes without a heartbeat: both lost
    assert d.state("a0") == "ACTION_STATE_READY"
    moved = _by_action(d.hello("s2", "w2", slots=2))
    assert {lease.fencing_token for lease in moved.values()} == {2}
    d.close("s2")  # the stream ends; the leases live on for the TTL
    d.advance(1.0)
    running = [
        wpb.LeaseReport(lease_id=x.lease_id, fencing_token=x.fencing_token, slots=1)
        for x in moved.values()
    ]
    d.hello("s3", "w2", slots=2, running=running)  # re-adopted
    d.done("s3", moved["a0"])
    d.done("s1", first["a1"])  # a zombie's stale result: refused
    d.done("s3", moved["a1"])
    assert _wf_state(d) == "WORKFLOW_STATE_SUCCEEDED"

    more = pb.WorkflowSpec(name="more")
    more.actions.add(id="m0", handler="h")
    more.actions.add(id="m1", handler="h")
    leases = _by_action(d.submit(more, "wf-3"))
    again = _one(d.heartbeat("s3", [leases["m0"]], seq=2))  # m1 not reported: lost at once
    # Self-fenced: w2's second loss in a row holds it back (2 x heartbeat_interval), and no
    # other worker is connected, so m0 waits.
    assert grants(d.done("s3", leases["m0"], outcome=wpb.ACTION_OUTCOME_CANCELLED)) == []
    assert d.st.streaks["w2"].losses == 2
    d.advance(1.0)
    d.heartbeat("s3", [again])
    third = _one(d.advance(1.1))
    assert third.action_id == "m0" and third.fencing_token == 2
    d.done(_session(d, again), again)
    d.done(_session(d, third), third)
    assert _wf_state(d, "wf-3") == "WORKFLOW_STATE_SUCCEEDED"

    d.close("s1")
    d.close("s3")
    budget = pb.WorkflowSpec(name="budget")
    budget.actions.add(id="b", handler="h")
    d.submit(budget, "wf-2")
    for i in range(4):  # lease_loss_budget is 3: the fourth loss fails it
        # Each attempt starts (an unstarted lease that expires is not charged), then is lost.
        d.started(f"t{i}", _one(d.hello(f"t{i}", f"x{i}", slots=1)))
        d.close(f"t{i}")
        d.advance(5.5)
    assert d.st.workflows["wf-2"].actions["b"].state == pb.ACTION_STATE_FAILED
    return {E.EVENT_TYPE_LEASE_LOST, E.EVENT_TYPE_STALE_RESULT_REFUSED}


def queue_timeout(d: RecordingDriver) -> set[int]:
    """Queue timeouts: a root leased in time; a dependent no worker can run, timed out after a
    restart-worthy wait; a root ready again after a lost lease waits a fresh timeout."""
    s = pb.WorkflowSpec(name="q")
    s.actions.add(id="a0", handler="h").queue_timeout.FromSeconds(3)
    a1 = s.actions.add(id="a1", handler="nobody", needs=["a0"])
    a1.queue_timeout.FromSeconds(4)
    s.actions.add(id="a2", handler="h").queue_timeout.FromSeconds(2)
    d.submit(s)
    d.advance(1.0)
    a0 = _one(d.hello("s1", "w1", slots=1))
    assert a0.action_id == "a0"
    d.advance(1.5)  # a2 waits for the slot past its 2 s
    assert d.state("a2") == "ACTION_STATE_TIMED_OUT"
    d.done("s1", a0)
    d.advance(3.0)
    d.heartbeat("s1", [])
    d.advance(1.5)
    assert d.state("a1") == "ACTION_STATE_TIMED_OUT"
    return {E.EVENT_TYPE_ACTION_FINISHED}


def run_timeout(d: RecordingDriver) -> set[int]:
    """Run timeouts (retried once, then TIMED_OUT) and a progress timeout (heartbeat_timeout)
    after progress reports stop."""
    s = pb.WorkflowSpec(name="t")
    a = s.actions.add(id="slow", handler="h")
    a.timeout.FromSeconds(3)
    a.retry.max_attempts = 2
    a.retry.initial_backoff.FromMilliseconds(200)
    a.retry.jitter = 0.0
    quiet = s.actions.add(id="quiet", handler="h")
    quiet.heartbeat_timeout.FromSeconds(2)
    d.hello("s1", "w1", slots=2)
    leases = _by_action(d.submit(s))
    d.started("s1", *leases.values())
    progress = wpb.LeaseProgress(
        lease_id=leases["quiet"].lease_id, fencing_token=leases["quiet"].fencing_token
    )
    d.advance(1.5)
    d.msg("s1", action_progress=wpb.ActionProgress(leases=[progress]))
    d.heartbeat("s1", list(leases.values()))
    d.advance(1.6)  # slow: past 3 s, retried; quiet: 1.6 s since its progress
    assert d.state("slow") == "ACTION_STATE_READY"
    d.heartbeat("s1", [leases["quiet"]])
    d.msg("s1", credit=wpb.Credit(slots=1))
    again = _one(d.advance(0.3))
    d.advance(0.5)  # quiet: no progress for 2.1 s
    assert d.state("quiet") == "ACTION_STATE_TIMED_OUT"
    d.heartbeat("s1", [again])
    d.advance(2.6)
    assert d.state("slow") == "ACTION_STATE_TIMED_OUT"
    assert _wf_state(d) == "WORKFLOW_STATE_FAILED"
    return {E.EVENT_TYPE_ACTION_RETRY_SCHEDULED, E.EVENT_TYPE_ACTION_FINISHED}


def joined(d: RecordingDriver) -> set[int]:
    """Joins: all (skipped when one need fails), any with cancel_remaining (the race's losers
    cancelled, leased or not), at_least M and a fraction with cancel_remaining."""
    s = pb.WorkflowSpec(name="joins")
    for i in range(4):
        s.actions.add(id=f"r{i}", handler="h")
    s.actions.add(id="all", handler="h", needs=["r0", "r1"])
    anyj = s.actions.add(id="any", handler="h", needs=["r1", "r2", "r3"])
    anyj.join.kind = pb.JOIN_KIND_ANY
    anyj.join.cancel_remaining = True
    least = s.actions.add(id="least", handler="h", needs=["r0", "r1", "r2", "r3"])
    least.join.kind = pb.JOIN_KIND_AT_LEAST
    least.join.at_least_count = 2
    frac = s.actions.add(id="frac", handler="h", needs=["r0", "r1", "least"])
    frac.join.kind = pb.JOIN_KIND_AT_LEAST
    frac.join.at_least_fraction = 0.5
    frac.join.cancel_remaining = True
    d.hello("s1", "w1", slots=3)
    roots = _by_action(d.submit(s))
    assert sorted(roots) == ["r0", "r1", "r2"]  # r3 waits for a slot
    d.done("s1", roots["r0"], outcome=FAIL)  # all: skipped; least needs 2 of the other 3
    out = d.done("s1", roots["r2"])  # any: met, so r1 (leased) and r3 (queued) are cancelled
    assert d.state("r1") == "ACTION_STATE_CANCELLED"
    assert d.state("least") == "ACTION_STATE_SKIPPED"  # cancelled needs: 1 of 4 succeeded
    assert d.state("frac") == "ACTION_STATE_SKIPPED"
    assert d.state("all") == "ACTION_STATE_SKIPPED"
    d.done("s1", _by_action(out)["any"])
    d.done("s1", roots["r1"])  # the cancelled attempt's result: refused
    assert _wf_state(d) == "WORKFLOW_STATE_FAILED"

    met = pb.WorkflowSpec(name="met")
    for i in range(4):
        met.actions.add(id=f"r{i}", handler="h")
    least = met.actions.add(id="least", handler="h", needs=["r0", "r1", "r2", "r3"])
    least.join.kind = pb.JOIN_KIND_AT_LEAST
    least.join.at_least_count = 2
    least.join.cancel_remaining = True
    half = met.actions.add(id="half", handler="h", needs=["r0", "r1"])
    half.join.kind = pb.JOIN_KIND_AT_LEAST
    half.join.at_least_fraction = 0.5
    d.msg("s1", credit=wpb.Credit(slots=3))
    roots = _by_action(d.submit(met, "wf-2"))
    d.done("s1", roots["r0"])  # half: met
    out = d.done("s1", roots["r1"])  # least: met, so r2 and r3 (both leased) are cancelled
    assert d.state("r3", "wf-2") == "ACTION_STATE_CANCELLED"
    todo = grants(out)
    while todo:
        todo += grants(d.done("s1", todo.pop()))
    assert _wf_state(d, "wf-2") == "WORKFLOW_STATE_SUCCEEDED"
    return {E.EVENT_TYPE_ACTION_SKIPPED, E.EVENT_TYPE_ACTION_CANCELLED}


def fail_fast(d: RecordingDriver) -> set[int]:
    """fail_fast: the first failure ends the workflow, leased, queued and pending alike."""
    s = pb.WorkflowSpec(name="ff", fail_fast=True)
    for i in range(3):
        s.actions.add(id=f"r{i}", handler="h")
    s.actions.add(id="sink", handler="h", needs=["r0", "r1", "r2"])
    d.hello("s1", "w1", slots=2)
    roots = _by_action(d.submit(s))
    d.started("s1", roots["r0"])
    d.done("s1", roots["r1"], outcome=FAIL, exit_code=9)
    assert _wf_state(d) == "WORKFLOW_STATE_FAILED"
    return {E.EVENT_TYPE_ACTION_CANCELLED, E.EVENT_TYPE_WORKFLOW_FINISHED}


def cancelled(d: RecordingDriver) -> set[int]:
    """A workflow cancelled with a leased action, a running map, queued and pending actions."""
    s = pb.WorkflowSpec(name="c")
    s.actions.add(id="src", handler="h")
    s.actions.add(id="other", handler="h")
    m = s.actions.add(id="fan", handler="h", needs=["src"])
    m.map.over = "src.items"
    s.actions.add(id="sink", handler="h", needs=["fan"])
    d.hello("s1", "w1", slots=2)
    roots = _by_action(d.submit(s))
    children = _by_action(d.done("s1", roots["src"], outputs=ITEMS3))
    d.started("s1", *children.values())
    d.cancel()
    d.cancel()  # again: nothing more
    assert _wf_state(d) == "WORKFLOW_STATE_CANCELLED"
    d.done("s1", roots["other"])  # a result after the cancel: refused
    return {E.EVENT_TYPE_WORKFLOW_CANCEL_REQUESTED, E.EVENT_TYPE_ACTION_CANCELLED}


def retried(d: RecordingDriver) -> set[int]:
    """``plait retry``: of a failed chain (the failed action and what it skipped run again),
    of a map whose child failed (only that child), refused while running."""
    s = pb.WorkflowSpec(name="r")
    s.actions.add(id="a0", handler="h")
    s.actions.add(id="a1", handler="h", needs=["a0"])
    s.actions.add(id="a2", handler="h", needs=["a1"])
    d.hello("s1", "w1", slots=2)
    a0 = _one(d.submit(s))
    a1 = _one(d.done("s1", a0))
    d.done("s1", a1, outcome=FAIL)
    assert _wf_state(d) == "WORKFLOW_STATE_FAILED"
    ids, out = _retry(d)
    assert ids == ["a1", "a2"]
    a1 = _one(out)
    assert a1.fencing_token == 2
    assert isinstance(_retry(d)[0], Exception)  # running: refused, nothing journalled
    d.done("s1", _one(d.done("s1", a1)))
    assert _wf_state(d) == "WORKFLOW_STATE_SUCCEEDED"

    m = pb.WorkflowSpec(name="rm")
    m.actions.add(id="src", handler="h")
    fan = m.actions.add(id="fan", handler="h", needs=["src"])
    fan.map.over = "src.items"
    src = _one(d.submit(m, "wf-2"))
    children = _by_action(d.done("s1", src, outputs='{"items": [1, 2]}'))
    d.done("s1", children["fan.1"])
    d.done("s1", children["fan.0"], outcome=FAIL)
    assert _wf_state(d, "wf-2") == "WORKFLOW_STATE_FAILED"
    ids, out = _retry(d, "wf-2")
    assert ids == ["fan", "fan.0"]
    d.done("s1", _one(out))
    assert _wf_state(d, "wf-2") == "WORKFLOW_STATE_SUCCEEDED"
    return {E.EVENT_TYPE_WORKFLOW_RETRIED}


def deadline(d: RecordingDriver) -> set[int]:
    """A workflow deadline ends it (leased, queued and pending actions cancelled); retried, it
    gets a fresh deadline, which ends it again."""
    s = pb.WorkflowSpec(name="d")
    s.deadline.FromSeconds(5)
    s.actions.add(id="a0", handler="h")
    s.actions.add(id="a1", handler="h")
    s.actions.add(id="a2", handler="h", needs=["a0"])
    d.hello("s1", "w1", slots=1)
    a0 = _one(d.submit(s))
    d.advance(2.0)
    a1 = _one(d.done("s1", a0))
    d.advance(2.0)
    d.heartbeat("s1", [a1])
    d.advance(1.5)  # 5.5 s: a1 (leased) and a2 (queued) cancelled
    assert _wf_state(d) == "WORKFLOW_STATE_FAILED"
    ids, out = _retry(d)
    assert ids == ["a1", "a2"]
    d.advance(4.0)
    d.heartbeat("s1", [])
    d.advance(1.5)
    assert _wf_state(d) == "WORKFLOW_STATE_FAILED"
    return {E.EVENT_TYPE_WORKFLOW_RETRIED, E.EVENT_TYPE_ACTION_CANCELLED}


SCENARIOS: dict[str, Callable[[RecordingDriver], set[int]]] = {
    f.__name__: f
    for f in (
        plain,
        mapped,
        pipeline,
        hedged,
        backoff,
        lease_lost,
        queue_timeout,
        run_timeout,
        joined,
        fail_fast,
        cancelled,
        retried,
        deadline,
    )
}


def recorded(name: str) -> RecordingDriver:
    d = RecordingDriver()
    covers = SCENARIOS[name](d)
    types = {ev.type for ev in d.records}
    assert covers <= types, f"{name} no longer records {covers - types}"
    return d


@pytest.mark.parametrize("name", SCENARIOS)
def test_live_state_is_consistent_after_every_batch(name: str) -> None:
    """The live core itself keeps the invariants the replayed prefixes are held to."""
    d = recorded(name)
    for i, batch in enumerate(d.batches):
        assert not batch.broken, f"{name}: live, after batch {i}: " + "; ".join(batch.broken)


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_batch_prefix_replays_to_the_live_state(name: str) -> None:
    d = recorded(name)
    for i, batch in enumerate(d.batches):
        st = replayed(d.records[: batch.end], batch.at)
        where = f"{name}: prefix of {batch.end} events (after batch {i})"
        diff = differences(deep_snapshot(st), batch.state)
        assert not diff, f"{where}: replay != live:\n" + "\n".join(diff)
        live, again = batch.timers, timers(st)
        assert same_timers(again, live), f"{where}: timers drift:\n{again}\n!=\n{live}"


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_event_prefix_replays_to_a_consistent_state(name: str) -> None:
    d = recorded(name)
    batch = iter(d.batches)
    current = next(batch)
    for n in range(len(d.records) + 1):
        while current.end < n:
            current = next(batch)
        st = replayed(d.records[:n], current.at)
        bad = broken_invariants(st)
        assert not bad, f"{name}: prefix of {n} events: " + "; ".join(bad)
