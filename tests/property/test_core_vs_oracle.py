"""Property tests: the incremental core equals the brute-force oracle on random event streams.

Streams mix members and guests, arrive out of order, repeat event ids (duplicates), put
timestamps on bucket edges, redeem more points than earned, and carry surveys and comments.
"""

from __future__ import annotations

import math

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from stream_kpis.core import Processor
from stream_kpis.core.events import Event, EventParser
from stream_kpis.core.kpis import NO_FLOOR
from stream_kpis.settings import Settings
from tests.oracle import brute_force_kpis

HOUR = 3_600_000
BASE = 1_704_067_200_000  # 2024-01-01T00:00:00Z
SEGMENTS = ("tier", "enrollment_channel", "home_store", "channel", "store_id")
LEXICONS = {"friction": ("slow", "frustrante", "بطيء"), "motivation": ("rewards", "desconto")}
COMMENTS = ["so SLOW today", "slowly but fine", "Frustrante!", "بطيء جدا", "love the rewards",
            "desconto bom", "ok", "slow, slow, slow"]

members = st.sampled_from([f"m{i}" for i in range(6)])
ts = st.integers(0, 40).flatmap(
    lambda h: st.sampled_from([BASE + h * HOUR, BASE + h * HOUR + 1, BASE + (h + 1) * HOUR - 1]))
event_ids = st.integers(0, 30).map(lambda i: f"e{i}")
opt_tier = st.none() | st.sampled_from(["bronze", "gold"])

purchase = st.fixed_dictionaries(
    {"type": st.just("purchase"), "event_id": event_ids, "member_id": st.none() | members, "ts": ts,
     "amount": st.integers(0, 500).map(lambda c: c / 4)},
    optional={"points": st.integers(0, 50), "margin": st.integers(-40, 80).map(lambda c: c / 2),
              "tier": opt_tier, "store_id": st.sampled_from(["s1", "s2"]),
              "channel": st.sampled_from(["web", "store"])})
redemption = st.fixed_dictionaries(
    {"type": st.just("redemption"), "event_id": event_ids, "member_id": members, "ts": ts,
     "points": st.integers(1, 60)})
enrollment = st.fixed_dictionaries(
    {"type": st.just("enrollment"), "event_id": event_ids, "member_id": members, "ts": ts},
    optional={"channel": st.sampled_from(["web", "app", "store"]), "tier": opt_tier})
survey = st.fixed_dictionaries(
    {"type": st.just("survey"), "event_id": event_ids, "member_id": st.none() | members, "ts": ts},
    optional={"comment": st.sampled_from(COMMENTS)}).flatmap(
    lambda d: st.one_of(
        st.builds(lambda n: {**d, "nps": n}, st.integers(0, 10)),
        st.builds(lambda c: {**d, "csat": c}, st.integers(1, 5)),
        st.builds(lambda n, c: {**d, "nps": n, "csat": c}, st.integers(0, 10), st.integers(1, 5))))
any_event = st.one_of(purchase, redemption, enrollment, survey)
streams = st.lists(any_event, max_size=60)


def _settings(validity_buckets: int | None) -> Settings:
    return Settings(bucket_ms=HOUR, windows_ms=(3 * HOUR, 7 * HOUR, 12 * HOUR),
                    churn_horizon_ms=8 * HOUR, settle_ms=5 * HOUR, at_risk_ms=4 * HOUR,
                    points_expiring_notice_ms=3 * HOUR,
                    points_validity_ms=None if validity_buckets is None else validity_buckets * HOUR,
                    lexicons=LEXICONS, segments=SEGMENTS)


def _run_core(events: list[dict], config: Settings, bounded_history: bool = True) -> Processor:
    parser = EventParser()
    processor = Processor(config, on_signal=lambda signal: None, bounded_history=bounded_history)
    for raw in events:
        event = parser.validate(dict(raw), b"", raw["type"])
        assert isinstance(event, Event), event
        processor.process(event)
    return processor


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def _compare(processor: Processor, events: list[dict], config: Settings, K: int) -> None:
    compare_records(processor.evaluate(K), events, config, K)


def compare_records(records: list[dict], events: list[dict], config: Settings, K: int) -> None:
    """KPI records as of K equal the brute-force oracle's over ``events`` (churn_reduction aside:
    it depends on the evaluation history)."""
    ours = {(r["kpi"], r["window"], tuple(sorted(r.get("labels", {}).items()))):
            (r["value"], r["numerator"], r["denominator"])
            for r in records if r["kpi"] != "churn_reduction"}
    expected = brute_force_kpis(
        events, bucket_ms=config.bucket_ms, windows=list(config.windows),
        churn_horizon=config.churn_horizon, settle=config.settle, as_of=K,
        points_validity_ms=config.points_validity_ms, lexicons=dict(config.lexicons),
        window_labels=config.window_labels, segments=config.segments, cohorts=config.cohorts,
        cohort_ages=config.cohort_ages)
    assert set(ours) == set(expected), set(ours) ^ set(expected)
    for key, want in expected.items():
        got = ours[key]
        assert all(_close(g, w) for g, w in zip(got, want, strict=True)), (key, got, want)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=streams, validity=st.none() | st.integers(2, 12), later=st.integers(0, 15))
def test_core_equals_brute_force(events, validity, later):
    config = _settings(validity)
    processor = _run_core(events, config)
    event(f"history folded: {processor.aggs.floor != NO_FLOOR}")
    if processor.as_of_bucket() is None:
        assert processor.evaluate() == []
        return
    _compare(processor, events, config, processor.as_of_bucket())
    _compare(processor, events, config, processor.as_of_bucket() + later)


@settings(max_examples=100, deadline=None)
@given(events=streams, validity=st.none() | st.integers(2, 12), seed=st.randoms())
def test_arrival_order_does_not_change_kpis(events, validity, seed):
    """Late and out-of-order events: any permutation gives the same KPIs (first-arrival of
    duplicates aside, which the oracle also follows)."""
    config = _settings(validity)
    shuffled = list(events)
    seed.shuffle(shuffled)
    processor = _run_core(shuffled, config)
    if processor.as_of_bucket() is not None:
        _compare(processor, shuffled, config, processor.as_of_bucket())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=streams, validity=st.integers(2, 12), later=st.integers(0, 15))
def test_time_ordered_stream_equals_brute_force(events, validity, later):
    """A stream in time order, as a replay of exports feeds it: most points events come after
    all of their member's others (the allocation is extended, not redone), ties on ts aside."""
    ordered = sorted(events, key=lambda raw: raw["ts"])
    config = _settings(validity)
    processor = _run_core(ordered, config)
    if processor.as_of_bucket() is not None:
        _compare(processor, ordered, config, processor.as_of_bucket() + later)


DAY = 24 * HOUR
day_ts = st.integers(0, 150).flatmap(
    lambda d: st.sampled_from([BASE + d * DAY, BASE + d * DAY + 1, BASE + (d + 1) * DAY - 1]))
any_month_event = st.one_of(
    st.fixed_dictionaries({"type": st.just("purchase"), "event_id": event_ids,
                           "member_id": st.none() | members, "ts": day_ts,
                           "amount": st.integers(0, 500).map(lambda c: c / 4)},
                          optional={"store_id": st.sampled_from(["s1", "s2"]), "tier": opt_tier}),
    st.fixed_dictionaries({"type": st.just("redemption"), "event_id": event_ids,
                           "member_id": members, "ts": day_ts, "points": st.integers(1, 60)}),
    st.fixed_dictionaries({"type": st.just("enrollment"), "event_id": event_ids,
                           "member_id": members, "ts": day_ts},
                          optional={"channel": st.sampled_from(["web", "app"]), "tier": opt_tier}),
)
months_stream = st.lists(any_month_event, max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=months_stream, cohorts=st.integers(0, 6), ages=st.integers(0, 6),
       later=st.integers(-60, 60), seed=st.randoms())
def test_cohorts_and_segments_over_months_equal_brute_force(events, cohorts, ages, later, seed):
    """Cohort retention over five months of daily buckets: enrollments arriving after the
    first activity move a member between cohorts; evaluation before the latest event (later
    < 0) clamps enrollments and activity to K's month; any arrival order."""
    config = Settings(bucket_ms=DAY, windows_ms=(7 * DAY, 30 * DAY), churn_horizon_ms=30 * DAY,
                      settle_ms=20 * DAY, at_risk_ms=14 * DAY, points_expiring_notice_ms=3 * DAY,
                      lexicons=LEXICONS, segments=SEGMENTS, cohorts=cohorts, cohort_ages=ages)
    shuffled = list(events)
    seed.shuffle(shuffled)
    # an evaluation as of an earlier bucket needs the history the floor folds away
    processor = _run_core(shuffled, config, bounded_history=later >= 0)
    if processor.as_of_bucket() is not None:
        _compare(processor, shuffled, config, max(0, processor.as_of_bucket() + later))


def _parsed(events: list[dict]) -> list[Event]:
    parser = EventParser()
    return [parser.validate(dict(raw), b"", raw["type"]) for raw in events]


def batches(events: list, cuts: list[int]) -> list[list]:
    """The events cut at ``cuts`` (positions taken modulo len + 1, any order, repeats: empty
    batches too), in order."""
    edges = [0, *sorted(c % (len(events) + 1) for c in cuts), len(events)]
    return [events[start:end] for start, end in zip(edges, edges[1:], strict=False)]


def _run_batches(events: list[Event], config: Settings, cuts: list[int]) -> tuple[Processor, list]:
    """The events cut at ``cuts`` and applied batch by batch."""
    signals: list = []
    processor = Processor(config, on_signal=signals.append, record_churn_history=True)
    for batch in batches(events, cuts):
        processor.process_batch(batch)
    return processor, signals


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=streams, validity=st.none() | st.integers(2, 12), later=st.integers(0, 15),
       cuts=st.lists(st.integers(0, 60), max_size=8), seed=st.randoms())
def test_batches_cut_anywhere_equal_brute_force(events, validity, later, cuts, seed):
    """The same events, in any arrival order, cut into batches at random: the oracle's KPIs."""
    config = _settings(validity).with_overrides(segments=())  # the batch path proper
    shuffled = list(events)
    seed.shuffle(shuffled)
    processor, _ = _run_batches(_parsed(shuffled), config, cuts)
    if processor.as_of_bucket() is None:
        assert processor.evaluate() == []
        return
    _compare(processor, shuffled, config, processor.as_of_bucket())
    _compare(processor, shuffled, config, processor.as_of_bucket() + later)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=st.one_of(streams, months_stream), validity=st.none() | st.integers(2, 12),
       cuts=st.lists(st.integers(0, 60), max_size=8), segments=st.booleans(),
       seed=st.randoms())
def test_batches_give_what_one_event_at_a_time_gives(events, validity, cuts, segments, seed):
    """Batches give exactly the per-event path's state: aggregates (churn history included),
    members, counts and every signal, in order; hourly and daily buckets; with segments (which
    go event by event) and without."""
    config = _settings(validity)
    if not segments:
        config = config.with_overrides(segments=())
    shuffled = list(events)
    seed.shuffle(shuffled)
    parsed = _parsed(shuffled)
    one_by_one: list = []
    expected = Processor(config, on_signal=one_by_one.append, record_churn_history=True)
    for item in parsed:
        expected.process(item)
    got, signals = _run_batches(parsed, config, cuts)
    assert got.aggs.to_bytes() == expected.aggs.to_bytes()
    assert got.churn_history == expected.churn_history
    assert {m: s.to_bytes() for m, s in got.members.items()} == \
        {m: s.to_bytes() for m, s in expected.members.items()}
    assert (got.applied, got.duplicates, got.version, got.K, got.max_ts) == \
        (expected.applied, expected.duplicates, expected.version, expected.K, expected.max_ts)
    assert (got.touch_index, got.expiry_index, got.seen_without_member) == \
        (expected.touch_index, expected.expiry_index, expected.seen_without_member)
    assert signals == one_by_one
    if got.K is not None:
        assert got.evaluate() == expected.evaluate()


def _side_by_side(config, items: list, clock: list[int], differ) -> tuple[Processor, Processor, list]:
    """Two Processors fed ``items`` with the clock moved to ``clock``'s hours at the same points;
    ``differ(expected)`` makes the reference do its work the other way. Asserts both give the
    same signals and member states; returns both and the signals."""
    got_signals: list = []
    expected_signals: list = []
    got = Processor(config, on_signal=got_signals.append)
    expected = Processor(config, on_signal=expected_signals.append)
    differ(expected)
    moves = {n % (len(items) + 1): BASE // HOUR + hours for n, hours in enumerate(clock)}
    for i, item in enumerate([*items, None]):
        if i in moves:
            got.advance(moves[i])
            expected.advance(moves[i])
        if item is not None:
            got.process(item)
            expected.process(item)
    assert got_signals == expected_signals
    assert {m: s.to_bytes() for m, s in got.members.items()} == \
        {m: s.to_bytes() for m, s in expected.members.items()}
    return got, expected, got_signals


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=streams, validity=st.integers(2, 12), notice=st.integers(0, 6),
       clock=st.lists(st.integers(0, 60), max_size=6), seed=st.randoms())
def test_the_quick_no_to_expiry_notices_changes_no_signal_or_state(events, validity, notice,
                                                                   clock, seed):
    """A points event looks for due expiry notices only when its member's first and last lots
    allow one (Processor._notice_may_be_due): every signal and member state equals those of a
    Processor that looks after every points event, in any arrival order and with the clock
    moved between events."""
    config = _settings(validity).with_overrides(points_expiring_notice_ms=notice * HOUR)
    shuffled = list(events)
    seed.shuffle(shuffled)

    def check_every_time(reference: Processor) -> None:
        reference._notice_may_be_due = lambda state, K: True

    got, _, got_signals = _side_by_side(config, _parsed(shuffled), clock, check_every_time)
    event("a notice" if any(s["signal"] == "points_expiring" for s in got_signals) else "no notice")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=streams, validity=st.none() | st.integers(2, 12),
       clock=st.lists(st.integers(0, 60), max_size=6), seed=st.randoms())
def test_forgetting_churned_members_changes_no_signal_or_state(events, validity, clock, seed):
    """The touch index drops members churned since (Processor.forget_churned): every signal,
    member state and KPI equals those of a Processor that indexes every member, in any arrival
    order (late events re-touch forgotten members) and with the clock moved between events;
    and the index holds no bucket at or before K - churn horizon."""
    config = _settings(validity)
    shuffled = list(events)
    seed.shuffle(shuffled)

    def index_every_member(reference: Processor) -> None:
        reference.forget_churned = lambda: None

    got, expected, _ = _side_by_side(config, _parsed(shuffled), clock, index_every_member)
    if got.forgotten_upto is None:
        assert got.touch_index == expected.touch_index
    else:
        assert got.forgotten_upto == got.K - config.churn_horizon
        assert all(b > got.forgotten_upto for b in got.touch_index)
        assert got.touch_index == {b: m for b, m in expected.touch_index.items()
                                   if b > got.forgotten_upto}
    if got.K is not None:
        assert got.evaluate() == expected.evaluate()
        event("forgot some" if any(b <= got.K - config.churn_horizon
                                   for b in expected.touch_index) else "forgot none")
