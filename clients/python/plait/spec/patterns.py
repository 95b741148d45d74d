"""Parallel-execution keys of a workflow document (SDK layer: plait.spec).

The keys that say how actions run together rather than what they run: ``join`` (when an action
with several needs may run), ``map`` (dynamic fan-out over an upstream list), ``resources``,
and the caps shared across workflows (``concurrency_key``, ``lock``, ``semaphores``). Each is
converted to its ``plait.v1`` message with field-path errors, as in :mod:`plait.spec.convert`.
The coordinator re-validates everything at submit; these checks exist to name the file, the
action and the field.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from plait.spec.fields import (
    NAME_RE,
    Loc,
    Problems,
    boolean,
    check_keys,
    describe,
    whole_number,
)
from plait.v1 import workflow_pb2

__all__ = [
    "JOIN_KEYS",
    "MAP_KEYS",
    "MAX_COUNT",
    "PRIORITY_RANGE",
    "SEMAPHORE_KEYS",
    "check_joins",
    "convert_join",
    "convert_map",
    "convert_resources",
    "convert_semaphores",
]

JOIN_KEYS = ("all", "any", "at_least", "cancel_remaining")
MAP_KEYS = ("over", "max_parallel", "max_items")
SEMAPHORE_KEYS = ("name", "permits", "capacity")
MAX_COUNT = 1_000_000  # upper bound of counts, widths, permits and capacities
PRIORITY_RANGE = (-1000, 1000)

_JOIN_KINDS = {
    "all": workflow_pb2.JOIN_KIND_ALL,
    "any": workflow_pb2.JOIN_KIND_ANY,
    "at_least": workflow_pb2.JOIN_KIND_AT_LEAST,
}
_JOIN_SHAPES = "all, any, {any: {cancel_remaining: true}}, {at_least: 2} or {at_least: 0.9}"
_PATH_PART_RE = re.compile(r"[^.\s]+")


# -- join ---------------------------------------------------------------------------------


def convert_join(value: Any, loc: Loc, probs: Problems) -> workflow_pb2.JoinPolicy | None:
    """``join``: ``all`` | ``any`` | ``{any: {cancel_remaining: true}}`` | ``{at_least: M}``.

    ``at_least`` takes a count (whole number >= 1), a fraction in (0, 1] or a percentage string
    (``"90%"``); ``cancel_remaining: true`` may sit beside ``any`` or ``at_least``. Whether a
    count fits the number of needs is a whole-graph check (:func:`check_joins`).
    """
    if isinstance(value, str):
        if value in ("all", "any"):
            return workflow_pb2.JoinPolicy(kind=_JOIN_KINDS[value])
        hint = " (at_least needs a count or fraction)" if value == "at_least" else ""
        loc.add(probs, f"expected {_JOIN_SHAPES}, got {value!r}{hint}")
        return None
    if not isinstance(value, Mapping):
        loc.add(probs, f"expected {_JOIN_SHAPES}, got {describe(value)}")
        return None
    check_keys(value, JOIN_KEYS, loc, "join", probs)
    kinds = [k for k in _JOIN_KINDS if k in value]
    if len(kinds) != 1:
        got = " and ".join(kinds) if kinds else "none"
        loc.add(probs, f"exactly one of all, any or at_least is required, got {got}")
        return None
    kind = kinds[0]
    policy = workflow_pb2.JoinPolicy(kind=_JOIN_KINDS[kind])
    cancel = None
    if "cancel_remaining" in value:
        cancel = boolean(value["cancel_remaining"], loc.child("cancel_remaining"), probs)
    inner = value[kind]
    at = loc.child(kind)
    if kind == "at_least":
        _at_least(inner, at, probs, policy)
    elif isinstance(inner, Mapping) and kind == "any":
        check_keys(inner, ("cancel_remaining",), at, "join.any", probs)
        if "cancel_remaining" in inner:
            inner_at = at.child("cancel_remaining")
            if cancel is not None:
                inner_at.add(probs, "cancel_remaining is given twice")
            cancel = boolean(inner["cancel_remaining"], inner_at, probs)
    elif not (inner is None or inner is True or (isinstance(inner, Mapping) and not inner)):
        shape = "nothing or {cancel_remaining: true}" if kind == "any" else "nothing"
        at.add(probs, f"expected {shape}, got {describe(inner)}")
    if cancel:
        if kind == "all":
            loc.child("cancel_remaining").add(
                probs, "applies to any and at_least joins only (all waits for every need)"
            )
        else:
            policy.cancel_remaining = True
    return policy


def _at_least(value: Any, loc: Loc, probs: Problems, policy: workflow_pb2.JoinPolicy) -> None:
    if isinstance(value, str) and value.strip().endswith("%"):
        with contextlib.suppress(ValueError):
            value = float(value.strip()[:-1]) / 100
    if isinstance(value, bool) or not isinstance(value, int | float):
        loc.add(
            probs,
            "expected a count (a whole number >= 1), a fraction in (0, 1] or a percentage,"
            f" got {describe(value)}",
        )
    elif isinstance(value, int):
        n = whole_number(value, loc, probs, 1, MAX_COUNT)
        if n is not None:
            policy.at_least_count = n
    elif 0 < value <= 1:
        policy.at_least_fraction = value
    else:
        loc.add(
            probs,
            "expected a fraction in (0, 1] (or a whole number for a count, or a percentage),"
            f" got {value!r}",
        )


def check_joins(actions: Sequence[workflow_pb2.ActionSpec], probs: Problems) -> None:
    """Whole-graph join checks: a join needs needs, and a count no larger than there are.

    A map action's join is over its children, whose number is known only at runtime, so its
    count is not bounded here (the coordinator checks it against the list).
    """
    for i, a in enumerate(actions):
        if not a.HasField("join") or a.HasField("map"):
            continue
        at = Loc(f"actions[{i}].join", f"actions[{i}] (id {a.id!r})", "join")
        if not a.needs:
            at.add(probs, "a join applies to an action with needs; this one has none")
        elif a.join.at_least_count > len(a.needs):
            at.child("at_least").add(
                probs,
                f"at_least {a.join.at_least_count} is more than the {len(a.needs)} need(s) this"
                " action has",
            )


# -- map ----------------------------------------------------------------------------------


def convert_map(
    value: Any, needs: Sequence[str], loc: Loc, probs: Problems
) -> workflow_pb2.MapSpec | None:
    """``map``: ``"<need>.<path>"``, or ``{over: ..., max_parallel: N, max_items: N}``."""
    out = workflow_pb2.MapSpec()
    if isinstance(value, str):
        over, over_at = value, loc
    elif isinstance(value, Mapping):
        check_keys(value, MAP_KEYS, loc, "map", probs)
        over_at = loc.child("over")
        if "over" not in value:
            over_at.add(probs, "is required: '<need>.<path>' naming a list, such as list.images")
            over = None
        else:
            over = value["over"]
        for key in ("max_parallel", "max_items"):
            if key in value:
                n = whole_number(value[key], loc.child(key), probs, 1, MAX_COUNT)
                if n is not None:
                    setattr(out, key, n)
    else:
        loc.add(
            probs,
            "expected '<need>.<path>' such as list.images, or a mapping with keys"
            f" {', '.join(MAP_KEYS)}, got {describe(value)}",
        )
        return None
    if over is not None and _over(over, needs, over_at, probs):
        out.over = over
    return out


def _over(over: Any, needs: Sequence[str], loc: Loc, probs: Problems) -> bool:
    if not isinstance(over, str) or not over:
        loc.add(probs, f"expected '<need>.<path>' such as list.images, got {describe(over)}")
        return False
    if over in needs:
        loc.add(probs, f"names need {over!r} but no list in its outputs: write {over}.<key>")
        return False
    # The need is the part before the first dot (as the coordinator reads it), so a need whose
    # id contains a dot cannot be mapped over.
    head, _, path = over.partition(".")
    if head not in needs:
        if not needs:
            loc.add(probs, f"maps over need {head!r}, but the action has no needs: add it to needs")
        elif any(over.startswith(n + ".") for n in needs):
            loc.add(
                probs,
                "the need is the part before the first dot, so a need whose id contains a dot"
                f" cannot be mapped over; got {over!r}",
            )
        else:
            loc.add(
                probs,
                f"must start with one of the action's needs ({', '.join(needs)}) and a dot,"
                f" got {over!r}",
            )
        return False
    if not all(_PATH_PART_RE.fullmatch(p) for p in path.split(".")):
        loc.add(probs, f"expected a dotted path into the need's outputs, got {over!r}")
        return False
    return True


# -- resources and semaphores ---------------------------------------------------------------


def convert_resources(value: Any, loc: Loc, probs: Problems) -> dict[str, float]:
    """``resources``: names (``cpu``, ``memory_mb``, ``gpu``, ...) to numbers >= 0."""
    if not isinstance(value, Mapping):
        loc.add(probs, f"expected a mapping of resource names to numbers, got {describe(value)}")
        return {}
    out: dict[str, float] = {}
    for name, amount in value.items():
        at = loc.child(str(name))
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            at.add(
                probs,
                "resource names are 1 to 128 of [A-Za-z0-9_.-] starting with a letter or digit,"
                f" got {name!r}",
            )
        elif name == "memory":
            at.add(probs, "write memory as memory_mb, a number of MiB (memory_mb: 4096)")
        elif (
            isinstance(amount, bool)
            or not isinstance(amount, int | float)
            or not 0 <= amount <= 1e15
        ):
            unit = " (a number of MiB)" if name == "memory_mb" else ""
            at.add(probs, f"expected a number >= 0{unit}, got {describe(amount)}")
        else:
            out[name] = float(amount)
    return out


def _semaphore_name(value: Any, loc: Loc, probs: Problems) -> str | None:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        loc.add(
            probs,
            "expected a name: 1 to 128 of [A-Za-z0-9_.-] starting with a letter or digit,"
            f" got {describe(value)}",
        )
        return None
    return value


def _semaphore(item: Any, loc: Loc, probs: Problems) -> workflow_pb2.SemaphoreRequest | None:
    if isinstance(item, str):
        name = _semaphore_name(item, loc, probs)
        if name is None:
            return None
        return workflow_pb2.SemaphoreRequest(name=name, permits=1, capacity=1)
    if not isinstance(item, Mapping):
        loc.add(
            probs,
            f"expected a name or a mapping with keys {', '.join(SEMAPHORE_KEYS)},"
            f" got {describe(item)}",
        )
        return None
    check_keys(item, SEMAPHORE_KEYS, loc, "semaphore", probs)
    if "name" not in item:
        loc.child("name").add(probs, "is required")
        return None
    name = _semaphore_name(item["name"], loc.child("name"), probs)
    permits = whole_number(item.get("permits", 1), loc.child("permits"), probs, 1, MAX_COUNT)
    capacity = whole_number(item.get("capacity", 1), loc.child("capacity"), probs, 1, MAX_COUNT)
    if name is None or permits is None or capacity is None:
        return None
    if permits > capacity:
        loc.child("permits").add(
            probs, f"{permits} permits can never be had from a capacity of {capacity}"
        )
        return None
    return workflow_pb2.SemaphoreRequest(name=name, permits=permits, capacity=capacity)


def _locks(
    locks: Any, at: Loc, probs: Problems
) -> list[tuple[workflow_pb2.SemaphoreRequest, Loc, str]]:
    items = [(locks, at)] if isinstance(locks, str) else None
    if isinstance(locks, list | tuple) and locks:
        items = [(x, at.item(i)) for i, x in enumerate(locks)]
    if items is None:
        at.add(probs, f"expected a lock name or a list of names, got {describe(locks)}")
        return []
    out = []
    for value, item_at in items:
        name = _semaphore_name(value, item_at, probs)
        if name is not None:
            req = workflow_pb2.SemaphoreRequest(name=name, permits=1, capacity=1)
            out.append((req, item_at, "lock"))
    return out


def convert_semaphores(
    raw: Mapping[str, Any], loc: Loc, probs: Problems
) -> list[workflow_pb2.SemaphoreRequest]:
    """``concurrency_key``/``concurrency_limit``, ``lock`` and ``semaphores``, in that order.

    ``concurrency_key: K`` with ``concurrency_limit: N`` (default 1) is one permit of a
    semaphore ``K`` of capacity N; ``lock: L`` (or a list of names) is one permit of a
    semaphore of capacity 1; ``semaphores`` lists names or ``{name, permits, capacity}``.
    """
    found: list[tuple[workflow_pb2.SemaphoreRequest, Loc, str]] = []
    if "concurrency_key" in raw:
        at = loc.child("concurrency_key")
        name = _semaphore_name(raw["concurrency_key"], at, probs)
        limit: int | None = 1
        if "concurrency_limit" in raw:
            limit = whole_number(
                raw["concurrency_limit"], loc.child("concurrency_limit"), probs, 1, MAX_COUNT
            )
        if name is not None and limit is not None:
            req = workflow_pb2.SemaphoreRequest(name=name, permits=1, capacity=limit)
            found.append((req, at, "concurrency_key"))
    elif "concurrency_limit" in raw:
        loc.child("concurrency_limit").add(
            probs, "needs a concurrency_key naming what the limit is shared by"
        )
    if "lock" in raw:
        found.extend(_locks(raw["lock"], loc.child("lock"), probs))
    if "semaphores" in raw:
        value = raw["semaphores"]
        at = loc.child("semaphores")
        if not isinstance(value, list | tuple) or not value:
            at.add(
                probs,
                "expected a list of names or of mappings with keys"
                f" {', '.join(SEMAPHORE_KEYS)}, got {describe(value)}",
            )
        else:
            for i, item in enumerate(value):
                request = _semaphore(item, at.item(i), probs)
                if request is not None:
                    found.append((request, at.item(i), "semaphores"))
    first: dict[str, str] = {}
    out: list[workflow_pb2.SemaphoreRequest] = []
    for req, at, key in found:
        if req.name in first:
            at.add(probs, f"semaphore {req.name!r} is already requested by {first[req.name]}")
            continue
        first[req.name] = key
        out.append(req)
    return out
