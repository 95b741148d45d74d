"""Validation of submitted workflow specs (pure core).

Everything is checked before anything is stored, and every problem is reported at once as a
``google.rpc.BadRequest`` field violation whose field path names the offending field, e.g.
``spec.actions[3].needs[0]``. Cycles are reported with their path (``a -> b -> a``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from plait.coordinator.config import Limits
from plait.errors import FieldViolation, InvalidArgumentError
from plait.ids import describe_id
from plait.v1 import workflow_pb2

MAX_ATTEMPTS = 100
MAX_NAME = 128
MAX_IDEMPOTENCY_KEY = 256


def _duration_violation(path: str, d: object, present: bool) -> Iterator[FieldViolation]:
    if present and (d.seconds < 0 or (d.seconds == 0 and d.nanos <= 0)):  # type: ignore[attr-defined]
        yield FieldViolation(path, "must be > 0")


def _retry_violations(path: str, r: workflow_pb2.RetryPolicy) -> Iterator[FieldViolation]:
    if r.max_attempts > MAX_ATTEMPTS:
        yield FieldViolation(
            f"{path}.max_attempts",
            f"is {r.max_attempts}; must be between 1 and {MAX_ATTEMPTS} (0 inherits the default)",
        )
    if r.backoff_multiplier and r.backoff_multiplier < 1:
        yield FieldViolation(f"{path}.backoff_multiplier", "must be >= 1")
    if r.HasField("jitter") and not 0 <= r.jitter <= 1:
        yield FieldViolation(f"{path}.jitter", f"is {r.jitter}; must be between 0 and 1")
    for name in ("initial_backoff", "max_backoff"):
        d = getattr(r, name)
        if r.HasField(name) and (d.seconds < 0 or d.nanos < 0):
            yield FieldViolation(f"{path}.{name}", "must be >= 0")


def _json_violation(path: str, text: str, limit: int) -> Iterator[FieldViolation]:
    if not text:
        return
    if len(text) > limit:
        yield FieldViolation(path, f"is {len(text)} bytes; the limit max_input_bytes is {limit}")
        return
    try:
        json.loads(text)
    except ValueError as e:
        yield FieldViolation(path, f"is not valid JSON: {e}")


def _action_violations(
    i: int, a: workflow_pb2.ActionSpec, limits: Limits, maps_a_need: bool = False
) -> Iterator[FieldViolation]:
    yield from _spec_violations(f"spec.actions[{i}]", a, limits, maps_a_need)


def _spec_violations(
    path: str, a: workflow_pb2.ActionSpec, limits: Limits, maps_a_need: bool = False
) -> Iterator[FieldViolation]:
    why = describe_id(a.id)
    if why:
        yield FieldViolation(f"{path}.id", why)
    kind = a.WhichOneof("kind")
    if a.HasField("pipeline"):
        yield from _pipeline_violations(path, a, limits)
        if kind is not None:
            yield FieldViolation(path, f"action {a.id!r}: a pipeline runs its stages, not {kind}")
    elif kind is None:
        yield FieldViolation(
            f"{path}", f"action {a.id!r}: exactly one of exec or handler is needed"
        )
    elif kind == "exec" and not a.exec.argv:
        yield FieldViolation(f"{path}.exec.argv", f"action {a.id!r}: argv must not be empty")
    elif kind == "handler" and describe_id(a.handler):
        yield FieldViolation(f"{path}.handler", f"handler name {describe_id(a.handler)}")
    if len(a.needs) > limits.max_fan_in:
        yield FieldViolation(
            f"{path}.needs",
            f"has {len(a.needs)} entries; the limit max_fan_in is {limits.max_fan_in}",
        )
    # Only what is set is checked: a 10,000-action submit is validated on the request path.
    for name in ("timeout", "queue_timeout", "heartbeat_timeout"):
        if a.HasField(name):
            yield from _duration_violation(f"{path}.{name}", getattr(a, name), True)
    if _has_pattern(a):
        yield from _pattern_violations(path, a, maps_a_need)
    if a.HasField("retry"):
        yield from _retry_violations(f"{path}.retry", a.retry)
    if a.input_json:
        yield from _json_violation(f"{path}.input_json", a.input_json, limits.max_input_bytes)
    for key in a.env:
        if not key or "=" in key or "\0" in key:
            yield FieldViolation(f"{path}.env", f"bad variable name {key!r}")


def _has_pattern(a: workflow_pb2.ActionSpec) -> bool:
    return bool(
        a.priority
        or a.resources
        or a.semaphores
        or a.HasField("join")
        or a.HasField("map")
        or a.HasField("pipeline")
    )


def _join_violations(
    path: str, a: workflow_pb2.ActionSpec, maps_a_need: bool
) -> Iterator[FieldViolation]:
    j = a.join
    n = len(a.needs)
    if j.kind == workflow_pb2.JOIN_KIND_AT_LEAST:
        if bool(j.at_least_count) == bool(j.at_least_fraction):
            yield FieldViolation(
                f"{path}.join", "at_least needs exactly one of at_least_count or at_least_fraction"
            )
        elif j.at_least_count and not (
            a.HasField("map") or maps_a_need or 1 <= j.at_least_count <= n
        ):
            yield FieldViolation(
                f"{path}.join.at_least_count", f"is {j.at_least_count}; must be 1 to {n} (needs)"
            )
        elif j.at_least_fraction and not 0 < j.at_least_fraction <= 1:
            yield FieldViolation(
                f"{path}.join.at_least_fraction", f"is {j.at_least_fraction}; must be in (0, 1]"
            )
    elif j.at_least_count or j.at_least_fraction:
        yield FieldViolation(f"{path}.join", "at_least_count/fraction need kind AT_LEAST")


def _pattern_violations(
    path: str, a: workflow_pb2.ActionSpec, maps_a_need: bool = False
) -> Iterator[FieldViolation]:
    """Joins, map, resources, semaphores, priority.

    ``maps_a_need``: the action needs a map action, whose items its join counts.
    """
    if not -1000 <= a.priority <= 1000:
        yield FieldViolation(f"{path}.priority", f"is {a.priority}; must be -1000 to 1000")
    yield from _join_violations(path, a, maps_a_need)
    for name in ("map", "pipeline"):
        if a.HasField(name):
            over = getattr(a, name).over
            need_id = over.partition(".")[0]
            if need_id not in a.needs:
                yield FieldViolation(
                    f"{path}.{name}.over",
                    f"{over!r} must start with one of the needs ({need_id!r})",
                )
    if a.HasField("map") and a.HasField("pipeline"):
        yield FieldViolation(path, "an action is a map or a pipeline, not both")
    for name, amount in a.resources.items():
        if describe_id(name) or not amount >= 0:
            yield FieldViolation(
                f"{path}.resources[{name!r}]", "needs a name of [A-Za-z0-9_.-] and an amount >= 0"
            )
    for i, req in enumerate(a.semaphores):
        why = describe_id(req.name)
        if why:
            yield FieldViolation(f"{path}.semaphores[{i}].name", why)
        if (req.permits or 1) > (req.capacity or 1):
            yield FieldViolation(
                f"{path}.semaphores[{i}].permits",
                f"is {req.permits}; more than the capacity {req.capacity or 1}",
            )


def _pipeline_violations(
    path: str, a: workflow_pb2.ActionSpec, limits: Limits
) -> Iterator[FieldViolation]:
    stages = a.pipeline.stages
    if not stages:
        yield FieldViolation(f"{path}.pipeline.stages", "a pipeline needs at least one stage")
    seen: set[str] = set()
    for k, stage in enumerate(stages):
        where = f"{path}.pipeline.stages[{k}]"
        why = describe_id(stage.id)
        if why:
            yield FieldViolation(f"{where}.id", why)
        if stage.id in seen:
            yield FieldViolation(f"{where}.id", f"duplicate stage id {stage.id!r}")
        seen.add(stage.id)
        if stage.needs or stage.HasField("map") or stage.HasField("pipeline"):
            yield FieldViolation(where, "a stage has no needs, map or pipeline of its own")
        else:
            yield from _spec_violations(where, stage, limits)


def find_cycle(ids: list[str], needs: dict[str, list[str]]) -> list[str] | None:
    """A cycle as a path ``[a, b, a]``, or None. Iterative DFS (deep DAGs do not recurse)."""
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(ids, white)
    for root in ids:
        if color[root] != white:
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        color[root] = grey
        while stack:
            node, idx = stack[-1]
            deps = needs[node]
            if idx == len(deps):
                color[node] = black
                stack.pop()
                continue
            stack[-1] = (node, idx + 1)
            nxt = deps[idx]
            if color.get(nxt) == grey:
                path = [n for n, _ in stack]
                start = path.index(nxt)
                # `needs` edges point upstream; show the cycle in execution order.
                cycle = [*path[start:], nxt]
                cycle.reverse()
                return cycle
            if color.get(nxt) == white:
                color[nxt] = grey
                stack.append((nxt, 0))
    return None


def longest_chain(ids: list[str], needs: dict[str, list[str]]) -> int:
    """Number of actions on the longest needs-chain (the DAG must be acyclic)."""
    depth: dict[str, int] = {}
    for root in ids:
        if root in depth:
            continue
        stack = [root]
        while stack:
            node = stack[-1]
            pending = [d for d in needs[node] if d not in depth]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            depth[node] = 1 + max((depth[d] for d in needs[node]), default=0)
    return max(depth.values(), default=0)


def _needs_violations(
    spec: workflow_pb2.WorkflowSpec, index: dict[str, int], v: list[FieldViolation]
) -> dict[str, list[str]]:
    """Checks every edge; returns the needs-graph of known ids (for the cycle search)."""
    needs: dict[str, list[str]] = {}
    for i, a in enumerate(spec.actions):
        seen: set[str] = set()
        for j, dep in enumerate(a.needs):
            where = f"spec.actions[{i}].needs[{j}]"
            if dep == a.id:
                v.append(FieldViolation(where, f"action {a.id!r} needs itself: {a.id} -> {a.id}"))
            elif dep not in index:
                v.append(FieldViolation(where, f"action {a.id!r} needs unknown action {dep!r}"))
            elif dep in seen:
                v.append(FieldViolation(where, f"action {a.id!r} lists need {dep!r} twice"))
            seen.add(dep)
        needs.setdefault(a.id, [d for d in a.needs if d in index and d != a.id])
    return needs


def validate_submit(spec: workflow_pb2.WorkflowSpec, idempotency_key: str, limits: Limits) -> None:
    """Raises :class:`InvalidArgumentError` listing every problem with a submission."""
    v: list[FieldViolation] = []
    if len(spec.name) > MAX_NAME or any(ord(c) < 32 for c in spec.name):
        v.append(FieldViolation("spec.name", f"must be at most {MAX_NAME} printable characters"))
    if len(idempotency_key) > MAX_IDEMPOTENCY_KEY or any(ord(c) < 32 for c in idempotency_key):
        v.append(
            FieldViolation(
                "idempotency_key", f"must be at most {MAX_IDEMPOTENCY_KEY} printable characters"
            )
        )
    n = len(spec.actions)
    if n == 0:
        v.append(FieldViolation("spec.actions", "the workflow is empty: at least one action"))
    if n > limits.max_actions:
        raise InvalidArgumentError(
            [
                FieldViolation(
                    "spec.actions",
                    f"has {n} actions; the limit max_actions is {limits.max_actions}",
                )
            ]
        )
    v.extend(_duration_violation("spec.deadline", spec.deadline, spec.HasField("deadline")))
    if spec.HasField("defaults"):
        d = spec.defaults
        v.extend(_duration_violation("spec.defaults.timeout", d.timeout, d.HasField("timeout")))
        if d.HasField("retry"):
            v.extend(_retry_violations("spec.defaults.retry", d.retry))
    index: dict[str, int] = {}
    edges = 0
    mapped = {a.id for a in spec.actions if a.HasField("map")}
    for i, a in enumerate(spec.actions):
        v.extend(_action_violations(i, a, limits, any(n in mapped for n in a.needs)))
        if a.id in index:
            v.append(
                FieldViolation(
                    f"spec.actions[{i}].id",
                    f"duplicate action id {a.id!r} (first at actions[{index[a.id]}])",
                )
            )
        else:
            index[a.id] = i
        edges += len(a.needs)
    if edges > limits.max_edges:
        v.append(
            FieldViolation(
                "spec.actions", f"has {edges} edges; the limit max_edges is {limits.max_edges}"
            )
        )
    needs = _needs_violations(spec, index, v)
    if v:
        raise InvalidArgumentError(v)
    ids = list(index)
    cycle = find_cycle(ids, needs)
    if cycle:
        raise InvalidArgumentError(
            [
                FieldViolation(
                    f"spec.actions[{index[cycle[0]]}].needs", "cycle: " + " -> ".join(cycle)
                )
            ]
        )
    depth = longest_chain(ids, needs)
    if depth > limits.max_depth:
        raise InvalidArgumentError(
            [
                FieldViolation(
                    "spec.actions",
                    f"longest chain has {depth} actions; the limit max_depth is {limits.max_depth}",
                )
            ]
        )
