"""Setting up the exec sandbox at start-up (workerd layer).

:func:`prepare_exec` runs before workerd connects: it locks and sweeps the tmp root, picks
the containment (a cgroup tree where cgroup v2 allows it, else a uid sweep with ``--run-as``,
else process groups only), kills whatever an earlier workerd left (stale cgroups, processes of
the run-as uids), and builds the :class:`~plait.workerd.confinement.Sandbox` every attempt
draws on. Problems a person must fix raise :class:`plait.errors.ConfigError` (exit 2).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field

from plait.errors import ConfigError
from plait.workerd.confinement import CONTAINMENT_GROUP, Sandbox
from plait.workerd.containment import CgroupTree, own_cgroup_dir, sweep_uid, uid_processes
from plait.workerd.keeper import Keeper
from plait.workerd.rlimits import Rlimits, can_raise_limits, find_prlimit
from plait.workerd.runas import RunAs, UidPool
from plait.workerd.sandbox import find_setpriv
from plait.workerd.tmproot import TmpRoot, default_tmp_root, prepare_tmp_root

__all__ = ["CGROUP_AUTO", "CGROUP_OFF", "ExecSetup", "prepare_exec"]

log = logging.getLogger(__name__)

CGROUP_AUTO = "auto"
CGROUP_OFF = "off"


@dataclass(slots=True)
class ExecSetup:
    """The prepared sandbox, its locked tmp root, and what to tell the operator."""

    sandbox: Sandbox
    tmp: TmpRoot
    run_as: RunAs | None
    warnings: list[str] = field(default_factory=list)

    def attach(self, keeper: Keeper) -> None:
        """Hands the keeper what it must clean up if workerd dies: the run-as identities and
        the parent cgroup (attempts register their own groups, cgroups and directories)."""
        self.sandbox.keeper = keeper
        if self.run_as is not None:
            for ident in self.run_as.identities:
                keeper.register_uid(ident.uid, ident.gid)
        if self.sandbox.cgroups is not None:
            keeper.register_parent_cgroup(self.sandbox.cgroups.path)

    def summary(self) -> str:
        """One line for the start-up log."""
        who = (
            f"as {self.run_as.describe()}"
            if self.run_as is not None
            else f"as workerd's own uid {os.geteuid()}"
        )
        cgroups = self.sandbox.cgroups
        how = f"cgroup {cgroups.path}" if cgroups is not None else self.sandbox.containment
        return (
            f"exec actions run {who}; containment: {how}; rlimits"
            f" {self.sandbox.rlimits.describe()}; tmp root {self.tmp.path}"
        )

    def close(self) -> None:
        """Removes the parent cgroup and releases the tmp root."""
        if self.sandbox.cgroups is not None:
            self.sandbox.cgroups.close()
        self.tmp.close()


def _cgroup_tree(mode: str, name: str) -> CgroupTree | None:
    if mode == CGROUP_OFF:
        return None
    if mode == CGROUP_AUTO:
        base = own_cgroup_dir()
        if base is None or not os.access(base, os.W_OK):
            return None
        try:
            return CgroupTree.create(base, name)
        except OSError as err:
            log.debug("cgroups unavailable under %s: %s", base, err)
            return None
    try:
        return CgroupTree.create(mode, name)
    except OSError as err:
        raise ConfigError(
            f"--cgroup {mode}: cannot create cgroups there ({err.strerror or err}); give a"
            " cgroup v2 directory workerd may write to, 'auto' or 'off'"
        ) from None


def _sweep_run_as(run_as: RunAs, setpriv: str | None) -> int:
    """Kills every process of a run-as uid (left by an earlier workerd); returns the count."""
    gid_of = {i.uid: i.gid for i in run_as.identities}
    found = uid_processes(gid_of)
    for uid in {uid for _, uid, _ in found}:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            sweep_uid(uid, gid_of[uid], setpriv)
    return len(found)


def prepare_exec(
    *,
    worker_id: str,
    slots: int,
    run_as: RunAs | None,
    allow_root: bool,
    rlimits: Rlimits,
    cgroup: str = CGROUP_AUTO,
    tmp_root: str = "",
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> ExecSetup:
    """Prepares the exec sandbox (see the module docstring).

    Raises:
        ConfigError: the tmp root or an explicit ``--cgroup`` path cannot be used.
    """
    environ = os.environ if environ is None else environ
    search = path if path is not None else environ.get("PATH", os.defpath)
    setpriv = find_setpriv(search)
    if run_as is not None and setpriv is None:
        raise ConfigError(
            "--run-as needs util-linux setpriv (it switches each attempt to its user); install"
            " it (package util-linux) or drop --run-as"
        )
    tmp = prepare_tmp_root(
        tmp_root or default_tmp_root(worker_id, environ),
        run_as=run_as.identities if run_as is not None else (),
    )
    if tmp.swept:
        log.warning("removed %d attempt directories left in %s", tmp.swept, tmp.path)
    try:
        tree = _cgroup_tree(cgroup, CgroupTree.name_for(worker_id, tmp.path))
        if tree is not None:
            stale = tree.sweep()
            if stale:
                log.warning("killed and removed %d cgroups left in %s", stale, tree.path)
        if run_as is not None:
            stale = _sweep_run_as(run_as, setpriv)
            if stale:
                log.warning("killed %d processes left running as the --run-as uids", stale)
    except BaseException:
        tmp.close()
        raise
    sandbox = Sandbox(
        rlimits=rlimits,
        pool=UidPool(run_as) if run_as is not None else None,
        cgroups=tree,
        setpriv=setpriv,
        prlimit=_prlimit_step(run_as, search),
    )
    setup = ExecSetup(sandbox, tmp, run_as)
    setup.warnings.extend(_warnings(setup, slots=slots, allow_root=allow_root))
    return setup


def _prlimit_step(run_as: RunAs | None, search: str) -> str | None:
    """The prlimit binary when workerd cannot set an attempt's limits itself, else None.

    ``prlimit(2)`` on another process needs its uid, or CAP_SYS_RESOURCE: from workerd it
    costs a few syscalls while the attempt waits at its barrier, where the prlimit binary costs
    an exec (and loads libsmartcols).

    Raises:
        ConfigError: ``--run-as`` without CAP_SYS_RESOURCE and without prlimit.
    """
    if run_as is None or can_raise_limits():
        return None
    found = find_prlimit(search)
    if found is None:
        raise ConfigError(
            "--run-as: workerd lacks CAP_SYS_RESOURCE, so it needs util-linux prlimit to set"
            " the run-as users' rlimits; install it (package util-linux)"
        )
    return found


def _warnings(setup: ExecSetup, *, slots: int, allow_root: bool) -> list[str]:
    out: list[str] = []
    run_as, sandbox = setup.run_as, setup.sandbox
    if sandbox.setpriv is None:
        out.append(
            "setpriv (util-linux) not found: should the process spawner fail, actions"
            " start without PR_SET_PDEATHSIG (and without no_new_privs); the keeper still"
            " kills them if workerd dies"
        )
    if run_as is not None and len(run_as.identities) < slots:
        out.append(
            f"--run-as gives {len(run_as.identities)} uid(s) for {slots} slots: attempts"
            " running at the same time will share a uid, and then can read each other's"
            " environment (/proc/PID/environ: inputs, secrets) and files and signal each"
            " other; give at least as many uids as --slots (e.g. a range such as 62000-62063)"
        )
    if run_as is None and not allow_root:
        out.append(
            f"exec actions run as workerd's own uid {os.geteuid()}: they can read its"
            " environment and memory (credentials, --secret env: values), its files and each"
            " other's; use --run-as to give them users of their own"
        )
    if sandbox.containment == CONTAINMENT_GROUP:
        out.append(
            "processes that leave an attempt's process group (setsid, daemons) are not"
            " contained: they outlive the attempt's end, a cancel, the run timeout and"
            " workerd itself. Use --run-as (its uids are swept) or let workerd create"
            " cgroups (cgroup v2 delegation; --cgroup)"
        )
    return out
