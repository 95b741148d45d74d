"""Maps the one exception tree to gRPC statuses, once, for every service (edge layer).

:class:`ErrorInterceptor` wraps every RPC handler so that:

* a :class:`~plait.errors.PlaitError` becomes its status (with ``google.rpc`` details); an
  INVALID_ARGUMENT is also counted and logged by :class:`InputRefusals`;
* request bytes that do not decode as the RPC's message are INVALID_ARGUMENT naming the
  message type. gRPC Python calls the request deserializer outside the handler and reports
  whatever it raises as UNKNOWN ("Unexpected <class 'DecodeError'>"), so the deserializer is
  replaced by one that never raises: it returns an :class:`Undecodable` marker, and the
  wrapped handler refuses the call (a unary request) or the stream message (a request
  stream) that carried it;
* any other exception ends only that RPC or stream, with INTERNAL; its traceback is logged
  once a minute per RPC and exception type by :class:`InternalErrors`. The process goes on.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.rpc import code_pb2, status_pb2
from grpc_status import rpc_status

from plait.clock import Clock
from plait.errors import FieldViolation, InvalidArgumentError, PlaitError

log = logging.getLogger(__name__)

_FACTORIES = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)
_INDEX = re.compile(r"\[[^\]]*\]")
_MAX_LABEL = 120
WORKER_SERVICE = "/plait.v1.WorkerService/"


class Throttle:
    """Says whether a key was last seen more than ``interval`` seconds ago (then records it)."""

    def __init__(self, clock: Clock, interval: float = 60.0, max_keys: int = 10_000) -> None:
        self.clock = clock
        self.interval = interval
        self.max_keys = max_keys
        self._last: dict[tuple[str, ...], float] = {}

    def first(self, key: tuple[str, ...]) -> bool:
        now = self.clock.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            return False
        if len(self._last) >= self.max_keys:  # bounded: peers come and go
            self._last.clear()
        self._last[key] = now
        return True


def field_label(field: str) -> str:
    """A violation's field path as a bounded metric label: indices and map keys dropped
    (``spec.actions[3].env['A']`` -> ``spec.actions[].env[]``)."""
    return _INDEX.sub("[]", field)[:_MAX_LABEL] or "request"


class InputRefusals:
    """Counts refused input and logs it, at most once a minute per (source, field, peer host).

    ``source`` is ``client`` (WorkflowService, AdminService) or ``worker`` (WorkerService);
    the counter is ``plait_input_refused_total{source, field}``.
    """

    def __init__(self, clock: Clock, counter: Any = None) -> None:
        self.counter = counter
        self._throttle = Throttle(clock)

    def refused(
        self,
        source: str,
        field: str,
        description: str,
        *,
        peer: str = "",
        what: str = "",
        count: int = 1,
    ) -> None:
        """Records ``count`` refusals of one field; ``what`` says what became of it (logged)."""
        label = field_label(field)
        if self.counter is not None:
            self.counter.labels(source, label).inc(count)
        host = peer.rpartition(":")[0] or peer
        if self._throttle.first((source, label, host)):
            log.warning(
                "refused %s input from %s: %s: %s%s (further ones from there counted in"
                " plait_input_refused_total, logged again in a minute)",
                source,
                peer or "?",
                field or "request",
                description,
                f"; {what}" if what else "",
            )

    def refused_error(self, source: str, err: InvalidArgumentError, peer: str = "") -> None:
        """Records the violations of an INVALID_ARGUMENT error, once per field label (a submit
        of 100,000 bad actions costs one counter update per kind of mistake)."""
        firsts: dict[str, tuple[FieldViolation, int]] = {}
        for v in err.violations or [FieldViolation("", err.message)]:
            label = field_label(v.field)
            first, n = firsts.get(label, (v, 0))
            firsts[label] = (first, n + 1)
        for v, n in firsts.values():
            self.refused(source, v.field, v.description, peer=peer, count=n)


class InternalErrors:
    """Counts unexpected exceptions (``plait_internal_errors_total{where}``) and logs each
    (where, exception type) with its traceback at most once a minute."""

    def __init__(self, clock: Clock, counter: Any = None) -> None:
        self.counter = counter
        self._throttle = Throttle(clock, max_keys=1000)

    def failed(self, where: str, err: BaseException, context: str = "") -> None:
        """Records one unexpected exception raised while handling ``where``."""
        if self.counter is not None:
            self.counter.labels(where).inc()
        if self._throttle.first((where, type(err).__name__)):
            log.error(
                "internal error in %s%s: %s: %s (only this call or stream ends; the same error"
                " is logged again in a minute at most)",
                where,
                f" ({context})" if context else "",
                type(err).__name__,
                err,
                exc_info=err,
            )


class Undecodable:
    """What the request deserializer returns for bytes that are not the expected message."""

    __slots__ = ("message_type", "reason", "size")

    def __init__(self, message_type: str, size: int, reason: str) -> None:
        self.message_type = message_type
        self.size = size
        self.reason = reason

    def error(self, field: str) -> InvalidArgumentError:
        """INVALID_ARGUMENT naming the field (``request``, or ``message`` on a stream)."""
        return InvalidArgumentError(
            [
                FieldViolation(
                    field,
                    f"{self.size} bytes that do not decode as {self.message_type} ({self.reason})",
                )
            ]
        )


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The deserializer, returning :class:`Undecodable` instead of raising."""
    if deserializer is None:
        return None
    cls = getattr(deserializer, "__self__", None)
    descriptor = getattr(cls, "DESCRIPTOR", None)
    message_type = getattr(descriptor, "full_name", "the request message")

    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as e:  # DecodeError (bad wire format, invalid UTF-8) or worse
            reason = str(e).rpartition(": ")[2] or type(e).__name__
            return Undecodable(message_type, len(raw), reason)

    return parse


async def _messages(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A request stream that raises INVALID_ARGUMENT at the first undecodable message."""
    async for msg in requests:
        if isinstance(msg, Undecodable):
            raise msg.error("message")
        yield msg


class _Call:
    """What the wrapper of one RPC knows: its name, its audience, where refusals go."""

    __slots__ = ("errors", "method", "refusals", "source")

    def __init__(
        self, method: str, refusals: InputRefusals | None, errors: InternalErrors | None
    ) -> None:
        self.method = method
        self.source = "worker" if method.startswith(WORKER_SERVICE) else "client"
        self.refusals = refusals
        self.errors = errors

    async def refuse(self, context: Any, err: PlaitError) -> None:
        if isinstance(err, InvalidArgumentError) and self.refusals is not None:
            self.refusals.refused_error(self.source, err, str(context.peer() or ""))
        else:
            log.debug("refused: %s", err.message)
        await context.abort_with_status(rpc_status.to_status(err.to_status()))

    async def fail(self, context: Any, err: Exception) -> None:
        rpc = self.method.rpartition("/")[2] or self.method
        if self.errors is not None:
            self.errors.failed(rpc, err, str(context.peer() or ""))
        else:
            log.error("internal error in %s", rpc, exc_info=err)
        status = status_pb2.Status(
            code=code_pb2.INTERNAL,
            message=f"internal error in {rpc} ({type(err).__name__}); the coordinator logged it",
        )
        await context.abort_with_status(rpc_status.to_status(status))


def _wrap(behavior: Callable[..., Any], call: _Call, request_stream: bool) -> Callable[..., Any]:
    """The same handler: PlaitError turned into its status, anything else into INTERNAL, and
    undecodable requests into INVALID_ARGUMENT."""

    def checked(request: Any) -> Any:
        if request_stream:
            return _messages(request)
        if isinstance(request, Undecodable):
            raise request.error("request")
        return request

    if inspect.isasyncgenfunction(behavior):  # streams responses by yielding

        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                async for item in behavior(checked(request), context):
                    yield item
            except PlaitError as e:
                await call.refuse(context, e)
            except grpc.aio.BaseError:
                raise  # gRPC's own control flow (an abort already under way)
            except Exception as e:
                await call.fail(context, e)

        return stream

    async def unary(request: Any, context: Any) -> Any:  # returns, or writes with context.write
        try:
            return await behavior(checked(request), context)
        except PlaitError as e:
            await call.refuse(context, e)
        except grpc.aio.BaseError:
            raise
        except Exception as e:
            await call.fail(context, e)

    return unary


def rewrap(
    handler: Any,
    wrap: Callable[[Callable[..., Any]], Callable[..., Any]],
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> Any:
    """The same RPC method handler with its behavior replaced by ``wrap(behavior)`` (and its
    request deserializer by ``request_deserializer``, when given)."""
    for attr, factory in _FACTORIES:
        behavior = getattr(handler, attr)
        if behavior is not None:
            return factory(
                wrap(behavior),
                request_deserializer=request_deserializer or handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns :class:`plait.errors.PlaitError` into its status with ``google.rpc`` details,
    undecodable requests into INVALID_ARGUMENT and unexpected exceptions into INTERNAL."""

    def __init__(
        self, refusals: InputRefusals | None = None, errors: InternalErrors | None = None
    ) -> None:
        self.refusals = refusals
        self.errors = errors

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return None
        call = _Call(handler_call_details.method, self.refusals, self.errors)
        request_stream = bool(handler.request_streaming)
        return rewrap(
            handler,
            lambda behavior: _wrap(behavior, call, request_stream),
            tolerant(handler.request_deserializer),
        )
