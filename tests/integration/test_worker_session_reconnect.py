"""WorkerSession across reconnects and self-fencing: unacked results re-sent, running leases
reported in Hello and killed when not adopted, exec attempts killed before their lease could
expire, and reconnecting until the coordinator appears.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from plait.v1 import worker_service_pb2 as pb
from tests.integration.worker_session_support import (
    GRACE,
    HEARTBEAT,
    TTL,
    Harness,
    connected,
    exec_lease,
    handler_lease,
    wait_dead,
    wait_pid_file,
)

# ---------------------------------------------------------------- reconnect and fencing


async def test_unacked_results_are_kept_listed_and_resent_after_reconnect(h: Harness) -> None:
    session = h.start_session()
    h.coord.ack_results = False
    first = await connected(h)
    first.grant(handler_lease("noop", "l1", token=7))
    await h.coord.wait_for(lambda: first.results)
    # Still held: every heartbeat lists it.
    await h.coord.wait_for(
        lambda: any(
            (r.lease_id, r.fencing_token) == ("l1", 7) for r in first.of("heartbeat")[-1].leases
        )
    )
    assert session.unacked == [("l1", 7)]
    h.coord.ack_results = True
    first.end()
    await h.coord.wait_for(lambda: len(h.coord.streams) == 2 and h.coord.stream.results)
    second = h.coord.stream
    # The finished attempt's lease is still held (0 slots) until its re-sent result is acked.
    assert second.hello is not None
    assert [(r.lease_id, r.fencing_token, r.slots) for r in second.hello.running] == [("l1", 7, 0)]
    assert [(r.lease_id, r.fencing_token) for r in second.results] == [("l1", 7)]
    assert second.credit == 0  # Hello already accounted for the freed slot
    await h.coord.wait_for(lambda: not session.unacked)


async def test_self_fencing_kills_exec_before_send_time_plus_ttl(h: Harness) -> None:
    session = h.start_session()
    stream = await connected(h)
    pidfile = h.tmp / "pid"
    stream.grant(exec_lease(["/bin/sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"], "x1"))
    pid = await wait_pid_file(pidfile)
    await h.coord.wait_for(lambda: len(stream.acked_heartbeats) >= 2)
    h.coord.ack_heartbeats = False
    await asyncio.sleep(0)  # the flag applies from the next heartbeat on
    _, last_acked_recv = stream.acked_heartbeats[-1]
    died = await wait_dead(pid, limit=TTL + 2)
    # The heartbeat was sent before it was received, so send_time + TTL <= recv + TTL.
    assert died < last_acked_recv + TTL
    assert died > last_acked_recv + TTL - GRACE - 2 * HEARTBEAT - 0.5  # not killed early
    assert session.stats.self_fenced == 1
    # Acks resume; the CANCELLED result reaches the coordinator (same stream or the next).
    h.coord.ack_heartbeats = True
    result = await h.coord.wait_for(
        lambda: next((r for s in h.coord.streams for r in s.results if r.lease_id == "x1"), None)
    )
    assert result.outcome == pb.ACTION_OUTCOME_CANCELLED
    assert "self-fenced" in result.error.message


async def test_self_fencing_while_the_coordinator_is_down(h: Harness) -> None:
    h.start_session()
    stream = await connected(h)
    pidfile = h.tmp / "pid"
    stream.grant(exec_lease(["/bin/sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"], "x1"))
    pid = await wait_pid_file(pidfile)
    await h.coord.wait_for(lambda: len(stream.acked_heartbeats) >= 2)
    port = h.port
    await h.server.stop(0)
    last_ack_recv = stream.acked_heartbeats[-1][1]
    died = await wait_dead(pid, limit=TTL + 2)
    assert died < last_ack_recv + TTL
    # The coordinator comes back on the same port: the result is re-sent and acked.
    await h.start_server(port)
    result = await h.coord.wait_for(
        lambda: next((r for s in h.coord.streams[1:] for r in s.results), None), limit=15
    )
    assert result.lease_id == "x1" and result.outcome == pb.ACTION_OUTCOME_CANCELLED


async def test_reconnect_reports_running_and_kills_what_is_not_adopted(h: Harness) -> None:
    session = h.start_session(slots=4)
    first = await connected(h)
    pidfile = h.tmp / "pid"
    first.grant(
        exec_lease(["/bin/sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"], "x1", 3),
        handler_lease("blocked", "b1", 4),
    )
    pid = await wait_pid_file(pidfile)
    h.coord.kill_on_hello = {"x1"}
    first.end()
    await h.coord.wait_for(lambda: len(h.coord.streams) == 2 and h.coord.stream.hello)
    second = h.coord.stream
    assert second.hello is not None
    assert {(r.lease_id, r.fencing_token) for r in second.hello.running} == {("x1", 3), ("b1", 4)}
    await wait_dead(pid, limit=5)
    r = await h.coord.wait_for(lambda: next(iter(second.results), None))
    assert r.lease_id == "x1" and r.outcome == pb.ACTION_OUTCOME_CANCELLED
    # Credits after the Hello count only slots freed since: x1's, then b1's.
    await h.coord.wait_for(lambda: second.credit == 1)
    assert session.running == ["b1"]
    h.release.set()
    await h.coord.wait_for(lambda: second.credit == 2)


class _Retries(logging.Handler):
    """Sets ``twice`` once the session has logged two reconnect delays."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0
        self.twice = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("reconnecting to"):
            self.count += 1
            if self.count >= 2:
                self.twice.set()


async def test_reconnects_until_the_coordinator_appears(tmp_path: Path) -> None:
    harness = Harness(tmp_path)
    # Reserve a port, then start the worker before the server exists.
    await harness.start_server()
    port = harness.port
    await harness.server.stop(0)
    retries = _Retries()
    session_log = logging.getLogger("plait.worker.session")
    level = session_log.level
    session_log.addHandler(retries)
    session_log.setLevel(logging.INFO)
    try:
        session = harness.start_session()
        # Each "reconnecting" line follows a failed attempt: two prove it kept trying.
        await asyncio.wait_for(retries.twice.wait(), 10)
        assert not session.connected
        await harness.start_server(port)
        await connected(harness)
        assert session.connected
    finally:
        session_log.removeHandler(retries)
        session_log.setLevel(level)
        await harness.close()
