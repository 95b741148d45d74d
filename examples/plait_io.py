"""Reading inputs and writing outputs the way a Plait exec action does (example helper).

A worker hands an exec action its inputs as JSON -- ``{"input": <static input>, "needs":
{<id>: {"state": "ACTION_STATE_SUCCEEDED", "outputs": {...}}}}`` -- on stdin, in the file named
by ``$PLAIT_INPUTS_FILE`` and (when small) in ``$PLAIT_INPUTS`` itself, and takes the action's
outputs as a JSON object from the file named by ``$PLAIT_OUTPUT``. A child of a ``map`` action
also finds its item in its inputs (``"item"``) and, as JSON, in ``$PLAIT_ITEM``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def read_inputs() -> dict[str, Any]:
    """The action's inputs: ``$PLAIT_INPUTS_FILE``, else ``$PLAIT_INPUTS``, else stdin."""
    path = os.environ.get("PLAIT_INPUTS_FILE", "")
    inline = os.environ.get("PLAIT_INPUTS", "")
    if path:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    elif inline:
        text = inline
    elif not sys.stdin.isatty():
        text = sys.stdin.read()
    else:
        text = ""
    data = json.loads(text) if text.strip() else {}
    data.setdefault("input", None)
    data.setdefault("needs", {})
    return data


def item() -> Any:
    """A map child's item: ``$PLAIT_ITEM`` (JSON), else the ``item`` of its inputs."""
    raw = os.environ.get("PLAIT_ITEM")
    if raw:
        return json.loads(raw)
    return read_inputs().get("item")


def write_outputs(outputs: dict[str, Any]) -> None:
    """Writes the action's outputs to ``$PLAIT_OUTPUT`` (to stdout when it is not set)."""
    path = os.environ.get("PLAIT_OUTPUT")
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(outputs, f)
    else:
        print(json.dumps(outputs))
