"""Every PromQL query we ship runs on a real Prometheus against a real worker and finds data.

A Prometheus of its own (the Debian ``prometheus`` binary, on a free port, with its own
storage directory and a config written here) scrapes one ``stream-kpis worker`` every second
as ``job="stream-kpis"`` and evaluates the repository's rule file
(``deploy/prometheus/rules/stream-kpis.rules.yml``) every second. The worker reads a
generated stream (400 members, 120 days, event clock, points valid for 30 days, every segment
dimension with a segment_limit of 10, below the 40 stores of the generator) from the real
broker, in two batches: the first ends in as-of bucket K1, the second in K2 = K1 + 7 days. So
the exporter has evaluated the KPIs at K2 - 7d, which churn_reduction needs (a live exporter
only remembers the as-of buckets it evaluated at), and the counters and the latency histogram
rise between scrapes, which rate() and histogram_quantile() need.

Then every ``expr`` of the Grafana dashboard (``dashboard_queries``) and every query of the
rule file (``rule_queries``: each alert ``expr`` and the queries in annotations) goes through
``/api/v1/query``. Each must be accepted (``status: success``) and return at least one
series. The one exception is an expression that legitimately returns nothing while the system
is healthy: one that filters with a comparison (an alert condition such as ``x < 0.35`` that is
not violated, ``up == 0``), one built on ``absent(...)``, or one reading history older than
this Prometheus through ``offset`` (the relative goals). For those, each metric selector of
the expression (name and label matchers, ``offset`` dropped) is queried instead and must have
series: the expression is then known to read series that exist, which is all a healthy system
can show.

Besides, every ``loyalty_<kpi>`` gauge of the KPI catalogue and every operational
``stream_kpis_*`` metric of the contract must have been scraped, and ``/api/v1/rules`` must list
the rule file's groups with every rule's health ``ok``. Per segment dimension, Prometheus must
hold the segment_limit values (or all, if fewer) and count the others, as many as a replay of
the same events through the core has.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from stream_kpis.core import Processor
from stream_kpis.core.catalogue import KPIS, MEMBER_DIMENSIONS, SEGMENT_DIMENSIONS
from stream_kpis.core.events import DeadLetter, EventParser
from stream_kpis.core.timebase import as_of_time
from stream_kpis.generate import GeneratorConfig, write_jsonl
from stream_kpis.ops.alerts import ALL_KPIS, JOB, promql_metric_names, rule_queries
from stream_kpis.ops.dashboard import dashboard_queries
from stream_kpis.settings import Settings
from tests.integration.live import REPO, LiveStack, free_port, wait_until

RULES = REPO / "deploy" / "prometheus" / "rules" / "stream-kpis.rules.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "stream-kpis.json"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
#: The operational metrics of the contract, as Prometheus stores them.
OPERATIONAL_METRICS = (
    "stream_kpis_events_total", "stream_kpis_dead_letters_total", "stream_kpis_duplicates_total",
    "stream_kpis_processing_seconds_bucket", "stream_kpis_event_lag_seconds_bucket",
    "stream_kpis_watermark_lag_seconds", "stream_kpis_consumer_lag_messages",
    "stream_kpis_table_rows", "stream_kpis_kpi_emissions_total",
    "stream_kpis_last_emit_timestamp_seconds", "stream_kpis_global_exporter",
    "stream_kpis_signals_total", "stream_kpis_redis_errors_total",
    "stream_kpis_segment_values_dropped",
)  # fmt: skip
#: [kpis] segment_limit of the worker: fewer than the generator's 40 stores.
SEGMENT_LIMIT = 10
#: churn_reduction needs an evaluation exactly one window before the last one: this window.
HISTORY_WINDOW_DAYS = 7
#: How long the queries may take to see everything once the worker has caught up.
SETTLE_TIMEOUT_S = 45


class PrometheusServer:
    """A throwaway Prometheus on 127.0.0.1:``port`` with ``config`` (YAML text) in ``directory``."""

    def __init__(self, directory: Path, config: dict[str, Any]) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        directory.mkdir(parents=True, exist_ok=True)
        self.config_path = directory / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = directory / "prometheus.log"
        with open(self.log_path, "wb") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [PROMETHEUS, f"--config.file={self.config_path}",
                 f"--storage.tsdb.path={directory / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self._ready, 30, "Prometheus ready", self.log_tail)

    def _ready(self) -> bool:
        assert self.process.poll() is None, f"Prometheus exited:\n{self.log_tail()}"
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> dict[str, Any]:
        """The JSON answer of an API call; an HTTP error's JSON body (status "error") too."""
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            return json.load(error)

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("/api/v1/query", query=expr)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def prometheus_config(worker_ports: list[int]) -> dict[str, Any]:
    """Scrape the workers every second as job="stream-kpis"; evaluate the repo's rules."""
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{
            "job_name": JOB,
            "metrics_path": "/metrics",
            "static_configs": [{"targets": [f"127.0.0.1:{port}" for port in worker_ports]}],
        }],
    }  # fmt: skip


# --------------------------------------------------------------------------- PromQL text

_STRING = r'"(?:[^"\\]|\\.)*"|`[^`]*`'
_SELECTOR = re.compile(rf"{_STRING}|(?<![\w:.])([a-zA-Z_:][\w:]*)\s*(\{{[^}}]*\}})?")
_FILTERING = re.compile(r"\babsent\s*\(|\boffset\b|[<>!=]=|[<>]")


def may_be_empty(expr: str) -> bool:
    """True for an expression that returns nothing on a healthy system (see module docstring):
    a comparison, ``absent(...)`` or ``offset`` outside string literals and label matchers."""
    text = re.sub(_STRING, '""', expr)
    text = re.sub(r"\{[^}]*\}", "{}", text)
    return bool(_FILTERING.search(text))


def selectors(expr: str) -> list[str]:
    """The instant-vector selectors of ``expr`` (``name{matchers}``), without range or offset."""
    names = promql_metric_names(expr)
    found = []
    for match in _SELECTOR.finditer(expr):
        name, matchers = match.group(1), match.group(2)
        if name in names:
            found.append(name + (matchers or ""))
    return list(dict.fromkeys(found))


def has_data(answer: dict[str, Any]) -> bool:
    """A successful answer with at least one series (a scalar counts)."""
    if answer.get("status") != "success":
        return False
    data = answer["data"]
    return data["resultType"] == "scalar" or bool(data["result"])


@dataclass
class Check:
    """The outcome of one query: accepted, with data directly or through its selectors."""

    expr: str
    answer: dict[str, Any]
    empty_selectors: list[str]

    @property
    def accepted(self) -> bool:
        return self.answer.get("status") == "success"

    @property
    def ok(self) -> bool:
        if not self.accepted:
            return False
        if has_data(self.answer):
            return True
        return may_be_empty(self.expr) and not self.empty_selectors

    @property
    def via_selectors(self) -> bool:
        return self.accepted and not has_data(self.answer)


def check(prometheus: PrometheusServer, expr: str) -> Check:
    answer = prometheus.query(expr)
    empty: list[str] = []
    if answer.get("status") == "success" and not has_data(answer) and may_be_empty(expr):
        empty = [s for s in selectors(expr) if not has_data(prometheus.query(s))]
    return Check(expr, answer, empty)


def check_all(prometheus: PrometheusServer, exprs: list[str]) -> list[Check]:
    """Check every query, polling until all pass or SETTLE_TIMEOUT_S passes."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        checks = [check(prometheus, expr) for expr in exprs]
        if all(c.ok for c in checks) or time.monotonic() > deadline:
            return checks
        time.sleep(1)


def describe_failures(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        if not c.accepted:
            lines.append(f"REJECTED {c.expr}: {c.answer.get('error')}")
        elif not c.ok:
            detail = f" (selectors without series: {c.empty_selectors})" if c.empty_selectors else ""
            lines.append(f"NO DATA {c.expr}{detail}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the stream


def split_at_history_window(messages: list[tuple[str, bytes | None, bytes]], settings: Settings
                            ) -> tuple[list, list, int, int]:
    """Two batches whose newest valid events lie in buckets K1 and K2 = K1 + 7 days.

    K2 is the latest bucket such that both it and K2 - 7d hold a valid event. The first batch
    has every event up to K1 and every dead letter, the second the events in (K1, K2]; the few
    events after K2 are left out so that the last evaluation happens at K2.
    """
    parser = EventParser(settings.max_event_bytes, settings.max_skew_ms)
    bucket_ms = settings.bucket_ms
    buckets: list[int | None] = []
    for _, _, value in messages:
        item = parser.parse(value)
        buckets.append(None if isinstance(item, DeadLetter) else item.ts // bucket_ms)
    occupied = {b for b in buckets if b is not None}
    window = HISTORY_WINDOW_DAYS * 86_400_000 // bucket_ms
    k2 = max(b for b in occupied if b - window in occupied)
    k1 = k2 - window
    first = [m for m, b in zip(messages, buckets, strict=True) if b is None or b <= k1]
    second = [m for m, b in zip(messages, buckets, strict=True) if b is not None and k1 < b <= k2]
    return first, second, k1, k2


def wait_for_as_of(stack: LiveStack, bucket: int, timeout: float = 60) -> None:
    """Until the exporter has published a KPI record as of ``bucket``."""
    wanted = as_of_time(bucket, stack.settings.bucket_ms)
    consumer = stack.consumer([stack.settings.topics.kpi_churn])
    try:
        def seen() -> bool:
            return any(orjson.loads(m.value)["as_of"] == wanted for m in consumer)
        wait_until(seen, timeout, f"a KPI record as of {wanted}", stack.logs_tail)
    finally:
        consumer.close()


@dataclass
class Deployment:
    stack: LiveStack
    prometheus: PrometheusServer
    sent: list[tuple[str, bytes | None, bytes]]  # every message the worker read
    k2: int


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str
               ) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("prometheus")
    config = tmp / "stream-kpis.toml"
    segments = ", ".join(f'"{dimension}"' for dimension in SEGMENT_DIMENSIONS)
    config.write_text('[kpis]\npoints_validity = "30d"\n'  # expired points, breakage_rate
                      f"segments = [{segments}]\nsegment_limit = {SEGMENT_LIMIT}\n"
                      "[clv]\n")  # the CLV KPIs (SPEC 4.4) are on only with a [clv] table
    (tmp / "stack").mkdir()
    stack = LiveStack(tmp / "stack", kafka_bootstrap, extra_env={"STREAM_KPIS_CONFIG": str(config)})
    prometheus = None
    try:
        worker = stack.start_worker()
        prometheus = PrometheusServer(tmp / "prometheus", prometheus_config([worker.port]))
        events = tmp / "events.jsonl"
        write_jsonl(GeneratorConfig(members=400, days=120, seed=5), events)
        first, second, k1, k2 = split_at_history_window(stack.file_messages(events),
                                                         stack.settings)
        stack.send(first)
        wait_for_as_of(stack, k1, timeout=90)
        time.sleep(3)  # a few scrapes at K1, so that the second batch shows as an increase
        stack.send(second)
        wait_for_as_of(stack, k2)
        # The worker's gauges are set before its records reach Kafka: a scrape from now on
        # holds the final state.
        seen_at = time.time()
        scraped = f'timestamp(stream_kpis_global_exporter{{job="{JOB}"}}) > {seen_at}'
        wait_until(lambda: has_data(prometheus.query(scraped)), 30, "a scrape after K2",
                   prometheus.log_tail)
        yield Deployment(stack, prometheus, first + second, k2)
    finally:
        if prometheus is not None:
            prometheus.stop()
        stack.stop()


# --------------------------------------------------------------------------- tests


def test_every_kpi_gauge_and_operational_metric_is_scraped(deployment: Deployment) -> None:
    wanted = [f"loyalty_{kpi}" for kpi in sorted(ALL_KPIS)] + list(OPERATIONAL_METRICS)
    checks = check_all(deployment.prometheus, [f'{name}{{job="{JOB}"}}' for name in wanted])
    assert all(c.ok for c in checks), describe_failures(checks)


def test_dashboard_queries_run_and_find_data(deployment: Deployment) -> None:
    exprs = dashboard_queries(DASHBOARD.read_text())
    assert len(exprs) > 40
    checks = check_all(deployment.prometheus, exprs)
    assert all(c.ok for c in checks), describe_failures(checks)


def test_segment_values_beyond_the_limit_are_left_out_and_counted(deployment: Deployment
                                                                 ) -> None:
    """Per dimension: min(segment_limit, values) values in Prometheus, the rest counted in
    stream_kpis_segment_values_dropped; the values are those of the core on the same events."""
    settings = deployment.stack.settings
    assert settings.segments == SEGMENT_DIMENSIONS and settings.segment_limit == SEGMENT_LIMIT
    processor = Processor(settings)
    parser = EventParser(settings.max_event_bytes, settings.max_skew_ms)
    for _, _, value in deployment.sent:
        item = parser.parse(value)
        if not isinstance(item, DeadLetter):
            processor.process(item)
    values: dict[str, set[str]] = {dimension: set() for dimension in SEGMENT_DIMENSIONS}
    for record in processor.evaluate(deployment.k2):
        for dimension, value in record.get("labels", {}).items():
            if KPIS[record["kpi"]].segment is not None and dimension in values:
                values[dimension].add(value)
    assert len(values["store_id"]) > SEGMENT_LIMIT  # the limit is exercised

    def in_prometheus() -> dict[str, tuple[set[str], float | None]]:
        seen = {}
        for dimension in SEGMENT_DIMENSIONS:
            kind = "member" if dimension in MEMBER_DIMENSIONS else "order"
            names = "|".join(kpi.name for kpi in KPIS.values() if kpi.segment == kind)
            answer = deployment.prometheus.query(  # not new_members{channel}: its own label
                f'count by ({dimension}) '
                f'({{__name__=~"loyalty_({names})",job="{JOB}",{dimension}!=""}})')
            dropped = deployment.prometheus.query(
                f'stream_kpis_segment_values_dropped{{job="{JOB}",dimension="{dimension}"}}')
            seen[dimension] = ({r["metric"][dimension] for r in answer["data"]["result"]},
                               float(dropped["data"]["result"][0]["value"][1])
                               if dropped["data"]["result"] else None)
        return seen

    def as_expected() -> bool:
        return all(len(shown) == min(SEGMENT_LIMIT, len(values[d])) and shown <= values[d]
                   and dropped == len(values[d]) - len(shown)
                   for d, (shown, dropped) in in_prometheus().items())

    wait_until(as_expected, SETTLE_TIMEOUT_S, "segment values as the core has them",
               lambda: f"core: {values}\nprometheus: {in_prometheus()}")


@pytest.mark.parametrize("histogram", [
    "stream_kpis_processing_seconds",
    "stream_kpis_event_lag_seconds",
])  # fmt: skip
def test_latency_panels_draw_a_line(deployment: Deployment, histogram: str) -> None:
    """histogram_quantile over rate() is a number only when the buckets rose between scrapes;
    an empty histogram answers NaN, which passes as "data" but draws nothing."""
    exprs = [e for e in dashboard_queries(DASHBOARD.read_text())
             if e.startswith("histogram_quantile") and f"{histogram}_bucket" in e]
    assert len(exprs) == 2  # p50 and p99
    for expr in exprs:
        answer = deployment.prometheus.query(expr)
        values = [float(series["value"][1]) for series in answer["data"]["result"]]
        assert values and all(math.isfinite(v) for v in values), (expr, values)


def test_rule_queries_run_and_find_data(deployment: Deployment) -> None:
    exprs = rule_queries(yaml.safe_load(RULES.read_text()))
    assert len(exprs) > 20
    checks = check_all(deployment.prometheus, exprs)
    assert all(c.ok for c in checks), describe_failures(checks)


def test_rule_groups_are_loaded_and_healthy(deployment: Deployment) -> None:
    file_groups = yaml.safe_load(RULES.read_text())["groups"]
    wanted = {g["name"]: len(g["rules"]) for g in file_groups}

    def loaded() -> dict[str, list[dict]] | None:
        answer = deployment.prometheus.api("/api/v1/rules")
        groups = {g["name"]: g["rules"] for g in answer["data"]["groups"]}
        healthy = {name: rules for name, rules in groups.items()
                   if all(rule["health"] == "ok" for rule in rules)}
        return groups if healthy.keys() == wanted.keys() == groups.keys() else None

    groups = wait_until(loaded, 30, "every rule group evaluated with health ok",
                        lambda: json.dumps(deployment.prometheus.api("/api/v1/rules"))[:3000])
    assert {name: len(rules) for name, rules in groups.items()} == wanted
    for rules in groups.values():
        for rule in rules:
            assert rule["health"] == "ok" and not rule.get("lastError"), rule


def test_render_charts_draws_every_chart(deployment: Deployment, tmp_path: Path) -> None:
    """scripts/render_charts.py (query_range) writes a PNG with data for each main KPI."""
    script = REPO / "scripts" / "render_charts.py"
    done = subprocess.run([sys.executable, str(script), deployment.prometheus.url, "--since", "5m",
                           "--output", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    drawn = dict(re.findall(r"/([\w]+)\.png: (\d+) series", done.stdout))
    charts = {"active_rate", "redemption_rate", "churn_rate", "repeat_purchase_rate", "aov",
              "points_liability", "nps", "new_members", "cohort_retention"}
    assert drawn.keys() == charts
    assert int(drawn["aov"]) == 2 and int(drawn["new_members"]) >= 3, drawn  # member/guest, channels
    assert int(drawn["cohort_retention"]) >= 4, drawn  # 120 days: at least 4 enrollment months
    assert all(int(n) >= 1 for n in drawn.values()), drawn
    for name in [*charts, "overview"]:
        assert (tmp_path / f"{name}.png").read_bytes().startswith(b"\x89PNG")


def test_the_checks_can_fail(deployment: Deployment) -> None:
    """A query Prometheus rejects, a query without series and a filtering query over a metric
    that does not exist all fail the check; the selector parser finds names and matchers."""
    prometheus = deployment.prometheus
    assert not check(prometheus, 'sum(loyalty_members{job="stream-kpis"}').accepted
    assert not check(prometheus, 'loyalty_no_such_kpi{job="stream-kpis"}').ok
    missing = check(prometheus, 'max(loyalty_no_such_kpi{job="stream-kpis"}) < 1')
    assert not missing.ok and missing.empty_selectors == ['loyalty_no_such_kpi{job="stream-kpis"}']
    assert check(prometheus, 'max(loyalty_members{job="stream-kpis"}) < 0').ok
    expr = 'sum(rate(a_total{x="up > 1"}[5m])) / sum(b{y=~"c|d"} offset 1d) > 0 or absent(up)'
    assert selectors(expr) == ['a_total{x="up > 1"}', 'b{y=~"c|d"}', "up"]
    assert may_be_empty(expr) and not may_be_empty('max by (window) (x{w!="7d",v=~"a<b"})')
