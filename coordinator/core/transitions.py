"""The one table of legal action-state transitions (pure core).

Every state change in the coordinator goes through :func:`check_transition`; a move that is not
in :data:`TRANSITIONS` is a bug and raises :class:`IllegalTransitionError`.
"""

from __future__ import annotations

from plait.v1 import workflow_pb2

S = workflow_pb2.ActionState

PENDING = S.ACTION_STATE_PENDING
READY = S.ACTION_STATE_READY
LEASED = S.ACTION_STATE_LEASED
RUNNING = S.ACTION_STATE_RUNNING
SUCCEEDED = S.ACTION_STATE_SUCCEEDED
FAILED = S.ACTION_STATE_FAILED
CANCELLED = S.ACTION_STATE_CANCELLED
SKIPPED = S.ACTION_STATE_SKIPPED
TIMED_OUT = S.ACTION_STATE_TIMED_OUT

STATE_NAME: dict[int, str] = {int(v): k for k, v in S.items()}  # ActionState names by number

TERMINAL: frozenset[int] = frozenset({SUCCEEDED, FAILED, CANCELLED, SKIPPED, TIMED_OUT})
RETRY_MOVES: frozenset[tuple[int, int]] = frozenset(
    {
        (FAILED, PENDING),
        (TIMED_OUT, PENDING),
        (SKIPPED, PENDING),
        (CANCELLED, PENDING),
        (FAILED, RUNNING),
        (CANCELLED, RUNNING),
    }
)

# (from, to) -> why the move exists. Keep it small: each line is a rule of the lifecycle.
TRANSITIONS: dict[tuple[int, int], str] = {
    (PENDING, READY): "every need succeeded",
    (PENDING, SKIPPED): "a need did not succeed, so the join can never be met",
    (PENDING, CANCELLED): "workflow cancelled, or cancelled once a dependent's join was met",
    (PENDING, RUNNING): "a map action's list arrived: it runs as its children",
    (READY, LEASED): "granted to a worker with free slots",
    (READY, CANCELLED): "workflow cancelled",
    (READY, FAILED): "no attempt can be made (lease-loss budget spent, lease too large)",
    (READY, TIMED_OUT): "queue timeout: not started in time (no worker could run it)",
    (LEASED, RUNNING): "the worker reported the start",
    (LEASED, SUCCEEDED): "result arrived before (or instead of) the start report",
    (LEASED, FAILED): "result arrived before the start report",
    (LEASED, TIMED_OUT): "run timeout fired",
    (LEASED, READY): "lease lost, or retry after failure",
    (LEASED, CANCELLED): "workflow cancelled",
    (RUNNING, SUCCEEDED): "the attempt succeeded",
    (RUNNING, FAILED): "the last allowed attempt failed",
    (RUNNING, TIMED_OUT): "the last allowed attempt ran past its timeout",
    (RUNNING, READY): "lease lost, or retry after failure",
    (RUNNING, CANCELLED): "workflow cancelled",
    (PENDING, FAILED): "a map action's list could not be read",
    # `plait retry`: the one way back from a terminal state, journalled as WORKFLOW_RETRIED.
    (FAILED, PENDING): "workflow retry",
    (TIMED_OUT, PENDING): "workflow retry",
    (SKIPPED, PENDING): "workflow retry",
    (CANCELLED, PENDING): "workflow retry",
    (FAILED, RUNNING): "workflow retry of a map action: its children that failed run again",
    (CANCELLED, RUNNING): "workflow retry of a cancelled map action: its open children run again",
}


class IllegalTransitionError(RuntimeError):
    """A state change outside :data:`TRANSITIONS`: always a bug in the coordinator."""


def check_transition(old: int, new: int, what: str) -> None:
    """Raises :class:`IllegalTransitionError` unless ``old -> new`` is in the table."""
    if (old, new) not in TRANSITIONS:
        raise IllegalTransitionError(
            f"{what}: illegal transition {S.Name(old)} -> {S.Name(new)}"  # type: ignore[arg-type]
        )
