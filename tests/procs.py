"""Process-tree helpers over /proc, shared by the leak fixture and the system-test harness.

Linux only. The test process makes itself a *child subreaper*, so a process whose parent dies
(an exec action whose ``workerd`` was SIGKILLed) is re-parented to the test process instead of
init, and walking ``PPid`` from the test process still finds it. Process groups are recorded as
a second net for the day the subreaper is unavailable.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from dataclasses import dataclass

_PR_SET_CHILD_SUBREAPER = 36

# Pids a live ``subprocess.Popen`` owns: their zombies are left for ``Popen.wait`` to reap,
# which keeps their exit codes.
MANAGED: set[int] = set()


@dataclass(frozen=True, slots=True)
class Proc:
    """One process as /proc/PID/stat describes it."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str
    starttime: int

    @property
    def key(self) -> tuple[int, int]:
        """(pid, start time): stays unique when a pid is reused."""
        return (self.pid, self.starttime)

    @property
    def alive(self) -> bool:
        """A zombie has exited; it only waits to be reaped."""
        return self.state not in ("Z", "X")

    def cmdline(self) -> str:
        """The command line, or ``[comm]`` when it has none (or is gone)."""
        try:
            with open(f"/proc/{self.pid}/cmdline", "rb") as f:
                raw = f.read()
        except OSError:
            return "<gone>"
        return raw.replace(b"\0", b" ").decode(errors="replace").strip() or f"[{self.pid}]"

    def describe(self) -> str:
        """One line for a failure message."""
        return (
            f"pid={self.pid} ppid={self.ppid} pgid={self.pgid} state={self.state}: {self.cmdline()}"
        )


def read_proc(pid: int) -> Proc | None:
    """Reads one process, or None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses; everything after the last ')' is fixed.
    rest = raw[raw.rindex(")") + 2 :].split()
    return Proc(
        pid=pid,
        state=rest[0],
        ppid=int(rest[1]),
        pgid=int(rest[2]),
        sid=int(rest[3]),
        starttime=int(rest[19]),
    )


def snapshot() -> dict[int, Proc]:
    """Every process visible in /proc."""
    out: dict[int, Proc] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            proc = read_proc(int(name))
            if proc is not None:
                out[proc.pid] = proc
    return out


def descendants(root: int, procs: dict[int, Proc] | None = None) -> list[Proc]:
    """Every descendant of ``root`` (not ``root`` itself), zombies included."""
    procs = snapshot() if procs is None else procs
    children: dict[int, list[Proc]] = {}
    for proc in procs.values():
        children.setdefault(proc.ppid, []).append(proc)
    out: list[Proc] = []
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child.pid)
    return out


def in_groups(pgids: set[int], procs: dict[int, Proc] | None = None) -> list[Proc]:
    """Live processes whose process group is one of ``pgids``."""
    procs = snapshot() if procs is None else procs
    return [p for p in procs.values() if p.pgid in pgids and p.alive]


def is_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    proc = read_proc(pid)
    return proc is not None and proc.alive


def become_subreaper() -> bool:
    """Makes this process adopt orphaned descendants (Linux prctl); False when unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def kill_procs(procs: list[Proc]) -> None:
    """SIGKILLs each process (and its group when that is not ours); ignores the gone."""
    own = os.getpgrp()
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if proc.pgid not in (own, 0):
                os.killpg(proc.pgid, signal.SIGKILL)
            os.kill(proc.pid, signal.SIGKILL)


def reap_adopted_zombies() -> None:
    """Reaps zombie children of this process that no Popen owns (adopted orphans)."""
    me = os.getpid()
    for proc in snapshot().values():
        if proc.ppid == me and not proc.alive and proc.pid not in MANAGED:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(proc.pid, os.WNOHANG)
