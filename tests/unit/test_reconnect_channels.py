"""Reconnects wait only for the session's backoff, not gRPC's own (issue 11).

The end-to-end measurement is ``tests/system/test_reconnect_storm.py``; these pin the two
mechanisms :mod:`plait.worker.connect` uses for it.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from plait.worker.backoff import Backoff
from plait.worker.connect import CoordinatorLinks, reconnect_options


def test_channel_backoff_follows_the_configured_one() -> None:
    backoff = Backoff(timedelta(milliseconds=50), timedelta(seconds=1))
    options = dict(reconnect_options(backoff))
    assert options["grpc.initial_reconnect_backoff_ms"] == 50
    assert options["grpc.max_reconnect_backoff_ms"] == 1000
    # Each channel its own subchannel, so a fresh channel never inherits a backoff timer.
    assert options["grpc.use_local_subchannel_pool"] == 1
    # gRPC reads this one as the minimum connect timeout: left at its default.
    assert "grpc.min_reconnect_backoff_ms" not in options


def test_links_pass_the_options_to_their_channels() -> None:
    backoff = Backoff(timedelta(milliseconds=200), timedelta(seconds=10))
    links = CoordinatorLinks("127.0.0.1:1", backoff, [("grpc.max_send_message_length", 7)])
    options = dict(links._options)
    assert options["grpc.max_send_message_length"] == 7
    assert options["grpc.initial_reconnect_backoff_ms"] == 200
    assert options["grpc.max_reconnect_backoff_ms"] == 10_000


def test_forget_makes_the_next_stub_dial_on_a_fresh_channel() -> None:
    async def scenario() -> None:
        links = CoordinatorLinks("127.0.0.1:1", Backoff())
        links.stub()
        first = links._channels["127.0.0.1:1"]
        links.stub()
        assert links._channels["127.0.0.1:1"] is first  # kept while streams succeed
        await links.forget("127.0.0.1:1")
        assert "127.0.0.1:1" not in links._channels
        links.stub()
        assert links._channels["127.0.0.1:1"] is not first
        await links.forget("127.0.0.1:2")  # no channel there: nothing to do
        await links.close()

    asyncio.run(scenario())
