"""The capacity runner's arithmetic (tests.bench.capacity) says what docs/capacity.md reads.

The runner itself is a benchmark, not a test (``make bench-capacity``); this checks only the
scaling it applies to what it measured.
"""

from __future__ import annotations

import pytest

from tests.bench.capacity import fmt, needed_share, per_million, share_of_core, workers_per_core


def test_per_million_scales_a_measured_total() -> None:
    assert per_million(751 * 10_000, 10_000) == pytest.approx(751_000_000)
    assert per_million(0.25, 22_513) == pytest.approx(11.1, rel=1e-2)  # seconds


def test_share_of_core_is_percent_of_one_core() -> None:
    assert share_of_core(1.5, 10.0) == pytest.approx(15.0)
    assert share_of_core(3.0, 2.0) == pytest.approx(150.0)  # gRPC's and the journal's threads


def test_workers_per_core_and_needed_share_invert_each_other() -> None:
    # 500 µs per heartbeat every 5 s: 10,000 workers fill one core.
    assert workers_per_core(500e-6, 5.0) == pytest.approx(10_000)
    # 2,000 actions/s at 150 µs each: 30 % of a core.
    assert needed_share(2_000, 150e-6) == pytest.approx(30.0)


def test_fmt_keeps_three_significant_figures_or_so() -> None:
    assert fmt(6520.4, "workers") == "6,520 workers"
    assert fmt(16.44, "% of a core") == "16.4 % of a core"
    assert fmt(0.394, "s") == "0.39 s"
