"""Tracing: the span tree of a fork -> 3 branches -> join driven through the pure core, with
derived ids that a restarted coordinator (a new Tracing) reproduces."""

from __future__ import annotations

import logging

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode

from plait.coordinator import tracing as tr
from plait.coordinator.core.replay import replay
from plait.coordinator.core.state import SchedulerState
from plait.otel import span_exporters
from plait.tracecontext import parse_traceparent, span_id_for, trace_id_for
from tests.unit.core_driver import CONFIG, grants
from tests.unit.trace_support import Traced, fork_join_spec, run_fork_join

SUBMITTER = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _one(spans: list[ReadableSpan], **attrs: object) -> ReadableSpan:
    found = [s for s in spans if all(s.attributes.get(k) == v for k, v in attrs.items())]  # type: ignore[union-attr]
    assert len(found) == 1, (attrs, [(s.name, s.attributes) for s in spans])
    return found[0]


def _shape(spans: list[ReadableSpan]) -> list[tuple[object, ...]]:
    return sorted(
        (
            s.name,
            s.context.trace_id,
            s.context.span_id,
            s.parent.span_id if s.parent else None,
            s.attributes.get(tr.ATTR_STATE),  # type: ignore[union-attr]
            tuple(l.context.span_id for l in s.links),
            s.start_time,
            s.end_time,
        )
        for s in spans
    )


def test_fork_join_tree() -> None:
    t = Traced()
    leases = run_fork_join(t, fail="b2")
    spans = t.spans()
    assert sorted(s.name for s in spans) == sorted(
        [tr.SPAN_WORKFLOW, tr.SPAN_FORK, tr.SPAN_JOIN] + [tr.SPAN_ATTEMPT] * 5
    )
    wf = _one(spans, **{tr.ATTR_WORKFLOW_NAME: "fj"})
    assert wf.parent is None and wf.context.trace_id == trace_id_for("wf-1")
    assert wf.attributes[tr.ATTR_STATE] == "WORKFLOW_STATE_PARTIALLY_SUCCEEDED"  # type: ignore[index]
    fork = t.spans(tr.SPAN_FORK)[0]
    assert fork.parent is not None and fork.parent.span_id == wf.context.span_id
    assert fork.attributes[tr.ATTR_FORK_KIND] == "dependents"  # type: ignore[index]
    assert fork.attributes[tr.ATTR_FORK_WIDTH] == 3  # type: ignore[index]
    attempts = {s.attributes[tr.ATTR_ACTION_ID]: s for s in t.spans(tr.SPAN_ATTEMPT)}  # type: ignore[index]
    for b in ("b1", "b2", "b3"):
        assert attempts[b].parent.span_id == fork.context.span_id  # type: ignore[union-attr]
    for other in ("a", "j"):  # a forks, j joins: neither is a fork's branch
        assert attempts[other].parent.span_id == wf.context.span_id  # type: ignore[union-attr]
    assert attempts["b2"].status.status_code == StatusCode.ERROR
    assert attempts["b2"].attributes[tr.ATTR_STATE] == "ACTION_STATE_FAILED"  # type: ignore[index]
    assert attempts["b1"].status.status_code == StatusCode.UNSET
    # The fork ends with its last branch; every span ended at its terminal event.
    assert fork.end_time == attempts["b3"].end_time
    assert attempts["b1"].end_time - attempts["b1"].start_time == 1_000_000_000  # type: ignore[operator]

    join = t.spans(tr.SPAN_JOIN)[0]
    assert join.parent.span_id == wf.context.span_id  # type: ignore[union-attr]
    a = join.attributes
    assert a is not None
    assert (a[tr.ATTR_JOIN_KIND], a[tr.ATTR_JOIN_REQUIRED], a[tr.ATTR_JOIN_OF]) == (
        "at_least",
        2,
        3,
    )
    assert a[tr.ATTR_JOIN_OUTCOME] == "met" and tuple(a[tr.ATTR_JOIN_FAILED]) == ("b2",)  # type: ignore[arg-type]
    assert tuple(a[tr.ATTR_JOIN_SUCCEEDED]) == ("b1", "b3")  # type: ignore[arg-type]
    # start: the first need ended (b1); end: the join was met (b3)
    assert join.start_time == attempts["b1"].end_time and join.end_time == attempts["b3"].end_time
    links = {l.attributes[tr.ATTR_ACTION_ID]: l for l in join.links}  # type: ignore[index]
    assert set(links) == {"b1", "b2", "b3"}
    for b in ("b1", "b2", "b3"):
        assert links[b].context.span_id == attempts[b].context.span_id
        assert links[b].context.trace_id == wf.context.trace_id
    assert links["b2"].attributes[tr.ATTR_STATE] == "ACTION_STATE_FAILED"  # type: ignore[index]
    # The lease's traceparent names its attempt span, sampled.
    for action_id, lease in leases.items():
        tp = parse_traceparent(lease.traceparent)
        assert tp is not None and tp.sampled
        assert tp.span_id == attempts[action_id].context.span_id
        assert tp.span_id == span_id_for("attempt", lease.lease_id)


def test_ids_are_the_same_for_a_new_tracing_given_the_same_records() -> None:
    first = Traced()
    run_fork_join(first)
    again = Traced()
    for records in first.commits:
        forks, joins = again.fj.on_records(first.d.st, records, 0.0)
        again.tracing.on_records(records, (forks, joins))
    assert [x[:6] for x in _shape(again.spans())] == [x[:6] for x in _shape(first.spans())]


def test_a_restarted_coordinator_continues_the_trace_under_the_same_parents() -> None:
    """The journal up to the fork is replayed into a new core; a new Tracing resumes from it
    and sees only what happens after: its spans land under the first run's parents."""
    whole = Traced()
    run_fork_join(whole, traceparent=SUBMITTER)
    cut = 3  # hello, submit, a's result (the fork, the branches leased)
    before = [ev for records in whole.commits[:cut] for ev in records]
    core = SchedulerState(CONFIG)
    replay(core, before, whole.d.batches[cut - 1].at)
    after = Traced()
    after.tracing.resume(core)
    for records in whole.commits[cut:]:
        forks, joins = after.fj.on_records(whole.d.st, records, 0.0)
        after.tracing.on_records(records, (forks, joins))
    ids = {(s.name, s.context.span_id): s for s in whole.spans()}
    later = after.spans()
    assert {s.name for s in later} == {tr.SPAN_ATTEMPT, tr.SPAN_JOIN}  # j's attempt, the join
    for s in later:
        assert s.context.trace_id == 0x4BF92F3577B34DA6A3CE929D0E0E4736  # the submitter's
        assert (s.name, s.context.span_id) in ids
        assert s.parent is not None
        assert s.parent.span_id == ids[(s.name, s.context.span_id)].parent.span_id  # type: ignore[union-attr]


def test_submitter_traceparent_is_the_workflow_spans_parent() -> None:
    t = Traced()
    run_fork_join(t, traceparent=SUBMITTER)
    wf = t.spans(tr.SPAN_WORKFLOW)[0]
    assert wf.parent is not None and wf.parent.is_remote
    assert (wf.parent.trace_id, wf.parent.span_id) == (
        0x4BF92F3577B34DA6A3CE929D0E0E4736,
        0x00F067AA0BA902B7,
    )
    assert {s.context.trace_id for s in t.spans()} == {wf.parent.trace_id}


def test_open_spans_end_at_shutdown_as_coordinator_stopped() -> None:
    t = Traced()
    d = t.d
    t.feed(d.hello("s1", "w1", slots=4))
    out = t.feed(d.submit(fork_join_spec()))
    t.feed(d.done("s1", grants(out)[0]))  # the branches are leased
    assert not t.spans(tr.SPAN_WORKFLOW)
    t.tracing.shutdown()
    spans = t.spans()
    stopped = [s for s in spans if s.attributes.get(tr.ATTR_STATE) == tr.STATE_STOPPED]  # type: ignore[union-attr]
    assert sorted(s.name for s in stopped) == sorted(
        [tr.SPAN_WORKFLOW, tr.SPAN_FORK] + [tr.SPAN_ATTEMPT] * 3
    )
    assert all(s.end_time is not None for s in spans)


def test_tracing_off_makes_no_spans_and_says_not_sampled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    off = tr.Tracing()
    assert not off.enabled
    t = Traced()
    t.tracing = off
    leases = run_fork_join(t, traceparent=SUBMITTER)
    for lease in leases.values():
        tp = parse_traceparent(lease.traceparent)
        assert tp is not None and not tp.sampled
        assert tp.trace_id == 0x4BF92F3577B34DA6A3CE929D0E0E4736
        assert tp.span_id == span_id_for("attempt", lease.lease_id)
    assert off.trace_id(leases["a"].lease_id) is None  # no exemplar without a trace
    off.shutdown()


def test_exemplar_trace_id_outlives_the_attempt_span() -> None:
    t = Traced()
    leases = run_fork_join(t)
    assert t.tracing.trace_id(leases["b1"].lease_id) == f"{trace_id_for('wf-1'):032x}"


def test_exporters_follow_the_otel_environment(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    [http] = span_exporters()
    assert type(http).__module__ == "opentelemetry.exporter.otlp.proto.http.trace_exporter"
    http.shutdown()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")  # the per-signal one wins
    [grpc_] = span_exporters()
    assert type(grpc_).__module__ == "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"
    grpc_.shutdown()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "no-such-exporter")
    with caplog.at_level(logging.WARNING, logger="plait.otel"):
        assert span_exporters() == []
    assert "not installed" in caplog.text
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console,otlp")  # several at once, as the SDK
    both = span_exporters()
    assert [type(x).__name__ for x in both] == ["ConsoleSpanExporter", "OTLPSpanExporter"]
    for x in both:
        x.shutdown()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    off = tr.Tracing()
    assert not off.enabled
    off.shutdown()


def test_status_carries_the_trace_id_and_plait_status_shows_it() -> None:
    from plait.cli import render
    from plait.coordinator.core import views

    t = Traced()
    run_fork_join(t, traceparent=SUBMITTER)
    st = t.d.st
    status = views.workflow_status(st, st.workflows["wf-1"], with_actions=False)
    assert status.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert "trace     4bf92f3577b34da6a3ce929d0e0e4736" in render.workflow_header(status)
    t.d.submit(fork_join_spec(), wf_id="wf-2")
    plain = views.workflow_status(st, st.workflows["wf-2"], with_actions=False)
    assert plain.trace_id == f"{trace_id_for('wf-2'):032x}"
