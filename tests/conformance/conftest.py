"""Fixtures of the worker conformance suite: the implementation under test and a cluster.

``impl`` is parametrized over :func:`tests.conformance.workers.implementations`, so every test
runs once per implementation (``-k workerd``, ``-k python-sdk``, ``-k typescript`` pick one).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance.workers import Implementation, implementations
from tests.system.conftest import proxies, pytest_runtest_makereport
from tests.system.harness import Cluster

# The system suite's proxy fixture and failure-report hook serve this suite too.
__all__ = ["proxies", "pytest_runtest_makereport"]


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
