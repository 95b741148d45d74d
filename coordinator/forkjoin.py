"""Fork and join facts, derived from what a commit recorded and the core's state (edge layer).

The core decides forks and joins without naming them: an action that succeeds with several
dependents, or a map or pipeline that becomes children, *forks*; an action with several needs,
or a map or pipeline collecting its children, *joins*. :class:`ForkJoin` reads each commit's
records (after the commit, with the core they were applied to) and says which forks happened
and which joins were resolved, with the join's policy, outcome and how long it waited (first
need or child ended -> resolved). Metrics (fork width, join wait, join outcomes) and traces
(fork and join spans) are both made from these facts, so the two always agree.

It only reads the core. What it remembers (when a pending join's first need ended, which lease
each ended action's terminal event named) is forgotten when the workflow finishes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from plait.coordinator.core import transitions as t
from plait.coordinator.core.joins import join_of, required
from plait.coordinator.core.model import ActionRecord
from plait.coordinator.core.sessions import lease_id_for
from plait.coordinator.core.state import SchedulerState
from plait.spec.rules import fans_out
from plait.v1 import workflow_pb2 as pb

E = pb  # EVENT_TYPE_* constants

ForkKind = Literal["dependents", "map", "pipeline"]
JoinKind = Literal["all", "any", "at_least"]
JoinOver = Literal["needs", "children"]

_ENDED = frozenset(
    {E.EVENT_TYPE_ACTION_FINISHED, E.EVENT_TYPE_ACTION_CANCELLED, E.EVENT_TYPE_ACTION_SKIPPED}
)
_JOIN_KIND: dict[int, JoinKind] = {pb.JOIN_KIND_ANY: "any", pb.JOIN_KIND_AT_LEAST: "at_least"}
_CONSEQUENCE = frozenset({E.EVENT_REASON_NOT_NEEDED, E.EVENT_REASON_PARENT_FAILED})
# The state a need had when a join was resolved, when it ended later in the same commit
# (leased at least once: running, as far as the commit tells).
_OPEN_LEASED = t.STATE_NAME[t.RUNNING]
_OPEN = t.STATE_NAME[t.PENDING]


@dataclass(slots=True)
class Fork:
    """One fan-out point: an action that succeeded with several dependents (``dependents``),
    or a map or pipeline that became its children (``map``, ``pipeline``).

    ``width``: how many branches (dependents, children, or pipeline items); ``branches``: the
    actions that run as its branches (the dependents; a map's children; every stage of every
    pipeline item).
    """

    workflow_id: str
    action_id: str
    kind: ForkKind
    width: int
    branches: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Join:
    """One resolved join: an action with several needs became ready (``met``) or was skipped
    (``impossible``), or a map or pipeline ended on its children's join (``over="children"``).

    ``required`` of ``of`` needs (or children) had to succeed; ``succeeded`` and ``failed``
    name those that had ended with and without success when it was resolved; ``needs`` is one
    ``(action id, state name, lease id)`` per need or child, the lease being the one its
    terminal event named ("" when none: never attempted, a map, or still open);
    ``wait_seconds``: from the first need (or child) ending to the resolution, as far as this
    coordinator saw it (0 when that happened before it started).
    """

    workflow_id: str
    action_id: str
    kind: JoinKind
    required: int
    of: int
    succeeded: list[str]
    failed: list[str]
    outcome: Literal["met", "impossible"]
    wait_seconds: float
    needs: list[tuple[str, str, str]]
    over: JoinOver = "needs"
    first_ended_ns: int = 0  # recorded_at of the first need's (child's) ending; 0: not seen


class ForkJoin:
    """Derives :class:`Fork` and :class:`Join` facts from each commit's records."""

    def __init__(self) -> None:
        # (workflow, action, over) -> when its first need or child ended: the ``now`` given,
        # and the recorded_at of its terminal event (ns).
        self._first_end: dict[tuple[str, str, JoinOver], tuple[float, int]] = {}
        # workflow -> action -> the lease its terminal event named.
        self._leases: dict[str, dict[str, str]] = {}
        # workflow -> True when it has no fork or join point at all (nothing to derive).
        self._plain: dict[str, bool] = {}

    def pending(self) -> int:
        """How many entries are remembered (joins waiting, leases of ended actions)."""
        return len(self._first_end) + sum(len(x) for x in self._leases.values())

    def on_records(
        self, core: SchedulerState, records: list[pb.HistoryEvent], now: float
    ) -> tuple[list[Fork], list[Join]]:
        """The forks and resolved joins among ``records`` (one commit's, in order, already
        applied to ``core``); ``now``: the time of the commit, in the unit of the waits."""
        forks: list[Fork] = []
        joined: list[Join] = []
        ended_at = _EndedAt(records)
        finished: list[str] = []
        plain = self._plain
        for i, ev in enumerate(records):
            typ = ev.type
            if typ == E.EVENT_TYPE_WORKFLOW_FINISHED:
                finished.append(ev.workflow_id)
                continue
            if not ev.action_id or plain.get(ev.workflow_id, False):
                continue
            wf = core.workflows.get(ev.workflow_id)
            a = wf.actions.get(ev.action_id) if wf is not None else None
            if a is None:
                continue
            if ev.workflow_id not in plain:
                assert wf is not None  # a is one of its actions
                plain[ev.workflow_id] = not any(_forks_or_joins(x) for x in wf.actions.values())
                if plain[ev.workflow_id]:
                    continue
            if typ in _ENDED:
                self._ended(a, ev, i, now, ended_at, forks, joined)
            elif typ == E.EVENT_TYPE_ACTION_READY:
                if _joins_needs(a):
                    joined.append(self._join(a, "needs", "met", i, now, ended_at))
            elif typ == E.EVENT_TYPE_ACTION_MAPPED:
                if _joins_needs(a):
                    joined.append(self._join(a, "needs", "met", i, now, ended_at))
                forks.append(_map_fork(a))
        for workflow_id in finished:
            self._forget(workflow_id)
        return forks, joined

    def _ended(
        self,
        a: ActionRecord,
        ev: pb.HistoryEvent,
        i: int,
        now: float,
        ended_at: _EndedAt,
        forks: list[Fork],
        joined: list[Join],
    ) -> None:
        wf_id = a.workflow.workflow_id
        if ev.lease_id and a.dependents:  # a join it feeds links to it
            self._leases.setdefault(wf_id, {})[a.id] = ev.lease_id
        state = ev.action_state
        # The join this action was waiting on (its needs') is resolved by its own ending:
        # skipped (impossible), or a map whose needs were met but whose list could not be read.
        if _joins_needs(a):
            if state == t.SKIPPED:
                joined.append(self._join(a, "needs", "impossible", i, now, ended_at))
            elif state != t.CANCELLED and fans_out(a.spec) and a.children is None:
                joined.append(self._join(a, "needs", "met", i, now, ended_at))
            else:  # it ran (resolved already), or was cancelled before its join was
                self._first_end.pop((wf_id, a.id, "needs"), None)
        if a.children is not None and ev.type == E.EVENT_TYPE_ACTION_FINISHED:
            outcome: Literal["met", "impossible"] = "met" if state == t.SUCCEEDED else "impossible"
            joined.append(self._join(a, "children", outcome, i, now, ended_at))
        elif a.children is not None:
            self._first_end.pop((wf_id, a.id, "children"), None)
        if state == t.SUCCEEDED and len(a.dependents) > 1 and not _collected_by(a):
            branches = [d.id for d in a.dependents]
            forks.append(Fork(wf_id, a.id, "dependents", len(branches), branches))
        # Its ending may be the first of a join it feeds.
        first_end = self._first_end
        key: tuple[str, str, JoinOver]
        for d in a.dependents:
            if a.parent is d:
                key = (wf_id, d.id, "children")
            elif _joins_needs(d) and d.state != t.CANCELLED:
                key = (wf_id, d.id, "needs")
            else:
                continue
            if key not in first_end:
                first_end[key] = (now, ev.recorded_at.ToNanoseconds())

    def _join(
        self,
        a: ActionRecord,
        over: JoinOver,
        outcome: Literal["met", "impossible"],
        i: int,
        now: float,
        ended_at: _EndedAt,
    ) -> Join:
        wf_id = a.workflow.workflow_id
        started, started_ns = self._first_end.pop((wf_id, a.id, over), (now, 0))
        members = (a.children or []) if over == "children" else a.needs
        leases = self._leases.get(wf_id, {})
        succeeded: list[str] = []
        failed: list[str] = []
        needs: list[tuple[str, str, str]] = []
        for n in members:
            at = ended_at.index(wf_id, n.id)
            if n.state in t.TERMINAL and at < i:
                (succeeded if n.state == t.SUCCEEDED else failed).append(n.id)
                needs.append((n.id, t.STATE_NAME[n.state], leases.get(n.id) or _lease_of(n)))
            elif n.state in t.TERMINAL:  # ended after the join was resolved, in this commit
                needs.append((n.id, _OPEN_LEASED if n.token else _OPEN, ""))
            else:
                needs.append((n.id, t.STATE_NAME[n.state], ""))
        n_of = len(members)
        if over == "needs" and a.spec.join.kind == pb.JOIN_KIND_UNSPECIFIED:
            # A map's own join over its needs is all; join_of may have lent it a dependent's,
            # which is for its children.
            need, kind = n_of, "all"
        else:
            policy = join_of(a) if over == "children" else a.spec.join
            need, kind = required(a, n_of), _JOIN_KIND.get(policy.kind, "all")
        return Join(
            wf_id,
            a.id,
            kind,  # type: ignore[arg-type]
            need,
            n_of,
            succeeded,
            failed,
            outcome,
            max(0.0, now - started),
            needs,
            over,
            started_ns,
        )

    def _forget(self, workflow_id: str) -> None:
        self._leases.pop(workflow_id, None)
        self._plain.pop(workflow_id, None)
        for key in [k for k in self._first_end if k[0] == workflow_id]:
            del self._first_end[key]


class _EndedAt:
    """Where in a commit's records each action ended, worked out only if a join asks.

    A join resolved before a need's end in the same commit (cancel_remaining) must not count
    that need as ended. A need cancelled *because* a join was met or made impossible ended as
    its consequence: it was still open when the join was resolved, whatever the order of the
    records."""

    __slots__ = ("_at", "_records")

    def __init__(self, records: list[pb.HistoryEvent]) -> None:
        self._records = records
        self._at: dict[tuple[str, str], int] | None = None

    def index(self, workflow_id: str, action_id: str) -> int:
        """The position of the action's ending in the commit; -1 if it did not end there."""
        if self._at is None:
            records = self._records
            self._at = {}
            for i, ev in enumerate(records):
                if ev.type in _ENDED:
                    after = ev.type == E.EVENT_TYPE_ACTION_CANCELLED and ev.reason in _CONSEQUENCE
                    self._at[(ev.workflow_id, ev.action_id)] = len(records) if after else i
        return self._at.get((workflow_id, action_id), -1)


def _forks_or_joins(a: ActionRecord) -> bool:
    """Whether ``a`` is a fork or join point: several dependents or needs, a map, a pipeline."""
    return len(a.dependents) > 1 or len(a.needs) > 1 or fans_out(a.spec)


def _joins_needs(a: ActionRecord) -> bool:
    """Whether ``a`` joins over its needs: several of them, and not a map's child (which shows
    its parent's needs as its inputs but runs on its parent's met join)."""
    return len(a.needs) > 1 and a.parent is None


def _collected_by(a: ActionRecord) -> bool:
    """A child or pipeline stage: its dependents are its parent or its next stage."""
    return a.parent is not None


def _map_fork(a: ActionRecord) -> Fork:
    wf_id = a.workflow.workflow_id
    children = a.children or []
    if a.spec.HasField("pipeline"):
        stages = [x.id for x in a.workflow.actions.values() if x.parent is a]
        return Fork(wf_id, a.id, "pipeline", len(children), stages)
    return Fork(wf_id, a.id, "map", len(children), [c.id for c in children])


def _lease_of(a: ActionRecord) -> str:
    """The lease of ``a``'s committed result, when this coordinator did not see its terminal
    event (it started later)."""
    if not a.committed_token:
        return ""
    return lease_id_for(a.workflow.workflow_id, a.id, a.committed_token)
