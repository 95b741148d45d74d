"""Live logs, unit by unit: the core's holder check, the coordinator's bounded window, the
worker's bounded and coalesced output, the stream check, and streaming redaction."""

from __future__ import annotations

import pytest

from plait.coordinator.config import Limits
from plait.coordinator.core.model import KeepLogs
from plait.coordinator.live_logs import LiveLogs
from plait.coordinator.services.worker import ReportCheck
from plait.errors import InvalidArgumentError
from plait.live_logs import LOG_CHUNK_BYTES, STDERR, STDOUT, LiveOutput, logs_messages
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb
from plait.workerd.secrets import Redactor
from tests.unit.core_driver import Driver, grants, independent, messages

E = pb


def _logs(lease: wpb.Lease, data: bytes, *, token: int | None = None, offset: int = 0) -> object:
    chunk = pb.LogChunk(stream=STDOUT, offset=offset, data=data)
    entry = wpb.LeaseLogs(
        lease_id=lease.lease_id,
        fencing_token=lease.fencing_token if token is None else token,
        chunks=[chunk],
    )
    return wpb.ActionLogs(leases=[entry])


# ---- the core: only the holder's output, never journalled -------------------------------------


def test_holders_output_becomes_an_effect_and_nothing_is_journalled() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=1)
    (lease,) = grants(d.submit(independent(1)))
    out = d.msg("s1", action_logs=_logs(lease, b"hello\n"))
    assert out.records == []
    (kept,) = out.logs
    assert (kept.lease_id, kept.workflow_id, kept.action_id) == (lease.lease_id, "wf-1", "a0")
    assert (kept.attempt, kept.token, kept.worker_id) == (1, lease.fencing_token, "w1")
    assert [c.data for c in kept.chunks] == [b"hello\n"]
    assert not messages(out, "s1", "ack")


def test_a_zombies_output_is_refused_and_dropped() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=1)
    (old,) = grants(d.submit(independent(1)))
    d.advance(3)
    d.msg("s1", credit=wpb.Credit(slots=0))  # not silent, but no heartbeat: the lease expires
    d.advance(3)
    (new,) = grants(d.hello("s2", "w2", slots=1))
    assert new.fencing_token == old.fencing_token + 1
    out = d.msg("s1", action_logs=_logs(old, b"zombie\n"))  # the old holder, its old token
    assert out.logs == [] and out.records == []
    (refused,) = messages(out, "s1", "ack")[0].ack.refused
    assert (refused.lease_id, refused.fencing_token) == (old.lease_id, old.fencing_token)
    assert refused.status.code == 9  # FAILED_PRECONDITION, LEASE_NOT_HELD
    # Neither may the new holder's lease be written with a stale token, nor another session's.
    out = d.msg("s2", action_logs=_logs(new, b"x", token=old.fencing_token))
    assert out.logs == [] and messages(out, "s2", "ack")[0].ack.refused
    out = d.msg("s1", action_logs=_logs(new, b"x"))
    assert out.logs == [] and messages(out, "s1", "ack")[0].ack.refused
    assert len(d.msg("s2", action_logs=_logs(new, b"ok")).logs) == 1


# ---- the coordinator's window ---------------------------------------------------------------


def _keep(lease_id: str, data: bytes, offset: int = 0, action: str = "a0") -> KeepLogs:
    chunk = pb.LogChunk(stream=STDOUT, offset=offset, data=data)
    return KeepLogs(lease_id, "wf-1", action, 1, 1, "w1", [chunk])


def _event(type_: int, action: str = "a0", lease_id: str = "") -> pb.HistoryEvent:
    return pb.HistoryEvent(type=type_, workflow_id="wf-1", action_id=action, lease_id=lease_id)


def test_window_reads_from_offsets_and_closes_when_the_attempt_ends() -> None:
    live = LiveLogs()
    live.keep([_keep("L1", b"abc"), _keep("L1", b"def", offset=3)])
    log = live.follow("L1", "wf-1", "a0", 1, 1, "w1")
    chunks, cursor = log.read(0, {STDOUT: 2, STDERR: 0})  # resuming after two bytes
    assert [(c.offset, c.data) for c in chunks] == [(2, b"c"), (3, b"def")]
    assert log.read(cursor, {})[0] == []
    live.delivered([_event(E.EVENT_TYPE_ACTION_STARTED, lease_id="L1")])
    assert not log.ended
    live.delivered([_event(E.EVENT_TYPE_ACTION_FINISHED, lease_id="L1")])
    assert log.ended and live.total == 0
    live.unfollow(log)
    live.delivered([_event(E.EVENT_TYPE_ACTION_FINISHED)])  # nothing open: returns at once


def test_a_hedges_loss_closes_only_its_own_log() -> None:
    live = LiveLogs()
    live.keep([_keep("L1", b"one"), _keep("L2", b"two")])
    a, b = live.follow("L1", "wf-1", "a0", 1, 1, "w1"), live.follow("L2", "wf-1", "a0", 2, 2, "w")
    live.delivered([_event(E.EVENT_TYPE_LEASE_LOST, lease_id="L2")])
    assert b.ended and not a.ended
    live.delivered([_event(E.EVENT_TYPE_ACTION_RETRY_SCHEDULED, lease_id="L1")])
    assert a.ended


def test_memory_is_bounded_per_attempt_and_in_all() -> None:
    live = LiveLogs(attempt_bytes=100, total_bytes=250)
    for i in range(10):  # a flood: 400 bytes into one attempt
        live.keep([_keep("L1", b"x" * 40, offset=40 * i)])
    log = live.follow("L1", "wf-1", "a0", 1, 1, "w1")
    assert log.bytes <= 100 and live.total == log.bytes
    chunks, _ = log.read(0, {})
    assert chunks[0].offset > 0  # the oldest went; the offsets show the gap
    assert chunks[-1].offset + len(chunks[-1].data) == 400
    live.keep([_keep("L2", b"y" * 100, action="a1"), _keep("L3", b"z" * 100, action="a2")])
    assert live.total <= 250
    assert log.bytes < 100  # the attempt written least recently lost its oldest output first
    assert live.dropped == 400 + 200 - live.total


async def test_followers_wake_on_output_and_on_their_actions_records() -> None:
    live = LiveLogs()
    log = live.follow("L1", "wf-1", "a0", 1, 1, "w1")
    seen = log.version
    live.keep([_keep("L1", b"new")])
    await log.changed(seen, 30.0)  # changed since `seen`: returns at once
    with live.waiting("wf-1", "a1") as event:
        live.delivered([_event(E.EVENT_TYPE_ACTION_READY, action="a0")])
        assert not event.is_set()
        live.delivered([_event(E.EVENT_TYPE_ACTION_LEASED, action="a1")])
        assert event.is_set()
    live.close()
    assert log.ended and live.closed


# ---- the worker's side ----------------------------------------------------------------------


def test_worker_output_is_bounded_and_a_flood_leaves_a_gap() -> None:
    out = LiveOutput()
    for _ in range(100):
        out.add("L1", 1, STDOUT, b"x" * 10_000)  # 1 MB between two sends
    (entry,) = out.take(running=True)
    (chunk,) = entry.chunks
    assert len(chunk.data) == LOG_CHUNK_BYTES
    assert chunk.offset == 1_000_000 - LOG_CHUNK_BYTES
    assert out.dropped_bytes == chunk.offset
    assert out.take(running=True) == [] and not out.waiting


def test_a_quick_attempt_sends_nothing_and_a_followed_one_sends_its_rest() -> None:
    out = LiveOutput()
    out.add("quick", 1, STDOUT, b"done\n")
    out.finish("quick")  # never sent: its tails carry it
    assert not out.final and out.take(running=True) == []
    out.add("slow", 2, STDOUT, b"first\n")
    out.add("slow", 2, STDERR, b"warn\n")
    sent = out.take(running=True)
    assert [(c.stream, c.offset, c.data) for c in sent[0].chunks] == [
        (STDOUT, 0, b"first\n"),
        (STDERR, 0, b"warn\n"),
    ]
    out.add("slow", 2, STDOUT, b"second\n")
    out.finish("slow")
    assert out.final
    (rest,) = out.take(running=False)  # what a result flush sends, whatever the rate limit
    assert (rest.lease_id, rest.fencing_token) == ("slow", 2)
    assert [(c.stream, c.offset, c.data) for c in rest.chunks] == [(STDOUT, 6, b"second\n")]


def test_logs_messages_stay_under_the_message_limit() -> None:
    entries = [
        wpb.LeaseLogs(lease_id=f"L{i}", chunks=[pb.LogChunk(stream=STDOUT, data=b"x" * 60_000)])
        for i in range(200)
    ]
    msgs = logs_messages(entries)
    assert len(msgs) > 1 and all(m.ByteSize() < 4 << 20 for m in msgs)
    assert sum(len(m.action_logs.leases) for m in msgs) == 200


# ---- the stream check -------------------------------------------------------------------------


def test_a_chunk_over_the_limit_keeps_its_end_and_a_bad_stream_is_refused() -> None:
    check = ReportCheck(Limits(), None)
    big = pb.LogChunk(stream=STDERR, offset=10, data=b"a" * 10 + b"b" * LOG_CHUNK_BYTES)
    msg = wpb.ConnectRequest(
        action_logs=wpb.ActionLogs(leases=[wpb.LeaseLogs(lease_id="L", chunks=[big])])
    )
    check.check(msg)
    (kept,) = msg.action_logs.leases[0].chunks
    assert kept.data == b"b" * LOG_CHUNK_BYTES and kept.offset == 20
    bad = wpb.ConnectRequest(
        action_logs=wpb.ActionLogs(
            leases=[wpb.LeaseLogs(lease_id="L", chunks=[pb.LogChunk(data=b"x")])]
        )
    )
    with pytest.raises(InvalidArgumentError, match=r"chunks\[0\]\.stream"):
        check.check(bad)


# ---- redaction of live output ---------------------------------------------------------------


def test_a_secret_split_across_reads_is_redacted() -> None:
    stream = Redactor({"TOKEN": "s3cr3t-value"}).stream()
    sent = []
    for piece in (b"token=s3c", b"r3t-va", b"lue and more\n", b"s3cr3t-value", b" end\n"):
        sent.append(stream.feed(piece))
        assert b"s3c" not in b"".join(sent)  # a value's start waits until it is known
    sent.append(stream.flush())
    assert b"".join(sent) == b"token=[redacted:TOKEN] and more\n[redacted:TOKEN] end\n"
