"""The web UI's JSON endpoints (edge layer): the API's own servicers, called in process.

Each endpoint authorizes its caller as the RPC it serves (:mod:`.access`), then calls that
RPC's servicer method (``WorkflowService.GetWorkflow``, ``AdminService.ListWorkers``, ...)
with the request a gRPC client would send, and turns the answer into JSON (:mod:`.convert`).
So the UI shows what ``plait status`` shows, validated and refused the same way; there is no
second reading of the coordinator's state here.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from typing import Any

from aiohttp import web

from plait.coordinator.auth import Authenticator, Principal, RefusalLog
from plait.coordinator.services.admin import AdminService
from plait.coordinator.services.workflow import WorkflowService
from plait.coordinator.ui import convert
from plait.coordinator.ui.access import HttpCall, authorize, set_token_cookie
from plait.errors import FieldViolation, InvalidArgumentError, NotFoundError, PlaitError
from plait.v1 import admin_service_pb2 as apb
from plait.v1 import workflow_pb2 as pb
from plait.v1 import workflow_service_pb2 as wspb

__all__ = ["MAX_NAME_CHARS", "UiApi", "error_body", "http_status", "json_response", "rpc"]

log = logging.getLogger(__name__)

MAX_NAME_CHARS = 256  # the list's name filter
MAX_LIST = 1000  # workflows per list answer (ListWorkflows' page limit)
MAX_ACTIONS = 20_000  # actions in one workflow answer; a larger workflow is shown in part
MAX_SPEC = 5000  # actions of a spec sent for drawing (the page draws at most 2000)
MAX_OUTPUTS_BYTES = 1 << 20  # outputs shown per action
SPEC_CACHE = 64  # workflow specs kept (they never change once submitted)
_STATUS = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "FAILED_PRECONDITION": 409,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
}


def rpc(service: str, method: str) -> str:
    """The full name of an RPC, as :data:`~plait.coordinator.auth.RPC_ROLES` keys it."""
    return f"/plait.v1.{service}/{method}"


def http_status(err: PlaitError) -> int:
    """The HTTP status of an error of the API (500 for anything unexpected)."""
    return _STATUS.get(err.code.name, 500)


def error_body(err: PlaitError) -> dict[str, Any]:
    """``{"error": message, "code": "NOT_FOUND", "fields": [...]}``; ``login`` when a token
    would help."""
    body: dict[str, Any] = {"error": err.message, "code": err.code.name}
    if isinstance(err, InvalidArgumentError):
        body["fields"] = [{"field": v.field, "description": v.description} for v in err.violations]
    if err.code.name == "UNAUTHENTICATED":
        body["login"] = True
    return body


def json_response(value: Any, status: int = 200) -> web.Response:
    """A JSON answer that is never cached."""
    return web.Response(
        text=convert.dumps(value),
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None or text == "":
        return default
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        raise InvalidArgumentError(
            [FieldViolation(name, f"is {text[:32]!r}; expected a number from {low} to {high}")]
        )
    return int(text)


class UiApi:
    """The JSON endpoints, over the coordinator's servicers and authenticator."""

    def __init__(
        self,
        authenticator: Authenticator,
        refusals: RefusalLog,
        workflows: WorkflowService,
        admin: AdminService,
        *,
        tls: bool,
    ) -> None:
        self.authenticator = authenticator
        self.refusals = refusals
        self.workflows = workflows
        self.admin = admin
        self.tls = tls
        self._specs: OrderedDict[str, tuple[int, list[dict[str, Any]]]] = OrderedDict()

    def routes(self) -> list[web.RouteDef]:
        """Every JSON endpoint (docs/ui.md lists them)."""
        return [
            web.get("/api/session", self.session),
            web.post("/api/session", self.login),
            web.delete("/api/session", self.logout),
            web.get("/api/workflows", self.list_workflows),
            web.get("/api/workflows/{workflow_id}", self.workflow),
            web.get("/api/workflows/{workflow_id}/actions/{action_id}", self.action),
            web.get("/api/workers", self.workers),
        ]

    def call(self, request: web.Request, service: str, method: str) -> tuple[HttpCall, Principal]:
        """The request as a call of ``service.method``, authorized as that RPC."""
        call = HttpCall(request)
        principal = authorize(self.authenticator, self.refusals, rpc(service, method), call)
        return call, principal

    # ---- session ------------------------------------------------------------------------

    def _whoami(self, principal: Principal) -> dict[str, Any]:
        return {
            "principal": principal.name,
            "roles": sorted(r.value for r in principal.roles),
            "authentication": self.authenticator.enabled,
        }

    async def session(self, request: web.Request) -> web.Response:
        """Who the caller is (401 with ``login`` when a token is needed)."""
        _, principal = self.call(request, "WorkflowService", "ListWorkflows")
        return json_response(self._whoami(principal))

    async def login(self, request: web.Request) -> web.Response:
        """Checks a token (JSON ``{"token": ...}``) as the API would and sets the cookie."""
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise InvalidArgumentError([FieldViolation("token", "expected JSON {token}")]) from None
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token.strip():
            raise InvalidArgumentError([FieldViolation("token", "is missing")])
        token = token.strip()
        if len(token) > 512 or " " in token:
            raise InvalidArgumentError([FieldViolation("token", "is not a Plait token")])
        call = HttpCall(request, token=token)
        method = rpc("WorkflowService", "ListWorkflows")
        principal = authorize(self.authenticator, self.refusals, method, call)
        response = json_response(self._whoami(principal))
        if self.authenticator.token_file is not None:
            set_token_cookie(response, token, secure=self.tls)
        return response

    async def logout(self, request: web.Request) -> web.Response:
        """Forgets the login cookie."""
        response = json_response({"logged_out": True})
        response.del_cookie("plait_token", path="/")
        return response

    # ---- workflows ----------------------------------------------------------------------

    async def list_workflows(self, request: web.Request) -> web.Response:
        """Newest first; ``state`` (``RUNNING``...), ``name`` (a part of it), ``limit``."""
        call, _ = self.call(request, "WorkflowService", "ListWorkflows")
        state_name = request.query.get("state", "").strip().upper()
        states = {v: k for k, v in convert.WORKFLOW_STATES.items() if k}
        if state_name and state_name not in states:
            raise InvalidArgumentError(
                [FieldViolation("state", f"is {state_name[:32]!r}; one of {', '.join(states)}")]
            )
        name = request.query.get("name", "")
        if len(name) > MAX_NAME_CHARS:
            raise InvalidArgumentError(
                [
                    FieldViolation(
                        "name", f"is {len(name)} characters; the limit is {MAX_NAME_CHARS}"
                    )
                ]
            )
        limit = _int_param(request, "limit", 100, 1, MAX_LIST)
        found: list[dict[str, Any]] = []
        token = ""
        more = False
        while True:
            resp = await self.workflows.ListWorkflows(
                wspb.ListWorkflowsRequest(
                    page_size=MAX_LIST if name else limit,
                    page_token=token,
                    state=states.get(state_name, 0),  # type: ignore[arg-type]
                ),
                call,
            )
            for w in resp.workflows:
                if name.lower() in w.name.lower():
                    if len(found) == limit:
                        more = True
                        break
                    found.append(convert.workflow_header(w))
            token = resp.next_page_token
            if more or not token or not name:  # without a name filter, one page is the answer
                more = more or bool(token)
                break
        return json_response({"workflows": found, "more": more})

    async def workflow(self, request: web.Request) -> web.Response:
        """The workflow's status, every action's (with why it waits), and the DAG's shape."""
        workflow_id = request.match_info["workflow_id"]
        call, _ = self.call(request, "WorkflowService", "GetWorkflow")
        header: dict[str, Any] | None = None
        actions: list[dict[str, Any]] = []
        token = ""
        while True:
            resp = await self.workflows.GetWorkflow(
                wspb.GetWorkflowRequest(workflow_id=workflow_id, page_token=token), call
            )
            if header is None:
                header = convert.workflow_header(resp.workflow)
            actions.extend(convert.action_status(a) for a in resp.workflow.actions)
            token = resp.next_page_token
            if not token or len(actions) >= MAX_ACTIONS:
                break
        assert header is not None
        count, spec = await self._spec(request, workflow_id)
        return json_response(
            {
                "workflow": header,
                "actions": actions,
                "partial": bool(token),
                "spec": spec,
                "spec_count": count,
            }
        )

    async def _spec(
        self, request: web.Request, workflow_id: str
    ) -> tuple[int, list[dict[str, Any]]]:
        """The DAG as submitted (the first event of the history, from WatchWorkflow, carries
        it): its size, and its actions when there are at most ``MAX_SPEC``."""
        call, _ = self.call(request, "WorkflowService", "WatchWorkflow")
        cached = self._specs.get(workflow_id)
        if cached is not None:
            self._specs.move_to_end(workflow_id)
            return cached
        stream = self.workflows.WatchWorkflow(
            wspb.WatchWorkflowRequest(workflow_id=workflow_id, after_sequence=0), call
        )
        try:
            async for resp in stream:
                for ev in resp.events:
                    if ev.type == pb.EVENT_TYPE_WORKFLOW_SUBMITTED:
                        count = len(ev.spec.actions)
                        spec = convert.spec_actions(ev.spec) if count <= MAX_SPEC else []
                        self._specs[workflow_id] = (count, spec)
                        if len(self._specs) > SPEC_CACHE:
                            self._specs.popitem(last=False)
                        return count, spec
                break
        finally:
            await stream.aclose()
        raise NotFoundError(f"workflow {workflow_id!r} has no submitted event in its history")

    async def action(self, request: web.Request) -> web.Response:
        """One action's recorded attempts (with their log tails) and its outputs."""
        workflow_id = request.match_info["workflow_id"]
        action_id = request.match_info["action_id"]
        call, _ = self.call(request, "WorkflowService", "GetActionLogs")
        logs = await self.workflows.GetActionLogs(
            wspb.GetActionLogsRequest(workflow_id=workflow_id, action_id=action_id), call
        )
        attempts = [
            {
                "attempt": a.attempt,
                "worker_id": a.worker_id,
                "state": convert.ACTION_STATES.get(a.state, str(a.state)),
                "stdout_tail": a.stdout_tail,
                "stderr_tail": a.stderr_tail,
            }
            for a in logs.attempts
        ]
        call, _ = self.call(request, "WorkflowService", "GetActionOutputs")
        chunks: list[bytes] = []
        offset = total = 0
        while True:
            out = await self.workflows.GetActionOutputs(
                wspb.GetActionOutputsRequest(
                    workflow_id=workflow_id, action_id=action_id, offset=offset
                ),
                call,
            )
            total = out.outputs_bytes
            chunks.append(out.chunk)
            offset += len(out.chunk)
            if not out.chunk or offset >= total or offset >= MAX_OUTPUTS_BYTES:
                break
        text = b"".join(chunks).decode("utf-8", errors="replace")
        outputs: Any = None
        if text and offset >= total:
            try:
                outputs = json.loads(text)
            except ValueError:
                outputs = None
        return json_response(
            {
                "attempts": attempts,
                "outputs": outputs,
                "outputs_json": text,
                "outputs_bytes": total,
                "outputs_truncated": offset < total,
            }
        )

    # ---- workers ------------------------------------------------------------------------

    async def workers(self, request: web.Request) -> web.Response:
        """The connected workers and the revoked ids."""
        call, _ = self.call(request, "AdminService", "ListWorkers")
        resp = await self.admin.ListWorkers(apb.ListWorkersRequest(), call)
        now = resp.hlc.physical_ms
        return json_response(
            {
                "coordinator_ms": now,
                "workers": [convert.worker_info(w, now) for w in resp.workers],
                "revoked": [
                    {"worker_id": r.worker_id, "reason": r.reason, "revoked_by": r.revoked_by}
                    for r in resp.revoked
                ],
            }
        )
