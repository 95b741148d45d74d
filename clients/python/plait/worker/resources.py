"""What a worker advertises in ``Hello.resources`` (foundation layer: plait.worker).

:func:`detect_resources` measures the host: ``cpu`` (the CPUs this process may run on, or its
cgroup CPU quota when that is lower) and ``memory_mb`` (``MemTotal`` from ``/proc/meminfo``, or
the cgroup memory limit when that is lower). Every file read goes through one injectable
function, so tests feed it /proc and /sys text instead of reading the real machine.
:func:`parse_resource` reads the ``NAME=N`` form of workerd's ``--resource`` flag.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping

__all__ = [
    "RESOURCE_NAME_RE",
    "ReadText",
    "cgroup_cpu_limit",
    "cgroup_memory_limit_mb",
    "detect_resources",
    "meminfo_kib",
    "merge_resources",
    "parse_resource",
    "read_text",
]

ReadText = Callable[[str], "str | None"]
"""Reads a whole text file; ``None`` when it is absent or unreadable."""

RESOURCE_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,62}")

_CGROUP_ROOT = "/sys/fs/cgroup"
# cgroup v1 reports "no limit" as a huge page-aligned number; anything this large means none.
_V1_UNLIMITED = 1 << 60


def read_text(path: str) -> str | None:
    """The file's text, or ``None`` if it cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def meminfo_kib(text: str, key: str) -> int | None:
    """The value of ``key`` (e.g. ``MemTotal``) in /proc/meminfo text, in KiB."""
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        if sep and name.strip() == key:
            parts = rest.split()
            if parts and parts[0].isdigit():
                return int(parts[0])
    return None


def _own_cgroup_v2(read: ReadText) -> str | None:
    """This process's cgroup v2 path (``0::/a/b``), or ``None`` on a v1-only host."""
    text = read("/proc/self/cgroup") or ""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return None


def _v2_dirs(read: ReadText) -> list[str]:
    """The cgroup v2 directories from this process's own up to the root (limits nest)."""
    own = _own_cgroup_v2(read)
    if own is None:
        return []
    dirs = []
    parts = [p for p in own.split("/") if p]
    while parts:
        dirs.append(f"{_CGROUP_ROOT}/{'/'.join(parts)}")
        parts.pop()
    dirs.append(_CGROUP_ROOT)
    return dirs


def cgroup_cpu_limit(read: ReadText = read_text) -> float | None:
    """The tightest cgroup CPU quota (v2 ``cpu.max`` up the tree, else v1 CFS), in CPUs."""
    limits: list[float] = []
    for d in _v2_dirs(read):
        fields = (read(f"{d}/cpu.max") or "").split()
        if len(fields) == 2 and fields[0] != "max":
            try:
                quota, period = int(fields[0]), int(fields[1])
            except ValueError:
                continue
            if quota > 0 and period > 0:
                limits.append(quota / period)
    if not limits:
        for base in (f"{_CGROUP_ROOT}/cpu,cpuacct", f"{_CGROUP_ROOT}/cpu"):
            quota_text = read(f"{base}/cpu.cfs_quota_us")
            period_text = read(f"{base}/cpu.cfs_period_us")
            if quota_text is None or period_text is None:
                continue
            try:
                quota, period = int(quota_text.strip()), int(period_text.strip())
            except ValueError:
                continue
            if quota > 0 and period > 0:
                limits.append(quota / period)
                break
    return min(limits) if limits else None


def cgroup_memory_limit_mb(read: ReadText = read_text) -> float | None:
    """The tightest cgroup memory limit (v2 ``memory.max`` up the tree, else v1), in MiB."""
    limits: list[int] = []
    for d in _v2_dirs(read):
        text = (read(f"{d}/memory.max") or "").strip()
        if text.isdigit():
            limits.append(int(text))
    if not limits:
        text = (read(f"{_CGROUP_ROOT}/memory/memory.limit_in_bytes") or "").strip()
        if text.isdigit() and int(text) < _V1_UNLIMITED:
            limits.append(int(text))
    return min(limits) / (1 << 20) if limits else None


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def detect_resources(
    read: ReadText = read_text, cpu_count: Callable[[], int] = _cpu_count
) -> dict[str, float]:
    """``{"cpu": ..., "memory_mb": ...}`` for this host (``memory_mb`` only where known).

    ``cpu`` is the CPU count (the affinity mask's size), or the cgroup quota when lower
    (fractional quotas stay fractional: ``1.5``). ``memory_mb`` is ``MemTotal``, or the cgroup
    limit when lower, rounded down to whole MiB.
    """
    cpus = float(cpu_count())
    quota = cgroup_cpu_limit(read)
    if quota is not None:
        cpus = min(cpus, quota)
    out = {"cpu": cpus}
    total_kib = meminfo_kib(read("/proc/meminfo") or "", "MemTotal")
    memory = total_kib / 1024 if total_kib is not None else None
    limit = cgroup_memory_limit_mb(read)
    if limit is not None:
        memory = limit if memory is None else min(memory, limit)
    if memory is not None:
        out["memory_mb"] = float(math.floor(memory))
    return out


def parse_resource(item: str) -> tuple[str, float]:
    """``gpu=2`` -> ``("gpu", 2.0)``.

    Raises:
        ValueError: not ``NAME=N``, a bad name, or N not a finite number >= 0.
    """
    name, sep, value = item.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ValueError(f"expected NAME=N such as gpu=2, got {item!r}")
    if not RESOURCE_NAME_RE.fullmatch(name):
        raise ValueError(f"bad name {name!r} (a letter, then up to 62 of [A-Za-z0-9_.-])")
    try:
        amount = float(value)
    except ValueError:
        raise ValueError(f"{name}: {value!r} is not a number") from None
    if not math.isfinite(amount) or amount < 0:
        raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")
    return name, amount


def merge_resources(
    detected: Mapping[str, float], overrides: Mapping[str, float]
) -> dict[str, float]:
    """``detected`` with ``overrides`` added or replacing entries of the same name."""
    merged = dict(detected)
    merged.update(overrides)
    return merged
