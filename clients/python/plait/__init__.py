"""Plait: run DAGs of actions in parallel across many hosts.

This package is the foundation every other part builds on: the generated protocol
(:mod:`plait.v1`), the hybrid logical clock (:mod:`plait.hlc`), the clock (:mod:`plait.clock`),
the error tree (:mod:`plait.errors`), and the Python SDK — :class:`Client` to submit and watch
workflows, :class:`Workflow` to build them, :class:`Worker` to serve named handlers, and
:class:`ActionError` for a handler to fail with a type its retry policy matches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from plait.client import Client
    from plait.errors import ActionError
    from plait.spec import Workflow, load_workflow
    from plait.worker import ActionContext, Worker

__all__ = [
    "ActionContext",
    "ActionError",
    "Client",
    "Worker",
    "Workflow",
    "__version__",
    "load_workflow",
]

_LAZY = {
    "ActionError": "plait.errors",
    "Client": "plait.client",
    "Workflow": "plait.spec",
    "load_workflow": "plait.spec",
    "Worker": "plait.worker",
    "ActionContext": "plait.worker",
}


def __getattr__(name: str) -> Any:
    # Lazy so that `import plait` stays cheap for workers that only need the protocol.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'plait' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
