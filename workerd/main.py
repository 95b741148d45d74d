"""``plait-workerd`` / ``python -m plait.workerd``: the worker daemon's entry point (workerd layer).

The only place workerd configures logging (stderr; stdout stays quiet). SIGTERM or SIGINT
drains: no new work, running attempts finish, their results are acked, Goodbye, exit 0. A second
signal kills the attempts and exits at once.

Before connecting it checks who exec actions would run as (root, or the coordinator's uid, is
refused unless ``--allow-root``: :func:`plait.workerd.runas.exec_identity_problems`) and
prepares the sandbox (:mod:`plait.workerd.startup`); either failing is exit status 2.

Observability: ``--log-format text|json`` (:mod:`plait.logs`), ``--metrics-listen`` serves
Prometheus /metrics (:mod:`plait.workerd.metrics`; loopback unless ``--metrics-public``, else
exit 2), and every attempt runs inside a ``plait.action.execute`` span exported as the
``OTEL_*`` environment says (service ``plait-workerd``; :mod:`plait.worker.spans`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from plait import __version__
from plait.clock import SystemClock
from plait.errors import ConfigError
from plait.logs import configure_logging, set_process_fields
from plait.worker.executor import Executor
from plait.worker.handlers import Worker
from plait.worker.serve import serve
from plait.worker.session import SessionStats, WorkerSession
from plait.worker.spans import ExecuteTracing
from plait.workerd.config import (
    WorkerdConfig,
    build_parser,
    config_from_args,
    load_worker,
    parse_coordinator,
    parse_metrics_listen,
)
from plait.workerd.exec_executor import ExecExecutor, install_child_watcher
from plait.workerd.keeper import Keeper
from plait.workerd.metrics import WorkerdMetrics, serve_metrics
from plait.workerd.runas import exec_identity_problems
from plait.workerd.startup import ExecSetup, prepare_exec

log = logging.getLogger(__name__)

_SPAWNER_READY_S = 10.0


async def run(
    config: WorkerdConfig,
    workers: Sequence[Worker] = (),
    *,
    install_signal_handlers: bool = True,
    on_session: Callable[[WorkerSession], None] | None = None,
    exec_setup: ExecSetup | None = None,
    tracing: ExecuteTracing | None = None,
) -> SessionStats:
    """Runs the daemon until it drains or stops.

    ``exec_setup`` is the prepared sandbox (:func:`prepare_for`); made here when not given.
    ``tracing`` opens the execute spans; by default as the ``OTEL_*`` environment says.
    """
    keeper: Keeper | None = None
    executors: list[Executor] = []
    # Without --metrics-listen nobody could read them: no metrics, no per-attempt observer.
    metrics: WorkerdMetrics | None = None
    metrics_http: Any = None
    if config.metrics_listen is not None:
        metrics = WorkerdMetrics()
        host, port = parse_metrics_listen(config.metrics_listen)
        try:
            metrics_http, bound = serve_metrics(metrics, host, port)
        except OSError as err:
            raise ConfigError(
                f"--metrics-listen {config.metrics_listen}: cannot listen there"
                f" ({err.strerror or err})"
            ) from None
        log.info("serving Prometheus /metrics on %s", _host_port(host, bound))
    if tracing is None:
        tracing = ExecuteTracing.from_env("plait-workerd", set_global=True)

    def session_made(session: WorkerSession) -> None:
        if metrics is not None:
            metrics.attach(session)
        if on_session is not None:
            on_session(session)

    if config.exec_enabled:
        if exec_setup is None:
            exec_setup = prepare_for(config)
        keeper = Keeper()
        keeper.start()
        exec_setup.attach(keeper)
        exec_executor = ExecExecutor(
            keeper=keeper,
            secrets=config.secrets,
            sandbox=exec_setup.sandbox,
            tmp_root=exec_setup.tmp.path,
        )
        executors.append(exec_executor)
        spawner = exec_executor.spawner
        # Started now, so the first attempt does not wait for an interpreter to start.
        if spawner is not None and not await spawner.wait_ready(_SPAWNER_READY_S):
            log.warning(
                "the process spawner is not ready after %gs: attempts will use it once it is,"
                " or the exec chain if it cannot start",
                _SPAWNER_READY_S,
            )
        log.info("sandbox: %s", exec_setup.summary())
        for warning in exec_setup.warnings:
            log.warning("%s", warning)
    log.info(
        "plait-workerd %s: worker %s, %d slot(s) (adaptive %s), resources %s, exec %s,"
        " %d handler(s), coordinator %s (%s%s)",
        __version__,
        config.worker_id,
        config.slots,
        "on" if config.adaptive else "off",
        ", ".join(f"{k}={v:g}" for k, v in sorted(config.resources.items())) or "none",
        "on" if config.exec_enabled else "off",
        sum(len(w.handlers) for w in workers),
        config.coordinator,
        "plaintext" if config.tls is None else "TLS",
        "" if config.tls is None or config.tls.cert is None else " with a client certificate",
    )
    try:
        return await serve(
            workers,
            coordinator=config.coordinator,
            worker_id=config.worker_id,
            slots=config.slots,
            labels=config.labels,
            resources=config.resources,
            detect=False,
            adaptive=config.adaptive,
            executors=executors,
            clock=SystemClock(offset_ms=config.clock_offset_ms),
            reconnect_initial=config.reconnect_initial,
            reconnect_max=config.reconnect_max,
            agent=f"plait-workerd/{__version__}",
            install_signal_handlers=install_signal_handlers,
            on_session=session_made,
            tls=config.tls,
            token=config.token,
            tracing=tracing,
            observer=metrics,
            prefetch=config.prefetch,
        )
    finally:
        if metrics_http is not None:
            metrics_http.shutdown()
            metrics_http.server_close()
        if keeper is not None:
            keeper.close()
        if exec_setup is not None:
            exec_setup.close()


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def prepare_for(config: WorkerdConfig) -> ExecSetup:
    """The exec sandbox for ``config`` (:func:`plait.workerd.startup.prepare_exec`).

    Raises:
        ConfigError: the tmp root or ``--cgroup`` cannot be used.
    """
    return prepare_exec(
        worker_id=config.worker_id,
        slots=config.slots,
        run_as=config.run_as,
        allow_root=config.allow_root,
        rlimits=config.rlimits,
        cgroup=config.cgroup,
        tmp_root=config.tmp_root,
    )


def check_exec_identity(config: WorkerdConfig) -> tuple[str, list[str]]:
    """(refusal, warnings) about who exec actions would run as (none with ``--no-exec``)."""
    if not config.exec_enabled:
        return "", []
    return exec_identity_problems(
        coordinators=parse_coordinator(config.coordinator),
        run_as=config.run_as,
        allow_root=config.allow_root,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Parses flags, validates the config (exit 2 naming the flag), and serves."""
    parser = build_parser(os.environ)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args, os.environ)
        workers = [load_worker(spec) for spec in config.handlers]
    except ConfigError as err:
        print(f"plait-workerd: error: {err.message}", file=sys.stderr)
        return 2
    refusal, warnings = check_exec_identity(config)
    if refusal:
        print(f"plait-workerd: error: {refusal}", file=sys.stderr)
        return 2
    configure_logging("json" if config.log_format == "json" else "text", config.log_level)
    set_process_fields(worker_id=config.worker_id)
    for warning in warnings:
        log.warning("%s", warning)
    try:
        exec_setup = prepare_for(config) if config.exec_enabled else None
    except ConfigError as err:
        print(f"plait-workerd: error: {err.message}", file=sys.stderr)
        return 2
    install_child_watcher()
    try:
        asyncio.run(run(config, workers, exec_setup=exec_setup))
    except KeyboardInterrupt:
        return 130
    except ConfigError as err:
        print(f"plait-workerd: error: {err.message}", file=sys.stderr)
        return 2
    return 0
