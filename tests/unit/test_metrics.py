"""Tests of stream_kpis.live.metrics on a fresh CollectorRegistry per test."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.parser import text_string_to_metric_families

from stream_kpis.core.catalogue import KPIS
from stream_kpis.live.metrics import (
    KPI_HELP,
    SEGMENT_VALUES_DROPPED,
    KpiCollector,
    WorkerMetrics,
    render_latest,
)
from stream_kpis.settings import Settings

AS_OF = "2024-01-31T00:00:00Z"


def kpi(name, value, window=None, labels=None, numerator=None, denominator=None):
    record = {"kpi": name, "window": window, "as_of": AS_OF, "value": value,
              "numerator": numerator, "denominator": denominator}
    if labels is not None:
        record["labels"] = labels
    return record


RECORDS = [
    kpi("members", 12),
    kpi("active_rate", 0.25, "30d", numerator=3, denominator=12),
    kpi("active_rate", None, "7d", numerator=0, denominator=0),
    kpi("new_members", 4, "7d", {"channel": "web"}),
    kpi("new_members", 0, "7d", {"channel": "store"}),
    kpi("tier_members", 7, labels={"tier": "gold"}),
    kpi("feedback_mentions", 2, "30d", {"lexicon": "friction", "term": "long wait"}),
    kpi("breakage_rate", None),
]


@pytest.fixture
def registry():
    return CollectorRegistry()


@pytest.fixture
def metrics(registry):
    return WorkerMetrics(registry)


@pytest.fixture
def collector(registry, metrics):
    collector = KpiCollector(registry, worker_metrics=metrics, exporting=True)
    collector.update(RECORDS)
    return collector


def loyalty_samples(registry):
    return [sample for family in registry.collect() for sample in family.samples
            if sample.name.startswith("loyalty_")]


# -- WorkerMetrics --------------------------------------------------------------------------

def test_event_outcomes_keep_both_counters_in_step(registry, metrics):
    metrics.count_applied("loyalty.purchases", 5)
    metrics.count_applied("loyalty.purchases")
    metrics.count_duplicates("loyalty.purchases", 2)
    metrics.count_dead_letters("loyalty.surveys", "invalid_json")
    metrics.count_dead_letters("loyalty.purchases", "invalid_json", 3)
    metrics.count_dead_letter_reason("schema")

    def events(topic, outcome):
        return registry.get_sample_value("stream_kpis_events_total",
                                         {"topic": topic, "outcome": outcome})

    assert events("loyalty.purchases", "applied") == 6
    assert events("loyalty.purchases", "duplicate") == 2
    assert events("loyalty.purchases", "dead_letter") == 3
    assert events("loyalty.surveys", "dead_letter") == 1
    assert events("loyalty.surveys", "applied") is None
    assert registry.get_sample_value("stream_kpis_duplicates_total",
                                     {"topic": "loyalty.purchases"}) == 2
    assert registry.get_sample_value("stream_kpis_dead_letters_total",
                                     {"reason": "invalid_json"}) == 4
    assert registry.get_sample_value("stream_kpis_dead_letters_total",
                                     {"reason": "schema"}) == 1


def test_unknown_outcome_is_rejected(metrics):
    with pytest.raises(ValueError, match="outcome"):
        metrics.count_events("loyalty.purchases", "ignored")


def test_histograms_gauges_and_counters(registry, metrics):
    for seconds in (0.002, 0.004, 3.0):
        metrics.observe_batch(seconds)
    metrics.observe_event_lag(0.3)
    metrics.set_watermark_lag(1.5)
    metrics.set_consumer_lag("loyalty.purchases", 42)
    metrics.set_consumer_lag("loyalty.purchases", 40)
    metrics.set_table_rows("members", 1000)
    metrics.count_signal("at_risk", 3)
    metrics.count_signal("churned")
    metrics.count_redis_error()
    metrics.count_redis_error()
    metrics.record_kpi_emission(now=1_700_000_000.0)
    metrics.record_kpi_emission(now=1_700_000_010.0, seconds=0.25)
    metrics.set_partial_bytes(3, 1200)
    metrics.set_partial_bytes(3, 1100)

    get = registry.get_sample_value
    assert get("stream_kpis_processing_seconds_count") == 3
    assert get("stream_kpis_processing_seconds_sum") == pytest.approx(3.006)
    # 0.002 and 0.004 fall at or below the 0.005 bucket bound, 3.0 does not.
    assert get("stream_kpis_processing_seconds_bucket", {"le": "0.005"}) == 2
    assert get("stream_kpis_processing_seconds_bucket", {"le": "+Inf"}) == 3
    assert get("stream_kpis_event_lag_seconds_count") == 1
    assert get("stream_kpis_watermark_lag_seconds") == 1.5
    assert get("stream_kpis_consumer_lag_messages", {"topic": "loyalty.purchases"}) == 40
    assert get("stream_kpis_table_rows", {"table": "members"}) == 1000
    assert get("stream_kpis_signals_total", {"signal": "at_risk"}) == 3
    assert get("stream_kpis_signals_total", {"signal": "churned"}) == 1
    assert get("stream_kpis_redis_errors_total") == 2
    assert get("stream_kpis_kpi_emissions_total") == 2
    assert get("stream_kpis_last_emit_timestamp_seconds") == 1_700_000_010.0
    assert get("stream_kpis_kpi_evaluation_seconds") == 0.25
    assert get("stream_kpis_partial_bytes", {"partition": "3"}) == 1100


def test_worker_metrics_stay_off_the_global_registry(registry):
    from prometheus_client import REGISTRY

    WorkerMetrics(registry)
    WorkerMetrics(CollectorRegistry())  # a second worker in one process: no name clash
    assert REGISTRY.get_sample_value("stream_kpis_redis_errors_total") is None


# -- KpiCollector ---------------------------------------------------------------------------

def test_kpi_gauges_carry_window_and_record_labels(registry, collector):
    get = registry.get_sample_value
    assert get("loyalty_members") == 12
    assert get("loyalty_active_rate", {"window": "30d"}) == 0.25
    assert get("loyalty_new_members", {"window": "7d", "channel": "web"}) == 4
    assert get("loyalty_new_members", {"window": "7d", "channel": "store"}) == 0
    assert get("loyalty_tier_members", {"tier": "gold"}) == 7
    assert get("loyalty_feedback_mentions",
               {"window": "30d", "lexicon": "friction", "term": "long wait"}) == 2


def test_null_values_are_absent_not_nan(registry, collector):
    assert registry.get_sample_value("loyalty_active_rate", {"window": "7d"}) is None
    assert registry.get_sample_value("loyalty_breakage_rate") is None
    names = {family.name for family in registry.collect()}
    assert "loyalty_breakage_rate" not in names
    # 8 records, 2 null -> 6 samples, every one a finite number.
    samples = loyalty_samples(registry)
    assert len(samples) == 6
    assert all(sample.value == sample.value for sample in samples)  # NaN != NaN


def test_update_replaces_the_snapshot(registry, collector):
    collector.update([kpi("members", 13)])
    assert registry.get_sample_value("loyalty_members") == 13
    assert registry.get_sample_value("loyalty_active_rate", {"window": "30d"}) is None


def test_not_exporting_yields_no_kpi_gauges(registry, collector):
    collector.set_exporting(False)
    assert loyalty_samples(registry) == []
    assert registry.get_sample_value("stream_kpis_global_exporter") == 0
    collector.update(RECORDS)  # still updated while passive, but not exported
    assert loyalty_samples(registry) == []
    collector.set_exporting(True)
    assert registry.get_sample_value("stream_kpis_global_exporter") == 1
    assert registry.get_sample_value("loyalty_members") == 12


def test_collector_starts_passive(registry, metrics):
    collector = KpiCollector(registry, worker_metrics=metrics)
    collector.update(RECORDS)
    assert not collector.exporting
    assert loyalty_samples(registry) == []
    assert registry.get_sample_value("stream_kpis_global_exporter") == 0


@pytest.mark.parametrize("label", ["member", "member_id", "window", "store_id"])
def test_labels_outside_the_allowed_set_are_rejected(collector, label):
    with pytest.raises(ValueError, match=label):
        collector.update([kpi("tier_members", 1, labels={label: "m-1"})])


def test_invalid_kpi_name_is_rejected(collector):
    with pytest.raises(ValueError, match="metric name"):
        collector.update([kpi("active-rate", 1.0, "30d")])


def test_no_member_label_anywhere(registry, metrics, collector):
    metrics.count_applied("loyalty.purchases")
    metrics.count_duplicates("loyalty.purchases")
    metrics.count_dead_letters("loyalty.purchases", "schema")
    metrics.count_signal("at_risk")
    metrics.set_table_rows("members", 1)
    metrics.set_consumer_lag("loyalty.purchases", 0)
    label_names = {name for family in registry.collect() for sample in family.samples
                   for name in sample.labels}
    assert "window" in label_names  # the walk did see labelled samples
    assert not {"member", "member_id"} & label_names


def test_render_latest_is_parseable_text_with_help(registry, collector):
    text = render_latest(registry).decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert families["loyalty_active_rate"].documentation == KPI_HELP["active_rate"]
    assert families["loyalty_active_rate"].type == "gauge"
    assert [sample.labels for sample in families["loyalty_active_rate"].samples] == [
        {"window": "30d"}]
    assert "stream_kpis_global_exporter 1.0" in text


def test_collector_coexists_with_other_metrics(registry, collector):
    other = Gauge("some_other_gauge", "Unrelated.", registry=registry)
    other.set(3)
    assert registry.get_sample_value("some_other_gauge") == 3
    assert registry.get_sample_value("loyalty_members") == 12


# -- segments (SPEC 4.2) and cohorts (SPEC 4.3) ---------------------------------------------

def members_of(dimension, value, n):
    """The records of one member-dimension value: members (its rank) and an active rate."""
    return [kpi("members", n, labels={dimension: value}),
            kpi("active_rate", 0.5, "30d", {dimension: value}, n // 2, n)]


def orders_of(store, member_orders, guest_orders, window):
    """The aov records of one store in one window (their denominators are the store's orders)."""
    return [kpi("aov_member", 10.0 if member_orders else None, window, {"store_id": store},
                10.0 * member_orders, member_orders),
            kpi("aov_guest", 5.0 if guest_orders else None, window, {"store_id": store},
                5.0 * guest_orders, guest_orders)]


def test_segment_and_cohort_records_carry_their_labels(registry, metrics):
    collector = KpiCollector(registry, worker_metrics=metrics, exporting=True,
                             segments=("tier", "store_id"))
    collector.update([*RECORDS, *members_of("tier", "gold", 4), *orders_of("s1", 3, 1, "30d"),
                      kpi("cohort_size", 9, labels={"cohort": "2024-01"}),
                      kpi("cohort_retention", 0.5, labels={"age": "1", "cohort": "2024-01"},
                          numerator=3, denominator=6)])
    get = registry.get_sample_value
    assert get("loyalty_members") == 12 and get("loyalty_members", {"tier": "gold"}) == 4
    assert get("loyalty_active_rate", {"window": "30d", "tier": "gold"}) == 0.5
    assert get("loyalty_aov_member", {"window": "30d", "store_id": "s1"}) == 10.0
    assert get("loyalty_cohort_size", {"cohort": "2024-01"}) == 9
    assert get("loyalty_cohort_retention", {"cohort": "2024-01", "age": "1"}) == 0.5
    # nothing left out; a configured dimension without values reports 0 too
    assert get("stream_kpis_segment_values_dropped", {"dimension": "tier"}) == 0
    assert get("stream_kpis_segment_values_dropped", {"dimension": "store_id"}) == 0


def test_member_dimension_keeps_the_values_with_the_most_members(registry, metrics):
    collector = KpiCollector(registry, worker_metrics=metrics, exporting=True, segment_limit=2,
                             segments=("tier", "home_store"))
    records = [kpi("active_rate", 0.4, "30d"),
               *members_of("tier", "bronze", 1), *members_of("tier", "silver", 9),
               *members_of("tier", "unknown", 3), *members_of("tier", "gold", 5),
               *members_of("home_store", "s1", 2), *members_of("home_store", "s2", 2)]
    collector.update(records)
    shown = {labels["tier"] for labels, _ in _samples(registry, "loyalty_active_rate")
             if "tier" in labels}
    assert shown == {"silver", "gold"}  # 9 and 5 members; unknown (3) and bronze (1) left out
    assert {labels["tier"] for labels, _ in _samples(registry, "loyalty_members")
            if "tier" in labels} == shown
    get = registry.get_sample_value
    assert get("loyalty_active_rate", {"window": "30d"}) == 0.4  # the whole program, always
    assert get("stream_kpis_segment_values_dropped", {"dimension": "tier"}) == 2
    assert get("stream_kpis_segment_values_dropped", {"dimension": "home_store"}) == 0
    # the next update replaces the count
    collector.update(members_of("tier", "gold", 5))
    assert get("stream_kpis_segment_values_dropped", {"dimension": "tier"}) == 0


def test_order_dimension_keeps_the_values_with_the_most_orders_in_the_longest_window(
        registry, metrics):
    collector = KpiCollector(registry, worker_metrics=metrics, exporting=True, segment_limit=2,
                             segments=("store_id",))
    # 30d orders (member + guest): a 10 + 0, b 4 + 8 = 12, c 11 + 0, d 0 + 11 (ties c by name);
    # the 7d window ranks the other way round, and "7d" > "30d" as text: the longest must win
    records = [*orders_of("a", 10, 0, "30d"), *orders_of("b", 4, 8, "30d"),
               *orders_of("c", 11, 0, "30d"), *orders_of("d", 0, 11, "30d"),
               *orders_of("a", 9, 9, "7d"), *orders_of("b", 1, 0, "7d"),
               *orders_of("c", 1, 0, "7d"), *orders_of("d", 0, 1, "7d"),
               kpi("member_spend_lift", 1.0, "30d", {"store_id": "a"}, 10.0, 5.0)]
    collector.update(records)
    shown = {labels["store_id"] for name in ("loyalty_aov_member", "loyalty_aov_guest",
                                             "loyalty_member_spend_lift")
             for labels, _ in _samples(registry, name)}
    assert shown == {"b", "c"}
    assert registry.get_sample_value("stream_kpis_segment_values_dropped",
                                     {"dimension": "store_id"}) == 2


def test_own_labels_are_not_segments(registry, metrics):
    """new_members{channel} and tier_members{tier} are never cut by segment_limit."""
    collector = KpiCollector(registry, worker_metrics=metrics, exporting=True, segment_limit=1,
                             segments=("channel", "tier"))
    collector.update([kpi("new_members", n, "7d", {"channel": c}) for n, c in enumerate("abc")]
                     + [kpi("tier_members", 1, labels={"tier": t}) for t in ("x", "y")])
    assert len(_samples(registry, "loyalty_new_members")) == 3
    assert len(_samples(registry, "loyalty_tier_members")) == 2
    assert registry.get_sample_value("stream_kpis_segment_values_dropped",
                                     {"dimension": "channel"}) == 0


def test_dropped_gauge_follows_the_exporter_role(registry, metrics):
    collector = KpiCollector(registry, worker_metrics=metrics, segment_limit=1,
                             segments=("tier",))
    collector.update([*members_of("tier", "a", 1), *members_of("tier", "b", 2)])
    assert registry.get_sample_value("stream_kpis_segment_values_dropped",
                                     {"dimension": "tier"}) is None  # passive: nothing
    collector.set_exporting(True)
    assert registry.get_sample_value("stream_kpis_segment_values_dropped",
                                     {"dimension": "tier"}) == 1
    plain = KpiCollector(CollectorRegistry(), exporting=True)  # no segments configured
    plain.update(RECORDS)
    assert SEGMENT_VALUES_DROPPED not in {family.name for family in plain.collect()}


@pytest.mark.parametrize("name, labels", [
    ("aov_member", {"tier": "gold"}),          # a member dimension on an order KPI
    ("members", {"store_id": "s1"}),           # an order dimension on a member KPI
    ("nps", {"tier": "gold"}),                 # a KPI that is never segmented
    ("cohort_size", {"cohort": "2024-01", "member_id": "m-1"}),
])
def test_segment_labels_only_on_their_kind_of_kpi(collector, name, labels):
    with pytest.raises(ValueError, match="not allowed"):
        collector.update([kpi(name, 1.0, "30d" if KPIS[name].windowed else None, labels)])


def test_segment_limit_must_be_positive(registry):
    with pytest.raises(ValueError, match="segment_limit"):
        KpiCollector(registry, segment_limit=0)


def _samples(registry, name):
    return [(sample.labels, sample.value) for family in registry.collect()
            for sample in family.samples if sample.name == name]


def test_collector_for_settings_takes_the_segment_settings(registry):
    settings = Settings(segments=("tier",), segment_limit=1)
    collector = KpiCollector.for_settings(settings, registry)
    assert not collector.exporting
    collector.set_exporting(True)
    collector.update([*members_of("tier", "a", 1), *members_of("tier", "b", 2)])
    assert {labels["tier"] for labels, _ in _samples(registry, "loyalty_members")} == {"b"}
    assert registry.get_sample_value("stream_kpis_segment_values_dropped",
                                     {"dimension": "tier"}) == 1
