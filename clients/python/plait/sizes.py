"""Parsing and printing byte sizes such as ``512``, ``100MiB``, ``2GB`` (foundation).

Binary units (``KiB``, ``MiB``, ``GiB``, ``TiB``) are powers of 1024, decimal ones (``KB``,
``MB``, ``GB``, ``TB``) powers of 1000, and ``B`` or a bare number is bytes; units are matched
without regard to case. Fractions are allowed where they come to whole bytes' worth
(``1.5GiB``); the result is rounded down to a whole byte.
"""

from __future__ import annotations

import math
import re

__all__ = ["format_size", "parse_size"]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)")


def parse_size(value: str | int | float, *, field: str = "size") -> int:
    """Bytes from ``512``, ``64KiB``, ``100MiB``, ``2GB``, ``1.5GiB``.

    Raises:
        ValueError: naming ``field`` and the value, when it is not a size.
    """
    bad = ValueError(f"{field}: expected a size such as 512, 64KiB, 100MiB or 2GB, got {value!r}")
    if isinstance(value, bool):
        raise bad
    if isinstance(value, int):
        if value < 0:
            raise bad
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            raise bad
        return int(value)
    m = _SIZE.fullmatch(value.strip())
    if m is None or m.group(2).lower() not in _UNITS:
        raise bad
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: int) -> str:
    """Short human form: ``512B``, ``64KiB``, ``1.5GiB`` (the largest binary unit that fits)."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor:
            return f"{n / factor:g}{unit}"
    return f"{n}B"
