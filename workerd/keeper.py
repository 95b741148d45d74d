"""The keeper: kills an attempt's processes when workerd dies or cannot fence them (workerd layer).

Attempts run in their own process group, and direct children carry ``PR_SET_PDEATHSIG``, but
grandchildren do not. So workerd starts one long-lived keeper (``python -m
plait.workerd.keeper``) whose stdin is a pipe from workerd, and tells it, one line each, what
to clean up if workerd dies:

* ``+<pgid>`` / ``-<pgid>``: an attempt's process group started / is gone;
* ``+c <dir>`` / ``-c <dir>``: an attempt's cgroup (killed and removed);
* ``+d <dir>`` / ``-d <dir>``: an attempt's directory (removed, inputs included);
* ``+u <uid>:<gid>``: a run-as identity (every process of that uid is killed);
* ``+p <dir>``: workerd's parent cgroup (removed once empty);
* ``+f <seconds>`` / ``-f``: the fence: a ``CLOCK_MONOTONIC`` time (``time.monotonic()``, the
  same clock in every process) by which every attempt must be dead unless a later ``+f``
  arrives; ``-f`` (or ``+f inf``) disarms it.

Only workerd holds the pipe's write end, so when workerd dies — however it dies — the keeper
reads EOF, kills every group, cgroup and uid still registered, removes the directories and
exits.

**The fence** covers the other way a worker loses control of its attempts: workerd is alive but
not running (SIGSTOP, a frozen VM, a stalled event loop), so its own self-fencing
(:mod:`plait.worker.fence`) cannot act while the coordinator lets the lease run out and grants
it elsewhere. workerd moves the fence forward on every acknowledged heartbeat
(:meth:`Keeper.fence`); the keeper waits on stdin with a timeout to it, and when it passes with
an attempt registered (a group or a cgroup) it SIGKILLs every registered group and cgroup and
sweeps the registered uids — while workerd is still frozen. It keeps the registrations (workerd
unregisters them once it has reaped the processes) and disarms until a new ``+f`` arrives. It
writes nothing: workerd reports those attempts as killed when it runs again.

This module is run as a program: it imports nothing but the standard library (and the
standard-library-only :mod:`plait.workerd.containment` and :mod:`plait.clock`), so the keeper
starts in a few milliseconds.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from plait.clock import Clock, SystemClock
from plait.workerd import containment

log = logging.getLogger(__name__)

_KINDS = "gcdup"
_MAX_WAIT_MS = 3_600_000.0  # poll() takes a C int of milliseconds; a far deadline is re-checked
_NAP_S = 0.01  # after a read, how long the keeper lets lines pile up (see _serve)


def _parse(line: bytes) -> tuple[bool, str, str] | None:
    """(added, kind, value) of one keeper line; kind ``g`` is a process group."""
    text = line.decode("utf-8", "surrogateescape").strip()
    if len(text) < 2 or text[0] not in "+-":
        return None
    added, rest = text[0] == "+", text[1:]
    if rest.isdigit():
        return (added, "g", rest) if int(rest) > 1 else None
    if rest == "f" and not added:
        return False, "f", ""
    kind, sep, value = rest.partition(" ")
    if not sep or len(kind) != 1 or kind not in "cdupf" or not value:
        return None
    return added, kind, value


class KeeperState:
    """What the keeper holds: the registrations, and the fence deadline while armed."""

    __slots__ = ("deadline", "live")

    def __init__(self) -> None:
        self.live: dict[str, set[str]] = {kind: set() for kind in _KINDS}
        self.deadline: float | None = None
        """Monotonic seconds by which every attempt must be dead; None: disarmed."""

    def apply(self, line: bytes) -> None:
        """Applies one line from workerd (malformed lines are ignored)."""
        parsed = _parse(line)
        if parsed is None:
            return
        added, kind, value = parsed
        if kind == "f":
            self.deadline = _deadline(value) if added else None
        elif added:
            self.live[kind].add(value)
        else:
            self.live[kind].discard(value)

    @property
    def attempts(self) -> bool:
        """Whether any attempt is registered (a process group or a cgroup)."""
        return bool(self.live["g"] or self.live["c"])

    def fence_due(self, now: float) -> bool:
        """Whether the fence deadline has passed at monotonic time ``now``."""
        return self.deadline is not None and now >= self.deadline

    def fence(self) -> None:
        """Kills every registered attempt (if any) and disarms; registrations stay."""
        self.deadline = None
        if self.attempts:
            kill_attempts(self.live)


def _deadline(value: str) -> float | None:
    try:
        deadline = float(value)
    except ValueError:
        return None
    return deadline if math.isfinite(deadline) else None


def keep(stream: Iterable[bytes] | None = None, clock: Clock | None = None) -> int:
    """The keeper's loop: apply lines and fence on time until EOF, then clean up what is left.

    Without ``stream`` it reads its stdin, waking at the fence deadline even when no line comes.
    """
    # Ctrl-C in workerd's terminal must not take the keeper down before workerd.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    clock = clock if clock is not None else SystemClock()
    state = KeeperState()
    if stream is not None:
        for raw in stream:
            state.apply(raw)
            if state.fence_due(clock.monotonic()):
                state.fence()
    else:
        _serve(state, sys.stdin.fileno(), clock)
    cleanup(state.live)
    return 0


def _serve(
    state: KeeperState, fd: int, clock: Clock, nap: Callable[[float], None] = time.sleep
) -> None:
    """Reads lines from ``fd`` until EOF; fences whenever the armed deadline passes.

    After each read it naps up to :data:`_NAP_S` (never past the fence deadline) before it
    looks again: a write to a pipe whose reader is not waiting wakes nobody, and a wake-up is
    the dearest part of a registration (a cross-CPU wake-up on a virtual machine), so workerd's
    lines cost it little however many attempts start. Lines are read before the fence is
    checked, so a deadline moved during a nap is seen; EOF is seen at most a nap late.
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    pending = b""
    while True:
        timeout_ms: int | None = None
        if state.deadline is not None:
            wait = (state.deadline - clock.monotonic()) * 1000
            timeout_ms = math.ceil(min(max(wait, 0.0), _MAX_WAIT_MS))
        if poller.poll(timeout_ms):
            try:
                data = os.read(fd, 1 << 16)
            except OSError:
                data = b""
            if not data:
                if pending:
                    state.apply(pending)
                return
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                state.apply(line)
            rest = _NAP_S
            if state.deadline is not None:
                rest = min(rest, state.deadline - clock.monotonic())
            if rest > 0:
                nap(rest)
                continue  # read what came during the nap before judging the fence
        # Checked after every wake, so a steady stream of lines cannot starve the fence.
        if state.fence_due(clock.monotonic()):
            state.fence()


def kill_attempts(live: dict[str, set[str]]) -> None:
    """SIGKILLs every registered group and cgroup and every process of a registered uid."""
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


def cleanup(live: dict[str, set[str]]) -> None:
    """Kills every registered group, cgroup and uid; removes cgroups and directories."""
    kill_attempts(live)
    for path in live["c"]:
        containment.remove_cgroup(path)
    for path in live["d"]:
        containment.remove_tree(path)
    for path in live["p"]:
        with contextlib.suppress(OSError):
            os.rmdir(path)


def _is_attempt(item: str) -> bool:
    """Whether a registered item is an attempt's process group or cgroup."""
    return item.isdigit() or item.startswith("c ")


class Keeper:
    """Workerd's end of the keeper: starts it and registers what it must clean up.

    Writes are a few bytes on a pipe the keeper drains continuously, so they do not block in
    practice. If the keeper dies it is restarted and everything live registered again.

    Each write wakes the keeper, so lines are coalesced where that is safe: a removal waits for
    the next write (or :meth:`flush`; the keeper only forgets later), and registrations made
    inside :meth:`batch` go out together when the block ends.
    """

    def __init__(self, python: str = sys.executable) -> None:
        self._python = python
        self._proc: subprocess.Popen[bytes] | None = None
        self._items: set[str] = set()  # registered lines, without the leading +/-
        self._fence = math.inf  # the latest fence deadline; inf: none
        self._fence_sent = math.inf  # the one the keeper process has
        self._pending = bytearray()  # lines not written yet (removals; registrations in batch())
        self._batching = 0
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
        self._fence_sent = math.inf
        self._pending.clear()  # the new keeper gets what is registered now, nothing stale
        data = "".join(f"+{item}\n" for item in self._items)
        if any(map(_is_attempt, self._items)):
            data += self._fence_line()
        if data:
            self._write(data.encode())

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Registrations made in the block reach the keeper in one write when it ends.

        Only for blocks without an await, that start nothing before they end: what is
        registered inside is not covered until then.
        """
        with self._lock:
            self._batching += 1
        try:
            yield
        finally:
            with self._lock:
                self._batching -= 1
                self._send(b"")

    def flush(self) -> None:
        """Writes the lines still held back (removals)."""
        with self._lock:
            self._send(b"")

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

    def fence(self, deadline: float) -> None:
        """Every attempt must be dead by monotonic time ``deadline`` unless moved again.

        The keeper SIGKILLs every registered group, cgroup and uid then, even while workerd
        is frozen; ``math.inf`` disarms. Coalesced: only a changed deadline is written, and
        only while an attempt is registered (the first registration carries it along).
        """
        with self._lock:
            self._fence = deadline
            if any(map(_is_attempt, self._items)):
                line = self._fence_line()
                if line:
                    self._send(line.encode())

    def _fence_line(self) -> str:
        """The line that tells the keeper the current fence, or "" when it already has it."""
        if self._fence == self._fence_sent:
            return ""
        self._fence_sent = self._fence
        return "-f\n" if math.isinf(self._fence) else f"+f {self._fence!r}\n"

    def _add(self, item: str) -> None:
        with self._lock:
            self._items.add(item)
            fence = self._fence_line() if _is_attempt(item) else ""
            self._send(f"{fence}+{item}\n".encode())

    def _remove(self, item: str) -> None:
        # Held back until the next write: an attempt's end unregisters its group, cgroup and
        # directory in one write (it flushes), and a registration never waits behind it.
        with self._lock:
            self._items.discard(item)
            self._pending += f"-{item}\n".encode()

    def _send(self, data: bytes) -> None:
        """Writes ``data`` after the held-back lines, unless inside :meth:`batch`."""
        if self._proc is None:
            self._pending.clear()
            return
        self._pending += data
        if self._batching or not self._pending:
            return
        data, self._pending = bytes(self._pending), bytearray()
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
        with self._lock:
            if self._pending and self._proc is not None and self._proc.poll() is None:
                # Removals first: the keeper must not clean up what is already gone.
                with contextlib.suppress(OSError):
                    self._write(bytes(self._pending))
            self._pending.clear()
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
