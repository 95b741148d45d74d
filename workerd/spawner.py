"""The spawner: starts every exec attempt with one fork and one exec (workerd layer).

workerd has gRPC's threads, so it must not run Python between fork and exec (only ``vfork()``
is safe there), and that used to cost each attempt a chain of three execs (setpriv for the
parent-death signal and the user switch, a ``/bin/sh`` start barrier that waited while workerd
set the limits and joined the cgroup, then the action). This program is single-threaded, so it
may ``fork()`` and set the attempt up in the child itself, then ``execve`` the action directly.

workerd starts it once (``python -I -S .../spawner.py WORKERD_PID FD``: a fresh interpreter, in
its own session, without even ``site``) and talks to it over a unix stream socket (``FD``).
Each message is its length (4 bytes, little-endian) and a dict in :mod:`marshal` format (both
ends are workerd's own code, and marshal is the cheapest to load and to parse):

* **workerd -> spawner**: ``{"op": "spawn", "id", "argv", "env", "cwd", "limits": [(RLIMIT_*,
  value), ...], "cgroup", "user": (uid, gid) | None, "pdeathsig", "nnp"}``, the attempt's
  stdin, stdout and stderr passed along the message's first bytes (``SCM_RIGHTS``); or ``{"op":
  "sweep", "id", "user": (uid, gid)}``: ``kill(-1, SIGKILL)`` as that uid (every process of it,
  atomically with respect to fork).
* **spawner -> workerd**: ``{"ev": "ready"}`` once; then per request ``{"ev": "started", "id",
  "pid"}`` right after the fork, and ``{"ev": "exited", "id", "status", "utime", "stime",
  "maxrss", "error"}`` when the spawner reaped it (``status`` the raw wait status; ``error``
  ``(step, errno)`` when the child failed before or at its exec, else None); or ``{"ev":
  "failed", "id", "error"}`` when it could not fork at all.

The child, before ``execve``: its own session (and process group), its stdio, its working
directory, each rlimit (soft = hard), its cgroup (it writes itself to ``cgroup.procs``; it has
not forked, so nothing escapes), the run-as user (no supplementary groups, then gid, then uid,
real, effective and saved: every capability is dropped), ``no_new_privs``, and
``PR_SET_PDEATHSIG=SIGKILL`` last (a credential change clears it; its parent is this spawner,
checked right after), default dispositions for the signals Python ignores, no signal
blocked, every other descriptor closed. A failing step is reported through a close-on-exec
pipe, as ``subprocess`` does, and the child exits 125 (a set-up step), 126 (exec refused) or
127 (no such program).

The spawner itself dies with workerd: it sets ``PR_SET_PDEATHSIG=SIGKILL`` at start and exits
if workerd is already gone; every attempt it started then gets its own SIGKILL. It exits when
workerd closes the socket. Standard library only, so it starts in a few milliseconds and its
forks copy little.
"""

from __future__ import annotations

# Few and small imports (no json, re, enum, typing or contextlib): every page of this process is
# copied on each fork, so a smaller interpreter forks faster.
import _socket
import array
import ctypes
import errno
import gc
import marshal
import os
import resource
import select
import sys

TYPE_CHECKING = False  # typing imports re, functools, collections...: for type checkers only
if TYPE_CHECKING:
    import signal
    from typing import Any, NoReturn
else:
    import _signal as signal  # the same functions and numbers, without signal.py's enum

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
EXIT_SETUP = 125
EXIT_CANNOT_EXEC = 126
EXIT_NOT_FOUND = 127
STDIO_FDS = 3
_ANC_SIZE = _socket.CMSG_SPACE(16 * array.array("i").itemsize)
_HEADER = 4  # each message: its length (4 bytes, little-endian), then marshal data
# Python ignores SIGPIPE and SIGXFSZ (and the spawner SIGINT); an ignored signal stays ignored
# across exec, so the action gets them back at their defaults, as subprocess does.
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT)
_MAX_FD = 0x7FFFFFFF  # closerange() is one close_range(2)
_libc: Any = None


def _prctl(option: int, value: int) -> None:
    """prctl(2) with one argument. Raises OSError."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _exit_code(step: str, err: int) -> int:
    if step != "exec":
        return EXIT_SETUP
    return EXIT_NOT_FOUND if err in (errno.ENOENT, errno.ENOTDIR) else EXIT_CANNOT_EXEC


def _attempt_child(req: dict[str, Any], stdio: list[int], err_w: int, spawner: int) -> NoReturn:
    """The forked child: sets the attempt up and execs it (see the module docstring)."""
    at = ["setsid"]  # the step under way, for the report
    try:
        os.setsid()
        at[0] = "stdio"
        for target, fd in enumerate(stdio):
            os.dup2(fd, target)  # received descriptors are >= 3: ours 0-2 stay open
        os.dup2(err_w, STDIO_FDS, inheritable=False)
        err_w = STDIO_FDS
        os.closerange(err_w + 1, _MAX_FD)  # before the rlimits, which may lower the bound
        _confine(req, at)
        _become(req, at, spawner)
    except OSError as err:
        code = err.errno or 0
    except BaseException:
        code = 0
    try:
        os.write(err_w, f"{at[0]}:{code}".encode())
    finally:
        os._exit(_exit_code(at[0], code))


def _confine(req: dict[str, Any], at: list[str]) -> None:
    """Working directory, rlimits (soft = hard) and cgroup, while still privileged."""
    at[0] = "chdir"
    os.chdir(req["cwd"])
    at[0] = "rlimits"
    for which, value in req["limits"]:
        resource.setrlimit(which, (value, value))
    if req.get("cgroup"):
        at[0] = "cgroup"
        fd = os.open(os.path.join(req["cgroup"], "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")  # "0": the writing process itself
        finally:
            os.close(fd)


def _become(req: dict[str, Any], at: list[str], spawner: int) -> None:
    """The run-as user, no_new_privs, the parent-death signal, signal defaults, then exec."""
    user = req.get("user")
    if user:
        at[0] = "user"
        uid, gid = user
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    if req.get("nnp"):
        at[0] = "nnp"
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
    if req.get("pdeathsig"):
        at[0] = "pdeathsig"
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != spawner:  # the spawner died before the prctl: so must we
            os._exit(EXIT_SETUP)
    for sig in _RESET_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    # A blocked signal stays blocked across exec: the action starts with none blocked, whatever
    # mask the spawner was started with (a SIGTERM blocked here would outlive the kill grace).
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    at[0] = "exec"
    argv, env = req["argv"], req["env"]
    try:
        os.execve(argv[0], argv, env)
    except OSError as err:
        if err.errno != errno.ENOEXEC:
            raise
        # A script without "#!": run it with the shell, as execvp(3) and sh do.
        os.execve("/bin/sh", ["/bin/sh", *argv], env)


def _sweep_child(req: dict[str, Any]) -> NoReturn:
    """The forked child of a sweep: kill(-1, SIGKILL) as the uid (it spares the caller)."""
    try:
        uid, gid = req["user"]
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        pass  # nothing ran as the uid
    except BaseException:
        os._exit(EXIT_SETUP)
    os._exit(0)


class Server:
    """The spawner's loop: requests in, children forked and reaped, events out."""

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self.pid = os.getpid()
        self._in = bytearray()
        self._out = bytearray()
        self._fds: list[int] = []
        self._children: dict[int, tuple[int, int]] = {}  # pid -> (request id, error pipe)
        self._wake_r, wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)

    def serve(self) -> None:
        """Runs until workerd closes the socket."""
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        self._send({"ev": "ready"})
        while True:
            poller.register(self.sock, select.POLLIN | (select.POLLOUT if self._out else 0))
            for fd, events in poller.poll():
                if fd == self._wake_r:
                    self._drain_wakeups()
                    self._reap()
                    continue
                if events & select.POLLOUT:
                    self._flush()
                readable = events & (select.POLLIN | select.POLLHUP | select.POLLERR)
                if readable and not self._receive():
                    return

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _receive(self) -> bool:
        """Reads what came; handles every whole request. False at EOF."""
        try:
            data, anc, flags, _ = self.sock.recvmsg(1 << 16, _ANC_SIZE, _socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return True
        for level, kind, raw in anc:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(raw[: len(raw) - len(raw) % fds.itemsize])
                self._fds.extend(fds)
        if flags & _socket.MSG_CTRUNC:
            print("plait spawner: descriptors were lost (MSG_CTRUNC)", file=sys.stderr)
            return False  # the requests and their descriptors no longer match up
        if not data:
            return False
        self._in += data
        while len(self._in) >= _HEADER:
            end = _HEADER + int.from_bytes(self._in[:_HEADER], "little")
            if len(self._in) < end:
                break
            req = marshal.loads(self._in[_HEADER:end])
            del self._in[:end]
            self._handle(req)
        return True

    def _handle(self, req: dict[str, Any]) -> None:
        stdio: list[int] = []
        if req["op"] == "spawn":
            stdio, self._fds = self._fds[:STDIO_FDS], self._fds[STDIO_FDS:]
        err_r, err_w = os.pipe()
        try:
            pid = os.fork()
        except OSError as err:
            for fd in (err_r, err_w, *stdio):
                os.close(fd)
            self._send({"ev": "failed", "id": req["id"], "error": ("fork", err.errno or 0)})
            return
        if pid == 0:
            if req["op"] == "spawn":
                _attempt_child(req, stdio, err_w, self.pid)
            _sweep_child(req)
        os.close(err_w)
        for fd in stdio:
            os.close(fd)
        self._children[pid] = (req["id"], err_r)
        self._send({"ev": "started", "id": req["id"], "pid": pid})

    def _reap(self) -> None:
        while self._children:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            entry = self._children.pop(pid, None)
            if entry is None:
                continue
            rid, err_r = entry
            # The child is gone, so the pipe's write end is closed: this read cannot block.
            report = os.read(err_r, 256).decode("ascii", "replace")
            os.close(err_r)
            step, _, code = report.partition(":")
            self._send(
                {
                    "ev": "exited",
                    "id": rid,
                    "status": status,
                    "utime": usage.ru_utime,
                    "stime": usage.ru_stime,
                    "maxrss": usage.ru_maxrss,
                    "error": (step, int(code) if code.isdigit() else 0) if step else None,
                }
            )

    def _send(self, event: dict[str, Any]) -> None:
        data = marshal.dumps(event)
        self._out += len(data).to_bytes(_HEADER, "little") + data
        self._flush()

    def _flush(self) -> None:
        # Never blocks: workerd may be frozen (SIGSTOP) while its attempts keep ending.
        try:
            sent = self.sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            sent = len(self._out)  # workerd is gone; EOF ends the loop
        del self._out[:sent]


def main(argv: list[str]) -> int:
    """``python -I -S spawner.py WORKERD_PID FD``."""
    parent, fd = int(argv[1]), int(argv[2])
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        return 1  # workerd died before the prctl
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # workerd decides when its attempts end
    # Whatever mask the thread that started us had (glibc and CPython block signals around
    # their forks): none blocked here, so the forks start from a clean mask too.
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    sock = _socket.socket(fileno=fd)
    sock.setblocking(False)
    # Requests and events make no reference cycles; without collections, and with what start-up
    # allocated frozen, a fork's child copies fewer pages.
    gc.disable()
    gc.freeze()
    Server(sock).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
