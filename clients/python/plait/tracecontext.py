"""W3C trace context and Plait's derived trace and span ids (foundation layer).

One place for both sides of the wire: the coordinator derives a workflow's trace id and every
span id from the workflow, action and lease ids, so a restarted (or failed-over) coordinator
continues the same trace; the client and the worker parse and format ``traceparent`` here.
Pure: no OpenTelemetry import.

A ``traceparent`` is ``00-<trace id: 32 hex>-<parent span id: 16 hex>-<flags: 2 hex>``
(https://www.w3.org/TR/trace-context/#traceparent-header), lower-case, neither id all zeros.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

__all__ = [
    "FLAG_SAMPLED",
    "SPAN_EXECUTE",
    "TRACEPARENT_ENV",
    "TraceParent",
    "describe_traceparent",
    "format_traceparent",
    "parse_traceparent",
    "span_id_for",
    "trace_id_for",
]

FLAG_SAMPLED = 0x01
TRACEPARENT_ENV = "TRACEPARENT"  # what an exec action's process is given
SPAN_EXECUTE = "plait.action.execute"  # the worker's span, a child of the attempt span

_TRACEPARENT_RE = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
MAX_TRACEPARENT = 55  # 2 + 1 + 32 + 1 + 16 + 1 + 2


@dataclass(frozen=True, slots=True)
class TraceParent:
    """A parsed ``traceparent``: ids as integers, ``flags`` as the byte."""

    trace_id: int
    span_id: int
    flags: int = 0

    @property
    def sampled(self) -> bool:
        return bool(self.flags & FLAG_SAMPLED)

    @property
    def trace_id_hex(self) -> str:
        return f"{self.trace_id:032x}"

    def __str__(self) -> str:
        return format_traceparent(self.trace_id, self.span_id, self.flags)


_ZERO_TRACE_ID = "0" * 32
_ZERO_SPAN_ID = "0" * 16


def describe_traceparent(value: str) -> str | None:
    """Why ``value`` is not a valid version-00 ``traceparent`` (a phrase), or None when it is."""
    if len(value) != MAX_TRACEPARENT:
        shown = value[:80] + ("…" if len(value) > 80 else "")
        return (
            f"must be 00-<32 hex>-<16 hex>-<2 hex> ({MAX_TRACEPARENT} characters), got"
            f" {len(value)} characters: {shown!r}"
        )
    m = _TRACEPARENT_RE.fullmatch(value)
    if m is None:
        return f"must be 00-<32 hex>-<16 hex>-<2 hex> in lower case, got {value!r}"
    return _describe_ids(m)


def _describe_ids(m: re.Match[str]) -> str | None:
    version, trace_id, span_id, _ = m.groups()
    if version != "00":
        return f"version {version!r} is not supported (only 00)"
    if trace_id == _ZERO_TRACE_ID:
        return "the trace id must not be all zeros"
    if span_id == _ZERO_SPAN_ID:
        return "the parent span id must not be all zeros"
    return None


def parse_traceparent(value: str) -> TraceParent | None:
    """The parsed ``traceparent``, or None when it is not valid (:func:`describe_traceparent`)."""
    m = _TRACEPARENT_RE.fullmatch(value) if len(value) == MAX_TRACEPARENT else None
    if m is None or _describe_ids(m) is not None:
        return None
    _, trace_id, span_id, flags = m.groups()
    return TraceParent(int(trace_id, 16), int(span_id, 16), int(flags, 16))


def format_traceparent(trace_id: int, span_id: int, flags: int | bool = FLAG_SAMPLED) -> str:
    """A version-00 ``traceparent``; ``flags`` True/False means sampled or not."""
    if not 0 < trace_id < 1 << 128 or not 0 < span_id < 1 << 64:
        raise ValueError(f"trace id {trace_id:#x} or span id {span_id:#x} out of range")
    return f"00-{trace_id:032x}-{span_id:016x}-{int(flags) & 0xFF:02x}"


def _digest(size: int, parts: tuple[object, ...]) -> int:
    h = hashlib.blake2b(digest_size=size, person=b"plait-trace")
    for p in parts:
        b = str(p).encode()
        # Length-prefixed, so ("a", "bc") and ("ab", "c") differ.
        h.update(len(b).to_bytes(4, "big"))
        h.update(b)
    return int.from_bytes(h.digest(), "big") or 1


def trace_id_for(workflow_id: str, traceparent: str = "") -> int:
    """The trace id of a workflow: its submitter's, when it gave a valid ``traceparent``, else
    one derived from the workflow id (128 bits, never 0): the same on every coordinator."""
    if traceparent:
        parsed = parse_traceparent(traceparent)
        if parsed is not None:
            return parsed.trace_id
    return _digest(16, ("trace", workflow_id))


def span_id_for(*parts: object) -> int:
    """A span id derived from ``parts`` (64 bits, never 0), e.g. ``("attempt", lease_id)``."""
    return _digest(8, parts)
