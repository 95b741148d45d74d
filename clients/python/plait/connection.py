"""A connection to a coordinator group: channels, failover, HLC, errors (SDK layer).

:class:`Connection` is what every call of :class:`plait.Client` goes through: one channel per
coordinator address (TLS when files are given), the bearer token, the client's hybrid logical
clock (stamped on each request, merged from each response), gRPC errors turned into
:mod:`plait.errors` exceptions, and the failover rule: a call answered ``UNAVAILABLE`` (a
standby's ``NOT_LEADER``, or an address that does not answer) moves to the leader the standby
named or to the next address, within a bounded number of hops, when ``retry`` says repeating it
cannot do anything twice.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal, Self

import grpc

from plait import hlc, security
from plait.clock import Clock, SystemClock
from plait.endpoints import Endpoints, Failover, not_leader_of, resolve_targets
from plait.errors import PlaitError, UnavailableError, from_rpc_error
from plait.security import TlsFiles
from plait.v1 import admin_service_pb2_grpc, workflow_service_pb2_grpc

__all__ = ["MAX_MESSAGE_BYTES", "Connection", "Link", "channel_options", "resolve_target"]

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def resolve_target(target: str | None = None) -> str:
    """``target``, else ``$PLAIT_COORDINATOR``, else ``127.0.0.1:7450``, as a comma-separated
    list of checked ``HOST:PORT`` addresses (:class:`plait.endpoints.TargetError` if one is bad).
    """
    return ",".join(resolve_targets(target))


def channel_options() -> list[tuple[str, int]]:
    """gRPC channel options every Plait client uses (4 MiB messages both ways, set explicitly)."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]


class Link:
    """The channel and stubs for one coordinator address."""

    __slots__ = ("admin", "channel", "workflows")

    def __init__(self, address: str, tls: TlsFiles | None) -> None:
        if tls is None:
            self.channel = grpc.insecure_channel(address, options=channel_options())
        else:
            self.channel = grpc.secure_channel(
                address,
                security.channel_credentials(tls),
                options=channel_options() + security.channel_options_for(tls),
            )
        self.workflows = workflow_service_pb2_grpc.WorkflowServiceStub(self.channel)
        self.admin = admin_service_pb2_grpc.AdminServiceStub(self.channel)


class Connection:
    """Channels to a coordinator group and the rules every call follows (see the module
    docstring); :class:`plait.Client` is one, with the calls. Arguments as :class:`plait.Client`.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        clock: Clock | None = None,
        timeout: float | None = 30.0,
        token: str | None = None,
        tls: TlsFiles | Literal[False] | None = None,
        max_hops: int | None = None,
    ) -> None:
        self.tls: TlsFiles | None = (
            None if tls is False else tls if tls is not None else security.tls_from_env()
        )
        self.endpoints = Endpoints(resolve_targets(target), tls=self.tls)
        self.timeout = timeout
        self.max_hops = max_hops
        self._clock: Clock = clock or SystemClock()
        self.hlc = hlc.HybridLogicalClock(self._clock)
        token = token if token is not None else os.environ.get("PLAIT_TOKEN", "")
        # Checked against the listed addresses; a followed leader outside the list is reached
        # only over TLS (plait.endpoints), so the rule holds for it too.
        security.check_token_transport(self.endpoints.addresses, self.tls, token)
        self._metadata = security.bearer_metadata(token)
        self._links: dict[str, Link] = {}
        self._sleep: Callable[[float], None] = time.sleep

    @property
    def target(self) -> str:
        """The coordinator address in use now (the leader, once a standby has named it)."""
        return self.endpoints.current

    @property
    def targets(self) -> tuple[str, ...]:
        """Every coordinator address the client was given, in order."""
        return self.endpoints.addresses

    # -- plumbing -------------------------------------------------------------------------

    def _link(self) -> Link:
        address = self.endpoints.current
        link = self._links.get(address)
        if link is None:
            link = self._links[address] = Link(address, self.tls)
        return link

    def _error(self, err: grpc.RpcError) -> PlaitError:
        out = from_rpc_error(err)
        if isinstance(out, UnavailableError):
            detail = out.message or "unavailable"
            if len(self.endpoints) == 1:
                return UnavailableError(f"coordinator at {self.target} is unreachable: {detail}")
            return UnavailableError(
                f"no coordinator of {self.endpoints} answered as the leader"
                f" (last tried {self.target}: {detail})"
            )
        return out

    def _observe(self, stamp: Any) -> None:
        try:
            self.hlc.observe_proto(stamp)
        except hlc.ClockOffsetError as exc:
            # A coordinator clock far ahead of ours: keep ours, say so once per response.
            log.warning("not merging the coordinator's HLC: %s", exc)

    def _failover(self) -> Failover:
        return Failover(self.endpoints, max_hops=self.max_hops)

    def _hop(self, failover: Failover, err: grpc.RpcError, deadline_at: float | None) -> bool:
        """After a failed try of a call that is safe to repeat: moves to the next address (or
        the leader a standby named), waits out the backoff, and says whether to try again."""
        code = err.code()  # type: ignore[attr-defined,unused-ignore]
        if code != grpc.StatusCode.UNAVAILABLE:
            return False
        standby = not_leader_of(err)
        was = self.endpoints.current
        delay = failover.next_delay(
            standby.leader if standby is not None else None, named=standby is not None
        )
        if delay is None:
            return False
        if deadline_at is not None and self._clock.monotonic() + delay >= deadline_at:
            return False
        if standby is not None:
            log.info(
                "coordinator at %s is a standby (leader: %s); trying %s",
                was,
                standby.leader or "unknown",
                self.endpoints.current,
            )
        else:
            log.info("coordinator at %s is unavailable; trying %s", was, self.endpoints.current)
        if delay > 0:
            self._sleep(delay)
        return True

    def _call(self, rpc: Callable[[Link], Any], request: Any, *, retry: bool = True) -> Any:
        """One unary call. ``retry``: repeating it cannot do anything twice, so an
        ``UNAVAILABLE`` answer moves it to another coordinator address."""
        deadline_at = None if self.timeout is None else self._clock.monotonic() + self.timeout
        failover = self._failover()
        while True:
            self.hlc.stamp(request.hlc)
            remaining = (
                None if deadline_at is None else max(0.0, deadline_at - self._clock.monotonic())
            )
            try:
                response = rpc(self._link())(request, timeout=remaining, metadata=self._metadata)
            except grpc.RpcError as err:
                if retry and self._hop(failover, err, deadline_at):
                    continue
                raise self._error(err) from None
            self._observe(response.hlc)
            return response

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Closes the channels (cancelling any open watch)."""
        links, self._links = self._links, {}
        for link in links.values():
            link.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
