"""Full-jitter exponential reconnect backoff."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest

from plait.worker.backoff import Backoff


def test_ceilings_double_up_to_the_maximum() -> None:
    b = Backoff(timedelta(milliseconds=50), timedelta(seconds=1), random.Random(1))
    ceilings = []
    for _ in range(8):
        ceilings.append(b.ceiling())
        b.next_delay()
    assert ceilings == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])
    assert b.failures == 8


def test_delays_are_full_jitter_within_bounds() -> None:
    b = Backoff(timedelta(milliseconds=200), timedelta(seconds=10), random.Random(7))
    for _ in range(200):
        ceiling = b.ceiling()
        d = b.next_delay()
        assert 0.0 <= d <= ceiling <= 10.0
    # Jitter: delays at the cap are spread, not all equal to it.
    delays = [b.next_delay() for _ in range(100)]
    assert min(delays) < 5.0 < max(delays)


def test_reset_starts_again_and_huge_counts_do_not_overflow() -> None:
    b = Backoff(timedelta(milliseconds=200), timedelta(seconds=10))
    for _ in range(5000):
        b.next_delay()
    assert b.ceiling() == 10.0
    b.reset()
    assert b.ceiling() == pytest.approx(0.2)


@pytest.mark.parametrize(("initial", "maximum"), [(0, 1), (2, 1), (-1, 1)])
def test_bad_bounds(initial: float, maximum: float) -> None:
    with pytest.raises(ValueError):
        Backoff(timedelta(seconds=initial), timedelta(seconds=maximum))
