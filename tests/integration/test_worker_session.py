"""WorkerSession basics against the in-test coordinator: Hello/Welcome, heartbeats, grants,
results and credit, cancellation, drain, over-grants, clock skew, and workerd end to end.

The coordinator and harness live in :mod:`tests.integration.worker_session_support`; the
``h`` fixture is in this directory's ``conftest.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

from plait.v1 import worker_service_pb2 as pb
from tests.integration.worker_session_support import (
    FAILED_PRECONDITION,
    GRACE,
    HEARTBEAT,
    TTL,
    Harness,
    connected,
    exec_lease,
    handler_lease,
    next_heartbeat,
    wait_dead,
    wait_pid_file,
)

# ---------------------------------------------------------------- tests


async def test_hello_welcome_and_heartbeats(h: Harness) -> None:
    session = h.start_session(slots=3)
    stream = await connected(h)
    hello = stream.hello
    assert hello is not None
    assert stream.received[0].WhichOneof("message") == "hello"
    assert (hello.worker_id, hello.slots, dict(hello.labels)) == ("w1", 3, {"zone": "test"})
    assert list(hello.handlers) == ["blocked", "noop", "progress", "progress_sync", "sync"]
    assert hello.exec_enabled and hello.agent.startswith("plait-python/") and hello.hostname
    assert list(hello.running) == []
    await h.coord.wait_for(lambda: len(stream.of("heartbeat")) >= 4)
    seqs = [hb.sequence for hb in stream.of("heartbeat")]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert stream.of("heartbeat")[-1].free_slots == 3
    assert session.heartbeat_interval == HEARTBEAT and session.lease_ttl == TTL
    assert session.kill_grace == GRACE and session.session_id == "s1"
    # The fence deadline follows the acked heartbeats.
    assert session.fence_deadline > time.monotonic() + TTL - 3 * HEARTBEAT


async def test_hello_advertises_resources(h: Harness) -> None:
    h.start_session(slots=2, resources={"cpu": 2.5, "memory_mb": 4096, "gpu": 1})
    stream = await connected(h)
    assert stream.hello is not None
    assert dict(stream.hello.resources) == {"cpu": 2.5, "memory_mb": 4096, "gpu": 1}


async def test_grants_run_results_acked_and_credit_returned(h: Harness) -> None:
    session = h.start_session(slots=4)
    stream = await connected(h)
    stream.grant(handler_lease("noop", "l1"), handler_lease("sync", "l2"))
    await h.coord.wait_for(lambda: len(stream.results) == 2)
    by_id = {r.lease_id: r for r in stream.results}
    assert json.loads(by_id["l1"].outputs_json) == {"n": 1}
    assert json.loads(by_id["l2"].outputs_json) == {"sync": True}
    assert all(r.outcome == pb.ACTION_OUTCOME_SUCCEEDED for r in stream.results)
    assert all(r.finished_hlc.physical_ms > 0 and r.HasField("duration") for r in stream.results)
    started = {rep.lease_id for s in stream.of("action_started") for rep in s.leases}
    # A start report is skipped only when the result leaves in the same flush (it implies it).
    assert started <= {"l1", "l2"}
    await h.coord.wait_for(lambda: stream.credit == 2)
    await h.coord.wait_for(lambda: not session.unacked)
    # Later heartbeats carry the grant sequence and no longer list the acked leases.
    await h.coord.wait_for(
        lambda: (
            stream.of("heartbeat")[-1].last_grant_sequence == 1
            and not stream.of("heartbeat")[-1].leases
        )
    )


async def test_results_and_starts_are_batched(h: Harness) -> None:
    h.start_session(slots=64)
    stream = await connected(h)
    stream.grant(*(handler_lease("noop", f"l{i}") for i in range(64)))
    await h.coord.wait_for(lambda: len(stream.results) == 64)
    await h.coord.wait_for(lambda: stream.credit == 64)
    assert len(stream.of("action_finished")) <= 4
    assert len(stream.of("action_started")) <= 4
    assert stream.of("credit") == []  # the credit rode with the results


async def test_refused_results_are_forgotten(h: Harness) -> None:
    session = h.start_session()
    h.coord.result_status = FAILED_PRECONDITION
    stream = await connected(h)
    stream.grant(handler_lease("noop", "l1"))
    await h.coord.wait_for(lambda: stream.results)
    await h.coord.wait_for(lambda: not session.unacked)
    assert session.stats.results_refused == 1


async def test_cancel_lease_terms_the_exec_action(h: Harness) -> None:
    h.start_session()
    stream = await connected(h)
    pidfile = h.tmp / "pid"
    stream.grant(exec_lease(["/bin/sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"], "x1", 5))
    pid = await wait_pid_file(pidfile)
    stream.send(
        cancel_lease=pb.CancelLease(
            leases=[
                pb.LeaseCancellation(
                    lease_id="x1", fencing_token=5, reason=pb.CANCEL_REASON_USER, message="bye"
                )
            ]
        )
    )
    await wait_dead(pid, limit=5)
    await h.coord.wait_for(lambda: stream.results)
    r = stream.results[0]
    assert r.outcome == pb.ACTION_OUTCOME_CANCELLED and r.exit_code == -signal.SIGTERM
    assert "CANCEL_REASON_USER" in r.error.message
    await h.coord.wait_for(lambda: stream.credit == 1)


async def test_drain_finishes_work_then_says_goodbye(h: Harness) -> None:
    session = h.start_session()
    stream = await connected(h)
    stream.grant(handler_lease("blocked", "b1"))
    await h.coord.wait_for(lambda: stream.of("action_started"))
    stream.send(drain=pb.Drain(reason="maintenance"))
    await h.coord.wait_for(lambda: session.draining)
    await next_heartbeat(h, session)  # a Goodbye sent on draining would have arrived first
    assert not stream.goodbye and not h.task.done()  # type: ignore[union-attr]
    h.release.set()
    await h.coord.wait_for(lambda: stream.goodbye)
    await asyncio.wait_for(h.task, 10)  # type: ignore[arg-type]
    assert [r.lease_id for r in stream.results] == ["b1"]
    assert stream.credit == 0  # no new work invited while draining
    assert stream.of("goodbye")[0].reason == "drained"
    assert stream.received[-1].WhichOneof("message") == "goodbye"


async def test_over_grant_is_reported_failed(h: Harness) -> None:
    session = h.start_session(slots=2)
    stream = await connected(h)
    stream.grant(*(handler_lease("blocked", f"b{i}") for i in range(3)))
    await h.coord.wait_for(lambda: stream.results)
    (r,) = stream.results
    assert r.lease_id == "b2" and r.outcome == pb.ACTION_OUTCOME_FAILED
    assert "over-grant" in r.error.message
    assert session.stats.over_grants == 1 and len(session.running) == 2
    await next_heartbeat(h, session)  # a Credit for the refused lease would have arrived first
    assert stream.credit == 0  # the refused lease never held a slot
    h.release.set()
    await h.coord.wait_for(lambda: len(stream.results) == 3 and stream.credit == 2)


async def test_multi_slot_leases_and_unknown_handlers(h: Harness) -> None:
    h.start_session(slots=4)
    stream = await connected(h)
    stream.grant(handler_lease("blocked", "big", slots=3), handler_lease("nope", "u1"))
    r = await h.coord.wait_for(
        lambda: next((r for r in stream.results if r.lease_id == "u1"), None)
    )
    assert (
        r.outcome == pb.ACTION_OUTCOME_FAILED and "does not serve handler 'nope'" in r.error.message
    )
    await h.coord.wait_for(lambda: stream.credit == 1)
    await h.coord.wait_for(lambda: stream.of("heartbeat")[-1].free_slots == 1)
    h.release.set()
    await h.coord.wait_for(lambda: stream.credit == 4)


async def test_coordinator_clock_far_ahead_is_counted_not_fatal(h: Harness) -> None:
    session = h.start_session()
    stream = await connected(h)
    msg = pb.ConnectResponse(ack=pb.Ack())
    msg.hlc.physical_ms = int(time.time() * 1000) + 3_600_000
    stream.outbox.put_nowait(msg)
    await h.coord.wait_for(lambda: session.stats.clock_offset_errors >= 1)
    stream.grant(handler_lease("noop", "l1"))
    await h.coord.wait_for(lambda: stream.results)
    assert session.connected


# ---------------------------------------------------------------- workerd end to end

HANDLERS = """
import plait
worker = plait.Worker()

@worker.action("hello")
async def hello(ctx):
    return {"hello": ctx.input["n"], "worker_token": ctx.fencing_token}
"""


async def test_workerd_serves_exec_and_handlers_and_drains_on_sigterm(h: Harness) -> None:
    handlers = h.tmp / "handlers.py"
    handlers.write_text(HANDLERS)
    env = dict(os.environ, PLAIT_CLOCK_OFFSET="-1h", PLAIT_WORKER_ID="wd-1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "plait.workerd",
            "--coordinator",
            f"127.0.0.1:{h.port}",
            "--slots",
            "2",
            "--label",
            "role=test",
            "--handlers",
            str(handlers),
            "--reconnect-backoff",
            "50ms:1s",
            "--allow-root",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        stream = await h.coord.wait_for(
            lambda: h.coord.streams and h.coord.stream.hello and h.coord.stream, limit=30
        )
        hello = stream.hello
        assert hello.worker_id == "wd-1" and hello.agent.startswith("plait-workerd/")
        assert list(hello.handlers) == ["hello"] and hello.exec_enabled
        assert dict(hello.labels) == {"role": "test"} and hello.slots == 2
        # The skewed wall clock shows in the worker's HLC stamps, an hour behind ours.
        assert stream.received[0].hlc.physical_ms < time.time() * 1000 - 3_000_000
        stream.grant(
            handler_lease("hello", "h1", token=11),
            exec_lease(["/bin/sh", "-c", 'printf \'{"v": 1}\' > "$PLAIT_OUTPUT"'], "e1"),
        )
        await h.coord.wait_for(lambda: len(stream.results) == 2, limit=20)
        by_id = {r.lease_id: r for r in stream.results}
        assert json.loads(by_id["h1"].outputs_json) == {"hello": 1, "worker_token": 11}
        assert json.loads(by_id["e1"].outputs_json) == {"v": 1}
        await h.coord.wait_for(lambda: len(stream.of("heartbeat")) >= 2)
        proc.send_signal(signal.SIGTERM)
        await h.coord.wait_for(lambda: stream.goodbye, limit=20)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err.decode()
        assert out == b""
        assert b"draining" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
