"""deploy/prometheus: the rules are valid, their unit tests pass, and every alert is tested.

``promtool check rules`` and ``promtool check config`` validate rules.yml and the example
prometheus.yml; ``promtool test rules rules_test.yml`` runs the unit tests (input series,
expected alerts with labels and annotations). Every alert must have at least one case where it
fires and one where it must not. Skipped where promtool is missing; under CI (``CI`` set) that
is a failure instead: ``.ci/run`` installs Debian's ``prometheus`` package.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.tools import required_tool

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "rules.yml"
RULES_TEST = PROMETHEUS_DIR / "rules_test.yml"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"


@pytest.fixture(scope="module")
def promtool() -> str:
    return required_tool("promtool")


def run(promtool: str, *args: str, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=60
    )


def alerts(rules: dict[str, Any]) -> list[str]:
    return [r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r]


def test_rules_are_valid(promtool: str) -> None:
    done = run(promtool, "check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr


def test_example_config_is_valid(promtool: str) -> None:
    done = run(promtool, "check", "config", str(CONFIG))
    assert done.returncode == 0, done.stdout + done.stderr


def test_rule_unit_tests_pass(promtool: str) -> None:
    done = run(promtool, "test", "rules", str(RULES_TEST))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    names = alerts(yaml.safe_load(RULES.read_text()))
    assert len(names) == len(set(names)), f"duplicate alert names: {names}"
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert not set(names) - fires, f"alerts never tested firing: {sorted(set(names) - fires)}"
    assert not set(names) - quiet, f"alerts never tested quiet: {sorted(set(names) - quiet)}"
    required = {
        "PlaitLeaseLossesHigh",
        "PlaitSupersededResults",
        "PlaitWorkerClockOffsetLarge",
        "PlaitJournalCommitSlow",
        "PlaitNoLeader",
        "PlaitAllWorkersGone",
        "PlaitWorkersDropped",
        "PlaitInternalErrors",
        "PlaitCoreRebuilt",
    }
    assert required <= set(names), f"missing alerts: {sorted(required - set(names))}"


def test_the_unit_tests_catch_a_changed_threshold(promtool: str, tmp_path: Path) -> None:
    """promtool test rules can fail: with the clock-offset threshold doubled, the case where
    that alert must fire fails."""
    rules = RULES.read_text()
    threshold = "(abs(plait_worker_clock_offset_seconds)) > 0.25"
    assert threshold in rules
    (tmp_path / "rules.yml").write_text(
        rules.replace(threshold, "(abs(plait_worker_clock_offset_seconds)) > 0.5")
    )
    shutil.copy(RULES_TEST, tmp_path / "rules_test.yml")
    done = run(promtool, "test", "rules", "rules_test.yml", cwd=tmp_path)
    assert done.returncode != 0, done.stdout
    assert "PlaitWorkerClockOffsetLarge" in done.stdout + done.stderr
