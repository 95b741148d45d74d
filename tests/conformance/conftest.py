"""Fixtures of the worker conformance suite: the implementation under test and a cluster.

``impl`` is parametrized over :func:`tests.conformance.workers.implementations`, so every test
runs once per implementation (``-k workerd``, ``-k python-sdk``, ``-k typescript`` pick one).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.conformance.workers import Implementation, implementations
from tests.system.harness import Cluster
from tests.system.tcpproxy import TcpProxy


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "impl" in metafunc.fixturenames:
        impls = implementations()
        metafunc.parametrize("impl", impls, ids=[i.name for i in impls], indirect=True)


@pytest.fixture
def impl(request: pytest.FixtureRequest) -> Implementation:
    """The worker implementation under test (skipped, or failed under CI, when not built)."""
    chosen: Implementation = request.param
    chosen.require()
    return chosen


@pytest.fixture
def cluster(tmp_path: Path, impl: Implementation) -> Iterator[Cluster]:
    """A cluster with nothing started; the test starts the coordinator and its workers."""
    if importlib.util.find_spec("plait.coordinator.__main__") is None:
        pytest.skip("plait.coordinator is not installed")
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
    """Attaches the coordinator's and every worker's output to a failing test's report."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, Cluster):
            for title, text in value.log_sections():
                report.sections.append((f"{title} ({report.when})", text))
