"""Field-level building blocks of the workflow converter (SDK layer: plait.spec).

Where a value sits (:class:`Loc`), how problems are collected (:class:`Problems`) and reported
(:class:`SpecError`), and the checks every part of a workflow document shares: known keys,
durations, whole numbers, plain numbers, names and string mappings. The converters of
:mod:`plait.spec.convert` (the document and its actions) and :mod:`plait.spec.patterns` (joins,
maps, resources, semaphores) are built from these.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from google.protobuf import duration_pb2

from plait import durations
from plait.errors import FieldViolation, InvalidArgumentError
from plait.ids import ID_RE

__all__ = [
    "NAME_RE",
    "UNSUPPORTED_KEYS",
    "ActionRef",
    "Loc",
    "Problems",
    "SpecError",
    "boolean",
    "check_keys",
    "describe",
    "duration",
    "number",
    "scalar_str",
    "str_map",
    "whole_number",
]

# Keys the format reserves for features not built yet: refused with a message that says so.
UNSUPPORTED_KEYS: Mapping[str, str] = {}

# Names of actions, semaphores and resources follow the id rule (plait.ids).
NAME_RE = ID_RE


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
class Loc:
    """Where a value sits: its field path, and how to say it to a person."""

    path: str  # actions[2].retry.backoff
    head: str = ""  # actions[2] (id 'resize')
    field: str = ""  # retry.backoff

    @property
    def where(self) -> str:
        """The place as a person reads it: ``actions[2] (id 'resize'): retry.backoff``."""
        if self.head and self.field:
            return f"{self.head}: {self.field}"
        return self.head or self.field

    def child(self, key: str) -> Loc:
        """The location of ``key`` inside this mapping."""
        path = f"{self.path}.{key}" if self.path else key
        field = f"{self.field}.{key}" if self.field else key
        return Loc(path, self.head, field)

    def item(self, index: int) -> Loc:
        """The location of item ``index`` of this list."""
        return Loc(f"{self.path}[{index}]", self.head, f"{self.field}[{index}]")

    def add(self, probs: Problems, description: str) -> None:
        """Records a problem at this location."""
        probs.add(self.path, self.where, description)


def describe(value: Any) -> str:
    """A value as an error message shows it: mappings and lists by kind, scalars by repr."""
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return repr(value)


def check_keys(
    raw: Mapping[Any, Any], allowed: Sequence[str], loc: Loc, what: str, probs: Problems
) -> None:
    """Refuses every key of ``raw`` not in ``allowed``, listing the allowed ones."""
    for key in raw:
        if key in allowed:
            continue
        at = loc.child(str(key))
        if key in UNSUPPORTED_KEYS:
            at.add(
                probs,
                f"'{key}' ({UNSUPPORTED_KEYS[key]}) is not supported yet; allowed {what} keys:"
                f" {', '.join(allowed)}",
            )
        else:
            at.add(probs, f"unknown key {key!r}; allowed {what} keys: {', '.join(allowed)}")


def duration(value: Any, loc: Loc, probs: Problems, *, positive: bool) -> Any:
    """A duration (``250ms``, ``2s``, ``5m``, seconds, or a ``timedelta``) as a proto Duration."""
    try:
        if isinstance(value, timedelta):
            value = value.total_seconds()
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            d = durations.parse_duration(value)
            if d.total_seconds() < 0 or (positive and d.total_seconds() == 0):
                kind = "greater than zero" if positive else "zero or more"
                loc.add(probs, f"must be {kind}, got {value!r}")
                return None
            out: duration_pb2.Duration = durations.to_proto(d)
            return out
    except ValueError:
        pass
    loc.add(probs, f"expected a duration such as 250ms, 2s or 5m, got {describe(value)}")
    return None


def whole_number(value: Any, loc: Loc, probs: Problems, lo: int, hi: int) -> int | None:
    """A whole number in ``lo..hi`` (booleans refused), or None after recording the problem."""
    if isinstance(value, bool) or not isinstance(value, int):
        loc.add(probs, f"expected a whole number, got {describe(value)}")
        return None
    if not lo <= value <= hi:
        loc.add(probs, f"must be between {lo} and {hi}, got {value}")
        return None
    return value


def number(value: Any, loc: Loc, probs: Problems, *, what: str) -> float | None:
    """A finite number (booleans refused), or None after recording the problem."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        loc.add(probs, f"expected {what}, got {describe(value)}")
        return None
    return float(value)


def scalar_str(value: Any) -> str | None:
    """Strings as they are; YAML numbers and booleans as a person typed them; else None."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    return None


def str_map(value: Any, loc: Loc, probs: Problems) -> dict[str, str]:
    """A mapping of non-empty names to strings (numbers and booleans kept as typed)."""
    if not isinstance(value, Mapping):
        loc.add(probs, f"expected a mapping of names to strings, got {describe(value)}")
        return {}
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not k:
            loc.add(probs, f"keys must be non-empty strings, got {k!r}")
            continue
        s = scalar_str(v)
        if s is None:
            loc.child(k).add(probs, f"expected a string, got {describe(v)}")
            continue
        out[k] = s
    return out


def boolean(value: Any, loc: Loc, probs: Problems) -> bool | None:
    """``true`` or ``false``, or None after recording the problem."""
    if not isinstance(value, bool):
        loc.add(probs, f"expected true or false, got {describe(value)}")
        return None
    return value
