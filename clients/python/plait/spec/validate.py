"""Validation of a workflow spec as the coordinator accepts it (SDK layer: plait.spec).

The one implementation of every check a submission must pass: the coordinator runs it on each
``SubmitWorkflow`` (its core imports it from here) and ``plait validate`` runs it locally, so a
file that validates is a file the coordinator (with default limits) accepts. Pure: protobuf in,
:class:`InvalidArgumentError` out; nothing here does I/O.

Everything is checked before anything is stored, and every problem is reported at once as a
``google.rpc.BadRequest`` field violation whose field path names the offending field, e.g.
``spec.actions[3].needs[0]``. Cycles are reported with their path (``a -> b -> a``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

from plait.errors import MAX_ERROR_TYPE_BYTES, FieldViolation, InvalidArgumentError
from plait.exec_rules import RLIMITS, rlimit_problems, secret_problems
from plait.ids import describe_id
from plait.jsonlimits import json_problem, utf8_len
from plait.limits import Limits
from plait.spec.rules import fans_out, semaphore_terms
from plait.spec.validate_plain import needs_graph, ordered_depth, plain_action_ok
from plait.v1 import workflow_pb2

__all__ = [
    "CYCLE_SHOWN",
    "MAX_ATTEMPTS",
    "MAX_DURATION_S",
    "MAX_IDEMPOTENCY_KEY",
    "MAX_MULTIPLIER",
    "MAX_NAME",
    "MAX_PATH_BYTES",
    "MAX_RETRY_LIST",
    "describe_cycle",
    "find_cycle",
    "labels_violations",
    "longest_chain",
    "validate_submit",
]

MAX_ATTEMPTS = 100
MAX_NAME = 128
MAX_IDEMPOTENCY_KEY = 256
MAX_DURATION_S = 315_576_000_000  # google.protobuf.Duration's range: +-10,000 years
MAX_MULTIPLIER = 1000.0  # 1000 ** 99 (the 100th attempt) still fits a float
MAX_RETRY_LIST = 256  # retryable_exit_codes, retryable_errors entries
MAX_PATH_BYTES = 1024  # map.over, pipeline.over
_JOIN_KINDS = frozenset(workflow_pb2.JoinKind.values())


def _bad_duration(d: object) -> str | None:
    """Why ``d`` is not a valid google.protobuf.Duration (the wire allows any int64)."""
    s, n = d.seconds, d.nanos  # type: ignore[attr-defined]
    if abs(s) > MAX_DURATION_S or abs(n) > 999_999_999 or (s > 0 > n) or (s < 0 < n):
        return (
            f"is not a valid Duration (seconds {s}, nanos {n}): at most {MAX_DURATION_S} seconds"
            " and 999999999 nanos, of one sign"
        )
    return None


def _duration_violation(path: str, d: object, present: bool) -> Iterator[FieldViolation]:
    if not present:
        return
    bad = _bad_duration(d)
    if bad:
        yield FieldViolation(path, bad)
    elif d.seconds < 0 or (d.seconds == 0 and d.nanos <= 0):  # type: ignore[attr-defined]
        yield FieldViolation(path, "must be > 0")


def _retry_violations(path: str, r: workflow_pb2.RetryPolicy) -> Iterator[FieldViolation]:
    if r.max_attempts > MAX_ATTEMPTS:
        yield FieldViolation(
            f"{path}.max_attempts",
            f"is {r.max_attempts}; must be between 1 and {MAX_ATTEMPTS} (0 inherits the default)",
        )
    if r.backoff_multiplier and not 1 <= r.backoff_multiplier <= MAX_MULTIPLIER:
        yield FieldViolation(
            f"{path}.backoff_multiplier",
            f"is {r.backoff_multiplier}; must be between 1 and {MAX_MULTIPLIER:g}",
        )
    if r.HasField("jitter") and not 0 <= r.jitter <= 1:
        yield FieldViolation(f"{path}.jitter", f"is {r.jitter}; must be between 0 and 1")
    for name in ("initial_backoff", "max_backoff"):
        d = getattr(r, name)
        if r.HasField(name):
            bad = _bad_duration(d)
            if bad or d.seconds < 0 or d.nanos < 0:
                yield FieldViolation(f"{path}.{name}", bad or "must be >= 0")
    for name in ("retryable_exit_codes", "retryable_errors"):
        n = len(getattr(r, name))
        if n > MAX_RETRY_LIST:
            yield FieldViolation(
                f"{path}.{name}", f"has {n} entries; the limit is {MAX_RETRY_LIST}"
            )
    for i, kind in enumerate(r.retryable_errors):
        if utf8_len(kind) > MAX_ERROR_TYPE_BYTES:  # no error_type that long could match it
            yield FieldViolation(
                f"{path}.retryable_errors[{i}]",
                f"is longer than {MAX_ERROR_TYPE_BYTES} bytes (the most an error_type may be)",
            )


def _json_violation(path: str, text: str, limits: Limits) -> Iterator[FieldViolation]:
    """``input_json``: size, nesting depth (checked before parsing), then JSON at all."""
    if not text:
        return
    problem = json_problem(
        text,
        max_bytes=limits.max_input_bytes,
        bytes_limit="max_input_bytes",
        max_depth=limits.max_json_depth,
    )
    if problem:
        yield FieldViolation(path, problem)


def _map_violations(
    path: str, entries: Mapping[str, str], limits: Limits, count_limit: str, bytes_limit: str
) -> Iterator[FieldViolation]:
    """A string map (labels, selector, env): entry count and total size, within their limits."""
    n = len(entries)
    most = getattr(limits, count_limit)
    if n > most:
        yield FieldViolation(path, f"has {n} entries; the limit {count_limit} is {most}")
        return
    size = utf8_len("".join(entries)) + utf8_len("".join(entries.values()))
    most = getattr(limits, bytes_limit)
    if size > most:
        yield FieldViolation(path, f"is {size} bytes; the limit {bytes_limit} is {most}")


def labels_violations(
    path: str, labels: Mapping[str, str], limits: Limits
) -> Iterator[FieldViolation]:
    """Workflow labels, a selector, a worker's labels: bounded, keys printable and non-empty."""
    if not labels:
        return
    yield from _map_violations(path, labels, limits, "max_labels", "max_label_bytes")
    for key, value in labels.items():
        if not key or not key.isprintable() or not value.isprintable():
            yield FieldViolation(
                f"{path}[{key!r}]", "keys must be non-empty; keys and values printable"
            )
            return


def _caps_violations(
    path: str, a: workflow_pb2.ActionSpec, limits: Limits
) -> Iterator[FieldViolation]:
    """Counts and sizes of an action's argv, env and selector (resources and semaphores are
    counted with the other patterns, in :func:`_pattern_violations`)."""
    if a.WhichOneof("kind") == "exec":
        argv = a.exec.argv
        joined = "".join(argv)  # one pass in C for the size and the NUL check
        if len(argv) > limits.max_argv:
            yield FieldViolation(
                f"{path}.exec.argv",
                f"has {len(argv)} entries; the limit max_argv is {limits.max_argv}",
            )
        elif utf8_len(joined) > limits.max_argv_bytes:
            yield FieldViolation(
                f"{path}.exec.argv",
                f"is {utf8_len(joined)} bytes; the limit max_argv_bytes is {limits.max_argv_bytes}",
            )
        if "\0" in joined:
            i = next(i for i, arg in enumerate(argv) if "\0" in arg)
            yield FieldViolation(f"{path}.exec.argv[{i}]", "contains a NUL character")
    if a.env:
        yield from _map_violations(f"{path}.env", a.env, limits, "max_env", "max_env_bytes")
        if "\0" in "".join(a.env.values()):
            key = next(k for k, v in a.env.items() if "\0" in v)
            yield FieldViolation(f"{path}.env[{key!r}]", "contains a NUL character")
    if a.selector:
        yield from labels_violations(f"{path}.selector", a.selector, limits)
    if a.HasField("speculate") and a.speculate.HasField("after"):
        yield from _duration_violation(f"{path}.speculate.after", a.speculate.after, True)


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
        yield from _pattern_violations(path, a, limits, maps_a_need)
    if a.HasField("retry"):
        yield from _retry_violations(f"{path}.retry", a.retry)
    if a.input_json:
        yield from _json_violation(f"{path}.input_json", a.input_json, limits)
    yield from _caps_violations(path, a, limits)
    for key in a.env:
        if not key or "=" in key or "\0" in key:
            yield FieldViolation(f"{path}.env", f"bad variable name {key!r}")
    yield from _exec_option_violations(path, a)


def _exec_option_violations(path: str, a: workflow_pb2.ActionSpec) -> Iterator[FieldViolation]:
    """``secrets`` and ``rlimits`` (rules in plait.exec_rules): exec actions only, in bounds."""
    if not a.secrets and not a.HasField("rlimits"):
        return
    if a.WhichOneof("kind") != "exec":
        for name, present in (("secrets", bool(a.secrets)), ("rlimits", a.HasField("rlimits"))):
            if present:
                yield FieldViolation(
                    f"{path}.{name}", f"action {a.id!r}: {name} apply to exec actions only"
                )
        return
    for var, problem in secret_problems(a.secrets, a.env):
        where = f"{path}.secrets[{var!r}]" if var else f"{path}.secrets"
        yield FieldViolation(where, f"action {a.id!r}: {problem}")
    limits = {f.field: getattr(a.rlimits, f.field) for f in RLIMITS}
    for f, problem in rlimit_problems(limits):
        yield FieldViolation(f"{path}.rlimits.{f.field}", f"action {a.id!r}: {problem}")


def _has_pattern(a: workflow_pb2.ActionSpec) -> bool:
    return bool(a.priority or a.resources or a.semaphores or a.HasField("join") or fans_out(a))


def _join_violations(
    path: str, a: workflow_pb2.ActionSpec, maps_a_need: bool
) -> Iterator[FieldViolation]:
    j = a.join
    n = len(a.needs)
    if j.kind not in _JOIN_KINDS:
        yield FieldViolation(f"{path}.join.kind", f"is {j.kind}; not a JoinKind")
    elif j.kind == workflow_pb2.JOIN_KIND_AT_LEAST:
        if bool(j.at_least_count) == bool(j.at_least_fraction):
            yield FieldViolation(
                f"{path}.join", "at_least needs exactly one of at_least_count or at_least_fraction"
            )
        elif j.at_least_count and not (fans_out(a) or maps_a_need or 1 <= j.at_least_count <= n):
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
    path: str, a: workflow_pb2.ActionSpec, limits: Limits, maps_a_need: bool = False
) -> Iterator[FieldViolation]:
    """Joins, map, resources, semaphores, priority.

    ``maps_a_need``: the action needs a map action, whose items its join counts.
    """
    if not -1000 <= a.priority <= 1000:
        yield FieldViolation(f"{path}.priority", f"is {a.priority}; must be -1000 to 1000")
    if len(a.resources) > limits.max_resources:
        yield FieldViolation(
            f"{path}.resources",
            f"has {len(a.resources)} entries; the limit max_resources is {limits.max_resources}",
        )
    if len(a.semaphores) > limits.max_semaphores:
        yield FieldViolation(
            f"{path}.semaphores",
            f"has {len(a.semaphores)} entries; the limit max_semaphores is {limits.max_semaphores}",
        )
    yield from _join_violations(path, a, maps_a_need)
    for name in ("map", "pipeline"):
        if a.HasField(name):
            over = getattr(a, name).over
            need_id = over.partition(".")[0]
            if utf8_len(over) > MAX_PATH_BYTES:
                yield FieldViolation(
                    f"{path}.{name}.over", f"is longer than {MAX_PATH_BYTES} bytes"
                )
            elif need_id not in a.needs:
                yield FieldViolation(
                    f"{path}.{name}.over",
                    f"{over!r} must start with one of the needs ({need_id!r})",
                )
    if a.HasField("map") and a.HasField("pipeline"):
        yield FieldViolation(path, "an action is a map or a pipeline, not both")
    for name, amount in a.resources.items():
        if describe_id(name) or not (amount >= 0 and math.isfinite(amount)):
            yield FieldViolation(
                f"{path}.resources[{name!r}]",
                "needs a name of [A-Za-z0-9_.-] and a finite amount >= 0",
            )
    for i, req in enumerate(a.semaphores):
        why = describe_id(req.name)
        if why:
            yield FieldViolation(f"{path}.semaphores[{i}].name", why)
        capacity, permits = semaphore_terms(req)
        if permits > capacity:
            yield FieldViolation(
                f"{path}.semaphores[{i}].permits",
                f"is {req.permits}; more than the capacity {capacity}",
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
        if stage.needs or fans_out(stage):
            yield FieldViolation(where, "a stage has no needs, map or pipeline of its own")
        else:
            yield from _spec_violations(where, stage, limits)


CYCLE_SHOWN = 16  # ids of a long cycle named in its error (the rest are counted)


def describe_cycle(cycle: list[str]) -> str:
    """``cycle: a -> b -> a``; a long one shows its first and last ids and counts the rest, so
    the error stays far below gRPC's metadata limit (a 768-action cycle once came back as
    RESOURCE_EXHAUSTED instead of INVALID_ARGUMENT)."""
    if len(cycle) <= CYCLE_SHOWN:
        return "cycle: " + " -> ".join(cycle)
    head, tail = cycle[: CYCLE_SHOWN // 2], cycle[-CYCLE_SHOWN // 2 :]
    hidden = len(cycle) - len(head) - len(tail)
    shown = f"{' -> '.join(head)} -> … ({hidden} more) -> {' -> '.join(tail)}"
    return f"cycle of {len(cycle) - 1} actions: {shown}"


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


def _workflow_env_violations(env: Mapping[str, str], limits: Limits) -> Iterator[FieldViolation]:
    """``spec.env`` (every exec action's, beneath its own): bounded as an action's env is."""
    yield from _map_violations("spec.env", env, limits, "max_env", "max_env_bytes")
    for key, value in env.items():
        if not key or "=" in key or "\0" in key:
            yield FieldViolation("spec.env", f"bad variable name {key!r}")
        elif "\0" in value:
            yield FieldViolation(f"spec.env[{key!r}]", "contains a NUL character")


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
    v.extend(labels_violations("spec.labels", spec.labels, limits))
    if spec.env:
        v.extend(_workflow_env_violations(spec.env, limits))
    if not -1000 <= spec.priority <= 1000:
        v.append(FieldViolation("spec.priority", f"is {spec.priority}; must be -1000 to 1000"))
    if spec.HasField("defaults"):
        d = spec.defaults
        v.extend(_duration_violation("spec.defaults.timeout", d.timeout, d.HasField("timeout")))
        if d.HasField("retry"):
            v.extend(_retry_violations("spec.defaults.retry", d.retry))
    index: dict[str, int] = {}
    edges = 0
    mapped: set[str] | None = None  # joins over them count items; found when first needed
    for i, a in enumerate(spec.actions):
        if not plain_action_ok(a, limits):  # plain and valid, known in a few microseconds
            if mapped is None:
                mapped = {a.id for a in spec.actions if fans_out(a)}
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
    _graph_violations(spec, index, v, limits)


def _graph_violations(
    spec: workflow_pb2.WorkflowSpec, index: dict[str, int], v: list[FieldViolation], limits: Limits
) -> None:
    """The needs-graph: every edge, then (all else being fine) cycles and the longest chain."""
    fast_needs = None if v else needs_graph(spec, index)
    needs = fast_needs if fast_needs is not None else _needs_violations(spec, index, v)
    if v:
        raise InvalidArgumentError(v)
    ids = list(index)
    depth = ordered_depth(ids, needs)  # one pass when every action follows its needs
    if depth is None:
        cycle = find_cycle(ids, needs)
        if cycle:
            raise InvalidArgumentError(
                [FieldViolation(f"spec.actions[{index[cycle[0]]}].needs", describe_cycle(cycle))]
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
