"""The API's messages as the web UI's JSON (edge layer): plain dicts, enum names, milliseconds.

Only what the pages show, named as the proto names it (``action_id``, ``worker_id``), with
enums by their short names (``RUNNING``, ``ACTION_FINISHED``) and times as Unix milliseconds.
Nothing here decides anything: states, reasons ("why pending") and counts are the API's.
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from plait.v1 import admin_service_pb2 as apb
from plait.v1 import workflow_pb2 as pb

__all__ = [
    "ACTION_STATES",
    "WORKFLOW_STATES",
    "action_status",
    "dumps",
    "event",
    "spec_actions",
    "worker_info",
    "workflow_header",
]


def _names(enum: Any, prefix: str) -> dict[int, str]:
    return {v.number: v.name.removeprefix(prefix) for v in enum.DESCRIPTOR.values}


ACTION_STATES = _names(pb.ActionState, "ACTION_STATE_")
WORKFLOW_STATES = _names(pb.WorkflowState, "WORKFLOW_STATE_")
EVENT_TYPES = _names(pb.EventType, "EVENT_TYPE_")
EVENT_REASONS = _names(pb.EventReason, "EVENT_REASON_")
JOIN_KINDS = _names(pb.JoinKind, "JOIN_KIND_")
_ESCAPES = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"})


def dumps(value: Any) -> str:
    """Compact JSON with ``<``, ``>`` and ``&`` escaped, so that no text from a workflow can
    ever read as markup, whatever a browser makes of the response."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).translate(_ESCAPES)


def ms(ts: Timestamp) -> int | None:
    """A Timestamp in Unix milliseconds; None when unset."""
    if not ts.seconds and not ts.nanos:
        return None
    return ts.seconds * 1000 + ts.nanos // 1_000_000


def seconds(d: Duration) -> float:
    """A Duration in seconds."""
    return d.seconds + d.nanos / 1e9


def _error(status: Any) -> dict[str, Any]:
    return {"code": status.code, "message": status.message}


def workflow_header(w: pb.WorkflowStatus) -> dict[str, Any]:
    """A workflow's status without its actions."""
    return {
        "workflow_id": w.workflow_id,
        "name": w.name,
        "state": WORKFLOW_STATES.get(w.state, str(w.state)),
        "reason": w.reason,
        "submitted_ms": ms(w.submitted_at),
        "finished_ms": ms(w.finished_at),
        "counts": {k.removeprefix("ACTION_STATE_"): n for k, n in w.action_counts.items()},
        "trace_id": w.trace_id,
    }


def action_status(a: pb.ActionStatus) -> dict[str, Any]:
    """One action's status; ``reason`` is the API's (for a waiting action, why it waits)."""
    out: dict[str, Any] = {
        "action_id": a.action_id,
        "state": ACTION_STATES.get(a.state, str(a.state)),
        "attempt": a.attempt,
        "worker_id": a.worker_id,
        "reason": a.reason,
        "parent_id": a.parent_id,
        "exit_code": a.exit_code,
        "lease_losses": a.lease_losses,
        "outputs_bytes": a.outputs_bytes,
        "started_ms": ms(a.started_at),
        "finished_ms": ms(a.finished_at),
    }
    if a.HasField("error"):
        out["error"] = _error(a.error)
    return out


def _join(spec: pb.ActionSpec) -> dict[str, Any] | None:
    j = spec.join
    if not spec.HasField("join") or j.kind in (pb.JOIN_KIND_UNSPECIFIED, pb.JOIN_KIND_ALL):
        return {"kind": "ALL"} if len(spec.needs) > 1 else None
    return {
        "kind": JOIN_KINDS.get(j.kind, str(j.kind)),
        "count": j.at_least_count,
        "fraction": j.at_least_fraction,
    }


def spec_actions(spec: pb.WorkflowSpec) -> list[dict[str, Any]]:
    """The DAG as submitted: each action's id, needs, kind, join and fan-out."""
    out = []
    for a in spec.actions:
        kind = a.WhichOneof("kind") or ""
        item: dict[str, Any] = {"action_id": a.id, "needs": list(a.needs), "kind": kind}
        if kind == "handler":
            item["handler"] = a.handler
        join = _join(a)
        if join is not None:
            item["join"] = join
        if a.HasField("map"):
            item["map_over"] = a.map.over
        if a.HasField("pipeline"):
            item["pipeline_over"] = a.pipeline.over
            item["stages"] = [s.id for s in a.pipeline.stages]
        out.append(item)
    return out


def event(ev: pb.HistoryEvent) -> dict[str, Any]:
    """One history event, without its bulk (the spec, outputs and log tails)."""
    out: dict[str, Any] = {
        "sequence": ev.sequence,
        "type": EVENT_TYPES.get(ev.type, str(ev.type)),
        "recorded_ms": ms(ev.recorded_at),
    }
    if ev.action_id:
        out["action_id"] = ev.action_id
        out["action_state"] = ACTION_STATES.get(ev.action_state, str(ev.action_state))
        out["attempt"] = ev.attempt
    if ev.workflow_state:
        out["workflow_state"] = WORKFLOW_STATES.get(ev.workflow_state, str(ev.workflow_state))
    for name in ("worker_id", "lease_id", "message", "error_type"):
        value = getattr(ev, name)
        if value:
            out[name] = value
    if ev.reason:
        out["reason"] = EVENT_REASONS.get(ev.reason, str(ev.reason))
    if ev.HasField("error"):
        out["error"] = _error(ev.error)
    if ev.exit_code:
        out["exit_code"] = ev.exit_code
    return out


def worker_info(w: apb.WorkerInfo, coordinator_hlc_ms: int) -> dict[str, Any]:
    """A connected worker. ``clock_lead_ms`` is how far its last HLC stamp ran ahead of the
    coordinator's clock when that stamp arrived (0 for a clock behind: the worker's HLC
    merges the coordinator's stamps, so a lag does not show)."""
    seen = seconds(w.last_seen_ago)
    arrived_at = coordinator_hlc_ms - int(seen * 1000)
    return {
        "worker_id": w.worker_id,
        "hostname": w.hostname,
        "agent": w.agent,
        "labels": dict(w.labels),
        "slots": w.slots,
        "free_slots": w.free_slots,
        "leases": w.leases,
        "queued": w.queued,
        "handlers": list(w.handlers),
        "exec_enabled": w.exec_enabled,
        "draining": w.draining,
        "connected_ms": ms(w.connected_at),
        "last_seen_s": seen,
        "heard_s": seconds(w.heard_ago) if w.HasField("heard_ago") else None,
        "clock_lead_ms": max(0, w.hlc.physical_ms - arrived_at) if w.hlc.physical_ms else None,
        "clock_offset_rejections": w.clock_offset_rejections,
        "lease_loss_streak": w.lease_loss_streak,
        "held_back_s": seconds(w.held_back_for) if w.HasField("held_back_for") else None,
    }
