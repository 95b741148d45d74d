"""Joins, failure propagation, map fan-out and early endings (pure core, join aggregate).

When an action ends, each dependent still PENDING counts the outcome against its join:

* ``all`` (default): ready when every need succeeded; skipped as soon as one did not;
* ``any``: ready at the first success; skipped when every need ended without one;
* ``at_least`` M (or a fraction of N, rounded up): ready at M successes; skipped once fewer
  than M can still succeed.

A ``map`` action is a join over children made at runtime: when its own needs are met it reads
the list an upstream action produced and becomes one child per item (``<id>.<index>``), then
ends when its children's join is met (SUCCEEDED, outputs ``{"items": [...]}``) or can no
longer be (FAILED). ``cancel_remaining`` cancels what a met join no longer needs;
``fail_fast`` ends the whole workflow at the first failure.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

from google.rpc import code_pb2, status_pb2

from plait.coordinator.core import transitions as t
from plait.coordinator.core.model import ActionRecord, Outcome, WorkflowRecord
from plait.coordinator.core.outputs import COPIED_COLLECTION_BYTES, collected_bytes
from plait.spec.rules import fans_out
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb

if TYPE_CHECKING:
    from plait.coordinator.core.state import SchedulerState

E = pb  # EVENT_TYPE_* constants
READY, WAITING, IMPOSSIBLE = "ready", "waiting", "impossible"

NOT_NEEDED = "not needed: "  # words only: EVENT_REASON_NOT_NEEDED is what is matched


def join_of(a: ActionRecord) -> pb.JoinPolicy:
    """The action's join; a map without one takes the join of a dependent that needs only it,
    so ``index: {needs: [resize], join: {at_least: 0.9}}`` counts resize's items (DESIGN §8)."""
    if a.spec.join.kind != pb.JOIN_KIND_UNSPECIFIED or a.children is None:
        return a.spec.join
    for d in a.dependents:
        if len(d.needs) == 1 and d.spec.join.kind != pb.JOIN_KIND_UNSPECIFIED:
            return d.spec.join
    return a.spec.join


def required(a: ActionRecord, n: int) -> int:
    """How many of ``n`` needs (or children) must succeed under the action's join."""
    j = join_of(a)
    if j.kind == pb.JOIN_KIND_ANY:
        return min(1, n)
    if j.kind == pb.JOIN_KIND_AT_LEAST:
        if j.at_least_fraction:
            return min(n, math.ceil(j.at_least_fraction * n - 1e-9))
        return min(n, j.at_least_count)
    return n


def verdict(a: ActionRecord) -> str:
    """Whether ``a``'s join is met, still open, or can no longer be met."""
    n = len(a.children) if a.children is not None else len(a.needs)
    need = required(a, n)
    succeeded = n - a.unmet
    if succeeded >= need:
        return READY
    if n - a.failed_needs < need:
        return IMPOSSIBLE
    return WAITING


def _ended_word(a: ActionRecord) -> str:
    return t.S.Name(a.state).removeprefix("ACTION_STATE_")  # type: ignore[arg-type]


def propagate(st: SchedulerState, ended: ActionRecord, out: Outcome) -> None:
    """Decides what ``ended``'s outcome (already counted in its dependents' joins when its
    event was applied) means for each dependent: ready it, skip it, or settle a map."""
    wf = ended.workflow
    stack = [ended]
    while stack:
        x = stack.pop()
        for d in x.dependents:
            if wf.cancel_requested or wf.failing:
                continue  # the workflow is being ended: its own loop ends every action
            if d.children is not None:  # a running map action: x is one of its children
                if d.state == t.RUNNING:
                    _settle_map(st, d, out)
                continue
            if d.state != t.PENDING:
                continue
            v = verdict(d)
            if v == READY:
                if fans_out(d.spec):
                    expand(st, d, out)
                else:
                    st.make_ready(d, E.EVENT_TYPE_ACTION_READY)
                if d.spec.join.cancel_remaining:
                    cancel_remaining(st, d, d.needs, out)
            elif v == IMPOSSIBLE:
                why = _skip_reason(d, x)
                skip = status_pb2.Status(code=code_pb2.ABORTED, message=why)
                st.terminal(
                    d,
                    t.SKIPPED,
                    E.EVENT_TYPE_ACTION_SKIPPED,
                    E.EVENT_REASON_NEED_FAILED,
                    skip,
                    why,
                    {},
                )
                stack.append(d)


def _skip_reason(d: ActionRecord, last: ActionRecord) -> str:
    if d.spec.join.kind in (pb.JOIN_KIND_UNSPECIFIED, pb.JOIN_KIND_ALL):
        return f"needs {last.spec.id!r}, which ended {_ended_word(last)}"
    failed = [n.spec.id for n in d.needs if n.state in t.TERMINAL and n.state != t.SUCCEEDED]
    n = len(d.needs)
    return (
        f"join needs {required(d, n)} of {n} to succeed; {len(failed)} did not"
        f" ({', '.join(failed[:10])}{'…' if len(failed) > 10 else ''})"
    )


def cancel_remaining(
    st: SchedulerState, joined: ActionRecord, others: list[ActionRecord], out: Outcome
) -> None:
    """Cancels the needs (or children) ``joined`` no longer waits for (NOT_NEEDED)."""
    why = f"{NOT_NEEDED}the join of {joined.spec.id!r} was met"
    for n in others:
        if n.state not in t.TERMINAL:
            end_early(st, n, why, E.EVENT_REASON_NOT_NEEDED, out)


def end_early(st: SchedulerState, a: ActionRecord, why: str, code: int, out: Outcome) -> None:
    """Cancels one non-terminal action for ``code`` (an EventReason; ``why`` in words),
    fencing its leases (two, when hedged: they end when the cancellation is applied)."""
    for lease in (a.lease, a.hedge):
        if lease is not None and lease.worker.connected:
            out.cancel(lease.worker.session_id, lease, wpb.CANCEL_REASON_USER, why)
    if a.children is not None:
        for c in a.children:
            if c.state not in t.TERMINAL:
                end_early(st, c, why, code, out)
        if a.state in t.TERMINAL:
            return
    err = status_pb2.Status(code=code_pb2.CANCELLED, message=why)
    st.finish_action(
        a, t.CANCELLED, E.EVENT_TYPE_ACTION_CANCELLED, out, why=code, error=err, reason=why
    )


def fail_fast(st: SchedulerState, wf: WorkflowRecord, failed: ActionRecord, out: Outcome) -> None:
    """Ends a fail_fast workflow at its first failure: everything still open is cancelled."""
    why = f"fail_fast: {failed.spec.id} {_ended_word(failed)}"
    end_workflow_early(st, wf, why, E.EVENT_REASON_FAIL_FAST, out)


def end_workflow_early(
    st: SchedulerState, wf: WorkflowRecord, why: str, code: int, out: Outcome
) -> None:
    """Cancels every open action of ``wf`` for ``code``; the workflow then ends FAILED."""
    if wf.failing or wf.cancel_requested:
        return
    wf.failing = why
    for a in list(wf.actions.values()):
        if a.state not in t.TERMINAL:
            end_early(st, a, why, code, out)


# ---- map ----------------------------------------------------------------------------------


def fan_over(a: ActionRecord) -> tuple[str, int]:
    """``over`` and ``max_items`` of a map or pipeline action."""
    if a.spec.HasField("pipeline"):
        return a.spec.pipeline.over, a.spec.pipeline.max_items
    return a.spec.map.over, a.spec.map.max_items


def items_of(st: SchedulerState, a: ActionRecord) -> list[object] | str:
    """The list ``over`` names, or why it cannot be read."""
    over = fan_over(a)[0]
    need_id, _, path = over.partition(".")
    src = next((n for n in a.needs if n.spec.id == need_id), None)
    if src is None:
        return f"map.over {over!r}: {need_id!r} is not one of its needs"
    if src.state != t.SUCCEEDED:
        return f"map.over {over!r}: {need_id!r} ended {_ended_word(src)}"
    value: object = json.loads(st.outputs.text(src) or "{}")
    for key in path.split(".") if path else []:
        if not isinstance(value, dict) or key not in value:
            return f"map.over {over!r}: the outputs of {need_id!r} have no {key!r}"
        value = value[key]
    if not isinstance(value, list):
        return f"map.over {over!r}: expected a list, got {type(value).__name__}"
    return value


def expand(st: SchedulerState, a: ActionRecord, out: Outcome) -> None:
    """Turns a map action whose needs are met into one child per item (journalled)."""
    items = items_of(st, a)
    over, max_items = fan_over(a)
    limit = max_items or st.max_map_items
    if isinstance(items, list) and len(items) > limit:
        items = f"{over!r}: {len(items)} items; the limit max_items is {limit}"
    if isinstance(items, str):
        err = status_pb2.Status(code=code_pb2.FAILED_PRECONDITION, message=items)
        st.finish_action(
            a,
            t.FAILED,
            E.EVENT_TYPE_ACTION_FINISHED,
            out,
            why=E.EVENT_REASON_MAP_ITEMS,
            error=err,
            reason=items,
        )
        return
    st.emit(  # applying it makes the children (make_children)
        a.workflow,
        E.EVENT_TYPE_ACTION_MAPPED,
        a,
        action_state=t.RUNNING,
        outputs_json=json.dumps(items),
        message=f"{len(items)} children",
    )
    _settle_map(st, a, out)


def make_children(
    st: SchedulerState, a: ActionRecord, items: list[str], when: float | None = None
) -> None:
    """Creates (and readies) a map action's children: applying its ACTION_MAPPED.

    ``when``: the time the children became ready (their queue timeouts run from it); now,
    unless replay says when the ACTION_MAPPED event happened.
    """
    at = st.now if when is None else when
    if a.spec.HasField("pipeline"):
        make_pipeline(st, a, items, at)
        return
    wf = a.workflow
    spec = a.spec
    a.children = []
    a.unmet, a.failed_needs = len(items), 0
    for i, item in enumerate(items):
        child_spec = pb.ActionSpec()
        child_spec.CopyFrom(spec)
        child_spec.id = f"{spec.id}.{i}"
        del child_spec.needs[:]
        child_spec.ClearField("map")
        child_spec.ClearField("join")
        child = ActionRecord(
            workflow=wf,
            spec=child_spec,
            slots=child_spec.slots or 1,
            parent=a,
            item_json=item,
            priority=a.priority,
        )
        child.needs = a.needs  # its inputs show the parent's needs
        child.dependents = [a]
        wf.actions[child_spec.id] = child
        a.children.append(child)
        wf.remaining += 1
        st.set_state(child, t.READY)
        st.ready_up(child, at)


def make_pipeline(st: SchedulerState, a: ActionRecord, items: list[str], at: float) -> None:
    """One chain of stage actions per item, ``<id>.<index>.<stage>``; the pipeline joins over
    each chain's last stage."""
    wf = a.workflow
    stages = a.spec.pipeline.stages
    a.children = []
    a.unmet, a.failed_needs = len(items), 0
    for i, item in enumerate(items):
        prev: ActionRecord | None = None
        first: ActionRecord | None = None
        for k, stage in enumerate(stages):
            spec = pb.ActionSpec()
            spec.CopyFrom(stage)
            spec.id = f"{a.spec.id}.{i}.{stage.id}"
            del spec.needs[:]
            s = ActionRecord(
                workflow=wf,
                spec=spec,
                slots=spec.slots or 1,
                parent=a,
                item_json=item,
                priority=spec.priority or a.priority,
                stage=k,
            )
            s.first = first or s
            first = s.first
            wf.actions[spec.id] = s
            wf.remaining += 1
            if prev is None:
                s.needs = a.needs  # inputs show the pipeline's needs
                st.set_state(s, t.READY)
                st.ready_up(s, at)
            else:
                s.needs = [prev]
                s.unmet = 1
                prev.dependents.append(s)
            prev = s
        assert prev is not None
        prev.last_stage = True
        prev.dependents.append(a)
        a.children.append(prev)


def close_item(x: ActionRecord) -> None:
    """A pipeline item's last stage ended: its place in flight is free again."""
    if x.last_stage and x.first is not None and x.first.opened and x.parent is not None:
        x.parent.in_flight -= 1


def _settle_map(st: SchedulerState, a: ActionRecord, out: Outcome) -> None:
    """Ends a running map action once its children's join is met or impossible."""
    assert a.children is not None
    v = verdict(a)
    done = all(c.state in t.TERMINAL for c in a.children)
    cancel = join_of(a).cancel_remaining
    if v == READY and (done or cancel or not a.children):
        if cancel:
            cancel_remaining(st, a, a.children, out)
            if a.state in t.TERMINAL:
                return  # a cancelled child's propagation settled the map already
        # Copied into the event up to a bound; past it not copied at all: the outputs are the
        # children's, put together when read (core.outputs), as replay finds them again.
        items = [c if c.state == t.SUCCEEDED else None for c in a.children]
        copy = collected_bytes(items) <= COPIED_COLLECTION_BYTES
        outputs = st.outputs.collect(items) if copy else ""
        st.finish_action(a, t.SUCCEEDED, E.EVENT_TYPE_ACTION_FINISHED, out, outputs_json=outputs)
    elif v == IMPOSSIBLE:
        n = len(a.children)
        what = "items" if a.spec.HasField("pipeline") else "children"
        kind = "pipeline" if a.spec.HasField("pipeline") else "map"
        why = f"{kind}: {a.failed_needs} of {n} {what} did not succeed (needs {required(a, n)})"
        # Every open stage of every item (a map's children are its only stages).
        for c in [x for x in a.workflow.actions.values() if x.parent is a]:
            if c.state not in t.TERMINAL:
                end_early(st, c, why, E.EVENT_REASON_PARENT_FAILED, out)
        if a.state not in t.TERMINAL:
            err = status_pb2.Status(code=code_pb2.ABORTED, message=why)
            st.finish_action(
                a,
                t.FAILED,
                E.EVENT_TYPE_ACTION_FINISHED,
                out,
                why=E.EVENT_REASON_CHILDREN_FAILED,
                error=err,
                reason=why,
            )
