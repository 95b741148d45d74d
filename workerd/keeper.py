"""The keeper: cleans up after workerd when it dies, SIGKILL included (workerd layer).

Attempts run in their own process group, and direct children carry ``PR_SET_PDEATHSIG``, but
grandchildren do not. So workerd starts one long-lived keeper (``python -m
plait.workerd.keeper``) whose stdin is a pipe from workerd, and tells it, one line each, what
to clean up if workerd dies:

* ``+<pgid>`` / ``-<pgid>``: an attempt's process group started / is gone;
* ``+c <dir>`` / ``-c <dir>``: an attempt's cgroup (killed and removed);
* ``+d <dir>`` / ``-d <dir>``: an attempt's directory (removed, inputs included);
* ``+u <uid>:<gid>``: a run-as identity (every process of that uid is killed);
* ``+p <dir>``: workerd's parent cgroup (removed once empty).

Only workerd holds the pipe's write end, so when workerd dies — however it dies — the keeper
reads EOF, kills every group, cgroup and uid still registered, removes the directories and
exits.

This module is run as a program: it imports nothing but the standard library (and the
standard-library-only :mod:`plait.workerd.containment`), so the keeper starts in a few
milliseconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable

from plait.workerd import containment

log = logging.getLogger(__name__)


def _parse(line: bytes) -> tuple[bool, str, str] | None:
    """(added, kind, value) of one keeper line; kind ``g`` is a process group."""
    text = line.decode("utf-8", "surrogateescape").strip()
    if len(text) < 2 or text[0] not in "+-":
        return None
    added, rest = text[0] == "+", text[1:]
    if rest.isdigit():
        return (added, "g", rest) if int(rest) > 1 else None
    kind, sep, value = rest.partition(" ")
    if not sep or kind not in "cdup" or len(kind) != 1 or not value:
        return None
    return added, kind, value


def keep(stream: Iterable[bytes] | None = None) -> int:
    """The keeper's loop: read registrations until EOF, then clean up what is left."""
    # Ctrl-C in workerd's terminal must not take the keeper down before workerd.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    source = stream if stream is not None else sys.stdin.buffer
    live: dict[str, set[str]] = {kind: set() for kind in "gcdup"}
    for raw in source:
        parsed = _parse(raw)
        if parsed is None:
            continue
        added, kind, value = parsed
        if added:
            live[kind].add(value)
        else:
            live[kind].discard(value)
    cleanup(live)
    return 0


def cleanup(live: dict[str, set[str]]) -> None:
    """Kills every registered group, cgroup and uid; removes cgroups and directories."""
    for pgid in live["g"]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(int(pgid), signal.SIGKILL)
    for path in live["c"]:
        containment.kill_cgroup(path)
    if live["u"]:
        setpriv = shutil.which("setpriv", path=f"/usr/bin:/bin:{os.environ.get('PATH', '')}")
        idents = dict(ident.partition(":")[::2] for ident in live["u"])
        # Only the uids that still have processes: a pool may hold thousands.
        with contextlib.suppress(ValueError):
            present = {uid for _, uid, _ in containment.uid_processes(map(int, idents))}
            for uid in present:
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    containment.sweep_uid(uid, int(idents[str(uid)]), setpriv)
    for path in live["c"]:
        containment.remove_cgroup(path)
    for path in live["d"]:
        containment.remove_tree(path)
    for path in live["p"]:
        with contextlib.suppress(OSError):
            os.rmdir(path)


class Keeper:
    """Workerd's end of the keeper: starts it and registers what it must clean up.

    Writes are a few bytes on a pipe the keeper drains continuously, so they do not block in
    practice. If the keeper dies it is restarted and everything live registered again.
    """

    def __init__(self, python: str = sys.executable) -> None:
        self._python = python
        self._proc: subprocess.Popen[bytes] | None = None
        self._items: set[str] = set()  # registered lines, without the leading +/-
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        """The keeper's pid while it runs."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Starts the keeper process (idempotent)."""
        if self._proc is not None and self._proc.poll() is None:
            return
        self._proc = subprocess.Popen(
            [self._python, "-m", "plait.workerd.keeper"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            # Its own session: terminal signals aimed at workerd's group do not reach it.
            start_new_session=True,
            close_fds=True,
        )
        if self._items:
            self._write("".join(f"+{item}\n" for item in self._items).encode())

    def register(self, pgid: int) -> None:
        """An attempt's process group started."""
        self._add(str(pgid))

    def unregister(self, pgid: int) -> None:
        """An attempt's process group is gone."""
        self._remove(str(pgid))

    def register_cgroup(self, path: str) -> None:
        """An attempt's cgroup exists (killed and removed if workerd dies)."""
        self._add(f"c {path}")

    def unregister_cgroup(self, path: str) -> None:
        """An attempt's cgroup is removed."""
        self._remove(f"c {path}")

    def register_dir(self, path: str) -> None:
        """An attempt's directory exists (removed if workerd dies)."""
        self._add(f"d {path}")

    def unregister_dir(self, path: str) -> None:
        """An attempt's directory is removed."""
        self._remove(f"d {path}")

    def register_uid(self, uid: int, gid: int) -> None:
        """A run-as identity: every process of ``uid`` is killed if workerd dies."""
        self._add(f"u {uid}:{gid}")

    def register_parent_cgroup(self, path: str) -> None:
        """workerd's parent cgroup: removed (when empty) if workerd dies."""
        self._add(f"p {path}")

    def _add(self, item: str) -> None:
        with self._lock:
            self._items.add(item)
            self._send(f"+{item}\n".encode())

    def _remove(self, item: str) -> None:
        with self._lock:
            self._items.discard(item)
            self._send(f"-{item}\n".encode())

    def _send(self, data: bytes) -> None:
        if self._proc is None:
            return
        try:
            self._write(data)
        except OSError:
            log.error("the keeper process died; restarting it")
            dead, self._proc = self._proc, None
            with contextlib.suppress(OSError):
                if dead.stdin is not None:
                    dead.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                dead.wait(timeout=1)
            self.start()

    def _write(self, data: bytes) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        os.write(self._proc.stdin.fileno(), data)

    def close(self) -> None:
        """Closes the pipe; the keeper cleans up anything still registered and exits."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    sys.exit(keep())
