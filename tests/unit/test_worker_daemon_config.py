"""plait-workerd configuration: flags, environment, validation (exit 2 naming the flag)."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from plait.errors import ConfigError
from plait.worker import Worker
from plait.workerd.config import (
    WorkerdConfig,
    build_parser,
    config_from_args,
    load_worker,
    parse_backoff,
    parse_clock_offset,
)
from plait.workerd.main import main


def config(argv: list[str], env: dict[str, str] | None = None) -> WorkerdConfig:
    env = env or {}
    return config_from_args(build_parser(env).parse_args(argv), env)


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("1h", 3_600_000),
        ("-1h", -3_600_000),
        ("-90s", -90_000),
        ("250", 250),
        ("-1500", -1500),
        ("+2m", 120_000),
        ("", 0),
        ("1.5s", 1500),
    ],
)
def test_clock_offset(text: str, ms: int) -> None:
    assert parse_clock_offset(text) == ms


def test_clock_offset_rejects_garbage() -> None:
    with pytest.raises(ConfigError, match="PLAIT_CLOCK_OFFSET"):
        parse_clock_offset("soon")


def test_backoff() -> None:
    assert parse_backoff("50ms:1s") == (timedelta(milliseconds=50), timedelta(seconds=1))
    with pytest.raises(ConfigError, match="--reconnect-backoff"):
        parse_backoff("1s")


def test_defaults_and_environment() -> None:
    c = config(
        [],
        {
            "PLAIT_COORDINATOR": "10.0.0.1:9000",
            "PLAIT_WORKER_ID": "w-env",
            "PLAIT_CLOCK_OFFSET": "-1h",
        },
    )
    assert c.coordinator == "10.0.0.1:9000"
    assert c.worker_id == "w-env"
    assert c.clock_offset_ms == -3_600_000
    assert c.slots >= 1 and c.exec_enabled
    assert c.reconnect_initial == timedelta(milliseconds=200)
    assert c.reconnect_max == timedelta(seconds=10)
    # Flags win over the environment.
    assert config(["--coordinator", "h:1"], {"PLAIT_COORDINATOR": "x:2"}).coordinator == "h:1"


def test_flags() -> None:
    c = config(
        [
            "--id",
            "w1",
            "--slots",
            "3",
            "--label",
            "zone=a",
            "--label",
            "gpu=1",
            "--reconnect-backoff",
            "50ms:1s",
            "--log-level",
            "debug",
        ]
    )
    assert (c.worker_id, c.slots, dict(c.labels)) == ("w1", 3, {"zone": "a", "gpu": "1"})
    assert c.log_level == "DEBUG"
    assert c.reconnect_max == timedelta(seconds=1)


def test_resources_and_adaptive_flags() -> None:
    env: dict[str, str] = {}
    args = build_parser(env).parse_args(
        ["--resource", "gpu=2", "--resource", "cpu=3.5", "--resource", "gpu=4"]
    )
    c = config_from_args(args, env, detect=lambda: {"cpu": 8.0, "memory_mb": 16000.0})
    # Flags add to the detected resources or override them; a later flag wins.
    assert dict(c.resources) == {"cpu": 3.5, "memory_mb": 16000.0, "gpu": 4.0}
    assert c.adaptive
    assert not config(["--no-adaptive"]).adaptive
    detected = config([]).resources
    assert detected["cpu"] > 0 and set(detected) <= {"cpu", "memory_mb"}


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--slots", "0"], "--slots"),
        (["--coordinator", "nohost"], "--coordinator"),
        (["--coordinator", "h:99999"], "--coordinator"),
        (["--id", "bad id!"], "--id"),
        (["--label", "novalue"], "--label"),
        (["--reconnect-backoff", "2s:1s"], "--reconnect-backoff"),
        (["--log-level", "chatty"], "--log-level"),
        (["--no-exec"], "--no-exec"),
        (["--resource", "gpu"], "--resource"),
        (["--resource", "gpu=-1"], "--resource"),
        (["--resource", "1gpu=1"], "--resource"),
    ],
)
def test_bad_values_name_the_flag(argv: list[str], flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        config(argv)


def test_main_exits_2_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--slots", "-4"]) == 2
    err = capsys.readouterr()
    assert "--slots" in err.err and err.out == ""


def test_module_entry_point_exit_status() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "plait.workerd", "--coordinator", "x"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "--coordinator" in r.stderr and r.stdout == ""


HANDLERS = """
import plait
worker = plait.Worker()
other = plait.Worker()
not_a_worker = 3

@worker.action("hello")
def hello(ctx):
    return {"hi": ctx.input}
"""


def test_load_worker_from_file_and_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "my_handlers.py"
    f.write_text(HANDLERS)
    w = load_worker(str(f))
    assert isinstance(w, Worker) and set(w.handlers) == {"hello"}
    assert isinstance(load_worker(f"{f}:other"), Worker)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert set(load_worker("my_handlers:worker").handlers) == {"hello"}
    with pytest.raises(ConfigError, match=r"not a plait\.Worker"):
        load_worker(f"{f}:not_a_worker")
    with pytest.raises(ConfigError, match="no such file"):
        load_worker(str(tmp_path / "missing.py"))
    with pytest.raises(ConfigError, match="import failed"):
        load_worker("no_such_module_xyz:worker")
