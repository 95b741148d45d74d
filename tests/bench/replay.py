"""Journal replay speed: ``python -m tests.bench.replay``.

Builds a SQLite journal of about 300,000 events by driving the pure core by hand (no gRPC, no
worker processes: a few simulated workers lease, start and finish actions in big batches, and
every batch's records are appended through the store, one transaction each, as the runtime
does), then times what a restarted coordinator does before it serves: ``Runtime.start`` on a
fresh store over that file (open, replay every page through ``core.replay``, revocations).

The journal mixes what a real one holds: wide fan-outs and layered DAGs whose actions need two
of the previous layer's, small JSON outputs, failed attempts retried, and workflows still
running with live leases at the "crash" (they come back as ghost leases). The journal is built
once per ``--dir`` and reused (``--rebuild`` starts over). Prints events/s per round and the
median; not a test (timing goals stay in benchmarks).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import shutil
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from plait.clock import SystemClock
from plait.coordinator.config import CoordinatorConfig
from plait.coordinator.core.events import (
    Instant,
    Stimulus,
    TimePassed,
    WorkerMessageReceived,
    WorkflowSubmitted,
)
from plait.coordinator.core.model import Outcome
from plait.coordinator.core.state import CoreConfig, SchedulerState
from plait.coordinator.journal.sqlite import SqliteJournal
from plait.coordinator.metrics import CoordinatorMetrics
from plait.coordinator.runtime import Runtime
from plait.coordinator.tracing import Tracing
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb

WORKERS = 4
SLOTS = 512  # per simulated worker: big batches, so building the journal is quick
CORE = CoreConfig(
    heartbeat_interval=timedelta(seconds=5),
    lease_ttl=timedelta(seconds=30),
    kill_grace=timedelta(seconds=10),
    lease_loss_budget=3,
)


class Builder:
    """Drives a core with simulated workers; appends every batch's records to the store."""

    def __init__(self, store: SqliteJournal, seed: int) -> None:
        self.store = store
        self.st = SchedulerState(CORE)
        self.rng = random.Random(seed)
        self.mono = 1000.0
        self.wall = SystemClock().wall_ms() - 3_600_000  # an hour of history up to now
        self.events = 0
        self.held: dict[str, list[wpb.Lease]] = {}  # session -> leases granted, not finished
        self.beats: dict[str, int] = {}  # session -> last heartbeat sequence sent
        self.heard: dict[
            str, int
        ] = {}  # session -> newest heartbeat ack (echoed: proof of hearing)

    async def handle(self, *stimuli: Stimulus) -> Outcome:
        self.mono += 0.002
        self.wall += 2
        out = self.st.handle_batch(stimuli, Instant(self.mono, self.wall))
        if out.records:
            await self.store.append(out.records)
            self.events += len(out.records)
        for session, msgs in out.sends.items():
            for m in msgs:
                if m.HasField("lease_grant"):
                    self.held.setdefault(session, []).extend(m.lease_grant.leases)
                elif m.HasField("ack") and m.ack.heartbeat_sequence:
                    self.heard[session] = max(self.heard[session], m.ack.heartbeat_sequence)
        return out

    def message(self, session: str, **kw: object) -> WorkerMessageReceived:
        m = wpb.ConnectRequest(**kw)  # type: ignore[arg-type]
        m.hlc.physical_ms = self.wall
        return WorkerMessageReceived(f"bench-{session}", session, m)

    async def connect(self) -> None:
        for i in range(WORKERS):
            session = f"s{i}"
            hello = wpb.Hello(worker_id=f"w{i}", slots=SLOTS, handlers=["h"])
            self.beats[session] = 1
            self.heard[session] = 0
            beat = wpb.Heartbeat(sequence=1, last_grant_sequence=0, last_ack_sequence=0)
            await self.handle(
                WorkerMessageReceived(
                    "hello", session, wpb.ConnectRequest(hello=hello), resume_token=f"rt{i}"
                ),
                self.message(session, heartbeat=beat),
            )

    async def submit(self, workflow_id: str, spec: pb.WorkflowSpec) -> None:
        await self.handle(WorkflowSubmitted(f"submit-{workflow_id}", workflow_id, spec, ""))

    async def run(self, workflow_id: str) -> None:
        """Steps until the workflow ends, moving time on while retries back off."""
        while self.st.workflows[workflow_id].state == pb.WORKFLOW_STATE_RUNNING:
            if not await self.step():
                self.mono += 1.0
                self.wall += 1000
                await self.handle(TimePassed("tick"), *self.beat_all())

    def beat_all(self) -> list[WorkerMessageReceived]:
        """A heartbeat from every worker (their proof of hearing stays fresh)."""
        beats = []
        for session in self.beats:
            self.beats[session] += 1
            beat = wpb.Heartbeat(
                sequence=self.beats[session],
                last_grant_sequence=1 << 40,
                last_ack_sequence=self.heard[session],
            )
            beats.append(self.message(session, heartbeat=beat))
        return beats

    async def step(self) -> int:
        """Every worker starts and finishes what it holds (5 % of attempts fail)."""
        stimuli: list[WorkerMessageReceived | TimePassed] = []
        done = 0
        for session, leases in self.held.items():
            if not leases:
                continue
            reports = [
                wpb.LeaseReport(lease_id=x.lease_id, fencing_token=x.fencing_token) for x in leases
            ]
            results = []
            for x in leases:
                failed = self.rng.random() < 0.05
                results.append(
                    wpb.ActionResult(
                        lease_id=x.lease_id,
                        fencing_token=x.fencing_token,
                        outcome=wpb.ACTION_OUTCOME_FAILED
                        if failed
                        else wpb.ACTION_OUTCOME_SUCCEEDED,
                        exit_code=1 if failed else 0,
                        outputs_json="" if failed else f'{{"n": {self.rng.randrange(1 << 30)}}}',
                    )
                )
            stimuli.append(self.message(session, action_started=wpb.ActionStarted(leases=reports)))
            finished = wpb.ActionFinished(results=results, credit=len(leases))
            stimuli.append(self.message(session, action_finished=finished))
            done += len(leases)
            leases.clear()
        if done:
            await self.handle(*stimuli, *self.beat_all())
        return done

    async def start_only(self) -> None:
        """The workers report what they hold as started, and then the coordinator "crashes"."""
        stimuli = []
        for session, leases in self.held.items():
            reports = [
                wpb.LeaseReport(lease_id=x.lease_id, fencing_token=x.fencing_token) for x in leases
            ]
            stimuli.append(self.message(session, action_started=wpb.ActionStarted(leases=reports)))
        await self.handle(*stimuli)


def fan_out(n: int) -> pb.WorkflowSpec:
    s = pb.WorkflowSpec(name="fan-out")
    for i in range(n):
        a = s.actions.add(id=f"n{i}", handler="h", input_json=f'{{"i": {i}}}')
        a.retry.max_attempts = 3
    s.actions.add(id="join", handler="h", needs=[f"n{i}" for i in range(n)])
    return s


def layered(layers: int, width: int, rng: random.Random) -> pb.WorkflowSpec:
    s = pb.WorkflowSpec(name="layered")
    for layer in range(layers):
        for i in range(width):
            needs = [f"l{layer - 1}-{j}" for j in rng.sample(range(width), 2)] if layer else []
            a = s.actions.add(id=f"l{layer}-{i}", handler="h", needs=needs)
            a.retry.max_attempts = 3
    return s


async def build(path: Path, target: int, seed: int = 7) -> int:
    """Writes a journal of at least ``target`` events at ``path``; returns how many."""
    store = SqliteJournal(str(path))
    await store.open(0)
    try:
        b = Builder(store, seed)
        await b.connect()
        n = 0
        while b.events < target * 0.93:
            n += 1
            workflow_id = f"fan-{n}" if n % 2 else f"layers-{n}"
            spec = fan_out(4000) if n % 2 else layered(20, 200, b.rng)
            await b.submit(workflow_id, spec)
            await b.run(workflow_id)
        # Still running at the "crash": queued actions, and live leases the workers started.
        await b.submit("running-fan", fan_out(6000))
        await b.submit("running-layers", layered(20, 200, b.rng))
        await b.step()
        await b.start_only()
        return b.events
    finally:
        await store.close()


async def replay_once(path: Path) -> tuple[int, float, float]:
    """A restarted coordinator's load: ``Runtime.start`` over a fresh store. Returns the events
    replayed, the seconds it took, and the CPU seconds the process (every thread) spent."""
    store = SqliteJournal(str(path))
    head = await store.open(0)
    # Retention far away: the runtime's first sweep must not prune the benchmark's journal.
    config = CoordinatorConfig(retention=timedelta(days=365_000))
    runtime = Runtime(config, store, SystemClock(), CoordinatorMetrics(), Tracing())
    try:
        cpu = time.process_time()
        await runtime.start(head)
        cpu = time.process_time() - cpu
        return runtime.replayed_events, runtime.replay_seconds, cpu
    finally:
        await runtime.stop()
        await store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=300_000, help="journal size to build")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="keep the journal here")
    parser.add_argument("--rebuild", action="store_true", help="build the journal again")
    args = parser.parse_args(argv)
    tmp = args.dir or Path(tempfile.mkdtemp(prefix="plait-replay-"))
    path = tmp / "plait.db"
    try:
        built_mark = tmp / "built"  # written once the whole journal is
        if args.rebuild or not built_mark.exists():
            built_mark.unlink(missing_ok=True)
            for suffix in ("", "-wal", "-shm", ".lock"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            started = time.perf_counter()
            built = asyncio.run(build(path, args.events))
            built_mark.write_text(f"{built}\n")
            print(f"built {built:,} events in {time.perf_counter() - started:.1f}s at {path}")
        rates, cpu_rates = [], []
        for r in range(args.rounds):
            # Each round is a fresh restart: the previous round's core (cyclic, so only the
            # collector frees it) must not be collected inside this round's timing.
            gc.collect()
            events, seconds, cpu = asyncio.run(replay_once(path))
            rates.append(events / seconds)
            cpu_rates.append(events / cpu)
            print(
                f"round {r + 1}: {events:,} events in {seconds:.3f}s = {rates[-1]:,.0f} events/s"
                f" ({cpu:.3f} CPU s: {cpu_rates[-1]:,.0f} events per CPU second)"
            )
        print(
            f"replay: median {statistics.median(rates):,.0f} events/s,"
            f" {statistics.median(cpu_rates):,.0f} events per CPU second"
        )
    finally:
        if args.dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
