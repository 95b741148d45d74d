"""Several coordinator addresses, and which one to use now (foundation layer).

With high availability several coordinators share one journal: one leader, the rest warm
standbys. A standby refuses every client RPC and every worker stream with ``UNAVAILABLE`` and a
``NOT_LEADER`` :class:`~plait.errors.NotLeaderError` that names the leader when it knows it.
Clients and workers are therefore given a comma-separated list of addresses
(``10.0.0.1:7450,10.0.0.2:7450``, also from ``$PLAIT_COORDINATOR``); :class:`Endpoints` keeps the
one in use and moves to the leader a standby names, or to the next address in the list when no
leader is named or the address is unreachable. :class:`Failover` is one call's bounded walk over
them, with full-jitter backoff once every address has been tried. Both :class:`plait.Client` and
:class:`plait.worker.WorkerSession` use this module.

A leader hint is trusted only as far as the list: a named leader that is listed is followed; one
that is not is followed only with TLS configured and only after its certificate has proved it a
coordinator (:func:`plait.trust.verify_coordinator`). Without that rule one bad standby could
send every client, and the bearer token it carries, to any host.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import grpc

from plait.errors import ConfigError, NotLeaderError, not_leader
from plait.security import TlsFiles

if TYPE_CHECKING:
    from plait.worker.backoff import Backoff

__all__ = [
    "DEFAULT_TARGET",
    "ENV_VAR",
    "Endpoints",
    "Failover",
    "TargetError",
    "not_leader_of",
    "parse_address",
    "parse_targets",
    "resolve_targets",
]

log = logging.getLogger(__name__)

DEFAULT_TARGET = "127.0.0.1:7450"
ENV_VAR = "PLAIT_COORDINATOR"

# A DNS name or IPv4 address, or an IPv6 address in brackets; then a port.
_HOST = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})|\[[0-9A-Fa-f:.%A-Za-z]{2,64}\]")


class TargetError(ConfigError, ValueError):
    """A coordinator address list is malformed; the message names the field it came from."""


def parse_address(text: str, field: str = "--coordinator") -> str:
    """Checks one ``HOST:PORT`` (``[::1]:7450`` for IPv6) and returns it stripped.

    Raises:
        TargetError: ``--coordinator: 'x' is not HOST:PORT``.
    """
    entry = text.strip()
    host, sep, port = entry.rpartition(":")
    if not sep or not _HOST.fullmatch(host) or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise TargetError(f"{field}: {entry!r} is not HOST:PORT")
    return entry


def parse_targets(text: str, field: str = "--coordinator") -> tuple[str, ...]:
    """Splits a comma-separated list of ``HOST:PORT`` addresses, in order, without repeats.

    Raises:
        TargetError: an entry is not ``HOST:PORT`` (or the list is empty); the message names
            ``field`` and the entry.
    """
    entries = [e.strip() for e in text.split(",")]
    if not any(entries):
        raise TargetError(f"{field}: no coordinator address given")
    out: list[str] = []
    for entry in entries:
        if not entry:
            raise TargetError(f"{field}: empty address in {text.strip()!r}")
        address = parse_address(entry, field)
        if address not in out:
            out.append(address)
    return tuple(out)


def resolve_targets(
    target: str | Sequence[str] | None = None,
    *,
    field: str = "--coordinator",
    environ: Mapping[str, str] | None = None,
) -> tuple[str, ...]:
    """``target``, else ``$PLAIT_COORDINATOR``, else ``127.0.0.1:7450``, parsed.

    ``target`` may be a comma-separated string or a sequence of addresses; a bad entry raises
    :class:`TargetError` naming ``field`` (or ``PLAIT_COORDINATOR`` when it came from there).
    """
    if target is not None and not isinstance(target, str):
        return parse_targets(",".join(target), field)
    if target:
        return parse_targets(target, field)
    env = (os.environ if environ is None else environ).get(ENV_VAR, "")
    if env.strip():
        return parse_targets(env, ENV_VAR)
    return (DEFAULT_TARGET,)


def not_leader_of(err: BaseException) -> NotLeaderError | None:
    """The :class:`NotLeaderError` a gRPC error carries (a standby's refusal), if it is one.

    Works for ``grpc.RpcError`` and ``grpc.aio.AioRpcError`` alike.
    """
    if not isinstance(err, grpc.RpcError):
        return None
    call: Any = err  # both kinds of RpcError are also calls (code, details, trailing metadata)
    if call.code() != grpc.StatusCode.UNAVAILABLE:
        return None
    from grpc_status import rpc_status

    try:
        status = rpc_status.from_call(call)
    except ValueError:  # details that disagree with the status: not a standby's answer
        return None
    return not_leader(status) if status is not None else None


class Endpoints:
    """The coordinator addresses a process was given, and the one it uses now.

    ``current`` starts at the first address. :meth:`follow` moves to a leader a standby named;
    :meth:`rotate` moves to the next listed address. The choice sticks, so after one redirect
    every later call goes straight to the leader.

    A named leader outside the list is followed only when ``tls`` is set and the address's
    certificate verifies as a coordinator's (a TLS handshake of at most two seconds, see
    :mod:`plait.trust`); without TLS it is never followed: list every coordinator instead.
    ``verify`` replaces the check (tests).
    """

    __slots__ = (
        "_current",
        "_field",
        "_index",
        "_verified",
        "_verify",
        "_warned",
        "addresses",
        "tls",
    )

    def __init__(
        self,
        addresses: str | Sequence[str],
        field: str = "--coordinator",
        *,
        tls: TlsFiles | None = None,
        verify: Callable[[str, TlsFiles], str | None] | None = None,
    ) -> None:
        if isinstance(addresses, str):
            self.addresses = parse_targets(addresses, field)
        else:
            self.addresses = parse_targets(",".join(addresses), field)
        self.tls = tls
        self._field = field
        self._index = 0
        self._current = self.addresses[0]
        self._verify = verify
        # Unlisted addresses whose certificate passed, not yet followed: each pass is used
        # once, so a later redirect to the same address is checked again.
        self._verified: set[str] = set()
        self._warned: set[str] = set()

    @classmethod
    def resolve(
        cls, target: str | Sequence[str] | None = None, *, tls: TlsFiles | None = None
    ) -> Endpoints:
        """From ``target``, else ``$PLAIT_COORDINATOR``, else the default address."""
        return cls(resolve_targets(target), tls=tls)

    @property
    def current(self) -> str:
        """The address to dial now."""
        return self._current

    def __len__(self) -> int:
        return len(self.addresses)

    def __str__(self) -> str:
        return ",".join(self.addresses)

    def unlisted(self, leader: str | None) -> str | None:
        """The hint's address when following it needs a certificate check first, else None.

        That is an unlisted ``HOST:PORT`` with TLS configured (without TLS an unlisted hint is
        refused outright, which needs no check).
        """
        address = _hint_address(leader)
        if address is None or address in self.addresses or self.tls is None:
            return None
        return address

    def check_hint(self, address: str) -> str | None:
        """Why ``address`` must not be followed, or None when it may (blocks: a handshake).

        A listed address always may. An unlisted one needs TLS and a coordinator's
        certificate; a pass is remembered for the next :meth:`follow` only. A refusal is logged
        once per address at WARNING.
        """
        if address in self.addresses:
            return None
        if self.tls is None:
            why: str | None = "without TLS it cannot be verified as a coordinator"
        else:
            verify = self._verify
            if verify is None:
                from plait.trust import verify_coordinator

                verify = verify_coordinator
            why = verify(address, self.tls)
        if why is None:
            self._verified.add(address)
            return None
        if address not in self._warned:
            self._warned.add(address)
            log.warning(
                "not following leader hint %s: not in the %s list (%s) and %s",
                address,
                self._field,
                self,
                why,
            )
        return why

    def follow(self, leader: str | None, *, blocking: bool = True) -> bool:
        """Moves to the named leader; returns False (and stays) when the hint is not followed.

        A hint that is not ``HOST:PORT`` (a coordinator misconfigured to advertise something
        else) is ignored rather than dialled. A listed address is followed. An unlisted one is
        followed only if it passes :meth:`check_hint` -- run here unless ``blocking`` is False,
        in which case only a pass recorded by an earlier :meth:`check_hint` counts (callers on
        an event loop run that check in a thread first).
        """
        address = _hint_address(leader)
        if address is None:
            return False
        if address not in self.addresses:
            passed = address in self._verified or (
                (blocking or self.tls is None) and self.check_hint(address) is None
            )
            self._verified.discard(address)
            if not passed:
                return False
        self._current = address
        if address in self.addresses:
            self._index = self.addresses.index(address)
        return True

    def rotate(self) -> str:
        """Moves to the next listed address and returns it.

        From a followed leader outside the list it goes back to the listed address used last:
        that one named the leader, so it answers and may know the next one.
        """
        if self._current in self.addresses:
            self._index = (self._index + 1) % len(self.addresses)
        self._current = self.addresses[self._index]
        return self._current


def _hint_address(leader: str | None) -> str | None:
    """The checked ``HOST:PORT`` of a leader hint, or None when it is not one."""
    if not leader:
        return None
    try:
        return parse_address(leader, "leader")
    except TargetError:
        return None


class Failover:
    """One call's walk over the endpoints after failures: bounded hops, jittered backoff.

    After each failure, :meth:`next_delay` moves the endpoints on and says how long to wait
    before the next try (``None``: give up). A standby that names a leader is followed at once;
    a redirect to an address already tried in this call (two standbys with stale hints naming
    each other) and a failure with no leader named rotate instead, and once every address has
    been tried since the last pause the walk sleeps a full-jitter backoff delay. With a single
    address and no leader named there is nowhere else to go, so the call fails at once, as it
    did before several addresses were possible.
    """

    __slots__ = ("_backoff", "_endpoints", "_since_pause", "_tried", "hops", "max_hops")

    def __init__(
        self, endpoints: Endpoints, *, max_hops: int | None = None, backoff: Backoff | None = None
    ) -> None:
        self._endpoints = endpoints
        self.max_hops = max_hops if max_hops is not None else max(3, 2 * len(endpoints) + 1)
        if backoff is None:
            # Imported here: plait.worker imports this module (for the session's addresses).
            from plait.worker.backoff import Backoff

            backoff = Backoff(timedelta(milliseconds=100), timedelta(seconds=2))
        self._backoff = backoff
        self.hops = 0
        self._tried = {endpoints.current}
        self._since_pause = 1

    def progressed(self) -> None:
        """The current address answered (e.g. a watch stream delivered events): start afresh."""
        self.hops = 0
        self._tried = {self._endpoints.current}
        self._since_pause = 1
        self._backoff.reset()

    def next_delay(self, leader: str | None = None, *, named: bool = False) -> float | None:
        """Moves on after a failure at the current address; seconds to wait, or ``None``.

        ``named`` says the failure was a standby's NOT_LEADER answer (``leader`` may still be
        empty: no leader is elected yet).
        """
        ep = self._endpoints
        if self.hops >= self.max_hops:
            return None
        if len(ep) == 1 and not leader and not named and ep.current == ep.addresses[0]:
            return None
        self.hops += 1
        if leader and leader != ep.current and leader not in self._tried and ep.follow(leader):
            self._tried.add(ep.current)
            self._since_pause += 1
            return 0.0
        ep.rotate()
        self._tried.add(ep.current)
        if self._since_pause >= len(ep):
            self._since_pause = 1
            self._tried = {ep.current}
            return self._backoff.next_delay()
        self._since_pause += 1
        return 0.0
