"""A lease's inputs and size, built and checked at grant time (pure core, lease aggregate).

The inputs (:func:`inputs_json`) are built here by concatenation, each need's outputs as kept
(core.outputs).

A lease carries its action's spec and its inputs: the action's input and every need's outputs.
One that would not fit one message to its worker (``max_lease_bytes``, the gRPC message limit
less room for the rest of a grant) is never sent: the action fails there and then, naming the
limit and its needs with their sizes, largest first. That is not an attempt (no fencing token, no
retry, no lease loss: the same needs would make the same lease again), and replay applies the
journalled failure as it is. Needs' sizes are known without their text (core.outputs), so a lease
made of large outputs is judged before any of them is read back from the journal.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from google.rpc import code_pb2, error_details_pb2, status_pb2

from plait.coordinator.core import transitions as t
from plait.coordinator.core.model import ActionRecord, Outcome
from plait.coordinator.core.workflow_env import workflow_env_bytes
from plait.errors import ERROR_DOMAIN
from plait.jsonlimits import utf8_len
from plait.v1 import workflow_pb2 as pb

STATE_NAME = t.STATE_NAME

if TYPE_CHECKING:
    from plait.coordinator.core.state import SchedulerState

LEASE_TOO_LARGE = "LEASE_TOO_LARGE"  # ErrorInfo.reason of an action whose lease is too large
LISTED_NEEDS = 20  # needs a too-large lease's reason names, largest first


def checked_inputs(st: SchedulerState, a: ActionRecord, out: Outcome) -> tuple[str, int] | None:
    """The inputs of a lease of ``a`` and the lease's size (inputs plus spec, in bytes), or
    None when that would pass ``max_lease_bytes``: then ``a`` has failed and nothing is granted.
    """
    limit = st.config.max_lease_bytes
    for n in a.needs:
        if n.outputs_bytes and not n.outputs_json:
            # Large outputs among the needs: judge the size before reading any of them.
            size = (
                utf8_len(inputs_json(st, a, skeleton=True))
                + sum(m.outputs_bytes or 2 for m in a.needs)  # "{}" when a need has none
                + spec_bytes(a)
            )
            if size > limit:
                lease_too_large(st, a, size, out)
                return None
            break
    inputs = inputs_json(st, a)
    size = utf8_len(inputs) + spec_bytes(a)
    if size > limit:
        lease_too_large(st, a, size, out)
        return None
    return inputs, size


def lease_too_large(st: SchedulerState, a: ActionRecord, size: int, out: Outcome) -> None:
    """Fails ``a`` (READY -> FAILED): its lease of ``size`` bytes passes ``max_lease_bytes``."""
    limit = st.config.max_lease_bytes
    needs = sorted(a.needs, key=lambda n: n.outputs_bytes, reverse=True)
    listed = ", ".join(f"{n.spec.id} {n.outputs_bytes} bytes" for n in needs[:LISTED_NEEDS])
    if len(needs) > LISTED_NEEDS:
        rest = needs[LISTED_NEEDS:]
        listed += f" and {len(rest)} more ({sum(n.outputs_bytes for n in rest)} bytes)"
    other = size - sum(n.outputs_bytes for n in needs)
    why = (
        f"the lease would be {size} bytes; the limit max_lease_bytes is {limit}"
        f" (needs' outputs, largest first: {listed or 'none'}; the rest (the action's input and"
        f" spec): {other} bytes)"
    )
    err = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=why)
    info = error_details_pb2.ErrorInfo(reason=LEASE_TOO_LARGE, domain=ERROR_DOMAIN)
    info.metadata["limit"] = "max_lease_bytes"
    info.metadata["max_lease_bytes"] = str(limit)
    info.metadata["lease_bytes"] = str(size)
    err.details.add().Pack(info)
    st.finish_action(
        a,
        t.FAILED,
        pb.EVENT_TYPE_ACTION_FINISHED,
        out,
        why=pb.EVENT_REASON_LEASE_TOO_LARGE,
        error=err,
        reason=why,
    )


def inputs_json(st: SchedulerState, a: ActionRecord, *, skeleton: bool = False) -> str:
    """``{"input": …, ["item": …,] "needs": {id: {"state", "outputs"[, "error"]}}}``.

    Built by concatenation (every piece is already JSON) so the hot path parses nothing.
    Every need appears, whatever its state: a join sees partial success explicitly.
    ``skeleton``: every need's outputs left out (to size a lease before reading them).
    """
    parts = []
    for n in a.needs:
        err = f',"error":{json.dumps(n.error.message)}' if n.error is not None else ""
        if skeleton:
            outputs = ""
        else:  # large outputs are read back (core.outputs); small ones are right here
            outputs = n.outputs_json or (st.outputs.text(n) if n.outputs_bytes else "{}")
        parts.append(f'"{n.spec.id}":{{"state":"{STATE_NAME[n.state]}","outputs":{outputs}{err}}}')
    item = f',"item":{a.item_json}' if a.parent is not None else ""
    return f'{{"input":{a.spec.input_json or "null"}{item},"needs":{{{",".join(parts)}}}}}'


def lease_inputs(st: SchedulerState, a: ActionRecord) -> tuple[str, int]:
    """A lease's inputs, and its size: the inputs plus the action spec, in bytes."""
    inputs = inputs_json(st, a)
    return inputs, utf8_len(inputs) + spec_bytes(a)


def spec_bytes(a: ActionRecord) -> int:
    """The size of the spec a lease of ``a`` carries: its own, plus the workflow's env."""
    return a.spec.ByteSize() + workflow_env_bytes(a.workflow.spec.env)
