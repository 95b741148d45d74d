"""Dask and Ray on the benchmark shapes: one round of one system, in the peers' venv.

``tests.bench.compare`` starts this as ``.venv-peers/bin/python -m tests.bench.peers --system
dask|ray`` (the peers venv has Dask and Ray, not Plait), once per round, so the systems
alternate. It prints one ``BENCH-RESULT {json}`` line per shape on stdout; everything else
(the peers' own logs) goes to stderr or is dropped.

Equal slots: a shape of ``W`` workers x ``S`` slots runs on Dask as ``LocalCluster(n_workers=W,
threads_per_worker=S, processes=True)``, and on Ray as ``ray.init(num_cpus=W * S)`` (one task
per worker process, so ``W * S`` processes). Dependencies are passed as futures (Dask
``client.submit``) or object refs (Ray ``f.remote``), so each system resolves them itself.
No-op tasks return None; sleep tasks call ``time.sleep(0.01)``. Timed end to end, from the
first submit to every task's result being known to the client (the slowest part of every
shape is its last tasks, so waiting on all of them costs nothing extra). Each cluster runs a
small untimed warm-up first, as Plait's does.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import groupby
from pathlib import Path
from typing import Any

from tests.bench.graphs import SHAPE_KEYS, Shape, Sizes, Work, shapes

ROOT = Path(__file__).resolve().parents[2]
RESULT_PREFIX = "BENCH-RESULT "
WARMUP_TASKS = 20


def noop(*deps: Any) -> None:
    """The no-op task: its arguments are its dependencies' results."""


def sleep10ms(*deps: Any) -> None:
    """The sleep task: time.sleep releases the GIL, as a blocking call in real code would."""
    time.sleep(0.01)


def worker_pid() -> int:
    """The warm-up task: which worker process ran it."""
    time.sleep(0.01)
    return os.getpid()


def emit(system: str, shape: Shape, seconds: float, ok: bool, error: str = "") -> None:
    record = {"system": system, "shape": shape.key, "seconds": seconds, "ok": ok}
    if error:
        record["error"] = error
    print(RESULT_PREFIX + json.dumps(record), flush=True)


# ----- Dask ------------------------------------------------------------------------------------


def run_dask(selected: list[Shape], timeout: float) -> None:
    from dask.distributed import Client, LocalCluster, wait

    for (workers, slots), group in groupby(selected, key=lambda s: (s.workers, s.slots)):
        with (
            LocalCluster(
                n_workers=workers,
                threads_per_worker=slots,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                silence_logs=logging.ERROR,
            ) as cluster,
            Client(cluster) as client,
        ):
            client.gather(client.map(sleep10ms, range(max(WARMUP_TASKS, workers * slots))))
            for shape in group:
                fn = sleep10ms if shape.work is Work.SLEEP else noop
                start = time.perf_counter()
                futures: dict[str, Any] = {}
                for node in shape.nodes:
                    futures[node.id] = client.submit(
                        fn, *(futures[d] for d in node.needs), pure=False
                    )
                done = wait(list(futures.values()), timeout=timeout)
                seconds = time.perf_counter() - start
                bad = [f.key for f in done.done if f.status != "finished"]
                ok = not bad and not done.not_done
                emit("dask", shape, seconds, ok, "" if ok else f"{len(bad)} tasks did not finish")
                client.cancel(list(futures.values()))
                del futures, done


# ----- Ray -------------------------------------------------------------------------------------


@contextmanager
def ray_session(cpus: int) -> Iterator[Any]:
    import ray

    ray.init(
        num_cpus=cpus,
        _node_ip_address="127.0.0.1",  # loopback only: nothing listens on another address
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
        configure_logging=True,
    )
    try:
        yield ray
    finally:
        ray.shutdown()


def warm_up_ray(ray: Any, cpus: int, limit_s: float = 120.0) -> None:
    """Runs warm-up tasks until every one of Ray's ``cpus`` worker processes has run one: Ray
    starts its workers in the background, and on a small host the last of them can take
    seconds to come up, which would otherwise land in the first shape's time."""
    remote_pid = ray.remote(worker_pid)
    seen: set[int] = set()
    deadline = time.perf_counter() + limit_s
    while len(seen) < cpus and time.perf_counter() < deadline:
        seen.update(ray.get([remote_pid.remote() for _ in range(max(WARMUP_TASKS, 2 * cpus))]))


def run_ray(selected: list[Shape], timeout: float) -> None:
    for cpus, group in groupby(selected, key=lambda s: s.total_slots):
        with ray_session(cpus) as ray:
            remote_noop = ray.remote(noop)
            remote_sleep = ray.remote(sleep10ms)
            warm_up_ray(ray, cpus)
            for shape in group:
                fn = remote_sleep if shape.work is Work.SLEEP else remote_noop
                start = time.perf_counter()
                refs: dict[str, Any] = {}
                for node in shape.nodes:
                    refs[node.id] = fn.remote(*(refs[d] for d in node.needs))
                ready, not_ready = ray.wait(
                    list(refs.values()), num_returns=len(refs), timeout=timeout
                )
                ray.get(ready)  # raises if a task failed
                seconds = time.perf_counter() - start
                ok = not not_ready
                emit("ray", shape, seconds, ok, "" if ok else f"{len(not_ready)} tasks not done")
                del refs, ready, not_ready


RUNNERS: dict[str, Callable[[list[Shape], float], None]] = {"dask": run_dask, "ray": run_ray}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.peers", description=__doc__)
    p.add_argument("--system", choices=sorted(RUNNERS), required=True)
    p.add_argument("--shapes", default=",".join(SHAPE_KEYS), help="comma-separated shape keys")
    p.add_argument("--sizes", default="{}", help="JSON object of tests.bench.graphs.Sizes fields")
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed per shape")
    args = p.parse_args(argv)

    wanted = set(args.shapes.split(","))
    selected = [s for s in shapes(Sizes(**json.loads(args.sizes))) if s.key in wanted and s.peers]
    # Worker processes import this module by name (Ray, Dask's spawned workers): the repo root
    # must be on their path. Ray must not phone home from a benchmark.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.getenv("PYTHONPATH")]))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    RUNNERS[args.system](selected, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
