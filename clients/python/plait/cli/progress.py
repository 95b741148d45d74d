"""Live progress of one workflow, built from its history events (CLI layer).

:class:`RunProgress` is pure: events in, a view of every action out (no clock reads; times come
from the events' coordinator timestamps, "now" is passed in). :func:`live_view` draws it with
rich for a terminal; :meth:`RunProgress.apply` returns one plain line per notable event for
everything else. Both escape what workers and users wrote (:func:`plait.cli.render.clean`).

Map and pipeline children are counted once their list is read (``ACTION_MAPPED`` names the
items). An action ready for longer than ``stuck_after_ms`` without a lease is *stuck*: the view
lists it with the reason the coordinator gives (``plait status``'s "why pending"), which the
follower fetches and hands in with :meth:`RunProgress.set_reasons`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from plait.cli import render
from plait.cli.render import cell, clean
from plait.results import TERMINAL_ACTION_STATES
from plait.v1 import workflow_pb2

_TERMINAL = TERMINAL_ACTION_STATES
_RUNNING = workflow_pb2.ACTION_STATE_RUNNING
_ACTIVE = frozenset({workflow_pb2.ACTION_STATE_LEASED, _RUNNING})
_COUNT_ORDER: tuple[str, ...] = (
    *("succeeded", "failed", "timed_out", "skipped", "cancelled"),
    *("running", "leased", "ready", "pending"),
)
_MAX_RUNNING_SHOWN = 12
_MAX_STUCK_SHOWN = 6
STUCK_AFTER_MS = 3000
"""An action ready this long without a lease is shown with the reason it waits."""


@dataclass(slots=True)
class ActionProgress:
    """What the events have said about one action so far."""

    action_id: str
    state: int = workflow_pb2.ACTION_STATE_PENDING
    attempt: int = 0
    worker_id: str = ""
    started_ms: int | None = None  # coordinator wall time of the current attempt's start
    finished_ms: int | None = None
    ready_ms: int | None = None  # coordinator wall time it last became ready
    exit_code: int = 0
    error: str = ""

    def duration_s(self) -> float | None:
        """Seconds the last attempt ran, once it finished."""
        if self.started_ms is None or self.finished_ms is None:
            return None
        return max(0, self.finished_ms - self.started_ms) / 1000


def _wall_ms(e: workflow_pb2.HistoryEvent) -> int | None:
    if e.HasField("recorded_at"):
        return int(e.recorded_at.ToMilliseconds())
    # The coordinator's HLC physical part is its wall clock (or just above it).
    return int(e.hlc.physical_ms) if e.hlc.physical_ms else None


class RunProgress:
    """Every action's progress in one workflow, from its history events."""

    def __init__(
        self,
        spec: workflow_pb2.WorkflowSpec,
        workflow_id: str = "",
        *,
        stuck_after_ms: int = STUCK_AFTER_MS,
    ) -> None:
        self.name = spec.name
        self.workflow_id = workflow_id
        self.specs = {a.id: a for a in spec.actions}
        self.actions = {a.id: ActionProgress(a.id) for a in spec.actions}
        self.workflow_state: int = workflow_pb2.WORKFLOW_STATE_RUNNING
        self.reason = ""
        self.last_sequence = 0
        self.stuck_after_ms = stuck_after_ms
        # Why stuck actions wait, as the coordinator last said (action id -> reason).
        self.reasons: dict[str, str] = {}
        self._said_stuck: set[tuple[str, str]] = set()
        self._finished = 0  # actions in a terminal state, kept as states move
        self._mapped: set[str] = set()  # map and pipeline actions whose children exist

    @property
    def total(self) -> int:
        return len(self.actions)

    @property
    def finished(self) -> int:
        return self._finished

    @property
    def done(self) -> bool:
        """The workflow reached a terminal state."""
        return self.workflow_state != workflow_pb2.WORKFLOW_STATE_RUNNING

    def counts(self) -> dict[str, int]:
        """Actions per short state name, in a fixed order, zero counts left out."""
        c = Counter(render.action_state(a.state) for a in self.actions.values())
        return {k: c[k] for k in _COUNT_ORDER if c[k]}

    def running(self) -> list[ActionProgress]:
        """Actions leased or running now (a map or pipeline runs as its children: not listed)."""
        mapped = self._mapped
        return [
            a for a in self.actions.values() if a.state in _ACTIVE and a.action_id not in mapped
        ]

    def stuck(self, now_ms: int) -> list[ActionProgress]:
        """Actions ready for at least ``stuck_after_ms`` without a lease, longest first."""
        cutoff = now_ms - self.stuck_after_ms
        out = [
            a
            for a in self.actions.values()
            if a.state == workflow_pb2.ACTION_STATE_READY
            and a.ready_ms is not None
            and a.ready_ms <= cutoff
        ]
        out.sort(key=lambda a: a.ready_ms or 0)
        return out

    def set_reasons(self, reasons: dict[str, str]) -> None:
        """The coordinator's reasons for the actions it reported waiting (replaces the last)."""
        self.reasons = dict(reasons)

    def stuck_lines(self, now_ms: int) -> list[str]:
        """Plain lines for stuck actions whose reason is known and was not said yet (escaped)."""
        lines = []
        for a in self.stuck(now_ms):
            why = self.reasons.get(a.action_id)
            if not why or (a.action_id, why) in self._said_stuck:
                continue
            self._said_stuck.add((a.action_id, why))
            waited = (now_ms - (a.ready_ms or now_ms)) / 1000
            lines.append(clean(f"{self._progress()} {a.action_id} waiting {waited:.0f}s: {why}"))
        return lines

    def durations(self) -> dict[str, str]:
        """``action_id -> "0.31s"`` for actions whose last attempt finished."""
        out = {}
        for a in self.actions.values():
            d = a.duration_s()
            if d is not None:
                out[a.action_id] = f"{d:.2f}s"
        return out

    def apply(self, e: workflow_pb2.HistoryEvent) -> str | None:
        """Folds one event in; returns a line worth printing in plain mode, if any (escaped)."""
        self.last_sequence = max(self.last_sequence, e.sequence)
        t = e.type
        if t == workflow_pb2.EVENT_TYPE_WORKFLOW_SUBMITTED:
            self.workflow_id = e.workflow_id or self.workflow_id
            # Actions that need nothing are ready from submission (no ACTION_READY of their own).
            for action_id, spec in self.specs.items():
                if not spec.needs:
                    a = self.actions[action_id]
                    if a.state == workflow_pb2.ACTION_STATE_PENDING:
                        self._move(a, workflow_pb2.ACTION_STATE_READY)
                        a.ready_ms = _wall_ms(e)
            return None
        if t == workflow_pb2.EVENT_TYPE_WORKFLOW_RETRIED:
            self.workflow_state = workflow_pb2.WORKFLOW_STATE_RUNNING
            self.reason = ""
            for action_id in _json_list(e.outputs_json):
                reset = self.actions.get(str(action_id))
                if reset is not None:  # back to pending (a map that made its children: running)
                    mapped = reset.action_id in self._mapped
                    self._move(reset, _RUNNING if mapped else workflow_pb2.ACTION_STATE_PENDING)
                    reset.error, reset.finished_ms = "", None
            return clean(f"workflow {self.workflow_id} retried: {e.message}")
        if t == workflow_pb2.EVENT_TYPE_WORKFLOW_FINISHED:
            self.workflow_state = e.workflow_state
            self.reason = e.message or (e.error.message if e.HasField("error") else "")
            state = render.workflow_state(e.workflow_state)
            why = f": {self.reason}" if self.reason else ""
            return clean(f"workflow {self.workflow_id} {state}{why}")
        action = self.actions.get(e.action_id)
        if action is None:  # not of this workflow's spec, nor a child of a list it read
            return None
        line = self._apply_action(action, e)
        return None if line is None else clean(line)

    def _move(self, a: ActionProgress, state: int) -> None:
        was, now = a.state in _TERMINAL, state in _TERMINAL
        self._finished += int(now) - int(was)
        a.state = state

    def _progress(self) -> str:
        return f"[{self.finished:>{len(str(self.total))}}/{self.total}]"

    def _map(self, a: ActionProgress, e: workflow_pb2.HistoryEvent) -> str:
        """ACTION_MAPPED: one child per item (a pipeline: a chain of stages per item)."""
        items = _json_list(e.outputs_json)
        spec = self.specs.get(a.action_id)
        stages = (
            list(spec.pipeline.stages) if spec is not None and spec.HasField("pipeline") else []
        )
        at = _wall_ms(e)
        self._mapped.add(a.action_id)
        for i in range(len(items)):
            if stages:
                for k, stage in enumerate(stages):
                    child = f"{a.action_id}.{i}.{stage.id}"
                    if child not in self.actions:
                        self.actions[child] = ActionProgress(child)
                        if k == 0:
                            self._move(self.actions[child], workflow_pb2.ACTION_STATE_READY)
                            self.actions[child].ready_ms = at
            else:
                child = f"{a.action_id}.{i}"
                if child not in self.actions:
                    self.actions[child] = ActionProgress(child)
                    self._move(self.actions[child], workflow_pb2.ACTION_STATE_READY)
                    self.actions[child].ready_ms = at
        return f"{self._progress()} {a.action_id} mapped over {len(items)} item(s)"

    def _apply_action(self, a: ActionProgress, e: workflow_pb2.HistoryEvent) -> str | None:
        if e.action_state:
            self._move(a, e.action_state)
        if e.attempt:
            a.attempt = e.attempt
        if e.worker_id:
            a.worker_id = e.worker_id
        t = e.type
        if t in (
            workflow_pb2.EVENT_TYPE_ACTION_READY,
            workflow_pb2.EVENT_TYPE_LEASE_LOST,
            workflow_pb2.EVENT_TYPE_ACTION_RETRY_SCHEDULED,
        ):
            a.ready_ms = _wall_ms(e)
            if t == workflow_pb2.EVENT_TYPE_ACTION_RETRY_SCHEDULED and e.HasField("backoff"):
                # Ready to run once the backoff is over: stuck only after that.
                a.ready_ms = (a.ready_ms or 0) + int(e.backoff.ToMilliseconds())
        progress = self._progress()
        if t == workflow_pb2.EVENT_TYPE_ACTION_MAPPED:
            a.started_ms, a.finished_ms = _wall_ms(e), None
            return self._map(a, e)
        if t == workflow_pb2.EVENT_TYPE_ACTION_LEASED:
            a.started_ms, a.finished_ms, a.error = _wall_ms(e), None, ""
            return None
        if t == workflow_pb2.EVENT_TYPE_ACTION_STARTED:
            a.started_ms = _wall_ms(e) or a.started_ms
            return f"{progress} {a.action_id} started on {a.worker_id} (attempt {a.attempt})"
        if t == workflow_pb2.EVENT_TYPE_ACTION_FINISHED:
            a.finished_ms = _wall_ms(e)
            a.exit_code = e.exit_code
            a.error = e.error.message if e.HasField("error") else ""
            d = a.duration_s()
            took = f" in {d:.2f}s" if d is not None else ""
            why = f": {a.error}" if a.error else ""
            code = f" (exit {e.exit_code})" if e.exit_code else ""
            state = render.action_state(a.state)
            on = f" on {a.worker_id}" if a.worker_id else ""
            return f"{progress} {a.action_id} {state}{on}{took}{code}{why}"
        if t == workflow_pb2.EVENT_TYPE_ACTION_RETRY_SCHEDULED:
            a.error = e.error.message if e.HasField("error") else e.message
            return f"{progress} {a.action_id} attempt {a.attempt} failed, retrying: {a.error}"
        if t == workflow_pb2.EVENT_TYPE_LEASE_LOST:
            return f"{progress} {a.action_id} lease lost on {a.worker_id}: {e.message}"
        if t in (workflow_pb2.EVENT_TYPE_ACTION_SKIPPED, workflow_pb2.EVENT_TYPE_ACTION_CANCELLED):
            a.error = e.error.message if e.HasField("error") else e.message
            state = render.action_state(a.state)
            return f"{progress} {a.action_id} {state}" + (f": {a.error}" if a.error else "")
        return None


def _json_list(text: str) -> list[Any]:
    try:
        value = json.loads(text or "[]")
    except ValueError:
        return []
    return value if isinstance(value, list) else []


def live_view(progress: RunProgress, now_ms: int) -> RenderableType:
    """The terminal view: a bar of finished/total, counts per state, what is running now, and
    what has waited too long, with why."""
    head = Table.grid(padding=(0, 1))
    head.add_column()
    head.add_column()
    head.add_column()
    counts = Text()
    for i, (name, n) in enumerate(progress.counts().items()):
        if i:
            counts.append(" · ", style="dim")
        counts.append(f"{name} {n}", style=render.styled_state(name).style)
    head.add_row(
        ProgressBar(total=max(progress.total, 1), completed=progress.finished, width=40),
        Text(f"{progress.finished}/{progress.total}", style="bold"),
        counts,
    )
    title = Text.assemble(
        (clean(progress.name), "bold"), "  ", (clean(progress.workflow_id), "dim")
    )
    running = progress.running()
    parts: list[Any] = [title, head]
    if running:
        table = Table(show_edge=False, pad_edge=False, box=None, header_style="dim")
        for col in ("running", "worker", "attempt", "for"):
            table.add_column(col)
        for a in running[:_MAX_RUNNING_SHOWN]:
            took = f"{max(0, now_ms - a.started_ms) / 1000:.1f}s" if a.started_ms else ""
            table.add_row(cell(a.action_id), cell(a.worker_id), str(a.attempt), took)
        if len(running) > _MAX_RUNNING_SHOWN:
            table.add_row(f"… and {len(running) - _MAX_RUNNING_SHOWN} more", "", "", "")
        parts.append(table)
    stuck = progress.stuck(now_ms)
    if stuck:
        table = Table(show_edge=False, pad_edge=False, box=None, header_style="dim")
        for col in ("waiting", "for", "why"):
            table.add_column(col)
        for a in stuck[:_MAX_STUCK_SHOWN]:
            waited = f"{max(0, now_ms - (a.ready_ms or now_ms)) / 1000:.0f}s"
            why = progress.reasons.get(a.action_id, "")
            table.add_row(cell(a.action_id), waited, cell(why, style="yellow"))
        if len(stuck) > _MAX_STUCK_SHOWN:
            table.add_row(f"… and {len(stuck) - _MAX_STUCK_SHOWN} more", "", "")
        parts.append(table)
    return Group(*parts)
