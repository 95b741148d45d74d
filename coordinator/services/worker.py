"""``plait.v1.WorkerService`` (edge layer): one bidirectional stream per worker.

The servicer only moves messages: each incoming message becomes a stimulus for the core, and
whatever the core decides for this session arrives on the session's queue after it has been
journalled. The first message must be ``hello``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any

from google.rpc import code_pb2

from plait.coordinator.auth import current_principal
from plait.coordinator.core.events import WorkerMessageReceived
from plait.coordinator.core.model import SessionEnd
from plait.coordinator.runtime import Runtime
from plait.errors import (
    AbortedError,
    AlreadyExistsError,
    FieldViolation,
    InvalidArgumentError,
    PermissionDeniedError,
    PlaitError,
)
from plait.ids import describe_id
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import worker_service_pb2_grpc as wgrpc

log = logging.getLogger(__name__)
MAX_SLOTS = 100_000
HELLO_TIMEOUT = 30.0


def check_hello(msg: wpb.ConnectRequest) -> None:
    """INVALID_ARGUMENT, naming the field, for a bad first message."""
    if msg.WhichOneof("message") != "hello":
        raise InvalidArgumentError(
            [FieldViolation("message", "the first message on a Connect stream must be hello")]
        )
    hello = msg.hello
    v = []
    why = describe_id(hello.worker_id)
    if why:
        v.append(FieldViolation("hello.worker_id", why))
    if not 1 <= hello.slots <= MAX_SLOTS:
        v.append(FieldViolation("hello.slots", f"is {hello.slots}; must be 1 to {MAX_SLOTS}"))
    for i, h in enumerate(hello.handlers):
        why = describe_id(h)
        if why:
            v.append(FieldViolation(f"hello.handlers[{i}]", why))
    if v:
        raise InvalidArgumentError(v)


def check_identity(worker_id: str, enabled: bool) -> str:
    """The identity a stream proved, which must be the worker id its Hello claims.

    Returns the authenticated worker id ("" when authentication is off).

    Raises:
        PermissionDeniedError: the certificate or token names another worker (or none).
    """
    principal = current_principal()
    if not enabled:
        return ""
    if principal.worker_id != worker_id:
        proven = f"worker {principal.worker_id!r}" if principal.worker_id else "no worker identity"
        raise PermissionDeniedError(
            f"hello.worker_id {worker_id!r} does not match the caller's identity:"
            f" {principal.describe()} proves {proven}"
        )
    return worker_id


def _ended(end: SessionEnd) -> PlaitError:
    """The error a stream the coordinator ends is closed with."""
    if end.code == code_pb2.ALREADY_EXISTS:
        return AlreadyExistsError(end.message)
    if end.code == code_pb2.PERMISSION_DENIED:
        return PermissionDeniedError(end.message)
    if end.code == code_pb2.INVALID_ARGUMENT:
        return InvalidArgumentError([FieldViolation(end.field or "message", end.message)])
    return AbortedError(end.message)


class WorkerService(wgrpc.WorkerServiceServicer):
    """Moves worker messages into the core and the core's messages out to workers."""

    def __init__(self, runtime: Runtime, *, auth_enabled: bool = False) -> None:
        self.runtime = runtime
        self.auth_enabled = auth_enabled

    async def Connect(
        self, request_iterator: AsyncIterator[wpb.ConnectRequest], context: Any
    ) -> AsyncIterator[wpb.ConnectResponse]:
        # Accepted (the interceptor authorized the call): say so before reading hello, so a
        # worker that waits for this before writing never races a refusal with its hello
        # (gRPC may then report the refusal as INTERNAL instead of its real status).
        await context.send_initial_metadata(())
        try:
            first = await asyncio.wait_for(anext(request_iterator), HELLO_TIMEOUT)
        except (StopAsyncIteration, TimeoutError):
            raise InvalidArgumentError(
                [FieldViolation("message", f"no hello within {HELLO_TIMEOUT:g}s")]
            ) from None
        check_hello(first)
        worker_id = first.hello.worker_id
        identity = check_identity(worker_id, self.auth_enabled)
        rt = self.runtime
        session_id, outbox = rt.open_session()
        cause = f"worker-{worker_id}"
        rt.post(
            WorkerMessageReceived(
                f"hello-{worker_id}",
                session_id,
                first,
                identity=identity,
                peer=str(context.peer() or ""),
                resume_token=secrets.token_urlsafe(32),
            )
        )

        async def pump() -> None:
            try:
                async for msg in request_iterator:
                    rt.post(WorkerMessageReceived(cause, session_id, msg))
            except Exception as e:  # the stream broke: the session ends below
                log.info("worker %s stream ended: %s", worker_id, e)
            finally:
                outbox.put_nowait(None)

        reader = asyncio.create_task(pump(), name=f"plait-worker-{worker_id}")
        try:
            while True:
                msg = await outbox.get()
                if msg is None:
                    return
                if isinstance(msg, SessionEnd):
                    log.warning(
                        "worker %s stream ended by the coordinator: %s", worker_id, msg.message
                    )
                    raise _ended(msg)
                yield msg
        finally:
            reader.cancel()
            rt.close_session(session_id)
