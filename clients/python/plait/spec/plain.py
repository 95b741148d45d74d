"""The converter's fast path for plain actions (SDK layer: plait.spec).

A generated workflow of 100,000 actions is mostly actions with an id, a command or a handler,
needs and perhaps an input. :func:`add_plain` converts such an action straight into the spec,
with no location bookkeeping, when every check the full converter
(:func:`plait.spec.convert.convert_action`) would make passes at a glance; for anything else,
and for anything wrong, it declines and the full converter handles the action, naming the
file, the action and the field as always. Either way the spec is the same, byte for byte
(tests/unit/test_spec_plain.py holds it to that).
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from plait.spec.fields import NAME_RE, scalar_str
from plait.v1 import workflow_pb2

__all__ = ["PLAIN_KEYS", "add_plain"]

PLAIN_KEYS = frozenset({"id", "needs", "run", "handler", "input"})
# What convert._options does: json.dumps(value, allow_nan=False, separators=(",", ":")).
_encode = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode
_is_name = NAME_RE.fullmatch


def _needs(raw: dict[Any, Any]) -> list[str] | tuple[str, ...] | None:
    """The action's needs when they are plain (distinct non-empty ids), else None."""
    needs = raw.get("needs", ())
    if type(needs) is str:
        needs = (needs,)
    elif type(needs) is not list and type(needs) is not tuple:
        return None
    for need in needs:
        if type(need) is not str or not need:
            return None
    if len(needs) > 1 and len(set(needs)) != len(needs):
        return None
    return needs  # type: ignore[no-any-return]  # strings, each checked above


def _argv(run: Any) -> tuple[list[str], bool] | None:
    """``run`` as (argv, shell) when it is a non-blank string or a non-empty list of strings,
    numbers and booleans (as the full converter writes them: ``[true]`` runs ``true``)."""
    if type(run) is str:
        return ([run], True) if run.strip() else None
    if type(run) is not list or not run:
        return None
    for arg in run:
        if type(arg) is not str:
            break
    else:
        return run, False
    argv = []
    for arg in run:
        t = type(arg)
        if t is str:
            argv.append(arg)
        elif t is bool or t is int or t is float:
            argv.append(scalar_str(arg))
        else:
            return None
    return argv, False


def add_plain(raw: Any, actions: RepeatedCompositeFieldContainer[workflow_pb2.ActionSpec]) -> bool:
    """Appends ``raw`` to ``actions`` when it is a plain, valid action; else False, and
    nothing was added."""
    if type(raw) is not dict or not raw.keys() <= PLAIN_KEYS:
        return False
    action_id = raw.get("id")
    if type(action_id) is not str or not _is_name(action_id):
        return False
    needs = _needs(raw)
    if needs is None:
        return False
    input_json = ""
    if "input" in raw:
        try:
            input_json = _encode(raw["input"])
        except (TypeError, ValueError):
            return False
    if "run" in raw:
        argv = None if "handler" in raw else _argv(raw["run"])
        if argv is None:
            return False
        a = actions.add(id=action_id, needs=needs, input_json=input_json)
        a.exec.argv.extend(argv[0])
        if argv[1]:
            a.exec.shell = True
        return True
    handler = raw.get("handler")
    if type(handler) is not str or not handler.strip():
        return False
    actions.add(id=action_id, needs=needs, handler=handler, input_json=input_json)
    return True
