"""Who may call what (edge layer): one RPC-to-role table, one interceptor that enforces it.

Every RPC the coordinator serves is in :data:`RPC_ROLES` with the one role it needs (or
``PUBLIC`` for health checks). :class:`AuthInterceptor` authenticates each call once, from the
client certificate the TLS handshake verified (``plait://<kind>/<name>`` URI SAN, roles as OU
values) or a bearer token from the token file, and then checks the role:

* no usable credentials -> ``UNAUTHENTICATED`` naming the RPC and the role it needs;
* credentials without the role -> ``PERMISSION_DENIED`` naming the RPC, the role and the caller.

With authentication off (loopback only, nothing configured) every caller is the anonymous
principal with every role: the development default of ``plait run``. The verified principal
reaches servicers through :func:`current_principal` (``WorkerService`` checks that a worker's id
is the one its certificate or token names).
"""

from __future__ import annotations

import contextvars
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import grpc

from plait.clock import Clock
from plait.coordinator.services.errors import rewrap
from plait.errors import PermissionDeniedError, PlaitError, UnauthenticatedError
from plait.security import (
    CertIdentity,
    Role,
    TokenEntry,
    effective_roles,
    identity_from_pem,
    load_token_file,
    match_token,
)
from plait.v1 import admin_service_pb2, worker_service_pb2, workflow_service_pb2

log = logging.getLogger(__name__)

PUBLIC: Final = "public"
WORKER_CONNECT = "/plait.v1.WorkerService/Connect"

_WF = "/plait.v1.WorkflowService/"
_ADMIN = "/plait.v1.AdminService/"
# The one table. A new RPC without an entry is refused (and fails the authorization tests).
RPC_ROLES: Mapping[str, Role | str] = {
    _WF + "SubmitWorkflow": Role.SUBMIT,
    _WF + "SubmitWorkflowStream": Role.SUBMIT,
    _WF + "GetWorkflow": Role.READ,
    _WF + "ListWorkflows": Role.READ,
    _WF + "WatchWorkflow": Role.READ,
    _WF + "GetActionLogs": Role.READ,
    _WF + "FollowActionLogs": Role.READ,
    _WF + "GetActionOutputs": Role.READ,
    _WF + "CancelWorkflow": Role.OPERATE,
    _WF + "RetryWorkflow": Role.OPERATE,
    WORKER_CONNECT: Role.WORKER,
    _ADMIN + "ListWorkers": Role.READ,
    _ADMIN + "DrainWorker": Role.OPERATE,
    _ADMIN + "RevokeWorker": Role.OPERATE,
    _ADMIN + "ReinstateWorker": Role.OPERATE,
    "/grpc.health.v1.Health/Check": PUBLIC,
    "/grpc.health.v1.Health/Watch": PUBLIC,
    # Reflection is served only with --reflection; it describes the API, nothing else.
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Role.READ,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": Role.READ,
}

PLAIT_SERVICES = (
    workflow_service_pb2.DESCRIPTOR.services_by_name["WorkflowService"],
    worker_service_pb2.DESCRIPTOR.services_by_name["WorkerService"],
    admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"],
)


def plait_methods() -> list[str]:
    """Every ``/package.Service/Method`` of Plait's three services, from the descriptors."""
    return [f"/{svc.full_name}/{m.name}" for svc in PLAIT_SERVICES for m in svc.methods]


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: its name for messages, its roles, and a worker id if it is one.

    ``worker_id`` is the id a ``WorkerService`` stream may use: the name of a worker
    certificate, or of a token with the worker role. Empty for anyone else.
    """

    name: str
    roles: frozenset[Role]
    worker_id: str = ""
    via: str = ""  # "certificate", "token" or "" (anonymous)

    def describe(self) -> str:
        """``user:alice (certificate; roles read, submit)``."""
        roles = ", ".join(sorted(r.value for r in self.roles)) or "none"
        via = f"{self.via}; " if self.via else ""
        return f"{self.name} ({via}roles {roles})"


ANONYMOUS_OPEN = Principal("anonymous", frozenset(Role))  # authentication off
_current: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "plait_principal", default=ANONYMOUS_OPEN
)


def current_principal() -> Principal:
    """The principal of the RPC being served (set by :class:`AuthInterceptor`)."""
    return _current.get()


class Authenticator:
    """Turns a call's certificate and metadata into a :class:`Principal`, or refuses it.

    Args:
        tls: the port serves TLS (a bearer token is then never in the clear).
        mtls: every connection presents a client certificate from ``--tls-client-ca``.
        token_file: path of the hashed token file (reloaded by :meth:`reload`).
    """

    def __init__(self, *, tls: bool, mtls: bool, token_file: str | None) -> None:
        self.tls = tls
        self.mtls = mtls
        self.token_file = token_file
        self.tokens: dict[str, TokenEntry] = load_token_file(token_file) if token_file else {}
        self._certs: dict[bytes, CertIdentity] = {}

    @property
    def enabled(self) -> bool:
        """Authentication is on: client certificates or a token file are configured."""
        return self.mtls or self.token_file is not None

    def reload(self) -> int:
        """Re-reads the token file (SIGHUP); a bad file keeps the old tokens. Returns the count."""
        if self.token_file is None:
            return 0
        self.tokens = load_token_file(self.token_file)  # raises ConfigError; caller logs it
        return len(self.tokens)

    def _certificate(self, context: Any) -> CertIdentity | None:
        auth = context.auth_context()
        pems = auth.get("x509_pem_cert") if auth else None
        if not pems:
            return None
        pem: bytes = pems[0]
        ident = self._certs.get(pem)
        if ident is None:
            ident = identity_from_pem(pem)
            if len(self._certs) > 4096:  # bounded: certificates seen, not calls made
                self._certs.clear()
            self._certs[pem] = ident
        return ident

    def _token(self, context: Any, method: str) -> TokenEntry | None:
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                scheme, _, token = str(value).partition(" ")
                entry = match_token(self.tokens, token.strip()) if scheme == "Bearer" else None
                if entry is None:
                    # Never echo the token; say what was wrong with it.
                    raise UnauthenticatedError(
                        f"{method}: the bearer token is not valid (unknown, revoked or"
                        " malformed; expected 'authorization: Bearer plait_...')"
                    )
                return entry
        return None

    def authenticate(self, method: str, context: Any) -> Principal:
        """The caller of ``method``, checked against the role the table gives it.

        Raises:
            UnauthenticatedError: no credentials that prove who the caller is.
            PermissionDeniedError: the caller lacks the role (or the RPC has no role).
        """
        need = RPC_ROLES.get(method)
        if need is None:
            raise PermissionDeniedError(f"{method} has no role in the coordinator's RPC table")
        if not self.enabled:
            return ANONYMOUS_OPEN
        if need == PUBLIC:
            return Principal("anonymous", frozenset())
        cert = self._certificate(context)
        token = self._token(context, method) if self.token_file is not None else None
        if method == WORKER_CONNECT:
            principal = self._worker(cert, token, method)
        elif token is not None:
            principal = Principal(f"token:{token.name}", effective_roles(token.roles), via="token")
        elif cert is not None:
            principal = Principal(cert.principal, effective_roles(cert.roles), via="certificate")
        else:
            raise UnauthenticatedError(
                f"{method} needs role '{need}': no credentials (present a client certificate"
                " or 'authorization: Bearer <token>')"
            )
        assert isinstance(need, Role)
        if need not in principal.roles:
            raise PermissionDeniedError(
                f"{method} needs role '{need.value}'; {principal.describe()} does not have it"
            )
        return principal

    def _worker(
        self, cert: CertIdentity | None, token: TokenEntry | None, method: str
    ) -> Principal:
        if self.tls:
            # With TLS the worker's identity is what its certificate proves, nothing less.
            if cert is None:
                raise UnauthenticatedError(
                    f"{method} requires a client certificate (plait://worker/<id>, OU=worker)"
                    + ("" if self.mtls else "; this coordinator has no --tls-client-ca")
                )
            worker_id = cert.name if cert.kind == "worker" else ""
            return Principal(
                cert.principal, effective_roles(cert.roles), worker_id, via="certificate"
            )
        if token is None:
            raise UnauthenticatedError(
                f"{method} needs role 'worker': no credentials (a worker token as"
                " 'authorization: Bearer <token>')"
            )
        roles = effective_roles(token.roles)
        return Principal(
            f"token:{token.name}", roles, token.name if Role.WORKER in roles else "", via="token"
        )


class RefusalLog:
    """Logs refusals at WARNING, at most once a minute per (peer host, RPC, code), and counts
    every one (``plait_auth_refusals_total``; labels bounded by the RPC table).

    A client retrying with a revoked token must not flood the log, but the first refusal of
    each kind from each host is what an operator needs to see.
    """

    INTERVAL = 60.0

    def __init__(self, clock: Clock, counter: Any = None) -> None:
        self.clock = clock
        self.counter = counter
        self._last: dict[tuple[str, str, str], float] = {}

    def refused(self, method: str, context: Any, err: PlaitError) -> None:
        """Records one refusal of ``method`` (an RPC in the table) with ``err``."""
        rpc = method.rsplit(".", 1)[-1].replace("/", ".")
        code = err.code.name
        if self.counter is not None:
            self.counter.labels(rpc, code).inc()
        peer = str(context.peer() or "")
        host = peer.rpartition(":")[0] or peer
        key = (host, rpc, code)
        now = self.clock.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.INTERVAL:
            return
        if len(self._last) > 10_000:  # bounded: peers come and go
            self._last.clear()
        self._last[key] = now
        log.warning("refused %s from %s: %s %s", rpc, peer or "?", code, err.message)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates and authorizes every call before its handler runs.

    Sits inside :class:`~plait.coordinator.services.errors.ErrorInterceptor`, which turns the
    refusals into statuses. Refusals (here, or a worker's id that its credentials do not prove,
    raised by the servicer) are logged and counted by ``refusals``.
    """

    def __init__(self, authenticator: Authenticator, refusals: RefusalLog | None = None) -> None:
        self.authenticator = authenticator
        self.refusals = refusals

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        return rewrap(handler, lambda behavior: self._wrap(method, behavior))

    def _wrap(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        auth = self.authenticator
        refusals = self.refusals
        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                try:
                    _current.set(auth.authenticate(method, context))
                    async for item in behavior(request, context):
                        yield item
                except (UnauthenticatedError, PermissionDeniedError) as e:
                    if refusals is not None:
                        refusals.refused(method, context, e)
                    raise

            return stream

        async def call(request: Any, context: Any) -> Any:
            try:
                _current.set(auth.authenticate(method, context))
                return await behavior(request, context)
            except (UnauthenticatedError, PermissionDeniedError) as e:
                if refusals is not None:
                    refusals.refused(method, context, e)
                raise

        return call
