"""Span exporters from the standard ``OTEL_*`` environment, for the coordinator and workers alike.

``OTEL_TRACES_EXPORTER`` names them (comma-separated; ``none``, the default, exports nothing):
``otlp`` picks gRPC or HTTP by ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` /
``OTEL_EXPORTER_OTLP_PROTOCOL`` (``grpc``, the default, or ``http/protobuf``) and needs
``pip install 'plait[otlp]'``; any other name (``console``, …) is looked up among the installed
``opentelemetry_traces_exporter`` entry points, as the SDK's own configuration does. The
exporters then read their own ``OTEL_EXPORTER_OTLP_*`` settings. A name that cannot be served is
a logged warning, never a failure to start. The SDK is imported only when something is asked for.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)

_OTLP = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}


def span_exporters(environ: Mapping[str, str] | None = None) -> list[SpanExporter]:
    """The span exporters the environment names (an empty list: tracing is off)."""
    env = os.environ if environ is None else environ
    out: list[SpanExporter] = []
    for raw in env.get("OTEL_TRACES_EXPORTER", "none").split(","):
        name = raw.strip().lower()
        if name in ("", "none"):
            continue
        if name == "otlp":
            protocol = (
                env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "grpc"
            ).strip()
            if protocol not in _OTLP:
                log.warning("unsupported OTLP protocol %r; traces are not exported", protocol)
                continue
            name = _OTLP[protocol]
        found = entry_points(group="opentelemetry_traces_exporter", name=name)
        if not found:
            log.warning(
                "OTEL_TRACES_EXPORTER asks for %r, which is not installed (for OTLP: pip install"
                " 'plait[otlp]'); traces are not exported there",
                name,
            )
            continue
        try:
            out.append(next(iter(found)).load()())
        except Exception as e:  # a broken exporter must not stop the process
            log.warning("span exporter %r could not be started: %s", name, e)
    return out
