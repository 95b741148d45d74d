"""The error tree (plait.errors) survives a real gRPC round trip with its details intact.

A real ``grpc.aio`` server on 127.0.0.1:0 serves ``WorkflowService`` and aborts the way the
coordinator's interceptor will: with the error's ``google.rpc.Status`` (BadRequest details in
the trailing metadata). The client turns the ``RpcError`` back with ``from_rpc_error``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_status import rpc_status

from plait.errors import (
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    PlaitError,
    ResourceExhaustedError,
    from_rpc_error,
    status_message,
)
from plait.v1 import workflow_service_pb2 as ws
from plait.v1 import workflow_service_pb2_grpc as ws_grpc

VIOLATIONS = [
    FieldViolation("spec.actions[1].needs[0]", "unknown action 'ghost'"),
    FieldViolation("spec.actions[2].id", "duplicate id 'a'"),
]


class RaisingWorkflowService(ws_grpc.WorkflowServiceServicer):
    """Raises whatever error the test put in ``self.error``."""

    def __init__(self) -> None:
        self.error: PlaitError | None = None

    async def SubmitWorkflow(
        self, request: ws.SubmitWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> ws.SubmitWorkflowResponse:
        if self.error is not None:
            await context.abort_with_status(rpc_status.to_status(self.error.to_status()))
        return ws.SubmitWorkflowResponse(workflow_id="wf-1", created=True)


@pytest.fixture
async def served() -> AsyncIterator[tuple[RaisingWorkflowService, ws_grpc.WorkflowServiceStub]]:
    server = grpc.aio.server()
    service = RaisingWorkflowService()
    ws_grpc.add_WorkflowServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield service, ws_grpc.WorkflowServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(grace=None)


async def _call(stub: ws_grpc.WorkflowServiceStub) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SubmitWorkflow(ws.SubmitWorkflowRequest(), timeout=10)
    return info.value


async def test_invalid_argument_round_trips_with_field_violations(
    served: tuple[RaisingWorkflowService, ws_grpc.WorkflowServiceStub],
) -> None:
    service, stub = served
    service.error = InvalidArgumentError(VIOLATIONS)

    err = await _call(stub)
    back = from_rpc_error(err)

    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(back, InvalidArgumentError)
    assert back.violations == VIOLATIONS
    assert "spec.actions[1].needs[0]: unknown action 'ghost'" in (err.details() or "")
    assert back.message == service.error.message


async def test_invalid_argument_without_details_keeps_the_message(
    served: tuple[RaisingWorkflowService, ws_grpc.WorkflowServiceStub],
) -> None:
    service, stub = served
    service.error = InvalidArgumentError("workflow has no actions")

    back = from_rpc_error(await _call(stub))

    assert isinstance(back, InvalidArgumentError)
    assert [v.description for v in back.violations] == ["workflow has no actions"]


@pytest.mark.parametrize(
    "error",
    [
        NotFoundError("workflow wf-9 not found"),
        FailedPreconditionError("lease token 3 superseded by 4"),
        ResourceExhaustedError("request of 5242880 bytes over the 4194304-byte limit"),
    ],
)
async def test_other_errors_come_back_as_the_same_class(
    served: tuple[RaisingWorkflowService, ws_grpc.WorkflowServiceStub], error: PlaitError
) -> None:
    service, stub = served
    service.error = error

    err = await _call(stub)
    back = from_rpc_error(err)

    assert err.code() == error.code
    assert type(back) is type(error)
    assert back.message == error.message


async def test_unmapped_code_becomes_a_plain_plait_error_with_that_code(
    served: tuple[RaisingWorkflowService, ws_grpc.WorkflowServiceStub],
) -> None:
    service, stub = served
    service.error = PlaitError("journal write failed")

    back = from_rpc_error(await _call(stub))

    assert type(back) is PlaitError
    assert back.code == grpc.StatusCode.INTERNAL
    assert back.message == "journal write failed"


def test_message_lists_ten_violations_then_counts_the_rest() -> None:
    many = [FieldViolation(f"spec.actions[{i}].id", "bad id") for i in range(13)]

    err = InvalidArgumentError(many)

    assert "spec.actions[9].id: bad id" in err.message
    assert "spec.actions[10].id" not in err.message
    assert err.message.endswith("; and 3 more")
    assert len(err.violations) == 13


def test_status_message_carries_code() -> None:
    status = status_message(grpc.StatusCode.FAILED_PRECONDITION, "reconnect")

    assert status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert status.message == "reconnect"
