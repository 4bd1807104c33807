"""Tests of stream_kpis.live.metrics on a fresh CollectorRegistry per test."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.parser import text_string_to_metric_families

from stream_kpis.live.metrics import KPI_HELP, KpiCollector, WorkerMetrics, render_latest

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
    metrics.record_kpi_emission(now=1_700_000_010.0)

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
