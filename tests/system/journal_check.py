"""Safety invariants of RELIABILITY.md, checked on the journal itself (not through gRPC).

The system tests' :mod:`tests.system.invariants` checks one workflow's history as WatchWorkflow
serves it. This module reads the coordinator's storage directly — the SQLite file, or the
PostgreSQL tables of an HA group — so it also sees what no API shows: the order of events
*across* workflows, coordinator restarts and failovers, rows left by a deposed leader, and the
file's physical integrity after a SIGKILL mid-commit.

Both backends keep one row per event: ``sequence``, ``workflow_id``, ``hlc_physical``,
``hlc_logical``, ``type`` and ``payload`` (a serialized ``plait.v1.HistoryEvent``); SQLite in
``events``, PostgreSQL in ``plait_events`` (plus, optionally, the ``term`` that wrote the row).

:func:`check_journal` raises ``AssertionError`` naming the invariant and the events involved,
and returns a :class:`JournalSummary` the tests assert further on.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from plait.coordinator.core.transitions import TRANSITIONS
from plait.v1 import workflow_pb2 as wf
from tests.system import invariants
from tests.system.invariants import show

# Journal event -> the action state it must leave the action in (None: any terminal state).
EXPECTED_STATE: dict[int, frozenset[int] | None] = {
    wf.EVENT_TYPE_ACTION_READY: frozenset({wf.ACTION_STATE_READY}),
    wf.EVENT_TYPE_ACTION_LEASED: frozenset({wf.ACTION_STATE_LEASED}),
    wf.EVENT_TYPE_ACTION_STARTED: frozenset({wf.ACTION_STATE_RUNNING}),
    wf.EVENT_TYPE_ACTION_FINISHED: invariants.TERMINAL_ACTION,
    wf.EVENT_TYPE_ACTION_RETRY_SCHEDULED: frozenset({wf.ACTION_STATE_READY}),
    # A loss past the lease-loss budget is journalled as ACTION_FINISHED FAILED, not as this.
    wf.EVENT_TYPE_LEASE_LOST: frozenset({wf.ACTION_STATE_READY}),
    wf.EVENT_TYPE_ACTION_CANCELLED: frozenset({wf.ACTION_STATE_CANCELLED}),
    wf.EVENT_TYPE_ACTION_SKIPPED: frozenset({wf.ACTION_STATE_SKIPPED}),
    # A map action runs as its children once its list is read.
    wf.EVENT_TYPE_ACTION_MAPPED: frozenset({wf.ACTION_STATE_RUNNING}),
}
# I1: the events that end an action (exactly one of them per action).
TERMINAL_EVENTS = frozenset(
    {wf.EVENT_TYPE_ACTION_FINISHED, wf.EVENT_TYPE_ACTION_CANCELLED, wf.EVENT_TYPE_ACTION_SKIPPED}
)


@dataclass
class Row:
    """One journal row: the columns the store indexes, and the event they must agree with."""

    sequence: int
    workflow_id: str
    hlc: invariants.Hlc
    type: int
    event: wf.HistoryEvent
    term: int | None = None


@dataclass
class JournalSummary:
    """What a checked journal holds, for tests to assert on and print."""

    events: int = 0
    workflows: int = 0
    actions: int = 0
    finished_workflows: int = 0
    by_type: Counter[str] = field(default_factory=Counter)
    # (workflow_id, action_id) -> the committed (ACTION_FINISHED) event.
    committed: dict[tuple[str, str], wf.HistoryEvent] = field(default_factory=dict)
    # (workflow_id, action_id) -> every ACTION_LEASED event, in journal order.
    leases: dict[tuple[str, str], list[wf.HistoryEvent]] = field(default_factory=dict)
    # (workflow_id, action_id) -> every event of the action, in journal order.
    history: dict[tuple[str, str], list[wf.HistoryEvent]] = field(default_factory=dict)
    terms: list[int] = field(default_factory=list)

    def of_type(self, event_type: int) -> int:
        return self.by_type[wf.EventType.Name(event_type)]  # type: ignore[arg-type]


# ----- reading ----------------------------------------------------------------------------------


def _rows(raw: Iterable[Sequence[object]], has_term: bool) -> list[Row]:
    rows = []
    for r in raw:
        payload = r[5]
        event = wf.HistoryEvent.FromString(bytes(payload))  # type: ignore[arg-type]
        rows.append(
            Row(
                sequence=int(r[0]),  # type: ignore[call-overload]
                workflow_id=str(r[1]),
                hlc=(int(r[2]), int(r[3])),  # type: ignore[call-overload]
                type=int(r[4]),  # type: ignore[call-overload]
                event=event,
                term=int(r[6]) if has_term and r[6] is not None else None,  # type: ignore[call-overload]
            )
        )
    return rows


def read_sqlite(path: str | Path) -> list[Row]:
    """Every row of a SQLite journal, in sequence order (read-only; the file may be live)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        columns = {r[1] for r in conn.execute("PRAGMA table_info(events)")}
        term = ", term" if "term" in columns else ""
        raw = conn.execute(
            "SELECT sequence, workflow_id, hlc_physical, hlc_logical, type, payload"
            f"{term} FROM events ORDER BY sequence"
        ).fetchall()
    finally:
        conn.close()
    return _rows(raw, bool(term))


def sqlite_integrity(path: str | Path) -> str:
    """``PRAGMA integrity_check`` of the file ("ok" when intact). Opening it read-write lets
    SQLite recover a WAL left by a crashed writer, as the next coordinator would."""
    conn = sqlite3.connect(str(path), timeout=10)
    try:
        result = conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()
    return "\n".join(str(r[0]) for r in result)


def read_postgres(dsn: str, table: str = "plait_events") -> list[Row]:
    """Every row of a PostgreSQL journal, in sequence order."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        columns = {
            r[0]
            for r in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = %s",
                (table,),
            )
        }
        term = ", term" if "term" in columns else ""
        raw = conn.execute(
            "SELECT sequence, workflow_id, hlc_physical, hlc_logical, type, payload"
            f"{term} FROM {table} ORDER BY sequence"
        ).fetchall()
    return _rows(raw, bool(term))


# ----- checks -----------------------------------------------------------------------------------


def check_rows(rows: Sequence[Row]) -> None:
    """The indexed columns agree with the payload; the term (when stored) never goes down."""
    for r in rows:
        e = r.event
        assert (r.sequence, r.workflow_id, r.hlc, r.type) == (
            e.sequence,
            e.workflow_id,
            invariants.hlc(e),
            e.type,
        ), f"row columns {(r.sequence, r.workflow_id, r.hlc, r.type)} disagree with {show(e)}"
    terms = [r for r in rows if r.term is not None]
    for prev, cur in itertools.pairwise(terms):
        assert cur.term >= prev.term, (  # type: ignore[operator]
            f"deposed leader's write: term {cur.term} at {show(cur.event)} after term"
            f" {prev.term} at {show(prev.event)}"
        )


def check_transitions(events: Sequence[wf.HistoryEvent], spec: wf.WorkflowSpec) -> None:
    """I6: each action's journalled states follow TRANSITIONS, and each event type leaves the
    state it means (an action without needs is READY from WORKFLOW_SUBMITTED on; a map child
    is READY from its map action's ACTION_MAPPED on)."""
    state = {
        a.id: wf.ACTION_STATE_READY if not a.needs else wf.ACTION_STATE_PENDING
        for a in spec.actions
    }
    for e in events:
        if not e.action_id:
            continue
        if e.type == wf.EVENT_TYPE_ACTION_MAPPED:
            for child in invariants.mapped_children(e):
                assert child not in state, f"I6 {show(e)} creates {child}, which exists"
                state[child] = wf.ACTION_STATE_READY
        assert e.action_id in state, f"I6 event for an action not in the spec: {show(e)}"
        old, new = state[e.action_id], int(e.action_state)
        if e.type == wf.EVENT_TYPE_STALE_RESULT_REFUSED:
            assert new == old, f"I6 a refused result changed the state {old} -> {show(e)}"
            continue
        expected = EXPECTED_STATE.get(e.type)
        assert expected is None or new in expected, f"I6 {show(e)}: wrong state for its type"
        assert (old, new) in TRANSITIONS, (
            f"I6 illegal transition {wf.ActionState.Name(old)} -> {show(e)}"  # type: ignore[arg-type]
        )
        state[e.action_id] = new


# Lease losses not charged to the lease-loss budget (coordinator/core/sessions.UNCHARGED).
UNCHARGED_LOSSES = frozenset(
    {
        wf.EVENT_REASON_UNDELIVERED,
        wf.EVENT_REASON_WORKER_REVOKED,
        wf.EVENT_REASON_HEDGE_ENDED,
        wf.EVENT_REASON_RECLAIMED,
    }
)


# ... and those not charged when the lease's start was never reported (sessions.NEVER_RAN).
NEVER_RAN = frozenset({wf.EVENT_REASON_LEASE_EXPIRED, wf.EVENT_REASON_SELF_FENCED})


def check_attempts(
    events: Sequence[wf.HistoryEvent], spec: wf.WorkflowSpec, lease_loss_budget: int
) -> None:
    """I7: attempts <= 1 + lease-loss budget + retry budget + the losses charged to neither
    (never delivered, handed back unstarted, revoked, a hedge ending), and attempt numbers
    count leases."""
    leases = invariants.by_action(invariants.of_type(events, wf.EVENT_TYPE_ACTION_LEASED))
    started = {e.lease_id for e in invariants.of_type(events, wf.EVENT_TYPE_ACTION_STARTED)}
    free = invariants.by_action(
        e
        for e in invariants.of_type(events, wf.EVENT_TYPE_LEASE_LOST)
        if e.reason in UNCHARGED_LOSSES or (e.reason in NEVER_RAN and e.lease_id not in started)
    )
    for action in spec.actions:
        retry = action.retry if action.retry.max_attempts else spec.defaults.retry
        limit = max(1, retry.max_attempts) + lease_loss_budget + len(free.get(action.id, []))
        got = leases.get(action.id, [])
        assert len(got) <= limit, f"I7 {action.id}: {len(got)} attempts > {limit}: " + "; ".join(
            map(show, got)
        )
        attempts = [e.attempt for e in got]
        assert attempts == list(range(1, len(got) + 1)), f"I7 {action.id}: attempts {attempts}"


def check_one_terminal_event(
    events: Sequence[wf.HistoryEvent], spec: wf.WorkflowSpec, *, finished: bool
) -> None:
    """I1: exactly one FINISHED/CANCELLED/SKIPPED per action (at most one while running)."""
    ended = invariants.by_action(e for e in events if e.type in TERMINAL_EVENTS)
    for action in spec.actions:
        got = ended.get(action.id, [])
        ok = len(got) == 1 if finished else len(got) <= 1
        assert ok, f"I1 {action.id}: {len(got)} terminal events: " + "; ".join(map(show, got))


def check_journal(
    rows: Sequence[Row],
    *,
    lease_loss_budget: int = 3,
    require_finished: bool = True,
) -> JournalSummary:
    """Every invariant over a whole journal; returns what it holds.

    ``require_finished``: I10, every workflow has WORKFLOW_FINISHED (after faults healed).
    Workflows whose WORKFLOW_SUBMITTED was pruned (retention) are skipped, not failed.
    """
    check_rows(rows)
    events = [r.event for r in rows]
    summary = JournalSummary(events=len(events), terms=sorted({r.term for r in rows if r.term}))
    if not events:
        return summary
    # I8 across the whole journal: restarts and failovers included.
    invariants.check_journal_order(events)
    summary.by_type.update(wf.EventType.Name(e.type) for e in events)  # type: ignore[arg-type]
    per_workflow: dict[str, list[wf.HistoryEvent]] = defaultdict(list)
    for e in events:
        per_workflow[e.workflow_id].append(e)
    for workflow_id, evs in per_workflow.items():
        submitted = invariants.of_type(evs, wf.EVENT_TYPE_WORKFLOW_SUBMITTED)
        if not submitted:
            continue
        assert len(submitted) == 1, f"{workflow_id} submitted {len(submitted)} times"
        assert evs[0] is submitted[0], f"{workflow_id}: {show(evs[0])} before its submission"
        # Map children count as actions from their ACTION_MAPPED on.
        invariants.check_map_children(evs, submitted[0].spec)
        spec = invariants.expand_maps(evs, submitted[0].spec)
        summary.workflows += 1
        summary.actions += len(spec.actions)
        done = invariants.of_type(evs, wf.EVENT_TYPE_WORKFLOW_FINISHED)
        summary.finished_workflows += bool(done)
        if require_finished:
            assert done, f"I10 {workflow_id} ({spec.name}) never finished; last: {show(evs[-1])}"
        check_one_terminal_event(evs, spec, finished=bool(done))
        invariants.check_fencing(evs, invariants.map_actions(spec))  # I2
        invariants.check_single_lease(evs)  # I5
        invariants.check_nothing_after_terminal(evs)
        invariants.check_edges(evs, spec)  # I4
        invariants.check_workflow_finished_once(evs)
        check_transitions(evs, submitted[0].spec)  # I6
        check_attempts(evs, spec, lease_loss_budget)  # I7
        for e in evs:
            key = (workflow_id, e.action_id)
            if e.action_id:
                summary.history.setdefault(key, []).append(e)
            if e.type == wf.EVENT_TYPE_ACTION_FINISHED:
                summary.committed[key] = e
            elif e.type == wf.EVENT_TYPE_ACTION_LEASED:
                summary.leases.setdefault(key, []).append(e)
    return summary


def check_sqlite_journal(path: str | Path, **kwargs: bool | int) -> JournalSummary:
    """Integrity of the file, then :func:`check_journal` on its rows."""
    integrity = sqlite_integrity(path)
    assert integrity == "ok", f"PRAGMA integrity_check of {path}: {integrity}"
    return check_journal(read_sqlite(path), **kwargs)  # type: ignore[arg-type]


def check_completed_attempts_committed(
    summary: JournalSummary, completed: Iterable[tuple[str, str, int]]
) -> None:
    """I3 as seen from outside: every attempt that ran to completion on a worker that stayed
    up — (workflow_id, action_id, fencing token) — is the one committed. Its worker kept the
    result until acked, so a coordinator crash at any point must not lose it or re-run it."""
    problems = []
    for workflow_id, action_id, token in completed:
        committed = summary.committed.get((workflow_id, action_id))
        if committed is None:
            problems.append(f"{workflow_id}/{action_id} token {token}: ran, never committed")
        elif committed.fencing_token != token:
            history = summary.history.get((workflow_id, action_id), [])
            problems.append(
                f"{workflow_id}/{action_id}: attempt with token {token} completed, but token"
                f" {committed.fencing_token} committed:\n    "
                + "\n    ".join(f"{show(e)} {e.message!r}" for e in history)
            )
    assert not problems, f"I3 {len(problems)} completed attempt(s) lost:\n  " + "\n  ".join(
        problems[:20]
    )


def read_marks(path: Path) -> list[tuple[str, str, int]]:
    """``workflow action token`` lines that actions (or handlers) append when they complete."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            out.append((parts[0], parts[1], int(parts[2])))
    return out
