"""``plait run FLOW.yaml``: the embedded default (CLI layer).

Loads the flow (a bad file exits 2 before anything starts), brings up a :class:`LocalCluster`,
submits, follows the workflow's events with live progress (plain lines when stdout is not a
terminal, nothing but the final JSON with ``-o json``), prints a summary, stops the cluster, and
exits 0 only if the workflow succeeded. Ctrl-C, SIGTERM and SIGHUP cancel the workflow and stop
the cluster the same way (exit 130, 143, 129).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.text import Text

from plait.cli import render
from plait.cli.commands import whole_number
from plait.cli.flows import add_param_flags, load_flow
from plait.cli.follow import Follower, FollowMode, follow
from plait.cli.local import (
    DEFAULT_STORE,
    LocalCluster,
    LocalClusterConfig,
    make_dir,
    sqlite_path,
)
from plait.cli.progress import RunProgress
from plait.client import Client
from plait.clock import Clock, SystemClock
from plait.errors import ConfigError, PlaitError
from plait.v1 import workflow_pb2

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED = 0, 1
EXIT_INTERRUPTED = 130
CANCEL_WAIT_S = 5.0


# Success, including success with failures a join tolerated.
SUCCESS_STATES = frozenset(
    {workflow_pb2.WORKFLOW_STATE_SUCCEEDED, workflow_pb2.WORKFLOW_STATE_PARTIALLY_SUCCEEDED}
)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Registers ``plait run``."""
    p = sub.add_parser(
        "run",
        help="run a workflow on an embedded coordinator and local workers",
        description="Start a coordinator (SQLite) and N local workerd processes, run FLOW with "
        "live progress, print a summary and stop everything. Exit 0 only if FLOW succeeded.",
    )
    p.add_argument("flow", metavar="FLOW.yaml", help="the workflow file")
    add_param_flags(p)
    p.add_argument(
        "--workers",
        type=whole_number(1),
        default=2,
        metavar="N",
        help="workerd processes (default 2)",
    )
    p.add_argument(
        "--slots",
        type=whole_number(1),
        metavar="N",
        help="slots per worker (default: workerd's, its CPU count)",
    )
    p.add_argument(
        "--handlers",
        action="extend",
        nargs="+",
        default=[],
        metavar="SPEC",
        help="handler modules each worker serves, passed on to workerd --handlers"
        " (e.g. examples.handlers:worker)",
    )
    p.add_argument(
        "--store",
        default=DEFAULT_STORE,
        metavar="URL",
        help=f"journal store (default {DEFAULT_STORE})",
    )
    p.add_argument(
        "--ui",
        nargs="?",
        const="127.0.0.1:0",
        metavar="HOST:PORT",
        help="also serve the web UI (docs/ui.md) on a loopback address (default: any free"
        " port on 127.0.0.1) and print its URL",
    )
    p.add_argument(
        "-o", "--output", choices=("table", "json"), default="table", help="output format"
    )
    p.set_defaults(func=cmd_run)


def _log_dir(store: str) -> Path:
    path = sqlite_path(store)
    return (path.parent if path is not None else Path(".plait")) / "logs"


def _configure_logging(log_dir: Path) -> None:
    # The coordinator runs in this process; its logs go to a file so the terminal stays readable.
    make_dir(log_dir, "logs (next to --store)")
    try:
        handler = logging.FileHandler(log_dir / "coordinator.log")
    except OSError as e:
        raise ConfigError(
            f"logs (next to --store): cannot write {log_dir}/coordinator.log: {e.strerror}"
        ) from None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


class _Signalled(KeyboardInterrupt):
    """SIGTERM or SIGHUP: stop as Ctrl-C does (cancel, take the cluster down)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _StopSignals:
    """SIGTERM and SIGHUP raise :class:`_Signalled` in the main thread, once; later ones, and
    Ctrl-C while the cluster is being stopped, are ignored, so the stop is never cut short and
    leaves no workerd behind."""

    SIGNALS = (signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: int | None = None
        self._stopping = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self._stopping or self.received is not None:
            return
        self.received = signum
        raise _Signalled(signum)

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    @contextlib.contextmanager
    def stopping(self) -> Iterator[None]:
        """Ignores these signals and Ctrl-C while the cluster stops."""
        self._stopping = True
        if not self._previous:  # not the main thread: no handlers of ours
            yield
            return
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def cmd_run(args: argparse.Namespace, clock: Clock | None = None) -> int:
    """``plait run``; returns the exit code."""
    clock = clock or SystemClock()
    spec = load_flow(args)
    log_dir = _log_dir(args.store)
    _configure_logging(log_dir)
    config = LocalClusterConfig(
        store=args.store,
        workers=args.workers,
        slots=args.slots,
        handlers=tuple(args.handlers),
        log_dir=log_dir,
        ui_listen=args.ui,
    )
    cluster = LocalCluster(config, clock)
    out = render.console()
    err = render.console(sys.stderr)
    with _StopSignals() as signals:
        try:
            try:
                target = cluster.start()
            except RuntimeError as exc:  # one line, the cause in it; details in the log file
                log.error("%s", exc, exc_info=exc.__cause__)
                print(f"plait: error: {render.clean(str(exc))}", file=sys.stderr)
                return EXIT_FAILED
            if cluster.ui_url is not None:
                print(f"web UI: {cluster.ui_url}", file=sys.stderr)
            # The embedded coordinator is plaintext on loopback, whatever PLAIT_TLS_* say.
            with Client(target, clock=clock, tls=False, token="") as client:
                submitted = client.submit(spec)
                progress = RunProgress(spec, submitted.workflow_id)
                interrupted = _follow(client, cluster, progress, args.output, clock)
                status = client.get(submitted.workflow_id)
        finally:
            with signals.stopping():
                cluster.stop()
    if args.output == "json":
        render.print_json(render.status_dict(status))
    else:
        exec_ids = frozenset(a.id for a in spec.actions if a.WhichOneof("kind") == "exec")
        out.print()
        out.print(render.actions_table(status.actions, progress.durations(), exec_ids=exec_ids))
        out.print()
        for line in render.workflow_header(status):
            out.print(Text(line))  # text, not markup: the lines hold other people's strings
        if status.state not in SUCCESS_STATES:
            err.print(Text(f"logs: {render.clean(str(log_dir))}/"))
    if signals.received is not None:
        return 128 + signals.received
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if status.state in SUCCESS_STATES else EXIT_FAILED


def _follow(
    client: Client, cluster: LocalCluster, progress: RunProgress, output: str, clock: Clock
) -> bool:
    """Follows events until the workflow ends; returns True if the user interrupted."""
    tty = sys.stdout.isatty() and output != "json"
    mode: FollowMode = "quiet" if output == "json" else "live" if tty else "lines"
    how = Follower(mode, clock, check=lambda: _check_cluster(cluster, progress))
    try:
        follow(client, progress, how)
    except KeyboardInterrupt as exc:
        why = f"{exc.args[0]} received" if isinstance(exc, _Signalled) else "interrupted"
        print(f"{why}: cancelling the workflow", file=sys.stderr)
        try:
            client.cancel(progress.workflow_id, reason=f"{why} (plait run)")
            # A moment for running attempts to be stopped, so the summary shows the end.
            with contextlib.suppress(TimeoutError):
                client.wait(progress.workflow_id, timeout=CANCEL_WAIT_S)
        except PlaitError as cancel_err:
            print(f"plait: could not cancel: {render.clean(str(cancel_err))}", file=sys.stderr)
        return True
    except PlaitError:
        # Leave nothing running in the store for the next `plait run` to pick up.
        with contextlib.suppress(PlaitError):
            client.cancel(progress.workflow_id, reason="plait run could not finish it")
        raise
    return False


def _check_cluster(cluster: LocalCluster, progress: RunProgress) -> None:
    """A run with every worker gone (or no coordinator) would wait forever: fail it instead."""
    if not cluster.coordinator_alive():
        raise PlaitError("the embedded coordinator stopped; see the logs")
    exited = cluster.exited_workers()
    if exited and len(exited) == len(cluster.workers):
        worker_id, code, path = exited[0]
        tail = _tail(path)
        raise PlaitError(
            f"every workerd exited (e.g. {worker_id} with code {code}); workflow"
            f" {progress.workflow_id} cannot finish. Last lines of {path}:\n{tail}"
        )


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
