"""``plait-workerd`` / ``python -m plait.workerd``: the worker daemon's entry point (workerd layer).

The only place workerd configures logging (stderr; stdout stays quiet). SIGTERM or SIGINT
drains: no new work, running attempts finish, their results are acked, Goodbye, exit 0. A second
signal kills the attempts and exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable, Sequence

from plait import __version__
from plait.clock import SystemClock
from plait.errors import ConfigError
from plait.worker.executor import Executor
from plait.worker.handlers import Worker
from plait.worker.serve import serve
from plait.worker.session import SessionStats, WorkerSession
from plait.workerd.config import WorkerdConfig, build_parser, config_from_args, load_worker
from plait.workerd.exec_executor import ExecExecutor, install_child_watcher
from plait.workerd.keeper import Keeper

log = logging.getLogger(__name__)


async def run(
    config: WorkerdConfig,
    workers: Sequence[Worker] = (),
    *,
    install_signal_handlers: bool = True,
    on_session: Callable[[WorkerSession], None] | None = None,
) -> SessionStats:
    """Runs the daemon until it drains or stops."""
    keeper: Keeper | None = None
    executors: list[Executor] = []
    if config.exec_enabled:
        keeper = Keeper()
        keeper.start()
        executors.append(ExecExecutor(keeper=keeper))
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
            on_session=on_session,
            tls=config.tls,
            token=config.token,
        )
    finally:
        if keeper is not None:
            keeper.close()


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
    logging.basicConfig(
        level=config.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    install_child_watcher()
    try:
        asyncio.run(run(config, workers))
    except KeyboardInterrupt:
        return 130
    return 0
