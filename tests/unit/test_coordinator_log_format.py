"""``--log-format`` on the coordinator: parsed, taken from PLAIT_LOG_FORMAT, refused when bad."""

from __future__ import annotations

import pytest

from plait.coordinator import main as coordinator_main
from plait.coordinator.config import parse_args


def test_log_format_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PLAIT_LOG_FORMAT", raising=False)
    assert parse_args([]).log_format == "text"
    assert parse_args(["--log-format", "json"]).log_format == "json"
    monkeypatch.setenv("PLAIT_LOG_FORMAT", "json")
    assert parse_args([]).log_format == "json"
    with pytest.raises(SystemExit) as err:
        parse_args(["--log-format", "xml"])
    assert err.value.code == 2


def test_a_bad_log_format_from_the_environment_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PLAIT_LOG_FORMAT", "xml")
    assert coordinator_main.main([]) == coordinator_main.EXIT_CONFIG
    assert "--log-format (PLAIT_LOG_FORMAT) must be one of text, json" in capsys.readouterr().err
