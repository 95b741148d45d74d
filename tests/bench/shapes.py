"""Plait on the benchmark shapes: specs from ``tests.bench.graphs`` and a runner.

Every shape gets a fresh local cluster (the harness of the system tests,
``tests.system.harness.Cluster``): a real coordinator process on the embedded SQLite default and
``shape.workers`` workerd processes with ``shape.slots`` slots each. Handler shapes run
``workerd --handlers tests.bench.noop_handlers:worker --no-exec``; exec shapes run workerd with
its default exec sandbox (no flag turns it off: an attempt directory, a scrubbed environment, a
start barrier, rlimits and a cgroup per attempt where workerd may create them; the harness adds
``--allow-root`` since the benchmark runs as root). The coordinator runs with its default
timings (heartbeat 5 s, lease TTL 30 s) and workers with ``--no-adaptive``, so a loaded host
never withholds slots: every system runs at exactly the shape's slots.

Each run is timed twice: on the coordinator (its HLC at submission and at the workflow's
terminal event) and end to end (from the submit call to the client seeing the workflow finish,
polling ListWorkflows every 20 ms). Peers only have end to end, so the table compares that.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from plait.v1 import workflow_pb2 as wf
from plait.v1 import workflow_service_pb2 as ws
from tests.bench.graphs import Node, Shape, Work
from tests.system.harness import TERMINAL_WORKFLOW, Cluster, wait_for
from tests.system.specs import command_action, handler_action, workflow

HANDLERS = "tests.bench.noop_handlers:worker"
POLL_S = 0.02
WARMUP_ACTIONS = 20


@dataclass(frozen=True)
class PlaitRun:
    """One measured workflow."""

    shape: str
    actions: int
    state: str  # the workflow's terminal state, without the WORKFLOW_STATE_ prefix
    coordinator_s: float  # submitted_hlc -> finished_hlc
    end_to_end_s: float  # submit call -> the client saw it finish


def spec_for(shape: Shape, name: str = "") -> wf.WorkflowSpec:
    """The shape's graph as a workflow: handler actions, or exec actions of /bin/true."""
    if shape.work is Work.EXEC:
        true = shutil.which("true") or "/bin/true"
        actions = [command_action(n.id, [true], needs=n.needs) for n in shape.nodes]
    else:
        actions = [handler_action(n.id, shape.work.value, needs=n.needs) for n in shape.nodes]
    return workflow(name or f"bench-{shape.key}", actions)


def worker_args(shape: Shape) -> tuple[list[str], list[str]]:
    """(handlers, extra workerd flags) for the shape's workers."""
    if shape.work is Work.EXEC:
        return [], ["--no-adaptive"]
    return [HANDLERS], ["--no-exec", "--no-adaptive"]


def wait_listed(
    cluster: Cluster, workflow_id: str, what: str, timeout: float, interval: float = POLL_S
) -> wf.WorkflowStatus:
    """Polls the cheap ListWorkflows (no per-action rows) until ``workflow_id`` has ended."""

    def finished() -> wf.WorkflowStatus | None:
        reply = cluster.workflows.ListWorkflows(ws.ListWorkflowsRequest(page_size=100), timeout=10)
        for status in reply.workflows:
            if status.workflow_id == workflow_id and status.state in TERMINAL_WORKFLOW:
                return status
        return None

    return wait_for(what, finished, timeout=timeout, interval=interval)


def submit_and_wait(cluster: Cluster, spec: wf.WorkflowSpec, timeout: float) -> PlaitRun:
    """Submits ``spec`` and waits until ListWorkflows shows it ended."""
    start = time.perf_counter()
    workflow_id = cluster.submit(spec)
    status = wait_listed(cluster, workflow_id, f"{spec.name} to finish", timeout)
    end_to_end = time.perf_counter() - start
    coordinator_ms = status.finished_hlc.physical_ms - status.submitted_hlc.physical_ms
    return PlaitRun(
        shape=spec.name,
        actions=len(spec.actions),
        state=wf.WorkflowState.Name(status.state).removeprefix("WORKFLOW_STATE_"),
        coordinator_s=coordinator_ms / 1000,
        end_to_end_s=end_to_end,
    )


def run_shape(shape: Shape, timeout: float = 600.0) -> PlaitRun:
    """Runs ``shape`` once on a fresh cluster: start, warm up, measure, stop.

    The warm-up workflow (a few actions of the same kind, every worker busy) is not timed; the
    peers get the same, so no system pays its first task's imports and connections in the
    number.
    """
    handlers, extra = worker_args(shape)
    with tempfile.TemporaryDirectory(prefix=f"plait-bench-{shape.key}-") as tmp:
        cluster = Cluster(Path(tmp))
        try:
            # The coordinator's own defaults, not the system tests' short timings.
            cluster.start_coordinator(heartbeat_interval=None, lease_ttl=None, kill_grace=None)
            names = [f"{shape.key}-w{i + 1}" for i in range(shape.workers)]
            for name in names:
                cluster.add_worker(
                    name, slots=shape.slots, handlers=handlers, extra_args=extra, wait=False
                )
            cluster.wait_workers(names)
            warm = replace(
                shape,
                nodes=[Node(f"warm{i}") for i in range(max(WARMUP_ACTIONS, shape.total_slots))],
            )
            warm_run = submit_and_wait(cluster, spec_for(warm, "bench-warmup"), timeout)
            if warm_run.state != "SUCCEEDED":
                raise RuntimeError(f"the warm-up workflow ended {warm_run.state}")
            result = submit_and_wait(cluster, spec_for(shape), timeout)
        finally:
            cluster.close()
    return result
