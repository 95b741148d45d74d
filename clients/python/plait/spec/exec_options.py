"""The keys that set up an exec action's sandbox: ``secrets`` and ``rlimits`` (SDK layer).

Both apply to exec actions (``run``), including a map's (its children run the same command)
and a pipeline's exec stages; a handler action or a pipeline itself refuses them, saying where
they belong. The rules themselves (variable names, bounds) are :mod:`plait.exec_rules`, which
the coordinator checks again at submit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from plait import durations
from plait.exec_rules import (
    MAX_SECRETS,
    RLIMITS,
    RlimitField,
    describe_env_var,
)
from plait.ids import describe_id
from plait.sizes import parse_size
from plait.spec.fields import Loc, Problems, check_keys, describe, whole_number
from plait.v1 import workflow_pb2

__all__ = ["RLIMIT_KEYS", "convert_exec_options"]

RLIMIT_KEYS = tuple(f.key for f in RLIMITS)


def convert_exec_options(
    raw: Mapping[str, Any], loc: Loc, spec: workflow_pb2.ActionSpec, probs: Problems
) -> None:
    """Fills ``secrets`` and ``rlimits`` (call after ``run`` and ``env`` are converted)."""
    for key in ("secrets", "rlimits"):
        if key not in raw:
            continue
        at = loc.child(key)
        if "pipeline" in raw:
            at.add(probs, f"a pipeline runs its stages: give {key} to the stages that run commands")
        elif "run" not in raw:
            at.add(probs, "applies to exec actions (run); a handler is configured by its worker")
        elif key == "secrets":
            _secrets(raw[key], at, spec, probs)
        else:
            _rlimits(raw[key], at, spec.rlimits, probs)


def _secrets(value: Any, loc: Loc, spec: workflow_pb2.ActionSpec, probs: Problems) -> None:
    """``[API_TOKEN, ...]`` (each the variable and the secret) or ``{VAR: secret-name}``."""
    pairs: list[tuple[Loc, Any, Any]] = []
    if isinstance(value, Mapping):
        pairs = [(loc.child(str(k)), k, v) for k, v in value.items()]
    elif isinstance(value, list | tuple):
        pairs = [(loc.item(i), v, v) for i, v in enumerate(value)]
    else:
        loc.add(
            probs,
            "expected a list of secret names (each also the variable) or a mapping of"
            f" VARIABLE: secret-name, got {describe(value)}",
        )
        return
    if len(pairs) > MAX_SECRETS:
        loc.add(probs, f"names {len(pairs)} secrets; the limit is {MAX_SECRETS}")
        return
    for at, var, name in pairs:
        if not isinstance(var, str) or not isinstance(name, str):
            at.add(probs, f"expected a secret name, got {describe(name)}")
            continue
        why = describe_env_var(var)
        if why and not isinstance(value, Mapping):
            why += f"; to use secret {name!r} under another name, write {{VARIABLE: {name}}}"
        problems = [f"variable {why}"] if why else []
        if var in spec.env:
            problems.append(f"{var!r} is also set in env; a variable comes from one or the other")
        if var in spec.secrets:
            problems.append(f"{var!r} is listed twice")
        name_why = describe_id(name)
        if name_why:
            problems.append(f"secret name {name_why}")
        for problem in problems:
            at.add(probs, problem)
        if not problems:
            spec.secrets[var] = name


def _rlimits(value: Any, loc: Loc, out: workflow_pb2.ExecLimits, probs: Problems) -> None:
    """``{processes: 256, address_space: 4GiB, file_size: 100MiB, open_files: 1024, cpu: 10m}``."""
    if not isinstance(value, Mapping):
        loc.add(
            probs, f"expected a mapping with keys {', '.join(RLIMIT_KEYS)}, got {describe(value)}"
        )
        return
    check_keys(value, RLIMIT_KEYS, loc, "rlimits", probs)
    for f in RLIMITS:
        if f.key in value:
            got = _limit(value[f.key], f, loc.child(f.key), probs)
            if got is not None:
                setattr(out, f.field, got)


def _limit(value: Any, f: RlimitField, loc: Loc, probs: Problems) -> int | None:
    """One limit, 1 to its bound: a count, a size (``100MiB``) or CPU time (``10m``, seconds)."""
    sizes = f.unit == "bytes"
    if isinstance(value, timedelta) and not sizes:
        value = value.total_seconds()
    n: float | None = None
    if f.unit == "":
        n = whole_number(value, loc, probs, 0, 1 << 63)
        if n is None:
            return None
    elif isinstance(value, str | int | float) and not isinstance(value, bool):
        try:
            if sizes:
                n = parse_size(value, field=f.key)
            else:
                n = durations.parse_duration(value, field=f.key).total_seconds()
        except ValueError:
            n = None
    if n is None:
        what = (
            "a size such as 512, 64KiB, 100MiB or 2GB"
            if sizes
            else "CPU time such as 90s, 10m or a number of seconds"
        )
        loc.add(probs, f"expected {what}, got {describe(value)}")
        return None
    if not sizes and n != math.floor(n):
        loc.add(probs, f"is applied in whole seconds, got {value!r}")
        return None
    if not 1 <= n <= f.maximum:
        loc.add(
            probs,
            f"must be from {f.show(1)} to {f.show(f.maximum)} (leave it out for the worker's"
            f" default), got {value!r}",
        )
        return None
    return int(n)
