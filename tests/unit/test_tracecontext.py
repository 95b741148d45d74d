"""W3C traceparent parsing and formatting, and the derived trace and span ids."""

from __future__ import annotations

import pytest

from plait.tracecontext import (
    TraceParent,
    describe_traceparent,
    format_traceparent,
    parse_traceparent,
    span_id_for,
    trace_id_for,
)

GOOD = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_parse_and_format_round_trip() -> None:
    tp = parse_traceparent(GOOD)
    assert tp == TraceParent(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, 1)
    assert tp.sampled and tp.trace_id_hex == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert str(tp) == GOOD
    assert format_traceparent(tp.trace_id, tp.span_id, False).endswith("-00")
    assert describe_traceparent(GOOD) is None


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("", "55 characters"),
        (GOOD.upper(), "lower case"),
        ("01" + GOOD[2:], "version '01'"),
        ("00-" + "0" * 32 + GOOD[35:], "trace id must not be all zeros"),
        (GOOD[:36] + "0" * 16 + "-01", "parent span id must not be all zeros"),
        (GOOD.replace("-", "_"), "00-<32 hex>"),
        (GOOD + "-x", "55 characters"),
        ("x" * 10_000, "…"),  # a huge value is not echoed whole
    ],
)
def test_bad_traceparents_say_why(value: str, why: str) -> None:
    reason = describe_traceparent(value)
    assert reason is not None and why in reason
    assert len(reason) < 300
    assert parse_traceparent(value) is None


def test_format_refuses_zero_ids() -> None:
    with pytest.raises(ValueError):
        format_traceparent(0, 1)
    with pytest.raises(ValueError):
        format_traceparent(1, 0)


def test_derived_ids_are_stable_distinct_and_never_zero() -> None:
    assert trace_id_for("wf-1") == trace_id_for("wf-1") != trace_id_for("wf-2")
    assert 0 < trace_id_for("wf-1") < 1 << 128
    # The submitter's trace wins; a bad one is ignored (the servicer refuses it anyway).
    assert trace_id_for("wf-1", GOOD) == 0x4BF92F3577B34DA6A3CE929D0E0E4736
    assert trace_id_for("wf-1", "junk") == trace_id_for("wf-1")
    assert span_id_for("attempt", "wf-1/a/1") == span_id_for("attempt", "wf-1/a/1")
    assert span_id_for("attempt", "wf-1/a/1") != span_id_for("attempt", "wf-1/a/2")
    assert span_id_for("a", "bc") != span_id_for("ab", "c")  # parts are length-prefixed
    assert all(0 < span_id_for("x", i) < 1 << 64 for i in range(1000))
    # Fixed values: a change here breaks trace continuity across an upgrade.
    assert f"{trace_id_for('wf-1'):032x}" == "f18d79c3d9c6c38e21f3da472eec117c"
