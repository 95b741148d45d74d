"""The ``plait.Workflow`` builder (SDK layer: plait.spec).

Builds the same ``WorkflowSpec`` a YAML file would, from Python, through the converter of
:mod:`plait.spec.convert`: the same keys, the same checks, the same error messages (naming
``Workflow('name')`` as the source). Each call is checked when it is made, so the error points at
the line that is wrong; :meth:`Workflow.to_spec` adds the whole-graph checks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from plait.spec.convert import (
    ActionRef,
    Problems,
    SpecError,
    build_spec,
    convert_action,
    convert_defaults,
)
from plait.v1 import workflow_pb2

__all__ = ["ActionRef", "Needs", "Workflow"]

Needs = str | ActionRef | Iterable[str | ActionRef] | None


class Workflow:
    """Builds a ``WorkflowSpec`` from Python; the same keys and checks as a YAML file.

    >>> wf = Workflow("thumbnails", defaults={"retry": {"max_attempts": 3}, "timeout": "5m"})
    >>> listing = wf.exec("list", ["python3", "list_images.py"])
    >>> index = wf.handler("index", "build-index", needs=[listing])
    >>> spec = wf.to_spec()
    """

    def __init__(
        self,
        name: str,
        *,
        defaults: Mapping[str, Any] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self._doc: dict[str, Any] = {"name": name}
        if defaults is not None:
            self._doc["defaults"] = dict(defaults)
        if labels is not None:
            self._doc["labels"] = dict(labels)
        self._actions: list[dict[str, Any]] = []
        self._source = f"Workflow({name!r})"
        # Fail at the call that is wrong, not at to_spec().
        probs = Problems()
        if defaults is not None:
            convert_defaults(self._doc["defaults"], probs)
        if probs.items:
            raise SpecError(self._source, probs.items)

    def exec(
        self,
        id: str,
        argv: Sequence[str] | str,
        *,
        shell: bool = False,
        **options: Any,
    ) -> ActionRef:
        """Adds an exec action; ``argv`` is run directly, or by ``/bin/sh -c`` when ``shell``.

        ``options``: needs, input, env, timeout, retry, slots, selector (as in YAML).
        """
        run: Any = argv if isinstance(argv, str) else list(argv)
        if shell and not isinstance(run, str):
            run = " ".join(run)
        return self._add({"id": id, "run": run, **options})

    def handler(self, id: str, name: str, **options: Any) -> ActionRef:
        """Adds an action run by the named handler of an SDK worker (``options`` as in exec)."""
        return self._add({"id": id, "handler": name, **options})

    def _add(self, raw: dict[str, Any]) -> ActionRef:
        if "needs" in raw:
            needs = raw["needs"]
            if needs is None:
                del raw["needs"]
            elif isinstance(needs, ActionRef):
                raw["needs"] = needs.id
            elif not isinstance(needs, str) and isinstance(needs, Iterable):
                raw["needs"] = [n.id if isinstance(n, ActionRef) else n for n in needs]
        for key in [k for k, v in raw.items() if v is None]:
            del raw[key]
        probs = Problems()
        convert_action(raw, len(self._actions), probs)
        if probs.items:
            raise SpecError(self._source, probs.items)
        self._actions.append(raw)
        return ActionRef(raw["id"])

    def to_spec(self) -> workflow_pb2.WorkflowSpec:
        """The ``WorkflowSpec`` to submit (checks duplicate ids and unknown needs)."""
        return build_spec({**self._doc, "actions": self._actions}, self._source, self.name)
