"""Plait: run DAGs of actions in parallel across many hosts.

This package is the foundation every other part builds on: the generated protocol
(:mod:`plait.v1`), the hybrid logical clock (:mod:`plait.hlc`), the clock (:mod:`plait.clock`),
the error tree (:mod:`plait.errors`), and the Python SDK (docs/sdk.md) — :class:`Client` to
submit and watch workflows, :class:`Workflow` to build them, :class:`Worker` to serve named
handlers, :class:`ActionError` for a handler to fail with a type its retry policy matches,
:class:`WorkflowResult` and the named states :class:`WorkflowState` and :class:`ActionState`,
and :func:`run_local` (:mod:`plait.testing`) to run a workflow in this process, for tests.

Every name in ``__all__`` is imported on first use, so ``import plait`` stays cheap for a worker
that needs only the protocol; ``dir(plait)`` lists them all the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from plait.client import Client
    from plait.errors import ActionError, InvalidArgumentError, PlaitError, UnavailableError
    from plait.results import ActionResult, ActionState, WorkflowResult, WorkflowState
    from plait.spec import Join, SpecError, Workflow, load_workflow, loads_workflow
    from plait.testing import run_local
    from plait.worker import ActionContext, NeedResult, Worker

__all__ = [
    "ActionContext",
    "ActionError",
    "ActionResult",
    "ActionState",
    "Client",
    "InvalidArgumentError",
    "Join",
    "NeedResult",
    "PlaitError",
    "SpecError",
    "UnavailableError",
    "Worker",
    "Workflow",
    "WorkflowResult",
    "WorkflowState",
    "__version__",
    "load_workflow",
    "loads_workflow",
    "run_local",
]

_LAZY = {
    "ActionError": "plait.errors",
    "InvalidArgumentError": "plait.errors",
    "PlaitError": "plait.errors",
    "UnavailableError": "plait.errors",
    "Client": "plait.client",
    "ActionResult": "plait.results",
    "ActionState": "plait.results",
    "WorkflowResult": "plait.results",
    "WorkflowState": "plait.results",
    "Join": "plait.spec",
    "SpecError": "plait.spec",
    "Workflow": "plait.spec",
    "load_workflow": "plait.spec",
    "loads_workflow": "plait.spec",
    "run_local": "plait.testing",
    "Worker": "plait.worker",
    "ActionContext": "plait.worker",
    "NeedResult": "plait.worker",
}


def __getattr__(name: str) -> Any:
    # Lazy so that `import plait` stays cheap for workers that only need the protocol.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'plait' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    # The SDK's names, lazy ones included, so dir(plait) (and a REPL's completion) shows them;
    # not the typing helpers this module imports for itself.
    return sorted({*__all__, *(name for name in globals() if name.startswith("__"))})
