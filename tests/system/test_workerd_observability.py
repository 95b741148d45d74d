"""workerd's /metrics, execute spans and JSON logs, with a real coordinator and workerd.

The workerd serves /metrics on a loopback port it picks (``--metrics-listen 127.0.0.1:0``;
the port is read from its log), and both daemons export spans to the console
(``OTEL_TRACES_EXPORTER=console``, read back from workerd's output). An exec action blocks until
the test has scraped workerd while it runs, then prints ``$TRACEPARENT``: its span id must be
the exported ``plait.action.execute`` span's.
"""

from __future__ import annotations

import json
import re
import subprocess
import textwrap
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from plait.v1 import workflow_pb2 as wf
from tests.system.harness import Cluster, python_action, wait_for, workflow
from tests.tools import required_tool

pytestmark = pytest.mark.usefixtures("workerd_available")

_METRICS_LINE = re.compile(r"serving Prometheus /metrics on (127\.0\.0\.1:\d+)")


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        return str(r.read().decode())


def value(text: str, sample: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def console_spans(text: str) -> list[dict[str, Any]]:
    """The JSON objects ConsoleSpanExporter wrote (one per span, pretty-printed)."""
    decoder = json.JSONDecoder()
    spans = []
    for m in re.finditer(r"^\{$", text, re.MULTILINE):
        try:
            obj, _ = decoder.raw_decode(text, m.start())
        except ValueError:
            continue
        if isinstance(obj, dict) and "context" in obj and "name" in obj:
            spans.append(obj)
    return spans


def test_metrics_spans_and_json_logs(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both daemons export (so the coordinator's traceparent is sampled), promptly.
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    cluster.start_coordinator()
    go = tmp_path / "go"
    daemon = cluster.add_worker(
        "obs-w1",
        slots=2,
        extra_args=["--metrics-listen", "127.0.0.1:0", "--log-format", "json", "--no-adaptive"],
    )
    address = wait_for(
        "workerd's metrics address in its log",
        lambda: m.group(1) if (m := _METRICS_LINE.search(daemon.log_tail())) else None,
        30,
    )
    before = scrape(address)
    assert value(before, "plait_workerd_connected") == 1
    assert value(before, "plait_workerd_slots") == 2
    assert value(before, "plait_build_info") == 1
    assert "_created" not in before

    seen = tmp_path / "traceparent"
    action = python_action(
        "traced",
        textwrap.dedent(
            f"""
            import os, time
            while not os.path.exists({str(go)!r}):
                time.sleep(0.02)
            print("TRACEPARENT=" + os.environ["TRACEPARENT"])
            with open({str(seen)!r}, "w") as f:
                f.write(os.environ["TRACEPARENT"])
            """
        ),
    )
    wf_id = cluster.submit(workflow("obs", [action]))
    wait_for(
        "the attempt to hold a slot",
        lambda: value(scrape(address), "plait_workerd_slots_used") == 1,
        30,
    )
    go.touch()
    status = cluster.wait_workflow(wf_id)
    assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, status

    after = wait_for(
        "the attempt to be counted",
        lambda: (
            t
            if value(
                t := scrape(address),
                "plait_workerd_attempts_total",
                kind="exec",
                outcome="succeeded",
            )
            == 1
            else None
        ),
        30,
    )
    assert value(after, "plait_workerd_slots_used") == 0
    assert value(after, "plait_workerd_attempt_duration_seconds_count", kind="exec") == 1
    assert value(after, "plait_workerd_reconnects_total") == 0

    check = subprocess.run(
        [required_tool("promtool"), "check", "metrics"],
        input=after.encode(),
        check=False,
        capture_output=True,
        timeout=60,
    )
    assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr

    def execute_span() -> dict[str, Any] | None:
        for span in console_spans(daemon.log_tail(1_000_000)):
            if span["name"] == "plait.action.execute":
                return span
        return None

    span = wait_for("the execute span in workerd's output", execute_span, 30)
    m = re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", seen.read_text().strip())
    assert m is not None, seen.read_text()
    _, trace_id, span_id, flags = m.group(0).split("-")
    assert span["context"]["trace_id"] == "0x" + trace_id
    assert span["context"]["span_id"] == "0x" + span_id
    assert flags == "01"
    attrs = span["attributes"]
    assert attrs["plait.workflow.id"] == wf_id
    assert attrs["plait.action.id"] == "traced"
    assert attrs["plait.worker.id"] == "obs-w1"
    assert attrs["plait.state"] == "succeeded"
    assert attrs["process.exit.code"] == 0
    assert span["parent_id"] is not None
    assert span["resource"]["attributes"]["service.name"] == "plait-workerd"

    # JSON logs: every line workerd wrote to stderr that is not a span is one JSON object.
    log_lines = [
        json.loads(line)
        for line in daemon.log_tail(1_000_000).splitlines()
        if line.startswith('{"ts"')
    ]
    assert any(
        line["logger"] == "plait.workerd.main" and "serving Prometheus" in line["message"]
        for line in log_lines
    ), log_lines[:5]
    assert all({"ts", "level", "logger", "message"} <= set(line) for line in log_lines)
