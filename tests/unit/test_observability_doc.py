"""docs/observability.md names every metric both daemons export, and every span attribute key
the coordinator sets, so the page cannot fall behind the code."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from plait.coordinator import tracing
from plait.coordinator.metrics import CoordinatorMetrics
from plait.workerd.metrics import WorkerdMetrics

DOC = (Path(__file__).resolve().parents[2] / "docs" / "observability.md").read_text()


def _names(registry: CollectorRegistry) -> set[str]:
    return {m.name for m in registry.collect()}


def test_every_metric_is_documented() -> None:
    coordinator = _names(CoordinatorMetrics().registry)
    workerd = _names(WorkerdMetrics().registry)
    assert len(coordinator) > 30 and len(workerd) > 5  # the registries were really read
    # prometheus_client reports counters without their _total suffix
    missing = sorted(
        n for n in coordinator | workerd if f"`{n}`" not in DOC and f"`{n}_total`" not in DOC
    )
    assert not missing, f"metrics missing from docs/observability.md: {missing}"


def test_every_span_name_and_attribute_key_is_documented() -> None:
    keys = {
        value
        for name, value in vars(tracing).items()
        if name.startswith(("SPAN_", "ATTR_")) and isinstance(value, str)
    }
    assert len(keys) > 15
    missing = sorted(k for k in keys if f"`{k}`" not in DOC)
    assert not missing, f"span names / attributes missing from docs/observability.md: {missing}"
