"""Reconnect storm with the issue's 50 workers: ``python -m tests.bench.reconnect_storm``.

The scenario of :mod:`tests.system.test_reconnect_storm` (coordinator SIGKILLed with every
worker holding a lease, down 4 s, restarted on the same address; 10 s lease TTL,
``--reconnect-backoff 50ms:1s``), at a size too heavy for the test suite on two cores. Prints
the reconnect delays after the coordinator serves again (p50/p95/max), self-fences and lost
leases per run; exits 1 if a worker self-fenced, a lease was lost, or a worker came back later
than the backoff's maximum plus the test's margin.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from tests.system.harness import Cluster
from tests.system.test_reconnect_storm import BACKOFF_MAX_S, MARGIN_S, storm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=50)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args(argv)
    ok = True
    for run in range(args.runs):
        tmp = Path(tempfile.mkdtemp(prefix="plait-storm-"))
        cluster = Cluster(tmp)
        try:
            result = storm(cluster, args.workers, deadline_s=120)
        finally:
            cluster.close()
        print(f"run {run + 1}: {result.summary()}", flush=True)
        ok = ok and not result.self_fenced and result.lost == 0
        ok = ok and max(result.delays) <= BACKOFF_MAX_S + MARGIN_S
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
