"""Starting an exec attempt's process, two ways, behind one interface (workerd layer).

* **Through the spawner** (:mod:`plait.workerd.spawner`), the usual way: one request, one fork
  and one exec; the child sets its own session, rlimits, cgroup, user and parent-death signal
  before it execs the action. workerd makes the three pipes, hands the child its ends, writes
  the inputs to stdin at once and reads stdout and stderr on its event loop.
* **Through the exec chain** (:mod:`plait.workerd.confinement`), when the spawner is
  unavailable: asyncio's subprocess machinery runs ``setpriv`` (user switch, parent-death
  signal), then a ``/bin/sh`` start barrier that waits while workerd sets the rlimits and
  joins the cgroup, then the action.

Either way the executor gets an :class:`AttemptProcess`: its pid (also its process group) once
started, a release step (the chain's barrier), its exit code, and the tails of its output;
with a :class:`LiveSink`, what it writes also goes to the session as it is read (live logs).
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from plait.live_logs import STDERR, STDOUT
from plait.worker.executor import AttemptResult, Code, OutputSink
from plait.workerd.confinement import Confinement
from plait.workerd.sandbox import start_argv
from plait.workerd.spawn_client import SpawnedChild, Spawner, SpawnError

__all__ = [
    "AttemptProcess",
    "ChainProcess",
    "LiveSink",
    "SpawnedProcess",
    "Tails",
    "exit_message",
    "start_chain",
    "start_spawned",
]

_LIMIT_SIGNALS = {
    int(signal.SIGXFSZ): "a file reached the file-size limit (rlimits.file_size)",
    int(signal.SIGXCPU): "the CPU-time limit was reached (rlimits.cpu)",
}


def exit_message(code: int) -> str:
    """``exit code 3``, ``killed by signal SIGKILL``, or with a limit's signal, what it means."""
    hint = _LIMIT_SIGNALS.get(-code)
    if hint:
        return f"killed by signal {signal.Signals(-code).name}: {hint}"
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = str(-code)
    return f"killed by signal {name}"


def cannot_run(program: str, err: int) -> AttemptResult:
    """The result of an action whose program could not be executed (127 or 126)."""
    if err in (errno.ENOENT, errno.ENOTDIR):
        return AttemptResult.failed(f"cannot run {program!r}: no such file", exit_code=127)
    if err in (errno.EACCES, errno.EPERM):
        return AttemptResult.failed(f"cannot run {program!r}: permission denied", exit_code=126)
    return AttemptResult.failed(f"cannot run {program!r}: {os.strerror(err)}", exit_code=126)


class LiveSink:
    """Hands what an attempt writes to the session as it is read (live logs), each stream
    through its own :class:`~plait.workerd.secrets.StreamRedactor` when the attempt has
    secrets."""

    __slots__ = ("_output", "_redactors")

    def __init__(self, output: OutputSink, redactors: Mapping[int, Any] | None = None) -> None:
        self._output = output
        self._redactors = redactors  # fd -> StreamRedactor

    def data(self, fd: int, data: bytes) -> None:
        if self._redactors is not None:
            data = self._redactors[fd].feed(data)
        if data:
            self._output(STDOUT if fd == 1 else STDERR, data)

    def eof(self, fd: int) -> None:
        if self._redactors is not None:
            rest = self._redactors[fd].flush()
            if rest:
                self._output(STDOUT if fd == 1 else STDERR, rest)


class Tails(asyncio.SubprocessProtocol):
    """Keeps the last ``limit`` bytes of stdout and stderr; never stops reading. With a
    ``sink``, everything read also goes there."""

    def __init__(
        self, limit: int, loop: asyncio.AbstractEventLoop, sink: LiveSink | None = None
    ) -> None:
        self.limit = limit
        self.sink = sink
        self.bufs = {1: bytearray(), 2: bytearray()}
        self.exited: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._open = 2

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        buf = self.bufs.get(fd)
        if buf is None:
            return
        raw = data if isinstance(data, bytes) else data.encode()
        buf += raw
        if len(buf) > 2 * self.limit:
            del buf[: -self.limit]
        if self.sink is not None:
            self.sink.data(fd, raw)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd in self.bufs:
            if self.sink is not None:
                self.sink.eof(fd)
            self._open -= 1
            if self._open <= 0 and not self.closed.done():
                self.closed.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    def tail(self, fd: int) -> str:
        return bytes(self.bufs[fd][-self.limit :]).decode("utf-8", "replace")


class AttemptProcess(Protocol):
    """An attempt's first process, however it was started."""

    tails: Tails
    start_failure: AttemptResult | None
    """Set by :meth:`wait` when the child never ran the action (exec or a set-up step failed)."""
    lost: str
    """Set by :meth:`wait` when the child was killed because the spawner died."""

    async def started(self) -> int:
        """Its pid (and process group). Raises SpawnError when it never started."""
        ...

    async def release(self, pid: int) -> str:
        """Lets it run (the chain's barrier); a problem, or ''."""
        ...

    async def wait(self) -> int:
        """Its exit code (minus the signal that killed it)."""
        ...

    def close(self) -> None:
        """Releases pipes and transports."""
        ...


class ChainProcess:
    """An attempt started through asyncio's subprocess machinery and the exec chain."""

    def __init__(
        self,
        transport: asyncio.SubprocessTransport,
        tails: Tails,
        confinement: Confinement,
        limits: Mapping[int, int],
        barrier: bool,
        inputs: bytes,
    ) -> None:
        self.transport = transport
        self.tails = tails
        self.confinement = confinement
        self.limits = limits
        self.barrier = barrier
        self.inputs = inputs
        self.start_failure: AttemptResult | None = None
        self.lost = ""

    async def started(self) -> int:
        pid = self.transport.get_pid()
        assert pid is not None
        return pid

    async def release(self, pid: int) -> str:
        # The first process waits at the start barrier until its limits and cgroup are set.
        # Its pid stays its own meanwhile: only this loop reaps it (and only if it died).
        confinement = self.confinement
        if confinement.slow_start:
            problem = await asyncio.to_thread(confinement.release_barrier, pid, self.limits)
        else:
            problem = confinement.release_barrier(pid, self.limits)
        stdin: Any = self.transport.get_pipe_transport(0)
        if stdin is not None:
            # The go line for the start barrier, if there is one; then the inputs.
            data = b"\n" + self.inputs if self.barrier else self.inputs
            if data and not problem:
                stdin.write(data)
            stdin.close()
        return problem

    async def wait(self) -> int:
        await self.tails.exited
        code = self.transport.get_returncode()
        return code if code is not None else -int(signal.SIGKILL)

    def close(self) -> None:
        self.transport.close()


async def start_chain(
    confinement: Confinement,
    limits: Mapping[int, int],
    program: str,
    args: Sequence[str],
    env: Mapping[str, str],
    *,
    cwd: str,
    inputs: bytes,
    tail_limit: int,
    sink: LiveSink | None = None,
) -> ChainProcess | AttemptResult:
    """Starts ``program`` through the exec chain (see the module docstring)."""
    chain, start_env, barrier = start_argv(
        confinement.prefix(limits), program, args, env, barrier=confinement.needs_barrier
    )
    loop = asyncio.get_running_loop()
    tails = Tails(tail_limit, loop, sink)
    try:
        transport, _ = await loop.subprocess_exec(
            lambda: tails,
            *chain,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=start_env,
            cwd=cwd,
            start_new_session=True,
        )
    except OSError as err:
        return cannot_run(program, err.errno or errno.EACCES)
    return ChainProcess(transport, tails, confinement, limits, barrier, inputs)


class SpawnedProcess:
    """An attempt started by the spawner; workerd holds its pipes' other ends."""

    def __init__(
        self,
        child: SpawnedChild,
        tails: Tails,
        loop: asyncio.AbstractEventLoop,
        program: str,
        confinement: Confinement,
    ) -> None:
        self.child = child
        self.tails = tails
        self.loop = loop
        self.program = program
        self.confinement = confinement
        self.start_failure: AttemptResult | None = None
        self.lost = ""
        self._readers: set[int] = set()
        self._writer = -1

    async def started(self) -> int:
        return await self.child.started

    async def release(self, pid: int) -> str:
        return ""  # it set itself up before its exec

    async def wait(self) -> int:
        try:
            done = await self.child.exited
        except SpawnError as err:
            self.lost = str(err)
            return -int(signal.SIGKILL)
        finally:
            self.tails.process_exited()
        if done.error is not None:
            self.start_failure = self._failure(*done.error)
        return done.returncode

    def _failure(self, step: str, err: int) -> AttemptResult:
        if step == "exec":
            return cannot_run(self.program, err)
        why = os.strerror(err) if err else "unexpected error"
        if step == "cgroup":
            what = f"move the attempt into its cgroup {self.confinement.cgroup}"
        elif step == "rlimits":
            what = "set the attempt's rlimits"
        elif step == "user":
            what = f"switch the attempt to uid {self.confinement.uid}"
        elif step == "chdir":
            what = "enter the attempt's working directory"
        else:
            what = f"start the attempt ({step})"
        return AttemptResult.failed(f"cannot {what}: {why}", code=Code.INTERNAL, exit_code=125)

    def read(self, fd: int, which: int) -> None:
        """Reads ``fd`` (stdout: 1, stderr: 2) into the tails until EOF."""
        os.set_blocking(fd, False)
        self._readers.add(fd)

        def readable() -> None:
            try:
                data = os.read(fd, 1 << 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if data:
                self.tails.pipe_data_received(which, data)
                return
            self._stop_reading(fd)
            self.tails.pipe_connection_lost(which, None)

        self.loop.add_reader(fd, readable)

    def _stop_reading(self, fd: int) -> None:
        if fd in self._readers:
            self._readers.discard(fd)
            self.loop.remove_reader(fd)
            os.close(fd)

    def feed(self, fd: int, data: bytes) -> None:
        """Writes ``data`` to the child's stdin (``fd``), then closes it."""
        os.set_blocking(fd, False)
        view = memoryview(data)
        try:
            view = view[os.write(fd, view) :] if view else view
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:  # EPIPE: it does not read its stdin
            view = view[len(view) :]
        if not view:
            os.close(fd)
            return
        self._writer = fd
        rest = [view]

        def writable() -> None:
            try:
                rest[0] = rest[0][os.write(fd, rest[0]) :]
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                rest[0] = rest[0][len(rest[0]) :]
            if not rest[0]:
                self._stop_writing()

        self.loop.add_writer(fd, writable)

    def _stop_writing(self) -> None:
        fd, self._writer = self._writer, -1
        if fd >= 0:
            self.loop.remove_writer(fd)
            os.close(fd)

    def close(self) -> None:
        self._stop_writing()
        for fd in list(self._readers):
            self._stop_reading(fd)


def start_spawned(
    spawner: Spawner,
    confinement: Confinement,
    limits: Mapping[int, int],
    program: str,
    args: Sequence[str],
    env: Mapping[str, str],
    *,
    cwd: str,
    inputs: bytes,
    tail_limit: int,
    pdeathsig: bool,
    sink: LiveSink | None = None,
) -> SpawnedProcess:
    """Asks the spawner for the attempt's process (see the module docstring).

    Raises:
        SpawnError: the spawner could not be reached.
    """
    loop = asyncio.get_running_loop()
    stdin_r, stdin_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    ident = confinement.ident
    try:
        child = spawner.spawn(
            argv=[program, *args],
            env=env,
            cwd=cwd,
            stdio=(stdin_r, out_w, err_w),
            limits=limits,
            cgroup=confinement.cgroup,
            user=(ident.uid, ident.gid) if ident is not None else None,
            pdeathsig=pdeathsig,
            no_new_privs=ident is not None,
        )
    except BaseException:
        for fd in (stdin_w, out_r, err_r):
            os.close(fd)
        raise
    finally:
        for fd in (stdin_r, out_w, err_w):  # the child has its own copies now
            os.close(fd)
    proc = SpawnedProcess(child, Tails(tail_limit, loop, sink), loop, program, confinement)
    proc.read(out_r, 1)
    proc.read(err_r, 2)
    proc.feed(stdin_w, inputs)
    return proc
