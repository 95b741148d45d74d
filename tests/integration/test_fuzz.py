"""Structure-aware fuzzing of every RPC and the worker stream against a real coordinator.

One coordinator subprocess (no authentication, loopback, the system tests' profile) takes, over
real gRPC: valid messages with mutated fields (ids with control characters, huge or empty;
JSON nested 65 to 100,000 deep, oversized or not JSON; out-of-range enums; negative and huge
durations; missing oneofs; NaN amounts), plus random bytes, on every WorkflowService and
AdminService RPC and on WorkerService.Connect (hello, heartbeats, starts, progress and results
for leases the stream holds, holds with a wrong token, or never held).

After every example the coordinator must still answer SERVING (grpc.health.v1) and no call may
end UNKNOWN or INTERNAL (either means an exception escaped); an INVALID_ARGUMENT must name its
field. At the end a normal workflow still runs to completion and the journal passes the
invariant checker.

Reproducible: every test is ``derandomize=True`` with a fixed ``max_examples`` (the whole
module takes well under a minute on a loaded 2-core machine); no example database.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message_factory import GetMessageClass
from hypothesis import given, settings
from hypothesis import strategies as st

from plait.coordinator.auth import plait_methods
from plait.v1 import admin_service_pb2 as apb
from plait.v1 import hlc_pb2
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb
from plait.v1 import workflow_service_pb2 as wspb
from tests.integration.fuzz_support import (
    BUG_CODES,
    CONNECT,
    FUZZ,
    MUTATED,
    Target,
    amounts,
    bad_ids,
    checked,
    durations,
    fuzz_action,
    ids,
    int32,
    int64,
    json_texts,
    raw,
    set_duration,
    specs,
    texts,
    uint32,
    uint64,
    worker_ids,
)
from tests.integration.protocol_worker import ProtocolWorker
from tests.system import journal_check
from tests.system.harness import TERMINAL_WORKFLOW, Cluster, wait_for

pytestmark = [pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    cluster = Cluster(tmp_path_factory.mktemp("fuzz"))
    try:
        cluster.start_coordinator()
        t = Target(cluster)
        for i in range(3):
            t.known.append(
                cluster.submit(pb.WorkflowSpec(name=f"seed-{i}", actions=[fuzz_action()]))
            )
        yield t
        t.channel.close()
    finally:
        cluster.close()


# ---- client RPCs: every WorkflowService and AdminService method -----------------------------


@st.composite
def client_calls(draw: st.DrawFn) -> tuple[str, Any]:
    workflow_id = draw(st.one_of(ids, st.just("wf-known")))
    rpc = draw(
        st.sampled_from(
            [
                "SubmitWorkflow",
                "SubmitWorkflow",
                "SubmitWorkflow",
                "GetWorkflow",
                "ListWorkflows",
                "CancelWorkflow",
                "RetryWorkflow",
                "WatchWorkflow",
                "GetActionLogs",
                "ListWorkers",
                "DrainWorker",
                "RevokeWorker",
                "ReinstateWorker",
            ]
        )
    )
    hlc = (
        hlc_pb2.HlcTimestamp(physical_ms=draw(uint64), logical=draw(uint32))
        if draw(st.booleans())
        else None
    )
    req: Any
    if rpc == "SubmitWorkflow":
        req = wspb.SubmitWorkflowRequest(spec=draw(specs()), idempotency_key=draw(texts))
    elif rpc == "ListWorkflows":
        req = wspb.ListWorkflowsRequest(
            page_size=draw(uint32), page_token=draw(texts), state=draw(int32)
        )
    elif rpc == "CancelWorkflow":
        req = wspb.CancelWorkflowRequest(workflow_id=workflow_id, reason=draw(texts))
    elif rpc == "WatchWorkflow":
        req = wspb.WatchWorkflowRequest(workflow_id=workflow_id, after_sequence=draw(uint64))
    elif rpc == "GetActionLogs":
        req = wspb.GetActionLogsRequest(workflow_id=workflow_id, action_id=draw(ids))
    elif rpc in ("GetWorkflow", "RetryWorkflow"):
        req = getattr(wspb, rpc + "Request")(workflow_id=workflow_id)
    elif rpc == "ListWorkers":
        req = apb.ListWorkersRequest()
    elif rpc == "RevokeWorker":
        req = apb.RevokeWorkerRequest(worker_id=draw(ids), reason=draw(texts))
    else:
        req = getattr(apb, rpc + "Request")(worker_id=draw(ids))
    if hlc is not None:
        req.hlc.CopyFrom(hlc)
    return rpc, req


def service_of(rpc: str) -> str:
    admin = rpc in ("ListWorkers", "DrainWorker", "RevokeWorker", "ReinstateWorker")
    return f"/plait.v1.{'AdminService' if admin else 'WorkflowService'}/{rpc}"


@pytest.mark.parametrize("field", list(MUTATED))
@settings(FUZZ, max_examples=25)
@given(data=st.data())
def test_submit_with_a_mutated_field(target: Target, field: str, data: st.DataObject) -> None:
    spec = data.draw(specs(field), "spec")
    reply = checked(
        lambda: target.unary(service_of("SubmitWorkflow"))(
            wspb.SubmitWorkflowRequest(spec=spec).SerializeToString(), timeout=30
        )
    )
    if reply is not None:
        target.known.append(wspb.SubmitWorkflowResponse.FromString(reply).workflow_id)
    target.assert_serving()


@settings(FUZZ, max_examples=200)
@given(client_calls())
def test_client_rpcs_with_mutated_fields(target: Target, call: tuple[str, Any]) -> None:
    rpc, req = call
    if getattr(req, "workflow_id", None) == "wf-known":
        req.workflow_id = target.known[0]
    method = service_of(rpc)
    if rpc == "WatchWorkflow":
        stream = target.channel.unary_stream(
            method, request_serializer=raw, response_deserializer=raw
        )
        checked(lambda: list(stream(req.SerializeToString(), timeout=30)))
    else:
        reply = checked(lambda: target.unary(method)(req.SerializeToString(), timeout=30))
        if rpc == "SubmitWorkflow" and reply is not None:
            target.known.append(wspb.SubmitWorkflowResponse.FromString(reply).workflow_id)
    target.assert_serving()


# Every scalar field of every request, for RPCs added later too (read from the descriptors).
_SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_STRING: st.one_of(ids, texts, st.just("wf-known")),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_UINT32: uint32,
    FieldDescriptor.TYPE_UINT64: uint64,
    FieldDescriptor.TYPE_INT32: int32,
    FieldDescriptor.TYPE_INT64: int64,
    FieldDescriptor.TYPE_ENUM: int32,
    FieldDescriptor.TYPE_DOUBLE: st.floats(allow_nan=True, allow_infinity=True),
}


def request_of(method: str) -> tuple[Any, bool]:
    """The request class of ``/pkg.Service/Method`` and whether the response streams."""
    service, name = method.strip("/").split("/")
    desc = descriptor_pool.Default().FindMethodByName(f"{service}.{name}")
    return GetMessageClass(desc.input_type), bool(desc.server_streaming)


@st.composite
def any_request(draw: st.DrawFn, cls: Any) -> Any:
    msg = cls()
    for f in cls.DESCRIPTOR.fields:
        if f.message_type is not None:
            if f.message_type.full_name == "plait.v1.HlcTimestamp" and draw(st.booleans()):
                msg.hlc.physical_ms, msg.hlc.logical = draw(uint64), draw(uint32)
            elif f.message_type.full_name == "plait.v1.WorkflowSpec":
                msg.spec.CopyFrom(draw(specs()))
        elif f.type in _SCALARS and not f.is_repeated and draw(st.integers(0, 3)):
            setattr(msg, f.name, draw(_SCALARS[f.type]))
    return msg


@pytest.mark.parametrize("method", sorted(m for m in plait_methods() if m != CONNECT))
@settings(FUZZ, max_examples=15)
@given(data=st.data())
def test_every_rpc_with_every_field_mutated(
    target: Target, method: str, data: st.DataObject
) -> None:
    cls, streaming = request_of(method)
    req = data.draw(any_request(cls), "request")
    if getattr(req, "workflow_id", None) == "wf-known":
        req.workflow_id = target.known[0]
    if streaming:
        stream = target.channel.unary_stream(
            method, request_serializer=raw, response_deserializer=raw
        )
        checked(lambda: list(stream(req.SerializeToString(), timeout=30)))
    else:
        checked(lambda: target.unary(method)(req.SerializeToString(), timeout=30))
    target.assert_serving()


@settings(FUZZ, max_examples=150)
@given(st.sampled_from(sorted(plait_methods())), st.binary(max_size=3000))
def test_random_bytes_on_every_rpc(target: Target, method: str, body: bytes) -> None:
    if method == CONNECT:
        stream = target.channel.stream_stream(
            method, request_serializer=raw, response_deserializer=raw
        )
        checked(lambda: list(stream(iter([body]), timeout=30)))
    elif method.endswith("/WatchWorkflow"):
        stream = target.channel.unary_stream(
            method, request_serializer=raw, response_deserializer=raw
        )
        checked(lambda: list(stream(body, timeout=30)))
    else:
        checked(lambda: target.unary(method)(body, timeout=30))
    target.assert_serving()


def test_undecodable_bytes_are_invalid_argument(target: Target) -> None:
    """Bytes that cannot be the request message: INVALID_ARGUMENT naming the type (unary and
    on the stream), never UNKNOWN."""
    garbage = b"\xff\xff\xff\xff\x0f"
    with pytest.raises(grpc.RpcError) as info:
        target.unary("/plait.v1.WorkflowService/SubmitWorkflow")(garbage, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "plait.v1.SubmitWorkflowRequest" in info.value.details()  # type: ignore[attr-defined]

    stream = target.channel.stream_stream(
        CONNECT, request_serializer=raw, response_deserializer=raw
    )
    with pytest.raises(grpc.RpcError) as info:
        list(stream(iter([garbage]), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "plait.v1.ConnectRequest" in info.value.details()  # type: ignore[attr-defined]
    target.assert_serving()


# ---- the worker stream -----------------------------------------------------------------------


class RawStream:
    """A Connect stream driven message by message (bytes or ConnectRequest), sync gRPC."""

    def __init__(self, target: Target) -> None:
        self._out: queue.Queue[bytes | None] = queue.Queue()
        self.inbox: queue.Queue[wpb.ConnectResponse | grpc.RpcError | None] = queue.Queue()
        connect = target.channel.stream_stream(
            CONNECT, request_serializer=raw, response_deserializer=wpb.ConnectResponse.FromString
        )
        self.call = connect(self._requests(), timeout=60)
        self.ended: grpc.RpcError | None = None
        self.closed = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _requests(self) -> Iterator[bytes]:
        while True:
            item = self._out.get()
            if item is None:
                return
            yield item

    def _read(self) -> None:
        try:
            for msg in self.call:
                self.inbox.put(msg)
            self.inbox.put(None)
        except grpc.RpcError as err:
            self.inbox.put(err)

    def send(self, msg: wpb.ConnectRequest | bytes) -> None:
        self._out.put(msg if isinstance(msg, bytes) else msg.SerializeToString())

    def next(self, kind: str, timeout: float) -> wpb.ConnectResponse | None:
        """The next message of ``kind`` within ``timeout`` s; None if none (or the stream ended)."""
        deadline = time.monotonic() + timeout
        while not self.closed:
            try:
                item = self.inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if item is None or isinstance(item, grpc.RpcError):
                self.closed = True
                self.ended = item
                return None
            if item.WhichOneof("message") == kind:
                return item
        return None

    def close(self) -> grpc.RpcError | None:
        """Half-closes, drains to the end, returns the error the stream ended with (if any)."""
        self._out.put(None)
        deadline = time.monotonic() + 20
        while not self.closed and time.monotonic() < deadline:
            self.next("__end__", deadline - time.monotonic())
        self.call.cancel()
        self._reader.join(10)
        return self.ended


@st.composite
def hellos(draw: st.DrawFn) -> wpb.ConnectRequest:
    """A hello: one in five has mutated fields, the rest open a stream that gets leases."""
    msg = wpb.ConnectRequest()
    h = msg.hello
    h.worker_id = f"fuzz-{next(worker_ids)}"
    h.slots = 2
    h.handlers.append("fuzz")
    if draw(st.integers(0, 4)) == 0:
        h.worker_id = draw(st.one_of(st.just(h.worker_id), bad_ids))
        h.slots = draw(st.one_of(st.just(2), uint32))
        h.handlers.extend(draw(st.lists(ids, max_size=3)))
        h.labels.update(draw(st.dictionaries(texts, texts, max_size=3)))
        h.resources.update(draw(st.dictionaries(ids, amounts, max_size=2)))
        if draw(st.booleans()):
            h.running.add(lease_id=draw(texts), fencing_token=draw(uint64), slots=draw(uint32))
        h.hostname, h.agent = draw(texts), draw(texts)
        h.resume_token = draw(st.one_of(st.just(""), texts))
    h.exec_enabled = draw(st.booleans())
    return msg


# Lease ids seen by earlier examples' streams: "foreign" reports name these (held by nobody
# now, or by another stream), or made-up text.
_known_leases: list[str] = []


def known_leases() -> list[str]:
    return _known_leases[-20:] or ["wf-x/a/1"]


@st.composite
def worker_steps(
    draw: st.DrawFn, focus: str
) -> list[Callable[[list[wpb.Lease]], wpb.ConnectRequest | bytes]]:
    """Messages after hello, each built when sent (from the leases held by then): one to three
    of the ``focus`` kind, then any others."""
    kinds = [focus] * draw(st.integers(1, 3)) if focus in STEP_KINDS else []
    kinds += draw(
        st.lists(
            st.sampled_from(
                [
                    "heartbeat",
                    "started",
                    "progress",
                    "finished",
                    "finished",
                    "credit",
                    "goodbye",
                    "hello",
                    "empty",
                    "bytes",
                ]
            ),
            max_size=6,
        )
    )
    return [_step(kind, draw) for kind in kinds]


STEP_KINDS = ("heartbeat", "started", "progress", "finished", "credit", "hello", "bytes")


def _step(kind: str, draw: st.DrawFn) -> Callable[[list[wpb.Lease]], wpb.ConnectRequest | bytes]:
    """One message: every value drawn now, the leases it names chosen when it is sent
    (a lease this stream holds, the same with a wrong token, or one it never held)."""
    hlc = (draw(st.one_of(st.just(0), uint64)), draw(uint32))
    if kind == "bytes":
        body = draw(st.binary(max_size=500))
        return lambda held: body
    if kind == "empty":
        return lambda held: wpb.ConnectRequest()
    if kind == "hello":
        again = draw(hellos())
        return lambda held: again
    if kind == "credit":
        slots = draw(uint32)
        return lambda held: wpb.ConnectRequest(credit=wpb.Credit(slots=slots))
    if kind == "goodbye":
        reason = draw(texts)
        return lambda held: wpb.ConnectRequest(goodbye=wpb.Goodbye(reason=reason))
    return _report_step(kind, draw, hlc)


def _report_step(
    kind: str, draw: st.DrawFn, hlc: tuple[int, int]
) -> Callable[[list[wpb.Lease]], wpb.ConnectRequest]:
    """A heartbeat, start, progress or result message about one to three leases."""
    choices = draw(
        st.lists(st.sampled_from(["held", "wrong-token", "foreign"]), min_size=1, max_size=3)
    )
    tokens = [draw(uint64) for _ in choices]
    # An index into the lease ids seen so far (resolved when sent), or made-up text.
    foreign = [draw(st.one_of(st.integers(0, 19), texts)) for _ in choices]
    details = [draw(json_texts) for _ in choices]
    outcome = [draw(st.one_of(st.integers(0, 6), int32)) for _ in choices]
    outputs = [draw(json_texts) for _ in choices]
    tails = [
        draw(st.one_of(st.just(""), texts, st.integers(60_000, 80_000).map(lambda n: "t" * n)))
        for _ in choices
    ]
    errors = [
        draw(st.one_of(st.just(""), texts, st.integers(10_000, 30_000).map(lambda n: "e" * n)))
        for _ in choices
    ]
    durs = [draw(durations) for _ in choices]
    hb_seq, grant_seq = draw(uint64), draw(uint64)

    def refs(held: list[wpb.Lease]) -> list[tuple[str, int]]:
        out = []
        for i, choice in enumerate(choices):
            if held and choice != "foreign":
                lease = held[i % len(held)]
                out.append((lease.lease_id, lease.fencing_token if choice == "held" else tokens[i]))
            else:
                other = foreign[i]
                if isinstance(other, int):
                    seen = known_leases()
                    other = seen[other % len(seen)]
                out.append((other, tokens[i]))
        return out

    def build(held: list[wpb.Lease]) -> wpb.ConnectRequest:
        msg = wpb.ConnectRequest()
        msg.hlc.physical_ms, msg.hlc.logical = hlc[0] or int(time.time() * 1000), hlc[1] % 1000
        rs = refs(held)
        if kind == "heartbeat":
            msg.heartbeat.sequence, msg.heartbeat.last_grant_sequence = hb_seq, grant_seq
            for lease_id, token in rs:
                msg.heartbeat.leases.add(lease_id=lease_id, fencing_token=token)
        elif kind == "started":
            for lease_id, token in rs:
                msg.action_started.leases.add(lease_id=lease_id, fencing_token=token)
        elif kind == "progress":
            for (lease_id, token), d in zip(rs, details, strict=True):
                msg.action_progress.leases.add(
                    lease_id=lease_id, fencing_token=token, details_json=d
                )
        else:
            for i, (lease_id, token) in enumerate(rs):
                r = msg.action_finished.results.add(
                    lease_id=lease_id,
                    fencing_token=token,
                    outcome=outcome[i],
                    outputs_json=outputs[i],
                    stdout_tail=tails[i],
                    stderr_tail=tails[i][: len(tails[i]) // 2],
                    exit_code=tokens[i] % 256,
                )
                if errors[i]:
                    r.error.code, r.error.message = 2, errors[i]
                set_duration(r.duration, durs[i])
        return msg

    return build


@pytest.mark.parametrize("focus", [*STEP_KINDS, "any"])
@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_worker_stream_with_hostile_reports(
    target: Target, focus: str, data: st.DataObject
) -> None:
    hello = data.draw(hellos(), "hello")
    steps = data.draw(worker_steps(focus), "steps")
    # Work for this stream to hold: one action only the fuzz workers serve.
    target.known.append(
        target.cluster.submit(pb.WorkflowSpec(name="fuzz", actions=[fuzz_action()]))
    )
    s = RawStream(target)
    try:
        s.send(hello)
        held: list[wpb.Lease] = []
        if s.next("welcome", 10) is not None:
            # A welcomed worker heartbeats at once: that proves it hears the coordinator, which
            # leases nothing to a session before it does.
            s.send(wpb.ConnectRequest(heartbeat=wpb.Heartbeat(sequence=1)))
            grant = s.next("lease_grant", 2)
            if grant is not None:
                held.extend(grant.lease_grant.leases)
                _known_leases.extend(lease.lease_id for lease in held)
        for build in steps:
            s.send(build(held))
    finally:
        err = s.close()
    if err is not None:
        assert err.code() not in BUG_CODES, f"{err.code()}: {err.details()}"  # type: ignore[attr-defined]
    target.assert_serving()


# ---- and afterwards: still a working coordinator with a sound journal -----------------------


def test_after_the_fuzzing_a_workflow_still_runs_and_the_journal_is_sound(target: Target) -> None:
    c = target.cluster
    for status in c.list_workflows():
        if status.state not in TERMINAL_WORKFLOW:
            c.cancel(status.workflow_id, "fuzzing over")
    # Leases of fuzz streams that went away end within the lease TTL (2 s); everything ends.
    wait_for(
        "every fuzzed workflow to end",
        lambda: all(s.state in TERMINAL_WORKFLOW for s in c.list_workflows()),
        timeout=60,
        interval=0.2,
    )

    spec = pb.WorkflowSpec(
        name="after-fuzz",
        actions=[
            pb.ActionSpec(id="a", handler="noop"),
            pb.ActionSpec(id="b", handler="noop", needs=["a"], input_json='{"n": 1}'),
        ],
    )
    workflow_id = c.submit(spec)

    async def run_it() -> None:
        w = ProtocolWorker(c.grpc_target, "after-fuzz-worker", handlers=("noop",))
        try:
            await w.connect()
            for _ in spec.actions:
                [lease] = await w.grants(1, timeout=30)
                w.heartbeat()
                w.finish(lease, json.dumps({"done": lease.action_id}))
                while True:  # the result is durable once acked
                    ack = (await w.next("ack", timeout=30)).ack
                    if any(r.lease_id == lease.lease_id for r in ack.results):
                        assert all(r.status.code == 0 for r in ack.results), ack
                        break
                w.credit(1)
        finally:
            await w.close()

    asyncio.run(run_it())
    status = c.wait_workflow(workflow_id, timeout=60)
    assert status.state == pb.WORKFLOW_STATE_SUCCEEDED, status
    target.assert_serving()
    # No exception escaped anywhere: the safety net (INTERNAL, a core rebuild) never fired.
    assert c.metric("plait_internal_errors_total") == 0, c.daemon("coordinator").log_tail()
    assert c.metric("plait_core_rebuilds_total") == 0
    assert c.metric("plait_input_refused_total", source="worker") > 0
    assert c.metric("plait_input_refused_total", source="client") > 0
    rows = journal_check.read_sqlite(Path(str(c.tmp)) / "plait.db")
    journal_check.check_rows(rows)  # sequence, HLC and payload order over the whole journal
    # journal_check does not model RetryWorkflow (a retried action ends twice: I1 counts both),
    # so workflows the fuzzing retried are left out of the per-workflow invariants.
    # Nor speculation (a hedge is a second live lease: I5 "no hedging in these tests").
    retried = {r.workflow_id for r in rows if r.type == pb.EVENT_TYPE_WORKFLOW_RETRIED}
    retried |= {
        r.workflow_id
        for r in rows
        if r.type == pb.EVENT_TYPE_WORKFLOW_SUBMITTED
        and any(a.HasField("speculate") for a in r.event.spec.actions)
    }
    summary = journal_check.check_journal([r for r in rows if r.workflow_id not in retried])
    assert summary.workflows > len(retried) and summary.finished_workflows == summary.workflows
    assert pb.EVENT_TYPE_ACTION_LEASED in {r.type for r in rows}
