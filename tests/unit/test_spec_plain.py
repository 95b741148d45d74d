"""The converter's fast path (plait.spec.plain) makes the same spec as the full converter, byte
for byte, and declines whatever it does not handle, so errors read as they always did."""

from __future__ import annotations

from typing import Any

import pytest

from plait.spec import SpecError, convert, plain
from plait.v1 import workflow_pb2

ACTIONS: list[Any] = [
    {"id": "a", "run": ["echo", "hi"]},
    {"id": "b", "run": "echo $X | wc", "needs": "a"},
    {"id": "c", "handler": "h", "needs": ["a", "b"], "input": {"k": [1, 2.5, None, "é"]}},
    {"id": "d", "handler": "h", "input": None},
    {"id": "e", "run": ["x", 1, True], "needs": []},  # numbers: the full converter's business
    {"id": "f", "handler": "h", "timeout": "5s"},  # another key: the full converter
    {"id": "g.h-1_x", "handler": "h", "needs": ("a",)},
]

BAD: list[Any] = [
    {"id": "x", "run": ["a"], "handler": "h"},
    {"id": "x", "run": "   "},
    {"id": "x", "run": []},
    {"id": "-x", "handler": "h"},
    {"id": "x", "handler": ""},
    {"id": "x", "handler": "h", "needs": ["a", "a"]},
    {"id": "x", "handler": "h", "needs": [""]},
    {"id": "x", "handler": "h", "input": float("nan")},
    {"id": "x", "handler": "h", "input": {1, 2}},
    {"id": "x", "handler": "h", "needs": 3},
    {"id": "x"},
    ["not", "a", "mapping"],
]


def build(actions: list[Any], monkeypatch: pytest.MonkeyPatch, *, fast: bool) -> Any:
    if not fast:
        monkeypatch.setattr(convert, "add_plain", lambda raw, actions: False)
    try:
        return convert.build_spec({"name": "t", "actions": actions}, "t.yaml", "t")
    except SpecError as err:
        return err.lines
    finally:
        monkeypatch.undo()


def test_the_same_spec_byte_for_byte(monkeypatch: pytest.MonkeyPatch) -> None:
    fast = build(ACTIONS, monkeypatch, fast=True)
    full = build(ACTIONS, monkeypatch, fast=False)
    assert isinstance(fast, workflow_pb2.WorkflowSpec)
    assert fast.SerializeToString(deterministic=True) == full.SerializeToString(deterministic=True)
    assert fast.actions[1].exec.shell and list(fast.actions[2].needs) == ["a", "b"]


@pytest.mark.parametrize("raw", BAD)
def test_a_bad_action_is_declined_and_reported_as_always(
    raw: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = workflow_pb2.WorkflowSpec()
    assert not plain.add_plain(raw, spec.actions)
    assert not spec.actions
    actions = [{"id": "a", "handler": "h"}, raw]
    fast = build(actions, monkeypatch, fast=True)
    assert isinstance(fast, list) and fast  # the error lines
    assert fast == build(actions, monkeypatch, fast=False)
