"""Session-wide test set-up: markers, the subreaper, and the leaked-process fixture.

Every test that starts something must stop it (STYLE.md, "Tests"). The autouse fixture below
enforces that for processes: anything descended from the test process that was not there before
the test and is still alive afterwards fails the test, and is killed so it cannot poison the
next one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

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
