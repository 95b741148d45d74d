"""Real records and core state for fork/join and tracing tests: workflows driven through the
pure core (RecordingDriver), each commit handed to ForkJoin and Tracing as the runtime does."""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from plait.coordinator.core.model import Outcome
from plait.coordinator.forkjoin import Fork, ForkJoin, Join
from plait.coordinator.tracing import Tracing
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb
from tests.unit.core_driver import RecordingDriver, grants


class Traced:
    """A driver whose every commit goes through ForkJoin then Tracing (in-memory spans)."""

    def __init__(self, driver: RecordingDriver | None = None) -> None:
        self.d = driver or RecordingDriver()
        self.fj = ForkJoin()
        self.exporter = InMemorySpanExporter()
        self.tracing = Tracing(processor=SimpleSpanProcessor(self.exporter))
        self.commits: list[list[pb.HistoryEvent]] = []
        self.forks: list[Fork] = []
        self.joins: list[Join] = []

    def feed(self, out: Outcome) -> Outcome:
        self.commits.append(list(out.records))
        forks, joins = self.fj.on_records(self.d.st, out.records, self.d.mono)
        self.forks += forks
        self.joins += joins
        self.tracing.on_records(out.records, (forks, joins))
        for msgs in out.sends.values():
            for m in msgs:
                if m.HasField("lease_grant"):
                    self.tracing.on_grant(m.lease_grant, "w1")
        return out

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if name is None or s.name == name]


def fork_join_spec(
    kind: int = pb.JOIN_KIND_AT_LEAST,
    at_least: int = 2,
    branches: Sequence[str] = ("b1", "b2", "b3"),
) -> pb.WorkflowSpec:
    """a -> branches -> j (j joins the branches under ``kind``)."""
    spec = pb.WorkflowSpec(name="fj")
    spec.actions.add(id="a", handler="h")
    for b in branches:
        spec.actions.add(id=b, handler="h", needs=["a"])
    join = pb.JoinPolicy(kind=kind, at_least_count=at_least)  # type: ignore[arg-type]
    spec.actions.add(id="j", handler="h", needs=list(branches), join=join)
    return spec


def run_fork_join(t: Traced, fail: str = "b2", traceparent: str = "") -> dict[str, wpb.Lease]:
    """Runs :func:`fork_join_spec` to the end on one worker: ``fail`` fails, the others succeed
    a second apart; returns every lease by action id."""
    d = t.d
    t.feed(d.hello("s1", "w1", slots=4))
    if traceparent:
        from plait.coordinator.core.events import WorkflowSubmitted

        out = t.feed(
            d.handle(
                WorkflowSubmitted(
                    "submit", "wf-1", fork_join_spec(), "", reply=object(), traceparent=traceparent
                )
            )
        )
    else:
        out = t.feed(d.submit(fork_join_spec()))
    leases = {x.action_id: x for x in grants(out)}
    out = t.feed(d.done("s1", leases["a"]))
    leases.update({x.action_id: x for x in grants(out)})
    for b in ("b1", "b2", "b3"):
        d.mono += 1
        d.wall += 1000
        failed = wpb.ACTION_OUTCOME_FAILED if b == fail else wpb.ACTION_OUTCOME_SUCCEEDED
        out = t.feed(d.done("s1", leases[b], outcome=failed))
        leases.update({x.action_id: x for x in grants(out)})
    t.feed(d.done("s1", leases["j"]))
    return leases
