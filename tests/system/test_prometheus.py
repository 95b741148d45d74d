"""Every dashboard query and every rule expression returns data from a real Prometheus.

A real coordinator and two real workerds (each with ``--metrics-listen``) run while a real
Prometheus (Debian's package, started here on loopback with its own temp dir and config)
scrapes them every second and evaluates deploy/prometheus/rules.yml. The workflows exercise
what the panels show: a fork (an action with several dependents), a map, a pipeline, joins of
each kind (all, any with cancel_remaining, at_least met and at_least impossible), a failure, a
retry, an attempt that times out, a refused submission, a worker skewed 1 s ahead (clock
offset rejections) and a worker paused past its lease TTL (lease lost; its fenced attempt's
report commits nothing). Then every panel query of deploy/grafana/plait.json (template
variables substituted as Grafana would) and every expression of rules.yml (recording and alert)
goes through ``/api/v1/query``; each must return a non-empty result.

Some expressions cannot return data on a healthy run by design: an alert whose condition is
false (e.g. PlaitNoLeader while a leader runs, PlaitJournalCommitSlow), and queries over counters
that only count faults this run does not cause (:data:`FAULT_ONLY`). Such an expression is
checked by its underlying selectors instead: every metric name it reads must have series in
Prometheus, or, for a :data:`FAULT_ONLY` family that has never been incremented (a labelled
counter has no series until then), Prometheus must have its metadata (``# HELP``/``# TYPE``)
from a real scrape, which proves the name is exported as written.

Prometheus' own rule evaluation must also be healthy for every rule (``/api/v1/rules``).
Skipped where prometheus is missing; under CI (``CI`` set) that is a failure instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import re
import signal
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
import yaml

from plait.spec.convert import spec_from_dict
from plait.v1 import workflow_pb2 as wf
from tests import procs
from tests.integration.protocol_worker import ProtocolWorker
from tests.system.harness import ROOT, Cluster, describe, wait_for
from tests.tools import required_tool

pytestmark = [
    pytest.mark.system,
    pytest.mark.timeout(120),
    pytest.mark.usefixtures("workerd_available"),
]

DASHBOARD_PY = ROOT / "deploy" / "grafana" / "dashboard.py"
DASHBOARD_JSON = ROOT / "deploy" / "grafana" / "plait.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
SCRAPE_S = 1
# Grafana's $__rate_interval is at least four scrape intervals; 1m is what it would pick for a
# dashboard over the last hour with a 15 s scrape, and covers this whole test.
TEMPLATE = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}

# Counters of faults this run does not cause: no auth configured (auth refusals), no reports
# for a lease a session does not hold, no internal error. Queries over them may come back
# empty; their metadata must still be scraped from a real target.
FAULT_ONLY = frozenset(
    {
        "plait_auth_refusals_total",
        "plait_worker_reports_refused_total",
        "plait_internal_errors_total",
    }
)
METRIC_NAME = re.compile(r"\b(?:plait_[a-z0-9_]+|up)\b(?![:(])")
HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")

# One exec action steered by its input: sleep, then exit with `exit`, or (with `flaky`) fail
# with 75 on the first attempt and succeed on the next; `emit` goes into its outputs.
ACT = r"""
import json, os, sys, time
with open(os.environ["PLAIT_INPUTS_FILE"]) as f:
    params = json.load(f).get("input") or {}
if params.get("flaky"):
    try:
        os.close(os.open(params["flaky"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        sys.exit(75)
    except FileExistsError:
        pass
time.sleep(float(params.get("sleep", 0)))
if "exit" in params:
    sys.exit(int(params["exit"]))
outputs = dict(params.get("emit", {}))
outputs["item"] = os.environ.get("PLAIT_ITEM")
with open(os.environ["PLAIT_OUTPUT"], "w") as f:
    json.dump(outputs, f)
"""

# The paused worker's action: the first attempt of all (marker file) runs `first_s`, every
# later one `later_s`.
FIRST_SLOW = r"""
import json, os, time
with open(os.environ["PLAIT_INPUTS_FILE"]) as f:
    params = json.load(f)["input"]
try:
    os.close(os.open(params["marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    first = True
except FileExistsError:
    first = False
time.sleep(params["first_s"] if first else params["later_s"])
with open(os.environ["PLAIT_OUTPUT"], "w") as f:
    json.dump({"first": first}, f)
"""


def load_dashboard_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("plait_deploy_dashboard", DASHBOARD_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----- Prometheus ---------------------------------------------------------------------------


@dataclass
class Prometheus:
    """A Prometheus server this test started, and its HTTP API."""

    url: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as reply:
            body = json.loads(reply.read())
        assert body.get("status") == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr)
        result = data["result"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": result}]
        return list(result)

    def value(self, expr: str) -> float:
        """The single value ``expr`` returns (0 when it returns nothing)."""
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else 0.0

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return "<no log>"


def prometheus_binary() -> str:
    return required_tool("prometheus")


@contextlib.contextmanager
def running_prometheus(tmp: Path, jobs: dict[str, list[str]]) -> Iterator[Prometheus]:
    """Prometheus scraping ``jobs`` ({job: [host:port]}) every second, with rules.yml."""
    binary = prometheus_binary()
    tmp.mkdir()
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": targets}]}
            for job, targets in jobs.items()
        ],
    }
    config_path = tmp / "prometheus.yml"
    config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    port = free_port()
    log_path = tmp / "prometheus.log"
    argv = [
        binary,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={tmp / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            argv, cwd=tmp, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    procs.MANAGED.add(popen.pid)
    server = Prometheus(f"http://127.0.0.1:{port}", popen, log_path)
    try:

        def ready() -> bool:
            if popen.poll() is not None:
                raise AssertionError(f"prometheus exited {popen.returncode}:\n{server.log_tail()}")
            try:
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as reply:
                    return bool(reply.status == 200)
            except OSError:
                return False

        wait_for("prometheus to be ready", ready, timeout=30, interval=0.1)
        yield server
    finally:
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(10)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(5)
        procs.MANAGED.discard(popen.pid)


# ----- workflows -----------------------------------------------------------------------------


def act(script: Path, **params: Any) -> dict[str, Any]:
    return {"run": [sys.executable, str(script)], "input": params}


def shapes_spec(script: Path, marker: Path) -> wf.WorkflowSpec:
    """Fork, map, pipeline, join all and join any, a retried action: succeeds."""
    numbers = [1, 2, 3, 4]
    return spec_from_dict(
        {
            "name": "prom-shapes",
            "defaults": {"timeout": "30s"},
            "actions": [
                {"id": "plan", **act(script, emit={"numbers": numbers})},
                # plan forks: four dependents, a map and a pipeline.
                *({"id": b, "needs": ["plan"], **act(script, sleep=0.2)} for b in "abc"),
                {
                    "id": "square",
                    "needs": ["plan"],
                    "map": {"over": "plan.numbers", "max_parallel": 2},
                    **act(script, sleep=0.1),
                },
                {
                    "id": "etl",
                    "needs": ["plan"],
                    "pipeline": {
                        "over": "plan.numbers",
                        "max_in_flight": 2,
                        "stages": [
                            {"id": "fetch", **act(script)},
                            {"id": "load", **act(script)},
                        ],
                    },
                },
                {"id": "all", "needs": ["a", "b", "c", "square", "etl"], **act(script)},
                {
                    "id": "first",
                    "needs": ["a", "slow"],
                    "join": {"any": {"cancel_remaining": True}},
                    **act(script),
                },
                {"id": "slow", **act(script, sleep=20)},
                {
                    "id": "flaky",
                    "retry": {"max_attempts": 2, "backoff": "100ms", "retryable_exit_codes": [75]},
                    **act(script, flaky=str(marker)),
                },
            ],
        },
        source="test_prometheus",
    )


def faults_spec(script: Path) -> wf.WorkflowSpec:
    """A failure, an at_least join met despite it, one made impossible by it, a timeout."""
    return spec_from_dict(
        {
            "name": "prom-faults",
            "defaults": {"timeout": "30s"},
            "actions": [
                {"id": "ok-1", **act(script)},
                {"id": "ok-2", **act(script)},
                {"id": "bad", **act(script, exit=3)},
                {
                    "id": "quorum",
                    "needs": ["ok-1", "ok-2", "bad"],
                    "join": {"at_least": 2},
                    **act(script),
                },
                {
                    "id": "strict",
                    "needs": ["ok-1", "bad"],
                    "join": {"at_least": 2},
                    **act(script),
                },
                {"id": "hangs", "timeout": "1s", **act(script, sleep=30)},
            ],
        },
        source="test_prometheus",
    )


def pause_spec(script: Path, marker: Path) -> wf.WorkflowSpec:
    return spec_from_dict(
        {
            "name": "prom-pause",
            "actions": [
                {
                    "id": "work",
                    "run": [sys.executable, str(script)],
                    "input": {"marker": str(marker), "first_s": 3, "later_s": 0.2},
                }
            ],
        },
        source="test_prometheus",
    )


def zombie(cluster: Cluster, tmp_path: Path) -> None:
    """Pauses the worker running an attempt past the lease TTL: the lease is lost and the action
    commits on the other worker. Resumed, the paused worker reports its attempt (fenced: acked
    and journalled nowhere) and serves again."""
    script = tmp_path / "first_slow.py"
    script.write_text(FIRST_SLOW)
    workflow_id = cluster.submit(pause_spec(script, tmp_path / "first.marker"))
    leased = cluster.wait_event(
        workflow_id, lambda e: e.type == wf.EVENT_TYPE_ACTION_LEASED, "the first lease"
    )
    wait_for("the first attempt to start", (tmp_path / "first.marker").exists)
    cluster.stop(leased.worker_id)
    try:
        status = cluster.wait_workflow(workflow_id, timeout=30)
    finally:
        cluster.cont(leased.worker_id)
    assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, describe(status)
    cluster.wait_heard(leased.worker_id)


def superseded_result(cluster: Cluster) -> None:
    """A zombie's result: a worker keeps its stream open but stops heartbeating past the lease
    TTL, the action is leased again to another worker, and the first one's late result is
    refused as superseded (``plait_results_refused_total{reason="superseded"}``, the series the
    zombie alert reads). Played with the protocol test worker: a correct worker fences itself
    and reports nothing that could be refused."""
    spec = wf.WorkflowSpec(name="zombie")
    spec.actions.add(id="z", handler="zombie-work")
    workflow_id = cluster.submit(spec)

    async def play() -> None:
        zombie = ProtocolWorker(cluster.grpc_target, "zombie-1", handlers=("zombie-work",))
        await zombie.connect()
        (old,) = await zombie.grants(1, timeout=30)
        chatter = asyncio.create_task(zombie.chatter())  # open, but no heartbeat renews it
        try:
            await zombie.next("cancel_lease", timeout=30)  # the lease expired
            healthy = ProtocolWorker(cluster.grpc_target, "zombie-2", handlers=("zombie-work",))
            await healthy.connect()
            (new,) = await healthy.grants(1, timeout=30)
            zombie.finish(old, "{}")
            refused = (await zombie.next("ack", timeout=30)).ack.results[0]
            assert refused.status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0], refused
            healthy.finish(new, "{}")
            await healthy.next("ack", timeout=30)
            await healthy.close()
        finally:
            chatter.cancel()
            await zombie.close()

    asyncio.run(play())
    assert cluster.wait_workflow(workflow_id, timeout=30).state == wf.WORKFLOW_STATE_SUCCEEDED


# ----- the test ------------------------------------------------------------------------------


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads (label names and functions excluded)."""
    without_labels = re.sub(r"\{[^}]*\}", "", expr)
    without_grouping = re.sub(r"\b(by|on|without|ignoring)\s*\([^)]*\)", "", without_labels)
    return set(METRIC_NAME.findall(without_grouping))


def family(name: str) -> str:
    return HISTOGRAM_SUFFIX.sub("", name)


def substitute(expr: str) -> str:
    for variable, value in TEMPLATE.items():
        expr = expr.replace(variable, value)
    return expr


def selector_problem(prom: Prometheus, name: str) -> str | None:
    """Why ``name`` cannot back a query (None: it has series, or it is an exported
    fault-only family whose metadata Prometheus scraped)."""
    if prom.query(f"count({name})"):
        return None
    if family(name) in FAULT_ONLY:
        # Scraped as OpenMetrics, a counter's family is named without its _total suffix.
        for candidate in {family(name), family(name).removesuffix("_total")}:
            if prom.get("/api/v1/metadata", metric=candidate).get(candidate):
                return None
        return f"{name}: no series and no metadata (not exported by any target)"
    return f"{name}: no series"


@pytest.mark.slow
def test_every_dashboard_query_and_rule_returns_data(cluster: Cluster, tmp_path: Path) -> None:
    prometheus_binary()
    endpoints = cluster.start_coordinator()
    ports = {"w1": free_port(), "w2": free_port()}
    clock = {"w1": {}, "w2": {"PLAIT_CLOCK_OFFSET": "1s"}}
    for name, port in ports.items():
        cluster.add_worker(
            name,
            slots=4,
            wait=False,
            env=clock[name],
            extra_args=["--metrics-listen", f"127.0.0.1:{port}"],
        )
    cluster.wait_workers(list(ports))
    jobs = {
        "plait-coordinator": [endpoints.metrics],
        "plait-workerd": [f"127.0.0.1:{port}" for port in ports.values()],
    }
    with running_prometheus(tmp_path / "prometheus", jobs) as prom:
        wait_for(
            "prometheus to scrape all three targets",
            lambda: prom.value('sum(up{job=~"plait-.*"})') == 3,
            timeout=20,
            interval=0.2,
        )
        run_workflows(cluster, tmp_path)
        # Every target scraped again after the last workflow ended (the paused worker too),
        # twice, so each counter has two samples since its last change.
        finished = cluster.metric("plait_workflows_finished_total")
        wait_for(
            "prometheus to see every finished workflow",
            lambda: prom.value("sum(plait_workflows_finished_total)") >= finished,
            timeout=20,
            interval=0.2,
        )
        seen = prom.value("max(timestamp(up))")
        wait_for(
            "two more scrapes of every target",
            lambda: prom.value('min(timestamp(up{job=~"plait-.*"}))') >= seen + 2 * SCRAPE_S,
            timeout=20,
            interval=0.2,
        )
        assert prom.value('sum(up{job=~"plait-.*"})') == 3, prom.query("up")
        check_queries(prom)


def run_workflows(cluster: Cluster, tmp_path: Path) -> None:
    script = tmp_path / "act.py"
    script.write_text(ACT)
    zombie(cluster, tmp_path)
    superseded_result(cluster)
    shapes = cluster.submit(shapes_spec(script, tmp_path / "flaky.marker"))
    faults = cluster.submit(faults_spec(script))
    # A refused submission (an empty action id) counts an input refusal.
    with pytest.raises(grpc.RpcError) as refused:
        cluster.submit(wf.WorkflowSpec(name="prom-bad", actions=[wf.ActionSpec(id="")]))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = cluster.wait_workflow(shapes, timeout=40)
    assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, describe(status)
    status = cluster.wait_workflow(faults, timeout=40)
    assert status.state in (
        wf.WORKFLOW_STATE_FAILED,
        wf.WORKFLOW_STATE_PARTIALLY_SUCCEEDED,
    ), describe(status)
    by_id = {a.action_id: a for a in status.actions}
    assert by_id["quorum"].state == wf.ACTION_STATE_SUCCEEDED, describe(status)
    assert by_id["strict"].state != wf.ACTION_STATE_SUCCEEDED, describe(status)
    assert by_id["hangs"].state == wf.ACTION_STATE_TIMED_OUT, describe(status)


def check_queries(prom: Prometheus) -> None:
    dashboard = load_dashboard_module()
    board = json.loads(DASHBOARD_JSON.read_text())
    checks: list[tuple[str, str]] = [
        (f"panel {q.row} / {q.panel} [{q.ref_id}]", substitute(q.expr))
        for q in dashboard.queries(board)
    ]
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            name = rule.get("record") or f"alert {rule['alert']}"
            checks.append((f"rule {name}", rule["expr"]))
    assert len(checks) > 60, f"only {len(checks)} expressions"

    empty: list[str] = []
    problems: list[str] = []
    for what, expr in checks:
        if prom.query(expr):
            continue
        empty.append(what)
        names = metric_names(expr)
        assert names, f"{what}: no metric name found in {expr!r}"
        for name in sorted(names):
            problem = selector_problem(prom, name)
            if problem is not None:
                problems.append(f"{what}: {problem}\n    {expr}")
    assert not problems, "expressions without data:\n  " + "\n  ".join(problems)
    print(f"{len(checks)} expressions; {len(empty)} checked by their selectors: {empty}")

    # Only alert conditions and fault-only counters may come back empty.
    unexpected = [
        w
        for w, e in checks
        if w in empty
        and not w.startswith("rule alert ")
        and not any(family(n) in FAULT_ONLY for n in metric_names(e))
    ]
    assert not unexpected, f"came back empty without a reason: {unexpected}"

    # Prometheus evaluated every rule of rules.yml without an error.
    groups = prom.get("/api/v1/rules")["groups"]
    evaluated = {r["name"]: r for g in groups for r in g["rules"]}
    wanted = {r.get("record") or r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert wanted <= evaluated.keys(), sorted(wanted - evaluated.keys())
    unhealthy = {n: r.get("lastError") for n, r in evaluated.items() if r["health"] != "ok"}
    assert not unhealthy, unhealthy
    # The zombie this test made is what PlaitSupersededResults exists for.
    assert prom.query(next(e for w, e in checks if w == "rule alert PlaitSupersededResults"))
