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
from tests.tlsfixtures import Pki, pki  # noqa: F401


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


# ---------------------------------------------------------------- credentials

_NO_CREDENTIALS = ("PLAIT_TLS_CA", "PLAIT_TLS_CERT", "PLAIT_TLS_KEY", "PLAIT_TLS_SERVER_NAME")


@pytest.fixture
def pem_files(pki: Pki) -> dict[str, str]:  # noqa: F811
    """A CA, worker w1's certificate and key, and another CA (from the test PKI)."""
    w1 = pki.worker("w1")
    return {
        "ca": str(pki.ca),
        "cert": str(w1.cert),
        "key": str(w1.key),
        "other-ca": str(pki.untrusted_ca),
    }


def test_worker_id_defaults_to_the_certificates(pem_files: dict[str, str]) -> None:
    tls = ["--tls-ca", pem_files["ca"], "--tls-cert", pem_files["cert"]]
    tls += ["--tls-key", pem_files["key"]]
    assert config(tls).worker_id == "w1"
    assert config([*tls, "--id", "w1"]).worker_id == "w1"
    with pytest.raises(ConfigError) as e:
        config([*tls, "--id", "w2"])
    assert "'w2'" in e.value.message and "'w1'" in e.value.message


def test_tls_flags_and_environment(pem_files: dict[str, str]) -> None:
    assert config([]).tls is None
    c = config(
        [
            "--tls-ca",
            pem_files["ca"],
            "--tls-cert",
            pem_files["cert"],
            "--tls-key",
            pem_files["key"],
            "--tls-server-name",
            "coord.internal",
        ]
    )
    assert c.tls is not None
    assert (c.tls.ca, c.tls.cert, c.tls.key, c.tls.server_name) == (
        pem_files["ca"],
        pem_files["cert"],
        pem_files["key"],
        "coord.internal",
    )
    env = {
        "PLAIT_TLS_CA": pem_files["ca"],
        "PLAIT_TLS_CERT": pem_files["cert"],
        "PLAIT_TLS_KEY": pem_files["key"],
        "PLAIT_TLS_SERVER_NAME": "from-env",
    }
    c = config([], env)
    assert c.tls is not None and c.tls.cert == pem_files["cert"]
    assert c.tls.server_name == "from-env"
    # Flags win over the environment.
    c = config(["--tls-ca", pem_files["other-ca"]], env)
    assert c.tls is not None and c.tls.ca == pem_files["other-ca"]


def test_token_from_file_or_environment(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("plait_from-file\nignored second line\n")
    assert config([]).token == ""
    assert config([], {"PLAIT_TOKEN": "plait_env"}).token == "plait_env"
    # The file wins over the environment; the token stays out of the config's repr.
    c = config(["--token-file", str(token_file)], {"PLAIT_TOKEN": "plait_env"})
    assert c.token == "plait_from-file"
    assert "plait_from-file" not in repr(c)


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--tls-cert", "{cert}"], {}, "--tls-cert/--tls-key need --tls-ca"),
        (
            ["--tls-ca", "{ca}", "--tls-cert", "{cert}"],
            {},
            "--tls-cert and --tls-key must be given together",
        ),
        (["--tls-ca", "{missing}"], {}, "--tls-ca {missing}: no such file"),
        ([], {"PLAIT_TLS_CA": "{missing}"}, "--tls-ca {missing}: no such file"),
        (["--token-file", "{missing}"], {}, "--token-file {missing}: No such file"),
        (["--token-file", "{empty}"], {}, "--token-file {empty}: the first line is empty"),
        (
            ["--coordinator", "10.0.0.5:7450"],
            {"PLAIT_TOKEN": "plait_x"},
            "refusing to send a bearer token to 10.0.0.5:7450 without TLS",
        ),
    ],
)
def test_bad_credentials_are_refused_at_start_up(
    argv: list[str],
    env: dict[str, str],
    message: str,
    pem_files: dict[str, str],
    tmp_path: Path,
) -> None:
    (tmp_path / "empty").write_text("\n")
    paths = {**pem_files, "missing": str(tmp_path / "nope.pem"), "empty": str(tmp_path / "empty")}
    argv = [a.format(**paths) for a in argv]
    env = {k: v.format(**paths) for k, v in env.items()}
    with pytest.raises(ConfigError) as info:
        config(argv, env)
    assert message.format(**paths) in info.value.message


def test_token_with_tls_or_to_loopback_is_accepted(pem_files: dict[str, str]) -> None:
    env = {"PLAIT_TOKEN": "plait_x"}
    assert config(["--coordinator", "127.0.0.1:7450,[::1]:7450"], env).token == "plait_x"
    c = config(["--coordinator", "10.0.0.5:7450", "--tls-ca", pem_files["ca"]], env)
    assert c.tls is not None and c.token == "plait_x"


def test_main_exits_2_on_a_token_in_plaintext(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in _NO_CREDENTIALS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PLAIT_TOKEN", "plait_x")
    assert main(["--coordinator", "coord.example:7450"]) == 2
    err = capsys.readouterr().err
    assert "refusing to send a bearer token to coord.example:7450 without TLS" in err
    assert "plait_x" not in err
