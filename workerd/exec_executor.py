"""The exec executor: runs ``ActionSpec.exec`` commands as sandboxed processes (workerd layer).

Per attempt: a fresh directory under the private tmp root (``HOME``/``TMPDIR`` and the working
directory; owned by the attempt's user; removed afterwards), a scrubbed environment
(:mod:`plait.workerd.sandbox`), its own process group registered with the keeper, its
confinement (run-as user, rlimits, cgroup: :mod:`plait.workerd.confinement`), inputs on stdin,
in ``$PLAIT_INPUTS`` (up to 64 KiB) and in ``$PLAIT_INPUTS_FILE``, outputs read (off the event
loop, without trusting the file: :mod:`plait.workerd.outputs`) from the JSON object written to
``$PLAIT_OUTPUT``, and bounded stdout/stderr tails read continuously (also handed to the
session as they are read, secrets redacted, for live logs:
:class:`~plait.workerd.attempt_process.LiveSink`).
Cancelling (CancelLease, self-fencing, the local run timeout) sends SIGTERM to the attempt and
SIGKILL after the kill grace. When the attempt's main process exits, anything it left is
killed: its group, its cgroup, or its run-as uid's processes.

The session's fence deadline (:meth:`ExecExecutor.fence_deadline`, moved on every acknowledged
heartbeat) arms the keeper at ``deadline - margin``, the moment the session's own SIGKILL would
land: if workerd is frozen past it, the keeper kills the attempts in its place
(:mod:`plait.workerd.keeper`), and they report ``CANCELLED`` once workerd runs again.

Processes are started by the spawner (:mod:`plait.workerd.spawner`, one fork and one exec per
attempt, from a single-threaded process workerd starts once), or, when it is unavailable, with
asyncio's subprocess machinery through the sandbox's exec chain (``setpriv``, ``prlimit``,
``/bin/sh``): :mod:`plait.workerd.attempt_process`. Never Python forked from workerd itself.

Results carry no ``error_type`` (docs/protocol.md, "Results and acks"): a process that exits
non-zero has no exception type, and workerd's own failures are already told apart by what a
retry policy matches: the exit code (127 no such program, 126 it cannot be started) or the
google.rpc code name (``FAILED_PRECONDITION``: a secret or rlimit this worker does not grant;
``INVALID_ARGUMENT``: argv templates or outputs; ``INTERNAL``: workerd's own fault).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import sys
import tempfile
import warnings
from typing import Any

from plait.clock import Clock, SystemClock
from plait.durations import format_duration
from plait.durations import from_proto as duration_from_proto
from plait.logs import bind_log_fields
from plait.v1 import worker_service_pb2 as pb
from plait.worker.executor import (
    CANCELLED,
    FAILED,
    MAX_OUTPUT_BYTES,
    SUCCEEDED,
    TIMED_OUT,
    AttemptContext,
    AttemptResult,
    Code,
    attempt_output,
    attempt_trace,
)
from plait.worker.handlers import attempt_log_fields, parse_inputs, parse_item
from plait.workerd.attempt_process import (
    AttemptProcess,
    LiveSink,
    SpawnedProcess,
    Tails,
    exit_message,
    start_chain,
    start_spawned,
)
from plait.workerd.confinement import Confinement, Sandbox
from plait.workerd.containment import remove_tree
from plait.workerd.keeper import Keeper
from plait.workerd.outputs import output_exists, read_outputs
from plait.workerd.sandbox import (
    INPUTS_FILE_NAME,
    NO_ITEM,
    OUTPUT_FILE_NAME,
    TemplateError,
    build_env,
    env_without_nul,
    expand_argv,
    find_setpriv,
    resolve_program,
)
from plait.workerd.secrets import Redactor, SecretError, SecretStore
from plait.workerd.spawn_client import Spawner, SpawnError

log = logging.getLogger(__name__)

DEFAULT_TAIL_BYTES = 64 * 1024
DEFAULT_INPUTS_ENV_LIMIT = 64 * 1024
_watcher_installed = False


def install_child_watcher() -> None:
    """On Python 3.11, use asyncio's pidfd child watcher (3.12's default) when the kernel has it.

    The 3.11 default starts one thread per child process to wait for it; pidfds cost nothing.
    Call it before ``asyncio.run`` in the main thread: 3.11's pidfd watcher serves one loop,
    which ``asyncio.run`` attaches.
    """
    global _watcher_installed
    if _watcher_installed or sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        asyncio.set_child_watcher(asyncio.PidfdChildWatcher())
    _watcher_installed = True


__all__ = ["ExecExecutor", "exit_message", "install_child_watcher"]


class ExecExecutor:
    """Runs exec leases; one instance per workerd (see the module docstring).

    Attempts start through ``sandbox.spawner``; when the sandbox has none (and ``spawn``), the
    executor starts its own at the first attempt and stops it in :meth:`aclose`. ``spawn=False``
    starts every attempt through the exec chain.
    """

    runs_exec = True
    handlers: frozenset[str] = frozenset()

    def __init__(
        self,
        *,
        keeper: Keeper | None = None,
        tail_bytes: int = DEFAULT_TAIL_BYTES,
        max_output_bytes: int = MAX_OUTPUT_BYTES,
        inputs_env_limit: int = DEFAULT_INPUTS_ENV_LIMIT,
        tmp_root: str | None = None,
        path: str | None = None,
        cwd: str | None = None,
        pipe_drain_timeout: float = 1.0,
        pdeathsig: bool = True,
        secrets: SecretStore | None = None,
        sandbox: Sandbox | None = None,
        clock: Clock | None = None,
        spawn: bool = True,
    ) -> None:
        self.clock = clock if clock is not None else SystemClock()
        self.fenced_at = math.inf
        """Monotonic time the keeper kills every attempt at unless the fence moves (inf: never)."""
        self._fence_passed = -math.inf  # the latest keeper deadline that passed before it moved
        self.keeper = keeper if keeper is not None else sandbox.keeper if sandbox else None
        self.secrets = secrets if secrets is not None else SecretStore()
        self.tail_bytes = tail_bytes
        self.max_output_bytes = max_output_bytes
        self.inputs_env_limit = inputs_env_limit
        self.tmp_root = tmp_root
        self.path = path if path is not None else os.environ.get("PATH", os.defpath)
        self.cwd = cwd
        self.pipe_drain_timeout = pipe_drain_timeout
        if sandbox is None:
            setpriv = find_setpriv(self.path) if pdeathsig else None
            if pdeathsig and setpriv is None and not spawn:
                log.warning(
                    "setpriv (util-linux) not found: actions run without PR_SET_PDEATHSIG;"
                    " the keeper still kills them if workerd dies"
                )
            sandbox = Sandbox(keeper=self.keeper, setpriv=setpriv)
        self.sandbox = sandbox
        self.pdeathsig = pdeathsig
        self._own_spawner = spawn and sandbox.spawner is None
        if self._own_spawner:
            sandbox.spawner = Spawner()
        self._running: dict[str, _ExecAttempt] = {}

    @property
    def spawner(self) -> Spawner | None:
        """The spawner attempts start through, while it is available (else the exec chain)."""
        spawner = self.sandbox.spawner
        return spawner if spawner is not None and spawner.available else None

    @property
    def running(self) -> list[str]:
        """Lease ids of attempts not yet reported."""
        return list(self._running)

    def start(self, lease: pb.Lease, ctx: AttemptContext) -> _ExecAttempt:
        attempt = _ExecAttempt(self, lease, ctx)
        self._running[lease.lease_id] = attempt
        attempt.task = asyncio.get_running_loop().create_task(attempt.run())
        return attempt

    def fence_deadline(self, deadline: float, margin: float) -> None:
        """Arms the keeper to SIGKILL every attempt at ``deadline - margin`` (FenceAware).

        Not at ``deadline``: ``deadline - margin`` is when the session's own SIGKILL (after TERM
        and the kill grace) lands, so the keeper never kills earlier than the session would, and
        the attempts are dead before the coordinator can give their leases away (it may at
        ``deadline`` at the earliest), with ``margin`` (a heartbeat interval) left for the
        keeper to wake. A running workerd's next ack moves it on about TTL - margin - heartbeat
        before it is reached (3 heartbeat intervals at least, with lease_ttl >= 5 heartbeats).
        """
        if self.fenced_at <= self.clock.monotonic():
            # Late acks after a stall: the keeper may have fired at the old deadline already.
            self._fence_passed = self.fenced_at
        self.fenced_at = deadline - margin
        if self.keeper is not None:
            self.keeper.fence(self.fenced_at)

    def fence_fired_since(self, since: float) -> bool:
        """Whether a keeper deadline passed at or after monotonic time ``since``."""
        if self.keeper is None:
            return False
        passed = self.fenced_at if self.fenced_at <= self.clock.monotonic() else self._fence_passed
        return passed >= since

    def cancel(self, lease_id: str, reason: str) -> None:
        attempt = self._running.get(lease_id)
        if attempt is not None:
            attempt.cancel(reason)

    async def aclose(self) -> None:
        attempts = list(self._running.values())
        for attempt in attempts:
            attempt.cancel("worker exiting")
        tasks = [a.task for a in attempts if a.task is not None]
        if tasks:
            grace = max(a.ctx.kill_grace for a in attempts)
            await asyncio.wait(tasks, timeout=grace + self.pipe_drain_timeout + 2.0)
        if self._own_spawner and self.sandbox.spawner is not None:
            self.sandbox.spawner.close()


class _ExecAttempt:
    """One exec attempt; also the handle the session cancels through."""

    def __init__(self, executor: ExecExecutor, lease: pb.Lease, ctx: AttemptContext) -> None:
        self.ex = executor
        self.lease = lease
        self.ctx = ctx
        self.task: asyncio.Task[None] | None = None
        self.pgid = 0
        self.registered_at = math.inf  # when the keeper got its group (monotonic)
        self.exited = False
        self.kill_outcome: pb.ActionOutcome.ValueType | None = None
        self.kill_reason = ""
        self.tmpdir = ""
        self.confinement: Confinement | None = None
        self.limits: dict[int, int] = {}
        self._timers: list[asyncio.TimerHandle] = []
        self.redactor: Redactor | None = None  # set once the lease's secrets are resolved

    @property
    def cwd(self) -> str:
        """The command's working directory: the executor's ``cwd`` if set, else the temp dir."""
        return self.ex.cwd if self.ex.cwd is not None else self.tmpdir

    def cancel(self, reason: str) -> None:
        self.kill(CANCELLED, reason)

    def kill(self, outcome: pb.ActionOutcome.ValueType, reason: str) -> None:
        """TERM the group now, KILL it after the kill grace; the attempt reports ``outcome``."""
        if self.kill_outcome is not None or self.exited:
            return
        self.kill_outcome, self.kill_reason = outcome, reason
        if self.pgid:
            self._begin_kill()

    def _begin_kill(self) -> None:
        log.debug(
            "lease %s: SIGTERM to group %d (%s)", self.lease.lease_id, self.pgid, self.kill_reason
        )
        self._signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        self._timers.append(loop.call_later(self.ctx.kill_grace, self._signal, signal.SIGKILL))

    def _signal(self, sig: signal.Signals) -> None:
        if self.confinement is not None:
            self.confinement.signal(sig)

    async def run(self) -> None:
        # This task's log lines name the attempt (and its trace).
        bind_log_fields(**attempt_log_fields(self.lease, attempt_trace(self.ctx)))
        try:
            result = await self._execute()
        except Exception as err:
            log.exception("lease %s: workerd failed to run the attempt", self.lease.lease_id)
            result = AttemptResult.failed(
                f"workerd could not run the attempt: {err}", code=Code.INTERNAL
            )
        finally:
            for timer in self._timers:
                timer.cancel()
            await self._clean_up()
            self.ex._running.pop(self.lease.lease_id, None)
        self.ctx.report(self._redacted(result))

    async def _clean_up(self) -> None:
        """Kills what the attempt left, gives its identity back, removes its directory."""
        if self.confinement is not None:
            await self.confinement.end()
        keeper = self.ex.keeper
        if self.tmpdir:
            # In a thread: an action may leave a million files behind, and even an rmdir may
            # wait on the file system's journal.
            if await asyncio.to_thread(remove_tree, self.tmpdir):
                if keeper is not None:
                    keeper.unregister_dir(self.tmpdir)
            else:
                log.warning("could not remove the attempt directory %s", self.tmpdir)
        if keeper is not None:
            keeper.flush()  # its group, cgroup and directory are gone: one write says so

    async def _resolve_secrets(self) -> dict[str, str] | AttemptResult:
        """The lease's secrets as environment entries (plait.workerd.secrets), or the failure."""
        if not self.lease.action.secrets:
            return {}
        try:
            env, self.redactor = await self.ex.secrets.resolve(self.lease.action.secrets)
        except SecretError as err:
            return AttemptResult.failed(err.message, code=err.code)
        return env

    def _redacted(self, result: AttemptResult) -> AttemptResult:
        """``result`` with every secret value replaced by ``[redacted:NAME]`` (see secrets.py)."""
        if self.redactor is None:
            return result
        return self.redactor.result(result, self.ex.tail_bytes)

    def _live_sink(self) -> LiveSink | None:
        """Where the attempt's output goes as it is read (live logs), secrets redacted."""
        output = attempt_output(self.ctx)
        if output is None:
            return None
        r = self.redactor
        return LiveSink(output, {1: r.stream(), 2: r.stream()} if r is not None else None)

    def _prepare(self) -> tuple[list[str], bytes, dict[str, str]] | AttemptResult:
        lease, spec = self.lease, self.lease.action
        argv = list(spec.exec.argv)
        if not argv:
            return AttemptResult.failed("exec.argv is empty", code=Code.INVALID_ARGUMENT)
        has_item, item = False, None
        if '"item"' in lease.inputs_json:
            # Malformed inputs only fail an attempt whose argv templates need them.
            with contextlib.suppress(ValueError):
                has_item, item = parse_item(lease.inputs_json)
        try:
            if any("{{" in a for a in argv):
                static_input, _ = parse_inputs(lease.inputs_json, spec.input_json)
                argv = expand_argv(argv, static_input, item if has_item else NO_ITEM)
            inputs_text = lease.inputs_json or json.dumps(
                {"input": json.loads(spec.input_json) if spec.input_json else None, "needs": {}}
            )
        except (TemplateError, ValueError) as err:
            return AttemptResult.failed(str(err), code=Code.INVALID_ARGUMENT)
        if spec.exec.shell:
            # Extra argv items become $0, $1, ... of the script, as with `sh -c`.
            argv = ["/bin/sh", "-c", *argv]
        limits = self.ex.sandbox.rlimits.for_action(
            spec.rlimits if spec.HasField("rlimits") else None
        )
        if isinstance(limits, str):  # the action asks for more than this worker grants
            return AttemptResult.failed(limits, code=Code.FAILED_PRECONDITION)
        self.limits = limits
        self.confinement = confinement = self.ex.sandbox.confine()
        keeper = self.ex.keeper
        # Its directory and cgroup reach the keeper in one write (nothing runs before it ends).
        with keeper.batch() if keeper is not None else contextlib.nullcontext():
            # Absolute: it is also the working directory, so a relative path in the
            # environment would point somewhere else from inside it.
            self.tmpdir = os.path.abspath(
                tempfile.mkdtemp(prefix="plait-attempt-", dir=self.ex.tmp_root)
            )
            if keeper is not None:
                keeper.register_dir(self.tmpdir)
            inputs = inputs_text.encode()
            inputs_file = os.path.join(self.tmpdir, INPUTS_FILE_NAME)
            with open(inputs_file, "xb") as f:
                f.write(inputs)
            confinement.own(self.tmpdir, inputs_file)
            try:
                confinement.make_cgroup()
            except OSError as err:
                return AttemptResult.failed(
                    f"cannot create the attempt's cgroup: {err.strerror or err}",
                    code=Code.INTERNAL,
                )
        env = build_env(
            lease,
            tmpdir=self.tmpdir,
            path=self.ex.path,
            output_file=os.path.join(self.tmpdir, OUTPUT_FILE_NAME),
            inputs_file=inputs_file,
            inputs_env=inputs_text if len(inputs) <= self.ex.inputs_env_limit else "",
            item_env=self._item_env(item) if has_item else None,
        )
        trace = attempt_trace(self.ctx)
        if trace is not None and trace.traceparent:
            # The execute span, so what the action traces nests under this attempt's run.
            env["TRACEPARENT"] = trace.traceparent
            if trace.tracestate:
                env["TRACESTATE"] = trace.tracestate
        return argv, inputs, env_without_nul(env)

    def _item_env(self, item: Any) -> str:
        """``$PLAIT_ITEM``: the item as compact JSON, empty when over the env limit."""
        text = json.dumps(item, separators=(",", ":"))
        return text if len(text.encode()) <= self.ex.inputs_env_limit else ""

    async def _execute(self) -> AttemptResult:
        secret_env = await self._resolve_secrets()
        if isinstance(secret_env, AttemptResult):
            return secret_env
        prepared = self._prepare()
        if isinstance(prepared, AttemptResult):
            return prepared
        argv, inputs, env = prepared
        env.update(secret_env)
        if self.kill_outcome is not None:
            return AttemptResult(self.kill_outcome, error=self.kill_reason)
        program = resolve_program(argv[0], env["PATH"], cwd=self.cwd)
        if program is None:
            return AttemptResult.failed(f"cannot run {argv[0]!r}: no such file", exit_code=127)
        confinement = self.confinement
        assert confinement is not None
        tail_limit = self.ex.tail_bytes + (self.redactor.margin if self.redactor else 0)
        sink = self._live_sink()
        proc: AttemptProcess | None = None
        launched_at = self.ex.clock.monotonic()
        spawner = self.ex.spawner
        pid = 0
        if spawner is not None:
            spawned: SpawnedProcess | None = None
            try:
                spawned = start_spawned(
                    spawner,
                    confinement,
                    self.limits,
                    program,
                    argv[1:],
                    env,
                    cwd=self.cwd,
                    inputs=inputs,
                    tail_limit=tail_limit,
                    pdeathsig=self.ex.pdeathsig,
                    sink=sink,
                )
                pid = await spawned.started()
                proc = spawned
            except SpawnError as err:
                # Nothing of the attempt ran: it starts through the exec chain instead.
                log.warning("lease %s: the spawner failed (%s)", self.lease.lease_id, err)
                if spawned is not None:
                    spawned.close()
        if proc is None:
            launched_at = math.inf  # the chain's first process runs before it is registered
            chained = await start_chain(
                confinement,
                self.limits,
                program,
                argv[1:],
                env,
                cwd=self.cwd,
                inputs=inputs,
                tail_limit=tail_limit,
                sink=sink,
            )
            if isinstance(chained, AttemptResult):
                return chained
            proc = chained
            pid = await chained.started()
        try:
            return await self._supervise(proc, pid, launched_at)
        finally:
            proc.close()

    async def _supervise(self, proc: AttemptProcess, pid: int, launched_at: float) -> AttemptResult:
        keeper = self.ex.keeper
        confinement = self.confinement
        assert confinement is not None
        if keeper is not None:
            keeper.register(pid)
        # Its cgroup was registered before the request, so the keeper could kill it from then.
        now = self.ex.clock.monotonic()
        self.registered_at = min(launched_at, now) if confinement.cgroup else now
        confinement.started(pid)
        try:
            problem = await proc.release(pid)
            self.pgid = pid  # kill() signals from now on (before, it is begun below)
            if problem:
                self.kill_outcome, self.kill_reason = FAILED, problem
                self._signal(signal.SIGKILL)
            if self.kill_outcome is not None:
                self._begin_kill()
            spec = self.lease.action
            if spec.HasField("timeout"):
                timeout = duration_from_proto(spec.timeout)
                if timeout.total_seconds() > 0:
                    reason = f"run timeout {format_duration(timeout)} exceeded"
                    loop = asyncio.get_running_loop()
                    self._timers.append(
                        loop.call_later(timeout.total_seconds(), self.kill, TIMED_OUT, reason)
                    )
            rc = await proc.wait()
            self.exited = True
        finally:
            # Whatever the attempt left in its group dies with it.
            self._signal(signal.SIGKILL)
            if keeper is not None:
                keeper.unregister(pid)
        if proc.start_failure is not None:
            failure = proc.start_failure
            failure.stdout_tail, failure.stderr_tail = proc.tails.tail(1), proc.tails.tail(2)
            return failure
        if proc.lost and self.kill_outcome is None:
            self.kill_outcome, self.kill_reason = FAILED, proc.lost
        return await self._outcome(rc, proc.tails, confinement)

    async def _outcome(self, rc: int, pipes: Tails, confinement: Confinement) -> AttemptResult:
        """The result of an attempt whose main process exited with ``rc``."""
        if not pipes.closed.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(pipes.closed), self.ex.pipe_drain_timeout)
        out, err = pipes.tail(1), pipes.tail(2)
        if (
            self.kill_outcome is None
            and rc == -signal.SIGKILL
            and self.ex.fence_fired_since(self.registered_at)
        ):
            # workerd could not act in time (paused, stalled): the keeper killed it.
            self.kill_outcome = CANCELLED
            self.kill_reason = (
                "killed by the keeper: the lease's fence deadline passed while workerd could"
                " not act (paused or stalled)"
            )
        if self.kill_outcome is not None:
            return AttemptResult(
                self.kill_outcome,
                error=self.kill_reason,
                exit_code=rc,
                stdout_tail=out,
                stderr_tail=err,
            )
        if rc != 0:
            return AttemptResult.failed(
                exit_message(rc), exit_code=rc, stdout_tail=out, stderr_tail=err
            )
        output_file = os.path.join(self.tmpdir, OUTPUT_FILE_NAME)
        outputs, problem = "{}", ""
        if output_exists(output_file):  # reading it (untrusted, maybe slow) needs a thread
            outputs, problem = await asyncio.to_thread(
                read_outputs, output_file, self.ex.max_output_bytes, confinement.uid
            )
        if problem:
            return AttemptResult.failed(
                problem, code=Code.INVALID_ARGUMENT, stdout_tail=out, stderr_tail=err
            )
        return AttemptResult(SUCCEEDED, outputs_json=outputs, stdout_tail=out, stderr_tail=err)
