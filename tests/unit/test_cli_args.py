"""Argument parsing and the exit codes of `plait` that need no coordinator."""

from __future__ import annotations

import socket
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from plait.cli import local
from plait.cli.main import build_parser, main

GOOD = "name: ok\nactions: [{id: a, run: [true]}]\n"
BAD = "name: bad\nactions:\n  - {id: a, run: [x]}\n  - {id: resize, run: [x], timeout: soon}\n"


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def flows(tmp_path: Path) -> tuple[Path, Path]:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(GOOD)
    bad.write_text(BAD)
    return good, bad


def test_run_defaults() -> None:
    args = build_parser().parse_args(["run", "flow.yaml"])
    assert args.flow == "flow.yaml"
    assert args.workers == 2
    assert args.slots is None
    assert args.handlers == []
    assert args.store == "sqlite:///.plait/plait.db"
    assert args.output == "table"


def test_run_flags() -> None:
    args = build_parser().parse_args(
        [
            "run",
            "f.yaml",
            "--workers",
            "4",
            "--slots",
            "3",
            "--handlers",
            "a:w",
            "b:w",
            "--handlers",
            "c:w",
            "--store",
            "sqlite:////tmp/x.db",
            "-o",
            "json",
        ]
    )
    assert (args.workers, args.slots, args.output) == (4, 3, "json")
    assert args.handlers == ["a:w", "b:w", "c:w"]
    assert args.store == "sqlite:////tmp/x.db"


def test_worker_argv_matches_workerd_flags() -> None:
    config = local.LocalClusterConfig(slots=3, handlers=("examples.handlers:worker", "b.py"))
    assert config.worker_argv(7450, 1) == [
        sys.executable,
        "-m",
        "plait.workerd",
        "--coordinator",
        "127.0.0.1:7450",
        "--id",
        "local-1",
        "--allow-root",
        "--tmp-root",
        ".plait/tmp/local-1",
        "--slots",
        "3",
        "--handlers",
        "examples.handlers:worker",
        "--handlers",
        "b.py",
    ]
    assert "--slots" not in local.LocalClusterConfig().worker_argv(1, 0)


def test_sqlite_path() -> None:
    assert local.sqlite_path("sqlite:///.plait/plait.db") == Path(".plait/plait.db")
    assert local.sqlite_path("sqlite:////tmp/x.db") == Path("/tmp/x.db")
    assert local.sqlite_path("postgresql://h/db") is None


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nope"],
        ["run"],
        ["run", "f.yaml", "--workers", "0"],
        ["run", "f.yaml", "--workers", "two"],
        ["run", "f.yaml", "-o", "yaml"],
        ["submit", "f.yaml", "--wait", "--watch"],
        ["status"],
        ["logs", "ID"],
        ["events", "ID", "--after", "x"],
    ],
)
def test_usage_errors_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2


def test_bad_flow_exits_2_before_anything_starts(
    flows: tuple[Path, Path], capsys: pytest.CaptureFixture[str], closed_port: int
) -> None:
    _, bad = flows
    for argv in (
        ["run", str(bad)],
        ["submit", str(bad), "--coordinator", f"127.0.0.1:{closed_port}"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{bad}: actions[1] (id 'resize'): timeout: expected a duration" in err
    assert main(["run", str(bad.parent / "missing.yaml")]) == 2
    assert "missing.yaml: cannot read" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "wf-1"],
        ["list"],
        ["events", "wf-1"],
        ["events", "wf-1", "--follow"],
        ["logs", "wf-1", "a"],
        ["cancel", "wf-1", "--reason", "x"],
        ["workers"],
        ["drain", "w1"],
    ],
)
def test_unreachable_coordinator_exits_3(
    argv: list[str], closed_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--coordinator", f"127.0.0.1:{closed_port}"]) == 3
    assert f"coordinator at 127.0.0.1:{closed_port} is unreachable" in capsys.readouterr().err


def test_unreachable_from_the_environment(
    flows: tuple[Path, Path], closed_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    good, _ = flows
    monkeypatch.setenv("PLAIT_COORDINATOR", f"127.0.0.1:{closed_port}")
    assert main(["submit", str(good)]) == 3
    assert main(["submit", str(good), "--wait"]) == 3


def test_bad_state_filter_exits_2(closed_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--state", "sleepy", "--coordinator", f"127.0.0.1:{closed_port}"]) == 2
    assert "unknown workflow state 'sleepy'" in capsys.readouterr().err


def test_console_script_exit_codes(flows: tuple[Path, Path], closed_port: int) -> None:
    _, bad = flows
    plait = [sys.executable, "-m", "plait.cli.main"]
    done = subprocess.run(
        [*plait, "run", str(bad)], check=False, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "timeout: expected a duration" in done.stderr
    done = subprocess.run(
        [*plait, "status", "x", "--coordinator", f"127.0.0.1:{closed_port}"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3
    done = subprocess.run(
        [*plait, "--version"], check=False, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.startswith("plait ")


def test_daemons_get_their_arguments_verbatim(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, list[str]] = {}

    def fake_import(name: str) -> types.SimpleNamespace:
        return types.SimpleNamespace(main=lambda argv: seen.setdefault(name, argv) and 7)

    monkeypatch.setattr(local.importlib, "import_module", fake_import)
    assert main(["coordinator", "--listen", "127.0.0.1:0", "--help"]) == 7
    assert main(["workerd", "--coordinator", "h:1", "--id", "w"]) == 7
    assert seen == {
        "plait.coordinator.main": ["--listen", "127.0.0.1:0", "--help"],
        "plait.workerd.main": ["--coordinator", "h:1", "--id", "w"],
    }


def test_missing_daemon_module_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def missing(name: str) -> None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(local.importlib, "import_module", missing)
    assert main(["workerd"]) == 2
    assert "plait.workerd.main is not installed" in capsys.readouterr().err


def test_nothing_but_local_imports_the_daemons() -> None:
    root = Path(__file__).resolve().parents[2] / "clients" / "python" / "plait"
    banned = ("plait.coordinator", "plait.workerd")
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "local.py" or "v1" in path.parts:
            continue
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            code = line.strip()
            if code.startswith(("import ", "from ")) and any(b in code for b in banned):
                offenders.append(f"{path}:{n}: {code}")
            if "import_module(" in code and any(b in code for b in banned):
                offenders.append(f"{path}:{n}: {code}")
    assert offenders == []


# ---------------------------------------------------------------- credentials


class _Seen(Exception):
    """Raised by the stand-in Client once it has recorded how it was built."""


@pytest.fixture
def client_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, dict[str, Any]]]:
    """Replaces the CLI's Client with one that records its arguments and stops the command."""
    from plait.cli import commands

    calls: list[tuple[Any, dict[str, Any]]] = []

    def fake_client(target: Any = None, **kw: Any) -> Any:
        calls.append((target, kw))
        raise _Seen

    monkeypatch.setattr(commands, "Client", fake_client)
    for name in ("PLAIT_TLS_CA", "PLAIT_TLS_CERT", "PLAIT_TLS_KEY", "PLAIT_TLS_SERVER_NAME"):
        monkeypatch.delenv(name, raising=False)
    return calls


def test_tls_flags_reach_the_client(
    client_calls: list[tuple[Any, dict[str, Any]]], tmp_path: Path
) -> None:
    ca, cert, key = (tmp_path / n for n in ("ca.pem", "cert.pem", "key.pem"))
    for f in (ca, cert, key):
        f.write_text("placeholder\n")
    tls_flags = ["--tls-ca", str(ca), "--tls-cert", str(cert), "--tls-key", str(key)]
    tls_flags += ["--tls-server-name", "coord.internal"]
    for argv in (
        [*tls_flags, "--coordinator", "c.example:7450", "status", "wf-1"],
        ["workers", "--coordinator", "c.example:7450", *tls_flags],
    ):
        with pytest.raises(_Seen):
            main(argv)
    for target, kw in client_calls:
        tls = kw["tls"]
        assert target == "c.example:7450"
        assert (tls.ca, tls.cert, tls.key, tls.server_name) == (
            str(ca),
            str(cert),
            str(key),
            "coord.internal",
        )
    # After the command wins over before it.
    other = tmp_path / "other.pem"
    other.write_text("placeholder\n")
    with pytest.raises(_Seen):
        main(["--tls-ca", str(ca), "list", "--tls-ca", str(other)])
    assert client_calls[-1][1]["tls"].ca == str(other)


def test_tls_environment_reaches_the_client(
    client_calls: list[tuple[Any, dict[str, Any]]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("placeholder\n")
    monkeypatch.setenv("PLAIT_TLS_CA", str(ca))
    with pytest.raises(_Seen):
        main(["status", "wf-1"])
    assert client_calls[-1][1]["tls"].ca == str(ca)


def test_bad_tls_flags_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--tls-ca", str(tmp_path / "nope.pem"), "status", "wf-1"]) == 2
    assert f"--tls-ca {tmp_path / 'nope.pem'}: no such file" in capsys.readouterr().err
    assert main(["--tls-cert", str(tmp_path / "c.pem"), "status", "wf-1"]) == 2
    assert "--tls-cert/--tls-key need --tls-ca" in capsys.readouterr().err


def test_token_in_plaintext_beyond_loopback_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("PLAIT_TLS_CA", raising=False)
    monkeypatch.setenv("PLAIT_TOKEN", "plait_secret")
    assert main(["status", "wf-1", "--coordinator", "10.9.8.7:7450"]) == 2
    err = capsys.readouterr().err
    assert "refusing to send a bearer token to 10.9.8.7:7450 without TLS" in err
    assert "plait_secret" not in err
