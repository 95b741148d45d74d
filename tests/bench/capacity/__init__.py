"""Capacity of one coordinator, measured: ``python -m tests.bench.capacity`` (make bench-capacity).

One runner over the existing benchmarks, every number from real processes and sockets, printed
as one Markdown table with the machine it ran on (``--json PATH`` writes every number too). It
is the source of docs/capacity.md. Sections (``--sections``, all by default):

  idle      coordinator CPU and RSS with 250, 500 and 1,000 protocol-level idle workers at the
            default 5 s heartbeat (``tests.bench.idle_workers``: one stream and TCP connection
            per worker, heartbeats spread over the interval)
  busy      coordinator CPU and RSS with 4 workerd x 50 slots (200 slots) running 1 s, 0.1 s
            and no-op handler actions: actions/s achieved against offered, CPU per action
  shapes    actions/s by shape at a modest size (``tests.bench.shapes`` on
            ``tests.bench.graphs``: fan-out + join, layered, chain, 10 ms sleeps, exec)
  journal   SQLite bytes per action (pages in use) and per event, RSS per finished action and
            per finished one-action workflow, no-ops/s on 2 workerd x 64 and the mean commit
            along a chain (both as PostgreSQL's rows), restart time (kill -9, start -> health
            SERVING) on an empty and a full journal, then ``--retention``: what its sweep prunes,
            the file's size and free pages, the restart after pruning, and a second batch
  memory    bytes per pending action in the scheduling core (``tests.bench.memory``)
  replay    replay time per million events (``tests.bench.replay``)
  postgres  on a durable PostgreSQL (fsync and synchronous commit on): actions/s, mean commit
            time along a chain, bytes per action, and failover time: kill -9 of the leader ->
            the standby SERVING -> a new one-action workflow done, with the test profile's 2 s
            lease TTL (several trials) and, without ``--quick``, once with the default 30 s
            (``tests.system.test_failover.HaCluster``, ``tests.system.pg``)

Medians where a run is cheap (shapes, restarts, replay, failovers: the count is in each row's
note); the idle and busy rows are one window each. The host's load average is printed at the
start and the end: on a shared machine every number moves with whatever else runs. Not a test:
nothing is asserted; it exits 1 only when a section failed.
"""

# The docstring above is --help's text. The modules: ``table`` (the arithmetic, the rows, the
# machine, the print), ``common`` (what the sections share), one per group of sections
# (``workers``: idle, busy; ``benches``: shapes, memory, replay; ``journal``; ``postgres``), and
# ``runner`` (the plan, the sections by name, ``main``).

from tests.bench.capacity.runner import FULL, QUICK, SECTIONS, Plan, main
from tests.bench.capacity.table import (
    Report,
    Row,
    fmt,
    needed_share,
    per_million,
    share_of_core,
    workers_per_core,
)

__all__ = [
    "FULL",
    "QUICK",
    "SECTIONS",
    "Plan",
    "Report",
    "Row",
    "fmt",
    "main",
    "needed_share",
    "per_million",
    "share_of_core",
    "workers_per_core",
]
