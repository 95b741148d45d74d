"""Workflow and action results with named states (SDK layer).

The protocol's states are enum numbers (``status.state == 2``). :class:`WorkflowState` and
:class:`ActionState` name them, and stay numbers: each is an ``IntEnum`` whose members equal the
protocol values (``WorkflowState.SUCCEEDED == workflow_pb2.WORKFLOW_STATE_SUCCEEDED``) and also
their names, with or without the protocol's prefix and in any case
(``WorkflowState.SUCCEEDED == "SUCCEEDED" == "succeeded"``), so code written against the
numbers keeps working.

:class:`WorkflowResult` is a finished (or current) workflow as Python values: its state, each
action's :class:`ActionResult` with outputs parsed from JSON, and the ``WorkflowStatus`` it was
read from. :meth:`plait.Client.run` and :func:`plait.testing.run_local` return one;
:meth:`WorkflowResult.from_status` makes one from any status :meth:`plait.Client.get` returned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from plait.v1 import workflow_pb2

__all__ = [
    "TERMINAL_ACTION_STATES",
    "ActionResult",
    "ActionState",
    "WorkflowResult",
    "WorkflowState",
    "parse_action_state",
    "parse_workflow_state",
]


class _NamedState(IntEnum):
    """An enum number that also equals its name (``"SUCCEEDED"``, ``"succeeded"``, or with the
    protocol's prefix); prints as the short name."""

    @classmethod
    def _prefix(cls) -> str:
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            name = other.strip().upper().replace("-", "_")
            return name in (self.name, self._prefix() + self.name)
        return int(self) == other

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    __hash__ = IntEnum.__hash__

    def __str__(self) -> str:
        return self.name

    @property
    def terminal(self) -> bool:
        """Whether nothing more will happen to it (until a retry, for a workflow)."""
        raise NotImplementedError


class WorkflowState(_NamedState):
    """A workflow's state (``plait.v1.WorkflowState`` by name)."""

    UNSPECIFIED = workflow_pb2.WORKFLOW_STATE_UNSPECIFIED
    RUNNING = workflow_pb2.WORKFLOW_STATE_RUNNING
    SUCCEEDED = workflow_pb2.WORKFLOW_STATE_SUCCEEDED
    FAILED = workflow_pb2.WORKFLOW_STATE_FAILED
    CANCELLED = workflow_pb2.WORKFLOW_STATE_CANCELLED
    PARTIALLY_SUCCEEDED = workflow_pb2.WORKFLOW_STATE_PARTIALLY_SUCCEEDED

    @classmethod
    def _prefix(cls) -> str:
        return "WORKFLOW_STATE_"

    @property
    def terminal(self) -> bool:
        """SUCCEEDED, PARTIALLY_SUCCEEDED, FAILED or CANCELLED."""
        return self not in (WorkflowState.UNSPECIFIED, WorkflowState.RUNNING)

    @property
    def succeeded(self) -> bool:
        """SUCCEEDED, or PARTIALLY_SUCCEEDED (failures a join tolerated): ``plait``'s exit 0."""
        return self in (WorkflowState.SUCCEEDED, WorkflowState.PARTIALLY_SUCCEEDED)


class ActionState(_NamedState):
    """An action's state (``plait.v1.ActionState`` by name)."""

    UNSPECIFIED = workflow_pb2.ACTION_STATE_UNSPECIFIED
    PENDING = workflow_pb2.ACTION_STATE_PENDING
    READY = workflow_pb2.ACTION_STATE_READY
    LEASED = workflow_pb2.ACTION_STATE_LEASED
    RUNNING = workflow_pb2.ACTION_STATE_RUNNING
    SUCCEEDED = workflow_pb2.ACTION_STATE_SUCCEEDED
    FAILED = workflow_pb2.ACTION_STATE_FAILED
    CANCELLED = workflow_pb2.ACTION_STATE_CANCELLED
    SKIPPED = workflow_pb2.ACTION_STATE_SKIPPED
    TIMED_OUT = workflow_pb2.ACTION_STATE_TIMED_OUT

    @classmethod
    def _prefix(cls) -> str:
        return "ACTION_STATE_"

    @property
    def terminal(self) -> bool:
        """SUCCEEDED, FAILED, CANCELLED, SKIPPED or TIMED_OUT."""
        return self >= ActionState.SUCCEEDED


# The ActionState numbers nothing more happens to (until a retry), for code holding raw numbers.
TERMINAL_ACTION_STATES: frozenset[int] = frozenset(int(s) for s in ActionState if s.terminal)


def _state(enum: type[_NamedState], value: int) -> Any:
    try:
        return enum(value)
    except ValueError:  # a newer coordinator's state: keep the number
        return value


@dataclass(frozen=True, slots=True)
class ActionResult:
    """One action of a :class:`WorkflowResult`.

    ``outputs`` is the committed outputs parsed (``None`` when it has none, or when they were
    too large for the status and ``outputs_truncated`` is set: read them with
    :meth:`plait.Client.outputs`); ``error`` the message of why it failed, was skipped or
    cancelled ("" when none).
    """

    action_id: str
    state: ActionState
    attempt: int
    outputs: Any
    error: str
    exit_code: int
    worker_id: str
    parent_id: str
    outputs_truncated: bool

    @property
    def succeeded(self) -> bool:
        """Whether its state is SUCCEEDED."""
        return self.state == ActionState.SUCCEEDED

    @classmethod
    def from_status(cls, a: workflow_pb2.ActionStatus) -> ActionResult:
        """From one ``ActionStatus`` of a ``WorkflowStatus``."""
        return cls(
            action_id=a.action_id,
            state=_state(ActionState, a.state),
            attempt=a.attempt,
            outputs=json.loads(a.outputs_json) if a.outputs_json else None,
            error=a.error.message if a.HasField("error") else "",
            exit_code=a.exit_code,
            worker_id=a.worker_id,
            parent_id=a.parent_id,
            outputs_truncated=a.outputs_truncated,
        )


@dataclass(frozen=True, slots=True)
class WorkflowResult:
    """A workflow's state and its actions' results, as Python values.

    ``actions`` maps each action id (map children included, as ``parent[i]`` ids) to its
    :class:`ActionResult`; ``status`` is the ``WorkflowStatus`` it was made from.

    >>> result = client.run(wf)                     # doctest: +SKIP
    >>> result.state == "SUCCEEDED", result.ok      # doctest: +SKIP
    (True, True)
    >>> result.outputs("index")                     # doctest: +SKIP
    {'pages': 3}
    """

    workflow_id: str
    name: str
    state: WorkflowState
    reason: str
    actions: dict[str, ActionResult] = field(default_factory=dict)
    status: workflow_pb2.WorkflowStatus = field(default_factory=workflow_pb2.WorkflowStatus)

    @property
    def ok(self) -> bool:
        """SUCCEEDED or PARTIALLY_SUCCEEDED (what makes ``plait submit --wait`` exit 0)."""
        return self.state in (WorkflowState.SUCCEEDED, WorkflowState.PARTIALLY_SUCCEEDED)

    def outputs(self, action_id: str) -> Any:
        """The parsed outputs of ``action_id`` (``KeyError`` for an unknown id)."""
        return self.actions[action_id].outputs

    def states(self) -> dict[str, ActionState]:
        """Each action's state, by id."""
        return {k: a.state for k, a in self.actions.items()}

    @classmethod
    def from_status(cls, status: workflow_pb2.WorkflowStatus) -> WorkflowResult:
        """From a ``WorkflowStatus`` (what :meth:`plait.Client.get` and ``wait`` return)."""
        return cls(
            workflow_id=status.workflow_id,
            name=status.name,
            state=_state(WorkflowState, status.state),
            reason=status.reason,
            actions={a.action_id: ActionResult.from_status(a) for a in status.actions},
            status=status,
        )


def _parse_state(enum: Any, prefix: str, what: str, state: str | int) -> int:
    """``ready``, ``READY`` or ``<prefix>READY`` (or the enum's value) to the value.

    Raises:
        ValueError: not one of them; the message lists the valid names.
    """
    if isinstance(state, int):
        enum.Name(state)  # raises ValueError when unknown
        return state
    name = state.strip().upper().replace("-", "_")
    if not name.startswith(prefix):
        name = prefix + name
    names = [n for n, _ in enum.items() if not n.endswith("UNSPECIFIED")]
    if name in names:
        return int(enum.Value(name))
    valid = [n.removeprefix(prefix).lower() for n in names]
    raise ValueError(f"unknown {what} state {state!r}; expected one of {', '.join(valid)}")


def parse_action_state(state: str | int) -> workflow_pb2.ActionState.ValueType:
    """``ready``, ``READY`` or ``ACTION_STATE_READY`` (or the enum value) to the enum.

    Raises:
        ValueError: not an action state; the message lists the valid ones.
    """
    value = _parse_state(workflow_pb2.ActionState, "ACTION_STATE_", "action", state)
    return workflow_pb2.ActionState.ValueType(value)


def parse_workflow_state(state: str | int | None) -> workflow_pb2.WorkflowState.ValueType:
    """``running``, ``RUNNING`` or ``WORKFLOW_STATE_RUNNING`` (or the enum value) to the enum;
    None or "" is UNSPECIFIED (any state).

    Raises:
        ValueError: not a workflow state; the message lists the valid ones.
    """
    if state is None or state == "":
        return workflow_pb2.WORKFLOW_STATE_UNSPECIFIED
    value = _parse_state(workflow_pb2.WorkflowState, "WORKFLOW_STATE_", "workflow", state)
    return workflow_pb2.WorkflowState.ValueType(value)
