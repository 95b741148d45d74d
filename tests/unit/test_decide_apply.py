"""Decide, then apply: one function performs each journalled event, live and on replay, and
it reads meaning from typed fields only (EventReason, error_type, action_state), never from
the words in ``message``."""

from __future__ import annotations

import pytest

from plait.coordinator.core import transitions as t
from plait.coordinator.core.apply import APPLY
from plait.coordinator.core.events import WorkerRevoked
from plait.coordinator.core.model import Revocation
from plait.v1 import workflow_pb2 as pb
from tests.unit.core_driver import (
    RecordingDriver,
    chain,
    deep_snapshot,
    differences,
    grants,
    replayed,
    same_timers,
    timers,
)
from tests.unit.test_replay_prefix import SCENARIOS, recorded

# Event type numbers that were never used, or were retired.
UNUSED = {pb.EVENT_TYPE_UNSPECIFIED}


def test_every_event_type_has_the_function_that_applies_it() -> None:
    missing = [
        pb.EventType.Name(v)  # type: ignore[arg-type]
        for v in pb.EventType.values()
        if v not in UNUSED and v not in APPLY
    ]
    assert not missing, f"event types no transition applies: {missing}"


def _without_words(events: list[pb.HistoryEvent]) -> list[pb.HistoryEvent]:
    """The journal with every message and error message replaced by other words."""
    out = []
    for ev in events:
        copy = pb.HistoryEvent()
        copy.CopyFrom(ev)
        copy.message = "(words changed)"
        if copy.HasField("error"):
            copy.error.message = "(other words)"
        out.append(copy)
    return out


def _meaning(state: dict[str, object]) -> dict[str, object]:
    """A deep snapshot without the words (reasons and error messages are text for people)."""
    out: dict[str, object] = {}
    for key, value in state.items():
        kept = value
        if isinstance(value, tuple) and len(value) == 4:  # a workflow: (..., reason)
            kept = value[:3]
        if isinstance(value, dict) and "reason" in value:
            fields = {k: v for k, v in value.items() if k != "reason"}
            if fields.get("error") is not None:
                fields["error"] = fields["error"][0]  # the code, not the words
            kept = fields
        out[key] = kept
    return out


@pytest.mark.parametrize("name", SCENARIOS)
def test_replay_reads_no_words(name: str) -> None:
    """Replaying a journal whose messages say something else entirely rebuilds the same
    state, timers included: nothing in apply parses text."""
    d = recorded(name)
    last = d.batches[-1]
    st = replayed(_without_words(d.records), last.at)
    diff = differences(_meaning(deep_snapshot(st)), _meaning(last.state))
    assert not diff, f"{name}: replay with other words != live:\n" + "\n".join(diff)
    assert same_timers(timers(st), last.timers)
    # The typed meaning survives: a race's loser is NOT_NEEDED whatever its message says.
    for wf in st.workflows.values():
        for a in wf.actions.values():
            live = d.st.workflows[wf.workflow_id].actions[a.spec.id]
            assert a.reason_code == live.reason_code, a.key


def test_a_revoked_workers_lease_is_not_charged_live_or_after_a_restart() -> None:
    """The revocation's LEASE_LOST is typed WORKER_REVOKED, so replay does not charge the
    lease-loss budget either (it used to: only one loss's message text was exempt)."""
    d = RecordingDriver()
    d.hello("s1", "w1", slots=1)
    d.hello("s2", "w2", slots=1)
    spec = chain(1)
    assert len(grants(d.submit(spec), "s1")) == 1
    revocation = Revocation(reason="key leaked", revoked_by="ops", at_wall_ms=d.wall)
    d.handle(WorkerRevoked("revoke", "w1", revocation))
    lost = [ev for ev in d.records if ev.type == pb.EVENT_TYPE_LEASE_LOST]
    assert [ev.reason for ev in lost] == [pb.EVENT_REASON_WORKER_REVOKED]
    a = d.st.workflows["wf-1"].actions[spec.actions[0].id]
    assert a.lease_losses == 0 and a.state == t.LEASED  # re-leased to w2 at once
    again = replayed(d.records, d.at()).workflows["wf-1"].actions[a.spec.id]
    assert again.lease_losses == 0


def test_the_loss_that_spends_the_budget_is_typed_and_counted_on_replay() -> None:
    """Past lease_loss_budget (3) the action fails with EVENT_REASON_LEASE_LOSS_BUDGET; replay
    counts that loss from the type, not from the error's code or text."""
    d = RecordingDriver()
    spec = chain(1)
    d.submit(spec)
    for i in range(4):
        (lease,) = grants(d.hello(f"s{i}", f"w{i}", slots=1))
        d.started(f"s{i}", lease)  # (an unstarted lease that expires is not charged)
        d.advance(d.st.ttl + 1)  # never heartbeats: expires
    (ended,) = [ev for ev in d.records if ev.type == pb.EVENT_TYPE_ACTION_FINISHED]
    assert ended.action_state == t.FAILED
    assert ended.reason == pb.EVENT_REASON_LEASE_LOSS_BUDGET
    lost = [ev.reason for ev in d.records if ev.type == pb.EVENT_TYPE_LEASE_LOST]
    assert lost == [pb.EVENT_REASON_LEASE_EXPIRED] * 3
    a = d.st.workflows["wf-1"].actions[spec.actions[0].id]
    again = replayed(_without_words(d.records), d.at()).workflows["wf-1"].actions[a.spec.id]
    assert a.lease_losses == again.lease_losses == 4
    assert a.failures == again.failures == 0  # lost leases are not failed attempts
