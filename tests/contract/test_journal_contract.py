"""The JournalStore contract, run against every backend (STYLE.md: one suite, every store)."""

from __future__ import annotations

import pytest

from plait.coordinator.journal.store import DeposedError, JournalHead
from plait.hlc import HlcTimestamp
from plait.v1 import workflow_pb2 as pb
from tests.contract.conftest import Backend, event


async def _everything(store: object) -> list[pb.HistoryEvent]:
    out: list[pb.HistoryEvent] = []
    async for batch in store.replay(batch=1000):  # type: ignore[attr-defined]
        out.extend(batch)
    return out


async def test_a_new_journal_is_empty(backend: Backend) -> None:
    me = await backend.leader_store()
    store, head = me.store, me.head
    assert head == JournalHead()
    assert head.hlc_floor == HlcTimestamp(0, 0)
    assert await store.read("wf-1") == []
    assert await _everything(store) == []


async def test_append_then_read_returns_each_workflows_events_in_order(backend: Backend) -> None:
    me = await backend.leader_store()
    store = me.store
    batches = [[event(1, "a"), event(2, "b")], [event(3, "a")], [event(4, "b"), event(5, "a")]]
    for batch in batches:
        await store.append(batch)

    assert await store.read("a") == [event(1, "a"), event(3, "a"), event(5, "a")]
    assert await store.read("b") == [event(2, "b"), event(4, "b")]
    assert await store.read("a", after_sequence=1) == [event(3, "a"), event(5, "a")]
    assert await store.read("a", after_sequence=1, limit=1) == [event(3, "a")]
    assert await store.read("a", after_sequence=5) == []
    assert await store.read("unknown") == []


async def test_replay_returns_everything_in_order_across_batch_boundaries(
    backend: Backend,
) -> None:
    me = await backend.leader_store()
    store = me.store
    events = [event(seq, f"wf-{seq % 4}") for seq in range(1, 26)]
    await store.append(events[:10])
    await store.append(events[10:])

    batches = [batch async for batch in store.replay(batch=7)]

    assert [len(b) for b in batches] == [7, 7, 7, 4]
    assert [e for b in batches for e in b] == events
    # Exactly one batch's worth is no special case.
    assert [len(b) for b in [b async for b in store.replay(batch=25)]] == [25]


async def test_a_batch_is_all_or_nothing(backend: Backend) -> None:
    me = await backend.leader_store()
    store = me.store
    await store.append([event(1), event(2)])

    with pytest.raises(Exception):  # noqa: B017 - each driver has its own integrity error
        await store.append([event(3), event(4), event(4)])  # duplicate inside the batch
    with pytest.raises(Exception):  # noqa: B017
        await store.append([event(3), event(2)], hlc_ceiling_ms=99)  # duplicate of a stored one

    assert await _everything(store) == [event(1), event(2)]
    await store.append([event(3)])  # the store is still usable
    assert await store.read("wf-1") == [event(1), event(2), event(3)]


async def test_open_returns_the_head_after_reopening(backend: Backend) -> None:
    me = await backend.leader_store()
    store = me.store
    await store.append([event(1, "a"), event(2, "b")])
    await store.append([event(3, "a", physical_ms=1_800_000_000_000)])
    await store.close()

    head = await backend.store().open(me.term)

    assert head.last_sequence == 3
    assert head.last_hlc == HlcTimestamp(1_800_000_000_000, 0)


async def test_hlc_ceiling_round_trips_through_open(backend: Backend) -> None:
    me = await backend.leader_store()
    store, head = me.store, me.head
    assert head.hlc_ceiling_ms == 0
    await store.append([event(1)], hlc_ceiling_ms=1_700_000_005_000)
    await store.append([event(2)])  # no ceiling: the stored one stays
    await store.close()

    again = backend.store()
    head = await again.open(me.term)
    assert head.hlc_ceiling_ms == 1_700_000_005_000
    assert head.hlc_floor == HlcTimestamp(1_700_000_005_000, 0)

    await again.append([], hlc_ceiling_ms=1_700_000_009_000)  # a ceiling alone
    await again.close()
    head = await backend.store().open(me.term)
    assert head.hlc_ceiling_ms == 1_700_000_009_000
    assert head.last_sequence == 2


async def test_prune_removes_only_the_named_workflows(backend: Backend) -> None:
    me = await backend.leader_store()
    store = me.store
    await store.append([event(1, "a"), event(2, "b"), event(3, "c"), event(4, "a")])

    assert await store.prune(["a", "c", "never-existed"]) == 3
    assert await store.prune([]) == 0

    assert await store.read("a") == []
    assert await store.read("c") == []
    assert await store.read("b") == [event(2, "b")]
    assert await _everything(store) == [event(2, "b")]


async def test_read_outputs_returns_one_events_outputs_by_sequence(backend: Backend) -> None:
    me = await backend.leader_store()
    store = me.store
    big = '{"blob": "' + "é" * 300_000 + '"}'
    first, second = event(1, "a"), event(2, "b")
    first.outputs_json, second.outputs_json = big, '{"n": 2}'
    await store.append([first, second])

    assert store.read_outputs(1) == big
    assert store.read_outputs(2) == '{"n": 2}'
    assert store.read_outputs(3) is None  # never written
    late = event(3, "a")
    late.outputs_json = '{"late": true}'
    await store.append([late])
    assert store.read_outputs(3) == '{"late": true}'  # sees every commit, also after a read
    await store.prune(["a"])
    assert store.read_outputs(1) is None and store.read_outputs(3) is None  # pruned
    assert store.read_outputs(2) == '{"n": 2}'


async def test_pruning_the_newest_events_never_lowers_the_head(backend: Backend) -> None:
    me = await backend.leader_store()
    store = me.store
    await store.append([event(1, "a"), event(2, "b"), event(3, "b")])
    assert await store.prune(["b"]) == 2
    await store.close()

    head = await backend.store().open(me.term)

    assert head.last_sequence == 3  # sequences are never reused


async def test_a_deposed_leaders_append_is_refused_and_writes_nothing(backend: Backend) -> None:
    old = await backend.leader_store("old")
    old_lead, old_store = old.lead, old.store
    await old_store.append([event(1)])
    await old_lead.resign()
    new_lead = backend.leadership("new")
    new_term = await new_lead.campaign()
    new_store = backend.store()
    await new_store.open(new_term)

    with pytest.raises(DeposedError, match="superseded"):
        await old_store.append([event(2, "zombie")], hlc_ceiling_ms=1_900_000_000_000)

    await new_store.append([event(2)])
    assert await _everything(new_store) == [event(1), event(2)]
    assert await new_store.read("zombie") == []
    await new_store.close()
    head = await backend.store().open(new_term)
    assert head.hlc_ceiling_ms != 1_900_000_000_000


async def test_revocations_are_durable_and_reinstating_removes_them(backend: Backend) -> None:
    me = await backend.leader_store()
    store = me.store
    assert await store.revocations() == {}
    await store.set_revocation("w3", '{"reason": "host compromised"}')
    await store.set_revocation("w4", "{}")
    await store.set_revocation("w3", '{"reason": "again"}')  # the latest record wins
    await store.set_revocation("w4", None)
    await store.set_revocation("never-revoked", None)  # reinstating nothing is fine
    await store.close()

    reopened = backend.store()
    await reopened.open(me.term)
    assert await reopened.revocations() == {"w3": '{"reason": "again"}'}
    await reopened.close()


async def test_a_deposed_leader_cannot_revoke_or_reinstate(backend: Backend) -> None:
    old = await backend.leader_store("old")
    old_lead, old_store = old.lead, old.store
    await old_store.set_revocation("w1", "{}")
    await old_lead.resign()
    new_term = await backend.leadership("new").campaign()
    new_store = backend.store()
    await new_store.open(new_term)

    with pytest.raises(DeposedError, match="superseded"):
        await old_store.set_revocation("w2", "{}")
    with pytest.raises(DeposedError, match="superseded"):
        await old_store.set_revocation("w1", None)

    assert await new_store.revocations() == {"w1": "{}"}
    await new_store.close()
