"""The workflow converter: a parsed document to a ``WorkflowSpec`` (SDK layer: plait.spec).

A workflow document (what YAML or JSON gives, or what :class:`~plait.spec.builder.Workflow`
collects) maps 1:1 onto ``plait.v1.WorkflowSpec``. Every mistake is collected, not just the
first, and reported naming the source, the action (index and id) and the field, for example::

    flow.yaml: actions[2] (id 'resize'): timeout: expected a duration such as 250ms, 2s or 5m,
    got 'soon'

Structural checks that need the whole DAG (cycles) are the coordinator's job at submit; the
converter pre-checks duplicate ids and unknown ``needs`` only because it can name them better.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from plait import durations
from plait.errors import FieldViolation, InvalidArgumentError
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
    "spec_from_dict",
]

TOP_LEVEL_KEYS = ("name", "defaults", "labels", "actions")
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
)
RETRY_KEYS = ("max_attempts", "backoff", "max_backoff", "multiplier", "retryable_exit_codes")
# Keys of later versions of the format: refused with a message that says so.
LATER_KEYS = frozenset({"map", "join", "pipeline", "speculate"})

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_MAX_ATTEMPTS = 100


class SpecError(InvalidArgumentError):
    """A workflow file (or builder call) is malformed.

    ``violations`` carry the field paths (``actions[2].timeout``); ``lines`` are the
    human-readable messages, each naming the source, the action and the field.
    """

    def __init__(self, source: str, problems: Sequence[tuple[FieldViolation, str]]) -> None:
        super().__init__([v for v, _ in problems])
        self.source = source
        self.lines = [f"{source}: {where}" for _, where in problems]
        self.message = "\n".join(self.lines)
        self.args = (self.message,)


@dataclass(frozen=True, slots=True)
class ActionRef:
    """A handle on an action added to a :class:`Workflow`; usable in ``needs``."""

    id: str

    def __str__(self) -> str:
        return self.id


class Problems:
    """Collects every violation of one conversion, so the user sees them all at once."""

    def __init__(self) -> None:
        self.items: list[tuple[FieldViolation, str]] = []

    def add(self, path: str, where: str, description: str) -> None:
        """Records one violation: its field path and how to say where it is to a person."""
        self.items.append((FieldViolation(path, description), f"{where}: {description}"))


@dataclass(frozen=True, slots=True)
class _Loc:
    """Where a value sits: its field path, and how to say it to a person."""

    path: str  # actions[2].retry.backoff
    head: str = ""  # actions[2] (id 'resize')
    field: str = ""  # retry.backoff

    @property
    def where(self) -> str:
        if self.head and self.field:
            return f"{self.head}: {self.field}"
        return self.head or self.field

    def child(self, key: str) -> _Loc:
        path = f"{self.path}.{key}" if self.path else key
        field = f"{self.field}.{key}" if self.field else key
        return _Loc(path, self.head, field)

    def item(self, index: int) -> _Loc:
        return _Loc(f"{self.path}[{index}]", self.head, f"{self.field}[{index}]")


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return repr(value)


def _check_keys(
    raw: Mapping[Any, Any], allowed: Sequence[str], loc: _Loc, what: str, probs: Problems
) -> None:
    for key in raw:
        if key in allowed:
            continue
        at = loc.child(str(key))
        if key in LATER_KEYS:
            probs.add(
                at.path,
                at.where,
                f"'{key}' belongs to a later version of the workflow format and is not supported"
                f" here; allowed {what} keys: {', '.join(allowed)}",
            )
        else:
            probs.add(
                at.path,
                at.where,
                f"unknown key {key!r}; allowed {what} keys: {', '.join(allowed)}",
            )


def _duration(value: Any, loc: _Loc, probs: Problems, *, positive: bool) -> Any:
    try:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            d = durations.parse_duration(value)
            if d.total_seconds() < 0 or (positive and d.total_seconds() == 0):
                kind = "greater than zero" if positive else "zero or more"
                probs.add(loc.path, loc.where, f"must be {kind}, got {value!r}")
                return None
            return durations.to_proto(d)
    except ValueError:
        pass
    probs.add(
        loc.path, loc.where, f"expected a duration such as 250ms, 2s or 5m, got {_describe(value)}"
    )
    return None


def _int(value: Any, loc: _Loc, probs: Problems, lo: int, hi: int) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        probs.add(loc.path, loc.where, f"expected a whole number, got {_describe(value)}")
        return None
    if not lo <= value <= hi:
        probs.add(loc.path, loc.where, f"must be between {lo} and {hi}, got {value}")
        return None
    return value


def _scalar_str(value: Any) -> str | None:
    """Strings as they are; YAML numbers and booleans as a person typed them; else None."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    return None


def _str_map(value: Any, loc: _Loc, probs: Problems) -> dict[str, str]:
    if not isinstance(value, Mapping):
        probs.add(
            loc.path, loc.where, f"expected a mapping of names to strings, got {_describe(value)}"
        )
        return {}
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not k:
            probs.add(loc.path, loc.where, f"keys must be non-empty strings, got {k!r}")
            continue
        s = _scalar_str(v)
        if s is None:
            at = loc.child(k)
            probs.add(at.path, at.where, f"expected a string, got {_describe(v)}")
            continue
        out[k] = s
    return out


def _retry(value: Any, loc: _Loc, probs: Problems) -> workflow_pb2.RetryPolicy | None:
    if not isinstance(value, Mapping):
        probs.add(
            loc.path,
            loc.where,
            f"expected a mapping with keys {', '.join(RETRY_KEYS)}, got {_describe(value)}",
        )
        return None
    _check_keys(value, RETRY_KEYS, loc, "retry", probs)
    policy = workflow_pb2.RetryPolicy()
    if "max_attempts" in value:
        n = _int(value["max_attempts"], loc.child("max_attempts"), probs, 1, _MAX_ATTEMPTS)
        if n is not None:
            policy.max_attempts = n
    for key, target in (("backoff", "initial_backoff"), ("max_backoff", "max_backoff")):
        if key in value:
            d = _duration(value[key], loc.child(key), probs, positive=False)
            if d is not None:
                getattr(policy, target).CopyFrom(d)
    if "multiplier" in value:
        m = value["multiplier"]
        at = loc.child("multiplier")
        if isinstance(m, bool) or not isinstance(m, int | float) or not math.isfinite(m):
            probs.add(at.path, at.where, f"expected a number >= 1, got {_describe(m)}")
        elif m < 1:
            probs.add(at.path, at.where, f"must be >= 1, got {m}")
        else:
            policy.backoff_multiplier = float(m)
    if "retryable_exit_codes" in value:
        codes = value["retryable_exit_codes"]
        at = loc.child("retryable_exit_codes")
        if isinstance(codes, int) and not isinstance(codes, bool):
            codes = [codes]
        if not isinstance(codes, list | tuple):
            probs.add(at.path, at.where, f"expected a list of exit codes, got {_describe(codes)}")
        else:
            for i, c in enumerate(codes):
                got = _int(c, at.item(i), probs, 0, 255)
                if got is not None:
                    policy.retryable_exit_codes.append(got)
    return policy


def convert_defaults(value: Any, probs: Problems) -> workflow_pb2.ActionDefaults:
    """Converts the ``defaults`` mapping; problems go to ``probs``."""
    loc = _Loc("defaults", field="defaults")
    out = workflow_pb2.ActionDefaults()
    if not isinstance(value, Mapping):
        probs.add(
            loc.path,
            loc.where,
            f"expected a mapping with keys {', '.join(DEFAULTS_KEYS)}, got {_describe(value)}",
        )
        return out
    _check_keys(value, DEFAULTS_KEYS, loc, "defaults", probs)
    if "retry" in value:
        policy = _retry(value["retry"], loc.child("retry"), probs)
        if policy is not None:
            out.retry.CopyFrom(policy)
    if "timeout" in value:
        d = _duration(value["timeout"], loc.child("timeout"), probs, positive=True)
        if d is not None:
            out.timeout.CopyFrom(d)
    return out


def _needs(value: Any, loc: _Loc, probs: Problems) -> list[str]:
    items: list[Any]
    if isinstance(value, str | ActionRef):
        items = [value]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        probs.add(
            loc.path, loc.where, f"expected an action id or a list of ids, got {_describe(value)}"
        )
        return []
    out: list[str] = []
    for i, item in enumerate(items):
        at = loc.item(i)
        need = item.id if isinstance(item, ActionRef) else item
        if not isinstance(need, str) or not need:
            probs.add(at.path, at.where, f"expected an action id, got {_describe(item)}")
        elif need in out:
            probs.add(at.path, at.where, f"{need!r} is listed twice")
        else:
            out.append(need)
    return out


def _run(value: Any, loc: _Loc, probs: Problems) -> workflow_pb2.ExecAction | None:
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
            s = _scalar_str(arg)
            if s is None:
                at = loc.item(i)
                probs.add(at.path, at.where, f"expected a string, got {_describe(arg)}")
            else:
                argv.append(s)
        return workflow_pb2.ExecAction(argv=argv)
    probs.add(
        loc.path,
        loc.where,
        f"expected a list (argv) or a string (run by /bin/sh -c), got {_describe(value)}",
    )
    return None


def _kind(
    raw: Mapping[str, Any], loc: _Loc, spec: workflow_pb2.ActionSpec, probs: Problems
) -> None:
    """Fills the ``kind`` oneof: exactly one of ``run`` and ``handler``."""
    has_run, has_handler = "run" in raw, "handler" in raw
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
            probs.add(at.path, at.where, f"expected a handler name, got {_describe(name)}")
        else:
            spec.handler = name


def _options(
    raw: Mapping[str, Any], loc: _Loc, spec: workflow_pb2.ActionSpec, probs: Problems
) -> None:
    """Fills the optional fields every kind of action shares."""
    if "input" in raw:
        at = loc.child("input")
        try:
            spec.input_json = json.dumps(raw["input"], allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            probs.add(at.path, at.where, f"expected a JSON value (quote dates and times): {exc}")
    if "env" in raw:
        spec.env.update(_str_map(raw["env"], loc.child("env"), probs))
    if "timeout" in raw:
        d = _duration(raw["timeout"], loc.child("timeout"), probs, positive=True)
        if d is not None:
            spec.timeout.CopyFrom(d)
    if "retry" in raw:
        policy = _retry(raw["retry"], loc.child("retry"), probs)
        if policy is not None:
            spec.retry.CopyFrom(policy)
    if "slots" in raw:
        n = _int(raw["slots"], loc.child("slots"), probs, 1, 1_000_000)
        if n is not None:
            spec.slots = n
    if "selector" in raw:
        spec.selector.update(_str_map(raw["selector"], loc.child("selector"), probs))


def convert_action(raw: Any, index: int, probs: Problems) -> workflow_pb2.ActionSpec | None:
    """Converts ``actions[index]``; problems go to ``probs`` (None if it is not a mapping)."""
    loc = _Loc(f"actions[{index}]", f"actions[{index}]")
    if not isinstance(raw, Mapping):
        probs.add(
            loc.path,
            loc.where,
            f"expected a mapping with keys such as id and run, got {_describe(raw)}",
        )
        return None
    action_id = raw.get("id")
    if isinstance(action_id, str) and action_id:
        loc = _Loc(loc.path, f"{loc.head} (id {action_id!r})")
    _check_keys(raw, ACTION_KEYS, loc, "action", probs)
    spec = workflow_pb2.ActionSpec()
    at = loc.child("id")
    if "id" not in raw:
        probs.add(at.path, at.where, "is required")
    elif not isinstance(action_id, str) or not _ID_RE.fullmatch(action_id):
        probs.add(
            at.path,
            at.where,
            "expected 1 to 128 characters of [A-Za-z0-9_.-] starting with a letter or digit,"
            f" got {_describe(action_id)}",
        )
    else:
        spec.id = action_id
    if "needs" in raw:
        spec.needs.extend(_needs(raw["needs"], loc.child("needs"), probs))
    _kind(raw, loc, spec, probs)
    _options(raw, loc, spec, probs)
    return spec


def _check_graph(actions: Sequence[workflow_pb2.ActionSpec], probs: Problems) -> None:
    seen: dict[str, int] = {}
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


def build_spec(doc: Any, source: str, default_name: str) -> workflow_pb2.WorkflowSpec:
    """Converts a whole document, or raises :class:`SpecError` with every problem found."""
    probs = Problems()
    spec = workflow_pb2.WorkflowSpec()
    if not isinstance(doc, Mapping):
        probs.add(
            "",
            "workflow",
            f"expected a mapping with keys {', '.join(TOP_LEVEL_KEYS)}, got {_describe(doc)}",
        )
        raise SpecError(source, probs.items)
    _check_keys(doc, TOP_LEVEL_KEYS, _Loc(""), "top-level", probs)
    name = doc.get("name", default_name)
    if not isinstance(name, str) or not 1 <= len(name) <= 128:
        probs.add("name", "name", f"expected 1 to 128 characters, got {_describe(name)}")
    else:
        spec.name = name
    if "defaults" in doc:
        spec.defaults.CopyFrom(convert_defaults(doc["defaults"], probs))
    if "labels" in doc:
        spec.labels.update(_str_map(doc["labels"], _Loc("labels", field="labels"), probs))
    raw_actions = doc.get("actions")
    if not isinstance(raw_actions, list) or not raw_actions:
        got = "nothing" if raw_actions is None else _describe(raw_actions)
        probs.add("actions", "actions", f"expected a non-empty list of actions, got {got}")
    else:
        for i, raw in enumerate(raw_actions):
            action = convert_action(raw, i, probs)
            if action is not None:
                spec.actions.append(action)
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
