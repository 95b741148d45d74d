"""Conformance of a worker implementation under faults (issue 12).

The coordinator SIGKILLed and restarted on its journal (reconnect and re-adoption), the
coordinator SIGSTOPped past the lease TTL (self-fencing), the worker SIGKILLed (re-lease), and
the worker's wall clock an hour off (HLC causality). Judged from outside only, as in
:mod:`tests.conformance.test_worker_contract`.
"""

from __future__ import annotations

import signal
import time

import pytest

from plait.v1 import hlc_pb2
from plait.v1 import workflow_pb2 as wf
from tests.conformance.support import (
    action,
    check_all,
    listed,
    run_to_end,
    spec,
    started,
    succeeded,
    workers,
)
from tests.conformance.workers import Implementation, start_worker
from tests.system import invariants
from tests.system.harness import Cluster, wait_for
from tests.system.tcpproxy import TcpProxy

pytestmark = [pytest.mark.system, pytest.mark.timeout(120)]

# A SIGKILLed coordinator takes 1-3 s to serve again on a loaded machine; with the test
# profile's 2 s TTL a worker would rightly self-fence before it could be re-adopted
# (tests/system/test_restart.py says more).
RESTART_PROFILE = {"lease_ttl": "5s", "heartbeat_interval": "250ms", "kill_grace": "250ms"}
# Lease losses that fit a lease whose holder went silent or gave it up.
LOSS_REASONS = frozenset(
    {
        wf.EVENT_REASON_LEASE_EXPIRED,
        wf.EVENT_REASON_WORKER_LEFT,
        wf.EVENT_REASON_NOT_READOPTED,
        wf.EVENT_REASON_SELF_FENCED,
    }
)


def behind_proxy(
    cluster: Cluster,
    impl: Implementation,
    proxies: list[TcpProxy],
    name: str,
    labels: dict[str, str] | None = None,
) -> TcpProxy:
    """Starts a one-slot worker that reaches the coordinator only through a new TCP proxy."""
    proxy = TcpProxy(cluster.grpc_target).start()
    proxies.append(proxy)
    start_worker(cluster, impl, name, slots=1, labels=labels, coordinator=proxy.address)
    return proxy


def test_reconnect_after_a_coordinator_restart_readopts_the_lease(
    cluster: Cluster, impl: Implementation
) -> None:
    cluster.start_coordinator(**RESTART_PROFILE)
    start_worker(cluster, impl, "adopt-w", slots=1)
    before = workers(cluster)["adopt-w"].connected_at
    workflow = spec("adopt", [action("nap", "sleep", {"seconds": 6})])
    workflow_id = cluster.submit(workflow)
    lease = started(cluster, workflow_id, "nap")

    cluster.kill("coordinator", signal.SIGKILL)
    killed_at = time.monotonic()
    cluster.restart("coordinator")
    back = wait_for(
        "adopt-w to reconnect",
        listed(cluster, "adopt-w", lambda w: w.connected_at != before),
        timeout=30,
    )
    print(f"\n{impl.name}: reconnected {time.monotonic() - killed_at:.2f}s after the SIGKILL")
    assert back.leases == 1, "the running attempt was not reported in Hello.running"

    status = cluster.wait_workflow(workflow_id, timeout=30)
    succeeded(status)
    events = cluster.history(workflow_id)
    check_all(cluster, events, workflow)
    shown = "; ".join(map(invariants.show, events))
    assert not invariants.of_type(events, wf.EVENT_TYPE_LEASE_LOST), shown
    (leased,) = invariants.of_type(events, wf.EVENT_TYPE_ACTION_LEASED, "nap")
    (done,) = invariants.of_type(events, wf.EVENT_TYPE_ACTION_FINISHED, "nap")
    assert done.fencing_token == leased.fencing_token == lease.fencing_token, shown
    assert done.worker_id == "adopt-w"


PAUSE_S = 4.5  # the coordinator's pause: more than twice the 2 s lease TTL
NAP_S = 12.0  # the attempt, had it not been abandoned, would still run long after the pause


@pytest.mark.slow
def test_self_fencing_when_acks_stop(cluster: Cluster, impl: Implementation) -> None:
    cluster.start_coordinator()  # test profile: lease TTL 2 s
    start_worker(cluster, impl, "fence-w", slots=2)
    workflow = spec("fence", [action("nap", "sleep", {"seconds": NAP_S})])
    workflow_id = cluster.submit(workflow)
    first = started(cluster, workflow_id, "nap")
    connected_at = workers(cluster)["fence-w"].connected_at

    cluster.stop("coordinator")
    try:
        time.sleep(PAUSE_S)  # the pause's length is the fault itself
    finally:
        cluster.cont("coordinator")

    # Both slots are free for new work long before the old attempt would have ended: the
    # worker gave it up (a worker still running it would hold one slot, its re-lease the other).
    other = spec("beside", [action("e", "echo", "beside")])
    other_id, beside, beside_events = run_to_end(cluster, other, timeout=30)
    succeeded(beside)
    (echo_done,) = invariants.of_type(beside_events, wf.EVENT_TYPE_ACTION_FINISHED, "e")
    assert echo_done.worker_id == "fence-w"
    old_end_ms = first.hlc.physical_ms + NAP_S * 1000
    assert echo_done.hlc.physical_ms < old_end_ms, (
        f"the echo finished {echo_done.hlc.physical_ms - old_end_ms} ms after the abandoned"
        " attempt would have: it waited for its slot"
    )

    status = cluster.wait_workflow(workflow_id, timeout=60)
    succeeded(status)
    events = cluster.history(workflow_id)
    check_all(cluster, events, workflow)
    invariants.check_history(beside_events, other)
    shown = "; ".join(f"{invariants.show(e)} {e.message!r}" for e in events)
    leases = invariants.of_type(events, wf.EVENT_TYPE_ACTION_LEASED, "nap")
    lost = invariants.of_type(events, wf.EVENT_TYPE_LEASE_LOST, "nap")
    (done,) = invariants.of_type(events, wf.EVENT_TYPE_ACTION_FINISHED, "nap")
    # The old token is never committed; the workflow finishes once, on a later lease.
    assert len(leases) >= 2 and leases[0].fencing_token == first.fencing_token, shown
    assert done.fencing_token == leases[-1].fencing_token > first.fencing_token, shown
    assert len(lost) == 1 and lost[0].fencing_token == first.fencing_token, shown
    assert lost[0].reason in LOSS_REASONS, shown
    reconnected = workers(cluster)["fence-w"].connected_at != connected_at
    print(
        f"\n{impl.name}: first lease lost ({wf.EventReason.Name(lost[0].reason)}:"
        f" {lost[0].message!r}); echo beside it done"
        f" {(old_end_ms - echo_done.hlc.physical_ms) / 1000:.1f}s before the old attempt's end;"
        f" stream {'dropped and reopened' if reconnected else 'kept'};"
        f" stale results refused"
        f" {len(invariants.of_type(events, wf.EVENT_TYPE_STALE_RESULT_REFUSED))}"
    )


def test_self_fencing_when_only_acks_stop(
    cluster: Cluster, impl: Implementation, proxies: list[TcpProxy]
) -> None:
    """Coordinator-to-worker bytes held (one-way partition): the coordinator still hears the
    worker's heartbeats and so never expires the lease, yet the worker, hearing no acks, must
    give the attempt up by itself within the lease TTL: the loss is journalled SELF_FENCED, from
    the worker's own CANCELLED report."""
    cluster.start_coordinator()  # test profile: lease TTL 2 s
    proxy = behind_proxy(cluster, impl, proxies, "deaf-a", labels={"host": "a"})
    workflow = spec("deaf", [action("nap", "sleep", {"seconds": 4})])
    workflow_id = cluster.submit(workflow)
    first = started(cluster, workflow_id, "nap")
    # Only now is the healthy worker there: the first lease was deaf-a's for sure.
    start_worker(cluster, impl, "deaf-b", slots=1, labels={"host": "b"})

    proxy.hold("to_client")
    held_ms = time.time_ns() // 1_000_000
    try:
        lost = cluster.wait_event(
            workflow_id,
            lambda e: e.type == wf.EVENT_TYPE_LEASE_LOST and e.action_id == "nap",
            "deaf-a to give its lease up",
            timeout=30,
        )
        status = cluster.wait_workflow(workflow_id, timeout=30)
    finally:
        proxy.release("to_client")
    succeeded(status)
    fenced_s = (lost.hlc.physical_ms - held_ms) / 1000
    print(
        f"\n{impl.name}: lease given up {fenced_s:.2f}s after the acks stopped"
        f" ({wf.EventReason.Name(lost.reason)}: {lost.message!r})"
    )
    events = cluster.history(workflow_id)
    check_all(cluster, events, workflow)
    shown = "; ".join(f"{invariants.show(e)} {e.message!r}" for e in events)
    assert lost.reason == wf.EVENT_REASON_SELF_FENCED, shown
    assert (lost.worker_id, lost.fencing_token) == ("deaf-a", first.fencing_token), shown
    # By the TTL on its own clock; the slack is the report reaching the journal on a busy host.
    assert fenced_s <= 2.0 + 2.0, f"fenced {fenced_s:.2f}s after the acks stopped (TTL 2 s)"
    leases = invariants.of_type(events, wf.EVENT_TYPE_ACTION_LEASED, "nap")
    assert [e.worker_id for e in leases] == ["deaf-a", "deaf-b"], shown
    (done,) = invariants.of_type(events, wf.EVENT_TYPE_ACTION_FINISHED, "nap")
    assert (done.worker_id, done.fencing_token) == ("deaf-b", leases[1].fencing_token), shown

    # Healed: deaf-a takes and finishes work of its own again.
    pinned = spec("healed", [action("e", "echo", "a", selector={"host": "a"})])
    _, healed, _ = run_to_end(cluster, pinned, timeout=30)
    succeeded(healed)
    assert healed.actions[0].worker_id == "deaf-a"


def test_a_result_whose_ack_was_lost_is_committed_once(
    cluster: Cluster, impl: Implementation, proxies: list[TcpProxy]
) -> None:
    """The result reaches the coordinator and commits, but its ack (all coordinator-to-worker
    bytes) is held past the lease TTL: the worker keeps the result, drops its silent stream,
    and on the new stream reports (or re-sends) it; the coordinator answers the duplicate
    without committing it again. Nothing is lost, nothing commits twice, no report is refused,
    and the worker gets its slot back."""
    cluster.start_coordinator()  # test profile: lease TTL 2 s
    proxy = behind_proxy(cluster, impl, proxies, "acked-late")
    workflow = spec("ack-lost", [action("nap", "sleep", {"seconds": 1.0})])
    workflow_id = cluster.submit(workflow)
    first = started(cluster, workflow_id, "nap")

    proxy.hold("to_client")
    try:
        done = cluster.wait_event(
            workflow_id,
            lambda e: e.type == wf.EVENT_TYPE_ACTION_FINISHED and e.action_id == "nap",
            "the result to commit while its ack is held",
            timeout=30,
        )
        # Past the TTL without an ack: the worker gives the stream up and dials again (its new
        # streams are held too, until the release).
        wait_for("the worker to dial again", lambda: proxy.accepted >= 2, timeout=30)
    finally:
        proxy.release("to_client")
    cluster.wait_heard("acked-late")

    events = cluster.history(workflow_id)
    check_all(cluster, events, workflow)
    shown = "; ".join(f"{invariants.show(e)} {e.message!r}" for e in events)
    assert (done.worker_id, done.fencing_token) == ("acked-late", first.fencing_token), shown
    assert len(invariants.of_type(events, wf.EVENT_TYPE_ACTION_FINISHED)) == 1, shown
    assert not invariants.of_type(events, wf.EVENT_TYPE_LEASE_LOST), shown
    assert not invariants.of_type(events, wf.EVENT_TYPE_STALE_RESULT_REFUSED), shown
    # Its slot came back: it runs the next action.
    _, again, _ = run_to_end(cluster, spec("after", [action("e", "echo", "x")]), timeout=30)
    succeeded(again)
    assert again.actions[0].worker_id == "acked-late"


def test_a_result_that_can_no_longer_commit_is_dropped(
    cluster: Cluster, impl: Implementation, proxies: list[TcpProxy]
) -> None:
    """Worker-to-coordinator bytes held while the attempt finishes: the coordinator hears
    nothing, expires the lease and leases the action to another worker. Released, the first
    worker reconnects holding a finished, unacked result for a superseded lease; Welcome lists
    that lease in ``kill``, and the worker drops the result instead of sending it (it could only
    be refused): no stale result is refused, and the action commits once, from the other
    worker."""
    cluster.start_coordinator()  # test profile: lease TTL 2 s
    proxy = behind_proxy(cluster, impl, proxies, "mute-a", labels={"host": "a"})
    # Long enough for the hold to begin before the result is sent (the start is seen late on a
    # loaded host), short enough to end before the worker's own fence (about 1.25 s after the
    # hold at TTL 2 s); if the fence comes first the worker reports CANCELLED instead, which
    # must not be refused either.
    workflow = spec("mute", [action("nap", "sleep", {"seconds": 1.0})])
    workflow_id = cluster.submit(workflow)
    first = started(cluster, workflow_id, "nap")
    start_worker(cluster, impl, "mute-b", slots=1, labels={"host": "b"})

    proxy.hold("to_server")
    try:
        status = cluster.wait_workflow(workflow_id, timeout=30)
        wait_for("mute-a to dial again", lambda: proxy.accepted >= 2, timeout=30)
    finally:
        proxy.release("to_server")
    succeeded(status)
    cluster.wait_heard("mute-a")

    events = cluster.history(workflow_id)
    check_all(cluster, events, workflow)
    shown = "; ".join(f"{invariants.show(e)} {e.message!r}" for e in events)
    (lost,) = invariants.of_type(events, wf.EVENT_TYPE_LEASE_LOST, "nap")
    assert (lost.worker_id, lost.fencing_token) == ("mute-a", first.fencing_token), shown
    (done,) = invariants.of_type(events, wf.EVENT_TYPE_ACTION_FINISHED, "nap")
    assert done.worker_id == "mute-b" and done.fencing_token > first.fencing_token, shown
    assert not invariants.of_type(events, wf.EVENT_TYPE_STALE_RESULT_REFUSED), shown
    pinned = spec("after", [action("e", "echo", "a", selector={"host": "a"})])
    _, healed, _ = run_to_end(cluster, pinned, timeout=30)
    succeeded(healed)
    assert healed.actions[0].worker_id == "mute-a"


def test_sigkilled_worker_action_is_re_leased(cluster: Cluster, impl: Implementation) -> None:
    cluster.start_coordinator()
    start_worker(cluster, impl, "kill-a", slots=1, wait=False)
    start_worker(cluster, impl, "kill-b", slots=1, wait=False)
    cluster.wait_workers(["kill-a", "kill-b"])
    workflow = spec("kill", [action("nap", "sleep", {"seconds": 4})])
    workflow_id = cluster.submit(workflow)
    first = started(cluster, workflow_id, "nap")
    holder = first.worker_id
    other = {"kill-a": "kill-b", "kill-b": "kill-a"}[holder]

    cluster.kill(holder, signal.SIGKILL)
    assert not cluster.daemon(holder).running()
    status = cluster.wait_workflow(workflow_id, timeout=60)
    succeeded(status)
    events = cluster.history(workflow_id)
    check_all(cluster, events, workflow)
    shown = "; ".join(map(invariants.show, events))
    leases = invariants.of_type(events, wf.EVENT_TYPE_ACTION_LEASED, "nap")
    assert [e.worker_id for e in leases] == [holder, other], shown
    (lost,) = invariants.of_type(events, wf.EVENT_TYPE_LEASE_LOST, "nap")
    assert lost.fencing_token == first.fencing_token and lost.reason in LOSS_REASONS, shown
    (done,) = invariants.of_type(events, wf.EVENT_TYPE_ACTION_FINISHED, "nap")
    assert (done.worker_id, done.fencing_token) == (other, leases[1].fencing_token), shown


NEAR_MS = 5_000  # the coordinator's clock may lead real time by its max offset, plus noise


def stamp(h: hlc_pb2.HlcTimestamp) -> tuple[int, int]:
    return (h.physical_ms, h.logical)


@pytest.mark.parametrize("offset", ["1h", "-1h"])
def test_hlc_causality_with_a_skewed_worker_clock(
    cluster: Cluster, impl: Implementation, offset: str
) -> None:
    cluster.start_coordinator()
    start_worker(cluster, impl, "skew-w", slots=1, env={"PLAIT_CLOCK_OFFSET": offset})
    workflow = spec(
        "skew",
        [
            action("e1", "echo", 1),
            action("e2", "echo", 2, needs=["e1"]),
            action("e3", "echo", 3, needs=["e2"]),
        ],
    )
    began_ms = time.time_ns() // 1_000_000
    _, status, events = run_to_end(cluster, workflow, timeout=60)
    ended_ms = time.time_ns() // 1_000_000
    succeeded(status)
    check_all(cluster, events, workflow)  # causal order: every edge in HLC and journal order
    assert not invariants.of_type(events, wf.EVENT_TYPE_LEASE_LOST), "a spurious expiry"
    for e in events:  # the coordinator's clock was not dragged along
        assert began_ms - NEAR_MS <= e.hlc.physical_ms <= ended_ms + NEAR_MS, invariants.show(e)
    for a in ("e1", "e2", "e3"):
        (leased,) = invariants.of_type(events, wf.EVENT_TYPE_ACTION_LEASED, a)
        for e in [
            *invariants.of_type(events, wf.EVENT_TYPE_ACTION_STARTED, a),
            *invariants.of_type(events, wf.EVENT_TYPE_ACTION_FINISHED, a),
        ]:
            # The worker merged the coordinator's stamps, so what it reports about a lease
            # comes after the lease in HLC order, even with its clock an hour behind.
            assert e.worker_hlc.physical_ms > 0, f"no worker stamp: {invariants.show(e)}"
            assert stamp(e.worker_hlc) > stamp(leased.hlc), (
                f"{a}: worker stamp {stamp(e.worker_hlc)} of {invariants.show(e)} is not after"
                f" the lease's {stamp(leased.hlc)} (offset {offset})"
            )
    if offset.startswith("-"):
        assert cluster.metric("plait_clock_offset_rejections_total", worker="skew-w") == 0
    else:
        assert cluster.metric("plait_clock_offset_rejections_total", worker="skew-w") > 0
