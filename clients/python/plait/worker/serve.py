"""Serving a worker session until it drains (foundation layer: plait.worker).

Shared by :meth:`plait.Worker.run` and the worker daemon: builds the session, turns
SIGTERM/SIGINT into a graceful drain (a second signal stops at once), and closes executors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING

from plait.clock import Clock
from plait.security import TlsFiles
from plait.worker.adaptive import AdaptiveConfig, LoadProbe
from plait.worker.attempts import AttemptObserver
from plait.worker.executor import Executor
from plait.worker.resources import detect_resources, merge_resources
from plait.worker.session import DEFAULT_AGENT, SessionConfig, SessionStats, WorkerSession
from plait.worker.spans import ExecuteTracing

if TYPE_CHECKING:
    from plait.worker.handlers import Worker

log = logging.getLogger(__name__)


def default_logging(level: int = logging.INFO) -> None:
    """Shows Plait's log lines at ``level`` on stderr, unless the program set up logging
    itself (the root or the ``plait`` logger has a handler): what ``Worker.run`` does, as the
    entry point of a worker script, so that connecting, reconnecting and draining are seen."""
    plait_log = logging.getLogger("plait")
    if logging.getLogger().handlers or plait_log.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    plait_log.addHandler(handler)
    plait_log.setLevel(level)


def default_worker_id(hostname: str | None = None) -> str:
    """``<hostname>-<pid>``, made to fit the id rule (:mod:`plait.ids`) whatever the host name."""
    name = socket.gethostname() if hostname is None else hostname
    host = re.sub(r"[^A-Za-z0-9_-]", "-", name.split(".")[0]).lstrip("_-") or "worker"
    return f"{host[:100]}-{os.getpid()}"


@contextlib.contextmanager
def drain_on_signals(session: WorkerSession) -> Iterator[None]:
    """SIGTERM/SIGINT drain the session; a second signal stops it (kills attempts) at once.

    A no-op where signal handlers cannot be installed (not the main thread, Windows).
    """
    loop = asyncio.get_running_loop()
    seen: list[int] = []

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if not seen:
            log.info("%s: draining; send it again to stop now", name)
            session.drain(name)
        else:
            log.warning("%s again: killing running attempts and leaving", name)
            session.stop(f"worker stopped by {name}")
        seen.append(signum)

    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, on_signal, int(sig))
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            break
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def serve(
    workers: Sequence[Worker] = (),
    *,
    coordinator: str = "127.0.0.1:7450",
    worker_id: str | None = None,
    slots: int | None = None,
    labels: Mapping[str, str] | None = None,
    executors: Sequence[Executor] = (),
    clock: Clock | None = None,
    reconnect_initial: timedelta = timedelta(milliseconds=200),
    reconnect_max: timedelta = timedelta(seconds=10),
    agent: str | None = None,
    install_signal_handlers: bool = False,
    on_session: Callable[[WorkerSession], None] | None = None,
    resources: Mapping[str, float] | None = None,
    detect: bool = True,
    adaptive: bool | AdaptiveConfig = False,
    load_probe: LoadProbe | None = None,
    tls: TlsFiles | None = None,
    token: str = "",
    tracing: ExecuteTracing | None = None,
    observer: AttemptObserver | None = None,
    prefetch: int = 32,
) -> SessionStats:
    """Serves ``workers``' handlers (and ``executors``) until the session drains or stops.

    ``Hello.resources`` are the detected ``cpu`` and ``memory_mb``
    (:func:`plait.worker.resources.detect_resources`) with ``resources`` added or overriding;
    with ``detect=False`` they are ``resources`` alone. ``adaptive`` turns on adaptive
    concurrency (``True`` for the default thresholds, or an :class:`AdaptiveConfig`).
    ``tls`` and ``token`` are the session's credentials (:class:`SessionConfig`); a token to a
    host beyond loopback without TLS raises :class:`plait.errors.ConfigError`.

    ``tracing`` opens the attempts' execute spans; by default as the ``OTEL_*`` environment
    says, service ``plait-worker`` (:meth:`ExecuteTracing.from_env`). ``observer`` hears of
    every attempt that ends. ``prefetch`` is ``Hello.prefetch``: slots' worth of leases taken
    beyond the free slots and queued, each started as a slot frees (0: none).
    """
    from plait.worker.handlers import HandlerExecutor

    advertised = dict(resources or {})
    if detect:
        advertised = merge_resources(detect_resources(), advertised)
    adaptive_config = AdaptiveConfig() if adaptive is True else (adaptive or None)
    config = SessionConfig(
        worker_id=worker_id or default_worker_id(),
        coordinator=coordinator,
        slots=slots or 0,
        labels=dict(labels or {}),
        reconnect_initial=reconnect_initial,
        reconnect_max=reconnect_max,
        agent=agent or DEFAULT_AGENT,
        resources=advertised,
        adaptive=adaptive_config,
        tls=tls,
        token=token,
        prefetch=prefetch,
    )
    all_executors: list[Executor] = list(executors)
    if workers:
        all_executors.append(HandlerExecutor(list(workers), config.effective_slots))
    if tracing is None:
        tracing = ExecuteTracing.from_env("plait-worker", set_global=True)
    session = WorkerSession(
        config,
        all_executors,
        clock=clock,
        load_probe=load_probe,
        tracing=tracing,
        observer=observer,
    )
    if on_session is not None:
        on_session(session)
    names = sorted({name for w in workers for name in w.handlers})
    log.info(
        "worker %s serving %d handler(s)%s%s with %d slot(s); connecting to %s",
        config.worker_id,
        len(names),
        f" ({', '.join(names[:20])}{', ...' if len(names) > 20 else ''})" if names else "",
        f" and {len(executors)} other executor(s)" if executors else "",
        config.effective_slots,
        coordinator,
    )
    try:
        if install_signal_handlers:
            with drain_on_signals(session):
                await session.run()
        else:
            await session.run()
    finally:
        for ex in all_executors:
            await ex.aclose()
        await asyncio.to_thread(tracing.shutdown)  # flushes the batch exporter
    return session.stats
