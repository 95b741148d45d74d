"""Memory per pending action in the coordinator's core: ``python -m tests.bench.memory``.

For each shape, a fresh Python process builds a real :class:`SchedulerState`, submits one
workflow of ``--actions`` actions (100,000 by default) the way the coordinator does (the spec
parsed from its wire bytes, handled as a ``WorkflowSubmitted`` batch), lets the request, the
outcome and the journal record go as the runtime would once committed, and reports what stayed:

  * RSS growth (``/proc/self/statm``): everything, protobuf's C arenas included;
  * tracemalloc growth: Python's own allocations (records, lists, dicts) alone (measured in
    another process: tracing costs memory of its own, which RSS would count).

Shapes: ``layered`` (layers of 200, each action needing 2 of the layer before: all but the
first layer PENDING) and ``flat`` (independent actions: all READY, queued). No worker connects,
so every action stays pending. Prints bytes per action; not a test (the goal, < 2 KB per pending
action, stays here).
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tracemalloc
from collections import Counter

from plait.coordinator.core.events import Instant, WorkflowSubmitted
from plait.coordinator.core.state import CoreConfig, SchedulerState
from plait.v1 import workflow_pb2 as pb
from tests.bench.submit import flat, layered

SHAPES = ("layered", "flat")
GOAL_BYTES = 2048


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(shape: str, n: int, traced: bool) -> int:
    """Bytes that stay for one workflow of ``n`` actions: RSS growth, or (``traced``)
    tracemalloc's."""
    wire = (layered(n) if shape == "layered" else flat("bench", n)).SerializeToString()
    st = SchedulerState(CoreConfig())
    gc.collect()
    if traced:
        tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0] if traced else rss_bytes()
    spec = pb.WorkflowSpec.FromString(wire)
    out = st.handle_batch(
        [WorkflowSubmitted("submit", "wf-1", spec, "", reply=object())],
        Instant(1000.0, 1_700_000_000_000),
    )
    assert out.records and out.replies, "the submit was not accepted"
    wf = st.workflows["wf-1"]
    assert len(wf.actions) == n
    del spec, out  # the request, the reply and the journalled record are gone after commit
    gc.collect()
    after = tracemalloc.get_traced_memory()[0] if traced else rss_bytes()
    tracemalloc.stop()
    if not traced:
        states = Counter(a.state for a in wf.actions.values())
        counts = {pb.ActionState.Name(s): c for s, c in states.items()}  # type: ignore[arg-type]
        print(f"  {shape}: {counts}", file=sys.stderr)
    return after - before


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--actions", type=int, default=100_000)
    p.add_argument("--one", choices=SHAPES, help=argparse.SUPPRESS)  # a child's job
    p.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(measure(args.one, args.actions, args.traced))
        return 0

    def child(shape: str, *flags: str) -> int:
        argv = [sys.executable, "-m", "tests.bench.memory", f"--actions={args.actions}"]
        done = subprocess.run(
            [*argv, "--one", shape, *flags], capture_output=True, text=True, check=True
        )
        sys.stderr.write(done.stderr)
        return int(done.stdout)

    worst = 0.0
    for shape in SHAPES:
        rss, py = child(shape), child(shape, "--traced")
        per = rss / args.actions
        worst = max(worst, per)
        print(
            f"{shape:8} {args.actions} pending actions: {per:,.0f} bytes each (RSS),"
            f" {py / args.actions:,.0f} of them Python objects (tracemalloc)"
        )
    print(f"worst {worst:,.0f} bytes per pending action; goal < {GOAL_BYTES}")
    return 0 if worst < GOAL_BYTES else 1


if __name__ == "__main__":
    raise SystemExit(main())
