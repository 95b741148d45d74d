"""The worker's outbox: what one flush sends, and when start reports may wait for company."""

from __future__ import annotations

from plait.v1 import worker_service_pb2 as pb
from plait.worker.outgoing import Outbox


def report(lease_id: str) -> pb.LeaseReport:
    return pb.LeaseReport(lease_id=lease_id)


def result(lease_id: str) -> pb.ActionResult:
    return pb.ActionResult(lease_id=lease_id, outcome=pb.ACTION_OUTCOME_SUCCEEDED)


def test_start_reports_alone_may_wait_anything_else_may_not() -> None:
    box = Outbox()
    assert not box.only_starts  # nothing waits
    box.started(report("l1"))
    assert box.only_starts
    box.credit(1)
    assert not box.only_starts  # freed slots go at once: the coordinator can lease them
    box.take(draining=False)
    box.started(report("l2"))
    box.progress(pb.LeaseProgress(lease_id="l2", details_json="{}"))
    assert not box.only_starts
    box.take(draining=False)
    box.take_progress()
    box.started(report("l3"))
    box.finished(result("l3"), credit=1)
    assert not box.only_starts


def test_a_result_replaces_the_start_report_of_its_attempt() -> None:
    box = Outbox()
    box.started(report("l1"))
    box.started(report("l2"))
    box.finished(result("l1"), credit=1)
    started, finished, credit = box.take(draining=False)
    assert [s.lease_id for s in started] == ["l2"]  # l1's result implies its start
    assert [r.lease_id for r in finished] == ["l1"] and credit == 1
    assert box.take(draining=False) == ([], [], 0)


def test_a_draining_worker_returns_no_credit() -> None:
    box = Outbox()
    box.finished(result("l1"), credit=2)
    assert box.take(draining=True).credit == 0
