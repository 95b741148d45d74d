"""Log formats for Plait's daemons: plain text or one JSON object per line (foundation layer).

Only entry points call :func:`configure_logging` (workerd, the coordinator); libraries just log
through ``logging.getLogger(__name__)`` with context in ``extra=``. The JSON format writes one
object per line with ``ts`` (RFC 3339, UTC), ``level``, ``logger``, ``message`` and, when
present, ``trace_id`` and ``span_id`` (from the current OpenTelemetry span, else the record's
extras, else the fields below), ``workflow_id``, ``action_id``, ``worker_id``, ``lease_id``
(from ``extra=``) and ``exc_info`` (the formatted traceback). Text lines carry the same
context in a bracketed suffix, so neither format loses it.

Code that runs on behalf of one attempt says so once, with :func:`log_fields`: every line logged
inside (in that task or thread) carries the attempt's ``workflow_id``, ``action_id`` and
``lease_id`` (and its ``trace_id``/``span_id``, for when no span is current) without each call
passing them; :func:`set_process_fields` names what holds for the
whole process (workerd's ``worker_id``). ``extra=`` still wins where given.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from contextlib import AbstractContextManager
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Literal, TextIO

from opentelemetry import trace

__all__ = [
    "CONTEXT_FIELDS",
    "JsonFormatter",
    "TextFormatter",
    "bind_log_fields",
    "configure_logging",
    "log_fields",
    "set_process_fields",
]

CONTEXT_FIELDS = ("workflow_id", "action_id", "worker_id", "lease_id")
"""Record attributes (``extra=``) copied into every line that has them."""

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HANDLER_MARK = "_plait_log_handler"


_FIELDS: ContextVar[Mapping[str, str]] = ContextVar(
    "plait_log_fields", default=MappingProxyType({})
)
_PROCESS_FIELDS: dict[str, str] = {}


def _trace_ids(record: logging.LogRecord, scoped: Mapping[str, str]) -> tuple[str, str]:
    """(trace_id, span_id) of the current span, else of the record's extras, else of the
    scoped fields (an attempt's, when no OpenTelemetry context was attached), else empty."""
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"
    trace_id = getattr(record, "trace_id", "") or ""
    if trace_id:
        return str(trace_id), str(getattr(record, "span_id", "") or "")
    return scoped.get("trace_id", ""), scoped.get("span_id", "")


class _ScopedFields:
    """The ``with`` block of :func:`log_fields` (a class: no generator per use)."""

    __slots__ = ("_fields", "_token")

    def __init__(self, fields: Mapping[str, str]) -> None:
        self._fields = fields
        self._token: Token[Mapping[str, str]] | None = None

    def __enter__(self) -> None:
        self._token = _FIELDS.set({**_FIELDS.get(), **self._fields})

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _FIELDS.reset(self._token)


def log_fields(**fields: str) -> AbstractContextManager[None]:
    """Every line logged inside the block (this task or thread) carries ``fields``.

    ``trace_id`` and ``span_id`` among them name the trace when no OpenTelemetry span is
    current (an attempt whose trace context was not attached).
    """
    return _ScopedFields(fields)


def bind_log_fields(**fields: str) -> None:
    """Adds ``fields`` to the current context for good: for a task that runs one attempt (an
    asyncio task has its own copy of the context, so they end with it)."""
    _FIELDS.set({**_FIELDS.get(), **fields})


def set_process_fields(**fields: str) -> None:
    """Fields every line of this process carries (``worker_id`` on workerd)."""
    _PROCESS_FIELDS.update(fields)


def _context(record: logging.LogRecord) -> dict[str, str]:
    out: dict[str, str] = {}
    scoped = _FIELDS.get()
    trace_id, span_id = _trace_ids(record, scoped)
    if trace_id:
        out["trace_id"] = trace_id
    if span_id:
        out["span_id"] = span_id
    for name in CONTEXT_FIELDS:
        value = getattr(record, name, None)
        if value in (None, ""):
            value = scoped.get(name) or _PROCESS_FIELDS.get(name)
        if value not in (None, ""):
            out[name] = str(value)
    return out


def rfc3339(created: float) -> str:
    """``2024-05-01T12:00:00.123456Z`` for a ``LogRecord.created`` time."""
    return datetime.fromtimestamp(created, tz=UTC).isoformat(timespec="microseconds")[:-6] + "Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring); never raises on odd messages."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": rfc3339(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        obj.update(_context(record))
        if record.exc_info:
            obj["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            obj["exc_info"] = record.exc_text
        if record.stack_info:
            obj["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(obj, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``TIME LEVEL logger: message [trace_id=... workflow_id=...]``."""

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ctx = _context(record)
        if not ctx:
            return text
        suffix = " ".join(f"{k}={v}" for k, v in ctx.items())
        head, sep, rest = text.partition("\n")  # keep a traceback below the first line
        return f"{head} [{suffix}]{sep}{rest}"


def configure_logging(
    fmt: Literal["text", "json"], level: str | int, stream: TextIO | None = None
) -> None:
    """Sends the root logger's records to ``stream`` (stderr) as ``fmt`` at ``level``.

    Calling it again replaces the handler it installed before (not other handlers).

    Raises:
        ValueError: an unknown ``fmt`` or ``level``.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be text or json, got {fmt!r}")
    if isinstance(level, str):
        named = logging.getLevelName(level.upper())
        if not isinstance(named, int):
            raise ValueError(f"unknown log level {level!r}")
        level = named
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
