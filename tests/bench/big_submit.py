"""A 100,000-action workflow through ``plait submit``: ``python -m tests.bench.big_submit``.

Writes two workflows of exactly 100,000 exec actions (the documented maximum, ``max_actions``),
each as block YAML with a flow mapping per action and as JSON (which is YAML, and which the
loader reads with the JSON parser), and times ``plait submit FILE`` end to end, as a person
would (``time plait submit big.yaml``): a fresh ``plait`` process that loads, checks and submits
the file to a running coordinator and exits once the coordinator has validated and journalled
it.

* **wide**: 99,990 independent actions and 10 joins, each needing 9,999 of them (a join of all
  100,000 would pass ``max_fan_in``, 10,000, and ``max_actions``);
* **layered**: 50 layers x 2,000 actions; each past the first needs 2 distinct actions of the
  layer before, picked by a seeded RNG.

The coordinator is ``python -m plait.coordinator`` on a SQLite journal in a temporary directory,
with no workers (nothing runs: this measures the submission), a fresh one per file, warmed up
by a small submit. Each file is submitted ``--rounds`` times and the median is printed, with the
client's side split up from one more, in-process run (load, check, the RPC). ``--write DIR``
only writes the files. Not a test: the timing goal (under 2 s) is for docs/benchmarks.md;
nothing asserts it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
ACTIONS = 100_000
JOINS = 10
LAYERS, WIDTH = 50, 2_000


def wide_doc(n: int = ACTIONS, joins: int = JOINS) -> dict[str, Any]:
    """``n - joins`` independent exec actions and ``joins`` joins over equal shares of them."""
    leaves = n - joins
    actions: list[dict[str, Any]] = [{"id": f"a{i}", "run": ["true"]} for i in range(leaves)]
    share = leaves // joins
    for j in range(joins):
        needs = [f"a{i}" for i in range(j * share, (j + 1) * share)]
        actions.append({"id": f"join{j}", "run": ["true"], "needs": needs})
    return {"name": f"wide-{n}", "actions": actions}


def layered_doc(layers: int = LAYERS, width: int = WIDTH, seed: int = 1) -> dict[str, Any]:
    """``layers`` x ``width`` exec actions; past the first layer each needs 2 of the one before."""
    rng = random.Random(seed)
    actions: list[dict[str, Any]] = []
    for layer in range(layers):
        for i in range(width):
            action: dict[str, Any] = {"id": f"l{layer}-{i}", "run": ["true"]}
            if layer:
                a, b = rng.sample(range(width), 2)
                action["needs"] = [f"l{layer - 1}-{a}", f"l{layer - 1}-{b}"]
            actions.append(action)
    return {"name": f"layered-{layers}x{width}", "actions": actions}


def to_yaml(doc: dict[str, Any]) -> str:
    """Block YAML with one flow mapping per action, unquoted, as a person's generator writes."""

    def flow(value: Any) -> str:
        if isinstance(value, list):
            return "[" + ", ".join(flow(v) for v in value) + "]"
        return str(value)

    lines = [f"name: {doc['name']}", "actions:"]
    for action in doc["actions"]:
        lines.append("  - {" + ", ".join(f"{k}: {flow(v)}" for k, v in action.items()) + "}")
    return "\n".join(lines) + "\n"


def to_json(doc: dict[str, Any]) -> str:
    """The same workflow as JSON (which is YAML), one action per line."""
    actions = ",\n".join(json.dumps(a) for a in doc["actions"])
    return f'{{"name": {json.dumps(doc["name"])}, "actions": [\n{actions}\n]}}\n'


def wide_yaml() -> str:
    """The wide workflow as YAML."""
    return to_yaml(wide_doc())


def layered_yaml() -> str:
    """The layered workflow as YAML."""
    return to_yaml(layered_doc())


def write(out: Path) -> dict[str, Path]:
    """Writes the two workflows as YAML (``wide.yaml``, ``layered.yaml``) and as JSON-form
    YAML (``wide-json.yaml``, ``layered-json.yaml``) into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, doc in (("wide", wide_doc()), ("layered", layered_doc())):
        files[name] = out / f"{name}.yaml"
        files[name].write_text(to_yaml(doc))
        files[f"{name}-json"] = out / f"{name}-json.yaml"
        files[f"{name}-json"].write_text(to_json(doc))
    return files


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def start_coordinator(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A coordinator on a fresh SQLite journal; returns it and its address."""
    tmp.mkdir(parents=True, exist_ok=True)
    ready = tmp / "ready.json"
    argv = [sys.executable, "-m", "plait.coordinator", "--listen", "127.0.0.1:0"]
    argv += ["--store", f"sqlite:///{tmp}/plait.db", "--ready-file", str(ready)]
    argv += ["--metrics-listen", "127.0.0.1:0"]
    log = (tmp / "coordinator.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=_env())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the coordinator exited: {(tmp / 'coordinator.log').read_text()}")
        try:
            return proc, json.loads(ready.read_text())["grpc"]
        except (OSError, ValueError, KeyError):
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("the coordinator did not start within 60 s")


def time_cli(path: Path, target: str) -> float:
    """Seconds of one ``plait submit PATH`` (a new process), which must exit 0."""
    argv = [sys.executable, "-m", "plait.cli.main", "submit", str(path), "--coordinator", target]
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=_env(), check=False)
    took = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"plait submit {path.name} exited {done.returncode}: {done.stderr}")
    return took


def split(path: Path, target: str) -> dict[str, float]:
    """The client's side in this process: load, check, submit (seconds each)."""
    from plait.client import Client
    from plait.spec import load_workflow
    from plait.submission import SubmitLimits, check_spec

    t0 = time.perf_counter()
    spec = load_workflow(path)
    t1 = time.perf_counter()
    size = check_spec(spec, SubmitLimits())
    t2 = time.perf_counter()
    with Client(target) as client:
        client.submit(spec)
    t3 = time.perf_counter()
    return {"load": t1 - t0, "check": t2 - t1, "submit": t3 - t2, "bytes": size}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--write", metavar="DIR", type=Path, help="only write the YAML files")
    args = p.parse_args()
    if args.write:
        for name, path in write(args.write).items():
            print(f"{name}: {path} ({path.stat().st_size:,} bytes)")
        return 0
    with tempfile.TemporaryDirectory(prefix="plait-big-submit-") as d:
        tmp = Path(d)
        files = write(tmp / "flows")
        small = tmp / "flows" / "small.yaml"
        small.write_text("actions: [{id: a, run: [true]}]\n")
        for name, path in files.items():
            # A fresh coordinator per file, warmed up by a small submit (its journal file made):
            # one already holding many 100,000-action workflows is another measurement.
            proc, target = start_coordinator(tmp / name)
            try:
                time_cli(small, target)
                times = [time_cli(path, target) for _ in range(args.rounds)]
                parts = split(path, target)
            finally:
                proc.terminate()
                proc.wait(30)
            print(
                f"{name}: plait submit {statistics.median(times):.2f} s median of"
                f" {', '.join(f'{t:.2f}' for t in times)}; in process: load"
                f" {parts['load']:.2f} s, check {parts['check'] * 1000:.0f} ms, submit"
                f" {parts['submit']:.2f} s ({parts['bytes'] / 2**20:.1f} MiB spec,"
                f" {path.stat().st_size / 2**20:.1f} MiB file)",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
