"""plait.Client and the client commands of the CLI against a fake coordinator.

The fake is a real gRPC server on 127.0.0.1:0 serving canned answers, so these tests cover the
wire (HLC stamping and merging, paging, error details, streams) without the coordinator.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from plait import Client
from plait.cli.main import main
from plait.clock import ManualClock, SystemClock
from plait.errors import InvalidArgumentError, NotFoundError, UnavailableError
from plait.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    workflow_pb2,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)

WALL = 1_700_000_000_000


def _events(workflow_id: str, final: int) -> list[workflow_pb2.HistoryEvent]:
    E = workflow_pb2
    rows: list[dict[str, Any]] = [
        {"type": E.EVENT_TYPE_WORKFLOW_SUBMITTED, "workflow_state": E.WORKFLOW_STATE_RUNNING},
        {"type": E.EVENT_TYPE_ACTION_READY, "action_id": "a", "action_state": E.ACTION_STATE_READY},
        {
            "type": E.EVENT_TYPE_ACTION_LEASED,
            "action_id": "a",
            "action_state": E.ACTION_STATE_LEASED,
            "worker_id": "w1",
            "attempt": 1,
            "fencing_token": 1,
        },
        {
            "type": E.EVENT_TYPE_ACTION_STARTED,
            "action_id": "a",
            "action_state": E.ACTION_STATE_RUNNING,
            "worker_id": "w1",
            "attempt": 1,
        },
        {
            "type": E.EVENT_TYPE_ACTION_FINISHED,
            "action_id": "a",
            "action_state": E.ACTION_STATE_FAILED
            if final == E.WORKFLOW_STATE_FAILED
            else E.ACTION_STATE_SUCCEEDED,
            "worker_id": "w1",
            "attempt": 1,
            "exit_code": 0,
            "outputs_json": '{"n": 1}',
        },
        {"type": E.EVENT_TYPE_WORKFLOW_FINISHED, "workflow_state": final},
    ]
    out = []
    for i, row in enumerate(rows, start=1):
        e = workflow_pb2.HistoryEvent(sequence=i, workflow_id=workflow_id, cause=f"c{i}", **row)
        e.hlc.physical_ms, e.hlc.logical = WALL + i, i
        out.append(e)
    return out


class FakeWorkflows(workflow_service_pb2_grpc.WorkflowServiceServicer):
    def __init__(self, hlc_ms: Any) -> None:
        self.hlc_ms = hlc_ms
        self.requests: list[Any] = []
        self.keys: dict[str, str] = {}
        self.final = workflow_pb2.WORKFLOW_STATE_SUCCEEDED

    def _stamp(self, resp: Any) -> Any:
        resp.hlc.physical_ms, resp.hlc.logical = self.hlc_ms(), 5
        return resp

    def SubmitWorkflow(self, request: Any, context: Any) -> Any:
        self.requests.append(request)
        if request.spec.name == "refuse":
            status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="bad spec")
            detail = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field="spec.actions[0].needs[0]", description="cycle a -> a"
                    )
                ]
            )
            status.details.add().Pack(detail)
            context.abort_with_status(rpc_status.to_status(status))
        key = request.idempotency_key
        created = key not in self.keys
        wid = self.keys.setdefault(key, f"wf-{len(self.requests)}") if key else "wf-1"
        return self._stamp(
            workflow_service_pb2.SubmitWorkflowResponse(workflow_id=wid, created=created)
        )

    def _status(self, wid: str) -> workflow_pb2.WorkflowStatus:
        st = workflow_pb2.WorkflowStatus(workflow_id=wid, name="demo", state=self.final)
        st.actions.add(
            action_id="a",
            state=workflow_pb2.ACTION_STATE_SUCCEEDED
            if self.final == workflow_pb2.WORKFLOW_STATE_SUCCEEDED
            else workflow_pb2.ACTION_STATE_FAILED,
            attempt=1,
            worker_id="w1",
            exit_code=0 if self.final == workflow_pb2.WORKFLOW_STATE_SUCCEEDED else 3,
        )
        st.action_counts["ACTION_STATE_SUCCEEDED"] = 1
        return st

    def GetWorkflow(self, request: Any, context: Any) -> Any:
        self.requests.append(request)
        if request.workflow_id == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "workflow missing not found")
        return self._stamp(
            workflow_service_pb2.GetWorkflowResponse(workflow=self._status(request.workflow_id))
        )

    def ListWorkflows(self, request: Any, context: Any) -> Any:
        self.requests.append(request)
        start = int(request.page_token or 0)
        ids = [f"wf-{i}" for i in range(5)]
        page = ids[start : start + request.page_size]
        nxt = str(start + request.page_size) if start + request.page_size < len(ids) else ""
        resp = workflow_service_pb2.ListWorkflowsResponse(next_page_token=nxt)
        for wid in page:
            resp.workflows.add(workflow_id=wid, name="demo", state=request.state or 1)
        return self._stamp(resp)

    def CancelWorkflow(self, request: Any, context: Any) -> Any:
        self.requests.append(request)
        return self._stamp(
            workflow_service_pb2.CancelWorkflowResponse(state=workflow_pb2.WORKFLOW_STATE_CANCELLED)
        )

    def WatchWorkflow(self, request: Any, context: Any) -> Iterator[Any]:
        self.requests.append(request)
        events = [
            e
            for e in _events(request.workflow_id, self.final)
            if e.sequence > request.after_sequence
        ]
        # Batches, as the coordinator sends one per journal commit.
        for start in range(0, len(events), 2):
            yield self._stamp(
                workflow_service_pb2.WatchWorkflowResponse(events=events[start : start + 2])
            )

    def GetActionLogs(self, request: Any, context: Any) -> Any:
        self.requests.append(request)
        resp = workflow_service_pb2.GetActionLogsResponse()
        resp.attempts.add(
            attempt=1,
            fencing_token=1,
            worker_id="w1",
            stdout_tail="hello\n",
            stderr_tail="oops\n",
            state=workflow_pb2.ACTION_STATE_FAILED,
        )
        return self._stamp(resp)


class FakeAdmin(admin_service_pb2_grpc.AdminServiceServicer):
    def __init__(self) -> None:
        self.drained: list[str] = []

    def ListWorkers(self, request: Any, context: Any) -> Any:
        resp = admin_service_pb2.ListWorkersResponse()
        resp.workers.add(
            worker_id="w1",
            slots=4,
            free_slots=2,
            leases=2,
            exec_enabled=True,
            handlers=["h"],
            hostname="box",
        )
        return resp

    def DrainWorker(self, request: Any, context: Any) -> Any:
        self.drained.append(request.worker_id)
        return admin_service_pb2.DrainWorkerResponse()


@pytest.fixture
def fake() -> Iterator[tuple[str, FakeWorkflows, FakeAdmin]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    clock = SystemClock()
    workflows = FakeWorkflows(clock.wall_ms)
    admin = FakeAdmin()
    workflow_service_pb2_grpc.add_WorkflowServiceServicer_to_server(workflows, server)
    admin_service_pb2_grpc.add_AdminServiceServicer_to_server(admin, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", workflows, admin
    finally:
        server.stop(None).wait()


@pytest.fixture
def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spec() -> workflow_pb2.WorkflowSpec:
    spec = workflow_pb2.WorkflowSpec(name="demo")
    spec.actions.add(id="a", handler="h")
    return spec


# -- Client -------------------------------------------------------------------------------


def test_stamps_requests_and_merges_responses(fake: Any) -> None:
    target, workflows, _ = fake
    clock = ManualClock(wall_ms=WALL)
    workflows.hlc_ms = lambda: WALL + 100  # the coordinator is 100 ms ahead: merged
    with Client(target, clock=clock) as client:
        resp = client.submit(_spec(), idempotency_key="k1")
        assert (resp.workflow_id, resp.created) == ("wf-1", True)
        assert workflows.requests[0].hlc.physical_ms == WALL
        assert workflows.requests[0].idempotency_key == "k1"
        assert tuple(client.hlc.last) == (WALL + 100, 6)
        client.get("wf-1")
        # The next request is stamped after what the client saw.
        assert (workflows.requests[1].hlc.physical_ms, workflows.requests[1].hlc.logical) == (
            WALL + 100,
            7,
        )
        assert client.submit(_spec(), idempotency_key="k1").created is False


def test_far_ahead_coordinator_clock_is_not_merged(fake: Any) -> None:
    target, workflows, _ = fake
    workflows.hlc_ms = lambda: WALL + 60_000
    with Client(target, clock=ManualClock(wall_ms=WALL)) as client:
        client.get("wf-1")
        assert client.hlc.last.physical_ms == WALL


def test_submit_accepts_builder_and_path(fake: Any, tmp_path: Any) -> None:
    from plait import Workflow

    target, workflows, _ = fake
    wf = Workflow("built")
    wf.handler("a", "h")
    path = tmp_path / "f.yaml"
    path.write_text("name: fromfile\nactions: [{id: a, run: [x]}]\n")
    with Client(target) as client:
        client.submit(wf)
        client.submit(str(path))
    assert [r.spec.name for r in workflows.requests] == ["built", "fromfile"]


def test_list_follows_pages(fake: Any) -> None:
    target, workflows, _ = fake
    with Client(target) as client:
        got = client.list(state="running", page_size=2)
    assert [w.workflow_id for w in got] == [f"wf-{i}" for i in range(5)]
    tokens = [r.page_token for r in workflows.requests]
    assert tokens == ["", "2", "4"]
    assert all(r.state == workflow_pb2.WORKFLOW_STATE_RUNNING for r in workflows.requests)


def test_watch_and_wait(fake: Any) -> None:
    target, workflows, _ = fake
    with Client(target) as client:
        events = list(client.watch("wf-1", after_sequence=2, follow=False))
        assert [e.sequence for e in events] == [3, 4, 5, 6]
        assert workflows.requests[0].follow is False
        status = client.wait("wf-1", timeout=10)
        assert status.state == workflow_pb2.WORKFLOW_STATE_SUCCEEDED


def test_errors_map_to_plait_errors(fake: Any) -> None:
    target, _, _ = fake
    with Client(target) as client:
        with pytest.raises(NotFoundError, match="missing"):
            client.get("missing")
        spec = _spec()
        spec.name = "refuse"
        with pytest.raises(InvalidArgumentError) as info:
            client.submit(spec)
        assert info.value.violations[0].field == "spec.actions[0].needs[0]"
        assert "cycle a -> a" in str(info.value)


def test_unreachable_is_unavailable_error(closed_port: int) -> None:
    with Client(f"127.0.0.1:{closed_port}") as client, pytest.raises(UnavailableError) as info:
        client.get("x")
    assert f"127.0.0.1:{closed_port}" in str(info.value)


def test_target_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PLAIT_COORDINATOR", raising=False)
    with Client() as c:
        assert c.target == "127.0.0.1:7450"
    monkeypatch.setenv("PLAIT_COORDINATOR", "example:1")
    with Client() as c:
        assert c.target == "example:1"
    with Client("other:2") as c:
        assert c.target == "other:2"


def test_logs_workers_drain_cancel(fake: Any) -> None:
    target, _, admin = fake
    with Client(target) as client:
        assert client.logs("wf-1", "a")[0].stdout_tail == "hello\n"
        assert client.workers()[0].worker_id == "w1"
        client.drain("w1")
        assert client.cancel("wf-1", "why") == workflow_pb2.WORKFLOW_STATE_CANCELLED
    assert admin.drained == ["w1"]


# -- CLI against the fake -----------------------------------------------------------------


FLOW = "name: demo\nactions: [{id: a, handler: h}]\n"


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_submit_prints_the_id(fake: Any, tmp_path: Any, capsys: Any) -> None:
    target, workflows, _ = fake
    flow = tmp_path / "f.yaml"
    flow.write_text(FLOW)
    code, out, _ = run_cli(capsys, "submit", str(flow), "--coordinator", target)
    assert (code, out) == (0, "wf-1\n")
    code, out, _ = run_cli(capsys, "submit", str(flow), "--coordinator", target, "-o", "json")
    # Each submit carries its own generated idempotency key, so two submits are two workflows.
    assert json.loads(out) == {"workflow_id": "wf-2", "created": True}
    keys = [r.idempotency_key for r in workflows.requests]
    assert len(set(keys)) == 2 and all(keys)


@pytest.mark.parametrize(
    ("final", "expected"),
    [(workflow_pb2.WORKFLOW_STATE_SUCCEEDED, 0), (workflow_pb2.WORKFLOW_STATE_FAILED, 1)],
)
def test_cli_submit_wait_exit_code(
    fake: Any, tmp_path: Any, capsys: Any, final: int, expected: int
) -> None:
    target, workflows, _ = fake
    workflows.final = final
    flow = tmp_path / "f.yaml"
    flow.write_text(FLOW)
    code, out, _ = run_cli(
        capsys, "submit", str(flow), "--wait", "--coordinator", target, "-o", "json"
    )
    assert code == expected
    doc = json.loads(out)
    assert doc["workflow_id"] == "wf-1"
    assert doc["workflow"]["state"] == workflow_pb2.WorkflowState.Name(final)
    code, out, _ = run_cli(capsys, "submit", str(flow), "--watch", "--coordinator", target)
    assert code == expected
    assert "workflow_finished" in out


def test_cli_submit_watch_json_lines(fake: Any, tmp_path: Any, capsys: Any) -> None:
    target, _, _ = fake
    flow = tmp_path / "f.yaml"
    flow.write_text(FLOW)
    code, out, _ = run_cli(
        capsys, "submit", str(flow), "--watch", "-o", "json", "--coordinator", target
    )
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert [d["sequence"] for d in lines[:-1]] == ["1", "2", "3", "4", "5", "6"]
    assert lines[-1]["workflow"]["state"] == "WORKFLOW_STATE_SUCCEEDED"


def test_cli_status_json_shape(fake: Any, capsys: Any) -> None:
    target, _, _ = fake
    code, out, _ = run_cli(capsys, "status", "wf-9", "-o", "json", "--coordinator", target)
    doc = json.loads(out)
    assert code == 0
    assert doc["workflow_id"] == "wf-9"
    assert doc["state"] == "WORKFLOW_STATE_SUCCEEDED"
    assert doc["actions"][0]["action_id"] == "a"
    assert doc["actions"][0]["attempt"] == 1
    assert doc["action_counts"] == {"ACTION_STATE_SUCCEEDED": 1}
    code, out, _ = run_cli(capsys, "status", "wf-9", "--coordinator", target)
    assert "succeeded" in out and "wf-9" in out


def test_cli_status_unknown_id_exits_2(fake: Any, capsys: Any) -> None:
    target, _, _ = fake
    code, _, err = run_cli(capsys, "status", "missing", "--coordinator", target)
    assert code == 2
    assert "not found" in err


def test_cli_refused_spec_exits_2(fake: Any, tmp_path: Any, capsys: Any) -> None:
    target, _, _ = fake
    flow = tmp_path / "f.yaml"
    flow.write_text("name: refuse\nactions: [{id: a, handler: h}]\n")
    code, _, err = run_cli(capsys, "submit", str(flow), "--coordinator", target)
    assert code == 2
    assert "spec.actions[0].needs[0]: cycle a -> a" in err


def test_cli_list(fake: Any, capsys: Any) -> None:
    target, _, _ = fake
    code, out, _ = run_cli(
        capsys, "list", "--state", "failed", "-o", "json", "--coordinator", target
    )
    doc = json.loads(out)
    assert code == 0
    assert [w["workflow_id"] for w in doc["workflows"]] == [f"wf-{i}" for i in range(5)]
    assert doc["workflows"][0]["state"] == "WORKFLOW_STATE_FAILED"
    code, out, _ = run_cli(capsys, "list", "--coordinator", target)
    assert "wf-4" in out


def test_cli_events_in_hlc_order(fake: Any, capsys: Any) -> None:
    target, _, _ = fake
    code, out, _ = run_cli(capsys, "events", "wf-1", "--coordinator", target)
    lines = out.splitlines()
    assert code == 0
    assert lines[0].split() == ["SEQ", "HLC", "TYPE", "ACTION", "STATE", "WORKER", "MESSAGE"]
    leased = next(line for line in lines if "action_leased" in line)
    assert leased.split()[:6] == ["3", f"{WALL + 3}.3", "action_leased", "a", "leased", "w1"]
    assert "attempt 1 token 1" in leased
    code, out, _ = run_cli(
        capsys, "events", "wf-1", "--after", "4", "-o", "json", "--coordinator", target
    )
    docs = [json.loads(line) for line in out.splitlines()]
    assert [d["type"] for d in docs] == [
        "EVENT_TYPE_ACTION_FINISHED",
        "EVENT_TYPE_WORKFLOW_FINISHED",
    ]
    assert docs[0]["hlc"] == {"physical_ms": str(WALL + 5), "logical": 5}


def test_cli_logs_cancel_workers_drain(fake: Any, capsys: Any) -> None:
    target, _, admin = fake
    code, out, _ = run_cli(capsys, "logs", "wf-1", "a", "--coordinator", target)
    assert code == 0
    assert "hello" in out and "oops" in out and "attempt 1" in out
    code, out, _ = run_cli(capsys, "logs", "wf-1", "a", "-o", "json", "--coordinator", target)
    assert json.loads(out)["attempts"][0]["stdout_tail"] == "hello\n"
    code, out, _ = run_cli(
        capsys, "cancel", "wf-1", "--reason", "stop", "-o", "json", "--coordinator", target
    )
    assert json.loads(out) == {"workflow_id": "wf-1", "state": "WORKFLOW_STATE_CANCELLED"}
    code, out, _ = run_cli(capsys, "workers", "-o", "json", "--coordinator", target)
    assert json.loads(out)["workers"][0]["slots"] == 4
    code, out, _ = run_cli(capsys, "workers", "--coordinator", target)
    assert "w1" in out and "box" in out
    code, out, _ = run_cli(capsys, "drain", "w1", "--coordinator", target)
    assert code == 0 and admin.drained == ["w1"]
