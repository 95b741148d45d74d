"""The rules of an exec action's ``secrets`` and ``rlimits`` (foundation layer).

One place for both sides of the wire: the workflow converter (:mod:`plait.spec`) checks them
to name the file and action, the coordinator checks them again at submit, and workerd checks a
lease's secrets before it resolves them.

* ``ActionSpec.secrets`` maps an environment variable to a secret name. Variables are
  ``[A-Z_][A-Z0-9_]*``, at most :data:`MAX_ENV_VAR` characters, and never one the sandbox sets
  itself (:func:`reserved_env_var`); secret names follow the id rule (:mod:`plait.ids`); an
  action names at most :data:`MAX_SECRETS`.
* ``ActionSpec.rlimits`` (``ExecLimits``): each set field within the bound of
  :data:`RLIMITS`; 0 means the worker's own value.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from plait.ids import describe_id
from plait.sizes import format_size

__all__ = [
    "ENV_VAR_RE",
    "MAX_ENV_VAR",
    "MAX_SECRETS",
    "MAX_SECRET_BYTES",
    "RESERVED_ENV_VARS",
    "RLIMITS",
    "RlimitField",
    "describe_env_var",
    "redaction_marker",
    "reserved_env_var",
    "rlimit_problems",
    "secret_problems",
]

ENV_VAR_RE = re.compile(r"[A-Z_][A-Z0-9_]*")
MAX_ENV_VAR = 128
MAX_SECRETS = 64
# Largest secret value a worker reads (a file or an environment variable of its own).
MAX_SECRET_BYTES = 64 * 1024
# Variables the exec sandbox sets for every attempt (plait.workerd.sandbox.build_env): a secret
# must not replace them. Every PLAIT_* name is reserved too.
RESERVED_ENV_VARS = frozenset({"PATH", "HOME", "TMPDIR", "LANG", "TRACEPARENT"})


def reserved_env_var(name: str) -> bool:
    """Whether the sandbox sets ``name`` itself (``PLAIT_*``, ``PATH``, ``HOME``, ...)."""
    return name in RESERVED_ENV_VARS or name.startswith("PLAIT_")


def describe_env_var(name: str) -> str | None:
    """Why ``name`` cannot carry a secret (a phrase naming the rule), or None when it can."""
    if len(name) > MAX_ENV_VAR:
        return f"is {len(name)} characters long; the limit is {MAX_ENV_VAR}"
    if not ENV_VAR_RE.fullmatch(name):
        return f"{name!r} must be [A-Z_][A-Z0-9_]* (upper case, digits and underscores)"
    if reserved_env_var(name):
        reserved = ", ".join(sorted(RESERVED_ENV_VARS))
        return f"{name!r} is set by the sandbox itself (PLAIT_*, {reserved})"
    return None


def secret_problems(
    secrets: Mapping[str, str], env: Mapping[str, str]
) -> Iterator[tuple[str, str]]:
    """``(key, problem)`` for each broken rule; ``key`` is the variable ('' for the whole map)."""
    if len(secrets) > MAX_SECRETS:
        yield "", f"names {len(secrets)} secrets; the limit is {MAX_SECRETS}"
        return
    for var, name in secrets.items():
        why = describe_env_var(var)
        if why:
            yield var, f"variable {why}"
        elif var in env:
            yield var, f"{var!r} is also set in env; a variable comes from one or the other"
        why = describe_id(name)
        if why:
            yield var, f"secret name {why}"


def redaction_marker(name: str) -> str:
    """What replaces a secret's value in everything a worker reports: ``[redacted:NAME]``."""
    return f"[redacted:{name}]"


@dataclass(frozen=True, slots=True)
class RlimitField:
    """One ``ExecLimits`` field: its YAML key, its proto field, its bound and its unit."""

    key: str  # the YAML key: address_space
    field: str  # the ExecLimits field: address_space_bytes
    maximum: int
    unit: str  # "bytes", "seconds" or "" (a count)

    def show(self, value: int) -> str:
        """``value`` as a person reads it (``4GiB``, ``600s``, ``1024``)."""
        if self.unit == "bytes":
            return format_size(value)
        return f"{value}s" if self.unit == "seconds" else str(value)


# The bounds are sanity limits on what a spec may ask; each worker's own caps (workerd
# --rlimit) decide what it grants.
RLIMITS: tuple[RlimitField, ...] = (
    RlimitField("processes", "processes", 4_194_304, ""),  # the kernel's PID_MAX_LIMIT
    RlimitField("address_space", "address_space_bytes", 1 << 47, "bytes"),  # x86-64 user space
    RlimitField("file_size", "file_size_bytes", 1 << 50, "bytes"),
    RlimitField("open_files", "open_files", 1 << 20, ""),  # the kernel's default fs.nr_open
    RlimitField("cpu", "cpu_seconds", 366 * 86400, "seconds"),
)


def rlimit_problems(values: Mapping[str, int]) -> Iterator[tuple[RlimitField, str]]:
    """``(field, problem)`` for each ``ExecLimits`` value (by proto field name) over its bound."""
    for f in RLIMITS:
        value = values.get(f.field, 0)
        if value > f.maximum:
            yield f, f"is {f.show(value)}; the limit is {f.show(f.maximum)}"
