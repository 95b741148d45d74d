"""Parsing and printing durations (plait.durations): flags, env and YAML all go through it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from google.protobuf import duration_pb2

from plait.durations import format_duration, from_proto, parse_duration, to_proto


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("250ms", timedelta(milliseconds=250)),
        ("2s", timedelta(seconds=2)),
        ("5m", timedelta(minutes=5)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1h30m15s", timedelta(hours=1, minutes=30, seconds=15)),
        ("1.5m", timedelta(seconds=90)),
        ("1d", timedelta(days=1)),
        (" 2s ", timedelta(seconds=2)),
        ("3", timedelta(seconds=3)),
        ("0.5", timedelta(milliseconds=500)),
        (7, timedelta(seconds=7)),
        (0.25, timedelta(milliseconds=250)),
    ],
)
def test_parses(text: str | int | float, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", " ", "s", "5x", "2 s", "10ms5", "m5", "1h-30m", "-1s", "ms", "1..5s", "abc", "nan", True],
)
def test_bad_input_names_the_field_and_the_text(text: str | bool) -> None:
    with pytest.raises(ValueError, match=r"^lease_ttl: expected a duration") as info:
        parse_duration(text, field="lease_ttl")
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("text", ["inf", "nan", "-1", "-1s", "1e300s", 1e300, -5])
def test_non_finite_negative_or_huge_is_bad_input_naming_the_field(text: str | float) -> None:
    with pytest.raises(ValueError, match="heartbeat_interval"):
        parse_duration(text, field="heartbeat_interval")


@pytest.mark.parametrize(
    ("d", "text"),
    [
        (timedelta(milliseconds=250), "250ms"),
        (timedelta(seconds=2), "2s"),
        (timedelta(minutes=5), "5m"),
        (timedelta(hours=1, minutes=30), "1h30m"),
        (timedelta(seconds=90), "1m30s"),
        (timedelta(milliseconds=1500), "1.5s"),
        (timedelta(0), "0ms"),
    ],
)
def test_formats_and_round_trips(d: timedelta, text: str) -> None:
    assert format_duration(d) == text
    assert parse_duration(format_duration(d)) == d


def test_proto_round_trip() -> None:
    d = timedelta(seconds=2, milliseconds=250)

    msg = to_proto(d)

    assert (msg.seconds, msg.nanos) == (2, 250_000_000)
    assert from_proto(msg) == d
    into = duration_pb2.Duration()
    assert to_proto(d, into) is into
