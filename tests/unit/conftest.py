"""Fixtures for the unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from plait.workerd.exec_executor import ExecExecutor


@pytest.fixture
async def executor(tmp_path: Path) -> AsyncIterator[ExecExecutor]:
    """An exec executor whose attempts run under tmp_path; closed after the test."""
    ex = ExecExecutor(tmp_root=str(tmp_path))
    yield ex
    await ex.aclose()
