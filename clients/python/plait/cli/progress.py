"""Live progress of one workflow, built from its history events (CLI layer).

:class:`RunProgress` is pure: events in, a view of every action out (no clock reads; times come
from the events' coordinator timestamps). :func:`live_view` draws it with rich for a terminal;
:meth:`RunProgress.apply` returns one plain line per notable event for everything else. Both
escape what workers and users wrote (:func:`plait.cli.render.clean`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from plait.cli import render
from plait.cli.render import cell, clean
from plait.v1 import workflow_pb2

_TERMINAL = frozenset(
    {
        workflow_pb2.ACTION_STATE_SUCCEEDED,
        workflow_pb2.ACTION_STATE_FAILED,
        workflow_pb2.ACTION_STATE_CANCELLED,
        workflow_pb2.ACTION_STATE_SKIPPED,
        workflow_pb2.ACTION_STATE_TIMED_OUT,
    }
)
_ACTIVE = frozenset({workflow_pb2.ACTION_STATE_LEASED, workflow_pb2.ACTION_STATE_RUNNING})
_COUNT_ORDER: tuple[str, ...] = (
    *("succeeded", "failed", "timed_out", "skipped", "cancelled"),
    *("running", "leased", "ready", "pending"),
)
_MAX_RUNNING_SHOWN = 12


@dataclass(slots=True)
class ActionProgress:
    """What the events have said about one action so far."""

    action_id: str
    state: int = workflow_pb2.ACTION_STATE_PENDING
    attempt: int = 0
    worker_id: str = ""
    started_ms: int | None = None  # coordinator wall time of the current attempt's start
    finished_ms: int | None = None
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

    def __init__(self, spec: workflow_pb2.WorkflowSpec, workflow_id: str = "") -> None:
        self.name = spec.name
        self.workflow_id = workflow_id
        self.actions = {a.id: ActionProgress(a.id) for a in spec.actions}
        self.workflow_state: int = workflow_pb2.WORKFLOW_STATE_RUNNING
        self.reason = ""
        self.last_sequence = 0

    @property
    def total(self) -> int:
        return len(self.actions)

    @property
    def finished(self) -> int:
        return sum(1 for a in self.actions.values() if a.state in _TERMINAL)

    @property
    def done(self) -> bool:
        """The workflow reached a terminal state."""
        return self.workflow_state != workflow_pb2.WORKFLOW_STATE_RUNNING

    def counts(self) -> dict[str, int]:
        """Actions per short state name, in a fixed order, zero counts left out."""
        c = Counter(render.action_state(a.state) for a in self.actions.values())
        return {k: c[k] for k in _COUNT_ORDER if c[k]}

    def running(self) -> list[ActionProgress]:
        """Actions leased or running now."""
        return [a for a in self.actions.values() if a.state in _ACTIVE]

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
        if e.type == workflow_pb2.EVENT_TYPE_WORKFLOW_SUBMITTED:
            self.workflow_id = e.workflow_id or self.workflow_id
            return None
        if e.type == workflow_pb2.EVENT_TYPE_WORKFLOW_FINISHED:
            self.workflow_state = e.workflow_state
            self.reason = e.message or (e.error.message if e.HasField("error") else "")
            state = render.workflow_state(e.workflow_state)
            why = f": {self.reason}" if self.reason else ""
            return clean(f"workflow {self.workflow_id} {state}{why}")
        action = self.actions.get(e.action_id)
        if action is None:
            return None
        line = self._apply_action(action, e)
        return None if line is None else clean(line)

    def _apply_action(self, a: ActionProgress, e: workflow_pb2.HistoryEvent) -> str | None:
        if e.action_state:
            a.state = e.action_state
        if e.attempt:
            a.attempt = e.attempt
        if e.worker_id:
            a.worker_id = e.worker_id
        t = e.type
        progress = f"[{self.finished:>{len(str(self.total))}}/{self.total}]"
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
            return f"{progress} {a.action_id} {state} on {a.worker_id}{took}{code}{why}"
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


def live_view(progress: RunProgress, now_ms: int) -> RenderableType:
    """The terminal view: a bar of finished/total, counts per state, what is running now."""
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
    return Group(*parts)
