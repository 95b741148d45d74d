"""Composition of the coordinator process (edge layer): journal, runtime, gRPC, metrics.

``CoordinatorServer`` is what ``plait coordinator`` runs and what ``plait run`` embeds::

    server = CoordinatorServer(CoordinatorConfig(listen="127.0.0.1:0", ...))
    await server.start()          # journal open, gRPC + /metrics serving
    server.port, server.metrics_port
    await server.stop(grace)      # drain workers, stop accepting, flush the journal
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import ssl
import tempfile
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from plait.clock import Clock, SystemClock
from plait.coordinator.auth import Authenticator, AuthInterceptor, RefusalLog
from plait.coordinator.config import CoordinatorConfig, split_host_port
from plait.coordinator.core.events import DrainRequested
from plait.coordinator.health_port import LIVENESS_SERVICE, HealthPort
from plait.coordinator.journal.leadership import open_leadership
from plait.coordinator.journal.store import DeposedError, Leadership, open_store
from plait.coordinator.metrics import CoordinatorMetrics
from plait.coordinator.runtime import Runtime
from plait.coordinator.server_tls import CHECK_INTERVAL, ServerTls
from plait.coordinator.services.admin import AdminService
from plait.coordinator.services.errors import ErrorInterceptor
from plait.coordinator.services.worker import WorkerService
from plait.coordinator.services.workflow import WorkflowService
from plait.coordinator.tracing import Tracing
from plait.errors import ConfigError, UnavailableError
from plait.v1 import admin_service_pb2, worker_service_pb2, workflow_service_pb2
from plait.v1 import admin_service_pb2_grpc as agrpc
from plait.v1 import worker_service_pb2_grpc as wgrpc
from plait.v1 import workflow_service_pb2_grpc as wsgrpc

if TYPE_CHECKING:  # imported when --ui-listen is set: aiohttp costs every other start-up
    from plait.coordinator.ui.server import UiServer

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    workflow_service_pb2.DESCRIPTOR.services_by_name["WorkflowService"].full_name,
    worker_service_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name,
    admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
)


def server_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """gRPC channel arguments, set explicitly rather than trusting library defaults."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Per connection: a worker uses one stream, a client a few watches at most.
        ("grpc.max_concurrent_streams", 1_000),
        # Keepalive: accept client pings every 10 s; we ping idle peers every 30 s; a peer that
        # pings more often than allowed twice in a row is disconnected (GOAWAY).
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.so_reuseport", 0),
        # No BDP probes: each would answer a worker's heartbeat with a PING of ours (and wake
        # the transport again for its ACK). Worker messages are small; the default 64 KiB
        # window carries them, and a large result only needs a few more round trips.
        ("grpc.http2.bdp_probe", 0),
    ]


def bind_problem(listen: str, *, probe_only: bool = False) -> str:
    """Why ``listen`` (``HOST:PORT``) cannot be bound, in words: what a plain socket's bind
    says (gRPC's own error names no cause), e.g. "cannot listen there (address already in
    use)". With ``probe_only``, "" when the probe binds (port 0 is never probed)."""
    host, port = split_host_port(listen, "listen")
    fallback = "" if probe_only else "cannot listen there"
    if probe_only and port == 0:
        return ""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)
    except OSError as e:
        return f"cannot listen there ({e.strerror or e})"
    for family, kind, proto, _, address in infos:
        try:
            probe = socket.socket(family, kind, proto)
        except OSError:  # e.g. no IPv6 here: gRPC will say so if it matters
            continue
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as e:
                what = "address already in use" if e.errno == errno.EADDRINUSE else e.strerror
                return f"cannot listen there ({what or e})"
    return fallback


class CoordinatorServer:
    """A running coordinator: start it, read its ports, stop it."""

    def __init__(self, config: CoordinatorConfig, clock: Clock | None = None) -> None:
        config.validate()
        self.config = config
        self.clock = clock or SystemClock()
        self.metrics = CoordinatorMetrics()
        self.tracing = Tracing()
        self.store = open_store(config.store, lease_ttl=config.lease_ttl)
        self.runtime = Runtime(
            config, self.store, self.clock, self.metrics, self.tracing, on_fatal=self._fatal
        )
        self.authenticator = Authenticator(
            tls=config.tls,
            mtls=config.tls_client_ca is not None,
            token_file=config.auth_tokens,
        )
        self.health = HealthServicer()
        self.health_port = HealthPort(self.health)  # --health-listen: plaintext, Check only
        # The gRPC port's (and HTTPS listeners') TLS files, followed as they are renewed.
        self.tls: ServerTls | None = None
        self._tls_watch: asyncio.Task[None] | None = None
        self.server: grpc.aio.Server | None = None
        self.leadership: Leadership | None = None
        self.term = 0
        self.port = 0
        self.metrics_port = 0
        self._metrics_http: Any = None
        self.ui: UiServer | None = None  # the web UI (--ui-listen), on this event loop
        # Kept: the web UI calls the same servicers (after the same authorization).
        self.workflow_service = WorkflowService(self.runtime, config.limits)
        self.admin_service = AdminService(self.runtime)
        self._lead_task: asyncio.Task[None] | None = None
        self.leading = asyncio.Event()
        self.stopped = asyncio.Event()
        self.fatal: BaseException | None = None
        self._stopping_tasks: set[asyncio.Task[None]] = set()
        self.started_at = 0.0
        self._host = "127.0.0.1"
        self.serving_after = 0.0  # seconds from start() to SERVING as leader
        # TEST HOOK, on only with PLAIT_TEST_FENCE_ONLY=1 (main.py): a leader that loses its
        # leadership keeps running, so a system test can show that the journal's term fence
        # alone refuses what it writes next (normally it stops first, on its own clock).
        self.test_fence_only = False

    def _fatal(self, err: BaseException) -> None:
        if self.fatal is None:
            self.fatal = err
        task = asyncio.get_running_loop().create_task(self.stop(0), name="plait-fatal-stop")
        self._stopping_tasks.add(task)
        task.add_done_callback(self._stopped_after_fatal)

    def _stopped_after_fatal(self, task: asyncio.Task[None]) -> None:
        """Retrieves what the stop after a fatal error raised (e.g. flushing to a full disk):
        one line in the log, never an "exception was never retrieved" traceback."""
        self._stopping_tasks.discard(task)
        if task.cancelled():
            return
        err = task.exception()
        if err is not None:
            log.error("stopping after %s: %s: %s", self.fatal, type(err).__name__, err)

    async def start(self, *, wait_leader: bool = True, leader_timeout: float | None = None) -> None:
        """Serves gRPC and /metrics at once (as a standby), then campaigns for leadership.

        Once leader, it replays the journal and reports SERVING. With ``wait_leader`` (the
        embedded default) this returns only then (or raises UnavailableError after
        ``leader_timeout`` seconds, e.g. when another coordinator holds the journal); daemons
        pass False and keep answering as a standby, with the leader's address, until they win.
        """
        self.started_at = self.clock.monotonic()
        cfg = self.config
        # ErrorInterceptor first: it turns the AuthInterceptor's refusals into statuses.
        server = grpc.aio.server(
            interceptors=[
                ErrorInterceptor(self.runtime.refusals, self.runtime.errors),
                AuthInterceptor(
                    self.authenticator, RefusalLog(self.clock, self.metrics.auth_refusals)
                ),
            ],
            options=server_options(cfg.limits.max_message_bytes),
        )
        wsgrpc.add_WorkflowServiceServicer_to_server(self.workflow_service, server)
        wgrpc.add_WorkerServiceServicer_to_server(
            WorkerService(
                self.runtime,
                auth_enabled=self.authenticator.enabled,
                limits=cfg.limits,
                refusals=self.runtime.refusals,
            ),
            server,
        )
        agrpc.add_AdminServiceServicer_to_server(self.admin_service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if cfg.reflection:
            reflection.enable_server_reflection(
                (
                    *SERVICE_NAMES,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME,
                ),
                server,
            )
        self.port = self._bind(server)
        await server.start()
        self.server = server
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        # Alive from now until shutdown, standby or leader (the liveness probe's service).
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        try:
            if cfg.metrics_listen:
                self._serve_metrics(cfg.metrics_listen)
            if cfg.health_listen:
                await self.health_port.start(cfg.health_listen, bind_problem)
        except ConfigError:
            await server.stop(0)
            self._stop_metrics()
            raise
        await self._start_ui(server)
        if self.tls is not None:
            if self.ui is not None and self.ui.ssl is not None:
                self.tls.on_reload(self.tls.reload_context(self.ui.ssl))
            self._tls_watch = asyncio.create_task(self._watch_tls(self.tls), name="plait-tls")
        host = split_host_port(cfg.listen, "listen")[0]
        log.info(
            "coordinator serving gRPC%s on %s:%d (authentication %s), metrics on %s",
            " over TLS" if cfg.tls else "",
            host,
            self.port,
            self._auth_summary(),
            f"{host}:{self.metrics_port}" if self.metrics_port else "off",
        )
        self._host = host
        if cfg.ready_file:
            self._write_ready_file(cfg.ready_file, "standby")
        advertise = cfg.advertise or f"{host}:{self.port}"
        self.leadership = open_leadership(
            cfg.store, holder=f"{advertise}/{os.getpid()}", advertise=advertise, ttl=cfg.lease_ttl
        )
        self._lead_task = asyncio.create_task(self._lead(), name="plait-leadership")
        if wait_leader:
            waiter = asyncio.create_task(self.leading.wait())
            await asyncio.wait(
                {waiter, self._lead_task},
                timeout=leader_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            waiter.cancel()
            if not self.leading.is_set():
                if self.fatal is not None:
                    raise self.fatal  # what stopped the campaign (e.g. an unwritable journal)
                hint = self.runtime.leader_hint
                await self.stop(0)
                raise UnavailableError(
                    f"not elected within {leader_timeout:g}s: another coordinator"
                    f"{f' ({hint})' if hint else ''} holds the journal {cfg.store}"
                )

    async def _start_ui(self, server: grpc.aio.Server) -> None:
        """The web UI on ``--ui-listen`` (if set); when it cannot listen, nothing is left
        serving."""
        if not self.config.ui_listen:
            return
        from plait.coordinator.ui.server import UiServer

        self.ui = UiServer(
            self.config,
            self.authenticator,
            self.workflow_service,
            self.admin_service,
            self.clock,
            self.metrics.auth_refusals,
        )
        try:
            await self.ui.start()
        except ConfigError:
            self.ui = None
            await server.stop(0)
            if self._metrics_http is not None:
                self._metrics_http.shutdown()
                self._metrics_http.server_close()
            raise

    def _bind(self, server: grpc.aio.Server) -> int:
        """Adds the gRPC port; returns it. An address that cannot be bound is a ConfigError
        naming it and why (one line at start-up, exit 2)."""
        cfg = self.config
        # Checked first as gRPC would bind (SO_REUSEADDR), so an address in use is one clear
        # line rather than gRPC's own log line and a bare "Failed to bind".
        problem = bind_problem(cfg.listen, probe_only=True)
        if problem:
            raise ConfigError(f"--listen {cfg.listen}: {problem}")
        try:
            if cfg.tls_cert is not None and cfg.tls_key is not None:
                self.tls = ServerTls(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
                port = server.add_secure_port(cfg.listen, self.tls.grpc_credentials())
            else:
                port = server.add_insecure_port(cfg.listen)
        except RuntimeError:  # gRPC says only "Failed to bind"; bind_problem finds out why
            port = 0
        if port == 0:
            raise ConfigError(f"--listen {cfg.listen}: {bind_problem(cfg.listen)}")
        return port

    def _serve_metrics(self, listen: str) -> None:
        """Serves /metrics on ``listen`` (ConfigError naming it when it cannot)."""
        cfg = self.config
        host, port = split_host_port(listen, "metrics_listen")
        # Over TLS with the gRPC certificate when there is one (client certificates are not
        # required there: Prometheus scrapers rarely carry the cluster's).
        try:
            httpd, _ = start_http_server(
                port,
                host,
                registry=self.metrics.registry,
                certfile=cfg.tls_cert,
                keyfile=cfg.tls_key,
            )
        except OSError as e:
            raise ConfigError(
                f"--metrics-listen {listen}: cannot listen there ({e.strerror or e})"
            ) from None
        self._metrics_http = httpd
        self.metrics_port = httpd.server_port
        if self.tls is not None and isinstance(httpd.socket, ssl.SSLSocket):
            self.tls.on_reload(self.tls.reload_context(httpd.socket.context))

    def _auth_summary(self) -> str:
        cfg = self.config
        ways = [
            w
            for w, on in (
                ("client certificates", cfg.tls_client_ca is not None),
                (f"{len(self.authenticator.tokens)} bearer tokens", cfg.auth_tokens is not None),
            )
            if on
        ]
        return " + ".join(ways) if ways else "off: loopback only, every caller has every role"

    def reload_credentials(self) -> None:
        """SIGHUP: re-reads the token file; a bad file keeps the tokens in force and says why."""
        try:
            count = self.authenticator.reload()
        except ConfigError as e:
            log.error("token file not reloaded, the previous tokens stay in force: %s", e.message)
            return
        log.info("token file reloaded: %d tokens", count)

    async def _lead(self) -> None:
        """:meth:`_leading`; what stops it (the journal cannot be written, ...) stops the
        process with one line, and is kept in ``fatal`` rather than left unretrieved."""
        try:
            await self._leading()
        except asyncio.CancelledError:
            raise
        except ConfigError as e:  # e.g. a PostgreSQL role that may not write
            if not self.stopped.is_set():
                log.critical("refusing to start: %s", e.message)
                self._fatal(e)
        except Exception as e:
            if not self.stopped.is_set():
                what = "leading" if self.leading.is_set() else "taking leadership"
                log.critical("%s failed; stopping: %s: %s", what, type(e).__name__, e)
                self._fatal(e)

    async def _leading(self) -> None:
        """Standby until elected; then leader until the term ends (then the process stops)."""
        assert self.leadership is not None
        hints = asyncio.create_task(self._follow_leader_hint(), name="plait-leader-hint")
        try:
            self.term = await self.leadership.campaign()
        finally:
            hints.cancel()
        self.runtime.leader_hint = None
        # Renew from the moment we are elected: a long replay must not let the lease lapse.
        holding = asyncio.create_task(self.leadership.hold(), name="plait-leadership-hold")
        head = await self.store.open(self.term)
        await self.runtime.start(head)
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.serving_after = self.clock.monotonic() - self.started_at
        log.info(
            "leader (term %d): replayed %d events in %.3fs; serving %.3fs after start",
            self.term,
            self.runtime.replayed_events,
            self.runtime.replay_seconds,
            self.serving_after,
        )
        self.leading.set()
        if self.config.ready_file:
            self._write_ready_file(self.config.ready_file, "leader")
        await holding
        if self.test_fence_only and not self.stopped.is_set():
            log.warning("leadership lost (term %d); PLAIT_TEST_FENCE_ONLY: not stopping", self.term)
            return
        if not self.stopped.is_set():
            log.critical("leadership lost (term %d): stopping so a standby can lead", self.term)
            self._fatal(DeposedError(f"leadership of term {self.term} lost"))

    async def _watch_tls(self, tls: ServerTls) -> None:
        """Checks the TLS files now and then, for the HTTPS listeners (the gRPC port checks
        at each handshake)."""
        while True:
            await asyncio.sleep(CHECK_INTERVAL)
            await asyncio.to_thread(tls.check)

    async def _follow_leader_hint(self) -> None:
        """Keeps the leader's address for redirects; logs, at first and on each change, why
        this coordinator is a standby and whom it waits for."""
        assert self.leadership is not None
        said: str | None = None
        while True:
            try:
                self.runtime.leader_hint = await self.leadership.leader()
                why = await self.leadership.waiting_for()
            except Exception as e:  # the database may be briefly away; keep the old hint
                log.debug("could not read the leader's address: %s", e)
                why = None
            if why is not None and why != said:
                log.info(
                    "standby: %s; trying to take over every %gs",
                    why,
                    self.leadership.poll_interval,
                )
                said = why
            await asyncio.sleep(0.5)

    def _write_ready_file(self, path: str, role: str) -> None:
        """``{grpc, metrics, ui, health, pid, role, term}`` (``ui``: the web UI's URL, or
        null; ``health``: the plaintext health port, or null);
        rewritten (atomically) when elected."""
        host = self._host
        body = {
            "grpc": f"{host}:{self.port}",
            "metrics": f"{host}:{self.metrics_port}" if self.metrics_port else None,
            "ui": self.ui.url if self.ui is not None else None,
            "health": self._health_address(),
            "pid": os.getpid(),
            "role": role,
            "term": self.term,
        }
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".ready-")
        with os.fdopen(fd, "w") as f:
            json.dump(body, f)
        os.replace(tmp, path)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, drain workers, stop gRPC, flush the journal."""
        if self.stopped.is_set():
            return
        self.stopped.set()
        grace = self.config.shutdown_grace.total_seconds() if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self.ui is not None:
            await self.ui.stop()
        if self.server is not None and grace > 0 and self.fatal is None and self.leading.is_set():
            await self._drain_workers(grace)
        if self.server is not None:
            await self.server.stop(min(grace, 1.0))
        if self.fatal is None and self.runtime.core is not None:
            await self.runtime.stop()
        if self._lead_task is not None and not self._lead_task.done():
            self._lead_task.cancel()
        if self.leadership is not None:
            with contextlib.suppress(Exception):
                await self.leadership.resign()
        await self.store.close()
        self.tracing.shutdown()
        self._stop_metrics()
        await self.health_port.stop()
        if self._tls_watch is not None:
            self._tls_watch.cancel()

    def _stop_metrics(self) -> None:
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None

    def _health_address(self) -> str | None:
        """``HOST:PORT`` of the plaintext health port, or None when it is off."""
        if not self.health_port.port or self.config.health_listen is None:
            return None
        host = split_host_port(self.config.health_listen, "health_listen")[0]
        return f"{host}:{self.health_port.port}"

    async def _drain_workers(self, grace: float) -> None:
        st = self.runtime.state
        for w in list(st.workers.values()):
            if w.connected and not w.draining:
                self.runtime.post(DrainRequested(self.runtime.next_id("shutdown"), w.worker_id))
        try:
            async with asyncio.timeout(grace):
                await self.runtime.sessions_closed()
        except TimeoutError:
            log.warning("%d workers still connected after %.1fs", len(st.by_session), grace)

    async def wait(self) -> None:
        """Returns once :meth:`stop` has begun."""
        await self.stopped.wait()
