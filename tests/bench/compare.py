"""Where Plait stands: the issue 13 shapes at equal slots, optionally beside Dask and Ray.

``make bench`` (Plait only) and ``make bench-peers`` (Plait, Dask and Ray) run
``python -m tests.bench.compare``. Each round runs every system on every selected shape, the
systems in turn (Plait, Dask, Ray, Plait, Dask, Ray, ...), so a host that is busier in one
stretch of time does not favour one system; the table gives the median per cell. Plait runs in
this process's venv (``tests.bench.shapes``), the peers in theirs (``tests.bench.peers``, as a
subprocess per round). Not a test: timing goals live here, in the table's goal column; it exits
1 only when a run failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests import procs
from tests.bench import report, shapes
from tests.bench.graphs import SHAPE_KEYS, Shape, Sizes
from tests.bench.graphs import shapes as all_shapes
from tests.bench.peers import RESULT_PREFIX
from tests.bench.report import Measurement

ROOT = Path(__file__).resolve().parents[2]
PEERS = ("dask", "ray")
ERROR_TAIL = 1500  # characters of a failed run's error shown in the progress log


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_plait(selected: list[Shape], round_no: int, timeout: float) -> list[Measurement]:
    out = []
    for shape in selected:
        try:
            run = shapes.run_shape(shape, timeout)
        except Exception as err:  # a failed run is a failed cell, not a lost table
            # The harness's message ends with the daemon's log tail: keep the end of it.
            log(f"round {round_no} plait {shape.key}: FAILED: {str(err)[-ERROR_TAIL:]}")
            out.append(Measurement("plait", shape.key, round_no, 0.0, False, error=str(err)))
            continue
        ok = run.state == "SUCCEEDED"
        out.append(
            Measurement(
                "plait",
                shape.key,
                round_no,
                run.end_to_end_s,
                ok,
                run.coordinator_s,
                "" if ok else f"the workflow ended {run.state}",
            )
        )
        log(
            f"round {round_no} plait {shape.key}: {run.state}"
            f" {report.fmt(shape.unit, shape.score(run.end_to_end_s))} end to end,"
            f" {report.fmt(shape.unit, shape.score(max(run.coordinator_s, 1e-3)))} on the"
            f" coordinator ({run.end_to_end_s:.2f} s)"
        )
    return out


def run_peer(
    system: str,
    selected: list[Shape],
    sizes: Sizes,
    round_no: int,
    python: str,
    timeout: float,
) -> list[Measurement]:
    """One round of ``system`` in the peers' venv; missing or failed shapes are failed cells."""
    wanted = [s for s in selected if s.peers]
    if not wanted:
        return []
    argv = [
        python,
        "-m",
        "tests.bench.peers",
        "--system",
        system,
        "--shapes",
        ",".join(s.key for s in wanted),
        "--sizes",
        json.dumps(dataclasses.asdict(sizes)),
        "--timeout",
        str(timeout),
    ]
    found: dict[str, Measurement] = {}
    error = ""
    try:
        proc = subprocess.run(
            argv,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout * (len(wanted) + 1),
            check=False,
        )
        for line in proc.stdout.splitlines():
            if line.startswith(RESULT_PREFIX):
                rec = json.loads(line.removeprefix(RESULT_PREFIX))
                found[rec["shape"]] = Measurement(
                    system,
                    rec["shape"],
                    round_no,
                    rec["seconds"],
                    rec["ok"],
                    None,
                    rec.get("error", ""),
                )
        if proc.returncode:
            error = f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    except (OSError, subprocess.TimeoutExpired) as err:
        error = str(err)
    out = []
    for shape in wanted:
        m = found.get(shape.key) or Measurement(
            system, shape.key, round_no, 0.0, False, error=error
        )
        out.append(m)
        if m.ok:
            detail = f"{report.fmt(shape.unit, shape.score(m.seconds))} ({m.seconds:.2f} s)"
        else:
            detail = f"FAILED: {(m.error or error)[-ERROR_TAIL:]}"
        log(f"round {round_no} {system} {shape.key}: {detail}")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.bench.compare", description=__doc__)
    p.add_argument("--rounds", type=int, default=3, help="rounds; each cell is their median")
    p.add_argument("--shapes", default=",".join(SHAPE_KEYS), help="comma-separated shape keys")
    p.add_argument(
        "--peers", default="", help="comma-separated peers to run beside Plait: dask,ray"
    )
    p.add_argument("--no-plait", action="store_true", help="run only the peers")
    p.add_argument(
        "--peers-python",
        default=str(ROOT / ".venv-peers" / "bin" / "python"),
        help="interpreter of the venv with the peers (make bench-peers creates .venv-peers)",
    )
    defaults = Sizes()
    for name in ("fanout", "layers", "width", "chain", "sleeps", "exec"):
        p.add_argument(f"--{name}", type=int, default=getattr(defaults, name), help=f"size: {name}")
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed per run")
    p.add_argument("--markdown", action="store_true", help="a Markdown table even on a terminal")
    p.add_argument("--json", type=Path, help="also write every run's measurement here")
    args = p.parse_args(argv)
    unknown = set(args.shapes.split(",")) - set(SHAPE_KEYS)
    if unknown:
        p.error(f"--shapes: unknown {sorted(unknown)}; known: {','.join(SHAPE_KEYS)}")
    args.peer_list = [x for x in args.peers.split(",") if x]
    if set(args.peer_list) - set(PEERS):
        p.error(f"--peers: known peers are {','.join(PEERS)}")
    if args.rounds < 1:
        p.error("--rounds: at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = Sizes(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Sizes)})
    wanted = set(args.shapes.split(","))
    selected = [s for s in all_shapes(sizes) if s.key in wanted]
    systems = ([] if args.no_plait else ["plait"]) + args.peer_list
    if args.peer_list and not Path(args.peers_python).exists():
        log(f"{args.peers_python} not found: `make bench-peers` creates the peers' venv")
        return 2

    procs.become_subreaper()
    # Stopped with SIGTERM, still stop the cluster being measured (its `finally`).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    results: list[Measurement] = []
    for round_no in range(1, args.rounds + 1):
        for system in systems:
            if system == "plait":
                results += run_plait(selected, round_no, args.timeout)
            else:
                results += run_peer(
                    system, selected, sizes, round_no, args.peers_python, args.timeout
                )
    log(f"all rounds took {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    shown = selected if "plait" in systems else [s for s in selected if s.peers]
    report.render(shown, args.peer_list, results, args.rounds, markdown=args.markdown or None)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
