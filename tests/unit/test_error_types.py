"""Typed errors: ``retryable_errors`` matches ``ActionResult.error_type`` or the code name, never
the message; the one rule for an error type; the coordinator refuses a type that breaks it."""

from __future__ import annotations

import pytest
from google.rpc import code_pb2, status_pb2

from plait.coordinator.config import Limits
from plait.coordinator.core import attempts
from plait.coordinator.core.model import ActionRecord
from plait.coordinator.services.worker import ReportCheck
from plait.errors import MAX_ERROR_TYPE_BYTES, InvalidArgumentError, error_type_problem
from plait.v1 import worker_service_pb2 as wpb
from tests.unit.core_driver import Driver, independent

FAILED = wpb.ACTION_OUTCOME_FAILED


def failed_once(kinds: list[str], codes: tuple[int, ...] = ()) -> ActionRecord:
    """An action whose first of three attempts failed, its policy listing ``kinds`` (its
    budget allows another attempt however the one that just failed is counted)."""
    d = Driver()
    spec = independent(1)
    spec.actions[0].retry.max_attempts = 3
    spec.actions[0].retry.retryable_errors.extend(kinds)
    spec.actions[0].retry.retryable_exit_codes.extend(codes)
    d.submit(spec)
    return d.st.workflows["wf-1"].actions["a0"]


def status(code: int, message: str = "") -> status_pb2.Status:
    return status_pb2.Status(code=code, message=message)


def test_a_listed_error_type_is_retried() -> None:
    a = failed_once(["RateLimited", "TimeoutError"])
    err = status(code_pb2.UNKNOWN, "the mirror said 429")
    assert attempts.may_retry(a, 0, FAILED, err, "RateLimited")
    assert attempts.may_retry(a, 0, FAILED, err, "TimeoutError")
    assert not attempts.may_retry(a, 0, FAILED, err, "KeyError")
    assert not attempts.may_retry(a, 0, FAILED, err, "")


def test_the_type_matches_exactly() -> None:
    a = failed_once(["RateLimited"])
    err = status(code_pb2.UNKNOWN)
    for near in ("ratelimited", "RateLimited ", "RateLimitedError", "Rate", "mod.RateLimited"):
        assert not attempts.may_retry(a, 0, FAILED, err, near), near


def test_a_listed_code_name_is_retried_whatever_the_type() -> None:
    a = failed_once(["UNAVAILABLE"])
    assert attempts.may_retry(a, 0, FAILED, status(code_pb2.UNAVAILABLE), "")
    assert attempts.may_retry(a, 0, FAILED, status(code_pb2.UNAVAILABLE), "OSError")
    assert not attempts.may_retry(a, 0, FAILED, status(code_pb2.UNKNOWN), "OSError")
    assert not attempts.may_retry(a, 0, FAILED, status(99), "")  # not a google.rpc code
    assert not attempts.may_retry(a, 0, FAILED, None, "")


def test_the_message_is_never_parsed_for_a_type() -> None:
    a = failed_once(["Foo", "TimeoutError"])
    for message in ("Foo: bar", "Foo", "TimeoutError: slow mirror", "Foo:bar"):
        err = status(code_pb2.UNKNOWN, message)
        assert not attempts.may_retry(a, 0, FAILED, err), message
        assert not attempts.may_retry(a, 0, FAILED, err, "Bar"), message
    assert attempts.may_retry(a, 0, FAILED, status(code_pb2.UNKNOWN, "Bar: x"), "Foo")


def test_failed_precondition_is_not_retried_even_with_a_listed_type() -> None:
    a = failed_once(["SecretUnavailable"])
    err = status(code_pb2.FAILED_PRECONDITION, "secret 'x': not provided")
    assert not attempts.may_retry(a, 0, FAILED, err, "SecretUnavailable")
    assert attempts.may_retry(failed_once(["FAILED_PRECONDITION"]), 0, FAILED, err, "")


def test_exit_codes_and_no_lists_as_before() -> None:
    err = status(code_pb2.UNKNOWN, "exit code 75")
    assert attempts.may_retry(failed_once([], (75,)), 75, FAILED, err)
    assert not attempts.may_retry(failed_once([], (75,)), 1, FAILED, err)
    assert attempts.may_retry(failed_once([]), 1, FAILED, err)  # no list: every failure
    assert attempts.may_retry(failed_once(["X"]), 0, wpb.ACTION_OUTCOME_TIMED_OUT, None)
    spent = failed_once(["X"])
    spent.failures = 3
    assert not attempts.may_retry(spent, 0, FAILED, err, "X")  # the budget still rules


@pytest.mark.parametrize(
    ("error_type", "ok"),
    [
        ("RateLimited", True),
        ("a" * MAX_ERROR_TYPE_BYTES, True),
        ("é" * (MAX_ERROR_TYPE_BYTES // 2), True),  # 256 bytes
        ("with space and : colon", True),
        ("a" * (MAX_ERROR_TYPE_BYTES + 1), False),
        ("é" * (MAX_ERROR_TYPE_BYTES // 2) + "a", False),  # 257 bytes in 129 characters
        ("Rate\nLimited", False),
        ("Rate\x00Limited", False),
        ("\x7f", False),
        ("\ud800", False),
    ],
)
def test_the_error_type_rule(error_type: str, ok: bool) -> None:
    problem = error_type_problem(error_type)
    assert (problem is None) is ok, problem
    if not ok:
        assert str(MAX_ERROR_TYPE_BYTES) in (problem or "")


def finished(*error_types: str) -> wpb.ConnectRequest:
    return wpb.ConnectRequest(
        action_finished=wpb.ActionFinished(
            results=[
                wpb.ActionResult(
                    lease_id=f"wf/a{i}/1",
                    fencing_token=1,
                    outcome=FAILED,
                    error=status(code_pb2.UNKNOWN, "x"),
                    error_type=t,
                )
                for i, t in enumerate(error_types)
            ]
        )
    )


def test_the_coordinator_takes_a_good_type_unchanged() -> None:
    msg = finished("", "RateLimited", "x" * MAX_ERROR_TYPE_BYTES)
    ReportCheck(Limits(), None).check(msg)
    types = [r.error_type for r in msg.action_finished.results]
    assert types == ["", "RateLimited", "x" * MAX_ERROR_TYPE_BYTES]


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("x" * (MAX_ERROR_TYPE_BYTES + 1), "is 257 bytes; the limit is 256 bytes"),
        ("Rate\tLimited", "control character"),
    ],
)
def test_the_coordinator_refuses_a_bad_type_naming_the_field_and_limit(bad: str, says: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        ReportCheck(Limits(), None).check(finished("Fine", bad))
    (v,) = info.value.violations
    assert v.field == "action_finished.results[1].error_type"
    assert says in v.description and "256" in v.description
