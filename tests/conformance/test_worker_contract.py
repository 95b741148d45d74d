"""Conformance of a worker implementation: the protocol in normal operation (issue 12).

Each test starts a real coordinator (test profile) and workers of the implementation under test
(the ``impl`` fixture), and judges them from outside only: ListWorkers, workflow status and
history, the history invariants (:mod:`tests.system.invariants`) and the SQLite journal
(:mod:`tests.system.journal_check`).
"""

from __future__ import annotations

import json
import statistics
import time

import pytest

from plait.v1 import admin_service_pb2 as admin_pb
from plait.v1 import workflow_pb2 as wf
from tests.conformance.support import (
    action,
    check_all,
    duration,
    listed,
    max_concurrent,
    run_to_end,
    spec,
    started,
    succeeded,
    workers,
)
from tests.conformance.workers import HANDLERS, Implementation, start_worker
from tests.system import invariants
from tests.system.harness import Cluster, describe, wait_for

pytestmark = [pytest.mark.system, pytest.mark.timeout(90)]


def test_hello_is_welcomed_and_listed(cluster: Cluster, impl: Implementation) -> None:
    cluster.start_coordinator()
    labels = {"zone": "conformance", "impl": impl.name}
    start_worker(cluster, impl, "hello-w", slots=3, labels=labels)

    # Once welcomed and heartbeating, all its slots are credited and none is leased.
    info = wait_for(
        "hello-w to be listed with its 3 slots free",
        listed(cluster, "hello-w", lambda w: w.free_slots == 3),
    )
    assert info.slots == 3
    # The suite's handlers at least (an example worker may serve more of its own).
    assert set(HANDLERS) <= set(info.handlers), list(info.handlers)
    assert dict(info.labels) == labels
    assert info.leases == 0
    assert not info.draining
    assert info.hlc.physical_ms > 0, "the worker stamps its messages with its HLC"
    assert cluster.metric("plait_worker_hellos_refused_total") == 0
    assert cluster.metric("plait_input_refused_total") == 0


def test_heartbeats_follow_the_coordinator_cadence(cluster: Cluster, impl: Implementation) -> None:
    # Not the test profile's 250 ms: the worker must use what Welcome says.
    interval_s = 0.4
    cluster.start_coordinator(heartbeat_interval="400ms", lease_ttl="3s")
    start_worker(cluster, impl, "beat-w", slots=1)
    # Heartbeats go on while a handler runs.
    workflow_id = cluster.submit(spec("beat", [action("nap", "sleep", {"seconds": 3})]))
    started(cluster, workflow_id, "nap")

    seen, heard = [], []
    until = time.monotonic() + 3.0  # the sampling window is the property, not a wait
    while time.monotonic() < until:
        info = workers(cluster)["beat-w"]
        seen.append(info.last_seen_ago.ToNanoseconds() / 1e9)
        assert info.HasField("heard_ago"), "no heartbeat echoed an ack (last_ack_sequence)"
        heard.append(info.heard_ago.ToNanoseconds() / 1e9)
        time.sleep(0.05)
    print(
        f"\n{impl.name}: last_seen_ago max {max(seen):.3f}s, heard_ago max {max(heard):.3f}s"
        f" over {len(seen)} samples (interval {interval_s}s)"
    )
    # The cadence, judged by medians so that a loaded machine's stalls do not decide it: at the
    # 400 ms Welcome says, the last message is ~200 ms old on average; at any other cadence a
    # worker would be far off (the SDK default is 5 s). The maxima must stay within the TTL.
    assert statistics.median(seen) < interval_s, f"not at the cadence: last_seen_ago {seen}"
    assert max(seen) < 3.0, f"a heartbeat came later than the TTL: {max(seen):.3f}s"
    # Heartbeats echo recent acks (heard_ago < 3 intervals keeps a worker eligible for leases).
    assert statistics.median(heard) < 2 * interval_s, f"acks not echoed in time: {heard}"
    status = cluster.wait_workflow(workflow_id, timeout=30)
    succeeded(status)


def test_credits_are_never_exceeded(cluster: Cluster, impl: Implementation) -> None:
    cluster.start_coordinator()
    start_worker(cluster, impl, "credit-w", slots=2)
    # Leases beyond the slots only as prefetch the worker asked for (Welcome.prefetch); never
    # more running than slots.
    room = 2 + workers(cluster)["credit-w"].prefetch_limit
    workflow = spec("credits", [action(f"nap-{i}", "sleep", {"seconds": 0.3}) for i in range(10)])
    workflow_id = cluster.submit(workflow)

    most_listed = 0
    while cluster.get(workflow_id).state == wf.WORKFLOW_STATE_RUNNING:
        most_listed = max(most_listed, workers(cluster)["credit-w"].leases)
        time.sleep(0.05)
    status = cluster.wait_workflow(workflow_id, timeout=60)
    succeeded(status)
    events = cluster.history(workflow_id)
    check_all(cluster, events, workflow)
    most_leased, most_running = max_concurrent(events, "credit-w")
    print(
        f"\n{impl.name}: at most {most_leased} leased, {most_running} running, listed"
        f" {most_listed} (room {room})"
    )
    assert most_running <= 2 and most_leased <= room and most_listed <= room
    # It did credit both slots (else the test proves nothing).
    assert most_running == 2, f"never ran 2 at once with 2 slots ({most_running})"


def test_results_carry_their_lease_tokens(cluster: Cluster, impl: Implementation) -> None:
    cluster.start_coordinator()
    start_worker(cluster, impl, "echo-w", slots=2)
    inputs = {
        "e1": {"nested": [1, 2.5, {"b": "ü ☃"}], "t": True, "n": None},
        "e2": "plain text",
        "e3": 42,
        "e4": None,  # no static input
    }
    workflow = spec(
        "echo",
        [
            action("e1", "echo", inputs["e1"]),
            action("e2", "echo", inputs["e2"], needs=["e1"]),
            action("e3", "echo", inputs["e3"], needs=["e1"]),
            action("e4", "echo", needs=["e2", "e3"]),
        ],
    )
    _, status, events = run_to_end(cluster, workflow)
    succeeded(status)
    check_all(cluster, events, workflow)
    for a in status.actions:
        assert json.loads(a.outputs_json) == {"value": inputs[a.action_id]}, a
        assert a.worker_id == "echo-w"
        (lease,) = invariants.of_type(events, wf.EVENT_TYPE_ACTION_LEASED, a.action_id)
        (done,) = invariants.of_type(events, wf.EVENT_TYPE_ACTION_FINISHED, a.action_id)
        assert done.fencing_token == lease.fencing_token == a.fencing_token
        # A start report may be left out when the result goes in the same flush.
        starts = invariants.of_type(events, wf.EVENT_TYPE_ACTION_STARTED, a.action_id)
        assert len(starts) <= 1 and all(s.fencing_token == a.fencing_token for s in starts)
        assert done.lease_id == lease.lease_id
    assert not invariants.of_type(events, wf.EVENT_TYPE_STALE_RESULT_REFUSED)
    assert cluster.metric("plait_worker_reports_refused_total") == 0


def test_typed_failures_are_retried_by_type(cluster: Cluster, impl: Implementation) -> None:
    cluster.start_coordinator()
    start_worker(cluster, impl, "fail-w", slots=2)
    retry = wf.RetryPolicy(
        max_attempts=3,
        initial_backoff=duration(0.1),
        max_backoff=duration(0.2),
        retryable_errors=["RateLimited"],
    )
    listed = spec(
        "typed-listed",
        [action("f", "fail", {"type": "RateLimited", "message": "slow down"}, retry=retry)],
    )
    unlisted = spec(
        "typed-unlisted",
        [action("f", "fail", {"type": "Fatal", "message": "give up"}, retry=retry)],
    )
    listed_id, unlisted_id = cluster.submit(listed), cluster.submit(unlisted)

    for workflow_id, workflow, error_type, message, attempts in (
        (listed_id, listed, "RateLimited", "slow down", 3),
        (unlisted_id, unlisted, "Fatal", "give up", 1),
    ):
        status = cluster.wait_workflow(workflow_id, timeout=60)
        assert status.state == wf.WORKFLOW_STATE_FAILED, describe(status)
        events = cluster.history(workflow_id)
        check_all(cluster, events, workflow)
        leases = invariants.of_type(events, wf.EVENT_TYPE_ACTION_LEASED, "f")
        retries = invariants.of_type(events, wf.EVENT_TYPE_ACTION_RETRY_SCHEDULED, "f")
        (done,) = invariants.of_type(events, wf.EVENT_TYPE_ACTION_FINISHED, "f")
        shown = "; ".join(map(invariants.show, events))
        assert len(leases) == attempts and len(retries) == attempts - 1, shown
        for e in [*retries, done]:
            assert e.error_type == error_type, f"{invariants.show(e)}: {e.error_type!r}"
            assert message in e.error.message, f"{invariants.show(e)}: {e.error.message!r}"
            assert e.error.code != 0, f"a failure with status OK: {invariants.show(e)}"
        assert done.action_state == wf.ACTION_STATE_FAILED
        assert status.actions[0].attempt == attempts


def test_progress_keeps_a_heartbeat_timeout_at_bay(cluster: Cluster, impl: Implementation) -> None:
    cluster.start_coordinator()
    start_worker(cluster, impl, "prog-w", slots=2)
    timeout = duration(0.7)
    reporting = spec(
        "progress", [action("p", "progress", {"seconds": 2.0}, heartbeat_timeout=timeout)]
    )
    silent = spec("silent", [action("s", "sleep", {"seconds": 30}, heartbeat_timeout=timeout)])
    reporting_id, silent_id = cluster.submit(reporting), cluster.submit(silent)

    status = cluster.wait_workflow(reporting_id, timeout=30)
    succeeded(status)
    assert json.loads(status.actions[0].outputs_json)["reports"] >= 5
    check_all(cluster, cluster.history(reporting_id), reporting)
    # The control: without progress the same timeout fires, and the worker stops the attempt
    # when told (its slot comes back).
    status = cluster.wait_workflow(silent_id, timeout=30)
    assert status.actions[0].state == wf.ACTION_STATE_TIMED_OUT, describe(status)
    (done,) = invariants.of_type(cluster.history(silent_id), wf.EVENT_TYPE_ACTION_FINISHED, "s")
    assert done.reason == wf.EVENT_REASON_PROGRESS_TIMEOUT, invariants.show(done)
    wait_for(
        "prog-w to get its slots back",
        lambda: (w := workers(cluster)["prog-w"]).leases == 0 and w.free_slots == 2,
        timeout=10,
    )


def test_cancel_stops_the_attempt_and_frees_its_slot(
    cluster: Cluster, impl: Implementation
) -> None:
    cluster.start_coordinator()
    start_worker(cluster, impl, "cancel-w", slots=1)
    connected_at = workers(cluster)["cancel-w"].connected_at
    workflow = spec("cancel", [action("nap", "sleep", {"seconds": 120})])
    workflow_id = cluster.submit(workflow)
    started(cluster, workflow_id, "nap")

    cancelled_at = time.monotonic()
    cluster.cancel(workflow_id)
    status = cluster.wait_workflow(workflow_id, timeout=30)
    assert status.state == wf.WORKFLOW_STATE_CANCELLED, describe(status)
    freed = wait_for(
        "cancel-w to free its slot",
        lambda: (
            (w := workers(cluster)["cancel-w"]).leases == 0
            and w.free_slots == 1
            and time.monotonic()
        ),
        timeout=15,
    )
    # The freed slot takes new work at once.
    _, after, _ = run_to_end(cluster, spec("after-cancel", [action("e", "echo", "next")]), 30)
    succeeded(after)
    assert after.actions[0].worker_id == "cancel-w"
    ran = time.monotonic()
    print(
        f"\n{impl.name}: slot free {freed - cancelled_at:.2f}s after the cancel,"
        f" next action done {ran - cancelled_at:.2f}s after it"
    )
    events = cluster.history(workflow_id)
    check_all(cluster, events, workflow, all_finished=False)
    assert invariants.of_type(events, wf.EVENT_TYPE_ACTION_CANCELLED, "nap")
    assert not invariants.of_type(events, wf.EVENT_TYPE_ACTION_FINISHED, "nap")
    assert workers(cluster)["cancel-w"].connected_at == connected_at, "the worker reconnected"


def test_drain_finishes_the_work_and_leaves(cluster: Cluster, impl: Implementation) -> None:
    cluster.start_coordinator()
    daemon = start_worker(cluster, impl, "drain-w", slots=2)
    workflow = spec("drain", [action("nap", "sleep", {"seconds": 1.5})])
    workflow_id = cluster.submit(workflow)
    lease = started(cluster, workflow_id, "nap")

    cluster.admin.DrainWorker(admin_pb.DrainWorkerRequest(worker_id="drain-w"), timeout=10)
    # Submitted while it drains: must not be leased to it.
    late = spec("late", [action("e", "echo", "late")])
    late_id = cluster.submit(late)
    status = cluster.wait_workflow(workflow_id, timeout=30)
    succeeded(status)
    wait_for("drain-w to leave ListWorkers", lambda: "drain-w" not in workers(cluster), timeout=30)
    code = daemon.wait(30)
    assert code == 0, f"drain-w exited with {code} after draining"

    events = cluster.history(workflow_id)
    (done,) = invariants.of_type(events, wf.EVENT_TYPE_ACTION_FINISHED, "nap")
    assert (done.worker_id, done.fencing_token) == ("drain-w", lease.fencing_token)
    assert not invariants.of_type(events, wf.EVENT_TYPE_LEASE_LOST)
    assert not invariants.of_type(cluster.history(late_id), wf.EVENT_TYPE_ACTION_LEASED)
    # Another worker takes what the drained one would not.
    start_worker(cluster, impl, "after-w", slots=1)
    late_status = cluster.wait_workflow(late_id, timeout=30)
    succeeded(late_status)
    assert late_status.actions[0].worker_id == "after-w"
    invariants.check_history(cluster.history(late_id), late)
    check_all(cluster, events, workflow)


def test_malformed_input_fails_the_attempt_only(cluster: Cluster, impl: Implementation) -> None:
    cluster.start_coordinator()
    start_worker(cluster, impl, "bad-w", slots=1)
    connected_at = workers(cluster)["bad-w"].connected_at
    workflow = spec("bad-input", [action("nap", "sleep", {"seconds": "x"})])
    _, status, events = run_to_end(cluster, workflow, timeout=30)
    assert status.state == wf.WORKFLOW_STATE_FAILED, describe(status)
    check_all(cluster, events, workflow)
    (done,) = invariants.of_type(events, wf.EVENT_TYPE_ACTION_FINISHED, "nap")
    assert done.action_state == wf.ACTION_STATE_FAILED
    assert done.error.code != 0 and done.error.message.strip(), f"no clear error: {done.error}"
    print(f"\n{impl.name}: {done.error_type!r} {done.error.message!r}")

    # Still connected on the same session, and still working.
    _, after, _ = run_to_end(cluster, spec("after-bad", [action("e", "echo", [1])]), 30)
    succeeded(after)
    assert after.actions[0].worker_id == "bad-w"
    assert workers(cluster)["bad-w"].connected_at == connected_at, "the worker reconnected"
    assert cluster.metric("plait_input_refused_total") == 0
