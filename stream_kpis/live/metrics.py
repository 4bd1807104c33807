"""Prometheus metrics of a stream-kpis worker, always on an injected registry.

Two kinds of metrics live here (names fixed by the project contract):

* ``WorkerMetrics``: per-worker operational metrics (``stream_kpis_*``) -- events by topic
  and outcome, dead letters, duplicates, latency histograms, lags, table sizes, emissions,
  signals, Redis errors. Its methods are called from the hot path, so labelled children are
  cached in dicts instead of calling ``.labels()`` for every event.
* ``KpiCollector``: a custom collector that turns the latest list of KPI records into
  ``loyalty_<kpi>`` gauges *at scrape time*. Only the worker holding the global-exporter role
  exports them; ``set_exporting(False)`` makes ``collect()`` yield nothing, so a worker that
  loses the role stops exporting immediately. ``set_exporting`` is also the one place that
  sets ``stream_kpis_global_exporter``. Segmented records (SPEC 4.2) carry their dimension as a
  label (``loyalty_active_rate{window="30d", tier="gold"}``); per dimension at most
  ``segment_limit`` values are exported, and ``stream_kpis_segment_values_dropped{dimension}``
  says how many were left out.

Nothing here touches the process-global ``prometheus_client.REGISTRY`` unless it is passed
in explicitly.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from ..core.catalogue import (
    CATALOGUE,
    KPIS,
    MEMBER_DIMENSIONS,
    ORDER_DIMENSIONS,
    SEGMENT_DIMENSIONS,
    label_names,
)
from ..core.timebase import parse_duration

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = [
    "CONTENT_TYPE_LATEST",
    "EVENT_OUTCOMES",
    "KPI_HELP",
    "KPI_LABEL_NAMES",
    "SEGMENT_VALUES_DROPPED",
    "KpiCollector",
    "WorkerMetrics",
    "render_latest",
]

EVENT_OUTCOMES = frozenset({"applied", "duplicate", "dead_letter"})

# The only label names a loyalty_* gauge may carry (SPEC section 6: low-cardinality labels
# only): ``window``, the labels the catalogue gives the KPIs and the segment dimensions (SPEC
# 4.2, each bounded by segment_limit). Anything else -- above all a member id -- is rejected in
# KpiCollector.update().
KPI_LABEL_NAMES = frozenset({"window"}) | label_names() | frozenset(SEGMENT_DIMENSIONS)
#: The gauge of the segment values left out of the loyalty_* gauges, by dimension.
SEGMENT_VALUES_DROPPED = "stream_kpis_segment_values_dropped"
#: What ranks a segment value: for a member dimension the value's member count; for an order
#: dimension its orders (member + guest) in the longest window, the denominators of these KPIs.
_MEMBER_RANK_KPI = "members"
_ORDER_RANK_KPIS = ("aov_member", "aov_guest")

# Per-batch processing time: sub-millisecond batches up to a stalled 10 s batch.
PROCESSING_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                      2.5, 5.0, 10.0)
# Event lag (wall clock - event ts): live traffic is sub-second, a catch-up is hours behind.
EVENT_LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                     900.0, 3600.0, 21600.0, 86400.0)

#: Prometheus HELP text of each ``loyalty_<kpi>`` gauge, from the KPI catalogue.
KPI_HELP: dict[str, str] = {kpi.name: kpi.help for kpi in CATALOGUE}

_METRIC_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


class WorkerMetrics:
    """The operational ``stream_kpis_*`` metrics of one worker, on ``registry``.

    The metric objects are public attributes (``events``, ``dead_letters``, ``duplicates``,
    ``processing_seconds``, ``event_lag_seconds``, ``watermark_lag_seconds``,
    ``consumer_lag_messages``, ``table_rows``, ``kpi_emissions``, ``last_emit_timestamp``,
    ``global_exporter``, ``signals``, ``redis_errors``, ``partial_bytes``,
    ``kpi_evaluation_seconds``); the methods are the intended way to
    update them. The outcome methods keep the counters consistent: a duplicate counts in
    both ``events_total{outcome="duplicate"}`` and ``duplicates_total``, a dead letter in
    both ``events_total{outcome="dead_letter"}`` and ``dead_letters_total``.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.events = Counter(
            "stream_kpis_events", "Input events by topic and outcome.",
            ["topic", "outcome"], registry=registry)
        self.dead_letters = Counter(
            "stream_kpis_dead_letters", "Events sent to the dead-letter topic, by reason.",
            ["reason"], registry=registry)
        self.duplicates = Counter(
            "stream_kpis_duplicates", "Duplicate events ignored, by topic.",
            ["topic"], registry=registry)
        self.processing_seconds = Histogram(
            "stream_kpis_processing_seconds", "Processing time per event batch.",
            registry=registry, buckets=PROCESSING_BUCKETS)
        self.event_lag_seconds = Histogram(
            "stream_kpis_event_lag_seconds",
            "Wall clock at processing minus event timestamp (live events).",
            registry=registry, buckets=EVENT_LAG_BUCKETS)
        self.watermark_lag_seconds = Gauge(
            "stream_kpis_watermark_lag_seconds",
            "Wall clock now minus the largest event timestamp seen.", registry=registry)
        self.consumer_lag_messages = Gauge(
            "stream_kpis_consumer_lag_messages",
            "Highwater minus consumer position, summed over the topic's assigned partitions.",
            ["topic"], registry=registry)
        self.table_rows = Gauge(
            "stream_kpis_table_rows", "Rows in a worker table.", ["table"], registry=registry)
        self.assigned_partitions = Gauge(
            "stream_kpis_assigned_partitions",
            "Input partitions this worker owns (per input topic).", registry=registry)
        self.kpi_emissions = Counter(
            "stream_kpis_kpi_emissions", "KPI evaluations published.", registry=registry)
        self.last_emit_timestamp = Gauge(
            "stream_kpis_last_emit_timestamp_seconds",
            "Unix time of the last KPI emission.", registry=registry)
        self.global_exporter = Gauge(
            "stream_kpis_global_exporter",
            "1 on the one worker exporting the loyalty_* KPI gauges, else 0.", registry=registry)
        self.signals = Counter(
            "stream_kpis_signals", "Member signals emitted, by signal.",
            ["signal"], registry=registry)
        self.redis_errors = Counter(
            "stream_kpis_redis_errors", "Failed Redis read-model writes.", registry=registry)
        self.lost_commits = Counter(
            "stream_kpis_lost_commits",
            "Batch transactions that did not commit (reason: fenced by a newer owner, or error);"
            " the partition's state is then recovered from its state log.",
            ["reason"], registry=registry)
        self.partial_bytes = Gauge(
            "stream_kpis_partial_bytes",
            "Size of the last partial this worker published for an input partition (its "
            "aggregates for the exporter, compressed).", ["partition"], registry=registry)
        self.kpi_evaluation_seconds = Gauge(
            "stream_kpis_kpi_evaluation_seconds",
            "Time the last KPI emission took to merge the partials and evaluate every KPI.",
            registry=registry)
        self.stalled_partitions = Gauge(
            "stream_kpis_stalled_partitions",
            "Input partitions this worker is assigned that have lag but made no progress for "
            "several emit intervals.", registry=registry)

        # Labelled children cached by label values: .labels() costs a lock and a dict
        # lookup with tuple building on every call, which adds up per event.
        self._event_children: dict[tuple[str, str], Any] = {}
        self._dead_letter_children: dict[str, Any] = {}
        self._duplicate_children: dict[str, Any] = {}
        self._signal_children: dict[str, Any] = {}
        self._consumer_lag_children: dict[str, Any] = {}
        self._table_children: dict[str, Any] = {}

    # -- counters on the hot path -------------------------------------------------------

    def count_events(self, topic: str, outcome: str, n: int = 1) -> None:
        """Add ``n`` to ``stream_kpis_events_total{topic, outcome}`` only.

        Prefer ``count_applied`` / ``count_duplicates`` / ``count_dead_letters``, which also
        keep ``duplicates_total`` and ``dead_letters_total`` in step.
        """
        key = (topic, outcome)
        child = self._event_children.get(key)
        if child is None:
            if outcome not in EVENT_OUTCOMES:
                raise ValueError(
                    f"unknown event outcome {outcome!r}; use one of {sorted(EVENT_OUTCOMES)}")
            child = self._event_children[key] = self.events.labels(topic, outcome)
        child.inc(n)

    def count_applied(self, topic: str, n: int = 1) -> None:
        """Count ``n`` events of ``topic`` applied to the state."""
        self.count_events(topic, "applied", n)

    def count_duplicates(self, topic: str, n: int = 1) -> None:
        """Count ``n`` duplicate events of ``topic`` (events_total and duplicates_total)."""
        self.count_events(topic, "duplicate", n)
        _cached_child(self._duplicate_children, self.duplicates, topic).inc(n)

    def count_dead_letters(self, topic: str, reason: str, n: int = 1) -> None:
        """Count ``n`` events of ``topic`` sent to the DLQ for ``reason``."""
        self.count_events(topic, "dead_letter", n)
        self.count_dead_letter_reason(reason, n)

    def count_dead_letter_reason(self, reason: str, n: int = 1) -> None:
        """Add ``n`` to ``dead_letters_total{reason}`` only (no topic known, e.g. replay)."""
        _cached_child(self._dead_letter_children, self.dead_letters, reason).inc(n)

    def count_signal(self, signal: str, n: int = 1) -> None:
        """Count ``n`` member signals of kind ``signal`` (at_risk, churned, reactivated)."""
        _cached_child(self._signal_children, self.signals, signal).inc(n)

    def count_lost_commit(self, reason: str) -> None:
        """Count one batch transaction that did not commit (``fenced`` or ``error``)."""
        self.lost_commits.labels(reason).inc()

    def count_redis_error(self, n: int = 1) -> None:
        """Count a failed Redis read-model write (pass as ``ReadModel(on_error=...)``)."""
        self.redis_errors.inc(n)

    # -- histograms ---------------------------------------------------------------------

    def observe_batch(self, seconds: float) -> None:
        """Record the processing time of one event batch."""
        self.processing_seconds.observe(seconds)

    def observe_event_lag(self, seconds: float) -> None:
        """Record wall clock at processing minus the event timestamp of one live event."""
        self.event_lag_seconds.observe(seconds)

    # -- gauges -------------------------------------------------------------------------

    def set_watermark_lag(self, seconds: float) -> None:
        """Set wall clock now minus the largest event timestamp seen."""
        self.watermark_lag_seconds.set(seconds)

    def set_consumer_lag(self, topic: str, messages: int) -> None:
        """Set highwater minus position, summed over the topic's assigned partitions."""
        _cached_child(self._consumer_lag_children, self.consumer_lag_messages, topic).set(
            messages)

    def set_table_rows(self, table: str, rows: int) -> None:
        """Set the number of rows in worker table ``table`` (e.g. ``members``)."""
        _cached_child(self._table_children, self.table_rows, table).set(rows)

    def record_kpi_emission(self, now: float | None = None, seconds: float | None = None) -> None:
        """Count one published KPI evaluation and stamp its unix time (default: now); with
        ``seconds``, the time its evaluation took."""
        self.kpi_emissions.inc()
        self.last_emit_timestamp.set(time.time() if now is None else now)
        if seconds is not None:
            self.kpi_evaluation_seconds.set(seconds)

    def set_partial_bytes(self, partition: int, size: int) -> None:
        self.partial_bytes.labels(str(partition)).set(size)


def _cached_child(cache: dict[str, Any], metric: Any, label_value: str) -> Any:
    """The child of single-label ``metric`` for ``label_value``, created once."""
    child = cache.get(label_value)
    if child is None:
        child = cache[label_value] = metric.labels(label_value)
    return child


# One exported sample: (labels, value).
_Sample = tuple[dict[str, str], float]


class KpiCollector(Collector):
    """``loyalty_<kpi>`` gauges built at scrape time from the latest KPI records.

    ``update(records)`` replaces the whole snapshot; ``collect()`` (run by the scrape
    thread) reads it under a lock. Records whose value is null are skipped, so a gauge is
    absent rather than NaN. While ``exporting`` is False, ``collect()`` yields nothing.

    Pass ``registry`` to register the collector there, and ``worker_metrics`` so that
    ``set_exporting`` also sets ``stream_kpis_global_exporter`` -- the single place where
    the role is switched.

    Segments (SPEC 4.2): of each dimension, the ``segment_limit`` values with the most members
    (member dimensions: the value's ``members`` record) or the most orders in the longest window
    (order dimensions: the denominators of its ``aov_member`` and ``aov_guest`` records) are
    exported, ties by value name; the records of the others are left out, and
    ``stream_kpis_segment_values_dropped{dimension}`` is their number at the last update, for
    every dimension in ``segments`` (the settings' dimensions) or seen in the records. It is a
    gauge, not a counter: what is left out is a state of the latest snapshot, back to 0 once a
    dimension shrinks under the limit, whereas a count per update would grow with the emit
    interval rather than with what is hidden.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        worker_metrics: WorkerMetrics | None = None,
        exporting: bool = False,
        segment_limit: int = 50,
        segments: Iterable[str] = (),
    ) -> None:
        if segment_limit < 1:
            raise ValueError(f"segment_limit must be >= 1, got {segment_limit}")
        self._lock = threading.Lock()
        self._snapshot: dict[str, list[_Sample]] = {}
        self._segment_limit = segment_limit
        self._dimensions = tuple(segments)
        self._dropped: dict[str, int] = dict.fromkeys(self._dimensions, 0)
        self._worker_metrics = worker_metrics
        self._exporting = False
        self.set_exporting(exporting)
        if registry is not None:
            registry.register(self)

    @classmethod
    def for_settings(cls, settings: Settings, registry: CollectorRegistry | None = None, *,
                     worker_metrics: WorkerMetrics | None = None) -> KpiCollector:
        """A passive collector with the settings' ``segment_limit`` and ``segments``."""
        return cls(registry, worker_metrics=worker_metrics, segment_limit=settings.segment_limit,
                   segments=settings.segments)

    @property
    def exporting(self) -> bool:
        """Whether this worker currently exports the loyalty_* gauges."""
        return self._exporting

    def set_exporting(self, exporting: bool) -> None:
        """Take (True) or give up (False) the global-exporter role."""
        with self._lock:
            self._exporting = bool(exporting)
        if self._worker_metrics is not None:
            self._worker_metrics.global_exporter.set(1 if exporting else 0)

    def update(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Replace the snapshot with ``records`` (KPI record dicts of SPEC section 6).

        Raises ``ValueError`` for a KPI name that is not a valid metric name or a label
        outside ``KPI_LABEL_NAMES`` or not for that KPI (a member id must never become a
        label).
        """
        records = list(records)
        segments = [_segment_of(record) for record in records]
        kept, dropped = self._kept_segment_values(records, segments)
        snapshot: dict[str, list[_Sample]] = {}
        for record, segment in zip(records, segments, strict=True):
            kpi = record["kpi"]
            if not _METRIC_NAME.match(kpi):
                raise ValueError(f"KPI name {kpi!r} is not a valid Prometheus metric name")
            labels = _gauge_labels(record)  # validated even when the value is null
            value = record.get("value")
            if value is None or not math.isfinite(value):
                continue  # null KPI: no sample at all (never NaN)
            if segment is not None and segment not in kept:
                continue  # beyond segment_limit: counted in SEGMENT_VALUES_DROPPED
            snapshot.setdefault(kpi, []).append((labels, float(value)))
        with self._lock:
            self._snapshot = snapshot
            self._dropped = dropped

    def _kept_segment_values(self, records: list[Mapping[str, Any]],
                             segments: list[tuple[str, str] | None]
                             ) -> tuple[set[tuple[str, str]], dict[str, int]]:
        """The (dimension, value) pairs within ``segment_limit``, and the number left out
        per dimension."""
        longest = max((parse_duration(r["window"]) for r in records
                       if r["kpi"] in _ORDER_RANK_KPIS and r.get("window")), default=None)
        ranks: dict[tuple[str, str], float] = {}
        for record, segment in zip(records, segments, strict=True):
            if segment is None:
                continue
            rank = ranks.setdefault(segment, 0)
            if segment[0] in MEMBER_DIMENSIONS:
                if record["kpi"] == _MEMBER_RANK_KPI:
                    ranks[segment] = rank + (record.get("value") or 0)
            elif (record["kpi"] in _ORDER_RANK_KPIS and record.get("window")
                    and parse_duration(record["window"]) == longest):
                ranks[segment] = rank + (record.get("denominator") or 0)
        by_dimension: dict[str, list[str]] = {dimension: [] for dimension in self._dimensions}
        for dimension, value in ranks:
            by_dimension.setdefault(dimension, []).append(value)
        kept: set[tuple[str, str]] = set()
        dropped: dict[str, int] = {}
        for dimension, values in by_dimension.items():
            values.sort(key=lambda v: (-ranks[(dimension, v)], v))
            kept.update((dimension, v) for v in values[:self._segment_limit])
            dropped[dimension] = max(0, len(values) - self._segment_limit)
        return kept, dropped

    def describe(self) -> list[Metric]:
        """Nothing up front: the gauge names depend on the records (avoids a collect())."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Yield one gauge family per KPI with at least one non-null value."""
        with self._lock:
            if not self._exporting:
                return
            snapshot, dropped = self._snapshot, self._dropped
        for kpi, samples in snapshot.items():
            name = f"loyalty_{kpi}"
            family = Metric(name, KPI_HELP.get(kpi, f"Loyalty KPI {kpi}."), "gauge")
            for labels, value in samples:
                family.add_sample(name, labels, value)
            yield family
        if dropped:
            family = Metric(SEGMENT_VALUES_DROPPED,
                            "Segment values of a dimension left out of the loyalty_* gauges at "
                            "the last KPI update ([kpis] segment_limit).", "gauge")
            for dimension, n in sorted(dropped.items()):
                family.add_sample(SEGMENT_VALUES_DROPPED, {"dimension": dimension}, n)
            yield family


def _segment_of(record: Mapping[str, Any]) -> tuple[str, str] | None:
    """(dimension, value) of a segmented record (SPEC 4.2): a segment dimension among its
    labels that is not one of the KPI's own (``new_members{channel}`` is not a segment)."""
    labels = record.get("labels")
    if not labels:
        return None
    kpi = KPIS.get(record["kpi"])
    own = kpi.labels if kpi is not None else ()
    for name, value in labels.items():
        if name in SEGMENT_DIMENSIONS and name not in own:
            return name, str(value)
    return None


def _allowed_labels(kpi_name: str) -> frozenset[str]:
    """The record labels a loyalty_<kpi> gauge may carry: the KPI's own, and the dimensions of
    its segment kind; any of KPI_LABEL_NAMES for a KPI the catalogue does not know."""
    kpi = KPIS.get(kpi_name)
    if kpi is None:
        return KPI_LABEL_NAMES - {"window"}
    return _KPI_LABELS[kpi.name]


_DIMENSIONS_OF_KIND = {None: (), "member": MEMBER_DIMENSIONS, "order": ORDER_DIMENSIONS}
_KPI_LABELS = {kpi.name: frozenset(kpi.labels) | frozenset(_DIMENSIONS_OF_KIND[kpi.segment])
               for kpi in CATALOGUE}


def _gauge_labels(record: Mapping[str, Any]) -> dict[str, str]:
    """Prometheus labels of a KPI record: ``window`` (if not null) plus its own labels."""
    labels: dict[str, str] = {}
    window = record.get("window")
    if window is not None:
        labels["window"] = str(window)
    allowed = _allowed_labels(record["kpi"])
    for name, value in (record.get("labels") or {}).items():
        if name not in allowed or name not in KPI_LABEL_NAMES:
            raise ValueError(
                f"label {name!r} of KPI {record['kpi']!r} is not allowed on a loyalty_* gauge; "
                f"allowed record labels: {sorted(allowed & KPI_LABEL_NAMES)}")
        labels[name] = str(value)
    return labels


def render_latest(registry: CollectorRegistry) -> bytes:
    """The text exposition of ``registry`` for the ``/metrics`` endpoint.

    Serve it with ``Content-Type: CONTENT_TYPE_LATEST``.
    """
    return generate_latest(registry)
