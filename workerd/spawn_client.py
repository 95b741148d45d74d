"""workerd's end of the spawner: a request per attempt, an awaitable start and exit (workerd layer).

The spawner (:mod:`plait.workerd.spawner`) is a single-threaded program workerd starts once; it
forks, sets each attempt up (session, rlimits, cgroup, user, parent-death signal) and execs the
action, then reaps it. :class:`Spawner` starts it, sends it requests with the attempt's stdio
(``SCM_RIGHTS``), and resolves each :class:`SpawnedChild`'s ``started`` (the pid, which is also
the process group) and ``exited`` futures from its events, read on the event loop.

If the spawner dies, the attempts it started die with it (their parent-death signal), their
``exited`` futures fail with :class:`SpawnError`, and the next request starts a new spawner. A
spawner that dies before it says it is ready, :data:`START_LIMIT` times in a row, is given up
(:attr:`Spawner.available` turns False) and the executor starts attempts the old way, through
a chain of execs (:mod:`plait.workerd.confinement`).

Runs on the event loop thread only: the spawner's parent-death signal follows the thread that
started it, and the loop thread lives as long as workerd.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import marshal
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["START_LIMIT", "ChildExit", "SpawnError", "SpawnedChild", "Spawner"]

log = logging.getLogger(__name__)

START_LIMIT = 3
_PROGRAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spawner.py")
_HEADER = 4  # each message: its length (little-endian), then a dict in marshal format
_SEND_TIMEOUT_S = 5.0  # a spawner that takes no request for this long is taken for dead


class SpawnError(Exception):
    """The spawner could not start a child, or died (its children died with it)."""


@dataclass(frozen=True, slots=True)
class ChildExit:
    """How a spawned child ended, as the spawner reaped it."""

    status: int
    """The raw wait status."""
    error: tuple[str, int] | None
    """(step, errno) when the child failed before or at its exec (``exec``, ``cgroup``, ...)."""
    utime: float = 0.0
    stime: float = 0.0
    maxrss: int = 0
    """Peak resident set size in KiB."""

    @property
    def returncode(self) -> int:
        """The exit code, or minus the signal that killed it (as ``subprocess`` has it)."""
        return os.waitstatus_to_exitcode(self.status)


class SpawnedChild:
    """One request: ``started`` resolves to the pid, ``exited`` to its :class:`ChildExit`."""

    __slots__ = ("exited", "id", "pid", "started")

    def __init__(self, rid: int, loop: asyncio.AbstractEventLoop) -> None:
        self.id = rid
        self.pid = 0
        self.started: asyncio.Future[int] = loop.create_future()
        self.exited: asyncio.Future[ChildExit] = loop.create_future()

    def fail(self, err: SpawnError) -> None:
        if not self.started.done():
            self.started.set_exception(err)
            self.exited.cancel()  # never awaited: nothing started
        elif not self.exited.done():
            self.exited.set_exception(err)


class Spawner:
    """Starts the spawner program and talks to it (see the module docstring)."""

    def __init__(self, python: str = sys.executable) -> None:
        self._python = python
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future[None] | None = None
        self._children: dict[int, SpawnedChild] = {}
        self._buf = bytearray()
        self._next_id = 0
        self._failed_starts = 0
        self.available = True
        """False once the spawner kept dying at start (the executor then uses the exec chain)."""

    @property
    def pid(self) -> int | None:
        """The spawner's pid while it runs."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._sock is not None

    def start(self) -> None:
        """Starts the spawner (idempotent); on the event loop thread."""
        if self._sock is not None or not self.available:
            return
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._proc = subprocess.Popen(
                [self._python, "-I", "-S", _PROGRAM, str(os.getpid()), str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                # Its own session: terminal signals aimed at workerd's group do not reach it.
                start_new_session=True,
            )
        except OSError as err:
            ours.close()
            self._start_failed(f"cannot start it: {err}")
            return
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock, self._loop = ours, loop
        self._ready = loop.create_future()
        self._buf.clear()
        loop.add_reader(ours.fileno(), self._readable)

    async def wait_ready(self, limit: float) -> bool:
        """Starts the spawner if needed and waits until it takes requests."""
        self.start()
        ready = self._ready
        if ready is None or not self.running:
            return False
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(ready), limit)
        return ready.done() and not ready.cancelled()

    def spawn(
        self,
        *,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str,
        stdio: tuple[int, int, int],
        limits: Mapping[int, int],
        cgroup: str = "",
        user: tuple[int, int] | None = None,
        pdeathsig: bool = True,
        no_new_privs: bool = False,
    ) -> SpawnedChild:
        """Asks for one attempt's process; ``stdio`` is duplicated into the child.

        Raises:
            SpawnError: the spawner is unavailable or could not be reached.
        """
        req = {
            "op": "spawn",
            "argv": list(argv),
            "env": dict(env),
            "cwd": cwd,
            "limits": [(int(k), int(v)) for k, v in limits.items()],
            "cgroup": cgroup,
            "user": user,
            "pdeathsig": pdeathsig,
            "nnp": no_new_privs,
        }
        return self._request(req, stdio)

    async def sweep(self, uid: int, gid: int) -> None:
        """SIGKILLs every process of ``uid`` at once (``kill(-1)`` as ``uid``).

        Raises:
            SpawnError: the spawner is unavailable or died.
        """
        child = self._request({"op": "sweep", "user": (uid, gid)}, ())
        await child.started
        await child.exited

    def _request(self, req: dict[str, Any], fds: Sequence[int]) -> SpawnedChild:
        for _ in range(2):  # a spawner found dead on sending is restarted once
            self.start()
            if self._sock is None or self._loop is None:
                raise SpawnError("the spawner is unavailable")
            self._next_id += 1
            req["id"] = self._next_id
            body = marshal.dumps(req)
            data = len(body).to_bytes(_HEADER, "little") + body
            try:
                self._send(self._sock, data, fds)
            except OSError as err:
                self._lost(f"cannot send it a request: {err}")
                continue
            child = SpawnedChild(self._next_id, self._loop)
            self._children[child.id] = child
            return child
        raise SpawnError("the spawner died")

    @staticmethod
    def _send(sock: socket.socket, data: bytes, fds: Sequence[int]) -> None:
        view = memoryview(data)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        while view:
            try:
                sent = sock.sendmsg([view], anc)
            except BlockingIOError:
                # The spawner reads all the time; a full buffer means it is stuck or dead.
                poller = select.poll()
                poller.register(sock, select.POLLOUT)
                if not poller.poll(_SEND_TIMEOUT_S * 1000):
                    raise TimeoutError("the spawner takes no requests") from None
                continue
            anc = []  # the descriptors travel with the first byte sent
            view = view[sent:]

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            data = sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self._lost(f"cannot read from it: {err}")
            return
        if not data:
            self._lost("it exited")
            return
        buf = self._buf
        buf += data
        start = 0
        while len(buf) - start >= _HEADER:
            end = start + _HEADER + int.from_bytes(buf[start : start + _HEADER], "little")
            if len(buf) < end:
                break
            event = marshal.loads(buf[start + _HEADER : end])
            start = end
            self._event(event)
            if self._sock is None:  # the spawner was lost meanwhile
                return
        del buf[:start]

    def _event(self, ev: dict[str, Any]) -> None:
        kind = ev["ev"]
        if kind == "ready":
            self._failed_starts = 0
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
            return
        child = self._children.get(ev["id"])
        if child is None:
            return
        if kind == "started":
            child.pid = ev["pid"]
            if not child.started.done():
                child.started.set_result(child.pid)
            return
        del self._children[child.id]
        if kind == "failed":
            step, code = ev["error"]
            child.fail(SpawnError(f"cannot {step}: {os.strerror(code)}"))
            return
        error = ev.get("error")
        done = ChildExit(
            status=ev["status"],
            error=(str(error[0]), int(error[1])) if error else None,
            utime=ev.get("utime", 0.0),
            stime=ev.get("stime", 0.0),
            maxrss=ev.get("maxrss", 0),
        )
        if not child.exited.done():
            child.exited.set_result(done)

    def _lost(self, why: str) -> None:
        """The spawner is gone (or unusable): fail its children; the next request restarts it."""
        was_ready = self._ready is not None and self._ready.done()
        self._stop(kill=True)
        children, self._children = self._children, {}
        err = SpawnError(f"workerd's process spawner died ({why}); its attempts were killed")
        for child in children.values():
            child.fail(err)
        if was_ready:
            log.error("the process spawner died (%s); restarting it", why)
        else:
            self._start_failed(why)

    def _start_failed(self, why: str) -> None:
        self._failed_starts += 1
        if self._failed_starts >= START_LIMIT:
            self.available = False
            log.error(
                "the process spawner failed to start %d times (%s): attempts start through"
                " the exec chain (setpriv, start barrier) from now on",
                self._failed_starts,
                why,
            )
        else:
            log.warning("the process spawner failed to start (%s)", why)

    def _stop(self, *, kill: bool) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
            sock.close()  # EOF: the spawner exits (its children get their SIGKILL)
        if self._ready is not None and not self._ready.done():
            self._ready.cancel()
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if kill:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        """Stops the spawner (children still running get their parent-death SIGKILL)."""
        self._stop(kill=False)
        children, self._children = self._children, {}
        for child in children.values():
            child.fail(SpawnError("workerd closed its process spawner"))
