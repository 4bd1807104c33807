"""Render the main loyalty KPIs, as a Prometheus recorded them or as a replay computed them, to
PNG charts.

From Prometheus: queries a Prometheus that scrapes the stream-kpis workers
(``job="stream-kpis"``) with ``/api/v1/query_range`` over a time range -- by default the last
30 minutes, e.g. a ``stream-kpis demo`` run. The queries are the dashboard's (``kpi_selector``:
de-duplicated across workers); the time axis is the wall-clock time of the scrapes.

From a replay (``--records FILE``, ``-`` for standard input): KPI records as JSON Lines, e.g. the
series ``stream-kpis replay --every 1d --output jsonl`` writes; no broker, no Prometheus. The time
axis is the records' ``as_of`` (event time).

Either way it writes one PNG per KPI plus ``overview.png`` (all of them on one page) into the
output directory, with the absolute goals of the targets file drawn as dashed lines, and
``cohort_retention.png``: the retention triangle (SPEC 4.3) as a heatmap, one row per enrollment
month and one column per month after it, as of the end of the range (Prometheus) or of the last
``as_of`` (records).

    .venv/bin/python scripts/render_charts.py http://127.0.0.1:9090
    .venv/bin/python scripts/render_charts.py http://127.0.0.1:9090 --since 2h -o /tmp/charts
    .venv/bin/python scripts/render_charts.py URL --start 2024-06-01T10:00:00Z --end 2024-06-01T11:00:00Z
    .venv/bin/stream-kpis replay events.jsonl --every 1d --output jsonl > kpis.jsonl
    .venv/bin/python scripts/render_charts.py --records kpis.jsonl --dpi 60

``make charts`` renders the README's picture (docs/images/kpis.png) this way from a seeded
synthetic stream. Prints one line per chart with the number of series and points drawn (for the
cohort heatmap: cohorts and cells); exits 1 when no chart got any data (wrong URL, wrong range,
Prometheus does not scrape the workers, or the records hold none of the charted KPIs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.dates as mdates  # noqa: E402 (after choosing the backend)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

from stream_kpis.cli import CohortRow, cohort_triangle  # noqa: E402
from stream_kpis.core.timebase import parse_duration, parse_rfc3339_ms  # noqa: E402
from stream_kpis.ops.alerts import Target, goal_text, kpi_selector, load_targets  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / ".local" / "charts"
DEFAULT_TARGETS = REPO / "deploy" / "targets.toml"
#: Points per series at most (the step is the range divided by this, at least 1 s).
MAX_POINTS = 600


@dataclass(frozen=True)
class Line:
    """One query of a chart: ``kpi`` over ``window``; ``legend`` names each series
    (``str.format`` with the series' labels, e.g. ``"{channel}"``)."""

    kpi: str
    window: str | None
    legend: str


@dataclass(frozen=True)
class Chart:
    name: str
    title: str
    ylabel: str
    lines: tuple[Line, ...]


CHARTS = (
    Chart("active_rate", "Active rate (30d)", "share of members", (Line("active_rate", "30d", "30d"),)),
    Chart("redemption_rate", "Redemption rate (30d)", "share of members",
          (Line("redemption_rate", "30d", "30d"),)),
    Chart("churn_rate", "Churn rate (90d)", "share of members", (Line("churn_rate", "90d", "90d"),)),
    Chart("repeat_purchase_rate", "Repeat purchase rate (30d)", "share of buyers",
          (Line("repeat_purchase_rate", "30d", "30d"),)),
    Chart("aov", "Average order value: member vs guest (30d)", "revenue / order",
          (Line("aov_member", "30d", "member"), Line("aov_guest", "30d", "guest"))),
    Chart("points_liability", "Points liability", "points", (Line("points_liability", None, "points"),)),
    Chart("nps", "NPS (30d)", "NPS (-100..100)", (Line("nps", "30d", "30d"),)),
    Chart("new_members", "New members by channel (30d)", "members",
          (Line("new_members", "30d", "{channel}"),)),
)  # fmt: skip


@dataclass
class Series:
    legend: str
    times: list[datetime]
    values: list[float]


class Prometheus:
    """The HTTP API of one Prometheus (``url`` without the ``/api/...`` part)."""

    def __init__(self, url: str, timeout: float = 30) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        """The matrix result of ``expr``; raises ``RuntimeError`` with Prometheus's message."""
        return self._get("query_range", {"query": expr, "start": start, "end": end, "step": step})

    def query(self, expr: str, at: float) -> list[dict]:
        """The instant-vector result of ``expr`` at unix time ``at``."""
        return self._get("query", {"query": expr, "time": at})

    def _get(self, endpoint: str, params: dict) -> list[dict]:
        expr = params["query"]
        url = f"{self.url}/api/v1/{endpoint}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as error:
            answer = json.load(error)
        except OSError as error:
            raise RuntimeError(f"cannot reach Prometheus at {self.url}: {error}") from None
        if answer.get("status") != "success":
            raise RuntimeError(f"Prometheus rejected {expr!r}: {answer.get('error')}")
        return answer["data"]["result"]


def fetch(prometheus: Prometheus, chart: Chart, start: float, end: float, step: float
          ) -> list[Series]:
    """Every series of every line of ``chart`` over [start, end]."""
    found = []
    for line in chart.lines:
        for result in prometheus.query_range(kpi_selector(line.kpi, line.window), start, end, step):
            legend = line.legend.format_map(_Missing(result["metric"]))
            times = [datetime.fromtimestamp(float(t), UTC) for t, _ in result["values"]]
            found.append(Series(legend, times, [float(v) for _, v in result["values"]]))
    return sorted(found, key=lambda s: s.legend)


def series_of_records(records: Sequence[dict], chart: Chart) -> list[Series]:
    """Every series of every line of ``chart`` in KPI records (SPEC section 6 shape), by
    ``as_of``; records with a null value leave a gap, as a missing gauge does."""
    found = []
    for line in chart.lines:
        by_labels: dict[tuple, Series] = {}
        for record in records:
            if record.get("kpi") != line.kpi or record.get("window") != line.window:
                continue
            labels = record.get("labels") or {}
            one = by_labels.get(tuple(sorted(labels.items())))
            if one is None:
                one = Series(line.legend.format_map(_Missing(labels)), [], [])
                by_labels[tuple(sorted(labels.items()))] = one
            if record.get("value") is not None:
                one.times.append(datetime.fromtimestamp(parse_rfc3339_ms(record["as_of"]) / 1000, UTC))
                one.values.append(float(record["value"]))
        found.extend(one for one in by_labels.values() if one.values)
    return sorted(found, key=lambda s: s.legend)


#: The cohort heatmap's file name (``<name>.png``).
COHORT_CHART = "cohort_retention"


def cohorts_of_prometheus(prometheus: Prometheus, at: float) -> list[CohortRow]:
    """The retention triangle as Prometheus has it at ``at`` (the dashboard's queries)."""
    records = [{"kpi": kpi, "labels": result["metric"], "value": float(result["value"][1])}
               for kpi in ("cohort_size", "cohort_retention")
               for result in prometheus.query(kpi_selector(kpi), at)]
    return cohort_triangle(records)


def cohorts_of_records(records: Sequence[dict]) -> list[CohortRow]:
    """The retention triangle of the latest ``as_of`` among the records' cohort records."""
    cohort = [r for r in records if r.get("kpi") in ("cohort_size", "cohort_retention")]
    if not cohort:
        return []
    latest = max(cohort, key=lambda r: parse_rfc3339_ms(r["as_of"]))["as_of"]
    return cohort_triangle(r for r in cohort if r["as_of"] == latest)


def draw_cohorts(ax: Axes, rows: Sequence[CohortRow], when: str) -> None:
    """The triangle as a heatmap: red (nobody came back) to green (everybody did), each cell
    labelled with its percentage; the y axis names the cohorts and their sizes."""
    ages = max((len(row.retention) for row in rows), default=0)
    grid = [[(row.retention[a] if a < len(row.retention) and row.retention[a] is not None
              else float("nan")) for a in range(ages)] for row in rows]
    ax.set_title(f"Cohort retention, as of {when}")
    if not rows:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center",
                color="grey", fontsize="large")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    small = len(rows) * ages <= 160  # room for a label in each cell
    for y, cells in enumerate(grid):
        for x, value in enumerate(cells):
            if small and value == value:  # not NaN
                ax.text(x, y, f"{100 * value:.0f}", ha="center", va="center", fontsize="x-small")
    ax.set_xticks(range(ages), [str(a) for a in range(ages)])
    ax.set_yticks(range(len(rows)), [f"{row.cohort} ({row.members:,})" for row in rows],
                  fontsize="small")
    ax.set_xlabel("months after enrollment (0 = the enrollment month)")
    ax.set_ylabel("enrollment month (members)")
    ax.figure.colorbar(image, ax=ax, fraction=0.04, pad=0.02,
                       format=lambda value, _: f"{100 * value:.0f}%")


def read_records(lines: Iterable[bytes]) -> list[dict]:
    """KPI records from JSON Lines; lines that are not KPI records are skipped."""
    records = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "kpi" in record and "as_of" in record:
            records.append(record)
    return records


class _Missing(dict):
    def __missing__(self, key: str) -> str:
        return "?"


def goals_of(chart: Chart, targets: Sequence[Target]) -> list[Target]:
    """Absolute goals on one of the chart's (unlabelled) lines."""
    wanted = {(line.kpi, line.window) for line in chart.lines if "{" not in line.legend}
    return [t for t in targets
            if t.kind == "absolute" and not t.labels and (t.kpi, t.window) in wanted]


def draw(ax: Axes, chart: Chart, series: list[Series], goals: list[Target],
         start: datetime, end: datetime) -> None:
    for one in series:
        ax.plot(one.times, one.values, label=one.legend, linewidth=1.6)
    for goal in goals:
        ax.axhline(goal.bound, linestyle="--", linewidth=1, color="tab:red",
                   label=f"goal: {goal_text(goal)}")
    ax.set_title(chart.title)
    ax.set_ylabel(chart.ylabel)
    ax.grid(True, alpha=0.3)
    ax.set_xlim(start, end)
    days = (end - start).total_seconds() > 2 * 86_400
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%b %d" if days else "%H:%M:%S", tz=UTC))
    ax.tick_params(axis="x", labelrotation=30)
    if series:
        ax.legend(loc="best", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center",
                color="grey", fontsize="large")


def render(drawn: dict[Chart, list[Series]], output: Path, start: datetime, end: datetime,
           title: str, targets: Sequence[Target] = (), dpi: int = 100,
           cohorts: Sequence[CohortRow] = ()) -> dict[str, tuple[int, int]]:
    """Write the PNGs of ``drawn`` over [start, end] and the cohort heatmap (as of ``end``);
    returns chart name -> (series, points), for the heatmap (cohorts, cells)."""
    output.mkdir(parents=True, exist_ok=True)
    columns = 2
    panels = len(CHARTS) + 1
    overview, axes = plt.subplots(-(-panels // columns), columns,
                                  figsize=(7 * columns, 3.6 * -(-panels // columns)),
                                  squeeze=False)
    for ax, (chart, series) in zip(axes.flat, drawn.items(), strict=False):
        draw(ax, chart, series, goals_of(chart, targets), start, end)
    when = f"{end:%Y-%m-%d %H:%M} UTC"
    draw_cohorts(axes.flat[len(CHARTS)], cohorts, when)
    for ax in list(axes.flat)[panels:]:
        ax.set_visible(False)
    overview.suptitle(title)
    overview.tight_layout()
    overview.savefig(output / "overview.png", dpi=dpi, pil_kwargs={"optimize": True})
    plt.close(overview)
    summary = {}
    for chart, series in drawn.items():
        figure, ax = plt.subplots(figsize=(8, 4.2))
        draw(ax, chart, series, goals_of(chart, targets), start, end)
        ax.set_xlabel(title.split(": ", 1)[-1])
        figure.tight_layout()
        figure.savefig(output / f"{chart.name}.png", dpi=dpi, pil_kwargs={"optimize": True})
        plt.close(figure)
        summary[chart.name] = (len(series), sum(len(s.values) for s in series))
    figure, ax = plt.subplots(figsize=(8, 1.6 + 0.35 * max(len(cohorts), 3)))
    draw_cohorts(ax, cohorts, when)
    figure.tight_layout()
    figure.savefig(output / f"{COHORT_CHART}.png", dpi=dpi, pil_kwargs={"optimize": True})
    plt.close(figure)
    summary[COHORT_CHART] = (len(cohorts), sum(len(row.retention) for row in cohorts))
    return summary


#: What the charts are drawn from: the series per chart, the range, a title, the cohorts.
Drawn = tuple[dict[Chart, list[Series]], datetime, datetime, str, list[CohortRow]]


def from_prometheus(prometheus: Prometheus, start: float, end: float) -> Drawn:
    """The charts' series from Prometheus over [start, end] (unix seconds), the range, a title,
    and the cohorts at ``end``."""
    step = max(1.0, (end - start) / MAX_POINTS)
    drawn = {chart: fetch(prometheus, chart, start, end, step) for chart in CHARTS}
    first, last = datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end, UTC)
    return drawn, first, last, (f"Loyalty KPIs from Prometheus: {first:%Y-%m-%d %H:%M:%S} .. "
                                f"{last:%H:%M:%S} UTC, wall-clock time of the scrapes"), \
        cohorts_of_prometheus(prometheus, end)


def from_records(records: Sequence[dict]) -> Drawn:
    """The charts' series from KPI records, their as_of range, a title, and the cohorts of the
    latest as_of."""
    drawn = {chart: series_of_records(records, chart) for chart in CHARTS}
    cohorts = cohorts_of_records(records)
    times = [t for series in drawn.values() for one in series for t in one.times]
    times += [datetime.fromtimestamp(parse_rfc3339_ms(r["as_of"]) / 1000, UTC) for r in records
              if r.get("kpi") == "cohort_size"]
    if not times:
        now = datetime.now(UTC)
        return drawn, now, now, "Loyalty KPIs of a replay: no data", cohorts
    first, last = min(times), max(times)
    return drawn, first, last, (f"Loyalty KPIs of a replay: {first:%Y-%m-%d} .. {last:%Y-%m-%d}, "
                                "as of each day (event time)"), cohorts


def _instant(text: str) -> float:
    """Unix seconds from ``1718000000`` or RFC 3339 (``2024-06-10T06:13:20Z``)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither unix seconds nor RFC 3339") from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no UTC offset; add Z or +hh:mm")
    return moment.timestamp()


def _seconds(text: str) -> float:
    try:
        return parse_duration(text) / 1000
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", nargs="?", help="Prometheus base URL, e.g. http://127.0.0.1:9090")
    parser.add_argument("--records", type=Path, default=None,
                        help="KPI records (JSON Lines, '-' for stdin) instead of a Prometheus")
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT,
                        help=f"directory for the PNGs (default {DEFAULT_OUTPUT.relative_to(REPO)})")
    parser.add_argument("--since", type=_seconds, default=_seconds("30m"),
                        help="range ending at --end (default 30m)")
    parser.add_argument("--start", type=_instant, help="range start (overrides --since)")
    parser.add_argument("--end", type=_instant, help="range end (default now)")
    parser.add_argument("--targets", type=Path, default=DEFAULT_TARGETS,
                        help="targets file whose absolute goals are drawn ('' for none)")
    parser.add_argument("--dpi", type=int, default=100, help="pixels per inch of the PNGs")
    args = parser.parse_args(argv)
    if (args.url is None) == (args.records is None):
        parser.error("give a Prometheus URL or --records FILE (one of them)")
    targets = load_targets(args.targets).targets if str(args.targets) not in ("", ".") else ()
    try:
        if args.records is not None:
            drawn, first, last, title, cohorts = from_records(_read_records_file(args.records))
        else:
            end = args.end if args.end is not None else time.time()
            start = args.start if args.start is not None else end - args.since
            if start >= end:
                parser.error("the range is empty: --start must be before --end")
            drawn, first, last, title, cohorts = from_prometheus(Prometheus(args.url), start, end)
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = render(drawn, args.output, first, last, title, targets, args.dpi, cohorts)
    for name, (series, points) in summary.items():
        print(f"{args.output / (name + '.png')}: {series} series, {points} points")
    print(f"{args.output / 'overview.png'}: all charts")
    if not any(series for series, _ in summary.values()):
        print("error: no chart got any data; check the URL, the range and that Prometheus "
              'scrapes the workers as job="stream-kpis" (or that the records hold KPIs)',
              file=sys.stderr)
        return 1
    return 0


def _read_records_file(path: Path) -> list[dict]:
    if str(path) == "-":
        return read_records(sys.stdin.buffer)
    try:
        with open(path, "rb") as handle:
            return read_records(handle)
    except OSError as error:
        raise RuntimeError(f"cannot read {path}: {error.strerror}") from None


if __name__ == "__main__":
    sys.exit(main())
