"""Tests of stream_kpis.core.Processor beyond what the oracle covers: churn_reduction from the
recorded history, member signals, redelivery tokens and the PartitionStore round trip.

Buckets are 1 h (``B``); ``at(k)`` is the start of bucket k. Every expected value is worked out
by hand in the comments.
"""

from __future__ import annotations

import pytest
from pytest import approx

from stream_kpis.core import APPLIED, DUPLICATE, REDELIVERED, PartitionStore, Processor, evaluate_kpis
from stream_kpis.core.member import MemberState
from stream_kpis.core.timebase import format_rfc3339
from tests.conftest import B, enrollment, purchase, redemption, survey, to_event


def record(records, kpi, window=None, **labels):
    found = [r for r in records if r["kpi"] == kpi and r["window"] == window
             and r.get("labels", {}) == labels]
    assert len(found) == 1, (kpi, window, labels, found)
    return found[0]


def value(records, kpi, window=None, **labels):
    return record(records, kpi, window, **labels)["value"]


def hour(k: int) -> str:
    """RFC 3339 of the start of bucket k (1970-01-01 plus k hours, k < 24)."""
    return f"1970-01-01T{k:02d}:00:00Z"


# --- churn_reduction --------------------------------------------------------------------------

# w = 2 and 3 buckets, h = 3: churn_rate_w(K) = count(touch in [K-w-2, K-3]) /
#   (count(touch >= K-w-2) - count(enrolled >= K-w+1))
# member  enrolled  activity  (touch)
# a       0         -         0
# b       0         1         1
# c       1         3         3
# d       2         6         6 (touch 2 until the purchase at 6 arrives)
# e       5         -         5
# f       7         -         7
# g       0         8         8 (touch 0 until the purchase at 8 arrives)
CHURN_EVENTS = [
    enrollment("e-a", "a", 0), enrollment("e-b", "b", 0), enrollment("e-g", "g", 0),
    purchase("p-b", "b", 1), enrollment("e-c", "c", 1),
    enrollment("e-d", "d", 2),
    purchase("p-c", "c", 3),
    enrollment("e-e", "e", 5),
    purchase("p-d", "d", 6),
    enrollment("e-f", "f", 7),
    purchase("p-g", "g", 8),
]


def churn_processor(make_processor, events=CHURN_EVENTS):
    return make_processor(events, windows=(2, 3), h=3, history=True)


def test_churn_reduction_from_the_recorded_history(make_processor):
    processor = churn_processor(make_processor)
    assert processor.as_of_bucket() == 8
    records = processor.evaluate()
    # K = 8, w = 2: num touch in [4, 5]: e = 1; den touch >= 4: d e f g = 4, minus enrolled
    # >= 7: f -> 3. churn 1/3.
    assert record(records, "churn_rate", "2h")["numerator"] == 1
    assert record(records, "churn_rate", "2h")["denominator"] == 3
    # Recorded when the clock left bucket 6 (state: d touch 6, no f, g touch 0):
    # num touch in [2, 3]: c = 1; den touch >= 2: c d e = 3, minus enrolled >= 5: e -> 2. 1/2
    assert value(records, "churn_reduction", "2h") == approx(1 / 2 - 1 / 3)
    # K = 8, w = 3: num touch in [3, 5]: c e = 2; den touch >= 3: c d e f g = 5, minus
    # enrolled >= 6: f -> 4. 2/4. Recorded at K = 5 (before d's purchase at 6: d touch 2):
    # num touch in [0, 2]: a b d g = 4; den touch >= 0: all 6 known, minus enrolled >= 3: e -> 5
    assert value(records, "churn_rate", "3h") == 0.5
    assert value(records, "churn_reduction", "3h") == approx(4 / 5 - 1 / 2)


def test_churn_reduction_evaluated_along_the_way(make_processor):
    # stop after f's enrollment: K = 7
    processor = churn_processor(make_processor, CHURN_EVENTS[:-1])
    records = processor.evaluate()
    # K = 7, w = 2: num touch in [3, 4]: c = 1; den touch >= 3: c d(6) e f = 4, minus enrolled
    # >= 6: f -> 3. 1/3. History at K = 5 (d touch 2, no f): num touch in [1, 2]: b d = 2;
    # den touch >= 1: b c d e = 4, minus enrolled >= 4: e -> 3. 2/3.
    assert value(records, "churn_rate", "2h") == approx(1 / 3)
    assert value(records, "churn_reduction", "2h") == approx(2 / 3 - 1 / 3)


def test_history_is_not_revised_by_late_events(make_processor):
    processor = churn_processor(make_processor)
    processor.process(to_event(purchase("p-a-late", "a", 4)))  # a's touch 0 -> 4
    records = processor.evaluate()
    assert processor.as_of_bucket() == 8
    # now, w = 2: num touch in [4, 5]: a e = 2; den touch >= 4: a d e f g = 5, minus f -> 4.
    # 2/4. The snapshot of K = 6 is the one recorded then: 1/2. Reduction 0.
    assert value(records, "churn_rate", "2h") == 0.5
    assert value(records, "churn_reduction", "2h") == 0


def test_churn_reduction_is_null_without_history(make_processor):
    # without record_churn_history only evaluations are recorded: none was made at K-w = 6
    processor = make_processor(CHURN_EVENTS, windows=(2, 3), h=3)
    records = processor.evaluate()
    assert value(records, "churn_reduction", "2h") is None
    assert value(records, "churn_rate", "2h") == approx(1 / 3)  # still there


def test_churn_reduction_only_for_windows_within_the_horizon(make_processor):
    processor = make_processor(CHURN_EVENTS, windows=(2, 4), h=3, history=True)
    kpis = {(r["kpi"], r["window"]) for r in processor.evaluate()}
    assert ("churn_reduction", "2h") in kpis
    assert ("churn_reduction", "4h") not in kpis  # 4 > h = 3
    assert ("churn_rate", "4h") not in kpis


def test_churn_reduction_from_evaluations_of_the_same_processor(make_processor):
    # live-like: no clock history, but an evaluation at K = 6 is remembered for K = 8
    processor = make_processor(CHURN_EVENTS[:9], windows=(2,), h=3)  # up to d's purchase at 6
    assert processor.as_of_bucket() == 6
    # K = 6, w = 2, after d's purchase: num touch in [2, 3]: c = 1; den touch >= 2: c d(6) e = 3,
    # minus enrolled >= 5: e -> 2. 1/2
    assert value(processor.evaluate(), "churn_rate", "2h") == 0.5
    for event in CHURN_EVENTS[9:]:
        processor.process(to_event(event))
    assert value(processor.evaluate(), "churn_reduction", "2h") == approx(1 / 2 - 1 / 3)


# --- member signals ---------------------------------------------------------------------------


def guest_tick(bucket: int) -> dict:
    """A guest purchase: moves the event clock without touching any member."""
    return purchase(f"tick-{bucket}", None, bucket)


def test_status_signals_fire_when_the_clock_passes_the_thresholds(make_processor):
    signals: list[dict] = []
    # at_risk after 3 buckets without a touch, churned after 5
    processor = make_processor([enrollment("e-m", "m", 0)], signals=signals, at_risk=3, h=5)
    for bucket in (1, 2):
        processor.process(to_event(guest_tick(bucket)))
    assert signals == []  # touch 0 > K-3 = -1
    processor.process(to_event(guest_tick(3)))  # touch 0 <= K-3 = 0
    assert signals == [{"member_id": "m", "signal": "at_risk", "as_of": hour(4),
                        "last_touch": hour(0)}]
    processor.process(to_event(guest_tick(4)))
    assert len(signals) == 1  # once per transition
    processor.process(to_event(guest_tick(5)))  # touch 0 <= K-5 = 0
    assert signals[1:] == [{"member_id": "m", "signal": "churned", "as_of": hour(6),
                            "last_touch": hour(0)}]
    processor.process(to_event(guest_tick(7)))
    assert len(signals) == 2
    processor.process(to_event(purchase("p-m", "m", 8)))
    assert signals[2:] == [{"member_id": "m", "signal": "reactivated", "as_of": hour(9),
                            "last_touch": hour(8)}]
    processor.process(to_event(guest_tick(9)))
    assert len(signals) == 3


def test_back_from_at_risk_is_silent_and_a_jump_goes_straight_to_churned(make_processor):
    signals: list[dict] = []
    processor = make_processor([enrollment("e-m", "m", 0), guest_tick(3)], signals=signals,
                               at_risk=3, h=5)
    assert [s["signal"] for s in signals] == ["at_risk"]
    processor.process(to_event(purchase("p-m", "m", 4)))  # active again: no signal for that
    assert [s["signal"] for s in signals] == ["at_risk"]
    # from K = 4 to K = 20 in one event: touch 4 <= 20-5: churned, without an at_risk first
    processor.process(to_event(guest_tick(20)))
    assert [s["signal"] for s in signals] == ["at_risk", "churned"]
    assert signals[-1]["last_touch"] == hour(4)
    assert signals[-1]["as_of"] == format_rfc3339(21 * B)


def test_advance_fires_signals_without_events(make_processor):
    # the live worker moves the clock with advance() on a timer
    signals: list[dict] = []
    processor = make_processor([enrollment("e-m", "m", 2), enrollment("e-n", "n", 4)],
                               signals=signals, at_risk=3, h=5)
    processor.advance(6)  # m: 2 <= 3 at risk; n: 4 > 3
    assert [(s["member_id"], s["signal"]) for s in signals] == [("m", "at_risk")]
    processor.advance(5)  # the clock never goes back
    assert processor.as_of_bucket() == 6
    processor.advance(8)  # m: 2 <= 8-5 churned; n: 4 <= 8-3 at risk, 4 > 8-5 not churned
    assert sorted((s["member_id"], s["signal"]) for s in signals[1:]) == [
        ("m", "churned"), ("n", "at_risk")]


def test_points_expiring_notice_with_amount_and_date(make_processor):
    signals: list[dict] = []
    # V = 6 buckets, notice 2 buckets. P1 10 @0 expires in bucket 6; R 3 @1 takes 3 from P1
    # -> 7 left; P2 5 @2 expires in bucket 8. at_risk / churn far away.
    events = [purchase("P1", "m", 0, points=10), redemption("R", "m", 1, 3),
              purchase("P2", "m", 2, points=5)]
    processor = make_processor(events, signals=signals, validity_ms=6 * B, notice=2, at_risk=50,
                               h=60)
    processor.process(to_event(guest_tick(3)))
    assert signals == []  # 6 > K + 2 = 5
    processor.process(to_event(guest_tick(4)))  # 6 <= 4 + 2
    assert signals == [{"member_id": "m", "signal": "points_expiring", "as_of": hour(5),
                        "last_touch": hour(2), "points": 7, "expires_at": hour(6)}]
    processor.process(to_event(guest_tick(5)))
    assert len(signals) == 1  # once
    processor.process(to_event(guest_tick(6)))  # 8 <= 6 + 2
    assert signals[1:] == [{"member_id": "m", "signal": "points_expiring", "as_of": hour(7),
                            "last_touch": hour(2), "points": 5, "expires_at": hour(8)}]
    processor.process(to_event(guest_tick(9)))
    assert len(signals) == 2


def test_no_notice_for_fully_redeemed_lots(make_processor):
    signals: list[dict] = []
    events = [purchase("P1", "m", 0, points=10), redemption("R", "m", 1, 10)]
    processor = make_processor(events, signals=signals, validity_ms=6 * B, notice=2, at_risk=50,
                               h=60)
    processor.advance(5)
    assert signals == []


def test_notice_for_a_late_purchase_already_within_the_notice_period(make_processor):
    signals: list[dict] = []
    processor = make_processor([guest_tick(10)], signals=signals, validity_ms=6 * B, notice=2,
                               at_risk=50, h=60)
    # K = 10; a purchase from bucket 5 arrives late: its lot expires in bucket 11 <= 12
    processor.process(to_event(purchase("P", "m", 5, points=4)))
    assert [(s["signal"], s["points"], s["expires_at"]) for s in signals] == [
        ("points_expiring", 4, hour(11))]


def test_notice_for_a_late_lot_expiring_before_one_already_notified(make_processor):
    signals: list[dict] = []
    # V = 6, notice 2. P2 3 @2 expires in bucket 8: noticed at K = 6.
    processor = make_processor([purchase("P2", "m", 2, points=3), guest_tick(6)],
                               signals=signals, validity_ms=6 * B, notice=2, at_risk=50, h=60)
    assert [(s["points"], s["expires_at"]) for s in signals] == [(3, hour(8))]
    # then P1 4 @1 arrives late: it expires in bucket 7, after K = 6 and within the notice
    # period (7 <= 8): the member must be told about these 4 points too
    processor.process(to_event(purchase("P1", "m", 1, points=4)))
    assert [(s["points"], s["expires_at"]) for s in signals] == [(3, hour(8)), (4, hour(7))]


# --- redelivery tokens ------------------------------------------------------------------------


def test_same_token_is_redelivered_other_token_is_duplicate(make_processor):
    processor = make_processor(windows=(3,))
    member = to_event(purchase("p1", "m", 1, 20.0, points=5))
    guest = to_event(purchase("g1", None, 1, 8.0))
    poll = to_event(survey("s1", "m", 1, nps=10))
    assert processor.process(member, ("loyalty.purchases", 5)) == APPLIED
    assert processor.process(guest, ("loyalty.purchases", 6)) == APPLIED
    assert processor.process(poll, ("loyalty.surveys", 0)) == APPLIED
    # after a crash the same records come again
    assert processor.process(member, ("loyalty.purchases", 5)) == REDELIVERED
    assert processor.process(guest, ("loyalty.purchases", 6)) == REDELIVERED
    assert processor.process(poll, ("loyalty.surveys", 0)) == REDELIVERED
    # the producer sent the same events again: new records, same events
    assert processor.process(member, ("loyalty.purchases", 7)) == DUPLICATE
    assert processor.process(guest, ("loyalty.purchases", 8)) == DUPLICATE
    assert processor.process(poll, ("loyalty.surveys", 1)) == DUPLICATE
    assert processor.process(member) == DUPLICATE  # replay: no token
    assert (processor.applied, processor.duplicates) == (3, 4)
    records = processor.evaluate()
    # counted once: member order 20.0, guest order 8.0, points 5, one survey
    assert (value(records, "aov_member", "3h"), record(records, "aov_member", "3h")["denominator"]) == (
        20.0, 1)
    assert record(records, "aov_guest", "3h")["denominator"] == 1
    assert value(records, "points_earned", "3h") == 5
    assert value(records, "points_liability") == 5
    assert value(records, "survey_responses", "3h") == 1
    assert value(records, "members") == 1
    assert value(records, "avg_lifetime_spend") == 20.0


# --- PartitionStore round trip ----------------------------------------------------------------


def rebuild(original: Processor, buckets=None, signals=None) -> Processor:
    """What app.Pipeline._rebuild does, from the original's persisted records."""
    # the members table is the Processor's member mapping; each stored state is also loaded
    members = {member_id: MemberState.from_bytes(state.to_bytes())
               for member_id, state in original.members.items()}
    copy = Processor(original.settings, members,
                     on_signal=None if signals is None else signals.append)
    for member_id, state in members.items():
        PartitionStore.load_member(copy, member_id, state)
    if buckets is None:
        buckets = {bucket: PartitionStore.bucket_record(original, bucket)
                   for bucket in _event_buckets(original)}
    for bucket, data in buckets.items():
        PartitionStore.load_bucket(copy, bucket, data)
    for key, token in original.seen_without_member.items():
        copy.seen_without_member[key] = token
    if copy.max_ts is not None:
        copy.K = copy.max_ts // original.bucket_ms
    return copy


def _event_buckets(processor: Processor) -> set[int]:
    buckets = {b for name, hist in processor.aggs.sums.items() if not name.startswith("lot_")
               for b in hist}
    return buckets | {b for hist in processor.aggs.mentions.values() for b in hist}


def kpis_without_history(processor: Processor, K: int | None = None) -> list[dict]:
    K = processor.as_of_bucket() if K is None else K
    return evaluate_kpis(processor.settings, processor.aggs, K)


MIXED_EVENTS = [
    enrollment("e-a", "a", 0, "web", "gold"),
    purchase("p-a1", "a", 1, 40.0, points=30, margin=5.0),
    purchase("g-1", None, 1, 10.0, margin=-1.0),
    redemption("r-a", "a", 3, 12),
    purchase("p-b", "b", 2, 15.0, points=8, tier="silver"),
    survey("s-1", None, 3, nps=3, comment="so slow"),
    survey("s-2", "b", 4, nps=10, csat=5, comment="love the rewards"),
    enrollment("e-c", "c", 4, "app"),
    purchase("p-a2", "a", 6, 25.0, points=4),
    # more than b ever earned (8); with V = 4 buckets b's lot from bucket 2 expires exactly at
    # bucket 6's start, so all 20 are unbacked
    redemption("r-b", "b", 6, 20),
]


@pytest.mark.parametrize("validity", [None, 4], ids=["no-validity", "validity-4b"])
def test_partition_store_round_trip(make_processor, validity):
    settings = {"windows": (2, 5), "h": 4, "s": 3, "at_risk": 2, "notice": 1,
                "validity_ms": None if validity is None else validity * B,
                "lexicons": {"friction": ["slow"], "motivation": ["rewards"]}}
    tokens = {}
    original = make_processor(**settings)
    for offset, raw in enumerate(MIXED_EVENTS):
        tokens[raw["event_id"]] = ("loyalty.in", offset)
        original.process(to_event(raw), tokens[raw["event_id"]])
    assert original.as_of_bucket() == 6
    copy = rebuild(original)
    assert copy.as_of_bucket() == 6
    assert kpis_without_history(copy) == kpis_without_history(original)
    assert copy.evaluate() == original.evaluate()
    for K in (7, 12):
        assert kpis_without_history(copy, K) == kpis_without_history(original, K)
    # the same deliveries again are recognised, from member state and from the seen entries
    for raw in MIXED_EVENTS:
        assert copy.process(to_event(raw), tokens[raw["event_id"]]) == REDELIVERED
        assert copy.process(to_event(raw)) == DUPLICATE
    assert kpis_without_history(copy) == kpis_without_history(original)
    # and both go on identically
    later = [purchase("p-c", "c", 7, 9.0, points=2), purchase("g-2", None, 8, 11.0)]
    for offset, raw in enumerate(later, 50):
        assert original.process(to_event(raw), ("loyalty.in", offset)) == APPLIED
        assert copy.process(to_event(raw), ("loyalty.in", offset)) == APPLIED
    assert kpis_without_history(copy) == kpis_without_history(original)


def test_rebuilt_members_keep_their_signal_state(make_processor):
    first: list[dict] = []
    # at_risk 2, churned 4, V = 5 buckets, notice 1. m: touch 2; n: touch 1, a lot of 3 points
    # earned in bucket 1 that expires in bucket 6
    original = make_processor([enrollment("e-m", "m", 1), enrollment("e-n", "n", 1),
                               purchase("p-n", "n", 1, points=3), purchase("p-m", "m", 2)],
                              signals=first, at_risk=2, h=4, validity_ms=5 * B, notice=1)
    assert first == []  # K = 2: no touch <= 0
    original.advance(4)  # touch <= 2: m and n at risk; expiry 6 > 4 + 1: no notice yet
    assert sorted((s["member_id"], s["signal"]) for s in first) == [("m", "at_risk"), ("n", "at_risk")]
    again: list[dict] = []
    copy = rebuild(original, signals=again)
    copy.advance(4)
    assert again == []  # the stored statuses are kept: nothing is announced twice
    for K in (5, 6):
        original.advance(K)
        copy.advance(K)
    # K = 5: n 1 <= 1 churned, n's 3 points expire in bucket 6 <= 5 + 1. K = 6: m 2 <= 2 churned
    assert [(s["member_id"], s["signal"], s["as_of"]) for s in again] == [
        ("n", "churned", hour(6)), ("n", "points_expiring", hour(6)), ("m", "churned", hour(7))]
    assert again == first[2:]


def test_redelivery_after_a_crash_between_member_and_bucket_writes(make_processor):
    # the member record was written with p-2 in it, the bucket record of bucket 3 was not
    original = make_processor(windows=(4,))
    original.process(to_event(purchase("p-1", "m", 1, 10.0)), ("loyalty.purchases", 0))
    before = {bucket: PartitionStore.bucket_record(original, bucket) for bucket in _event_buckets(original)}
    original.process(to_event(purchase("p-2", "m", 3, 30.0)), ("loyalty.purchases", 1))
    crashed = rebuild(original, buckets=before)
    assert crashed.process(to_event(purchase("p-2", "m", 3, 30.0)), ("loyalty.purchases", 1)) == (
        REDELIVERED)
    records = crashed.evaluate()
    # both orders counted exactly once: 40.0 over 2 orders
    assert (value(records, "aov_member", "4h"), record(records, "aov_member", "4h")["denominator"]) == (
        20.0, 2)
    assert kpis_without_history(crashed) == kpis_without_history(original)


@pytest.mark.parametrize(
    "last",
    [purchase("g-late", None, 9, 5.0), survey("s-late", None, 9, nps=8),
     enrollment("e-late", "z", 9, "web")],
    ids=["guest-purchase", "survey", "enrollment"],
)
def test_rebuild_keeps_the_as_of_bucket_when_the_last_event_is_not_member_activity(
        make_processor, last):
    # event clock: K is the bucket of the largest event ts seen (SPEC 2), whatever its type
    original = make_processor([purchase("p-m", "m", 2, 10.0), last], windows=(3,))
    assert original.as_of_bucket() == 9
    copy = rebuild(original)
    assert copy.as_of_bucket() == 9
    assert copy.evaluate() == original.evaluate()
