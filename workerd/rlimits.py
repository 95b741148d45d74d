"""Resource limits of exec attempts: the worker's caps and each action's (workerd layer).

Each worker has a value per limit (``--rlimit NAME=VALUE``, else the defaults below); it is both
what an attempt gets and the most an action may ask for (``ActionSpec.rlimits``, 0 = the
worker's value). workerd sets them on the attempt's first process with ``prlimit(2)`` while it
waits at its start barrier (:mod:`plait.workerd.confinement`), so no Python runs between fork
and exec and nothing the action runs is ever without them; where workerd may not set another
user's limits (no CAP_SYS_RESOURCE), util-linux ``prlimit`` does it as a start step, running as
the attempt's user (lowering a limit needs no privilege). Soft and hard limits are the same, so
the action cannot raise them again. Core dumps are always off (``RLIMIT_CORE`` 0).

The names are the spec's (:data:`plait.exec_rules.RLIMITS`): ``processes``,
``address_space``, ``file_size``, ``open_files``, ``cpu``.
"""

from __future__ import annotations

import os
import resource
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from plait.durations import parse_duration
from plait.errors import ConfigError
from plait.exec_rules import RLIMITS, RlimitField
from plait.sizes import parse_size
from plait.v1 import workflow_pb2

__all__ = [
    "DEFAULT_RLIMITS",
    "UNLIMITED",
    "Rlimits",
    "apply_rlimits",
    "can_raise_limits",
    "find_prlimit",
    "parse_rlimit_flags",
    "prlimit_argv",
]

UNLIMITED = resource.RLIM_INFINITY
_RESOURCE: dict[str, int] = {
    "processes": resource.RLIMIT_NPROC,
    "address_space_bytes": resource.RLIMIT_AS,
    "file_size_bytes": resource.RLIMIT_FSIZE,
    "open_files": resource.RLIMIT_NOFILE,
    "cpu_seconds": resource.RLIMIT_CPU,
}
_BY_KEY = {f.key: f for f in RLIMITS}
# By ExecLimits field. RLIMIT_NPROC counts every process and thread of the real uid, so it is
# only a per-attempt bound for a uid of its own: without --run-as it is left as inherited.
DEFAULT_RLIMITS: Mapping[str, int] = {
    "processes": 1024,
    "address_space_bytes": 16 << 30,
    "file_size_bytes": 128 << 20,
    "open_files": 4096,
    "cpu_seconds": UNLIMITED,
}


def _show(f: RlimitField, value: int | None) -> str:
    if value is None:
        return "inherited"
    return "unlimited" if value == UNLIMITED else f.show(value)


def _above(value: int, cap: int) -> bool:
    """``value > cap`` where ``UNLIMITED`` (-1) is the largest value."""
    if cap == UNLIMITED:
        return False
    return value == UNLIMITED or value > cap


@dataclass(frozen=True, slots=True)
class Rlimits:
    """The worker's limits by ``ExecLimits`` field; ``None``: left as workerd's own."""

    caps: Mapping[str, int | None]

    @classmethod
    def defaults(cls, *, run_as: bool) -> Rlimits:
        """:data:`DEFAULT_RLIMITS` (``processes`` only with a run-as user of its own)."""
        caps: dict[str, int | None] = dict(DEFAULT_RLIMITS)
        if not run_as:
            caps["processes"] = None
        return cls(caps)

    def cap(self, field: str) -> int:
        """The most an action may ask for ``field``: the worker's value or, when unset, the
        limit workerd itself has (its hard limit)."""
        value = self.caps.get(field)
        return resource.getrlimit(_RESOURCE[field])[1] if value is None else value

    def for_action(self, asked: workflow_pb2.ExecLimits | None) -> dict[int, int] | str:
        """``{RLIMIT_*: value}`` for an attempt, or a problem naming the field and the cap."""
        out: dict[int, int] = {resource.RLIMIT_CORE: 0}
        for f in RLIMITS:
            want = getattr(asked, f.field) if asked is not None else 0
            value = self.caps.get(f.field)
            if want:
                cap = self.cap(f.field)
                if _above(want, cap):
                    return (
                        f"rlimits.{f.key}: {f.show(want)} is above this worker's cap of"
                        f" {_show(f, cap)} (workerd --rlimit {f.key}=...)"
                    )
                value = want
            if value is not None:
                out[_RESOURCE[f.field]] = value
        return out

    def describe(self) -> str:
        """``processes=1024 address_space=16GiB ...`` for the start-up log."""
        return " ".join(f"{f.key}={_show(f, self.caps.get(f.field))}" for f in RLIMITS)


def _parse_value(f: RlimitField, text: str) -> int:
    if text.strip().lower() in ("unlimited", "infinity"):
        return UNLIMITED
    try:
        if f.unit == "bytes":
            value = parse_size(text, field=f"--rlimit {f.key}")
        elif f.unit == "seconds":
            seconds = parse_duration(text, field=f"--rlimit {f.key}").total_seconds()
            if seconds != int(seconds):
                raise ValueError(f"--rlimit {f.key}: whole seconds only, got {text!r}")
            value = int(seconds)
        else:
            value = int(text)
    except ValueError as err:
        if f.unit:
            raise ConfigError(str(err)) from None
        raise ConfigError(
            f"--rlimit {f.key}: expected a whole number or 'unlimited', got {text!r}"
        ) from None
    if not 1 <= value <= f.maximum:
        raise ConfigError(
            f"--rlimit {f.key}: must be from {f.show(1)} to {f.show(f.maximum)} or 'unlimited',"
            f" got {text!r}"
        )
    return value


def parse_rlimit_flags(
    items: Sequence[str], *, run_as: bool, privileged: bool | None = None
) -> Rlimits:
    """The defaults with each ``--rlimit NAME=VALUE`` on top (a later one wins).

    Without the privilege to raise limits (root or CAP_SYS_RESOURCE, ``privileged``), a value
    above workerd's own hard limit is refused, and a default above it is lowered to it.

    Raises:
        ConfigError: naming ``--rlimit`` and the item.
    """
    caps: dict[str, int | None] = dict(Rlimits.defaults(run_as=run_as).caps)
    given: set[str] = set()
    for item in items:
        key, sep, text = item.partition("=")
        f = _BY_KEY.get(key.strip())
        if not sep or f is None:
            raise ConfigError(
                f"--rlimit: expected NAME=VALUE with NAME one of {', '.join(_BY_KEY)}, got {item!r}"
            )
        caps[f.field] = _parse_value(f, text)
        given.add(f.field)
    if privileged is None:
        privileged = can_raise_limits()
    if not privileged:
        for f in RLIMITS:
            value = caps.get(f.field)
            hard = resource.getrlimit(_RESOURCE[f.field])[1]
            if value is None or not _above(value, hard):
                continue
            if f.field in given:
                raise ConfigError(
                    f"--rlimit {f.key}={_show(f, value)} is above workerd's own hard limit of"
                    f" {_show(f, hard)}, which only root (CAP_SYS_RESOURCE) may raise"
                )
            caps[f.field] = hard
    return Rlimits(caps)


def can_raise_limits() -> bool:
    """Whether this process has CAP_SYS_RESOURCE (raise limits, set other users')."""
    # CAP_SYS_RESOURCE, not root as such: some containers run root without it.
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            line = next(ln for ln in f if ln.startswith("CapEff:"))
    except (OSError, StopIteration):
        return False
    return bool(int(line.split()[1], 16) >> 24 & 1)  # CAP_SYS_RESOURCE


_PRLIMIT_OPTION = {
    resource.RLIMIT_CORE: "--core",
    resource.RLIMIT_NPROC: "--nproc",
    resource.RLIMIT_AS: "--as",
    resource.RLIMIT_FSIZE: "--fsize",
    resource.RLIMIT_NOFILE: "--nofile",
    resource.RLIMIT_CPU: "--cpu",
}


def find_prlimit(path: str | None = None) -> str | None:
    """util-linux ``prlimit`` on ``path`` (and the usual system directories), or None."""
    search = f"{path or os.environ.get('PATH', os.defpath)}:/usr/bin:/bin:/usr/sbin:/sbin"
    return shutil.which("prlimit", path=search)


def prlimit_argv(prlimit: str, limits: Mapping[int, int]) -> list[str]:
    """``prlimit --core=0:0 --nofile=4096:4096 ... --``: sets the limits (soft = hard) on
    itself, then execs the rest of the command line. It runs as the attempt's user (only ever
    lowering limits) or, with the privilege to, as workerd's."""
    argv = [prlimit]
    for which, value in limits.items():
        shown = "unlimited" if value == UNLIMITED else str(value)
        argv.append(f"{_PRLIMIT_OPTION[which]}={shown}:{shown}")
    argv.append("--")
    return argv


def apply_rlimits(pid: int, limits: Mapping[int, int]) -> None:
    """Sets each limit (soft = hard) on process ``pid``.

    Raises:
        OSError: ``ProcessLookupError`` when it is gone; others when a limit is refused.
    """
    for which, value in limits.items():
        resource.prlimit(pid, which, (value, value))
