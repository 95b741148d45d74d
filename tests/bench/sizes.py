"""Coordinator memory against output sizes: ``python -m tests.bench.sizes`` (make bench-sizes).

Starts a coordinator and one handler workerd (the harness of the system tests) and measures the
coordinator's resident memory (``VmRSS``, and the peak ``VmHWM``, from /proc) around two
workflows:

  (a) N independent actions with tiny outputs     -> bytes of RSS per finished action
  (b) M independent actions with B-byte outputs   -> RSS after, and the peak while it ran
      (twice by default: a second run that does not grow RSS shows the memory is reused)

Then it reads (b) back the way ``plait status`` does (GetWorkflow, every page) and reports how
many pages and how long. Not a test: it prints numbers, and exits 1 only if a workflow failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from plait.v1 import workflow_pb2 as wf
from plait.v1 import workflow_service_pb2 as ws
from tests import procs
from tests.system.harness import TERMINAL_WORKFLOW, Cluster, wait_for, workflow

HANDLERS = "tests.bench.size_handlers:worker"


def memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in bytes."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def sized(n: int, size: int, name: str) -> wf.WorkflowSpec:
    return workflow(
        name,
        (
            wf.ActionSpec(id=f"a{i}", handler="sized", input_json=json.dumps({"bytes": size}))
            for i in range(n)
        ),
    )


def run(cluster: Cluster, spec: wf.WorkflowSpec, timeout: float) -> tuple[str, float]:
    """Submits ``spec``, waits (polling the cheap ListWorkflows); returns (id, seconds)."""
    start = time.perf_counter()
    workflow_id = cluster.submit(spec)

    def finished() -> wf.WorkflowStatus | None:
        reply = cluster.workflows.ListWorkflows(ws.ListWorkflowsRequest(page_size=10), timeout=30)
        for status in reply.workflows:
            if status.workflow_id == workflow_id and status.state in TERMINAL_WORKFLOW:
                return status
        return None

    status = wait_for(f"{spec.name} to finish", finished, timeout=timeout, interval=0.1)
    state = wf.WorkflowState.Name(status.state).removeprefix("WORKFLOW_STATE_")
    if state != "SUCCEEDED":
        raise SystemExit(f"{spec.name}: {state} {status.reason[:500]}")
    return workflow_id, time.perf_counter() - start


def read_back(cluster: Cluster, workflow_id: str) -> tuple[int, int, float]:
    """Every page of GetWorkflow: (pages, actions, seconds); (0, 0, s) if it cannot answer."""
    start = time.perf_counter()
    pages = actions = 0
    token = ""
    while True:
        try:
            request = ws.GetWorkflowRequest(workflow_id=workflow_id)
            if token:
                request.page_token = token
            reply = cluster.workflows.GetWorkflow(request, timeout=60)
        except Exception as e:  # the old coordinator: RESOURCE_EXHAUSTED
            print(f"  GetWorkflow failed: {str(e).splitlines()[0:3]}", file=sys.stderr)
            return 0, 0, time.perf_counter() - start
        pages += 1
        actions += len(reply.workflow.actions)
        token = getattr(reply, "next_page_token", "")
        if not token:
            return pages, actions, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.sizes", description=__doc__)
    p.add_argument("--small", type=int, default=10_000, help="actions with tiny outputs (a)")
    p.add_argument("--large", type=int, default=1_000, help="actions with large outputs (b)")
    p.add_argument("--bytes", type=int, default=1_000_000, help="output size of (b)")
    p.add_argument("--repeat", type=int, default=2, help="runs of (b): is memory reused?")
    p.add_argument("--slots", type=int, default=64, help="slots of the handler worker")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per workflow")
    p.add_argument("--coordinator-flag", action="append", default=[], metavar="FLAG=VALUE")
    args = p.parse_args(argv)

    procs.become_subreaper()
    overrides = dict(f.split("=", 1) for f in args.coordinator_flag)
    mib = 1024 * 1024
    with tempfile.TemporaryDirectory(prefix="plait-bench-sizes-") as tmp:
        cluster = Cluster(Path(tmp))
        try:
            cluster.start_coordinator(**overrides)
            cluster.add_worker(
                "w1", slots=args.slots, handlers=[HANDLERS], extra_args=["--no-exec"]
            )
            assert cluster.endpoints is not None
            pid = cluster.endpoints.pid
            rss0, _ = memory(pid)
            print(f"coordinator idle: RSS {rss0 / mib:.1f} MiB")
            if args.small:
                _, secs = run(cluster, sized(args.small, 0, "bench-small"), args.timeout)
                rss1, _ = memory(pid)
                per = (rss1 - rss0) / args.small
                print(
                    f"(a) {args.small} actions, tiny outputs: {secs:.1f}s; RSS"
                    f" {rss1 / mib:.1f} MiB (+{(rss1 - rss0) / mib:.1f}), {per:,.0f} bytes"
                    " per finished action"
                )
                rss0 = rss1
            for run_no in range(1, args.repeat + 1) if args.large else ():
                spec = sized(args.large, args.bytes, f"bench-large-{run_no}")
                workflow_id, secs = run(cluster, spec, args.timeout)
                rss2, peak = memory(pid)
                total = args.large * args.bytes
                print(
                    f"(b) run {run_no}: {args.large} actions x {args.bytes:,} bytes of outputs"
                    f" ({total / mib:.0f} MiB): {secs:.1f}s; RSS {rss2 / mib:.1f} MiB"
                    f" (+{(rss2 - rss0) / mib:.1f}), peak {peak / mib:.1f} MiB"
                )
                pages, actions, secs = read_back(cluster, workflow_id)
                rss3, peak = memory(pid)
                print(
                    f"    read back with GetWorkflow: {pages} pages, {actions} actions,"
                    f" {secs:.1f}s; RSS {rss3 / mib:.1f} MiB, peak {peak / mib:.1f} MiB"
                )
        finally:
            cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
