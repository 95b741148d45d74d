"""Parsing and printing durations such as ``250ms``, ``2s``, ``5m``, ``1h30m`` (foundation)."""

from __future__ import annotations

import math
import re
from datetime import timedelta

from google.protobuf import duration_pb2

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
MAX_SECONDS = 100 * 365 * 86400  # a century: anything longer is a typo
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(text: str | int | float, *, field: str = "duration") -> timedelta:
    """Parses ``250ms``, ``2s``, ``1.5m``, ``1h30m``; a bare number means seconds.

    Raises:
        ValueError: naming ``field`` and the text, when it is not a duration.
    """
    bad = ValueError(f"{field}: expected a duration such as 250ms, 2s or 5m, got {text!r}")
    if isinstance(text, bool):
        raise bad
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        s = text.strip()
        try:
            seconds = float(s)
        except ValueError:
            return _parse_units(s, bad)
    return _bounded(seconds, bad)


def _bounded(seconds: float, bad: ValueError) -> timedelta:
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_SECONDS:
        raise bad
    return timedelta(seconds=seconds)


def _parse_units(s: str, bad: ValueError) -> timedelta:
    pos, total = 0, 0.0
    for m in _PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise bad
    return _bounded(total, bad)


def parse_clock_offset(text: str, *, field: str = "PLAIT_CLOCK_OFFSET") -> int:
    """A signed wall-clock offset in ms: ``1h``, ``-90s``, or plain milliseconds (``-1500``).

    Used by ``PLAIT_CLOCK_OFFSET``, which skews a process's wall clock for clock-skew tests.
    """
    s = text.strip()
    if not s:
        return 0
    sign = -1 if s.startswith("-") else 1
    body = s.lstrip("+-").strip()
    if body.isdigit():
        return sign * int(body)
    return sign * round(parse_duration(body, field=field).total_seconds() * 1000)


def format_duration(d: timedelta) -> str:
    """Short human form: ``250ms``, ``2s``, ``1m30s``."""
    ms = round(d.total_seconds() * 1000)
    if ms < 1000:
        return f"{ms}ms"
    if ms % 1000:
        return f"{ms / 1000:g}s"
    s = ms // 1000
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    out = (f"{h}h" if h else "") + (f"{m}m" if m else "") + (f"{sec}s" if sec else "")
    return out or "0s"


def to_proto(d: timedelta, msg: duration_pb2.Duration | None = None) -> duration_pb2.Duration:
    """Converts to ``google.protobuf.Duration`` (in place when ``msg`` is given)."""
    out = msg if msg is not None else duration_pb2.Duration()
    out.FromTimedelta(d)
    return out


def from_proto(msg: duration_pb2.Duration) -> timedelta:
    """Converts from ``google.protobuf.Duration``."""
    return timedelta(seconds=msg.seconds, microseconds=msg.nanos // 1000)
