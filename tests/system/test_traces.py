"""Spans of a fork -> 3 branches -> join, exported over real OTLP/gRPC by a real coordinator and
a real workerd to an OTLP receiver in this process, and the tree they make."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as tspb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as tsgrpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from plait.tracecontext import SPAN_EXECUTE
from plait.v1 import workflow_pb2 as wf
from tests.system.harness import Cluster, describe, handler_action, python_action, wait_for

pytestmark = [
    pytest.mark.system,
    pytest.mark.timeout(120),
    pytest.mark.usefixtures("workerd_available"),
]

HANDLERS = "tests.system.restart_handlers:worker"
# Literal names on purpose: they are the contract with dashboards and users, not just constants.
WORKFLOW, FORK, ATTEMPT, JOIN = "plait.workflow", "plait.fork", "plait.action.attempt", "plait.join"
ERROR = trace_pb2.Status.STATUS_CODE_ERROR


@dataclass
class Span:
    name: str
    service: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, object]
    links: list[tuple[str, str, dict[str, object]]]
    status: int
    start_ns: int
    end_ns: int


def _value(v: common_pb2.AnyValue) -> object:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def _attrs(kvs: object) -> dict[str, object]:
    return {kv.key: _value(kv.value) for kv in kvs}  # type: ignore[attr-defined]


@dataclass
class Receiver(tsgrpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: keeps every span exported to it."""

    spans: list[Span] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def Export(self, request: tspb.ExportTraceServiceRequest, context: object) -> object:
        got = []
        for rs in request.resource_spans:
            service = str(_attrs(rs.resource.attributes).get("service.name", ""))
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(
                        Span(
                            s.name,
                            service,
                            s.trace_id.hex(),
                            s.span_id.hex(),
                            s.parent_span_id.hex(),
                            _attrs(s.attributes),
                            [
                                (l.trace_id.hex(), l.span_id.hex(), _attrs(l.attributes))
                                for l in s.links
                            ],
                            s.status.code,
                            s.start_time_unix_nano,
                            s.end_time_unix_nano,
                        )
                    )
        with self.changed:
            self.spans += got
            self.changed.notify_all()
        return tspb.ExportTraceServiceResponse()

    def wait(self, what: str, probe: object, timeout: float = 30.0) -> list[Span]:
        """Waits (on exports, not on a clock) until ``probe(spans)`` is true."""
        with self.changed:
            ok = self.changed.wait_for(lambda: probe(list(self.spans)), timeout)  # type: ignore[operator]
            assert ok, (
                f"timed out waiting for {what}; got {[(s.name, s.attributes) for s in self.spans]}"
            )
            return list(self.spans)


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, int]]:
    r = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    tsgrpc.add_TraceServiceServicer_to_server(r, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield r, port
    finally:
        server.stop(grace=None).wait()


def _otlp_env(port: int, service: str) -> dict[str, str]:
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_SERVICE_NAME": service,
    }


# b3 succeeds only once the test has seen b1 succeed and b2 fail, so the join is met by b3
# with b2 already failed (without the latch b1 and b3 could meet it before b2 ends).
LATCH = """
import os, time
deadline = time.monotonic() + 60
while not os.path.exists({go!r}) and time.monotonic() < deadline:
    time.sleep(0.02)
plait_output({{}})
"""


def _spec(go: str) -> wf.WorkflowSpec:
    """a -> b1 (exec), b2 (exec, fails), b3 (exec, waits for ``go``) -> j (handler, at least
    2 of 3)."""
    spec = wf.WorkflowSpec(name="traced")
    spec.actions.append(python_action("a", "plait_output({})"))
    spec.actions.append(python_action("b1", "plait_output({})", needs=["a"]))
    spec.actions.append(python_action("b2", "raise SystemExit(3)", needs=["a"]))
    spec.actions.append(python_action("b3", LATCH.format(go=go), needs=["a"]))
    j = handler_action("j", "noop", needs=["b1", "b2", "b3"])
    j.join.kind = wf.JOIN_KIND_AT_LEAST
    j.join.at_least_count = 2
    spec.actions.append(j)
    return spec


def _run(
    cluster: Cluster, receiver: tuple[Receiver, int], monkeypatch: pytest.MonkeyPatch
) -> tuple[Receiver, wf.WorkflowStatus]:
    r, port = receiver
    for key, value in _otlp_env(port, "plait-coordinator").items():
        monkeypatch.setenv(key, value)  # the coordinator's environment is ours
    cluster.start_coordinator()
    cluster.add_worker("w1", slots=4, handlers=[HANDLERS], env=_otlp_env(port, "plait-workerd"))
    go = cluster.tmp / "go"
    workflow_id = cluster.submit(_spec(str(go)))

    def b1_and_b2_ended() -> bool:
        states = {a.action_id: a.state for a in cluster.get(workflow_id).actions}
        return (states["b1"], states["b2"]) == (wf.ACTION_STATE_SUCCEEDED, wf.ACTION_STATE_FAILED)

    wait_for("b1 to succeed and b2 to fail", b1_and_b2_ended, timeout=60)
    go.touch()
    status = cluster.wait_workflow(workflow_id, timeout=60)
    assert status.state == wf.WORKFLOW_STATE_PARTIALLY_SUCCEEDED, describe(status)
    assert len(status.trace_id) == 32
    return r, status


def _coordinator_tree(r: Receiver, status: wf.WorkflowStatus) -> list[Span]:
    def complete(spans: list[Span]) -> bool:
        names = [s.name for s in spans if s.trace_id == status.trace_id]
        return WORKFLOW in names and JOIN in names and names.count(ATTEMPT) >= 5

    spans = r.wait("the workflow's spans", complete)
    return [s for s in spans if s.trace_id == status.trace_id and s.service == "plait-coordinator"]


def test_fork_join_span_tree(
    cluster: Cluster, receiver: tuple[Receiver, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    r, status = _run(cluster, receiver, monkeypatch)
    spans = _coordinator_tree(r, status)
    [root] = [s for s in spans if s.name == WORKFLOW]
    assert root.parent_id == "" and root.attributes["plait.workflow.id"] == status.workflow_id
    assert root.attributes["plait.state"] == "WORKFLOW_STATE_PARTIALLY_SUCCEEDED"
    [fork] = [s for s in spans if s.name == FORK]
    assert fork.parent_id == root.span_id
    assert fork.attributes["plait.fork.kind"] == "dependents"
    assert fork.attributes["plait.fork.width"] == 3
    assert fork.attributes["plait.action.id"] == "a"
    attempts = {s.attributes["plait.action.id"]: s for s in spans if s.name == ATTEMPT}
    assert set(attempts) == {"a", "b1", "b2", "b3", "j"}
    for b in ("b1", "b2", "b3"):
        assert attempts[b].parent_id == fork.span_id, b
    assert attempts["a"].parent_id == root.span_id
    assert attempts["j"].parent_id == root.span_id
    assert attempts["b2"].status == ERROR
    assert attempts["b2"].attributes["plait.state"] == "ACTION_STATE_FAILED"
    assert attempts["b1"].status != ERROR
    assert attempts["b1"].attributes["plait.state"] == "ACTION_STATE_SUCCEEDED"
    for s in spans:  # every span ended at its terminal event, with its state
        assert s.end_ns >= s.start_ns > 0 and "plait.state" in s.attributes, s
    [join] = [s for s in spans if s.name == JOIN]
    assert join.parent_id == root.span_id
    assert join.attributes["plait.join.kind"] == "at_least"
    assert (join.attributes["plait.join.required"], join.attributes["plait.join.of"]) == (2, 3)
    assert join.attributes["plait.join.outcome"] == "met"
    assert join.attributes["plait.join.failed"] == ["b2"]
    links = {
        attrs["plait.action.id"]: (trace_id, span_id) for trace_id, span_id, attrs in join.links
    }
    assert links == {b: (status.trace_id, attempts[b].span_id) for b in ("b1", "b2", "b3")}
    # start: the first need ended; end: b3 met the join
    assert join.start_ns == min(attempts[b].end_ns for b in ("b1", "b2", "b3"))
    assert join.end_ns == attempts["b3"].end_ns


def test_worker_spans_continue_the_attempt(
    cluster: Cluster, receiver: tuple[Receiver, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every attempt (exec and handler alike) has a ``plait.action.execute`` span on the worker,
    its child through the lease's traceparent. Needs the worker-side spans (workerd + SDK)."""
    r, status = _run(cluster, receiver, monkeypatch)
    spans = _coordinator_tree(r, status)
    attempts = {s.span_id: s for s in spans if s.name == ATTEMPT}

    def executed(all_spans: list[Span]) -> bool:
        parents = {s.parent_id for s in all_spans if s.name == SPAN_EXECUTE}
        return set(attempts) <= parents

    everything = r.wait("an execute span under every attempt", executed)
    execute = [s for s in everything if s.name == SPAN_EXECUTE and s.parent_id in attempts]
    assert {s.trace_id for s in execute} == {status.trace_id}
    assert {s.service for s in execute} == {"plait-workerd"}
    by_action = {attempts[s.parent_id].attributes["plait.action.id"]: s for s in execute}
    assert set(by_action) == {"a", "b1", "b2", "b3", "j"}
    assert by_action["b2"].status == ERROR


SUBMITTER = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_submitter_traceparent_parents_the_workflow_span(
    cluster: Cluster, receiver: tuple[Receiver, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client's traceparent (explicit, or its current OpenTelemetry span's) becomes the
    workflow span's parent; a malformed one is refused, naming the field."""
    from opentelemetry.sdk.trace import TracerProvider

    import plait
    from plait.errors import InvalidArgumentError
    from plait.v1 import workflow_service_pb2 as ws

    r, port = receiver
    for key, value in _otlp_env(port, "plait-coordinator").items():
        monkeypatch.setenv(key, value)
    cluster.start_coordinator()
    # No worker: each workflow waits until it is cancelled, which ends its span.
    spec = wf.WorkflowSpec(name="waits", actions=[python_action("a", "plait_output({})")])
    with pytest.raises(grpc.RpcError) as refused:
        cluster.workflows.SubmitWorkflow(
            ws.SubmitWorkflowRequest(spec=spec, traceparent="00-xyz-01"), timeout=30
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "traceparent" in str(refused.value.details())
    with plait.Client(cluster.grpc_target) as client:
        with pytest.raises(InvalidArgumentError):
            client.submit(spec, traceparent="00-xyz-01")  # checked before it is sent
        explicit = client.submit(spec, traceparent=SUBMITTER).workflow_id
        tracer = TracerProvider().get_tracer("test")
        with tracer.start_as_current_span("caller") as caller:
            implicit = client.submit(spec).workflow_id
        ctx = caller.get_span_context()
        assert client.get(explicit).trace_id == SUBMITTER.split("-")[1]
        assert client.get(implicit).trace_id == f"{ctx.trace_id:032x}"
        listed = {w.workflow_id: w.trace_id for w in client.list()}
        assert listed[explicit] == SUBMITTER.split("-")[1]
        for workflow_id in (explicit, implicit):
            client.cancel(workflow_id)

    def both(spans: list[Span]) -> bool:
        ids = {s.attributes.get("plait.workflow.id") for s in spans if s.name == WORKFLOW}
        return {explicit, implicit} <= ids

    spans = [s for s in r.wait("both workflow spans", both) if s.name == WORKFLOW]
    by_id = {s.attributes["plait.workflow.id"]: s for s in spans}
    assert (by_id[explicit].trace_id, by_id[explicit].parent_id) == tuple(SUBMITTER.split("-")[1:3])
    assert (by_id[implicit].trace_id, by_id[implicit].parent_id) == (
        f"{ctx.trace_id:032x}",
        f"{ctx.span_id:016x}",
    )
