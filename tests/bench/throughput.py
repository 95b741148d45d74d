"""Throughput and latency of a local cluster: ``python -m tests.bench.throughput`` (make bench).

Starts a coordinator and two workerd processes (the same harness as the system tests, with the
test-profile timings) and measures:

  (a) N independent no-op handler actions in one workflow -> actions/s
  (b) M exec actions of /bin/true in one workflow          -> actions/s
  (c) a chain of K no-op handler actions                   -> ms per step

Each run is timed twice: on the coordinator (its HLC at submission and at the terminal event,
so client polling does not count) and end to end (submit call to the client seeing it finish,
polled every 20 ms). Not a test: it prints numbers and exits 1 only if a workflow failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from plait.v1 import workflow_pb2 as wf
from tests import procs
from tests.bench.shapes import wait_listed
from tests.system.harness import (
    Cluster,
    command_action,
    handler_action,
    workflow,
)

HANDLERS = "tests.bench.noop_handlers:worker"


@dataclass(frozen=True)
class Result:
    """One measured workflow."""

    name: str
    actions: int
    state: str
    coordinator_s: float
    end_to_end_s: float


def run(cluster: Cluster, name: str, spec: wf.WorkflowSpec, timeout: float) -> Result:
    """Submits ``spec`` and waits for it, polling the cheap ListWorkflows (no per-action rows)."""
    start = time.perf_counter()
    workflow_id = cluster.submit(spec)
    status = wait_listed(cluster, workflow_id, f"{name} to finish", timeout, interval=0.02)
    end_to_end = time.perf_counter() - start
    coordinator_ms = status.finished_hlc.physical_ms - status.submitted_hlc.physical_ms
    return Result(
        name=name,
        actions=len(spec.actions),
        state=wf.WorkflowState.Name(status.state).removeprefix("WORKFLOW_STATE_"),
        coordinator_s=coordinator_ms / 1000,
        end_to_end_s=end_to_end,
    )


def independent_handlers(n: int) -> wf.WorkflowSpec:
    return workflow("bench-handlers", (handler_action(f"n{i}", "noop") for i in range(n)))


def independent_exec(n: int) -> wf.WorkflowSpec:
    true = shutil.which("true") or "/bin/true"
    return workflow("bench-exec", (command_action(f"t{i}", [true]) for i in range(n)))


def handler_chain(n: int) -> wf.WorkflowSpec:
    return workflow(
        "bench-chain",
        (handler_action(f"c{i}", "noop", needs=[f"c{i - 1}"] if i else []) for i in range(n)),
    )


def print_table(results: list[Result]) -> None:
    header = f"{'benchmark':<28} {'actions':>8} {'state':>10} {'coord s':>9} {'e2e s':>9}  rate"
    print(header)
    print("-" * (len(header) + 16))
    for r in results:
        if r.name.startswith("chain"):
            rate = f"{r.coordinator_s * 1000 / r.actions:8.2f} ms/step"
        else:
            rate = f"{r.actions / max(r.coordinator_s, 1e-9):8.0f} actions/s"
        print(
            f"{r.name:<28} {r.actions:>8} {r.state:>10} {r.coordinator_s:>9.2f}"
            f" {r.end_to_end_s:>9.2f}  {rate}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.throughput", description=__doc__)
    p.add_argument("--handlers", type=int, default=10_000, help="no-op handler actions (a)")
    p.add_argument("--exec", type=int, default=1_000, help="/bin/true exec actions (b)")
    p.add_argument("--chain", type=int, default=200, help="length of the handler chain (c)")
    p.add_argument(
        "--slots", type=int, default=2 * (os.cpu_count() or 2), help="slots per exec worker"
    )
    p.add_argument(
        "--handler-slots",
        type=int,
        default=256,
        help="slots per handler worker (async no-op handlers are not CPU-bound)",
    )
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed per workflow")
    args = p.parse_args(argv)

    procs.become_subreaper()
    # Handler actions run on 2 handler-only workers with many slots (async no-ops are not
    # CPU-bound); exec actions on 2 exec workers with a few slots per core.
    benches: list[tuple[str, Callable[[int], wf.WorkflowSpec], int]] = [
        ("(a) independent handlers", independent_handlers, args.handlers),
        ("(b) independent exec true", independent_exec, args.exec),
        ("chain of handlers (c)", handler_chain, args.chain),
    ]
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="plait-bench-") as tmp:
        cluster = Cluster(Path(tmp))
        try:
            cluster.start_coordinator()
            for name in ("handler-w1", "handler-w2"):
                cluster.add_worker(
                    name,
                    slots=args.handler_slots,
                    handlers=[HANDLERS],
                    extra_args=["--no-exec"],
                    wait=False,
                )
            for name in ("exec-w1", "exec-w2"):
                cluster.add_worker(name, slots=args.slots, wait=False)
            cluster.wait_workers(["handler-w1", "handler-w2", "exec-w1", "exec-w2"])
            print(
                f"coordinator {cluster.grpc_target}; 2 handler workers x {args.handler_slots}"
                f" slots, 2 exec workers x {args.slots} slots; heartbeat 250ms, lease TTL 2s",
                file=sys.stderr,
            )
            for name, build, n in benches:
                if n > 0:
                    results.append(run(cluster, name, build(n), args.timeout))
        finally:
            cluster.close()
    print_table(results)
    return 0 if all(r.state == "SUCCEEDED" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
