"""Workflow parameters: declared in a ``params:`` section, given at submit (SDK layer: plait.spec).

A workflow file declares the values it takes and refers to them as ``${params.NAME}`` in any
string value::

    params:
      date: {description: the day to process}     # required (no default), a string
      width: {default: 4}                         # optional; its type is its default's
      region: eu-west-1                           # shorthand for {default: eu-west-1}
    max_parallel: ${params.width}                 # the whole value: typed (4, not "4")
    actions:
      - id: report
        run: [python3, report.py, --date, "${params.date}", --region, "${params.region}"]

Values come from ``plait submit FLOW.yaml -p date=2026-12-01`` (and ``--input-file``), or from
Python (``load_workflow(path, params={...})``). They are applied here, on the client, before the
document is converted, so the spec that is sent (and that the coordinator journals) holds the
resolved values and no ``params`` at all. A parameter given but not declared, a required one
missing, a value of the wrong type and a reference to an undeclared name are all errors naming
the parameter (the CLI exits 2).

Rules: a string that is one reference and nothing else becomes the value itself (a number stays
a number, a list a list); a reference inside a longer string is replaced by the value's text (a
string as it is, ``true``/``false``, a number as written, a list or mapping as compact JSON).
``$${params.NAME}`` stands for the literal text ``${params.NAME}``. References are resolved in
values, never in keys, and not inside ``params`` itself.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from plait.spec.fields import Loc, Problems, SpecError, describe

__all__ = [
    "PARAM_KEYS",
    "PARAM_TYPES",
    "Param",
    "apply_params",
    "declared_params",
    "given_sources",
    "parse_assignment",
]

PARAM_KEYS = ("default", "description", "type")
# A declared type's name -> the check of a value (booleans are not numbers here).
PARAM_TYPES = ("string", "integer", "number", "boolean", "list", "object")
PARAM_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
# `${params.NAME}`, or `$${params.NAME}` (an escaped, literal one). The name is checked apart,
# so that a misspelt or malformed one is reported instead of left in place.
REFERENCE_RE = re.compile(r"(\$?)\$\{\s*params\.([^}]*?)\s*\}")
_MARK = "${"  # no string without it holds a reference: most strings are passed over in C
_INTEGER_RE = re.compile(r"[+-]?\d+")
_BOOLEANS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}
_NO_DEFAULT = object()


@dataclass(frozen=True, slots=True)
class Param:
    """One declared parameter: its type, and its default unless it is required."""

    name: str
    type: str = "string"
    default: Any = _NO_DEFAULT
    description: str = ""

    @property
    def required(self) -> bool:
        """No default: a value must be given."""
        return self.default is _NO_DEFAULT


def _plain(value: Any) -> Any:
    """A YAML date or time (``2026-01-31`` unquoted) as the text it was written as."""
    return value.isoformat() if isinstance(value, datetime.date | datetime.time) else value


def _type_of(value: Any) -> str | None:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "list"
    if isinstance(value, Mapping):
        return "object"
    return None


def _fits(value: Any, kind: str) -> bool:
    got = _type_of(value)
    if kind == "number":
        return got in ("integer", "number") and math.isfinite(value)
    return got == kind


def _declare(name: Any, raw: Any, loc: Loc, probs: Problems) -> Param | None:
    if not isinstance(name, str) or not PARAM_NAME_RE.fullmatch(name):
        loc.add(
            probs,
            "expected a name of 1 to 64 characters of [A-Za-z0-9_-] starting with a letter or"
            f" _, got {describe(name)}",
        )
        return None
    if raw is None:
        return Param(name)
    raw = _plain(raw)
    if not isinstance(raw, Mapping):
        kind = _type_of(raw)
        if kind is None:
            loc.add(probs, f"expected a default value or a mapping, got {describe(raw)}")
            return None
        return Param(name, kind, raw)
    problems = len(probs.items)
    for key in raw:
        if key not in PARAM_KEYS:
            loc.child(str(key)).add(
                probs, f"unknown key {key!r}; allowed parameter keys: {', '.join(PARAM_KEYS)}"
            )
    description = raw.get("description", "")
    if not isinstance(description, str):
        loc.child("description").add(probs, f"expected a string, got {describe(description)}")
    default = _plain(raw.get("default", _NO_DEFAULT))
    kind = raw.get("type")
    if kind is None:
        kind = "string" if default is _NO_DEFAULT else _type_of(default)
        if kind is None:
            loc.child("default").add(probs, f"expected a value, got {describe(default)}")
    elif kind not in PARAM_TYPES:
        loc.child("type").add(probs, f"expected one of {', '.join(PARAM_TYPES)}, got {kind!r}")
    elif default is not _NO_DEFAULT and not _fits(default, kind):
        loc.child("default").add(probs, f"expected a {kind}, got {describe(default)}")
    if len(probs.items) > problems:
        return None
    return Param(name, str(kind), default, str(description))


def declared_params(doc: Mapping[str, Any], probs: Problems) -> dict[str, Param]:
    """The ``params`` section of a document (empty without one); problems go to ``probs``."""
    section = doc.get("params")
    loc = Loc("params", field="params")
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        loc.add(probs, f"expected a mapping of parameter names, got {describe(section)}")
        return {}
    out: dict[str, Param] = {}
    for name, raw in section.items():
        param = _declare(name, raw, loc.child(str(name)), probs)
        if param is not None:
            out[param.name] = param
    return out


def parse_assignment(text: str) -> tuple[str, str]:
    """``NAME=VALUE`` (what ``-p`` takes) as ``(NAME, VALUE)``; the value may hold ``=``.

    Raises:
        ValueError: no ``=``, or nothing before it.
    """
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), value


def _from_text(text: str, kind: str) -> Any:
    """A ``-p`` value (always text) read as ``kind``; raises ValueError naming what it expected."""
    if kind == "string":
        return text
    if kind == "integer" and _INTEGER_RE.fullmatch(text.strip()):
        return int(text)
    if kind == "number":
        try:
            value = float(text)
        except ValueError:
            pass
        else:
            if math.isfinite(value):
                return int(text) if _INTEGER_RE.fullmatch(text.strip()) else value
    if kind == "boolean" and text.strip().lower() in _BOOLEANS:
        return _BOOLEANS[text.strip().lower()]
    if kind in ("list", "object"):
        try:
            value = json.loads(text)
        except ValueError:
            pass
        else:
            if _fits(value, kind):
                return value
    article = "an" if kind[0] in "aeiou" else "a"
    extra = " (as JSON)" if kind in ("list", "object") else ""
    raise ValueError(f"expected {article} {kind}{extra}, got {text!r}")


def _values(
    declared: Mapping[str, Param],
    given: Mapping[str, Any],
    sources: Mapping[str, str],
    probs: Problems,
) -> dict[str, Any]:
    """Every declared parameter's value: given (checked or read as its type), else default."""
    out: dict[str, Any] = {}
    names = ", ".join(declared) or "none"
    for name, given_value in given.items():
        value = _plain(given_value)
        where = sources.get(name, f"parameter {name}")
        param = declared.get(name)
        if param is None:
            probs.add(
                f"params.{name}",
                where,
                f"unknown parameter {name!r}; the workflow declares: {names}",
            )
        elif isinstance(value, str) and param.type != "string":
            try:
                out[name] = _from_text(value, param.type)
            except ValueError as exc:
                probs.add(f"params.{name}", where, str(exc))
        elif not _fits(value, param.type):
            probs.add(f"params.{name}", where, f"expected a {param.type}, got {describe(value)}")
        else:
            out[name] = value
    for name, param in declared.items():
        if name in given:
            continue
        if param.required:
            probs.add(
                f"params.{name}",
                f"params.{name}",
                f"required parameter not given (-p {name}=VALUE or --input-file)",
            )
        else:
            out[name] = param.default
    return out


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


class _Resolver:
    """Replaces references in a document, copying only the containers that change."""

    def __init__(
        self,
        doc: Mapping[str, Any],
        values: Mapping[str, Any],
        declared: Mapping[str, Param],
        probs: Problems,
    ) -> None:
        self.doc = doc
        self.values = values
        self.declared = declared  # a declared name without a value is reported once, not here
        self.probs = probs
        self.path: list[str | int] = []

    def loc(self) -> Loc:
        path = self.path
        head, rest = "", path
        if len(path) >= 2 and path[0] == "actions" and isinstance(path[1], int):
            head = f"actions[{path[1]}]"
            actions = self.doc.get("actions")
            action = actions[path[1]] if isinstance(actions, list) else None
            if isinstance(action, Mapping) and isinstance(action.get("id"), str):
                head += f" (id {action['id']!r})"
            rest = path[2:]
        field = ""
        for part in rest:
            field += f"[{part}]" if isinstance(part, int) else (f".{part}" if field else part)
        full = head.partition(" ")[0] + (("." if head and field else "") + field)
        return Loc(full, head, field)

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.string(value) if _MARK in value else value
        if isinstance(value, Mapping):
            out: dict[Any, Any] | None = None
            for key, item in value.items():
                self.path.append(str(key))
                new = self.value(item)
                self.path.pop()
                if new is not item:
                    out = dict(value) if out is None else out
                    out[key] = new
            return value if out is None else out
        if isinstance(value, list):
            changed: list[Any] | None = None
            for i, item in enumerate(value):
                self.path.append(i)
                new = self.value(item)
                self.path.pop()
                if new is not item:
                    changed = list(value) if changed is None else changed
                    changed[i] = new
            return value if changed is None else changed
        return value

    def lookup(self, escaped: str, name: str, ref: str) -> Any:
        if escaped:
            return ref[1:]
        if name not in self.values:
            if name in self.declared:
                return ref
            known = ", ".join(self.declared) or "none"
            self.loc().add(
                self.probs, f"{ref}: unknown parameter {name!r}; the workflow declares: {known}"
            )
            return ref
        return self.values[name]

    def string(self, text: str) -> Any:
        whole = REFERENCE_RE.fullmatch(text)
        if whole is not None:
            return self.lookup(whole.group(1), whole.group(2), whole.group(0))
        return REFERENCE_RE.sub(
            lambda m: _as_text(self.lookup(m.group(1), m.group(2), m.group(0))), text
        )


def apply_params(
    doc: Any,
    source: str,
    given: Mapping[str, Any] | None = None,
    *,
    sources: Mapping[str, str] | None = None,
    text: str | None = None,
) -> Any:
    """The document with its ``params`` section removed and every reference resolved.

    ``given`` are the values supplied (strings are read as each parameter's declared type);
    ``sources`` say where each came from for errors (``-p width``); ``text``, the document's
    source text when there is one, lets a file that mentions no parameter skip the walk.

    Raises:
        SpecError: naming ``source`` and each unknown, missing or ill-typed parameter, and each
            reference to an undeclared one.
    """
    given = given or {}
    if not isinstance(doc, Mapping):
        return doc  # not a workflow at all: the converter says so
    if "params" not in doc and not given and text is not None and "params" not in text:
        return doc  # the common case, and a 100,000-action file is not walked for nothing
    probs = Problems()
    declared = declared_params(doc, probs)
    values = _values(declared, given, sources or {}, probs)
    body = {k: v for k, v in doc.items() if k != "params"}
    resolved = _Resolver(body, values, declared, probs).value(body)
    if probs.items:
        raise SpecError(source, probs.items)
    return resolved


def given_sources(names: Sequence[str], origin: str) -> dict[str, str]:
    """``{name: "<origin> <name>"}``: how errors name each given value (``-p width``)."""
    return {name: f"{origin} {name}" for name in names}
