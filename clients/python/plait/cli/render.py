"""How the ``plait`` command shows things: JSON shapes, tables and event lines (CLI layer).

JSON output is ``google.protobuf.json_format.MessageToDict`` of the documented message with
``preserving_proto_field_name=True`` and ``always_print_fields_with_no_presence=True`` (so
scalar keys are always there); docs/cli.md lists each command's shape. Tables are for people
and may change; JSON is the stable interface.

Terminal safety: every string that came from a user, a worker or an action (names, reasons,
errors, hostnames, labels, log tails) goes through :func:`clean` (or :func:`cell`, the same as
a rich ``Text``, so rich markup in it is never interpreted) before it reaches a terminal.
Control characters become visible escapes; docs/cli.md "Terminal safety" says which.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table
from rich.text import Text

from plait.v1 import admin_service_pb2, workflow_pb2, workflow_service_pb2

# C0, DEL and C1 controls, plus the Unicode controls that reorder or break lines (bidi embeddings,
# overrides and isolates, line and paragraph separators): none of them is text a person wrote to
# be read, and each can move the cursor, retitle the window or hide what follows.
_UNSAFE = (
    *range(0x00, 0x20),
    *range(0x7F, 0xA0),
    *(0x061C, 0x200E, 0x200F, 0x2028, 0x2029),
    *range(0x202A, 0x202F),
    *range(0x2066, 0x206A),
)
_NAMED = {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}


def _escape(cp: int) -> str:
    return _NAMED.get(cp) or (f"\\x{cp:02x}" if cp <= 0xFF else f"\\u{cp:04x}")


_LINE = str.maketrans({cp: _escape(cp) for cp in _UNSAFE})
# Several lines (log tails, multi-line errors): newlines and tabs stay; a carriage return was
# made a line break beforehand.
_BLOCK = str.maketrans({cp: _escape(cp) for cp in _UNSAFE if cp not in (0x09, 0x0A)})


def clean(value: str, *, multiline: bool = False) -> str:
    """``value`` made safe to write to a terminal: every control character shown as an escape.

    C0 controls, DEL, C1 controls (``\\x9b`` is a CSI of its own) and the bidi/line-separator
    controls become ``\\x1b``, ``\\x7f``, ``\\x9b``, ``\\u202e``...; tab, newline and carriage
    return become ``\\t``, ``\\n``, ``\\r`` so one value stays on one line. With ``multiline``
    (log tails, error messages) newlines and tabs are kept and ``\\r\\n`` or a lone ``\\r`` ends
    a line. Backslashes are left alone: ``-o json`` is the exact form.
    """
    if value.isprintable():  # the common case: nothing to do, nothing allocated
        return value
    if multiline:
        if "\r" in value:
            value = value.replace("\r\n", "\n").replace("\r", "\n")
        return value.translate(_BLOCK)
    return value.translate(_LINE)


def cell(value: str, *, multiline: bool = False, style: str = "") -> Text:
    """:func:`clean` as rich ``Text``: rich markup (``[link=...]``, ``[bold]``) and emoji codes
    in other people's strings are shown as typed, never interpreted."""
    return Text(clean(value, multiline=multiline), style=style)


_STATE_STYLE = {
    "succeeded": "green",
    "failed": "bold red",
    "timed_out": "bold red",
    "cancelled": "yellow",
    "skipped": "magenta",
    "running": "cyan",
    "leased": "cyan",
    "ready": "blue",
    "pending": "dim",
}


def to_dict(msg: Message) -> dict[str, Any]:
    """The documented JSON form of a message."""
    return json_format.MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def status_dict(status: workflow_pb2.WorkflowStatus) -> dict[str, Any]:
    """A workflow status as JSON: :func:`to_dict`, and each action's committed outputs also
    as a JSON object under ``outputs`` (beside the ``outputs_json`` string; absent when the
    action has none or they were left out of the response)."""
    doc = to_dict(status)
    for a in doc.get("actions", ()):
        text = a.get("outputs_json")
        if text:
            # Not JSON after all: the string stays the whole answer.
            with contextlib.suppress(ValueError):
                a["outputs"] = json.loads(text)
    return doc


def duration(seconds: float) -> str:
    """``0.31s``, ``12.4s``, ``3m05s``, ``2h07m``: short, for tables."""
    if seconds < 10:
        return f"{seconds:.2f}s"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        m, sec = divmod(int(seconds), 60)
        return f"{m}m{sec:02d}s"
    h, rest = divmod(int(seconds), 3600)
    return f"{h}h{rest // 60:02d}m"


def _ms(ts: Any) -> int:
    return int(ts.seconds) * 1000 + int(ts.nanos) // 1_000_000


def clock_time(ts: Any) -> str:
    """A ``Timestamp`` as ``HH:MM:SS.mmm`` (UTC), or empty when unset."""
    if not ts.seconds and not ts.nanos:
        return ""
    return str(ts.ToDatetime().strftime("%H:%M:%S.%f")[:-3])


def action_duration(a: workflow_pb2.ActionStatus) -> float | None:
    """Seconds from an action's (last) start to its end, when it has both."""
    if not a.HasField("started_at") or not a.HasField("finished_at"):
        return None
    return max(0, _ms(a.finished_at) - _ms(a.started_at)) / 1000


def print_json(obj: Any, out: TextIO | None = None) -> None:
    """One pretty JSON document."""
    stream = out or sys.stdout
    stream.write(json.dumps(obj, indent=2) + "\n")
    stream.flush()


def print_json_line(obj: Any, out: TextIO | None = None) -> None:
    """One compact JSON document per line (JSON Lines), for streams."""
    stream = out or sys.stdout
    stream.write(json.dumps(obj, separators=(",", ":")) + "\n")
    stream.flush()


def console(out: TextIO | None = None) -> Console:
    """A rich console; wide and colourless when not writing to a terminal."""
    stream = out or sys.stdout
    if stream.isatty():
        return Console(file=stream)
    return Console(file=stream, width=200, no_color=True, highlight=False, soft_wrap=False)


def short(enum_name: str) -> str:
    """``ACTION_STATE_SUCCEEDED`` -> ``succeeded``; enum prefixes go, the rest is lowercased."""
    for prefix in ("ACTION_STATE_", "WORKFLOW_STATE_", "EVENT_TYPE_"):
        if enum_name.startswith(prefix):
            return enum_name.removeprefix(prefix).lower()
    return enum_name.lower()


def action_state(value: int) -> str:
    """Short name of an ``ActionState``."""
    return short(workflow_pb2.ActionState.Name(workflow_pb2.ActionState.ValueType(value)))


def workflow_state(value: int) -> str:
    """Short name of a ``WorkflowState``."""
    return short(workflow_pb2.WorkflowState.Name(workflow_pb2.WorkflowState.ValueType(value)))


def event_type(value: int) -> str:
    """Short name of an ``EventType``."""
    return short(workflow_pb2.EventType.Name(workflow_pb2.EventType.ValueType(value)))


def styled_state(name: str) -> Text:
    """A state name coloured for a terminal."""
    return Text(name, style=_STATE_STYLE.get(name, ""))


def hlc(ts: Any) -> str:
    """An ``HlcTimestamp`` as ``physical.logical``."""
    return f"{ts.physical_ms}.{ts.logical}"


def timestamp(msg: Any, has: bool) -> str:
    """A ``Timestamp`` as ISO 8601 UTC, or empty when unset."""
    if not has:
        return ""
    return str(msg.ToDatetime().strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z")


def action_error(action: workflow_pb2.ActionStatus) -> str:
    """Why an action is where it is: its error, else its reason."""
    if action.HasField("error") and action.error.message:
        return str(action.error.message)
    return action.reason


def workflow_header(status: workflow_pb2.WorkflowStatus) -> list[str]:
    """Key lines above a workflow's action table, escaped (:func:`clean`): print them as text,
    never as rich markup (``console.print(Text(line))``)."""
    lines = [
        f"workflow  {clean(status.workflow_id)}  ({clean(status.name)})",
        f"state     {workflow_state(status.state)}",
    ]
    submitted = timestamp(status.submitted_at, status.HasField("submitted_at"))
    finished = timestamp(status.finished_at, status.HasField("finished_at"))
    if submitted:
        lines.append(f"submitted {submitted}  hlc {hlc(status.submitted_hlc)}")
    if finished:
        lines.append(f"finished  {finished}  hlc {hlc(status.finished_hlc)}")
        took = max(0, _ms(status.finished_at) - _ms(status.submitted_at)) / 1000
        lines.append(f"duration  {duration(took)}")
    if status.action_counts:
        counts = ", ".join(f"{short(k)} {v}" for k, v in sorted(status.action_counts.items()) if v)
        lines.append(f"actions   {counts}")
    if status.reason:
        lines.append(f"reason    {clean(status.reason)}")
    if status.idempotency_key:
        lines.append(f"key       {clean(status.idempotency_key)}")
    if status.trace_id:
        lines.append(f"trace     {clean(status.trace_id)}")
    return lines


def actions_table(
    actions: Iterable[workflow_pb2.ActionStatus],
    durations: Mapping[str, str] | None = None,
    title: str | None = None,
    exec_ids: frozenset[str] | None = None,
) -> Table:
    """One row per action: state, attempts, worker, start and end (UTC), duration/exit code,
    error or reason.

    Durations are the last attempt's, from its start and end times (``durations`` gives them
    for actions whose status has none). Exit codes show for ``exec_ids`` that finished (when
    known), else whenever non-zero.
    """
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    cols = ("action", "state", "attempts", "worker", "started", "ended", "duration / exit")
    for col in (*cols, "error / reason"):
        table.add_column(col, overflow="fold")
    for a in actions:
        parts = []
        took = action_duration(a)
        if took is not None:
            parts.append(duration(took))
        elif durations and durations.get(a.action_id):
            parts.append(durations[a.action_id])
        finished = a.state in _FINISHED_EXEC_STATES
        if (exec_ids is not None and a.action_id in exec_ids and finished) or a.exit_code:
            parts.append(f"exit {a.exit_code}")
        table.add_row(
            cell(a.action_id),
            styled_state(action_state(a.state)),
            str(a.attempt) + (f" (+{a.lease_losses} lost)" if a.lease_losses else ""),
            cell(a.worker_id),
            clock_time(a.started_at),
            clock_time(a.finished_at),
            " / ".join(parts),
            cell(action_error(a), multiline=True),
        )
    return table


_FINISHED_EXEC_STATES = frozenset(
    {workflow_pb2.ACTION_STATE_SUCCEEDED, workflow_pb2.ACTION_STATE_FAILED}
)


def workflows_table(workflows: Iterable[workflow_pb2.WorkflowStatus]) -> Table:
    """One row per workflow for ``plait list``."""
    table = Table(show_edge=False, pad_edge=False)
    for col in ("workflow", "name", "state", "submitted", "finished", "actions", "reason"):
        table.add_column(col, overflow="fold")
    for w in workflows:
        total = sum(w.action_counts.values())
        done = w.action_counts.get("ACTION_STATE_SUCCEEDED", 0)
        table.add_row(
            cell(w.workflow_id),
            cell(w.name),
            styled_state(workflow_state(w.state)),
            timestamp(w.submitted_at, w.HasField("submitted_at")),
            timestamp(w.finished_at, w.HasField("finished_at")),
            f"{done}/{total}" if total else "",
            cell(w.reason, multiline=True),
        )
    return table


def connected(w: admin_service_pb2.WorkerInfo, now_ms: int | None) -> str:
    """When a worker's session began (UTC) and, given ``now_ms``, how long ago."""
    if not w.HasField("connected_at") or not w.connected_at.seconds:
        return ""
    at = w.connected_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%SZ")
    if now_ms is None:
        return at
    ago = (now_ms - _ms(w.connected_at)) / 1000
    return f"{at} ({duration(ago)} ago)" if ago >= 0 else at


def workers_table(
    workers: Iterable[admin_service_pb2.WorkerInfo], now_ms: int | None = None
) -> Table:
    """One row per connected worker for ``plait workers`` (``now_ms``: this host's wall clock,
    for how long ago each connected)."""
    table = Table(show_edge=False, pad_edge=False)
    cols = ("worker", "host", "slots", "free", "leases", "queued", "exec", "handlers", "labels")
    for col in (*cols, "state", "connected", "seen", "heard"):
        table.add_column(col, overflow="fold")
    for w in workers:
        seen = w.last_seen_ago.ToTimedelta().total_seconds() if w.HasField("last_seen_ago") else 0
        # Heard: when the worker last proved it hears the coordinator (the echo of an ack). A
        # worker seen recently but not heard from is deaf (coordinator-to-worker traffic lost).
        heard = (
            f"{w.heard_ago.ToTimedelta().total_seconds():.1f}s ago"
            if w.HasField("heard_ago")
            else "not yet"
        )
        labels = ", ".join(f"{k}={v}" for k, v in sorted(w.labels.items()))
        table.add_row(
            cell(w.worker_id),
            cell(w.hostname),
            str(w.slots),
            str(w.free_slots),
            str(w.leases),
            # Leases granted beyond the free slots, waiting there; of how many it may get now.
            f"{w.queued}/{w.prefetch_depth}" if w.prefetch_limit else "-",
            "yes" if w.exec_enabled else "no",
            cell(", ".join(w.handlers)),
            cell(labels),
            worker_state(w),
            connected(w, now_ms),
            f"{seen:.1f}s ago",
            heard,
        )
    return table


def worker_state(w: admin_service_pb2.WorkerInfo) -> str:
    """``active``, ``draining``, or ``held back Ns (K leases lost in a row)``."""
    if w.HasField("held_back_for"):
        held = w.held_back_for.ToTimedelta().total_seconds()
        return f"held back {held:.1f}s ({w.lease_loss_streak} leases lost in a row)"
    return "draining" if w.draining else "active"


def revoked_table(revoked: Iterable[admin_service_pb2.RevokedWorker]) -> Table:
    """One row per revoked worker id for ``plait workers``."""
    table = Table(title="revoked", show_edge=False, pad_edge=False)
    for col in ("worker", "by", "at", "reason"):
        table.add_column(col, overflow="fold")
    for r in revoked:
        at = (
            r.revoked_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%SZ") if r.revoked_at.seconds else ""
        )
        # Text, not markup: the reason and the principal are other people's strings.
        table.add_row(cell(r.worker_id), cell(r.revoked_by), at, cell(r.reason, multiline=True))
    return table


EVENT_HEADER = (
    f"{'SEQ':>6}  {'HLC':<19}  {'TYPE':<22}  {'ACTION':<16}  {'STATE':<10}  {'WORKER':<10}  MESSAGE"
)


def event_message(e: workflow_pb2.HistoryEvent) -> str:
    """The human part of an event: its message, error, exit code or backoff (not escaped)."""
    parts = []
    if e.message:
        parts.append(e.message)
    if e.HasField("error") and e.error.message and e.error.message not in e.message:
        parts.append(e.error.message)
    if e.type == workflow_pb2.EVENT_TYPE_ACTION_FINISHED and e.exit_code:
        parts.append(f"exit {e.exit_code}")
    if e.type == workflow_pb2.EVENT_TYPE_ACTION_RETRY_SCHEDULED and e.HasField("backoff"):
        parts.append(f"backoff {e.backoff.ToTimedelta().total_seconds():g}s")
    if e.attempt and e.type in (
        workflow_pb2.EVENT_TYPE_ACTION_LEASED,
        workflow_pb2.EVENT_TYPE_ACTION_RETRY_SCHEDULED,
    ):
        parts.append(f"attempt {e.attempt} token {e.fencing_token}")
    if e.error_type:
        parts.append(f"type {e.error_type}")
    if e.reason:
        parts.append(f"[{event_reason(e.reason)}]")
    return "; ".join(parts)


def event_reason(reason: int) -> str:
    """``LEASE_EXPIRED`` for EVENT_REASON_LEASE_EXPIRED (a number if this client predates it)."""
    if reason in workflow_pb2.EventReason.values():
        return workflow_pb2.EventReason.Name(reason).removeprefix("EVENT_REASON_")  # type: ignore[arg-type]
    return str(reason)


def event_line(e: workflow_pb2.HistoryEvent) -> str:
    """One fixed-width line per event, in the columns of :data:`EVENT_HEADER`; escaped
    (:func:`clean`), so a message with newlines or escape sequences stays on its one line."""
    if e.action_state:
        state = action_state(e.action_state)
    elif e.workflow_state:
        state = workflow_state(e.workflow_state)
    else:
        state = ""
    return (
        f"{e.sequence:>6}  {hlc(e.hlc):<19}  {event_type(e.type):<22}  {clean(e.action_id):<16}  "
        f"{state:<10}  {clean(e.worker_id):<10}  {clean(event_message(e))}"
    ).rstrip()


def logs_text(attempts: Iterable[workflow_service_pb2.AttemptLogs], *, raw: bool = False) -> str:
    """Each attempt's stdout and stderr tails under a header line.

    The tails are escaped (:func:`clean`, keeping newlines and tabs) unless ``raw``: then they
    are exactly what the action wrote (``plait logs --raw``).
    """

    def tail(text: str) -> str:
        return text.rstrip("\n") if raw else clean(text, multiline=True).rstrip("\n")

    chunks = []
    for a in attempts:
        chunks.append(
            f"==> attempt {a.attempt} (token {a.fencing_token}, worker {clean(a.worker_id)},"
            f" {action_state(a.state)}) <=="
        )
        if a.stdout_tail:
            chunks.append("--- stdout ---")
            chunks.append(tail(a.stdout_tail))
        if a.stderr_tail:
            chunks.append("--- stderr ---")
            chunks.append(tail(a.stderr_tail))
    return "\n".join(chunks)
