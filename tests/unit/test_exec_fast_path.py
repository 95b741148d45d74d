"""The exec path's per-attempt savings keep their guarantees (workerd, unit tier).

What each attempt no longer pays for — a keeper wake-up per line, a cgroup.kill of an empty
cgroup, a thread hop for an absent output file, an rmtree walk of a two-file directory — and
what must still hold: the keeper forgets nothing it must not, fences on the latest deadline
even when it arrived during a nap, an emptied cgroup stays dead, symlinks are never followed.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from plait.clock import Clock, ManualClock, SystemClock
from plait.workerd.containment import (
    CgroupTree,
    cgroup_empty,
    join_cgroup,
    kill_cgroup,
    own_cgroup_dir,
    remove_cgroup,
    remove_tree,
)
from plait.workerd.keeper import Keeper, KeeperState, _serve
from plait.workerd.outputs import output_exists

# ----- the keeper client: fewer writes ----------------------------------------------------------


@pytest.fixture
def recorded() -> Iterator[tuple[Keeper, list[bytes]]]:
    keeper = Keeper()
    keeper.start()
    writes: list[bytes] = []
    real_write = keeper._write

    def recording(data: bytes) -> None:
        writes.append(data)
        real_write(data)

    keeper._write = recording  # type: ignore[method-assign]
    try:
        yield keeper, writes
    finally:
        keeper.close()


def test_removals_wait_for_the_next_write_or_a_flush(
    recorded: tuple[Keeper, list[bytes]], tmp_path: Path
) -> None:
    keeper, writes = recorded
    keeper.register_dir(str(tmp_path / "a"))
    assert writes == [f"+d {tmp_path / 'a'}\n".encode()], "a registration goes out at once"
    keeper.unregister_dir(str(tmp_path / "a"))
    keeper.unregister_cgroup("/sys/fs/cgroup/x")
    assert len(writes) == 1, "removals are held back"
    keeper.register_dir(str(tmp_path / "b"))  # the next write carries them first, in order
    assert writes[1] == (
        f"-d {tmp_path / 'a'}\n-c /sys/fs/cgroup/x\n+d {tmp_path / 'b'}\n".encode()
    )
    keeper.unregister_dir(str(tmp_path / "b"))
    keeper.flush()
    assert writes[2:] == [f"-d {tmp_path / 'b'}\n".encode()]
    keeper.flush()
    assert len(writes) == 3, "nothing held back: no write"


def test_a_batch_registers_in_one_write(
    recorded: tuple[Keeper, list[bytes]], tmp_path: Path
) -> None:
    keeper, writes = recorded
    with keeper.batch():
        keeper.register_dir(str(tmp_path / "d"))
        keeper.register_cgroup("/sys/fs/cgroup/y")
        assert writes == []
    assert writes == [f"+d {tmp_path / 'd'}\n+c /sys/fs/cgroup/y\n".encode()]


def test_close_sends_the_held_back_removals_before_eof(tmp_path: Path) -> None:
    # The keeper removes every directory still registered at EOF: one workerd unregistered
    # (its removal held back) must survive, e.g. a new directory at the same path.
    keeper = Keeper()
    keeper.start()
    gone, kept = tmp_path / "gone", tmp_path / "kept"
    gone.mkdir()
    kept.mkdir()
    keeper.register_dir(str(gone))
    keeper.register_dir(str(kept))
    keeper.unregister_dir(str(kept))
    keeper.close()
    assert not gone.exists(), "a registered directory is removed at EOF"
    assert kept.exists(), "a held-back removal was lost: the keeper removed a live directory"


# ----- the keeper program: naps between reads ---------------------------------------------------


class _Recording(KeeperState):
    def __init__(self) -> None:
        super().__init__()
        self.fired: list[float] = []

    def fence(self) -> None:
        self.fired.append(time.monotonic())  # real time: the on-time test reads it
        self.deadline = None  # nothing real is registered: kill nothing


def _serve_in_thread(
    state: KeeperState, nap: Callable[[float], None], clock: Clock
) -> tuple[int, threading.Thread]:
    """The keeper's loop on a pipe in a thread; returns the pipe's write end."""
    read_end, write_end = os.pipe()

    def serve() -> None:
        try:
            _serve(state, read_end, clock, nap)
        finally:
            os.close(read_end)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return write_end, thread


def test_a_deadline_moved_during_a_nap_is_read_before_the_fence_is_judged() -> None:
    clock = ManualClock()
    state = _Recording()
    naps: list[float] = []
    write_end = -1

    def nap(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) == 1:
            # workerd moves the fence while the keeper naps, and the old deadline passes.
            os.write(write_end, f"+f {clock.monotonic() + 3600!r}\n".encode())
            clock.advance(2.0)
        else:
            os.close(write_end)  # then workerd exits

    write_end, thread = _serve_in_thread(state, nap, clock)
    os.write(write_end, f"+c /nonexistent/plait-unit\n+f {clock.monotonic() + 1.0!r}\n".encode())
    thread.join(10)
    assert not thread.is_alive(), "EOF ends the keeper's loop"
    assert naps[0] == pytest.approx(0.01), "a nap is short"
    assert state.fired == [], "fenced on a deadline that had already moved"


def test_a_nap_never_runs_past_the_fence_deadline() -> None:
    clock = ManualClock()
    state = _Recording()
    naps: list[float] = []
    write_end = -1

    def nap(seconds: float) -> None:
        naps.append(seconds)
        clock.advance(seconds)
        if len(naps) == 2:
            os.close(write_end)

    write_end, thread = _serve_in_thread(state, nap, clock)
    os.write(write_end, f"+c /nonexistent/plait-unit\n+f {clock.monotonic() + 0.004!r}\n".encode())
    assert _wait(lambda: bool(state.fired))
    os.write(write_end, b"-c /nonexistent/plait-unit\n")  # wakes it for its second nap
    thread.join(10)
    assert naps[0] == pytest.approx(0.004), "the first nap ends at the deadline"
    assert len(state.fired) == 1


def test_the_fence_still_fires_on_time_while_lines_keep_coming() -> None:
    state = _Recording()
    write_end, thread = _serve_in_thread(state, time.sleep, SystemClock())
    deadline = time.monotonic() + 0.2
    os.write(write_end, f"+c /nonexistent/plait-unit\n+f {deadline!r}\n".encode())
    end = deadline + 0.3
    while time.monotonic() < end and not state.fired:  # a steady stream of other lines
        os.write(write_end, b"+d /nonexistent/x\n-d /nonexistent/x\n")
        time.sleep(0.002)
    os.close(write_end)
    thread.join(10)
    assert len(state.fired) == 1
    assert deadline <= state.fired[0] <= deadline + 0.25


def _wait(probe: Callable[[], bool], limit: float = 10.0) -> bool:
    end = time.monotonic() + limit
    while not probe():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


# ----- attempt directories and outputs ----------------------------------------------------------


def test_a_flat_attempt_directory_goes_without_following_symlinks(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    attempt = tmp_path / "plait-attempt-x"
    attempt.mkdir()
    (attempt / "plait-inputs.json").write_text("{}")
    (attempt / "link").symlink_to(outside)
    (attempt / "dirlink").symlink_to(tmp_path)
    assert remove_tree(str(attempt))
    assert not attempt.exists() and outside.read_text() == "keep me"


def test_a_deeper_or_linked_attempt_directory_takes_the_full_path(tmp_path: Path) -> None:
    attempt = tmp_path / "plait-attempt-y"
    (attempt / "sub" / "deeper").mkdir(parents=True)
    (attempt / "sub" / "deeper" / "f").write_text("x")
    assert remove_tree(str(attempt)) and not attempt.exists()
    target = tmp_path / "target"
    target.mkdir()
    (target / "f").write_text("x")
    link = tmp_path / "plait-attempt-z"
    link.symlink_to(target)
    assert remove_tree(str(link))
    assert not link.exists() and (target / "f").exists(), "the link went, not what it names"


def test_output_exists_sees_any_kind_of_entry(tmp_path: Path) -> None:
    path = tmp_path / "plait-output.json"
    assert not output_exists(str(path))
    path.symlink_to(tmp_path / "missing")  # a dangling link still counts: it must be refused
    assert output_exists(str(path))


# ----- cgroups: no cgroup.kill for an empty cgroup ----------------------------------------------


def _cgroup_base() -> str | None:
    base = own_cgroup_dir()
    return base if base is not None and os.access(base, os.W_OK) else None


@pytest.mark.skipif(_cgroup_base() is None, reason="no writable cgroup v2 here")
def test_kill_cgroup_kills_a_populated_cgroup_and_leaves_an_empty_one() -> None:
    base = _cgroup_base()
    assert base is not None
    tree = CgroupTree.create(base, f"plait-unit-fast-{os.getpid()}")
    try:
        path = tree.new_attempt()
        kill_cgroup(path)  # empty: nothing to do, and no error
        assert cgroup_empty(path)
        child = subprocess.Popen(
            ["/bin/sh", "-c", "read -r _; exec sleep 300"],
            stdin=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            join_cgroup(path, child.pid)
            assert not cgroup_empty(path)
            kill_cgroup(path)
            assert child.wait(10) == -9
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            assert child.stdin is not None
            child.stdin.close()
        assert remove_cgroup(path)
    finally:
        tree.close()
