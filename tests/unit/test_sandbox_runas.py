"""``--run-as`` pools and the start-up refusals of root and the coordinator's uid."""

from __future__ import annotations

import grp
import os
import pwd
import socket
from pathlib import Path

import pytest

from plait.errors import ConfigError
from plait.workerd.runas import (
    Identity,
    UidPool,
    exec_identity_problems,
    listener_uids,
    parse_run_as,
)


def fake_user(name: str) -> pwd.struct_passwd:
    if name != "builder":
        raise KeyError(name)
    return pwd.struct_passwd(("builder", "x", 1500, 1600, "", "/", "/bin/sh"))


def fake_group(name: str) -> grp.struct_group:
    if name != "builds":
        raise KeyError(name)
    return grp.struct_group(("builds", "x", 1700, []))


def parse(spec: str) -> list[tuple[int, int]]:
    run_as = parse_run_as(spec, getpwnam=fake_user, getgrnam=fake_group)
    return [(i.uid, i.gid) for i in run_as.identities]


@pytest.mark.parametrize(
    ("spec", "identities"),
    [
        ("1001", [(1001, 1001)]),  # a numeric uid needs no passwd entry; gid = uid
        ("1001:2000", [(1001, 2000)]),
        ("builder", [(1500, 1600)]),  # a name brings its primary group
        ("builder:builds", [(1500, 1700)]),
        ("builder:42", [(1500, 42)]),
        ("62000-62002", [(62000, 62000), (62001, 62001), (62002, 62002)]),
        ("62000-62001, 7000, 62001", [(62000, 62000), (62001, 62001), (7000, 7000)]),
    ],
)
def test_run_as_forms(spec: str, identities: list[tuple[int, int]]) -> None:
    assert parse(spec) == identities


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("nobody-here", "no user 'nobody-here'"),
        ("builder:nogroup", "no group 'nogroup'"),
        ("62002-62000", "ends before it starts"),
        ("1-70000", "over 65536 uids"),
        ("1001,,1002", "empty item"),
        ("1001:", "is not USER, UID"),
        ("4294967295", "above 4294967294"),
    ],
)
def test_bad_run_as_names_the_flag(spec: str, words: str) -> None:
    with pytest.raises(ConfigError, match="--run-as") as info:
        parse(spec)
    assert words in info.value.message


def test_pool_hands_out_free_uids_first_then_shares_the_least_used() -> None:
    pool = UidPool(parse_run_as("100-101"))
    a, b = pool.acquire(), pool.acquire()
    assert {a, b} == {Identity(100, 100), Identity(101, 101)}
    pool.attach(a, 11)
    pool.attach(b, 12)
    c = pool.acquire()  # the pool is smaller than the slots: shared
    pool.attach(c, 13)
    assert pool.holders(c) == 2
    assert pool.live_groups(c) == {11 if c == a else 12, 13}
    pool.release(c, 13)
    pool.release(a, 11)
    assert pool.acquire() == a  # free again


def refusal(**kw: object) -> tuple[str, list[str]]:
    args: dict[str, object] = {
        "coordinators": ("10.0.0.5:7450",),
        "run_as": None,
        "allow_root": False,
        "euid": 1000,
        "can_switch_users": True,
        "find_listeners": lambda port: set(),
    }
    args.update(kw)
    return exec_identity_problems(**args)  # type: ignore[arg-type]


def test_root_without_run_as_is_refused_unless_allowed() -> None:
    problem, _ = refusal(euid=0)
    assert "workerd runs as root" in problem
    assert "--run-as" in problem and "--allow-root" in problem
    assert refusal(euid=0, allow_root=True) == ("", [])
    assert refusal(euid=0, run_as=parse_run_as("62000-62001")) == ("", [])


def test_run_as_root_is_refused_unless_allowed() -> None:
    problem, _ = refusal(euid=0, run_as=parse_run_as("62000,0"))
    assert "--run-as 62000,0: 0:0 is root's uid" in problem and "--allow-root" in problem
    problem, _ = refusal(euid=0, run_as=parse_run_as("62000:0"))
    assert "root's gid" in problem
    assert refusal(euid=0, run_as=parse_run_as("0"), allow_root=True)[0] == ""


def test_run_as_without_the_privilege_to_switch_users() -> None:
    problem, _ = refusal(run_as=parse_run_as("62000"), can_switch_users=False)
    assert "--run-as needs root" in problem


def test_a_loopback_coordinator_of_the_exec_uid_is_refused() -> None:
    owners = {7450: {1000}}
    problem, _ = refusal(
        coordinators=("127.0.0.1:7450",), find_listeners=lambda port: owners.get(port, set())
    )
    assert "the coordinator at 127.0.0.1:7450 runs as uid 1000" in problem
    assert "--run-as" in problem and "--allow-root" in problem
    # A pool uid that is the coordinator's is refused too; other uids are fine.
    problem, _ = refusal(
        coordinators=("[::1]:7450",),
        run_as=parse_run_as("999-1000"),
        find_listeners=lambda port: {1000},
    )
    assert "runs as uid 1000" in problem
    assert refusal(coordinators=("localhost:7450",), find_listeners=lambda port: {0}) == ("", [])
    # Not loopback: its uid cannot be known (nor is it on this host).
    assert refusal(coordinators=("10.0.0.5:7450",), find_listeners=lambda port: {1000})[0] == ""


def test_a_coordinator_not_listening_yet_is_a_warning() -> None:
    problem, warnings = refusal(coordinators=("127.0.0.1:7450",))
    assert problem == ""
    assert len(warnings) == 1 and "cannot tell which uid" in warnings[0]


def test_listener_uids_reads_proc_net_tcp(tmp_path: Path) -> None:
    # A real listening socket, found in the real table with our uid.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert listener_uids(port) == {os.geteuid()}
    assert listener_uids(port) == set()
    # IPv6 loopback and wildcard rows, one of them not listening.
    table = tmp_path / "tcp6"
    table.write_text(
        "  sl  local_address                         remote_address ...\n"
        "   0: 00000000000000000000000001000000:1D1E 00000000000000000000000000000000:0000 0A"
        " 00000000:00000000 00:00000000 00000000  1234        0 1 1 0\n"
        "   1: 00000000000000000000000000000000:1D1E 00000000000000000000000000000000:0000 0A"
        " 00000000:00000000 00:00000000 00000000  4321        0 1 1 0\n"
        "   2: 0000000000000000FFFF00000100007F:1D1E 0000000000000000FFFF00000100007F:9999 01"
        " 00000000:00000000 00:00000000 00000000  5555        0 1 1 0\n"
        "   3: 0000000000000000FFFF0000050000AC:1D1E 00000000000000000000000000000000:0000 0A"
        " 00000000:00000000 00:00000000 00000000  6666        0 1 1 0\n"
    )
    assert listener_uids(7454, [str(table)]) == {1234, 4321}
