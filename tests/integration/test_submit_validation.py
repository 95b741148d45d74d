"""A big submit is validated off the event loop, with the same answers as a small one.

``SubmitWorkflow`` validates a spec of ``VALIDATE_OFF_LOOP_ACTIONS`` actions or more in a
thread: the coordinator keeps serving (heartbeats, other RPCs) meanwhile, and a bad spec is
refused exactly as :func:`validate_submit` says, whichever path it took.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from plait.coordinator.config import Limits
from plait.coordinator.server import CoordinatorServer
from plait.coordinator.services import workflow as workflow_service
from plait.errors import FieldViolation, InvalidArgumentError
from plait.spec.validate import validate_submit
from plait.v1 import admin_service_pb2 as apb
from plait.v1 import admin_service_pb2_grpc as agrpc
from plait.v1 import workflow_pb2 as pb
from plait.v1 import workflow_service_pb2 as wspb
from plait.v1 import workflow_service_pb2_grpc as wsgrpc

BIG = workflow_service.VALIDATE_OFF_LOOP_ACTIONS


def flawed(n: int) -> pb.WorkflowSpec:
    """``n`` actions with a duplicate id, an unknown need, a bad duration and a cycle."""
    spec = pb.WorkflowSpec(name="flawed")
    for i in range(n):
        spec.actions.add(id=f"a{i}", handler="h", needs=[f"a{i - 1}"] if i else [])
    spec.actions[0].needs.append("a1")  # the cycle (reported once all else is fine)
    spec.actions[5].id = "a6"
    spec.actions[4].needs.append("nope")
    spec.actions[3].timeout.seconds = -1
    return spec


def violations(spec: pb.WorkflowSpec) -> list[tuple[str, str]]:
    """What validate_submit itself says about ``spec``."""
    with pytest.raises(InvalidArgumentError) as err:
        validate_submit(spec, "", Limits())
    return [(v.field, v.description) for v in err.value.violations]


async def refused(port: int, spec: pb.WorkflowSpec) -> tuple[str, list[tuple[str, str]]]:
    """The status message and BadRequest violations a submit of ``spec`` is refused with."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await wsgrpc.WorkflowServiceStub(ch).SubmitWorkflow(  # type: ignore[no-untyped-call]
                wspb.SubmitWorkflowRequest(spec=spec)
            )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(info.value)  # type: ignore[arg-type]
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    return info.value.details() or "", [(v.field, v.description) for v in bad.field_violations]


@pytest.mark.parametrize("n", [8, BIG, 3 * BIG])
async def test_a_bad_spec_is_refused_the_same_on_either_path(
    coordinator: CoordinatorServer, n: int
) -> None:
    spec = flawed(n)
    expected = violations(spec)
    assert {"spec.actions[6].id", "spec.actions[3].timeout", "spec.actions[4].needs[1]"} <= {
        f for f, _ in expected
    }
    message, got = await refused(coordinator.port, spec)
    assert got == expected
    assert message == str(InvalidArgumentError([FieldViolation(*v) for v in expected]))
    # Fixed but for the cycle: that is reported alone, after the rest passes.
    spec.actions[5].id, spec.actions[3].timeout.seconds = "a5", 1
    del spec.actions[4].needs[1]
    (cycle,) = violations(spec)
    assert cycle == ("spec.actions[0].needs", "cycle: a0 -> a1 -> a0")
    assert (await refused(coordinator.port, spec))[1] == [cycle]


def many_actions() -> pb.WorkflowSpec:
    spec = pb.WorkflowSpec(name="many")
    for i in range(BIG):
        spec.actions.add(id=f"a{i}", handler="h")
    return spec


def big_input() -> pb.WorkflowSpec:
    spec = pb.WorkflowSpec(name="big-input")
    text = '"' + "x" * workflow_service.VALIDATE_OFF_LOOP_BYTES + '"'
    spec.actions.add(id="a", handler="h", input_json=text)
    return spec


@pytest.mark.parametrize("make", [many_actions, big_input])
async def test_the_loop_serves_while_a_big_spec_is_validated(
    coordinator: CoordinatorServer,
    monkeypatch: pytest.MonkeyPatch,
    make: Callable[[], pb.WorkflowSpec],
) -> None:
    loop = asyncio.get_running_loop()
    entered = asyncio.Event()
    release = threading.Event()
    real = workflow_service.validate_submit

    def gated(spec: pb.WorkflowSpec, key: str, limits: Limits) -> None:
        loop.call_soon_threadsafe(entered.set)
        # On the loop this would wait forever: nothing could answer the ping that releases it.
        assert release.wait(30), "validation held the event loop"
        real(spec, key, limits)

    monkeypatch.setattr(workflow_service, "validate_submit", gated)
    spec = make()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{coordinator.port}") as ch:
        stub = wsgrpc.WorkflowServiceStub(ch)  # type: ignore[no-untyped-call]
        submit = asyncio.ensure_future(stub.SubmitWorkflow(wspb.SubmitWorkflowRequest(spec=spec)))
        try:
            await asyncio.wait_for(entered.wait(), 30)
            admin = agrpc.AdminServiceStub(ch)  # type: ignore[no-untyped-call]
            await asyncio.wait_for(admin.ListWorkers(apb.ListWorkersRequest()), 10)
            assert not submit.done()
        finally:
            release.set()
        reply = await asyncio.wait_for(submit, 30)
    assert reply.created
    status = coordinator.runtime.state.workflows[reply.workflow_id]
    assert len(status.actions) == len(spec.actions)
