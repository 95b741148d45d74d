"""Each exec attempt's confinement: its user, limits, cgroup and clean-up (workerd layer).

How an attempt starts: normally the spawner (:mod:`plait.workerd.spawner`) forks it and the
child sets its own user, limits, cgroup and parent-death signal before it execs the action.
When the spawner is unavailable, a chain of execs — so no Python runs between fork and exec (in
a process with gRPC's threads only vfork() is safe), and nothing the action controls runs
before its user, limits and cgroup are in place:

1. util-linux ``setpriv``: with ``--run-as``, ``--reuid U --regid G --clear-groups
   --no-new-privs`` (no supplementary groups; no setuid or file-capability program can give
   privileges back); always ``--pdeathsig KILL`` (set after the switch, which would clear it).
2. ``/bin/sh`` waits at the start barrier (:data:`plait.workerd.sandbox.BARRIER`), reading one
   line of stdin, while workerd sets its rlimits (``prlimit(2)``, soft = hard:
   :mod:`plait.workerd.rlimits`) and moves it into the attempt's cgroup; nothing has forked
   yet, so nothing escapes either. workerd then writes the go line and the inputs; the shell
   execs the action. Where workerd may not set another user's limits (no CAP_SYS_RESOURCE),
   util-linux ``prlimit`` sets them as a step between setpriv and the barrier instead, and
   without a cgroup the barrier is then left out.

setpriv runs as root with ``--run-as``, so no start step ever sees the variables that would let
the action's environment run code in it (``LD_PRELOAD`` and friends): those are carried past
them under another name and restored by the barrier shell
(:func:`plait.workerd.sandbox.barrier_script`).

When the attempt ends (its main process exits, or cancel / run timeout / self-fencing kill it),
everything it left is killed: its process group; its cgroup (``cgroup.kill``), if cgroups are in
use; otherwise, with ``--run-as``, every process of its uid (:mod:`plait.workerd.containment`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field

from plait.workerd.containment import (
    CgroupTree,
    join_cgroup,
    kill_cgroup,
    kill_uid_processes,
    signal_cgroup,
    sweep_argv,
    try_remove_cgroup,
)
from plait.workerd.keeper import Keeper
from plait.workerd.rlimits import Rlimits, apply_rlimits, prlimit_argv
from plait.workerd.runas import Identity, UidPool
from plait.workerd.spawn_client import Spawner, SpawnError

__all__ = ["CONTAINMENT_CGROUP", "CONTAINMENT_GROUP", "CONTAINMENT_UID", "Confinement", "Sandbox"]

log = logging.getLogger(__name__)

CONTAINMENT_CGROUP = "cgroup"
CONTAINMENT_UID = "uid sweep"
CONTAINMENT_GROUP = "process group"
# How long the end of an attempt waits for its killed cgroup to empty before leaving it to the
# keeper (processes stuck in uninterruptible sleep, e.g. on a dead NFS server).
_CGROUP_DRAIN_S = 10.0


@dataclass(slots=True)
class Sandbox:
    """What every attempt's confinement draws on; built once at start-up."""

    rlimits: Rlimits = field(default_factory=lambda: Rlimits.defaults(run_as=False))
    pool: UidPool | None = None
    cgroups: CgroupTree | None = None
    keeper: Keeper | None = None
    setpriv: str | None = None
    """util-linux setpriv (the user switch, PR_SET_PDEATHSIG); None: not installed."""
    prlimit: str | None = None
    """util-linux prlimit, to set each attempt's limits as a start step; None: workerd sets
    them itself (``prlimit(2)``) while the attempt waits at its barrier."""
    spawner: Spawner | None = None
    """The process spawner attempts (and uid sweeps) start through; None or unavailable: the
    exec chain below."""

    @property
    def containment(self) -> str:
        """How processes that leave an attempt's group are found: cgroup, uid sweep or none."""
        if self.cgroups is not None:
            return CONTAINMENT_CGROUP
        return CONTAINMENT_UID if self.pool is not None else CONTAINMENT_GROUP

    def confine(self) -> Confinement:
        """A new attempt's confinement (takes an identity from the pool, if there is one)."""
        return Confinement(self, self.pool.acquire() if self.pool is not None else None)


class Confinement:
    """One attempt's share of the sandbox: identity, cgroup, process group, clean-up."""

    def __init__(self, sandbox: Sandbox, ident: Identity | None) -> None:
        self.sandbox = sandbox
        self.ident = ident
        self.cgroup = ""
        self.pgid = 0
        self._released = False

    @property
    def uid(self) -> int | None:
        """The uid the attempt runs as (None: workerd's own)."""
        return self.ident.uid if self.ident is not None else None

    def own(self, *paths: str) -> None:
        """Hands the attempt's files (its directory, its inputs) to its user."""
        if self.ident is not None:
            for path in paths:
                os.chown(path, self.ident.uid, self.ident.gid, follow_symlinks=False)

    def make_cgroup(self) -> None:
        """Creates the attempt's cgroup, when cgroups are in use.

        Raises:
            OSError: it could not be created.
        """
        tree = self.sandbox.cgroups
        if tree is None:
            return
        self.cgroup = tree.new_attempt()
        if self.sandbox.keeper is not None:
            self.sandbox.keeper.register_cgroup(self.cgroup)

    @property
    def needs_barrier(self) -> bool:
        """Whether the first process must wait for workerd (to join its cgroup, or to get its
        limits when there is no prlimit binary)."""
        return bool(self.cgroup) or self.sandbox.prlimit is None

    def prefix(self, limits: Mapping[int, int]) -> list[str]:
        """The start steps before the action (or the barrier): setpriv, then prlimit."""
        head: list[str] = []
        setpriv = self.sandbox.setpriv
        if setpriv is not None:
            head.append(setpriv)
            if self.ident is not None:
                uid, gid = str(self.ident.uid), str(self.ident.gid)
                head += ["--reuid", uid, "--regid", gid, "--clear-groups", "--no-new-privs"]
            head += ["--pdeathsig", "KILL", "--"]
        if self.sandbox.prlimit is not None:
            head += prlimit_argv(self.sandbox.prlimit, limits)
        return head

    def started(self, pid: int) -> None:
        """The attempt's first process (``pid``, its own group) started."""
        self.pgid = pid
        if self.sandbox.pool is not None and self.ident is not None:
            self.sandbox.pool.attach(self.ident, pid)

    @property
    def slow_start(self) -> bool:
        """Whether :meth:`release_barrier` may wait: a move into a cgroup waits for an RCU
        grace period (~1 ms, not CPU), so the executor runs it off its event loop."""
        return bool(self.cgroup)

    def release_barrier(self, pid: int, limits: Mapping[int, int]) -> str:
        """While the first process waits at the barrier: set its limits (unless the prlimit
        step does) and move it into its cgroup. Returns a problem ('' when all went well).
        Thread-safe: it only makes system calls about ``pid``."""
        if self.sandbox.prlimit is None:
            try:
                apply_rlimits(pid, limits)
            except ProcessLookupError:
                return ""  # it already died: its exit status says why
            except OSError as err:
                return f"cannot set the attempt's rlimits: {err.strerror or err}"
        if self.cgroup:
            try:
                join_cgroup(self.cgroup, pid)
            except OSError as err:
                if err.errno == errno.ESRCH:
                    return ""
                return (
                    f"cannot move the attempt into its cgroup {self.cgroup}: {err.strerror or err}"
                )
        return ""

    def signal(self, sig: signal.Signals) -> None:
        """Signals the attempt: its process group and, with cgroups, every process in its cgroup
        (SIGKILL through ``cgroup.kill``), so that ``setsid`` children are reached too."""
        if self.pgid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pgid, sig)
        if self.cgroup:
            if sig == signal.SIGKILL:
                kill_cgroup(self.cgroup)
            else:
                signal_cgroup(self.cgroup, sig)

    async def end(self) -> None:
        """Kills whatever the attempt left (its group, its cgroup or its uid's processes),
        removes its cgroup and gives its identity back. Idempotent."""
        if self._released:
            return
        self._released = True
        if self.pgid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pgid, signal.SIGKILL)
        keeper = self.sandbox.keeper
        if self.cgroup:
            # The drain kills whatever is still in the cgroup before it removes it (an emptied
            # cgroup, the usual case, is removed without another cgroup.kill).
            if await _drain_cgroup(self.cgroup):
                if keeper is not None:
                    keeper.unregister_cgroup(self.cgroup)
            else:
                log.warning(
                    "cgroup %s still holds processes %gs after SIGKILL; the keeper will retry",
                    self.cgroup,
                    _CGROUP_DRAIN_S,
                )
        elif self.pgid and self.ident is not None and self.sandbox.pool is not None:
            await self._sweep_uid(self.sandbox.pool, self.ident)
        if self.sandbox.pool is not None and self.ident is not None:
            self.sandbox.pool.release(self.ident, self.pgid)

    async def _sweep_uid(self, pool: UidPool, ident: Identity) -> None:
        """SIGKILL every process of the attempt's uid outside other live attempts' groups."""
        spare = pool.live_groups(ident) - {self.pgid}
        if spare:  # a uid shared with running attempts (pool smaller than the slots)
            await asyncio.to_thread(kill_uid_processes, ident.uid, spare)
            return
        if not await self._sweep_by_spawner(ident):
            setpriv = self.sandbox.setpriv
            if setpriv is None:  # cannot happen: --run-as needs setpriv (checked at start-up)
                await asyncio.to_thread(kill_uid_processes, ident.uid)
                return
            try:
                proc = await asyncio.create_subprocess_exec(
                    *sweep_argv(setpriv, ident.uid, ident.gid),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                    env={},
                )
                await proc.wait()
            except OSError as err:
                log.error("cannot sweep the processes of uid %d: %s", ident.uid, err)
        # kill(-1) only sends the signals: wait until they are dead (a /proc scan, killing any
        # straggler), so that the attempt reports only once nothing of it runs.
        spare = pool.live_groups(ident) - {self.pgid}
        await asyncio.to_thread(kill_uid_processes, ident.uid, spare)

    async def _sweep_by_spawner(self, ident: Identity) -> bool:
        """``kill(-1)`` as the uid from a child of the spawner (no setpriv, no shell)."""
        spawner = self.sandbox.spawner
        if spawner is None or not spawner.available:
            return False
        try:
            await spawner.sweep(ident.uid, ident.gid)
        except SpawnError as err:
            log.warning("the spawner could not sweep uid %d (%s)", ident.uid, err)
            return False
        return True


async def _drain_cgroup(path: str) -> bool:
    """Waits (without blocking the loop) until a killed cgroup is empty, then removes it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _CGROUP_DRAIN_S
    delay = 0.001
    while True:
        removed = try_remove_cgroup(path)
        if removed is not None:
            return removed
        if loop.time() >= deadline:
            return False
        kill_cgroup(path)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)
