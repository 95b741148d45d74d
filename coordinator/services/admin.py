"""``plait.v1.AdminService`` (edge layer)."""

from __future__ import annotations

from typing import Any

from plait.coordinator.core import views
from plait.coordinator.core.events import DrainRequested
from plait.coordinator.core.validate import describe_id
from plait.coordinator.runtime import Runtime
from plait.coordinator.services.workflow import merge_client_hlc
from plait.errors import FieldViolation, InvalidArgumentError
from plait.v1 import admin_service_pb2 as apb
from plait.v1 import admin_service_pb2_grpc as agrpc


class AdminService(agrpc.AdminServiceServicer):
    """Workers, for operators."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def ListWorkers(
        self, request: apb.ListWorkersRequest, context: Any
    ) -> apb.ListWorkersResponse:
        merge_client_hlc(self.runtime, request.hlc)
        st = self.runtime.state
        resp = apb.ListWorkersResponse(
            workers=[
                views.worker_info(st, w)
                for w in sorted(st.workers.values(), key=lambda w: w.worker_id)
                if w.connected
            ]
        )
        st.hlc.stamp(resp.hlc)
        return resp

    async def DrainWorker(
        self, request: apb.DrainWorkerRequest, context: Any
    ) -> apb.DrainWorkerResponse:
        merge_client_hlc(self.runtime, request.hlc)
        why = describe_id(request.worker_id)
        if why:
            raise InvalidArgumentError([FieldViolation("worker_id", why)])
        rt = self.runtime
        await rt.call(lambda reply: DrainRequested(rt.next_id("drain"), request.worker_id, reply))
        resp = apb.DrainWorkerResponse()
        rt.state.hlc.stamp(resp.hlc)
        return resp
