"""A submission's limits, checked before it is sent, and how a large one travels (SDK layer).

:func:`check_spec` refuses, on the client and before a byte goes out, a spec the coordinator
would refuse for its size: more than ``max_actions`` actions, more than ``max_spec_bytes`` in
all, or an action's ``input_json`` over ``max_input_bytes`` (a 50 MB input used to be sent for
half a minute before the answer came back). The numbers are the coordinator's defaults
(:class:`plait.limits.Limits`), or the ``PLAIT_MAX_ACTIONS``, ``PLAIT_MAX_SPEC_BYTES`` and
``PLAIT_MAX_INPUT_BYTES`` variables the coordinator reads too, so a client pointed at a
coordinator with raised limits can be given the same ones (:meth:`SubmitLimits.from_env`).

A spec too large for one gRPC message (more than :data:`STREAM_ABOVE_BYTES`) goes through
``SubmitWorkflowStream``: serialized once and sent in pieces of :data:`CHUNK_BYTES`
(:func:`stream_requests`), which the coordinator joins, parses and validates once, then
journals exactly as a ``SubmitWorkflow``. Why pieces rather than a compressed message with a
raised limit: docs/protocol.md, "Large submissions".
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from plait.errors import ConfigError, FieldViolation, InvalidArgumentError
from plait.jsonlimits import utf8_len
from plait.limits import MAX_MESSAGE_BYTES, Limits
from plait.sizes import parse_size
from plait.v1 import workflow_pb2, workflow_service_pb2

__all__ = [
    "CHUNK_BYTES",
    "STREAM_ABOVE_BYTES",
    "SubmitLimits",
    "check_spec",
    "stream_requests",
]

# A request whose spec is larger than this goes in pieces: the message limit, less room for
# the request's other fields and what gRPC adds.
STREAM_ABOVE_BYTES = MAX_MESSAGE_BYTES - 64 * 1024
CHUNK_BYTES = 1024 * 1024  # bytes of the serialized spec per SubmitWorkflowStream message

_DEFAULTS = Limits()
_ENV = {
    "max_actions": "PLAIT_MAX_ACTIONS",
    "max_spec_bytes": "PLAIT_MAX_SPEC_BYTES",
    "max_input_bytes": "PLAIT_MAX_INPUT_BYTES",
}


@dataclass(frozen=True, slots=True)
class SubmitLimits:
    """The coordinator limits a client checks a spec against before sending it."""

    max_actions: int = _DEFAULTS.max_actions
    max_spec_bytes: int = _DEFAULTS.max_spec_bytes
    max_input_bytes: int = _DEFAULTS.max_input_bytes

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SubmitLimits:
        """The defaults, each replaced by its ``PLAIT_*`` variable when that is set.

        Raises:
            ConfigError: a variable is not a whole number (``max_actions``) or a size such as
                ``64MiB`` (the others), naming it.
        """
        env = os.environ if environ is None else environ
        values: dict[str, int] = {}
        for name, var in _ENV.items():
            raw = env.get(var, "").strip()
            if not raw:
                continue
            try:
                value = int(raw) if name == "max_actions" else parse_size(raw, field=var)
            except ValueError:
                what = "a whole number" if name == "max_actions" else "a size such as 64MiB"
                raise ConfigError(f"{var}: expected {what}, got {raw!r}") from None
            if value < 1:
                raise ConfigError(f"{var}: must be at least 1, got {raw!r}")
            values[name] = value
        return cls(**values)


def _input_violations(spec: workflow_pb2.WorkflowSpec, limit: int) -> Iterator[FieldViolation]:
    # Only an action larger than the limit can hold an input over it: sizes in C, then a look
    # at those few.
    sizes = list(map(workflow_pb2.ActionSpec.ByteSize, spec.actions))
    for i in [i for i, n in enumerate(sizes) if n > limit]:
        a = spec.actions[i]
        targets = [(f"spec.actions[{i}]", a)]
        if a.HasField("pipeline"):
            targets += [
                (f"spec.actions[{i}].pipeline.stages[{k}]", s)
                for k, s in enumerate(a.pipeline.stages)
            ]
        for path, runs in targets:
            text = runs.input_json
            # Characters are a lower bound of UTF-8 bytes: most inputs are decided without
            # encoding anything.
            if len(text) > limit or (len(text) * 4 > limit and utf8_len(text) > limit):
                size = utf8_len(text)
                yield FieldViolation(
                    f"{path}.input_json",
                    f"is {size:,} bytes; the limit max_input_bytes is {limit:,}",
                )


def check_spec(spec: workflow_pb2.WorkflowSpec, limits: SubmitLimits) -> int:
    """The spec's serialized size, once it is known to fit ``limits``.

    Raises:
        InvalidArgumentError: naming each field over its limit and the limit (``spec.actions:
            has 100,001 actions; the limit max_actions is 100,000``); nothing was sent.
    """
    problems: list[FieldViolation] = []
    n = len(spec.actions)
    if n > limits.max_actions:
        problems.append(
            FieldViolation(
                "spec.actions",
                f"has {n:,} actions; the limit max_actions is {limits.max_actions:,}",
            )
        )
    size = spec.ByteSize()
    if size > limits.max_input_bytes:  # else no input can pass it
        problems.extend(_input_violations(spec, limits.max_input_bytes))
    if size > limits.max_spec_bytes:
        problems.append(
            FieldViolation(
                "spec",
                f"is {size:,} bytes serialized; the limit max_spec_bytes is"
                f" {limits.max_spec_bytes:,}",
            )
        )
    if problems:
        raise InvalidArgumentError(problems)
    return size


def stream_requests(
    request: workflow_service_pb2.SubmitWorkflowRequest, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[workflow_service_pb2.SubmitWorkflowStreamRequest]:
    """``request`` as ``SubmitWorkflowStream`` messages: its fields but the spec in the first
    (``header``), the serialized spec in pieces of ``chunk_bytes``."""
    data = request.spec.SerializeToString()
    header = workflow_service_pb2.SubmitWorkflowRequest(
        hlc=request.hlc,
        idempotency_key=request.idempotency_key,
        traceparent=request.traceparent,
    )
    view = memoryview(data)
    yield workflow_service_pb2.SubmitWorkflowStreamRequest(
        header=header, spec_chunk=bytes(view[:chunk_bytes])
    )
    for start in range(chunk_bytes, len(data), chunk_bytes):
        yield workflow_service_pb2.SubmitWorkflowStreamRequest(
            spec_chunk=bytes(view[start : start + chunk_bytes])
        )
