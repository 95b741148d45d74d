"""The keeper: kills every action process group when workerd dies (workerd layer).

Attempts run in their own process group, and direct children carry ``PR_SET_PDEATHSIG``, but
grandchildren do not. So workerd starts one long-lived keeper (``python -m
plait.workerd.keeper``) whose stdin is a pipe from workerd. Workerd writes ``+<pgid>`` when an
attempt starts and ``-<pgid>`` when it ends. Only workerd holds the pipe's write end, so when
workerd dies — however it dies, SIGKILL included — the keeper reads EOF, SIGKILLs every group
still registered, and exits.

This module is run as a program: it imports nothing but the standard library, so the keeper
starts in a few milliseconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable

log = logging.getLogger(__name__)


def keep(stream: Iterable[bytes] | None = None) -> int:
    """The keeper's loop: read ``+pgid``/``-pgid`` lines until EOF, then kill what is left."""
    # Ctrl-C in workerd's terminal must not take the keeper down before workerd.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    source = stream if stream is not None else sys.stdin.buffer
    groups: set[int] = set()
    for raw in source:
        line = raw.strip()
        if len(line) < 2:
            continue
        try:
            pgid = int(line[1:])
        except ValueError:
            continue
        if pgid <= 1:
            continue
        if line[:1] == b"+":
            groups.add(pgid)
        elif line[:1] == b"-":
            groups.discard(pgid)
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    return 0


class Keeper:
    """Workerd's end of the keeper: starts it and registers process groups with it.

    Writes are a few bytes on a pipe the keeper drains continuously, so they do not block in
    practice. If the keeper dies it is restarted and every live group registered again.
    """

    def __init__(self, python: str = sys.executable) -> None:
        self._python = python
        self._proc: subprocess.Popen[bytes] | None = None
        self._groups: set[int] = set()
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
        for pgid in self._groups:
            self._write(f"+{pgid}\n".encode())

    def register(self, pgid: int) -> None:
        """An attempt's process group started."""
        with self._lock:
            self._groups.add(pgid)
            self._send(f"+{pgid}\n".encode())

    def unregister(self, pgid: int) -> None:
        """An attempt's process group is gone."""
        with self._lock:
            self._groups.discard(pgid)
            self._send(f"-{pgid}\n".encode())

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
        """Closes the pipe; the keeper kills any group still registered and exits."""
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
