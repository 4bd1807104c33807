"""Predictive CLV through the core (SPEC 4.4): replay against a direct fit over brute-force
per-member inputs, and the exporter's merge of partition partials against one processor."""

from __future__ import annotations

import math
import zlib
from collections import defaultdict

import numpy as np
import pytest

from stream_kpis.core import Processor, evaluate_kpis
from stream_kpis.core.clv import (
    BgNbdParams,
    GammaGammaParams,
    expected_purchases,
    expected_spend,
    fit_bgnbd,
    fit_gamma_gamma,
    p_alive,
)
from stream_kpis.core.events import PURCHASE, Event, EventParser
from stream_kpis.core.kpis import Aggregates
from stream_kpis.core.predictive import ClvModel, member_predictions, params_from_records
from stream_kpis.generate import GeneratorConfig, generate_events
from stream_kpis.settings import DAY_MS, Settings

SETTINGS = Settings(bucket_ms=DAY_MS, windows_ms=(7 * DAY_MS, 30 * DAY_MS), clv=True,
                    clv_unit_ms=7 * DAY_MS, cohorts=0)


@pytest.fixture(scope="module")
def events() -> list[Event]:
    parser = EventParser()
    out = []
    for line in generate_events(GeneratorConfig(members=600, days=240, seed=7)):
        item = parser.parse(line)
        if isinstance(item, Event):
            out.append(item)
    return out


def _records(processor: Processor) -> dict[tuple, float | None]:
    return {(r["kpi"], r["window"], tuple(sorted(r.get("labels", {}).items()))): r["value"]
            for r in processor.evaluate() if r["kpi"] in ("clv_param", "expected_active_members",
                                                           "predicted_purchases", "predicted_revenue")}


def _brute_force(events: list[Event], K: int) -> dict[tuple, float]:
    """Per-member inputs from the raw purchases, the most obvious way; direct fits on them."""
    seen, days = set(), defaultdict(lambda: defaultdict(list))
    for event in events:
        key = (event.type, event.member_id, event.event_id)
        if key in seen:
            continue
        seen.add(key)
        if event.type == PURCHASE and event.member_id is not None:
            days[event.member_id][event.ts // DAY_MS].append(event.amount)
    dK = ((K + 1) * DAY_MS - 1) // DAY_MS
    u = 7.0
    rows = []
    for member_days in days.values():
        ordered = sorted(member_days)
        x = len(ordered) - 1
        m_x = math.fsum(math.fsum(member_days[d]) for d in ordered[1:]) / x if x else 0.0
        rows.append((x, (ordered[-1] - ordered[0]) / u, (dK - ordered[0]) / u, m_x))
    x, t_x, T, m_x = (np.array(column, dtype=float) for column in zip(*rows, strict=True))
    bg = fit_bgnbd(x, t_x, T)
    repeat = (x >= 1) & (m_x > 0)
    gg = fit_gamma_gamma(x[repeat], m_x[repeat])
    out = {("clv_param", None, (("model", "bgnbd"), ("param", name))): value
           for name, value in zip(("r", "alpha", "a", "b"), bg.params, strict=True)}
    out.update({("clv_param", None, (("model", "gamma_gamma"), ("param", name))): value
                for name, value in zip(("p", "q", "gamma"), gg.params, strict=True)})
    out[("clv_param", None, (("model", "bgnbd"), ("param", "ll")))] = bg.ll
    out[("clv_param", None, (("model", "gamma_gamma"), ("param", "ll")))] = gg.ll
    out[("expected_active_members", None, ())] = float(np.sum(p_alive(bg.params, x, t_x, T)))
    spend = expected_spend(gg.params, x, m_x)
    for label, days_ in (("7d", 7), ("30d", 30)):
        purchases = expected_purchases(bg.params, days_ / u, x, t_x, T)
        out[("predicted_purchases", label, ())] = float(np.sum(purchases))
        out[("predicted_revenue", label, ())] = float(np.sum(purchases * spend))
    return out


def test_replayed_clv_kpis_equal_a_direct_fit_on_brute_force_inputs(events):
    processor = Processor(SETTINGS)
    for event in events:
        processor.process(event)
    ours = _records(processor)
    want = _brute_force(events, processor.as_of_bucket())
    assert set(ours) == set(want)
    for key, value in want.items():
        assert ours[key] == pytest.approx(value, rel=1e-3), key


def test_the_exporters_merge_of_partitions_gives_the_same_fit(events):
    whole = Processor(SETTINGS)
    parts = [Processor(SETTINGS) for _ in range(4)]
    for event in events:
        whole.process(event)
        key = (event.member_id or event.event_id).encode()
        parts[zlib.crc32(key) % 4].process(event)
    merged = Aggregates()  # as the exporter merges the published partials
    for part in parts:
        merged.merge_bytes(part.aggs.to_bytes())
    assert merged.clv == whole.aggs.clv
    K = whole.as_of_bucket()
    got = {(r["kpi"], r["window"], tuple(sorted(r.get("labels", {}).items()))): r["value"]
           for r in evaluate_kpis(SETTINGS, merged, K, None, ClvModel(SETTINGS))
           if r["kpi"].startswith(("clv", "expected", "predicted"))}
    want = _records(whole)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key


def test_refit_follows_the_cadence():
    model = ClvModel(SETTINGS.with_overrides(clv_refit_ms=7 * DAY_MS))
    processor = Processor(SETTINGS)
    processor.clv_model = model
    for day, member in ((0, "a"), (3, "a"), (5, "b"), (9, "b"), (12, "c")):
        processor.process(Event(PURCHASE, f"e{day}", member, day * DAY_MS + 1, amount=10.0))
        processor.evaluate()
    # evaluations at days 0, 3, 5, 9, 12: fits at 0, then 9 (>= 7 buckets later)
    assert model.fits == 2 and model.fit_K == 9


def test_member_predictions_are_the_models_per_member_values(events):
    """Per-member P(alive), E[X(longest window)] and E[X] * E[M], as the read model shows them,
    computed member by member with the scalar formulas."""
    processor = Processor(SETTINGS)
    for event in events:
        processor.process(event)
    records = processor.evaluate()
    bgnbd, gamma_gamma = params_from_records(records)
    assert bgnbd is not None and gamma_gamma is not None
    K = processor.as_of_bucket()
    states = [processor.members[m] for m in sorted(processor.members)[:40]]
    got = member_predictions(states, K, SETTINGS, bgnbd, gamma_gamma)
    dK = ((K + 1) * DAY_MS - 1) // DAY_MS
    for state, prediction in zip(states, got, strict=True):
        if not state.purchase_days:
            assert prediction is None
            continue
        days = sorted(day for day, _ in state.purchase_days)
        totals = dict(state.purchase_days)
        x = len(days) - 1
        m_x = sum(totals[d] for d in days[1:]) / x if x else 0.0
        t_x, T = (days[-1] - days[0]) / 7, (dK - days[0]) / 7
        params = BgNbdParams(*bgnbd)
        assert prediction["p_alive"] == pytest.approx(p_alive(params, x, t_x, T), rel=1e-9)
        purchases = expected_purchases(params, 30 / 7, x, t_x, T)
        assert prediction["expected_purchases"] == pytest.approx(purchases, rel=1e-9)
        spend = expected_spend(GammaGammaParams(*gamma_gamma), x, m_x)
        assert prediction["expected_value"] == pytest.approx(purchases * spend, rel=1e-9)


def test_partition_commits_carry_member_predictions_once_parameters_are_known(events):
    from stream_kpis.live.partition import InputRecord, PartitionTask, statuses_from_records
    from stream_kpis.live.store import MemoryStore

    def status_of(commit):  # as the worker's read model makes it at its flush
        return statuses_from_records(SETTINGS, commit.as_of, commit.clv_params,
                                     [commit.members["m1"]])[0]

    types = {name: kind for kind, name in SETTINGS.topics.inputs().items()}
    task = PartitionTask(SETTINGS, 0, MemoryStore(), types)
    topic = SETTINGS.topics.purchases
    body = b'{"event_id": "p%d", "member_id": "m1", "ts": %d, "amount": 20.0}'
    task.apply([InputRecord(topic, 0, i, b"m1", body % (i, (10 + 9 * i) * DAY_MS))
                for i in range(3)])
    without = task.take_commit()
    assert "p_alive" not in status_of(without)
    task.committed(without, None)
    task.apply([InputRecord(topic, 0, 3, b"m1", body % (3, 60 * DAY_MS))])
    params = ((0.24, 4.4, 0.79, 2.4), (6.25, 3.74, 15.44))
    status = status_of(task.take_commit(clv_params=params))
    assert 0 < status["p_alive"] <= 1 and status["expected_purchases"] > 0
    assert status["expected_value"] > 0


def test_statuses_made_from_committed_records_equal_those_of_the_batch(events):
    """The worker defers a member's read-model status to the flush, from the state record its
    commit wrote (with the commit's as-of bucket and CLV fit): the same status as the batch's
    member states give."""
    from stream_kpis.live.partition import (
        InputRecord,
        PartitionTask,
        member_statuses,
        statuses_from_records,
    )
    from stream_kpis.live.store import MemoryStore

    types = {name: kind for kind, name in SETTINGS.topics.inputs().items()}
    task = PartitionTask(SETTINGS, 0, MemoryStore(), types)
    topic = SETTINGS.topics.purchases
    body = b'{"event_id": "p%d", "member_id": "m%d", "ts": %d, "amount": 20.0}'
    task.apply([InputRecord(topic, 0, i, b"m%d" % (i % 3), body % (i, i % 3, (10 + 9 * i) * DAY_MS))
                for i in range(9)])
    params = ((0.24, 4.4, 0.79, 2.4), (6.25, 3.74, 15.44))
    commit = task.take_commit(clv_params=params)
    assert sorted(commit.members) == ["m0", "m1", "m2"]
    assert (commit.as_of, commit.clv_params) == (task.processor.K, params)
    deferred = statuses_from_records(SETTINGS, commit.as_of, commit.clv_params,
                                     list(commit.members.values()))
    in_batch = member_statuses([task.members.dirty[m] for m in commit.members],
                               task.processor.K, SETTINGS, params)
    assert deferred == in_batch
    assert all("p_alive" in status for status in deferred)


def test_read_model_writes_deferred_statuses_as_direct_ones_once_per_member():
    from stream_kpis.live.readmodel import ReadModel, _resolve

    statuses = {"m1": {"status": "at_risk", "last_touch": 1_706_601_600_500, "points_balance": 3,
                       "tier": "gold"},
                "m2": {"status": "active", "last_touch": "2024-01-30T08:00:00Z"}}
    calls = []

    def statuses_of(snapshots):
        calls.append(list(snapshots))
        return [statuses[s] for s in snapshots]

    deferred = ReadModel(lambda: None)
    deferred.update_member_snapshots({"m1": "m1"}, statuses_of)
    deferred.update_member_snapshots({"m1": "m1", "m2": "m2"}, statuses_of)  # coalesced
    direct = ReadModel(lambda: None)
    direct.update_members(statuses)
    assert deferred.pending_members == 2
    assert _resolve(deferred._pending_members) == _resolve(direct._pending_members)
    assert calls == [["m1", "m2"]]
    write = dict(_resolve(direct._pending_members))["m1"]
    assert write.flat_fields == ["last_touch", "2024-01-30T08:00:00.500Z", "status", "at_risk",
                                 "points_balance", "3", "tier", "gold"]
    assert float(write.at_risk_score) == 1_706_601_600.5


def test_read_model_bound_holds_for_deferred_statuses():
    from stream_kpis.live.readmodel import ReadModel

    model = ReadModel(lambda: None, max_pending_members=2)
    model.update_member_snapshots({"a": 1, "b": 2, "c": 3}, lambda snapshots: [])
    assert (model.pending_members, model.dropped_member_updates) == (2, 1)
    model.update_member_snapshots({"a": 4}, lambda snapshots: [])  # pending: coalesces
    assert (model.pending_members, model.dropped_member_updates) == (2, 1)
