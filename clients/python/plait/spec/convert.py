"""The workflow converter: a parsed document to a ``WorkflowSpec`` (SDK layer: plait.spec).

A workflow document (what YAML or JSON gives, or what :class:`~plait.spec.builder.Workflow`
collects) maps 1:1 onto ``plait.v1.WorkflowSpec``. Every mistake is collected, not just the
first, and reported naming the source, the action (index and id) and the field, for example::

    flow.yaml: actions[2] (id 'resize'): timeout: expected a duration such as 250ms, 2s or 5m,
    got 'soon'

This module converts the document, its defaults and each action's own keys; the keys that say
how actions run together (join, map, resources, semaphores) are in :mod:`plait.spec.patterns`,
those that set up an exec action's sandbox (secrets, rlimits) in :mod:`plait.spec.exec_options`
and the shared field checks in :mod:`plait.spec.fields`. Structural checks that need the whole
DAG (cycles) are the coordinator's job at submit; the converter pre-checks duplicate ids and
unknown ``needs`` only because it can name them better.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from plait.spec.exec_options import convert_exec_options
from plait.spec.fields import (
    NAME_RE,
    UNSUPPORTED_KEYS,
    ActionRef,
    Loc,
    Problems,
    SpecError,
    boolean,
    check_keys,
    describe,
    duration,
    number,
    scalar_str,
    str_map,
    whole_number,
)
from plait.spec.patterns import (
    MAX_COUNT,
    PRIORITY_RANGE,
    check_joins,
    convert_join,
    convert_map,
    convert_resources,
    convert_semaphores,
)
from plait.spec.plain import add_plain
from plait.v1 import workflow_pb2

__all__ = [
    "ACTION_KEYS",
    "DEFAULTS_KEYS",
    "LATER_KEYS",
    "RETRY_KEYS",
    "TOP_LEVEL_KEYS",
    "ActionRef",
    "Problems",
    "SpecError",
    "build_spec",
    "convert_action",
    "convert_defaults",
    "convert_workflow_options",
    "spec_from_dict",
]

TOP_LEVEL_KEYS = (
    "name",
    "defaults",
    "labels",
    "fail_fast",
    "max_parallel",
    "deadline",
    "priority",
    "env",
    "actions",
)
DEFAULTS_KEYS = ("retry", "timeout")
ACTION_KEYS = (
    "id",
    "needs",
    "run",
    "handler",
    "input",
    "env",
    "timeout",
    "retry",
    "slots",
    "selector",
    "join",
    "map",
    "resources",
    "queue_timeout",
    "heartbeat_timeout",
    "priority",
    "concurrency_key",
    "concurrency_limit",
    "lock",
    "semaphores",
    "pipeline",
    "speculate",
    "secrets",
    "rlimits",
)
RETRY_KEYS = (
    "max_attempts",
    "backoff",
    "max_backoff",
    "multiplier",
    "jitter",
    "retryable_exit_codes",
    "retryable_errors",
)
# Keys reserved for features not built yet: refused with a message that says so.
LATER_KEYS = frozenset(UNSUPPORTED_KEYS)

_MAX_ATTEMPTS = 100


def _retry(value: Any, loc: Loc, probs: Problems) -> workflow_pb2.RetryPolicy | None:
    if not isinstance(value, Mapping):
        probs.add(
            loc.path,
            loc.where,
            f"expected a mapping with keys {', '.join(RETRY_KEYS)}, got {describe(value)}",
        )
        return None
    check_keys(value, RETRY_KEYS, loc, "retry", probs)
    policy = workflow_pb2.RetryPolicy()
    if "max_attempts" in value:
        n = whole_number(value["max_attempts"], loc.child("max_attempts"), probs, 1, _MAX_ATTEMPTS)
        if n is not None:
            policy.max_attempts = n
    for key, target in (("backoff", "initial_backoff"), ("max_backoff", "max_backoff")):
        if key in value:
            d = duration(value[key], loc.child(key), probs, positive=False)
            if d is not None:
                getattr(policy, target).CopyFrom(d)
    if "multiplier" in value:
        m = value["multiplier"]
        at = loc.child("multiplier")
        got = number(m, at, probs, what="a number >= 1")
        if got is not None and got < 1:
            at.add(probs, f"must be >= 1, got {m}")
        elif got is not None:
            policy.backoff_multiplier = got
    if "retryable_exit_codes" in value:
        codes = value["retryable_exit_codes"]
        at = loc.child("retryable_exit_codes")
        if isinstance(codes, int) and not isinstance(codes, bool):
            codes = [codes]
        if not isinstance(codes, list | tuple):
            probs.add(at.path, at.where, f"expected a list of exit codes, got {describe(codes)}")
        else:
            for i, c in enumerate(codes):
                got = whole_number(c, at.item(i), probs, 0, 255)
                if got is not None:
                    policy.retryable_exit_codes.append(got)
    _retry_extras(value, loc, policy, probs)
    return policy


def _retry_extras(
    value: Mapping[str, Any], loc: Loc, policy: workflow_pb2.RetryPolicy, probs: Problems
) -> None:
    """``jitter`` (0 to 1) and ``retryable_errors`` (exception type or status code names)."""
    if "jitter" in value:
        at = loc.child("jitter")
        got = number(value["jitter"], at, probs, what="a number from 0 to 1")
        if got is not None and not 0 <= got <= 1:
            at.add(probs, f"must be from 0 to 1, got {value['jitter']}")
        elif got is not None:
            policy.jitter = got
    if "retryable_errors" in value:
        kinds = value["retryable_errors"]
        at = loc.child("retryable_errors")
        if isinstance(kinds, str):
            kinds = [kinds]
        if not isinstance(kinds, list | tuple) or not all(
            isinstance(k, str) and k.isidentifier() for k in kinds
        ):
            at.add(probs, "expected a list of error type names such as TimeoutError, UNAVAILABLE")
        else:
            policy.retryable_errors.extend(kinds)


def convert_defaults(value: Any, probs: Problems) -> workflow_pb2.ActionDefaults:
    """Converts the ``defaults`` mapping; problems go to ``probs``."""
    loc = Loc("defaults", field="defaults")
    out = workflow_pb2.ActionDefaults()
    if not isinstance(value, Mapping):
        probs.add(
            loc.path,
            loc.where,
            f"expected a mapping with keys {', '.join(DEFAULTS_KEYS)}, got {describe(value)}",
        )
        return out
    check_keys(value, DEFAULTS_KEYS, loc, "defaults", probs)
    if "retry" in value:
        policy = _retry(value["retry"], loc.child("retry"), probs)
        if policy is not None:
            out.retry.CopyFrom(policy)
    if "timeout" in value:
        d = duration(value["timeout"], loc.child("timeout"), probs, positive=True)
        if d is not None:
            out.timeout.CopyFrom(d)
    return out


def _needs(value: Any, loc: Loc, probs: Problems) -> list[str]:
    items: list[Any]
    if isinstance(value, str | ActionRef):
        items = [value]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        probs.add(
            loc.path, loc.where, f"expected an action id or a list of ids, got {describe(value)}"
        )
        return []
    out: list[str] = []
    seen: set[str] = set()  # not `in out`: a join of 10,000 needs made that quadratic
    for i, item in enumerate(items):
        need = item.id if isinstance(item, ActionRef) else item
        if not isinstance(need, str) or not need:
            at = loc.item(i)
            probs.add(at.path, at.where, f"expected an action id, got {describe(item)}")
        elif need in seen:
            at = loc.item(i)
            probs.add(at.path, at.where, f"{need!r} is listed twice")
        else:
            out.append(need)
            seen.add(need)
    return out


def _run(value: Any, loc: Loc, probs: Problems) -> workflow_pb2.ExecAction | None:
    if isinstance(value, str):
        if not value.strip():
            probs.add(loc.path, loc.where, "expected a command, got an empty string")
            return None
        return workflow_pb2.ExecAction(argv=[value], shell=True)
    if isinstance(value, list | tuple):
        if not value:
            probs.add(loc.path, loc.where, "expected a command, got an empty list")
            return None
        argv: list[str] = []
        for i, arg in enumerate(value):
            s = scalar_str(arg)
            if s is None:
                at = loc.item(i)
                probs.add(at.path, at.where, f"expected a string, got {describe(arg)}")
            else:
                argv.append(s)
        return workflow_pb2.ExecAction(argv=argv)
    probs.add(
        loc.path,
        loc.where,
        f"expected a list (argv) or a string (run by /bin/sh -c), got {describe(value)}",
    )
    return None


def _kind(raw: Mapping[str, Any], loc: Loc, spec: workflow_pb2.ActionSpec, probs: Problems) -> None:
    """Fills the ``kind`` oneof: exactly one of ``run`` and ``handler``."""
    has_run, has_handler = "run" in raw, "handler" in raw
    if "pipeline" in raw:  # a pipeline runs its stages, not a command of its own
        if has_run or has_handler:
            at = loc.child("pipeline")
            probs.add(at.path, at.where, "a pipeline runs its stages: drop run/handler here")
        return
    if has_run == has_handler:
        what = "both" if has_run else "neither"
        at = loc.child("run")
        probs.add(at.path, at.where, f"exactly one of run or handler is required, got {what}")
    if has_run:
        exec_action = _run(raw["run"], loc.child("run"), probs)
        if exec_action is not None:
            spec.exec.CopyFrom(exec_action)
    if has_handler and not has_run:
        name = raw["handler"]
        at = loc.child("handler")
        if not isinstance(name, str) or not name.strip():
            probs.add(at.path, at.where, f"expected a handler name, got {describe(name)}")
        else:
            spec.handler = name


def _options(
    raw: Mapping[str, Any], loc: Loc, spec: workflow_pb2.ActionSpec, probs: Problems
) -> None:
    """Fills the optional fields every kind of action shares."""
    if "input" in raw:
        at = loc.child("input")
        try:
            spec.input_json = json.dumps(raw["input"], allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            probs.add(at.path, at.where, f"expected a JSON value (quote dates and times): {exc}")
    if "env" in raw:
        spec.env.update(str_map(raw["env"], loc.child("env"), probs))
    if "timeout" in raw:
        d = duration(raw["timeout"], loc.child("timeout"), probs, positive=True)
        if d is not None:
            spec.timeout.CopyFrom(d)
    if "retry" in raw:
        policy = _retry(raw["retry"], loc.child("retry"), probs)
        if policy is not None:
            spec.retry.CopyFrom(policy)
    if "slots" in raw:
        n = whole_number(raw["slots"], loc.child("slots"), probs, 1, 1_000_000)
        if n is not None:
            spec.slots = n
    if "selector" in raw:
        spec.selector.update(str_map(raw["selector"], loc.child("selector"), probs))


def _scheduling(
    raw: Mapping[str, Any], loc: Loc, spec: workflow_pb2.ActionSpec, probs: Problems
) -> None:
    """Fills the queue and heartbeat timeouts and the priority."""
    for key in ("queue_timeout", "heartbeat_timeout"):
        if key in raw:
            d = duration(raw[key], loc.child(key), probs, positive=True)
            if d is not None:
                getattr(spec, key).CopyFrom(d)
    if "heartbeat_timeout" in raw and "run" in raw:
        loc.child("heartbeat_timeout").add(
            probs,
            "applies to handler actions, which report progress with ctx.heartbeat(); an exec"
            " action cannot, so it would always time out",
        )
    if "priority" in raw:
        n = whole_number(raw["priority"], loc.child("priority"), probs, *PRIORITY_RANGE)
        if n is not None:
            spec.priority = n


def _patterns(
    raw: Mapping[str, Any], loc: Loc, spec: workflow_pb2.ActionSpec, probs: Problems
) -> None:
    """Fills the keys that say how the action runs alongside others (plait.spec.patterns)."""
    if "join" in raw:
        policy = convert_join(raw["join"], loc.child("join"), probs)
        if policy is not None:
            spec.join.CopyFrom(policy)
    if "map" in raw:
        mapping = convert_map(raw["map"], list(spec.needs), loc.child("map"), probs)
        if mapping is not None:
            spec.map.CopyFrom(mapping)
    if "pipeline" in raw:
        _pipeline(raw["pipeline"], list(spec.needs), loc.child("pipeline"), spec, probs)
    if "speculate" in raw:
        _speculate(raw["speculate"], loc.child("speculate"), spec, probs)
    if "resources" in raw:
        spec.resources.update(convert_resources(raw["resources"], loc.child("resources"), probs))
    spec.semaphores.extend(convert_semaphores(raw, loc, probs))


PIPELINE_KEYS = ("over", "max_in_flight", "max_items", "stages")
SPECULATE_KEYS = ("after", "p95")


def _speculate(value: Any, loc: Loc, spec: workflow_pb2.ActionSpec, probs: Problems) -> None:
    """``speculate: 2s`` | ``speculate: p95`` | ``{after: 2s, p95: true}`` (hedge slow attempts)."""
    sp = spec.speculate
    if value == "p95":
        sp.after_p95 = True
        return
    if isinstance(value, Mapping):
        check_keys(value, SPECULATE_KEYS, loc, "speculate", probs)
        if "p95" in value:
            if isinstance(value["p95"], bool):
                sp.after_p95 = value["p95"]
            else:
                loc.child("p95").add(probs, f"expected true or false, got {describe(value['p95'])}")
        if "after" in value:
            d = duration(value["after"], loc.child("after"), probs, positive=True)
            if d is not None:
                sp.after.CopyFrom(d)
        if not sp.after_p95 and not sp.HasField("after"):
            loc.add(probs, "needs after (a duration), p95: true, or both")
        return
    d = duration(value, loc, probs, positive=True)
    if d is not None:
        sp.after.CopyFrom(d)


def _pipeline(
    value: Any, needs: list[str], loc: Loc, spec: workflow_pb2.ActionSpec, probs: Problems
) -> None:
    """``pipeline: {over: list.items, max_in_flight: N, stages: [<action>, ...]}``."""
    if not isinstance(value, Mapping):
        loc.add(probs, f"expected a mapping with keys {', '.join(PIPELINE_KEYS)}")
        return
    check_keys(value, PIPELINE_KEYS, loc, "pipeline", probs)
    mapping = convert_map(
        {k: v for k, v in value.items() if k in ("over", "max_items")}, needs, loc, probs
    )
    if mapping is not None:
        spec.pipeline.over = mapping.over
        spec.pipeline.max_items = mapping.max_items
    if "max_in_flight" in value:
        n = whole_number(value["max_in_flight"], loc.child("max_in_flight"), probs, 1, MAX_COUNT)
        if n is not None:
            spec.pipeline.max_in_flight = n
    stages = value.get("stages")
    at = loc.child("stages")
    if not isinstance(stages, list) or not stages:
        at.add(probs, "expected a non-empty list of stages, each an action (id, run or handler)")
        return
    for k, raw_stage in enumerate(stages):
        stage_loc = at.item(k)
        if isinstance(raw_stage, Mapping):
            for key in ("needs", "map", "pipeline"):
                if key in raw_stage:
                    stage_loc.child(key).add(probs, "a stage has no needs, map or pipeline")
        stage = convert_action(raw_stage, k, probs, loc=stage_loc)
        if stage is not None:
            spec.pipeline.stages.append(stage)


def convert_action(
    raw: Any, index: int, probs: Problems, *, loc: Loc | None = None
) -> workflow_pb2.ActionSpec | None:
    """Converts ``actions[index]`` (or a stage at ``loc``); problems go to ``probs``."""
    loc = loc or Loc(f"actions[{index}]", f"actions[{index}]")
    if not isinstance(raw, Mapping):
        probs.add(
            loc.path,
            loc.where,
            f"expected a mapping with keys such as id and run, got {describe(raw)}",
        )
        return None
    action_id = raw.get("id")
    if isinstance(action_id, str) and action_id:
        loc = Loc(loc.path, f"{loc.head} (id {action_id!r})")
    check_keys(raw, ACTION_KEYS, loc, "action", probs)
    spec = workflow_pb2.ActionSpec()
    at = loc.child("id")
    if "id" not in raw:
        probs.add(at.path, at.where, "is required")
    elif not isinstance(action_id, str) or not NAME_RE.fullmatch(action_id):
        probs.add(
            at.path,
            at.where,
            "expected 1 to 128 characters of [A-Za-z0-9_.-] starting with a letter or digit,"
            f" got {describe(action_id)}",
        )
    else:
        spec.id = action_id
    if "needs" in raw:
        spec.needs.extend(_needs(raw["needs"], loc.child("needs"), probs))
    _kind(raw, loc, spec, probs)
    _options(raw, loc, spec, probs)
    convert_exec_options(raw, loc, spec, probs)
    _scheduling(raw, loc, spec, probs)
    _patterns(raw, loc, spec, probs)
    return spec


def _check_graph(actions: Sequence[workflow_pb2.ActionSpec], probs: Problems) -> None:
    ids = [a.id for a in actions]
    seen = dict(zip(ids, range(len(ids)), strict=True))
    known = seen.__contains__
    if len(seen) == len(ids) and all(
        not deps or (aid not in deps and all(map(known, deps)))
        for aid, deps in zip(ids, (a.needs for a in actions), strict=True)
    ):
        check_joins(actions, probs)  # no repeated id, every need known: the common case
        return
    seen = {}
    for i, a in enumerate(actions):
        if not a.id:
            continue
        where = f"actions[{i}] (id {a.id!r})"
        if a.id in seen:
            probs.add(
                f"actions[{i}].id",
                f"{where}: id",
                f"duplicate id; first used by actions[{seen[a.id]}]",
            )
        else:
            seen[a.id] = i
    for i, a in enumerate(actions):
        for j, need in enumerate(a.needs):
            where = f"actions[{i}] (id {a.id!r}): needs[{j}]"
            if need == a.id:
                probs.add(f"actions[{i}].needs[{j}]", where, "an action cannot need itself")
            elif need not in seen:
                probs.add(f"actions[{i}].needs[{j}]", where, f"unknown action id {need!r}")
    check_joins(actions, probs)


def convert_workflow_options(
    doc: Mapping[str, Any], spec: workflow_pb2.WorkflowSpec, probs: Problems
) -> None:
    """Fills the workflow-wide keys: ``fail_fast``, ``max_parallel``, ``deadline``, ``priority``."""
    if "fail_fast" in doc:
        flag = boolean(doc["fail_fast"], Loc("fail_fast", field="fail_fast"), probs)
        if flag is not None:
            spec.fail_fast = flag
    if "max_parallel" in doc:
        at = Loc("max_parallel", field="max_parallel")
        n = whole_number(doc["max_parallel"], at, probs, 1, MAX_COUNT)
        if n is not None:
            spec.max_parallel = n
    if "deadline" in doc:
        d = duration(doc["deadline"], Loc("deadline", field="deadline"), probs, positive=True)
        if d is not None:
            spec.deadline.CopyFrom(d)
    if "priority" in doc:
        at = Loc("priority", field="priority")
        p = whole_number(doc["priority"], at, probs, *PRIORITY_RANGE)
        if p is not None:
            spec.priority = p


def build_spec(doc: Any, source: str, default_name: str) -> workflow_pb2.WorkflowSpec:
    """Converts a whole document, or raises :class:`SpecError` with every problem found."""
    probs = Problems()
    spec = workflow_pb2.WorkflowSpec()
    if not isinstance(doc, Mapping):
        probs.add(
            "",
            "workflow",
            f"expected a mapping with keys {', '.join(TOP_LEVEL_KEYS)}, got {describe(doc)}",
        )
        raise SpecError(source, probs.items)
    check_keys(doc, TOP_LEVEL_KEYS, Loc(""), "top-level", probs)
    name = doc.get("name", default_name)
    if not isinstance(name, str) or not 1 <= len(name) <= 128:
        probs.add("name", "name", f"expected 1 to 128 characters, got {describe(name)}")
    else:
        spec.name = name
    if "defaults" in doc:
        spec.defaults.CopyFrom(convert_defaults(doc["defaults"], probs))
    if "labels" in doc:
        spec.labels.update(str_map(doc["labels"], Loc("labels", field="labels"), probs))
    if "env" in doc:  # every exec action's, beneath its own (WorkflowSpec.env)
        spec.env.update(str_map(doc["env"], Loc("env", field="env"), probs))
    convert_workflow_options(doc, spec, probs)
    raw_actions = doc.get("actions")
    if not isinstance(raw_actions, list) or not raw_actions:
        got = "nothing" if raw_actions is None else describe(raw_actions)
        probs.add("actions", "actions", f"expected a non-empty list of actions, got {got}")
    else:
        actions = spec.actions
        for i, raw in enumerate(raw_actions):
            if add_plain(raw, actions):  # the common case, quickly (plait.spec.plain)
                continue
            action = convert_action(raw, i, probs)
            if action is not None:
                actions.append(action)
        if not probs.items:
            _check_graph(spec.actions, probs)
    if probs.items:
        raise SpecError(source, probs.items)
    return spec


def spec_from_dict(
    doc: Any, *, source: str = "workflow", default_name: str = "workflow"
) -> workflow_pb2.WorkflowSpec:
    """Converts a parsed workflow document (what YAML or JSON gives) to a ``WorkflowSpec``.

    Raises:
        SpecError: every problem found, each naming ``source``, the action and the field.
    """
    return build_spec(doc, source, default_name)
