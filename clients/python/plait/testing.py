"""Run a workflow in this process, for tests: :func:`run_local` (SDK layer).

Like ``airflow dags test``: no cluster to start, nothing left behind. :func:`run_local` starts a
coordinator in this process (the same embedded coordinator ``plait run`` uses, on a SQLite
journal in a temporary directory, bound to 127.0.0.1 on a free port), serves the given Python
handlers from an in-process worker, submits the workflow, waits for it to finish and returns a
:class:`plait.WorkflowResult`; then it stops everything and deletes the directory. Exec actions
(``run:``) run in ``workerd`` processes of the same composition (one by default when the
workflow has any), as under ``plait run``::

    import plait

    worker = plait.Worker()

    @worker.action("double")
    def double(ctx: plait.ActionContext) -> dict[str, int]:
        return {"n": ctx.input["n"] * 2}

    wf = plait.Workflow("t")
    wf.handler("a", "double", input={"n": 21})
    result = plait.run_local(wf, worker)
    assert result.state == "SUCCEEDED" and result.outputs("a") == {"n": 42}

Handlers are the real thing: they get a real :class:`plait.ActionContext` through a real
session with the real coordinator, so retries, timeouts, joins and maps behave as in
production. A handler action whose handler is not given is refused before anything starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from plait.cli.local import LocalCluster, LocalClusterConfig
from plait.client import Client, _ToSpec
from plait.results import WorkflowResult
from plait.v1 import workflow_pb2
from plait.worker import Worker, WorkerSession, serve
from plait.worker.spans import ExecuteTracing

__all__ = ["run_local"]

Handlers = Worker | Sequence[Worker] | Mapping[str, Callable[..., Any]]


def _as_workers(handlers: Handlers) -> list[Worker]:
    if isinstance(handlers, Worker):
        return [handlers]
    if isinstance(handlers, Mapping):
        worker = Worker()
        for name, fn in handlers.items():
            worker.action(name)(fn)
        return [worker]
    return list(handlers)


def _spec_of(workflow: workflow_pb2.WorkflowSpec | _ToSpec | str | os.PathLike[str]) -> Any:
    if isinstance(workflow, workflow_pb2.WorkflowSpec):
        return workflow
    if isinstance(workflow, str | os.PathLike):
        from plait.spec import load_workflow

        return load_workflow(workflow)
    return workflow.to_spec()


def _kinds(spec: workflow_pb2.WorkflowSpec) -> tuple[set[str], bool]:
    """The handler names the workflow uses, and whether it has exec actions or stages."""
    handlers: set[str] = set()
    exec_actions = False
    for action in spec.actions:
        for runs in (action, *action.pipeline.stages):
            kind = runs.WhichOneof("kind")
            if kind == "handler":
                handlers.add(runs.handler)
            elif kind == "exec":
                exec_actions = True
    return handlers, exec_actions


class _InProcessWorker:
    """``plait.worker.serve`` on a thread of its own, stopped on demand."""

    def __init__(self, workers: list[Worker], target: str, slots: int) -> None:
        self._workers = workers
        self._target = target
        self._slots = slots
        self._session: WorkerSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="plait-test-worker", daemon=True)

    def _on_session(self, session: WorkerSession) -> None:
        self._session = session
        self._loop = asyncio.get_running_loop()
        self._started.set()

    def _run(self) -> None:
        try:
            asyncio.run(
                serve(
                    self._workers,
                    coordinator=self._target,
                    worker_id="run-local",
                    slots=self._slots,
                    detect=False,
                    tls=None,
                    token="",
                    tracing=ExecuteTracing(),
                    on_session=self._on_session,
                )
            )
        except BaseException as exc:  # reported by stop(); the thread must not die silently
            self.error = exc
        finally:
            self._started.set()

    def start(self) -> None:
        self._thread.start()
        self._started.wait(30)

    def stop(self) -> None:
        session, loop = self._session, self._loop
        if session is not None and loop is not None:
            with contextlib.suppress(RuntimeError):  # its loop already closed
                loop.call_soon_threadsafe(session.stop, "run_local finished")
        self._thread.join(30)


def run_local(
    workflow: workflow_pb2.WorkflowSpec | _ToSpec | str | os.PathLike[str],
    handlers: Handlers = (),
    *,
    timeout: float | None = 60.0,
    slots: int = 4,
    exec_workers: int | None = None,
) -> WorkflowResult:
    """Runs ``workflow`` to the end on a throwaway coordinator in this process.

    Args:
        workflow: a :class:`plait.Workflow`, a ``WorkflowSpec`` or the path of a YAML file.
        handlers: a :class:`plait.Worker` (or several), or a mapping of handler names to
            functions (sync or async, taking a :class:`plait.ActionContext`).
        timeout: seconds to wait for the workflow to finish (``None``: no limit).
        slots: how many handler attempts run at once.
        exec_workers: ``workerd`` processes for exec actions; by default one when the workflow
            has any, else none.

    Returns:
        The finished workflow's :class:`plait.WorkflowResult` (whatever its state: a failed
        workflow is a result, not an exception).

    Raises:
        ValueError: a handler action names a handler that ``handlers`` does not serve.
        SpecError: the workflow is malformed (as :meth:`plait.Client.submit` would say).
        TimeoutError: it did not finish within ``timeout``.
    """
    spec = _spec_of(workflow)
    workers = _as_workers(handlers)
    used, has_exec = _kinds(spec)
    served = {name for w in workers for name in w.handlers}
    missing = sorted(used - served)
    if missing:
        raise ValueError(
            f"no handler given for {', '.join(repr(m) for m in missing)} (served:"
            f" {', '.join(sorted(served)) or 'none'})"
        )
    n_exec = (1 if has_exec else 0) if exec_workers is None else exec_workers
    with tempfile.TemporaryDirectory(prefix="plait-run-local-") as tmp:
        config = LocalClusterConfig(
            store=f"sqlite:///{Path(tmp) / 'plait.db'}",
            workers=n_exec,
            log_dir=Path(tmp) / "logs",
        )
        with LocalCluster(config) as cluster:
            worker = _InProcessWorker(workers, cluster.target, slots) if workers else None
            if worker is not None:
                worker.start()
            try:
                with Client(cluster.target, tls=False, token="") as client:
                    return client.run(spec, timeout=timeout)
            finally:
                if worker is not None:
                    worker.stop()
