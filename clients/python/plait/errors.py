"""The one exception tree of Plait (foundation layer).

Each subclass of :class:`PlaitError` has one meaning and one gRPC status code. Servers raise
them and a single interceptor turns them into statuses (with ``google.rpc`` details such as
``BadRequest`` field violations); clients turn statuses back into the same classes with
:func:`from_rpc_error`, so both sides speak one vocabulary.

:class:`ActionError` stands apart: a handler raises it to fail its attempt with a type of its
choosing (``ActionResult.error_type``), which ``RetryPolicy.retryable_errors`` matches;
:func:`error_type_problem` is the one rule for such a type, applied by the worker SDK before
sending and by the coordinator on receipt.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field: its path in the request (``spec.actions[3].needs[0]``) and what is wrong."""

    field: str
    description: str

    def __str__(self) -> str:
        return f"{self.field}: {self.description}"


class PlaitError(Exception):
    """Base of every error Plait raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_status(self) -> status_pb2.Status:
        """The ``google.rpc.Status`` this error travels as."""
        return status_pb2.Status(code=self.code.value[0], message=self.message)


class InvalidArgumentError(PlaitError):
    """A request is malformed; ``violations`` name each bad field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: Sequence[FieldViolation] | str) -> None:
        if isinstance(violations, str):
            violations = [FieldViolation("", violations)]
        self.violations = list(violations)
        shown = "; ".join(str(v) if v.field else v.description for v in self.violations[:10])
        more = len(self.violations) - 10
        super().__init__(shown + (f"; and {more} more" if more > 0 else ""))

    def to_status(self) -> status_pb2.Status:
        status = super().to_status()
        detail = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in self.violations
            ]
        )
        status.details.add().Pack(detail)
        return status


class NotFoundError(PlaitError):
    """The named workflow, action or worker does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class FailedPreconditionError(PlaitError):
    """The request is well-formed but the state forbids it (e.g. a stale fencing token)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class AlreadyExistsError(PlaitError):
    """Something with that name exists (e.g. a worker id already connected)."""

    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhaustedError(PlaitError):
    """A size or rate limit was hit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(PlaitError):
    """The service cannot answer now (shutting down, not the leader); retry elsewhere or later."""

    code = grpc.StatusCode.UNAVAILABLE


LEADER_REASON = "NOT_LEADER"
ERROR_DOMAIN = "plait.dev"


class NotLeaderError(UnavailableError):
    """This coordinator is a standby; ``leader`` is the address of the one to use, if known.

    Travels as UNAVAILABLE with a ``google.rpc.ErrorInfo`` detail (reason ``NOT_LEADER``,
    domain ``plait.dev``, metadata ``{"leader": "HOST:PORT"}``); clients and workers that were
    given several coordinator addresses switch to the leader named there.
    """

    def __init__(self, leader: str | None) -> None:
        self.leader = leader or None
        where = f"; the leader is {leader}" if leader else "; no leader is known yet"
        super().__init__("this coordinator is a standby" + where)

    def to_status(self) -> status_pb2.Status:
        status = super().to_status()
        info = error_details_pb2.ErrorInfo(reason=LEADER_REASON, domain=ERROR_DOMAIN)
        if self.leader:
            info.metadata["leader"] = self.leader
        status.details.add().Pack(info)
        return status


def not_leader(status: status_pb2.Status) -> NotLeaderError | None:
    """The NotLeaderError a status carries (a standby's answer), if it is one."""
    for any_detail in status.details:
        if any_detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            any_detail.Unpack(info)
            if info.reason == LEADER_REASON:
                return NotLeaderError(info.metadata.get("leader"))
    return None


def leader_hint(status: status_pb2.Status) -> str | None:
    """The leader address a standby named in a status, if any."""
    err = not_leader(status)
    return err.leader if err is not None else None


class UnauthenticatedError(PlaitError):
    """No credentials, or credentials that prove nothing (a bad token, no client certificate)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(PlaitError):
    """The caller is known but its roles do not allow the RPC; the message names both."""

    code = grpc.StatusCode.PERMISSION_DENIED


class AbortedError(PlaitError):
    """The call was ended by something newer (a worker stream replaced by a newer session)."""

    code = grpc.StatusCode.ABORTED


class ConfigError(PlaitError):
    """A configuration is unsafe or malformed; daemons refuse to start (exit 2)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


_BY_CODE: dict[grpc.StatusCode, type[PlaitError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        FailedPreconditionError,
        AlreadyExistsError,
        ResourceExhaustedError,
        UnavailableError,
        UnauthenticatedError,
        PermissionDeniedError,
        AbortedError,
    )
}


def status_message(code: grpc.StatusCode, message: str) -> status_pb2.Status:
    """A bare ``google.rpc.Status``."""
    return status_pb2.Status(code=code.value[0], message=message)


def ok_status() -> status_pb2.Status:
    """``google.rpc.Status`` OK."""
    return status_pb2.Status(code=code_pb2.OK)


def violations_of(status: status_pb2.Status) -> list[FieldViolation]:
    """Field violations carried in a status's ``BadRequest`` details."""
    out: list[FieldViolation] = []
    for any_detail in status.details:
        if any_detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            any_detail.Unpack(bad)
            out.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
    return out


def from_rpc_error(err: grpc.RpcError) -> PlaitError:
    """Turns a client-side ``grpc.RpcError`` back into the matching :class:`PlaitError`."""
    from grpc_status import rpc_status

    code: grpc.StatusCode = err.code()  # type: ignore[attr-defined,unused-ignore]
    details: str = err.details() or ""  # type: ignore[attr-defined,unused-ignore]
    status = rpc_status.from_call(err)  # type: ignore[arg-type,unused-ignore]
    cls = _BY_CODE.get(code)
    if cls is UnavailableError and status is not None:
        standby = not_leader(status)
        if standby is not None:
            return standby
    if cls is InvalidArgumentError:
        violations = violations_of(status) if status is not None else []
        return InvalidArgumentError(violations or details)
    if cls is not None:
        return cls(details)
    generic = PlaitError(details or code.name)
    generic.code = code
    return generic


def join_violations(groups: Iterable[Sequence[FieldViolation]]) -> list[FieldViolation]:
    """Flattens groups of violations."""
    return [v for g in groups for v in g]


MAX_ERROR_TYPE_BYTES = 256
"""Longest ``ActionResult.error_type``, in UTF-8 bytes (a fixed protocol limit)."""
_NOT_IN_A_TYPE = frozenset({"Cc", "Cs"})  # control characters; surrogates are not UTF-8


def error_type_problem(error_type: str) -> str | None:
    """Why ``error_type`` may not travel as ``ActionResult.error_type``, or None if it may.

    The rule: at most :data:`MAX_ERROR_TYPE_BYTES` UTF-8 bytes and no control characters. The
    coordinator refuses a result that breaks it (INVALID_ARGUMENT naming ``error_type``), so the
    worker SDK checks by the same rule and never sends one.
    """
    if len(error_type) * 4 > MAX_ERROR_TYPE_BYTES:  # else it fits whatever its characters
        size = len(error_type.encode("utf-8", "surrogatepass"))
        if size > MAX_ERROR_TYPE_BYTES:
            return f"is {size} bytes; the limit is {MAX_ERROR_TYPE_BYTES} bytes"
    if any(unicodedata.category(ch) in _NOT_IN_A_TYPE for ch in error_type):
        return (
            "has a control character (or a lone surrogate); it must be at most"
            f" {MAX_ERROR_TYPE_BYTES} bytes without control characters"
        )
    return None


class ActionError(Exception):
    """Raised by a handler to fail its attempt with a type a retry policy can match.

    ``type`` becomes the attempt's ``ActionResult.error_type``, which
    ``RetryPolicy.retryable_errors`` matches exactly; without it the type is the class name, so
    ``class RateLimited(plait.ActionError)`` is typed ``RateLimited``. Any other exception a
    handler raises is typed by its class name (``TimeoutError``). ``message`` is for people
    (the error message is never parsed).

    Example::

        raise plait.ActionError("the mirror said 429", type="RateLimited")

    Raises:
        ValueError: ``type`` is over 256 UTF-8 bytes or has a control character.
    """

    def __init__(self, message: str, *, type: str = "") -> None:
        super().__init__(message)
        self.message = message
        chosen = type or self.__class__.__name__
        problem = error_type_problem(chosen)
        if problem is not None:
            raise ValueError(f"ActionError type {chosen[:64]!r} {problem}")
        self.type = chosen
