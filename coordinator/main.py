"""``plait coordinator`` / ``plait-coordinator``: the long-running daemon (entry point)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from plait.clock import SystemClock
from plait.coordinator.config import LOG_FORMATS, load_config, parse_args
from plait.coordinator.server import CoordinatorServer
from plait.durations import parse_clock_offset
from plait.errors import ConfigError
from plait.logs import configure_logging

log = logging.getLogger("plait.coordinator")

EXIT_CONFIG = 2


async def serve(server: CoordinatorServer) -> int:
    """Runs until SIGTERM/SIGINT, then shuts down gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload_credentials)
    await server.start(wait_leader=False)
    if not server.authenticator.enabled:  # once serving: a refusal to start is one line alone
        log.warning(
            "authentication is off: any process on this host may submit, operate and serve as"
            " a worker (configure --tls-client-ca and/or --auth-tokens; docs/security.md)"
        )
    waiter = asyncio.create_task(server.wait())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    log.info("shutting down")
    await server.stop()
    waiter.cancel()
    stopper.cancel()
    if isinstance(server.fatal, ConfigError):
        return EXIT_CONFIG  # refused at start-up, e.g. a journal this role may not write
    return 1 if server.fatal is not None else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for a refused configuration)."""
    args = parse_args(argv)
    # argparse checks a flag against its choices, not a default taken from PLAIT_LOG_FORMAT.
    if args.log_format not in LOG_FORMATS:
        print(
            f"plait coordinator: refusing to start: --log-format (PLAIT_LOG_FORMAT) must be"
            f" one of {', '.join(LOG_FORMATS)}, got {args.log_format!r}",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    try:
        configure_logging(args.log_format, args.log_level or "INFO")
    except ValueError as e:  # an unknown level
        print(f"plait coordinator: refusing to start: --log-level: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        config = load_config(args)
    except ConfigError as e:
        print(f"plait coordinator: refusing to start: {e.message}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        # PLAIT_CLOCK_OFFSET skews this process's wall clock (clock-skew and failover tests).
        offset_ms = parse_clock_offset(os.environ.get("PLAIT_CLOCK_OFFSET", ""))
    except ValueError as e:
        print(f"plait coordinator: refusing to start: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        server = CoordinatorServer(config, SystemClock(offset_ms))
    except ConfigError as e:  # e.g. a malformed token file
        print(f"plait coordinator: refusing to start: {e.message}", file=sys.stderr)
        return EXIT_CONFIG
    server.test_fence_only = os.environ.get("PLAIT_TEST_FENCE_ONLY") == "1"
    if server.test_fence_only:
        print(
            "plait coordinator: WARNING: PLAIT_TEST_FENCE_ONLY=1 (a test hook): a deposed leader"
            " keeps running and only the journal's term fence stops its writes",
            file=sys.stderr,
        )
    try:
        return asyncio.run(serve(server))
    except ConfigError as e:  # e.g. --listen's address in use, a TLS file it cannot read
        print(f"plait coordinator: refusing to start: {e.message}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as e:
        print(f"plait coordinator: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
