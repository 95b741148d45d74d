"""Bounds on JSON text that crosses the wire (foundation layer).

Clients send ``input_json``, workers send ``outputs_json`` and progress ``details_json``. Each
is capped in size and in nesting depth before anything parses it: Python's ``json`` recurses
once per level, so a document nested 100,000 levels deep raises ``RecursionError`` (and
anything that walks the parsed value recurses again). The coordinator, the SDK and the CLI
share these checks so that both sides of the wire agree on what is too big or too deep.

The depth check is cheap where it runs on every message: a document with no more than
``max_depth`` opening brackets cannot nest deeper, and ``str.count`` decides that in C. Only
larger documents are scanned, still in C (``bytes.translate`` and ``bytes.replace``): at most
``max_depth + 1`` passes over their brackets, and, only when brackets inside strings could
matter, once more with the strings removed.
"""

from __future__ import annotations

import json
from array import array
from itertools import accumulate
from typing import Any

__all__ = [
    "MAX_JSON_DEPTH",
    "MAX_OUTPUT_BYTES",
    "JsonLimitError",
    "json_problem",
    "loads_bounded",
    "nesting_exceeds",
    "outputs_problem",
    "utf8_len",
]

MAX_JSON_DEPTH = 64
# An attempt's outputs_json, in UTF-8 bytes: what workers (the SDK, workerd) accept from an
# action, the default of the coordinator's ``max_output_bytes``, and the ceiling it may be set to.
MAX_OUTPUT_BYTES = 1024 * 1024

# Bytes that are neither brackets nor quotes (deleted by bytes.translate), and the brackets as
# "(" / ")"; then the same parens as +1 / -1 signed bytes, for an exact prefix-sum scan.
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')
_NOT_OPENERS = bytes(b for b in range(256) if b not in b"[{")
_SMALL = 4096  # below this many characters str.count is the cheaper way to count brackets
_PARENS = bytes.maketrans(b"[{]}", b"(())")
_SIGNED = bytes.maketrans(b"()", b"\x01\xff")


class JsonLimitError(ValueError):
    """JSON text over a size or depth limit, or not JSON; the message names the limit."""


def utf8_len(text: str) -> int:
    """Bytes of ``text`` in UTF-8 (``str.isascii`` is O(1), so ASCII costs no encoding)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _structure(data: bytes) -> bytes:
    """The brackets of ``data`` (JSON text in UTF-8) outside string literals, as ``(`` and ``)``.

    Escapes go first (``\\\\``, then ``\\"``), so every quote left delimits a string. Deleting
    everything else leaves strings as runs of quotes and brackets; removing two adjacent quotes
    changes no other bracket's side (inside or outside a string), so ``""`` pairs (strings
    without brackets: nearly all of them) go in one C pass, and only what is left is split.
    """
    if b"\\" in data:
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    kept = data.translate(None, _NOT_STRUCTURE)
    if b'"' in kept:
        kept = kept.replace(b'""', b"")
        if b'"' in kept:
            kept = b"".join(kept.split(b'"')[::2])
    return kept.translate(_PARENS)


def _deeper_than(parens: bytes, max_depth: int) -> bool:
    """Whether balanced ``parens`` nest deeper than ``max_depth`` (exact for JSON).

    A run of ``max_depth + 1`` openers settles it at once. Otherwise each pass of
    ``replace(b"()", b"")`` removes every innermost pair (it does not rescan its own output),
    which lowers the deepest level by exactly one; while passes shrink the text quickly they
    are cheapest, and when they stop doing so (many deep, narrow nests) one exact prefix-sum
    scan of what is left finishes the job. Unbalanced input (not JSON) gets an answer that
    is never much below its true depth, so nothing deep reaches a recursive parser.
    """
    if b"(" * (max_depth + 1) in parens:
        return True
    level = 0
    while parens and level < max_depth:
        shorter = parens.replace(b"()", b"")
        if len(shorter) == len(parens):  # no pair left: only unmatched brackets remain
            return level + shorter.count(b"(") > max_depth
        level += 1
        slow = 4 * len(shorter) > 3 * len(parens)
        parens = shorter
        if slow:
            signed = array("b", parens.translate(_SIGNED))
            return level + max(accumulate(signed), default=0) > max_depth
    return b"(" in parens  # max_depth levels peeled and an opener is left: one more


def nesting_exceeds(text: str, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """Whether arrays and objects in ``text`` nest deeper than ``max_depth`` levels.

    Brackets inside string literals do not count. ``"[]"`` is one level, ``"1"`` none.
    Text that is not JSON gets an answer too (for it the parser has the last word).
    """
    # The hot path: too few opening brackets to nest that deep. One C pass either way.
    if len(text) < _SMALL:
        if text.count("[") + text.count("{") <= max_depth:
            return False
        data = text.encode("utf-8", "surrogatepass")
    else:
        data = text.encode("utf-8", "surrogatepass")
        if len(data.translate(None, _NOT_OPENERS)) <= max_depth:
            return False
    return _deeper_than(_structure(data), max_depth)


def json_problem(
    text: str,
    *,
    max_bytes: int,
    bytes_limit: str,
    max_depth: int = MAX_JSON_DEPTH,
    parse: bool = True,
    want_object: bool = False,
) -> str | None:
    """What is wrong with ``text`` as bounded JSON, or None when it is acceptable.

    The answer starts with "is" and names the limit, for a field violation or an error
    message: ``is 2000000 bytes; the limit max_output_bytes is 1048576``.

    Args:
        max_bytes: the size limit (UTF-8 bytes); ``bytes_limit`` is its name in messages.
        max_depth: the nesting limit (``max_json_depth``).
        parse: also check that it is JSON (off where the text is passed on unread).
        want_object: it must be a JSON object (implies ``parse``).
    """
    size = utf8_len(text)
    if size > max_bytes:
        return f"is {size} bytes; the limit {bytes_limit} is {max_bytes}"
    if nesting_exceeds(text, max_depth):
        return f"nests more than {max_depth} levels deep; the limit max_json_depth is {max_depth}"
    if not (parse or want_object):
        return None
    try:
        value = json.loads(text)
    except RecursionError:  # unreachable after the depth check; kept as a backstop
        return f"nests too deep to parse; the limit max_json_depth is {max_depth}"
    except ValueError as e:
        return f"is not valid JSON: {e}"
    if want_object and not isinstance(value, dict):
        return f"must be a JSON object, not {_kind(value)}"
    return None


def outputs_problem(
    text: str, *, max_bytes: int = MAX_OUTPUT_BYTES, max_depth: int = MAX_JSON_DEPTH
) -> str | None:
    """Why ``text`` is not acceptable as an attempt's outputs, or None; never raises.

    The one output rule, for both sides of the wire: the worker SDK checks what an action
    returns, the coordinator's core checks every succeeded result against its configured
    limits. A JSON object within ``max_bytes`` (``max_output_bytes``) and ``max_depth``
    (``max_json_depth``); the message names the field and the limit:
    ``outputs_json is 2000000 bytes; the limit max_output_bytes is 1048576``.
    """
    if text == "{}":
        return None
    problem = json_problem(
        text,
        max_bytes=max_bytes,
        bytes_limit="max_output_bytes",
        max_depth=max_depth,
        want_object=True,
    )
    return None if problem is None else f"outputs_json {problem}"


def loads_bounded(
    text: str,
    *,
    max_bytes: int,
    bytes_limit: str = "max_bytes",
    max_depth: int = MAX_JSON_DEPTH,
) -> Any:
    """``json.loads`` after the size and depth checks.

    Raises:
        JsonLimitError: naming the limit that was exceeded, or why it is not JSON.
    """
    size = utf8_len(text)
    if size > max_bytes:
        raise JsonLimitError(f"is {size} bytes; the limit {bytes_limit} is {max_bytes}")
    if nesting_exceeds(text, max_depth):
        raise JsonLimitError(
            f"nests more than {max_depth} levels deep; the limit max_json_depth is {max_depth}"
        )
    try:
        return json.loads(text)
    except RecursionError:
        raise JsonLimitError(
            f"nests too deep to parse; the limit max_json_depth is {max_depth}"
        ) from None
    except ValueError as e:
        raise JsonLimitError(f"is not valid JSON: {e}") from None


def _kind(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"
