"""The pure scheduling core: exact effects out for stimuli in, time moved by hand."""

from __future__ import annotations

import json

from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb
from tests.unit.core_driver import Driver, chain, grants, independent, messages

E = pb.EventType


def test_leases_never_exceed_credited_slots() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=3)
    out = d.submit(independent(10))
    assert len(grants(out, "s1")) == 3
    assert d.st.workers["w1"].free == 0
    # Finishing frees nothing until the worker credits the slot back.
    lease = grants(out)[0]
    assert grants(d.finish("s1", lease)) == []
    out = d.msg("s1", credit=wpb.Credit(slots=1))
    assert len(grants(out)) == 1


def test_grant_is_one_batch_per_worker_with_growing_sequence() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=100)
    out = d.submit(independent(50))
    batches = messages(out, "s1", "lease_grant")
    assert len(batches) == 1 and len(batches[0].lease_grant.leases) == 50
    assert batches[0].lease_grant.sequence == 1


def test_lease_expires_after_ttl_without_heartbeat_and_token_grows() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=1)
    (lease,) = grants(d.submit(independent(1)))
    d.advance(4.9)
    assert d.state("a0") == "ACTION_STATE_LEASED"
    out = d.advance(0.2)  # 5.1 s after the grant, TTL 5 s
    cancel = messages(out, "s1", "cancel_lease")
    assert cancel[0].cancel_lease.leases[0].fencing_token == 1
    assert d.state("a0") == "ACTION_STATE_READY"
    (again,) = grants(d.hello("s2", "w2", slots=1))
    assert again.fencing_token == 2 and again.attempt == 2
    assert again.lease_id != lease.lease_id


def test_heartbeats_keep_a_lease_alive_past_the_ttl() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=1)
    (lease,) = grants(d.submit(independent(1)))
    for i in range(20):
        d.advance(1.0)
        out = d.heartbeat("s1", [lease], seq=i + 1)
        assert messages(out, "s1", "ack")[0].ack.heartbeat_sequence == i + 1
    assert d.state("a0") == "ACTION_STATE_LEASED"
    assert d.st.workflows["wf-1"].actions["a0"].lease_losses == 0


def test_wall_clock_jumps_do_not_expire_leases() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=1)
    grants(d.submit(independent(1)))
    d.wall += 3_600_000  # NTP steps the wall clock an hour ahead
    d.advance(1.0)
    assert d.state("a0") == "ACTION_STATE_LEASED"


def test_stale_token_refused_and_same_result_twice_same_ack() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=1)
    (old,) = grants(d.submit(independent(1)))
    d.advance(3)
    d.msg("s1", credit=wpb.Credit(slots=0))  # no heartbeat, yet not silent: still connected
    d.advance(3)
    (new,) = grants(d.hello("s2", "w2", slots=1))
    out = d.finish("s1", old)
    ack = messages(out, "s1", "ack")[0].ack.results[0]
    assert ack.status.code == 9 and ack.status.message == "lease token 1 superseded by 2"
    assert out.records[-1].type == E.EVENT_TYPE_STALE_RESULT_REFUSED
    for _ in range(2):
        out = d.finish("s2", new, outputs='{"x": 1}')
        assert messages(out, "s2", "ack")[0].ack.results[0].status.code == 0
    finished = [r for r in d.records if r.type == E.EVENT_TYPE_ACTION_FINISHED]
    assert len(finished) == 1 and finished[0].fencing_token == 2


def test_chain_runs_in_order_and_join_gets_outputs() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=1)
    (a,) = grants(d.submit(chain(3)))
    assert a.action_id == "a0"
    d.finish("s1", a, outputs='{"v": 1}')
    (b,) = grants(d.msg("s1", credit=wpb.Credit(slots=1)))
    assert b.action_id == "a1"
    assert json.loads(b.inputs_json) == {
        "input": None,
        "needs": {"a0": {"state": "ACTION_STATE_SUCCEEDED", "outputs": {"v": 1}}},
    }


def test_failure_skips_downstream_and_names_every_failure() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=4)
    s = chain(3)
    s.actions.add(id="other", handler="h")
    leases = {l.action_id: l for l in grants(d.submit(s))}
    d.finish("s1", leases["a0"], outcome=wpb.ACTION_OUTCOME_FAILED, exit_code=3)
    d.finish("s1", leases["other"])
    wf = d.st.workflows["wf-1"]
    assert d.state("a1") == "ACTION_STATE_SKIPPED" and d.state("a2") == "ACTION_STATE_SKIPPED"
    assert wf.state == pb.WORKFLOW_STATE_FAILED
    assert "a0 FAILED" in wf.reason and "a1 SKIPPED" in wf.reason and "a2 SKIPPED" in wf.reason


def test_retry_waits_for_backoff_then_leases_a_new_attempt() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=1)
    s = independent(1)
    s.actions[0].retry.max_attempts = 2
    s.actions[0].retry.initial_backoff.FromMilliseconds(1000)
    (a,) = grants(d.submit(s))
    out = d.finish("s1", a, outcome=wpb.ACTION_OUTCOME_FAILED, exit_code=1)
    d.msg("s1", credit=wpb.Credit(slots=1))
    assert out.records[-1].type == E.EVENT_TYPE_ACTION_RETRY_SCHEDULED
    assert grants(d.advance(0.4)) == []  # jittered backoff is in [0.5 s, 1 s]
    (b,) = grants(d.advance(0.7))
    assert b.attempt == 2 and b.fencing_token == 2
    d.finish("s1", b, outcome=wpb.ACTION_OUTCOME_FAILED, exit_code=1)
    assert d.state("a0") == "ACTION_STATE_FAILED"


def test_retryable_exit_codes_limit_retries() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=1)
    s = independent(1)
    s.actions[0].retry.max_attempts = 5
    s.actions[0].retry.retryable_exit_codes.append(75)
    (a,) = grants(d.submit(s))
    d.finish("s1", a, outcome=wpb.ACTION_OUTCOME_FAILED, exit_code=1)
    assert d.state("a0") == "ACTION_STATE_FAILED"


def test_run_timeout_cancels_and_times_out() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=1)
    s = independent(1)
    s.actions[0].timeout.FromSeconds(2)
    grants(d.submit(s))
    for i in range(3):
        d.advance(1.0)
        d.heartbeat("s1", [], seq=i + 1, last_grant=0)
    assert d.state("a0") == "ACTION_STATE_TIMED_OUT"


def test_lease_loss_budget_is_separate_and_bounded() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=1)
    (lease,) = grants(d.submit(independent(1)))
    for _ in range(4):
        # Each attempt starts (a lease that expires unstarted is not charged), then expires.
        report = wpb.LeaseReport(lease_id=lease.lease_id, fencing_token=lease.fencing_token)
        d.msg("s1", action_started=wpb.ActionStarted(leases=[report]))
        d.advance(6)  # expire
        d.close("s1")
        out = d.hello("s1", "w1", slots=1)
        out_next = d.advance(0.01)
        leases = grants(out) + grants(out_next)
        if leases:
            lease = leases[0]
    wf = d.st.workflows["wf-1"]
    assert d.state("a0") == "ACTION_STATE_FAILED"
    assert wf.actions["a0"].lease_losses == 4 and wf.actions["a0"].failures == 0
    assert "lease_loss_budget 3" in wf.reason


def test_reconnect_readopts_current_lease_and_kills_stale_ones() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=2)
    (lease,) = grants(d.submit(independent(1)))
    d.close("s1")
    stale = wpb.LeaseReport(lease_id="wf-1/a0/0", fencing_token=0, slots=1)
    current = wpb.LeaseReport(lease_id=lease.lease_id, fencing_token=1, slots=1)
    out = d.hello("s2", "w1", slots=2, running=[current, stale])
    welcome = messages(out, "s2", "welcome")[0].welcome
    assert [r.lease_id for r in welcome.adopted] == [lease.lease_id]
    assert [r.lease_id for r in welcome.kill] == ["wf-1/a0/0"]
    assert d.st.workers["w1"].free == 0  # 2 slots minus the 2 reported
    d.finish("s2", lease)
    assert d.state("a0") == "ACTION_STATE_SUCCEEDED"


def test_heartbeat_releases_unreported_leases_and_cancels_unknown_ones() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=2)
    a, b = grants(d.submit(independent(2)))
    out = d.heartbeat("s1", [a, wpb.Lease(lease_id="wf-1/zz/7", fencing_token=7)])
    assert d.state(b.action_id) == "ACTION_STATE_LEASED"  # re-queued, then re-leased
    assert d.st.workflows["wf-1"].actions[b.action_id].token == 2
    cancels = messages(out, "s1", "cancel_lease")
    assert cancels[0].cancel_lease.leases[0].lease_id == "wf-1/zz/7"


def test_in_flight_grants_are_not_released_by_an_older_heartbeat() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=2)
    (a,) = grants(d.submit(independent(1)))
    d.heartbeat("s1", [], last_grant=0)  # sent before the worker saw grant 1
    assert d.st.workflows["wf-1"].actions["a0"].lease_losses == 0


def test_cancel_cancels_leases_and_ends_the_workflow() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=1)
    (a,) = grants(d.submit(chain(3)))
    out = d.cancel()
    assert (
        messages(out, "s1", "cancel_lease")[0].cancel_lease.leases[0].reason
        == wpb.CANCEL_REASON_USER
    )
    wf = d.st.workflows["wf-1"]
    assert wf.state == pb.WORKFLOW_STATE_CANCELLED
    assert {d.state(x) for x in ("a0", "a1", "a2")} == {"ACTION_STATE_CANCELLED"}
    ack = messages(d.finish("s1", a), "s1", "ack")[0].ack.results[0]
    assert ack.status.code == 9  # the late result cannot commit


def test_fair_share_across_workflows() -> None:
    d = Driver()
    d.submit(independent(20), "wf-1")
    d.submit(independent(20), "wf-2")
    out = d.hello("s1", "w1", slots=10)
    by_wf = [l.workflow_id for l in grants(out)]
    assert by_wf.count("wf-1") == 5 and by_wf.count("wf-2") == 5


def test_handlers_and_labels_route_work() -> None:
    d = Driver()
    s = pb.WorkflowSpec(name="route")
    s.actions.add(id="gpu", handler="h", selector={"gpu": "yes"})
    s.actions.add(id="other", handler="x")
    d.submit(s)
    assert grants(d.hello("s1", "w1", slots=4)) == []
    out = d.hello_with(
        "s2", wpb.Hello(worker_id="w2", slots=4, handlers=["h", "x"], labels={"gpu": "yes"})
    )
    assert sorted(l.action_id for l in grants(out)) == ["gpu", "other"]


def test_history_is_hlc_ordered_even_when_wall_clock_goes_back() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=1)
    (a,) = grants(d.submit(chain(2)))
    d.wall -= 60_000
    d.finish("s1", a)
    d.msg("s1", credit=wpb.Credit(slots=1))
    stamps = [(r.hlc.physical_ms, r.hlc.logical) for r in d.records]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    assert [r.sequence for r in d.records] == list(range(1, len(d.records) + 1))


def test_worker_clock_far_ahead_is_not_merged() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=1)
    m = wpb.ConnectRequest(credit=wpb.Credit(slots=0))
    m.hlc.physical_ms = d.wall + 3_600_000
    from plait.coordinator.core.events import WorkerMessageReceived

    out = d.handle(WorkerMessageReceived("w", "s1", m))
    assert [o.kind for o in out.observations] == ["clock_offset"]
    assert d.st.hlc.last.physical_ms < d.wall + 1000
    assert d.st.workers["w1"].clock_rejections == 1


def test_idempotency_key_returns_the_existing_workflow() -> None:
    d = Driver()
    d.submit(independent(1), "wf-1", key="k")
    out = d.submit(independent(1), "wf-2", key="k")
    assert out.replies[0][1] == ("wf-1", False) and "wf-2" not in d.st.workflows
    assert out.records == []


def test_retryable_errors_name_exception_types_or_codes() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=2)
    s = independent(2)
    for a in s.actions:
        a.retry.max_attempts = 3
        a.retry.retryable_errors.extend(["TimeoutError", "UNAVAILABLE"])
        a.retry.jitter = 0.0
        a.retry.initial_backoff.FromMilliseconds(100)
    leases = {lease.action_id: lease for lease in grants(d.submit(s))}
    for aid, error_type, message in (
        ("a0", "TimeoutError", "slow mirror"),
        ("a1", "KeyError", "TimeoutError: the message is never parsed"),
    ):
        d.msg(
            "s1",
            action_finished=wpb.ActionFinished(
                results=[
                    wpb.ActionResult(
                        lease_id=leases[aid].lease_id,
                        fencing_token=1,
                        outcome=wpb.ACTION_OUTCOME_FAILED,
                        error={"code": 2, "message": message},
                        error_type=error_type,
                    )
                ]
            ),
        )
    assert d.state("a0") == "ACTION_STATE_READY"  # retried: a listed error type
    assert d.state("a1") == "ACTION_STATE_FAILED"  # not listed
    a0 = d.st.workflows["wf-1"].actions["a0"]
    assert abs(a0.not_before - d.mono - 0.1) < 1e-9  # jitter 0: exactly the backoff
