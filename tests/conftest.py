"""Session-wide test set-up: markers, the subreaper, and the leak fixtures.

Every test that starts something must stop it (STYLE.md, "Tests"). The fixtures below enforce
that for

- processes: anything descended from the test process that was not there before the test and
  is still alive afterwards fails the test, and is killed so it cannot poison the next one;
- gRPC channels: every channel made through ``grpc.insecure_channel``/``secure_channel`` or
  their ``grpc.aio`` twins during the test must be closed by its end (a leftover is closed);
- asyncio tasks: an async test's loop must have no task left pending once the test and its
  fixtures are done (a leftover is cancelled).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import grpc.aio
import pytest
import pytest_asyncio
from pytest_asyncio import is_async_test

from tests import procs

# A process that exits within this long after its test is slow, not leaked.
_LEAK_GRACE_S = 2.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "system: starts real coordinator and workerd subprocesses")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    # Orphans (e.g. an action whose workerd was SIGKILLed) are re-parented to us, so the
    # PPid walk below still sees them.
    procs.become_subreaper()


def _live_descendants() -> dict[tuple[int, int], procs.Proc]:
    return {p.key: p for p in procs.descendants(os.getpid()) if p.alive}


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """Fails the test when a process it started (or any descendant) outlives it."""
    before = set(_live_descendants())
    yield
    deadline = time.monotonic() + _LEAK_GRACE_S
    while True:
        leaked = [p for k, p in _live_descendants().items() if k not in before]
        if not leaked or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    lines = "\n  ".join(p.describe() for p in leaked)
    procs.kill_procs(leaked)
    procs.reap_adopted_zombies()
    if leaked:
        pytest.fail(f"test leaked {len(leaked)} process(es) (now killed):\n  {lines}")


# ----- gRPC channels ---------------------------------------------------------------------------

_CHANNEL_FACTORIES = (
    (grpc, "insecure_channel"),
    (grpc, "secure_channel"),
    (grpc.aio, "insecure_channel"),
    (grpc.aio, "secure_channel"),
)


class _ChannelTracker:
    """Every channel the patched factories made, with a way to tell whether it was closed."""

    def __init__(self) -> None:
        self.made: list[tuple[str, Any, Callable[[], bool]]] = []

    def wrap(self, module: Any, name: str) -> Callable[..., Any]:
        factory = getattr(module, name)

        def make(target: str, *args: Any, **kwargs: Any) -> Any:
            channel = factory(target, *args, **kwargs)
            label = f"{module.__name__}.{name}({target!r})"
            if isinstance(channel, grpc.aio.Channel):
                aio_channel: Any = channel
                self.made.append((label, channel, lambda: bool(aio_channel._channel.closed())))
                return channel
            # A sync channel has no "closed" flag: close() and __exit__ both go through
            # _close, which an instance attribute shadows.
            closed = [False]
            close = channel._close

            def tracked_close() -> None:
                closed[0] = True
                close()

            channel._close = tracked_close
            self.made.append((label, channel, lambda: closed[0]))
            return channel

        return make

    def unclosed(self) -> list[tuple[str, Any]]:
        return [(label, ch) for label, ch, is_closed in self.made if not is_closed()]


@pytest.fixture(autouse=True)
def no_leaked_channels() -> Iterator[None]:
    """Fails the test when a gRPC channel it opened is still open afterwards (then closes it)."""
    tracker = _ChannelTracker()
    originals = [(module, name, getattr(module, name)) for module, name in _CHANNEL_FACTORIES]
    for module, name, _ in originals:
        setattr(module, name, tracker.wrap(module, name))
    try:
        yield
    finally:
        for module, name, original in originals:
            setattr(module, name, original)
    leaked = tracker.unclosed()
    for _, channel in leaked:
        if isinstance(channel, grpc.aio.Channel):
            # Its loop is gone with the test: close the core channel directly.
            core: Any = channel._channel  # type: ignore[attr-defined]
            core.close()
        else:
            channel.close()
    if leaked:
        lines = "\n  ".join(label for label, _ in leaked)
        pytest.fail(f"test left {len(leaked)} gRPC channel(s) open (now closed):\n  {lines}")


# ----- asyncio tasks -------------------------------------------------------------------------

# A task cancelled or finishing as the test ends gets this long to be done.
_TASK_GRACE_S = 2.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Only async tests run in a loop whose tasks can outlive them; the fixture goes first, so
    # its teardown runs after every other fixture of the test has stopped what it started.
    for item in items:
        if is_async_test(item):
            item.fixturenames.insert(0, "no_leaked_tasks")


@pytest_asyncio.fixture
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Fails an async test that leaves tasks pending in its loop (then cancels them)."""
    before = asyncio.all_tasks()
    yield
    # The teardown runs in a task of its own (not the set-up's).
    mine = asyncio.current_task()
    pending = {t for t in asyncio.all_tasks() if t is not mine and t not in before}
    if pending:
        _, pending = await asyncio.wait(pending, timeout=_TASK_GRACE_S)
    if not pending:
        return
    lines = "\n  ".join(sorted(repr(t) for t in pending))
    for task in pending:
        task.cancel()
    await asyncio.wait(pending, timeout=_TASK_GRACE_S)
    pytest.fail(f"test left {len(pending)} asyncio task(s) pending (now cancelled):\n  {lines}")
