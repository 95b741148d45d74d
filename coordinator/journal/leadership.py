"""Choosing the :class:`~plait.coordinator.journal.store.Leadership` a store URL implies (edge)."""

from __future__ import annotations

from datetime import timedelta

from plait.coordinator.journal.store import Leadership, parse_store_url


def open_leadership(url: str, *, holder: str, advertise: str, ttl: timedelta) -> Leadership:
    """File lock for ``sqlite:///PATH``; a lease row with a term for ``postgresql://``.

    ``holder`` must be unique per coordinator process; ``advertise`` is the gRPC address
    standbys name in their redirects; ``ttl`` is how long a PostgreSQL lease outlives its last
    renewal (a file lock needs none: the kernel drops it with the process).
    """
    kind, target = parse_store_url(url)
    if kind == "sqlite":
        from plait.coordinator.journal.sqlite import FileLockLeadership

        return FileLockLeadership(target, advertise=advertise)
    from plait.coordinator.journal.pg_leadership import PostgresLeadership

    return PostgresLeadership(target, holder=holder, advertise=advertise, ttl=ttl)
