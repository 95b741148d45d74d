"""workerd's metrics (plait.workerd.metrics) and its --metrics-listen/--metrics-public flags."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from plait.v1 import worker_service_pb2 as pb
from plait.workerd.config import build_parser, config_from_args
from plait.workerd.metrics import WorkerdMetrics, kill_reason
from tests.tools import required_tool

ROOT = Path(__file__).resolve().parents[2]


def result(outcome: int, exit_code: int = 0) -> pb.ActionResult:
    return pb.ActionResult(lease_id="l", fencing_token=1, outcome=outcome, exit_code=exit_code)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_kill_reasons() -> None:
    assert kill_reason(result(pb.ACTION_OUTCOME_TIMED_OUT, -15), "") == "timeout"
    assert kill_reason(result(pb.ACTION_OUTCOME_CANCELLED), "lease_lost") == "lease_lost"
    assert kill_reason(result(pb.ACTION_OUTCOME_CANCELLED), "cancelled") == "cancelled"
    assert kill_reason(result(pb.ACTION_OUTCOME_CANCELLED), "") == "other"
    xcpu = -int(signal.SIGXCPU)
    assert kill_reason(result(pb.ACTION_OUTCOME_FAILED, xcpu), "") == "rlimit"
    assert kill_reason(result(pb.ACTION_OUTCOME_FAILED, 3), "") is None
    assert kill_reason(result(pb.ACTION_OUTCOME_SUCCEEDED), "") is None


def test_counts_attempts_kills_and_exemplars() -> None:
    m = WorkerdMetrics()
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    m.attempt_finished("exec", result(pb.ACTION_OUTCOME_SUCCEEDED), 0.3, trace_id, "")
    m.attempt_finished("exec", result(pb.ACTION_OUTCOME_CANCELLED), 1.5, "", "lease_lost")
    m.attempt_finished("handler", result(pb.ACTION_OUTCOME_FAILED), 0.01, "", "")
    text = generate_latest(m.registry).decode()
    got = samples(text)
    assert got[("plait_workerd_attempts_total", (("kind", "exec"), ("outcome", "succeeded")))] == 1
    assert got[("plait_workerd_attempts_total", (("kind", "exec"), ("outcome", "cancelled")))] == 1
    assert got[("plait_workerd_attempts_total", (("kind", "handler"), ("outcome", "failed")))] == 1
    assert got[("plait_workerd_attempts_total", (("kind", "exec"), ("outcome", "timed_out")))] == 0
    assert got[("plait_workerd_sandbox_kills_total", (("reason", "lease_lost"),))] == 1
    assert got[("plait_workerd_sandbox_kills_total", (("reason", "timeout"),))] == 0
    assert got[("plait_workerd_attempt_duration_seconds_count", (("kind", "exec"),))] == 2
    assert ("plait_workerd_slots", ()) in got and ("plait_workerd_connected", ()) in got
    assert ("plait_workerd_reconnects_total", ()) in got
    assert ("plait_workerd_self_fences_total", ()) in got
    assert any(name == "plait_build_info" for name, _ in got)
    assert "_created" not in text
    om = generate_openmetrics(m.registry).decode()
    assert f'# {{trace_id="{trace_id}"}} 0.3' in om


def test_promtool_check_metrics_is_clean() -> None:
    promtool = required_tool("promtool")
    m = WorkerdMetrics()
    m.attempt_finished("exec", result(pb.ACTION_OUTCOME_TIMED_OUT), 2.0, "ab" * 16, "")
    text = generate_latest(m.registry)
    proc = subprocess.run(
        [promtool, "check", "metrics"], input=text, check=False, capture_output=True, timeout=60
    )
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), (
        proc.stdout.decode() + proc.stderr.decode()
    )


def config(*argv: str):  # type: ignore[no-untyped-def]
    args = build_parser({}).parse_args(["--no-exec", "--handlers", "x:y", *argv])
    return config_from_args(args, {}, detect=lambda: {})


def test_metrics_flags() -> None:
    assert config().metrics_listen is None
    assert config("--metrics-listen", "127.0.0.1:0").metrics_listen == "127.0.0.1:0"
    assert config("--metrics-listen", "[::1]:9464").metrics_listen == "[::1]:9464"
    assert config("--metrics-listen", "off").metrics_listen is None
    public = config("--metrics-listen", "0.0.0.0:9464", "--metrics-public")
    assert public.metrics_public and public.metrics_listen == "0.0.0.0:9464"
    assert config("--log-format", "json").log_format == "json"


def test_non_loopback_metrics_refused_at_start_up_with_exit_2() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "plait.workerd",
            "--coordinator",
            "127.0.0.1:1",
            "--no-exec",
            "--handlers",
            "tests.bench.noop_handlers",
            "--metrics-listen",
            "0.0.0.0:9464",
        ],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "--metrics-listen 0.0.0.0:9464: not a loopback address" in proc.stderr
    assert "--metrics-public" in proc.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "plait.workerd", "--metrics-listen", "nowhere"],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "expected HOST:PORT" in bad.stderr, bad.stderr
