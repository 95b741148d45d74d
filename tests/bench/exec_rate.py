"""Exec throughput with the sandbox on: ``python -m tests.bench.exec_rate --slots 1|4 --n 2000``.

Starts a coordinator and two workerd processes (the system tests' harness: test-profile
timings, the default sandbox — private tmp root, keeper, spawner (PR_SET_PDEATHSIG), rlimits,
cgroups where this host delegates them), submits ``--n`` independent exec actions of
``/bin/true`` in one workflow, and times it on the coordinator (its HLC at submission and at
the terminal event). ``--runs`` workflows run one after another on the same cluster; the
median rate is printed last.

For each run it also prints the CPU time (user + system, from /proc) of the coordinator, of
each workerd, its keeper and its spawner, and of the processes each workerd started for its
attempts (``-actions``: the reaped children of workerd and of its spawner — the actions, and
with the exec chain its start steps), as a share of the run's wall time and per action, so the
split between coordinator and workerd is visible. ``--py-spy DIR`` records a py-spy profile of
each workerd during the last run (``py-spy`` must be on PATH or next to this Python; it is
not a dependency of the project). Not a test: it prints numbers and exits 1 only if a
workflow failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from plait.v1 import workflow_pb2 as wf
from tests import procs
from tests.bench.shapes import wait_listed
from tests.system.harness import Cluster, command_action, workflow

WORKERS = ("exec-w1", "exec-w2")
_TICKS = os.sysconf("SC_CLK_TCK")
RECORD = ("--format", "raw", "--rate", "200", "--nonblocking")
# workerd's helper processes, by what their command lines show.
HELPERS = {
    "keeper": ("plait.workerd.keeper",),
    "spawner": ("workerd/spawner.py", "plait.workerd.spawner"),
}


@dataclass(frozen=True)
class Run:
    """One measured workflow."""

    actions: int
    state: str
    coordinator_s: float
    cpu_s: dict[str, float]  # process label -> CPU seconds during the run

    @property
    def rate(self) -> float:
        return self.actions / max(self.coordinator_s, 1e-9)


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """utime + stime of ``pid`` in seconds (0 when it is gone); with ``children``, that of its
    reaped children instead (cutime + cstime: the attempts' processes it waited for)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return 0.0
    fields = raw[raw.rindex(b")") + 2 :].split()
    first = 13 if children else 11
    return (int(fields[first]) + int(fields[first + 1])) / _TICKS


def helper_of(pid: int, marks: tuple[str, ...]) -> int | None:
    """The helper process a workerd started (its child whose command line has a mark)."""
    for proc in procs.snapshot().values():
        if proc.ppid == pid and any(mark in proc.cmdline() for mark in marks):
            return proc.pid
    return None


def keeper_of(pid: int) -> int | None:
    """The keeper process a workerd started (its child running plait.workerd.keeper)."""
    return helper_of(pid, HELPERS["keeper"])


class Sampler:
    """CPU seconds of the measured processes: ``name`` for a process itself, ``name+kids`` for
    what its reaped children used (the actions, and the exec chain's start steps)."""

    def __init__(self, pids: dict[str, int], parents: dict[str, list[int]]) -> None:
        self.pids = pids
        self.parents = parents  # label -> processes whose reaped children count for it

    def sample(self) -> dict[str, float]:
        out = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        for name, pids in self.parents.items():
            out[name] = sum(cpu_seconds(pid, children=True) for pid in pids)
        return out


def exec_true(n: int, run: int, echo: int = 0) -> wf.WorkflowSpec:
    """``n`` actions of ``/bin/true``, or (``echo``) of ``/bin/echo`` printing that many bytes."""
    if echo:
        argv = [shutil.which("echo") or "/bin/echo", "x" * max(0, echo - 1)]
    else:
        argv = [shutil.which("true") or "/bin/true"]
    return workflow(f"bench-exec-rate-{run}", (command_action(f"t{i}", argv) for i in range(n)))


def measure(cluster: Cluster, spec: wf.WorkflowSpec, sampler: Sampler, timeout: float) -> Run:
    """Submits ``spec``, waits for it (polling the cheap ListWorkflows) and samples CPU."""
    before = sampler.sample()
    workflow_id = cluster.submit(spec)
    status = wait_listed(cluster, workflow_id, "the exec workflow to finish", timeout, 0.05)
    after = sampler.sample()
    cpu = {name: after[name] - before[name] for name in after}
    return Run(
        actions=len(spec.actions),
        state=wf.WorkflowState.Name(status.state).removeprefix("WORKFLOW_STATE_"),
        coordinator_s=(status.finished_hlc.physical_ms - status.submitted_hlc.physical_ms) / 1000,
        cpu_s=cpu,
    )


def print_run(index: int, run: Run) -> None:
    wall = max(run.coordinator_s, 1e-9)
    parts = ", ".join(
        f"{name} {100 * cpu / wall:.0f}% ({1e6 * cpu / run.actions:.0f} us/action)"
        for name, cpu in run.cpu_s.items()
    )
    print(
        f"run {index}: {run.actions} actions {run.state} in {run.coordinator_s:.2f}s ->"
        f" {run.rate:.0f} actions/s; CPU: {parts}"
    )


def start_py_spy(out_dir: Path, pids: dict[str, int]) -> list[subprocess.Popen[bytes]]:
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        subprocess.Popen(
            [exe, "record", "--pid", str(pid), *RECORD, "-o", str(out_dir / f"{name}.txt")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
        if name in WORKERS
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.exec_rate", description=__doc__)
    p.add_argument("--n", type=int, default=2000, help="/bin/true exec actions per run")
    p.add_argument("--slots", type=int, default=1, help="slots per workerd (2 workerd)")
    p.add_argument("--runs", type=int, default=3, help="workflows to time (median printed)")
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed per workflow")
    p.add_argument("--py-spy", type=Path, default=None, help="profile workerd in the last run")
    p.add_argument("--worker-arg", action="append", default=[], help="extra workerd flag")
    p.add_argument(
        "--echo",
        type=int,
        default=0,
        metavar="BYTES",
        help="run /bin/echo printing BYTES bytes (a line) instead of /bin/true (live logs' cost)",
    )
    args = p.parse_args(argv)

    procs.become_subreaper()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="plait-bench-") as tmp:
        cluster = Cluster(Path(tmp))
        try:
            cluster.start_coordinator()
            for name in WORKERS:
                cluster.add_worker(name, slots=args.slots, wait=False, extra_args=args.worker_arg)
            cluster.wait_workers(WORKERS)
            pids = {"coordinator": cluster.daemons["coordinator"].pid}
            parents: dict[str, list[int]] = {}
            for name in WORKERS:
                pids[name] = cluster.daemons[name].pid
                parents[f"{name}-actions"] = [pids[name]]
                for helper, marks in HELPERS.items():
                    found = helper_of(pids[name], marks)
                    if found is not None:
                        pids[f"{name}-{helper}"] = found
                        if helper == "spawner":  # the actions are its children
                            parents[f"{name}-actions"].append(found)
            sampler = Sampler(pids, parents)
            print(
                f"coordinator {cluster.grpc_target}; 2 workerd x {args.slots} slot(s);"
                f" {args.n} exec /bin/true per run",
                file=sys.stderr,
            )
            # A short warm-up, so imports and first-connection costs are not timed.
            measure(cluster, exec_true(20, -1), sampler, args.timeout)
            for i in range(args.runs):
                spies = []
                if args.py_spy is not None and i == args.runs - 1:
                    spies = start_py_spy(args.py_spy, pids)
                try:
                    spec = exec_true(args.n, i, args.echo)
                    runs.append(measure(cluster, spec, sampler, args.timeout))
                finally:
                    for spy in spies:
                        spy.send_signal(signal.SIGINT)
                    for spy in spies:
                        spy.wait(30)
                print_run(i, runs[-1])
        finally:
            cluster.close()
    rates = [r.rate for r in runs]
    print(
        f"median {statistics.median(rates):.0f} actions/s over {len(rates)} run(s)"
        f" ({', '.join(f'{r:.0f}' for r in rates)}); 2 workerd x {args.slots} slot(s)"
    )
    return 0 if all(r.state == "SUCCEEDED" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
