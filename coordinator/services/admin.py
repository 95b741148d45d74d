"""``plait.v1.AdminService`` (edge layer)."""

from __future__ import annotations

from typing import Any

from plait.coordinator.auth import current_principal
from plait.coordinator.core import views
from plait.coordinator.core.events import DrainRequested
from plait.coordinator.runtime import Runtime
from plait.coordinator.services.workflow import merge_client_hlc
from plait.errors import FieldViolation, InvalidArgumentError
from plait.ids import describe_id
from plait.v1 import admin_service_pb2 as apb
from plait.v1 import admin_service_pb2_grpc as agrpc

MAX_REASON_BYTES = 1024


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
        for worker_id in sorted(st.revoked):
            rev = st.revoked[worker_id]
            item = resp.revoked.add(
                worker_id=worker_id, reason=rev.reason, revoked_by=rev.revoked_by
            )
            item.revoked_at.FromMilliseconds(rev.at_wall_ms)
        self.runtime.stamp(resp.hlc)
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
        rt.stamp(resp.hlc)
        return resp

    async def RevokeWorker(
        self, request: apb.RevokeWorkerRequest, context: Any
    ) -> apb.RevokeWorkerResponse:
        merge_client_hlc(self.runtime, request.hlc)
        v = []
        why = describe_id(request.worker_id)
        if why:
            v.append(FieldViolation("worker_id", why))
        if len(request.reason.encode()) > MAX_REASON_BYTES:
            v.append(
                FieldViolation(
                    "reason",
                    f"is {len(request.reason.encode())} bytes; the limit is {MAX_REASON_BYTES}",
                )
            )
        elif any(ord(c) < 32 for c in request.reason):
            v.append(FieldViolation("reason", "must not contain control characters"))
        if v:
            raise InvalidArgumentError(v)
        was_connected, requeued = await self.runtime.revoke_worker(
            request.worker_id, request.reason, current_principal().name
        )
        resp = apb.RevokeWorkerResponse(was_connected=was_connected, leases_requeued=requeued)
        self.runtime.stamp(resp.hlc)
        return resp

    async def ReinstateWorker(
        self, request: apb.ReinstateWorkerRequest, context: Any
    ) -> apb.ReinstateWorkerResponse:
        merge_client_hlc(self.runtime, request.hlc)
        why = describe_id(request.worker_id)
        if why:
            raise InvalidArgumentError([FieldViolation("worker_id", why)])
        was = await self.runtime.reinstate_worker(request.worker_id, current_principal().name)
        resp = apb.ReinstateWorkerResponse(was_revoked=was)
        self.runtime.stamp(resp.hlc)
        return resp
