"""The worker side of Plait (foundation layer): handlers, the session, the executor protocol.

``plait.Worker`` registers Python handlers with ``@worker.action("name")`` and serves them;
:class:`~plait.worker.session.WorkerSession` speaks ``WorkerService.Connect`` for both the SDK
worker and the worker daemon (``plait.workerd``), which adds the exec executor.
"""

from __future__ import annotations

from plait.worker.executor import AttemptContext, AttemptHandle, AttemptResult, Executor
from plait.worker.handlers import ActionContext, HandlerExecutor, NeedResult, Worker
from plait.worker.serve import serve
from plait.worker.session import SessionConfig, SessionStats, WorkerSession

__all__ = [
    "ActionContext",
    "AttemptContext",
    "AttemptHandle",
    "AttemptResult",
    "Executor",
    "HandlerExecutor",
    "NeedResult",
    "SessionConfig",
    "SessionStats",
    "Worker",
    "WorkerSession",
    "serve",
]
