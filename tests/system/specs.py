"""Workflow specs for the system tests: exec actions running Python, commands and handlers."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf import duration_pb2

from plait.v1 import workflow_pb2 as wf

# Prelude for Python exec actions: read this attempt's inputs, write its outputs.
ACTION_PRELUDE = """
import json, os, sys
def plait_inputs():
    raw = os.environ.get("PLAIT_INPUTS")
    if raw and os.path.isfile(raw):
        with open(raw) as f:
            return json.load(f)
    if raw:
        return json.loads(raw)
    return json.load(sys.stdin)
def plait_output(obj):
    with open(os.environ["PLAIT_OUTPUT"], "w") as f:
        json.dump(obj, f)
"""


def python_action(
    action_id: str,
    code: str,
    *,
    needs: Sequence[str] = (),
    input_json: str = "",
    timeout_s: float | None = None,
    **fields: Any,
) -> wf.ActionSpec:
    """An exec action running ``code`` (after :data:`ACTION_PRELUDE`) with this interpreter."""
    action = wf.ActionSpec(
        id=action_id,
        needs=list(needs),
        exec=wf.ExecAction(argv=[sys.executable, "-c", ACTION_PRELUDE + code]),
        input_json=input_json,
        **fields,
    )
    if timeout_s is not None:
        action.timeout.CopyFrom(duration_pb2.Duration(seconds=int(timeout_s)))
    return action


def command_action(action_id: str, argv: Sequence[str], needs: Sequence[str] = ()) -> wf.ActionSpec:
    """An exec action running ``argv`` directly."""
    return wf.ActionSpec(id=action_id, needs=list(needs), exec=wf.ExecAction(argv=list(argv)))


def handler_action(action_id: str, handler: str, needs: Sequence[str] = ()) -> wf.ActionSpec:
    """An action served by a named SDK handler."""
    return wf.ActionSpec(id=action_id, needs=list(needs), handler=handler)


def workflow(name: str, actions: Iterable[wf.ActionSpec]) -> wf.WorkflowSpec:
    return wf.WorkflowSpec(name=name, actions=list(actions))
