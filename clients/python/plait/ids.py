"""The id rule (foundation layer), one place for both sides of the wire.

Workflow, action, worker, semaphore and identity names are 1 to 128 of ``[A-Za-z0-9_.-]``,
start with a letter or digit, and never contain ``..`` (so an id is always safe in a path or a
``plait://kind/name`` URI). Clients check it before sending; the coordinator checks it again.
"""

from __future__ import annotations

import re

__all__ = ["ID_RE", "MAX_ID", "describe_id"]

MAX_ID = 128
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def describe_id(value: str) -> str | None:
    """Why ``value`` is not a valid id (a phrase naming the rule), or None when it is."""
    if ID_RE.fullmatch(value) and ".." not in value:
        return None
    if not value:
        return "must not be empty"
    if len(value) > MAX_ID:
        return f"is {len(value)} characters long; the limit is {MAX_ID}"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "contains control characters"
    return f"{value!r} must be 1 to 128 of [A-Za-z0-9_.-], start with a letter or digit, no '..'"
