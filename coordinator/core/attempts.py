"""An attempt's policy: run timeout, whether another attempt may follow, and the backoff
before it (pure core, the attempt-policy aggregate).

Each action's retry policy is its own with every unset field taken from the workflow's
defaults; these functions read it and nothing else, so the live core and replay agree.
"""

from __future__ import annotations

import random

from google.rpc import code_pb2, status_pb2

from plait.coordinator.core.model import ActionRecord
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb

DEFAULT_BACKOFF = 1.0
DEFAULT_MAX_BACKOFF = 100.0
DEFAULT_MULTIPLIER = 2.0
DEFAULT_JITTER = 0.5
_CODES = frozenset(code_pb2.Code.values())


def retry_delay(a: ActionRecord, rng: random.Random) -> float:
    """Exponential backoff with jitter for the action's next attempt, in seconds, decided
    when an attempt has just failed (``a.failures`` does not count it yet: applying its
    RETRY_SCHEDULED event does)."""
    r = retry_policy(a)
    initial = (
        r.initial_backoff.ToTimedelta().total_seconds()
        if r.HasField("initial_backoff")
        else DEFAULT_BACKOFF
    )
    cap = (
        r.max_backoff.ToTimedelta().total_seconds()
        if r.HasField("max_backoff")
        else DEFAULT_MAX_BACKOFF
    )
    mult = r.backoff_multiplier or DEFAULT_MULTIPLIER
    delay = min(cap, initial * mult**a.failures)
    jitter = r.jitter if r.HasField("jitter") else DEFAULT_JITTER
    return delay * (1.0 - jitter * rng.random())


def retry_policy(a: ActionRecord) -> pb.RetryPolicy:
    """The action's retry policy, each unset field taken from the workflow's defaults."""
    d = a.workflow.spec.defaults
    if not d.HasField("retry"):
        return a.spec.retry
    if not a.spec.HasField("retry"):
        return d.retry
    merged = pb.RetryPolicy()
    merged.CopyFrom(d.retry)
    merged.MergeFrom(a.spec.retry)
    for name in ("retryable_exit_codes", "retryable_errors"):
        own = getattr(a.spec.retry, name)
        if own:  # the action's list replaces the default's, it does not extend it
            field = getattr(merged, name)
            del field[:]
            field.extend(own)
    return merged


def may_retry(
    a: ActionRecord,
    exit_code: int,
    outcome: int,
    error: status_pb2.Status | None = None,
    error_type: str = "",
) -> bool:
    """Whether another attempt may follow a failed one (budget, exit code, error type).

    ``retryable_errors`` names match the attempt's ``error_type`` (ActionResult.error_type, as
    the worker reported it) exactly, or the google.rpc code name of ``error.code``; the error's
    message is text for people and is never read here.
    """
    r = retry_policy(a)
    if a.failures + 1 >= max(1, r.max_attempts):  # counting the one that just failed
        return False
    codes, kinds = r.retryable_exit_codes, r.retryable_errors
    if (
        error is not None
        and error.code == code_pb2.FAILED_PRECONDITION
        and "FAILED_PRECONDITION" not in kinds
    ):
        return False  # the worker cannot run it as asked (e.g. a secret it does not provide)
    if outcome != wpb.ACTION_OUTCOME_FAILED or not (codes or kinds):
        return True  # timeouts, and any failure when no list narrows it
    if codes and exit_code in codes:
        return True
    if not kinds:
        return False
    if error_type and error_type in kinds:
        return True
    return error is not None and error.code in _CODES and code_pb2.Code.Name(error.code) in kinds


def run_timeout(a: ActionRecord) -> float:
    """The action's run timeout in seconds (its own, else the workflow default; 0: none)."""
    if a.spec.HasField("timeout"):
        return a.spec.timeout.ToTimedelta().total_seconds()
    d = a.workflow.spec.defaults
    return d.timeout.ToTimedelta().total_seconds() if d.HasField("timeout") else 0.0
