"""Fast paths of submit validation for the common case (SDK layer: plait.spec).

:func:`plait.spec.validate.validate_submit` checks every field of every action through one
generator per action (about 13 µs each, 1.3 s for 100,000 actions). Most actions of a large
workflow are plain (an id, needs, a command or a handler, perhaps an input) and valid; these
helpers say so in a few microseconds, and answer "not sure" (False, None) for anything else,
which then takes the full path. They never report a problem themselves, so every message still
comes from the full checks.
"""

from __future__ import annotations

from plait.ids import ID_RE
from plait.jsonlimits import json_problem, utf8_len
from plait.limits import Limits
from plait.v1 import workflow_pb2

__all__ = ["PLAIN_FIELDS", "needs_graph", "ordered_depth", "plain_action_ok"]

PLAIN_FIELDS = frozenset({"id", "needs", "exec", "handler", "input_json"})
_id_ok = ID_RE.fullmatch


def _good_id(value: str) -> bool:
    return _id_ok(value) is not None and ".." not in value


def plain_action_ok(a: workflow_pb2.ActionSpec, limits: Limits) -> bool:
    """True when ``a`` sets only :data:`PLAIN_FIELDS` and the full checks would find nothing
    wrong with it (its needs' ids are checked against the others separately)."""
    kind = ""
    for fd, _ in a.ListFields():
        name = fd.name
        if name not in PLAIN_FIELDS:
            return False
        if name in ("exec", "handler"):
            kind = name
    if not _good_id(a.id) or len(a.needs) > limits.max_fan_in:
        return False
    if kind == "handler":
        if not _good_id(a.handler):
            return False
    elif kind == "exec":
        e = a.exec
        argv = e.argv
        if not argv or len(argv) > limits.max_argv:
            return False
        joined = "".join(argv)
        if "\0" in joined or utf8_len(joined) > limits.max_argv_bytes:
            return False
        for fd, _ in e.ListFields():
            if fd.name not in ("argv", "shell"):
                return False
    else:
        return False
    text = a.input_json
    return not text or (
        json_problem(
            text,
            max_bytes=limits.max_input_bytes,
            bytes_limit="max_input_bytes",
            max_depth=limits.max_json_depth,
        )
        is None
    )


def needs_graph(
    spec: workflow_pb2.WorkflowSpec, index: dict[str, int]
) -> dict[str, list[str]] | None:
    """Each action's needs, when every need names another known action once; else None."""
    known = index.__contains__
    needs: dict[str, list[str]] = {}
    for a in spec.actions:
        aid = a.id
        deps = list(a.needs)
        if deps and (
            aid in deps
            or (len(deps) > 1 and len(set(deps)) != len(deps))
            or not all(map(known, deps))
        ):
            return None
        if aid not in needs:
            needs[aid] = deps
    return needs


def ordered_depth(ids: list[str], needs: dict[str, list[str]]) -> int | None:
    """The longest needs-chain, when every action comes after all it needs (as generated
    workflows list them, and then there is no cycle); else None."""
    depth: dict[str, int] = {}
    best = 0
    for node in ids:
        deps = needs[node]
        if deps:
            try:
                d = 1 + max(map(depth.__getitem__, deps))
            except KeyError:  # a need further down the list: the general search decides
                return None
        else:
            d = 1
        depth[node] = d
        best = max(best, d)
    return best
