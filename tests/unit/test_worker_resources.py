"""Resource detection for Hello.resources, from injected /proc and /sys text."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from plait.worker.resources import (
    cgroup_cpu_limit,
    cgroup_memory_limit_mb,
    detect_resources,
    merge_resources,
    parse_resource,
)

MEMINFO = """MemTotal:       16384000 kB
MemFree:         1000000 kB
MemAvailable:    8192000 kB
"""


def reader(table: dict[str, str]) -> Callable[[str], str | None]:
    return table.get


def test_no_cgroup_limits_uses_cpu_count_and_memtotal() -> None:
    table = {"/proc/meminfo": MEMINFO, "/proc/self/cgroup": "0::/user.slice\n"}
    got = detect_resources(reader(table), cpu_count=lambda: 8)
    assert got == {"cpu": 8.0, "memory_mb": 16000.0}


def test_cgroup_v2_quota_and_memory_max_up_the_tree() -> None:
    table = {
        "/proc/meminfo": MEMINFO,
        "/proc/self/cgroup": "0::/kubepods/pod1/ctr\n",
        "/sys/fs/cgroup/kubepods/pod1/ctr/cpu.max": "max 100000\n",
        "/sys/fs/cgroup/kubepods/pod1/cpu.max": "150000 100000\n",
        "/sys/fs/cgroup/kubepods/cpu.max": "400000 100000\n",
        "/sys/fs/cgroup/kubepods/pod1/ctr/memory.max": str(2048 << 20) + "\n",
        "/sys/fs/cgroup/kubepods/memory.max": "max\n",
    }
    assert cgroup_cpu_limit(reader(table)) == 1.5
    assert cgroup_memory_limit_mb(reader(table)) == 2048
    got = detect_resources(reader(table), cpu_count=lambda: 8)
    assert got == {"cpu": 1.5, "memory_mb": 2048.0}


def test_a_quota_above_the_cpu_count_and_a_limit_above_memtotal_change_nothing() -> None:
    table = {
        "/proc/meminfo": MEMINFO,
        "/proc/self/cgroup": "0::/\n",
        "/sys/fs/cgroup/cpu.max": "3200000 100000\n",
        "/sys/fs/cgroup/memory.max": str(1 << 40),
    }
    assert detect_resources(reader(table), cpu_count=lambda: 4) == {
        "cpu": 4.0,
        "memory_mb": 16000.0,
    }


def test_cgroup_v1() -> None:
    table = {
        "/proc/meminfo": MEMINFO,
        "/proc/self/cgroup": "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n",
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "200000\n",
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes": str(512 << 20),
    }
    assert detect_resources(reader(table), cpu_count=lambda: 16) == {
        "cpu": 2.0,
        "memory_mb": 512.0,
    }
    # v1's "unlimited" is a huge number, and a quota of -1 means none.
    table["/sys/fs/cgroup/memory/memory.limit_in_bytes"] = "9223372036854771712"
    table["/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us"] = "-1"
    assert detect_resources(reader(table), cpu_count=lambda: 16) == {
        "cpu": 16.0,
        "memory_mb": 16000.0,
    }


def test_nothing_readable_still_gives_cpu() -> None:
    assert detect_resources(reader({}), cpu_count=lambda: 2) == {"cpu": 2.0}


def test_detects_this_host() -> None:
    got = detect_resources()
    assert got["cpu"] > 0 and got.get("memory_mb", 1) > 0


def test_parse_resource_and_merge() -> None:
    assert parse_resource("gpu=2") == ("gpu", 2.0)
    assert parse_resource("memory_mb=1024.5") == ("memory_mb", 1024.5)
    for bad, why in [
        ("gpu", "NAME=N"),
        ("=2", "NAME=N"),
        ("9gpu=1", "bad name"),
        ("gpu=lots", "not a number"),
        ("gpu=-1", ">= 0"),
        ("gpu=inf", "finite"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_resource(bad)
    detected = {"cpu": 8.0, "memory_mb": 1000.0}
    assert merge_resources(detected, {"gpu": 2, "cpu": 4}) == {
        "cpu": 4,
        "memory_mb": 1000.0,
        "gpu": 2,
    }
