"""The web UI's HTTP server (edge layer): aiohttp on the coordinator's own event loop.

Serves the static pages (``static/``: HTML, CSS and JavaScript, committed, no build step,
nothing fetched from elsewhere) and the JSON and server-sent-event endpoints of :mod:`.api`
and :mod:`.streams`, on ``--ui-listen``: HTTPS with the gRPC port's certificate when the
coordinator has one (client certificates from ``--tls-client-ca`` are asked for, not
required: a login token works as well), behind the API's authentication. Every response
carries a Content-Security-Policy that allows this origin's scripts and styles only, and no
framing. With authentication off (loopback only), requests must name a loopback host, so that
a web page elsewhere cannot reach the UI through a DNS name rebound to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from importlib import resources
from typing import Any

from aiohttp import web

from plait.clock import Clock
from plait.coordinator.auth import Authenticator, RefusalLog
from plait.coordinator.config import CoordinatorConfig, split_host_port
from plait.coordinator.services.admin import AdminService
from plait.coordinator.services.workflow import WorkflowService
from plait.coordinator.ui.api import UiApi, error_body, http_status, json_response
from plait.coordinator.ui.streams import UiStreams
from plait.errors import ConfigError, PlaitError
from plait.security import is_loopback_host

__all__ = ["SECURITY_HEADERS", "STATIC_FILES", "UiServer", "page_weight"]

log = logging.getLogger(__name__)

# The pages' files, by URL path, with their types. Nothing else is served from the package.
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.css": ("app.css", "text/css; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/dag.js": ("dag.js", "text/javascript; charset=utf-8"),
    "/static/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
_LOOPBACK_NAMES = {"localhost", "localhost."}


def _read_static() -> dict[str, tuple[bytes, str]]:
    folder = resources.files("plait.coordinator.ui").joinpath("static")
    return {
        path: (folder.joinpath(name).read_bytes(), ctype)
        for path, (name, ctype) in STATIC_FILES.items()
    }


def page_weight() -> int:
    """Bytes of HTML, CSS and JavaScript the UI's pages load (docs/ui.md quotes it)."""
    return sum(
        len(body) for body, ctype in _read_static().values() if not ctype.startswith("image/")
    )


def _ssl_context(cfg: CoordinatorConfig) -> ssl.SSLContext | None:
    """The gRPC port's certificate; client certificates asked for when there is a client CA."""
    if cfg.tls_cert is None or cfg.tls_key is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
        if cfg.tls_client_ca:
            ctx.load_verify_locations(cfg.tls_client_ca)
            ctx.verify_mode = ssl.CERT_OPTIONAL
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"--ui-listen: cannot use the TLS files: {e}") from None
    return ctx


def _bind(listen: str) -> socket.socket:
    """A listening socket on ``HOST:PORT`` (port 0: any free one)."""
    host, port = split_host_port(listen, "ui_listen")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family = infos[0][0]
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as e:
        what = e.strerror or str(e)
        raise ConfigError(f"--ui-listen {listen}: cannot listen there ({what})") from None


class UiServer:
    """The web UI: start it on the coordinator's loop, read its port, stop it."""

    def __init__(
        self,
        config: CoordinatorConfig,
        authenticator: Authenticator,
        workflows: WorkflowService,
        admin: AdminService,
        clock: Clock,
        refusal_counter: Any = None,
    ) -> None:
        assert config.ui_listen is not None
        self.config = config
        self.authenticator = authenticator
        self.ssl = _ssl_context(config)
        self.api = UiApi(
            authenticator,
            RefusalLog(clock, refusal_counter),
            workflows,
            admin,
            tls=self.ssl is not None,
        )
        self.streams = UiStreams(self.api)
        self.static = _read_static()
        self.host = split_host_port(config.ui_listen, "ui_listen")[0]
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """``http(s)://HOST:PORT/``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.ssl else 'http'}://{host}:{self.port}/"

    def app(self) -> web.Application:
        """The application: static pages, JSON and SSE endpoints, headers and errors."""
        app = web.Application(middlewares=[self._guard], client_max_size=64 * 1024)
        app.router.add_routes(
            [web.get(path, self._static) for path in STATIC_FILES]
            + self.api.routes()
            + self.streams.routes()
        )
        app.on_response_prepare.append(_add_security_headers)
        return app

    async def start(self) -> None:
        """Binds ``--ui-listen`` and serves (ConfigError naming the address if it cannot)."""
        sock = _bind(self.config.ui_listen or "")
        self.port = sock.getsockname()[1]
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.SockSite(runner, sock, ssl_context=self.ssl, shutdown_timeout=1.0)
        await site.start()
        self._runner = runner
        log.info(
            "web UI on %s (%s)",
            self.url,
            "authentication as the API's" if self.authenticator.enabled else "authentication off",
        )

    async def stop(self) -> None:
        """Ends the open streams and stops serving."""
        for task in list(self.streams.active):
            task.cancel()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(runner.cleanup(), 5.0)

    # ---- handlers -----------------------------------------------------------------------

    async def _static(self, request: web.Request) -> web.Response:
        body, ctype = self.static[request.path]
        return web.Response(body=body, headers={"Content-Type": ctype, "Cache-Control": "no-cache"})

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Refuses foreign hosts (auth off) and cross-site writes; errors as JSON."""
        try:
            self._check_host(request)
            if request.method not in ("GET", "HEAD"):
                self._check_origin(request)
            response: web.StreamResponse = await handler(request)
            return response
        except PlaitError as e:
            return json_response(error_body(e), http_status(e))
        except web.HTTPException:
            raise
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("web UI request %s %s failed", request.method, request.path)
            err = PlaitError("internal error; the coordinator's log has the details")
            return json_response(error_body(err), 500)

    def _check_host(self, request: web.Request) -> None:
        if self.authenticator.enabled:
            return
        host = _host_name(request.host or "")
        if host in _LOOPBACK_NAMES or host == self.host or is_loopback_host(host):
            return
        raise web.HTTPMisdirectedRequest(
            text="this UI has no authentication and answers loopback names only\n"
        )

    def _check_origin(self, request: web.Request) -> None:
        """A write must come from this UI's own pages (and say it sends JSON)."""
        origin = request.headers.get("Origin")
        own = f"{request.scheme}://{request.host}"
        if origin is not None and origin != own:
            raise web.HTTPForbidden(text=f"cross-origin request from {origin[:100]} refused\n")
        if request.method == "POST" and request.content_type != "application/json":
            raise web.HTTPUnsupportedMediaType(text="send application/json\n")


def _host_name(header: str) -> str:
    """The name in a Host header: ``[::1]:80`` -> ``::1``, ``localhost:80`` -> ``localhost``."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


async def _add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
