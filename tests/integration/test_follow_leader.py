"""Clients and workers given several coordinator addresses find and follow the leader.

Small in-test grpc.aio servers on 127.0.0.1:0 play the coordinators: a *standby* refuses every
RPC (and every worker stream) with ``NotLeaderError`` naming the leader, exactly as the wire
format in plait.errors says; a *leader* serves just enough of WorkflowService, AdminService and
WorkerService. Leaders started one after another share a :class:`Journal`, as coordinators
sharing one journal do. The synchronous client runs in a thread so the servers keep serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import grpc
import pytest
from grpc_status import rpc_status

from plait.cli.main import main
from plait.client import Client
from plait.errors import NotLeaderError, UnavailableError
from plait.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    workflow_pb2,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import worker_service_pb2_grpc as wpb_grpc
from plait.worker import ActionContext, SessionConfig, Worker, WorkerSession
from plait.worker.handlers import HandlerExecutor

HEARTBEAT, TTL, GRACE = 0.1, 3.0, 0.2


# ---------------------------------------------------------------- the standby


class Standby(grpc.GenericRpcHandler):
    """Refuses every RPC of every service with NOT_LEADER naming ``leader``."""

    def __init__(self) -> None:
        self.leader: str | None = None
        self.refused: list[str] = []

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method

        async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            self.refused.append(method.rsplit("/", 1)[-1])
            err = NotLeaderError(self.leader)
            await context.abort_with_status(rpc_status.to_status(err.to_status()))

        if method.endswith("/Connect"):
            return grpc.stream_stream_rpc_method_handler(refuse)
        if method.endswith("/WatchWorkflow"):
            return grpc.unary_stream_rpc_method_handler(refuse)
        return grpc.unary_unary_rpc_method_handler(refuse)


# ---------------------------------------------------------------- the leader


@dataclass
class Journal:
    """What leaders share across a failover."""

    keys_seen: list[str] = field(default_factory=list)
    by_key: dict[str, str] = field(default_factory=dict)
    created: list[str] = field(default_factory=list)
    events: list[workflow_pb2.HistoryEvent] = field(default_factory=list)
    watch_after: list[tuple[str, int]] = field(default_factory=list)

    def add_event(self, kind: int = workflow_pb2.EVENT_TYPE_ACTION_STARTED) -> None:
        seq = len(self.events) + 1
        self.events.append(workflow_pb2.HistoryEvent(sequence=seq, workflow_id="wf-1", type=kind))


class LeaderWorkflows(workflow_service_pb2_grpc.WorkflowServiceServicer):
    def __init__(self, journal: Journal, name: str) -> None:
        self.journal = journal
        self.name = name
        self.deposed_after_commit: str | None = None
        """When set: commit the next submit, then answer NOT_LEADER naming this address."""

    async def SubmitWorkflow(self, request: Any, context: Any) -> Any:
        j = self.journal
        key = request.idempotency_key
        j.keys_seen.append(key)
        wid = j.by_key.get(key) if key else None
        created = wid is None
        if wid is None:
            wid = f"wf-{len(j.created) + 1}"
            j.created.append(wid)
            if key:
                j.by_key[key] = wid
        if self.deposed_after_commit is not None:
            # The commit happened, then this coordinator lost its lease: the caller only sees
            # the refusal.
            err = NotLeaderError(self.deposed_after_commit)
            self.deposed_after_commit = None
            await context.abort_with_status(rpc_status.to_status(err.to_status()))
        return workflow_service_pb2.SubmitWorkflowResponse(workflow_id=wid, created=created)

    async def GetWorkflow(self, request: Any, context: Any) -> Any:
        status = workflow_pb2.WorkflowStatus(
            workflow_id=request.workflow_id,
            name=f"served by {self.name}",
            state=workflow_pb2.WORKFLOW_STATE_RUNNING,
        )
        return workflow_service_pb2.GetWorkflowResponse(workflow=status)

    async def ListWorkflows(self, request: Any, context: Any) -> Any:
        return workflow_service_pb2.ListWorkflowsResponse(
            workflows=[workflow_pb2.WorkflowStatus(workflow_id=w) for w in self.journal.created]
        )

    async def WatchWorkflow(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self.journal.watch_after.append((self.name, request.after_sequence))
        seq = request.after_sequence
        while True:
            fresh = [e for e in self.journal.events if e.sequence > seq]
            if fresh:
                yield workflow_service_pb2.WatchWorkflowResponse(events=fresh)
                seq = fresh[-1].sequence
                if fresh[-1].type == workflow_pb2.EVENT_TYPE_WORKFLOW_FINISHED:
                    return
            if not request.follow:
                return
            await asyncio.sleep(0.01)


class LeaderAdmin(admin_service_pb2_grpc.AdminServiceServicer):
    async def ListWorkers(self, request: Any, context: Any) -> Any:
        return admin_service_pb2.ListWorkersResponse(
            workers=[admin_service_pb2.WorkerInfo(worker_id="w1")]
        )


class LeaderWorkers(wpb_grpc.WorkerServiceServicer):
    """Welcome on Hello, ack heartbeats, ack results (unless told not to), record it all."""

    def __init__(self, ack_results: bool = True) -> None:
        self.ack_results = ack_results
        self.hellos: list[wpb.Hello] = []
        self.results: list[wpb.ActionResult] = []
        self.outboxes: list[asyncio.Queue[wpb.ConnectResponse | None]] = []

    def grant(self, lease: wpb.Lease) -> None:
        self.outboxes[-1].put_nowait(
            wpb.ConnectResponse(lease_grant=wpb.LeaseGrant(sequence=1, leases=[lease]))
        )

    async def Connect(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        await context.send_initial_metadata(())  # accepted, as the real coordinator says
        outbox: asyncio.Queue[wpb.ConnectResponse | None] = asyncio.Queue()
        self.outboxes.append(outbox)

        async def read() -> None:
            with contextlib.suppress(asyncio.CancelledError, grpc.RpcError):
                async for req in request_iterator:
                    self._handle(req, outbox)
            outbox.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (msg := await outbox.get()) is not None:
                yield msg
        finally:
            reader.cancel()

    def _handle(self, req: wpb.ConnectRequest, outbox: asyncio.Queue[Any]) -> None:
        kind = req.WhichOneof("message")
        if kind == "hello":
            self.hellos.append(req.hello)
            welcome = wpb.Welcome(session_id=f"s{len(self.hellos)}")
            welcome.heartbeat_interval.FromTimedelta(timedelta(seconds=HEARTBEAT))
            welcome.lease_ttl.FromTimedelta(timedelta(seconds=TTL))
            welcome.kill_grace.FromTimedelta(timedelta(seconds=GRACE))
            welcome.adopted.extend(req.hello.running)
            outbox.put_nowait(wpb.ConnectResponse(welcome=welcome))
        elif kind == "heartbeat":
            ack = wpb.Ack(heartbeat_sequence=req.heartbeat.sequence)
            outbox.put_nowait(wpb.ConnectResponse(ack=ack))
        elif kind == "action_finished":
            self.results.extend(req.action_finished.results)
            if self.ack_results:
                acks = [
                    wpb.ResultAck(lease_id=r.lease_id, fencing_token=r.fencing_token)
                    for r in req.action_finished.results
                ]
                outbox.put_nowait(wpb.ConnectResponse(ack=wpb.Ack(results=acks)))


class Leader:
    """One leader incarnation: its own server and port, the shared journal."""

    def __init__(self, journal: Journal, name: str, ack_results: bool = True) -> None:
        self.workflows = LeaderWorkflows(journal, name)
        self.workers = LeaderWorkers(ack_results)
        self.server: grpc.aio.Server | None = None
        self.address = ""

    async def start(self, port: int = 0) -> Leader:
        self.server = grpc.aio.server()
        workflow_service_pb2_grpc.add_WorkflowServiceServicer_to_server(self.workflows, self.server)
        admin_service_pb2_grpc.add_AdminServiceServicer_to_server(LeaderAdmin(), self.server)
        wpb_grpc.add_WorkerServiceServicer_to_server(self.workers, self.server)
        port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        await self.server.start()
        self.address = f"127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)
            self.server = None


@pytest.fixture
async def standby() -> AsyncIterator[tuple[Standby, str]]:
    handler = Standby()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([handler])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield handler, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@pytest.fixture
async def leaders() -> AsyncIterator[Callable[..., Awaitable[Leader]]]:
    journal = Journal()
    started: list[Leader] = []

    async def start(name: str = "leader", ack_results: bool = True, at: str = "") -> Leader:
        """A leader on a free port, or on ``at`` (an address reserved with dead_address)."""
        port = int(at.rpartition(":")[2]) if at else 0
        leader = await Leader(journal, name, ack_results).start(port)
        started.append(leader)
        return leader

    try:
        yield start
    finally:
        for leader in started:
            await leader.stop()


def dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


async def until(pred: Callable[[], Any], limit: float = 10.0) -> Any:
    end = time.monotonic() + limit
    while not (value := pred()):
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
    return value


# ---------------------------------------------------------------- the client


async def test_client_given_standby_first_reaches_the_leader(
    standby: tuple[Standby, str], leaders: Any
) -> None:
    handler, standby_at = standby
    leader = await leaders()
    handler.leader = leader.address
    with Client(f"{standby_at},{leader.address}") as client:
        status = await asyncio.to_thread(client.get, "wf-9")
        assert status.name == "served by leader"
        assert client.target == leader.address
        # The leader sticks: the next calls go straight there.
        await asyncio.to_thread(client.list)
        workers = await asyncio.to_thread(client.workers)
        assert [w.worker_id for w in workers] == ["w1"]
    assert handler.refused == ["GetWorkflow"]


async def test_client_does_not_follow_a_leader_that_is_not_in_its_list(
    standby: tuple[Standby, str], leaders: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Without TLS nothing proves that an unlisted address is a coordinator: a bad standby
    # could send the client (and its token) anywhere. tests/integration/test_client_tls.py
    # covers following one whose certificate proves it.
    handler, standby_at = standby
    leader = await leaders()
    handler.leader = leader.address
    with Client(standby_at, max_hops=2) as client:
        client._sleep = lambda _s: None
        with pytest.raises(UnavailableError):
            await asyncio.to_thread(client.get, "wf-1")
        assert client.target == standby_at
    assert leader.workflows.journal.created == []
    assert f"not following leader hint {leader.address}: not in the --coordinator list" in (
        caplog.text
    )


async def test_client_given_a_dead_address_first_reaches_the_leader(leaders: Any) -> None:
    leader = await leaders()
    dead = dead_address()
    with Client(f"{dead},{leader.address}") as client:
        status = await asyncio.to_thread(client.get, "wf-2")
        assert status.workflow_id == "wf-2"
        assert client.target == leader.address


async def test_client_without_a_leader_fails_after_bounded_hops(
    standby: tuple[Standby, str],
) -> None:
    handler, standby_at = standby
    dead = dead_address()
    with Client(f"{standby_at},{dead}", max_hops=4) as client:
        client._sleep = lambda _s: None
        with pytest.raises(UnavailableError, match="no coordinator of") as info:
            await asyncio.to_thread(client.get, "wf-1")
    assert standby_at in str(info.value)
    assert len(handler.refused) == 3  # tries 1, 3 and 5 of five


async def test_retried_submit_without_a_key_creates_one_workflow(
    standby: tuple[Standby, str], leaders: Any
) -> None:
    handler, standby_at = standby
    old = await leaders("old")
    new = await leaders("new")
    handler.leader = old.address
    # The old leader commits the submit, then loses its lease and answers NOT_LEADER.
    old.workflows.deposed_after_commit = new.address
    journal = old.workflows.journal
    spec = workflow_pb2.WorkflowSpec(name="once")
    spec.actions.add(id="a", handler="h")
    with Client(f"{standby_at},{old.address},{new.address}") as client:
        response = await asyncio.to_thread(client.submit, spec)
        assert client.target == new.address
    assert response.workflow_id == "wf-1"
    assert response.created  # created by this very call, on its first try
    assert journal.created == ["wf-1"]
    key = journal.keys_seen[0]
    assert key and journal.keys_seen == [key, key]
    assert handler.refused == ["SubmitWorkflow"]


async def test_each_submit_gets_its_own_generated_key(leaders: Any) -> None:
    leader = await leaders()
    spec = workflow_pb2.WorkflowSpec(name="twice")
    spec.actions.add(id="a", handler="h")
    with Client(leader.address) as client:
        first = await asyncio.to_thread(client.submit, spec)
        second = await asyncio.to_thread(client.submit, spec)
        third = await asyncio.to_thread(client.submit, spec, "mine")
        again = await asyncio.to_thread(client.submit, spec, "mine")
    assert (first.workflow_id, second.workflow_id) == ("wf-1", "wf-2")
    assert (third.workflow_id, third.created, again.workflow_id, again.created) == (
        "wf-3",
        True,
        "wf-3",
        False,
    )
    keys = leader.workflows.journal.keys_seen
    assert len(set(keys[:2])) == 2 and keys[2:] == ["mine", "mine"]


async def test_watch_resumes_after_the_last_sequence_on_the_new_leader(
    standby: tuple[Standby, str], leaders: Any
) -> None:
    handler, standby_at = standby
    first = await leaders("first")
    journal = first.workflows.journal
    for _ in range(3):
        journal.add_event()
    handler.leader = first.address
    have_three = threading.Event()
    restarted = threading.Event()

    def consume(client: Client) -> list[int]:
        events = client.watch("wf-1")
        seen = [next(events).sequence for _ in range(3)]
        have_three.set()
        assert restarted.wait(10)
        seen += [e.sequence for e in events]
        return seen

    # The next leader will serve on another port; every coordinator is listed (a hint outside
    # the list is not followed without TLS).
    second_at = dead_address()
    with Client(f"{standby_at},{first.address},{second_at}") as client:
        consumer = asyncio.ensure_future(asyncio.to_thread(consume, client))
        assert await asyncio.to_thread(have_three.wait, 10)
        await first.stop()
        # The journal moved on while nobody led.
        journal.add_event()
        journal.add_event(workflow_pb2.EVENT_TYPE_WORKFLOW_FINISHED)
        second = await leaders("second", at=second_at)
        handler.leader = second.address
        restarted.set()
        seen = await asyncio.wait_for(consumer, 20)
        assert client.target == second.address
    assert seen == [1, 2, 3, 4, 5]
    assert ("second", 3) in journal.watch_after
    assert journal.watch_after[0] == ("first", 0)


async def test_cli_status_against_a_standby_first_list(
    standby: tuple[Standby, str], leaders: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    handler, standby_at = standby
    leader = await leaders()
    handler.leader = leader.address
    argv = ["--coordinator", f"{standby_at},{leader.address}", "status", "wf-7", "-o", "json"]
    code = await asyncio.to_thread(main, argv)
    out = capsys.readouterr().out
    assert code == 0
    assert json.loads(out)["workflow_id"] == "wf-7"
    # And after the command, as before.
    argv = ["status", "wf-8", "-o", "json", "--coordinator", f"{standby_at},{leader.address}"]
    assert await asyncio.to_thread(main, argv) == 0
    assert json.loads(capsys.readouterr().out)["workflow_id"] == "wf-8"
    assert handler.refused == ["GetWorkflow", "GetWorkflow"]


async def test_cli_bad_address_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    code = await asyncio.to_thread(main, ["status", "wf-1", "--coordinator", "a:1,x"])
    assert code == 2
    assert "--coordinator: 'x' is not HOST:PORT" in capsys.readouterr().err


# ---------------------------------------------------------------- the worker


def make_worker(release: asyncio.Event) -> Worker:
    w = Worker()

    @w.action("blocked")
    async def blocked(ctx: ActionContext) -> dict[str, Any]:
        await release.wait()
        return {"released": True}

    return w


def blocked_lease(lease_id: str) -> wpb.Lease:
    spec = workflow_pb2.ActionSpec(id=lease_id, handler="blocked")
    return wpb.Lease(
        lease_id=lease_id,
        workflow_id="wf",
        action_id=lease_id,
        attempt=1,
        fencing_token=7,
        action=spec,
        inputs_json=json.dumps({"input": {}, "needs": {}}),
    )


class Running:
    """A WorkerSession served in a task; stopped (and its executors closed) on exit."""

    def __init__(self, coordinator: str, release: asyncio.Event) -> None:
        config = SessionConfig(
            worker_id="w1",
            coordinator=coordinator,
            slots=2,
            reconnect_initial=timedelta(milliseconds=20),
            reconnect_max=timedelta(milliseconds=200),
        )
        self.executor = HandlerExecutor([make_worker(release)], 2)
        self.session = WorkerSession(config, [self.executor])
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> WorkerSession:
        self.task = asyncio.create_task(self.session.run())
        return self.session

    async def __aexit__(self, *exc: object) -> None:
        self.session.stop("test over")
        assert self.task is not None
        await asyncio.wait_for(self.task, 10)
        await self.executor.aclose()


async def test_worker_given_standby_first_is_welcomed_by_the_leader(
    standby: tuple[Standby, str], leaders: Any
) -> None:
    handler, standby_at = standby
    leader = await leaders()
    handler.leader = leader.address
    async with Running(f"{standby_at},{leader.address}", asyncio.Event()) as session:
        await until(lambda: session.connected)
        assert session.address == leader.address
        assert [h.worker_id for h in leader.workers.hellos] == ["w1"]
        assert session.stats.connects == 1
    assert handler.refused == ["Connect"]


async def test_worker_follows_the_hint_to_a_new_leader_and_resends_results(
    standby: tuple[Standby, str], leaders: Any
) -> None:
    handler, standby_at = standby
    first = await leaders("first", ack_results=False)
    handler.leader = first.address
    release = asyncio.Event()
    second_at = dead_address()  # where the next leader will serve; listed, as it must be
    async with Running(f"{standby_at},{first.address},{second_at}", release) as session:
        await until(lambda: session.connected and session.address == first.address)
        first.workers.grant(blocked_lease("L1"))
        await until(lambda: session.running == ["L1"])
        release.set()
        await until(lambda: first.workers.results)
        assert session.unacked == [("L1", 7)]  # the first leader never acked it
        await first.stop()
        second = await leaders("second", at=second_at)
        handler.leader = second.address
        # Reaches the new leader by rotation, or through the standby's hint (followed at once).
        await until(lambda: session.connected and session.address == second.address)
        await until(lambda: not session.unacked)
        assert [(r.lease_id, r.fencing_token) for r in second.workers.results] == [("L1", 7)]
        assert json.loads(second.workers.results[0].outputs_json) == {"released": True}
        assert session.stats.connects == 2
    assert "Connect" in handler.refused
