"""The private directory that holds every attempt's directory: ``--tmp-root`` (workerd layer).

Default: ``$TMPDIR/plait-<worker id>``, else ``/var/tmp/plait-<worker id>``. At start-up workerd
creates it (mode 0700; 0711 with ``--run-as``, so that each attempt's user can reach its own
directory inside without listing the others), refuses one that is a symlink, not a
directory, owned by another user or writable by group or others, and locks it (``flock``), so
two workerds never share one. Then it removes whatever an earlier workerd left there — killed
before it could clean up — even directories an action made read-only.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from plait.errors import ConfigError
from plait.workerd.containment import remove_tree
from plait.workerd.runas import Identity

__all__ = ["TmpRoot", "default_tmp_root", "prepare_tmp_root"]

log = logging.getLogger(__name__)


def default_tmp_root(worker_id: str, environ: Mapping[str, str]) -> str:
    """``$TMPDIR/plait-<worker id>``, else ``/var/tmp/plait-<worker id>``."""
    return os.path.join(environ.get("TMPDIR") or "/var/tmp", f"plait-{worker_id}")


@dataclass(slots=True)
class TmpRoot:
    """The locked tmp root; the lock lasts until :meth:`close` (or until workerd dies)."""

    path: str
    fd: int
    swept: int = 0

    def close(self) -> None:
        """Releases the lock."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _who_cannot_reach(path: str, identities: Iterable[Identity]) -> str:
    """A problem when a run-as identity cannot traverse every parent of ``path`` ('' if all can)."""
    idents = list(identities)
    parent = os.path.dirname(path)
    while True:
        try:
            st = os.stat(parent)
        except OSError:
            return ""
        mode = st.st_mode
        for ident in idents:
            ok = (
                mode & stat.S_IXOTH
                or (st.st_uid == ident.uid and mode & stat.S_IXUSR)
                or (st.st_gid == ident.gid and mode & stat.S_IXGRP)
            )
            if not ok:
                return (
                    f"the run-as user {ident} cannot reach it: {parent} is mode"
                    f" {stat.S_IMODE(mode):04o} (owner uid {st.st_uid}); choose a --tmp-root"
                    " whose parents others may traverse, such as /var/tmp/plait"
                )
        if parent in ("/", ""):
            return ""
        parent = os.path.dirname(parent)


def prepare_tmp_root(path: str, *, run_as: Iterable[Identity] = ()) -> TmpRoot:
    """Creates, checks, locks and sweeps the tmp root (see the module docstring).

    Raises:
        ConfigError: naming ``--tmp-root`` and what is wrong with it.
    """
    path = os.path.abspath(path)
    idents = list(run_as)
    mode = 0o711 if idents else 0o700
    if "\n" in path:
        raise ConfigError(f"--tmp-root {path!r}: a path with a newline")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, mode)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        if os.path.islink(path):
            raise ConfigError(
                f"--tmp-root {path}: is a symbolic link; give the real directory"
            ) from None
        raise ConfigError(f"--tmp-root {path}: {err.strerror or err}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise ConfigError(
                f"--tmp-root {path}: owned by uid {st.st_uid}, not by workerd's uid"
                f" {os.geteuid()}; another user could tamper with the attempts' files"
            )
        if stat.S_IMODE(st.st_mode) & 0o022:
            raise ConfigError(
                f"--tmp-root {path}: is writable by group or others (mode"
                f" {stat.S_IMODE(st.st_mode):04o}); it must be private to workerd"
            )
        if stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
        if idents:
            problem = _who_cannot_reach(path, idents)
            if problem:
                raise ConfigError(f"--tmp-root {path}: {problem}")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"--tmp-root {path}: in use by another workerd (it holds the directory's lock);"
                " give each workerd its own --tmp-root (or its own --id)"
            ) from None
    except BaseException:
        os.close(fd)
        raise
    root = TmpRoot(path, fd)
    root.swept = sweep(path)
    return root


def sweep(path: str) -> int:
    """Removes everything in the tmp root (left by a workerd that died); returns a count."""
    removed = 0
    with os.scandir(path) as entries:
        names = [e.path for e in entries]
    for entry in names:
        if remove_tree(entry):
            removed += 1
        else:
            log.warning("could not remove %s, left by an earlier workerd", entry)
    return removed
