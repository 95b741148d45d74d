"""Worker-contract rules made normative by docs/protocol.md (issue 12, ../shared/protocol-gaps.md).

Each test names the gap it settles.
"""

from __future__ import annotations

import pytest
from google.rpc import code_pb2, error_details_pb2

from plait.clock import ManualClock
from plait.coordinator.config import Limits
from plait.coordinator.services.worker import ReportCheck, check_hello
from plait.errors import InvalidArgumentError
from plait.hlc import ClockOffsetError, HlcTimestamp, HybridLogicalClock
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb
from tests.unit.core_driver import Driver, grants, independent, messages

E = pb


def result_ack(out: object, session: str) -> wpb.ResultAck:
    (msg,) = [m for m in messages(out, session, "ack") if m.ack.results]  # type: ignore[arg-type]
    return msg.ack.results[0]


def test_gap3_reporting_a_cancelled_attempt_is_acked_ok_and_journals_nothing() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=1)
    (lease,) = grants(d.submit(independent(1)))
    d.cancel()  # the coordinator commits CANCELLED and sends cancel_lease
    out = d.finish("s1", lease, outcome=wpb.ACTION_OUTCOME_CANCELLED)
    assert result_ack(out, "s1").status.code == code_pb2.OK
    assert out.records == []


def test_gap2_a_refused_result_carries_a_typed_reason() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=1)
    (old,) = grants(d.submit(independent(1)))
    d.heartbeat("s1", [])  # w1 drops it: lost, re-leased with token 2 (back to w1)
    out = d.finish("s1", old)
    ack = result_ack(out, "s1")
    assert ack.status.code == code_pb2.FAILED_PRECONDITION
    info = error_details_pb2.ErrorInfo()
    assert ack.status.details[0].Unpack(info)
    assert info.reason == "LEASE_SUPERSEDED" and info.domain == "plait.dev"
    assert info.metadata["current_token"] == "2"
    assert [r.type for r in out.records] == [E.EVENT_TYPE_STALE_RESULT_REFUSED]


def test_gap24_cancel_messages_say_what_the_reason_says() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=2)
    (old,) = grants(d.submit(independent(1)))
    (new,) = grants(d.heartbeat("s1", []))  # not reported: lost, and leased again (token 2)
    unknown = wpb.Lease(lease_id="wf-9/x/1", fencing_token=1)
    out = d.heartbeat("s1", [new, old, unknown])
    got = {
        c.lease_id: (c.reason, c.message)
        for m in messages(out, "s1", "cancel_lease")
        for c in m.cancel_lease.leases
    }
    nobody = "the coordinator knows no such lease"
    assert got["wf-9/x/1"] == (wpb.CANCEL_REASON_UNKNOWN_LEASE, nobody)
    assert got[old.lease_id] == (wpb.CANCEL_REASON_SUPERSEDED, "superseded by token 2")


def test_gap27_a_lease_carries_its_effective_slots() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=4)
    (lease,) = grants(d.submit(independent(1)))  # the spec leaves slots unset
    assert lease.action.slots == 1


def test_gap29_welcome_sends_the_max_clock_offset() -> None:
    d = Driver()
    (welcome,) = messages(d.hello("s1", "w1"), "s1", "welcome")
    assert welcome.welcome.max_clock_offset.ToMilliseconds() == d.st.hlc.max_offset_ms


def test_gap9_history_keeps_the_results_own_finished_stamp() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=1)
    (lease,) = grants(d.submit(independent(1)))
    res = wpb.ActionResult(
        lease_id=lease.lease_id,
        fencing_token=lease.fencing_token,
        outcome=wpb.ACTION_OUTCOME_SUCCEEDED,
        outputs_json="{}",
    )
    res.finished_hlc.physical_ms, res.finished_hlc.logical = d.wall - 5, 3
    out = d.msg("s1", action_finished=wpb.ActionFinished(results=[res]))
    (done,) = [r for r in out.records if r.type == E.EVENT_TYPE_ACTION_FINISHED]
    assert (done.worker_hlc.physical_ms, done.worker_hlc.logical) == (d.wall - 5, 3)


def test_gap16_a_worker_that_can_run_nothing_is_refused() -> None:
    hello = wpb.ConnectRequest(hello=wpb.Hello(worker_id="w1", slots=1))
    with pytest.raises(InvalidArgumentError) as err:
        check_hello(hello)
    assert [v.field for v in err.value.violations] == ["hello.handlers"]
    hello.hello.exec_enabled = True
    check_hello(hello)


def test_gap19_heartbeat_sequences_start_at_one_and_increase() -> None:
    check = ReportCheck(Limits(), None)
    for bad in (0,):
        with pytest.raises(InvalidArgumentError, match=r"heartbeat\.sequence"):
            check.check(wpb.ConnectRequest(heartbeat=wpb.Heartbeat(sequence=bad)))
    check.check(wpb.ConnectRequest(heartbeat=wpb.Heartbeat(sequence=5)))  # a later stream's
    with pytest.raises(InvalidArgumentError, match="greater than the stream's last"):
        check.check(wpb.ConnectRequest(heartbeat=wpb.Heartbeat(sequence=5)))
    check.check(wpb.ConnectRequest(heartbeat=wpb.Heartbeat(sequence=6)))


def test_a_worker_merges_its_coordinators_stamp_however_far_ahead() -> None:
    clock = ManualClock(wall_ms=1_000_000)
    hlc = HybridLogicalClock(clock)
    ahead = HlcTimestamp(1_000_000 + 3_600_000, 7)  # the worker's clock is an hour behind
    with pytest.raises(ClockOffsetError):
        hlc.observe(ahead)
    assert hlc.observe(ahead, bounded=False) == HlcTimestamp(ahead.physical_ms, 8)
    assert hlc.now() > ahead  # its next report is stamped after the lease that caused it


def test_a_worker_session_merges_and_counts_a_far_ahead_coordinator_stamp() -> None:
    from plait.v1 import hlc_pb2
    from plait.worker.session_config import SessionStats
    from plait.worker.stamps import CoordinatorStamps

    clock = ManualClock(wall_ms=1_000_000)
    hlc, stats = HybridLogicalClock(clock), SessionStats()
    stamps = CoordinatorStamps(hlc, clock, stats, "w1")
    stamps.observe(hlc_pb2.HlcTimestamp(physical_ms=1_000_000 + 3_600_000, logical=2))
    stamps.observe(hlc_pb2.HlcTimestamp(physical_ms=1_000_100, logical=0))  # within the limit
    assert stats.clock_offset_errors == 1
    assert hlc.last > HlcTimestamp(1_000_000 + 3_600_000, 2)
