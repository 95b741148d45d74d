"""Containment: a cgroup per attempt, sweeps of run-as uids, removing attempt dirs (workerd layer).

Processes that leave an attempt's process group (``setsid``, double forks) are still found:

* **cgroups** (cgroup v2, where workerd may create cgroups under its own): each attempt gets a
  child cgroup of :class:`CgroupTree`; at the attempt's end everything in it is killed
  (``cgroup.kill``, else SIGKILL to each member until it is empty) and the cgroup removed.
  A process cannot leave a cgroup it cannot write to, so with ``--run-as`` nothing escapes.
* **uid sweeps** (``--run-as`` without cgroups, as Buildbarn's runner does): the attempt's uid
  belongs to no one else, so every process of that uid is killed at the attempt's end —
  ``kill(-1, SIGKILL)`` issued *as that uid*, which the kernel applies to every process of the
  uid at once (a fork bomb cannot outrun it).

Standard library only: the keeper (:mod:`plait.workerd.keeper`) imports this module.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterable, Iterator

__all__ = [
    "CgroupTree",
    "cgroup_empty",
    "cgroup_members",
    "join_cgroup",
    "kill_cgroup",
    "kill_uid_processes",
    "own_cgroup_dir",
    "remove_cgroup",
    "remove_tree",
    "sweep_argv",
    "sweep_uid",
    "try_remove_cgroup",
    "uid_processes",
]

log = logging.getLogger(__name__)

_PROCS = "cgroup.procs"
_KILL = "cgroup.kill"
_EVENTS = "cgroup.events"
# `kill -KILL -1` run as the uid being swept: kill(-1) reaches every process that uid may
# signal (its own), atomically with respect to fork, and spares the caller.
_SWEEP_SCRIPT = ("/bin/sh", "-c", "kill -KILL -1 2>/dev/null; exit 0")


def sweep_argv(setpriv: str, uid: int, gid: int) -> list[str]:
    """The command that SIGKILLs every process of ``uid`` at once (run it as root).

    setpriv switches to the uid by exec, so the caller needs no fork() of its own: a process
    with gRPC's threads must not fork (its fork handlers crash the child), and
    ``subprocess`` only uses vfork() when it changes no credentials itself.
    """
    return [
        setpriv,
        "--reuid", str(uid), "--regid", str(gid), "--clear-groups",
        "--",
        *_SWEEP_SCRIPT,
    ]  # fmt: skip


# ----- cgroups --------------------------------------------------------------------------------


def _unescape(field: str) -> str:
    """A /proc/self/mountinfo path field (spaces and the like are octal escapes)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _cgroup2_mounts(mountinfo: str) -> Iterator[tuple[str, str]]:
    """(root within the hierarchy, mount point) of each cgroup2 mount."""
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep or not right.startswith("cgroup2 "):
            continue
        fields = left.split()
        if len(fields) >= 5:
            yield _unescape(fields[3]), _unescape(fields[4])


def own_cgroup_dir(proc_cgroup: str | None = None, mountinfo: str | None = None) -> str | None:
    """The directory of this process's cgroup v2 cgroup (``/sys/fs/cgroup/...``), or None.

    ``proc_cgroup`` and ``mountinfo`` default to ``/proc/self/cgroup`` and
    ``/proc/self/mountinfo`` (injectable for tests). Hybrid hosts (v1 controllers plus a v2
    hierarchy at ``/sys/fs/cgroup/unified``) work too.
    """
    try:
        if proc_cgroup is None:
            with open("/proc/self/cgroup", encoding="utf-8") as f:
                proc_cgroup = f.read()
        if mountinfo is None:
            with open("/proc/self/mountinfo", encoding="utf-8") as f:
                mountinfo = f.read()
    except OSError:
        return None
    path = next((ln[3:] for ln in proc_cgroup.splitlines() if ln.startswith("0::")), None)
    if path is None:
        return None
    for root, mount_point in _cgroup2_mounts(mountinfo):
        base = root.rstrip("/")
        if path != root and not path.startswith(base + "/"):
            continue
        candidate = os.path.join(mount_point, path[len(base) :].lstrip("/"))
        if os.path.isfile(os.path.join(candidate, _PROCS)):
            return candidate.rstrip("/") or "/"
    return None


def cgroup_members(path: str) -> list[int]:
    """The pids in a cgroup (empty when it is gone)."""
    try:
        with open(os.path.join(path, _PROCS), encoding="ascii") as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []


def cgroup_empty(path: str) -> bool:
    """True when no process is left in the cgroup or below it (or it is gone)."""
    try:
        with open(os.path.join(path, _EVENTS), encoding="ascii") as f:
            return "populated 0" in f.read()
    except FileNotFoundError:
        return True
    except OSError:
        return not cgroup_members(path)


def join_cgroup(path: str, pid: int) -> None:
    """Moves ``pid`` (a process that has not forked yet) into the cgroup.

    Raises:
        OSError: the cgroup is gone or refuses the process.
    """
    with open(os.path.join(path, _PROCS), "w", encoding="ascii") as f:
        f.write(str(pid))


def signal_cgroup(path: str, sig: int) -> None:
    """Sends ``sig`` to every process in the cgroup (a best effort: members may come and go)."""
    for pid in cgroup_members(path):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def kill_cgroup(path: str) -> None:
    """SIGKILLs everything in the cgroup: ``cgroup.kill`` (Linux 5.14+) or each member.

    An empty cgroup is left alone (reading ``cgroup.events`` costs far less than a
    ``cgroup.kill``), and stays empty: nothing outside can join it but workerd.
    """
    if cgroup_empty(path):
        return
    try:
        with open(os.path.join(path, _KILL), "w", encoding="ascii") as f:
            f.write("1")
        return
    except FileNotFoundError:
        if not os.path.isdir(path):
            return
    except OSError:
        pass
    signal_cgroup(path, signal.SIGKILL)


def try_remove_cgroup(path: str) -> bool | None:
    """One attempt at removing an emptied cgroup: True when it is gone, None while it is busy
    (members still exiting, or child cgroups), False when it cannot be removed at all."""
    if not cgroup_empty(path):
        return None
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError as err:
        if err.errno in (errno.EBUSY, errno.ENOTEMPTY):
            return None
        log.warning("cannot remove cgroup %s: %s", path, err)
        return False
    return True


def remove_cgroup(path: str, *, rounds: int = 500, pause: float = 0.01) -> bool:
    """Kills everything in the cgroup, waits until it is empty, and removes it (blocking).

    For start-up sweeps and the keeper; the executor does the same without blocking its loop.
    Returns False when the cgroup could not be removed.
    """
    for i in range(rounds):
        if i % 10 == 0:
            kill_cgroup(path)  # again now and then: without cgroup.kill, forks race the kills
        removed = try_remove_cgroup(path)
        if removed is not None:
            return removed
        if cgroup_empty(path):  # busy only with child cgroups
            for child in _child_cgroups(path):
                remove_cgroup(child, rounds=rounds, pause=pause)
        time.sleep(pause)
    return False


def _child_cgroups(path: str) -> list[str]:
    try:
        with os.scandir(path) as entries:
            return [e.path for e in entries if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


class CgroupTree:
    """The cgroup under which one workerd makes a child cgroup per attempt.

    Its name, ``plait-<worker id>-<hash of the tmp root>``, is the same for a workerd restarted
    with the same settings, so the new one finds (and kills) what the old one left; two
    workerds never share one, because they never share a tmp root (it is locked).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._seq = 0

    @staticmethod
    def name_for(worker_id: str, tmp_root: str) -> str:
        """``plait-<worker id>-<8 hex digits of the tmp root's path>``."""
        digest = hashlib.sha256(os.path.realpath(tmp_root).encode()).hexdigest()[:8]
        return f"plait-{worker_id}-{digest}"

    @classmethod
    def create(cls, base: str, name: str) -> CgroupTree:
        """Makes (or reuses) ``base/name``.

        Raises:
            OSError: ``base`` is not a cgroup v2 directory this process may create cgroups in.
        """
        if not os.path.isfile(os.path.join(base, _PROCS)):
            raise OSError(errno.ENOTDIR, f"{base} is not a cgroup v2 directory (no {_PROCS})")
        path = os.path.join(base, name)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path)
        return cls(path)

    def sweep(self) -> int:
        """Kills and removes every attempt cgroup left here (by an earlier workerd); a count."""
        removed = 0
        for child in _child_cgroups(self.path):
            removed += remove_cgroup(child)
        return removed

    def new_attempt(self) -> str:
        """Creates an empty cgroup for one attempt and returns its directory.

        Raises:
            OSError: it could not be created.
        """
        self._seq += 1
        path = os.path.join(self.path, f"a{os.getpid()}-{self._seq}")
        try:
            os.mkdir(path)
        except FileNotFoundError:  # the keeper of a workerd before us removed the parent
            os.makedirs(path)
        return path

    def close(self) -> None:
        """Removes the (then empty) parent cgroup."""
        self.sweep()
        with contextlib.suppress(OSError):
            os.rmdir(self.path)


# ----- uids -----------------------------------------------------------------------------------


def _real_uid_and_pgid(pid: str) -> tuple[int, int] | None:
    """(real uid, process group) of a live process; None when gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
        with open(f"/proc/{pid}/status", "rb") as f:
            status = f.read()
    except OSError:
        return None
    rest = raw[raw.rindex(b")") + 2 :].split()
    if rest[0] in (b"Z", b"X"):
        return None
    start = status.find(b"\nUid:")
    if start < 0:
        return None
    # The real uid: /proc/PID's owner is the effective one, and a non-dumpable process shows
    # as root's, so stat() of the directory would let a process hide.
    return int(status[start + 5 :].split()[0]), int(rest[2])


def uid_processes(uids: Iterable[int]) -> list[tuple[int, int, int]]:
    """(pid, real uid, process group) of every live process whose real uid is in ``uids``."""
    wanted = set(uids)
    out: list[tuple[int, int, int]] = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            found = _real_uid_and_pgid(name)
            if found is not None and found[0] in wanted:
                out.append((int(name), found[0], found[1]))
    return out


def kill_uid_processes(uid: int, spare_pgids: Iterable[int] = (), *, rounds: int = 50) -> int:
    """SIGKILLs every process of ``uid`` outside the ``spare_pgids`` groups (a /proc scan).

    For a uid that live attempts still share, where ``kill(-1)`` as the uid would hit them too.
    Scans again until a scan finds nothing (bounded by ``rounds``); returns the number killed.
    """
    spare = set(spare_pgids)
    killed = 0
    for _ in range(rounds):
        victims = [pid for pid, _, pgid in uid_processes([uid]) if pgid not in spare]
        if not victims:
            break
        for pid in victims:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        time.sleep(0.005)
    return killed


def sweep_uid(uid: int, gid: int, setpriv: str | None) -> None:
    """SIGKILLs every process of ``uid`` (blocking): ``kill(-1)`` as ``uid`` through setpriv
    (:func:`sweep_argv`), else a scan of /proc (:func:`kill_uid_processes`)."""
    if setpriv is None:
        kill_uid_processes(uid)
        return
    subprocess.run(
        sweep_argv(setpriv, uid, gid),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
        close_fds=True,
        env={},
        timeout=30,
    )


# ----- attempt directories ----------------------------------------------------------------------


def _make_owner_writable(path: str) -> None:
    """Gives every directory under ``path`` (itself included) mode 0700, never via a symlink.

    An action may have made its directories read-only (or unreadable); a non-root workerd then
    could not delete their entries. Each directory is opened ``O_PATH|O_NOFOLLOW`` and changed
    through ``/proc/self/fd``, so a symlink planted in the tree never redirects a chmod.
    """
    stack = [path]
    while stack:
        current = stack.pop()
        try:
            fd = os.open(current, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            os.chmod(f"/proc/self/fd/{fd}", stat.S_IRWXU)
        except OSError:
            pass
        finally:
            os.close(fd)
        try:
            with os.scandir(current) as entries:
                stack.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))
        except OSError:
            continue


_FLAT_MAX = 16


def _remove_flat_dir(path: str, max_entries: int = _FLAT_MAX) -> bool | None:
    """Removes a directory that holds at most ``max_entries`` non-directories.

    The common attempt directory (the inputs file, maybe the output file) in a few system
    calls, where ``shutil.rmtree`` makes several per entry. Entries are removed through a
    descriptor of the directory opened ``O_NOFOLLOW``, so a symlink is removed, never followed.
    Returns True when ``path`` is gone, None when it is something else (a symlink, a
    subdirectory, more entries, an error).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    except OSError:
        return None
    try:
        names: list[str] = []
        with os.scandir(fd) as entries:
            for entry in entries:
                if len(names) >= max_entries or entry.is_dir(follow_symlinks=False):
                    return None
                names.append(entry.name)
        for name in names:
            os.unlink(name, dir_fd=fd)
    except OSError:
        return None
    finally:
        os.close(fd)  # before the rmdir: closing a removed directory is the dearer order
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return None
    return True


def remove_tree(path: str) -> bool:
    """Removes an attempt's directory even when the action chmod'ed parts of it.

    Never follows symlinks (``shutil.rmtree`` works through directory descriptors). Returns
    whether ``path`` is gone. Blocking (an ext4 rmdir may wait on the journal for a
    millisecond or more): the executor calls it in a thread.
    """
    if _remove_flat_dir(path):
        return True
    if os.path.islink(path):
        os.unlink(path)
        return True
    try:
        shutil.rmtree(path)
        return True
    except FileNotFoundError:
        return True
    except NotADirectoryError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return True
    except OSError:
        pass
    _make_owner_writable(path)
    shutil.rmtree(path, ignore_errors=True)
    return not os.path.lexists(path)
