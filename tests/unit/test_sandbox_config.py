"""The sandbox's flags: parsing, validation naming the flag, start-up refusals and set-up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from plait.errors import ConfigError
from plait.workerd.config import WorkerdConfig, build_parser, config_from_args
from plait.workerd.main import check_exec_identity, main, prepare_for
from plait.workerd.runas import Identity
from plait.workerd.startup import prepare_exec


def config(argv: list[str]) -> WorkerdConfig:
    return config_from_args(build_parser({}).parse_args(["--id", "w1", *argv]), {})


def test_flags() -> None:
    c = config(
        [
            "--run-as", "62000-62001", "--allow-root", "--rlimit", "file_size=1GiB",
            "--cgroup", "off", "--tmp-root", "/var/tmp/x",
        ]
    )  # fmt: skip
    assert c.run_as is not None
    assert c.run_as.identities == (Identity(62000, 62000), Identity(62001, 62001))
    assert c.allow_root and c.cgroup == "off" and c.tmp_root == "/var/tmp/x"
    assert c.rlimits.caps["file_size_bytes"] == 1 << 30
    assert c.rlimits.caps["processes"] == 1024  # with --run-as
    plain = config([])
    assert plain.run_as is None and not plain.allow_root and plain.cgroup == "auto"
    assert plain.rlimits.caps["processes"] is None


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--run-as", "x:y:z"], "--run-as"),
        (["--rlimit", "stack=1"], "--rlimit"),
        (["--cgroup", "relative/path"], "--cgroup"),
    ],
)
def test_bad_values_name_the_flag(argv: list[str], flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        config(argv)


@pytest.mark.skipif(os.geteuid() != 0, reason="the refusal is of root")
def test_main_refuses_root_without_run_as(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--coordinator", "10.9.9.9:1", "--id", "w1"]) == 2
    err = capsys.readouterr().err
    assert "workerd runs as root" in err and "--run-as" in err and "--allow-root" in err


def test_no_exec_needs_no_identity_check() -> None:
    c = config(["--no-exec", "--handlers", "tests.bench.noop_handlers:worker"])
    assert check_exec_identity(c) == ("", [])


def test_prepare_makes_the_tmp_root_and_refuses_a_shared_one(tmp_path: Path) -> None:
    c = config(["--tmp-root", str(tmp_path / "root"), "--cgroup", "off", "--allow-root"])
    setup = prepare_for(c)
    try:
        assert setup.tmp.path == str(tmp_path / "root")
        assert setup.sandbox.containment == "process group"
        assert "containment: process group" in setup.summary()
        assert any("process group" in w for w in setup.warnings)
        with pytest.raises(ConfigError, match=r"--tmp-root .* in use by another workerd"):
            prepare_for(c)
    finally:
        setup.close()
    # A workerd in another process holds it too (the lock is flock(2), not per process).
    setup = prepare_for(c)
    try:
        done = subprocess.run(
            [sys.executable, "-c", f"import fcntl, os; fd = os.open({str(tmp_path / 'root')!r},"
             " os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)"],
            capture_output=True, text=True, check=False, timeout=30,
        )  # fmt: skip
        assert done.returncode != 0 and "BlockingIOError" in done.stderr
    finally:
        setup.close()


def test_a_bad_cgroup_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--cgroup .*: cannot create cgroups there"):
        prepare_exec(
            worker_id="w1",
            slots=1,
            run_as=None,
            allow_root=True,
            rlimits=config([]).rlimits,
            cgroup=str(tmp_path),  # a plain directory, not a cgroup
            tmp_root=str(tmp_path / "root"),
        )
    # ... and the tmp root it had locked is free again.
    prepare_for(config(["--tmp-root", str(tmp_path / "root"), "--cgroup", "off"])).close()
