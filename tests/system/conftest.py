"""Fixtures for the system tests: a real cluster per test, logs attached to failures."""

from __future__ import annotations

import importlib.util
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.system.harness import Cluster
from tests.system.tcpproxy import TcpProxy


def _require(module: str) -> None:
    # The daemons are built in parallel with these tests; until `python -m <module>` exists
    # there is nothing to run. Once it exists, every failure is real.
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} does not exist yet (`python -m {module.rsplit('.', 1)[0]}`)")


@pytest.fixture
def coordinator_available() -> None:
    _require("plait.coordinator.__main__")


@pytest.fixture
def workerd_available() -> None:
    _require("plait.workerd.__main__")


@pytest.fixture
def cluster(tmp_path: Path, coordinator_available: None) -> Iterator[Cluster]:
    """A cluster with nothing started; the test starts the coordinator and workers it needs."""
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def proxies(cluster: Cluster) -> Iterator[list[TcpProxy]]:
    """Proxies a test opens (``proxies.append(TcpProxy(...).start())``); closed after the
    cluster, so that workers behind them still reach the coordinator while they stop."""
    opened: list[TcpProxy] = []
    try:
        yield opened
    finally:
        try:
            cluster.close()  # idempotent: the cluster fixture's own close is then a no-op
        finally:
            for proxy in opened:
                proxy.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    """Attaches every daemon's captured output to a failing test's report."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, Cluster):
            for title, text in value.log_sections():
                report.sections.append((f"{title} ({report.when})", text))
