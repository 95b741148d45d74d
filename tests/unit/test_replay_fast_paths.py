"""The shortcuts that make replay fast change nothing it rebuilds (issue 13).

Replay asks for a journalled stamp's presence only when the stamp reads as zero, pauses the
cyclic collector only while it applies, and builds a submitted workflow in one pass over its
spec: each is checked here against what it stands for.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from plait.coordinator.core import apply as apply_mod
from plait.coordinator.core.events import Instant
from plait.coordinator.core.replay import happened_at, replay
from plait.coordinator.core.state import SchedulerState
from plait.coordinator.journal.sqlite import SqliteJournal
from plait.v1 import workflow_pb2 as pb
from tests.unit.core_driver import CONFIG, Driver, chain, grants, independent, snapshot


@pytest.fixture
def collector() -> Iterator[None]:
    """Whatever a test does to the collector, the next test finds it as it was."""
    was = gc.isenabled()
    yield
    if was:
        gc.enable()
    else:
        gc.disable()


def test_an_unset_stamp_is_now_and_the_epoch_is_a_stamp() -> None:
    at = Instant(500.0, 10_000)
    unset = pb.HistoryEvent(sequence=1)
    epoch = pb.HistoryEvent(sequence=1)
    epoch.recorded_at.SetInParent()  # set, and zero: 10 s before the replay instant
    assert happened_at(unset, at) == 500.0
    assert happened_at(epoch, at) == 490.0
    later = pb.HistoryEvent(sequence=1)
    later.recorded_at.FromMilliseconds(12_500)  # after the replay instant's wall clock: now
    assert happened_at(later, at) == 500.0
    earlier = pb.HistoryEvent(sequence=1)
    earlier.recorded_at.FromMilliseconds(7_250)
    assert happened_at(earlier, at) == 500.0 - 2.75


def _journal() -> Driver:
    d = Driver()
    d.hello("s1", "w1", slots=2)
    (lease, *_) = grants(d.submit(chain(3)))
    d.finish("s1", lease, outputs='{"x": 1}')
    d.submit(independent(2), "wf-2")
    return d


@pytest.mark.usefixtures("collector")
def test_the_collector_is_paused_while_events_apply_and_resumed_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    d = _journal()
    seen: list[bool] = []
    leased = apply_mod.APPLY[pb.EVENT_TYPE_ACTION_LEASED]

    def probe(st: SchedulerState, ev: pb.HistoryEvent, when: float) -> None:
        seen.append(gc.isenabled())
        leased(st, ev, when)

    monkeypatch.setitem(apply_mod.APPLY, pb.EVENT_TYPE_ACTION_LEASED, probe)
    gc.enable()
    st = SchedulerState(CONFIG)
    assert replay(st, d.records, Instant(d.mono, d.wall)) == len(d.records)
    assert seen and not any(seen)
    assert gc.isenabled()
    assert snapshot(st) == snapshot(d.st)


@pytest.mark.usefixtures("collector")
def test_a_failed_replay_resumes_the_collector_and_a_paused_one_stays_paused() -> None:
    d = _journal()
    gc.enable()
    st = SchedulerState(CONFIG)
    with pytest.raises(ValueError, match="out of order"):
        replay(st, [d.records[0], d.records[0]], Instant(d.mono, d.wall))
    assert gc.isenabled()
    gc.disable()  # e.g. a caller that pauses it around the whole journal
    replay(SchedulerState(CONFIG), d.records, Instant(d.mono, d.wall))
    assert not gc.isenabled()


def test_a_submit_replays_priorities_slots_and_joins_as_decided() -> None:
    s = pb.WorkflowSpec(name="p", priority=2)
    s.actions.add(id="root", handler="h", slots=2)
    s.actions.add(id="urgent", handler="h", priority=7)
    s.actions.add(id="join", handler="h", needs=["root", "urgent"])
    s.actions.add(id="tail", handler="h", needs=["join"])
    d = Driver()
    d.submit(s)
    st = SchedulerState(CONFIG)
    replay(st, d.records, Instant(d.mono, d.wall))
    assert snapshot(st) == snapshot(d.st)
    assert st.prioritized
    wf = st.workflows["wf-1"]
    a = wf.actions
    assert [x.spec.id for x in wf.ready] == ["urgent", "root"]  # higher priority first
    assert (a["root"].slots, a["root"].priority, a["urgent"].priority) == (2, 2, 7)
    assert [n.spec.id for n in a["join"].needs] == ["root", "urgent"]
    assert a["join"].unmet == 2 and a["tail"].unmet == 1
    assert [x.spec.id for x in a["root"].dependents] == ["join"]
    assert wf.remaining == 4
    assert a["join"].state == a["tail"].state == pb.ACTION_STATE_PENDING


@pytest.mark.usefixtures("collector")
async def test_reading_the_journal_for_replay_leaves_the_collector_as_it_found_it(
    tmp_path: Path,
) -> None:
    d = _journal()
    store = SqliteJournal(str(tmp_path / "plait.db"))
    await store.open(0)
    try:
        await store.append(d.records)
        for on in (True, False):
            gc.enable() if on else gc.disable()
            pages = [page async for page in store.replay(batch=3)]
            assert gc.isenabled() is on
            assert [e for page in pages for e in page] == d.records
            assert [len(p) for p in pages][:-1] == [3] * (len(pages) - 1)
    finally:
        await store.close()
