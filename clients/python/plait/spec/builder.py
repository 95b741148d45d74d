"""The ``plait.Workflow`` builder (SDK layer: plait.spec).

Builds the same ``WorkflowSpec`` a YAML file would, from Python, through the converter of
:mod:`plait.spec.convert`: the same keys, the same checks, the same error messages (naming
``Workflow('name')`` as the source). Each call is checked when it is made, so the error points at
the line that is wrong; :meth:`Workflow.to_spec` adds the whole-graph checks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, TypedDict, Unpack

from plait.spec.convert import (
    ActionRef,
    Problems,
    SpecError,
    build_spec,
    convert_action,
    convert_defaults,
    convert_workflow_options,
)
from plait.v1 import workflow_pb2

__all__ = ["ActionOptions", "ActionRef", "Join", "Needs", "Workflow"]

Needs = str | ActionRef | Iterable[str | ActionRef] | None
Duration = str | int | float | timedelta


@dataclass(frozen=True, slots=True)
class Join:
    """A join policy for the builder's ``join=``; the same as YAML's ``join`` key.

    >>> Join.any(cancel_remaining=True).to_doc()
    {'any': {'cancel_remaining': True}}
    >>> Join.at_least(0.9).to_doc()
    {'at_least': 0.9}
    """

    kind: Literal["all", "any", "at_least"]
    threshold: int | float | None = None  # at_least: a count >= 1, or a fraction in (0, 1]
    cancel_remaining: bool = False

    @classmethod
    def all(cls) -> Join:
        """Every need must succeed (the default)."""
        return cls("all")

    @classmethod
    def any(cls, *, cancel_remaining: bool = False) -> Join:
        """The first need to succeed is enough; optionally cancel the rest."""
        return cls("any", cancel_remaining=cancel_remaining)

    @classmethod
    def at_least(cls, threshold: int | float, *, cancel_remaining: bool = False) -> Join:
        """A count (``8``: M of N) or a fraction (``0.9``, rounded up) of the needs must succeed."""
        return cls("at_least", threshold, cancel_remaining)

    def to_doc(self) -> str | dict[str, Any]:
        """The YAML form of this join (what the converter reads)."""
        if self.kind == "at_least":
            doc: dict[str, Any] = {"at_least": self.threshold}
            if self.cancel_remaining:
                doc["cancel_remaining"] = True
            return doc
        if self.cancel_remaining:
            return {self.kind: {"cancel_remaining": True}}
        return self.kind


class ActionOptions(TypedDict, total=False):
    """The keyword arguments of :meth:`Workflow.exec` and :meth:`Workflow.handler`.

    Each is the YAML action key of the same name (docs/workflows.md); ``None`` means unset.
    ``map_over="list.images"`` is short for ``map="list.images"``. ``secrets`` and ``rlimits``
    apply to :meth:`Workflow.exec` actions only.
    """

    needs: Needs
    input: Any
    env: Mapping[str, str | int | float | bool] | None
    timeout: Duration | None
    retry: Mapping[str, Any] | None
    slots: int | None
    selector: Mapping[str, str | int | float | bool] | None
    join: Join | str | Mapping[str, Any] | None
    map: str | Mapping[str, Any] | None
    map_over: str | None
    resources: Mapping[str, float] | None
    queue_timeout: Duration | None
    heartbeat_timeout: Duration | None
    priority: int | None
    concurrency_key: str | None
    concurrency_limit: int | None
    lock: str | Sequence[str] | None
    semaphores: Sequence[str | Mapping[str, Any]] | None
    speculate: Duration | str | Mapping[str, Any] | None
    secrets: Sequence[str] | Mapping[str, str] | None
    rlimits: Mapping[str, int | float | str | timedelta] | None


class Workflow:
    """Builds a ``WorkflowSpec`` from Python; the same keys and checks as a YAML file.

    >>> wf = Workflow("thumbnails", defaults={"retry": {"max_attempts": 3}, "timeout": "5m"})
    >>> listing = wf.exec("list", ["python3", "list_images.py"])
    >>> resize = wf.exec("resize", ["resize.py", "{{ item }}"], needs=listing,
    ...                  map={"over": "list.images", "max_parallel": 10})
    >>> index = wf.handler("index", "build-index", needs=[resize], join=Join.at_least(0.9))
    >>> spec = wf.to_spec()
    """

    def __init__(
        self,
        name: str,
        *,
        defaults: Mapping[str, Any] | None = None,
        labels: Mapping[str, str] | None = None,
        fail_fast: bool | None = None,
        max_parallel: int | None = None,
        deadline: Duration | None = None,
        priority: int | None = None,
        env: Mapping[str, str | int | float | bool] | None = None,
    ) -> None:
        self.name = name
        self._doc: dict[str, Any] = {"name": name}
        if defaults is not None:
            self._doc["defaults"] = dict(defaults)
        if labels is not None:
            self._doc["labels"] = dict(labels)
        if env is not None:  # every exec action's, beneath its own
            self._doc["env"] = dict(env)
        options = {
            "fail_fast": fail_fast,
            "max_parallel": max_parallel,
            "deadline": deadline,
            "priority": priority,
        }
        self._doc.update({k: v for k, v in options.items() if v is not None})
        self._actions: list[dict[str, Any]] = []
        self._source = f"Workflow({name!r})"
        # Fail at the call that is wrong, not at to_spec().
        probs = Problems()
        if defaults is not None:
            convert_defaults(self._doc["defaults"], probs)
        convert_workflow_options(self._doc, workflow_pb2.WorkflowSpec(), probs)
        if probs.items:
            raise SpecError(self._source, probs.items)

    def exec(
        self,
        id: str,
        argv: Sequence[str] | str,
        *,
        shell: bool = False,
        **options: Unpack[ActionOptions],
    ) -> ActionRef:
        """Adds an exec action; ``argv`` is run directly, or by ``/bin/sh -c`` when ``shell``.

        ``options`` are the YAML action keys (:class:`ActionOptions`): needs, input, env,
        timeout, retry, slots, selector, join, map (or map_over), resources, queue_timeout,
        heartbeat_timeout, priority, concurrency_key, concurrency_limit, lock, semaphores,
        speculate, secrets (``["API_TOKEN"]`` or ``{"VAR": "secret-name"}``: resolved by the
        worker into the environment) and rlimits (``{"address_space": "4GiB", "cpu": "10m"}``).
        """
        run: Any = argv if isinstance(argv, str) else list(argv)
        if shell and not isinstance(run, str):
            run = " ".join(run)
        return self._add({"id": id, "run": run, **options})

    def handler(self, id: str, name: str, **options: Unpack[ActionOptions]) -> ActionRef:
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
        if "map_over" in raw:
            if "map" in raw:
                raise TypeError("give map= or map_over=, not both")
            raw["map"] = raw.pop("map_over")
        if isinstance(raw.get("join"), Join):
            raw["join"] = raw["join"].to_doc()
        probs = Problems()
        convert_action(raw, len(self._actions), probs)
        if probs.items:
            raise SpecError(self._source, probs.items)
        self._actions.append(raw)
        return ActionRef(raw["id"])

    def to_spec(self) -> workflow_pb2.WorkflowSpec:
        """The ``WorkflowSpec`` to submit (checks duplicate ids and unknown needs)."""
        return build_spec({**self._doc, "actions": self._actions}, self._source, self.name)
