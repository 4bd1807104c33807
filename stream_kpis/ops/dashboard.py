"""The Grafana dashboard of stream-kpis, generated from the KPI targets.

The dashboard (``deploy/grafana/dashboards/stream-kpis.json``) is rendered here rather than
drawn by hand so that the goals in ``deploy/targets.toml`` and the threshold lines on the
panels cannot drift apart. It has one row per CRM theme (members, redemption and points,
churn, spend, satisfaction, segments and cohorts, predictive CLV) and an operations row for the people who run
the workers.

Every query is plain PromQL without Grafana variables, so :func:`dashboard_queries` can hand
them to a real Prometheus in an integration test.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stream_kpis.core.catalogue import KPIS
from stream_kpis.ops.alerts import (
    JOB,
    Target,
    TargetsConfig,
    goal_text,
    kpi_selector,
    load_targets,
)

__all__ = [
    "DASHBOARD_UID",
    "DATASOURCE_UID",
    "dashboard_queries",
    "render_dashboard",
    "render_dashboard_json",
]

DASHBOARD_UID = "stream-kpis"
#: uid of the provisioned Prometheus datasource (deploy/grafana/provisioning/datasources).
DATASOURCE_UID = "stream-kpis-prometheus"
DATASOURCE = {"type": "prometheus", "uid": DATASOURCE_UID}
#: Window of the by-channel / by-term / member-vs-guest breakdowns.
BREAKDOWN_WINDOW = "30d"
RATE = "5m"
_SEVERITY_COLORS = {"critical": "red", "warning": "orange", "info": "blue"}
_SEVERITY_ORDER = ("info", "warning", "critical")
_HOLDS = {
    ">=": lambda x, v: x >= v,
    ">": lambda x, v: x > v,
    "<=": lambda x, v: x <= v,
    "<": lambda x, v: x < v,
}
_PANEL_WIDTH, _PANEL_HEIGHT, _GRID_WIDTH = 8, 8, 24


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    """A panel before layout: what it shows, in which unit, and for which KPI's goals.

    A ``table`` panel runs its queries as instant queries in table format, then applies
    ``transformations``; ``overrides`` are Grafana field overrides."""

    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"
    goal_kpi: str | None = None
    min: float | None = None
    max: float | None = None
    width: int = _PANEL_WIDTH
    transformations: tuple[dict[str, Any], ...] = ()
    overrides: tuple[dict[str, Any], ...] = ()


#: Grafana unit of each catalogue unit.
_GRAFANA_UNITS = {"ratio": "percentunit", "score": "none", "count": "short", "points": "short",
                  "currency": "short"}  # fmt: skip


def _describe(kpi: str) -> str:
    """A KPI panel's description: the catalogue's help text and formula."""
    entry = KPIS[kpi]
    return f"{entry.help} Formula: {entry.formula}."


def _unit(kpi: str) -> str:
    return _GRAFANA_UNITS[KPIS[kpi].unit]


def _windowed(kpi: str, title: str, **extra: Any) -> Panel:
    """A windowed KPI, one line per window, with its goals."""
    return Panel(title, _describe(kpi), (Query(kpi_selector(kpi), "{{window}}"),), _unit(kpi),
                 goal_kpi=kpi, **extra)  # fmt: skip


def _single(kpi: str, title: str, kind: str = "timeseries", **extra: Any) -> Panel:
    """A KPI without a window."""
    return Panel(title, _describe(kpi), (Query(kpi_selector(kpi), title),), _unit(kpi), kind,
                 goal_kpi=kpi, **extra)  # fmt: skip


def _breakdown(kpi: str, title: str, expr: str, legend: str, note: str = "", **extra: Any
               ) -> Panel:  # fmt: skip
    """A labelled KPI on the breakdown window (or without a window), one series per label."""
    window = f" Window: {BREAKDOWN_WINDOW}." if KPIS[kpi].windowed else ""
    return Panel(title, _describe(kpi) + window + note, (Query(expr, legend),), _unit(kpi),
                 **extra)  # fmt: skip


def _compare(title: str, *kpis_and_legends: tuple[str, str]) -> Panel:
    """Several KPIs of one unit on the breakdown window in one panel (e.g. member vs guest)."""
    kpis = [kpi for kpi, _ in kpis_and_legends]
    (unit,) = {_unit(kpi) for kpi in kpis}
    description = " ".join(KPIS[kpi].help for kpi in kpis) + f" Window: {BREAKDOWN_WINDOW}."
    queries = tuple(
        Query(kpi_selector(kpi, BREAKDOWN_WINDOW), legend) for kpi, legend in kpis_and_legends
    )
    return Panel(title, description, queries, unit)


def _ops(title: str, description: str, unit: str, *queries: tuple[str, str]) -> Panel:
    return Panel(title, description, tuple(Query(e, legend) for e, legend in queries), unit)


def _quantiles(metric: str) -> tuple[tuple[str, str], ...]:
    return tuple(
        (
            f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{job=\"{JOB}\"}}[{RATE}])))",
            f"p{round(q * 100)}",
        )
        for q in (0.5, 0.99)
    )


_JOB_MATCHER = f'job="{JOB}"'
_Row = tuple[str, list[Panel]]


def _rows() -> list[_Row]:
    """The dashboard's rows: one per CRM theme, then operations."""
    return [_members_row(), _points_row(), _churn_row(), _spend_row(), _satisfaction_row(),
            _segments_row(), _clv_row(), _operations_row()]  # fmt: skip


def _members_row() -> _Row:
    return ("Members and acquisition", [
        _single("members", "Members", kind="stat"),
        _windowed("active_rate", "Active rate"),
        _windowed("member_growth_rate", "Member growth"),
        _breakdown("new_members", "New members by channel",
                   kpi_selector("new_members", BREAKDOWN_WINDOW), "{{channel}}",
                   goal_kpi="new_members"),
        _breakdown("tier_members", "Tier mix", kpi_selector("tier_members"), "{{tier}}",
                   kind="piechart"),
        _windowed("enrollment_rate", "Enrollment rate"),
    ])  # fmt: skip


def _points_row() -> _Row:
    return ("Redemption and points", [
        _windowed("redemption_rate", "Redemption rate"),
        _windowed("redemption_participation", "Redemption participation"),
        _windowed("points_burn_rate", "Points burn rate"),
        _single("points_liability", "Points liability", kind="stat"),
        _compare("Points expiring and expired",
                 ("points_expiring", "expiring next " + BREAKDOWN_WINDOW),
                 ("expired_points", "expired last " + BREAKDOWN_WINDOW)),
        _single("breakage_rate", "Breakage rate"),
    ])  # fmt: skip


def _churn_row() -> _Row:
    return ("Churn and retention", [
        _windowed("churn_rate", "Churn rate"),
        _windowed("retention_rate", "Retention rate"),
        _windowed("churn_reduction", "Churn reduction"),
        _single("churned_members", "Churned members"),
        _single("one_and_done_rate", "One-and-done rate"),
        _ops("Member signals per day",
             "at_risk / churned / reactivated / points_expiring signals sent to "
             "marketing automation, per day.", "short",
             (f"sum by (signal) (increase(stream_kpis_signals_total{{{_JOB_MATCHER}}}[1d]))",
              "{{signal}}")),
    ])  # fmt: skip


def _spend_row() -> _Row:
    return ("Purchases and spend", [
        _windowed("repeat_purchase_rate", "Repeat purchase rate"),
        _compare("Average order value: member vs guest",
                 ("aov_member", "member"), ("aov_guest", "guest")),
        _windowed("member_spend_lift", "Member spend lift"),
        _windowed("member_revenue_share", "Member revenue share"),
        _compare("Average margin: member vs guest",
                 ("avg_margin_member", "member"), ("avg_margin_guest", "guest")),
        _windowed("margin_lift", "Margin lift"),
        _single("avg_lifetime_spend", "Average lifetime spend"),
    ])  # fmt: skip


def _satisfaction_row() -> _Row:
    mentions = f"topk(15, {kpi_selector('feedback_mentions', BREAKDOWN_WINDOW)})"
    return ("Satisfaction and feedback", [
        _windowed("nps", "NPS", min=-100, max=100),
        _compare("NPS: member vs guest", ("nps_member", "member"), ("nps_guest", "guest")),
        _windowed("csat", "CSAT", min=0, max=1),
        _windowed("survey_responses", "Survey responses"),
        _breakdown("feedback_mentions", "Feedback mentions", mentions, "{{lexicon}}: {{term}}",
                   " The 15 most mentioned terms.", kind="bargauge", goal_kpi="feedback_mentions"),
    ])  # fmt: skip


#: Ages (months after enrollment) whose columns the retention table orders; further ages
#: ([kpis] cohort_ages above this) still show, after them.
_TABLE_AGES = 24
_MEMBERS_COLUMN = "members"


def _segmented(kpi: str, title: str, dimension: str, **extra: Any) -> Panel:
    """A segmented KPI (SPEC 4.2) on the breakdown window, one series per value of
    ``dimension`` (at most [kpis] segment_limit of them reach Prometheus)."""
    note = (f" Per {dimension} ([kpis] segments); at most segment_limit values, those with the "
            "most " + ("members." if KPIS[kpi].segment == "member" else "orders."))
    return _breakdown(kpi, title, kpi_selector(kpi, BREAKDOWN_WINDOW, segment=dimension),
                      f"{{{{{dimension}}}}}", note, **extra)


def _retention_table() -> Panel:
    """The retention triangle (SPEC 4.3): a row per cohort, its size, a column per age."""
    size = (f'label_replace({kpi_selector("cohort_size")}, "age", "{_MEMBERS_COLUMN}", "", "")')
    expr = f"{kpi_selector('cohort_retention')} or {size}"
    description = (
        f"{KPIS['cohort_retention'].help} Rows: enrollment months (cohorts); columns: members of "
        "the cohort, then months after enrollment (0 = the enrollment month, the current month "
        f"counts so far). Formula: {KPIS['cohort_retention'].formula}.")
    order = {"cohort\\age": 0, _MEMBERS_COLUMN: 1} | {str(a): 2 + a for a in range(_TABLE_AGES)}
    rename = {"cohort\\age": "cohort"} | {str(a): f"+{a}" for a in range(_TABLE_AGES)}
    return Panel(
        "Retention by enrollment month", description, (Query(expr, ""),), "percentunit", "table",
        min=0, max=1, width=3 * _PANEL_WIDTH,
        transformations=(
            {"id": "groupingToMatrix",
             "options": {"columnField": "age", "rowField": "cohort", "valueField": "Value"}},
            {"id": "organize", "options": {"indexByName": order, "renameByName": rename}},
        ),
        overrides=(
            {"matcher": {"id": "byName", "options": _MEMBERS_COLUMN},
             "properties": [{"id": "unit", "value": "short"},
                            {"id": "custom.cellOptions", "value": {"type": "auto"}}]},
            {"matcher": {"id": "byName", "options": "cohort"},
             "properties": [{"id": "custom.cellOptions", "value": {"type": "auto"}}]},
        ))  # fmt: skip


def _segments_row() -> _Row:
    return ("Segments and cohorts", [
        _retention_table(),
        _segmented("active_rate", "Active rate by tier", "tier", goal_kpi="active_rate"),
        _segmented("churn_rate", "Churn rate by home store", "home_store"),
        _segmented("member_spend_lift", "Member spend lift by store", "store_id",
                   kind="bargauge"),
    ])  # fmt: skip


def _clv_parameters_table() -> Panel:
    """The latest fit (SPEC 4.4): a row per model, a column per parameter."""
    description = (f"{KPIS['clv_param'].help} Rows: models (bgnbd, gamma_gamma); columns: their "
                   "parameters, ll the maximised log-likelihood. Values near 0 or in the "
                   "thousands mean too little history for a fit. Formula: "
                   f"{KPIS['clv_param'].formula}.")
    order = {"model\\param": 0} | {name: i + 1 for i, name in enumerate(
        ("r", "alpha", "a", "b", "p", "q", "gamma", "ll"))}
    return Panel(
        "CLV model parameters", description, (Query(kpi_selector("clv_param"), ""),), "none",
        "table", width=2 * _PANEL_WIDTH,
        transformations=(
            {"id": "groupingToMatrix",
             "options": {"columnField": "param", "rowField": "model", "valueField": "Value"}},
            {"id": "organize", "options": {"indexByName": order,
                                           "renameByName": {"model\\param": "model"}}},
        ))  # fmt: skip


def _clv_row() -> _Row:
    """Predictive CLV (SPEC 4.4): on only with a [clv] table; otherwise these panels are empty."""
    return ("Predictive CLV", [
        Panel("Expected active members vs members",
              f"{KPIS['expected_active_members'].help} Against all members (members). Formula: "
              f"{KPIS['expected_active_members'].formula}. Needs [clv].",
              (Query(kpi_selector("expected_active_members"), "expected active"),
               Query(kpi_selector("members"), "members")), "short"),
        _windowed("predicted_purchases", "Predicted purchases by window"),
        _windowed("predicted_revenue", "Predicted revenue by window"),
        _clv_parameters_table(),
    ])  # fmt: skip


def _operations_row() -> _Row:
    job = _JOB_MATCHER
    return ("Operations", [
        _ops("Events by topic and outcome", "Consumed events per second.", "ops",
             (f"sum by (topic, outcome) (rate(stream_kpis_events_total{{{job}}}[{RATE}]))",
              "{{topic}} {{outcome}}")),
        _ops("Processing latency", "Processing time of an event batch.", "s",
             *_quantiles("stream_kpis_processing_seconds")),
        _ops("Event lag", "Wall clock at processing minus event time (live events).", "s",
             *_quantiles("stream_kpis_event_lag_seconds"),
             (f"max by (instance) (stream_kpis_watermark_lag_seconds{{{job}}})",
              "watermark {{instance}}")),
        _ops("Consumer lag", "Messages not yet consumed, by input topic (all workers).",
             "short",
             (f"sum by (topic) (stream_kpis_consumer_lag_messages{{{job}}})", "{{topic}}")),
        _ops("Dead letters by reason", "Events sent to loyalty.dlq per second.", "ops",
             (f"sum by (reason) (rate(stream_kpis_dead_letters_total{{{job}}}[{RATE}]))",
              "{{reason}}")),
        _ops("Duplicates by topic", "Redelivered events ignored per second.", "ops",
             (f"sum by (topic) (rate(stream_kpis_duplicates_total{{{job}}}[{RATE}]))",
              "{{topic}}")),
        _ops("Table sizes", "Rows in the workers' state tables (all workers).", "short",
             (f"sum by (table) (stream_kpis_table_rows{{{job}}})", "{{table}}")),
        _ops("Workers and global exporter",
             "Workers up, and which one exports the loyalty_* gauges (exactly one).", "short",
             (f"up{{{job}}}", "up {{instance}}"),
             (f"stream_kpis_global_exporter{{{job}}}", "exporter {{instance}}")),
        _ops("KPI emissions", "KPI evaluations published per second, and the age of the "
             "newest one.", "short",
             (f"sum(rate(stream_kpis_kpi_emissions_total{{{job}}}[{RATE}]))", "emissions/s"),
             (f"time() - max(stream_kpis_last_emit_timestamp_seconds{{{job}}})",
              "seconds since last")),
        _ops("Redis read-model errors", "Failed read-model writes per second.", "ops",
             (f"sum(rate(stream_kpis_redis_errors_total{{{job}}}[{RATE}]))", "errors/s")),
        _ops("Segment values left out", "Values of each segment dimension beyond [kpis] "
             "segment_limit, not exported as loyalty_* series (KPI topics and Redis carry them "
             "all).", "short",
             (f"max by (dimension) (stream_kpis_segment_values_dropped{{{job}}})",
              "{{dimension}}")),
    ])  # fmt: skip


def _threshold_steps(targets: Sequence[Target]) -> list[dict[str, Any]] | None:
    """Grafana threshold steps coloring where absolute goals are met (green) or missed."""
    absolute = [t for t in targets if t.kind == "absolute"]
    if not absolute:
        return None
    values = sorted({t.bound for t in absolute})

    def color_at(x: float) -> str:
        missed = [t.severity for t in absolute if not _HOLDS[t.op](x, t.bound)]
        if not missed:
            return "green"
        return _SEVERITY_COLORS[max(missed, key=_SEVERITY_ORDER.index)]

    steps = [{"color": color_at(values[0] - 1), "value": None}]
    for low, high in zip(values, [*values[1:], values[-1] + 2], strict=True):
        steps.append({"color": color_at((low + high) / 2), "value": low})
    return steps


def _goal_queries(targets: Iterable[Target]) -> list[Query]:
    """For relative goals: the line the KPI has to stay beyond (value ``per`` ago + change)."""
    queries = []
    for t in targets:
        if t.kind == "relative":
            past = kpi_selector(t.kpi, t.window, t.labels, offset=t.per)
            sign = "+" if t.bound >= 0 else "-"
            queries.append(
                Query(f"{past} {sign} {abs(t.bound)!r}", f"goal {_goal_label(t)}{goal_text(t)}")
            )
    return queries


def _goal_label(target: Target) -> str:
    """ "30d, channel=web: " before a goal ("" for a KPI without window or labels)."""
    parts = ([target.window] if target.window else []) + [f"{k}={v}" for k, v in target.labels]
    return f"{', '.join(parts)}: " if parts else ""


def _panel_json(panel: Panel, panel_id: int, x: int, y: int, targets: Sequence[Target]) -> dict:
    """One panel at (x, y) of the grid, with the goals of ``targets`` on its KPI."""
    goals = [t for t in targets if t.kpi == panel.goal_kpi]
    queries = list(panel.queries) + _goal_queries(goals)
    description = panel.description
    if goals:
        description += " Goals: " + "; ".join(_goal_label(t) + goal_text(t) for t in goals) + "."
    defaults: dict[str, Any] = {"unit": panel.unit}
    if panel.min is not None:
        defaults["min"] = panel.min
    if panel.max is not None:
        defaults["max"] = panel.max
    steps = _threshold_steps(goals)
    options: dict[str, Any] = {}
    if panel.kind == "timeseries":
        defaults["custom"] = {"thresholdsStyle": {"mode": "dashed" if steps else "off"}}
        options = {"legend": {"displayMode": "list", "placement": "bottom"},
                   "tooltip": {"mode": "multi"}}  # fmt: skip
    elif panel.kind == "stat":
        options = {"reduceOptions": {"calcs": ["lastNotNull"]}, "graphMode": "area"}
    elif panel.kind in ("bargauge", "piechart"):
        options = {"reduceOptions": {"calcs": ["lastNotNull"]}}
    elif panel.kind == "table":
        options = {"showHeader": True, "cellHeight": "sm"}
        defaults["color"] = {"mode": "continuous-RdYlGr"}
        defaults["custom"] = {"cellOptions": {"type": "color-background"}, "align": "center"}
    defaults["thresholds"] = {
        "mode": "absolute",
        "steps": steps or [{"color": "green", "value": None}],
    }
    if steps and panel.kind != "timeseries":
        defaults["color"] = {"mode": "thresholds"}
    table = panel.kind == "table"
    out = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": panel.width, "h": _PANEL_HEIGHT},
        "fieldConfig": {"defaults": defaults, "overrides": list(panel.overrides)},
        "options": options,
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": q.expr,
             "legendFormat": q.legend, "range": not table, "instant": table}  # fmt: skip
            | ({"format": "table"} if table else {})
            for i, q in enumerate(queries)
        ],
    }
    if panel.transformations:
        out["transformations"] = list(panel.transformations)
    return out


def render_dashboard(targets: TargetsConfig) -> dict[str, Any]:
    """The dashboard JSON model, with the goals of ``targets`` drawn on their KPIs."""
    panels: list[dict[str, Any]] = []
    y = 0
    for row_title, row_panels in _rows():
        panels.append({
            "id": len(panels) + 1, "type": "row", "title": row_title, "collapsed": False,
            "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": [],
        })  # fmt: skip
        y += 1
        x = 0
        for panel in row_panels:  # left to right, wrapping at the grid's 24 columns
            if x + panel.width > _GRID_WIDTH:
                x, y = 0, y + _PANEL_HEIGHT
            panels.append(_panel_json(panel, len(panels) + 1, x, y, targets.targets))
            x += panel.width
        y += _PANEL_HEIGHT
    return {
        "uid": DASHBOARD_UID,
        "title": "Loyalty KPIs",
        "description": (
            f"Generated by stream-kpis from {targets.source}; do not edit in Grafana. "
            "Dashed lines are the program goals."
        ),
        "tags": ["stream-kpis", "loyalty"],
        "timezone": "utc",
        "editable": False,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "1m",
        "time": {"from": "now-30d", "to": "now"},
        "templating": {"list": []},
        "annotations": {"list": []},
        "links": [],
        "panels": panels,
    }


def render_dashboard_json(targets_path: str | Path) -> str:
    """The text of ``deploy/grafana/dashboards/stream-kpis.json`` for a targets file."""
    config = load_targets(targets_path)
    config = TargetsConfig(config.targets, config.health, Path(targets_path).as_posix())
    return json.dumps(render_dashboard(config), indent=2, ensure_ascii=False) + "\n"


def _walk(panels: Iterable[Mapping[str, Any]]) -> Iterable[Mapping[str, Any]]:
    for panel in panels:
        yield panel
        yield from _walk(panel.get("panels", ()))


def dashboard_queries(dashboard_json: str | Mapping[str, Any]) -> list[str]:
    """Every PromQL ``expr`` of a dashboard (JSON text or parsed), rows included."""
    dashboard = json.loads(dashboard_json) if isinstance(dashboard_json, str) else dashboard_json
    return [
        target["expr"]
        for panel in _walk(dashboard.get("panels", ()))
        for target in panel.get("targets", ())
        if target.get("expr")
    ]
