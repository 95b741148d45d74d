"""Workerd's secrets: the --secret allow-list, resolution per attempt, redaction (unit tier).

Real files, FIFOs and symlinks, and real exec attempts through the executor; the only fake is
the attempt context that collects the result (tests/unit/exec_support.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from plait.errors import ConfigError
from plait.exec_rules import MAX_SECRET_BYTES
from plait.v1 import worker_service_pb2 as pb
from plait.worker.executor import FAILED, SUCCEEDED, AttemptResult, Code
from plait.workerd.config import build_parser, config_from_args
from plait.workerd.exec_executor import ExecExecutor
from plait.workerd.main import main
from plait.workerd.secrets import (
    Redactor,
    SecretError,
    SecretStore,
    parse_secret_flag,
    read_secret_file,
)
from tests.unit.exec_support import exec_lease, py, run_lease

MARK = "tok-3e1d5c9a-MARK"


def secret_file(tmp_path: Path, value: str, name: str = "token") -> Path:
    path = tmp_path / name
    path.write_text(value)
    return path


# ----- --secret and start-up -------------------------------------------------------------


def test_flag_syntax() -> None:
    assert str(parse_secret_flag("api=file:/run/api")) == "api=file:/run/api"
    src = parse_secret_flag("db.pass=env:DB_PASS")
    assert (src.name, src.kind, src.ref) == ("db.pass", "env", "DB_PASS")
    for bad in ("api", "api=/run/api", "api=vault:x", "api=file:", "=file:/x", "a b=env:X"):
        with pytest.raises(ConfigError, match="--secret"):
            parse_secret_flag(bad)


def test_start_up_refusals_name_the_flag_and_never_the_value(tmp_path: Path) -> None:
    good = secret_file(tmp_path, MARK)
    cases = {
        "already given": [f"a=file:{good}", "a=env:X"],
        "not set in workerd's environment": ["a=env:NOPE"],
        "No such file": [f"a=file:{tmp_path / 'missing'}"],
        "is not a regular file": [f"a=file:{tmp_path}"],
    }
    for why, items in cases.items():
        with pytest.raises(ConfigError, match="--secret") as err:
            SecretStore.from_flags(items, {"X": MARK})
        assert why in err.value.message
    big = tmp_path / "big"
    big.write_bytes(b"x" * (MAX_SECRET_BYTES + 1))
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe" + MARK.encode())
    for path, why in ((big, "over the"), (binary, "not UTF-8")):
        with pytest.raises(ConfigError, match=why) as err:
            SecretStore.from_flags([f"a=file:{path}"], {})
        assert MARK not in err.value.message
    with pytest.raises(ConfigError, match="NUL"):
        SecretStore.from_flags(["a=env:X"], {"X": "a\0b"})


def test_workerd_exits_2_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--secret", f"api=file:{tmp_path / 'absent'}", "--id", "w1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--secret api=file:" in err and "No such file" in err


def test_config_carries_the_store_and_hides_values(tmp_path: Path) -> None:
    path = secret_file(tmp_path, MARK)
    env = {"API_KEY": MARK + "-env"}
    args = build_parser(env).parse_args(
        ["--secret", f"file-sec=file:{path}", "--secret", "env-sec=env:API_KEY"]
    )
    config = config_from_args(args, env, detect=dict)
    assert config.secrets.names == {"file-sec", "env-sec"}
    assert MARK not in repr(config)


# ----- files ---------------------------------------------------------------------------------


def test_file_rules(tmp_path: Path) -> None:
    assert read_secret_file(str(secret_file(tmp_path, MARK + "\n"))) == MARK  # one newline
    assert read_secret_file(str(secret_file(tmp_path, MARK + "\n\n"))) == MARK + "\n"
    link = tmp_path / "link"
    link.symlink_to(secret_file(tmp_path, MARK, "target"))
    with pytest.raises(ValueError, match="symlink"):
        read_secret_file(str(link))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        read_secret_file(str(fifo))  # returns at once: O_NONBLOCK, nobody writes
    with pytest.raises(ValueError, match="not a regular file"):
        read_secret_file("/dev/zero")


async def test_files_are_read_for_every_attempt(tmp_path: Path) -> None:
    path = secret_file(tmp_path, "first")
    store = SecretStore.from_flags([f"tok=file:{path}"], {})
    env, _ = await store.resolve({"TOKEN": "tok"})
    assert env == {"TOKEN": "first"}
    path.write_text("second")
    env, _ = await store.resolve({"TOKEN": "tok", "AGAIN": "tok"})
    assert env == {"TOKEN": "second", "AGAIN": "second"}
    path.unlink()
    with pytest.raises(SecretError) as err:
        await store.resolve({"TOKEN": "tok"})
    assert "secret 'tok' (for $TOKEN): this worker cannot read it now" in err.value.message
    assert err.value.code == Code.FAILED_PRECONDITION


async def test_env_values_are_captured_at_start_up() -> None:
    environ = {"API_KEY": "at-start"}
    store = SecretStore.from_flags(["api=env:API_KEY"], environ)
    environ["API_KEY"] = "changed later"
    env, _ = await store.resolve({"API": "api"})
    assert env == {"API": "at-start"}


async def test_unknown_secret_and_reserved_variable() -> None:
    store = SecretStore.from_flags(["api=env:API_KEY"], {"API_KEY": MARK})
    with pytest.raises(SecretError) as err:
        await store.resolve({"DB": "db-pass"})
    assert err.value.message.startswith("secret 'db-pass' (for $DB): this worker does not")
    assert err.value.code == Code.FAILED_PRECONDITION
    with pytest.raises(SecretError) as err:
        await store.resolve({"PATH": "api"})
    assert err.value.code == Code.INVALID_ARGUMENT


# ----- redaction -----------------------------------------------------------------------------


def test_redaction_of_text_and_json_forms() -> None:
    r = Redactor({"api": 'p@ss"word', "short": "ab", "empty": ""})
    text = 'x p@ss"word y {"k": "p@ss\\"word"} ab'
    assert r.text(text) == 'x [redacted:api] y {"k": "[redacted:api]"} [redacted:short]'
    assert r.text("") == ""


def test_a_secret_containing_another_is_replaced_whole() -> None:
    r = Redactor({"inner": "abc", "outer": "xxabcxx"})
    assert r.text("xxabcxx abc") == "[redacted:outer] [redacted:inner]"


def test_tails_never_keep_a_cut_value() -> None:
    r = Redactor({"api": MARK})
    # The pipe kept limit + margin bytes, so a value across the cut is still found whole.
    tail = ("z" * 10 + MARK + "y" * 5)[-(8 + r.margin) :]
    out = r.tail(tail, 8)
    assert len(out.encode()) <= 8
    assert not any(MARK[i:] in out for i in range(len(MARK) - 1))


def test_result_is_redacted_and_leaked_outputs_fail() -> None:
    r = Redactor({"api": MARK})
    res = AttemptResult(
        SUCCEEDED,
        outputs_json=json.dumps({"ok": 1}),
        stdout_tail=f"out {MARK}",
        stderr_tail=f"err {MARK}",
    )
    out = r.result(res, 1024)
    assert (out.outcome, out.stdout_tail, out.stderr_tail) == (
        SUCCEEDED,
        "out [redacted:api]",
        "err [redacted:api]",
    )
    leaked = r.result(AttemptResult(SUCCEEDED, outputs_json=json.dumps({"k": MARK})), 1024)
    assert leaked.outcome == FAILED and leaked.outputs_json == ""
    assert "secret 'api'" in leaked.error and MARK not in leaked.error


# ----- through the executor: real processes --------------------------------------------------


def secret_lease(argv: list[str], secrets: dict[str, str]) -> pb.Lease:
    lease = exec_lease(argv)
    lease.action.secrets.update(secrets)
    return lease


async def test_attempt_gets_values_and_reports_them_redacted(tmp_path: Path) -> None:
    path = secret_file(tmp_path, MARK + "-file")
    store = SecretStore.from_flags(
        [f"file-sec=file:{path}", "env-sec=env:ENV_SEC"], {"ENV_SEC": MARK + "-env"}
    )
    ex = ExecExecutor(tmp_root=str(tmp_path), secrets=store)
    try:
        code = """
            import hashlib, json, os, sys
            both = os.environ["FROM_FILE"] + "|" + os.environ["FROM_ENV"]
            print("out", both); print("err", both, file=sys.stderr)
            with open(os.environ["PLAIT_OUTPUT"], "w") as f:
                json.dump({"sha": hashlib.sha256(both.encode()).hexdigest()}, f)
        """
        lease = secret_lease(py(code), {"FROM_FILE": "file-sec", "FROM_ENV": "env-sec"})
        res = await run_lease(ex, lease)
    finally:
        await ex.aclose()
    both = f"{MARK}-file|{MARK}-env"
    assert res.outcome == SUCCEEDED, res
    assert json.loads(res.outputs_json) == {"sha": hashlib.sha256(both.encode()).hexdigest()}
    assert res.stdout_tail == "out [redacted:file-sec]|[redacted:env-sec]\n"
    assert res.stderr_tail == "err [redacted:file-sec]|[redacted:env-sec]\n"


async def test_a_long_chatty_attempt_keeps_no_fragment(tmp_path: Path) -> None:
    store = SecretStore.from_flags(["s=env:S"], {"S": MARK})
    ex = ExecExecutor(tmp_root=str(tmp_path), secrets=store, tail_bytes=64)
    try:
        code = """
            import os, sys
            for i in range(2000):
                sys.stdout.write("." * (i % 7) + os.environ["S"])
        """
        res = await run_lease(ex, secret_lease(py(code), {"S": "s"}))
    finally:
        await ex.aclose()
    assert len(res.stdout_tail.encode()) <= 64
    assert "[redacted:s]" in res.stdout_tail
    assert not any(MARK[i:] in res.stdout_tail for i in range(len(MARK) - 3))


async def test_attempt_naming_an_unknown_secret_fails_before_running(tmp_path: Path) -> None:
    ex = ExecExecutor(tmp_root=str(tmp_path), secrets=SecretStore())
    marker = tmp_path / "ran"
    try:
        lease = secret_lease(["touch", str(marker)], {"TOKEN": "nope"})
        res = await run_lease(ex, lease)
    finally:
        await ex.aclose()
    assert res.outcome == FAILED and res.error_code == Code.FAILED_PRECONDITION
    assert "secret 'nope' (for $TOKEN): this worker does not provide it" in res.error
    assert not marker.exists()
