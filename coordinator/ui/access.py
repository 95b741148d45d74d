"""Who may see the web UI (edge layer): the API's authentication, reached over HTTP.

The UI has no authentication of its own. An HTTP request becomes an :class:`HttpCall`, which
looks to :class:`~plait.coordinator.auth.Authenticator` like a gRPC call: its bearer token
(the ``plait_token`` cookie the login form sets, or an ``Authorization: Bearer`` header) as the
``authorization`` metadata, and the client certificate its TLS handshake verified as the
``x509_pem_cert`` property. Each endpoint is authorized as the RPC it serves (the RPC-to-role
table of :data:`~plait.coordinator.auth.RPC_ROLES`), so a token has the same principal and
roles in the browser as on the gRPC port, and the same refusals are logged and counted.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

from aiohttp import web

from plait.coordinator.auth import Authenticator, Principal, RefusalLog
from plait.errors import PermissionDeniedError, UnauthenticatedError

__all__ = ["TOKEN_COOKIE", "HttpCall", "authorize", "bearer_token", "set_token_cookie"]

TOKEN_COOKIE = "plait_token"
MAX_TOKEN_CHARS = 512  # far above a real token (plait_ + 43); a longer one is not looked at


def bearer_token(request: web.Request) -> str:
    """The request's token: ``Authorization: Bearer`` first, else the login cookie ("" if none).

    A malformed ``Authorization`` header is passed on as it is, so the authenticator refuses
    it with its own message rather than the cookie being used instead.
    """
    header = request.headers.get("Authorization", "")
    if header:
        return header[: MAX_TOKEN_CHARS + 7]
    return request.cookies.get(TOKEN_COOKIE, "")[:MAX_TOKEN_CHARS]


def peer_certificate_pem(request: web.Request) -> bytes | None:
    """The client certificate the TLS handshake verified (PEM), if the browser sent one."""
    transport = request.transport
    sslobj = transport.get_extra_info("ssl_object") if transport is not None else None
    if not isinstance(sslobj, ssl.SSLObject):
        return None
    der = sslobj.getpeercert(binary_form=True)
    return ssl.DER_cert_to_PEM_cert(der).encode() if der else None


class HttpCall:
    """An HTTP request in the shape of a ``grpc.aio.ServicerContext``: what the authenticator
    and the servicers read of a call (metadata, peer, certificate), and nothing more."""

    def __init__(self, request: web.Request, token: str | None = None) -> None:
        self._token = bearer_token(request) if token is None else token
        self._pem = peer_certificate_pem(request)
        self._peer = request.remote or ""
        # Called when a streaming servicer sends its headers: it has accepted the call.
        self.on_headers: Callable[[], None] | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        """``authorization`` as a gRPC client would send it."""
        if not self._token:
            return ()
        value = self._token if " " in self._token else f"Bearer {self._token}"
        return (("authorization", value),)

    def auth_context(self) -> dict[str, list[bytes]]:
        """The verified client certificate, as gRPC's auth context names it."""
        return {"x509_pem_cert": [self._pem]} if self._pem else {}

    def peer(self) -> str:
        """``ipv4:HOST:PORT``-like, for the refusal log (the port is not kept)."""
        return f"http:{self._peer}:0"

    async def send_initial_metadata(self, metadata: Any) -> None:
        """A stream's servicer has checked the call and starts answering (``on_headers``)."""
        if self.on_headers is not None:
            self.on_headers()


def authorize(
    authenticator: Authenticator, refusals: RefusalLog, method: str, call: HttpCall
) -> Principal:
    """The caller of the RPC ``method`` (``/plait.v1.WorkflowService/GetWorkflow``), or the
    refusal the gRPC port would give, logged and counted the same way."""
    try:
        return authenticator.authenticate(method, call)
    except (UnauthenticatedError, PermissionDeniedError) as e:
        refusals.refused(method, call, e)
        raise


def set_token_cookie(response: web.StreamResponse, token: str, *, secure: bool) -> None:
    """The login cookie: HttpOnly (no script reads it), SameSite=Strict (no other site's page
    sends it), Secure over TLS, for the session only."""
    response.set_cookie(
        TOKEN_COOKIE, token, httponly=True, samesite="Strict", secure=secure, path="/"
    )
