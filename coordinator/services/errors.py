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


async def _abort(context: grpc.aio.ServicerContext[Any, Any], err: PlaitError) -> None:
    await context.abort_with_status(rpc_status.to_status(err.to_status()))


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns :class:`plait.errors.PlaitError` into its status with ``google.rpc`` details."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: Any) -> Any:
                try:
                    return await inner_uu(request, context)
                except PlaitError as e:
                    log.debug("%s refused: %s", method, e.message)
                    await _abort(context, e)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None and not inspect.isasyncgenfunction(
            handler.unary_stream
        ):
            # A streaming handler written with context.write() (e.g. grpc.health.v1 Watch).
            inner_uw = handler.unary_stream

            async def unary_write(request: Any, context: Any) -> None:
                try:
                    await inner_uw(request, context)
                except PlaitError as e:
                    await _abort(context, e)

            return grpc.unary_stream_rpc_method_handler(
                unary_write,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
                try:
                    async for item in inner_us(request, context):
                        yield item
                except PlaitError as e:
                    await _abort(context, e)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None and not inspect.isasyncgenfunction(
            handler.stream_stream
        ):
            inner_sw = handler.stream_stream

            async def stream_write(request_iterator: Any, context: Any) -> None:
                try:
                    await inner_sw(request_iterator, context)
                except PlaitError as e:
                    await _abort(context, e)

            return grpc.stream_stream_rpc_method_handler(
                stream_write,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            inner_ss = handler.stream_stream

            async def stream_stream(request_iterator: Any, context: Any) -> AsyncIterator[Any]:
                try:
                    async for item in inner_ss(request_iterator, context):
                        yield item
                except PlaitError as e:
                    await _abort(context, e)

            return grpc.stream_stream_rpc_method_handler(
                stream_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
