"""`plait retry`: what did not succeed runs again; committed outputs stay; replay agrees."""

from __future__ import annotations

import json

from plait.coordinator.core.events import Instant, RetryRequested
from plait.coordinator.core.replay import replay
from plait.coordinator.core.state import SchedulerState
from plait.errors import FailedPreconditionError
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb
from tests.unit.core_driver import CONFIG, Driver, chain, grants, snapshot

FAIL = wpb.ACTION_OUTCOME_FAILED


def retry(d: Driver, wf_id: str = "wf-1") -> object:
    out = d.handle(RetryRequested("retry", wf_id, reply=object()))
    return out.replies[0][1], out


def test_retry_reruns_failed_and_skipped_keeping_committed_outputs() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=1)
    (a0,) = grants(d.submit(chain(3)))
    d.finish("s1", a0, outputs='{"kept": true}')
    (a1,) = grants(d.msg("s1", credit=wpb.Credit(slots=1)))
    d.finish("s1", a1, outcome=FAIL)
    d.msg("s1", credit=wpb.Credit(slots=1))
    assert d.st.workflows["wf-1"].state == pb.WORKFLOW_STATE_FAILED
    ids, out = retry(d)
    assert ids == ["a1", "a2"]
    wf = d.st.workflows["wf-1"]
    assert wf.state == pb.WORKFLOW_STATE_RUNNING and d.state("a0") == "ACTION_STATE_SUCCEEDED"
    (again,) = grants(out)
    assert again.action_id == "a1" and again.fencing_token == 2  # tokens keep growing
    assert json.loads(again.inputs_json)["needs"]["a0"]["outputs"] == {"kept": True}
    stale = d.finish("s1", a1)  # the first attempt's result, late: refused
    assert stale.sends["s1"][0].ack.results[0].status.code == 9
    d.finish("s1", again)
    (a2,) = grants(d.msg("s1", credit=wpb.Credit(slots=1)))
    d.finish("s1", a2)
    assert wf.state == pb.WORKFLOW_STATE_SUCCEEDED
    fresh = SchedulerState(CONFIG)
    replay(fresh, d.records, Instant(d.mono, d.wall))
    assert snapshot(fresh) == snapshot(d.st)


def test_retry_of_a_running_or_succeeded_workflow_is_refused() -> None:
    d = Driver()
    d.submit(chain(1))
    value, _ = retry(d)
    assert isinstance(value, FailedPreconditionError) and "RUNNING" in str(value)
    value, _ = retry(d, "wf-nope")
    assert isinstance(value, KeyError)
