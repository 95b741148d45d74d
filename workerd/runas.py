"""Who exec actions run as: ``--run-as`` pools, and the start-up refusals (workerd layer).

``--run-as SPEC`` is a comma-separated list of ``USER``, ``UID``, ``USER:GROUP``, ``UID:GID``
and numeric ranges ``FIRST-LAST`` (each uid with the gid of the same number). Numeric ids need
no passwd entry; a user name brings its primary group. Several ids make a **pool**: each
running attempt takes one no other running attempt holds (while there are enough), so
attempts cannot read each other's ``/proc/PID/environ`` or files.

Exec as root, or as the uid the (loopback) coordinator runs as, is refused at start-up unless
``--allow-root`` (:func:`exec_identity_problems`).
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import re
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from plait.errors import ConfigError
from plait.security import is_loopback_host

__all__ = [
    "Identity",
    "RunAs",
    "UidPool",
    "exec_identity_problems",
    "listener_uids",
    "parse_run_as",
]

MAX_POOL = 65536
MAX_ID = 2**32 - 2  # (uid_t)-1 means "unchanged" to the kernel
_RANGE = re.compile(r"(\d+)-(\d+)")
_CAP_SETGID, _CAP_SETUID = 6, 7
_TCP_LISTEN = "0A"


@dataclass(frozen=True, slots=True, order=True)
class Identity:
    """A uid and gid an attempt runs as (no supplementary groups)."""

    uid: int
    gid: int

    def __str__(self) -> str:
        return f"{self.uid}:{self.gid}"


@dataclass(frozen=True, slots=True)
class RunAs:
    """The parsed ``--run-as``: the identities attempts run as, in the order given."""

    identities: tuple[Identity, ...]
    spec: str

    @property
    def uids(self) -> frozenset[int]:
        return frozenset(i.uid for i in self.identities)

    def describe(self) -> str:
        """``uid 1001`` or ``8 uids (62000:62000 ... 62007:62007)``."""
        ids = self.identities
        if len(ids) == 1:
            return f"uid {ids[0].uid} gid {ids[0].gid}"
        return f"{len(ids)} uids ({ids[0]} ... {ids[-1]})"


def _number(text: str, what: str, spec: str) -> int:
    value = int(text)
    if value > MAX_ID:
        raise ConfigError(f"--run-as {spec}: {what} {value} is above {MAX_ID}")
    return value


def _user(text: str, spec: str, getpwnam: Callable[[str], pwd.struct_passwd]) -> Identity:
    if text.isdigit():
        uid = _number(text, "uid", spec)
        return Identity(uid, uid)
    try:
        entry = getpwnam(text)
    except KeyError:
        raise ConfigError(
            f"--run-as {spec}: no user {text!r} (give a user name, a uid, UID:GID or a range"
            " such as 62000-62007)"
        ) from None
    return Identity(entry.pw_uid, entry.pw_gid)


def _group(text: str, spec: str, getgrnam: Callable[[str], grp.struct_group]) -> int:
    if text.isdigit():
        return _number(text, "gid", spec)
    try:
        return getgrnam(text).gr_gid
    except KeyError:
        raise ConfigError(f"--run-as {spec}: no group {text!r}") from None


def parse_run_as(
    spec: str,
    *,
    getpwnam: Callable[[str], pwd.struct_passwd] = pwd.getpwnam,
    getgrnam: Callable[[str], grp.struct_group] = grp.getgrnam,
) -> RunAs:
    """Parses ``--run-as`` (see the module docstring); duplicates are dropped.

    Raises:
        ConfigError: naming ``--run-as`` and the bad item.
    """
    spec = spec.strip()
    out: list[Identity] = []
    seen: set[Identity] = set()
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            raise ConfigError(f"--run-as {spec!r}: empty item")
        found: Iterable[Identity]
        m = _RANGE.fullmatch(item)
        if m:
            first, last = _number(m.group(1), "uid", spec), _number(m.group(2), "uid", spec)
            if last < first:
                raise ConfigError(f"--run-as {spec}: range {item} ends before it starts")
            if last - first + 1 > MAX_POOL:
                raise ConfigError(f"--run-as {spec}: range {item} is over {MAX_POOL} uids")
            found = (Identity(u, u) for u in range(first, last + 1))
        else:
            user, sep, group = item.partition(":")
            if not user or (sep and not group):
                raise ConfigError(
                    f"--run-as {spec}: {item!r} is not USER, UID, USER:GROUP, UID:GID or FIRST-LAST"
                )
            ident = _user(user, spec, getpwnam)
            if sep:
                ident = Identity(ident.uid, _group(group, spec, getgrnam))
            found = (ident,)
        for ident in found:
            if ident not in seen:
                seen.add(ident)
                out.append(ident)
                if len(out) > MAX_POOL:
                    raise ConfigError(f"--run-as {spec}: more than {MAX_POOL} identities")
    return RunAs(tuple(out), spec)


class UidPool:
    """Hands each starting attempt an identity, preferring one no running attempt holds.

    When every identity is taken (a pool smaller than the slots), the least shared one is
    handed out again; workerd warns about that at start-up. Also remembers the process group
    of each attempt holding an identity, so that a sweep of a shared uid spares them.
    """

    def __init__(self, run_as: RunAs) -> None:
        self.run_as = run_as
        self._free: deque[Identity] = deque(run_as.identities)
        self._holders: dict[Identity, set[int]] = {i: set() for i in run_as.identities}
        self._count: dict[Identity, int] = dict.fromkeys(run_as.identities, 0)

    def acquire(self) -> Identity:
        """An identity for a starting attempt (a free one while any is free)."""
        if self._free:
            ident = self._free.popleft()
        else:
            ident = min(self._count, key=self._count.__getitem__)
        self._count[ident] += 1
        return ident

    def attach(self, ident: Identity, pgid: int) -> None:
        """The attempt holding ``ident`` runs as process group ``pgid``."""
        self._holders[ident].add(pgid)

    def release(self, ident: Identity, pgid: int = 0) -> None:
        """The attempt holding ``ident`` (process group ``pgid``, 0 if it never started) ended."""
        self._holders[ident].discard(pgid)
        self._count[ident] -= 1
        if self._count[ident] == 0:
            self._free.append(ident)

    def holders(self, ident: Identity) -> int:
        """How many running attempts hold ``ident``."""
        return self._count[ident]

    def live_groups(self, ident: Identity) -> frozenset[int]:
        """Process groups of the running attempts holding ``ident``."""
        return frozenset(self._holders[ident])


# ----- start-up refusals -------------------------------------------------------------------------


def _decode_address(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_addr)
    # /proc/net/tcp{,6} print each 32-bit word of the address in host (little-endian) order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words)


def listener_uids(
    port: int, tables: Sequence[str] = ("/proc/net/tcp", "/proc/net/tcp6")
) -> set[int]:
    """Uids of the sockets listening on ``port`` at a loopback or wildcard address."""
    uids: set[int] = set()
    for table in tables:
        try:
            with open(table, encoding="ascii") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 8 or fields[3] != _TCP_LISTEN:
                continue
            addr_hex, _, port_hex = fields[1].partition(":")
            if int(port_hex, 16) != port:
                continue
            try:
                addr = _decode_address(addr_hex)
            except ValueError:
                continue
            mapped = getattr(addr, "ipv4_mapped", None)
            if addr.is_loopback or addr.is_unspecified or (mapped and mapped.is_loopback):
                uids.add(int(fields[7]))
    return uids


def _has_setid_caps(status_path: str = "/proc/self/status") -> bool:
    try:
        with open(status_path, encoding="ascii") as f:
            line = next(ln for ln in f if ln.startswith("CapEff:"))
    except (OSError, StopIteration):
        return False
    caps = int(line.split()[1], 16)
    return bool(caps >> _CAP_SETUID & 1 and caps >> _CAP_SETGID & 1)


def exec_identity_problems(
    *,
    coordinators: Sequence[str],
    run_as: RunAs | None,
    allow_root: bool,
    euid: int | None = None,
    can_switch_users: bool | None = None,
    find_listeners: Callable[[int], set[int]] = listener_uids,
) -> tuple[str, list[str]]:
    """(refusal, warnings) for running exec actions as configured; refusal is '' when none.

    Refused unless ``allow_root``: workerd as root without ``--run-as``; a ``--run-as`` uid or
    gid 0; and, for a loopback coordinator, one that listens as an exec uid. Always refused:
    ``--run-as`` without the privilege to switch users. When nothing listens on a loopback
    coordinator's port yet its uid cannot be known: a warning, not a refusal.
    """
    euid = os.geteuid() if euid is None else euid
    if run_as is not None:
        can = (euid == 0 or _has_setid_caps()) if can_switch_users is None else can_switch_users
        if not can:
            return (
                f"--run-as needs root (or CAP_SETUID and CAP_SETGID) to start actions as"
                f" another user; workerd runs as uid {euid}. Start it as root, or drop --run-as",
                [],
            )
    if allow_root:
        return "", []
    if run_as is None and euid == 0:
        return (
            "workerd runs as root, so exec actions would run as root (able to read its"
            " credentials, its memory and every other action's files). Give --run-as USER, UID"
            " or a pool such as --run-as 62000-62007, or --allow-root to accept it (a local"
            " development cluster)",
            [],
        )
    if run_as is not None:
        for ident in run_as.identities:
            if ident.uid == 0 or ident.gid == 0:
                which = "uid" if ident.uid == 0 else "gid"
                return (
                    f"--run-as {run_as.spec}: {ident} is root's {which};"
                    " actions would run with root's privileges. Give unprivileged ids, or"
                    " --allow-root to accept it",
                    [],
                )
    exec_uids = run_as.uids if run_as is not None else frozenset({euid})
    warnings: list[str] = []
    for address in coordinators:
        host, _, port = address.rpartition(":")
        if not is_loopback_host(host.strip("[]")):
            continue
        owners = find_listeners(int(port))
        clash = owners & exec_uids
        if clash:
            uid = min(clash)
            return (
                f"the coordinator at {address} runs as uid {uid}, the uid exec actions would"
                f" run as: they could read its environment and memory and signal it. Give"
                f" --run-as another user, or --allow-root to accept it (a cluster of your own"
                f" processes)",
                [],
            )
        if not owners:
            warnings.append(
                f"cannot tell which uid the coordinator at {address} runs as (nothing listens"
                f" on port {port} yet); if it is {'/'.join(map(str, sorted(exec_uids)[:3]))},"
                f" the uid exec actions run as, they can read its environment: start workerd"
                f" after the coordinator, or use --run-as"
            )
    return "", warnings
