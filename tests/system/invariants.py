"""Safety invariants of RELIABILITY.md, checked on a workflow's public history.

Each check takes the history (``HistoryEvent`` list from WatchWorkflow) and, where it needs the
DAG, the submitted spec; it raises ``AssertionError`` naming the invariant and the events
involved. ``check_history`` runs all of them.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

from plait.v1 import workflow_pb2 as wf

Hlc = tuple[int, int]

TERMINAL_ACTION = frozenset(
    {
        wf.ACTION_STATE_SUCCEEDED,
        wf.ACTION_STATE_FAILED,
        wf.ACTION_STATE_CANCELLED,
        wf.ACTION_STATE_SKIPPED,
        wf.ACTION_STATE_TIMED_OUT,
    }
)
# Events after which an action holds no live lease.
LEASE_CLOSERS = frozenset(
    {
        wf.EVENT_TYPE_ACTION_FINISHED,
        wf.EVENT_TYPE_LEASE_LOST,
        wf.EVENT_TYPE_ACTION_RETRY_SCHEDULED,
        wf.EVENT_TYPE_ACTION_CANCELLED,
    }
)


def hlc(event: wf.HistoryEvent) -> Hlc:
    """The coordinator's HLC of an event, as an ordered tuple."""
    return (event.hlc.physical_ms, event.hlc.logical)


def show(event: wf.HistoryEvent) -> str:
    """One line per event for assertion messages."""
    return (
        f"#{event.sequence} {hlc(event)} {wf.EventType.Name(event.type)} {event.action_id}"
        f" state={wf.ActionState.Name(event.action_state)} token={event.fencing_token}"
        f" worker={event.worker_id}"
    )


def of_type(
    events: Iterable[wf.HistoryEvent], event_type: int, action_id: str | None = None
) -> list[wf.HistoryEvent]:
    """Events of one type, optionally for one action."""
    return [
        e
        for e in events
        if e.type == event_type and (action_id is None or e.action_id == action_id)
    ]


def by_action(events: Iterable[wf.HistoryEvent]) -> dict[str, list[wf.HistoryEvent]]:
    out: dict[str, list[wf.HistoryEvent]] = defaultdict(list)
    for e in events:
        if e.action_id:
            out[e.action_id].append(e)
    return out


def check_journal_order(events: Sequence[wf.HistoryEvent]) -> None:
    """I8: sequences and coordinator HLCs strictly increase, so journal order = HLC order."""
    assert events, "empty history"
    for prev, cur in itertools.pairwise(events):
        assert cur.sequence > prev.sequence, f"I8 sequence: {show(prev)} then {show(cur)}"
        assert hlc(cur) > hlc(prev), f"I8 HLC not increasing: {show(prev)} then {show(cur)}"
        assert cur.hlc.physical_ms > 0, f"I8 unset HLC: {show(cur)}"


def check_one_finish(events: Sequence[wf.HistoryEvent], action_ids: Iterable[str]) -> None:
    """I1: exactly one ACTION_FINISHED per action, carrying a terminal state."""
    for action_id in action_ids:
        finished = of_type(events, wf.EVENT_TYPE_ACTION_FINISHED, action_id)
        assert len(finished) == 1, f"I1 {action_id}: {len(finished)} finishes: " + "; ".join(
            map(show, finished)
        )
        assert finished[0].action_state in TERMINAL_ACTION, f"I1 not terminal: {show(finished[0])}"


def check_one_terminal(events: Sequence[wf.HistoryEvent], action_ids: Iterable[str]) -> None:
    """I1 (general form): exactly one event moves each action into a terminal state, whether
    it finished, was cancelled or was skipped."""
    for action_id in action_ids:
        terminal = [
            e
            for e in events
            if e.action_id == action_id
            and e.action_state in TERMINAL_ACTION
            and e.type != wf.EVENT_TYPE_STALE_RESULT_REFUSED
        ]
        assert len(terminal) == 1, f"I1 {action_id}: {len(terminal)} terminal events: " + (
            "; ".join(map(show, terminal))
        )


def check_fencing(events: Sequence[wf.HistoryEvent], unleased: Iterable[str] = ()) -> None:
    """I2: tokens grow with every lease, and a committed result carries the highest granted.

    ``unleased``: actions that run as their children and are never leased themselves (map
    actions); they must hold no lease and commit with token 0.
    """
    unleased = set(unleased)
    for action_id, evs in by_action(events).items():
        leased = of_type(evs, wf.EVENT_TYPE_ACTION_LEASED)
        tokens = [e.fencing_token for e in leased]
        if action_id in unleased:
            assert not leased, f"I2 map action {action_id} was leased: " + "; ".join(
                map(show, leased)
            )
            for fin in of_type(evs, wf.EVENT_TYPE_ACTION_FINISHED):
                assert fin.fencing_token == 0, f"I2 map action committed a token: {show(fin)}"
            continue
        assert all(t > 0 for t in tokens), f"I2 {action_id}: zero token in {tokens}"
        assert tokens == sorted(set(tokens)), f"I2 {action_id}: tokens not growing: {tokens}"
        for fin in of_type(evs, wf.EVENT_TYPE_ACTION_FINISHED):
            if fin.action_state == wf.ACTION_STATE_SUCCEEDED or fin.worker_id:
                assert tokens, f"I2 {action_id}: committed without a lease: {show(fin)}"
                assert fin.fencing_token == max(tokens), (
                    f"I2 {action_id}: committed token {fin.fencing_token}, highest {max(tokens)}"
                )


def check_single_lease(events: Sequence[wf.HistoryEvent]) -> None:
    """I5: at most one live lease per action (no hedging in these tests)."""
    for action_id, evs in by_action(events).items():
        live: wf.HistoryEvent | None = None
        for e in evs:
            if e.type == wf.EVENT_TYPE_ACTION_LEASED:
                assert live is None, f"I5 {action_id}: {show(e)} while {show(live)} is live"
                live = e
            elif e.type in LEASE_CLOSERS:
                live = None


def check_nothing_after_terminal(events: Sequence[wf.HistoryEvent]) -> None:
    """I6: once an action is terminal it is never ready, leased or started again."""
    revive = {wf.EVENT_TYPE_ACTION_READY, wf.EVENT_TYPE_ACTION_LEASED, wf.EVENT_TYPE_ACTION_STARTED}
    for action_id, evs in by_action(events).items():
        done = False
        for e in evs:
            if done:
                assert e.type not in revive, f"I6 {action_id}: {show(e)} after terminal"
            if e.action_state in TERMINAL_ACTION and e.type != wf.EVENT_TYPE_STALE_RESULT_REFUSED:
                done = True


def required_needs(action: wf.ActionSpec) -> int:
    """How many of an action's needs must have succeeded before it may be leased."""
    join, n = action.join, len(action.needs)
    if join.kind == wf.JOIN_KIND_ANY:
        return min(1, n)
    if join.kind == wf.JOIN_KIND_AT_LEAST:
        if join.at_least_count:
            return min(int(join.at_least_count), n)
        return min(n, math.ceil(join.at_least_fraction * n - 1e-9))
    return n


def check_edges(events: Sequence[wf.HistoryEvent], spec: wf.WorkflowSpec) -> None:
    """I4/I8: for every edge A -> B, A finished before any lease of B, which came before B
    finished — in HLC and in journal order alike. For an ``any`` or ``at_least`` join, B may
    be leased once enough needs succeeded: those must have (in both orders), and every need
    that finished before the lease must be ordered before it."""
    finished = {e.action_id: e for e in of_type(events, wf.EVENT_TYPE_ACTION_FINISHED)}
    leases = by_action(of_type(events, wf.EVENT_TYPE_ACTION_LEASED))
    for action in spec.actions:
        b_fin = finished.get(action.id)
        required = required_needs(action)
        for b_lease in leases.get(action.id, []):
            met = [
                need
                for need in action.needs
                if need in finished
                and finished[need].action_state == wf.ACTION_STATE_SUCCEEDED
                and finished[need].sequence < b_lease.sequence
            ]
            assert len(met) >= required, (
                f"I4 {action.id} leased when {len(met)} of its needs had succeeded"
                f" ({sorted(met)}), its join needs {required}: {show(b_lease)}"
            )
        for need in action.needs:
            a_fin = finished.get(need)
            for b_lease in leases.get(action.id, []):
                if required < len(action.needs) and (
                    a_fin is None or a_fin.sequence > b_lease.sequence
                ):
                    continue  # a partial join did not wait for this need
                assert a_fin is not None, f"I4 {need} -> {action.id}: leased before {need} finished"
                assert hlc(a_fin) < hlc(b_lease), (
                    f"I4 HLC {need} -> {action.id}: {show(a_fin)} !< {show(b_lease)}"
                )
                assert a_fin.sequence < b_lease.sequence, (
                    f"I4 journal {need} -> {action.id}: {show(a_fin)} !< {show(b_lease)}"
                )
                if b_fin is not None:
                    assert hlc(b_lease) < hlc(b_fin), f"I8 {show(b_lease)} !< {show(b_fin)}"
                    assert b_lease.sequence < b_fin.sequence, f"I8 {show(b_lease)} !< {show(b_fin)}"


def mapped_children(event: wf.HistoryEvent) -> list[str]:
    """The ids of the children an ACTION_MAPPED event created, in list order: ``spec.actions``
    when the event carries them, else one ``<id>.<index>`` per item of ``outputs_json`` (the
    list the map read, which is what the coordinator journals)."""
    if event.spec.actions:
        return [a.id for a in event.spec.actions]
    items = json.loads(event.outputs_json or "[]")
    assert isinstance(items, list), f"ACTION_MAPPED without a list: {show(event)}"
    return [f"{event.action_id}.{i}" for i in range(len(items))]


def map_actions(spec: wf.WorkflowSpec) -> set[str]:
    """The ids of the spec's map actions."""
    return {a.id for a in spec.actions if a.HasField("map")}


def expand_maps(events: Sequence[wf.HistoryEvent], spec: wf.WorkflowSpec) -> wf.WorkflowSpec:
    """``spec`` plus every child its map actions created in ``events``: a copy of the map
    action named ``<id>.<index>``, without map and join, needing the need its list came from
    (which succeeded before any child existed)."""
    out = wf.WorkflowSpec()
    out.CopyFrom(spec)
    by_id = {a.id: a for a in spec.actions}
    for e in of_type(events, wf.EVENT_TYPE_ACTION_MAPPED):
        parent = by_id.get(e.action_id)
        assert parent is not None, f"ACTION_MAPPED of an action not in the spec: {show(e)}"
        assert parent.HasField("map"), f"ACTION_MAPPED of an action without map: {show(e)}"
        source = parent.map.over.partition(".")[0]
        for child_id in mapped_children(e):
            child = out.actions.add()
            child.CopyFrom(parent)
            child.id = child_id
            child.ClearField("map")
            child.ClearField("join")
            # The one need certain to have succeeded before the map was read: its list.
            del child.needs[:]
            child.needs.append(source)
    return out


def check_map_children(events: Sequence[wf.HistoryEvent], spec: wf.WorkflowSpec) -> None:
    """A map action is mapped at most once, after its needs finished and before any event of a
    child; children are exactly ``<id>.0`` ... ``<id>.<n-1>``; a map action that succeeded did
    so after every child ended, with one entry per child in its outputs' ``items``."""
    maps = map_actions(spec)
    finished = {e.action_id: e for e in of_type(events, wf.EVENT_TYPE_ACTION_FINISHED)}
    mapped = by_action(of_type(events, wf.EVENT_TYPE_ACTION_MAPPED))
    per_action = by_action(events)
    for action_id in maps:
        got = mapped.get(action_id, [])
        assert len(got) <= 1, f"{action_id} mapped {len(got)} times: " + "; ".join(map(show, got))
        if not got:
            continue
        event = got[0]
        children = mapped_children(event)
        assert children == [f"{action_id}.{i}" for i in range(len(children))], children
        action = next(a for a in spec.actions if a.id == action_id)
        for need in action.needs:
            assert need in finished and finished[need].sequence < event.sequence, (
                f"{action_id} mapped before its need {need} finished: {show(event)}"
            )
        for child in children:
            early = [e for e in per_action.get(child, []) if e.sequence < event.sequence]
            assert not early, f"{child} before its map: " + "; ".join(map(show, early))
        done = finished.get(action_id)
        if done is not None and done.action_state == wf.ACTION_STATE_SUCCEEDED:
            for child in children:
                ends = [
                    e
                    for e in per_action.get(child, [])
                    if e.action_state in TERMINAL_ACTION
                    and e.type != wf.EVENT_TYPE_STALE_RESULT_REFUSED
                ]
                assert ends and ends[0].sequence < done.sequence, (
                    f"{action_id} succeeded before its child {child} ended: {show(done)}"
                )
            items = json.loads(done.outputs_json)["items"]
            assert len(items) == len(children), f"{action_id}: {len(items)} items, {children}"
        # Nothing of a map child may be leased after its map action ended.
        if done is not None:
            for child in children:
                late = [
                    e
                    for e in per_action.get(child, [])
                    if e.type == wf.EVENT_TYPE_ACTION_LEASED and e.sequence > done.sequence
                ]
                assert not late, f"{child} leased after {action_id} ended: {show(late[0])}"


def check_workflow_finished_once(events: Sequence[wf.HistoryEvent]) -> None:
    """The workflow finishes at most once, and nothing is leased after it finished."""
    done = of_type(events, wf.EVENT_TYPE_WORKFLOW_FINISHED)
    assert len(done) <= 1, "workflow finished twice: " + "; ".join(map(show, done))
    if done:
        later = [
            e
            for e in events
            if e.sequence > done[0].sequence
            and e.type in (wf.EVENT_TYPE_ACTION_LEASED, wf.EVENT_TYPE_ACTION_FINISHED)
        ]
        assert not later, "after the workflow finished: " + "; ".join(map(show, later))


def check_history(
    events: Sequence[wf.HistoryEvent],
    spec: wf.WorkflowSpec,
    *,
    all_finished: bool = True,
) -> None:
    """Every safety invariant that applies to one workflow's history.

    ``all_finished``: every action must have exactly one ACTION_FINISHED (a workflow that ran
    to success); otherwise each action must have exactly one terminal event of any kind.
    Map children (ACTION_MAPPED) are checked like the actions of the spec.
    """
    check_map_children(events, spec)
    spec = expand_maps(events, spec)
    ids = [a.id for a in spec.actions]
    check_journal_order(events)
    if all_finished:
        check_one_finish(events, ids)
    else:
        check_one_terminal(events, ids)
    check_fencing(events, map_actions(spec))
    check_single_lease(events)
    check_nothing_after_terminal(events)
    check_edges(events, spec)
    check_workflow_finished_once(events)
