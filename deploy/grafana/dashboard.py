"""Plait's Grafana dashboard, as code (deploy tooling; no part of the daemons).

Built with ``grafana-foundation-sdk`` and written to ``deploy/grafana/plait.json`` by
``make dashboard`` (``python deploy/grafana/dashboard.py``). The JSON is committed;
``tests/unit/test_dashboard.py`` rebuilds it in memory and fails when it drifts, and
``tests/system/test_prometheus.py`` runs every panel's query (:func:`queries`) against a real
Prometheus scraping a real coordinator and workerds.

The panels are declared as data (:data:`ROWS`) and turned into SDK builders in one place, so
every panel gets the same datasource, legend and layout. Metric names are those of
docs/observability.md: the coordinator's ``plait_*`` and workerd's ``plait_workerd_*``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builder
from grafana_foundation_sdk.builders import dashboard as dashboard_builder
from grafana_foundation_sdk.builders import prometheus as prometheus_builder
from grafana_foundation_sdk.builders import stat as stat_builder
from grafana_foundation_sdk.builders import timeseries as timeseries_builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common, prometheus
from grafana_foundation_sdk.models import dashboard as dashboard_model

OUTPUT = Path(__file__).resolve().parent / "plait.json"
UID = "plait-overview"
DATASOURCE = dashboard_model.DataSourceRef(type_val="prometheus", uid="${datasource}")
# Grafana's own interval variable: at least four scrape intervals, so rate() always has two
# samples. The system test substitutes a fixed window for it.
RATE = "$__rate_interval"


@dataclass(frozen=True)
class Target:
    """One PromQL query of a panel and how its series are named in the legend."""

    expr: str
    legend: str


@dataclass(frozen=True)
class PanelSpec:
    """A panel: a time series graph unless ``stat``; ``unit`` is a Grafana unit id."""

    title: str
    description: str
    targets: tuple[Target, ...]
    unit: str = "short"
    stat: bool = False
    width: int = 8


@dataclass(frozen=True)
class RowSpec:
    """A titled row of panels."""

    title: str
    panels: tuple[PanelSpec, ...]


def _rate(metric: str, by: str = "", selector: str = "") -> str:
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({metric}{selector}[{RATE}]))"


def _quantile(q: float, metric: str, by: str = "") -> str:
    labels = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) (rate({metric}_bucket[{RATE}])))"


def _quantiles(metric: str, by: str = "", legend_prefix: str = "") -> tuple[Target, ...]:
    prefix = legend_prefix or ("{{" + by + "}} " if by else "")
    return tuple(
        Target(_quantile(q, metric, by), f"{prefix}p{int(q * 100)}") for q in (0.5, 0.95, 0.99)
    )


THROUGHPUT = RowSpec(
    "Throughput",
    (
        PanelSpec(
            "Workflows",
            "Workflows accepted, and workflows that reached a terminal state, by state.",
            (
                Target(_rate("plait_workflows_submitted_total"), "submitted"),
                Target(_rate("plait_workflows_finished_total", "state"), "finished {{state}}"),
            ),
            unit="ops",
        ),
        PanelSpec(
            "Actions finished",
            "Actions that reached a terminal state, by state.",
            (Target(_rate("plait_actions_finished_total", "state"), "{{state}}"),),
            unit="ops",
        ),
        PanelSpec(
            "Leases granted and retries",
            "Leases granted to workers, and failed attempts scheduled to run again.",
            (
                Target(_rate("plait_leases_granted_total"), "leases granted"),
                Target(_rate("plait_action_retries_total"), "retries"),
            ),
            unit="ops",
        ),
        PanelSpec(
            "Live actions by state",
            "Actions not yet terminal, by state; and workflows running.",
            (
                Target("sum by (state) (plait_actions)", "{{state}}"),
                Target("sum(plait_workflows_running)", "workflows running"),
            ),
            width=12,
        ),
        PanelSpec(
            "Queue depth",
            "Ready actions waiting for a slot, by the kind of worker that can run them.",
            (
                Target("sum by (class) (plait_queue_depth)", "{{class}}"),
                Target("sum(plait_ready_actions)", "ready (all)"),
            ),
            width=12,
        ),
    ),
)

LATENCY = RowSpec(
    "Latency",
    (
        PanelSpec(
            "Action duration",
            "Run time of attempts as measured by the worker (exemplars link to the trace).",
            _quantiles("plait_action_duration_seconds"),
            unit="s",
        ),
        PanelSpec(
            "Schedule to start",
            "From an action becoming ready to its attempt starting on a worker.",
            _quantiles("plait_schedule_to_start_seconds"),
            unit="s",
        ),
        PanelSpec(
            "Journal commit",
            "Time to durably commit one journal batch.",
            _quantiles("plait_journal_commit_seconds"),
            unit="s",
        ),
    ),
)

FORK_JOIN = RowSpec(
    "Fork / join",
    (
        PanelSpec(
            "Fork width",
            "Branches per fan-out point (an action with several dependents, a map, a"
            " pipeline): p95 and mean, by kind.",
            (
                Target(_quantile(0.95, "plait_fork_width", "kind"), "{{kind}} p95"),
                Target(
                    f"{_rate('plait_fork_width_sum', 'kind')}"
                    f" / {_rate('plait_fork_width_count', 'kind')}",
                    "{{kind}} mean",
                ),
            ),
            width=6,
        ),
        PanelSpec(
            "Join wait p95",
            "From a join's first need (or child) finishing to the join resolving, by join kind.",
            (Target(_quantile(0.95, "plait_join_wait_seconds", "join"), "{{join}} p95"),),
            unit="s",
            width=6,
        ),
        PanelSpec(
            "Joins by outcome",
            "Joins resolved, by join kind and outcome (met, impossible).",
            (Target(_rate("plait_joins_total", "join, outcome"), "{{join}} {{outcome}}"),),
            unit="ops",
            width=6,
        ),
        PanelSpec(
            "Items in flight",
            "Map children and pipeline items leased or running.",
            (Target("sum by (kind) (plait_items_in_flight)", "{{kind}}"),),
            width=6,
        ),
    ),
)

WORKERS = RowSpec(
    "Workers",
    (
        PanelSpec(
            "Workers connected",
            "Worker streams open at the coordinator, workerds connected (their own view),"
            " and worker ids revoked.",
            (
                Target("sum(plait_workers_connected)", "connected (coordinator)"),
                Target("sum(plait_workerd_connected)", "connected (workerd)"),
                Target("sum(plait_workers_revoked)", "revoked"),
            ),
            stat=True,
        ),
        PanelSpec(
            "Slots: total vs used",
            "Slots the connected workers offer and slots in use, as the coordinator counts them.",
            (
                Target("sum(plait_worker_slots)", "slots"),
                Target("sum(plait_worker_slots_used)", "used"),
            ),
        ),
        PanelSpec(
            "Slot use by worker",
            "Fraction of each worker's slots in use.",
            (
                Target(
                    "sum by (worker) (plait_worker_slots_used)"
                    " / sum by (worker) (plait_worker_slots)",
                    "{{worker}}",
                ),
            ),
            unit="percentunit",
        ),
        PanelSpec(
            "Heartbeat age",
            "Time since each worker's last heartbeat, as the coordinator sees it.",
            (Target("max by (worker) (plait_worker_heartbeat_age_seconds)", "{{worker}}"),),
            unit="s",
        ),
        PanelSpec(
            "Clock offset",
            "Each worker's measured clock offset, and messages whose clock was too far ahead"
            " to merge.",
            (
                Target("max by (worker) (plait_worker_clock_offset_seconds)", "{{worker}}"),
                Target(
                    _rate("plait_clock_offset_rejections_total", "worker"),
                    "{{worker}} rejections/s",
                ),
            ),
            unit="s",
        ),
        PanelSpec(
            "workerd attempts",
            "Attempts finished on the workers, by kind and outcome.",
            (
                Target(
                    _rate("plait_workerd_attempts_total", "kind, outcome"),
                    "{{kind}} {{outcome}}",
                ),
            ),
            unit="ops",
        ),
        PanelSpec(
            "workerd attempt duration",
            "Attempt run time measured by workerd, by kind.",
            _quantiles("plait_workerd_attempt_duration_seconds", "kind"),
            unit="s",
        ),
        PanelSpec(
            "workerd slots",
            "Each workerd's current slot level (adaptive or fixed) and slots in use.",
            (
                Target("sum by (instance) (plait_workerd_slots)", "{{instance}} slots"),
                Target("sum by (instance) (plait_workerd_slots_used)", "{{instance}} used"),
            ),
        ),
        PanelSpec(
            "workerd kills, reconnects, self-fences",
            "Sandbox kills by reason; reconnects to the coordinator; self-fences (a worker that"
            " lost contact for a lease TTL killing its own attempts).",
            (
                Target(_rate("plait_workerd_sandbox_kills_total", "reason"), "kill {{reason}}"),
                Target(_rate("plait_workerd_reconnects_total"), "reconnects"),
                Target(_rate("plait_workerd_self_fences_total"), "self-fences"),
            ),
            unit="ops",
        ),
    ),
)

FENCING = RowSpec(
    "Leases and fencing",
    (
        PanelSpec(
            "Leases lost by reason",
            "Leases lost (the action runs again): lease_expired, worker_left, not_readopted,"
            " not_reported, self_fenced, worker_revoked, undelivered.",
            (Target(_rate("plait_leases_lost_total", "reason"), "{{reason}}"),),
            unit="ops",
        ),
        PanelSpec(
            "Results refused by reason",
            "Results refused: superseded (a zombie: an older fencing token), cancelled (the"
            " ordinary late result of a cancelled action), not_live, unknown_lease, not_held.",
            (Target(_rate("plait_results_refused_total", "reason"), "{{reason}}"),),
            unit="ops",
        ),
        PanelSpec(
            "Worker reports refused",
            "Started/progress/result reports for a lease the session does not hold, and hellos"
            " refused for a worker id already connected.",
            (
                Target(_rate("plait_worker_reports_refused_total", "report"), "{{report}}"),
                Target(_rate("plait_worker_hellos_refused_total"), "hellos refused"),
            ),
            unit="ops",
        ),
    ),
)

JOURNAL = RowSpec(
    "Journal",
    (
        PanelSpec(
            "Commit latency",
            "Time to durably commit one journal batch.",
            _quantiles("plait_journal_commit_seconds"),
            unit="s",
            width=12,
        ),
        PanelSpec(
            "Batch size and commit rate",
            "Events per commit (group commit), p95 and mean; commits per second.",
            (
                Target(_quantile(0.95, "plait_journal_batch_events"), "events/commit p95"),
                Target(
                    f"{_rate('plait_journal_batch_events_sum')}"
                    f" / {_rate('plait_journal_batch_events_count')}",
                    "events/commit mean",
                ),
                Target(_rate("plait_journal_commit_seconds_count"), "commits/s"),
            ),
            width=12,
        ),
    ),
)

HA = RowSpec(
    "HA and health",
    (
        PanelSpec(
            "Leader",
            "Coordinators that lead (1) or stand by (0), and the leadership term.",
            (
                Target("max by (instance) (plait_leader)", "{{instance}} leader"),
                Target("max by (instance) (plait_term)", "{{instance}} term"),
            ),
            stat=True,
            width=6,
        ),
        PanelSpec(
            "Internal errors and core rebuilds",
            "Unexpected exceptions (by where), and rebuilds of the scheduling core from the"
            " journal. Both should stay at zero.",
            (
                Target(_rate("plait_internal_errors_total", "where"), "error {{where}}"),
                Target(_rate("plait_core_rebuilds_total"), "core rebuilds"),
            ),
            unit="ops",
            width=6,
        ),
        PanelSpec(
            "Build info",
            "Versions running, per scraped process.",
            (Target("count by (job, version, python) (plait_build_info)", "{{job}} {{version}}"),),
            stat=True,
            width=6,
        ),
        PanelSpec(
            "Targets up",
            "Plait processes Prometheus scrapes successfully, by job.",
            (Target('sum by (job) (up{job=~"plait.*"})', "{{job}}"),),
            stat=True,
            width=6,
        ),
    ),
)

REFUSALS = RowSpec(
    "Input refusals",
    (
        PanelSpec(
            "Input refused",
            "Input refused as malformed or over a limit, by source (client, worker) and field.",
            (Target(_rate("plait_input_refused_total", "source, field"), "{{source}} {{field}}"),),
            unit="ops",
            width=12,
        ),
        PanelSpec(
            "Calls refused by auth",
            "Calls refused UNAUTHENTICATED or PERMISSION_DENIED, by RPC and code.",
            (Target(_rate("plait_auth_refusals_total", "rpc, code"), "{{rpc}} {{code}}"),),
            unit="ops",
            width=12,
        ),
    ),
)

ROWS: tuple[RowSpec, ...] = (
    THROUGHPUT,
    LATENCY,
    FORK_JOIN,
    WORKERS,
    FENCING,
    JOURNAL,
    HA,
    REFUSALS,
)


def _target(ref: int, target: Target) -> prometheus_builder.Dataquery:
    return (
        prometheus_builder.Dataquery()
        .ref_id(chr(ord("A") + ref))
        .expr(target.expr)
        .legend_format(target.legend)
        .range()
        .exemplar(True)
        .editor_mode(prometheus.QueryEditorMode.CODE)
    )


def _panel(panel_id: int, spec: PanelSpec) -> stat_builder.Panel | timeseries_builder.Panel:
    panel: stat_builder.Panel | timeseries_builder.Panel
    if spec.stat:
        panel = (
            stat_builder.Panel()
            .graph_mode(common.BigValueGraphMode.AREA)
            .reduce_options(common_builder.ReduceDataOptions().calcs(["lastNotNull"]))
        )
    else:
        panel = timeseries_builder.Panel().legend(
            common_builder.VizLegendOptions()
            .show_legend(True)
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
        )
    panel = (
        panel.id(panel_id)
        .title(spec.title)
        .description(spec.description)
        .datasource(DATASOURCE)
        .unit(spec.unit)
        .height(8)
        .span(spec.width)
    )
    for ref, target in enumerate(spec.targets):
        panel = panel.with_target(_target(ref, target))
    return panel


def build() -> dict[str, object]:
    """The dashboard as the JSON object Grafana imports."""
    board = (
        dashboard_builder.Dashboard("Plait")
        .uid(UID)
        .description(
            "Plait coordinator and workerd: throughput, latency, fork/join, workers, leases"
            " and fencing, journal, HA. Generated by deploy/grafana/dashboard.py."
        )
        .tags(["plait"])
        .editable()
        .tooltip(dashboard_model.DashboardCursorSync.CROSSHAIR)
        .time("now-1h", "now")
        .refresh("30s")
        .timezone("browser")
        .with_variable(
            dashboard_builder.DatasourceVariable("datasource")
            .label("Data source")
            .type("prometheus")
        )
    )
    panel_id = 0
    for row in ROWS:
        panel_id += 1
        board = board.with_row(dashboard_builder.Row(row.title).id(panel_id))
        for spec in row.panels:
            panel_id += 1
            board = board.with_panel(_panel(panel_id, spec))
    encoded: dict[str, object] = json.loads(json.dumps(board.build(), cls=JSONEncoder))
    return encoded


def render() -> str:
    """The committed file's exact text: sorted keys, two-space indent, trailing newline."""
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


@dataclass(frozen=True)
class PanelQuery:
    """One query of a panel in the dashboard JSON."""

    row: str
    panel: str
    ref_id: str
    expr: str


def queries(board: dict[str, object]) -> list[PanelQuery]:
    """Every panel's every query, in dashboard order (read from the JSON, so the system test
    proves what users import, not what this module meant to write)."""
    found: list[PanelQuery] = []
    row = ""
    panels = board.get("panels", [])
    assert isinstance(panels, list)
    for panel in panels:
        if panel.get("type") == "row":
            row = str(panel.get("title", ""))
            continue
        for target in panel.get("targets", []):
            found.append(
                PanelQuery(row, str(panel["title"]), str(target["refId"]), str(target["expr"]))
            )
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Writes plait.json (or prints it with --stdout)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--stdout", action="store_true", help="print instead of writing")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="where to write")
    args = parser.parse_args(argv)
    text = render()
    if args.stdout:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
        print(f"wrote {args.output} ({len(queries(json.loads(text)))} queries)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
