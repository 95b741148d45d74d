"""Rlimits: the worker's caps (``--rlimit``), an action's own within them, and prlimit."""

from __future__ import annotations

import resource
import subprocess

import pytest

from plait.errors import ConfigError
from plait.v1 import workflow_pb2
from plait.workerd.rlimits import (
    UNLIMITED,
    Rlimits,
    find_prlimit,
    parse_rlimit_flags,
    prlimit_argv,
)


def test_defaults() -> None:
    caps = Rlimits.defaults(run_as=True).caps
    assert caps == {
        "processes": 1024,
        "address_space_bytes": 16 << 30,
        "file_size_bytes": 128 << 20,
        "open_files": 4096,
        "cpu_seconds": UNLIMITED,
    }
    # RLIMIT_NPROC counts every process of the uid: only a bound with a uid of its own.
    assert Rlimits.defaults(run_as=False).caps["processes"] is None


def test_flags_override_the_defaults() -> None:
    limits = parse_rlimit_flags(
        ["file_size=1GiB", "cpu=10m", "open_files=512", "address_space=unlimited"],
        run_as=True,
        privileged=True,
    )
    assert limits.caps["file_size_bytes"] == 1 << 30
    assert limits.caps["cpu_seconds"] == 600
    assert limits.caps["open_files"] == 512
    assert limits.caps["address_space_bytes"] == UNLIMITED
    assert limits.describe() == (
        "processes=1024 address_space=unlimited file_size=1GiB open_files=512 cpu=600s"
    )


@pytest.mark.parametrize(
    ("item", "words"),
    [
        ("stack=1", "NAME one of processes, address_space, file_size, open_files, cpu"),
        ("open_files", "expected NAME=VALUE"),
        ("open_files=many", "--rlimit open_files: expected a whole number or 'unlimited'"),
        ("file_size=lots", "--rlimit file_size: expected a size"),
        ("cpu=1.5s", "whole seconds"),
        ("processes=0", "must be from 1"),
    ],
)
def test_bad_flags_name_the_flag(item: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_rlimit_flags([item], run_as=True, privileged=True)
    assert words in info.value.message


def test_without_privilege_a_value_above_our_own_hard_limit_is_refused() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with pytest.raises(ConfigError, match="above workerd's own hard limit"):
        parse_rlimit_flags([f"open_files={hard + 1}"], run_as=False, privileged=False)
    if hard < 4096:  # a default above it is lowered instead
        limits = parse_rlimit_flags([], run_as=False, privileged=False)
        assert limits.caps["open_files"] == hard


def test_an_action_within_the_caps_gets_its_own_values() -> None:
    asked = workflow_pb2.ExecLimits(open_files=100, cpu_seconds=30)
    got = Rlimits.defaults(run_as=True).for_action(asked)
    assert got == {
        resource.RLIMIT_CORE: 0,
        resource.RLIMIT_NPROC: 1024,
        resource.RLIMIT_AS: 16 << 30,
        resource.RLIMIT_FSIZE: 128 << 20,
        resource.RLIMIT_NOFILE: 100,
        resource.RLIMIT_CPU: 30,
    }
    # Without --run-as the processes limit is workerd's own, not set, unless asked for.
    plain = Rlimits.defaults(run_as=False)
    assert resource.RLIMIT_NPROC not in plain.for_action(None)
    assert plain.for_action(workflow_pb2.ExecLimits(processes=64))[resource.RLIMIT_NPROC] == 64  # type: ignore[index]


def test_an_action_above_a_cap_names_the_field_and_the_cap() -> None:
    asked = workflow_pb2.ExecLimits(file_size_bytes=1 << 30)
    problem = Rlimits.defaults(run_as=True).for_action(asked)
    assert problem == (
        "rlimits.file_size: 1GiB is above this worker's cap of 128MiB"
        " (workerd --rlimit file_size=...)"
    )
    capped = parse_rlimit_flags(["cpu=60"], run_as=True, privileged=True)
    problem = capped.for_action(workflow_pb2.ExecLimits(cpu_seconds=61))
    assert (
        problem == "rlimits.cpu: 61s is above this worker's cap of 60s (workerd --rlimit cpu=...)"
    )


def test_prlimit_sets_soft_and_hard_on_the_command() -> None:
    prlimit = find_prlimit()
    if prlimit is None:
        pytest.skip("util-linux prlimit is not installed")
    limits = {resource.RLIMIT_NOFILE: 77, resource.RLIMIT_CORE: 0, resource.RLIMIT_CPU: UNLIMITED}
    argv = prlimit_argv(prlimit, limits)
    assert argv[1:] == ["--nofile=77:77", "--core=0:0", "--cpu=unlimited:unlimited", "--"]
    out = subprocess.run(
        [*argv, "/bin/sh", "-c", "ulimit -Sn; ulimit -Hn; ulimit -c"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split()
    assert out == ["77", "77", "0"]
