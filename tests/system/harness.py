"""A real Plait cluster on one machine: coordinator and workerd as subprocesses.

Used by the system tests (through the ``cluster`` fixture) and by ``tests.bench``; it does not
depend on pytest. Everything goes through the public surfaces: the daemons' command lines, the
ready file, gRPC (raw generated stubs, so the harness does not depend on the SDK's shape) and
the ``/metrics`` text.

Teardown (:meth:`Cluster.close`) stops every process it started and then raises if any of them,
or any descendant (an exec action, its children), is still alive: descendants are found by
walking ``PPid`` in /proc (the test process is a child subreaper, so orphans stay reachable) and
by the process groups recorded while the cluster ran.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
from prometheus_client.parser import text_string_to_metric_families

from plait.v1 import admin_service_pb2 as admin_pb
from plait.v1 import admin_service_pb2_grpc as admin_grpc
from plait.v1 import workflow_pb2 as wf
from plait.v1 import workflow_service_pb2 as ws
from plait.v1 import workflow_service_pb2_grpc as ws_grpc
from tests import procs

# The spec builders live in tests.system.specs; tests import them from here too.
from tests.system.specs import (  # noqa: F401
    ACTION_PRELUDE,
    command_action,
    handler_action,
    python_action,
    workflow,
)

ROOT = Path(__file__).resolve().parents[2]
TERMINAL_WORKFLOW = frozenset(
    {
        wf.WORKFLOW_STATE_SUCCEEDED,
        wf.WORKFLOW_STATE_PARTIALLY_SUCCEEDED,
        wf.WORKFLOW_STATE_FAILED,
        wf.WORKFLOW_STATE_CANCELLED,
    }
)
# A process must be gone this long after teardown signalled it: kill grace (250 ms) + 1 s (I9).
EXIT_DEADLINE_S = 1.25
START_TIMEOUT_S = 30.0
# Flags the system tests run the coordinator with (RELIABILITY.md "test profile").
TEST_PROFILE = {
    "--heartbeat-interval": "250ms",
    "--lease-ttl": "2s",
    "--kill-grace": "250ms",
}
T = TypeVar("T")


class HarnessError(AssertionError):
    """The cluster did something the harness did not expect (it failed to start, leaked...)."""


def wait_for(
    what: str, probe: Callable[[], T | None], timeout: float = 20.0, interval: float = 0.05
) -> T:
    """Polls ``probe`` until it returns something truthy; raises naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise HarnessError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def describe(status: wf.WorkflowStatus) -> str:
    """A workflow's state and every action that did not succeed, for assertion messages."""
    lines = [f"{status.workflow_id} {wf.WorkflowState.Name(status.state)}: {status.reason}"]
    for a in status.actions:
        if a.state != wf.ACTION_STATE_SUCCEEDED:
            lines.append(
                f"  {a.action_id} {wf.ActionState.Name(a.state)} attempt={a.attempt}"
                f" token={a.fencing_token} worker={a.worker_id} exit={a.exit_code}"
                f" losses={a.lease_losses} error={a.error.message!r} reason={a.reason!r}"
            )
    return "\n".join(lines)


def coordinator_argv(
    *, store: str, ready_file: Path, overrides: Mapping[str, str | None] | None = None
) -> list[str]:
    """The coordinator's command line; ``overrides`` replace (or, with None, drop) flags."""
    flags: dict[str, str | None] = {
        "--listen": "127.0.0.1:0",
        "--store": store,
        "--metrics-listen": "127.0.0.1:0",
        **TEST_PROFILE,
        "--ready-file": str(ready_file),
    }
    flags.update(overrides or {})
    argv = [sys.executable, "-m", "plait.coordinator"]
    for flag, value in flags.items():
        if value is not None:
            argv += [flag, value]
    return argv


def daemon_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The daemons' environment: ours, the repo root importable, plus ``extra``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@dataclass
class Daemon:
    """One process the cluster started (coordinator or workerd)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was never started"
        return self.popen.pid

    def start(self) -> None:
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start #{self.starts}: {' '.join(self.argv)}\n".encode())
            log.flush()
            # Own session: a signal meant for the test runner's terminal does not reach it, and
            # signalling the daemon's pid never reaches its children by accident.
            self.popen = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        procs.MANAGED.add(self.popen.pid)

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def send(self, sig: int) -> None:
        """Signals the daemon's pid (not its process group) while it runs."""
        assert self.popen is not None
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        """Waits for exit; returns the exit code, or None when still running."""
        assert self.popen is not None
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        procs.MANAGED.discard(self.popen.pid)
        return code

    def stop(self) -> None:
        """TERM (after CONT, in case it was paused), then KILL when it lingers."""
        if self.popen is None or self.popen.poll() is not None:
            if self.popen is not None:
                procs.MANAGED.discard(self.popen.pid)
            return
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(signal.SIGCONT)
            self.popen.send_signal(signal.SIGTERM)
        if self.wait(5.0) is None:
            self.popen.kill()
            self.wait(5.0)

    def log_tail(self, limit: int = 20_000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "<no log>"
        return text if len(text) <= limit else "...\n" + text[-limit:]


@dataclass
class Endpoints:
    """What the coordinator wrote to its ready file."""

    grpc: str
    metrics: str
    pid: int


@dataclass
class Cluster:
    """A coordinator and any number of workerd processes under one temp dir."""

    tmp: Path
    coordinator_overrides: dict[str, str | None] = field(default_factory=dict)
    daemons: dict[str, Daemon] = field(default_factory=dict)
    endpoints: Endpoints | None = None
    _channel: grpc.Channel | None = None
    _pgids: set[int] = field(default_factory=set)
    _before: set[tuple[int, int]] = field(default_factory=set)
    _watch_stop: threading.Event = field(default_factory=threading.Event)
    _watcher: threading.Thread | None = None
    _closed: bool = False

    def __post_init__(self) -> None:
        self._before = {p.key for p in procs.descendants(os.getpid()) if p.alive}

    # ----- processes -------------------------------------------------------------------

    @property
    def store(self) -> str:
        return f"sqlite:///{self.tmp}/plait.db"

    @property
    def ready_file(self) -> Path:
        return self.tmp / "coordinator.ready.json"

    def start_coordinator(self, **overrides: str | None) -> Endpoints:
        """Starts the coordinator and waits for its ready file. Overrides use flag names
        without dashes, underscores for dashes: ``max_actions="100"``."""
        flags = {**self.coordinator_overrides}
        flags.update({"--" + k.replace("_", "-"): v for k, v in overrides.items()})
        self.coordinator_overrides = flags
        self.ready_file.unlink(missing_ok=True)
        argv = coordinator_argv(store=self.store, ready_file=self.ready_file, overrides=flags)
        daemon = Daemon("coordinator", argv, daemon_env(), self.tmp / "coordinator.log")
        self.daemons["coordinator"] = daemon
        daemon.start()
        self._start_watcher()
        return self._await_ready(daemon)

    def _await_ready(self, daemon: Daemon) -> Endpoints:
        def probe() -> Endpoints | None:
            if not daemon.running():
                raise HarnessError(
                    f"coordinator exited with {daemon.popen and daemon.popen.returncode}"
                    f" before it was ready:\n{daemon.log_tail()}"
                )
            try:
                data = json.loads(self.ready_file.read_text())
            except (OSError, ValueError):
                return None
            if data.get("role", "leader") != "leader":
                return None  # serving as a standby: not ready for work yet
            return Endpoints(grpc=data["grpc"], metrics=data["metrics"], pid=int(data["pid"]))

        self.endpoints = wait_for("the coordinator's ready file", probe, START_TIMEOUT_S)
        if self.endpoints.pid != daemon.pid:
            raise HarnessError(f"ready file pid {self.endpoints.pid} is not {daemon.pid}")
        self._reset_channel()
        return self.endpoints

    def add_worker(
        self,
        name: str,
        *,
        slots: int = 4,
        labels: Mapping[str, str] | None = None,
        handlers: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        wait: bool = True,
        allow_root: bool = True,
        tmp_root: str | Path | None = None,
    ) -> Daemon:
        """Starts a workerd connected to the coordinator; by default waits until it is listed.

        The tests run as root, so workerd gets ``--allow-root`` (unless ``allow_root=False``,
        e.g. with ``--run-as`` in ``extra_args``), and a tmp root of its own under the
        cluster's directory (or ``tmp_root``), so that concurrent clusters never share one.
        """
        argv = [
            sys.executable,
            "-m",
            "plait.workerd",
            "--coordinator",
            self.grpc_target,
            "--id",
            name,
            "--slots",
            str(slots),
            "--reconnect-backoff",
            "50ms:1s",
            "--tmp-root",
            str(tmp_root if tmp_root is not None else self.tmp / f"{name}.attempts"),
        ]
        if allow_root:
            argv.append("--allow-root")
        for key, value in (labels or {}).items():
            argv += ["--label", f"{key}={value}"]
        for handler in handlers:
            argv += ["--handlers", handler]
        argv += list(extra_args)
        return self.start_daemon(name, argv, env, wait=wait)

    def start_daemon(
        self, name: str, argv: Sequence[str], env: Mapping[str, str] | None, *, wait: bool
    ) -> Daemon:
        """Starts a worker process (any implementation) that the cluster stops, and checks for
        leftovers, on close; with ``wait``, until ListWorkers shows it."""
        daemon = Daemon(name, list(argv), daemon_env(env), self.tmp / f"{name}.log")
        self.daemons[name] = daemon
        daemon.start()
        if wait:
            self.wait_workers([name])
        return daemon

    def wait_workers(self, names: Iterable[str], timeout: float = START_TIMEOUT_S) -> None:
        """Waits until every named worker is connected (ListWorkers)."""
        wanted = set(names)

        def probe() -> bool:
            for name in wanted:
                daemon = self.daemons.get(name)
                if daemon is not None and not daemon.running():
                    raise HarnessError(f"{name} exited early:\n{daemon.log_tail()}")
            return wanted <= self.connected_workers()

        wait_for(f"workers {sorted(wanted)} to connect", probe, timeout, interval=0.1)

    def wait_heard(self, name: str, timeout: float = 30.0) -> None:
        """Waits until worker ``name`` is connected and has proved it hears the coordinator
        (its heartbeat echoed an ack: ``WorkerInfo.heard_ago``). Its stream's earlier messages,
        results re-sent after a reconnect included, have been handled by then."""

        def probe() -> bool:
            reply = self.admin.ListWorkers(admin_pb.ListWorkersRequest(), timeout=5)
            return any(w.worker_id == name and w.HasField("heard_ago") for w in reply.workers)

        wait_for(f"{name} to be connected and heard", probe, timeout)

    def connected_workers(self) -> set[str]:
        try:
            reply = self.admin.ListWorkers(admin_pb.ListWorkersRequest(), timeout=5)
        except grpc.RpcError:
            return set()
        return {w.worker_id for w in reply.workers}

    def daemon(self, name: str) -> Daemon:
        return self.daemons[name]

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Sends ``sig`` to the daemon's pid only (never its children: they must follow)."""
        self._record_groups()
        daemon = self.daemons[name]
        daemon.send(sig)
        if sig == signal.SIGKILL:
            daemon.wait(10.0)

    def stop(self, name: str) -> None:
        """Pauses the daemon (SIGSTOP), as a long GC pause would."""
        self.kill(name, signal.SIGSTOP)

    def cont(self, name: str) -> None:
        """Resumes a paused daemon (SIGCONT)."""
        self.kill(name, signal.SIGCONT)

    def restart(self, name: str) -> None:
        """Kills the daemon if running and starts it again with the same command line.

        The coordinator comes back on the same ports, so workers can find it again.
        """
        daemon = self.daemons[name]
        if daemon.running():
            self.kill(name, signal.SIGKILL)
        if name == "coordinator":
            assert self.endpoints is not None
            self.coordinator_overrides["--listen"] = self.endpoints.grpc
            self.coordinator_overrides["--metrics-listen"] = self.endpoints.metrics
            self.ready_file.unlink(missing_ok=True)
            daemon.argv = coordinator_argv(
                store=self.store, ready_file=self.ready_file, overrides=self.coordinator_overrides
            )
            daemon.start()
            self._await_ready(daemon)
        else:
            daemon.start()

    # ----- gRPC ---------------------------------------------------------------------------

    @property
    def grpc_target(self) -> str:
        if self.endpoints is None:
            raise HarnessError("the coordinator is not started")
        return self.endpoints.grpc

    def _reset_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = grpc.insecure_channel(
            self.grpc_target,
            options=[("grpc.max_send_message_length", 64 * 1024 * 1024)],
        )

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._reset_channel()
        assert self._channel is not None
        return self._channel

    @property
    def workflows(self) -> ws_grpc.WorkflowServiceStub:
        return ws_grpc.WorkflowServiceStub(self.channel)

    @property
    def admin(self) -> admin_grpc.AdminServiceStub:
        return admin_grpc.AdminServiceStub(self.channel)

    def submit(self, spec: wf.WorkflowSpec, idempotency_key: str = "") -> str:
        reply = self.workflows.SubmitWorkflow(
            ws.SubmitWorkflowRequest(spec=spec, idempotency_key=idempotency_key), timeout=30
        )
        return str(reply.workflow_id)

    def get(self, workflow_id: str) -> wf.WorkflowStatus:
        reply = self.workflows.GetWorkflow(
            ws.GetWorkflowRequest(workflow_id=workflow_id), timeout=10
        )
        return reply.workflow

    def list_workflows(self) -> list[wf.WorkflowStatus]:
        reply = self.workflows.ListWorkflows(ws.ListWorkflowsRequest(page_size=1000), timeout=10)
        return list(reply.workflows)

    def cancel(self, workflow_id: str, reason: str = "test") -> int:
        reply = self.workflows.CancelWorkflow(
            ws.CancelWorkflowRequest(workflow_id=workflow_id, reason=reason), timeout=10
        )
        return int(reply.state)

    def wait_workflow(self, workflow_id: str, timeout: float = 60.0) -> wf.WorkflowStatus:
        """Polls GetWorkflow until the workflow is terminal; returns its final status."""

        def probe() -> wf.WorkflowStatus | None:
            status = self.get(workflow_id)
            return status if status.state in TERMINAL_WORKFLOW else None

        try:
            return wait_for(f"workflow {workflow_id} to finish", probe, timeout, interval=0.1)
        except HarnessError as err:
            status = self.get(workflow_id)
            raise HarnessError(f"{err}; {describe(status)}") from None

    def history(self, workflow_id: str) -> list[wf.HistoryEvent]:
        """The workflow's whole journal so far, in journal order (WatchWorkflow, no follow)."""
        stream = self.workflows.WatchWorkflow(
            ws.WatchWorkflowRequest(workflow_id=workflow_id, follow=False), timeout=30
        )
        return [event for reply in stream for event in reply.events]

    def wait_event(
        self,
        workflow_id: str,
        predicate: Callable[[wf.HistoryEvent], bool],
        what: str,
        timeout: float = 20.0,
    ) -> wf.HistoryEvent:
        """Polls the history until an event matches ``predicate``; returns the first match."""

        def probe() -> wf.HistoryEvent | None:
            return next((e for e in self.history(workflow_id) if predicate(e)), None)

        return wait_for(what, probe, timeout, interval=0.1)

    # ----- metrics ------------------------------------------------------------------------

    def metrics(self) -> str:
        """The coordinator's /metrics text, as Prometheus would scrape it."""
        assert self.endpoints is not None
        with urllib.request.urlopen(f"http://{self.endpoints.metrics}/metrics", timeout=10) as r:
            return str(r.read().decode())

    def metric(self, sample: str, **labels: str) -> float:
        """Sum of the samples named ``sample`` whose labels include ``labels`` (0 if none)."""
        total = 0.0
        for family in text_string_to_metric_families(self.metrics()):
            for s in family.samples:
                if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    # ----- leak checks and teardown -------------------------------------------------------

    def _start_watcher(self) -> None:
        if self._watcher is None:
            self._watcher = threading.Thread(
                target=self._watch, name="cluster-proc-watch", daemon=True
            )
            self._watcher.start()

    def _watch(self) -> None:
        while not self._watch_stop.wait(0.2):
            self._record_groups()

    def _record_groups(self) -> None:
        """Remembers the process groups of everything started since the cluster was made."""
        own = {os.getpgrp(), 0}
        for proc in procs.descendants(os.getpid()):
            if proc.alive and proc.key not in self._before and proc.pgid not in own:
                self._pgids.add(proc.pgid)

    def _leftovers(self) -> list[procs.Proc]:
        """Live processes started since the cluster was made: descendants (orphans included,
        thanks to the subreaper) and members of any process group recorded on the way."""
        snap = procs.snapshot()
        found = {
            p.key: p
            for p in procs.descendants(os.getpid(), snap)
            if p.alive and p.key not in self._before
        }
        for proc in procs.in_groups(self._pgids, snap):
            found.setdefault(proc.key, proc)
        return list(found.values())

    def log_sections(self) -> list[tuple[str, str]]:
        """(title, text) for every daemon's captured output, for failure reports."""
        return [(f"{d.name} log", d.log_tail()) for d in self.daemons.values()]

    def close(self) -> None:
        """Stops everything; raises :class:`HarnessError` naming any process left behind."""
        if self._closed:
            return
        self._closed = True
        self._record_groups()
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join(5)
        if self._channel is not None:
            self._channel.close()
        # Workers first, so they can tell their actions to stop while the coordinator is up.
        for daemon in sorted(self.daemons.values(), key=lambda d: d.name == "coordinator"):
            daemon.stop()
        deadline = time.monotonic() + EXIT_DEADLINE_S
        leftovers = self._leftovers()
        while leftovers and time.monotonic() < deadline:
            time.sleep(0.05)
            leftovers = self._leftovers()
        lines = "\n  ".join(p.describe() for p in leftovers)
        procs.kill_procs(leftovers)
        procs.reap_adopted_zombies()
        if leftovers:
            raise HarnessError(
                f"{len(leftovers)} process(es) outlived the cluster (now killed):\n  {lines}"
            )
