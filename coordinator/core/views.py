"""Read-only views of the core's state for the API (pure core)."""

from __future__ import annotations

import itertools
import math
from datetime import timedelta

from plait.coordinator.core import limits, liveness, prefetch
from plait.coordinator.core import transitions as t
from plait.coordinator.core.model import ActionRecord, WorkerRecord, WorkflowRecord
from plait.coordinator.core.state import STATE_NAME, SchedulerState
from plait.jsonlimits import utf8_len
from plait.tracecontext import trace_id_for
from plait.v1 import admin_service_pb2 as apb
from plait.v1 import workflow_pb2 as pb


def workflow_status(
    st: SchedulerState, wf: WorkflowRecord, *, with_actions: bool = True
) -> pb.WorkflowStatus:
    """The API view of a workflow (with every action unless ``with_actions`` is false).

    Unbounded in size: the API pages it (:func:`workflow_page`); this is for the core's own
    callers and ListWorkflows (no actions).
    """
    out = _header(wf)
    if with_actions:
        live = _live(st)
        for a in wf.actions.values():
            s = _add_action(st, out, a, live)
            if a.outputs_bytes:
                s.outputs_json = st.outputs.text(a)
    return out


def workflow_page(
    st: SchedulerState,
    wf: WorkflowRecord,
    start: int,
    page_size: int,
    budget: int,
    states: frozenset[int] = frozenset(),
) -> tuple[pb.WorkflowStatus, int]:
    """One page of a workflow's status that serializes to at most ``budget`` bytes.

    Actions from index ``start`` (spec order, then map children as they were made: actions are
    never removed, so indexes stay put), only those in ``states`` when it is not empty, at most
    ``page_size`` of them (0: no count limit). The page ends before the first action that would
    not fit; an action's outputs go in whole or not at all: those that could never fit a page
    are left out (``outputs_truncated``). Returns the page and the index of the next page's
    first action (``len(actions)``: done).
    """
    limit = budget - _PAGE_OVERHEAD
    out = _header(wf)
    if out.ByteSize() > limit // 2:  # a workflow reason naming a great many failures
        out.reason = shorten(out.reason, limit // 8)
    empty = used = out.ByteSize()
    live = _live(st)
    i = start
    shown = 0
    for a in itertools.islice(wf.actions.values(), start, None):
        if page_size and shown >= page_size:
            break
        if states and a.state not in states:
            i += 1
            continue
        s = _add_action(st, out, a, live)
        size = _fit(s, limit // 4) + _FIELD_OVERHEAD
        outputs = a.outputs_bytes + _FIELD_OVERHEAD if a.outputs_bytes else 0
        fits = used + size + outputs <= limit
        if not fits and shown and (used + size > limit or empty + size + outputs <= limit):
            del out.actions[-1]  # it fits (better: whole) on the next page
            break
        if fits and outputs:
            s.outputs_json = st.outputs.text(a)
            size += outputs
        elif outputs:  # they would not fit any page
            s.outputs_truncated = True
        used += size
        shown += 1
        i += 1
    return out, i


# Bytes a repeated or string field adds around its contents (tag, length); generous.
_FIELD_OVERHEAD = 8
# Room for the response around the workflow status (its own tag and length, the HLC, the token).
_PAGE_OVERHEAD = 256


def shorten(text: str, limit: int) -> str:
    """``text`` cut to about ``limit`` characters, saying how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [{utf8_len(text)} bytes; shortened]"


def _fit(s: pb.ActionStatus, limit: int) -> int:
    """The serialized size of ``s``, after shortening its texts if they pass ``limit``."""
    size = s.ByteSize()
    if size > limit:
        s.reason = shorten(s.reason, limit // 4)
        if s.HasField("error"):
            s.error.message = shorten(s.error.message, limit // 4)
            del s.error.details[:]
        size = s.ByteSize()
    return size


def _header(wf: WorkflowRecord) -> pb.WorkflowStatus:
    out = pb.WorkflowStatus(
        workflow_id=wf.workflow_id,
        name=wf.spec.name,
        state=wf.state,  # type: ignore[arg-type]
        reason=wf.reason,
        idempotency_key=wf.idempotency_key,
        trace_id=f"{trace_id_for(wf.workflow_id, wf.traceparent):032x}",
    )
    out.submitted_at.FromMilliseconds(wf.submitted_wall_ms)
    out.submitted_hlc.physical_ms, out.submitted_hlc.logical = wf.submitted_hlc
    if wf.finished_wall_ms:
        out.finished_at.FromMilliseconds(wf.finished_wall_ms)
        out.finished_hlc.physical_ms, out.finished_hlc.logical = wf.finished_hlc
    counts = out.action_counts
    for state, n in wf.counts().items():  # kept up to date: O(1), never a recount
        counts[STATE_NAME[state]] = n
    return out


def _live(st: SchedulerState) -> list[WorkerRecord]:
    return [w for w in st.workers.values() if w.connected and not w.draining]


def _add_action(
    st: SchedulerState, out: pb.WorkflowStatus, a: ActionRecord, live: list[WorkerRecord]
) -> pb.ActionStatus:
    """Appends ``a``'s status to ``out`` without its outputs (``outputs_bytes``: their size)."""
    s = out.actions.add(
        action_id=a.spec.id,
        state=a.state,
        attempt=a.attempt,
        fencing_token=a.token,
        worker_id=a.worker_id,
        exit_code=a.exit_code,
        reason=a.reason or why_waiting(st, a, live),
        lease_losses=a.lease_losses,
        parent_id=a.parent.spec.id if a.parent is not None else "",
        outputs_bytes=a.outputs_bytes,
    )
    if a.error is not None:
        s.error.CopyFrom(a.error)
    wall = a.started_wall_ms
    if wall:
        s.started_at.seconds, s.started_at.nanos = wall // 1000, wall % 1000 * 1_000_000
    wall = a.finished_wall_ms
    if wall:
        s.finished_at.seconds, s.finished_at.nanos = wall // 1000, wall % 1000 * 1_000_000
    return s


def why_waiting(st: SchedulerState, a: ActionRecord, live: list[WorkerRecord]) -> str:
    """Why a non-terminal action is where it is, in words an operator can act on.

    ``live`` is the connected, non-draining workers (computed once per view).
    """
    if a.state == t.PENDING:
        waiting = [n.spec.id for n in a.needs if n.state != t.SUCCEEDED]
        shown = ", ".join(waiting[:5]) + (
            f" and {len(waiting) - 5} more" if len(waiting) > 5 else ""
        )
        return f"waiting for needs: {shown}"
    if a.state == t.READY:
        if a.not_before > st.now:
            return f"retry backoff: {a.not_before - st.now:.1f}s left"
        if not live:
            return "waiting for a worker: none connected"
        can = [w for w in live if limits.could_ever_run(a, w)]
        if not can:
            need = f"handler {a.spec.handler!r}" if a.spec.handler else "exec"
            sel = dict(a.spec.selector)
            res = {k: v for k, v in a.spec.resources.items() if v}
            return (
                f"no connected worker can run it ({need}, {a.slots} slots"
                + (f", labels {sel}" if sel else "")
                + (", resources " + ", ".join(f"{k}={v:g}" for k, v in res.items()) if res else "")
                + ")"
            )
        return _what_is_full(st, a)
    if a.state in (t.LEASED, t.RUNNING):
        return f"attempt {a.attempt} on {a.worker_id}"
    return ""  # terminal actions carry their own reason


def _what_is_full(st: SchedulerState, a: ActionRecord) -> str:
    """Names the limit a ready action that some worker could run is waiting on."""
    wf = a.workflow
    if wf.spec.max_parallel and wf.leased >= wf.spec.max_parallel:
        return f"workflow max_parallel {wf.spec.max_parallel} reached"
    p = a.parent
    if p is not None and p.spec.map.max_parallel and p.running_children >= p.spec.map.max_parallel:
        return f"map max_parallel {p.spec.map.max_parallel} of {p.spec.id!r} reached"
    full = limits.full_semaphore(st, a)
    if full is not None:
        name, cap, held = full
        return f"waiting for semaphore {name!r} ({held} of {cap} permits held)"
    if a.spec.resources:
        return f"waiting for a worker with free slots and resources {dict(a.spec.resources)}"
    return "waiting for a free slot"


def worker_info(st: SchedulerState, w: WorkerRecord) -> apb.WorkerInfo:
    """The API view of a worker."""
    info = apb.WorkerInfo(
        worker_id=w.worker_id,
        labels=w.labels,
        slots=w.slots,
        free_slots=max(0, w.free),
        worker_free_slots=w.reported_free,
        queued=prefetch.queued(w),
        prefetch_depth=w.depth,
        prefetch_limit=w.prefetch,
        handlers=sorted(w.handlers),
        exec_enabled=w.exec_enabled,
        leases=len(w.leases),
        clock_offset_rejections=w.clock_rejections,
        draining=w.draining,
        hostname=w.hello.hostname,
        agent=w.hello.agent,
    )
    info.connected_at.FromMilliseconds(w.connected_at_wall_ms)
    info.last_seen_ago.FromTimedelta(timedelta(seconds=max(0.0, st.now - w.last_seen)))
    info.hlc.physical_ms, info.hlc.logical = w.last_hlc
    if w.proof_at > -math.inf:
        info.heard_ago.FromTimedelta(timedelta(seconds=max(0.0, st.now - w.proof_at)))
    streak = st.streaks.get(w.worker_id)
    if streak is not None:
        info.lease_loss_streak = streak.losses
        held = liveness.held_back_for(st, w.worker_id)
        if held > 0:
            info.held_back_for.FromTimedelta(timedelta(seconds=held))
    return info
