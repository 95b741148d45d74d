"""Composition of a local cluster for ``plait run`` (CLI layer; the one exception to layering).

This is the only module of ``plait`` that reaches into ``plait.coordinator`` and starts
``plait.workerd``: everything else in ``plait`` speaks the protocol only. Both are imported
lazily, so ``plait submit`` and friends work where only the client is installed.

:class:`LocalCluster` runs a coordinator in this process (its own asyncio loop on a background
thread, bound to ``127.0.0.1:0``) and N ``workerd`` subprocesses pointed at it. Each workerd
gets its own process group, so a Ctrl-C at the terminal reaches ``plait run`` alone, which then
stops them in order: SIGTERM, a grace period, SIGKILL of the whole group.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from plait.clock import Clock, SystemClock
from plait.errors import ConfigError, PlaitError

__all__ = [
    "DEFAULT_STORE",
    "LocalCluster",
    "LocalClusterConfig",
    "make_dir",
    "run_coordinator_main",
    "run_workerd_main",
]

log = logging.getLogger(__name__)

DEFAULT_STORE = "sqlite:///.plait/plait.db"
_SQLITE = "sqlite:///"


class _Server(Protocol):
    """What ``plait.coordinator.server.CoordinatorServer`` offers the composition."""

    @property
    def port(self) -> int: ...

    async def start(self, *, leader_timeout: float | None = None) -> None: ...

    async def stop(self, grace: float | None) -> None: ...


def make_dir(path: Path, what: str) -> None:
    """Creates ``path`` (and its parents) or raises :class:`ConfigError` naming ``what``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{what}: cannot create directory {path}: {e.strerror or e}") from None


def sqlite_path(store: str) -> Path | None:
    """The file of a ``sqlite:///PATH`` store URL (``sqlite:////abs`` for absolute paths)."""
    if store.startswith(_SQLITE):
        return Path(store.removeprefix(_SQLITE))
    return None


@dataclass(frozen=True, slots=True)
class LocalClusterConfig:
    """How ``plait run`` lays out its cluster."""

    store: str = DEFAULT_STORE
    workers: int = 2
    slots: int | None = None
    handlers: tuple[str, ...] = ()
    log_dir: Path = Path(".plait/logs")
    metrics: bool = False
    ui_listen: str | None = None  # the web UI's HOST:PORT (plait run --ui), off when None
    start_timeout_s: float = 30.0
    stop_grace_s: float = 5.0
    coordinator_grace_s: float = 2.0
    worker_env: dict[str, str] = field(default_factory=dict)

    def worker_argv(self, port: int, index: int) -> list[str]:
        """The command line of worker ``local-{index}``."""
        argv = [sys.executable, "-m", "plait.workerd", "--coordinator", f"127.0.0.1:{port}"]
        argv += ["--id", f"local-{index}"]
        # Local development: the actions run as the user, like the embedded coordinator (their
        # own processes); each cluster keeps its attempt directories next to its logs.
        argv += ["--allow-root", "--tmp-root", str(self.log_dir.parent / "tmp" / f"local-{index}")]
        if self.slots is not None:
            argv += ["--slots", str(self.slots)]
        for spec in self.handlers:
            argv += ["--handlers", spec]  # workerd's flag takes one SPEC and repeats
        return argv


@dataclass(slots=True)
class _Worker:
    worker_id: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]


class LocalCluster:
    """An in-process coordinator plus workerd subprocesses, for one ``plait run``."""

    def __init__(self, config: LocalClusterConfig, clock: Clock | None = None) -> None:
        self.config = config
        self._clock = clock or SystemClock()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._start_error: BaseException | None = None
        self._port = 0
        self.ui_url: str | None = None  # the web UI's URL once started with ui_listen
        self.workers: list[_Worker] = []

    @property
    def target(self) -> str:
        """``host:port`` of the coordinator."""
        return f"127.0.0.1:{self._port}"

    # -- start ----------------------------------------------------------------------------

    def start(self) -> str:
        """Starts the coordinator, then the workers; returns the coordinator's target.

        Raises:
            RuntimeError: the coordinator did not come up (its error is chained).
        """
        path = sqlite_path(self.config.store)
        if path is not None and path.parent != Path():
            make_dir(path.parent, "--store")
        make_dir(self.config.log_dir, "logs (next to --store)")
        self._thread = threading.Thread(target=self._serve, name="plait-coordinator", daemon=True)
        self._thread.start()
        if not self._ready.wait(self.config.start_timeout_s):
            raise RuntimeError(
                f"the coordinator did not start within {self.config.start_timeout_s:g}s"
            )
        if isinstance(self._start_error, PlaitError):
            raise self._start_error  # e.g. ConfigError: an unsafe configuration (exit 2)
        if self._start_error is not None:
            err = self._start_error
            why = str(err) or type(err).__name__
            raise RuntimeError(f"the embedded coordinator could not start: {why}") from err
        for i in range(self.config.workers):
            self._spawn_worker(i)
        return self.target

    def _spawn_worker(self, index: int) -> None:
        worker_id = f"local-{index}"
        log_path = self.config.log_dir / f"workerd-{worker_id}.log"
        log_file = log_path.open("wb")
        # Local workers talk to the embedded plaintext coordinator: a shell's TLS settings and
        # token are for a remote cluster, not for this one.
        inherited = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("PLAIT_TLS_") and k not in {"PLAIT_TOKEN", "PLAIT_COORDINATOR"}
        }
        env = {**inherited, "PYTHONUNBUFFERED": "1", **self.config.worker_env}
        process = subprocess.Popen(
            self.config.worker_argv(self._port, index),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            process_group=0,
        )
        log.info("started workerd %s (pid %d), log %s", worker_id, process.pid, log_path)
        self.workers.append(_Worker(worker_id, process, log_path, log_file))

    def _serve(self) -> None:
        try:
            asyncio.run(self._serve_async())
        except BaseException as exc:  # reported to start(); the thread must not die silently
            if not self._ready.is_set():
                self._start_error = exc
                self._ready.set()
            else:
                log.exception("the coordinator stopped with an error")

    async def _serve_async(self) -> None:
        config_mod = importlib.import_module("plait.coordinator.config")
        server_mod = importlib.import_module("plait.coordinator.server")
        config = config_mod.CoordinatorConfig(
            listen="127.0.0.1:0",
            store=self.config.store,
            metrics_listen="127.0.0.1:0" if self.config.metrics else None,
            ui_listen=self.config.ui_listen,
        )
        server: _Server = server_mod.CoordinatorServer(config)
        # The journal file is locked by whichever coordinator uses it: don't wait forever.
        await server.start(leader_timeout=5.0)
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._port = server.port
        ui = getattr(server, "ui", None)
        self.ui_url = ui.url if ui is not None else None
        self._ready.set()
        try:
            await self._stop_event.wait()
        finally:
            await server.stop(self.config.coordinator_grace_s)

    # -- health ---------------------------------------------------------------------------

    def exited_workers(self) -> list[tuple[str, int, Path]]:
        """``(worker_id, exit code, log path)`` of every workerd that has exited."""
        out = []
        for w in self.workers:
            code = w.process.poll()
            if code is not None:
                out.append((w.worker_id, code, w.log_path))
        return out

    def coordinator_alive(self) -> bool:
        """Whether the coordinator thread is still serving."""
        return self._thread is not None and self._thread.is_alive()

    # -- stop -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Stops the workers (SIGTERM, grace, SIGKILL of the group), then the coordinator."""
        self._stop_workers()
        if self._loop is not None and self._stop_event is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed
                self._loop.call_soon_threadsafe(self._stop_event.set)
        if self._thread is not None:
            self._thread.join(self.config.coordinator_grace_s + 10)
            if self._thread.is_alive():
                log.warning("the coordinator thread did not stop in time")

    def _stop_workers(self) -> None:
        for w in self.workers:
            if w.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    w.process.send_signal(signal.SIGTERM)
        deadline = self._clock.monotonic() + self.config.stop_grace_s
        for w in self.workers:
            remaining = max(0.0, deadline - self._clock.monotonic())
            try:
                w.process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                log.warning("workerd %s ignored SIGTERM; killing its process group", w.worker_id)
            # The group goes too: a workerd's actions must not outlive it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(w.process.pid, signal.SIGKILL)
            w.process.wait()
            w.log_file.close()

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _delegate(module: str, argv: Sequence[str]) -> int:
    try:
        mod: Any = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module.startswith(exc.name):
            print(f"plait: {module} is not installed ({exc})", file=sys.stderr)
            return 2
        raise
    rc = mod.main(list(argv))
    return rc if isinstance(rc, int) else 0


def run_coordinator_main(argv: Sequence[str]) -> int:
    """``plait coordinator ...``: the coordinator daemon's own command line."""
    return _delegate("plait.coordinator.main", argv)


def run_workerd_main(argv: Sequence[str]) -> int:
    """``plait workerd ...``: the worker daemon's own command line."""
    return _delegate("plait.workerd.main", argv)
