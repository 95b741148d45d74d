"""Sizes in the pure core: the output cache and store, large outputs read back from the journal,
leases checked against max_lease_bytes at grant time, grant messages bounded, status pages."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from google.rpc import error_details_pb2

from plait.coordinator.core import views
from plait.coordinator.core.events import Instant
from plait.coordinator.core.lease_size import LEASE_TOO_LARGE
from plait.coordinator.core.model import ActionRecord, WorkflowRecord
from plait.coordinator.core.outputs import (
    DEFAULT_CACHE_BYTES,
    INLINE_OUTPUT_BYTES,
    OutputCache,
    OutputStore,
)
from plait.coordinator.core.replay import replay
from plait.coordinator.core.state import CoreConfig, SchedulerState
from plait.errors import UnavailableError
from plait.hlc import ZERO
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb
from tests.unit.core_driver import CONFIG, Driver, grants, snapshot

OK = wpb.ACTION_OUTCOME_SUCCEEDED

# ---- the cache -------------------------------------------------------------------------------


def test_cache_evicts_least_recently_used_first_by_bytes() -> None:
    c = OutputCache(100)
    c.put(1, "a" * 40, 40)
    c.put(2, "b" * 40, 40)
    assert c.get(1) == "a" * 40  # 1 is now the most recently used
    c.put(3, "c" * 40, 40)  # 120 > 100: the oldest (2) goes
    assert c.get(2) is None
    assert c.get(1) == "a" * 40 and c.get(3) == "c" * 40
    assert c.bytes == 80 and len(c) == 2


def test_cache_evicts_as_many_as_it_takes_and_skips_what_cannot_fit() -> None:
    c = OutputCache(100)
    for key in range(10):
        c.put(key, "x" * 10, 10)
    c.put(99, "y" * 95, 95)
    assert c.bytes == 95 and [k for k in range(10) if c.get(k) is not None] == []
    c.put(100, "z" * 101, 101)  # larger than the whole cache: not kept, nothing evicted
    assert c.get(100) is None and c.get(99) == "y" * 95


def test_pending_entries_are_never_evicted_until_durable() -> None:
    c = OutputCache(50)
    c.put(1, "p" * 40, 40, pending=True)
    c.put(2, "q" * 40, 40, pending=True)
    c.put(3, "r" * 40, 40)
    assert c.get(1) and c.get(2) and c.get(3)  # 120 bytes held: pending ones cannot go
    c.durable()  # committed: now ordinary entries, and the bound holds again
    assert c.bytes <= 50 and len(c) == 1


# ---- the store -------------------------------------------------------------------------------


class DictSource:
    """A journal's read_outputs over a dict, counting reads."""

    def __init__(self, outputs: dict[int, str]) -> None:
        self.outputs = outputs
        self.reads: list[int] = []

    def read_outputs(self, sequence: int) -> str | None:
        self.reads.append(sequence)
        return self.outputs.get(sequence)


def record(children: list[ActionRecord] | None = None) -> ActionRecord:
    w = WorkflowRecord("wf", pb.WorkflowSpec(), "", 0, ZERO)
    return ActionRecord(workflow=w, spec=pb.ActionSpec(id="a"), children=children)


def test_small_outputs_stay_inline_and_large_ones_are_read_through_the_cache() -> None:
    big = json.dumps({"blob": "x" * 5000})
    src = DictSource({7: big})
    store = OutputStore(src, cache_bytes=10_000)
    small, large = record(), record()
    store.keep(small, '{"n": 1}', 6)
    store.keep(large, big, 7)

    assert (small.outputs_json, small.outputs_ref, small.outputs_bytes) == ('{"n": 1}', 0, 8)
    assert (large.outputs_json, large.outputs_ref, large.outputs_bytes) == ("", 7, len(big))
    assert store.text(small) == '{"n": 1}' and src.reads == []
    assert store.text(large) == big and src.reads == []  # kept, so answered from the cache
    store.cache = OutputCache(10_000)  # a restarted coordinator's cold cache
    assert store.text(large) == big and src.reads == [7]  # a miss reads the journal
    assert store.text(large) == big and src.reads == [7]  # then the cache answers


def test_live_large_outputs_are_served_from_the_cache_before_they_are_durable() -> None:
    big = "{" + '"k":"' + "é" * 3000 + '"}'
    src = DictSource({})  # the journal does not have them yet
    store = OutputStore(src, cache_bytes=1)  # and the cache could not keep them for long
    a = record()
    store.keep(a, big, 9)
    assert a.outputs_bytes == len(big.encode()) > INLINE_OUTPUT_BYTES
    assert store.text(a) == big and src.reads == []
    store.cache.durable()  # committed: evicted (too large for this cache); the journal has them
    src.outputs[9] = big
    assert store.text(a) == big and src.reads == [9]


def test_outputs_gone_from_the_journal_are_unavailable() -> None:
    store = OutputStore(DictSource({}))
    a = record()
    store.keep(a, "[" + "1," * 2000 + "1]", 3)
    store.cache = OutputCache(DEFAULT_CACHE_BYTES)  # restarted: only the journal has them
    with pytest.raises(UnavailableError, match="sequence 3"):
        store.text(a)


def test_collected_outputs_are_put_together_when_read_and_by_range() -> None:
    kids = [record(), record(), record(), record()]
    texts = {11: json.dumps({"i": "a" * 3000}), 13: json.dumps({"i": "ü" * 2000})}
    store = OutputStore(DictSource(texts))
    store.keep(kids[0], texts[11], 11)
    store.keep(kids[1], '{"i": 2}', 12)
    store.keep(kids[3], texts[13], 13)
    kids[0].state = kids[1].state = kids[3].state = pb.ACTION_STATE_SUCCEEDED
    kids[2].state = pb.ACTION_STATE_FAILED
    parent = record(kids)
    store.keep(parent, "", 20)  # no copy in the event: collected from the children

    whole = '{"items":[' + ",".join([texts[11], '{"i": 2}', "null", texts[13]]) + "]}"
    assert parent.outputs_bytes == len(whole.encode())
    assert store.text(parent) == whole
    data = whole.encode()
    for offset, limit in [(0, 10), (5, 3100), (3000, 50), (3020, 4100), (len(data) - 4, 100)]:
        assert store.read_range(parent, offset, limit) == data[offset : offset + limit]
    src = DictSource(texts)
    store = OutputStore(src)
    store.keep(parent, "", 20)
    tail = len(data) - 10
    assert store.read_range(parent, tail, 10) == data[tail:]  # the end of the last child...
    assert src.reads == [13]  # ...read without reading the first one


# ---- leases, in the core ----------------------------------------------------------------------


def driver(max_lease_bytes: int = CONFIG.max_lease_bytes, cache_bytes: int = 1 << 26) -> Driver:
    """A Driver whose core reads large outputs back from its own journal (its records)."""
    d = Driver(replace(CONFIG, max_lease_bytes=max_lease_bytes))
    d.st = SchedulerState(d.st.config, outputs=OutputStore(JournalOf(d), cache_bytes))
    return d


class JournalOf:
    """read_outputs over the records a Driver has journalled so far."""

    def __init__(self, d: Driver) -> None:
        self.d = d
        self.reads = 0

    def read_outputs(self, sequence: int) -> str | None:
        self.reads += 1
        return next((e.outputs_json for e in self.d.records if e.sequence == sequence), None)


def fan_in(width: int) -> pb.WorkflowSpec:
    s = pb.WorkflowSpec(name="fan-in")
    for i in range(width):
        s.actions.add(id=f"p{i}", handler="h")
    s.actions.add(id="sink", handler="h", needs=[f"p{i}" for i in range(width)])
    return s


def blob(n: int) -> str:
    return json.dumps({"blob": "x" * n})


def run_needs(d: Driver, width: int, sizes: list[int]) -> list[wpb.Lease]:
    """Submits fan_in(width) to a worker with room for all; finishes each p_i with outputs of
    sizes[i] bytes; returns the leases granted after the last one."""
    d.hello("s1", "w1", slots=width + 1)
    leases = {lease.action_id: lease for lease in grants(d.submit(fan_in(width)))}
    more: list[wpb.Lease] = []
    for i in range(width):
        more = grants(d.finish("s1", leases[f"p{i}"], outputs=blob(sizes[i])))
    return more


def test_a_lease_over_max_lease_bytes_fails_its_action_at_grant_time_naming_the_needs() -> None:
    d = driver(cache_bytes=1)  # any text read would have to come from the journal
    sizes = [900_000, 880_000, 910_000, 870_000, 905_000, 890_000]
    sent = run_needs(d, 6, sizes)

    assert sent == []  # nothing went to the worker
    sink = d.st.workflows["wf-1"].actions["sink"]
    assert d.state("sink") == "ACTION_STATE_FAILED"
    assert (sink.attempt, sink.token, sink.lease_losses, sink.failures) == (0, 0, 0, 0)
    limit = CONFIG.max_lease_bytes
    assert f"the limit max_lease_bytes is {limit}" in sink.reason
    listed = sink.reason.split("largest first: ")[1].split(";")[0]
    named = [part.split()[0] for part in listed.split(", ")]
    assert named == ["p2", "p4", "p0", "p5", "p1", "p3"]  # every need, largest first
    assert f"p2 {len(blob(910_000))} bytes" in sink.reason
    assert sink.error is not None and sink.error.code == 8  # RESOURCE_EXHAUSTED
    info = error_details_pb2.ErrorInfo()
    assert sink.error.details[0].Unpack(info) and info.reason == LEASE_TOO_LARGE
    assert int(info.metadata["lease_bytes"]) > limit
    assert d.st.workflows["wf-1"].state == pb.WORKFLOW_STATE_FAILED
    # No large need was read to find that out: sizes are known without their text.
    assert d.st.outputs.source.reads == 0  # type: ignore[union-attr]


def test_the_failure_replays_identically() -> None:
    d = driver()
    run_needs(d, 6, [900_000] * 6)
    fresh = SchedulerState(d.st.config, outputs=OutputStore(JournalOf(d)))
    replay(fresh, d.records, Instant(d.mono, d.wall))

    assert snapshot(fresh) == snapshot(d.st)
    a, b = (s.workflows["wf-1"].actions["sink"] for s in (d.st, fresh))
    assert (a.reason, a.error, a.lease_losses, a.failures) == (
        b.reason,
        b.error,
        b.lease_losses,
        b.failures,
    )
    assert [x.outputs_bytes for x in fresh.workflows["wf-1"].actions.values()] == [
        x.outputs_bytes for x in d.st.workflows["wf-1"].actions.values()
    ]


def test_a_lease_under_the_limit_carries_large_needs_read_back_from_the_journal() -> None:
    d = driver(cache_bytes=1)  # nothing large stays cached once it is durable
    sizes = [300_000, 200_000, 10]
    (sink,) = run_needs(d, 3, sizes)
    d.advance(0.1)  # another batch: the outputs are durable now, and evicted

    wf = d.st.workflows["wf-1"]
    assert [wf.actions[f"p{i}"].outputs_json for i in range(2)] == ["", ""]  # not in memory
    assert wf.actions["p2"].outputs_json == blob(10)  # small: kept inline
    needs = json.loads(sink.inputs_json)["needs"]
    assert [len(needs[f"p{i}"]["outputs"]["blob"]) for i in range(3)] == sizes
    # And read back once more for a second attempt, from the journal.
    source = d.st.outputs.source
    assert isinstance(source, JournalOf)
    before = source.reads
    d.close("s1")
    d.advance(CONFIG.lease_ttl.total_seconds() + 1)  # the lease expires: sink is ready again
    (again,) = grants(d.hello("s2", "w2", slots=1))
    assert again.inputs_json == sink.inputs_json and source.reads == before + 2


def test_memory_for_large_outputs_is_the_cache_whatever_their_number() -> None:
    d = driver(cache_bytes=1_000_000)
    d.hello("s1", "w1", slots=50)
    for lease in grants(d.submit(fan_in(49))):
        d.finish("s1", lease, outputs=blob(100_000))
    d.advance(0.1)

    actions = [a for a in d.st.workflows["wf-1"].actions.values() if a.spec.id != "sink"]
    assert len(actions) == 49 and all(a.outputs_bytes == len(blob(100_000)) for a in actions)
    assert sum(len(a.outputs_json) for a in actions) == 0  # none of 4.9 MB on the records
    assert d.st.outputs.cache.bytes <= 1_000_000  # what stays is bounded by the cache


def test_one_grant_message_never_passes_the_lease_budget() -> None:
    d = driver(max_lease_bytes=700_000)
    d.hello("s1", "w1", slots=8)
    s = pb.WorkflowSpec(name="wide")
    s.actions.add(id="src", handler="h")
    for i in range(6):
        s.actions.add(id=f"use{i}", handler="h", needs=["src"])
    (src,) = grants(d.submit(s))
    out = d.finish("s1", src, outputs=blob(300_000))

    msgs = [m.lease_grant for m in out.sends["s1"] if m.HasField("lease_grant")]
    assert sum(len(g.leases) for g in msgs) == 6
    assert [len(g.leases) for g in msgs] == [2, 2, 2]  # leases of ~300 KB: a third would pass
    assert all(g.ByteSize() <= 700_000 for g in msgs)
    seqs = [g.sequence for g in msgs]
    assert seqs == list(range(seqs[0], seqs[0] + 3))  # consecutive grant sequences
    # The session's lease records carry the sequence of the message each one went in.
    leases = d.st.workers["w1"].leases
    assert sorted(lease.grant_seq for lease in leases.values()) == sorted(seqs * 2)


def test_small_leases_still_share_one_grant_message() -> None:
    d = driver()
    d.hello("s1", "w1", slots=50)
    out = d.submit(fan_in(40))
    assert len([m for m in out.sends["s1"] if m.HasField("lease_grant")]) == 1


def test_a_large_map_collects_its_childrens_outputs_without_copying_them() -> None:
    d = driver(cache_bytes=1)
    s = pb.WorkflowSpec(name="map")
    s.actions.add(id="list", handler="h")
    m = s.actions.add(id="resize", handler="h", needs=["list"])
    m.map.over = "list.items"
    d.hello("s1", "w1", slots=8)
    (lst,) = grants(d.submit(s))
    children = grants(d.finish("s1", lst, outputs='{"items": [1, 2, 3]}'))
    for i, c in enumerate(sorted(children, key=lambda c: c.action_id)):
        d.finish("s1", c, outputs=blob(400_000 + i))
    d.advance(0.1)

    resize = d.st.workflows["wf-1"].actions["resize"]
    assert d.state("resize") == "ACTION_STATE_SUCCEEDED"
    finished = [e for e in d.records if e.action_id == "resize" and e.type == 5]
    assert finished[-1].outputs_json == ""  # 1.2 MB: not copied into the journal again
    text = d.st.outputs.text(resize)
    assert [len(x["blob"]) for x in json.loads(text)["items"]] == [400_000, 400_001, 400_002]
    assert resize.outputs_bytes == len(text)
    fresh = SchedulerState(d.st.config, outputs=OutputStore(JournalOf(d)))
    replay(fresh, d.records, Instant(d.mono, d.wall))
    assert fresh.outputs.text(fresh.workflows["wf-1"].actions["resize"]) == text


# ---- status pages -----------------------------------------------------------------------------


def finished_workflow(sizes: list[int]) -> Driver:
    d = driver()
    d.hello("s1", "w1", slots=len(sizes))
    s = pb.WorkflowSpec(name="outs")
    for i in range(len(sizes)):
        s.actions.add(id=f"a{i}", handler="h")
    for lease in grants(d.submit(s)):
        d.finish("s1", lease, outputs=blob(sizes[int(lease.action_id[1:])]))
    return d


def all_pages(d: Driver, budget: int, page_size: int = 0) -> list[pb.WorkflowStatus]:
    wf = d.st.workflows["wf-1"]
    pages, start = [], 0
    while start < len(wf.actions):
        page, start = views.workflow_page(d.st, wf, start, page_size, budget)
        assert page.ByteSize() <= budget
        pages.append(page)
    return pages


def test_status_pages_fit_the_budget_and_keep_every_output_that_can_fit_whole() -> None:
    d = finished_workflow([900_000] * 6 + [10])
    pages = all_pages(d, 4 * 1024 * 1024 - 64 * 1024)

    assert len(pages) == 2
    actions = [a for p in pages for a in p.actions]
    assert [a.action_id for a in actions] == [f"a{i}" for i in range(7)]
    assert all(not a.outputs_truncated for a in actions)
    assert [len(json.loads(a.outputs_json)["blob"]) for a in actions] == [900_000] * 6 + [10]
    assert all(p.action_counts["ACTION_STATE_SUCCEEDED"] == 7 for p in pages)


def test_outputs_that_fit_no_page_are_marked_truncated_with_their_size() -> None:
    d = finished_workflow([50, 200_000, 50])
    pages = all_pages(d, 100_000)

    actions = [a for p in pages for a in p.actions]
    big = actions[1]
    assert big.outputs_truncated and big.outputs_json == ""
    assert big.outputs_bytes == len(blob(200_000))
    assert [a.outputs_json for a in (actions[0], actions[2])] == [blob(50)] * 2
    assert not actions[0].outputs_truncated


def test_page_size_caps_the_actions_per_page() -> None:
    d = finished_workflow([5] * 7)
    pages = all_pages(d, 1 << 20, page_size=3)
    assert [len(p.actions) for p in pages] == [3, 3, 1]


def test_core_config_default_is_the_message_limit_less_headroom() -> None:
    assert CoreConfig().max_lease_bytes == 4 * 1024 * 1024 - 256 * 1024
