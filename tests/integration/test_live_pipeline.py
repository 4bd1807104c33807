"""The live pipeline on the real broker (and Redis) gives what replay gives on the same file.

One generated stream (members, guests, late and duplicate events, malformed lines) is produced
to Kafka; the KPI records the worker publishes must equal ``stream-kpis replay`` of the file,
which the property tests tie to the brute-force oracle. churn_reduction is left out of the
comparison: it is defined by the evaluation history, which differs between a live worker
(every emit interval) and a replay (every bucket).
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import orjson
import pytest
import redis

from stream_kpis.core import Processor, member_status
from stream_kpis.core.events import Event, EventParser
from stream_kpis.generate import GeneratorConfig, write_jsonl
from stream_kpis.live.readmodel import at_risk_members, read_kpi, read_member
from stream_kpis.replay import replay, source_for_path
from tests.integration.live import LiveStack, expected_kpis, records_equal

DAY = 86_400_000


@pytest.fixture(scope="module")
def stream_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gen") / "events.jsonl"
    write_jsonl(GeneratorConfig(members=400, days=120, seed=11), path)
    return path


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory, kafka_bootstrap, redis_url, stream_file):
    stack = LiveStack(tmp_path_factory.mktemp("one"), kafka_bootstrap, redis_url, store="rocksdb://")
    worker = stack.start_worker()
    stack.produce([stream_file])
    expected = expected_kpis(stream_file, stack.settings)
    latest = stack.wait_for_kpis(expected)
    yield stack, worker, expected, latest
    stack.stop()


def test_live_kpis_equal_replay(one_worker):
    stack, _, expected, latest = one_worker
    assert len(expected) > 200
    for record in expected:
        got = latest[(record["kpi"], record["window"], tuple(sorted(record.get("labels", {}).items())))]
        assert records_equal(got, record), (got, record)


def test_dead_letters_carry_reason_and_source(one_worker, stream_file):
    stack, worker, _, _ = one_worker
    bad = sum(replay([source_for_path(stream_file)], stack.settings).dead_letters.values())
    assert bad > 0
    deadline = time.monotonic() + 30
    while True:
        records = stack.read_topic(stack.settings.topics.dlq)
        if len(records) >= bad or time.monotonic() > deadline:
            break
    assert len(records) == bad
    for record in records:
        assert record["reason"] and record["topic"] in stack.settings.topics.inputs().values()
        assert isinstance(record["partition"], int) and isinstance(record["offset"], int)
        assert "value" in record or "value_base64" in record
    assert worker.sample("stream_kpis_dead_letters_total", 'reason="malformed_json"') or any(
        worker.sample("stream_kpis_dead_letters_total", f'reason="{r["reason"]}"')
        for r in records)


def test_metrics_endpoint_exports_gauges_without_member_ids(one_worker):
    stack, worker, expected, _ = one_worker
    members = next(r["value"] for r in expected if r["kpi"] == "members")
    assert worker.sample("loyalty_members") == members
    active = next(r for r in expected if r["kpi"] == "active_rate" and r["window"] == "30d")
    assert worker.sample("loyalty_active_rate", 'window="30d"') == pytest.approx(active["value"])
    assert worker.sample("stream_kpis_global_exporter") == 1.0
    text = worker.metrics()
    assert "member_id" not in text and 'm-0' not in text
    assert "stream_kpis_processing_seconds_bucket" in text


def test_redis_read_model_holds_kpis_and_members(one_worker, redis_url, stream_file):
    stack, _, expected, _ = one_worker
    client = redis.Redis.from_url(redis_url)
    prefix = stack.settings.redis_prefix
    members = next(r for r in expected if r["kpi"] == "members")
    deadline = time.monotonic() + 30
    while (read_kpi(client, prefix, "members", None) or {}).get("as_of") != members["as_of"]:
        assert time.monotonic() < deadline, read_kpi(client, prefix, "members", None)
        time.sleep(0.5)
    assert read_kpi(client, prefix, "members", None)["value"] == members["value"]

    # member statuses computed by the core over the same file
    parser = EventParser()
    processor = Processor(stack.settings)
    for line in stream_file.read_bytes().splitlines():
        item = parser.parse(line)
        if isinstance(item, Event):
            processor.process(item)
    some = sorted(processor.members)[:20]
    for member_id in some:
        stored = read_member(client, prefix, member_id)
        assert stored is not None, member_id
        want = member_status(processor.members[member_id], processor.K, stack.settings)
        assert stored["tier"] == want["tier"]
        assert stored["last_touch"] == want["last_touch"]
    at_risk = {m for m, _ in at_risk_members(client, prefix, 100_000)}
    assert at_risk, "a 120-day stream with churners has at-risk members"


def test_signals_fire_when_the_clock_passes_thresholds(tmp_path, kafka_bootstrap):
    config = tmp_path / "kpis.toml"
    config.write_text('[kpis]\npoints_validity = "30d"\npoints_expiring_notice = "7d"\n')
    stack = LiveStack(tmp_path, kafka_bootstrap, partitions=1,
                      extra_env={"STREAM_KPIS_CONFIG": str(config)})
    t0 = 1_704_067_200_000

    def event(kind, eid, member, day, **fields):
        body = {"type": kind, "event_id": eid, "member_id": member, "ts": t0 + day * DAY, **fields}
        return kind, member.encode(), orjson.dumps(body)

    stack.produce_raw([
        event("enrollment", "e-a", "sig-a", 0),
        event("purchase", "p-a", "sig-a", 0, amount=10, points=100),
        event("purchase", "p-b1", "sig-b", 25, amount=10),   # a's 100 points expire on day 30
        event("purchase", "p-b2", "sig-b", 61, amount=10),   # a untouched for 61 days: at risk
        event("purchase", "p-b3", "sig-b", 91, amount=10),   # 91 days: churned
        event("purchase", "p-a2", "sig-a", 92, amount=10),   # a is back: reactivated
    ])
    stack.start_worker()
    try:
        deadline = time.monotonic() + 90
        while True:
            signals = [s for s in stack.read_topic(stack.settings.topics.signals)
                       if s["member_id"] == "sig-a"]
            if len(signals) >= 4 or time.monotonic() > deadline:
                break
        assert [s["signal"] for s in signals] == ["points_expiring", "at_risk", "churned",
                                                  "reactivated"], stack.logs_tail()
        assert signals[0]["points"] == 100
        assert signals[0]["expires_at"] == "2024-01-31T00:00:00Z"
        assert signals[1]["last_touch"] == "2024-01-01T00:00:00Z"
    finally:
        stack.stop()


def test_two_workers_give_the_same_kpis_as_one(tmp_path, kafka_bootstrap, stream_file):
    stack = LiveStack(tmp_path, kafka_bootstrap)
    first, second = stack.start_worker(), stack.start_worker()
    try:
        deadline = time.monotonic() + 90
        while sorted(w.sample("stream_kpis_assigned_partitions") or 0 for w in (first, second)) != [2, 2]:
            assert time.monotonic() < deadline, stack.logs_tail()
            time.sleep(0.5)
        stack.produce([stream_file])
        stack.wait_for_kpis(expected_kpis(stream_file, stack.settings))
        stack.wait_exporter_settled([first, second])
        exporters = [w.sample("stream_kpis_global_exporter") for w in (first, second)]
        assert sorted(exporters) == [0.0, 1.0], exporters
        applied = [sum(float(line.rsplit(" ", 1)[1]) for line in w.metrics().splitlines()
                       if line.startswith('stream_kpis_events_total{outcome="applied"'))
                   for w in (first, second)]
        assert all(a > 0 for a in applied), f"both workers own partitions: {applied}"
    finally:
        stack.stop()


def test_live_segments_cohorts_and_clv_equal_replay(tmp_path, kafka_bootstrap, redis_url,
                                                    stream_file):
    """With every segment dimension, cohorts and CLV on (a TOML config, as a user would set
    them), two workers publish what replay gives: the segment values and cohorts merge across
    partitions, and the exporter's CLV fit on the merged statistics equals replay's fit on one
    processor (to the optimiser's tolerance, SPEC 4.4: 1e-3 relative)."""
    config = tmp_path / "kpis.toml"
    config.write_text('[kpis]\nsegments = ["tier", "enrollment_channel", "home_store", "channel",'
                      ' "store_id"]\ncohorts = 6\ncohort_ages = 4\n\n[clv]\ntime_unit = "7d"\n'
                      'refit = "0s"\n', encoding="utf-8")
    stack = LiveStack(tmp_path, kafka_bootstrap, redis_url,
                      extra_env={"STREAM_KPIS_CONFIG": str(config)})
    try:
        assert stack.settings.segments and stack.settings.clv
        workers = [stack.start_worker(), stack.start_worker()]
        stack.wait_assigned(workers)
        stack.produce([stream_file])
        expected = expected_kpis(stream_file, stack.settings)
        kinds = {r["kpi"] for r in expected}
        assert {"cohort_retention", "clv_param", "predicted_revenue"} <= kinds
        assert any("store_id" in r.get("labels", {}) for r in expected)
        latest = stack.wait_for_kpis(expected, equal=_equal_to_fit_tolerance)
        for record in expected:
            key = (record["kpi"], record["window"], tuple(sorted(record.get("labels", {}).items())))
            assert _equal_to_fit_tolerance(latest[key], record), (latest[key], record)
        # once a fit is published, a member's next change brings its predictions to Redis
        as_of = max(r["as_of"] for r in expected)
        client = redis.Redis.from_url(redis_url)
        try:
            deadline = time.monotonic() + 60
            for attempt in itertools.count():
                purchase = orjson.dumps({"event_id": f"after-fit-{attempt}", "member_id": "m-late",
                                         "ts": as_of, "amount": 12.5})
                stack.produce_raw([(stack.settings.topics.purchases, b"m-late", purchase)])
                member = read_member(client, stack.settings.redis_prefix, "m-late")
                if member and member.get("p_alive") is not None:
                    break
                assert time.monotonic() < deadline, (member, stack.logs_tail())
                time.sleep(2)
            # one purchase day: P(alive) is 1 by the BG/NBD model, and it buys again or not
            assert member["p_alive"] == pytest.approx(1.0)
            assert member["expected_purchases"] > 0
        finally:
            client.close()
    finally:
        stack.stop()


CLV_KPIS = ("clv_param", "expected_active_members", "predicted_purchases", "predicted_revenue")


def _equal_to_fit_tolerance(got: dict, want: dict) -> bool:
    """Exact for every KPI but the fitted ones, which match to the SPEC's 1e-3 relative (the fit is
    exact to the optimiser's tolerance; a and b of BG/NBD are the least determined)."""
    if want["kpi"] not in CLV_KPIS:
        return records_equal(got, want)
    if got["as_of"] != want["as_of"] or (got["value"] is None) != (want["value"] is None):
        return False
    return want["value"] is None or got["value"] == pytest.approx(want["value"], rel=1e-3)
