"""Maps the one exception tree to gRPC statuses, once, for every service (edge layer)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_status import rpc_status

from plait.errors import PlaitError

log = logging.getLogger(__name__)

_FACTORIES = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)


async def _abort(context: Any, err: PlaitError) -> None:
    log.debug("refused: %s", err.message)
    await context.abort_with_status(rpc_status.to_status(err.to_status()))


def _wrap(behavior: Callable[..., Any]) -> Callable[..., Any]:
    """The same handler, with PlaitError turned into its status."""
    if inspect.isasyncgenfunction(behavior):  # streams responses by yielding

        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                async for item in behavior(request, context):
                    yield item
            except PlaitError as e:
                await _abort(context, e)

        return stream

    async def call(request: Any, context: Any) -> Any:  # returns, or writes with context.write
        try:
            return await behavior(request, context)
        except PlaitError as e:
            await _abort(context, e)

    return call


def rewrap(handler: Any, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Any:
    """The same RPC method handler with its behavior replaced by ``wrap(behavior)``."""
    for attr, factory in _FACTORIES:
        behavior = getattr(handler, attr)
        if behavior is not None:
            return factory(
                wrap(behavior),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns :class:`plait.errors.PlaitError` into its status with ``google.rpc`` details."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler: Any = await continuation(handler_call_details)
        return None if handler is None else rewrap(handler, _wrap)
