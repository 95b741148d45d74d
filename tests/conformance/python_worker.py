"""The Python SDK worker under conformance test: a small program built on ``plait.Worker``.

    python -m tests.conformance.python_worker --coordinator HOST:PORT --id ID --slots N \
        [--label KEY=VALUE ...]

It serves :mod:`tests.conformance.handlers` through the SDK alone (no workerd), drains on
SIGTERM/SIGINT or when the coordinator asks, and skews its wall clock by ``PLAIT_CLOCK_OFFSET``
(``1h``, ``-90s``) as workerd does, for the clock-skew test.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from datetime import timedelta

from plait.clock import SystemClock
from plait.durations import parse_clock_offset
from tests.conformance.handlers import worker


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--coordinator", required=True)
    p.add_argument("--id", required=True)
    p.add_argument("--slots", type=int, required=True)
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    labels = dict(item.split("=", 1) for item in args.label)
    worker.run(
        coordinator=args.coordinator,
        worker_id=args.id,
        slots=args.slots,
        labels=labels,
        clock=SystemClock(parse_clock_offset(os.environ.get("PLAIT_CLOCK_OFFSET", ""))),
        reconnect_initial=timedelta(milliseconds=50),
        reconnect_max=timedelta(seconds=1),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
