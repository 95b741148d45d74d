"""Several "hosts" on one machine: Linux network namespaces joined by veth pairs (root only).

:class:`Hosts` creates one namespace for the coordinator (``plait-c-<tag>``) and one per worker
(``plait-w1-<tag>``, ``plait-w2-<tag>``, ...; the tag is random, so runs do not collide), and joins
the coordinator to each worker with its own veth pair, entirely inside those namespaces::

    plait-w1-TAG  w1-c 10.231.1.2/24  <-veth->  c-w1 10.231.1.1/24  plait-c-TAG
    plait-w2-TAG  w2-c 10.231.2.2/24  <-veth->  c-w2 10.231.2.1/24  plait-c-TAG

``lo`` is up in each namespace. There is no default route and nothing is forwarded: a worker
reaches only its own link to the coordinator, and nothing reaches (or is sent to) any address
outside the namespaces created here. The pairs are created inside the namespaces
(``ip -n C link add ... peer ... netns W``), so the host's own interfaces are never touched.

Commands run inside a namespace with ``ip netns exec NS ...`` (:meth:`Hosts.wrap`), which
``exec``\\ s the command: the pid a test gets is the program's own, signals reach it directly.
:meth:`Hosts.cut` takes a worker's link down (``ip -n NS link set DEV down``: its route goes,
the coordinator's end loses carrier) and :meth:`Hosts.restore` brings it back.

:meth:`Hosts.close` (run by the :func:`hosts` context manager on every exit, failures included)
SIGKILLs every process still inside one of the namespaces, found by comparing each process's
``/proc/PID/ns/net`` with the namespace's, then deletes the namespaces (their veths go with
them). A process found there means the test did not stop what it started: ``close`` raises
:class:`NetnsError` naming it, unless the test is already failing.

:func:`available` says why this cannot run here (not root, no ``ip``, no namespaces or veth in
this kernel/container); :func:`require` skips on that, or fails when the ``CI`` environment
variable is set, since CI (``.ci/run``) runs as root and installs iproute2.

Namespaces outlive a test process that is SIGKILLed before its teardown; list them with
``ip netns list | grep '^plait-'`` and remove them with ``ip netns del NAME``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests import procs

# A private range used only inside the test namespaces: 10.231.<n>.0/24 per worker link.
SUBNET_PREFIX = "10.231"
PREFIX_LEN = 24
IP_TIMEOUT_S = 30.0
KILL_DEADLINE_S = 5.0
NETNS_DIR = "/run/netns"


class NetnsError(AssertionError):
    """A namespace could not be set up, or a test left processes inside one."""


def _ip(*args: str, timeout: float = IP_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def _ip_ok(*args: str) -> str:
    done = _ip(*args)
    if done.returncode != 0:
        raise NetnsError(
            f"`ip {' '.join(args)}` failed (exit {done.returncode}): {done.stderr.strip()}"
        )
    return done.stdout


@functools.cache
def available() -> str | None:
    """Why namespaces with veth pairs cannot be made here, or None when they can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not running as root (ip netns needs CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    if shutil.which("ip") is None:
        return "the `ip` command is missing (apt-get install -y iproute2)"
    probe = f"plait-probe-{secrets.token_hex(3)}"
    try:
        done = _ip("netns", "add", probe)
        if done.returncode != 0:
            return f"`ip netns add` failed: {done.stderr.strip()}"
        done = _ip("-n", probe, "link", "add", "probe-a", "type", "veth", "peer", "name", "probe-b")
        if done.returncode != 0:
            return f"cannot create a veth pair in a namespace: {done.stderr.strip()}"
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"`ip` did not run: {err}"
    finally:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            _ip("netns", "del", probe)
    return None


def require() -> None:
    """Skips the test when namespaces are unavailable; under CI (``CI`` set) fails instead."""
    reason = available()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(
            f"multi-host system tests cannot run: {reason}. Under CI they must run: as root,"
            " with iproute2 installed (.ci/run installs it) and namespaces allowed."
        )
    pytest.skip(f"multi-host system tests skipped: {reason}")


def _netns_inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


@dataclass(frozen=True, slots=True)
class Link:
    """The veth pair between the coordinator's namespace and one worker's."""

    worker: str
    coordinator_dev: str  # in the coordinator's namespace: c-w1
    worker_dev: str  # in the worker's namespace: w1-c
    coordinator_ip: str  # 10.231.1.1
    worker_ip: str  # 10.231.1.2


@dataclass
class Hosts:
    """A coordinator namespace and one namespace per worker, each linked to the coordinator.

    Host names are ``"c"`` and the worker names (``"w1"``, ``"w2"``): short, since interface
    names (``c-w1``, ``w1-c``) must fit in 15 characters.
    """

    workers: Sequence[str] = ("w1", "w2")
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    namespaces: dict[str, str] = field(default_factory=dict)
    links: dict[str, Link] = field(default_factory=dict)
    _created: list[str] = field(default_factory=list)
    _popens: list[subprocess.Popen[Any]] = field(default_factory=list)
    _closed: bool = False

    def __post_init__(self) -> None:
        if not 1 <= len(self.workers) <= 250:
            raise ValueError("between 1 and 250 workers")
        if len(set(self.workers)) != len(self.workers) or "c" in self.workers:
            raise ValueError(f"worker names {list(self.workers)}: unique, and not 'c'")
        for name in ("c", *self.workers):
            if not name.isalnum() or not name.isascii() or len(name) > 6:
                raise ValueError(f"host name {name!r}: 1 to 6 ASCII letters or digits")
            self.namespaces[name] = f"plait-{name}-{self.tag}"
        for n, worker in enumerate(self.workers, start=1):
            self.links[worker] = Link(
                worker=worker,
                coordinator_dev=f"c-{worker}",
                worker_dev=f"{worker}-c",
                coordinator_ip=f"{SUBNET_PREFIX}.{n}.1",
                worker_ip=f"{SUBNET_PREFIX}.{n}.2",
            )

    # ----- set-up and teardown ------------------------------------------------------------

    def setup(self) -> Hosts:
        """Creates the namespaces and links; on any failure removes what it made and raises."""
        try:
            for ns in self.namespaces.values():
                _ip_ok("netns", "add", ns)
                self._created.append(ns)
                _ip_ok("-n", ns, "link", "set", "lo", "up")
            c = self.namespaces["c"]
            for link in self.links.values():
                w = self.namespaces[link.worker]
                _ip_ok(
                    "-n", c, "link", "add", link.coordinator_dev, "type", "veth",
                    "peer", "name", link.worker_dev, "netns", w,
                )  # fmt: skip
                _ip_ok("-n", c, "addr", "add", f"{link.coordinator_ip}/{PREFIX_LEN}",
                       "dev", link.coordinator_dev)  # fmt: skip
                _ip_ok("-n", w, "addr", "add", f"{link.worker_ip}/{PREFIX_LEN}",
                       "dev", link.worker_dev)  # fmt: skip
                _ip_ok("-n", c, "link", "set", link.coordinator_dev, "up")
                _ip_ok("-n", w, "link", "set", link.worker_dev, "up")
        except BaseException:
            self.close(check=False)
            raise
        return self

    def close(self, *, check: bool = True) -> list[str]:
        """Kills whatever still runs in the namespaces, deletes them; idempotent.

        Returns the processes it had to kill (described); with ``check``, raises
        :class:`NetnsError` naming them when there were any.
        """
        if self._closed:
            return []
        self._closed = True
        killed = self._kill_inside()
        problems = []
        for ns in reversed(self._created):
            try:
                done = _ip("netns", "del", ns)
            except (OSError, subprocess.TimeoutExpired) as err:
                problems.append(f"ip netns del {ns}: {err}")
                continue
            if done.returncode != 0 and os.path.exists(os.path.join(NETNS_DIR, ns)):
                problems.append(f"ip netns del {ns}: {done.stderr.strip()}")
        self._created.clear()
        if problems:
            raise NetnsError("could not delete namespaces: " + "; ".join(problems))
        if check and killed:
            raise NetnsError(
                f"{len(killed)} process(es) still ran inside the test namespaces (now killed):\n  "
                + "\n  ".join(killed)
            )
        return killed

    def _kill_inside(self) -> list[str]:
        """SIGKILLs every process in our namespaces (and every Popen we started); waits."""
        killed: list[str] = []
        deadline = time.monotonic() + KILL_DEADLINE_S
        while True:
            inside = [p for p in self.processes() if p.alive]
            inside += [
                p
                for popen in self._popens
                if popen.poll() is None
                and (p := procs.read_proc(popen.pid)) is not None
                and p.alive
                and p not in inside
            ]
            if not inside:
                break
            if not killed:
                killed = [p.describe() for p in inside]
            procs.kill_procs(inside)
            for popen in self._popens:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    popen.wait(0.05)
            procs.reap_adopted_zombies()
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        for popen in self._popens:
            if popen.returncode is not None:
                procs.MANAGED.discard(popen.pid)
        return killed

    def processes(self) -> list[procs.Proc]:
        """Every process (zombies included) whose network namespace is one of ours."""
        ours = {
            ino
            for ns in self._created
            if (ino := _netns_inode(os.path.join(NETNS_DIR, ns))) is not None
        }
        if not ours:
            return []
        out = []
        for pid_text in os.listdir("/proc"):
            if pid_text.isdigit() and _netns_inode(f"/proc/{pid_text}/ns/net") in ours:
                proc = procs.read_proc(int(pid_text))
                if proc is not None:
                    out.append(proc)
        return out

    # ----- addresses ------------------------------------------------------------------------

    def coordinator_ip(self, worker: str) -> str:
        """The coordinator's address on ``worker``'s link (what that worker dials)."""
        return self.links[worker].coordinator_ip

    def worker_ip(self, worker: str) -> str:
        return self.links[worker].worker_ip

    @property
    def coordinator_ips(self) -> list[str]:
        return [link.coordinator_ip for link in self.links.values()]

    def netns_inode(self, host: str) -> int:
        """The inode of a host's namespace: what ``readlink /proc/self/ns/net`` shows inside."""
        ino = _netns_inode(os.path.join(NETNS_DIR, self.namespaces[host]))
        if ino is None:
            raise NetnsError(f"namespace of {host} is gone")
        return ino[1]

    def host_of_inode(self, inode: int) -> str | None:
        """Which host a ``net:[INODE]`` belongs to (None: not one of ours)."""
        return next((h for h in self.namespaces if self.netns_inode(h) == inode), None)

    # ----- running things inside ----------------------------------------------------------

    def wrap(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``host``'s namespace."""
        if self._closed:
            raise NetnsError("the namespaces are deleted")
        return ["ip", "netns", "exec", self.namespaces[host], *argv]

    def run(
        self,
        host: str,
        argv: Sequence[str],
        *,
        timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        input_text: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Runs ``argv`` inside ``host`` to completion (killed at ``timeout``), output captured."""
        return subprocess.run(
            self.wrap(host, argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=None if env is None else dict(env),
            cwd=cwd,
            input=input_text,
            stdin=None if input_text is not None else subprocess.DEVNULL,
        )

    def popen(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Starts ``argv`` inside ``host`` in its own session; :meth:`close` kills it if alive."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("start_new_session", True)
        popen: subprocess.Popen[Any] = subprocess.Popen(self.wrap(host, argv), **kwargs)
        self._popens.append(popen)
        procs.MANAGED.add(popen.pid)
        return popen

    # ----- faults -------------------------------------------------------------------------

    def cut(self, worker: str) -> None:
        """Takes ``worker``'s link down (its end; the coordinator's end loses carrier)."""
        link = self.links[worker]
        _ip_ok("-n", self.namespaces[worker], "link", "set", link.worker_dev, "down")

    def restore(self, worker: str) -> None:
        """Brings ``worker``'s link back up (its route returns with it)."""
        link = self.links[worker]
        _ip_ok("-n", self.namespaces[worker], "link", "set", link.worker_dev, "up")

    def link_up(self, worker: str) -> bool:
        """True when both ends of ``worker``'s link are up with carrier."""
        link = self.links[worker]
        ends = [
            (self.namespaces[worker], link.worker_dev),
            (self.namespaces["c"], link.coordinator_dev),
        ]
        for ns, dev in ends:
            out = _ip_ok("-n", ns, "-o", "link", "show", "dev", dev)
            flags = out.partition("<")[2].partition(">")[0].split(",")
            if "UP" not in flags or "LOWER_UP" not in flags:
                return False
        return True


@contextlib.contextmanager
def hosts(workers: Sequence[str] = ("w1", "w2")) -> Iterator[Hosts]:
    """:class:`Hosts`, set up; always torn down (namespaces deleted) on the way out.

    A leftover process fails the test only when the body succeeded (a failing test's own
    error is not hidden behind it).
    """
    h = Hosts(workers=workers).setup()
    failed = False
    try:
        yield h
    except BaseException:
        failed = True
        raise
    finally:
        h.close(check=not failed)
