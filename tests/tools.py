"""External programs some tests need (Debian packages .ci/run installs).

A test that needs one skips when it is missing on a developer's machine and fails under CI
(``CI`` set), where .ci/run must have installed it: a missing tool never passes silently there.
"""

from __future__ import annotations

import os
import shutil

import pytest

PACKAGE = {"promtool": "prometheus", "prometheus": "prometheus"}


def required_tool(name: str) -> str:
    """The path of ``name``; skips the test (fails it under CI) when it is not installed."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not installed (apt-get install -y {PACKAGE.get(name, name)})"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; .ci/run must install it")
    pytest.skip(message)
