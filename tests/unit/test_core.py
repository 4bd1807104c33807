"""Tests of stream_kpis.core.Processor beyond what the oracle covers: churn_reduction from the
recorded history, member signals, duplicates, and a partition's state rebuilt from its store by
the live PartitionTask (which persists it through PartitionStore).

Buckets are 1 h (``B``); ``at(k)`` is the start of bucket k. Every expected value is worked out
by hand in the comments.
"""

from __future__ import annotations

from collections import Counter

import orjson
import pytest
from pytest import approx

from stream_kpis.core import APPLIED, DUPLICATE, Processor, evaluate_kpis
from stream_kpis.core.timebase import format_rfc3339
from stream_kpis.live.partition import Commit, InputRecord, PartitionTask
from stream_kpis.live.store import MemoryStore
from stream_kpis.settings import Settings
from tests.conftest import (
    B,
    build_settings,
    enrollment,
    feed,
    purchase,
    redemption,
    survey,
    to_event,
)


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


def test_a_jump_of_the_clock_signals_in_the_order_time_passes_the_touch_buckets(make_processor):
    # m is touched in bucket 5, then n in bucket 4 (late): the index holds bucket 5 before
    # bucket 4, and a jump from K = 5 to 50 passes more buckets than the index holds
    signals: list[dict] = []
    processor = make_processor([enrollment("e-m", "m", 5), enrollment("e-n", "n", 4)],
                               signals=signals, at_risk=3, h=100)
    assert signals == []  # 4 > 5-3
    processor.advance(50)  # both at risk; bucket 4 was passed first
    assert [(s["member_id"], s["signal"]) for s in signals] == [("n", "at_risk"),
                                                               ("m", "at_risk")]


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


# --- duplicates -------------------------------------------------------------------------------


def test_an_event_sent_again_is_a_duplicate_and_counted_once(make_processor):
    processor = make_processor(windows=(3,))
    member = to_event(purchase("p1", "m", 1, 20.0, points=5))
    guest = to_event(purchase("g1", None, 1, 8.0))
    poll = to_event(survey("s1", "m", 1, nps=10))
    assert [processor.process(event) for event in (member, guest, poll)] == [APPLIED] * 3
    # member state remembers p1; the seen entries remember the guest purchase and the survey
    assert [processor.process(event) for event in (member, guest, poll)] == [DUPLICATE] * 3
    assert (processor.applied, processor.duplicates) == (3, 3)
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


def test_events_without_member_state_are_remembered_up_to_guest_dedupe_oldest_forgotten():
    processor = Processor(build_settings().with_overrides(guest_dedupe=3))
    guests = [to_event(purchase(f"g{i}", None, 1, 8.0)) for i in range(5)]
    assert [processor.process(event) for event in guests] == [APPLIED] * 5
    # g0 and g1 were forgotten, oldest first (the bound is 3): they apply again, and push out
    # g2 and g3; g4 and the two re-applied ones are still remembered
    assert [processor.process(guests[i]) for i in (0, 1, 4, 0, 1)] == \
        [APPLIED, APPLIED, DUPLICATE, DUPLICATE, DUPLICATE]
    assert [processor.process(guests[i]) for i in (2, 3)] == [APPLIED, APPLIED]
    assert list(processor.seen_without_member) == ["p||g1", "p||g2", "p||g3"]


# --- a partition rebuilt from its store (the live PartitionTask) ------------------------------


def input_records(settings: Settings, events, first_offset: int = 0) -> list[InputRecord]:
    """The events as Kafka records of one input partition: each on its type's topic, keyed by
    member (event_id for guests), offsets counting from ``first_offset`` per topic."""
    topics = settings.topics.inputs()
    offsets: dict[str, int] = {}
    records = []
    for raw in events:
        topic = topics[raw["type"]]
        offset = offsets[topic] = offsets.get(topic, first_offset - 1) + 1
        value = orjson.dumps({name: v for name, v in raw.items() if v is not None})
        key = (raw["member_id"] or raw["event_id"]).encode()
        records.append(InputRecord(topic, 0, offset, key, value))
    return records


def open_task(settings: Settings, store: MemoryStore) -> PartitionTask:
    """A PartitionTask of partition 0 on ``store``: what a worker builds when it is assigned it."""
    return PartitionTask(settings, 0, store,
                         {topic: kind for kind, topic in settings.topics.inputs().items()})


def commit_batch(task: PartitionTask, records=(), advance_to: int | None = None) -> Commit | None:
    """Apply a batch and commit it, as a worker does once its transaction is written."""
    task.apply(records)
    if advance_to is not None:
        task.advance(advance_to)
    commit = task.take_commit()
    if commit is not None:
        task.committed(commit, None)
    return commit


def outcomes(commit: Commit) -> Counter:
    counts: Counter = Counter()
    for (_, outcome), n in commit.outcomes.items():
        counts[outcome] += n
    return counts


def signals_of(commit: Commit | None) -> list[tuple[str, str, str]]:
    signals = [] if commit is None else map(orjson.loads, (value for _, value in commit.signals))
    return [(s["member_id"], s["signal"], s["as_of"]) for s in signals]


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
def test_a_partition_rebuilt_from_its_store_evaluates_like_the_original(make_settings, validity):
    settings = make_settings(windows=(2, 5), h=4, s=3, at_risk=2, notice=1,
                             validity_ms=None if validity is None else validity * B,
                             lexicons={"friction": ["slow"], "motivation": ["rewards"]})
    original = feed(Processor(settings), MIXED_EVENTS)
    assert original.as_of_bucket() == 6
    store = MemoryStore()
    task = open_task(settings, store)
    records = input_records(settings, MIXED_EVENTS)
    applied = sum(outcomes(commit_batch(task, records[i:i + 3]))["applied"]
                  for i in range(0, len(records), 3))  # four batches, four commits
    assert applied == len(MIXED_EVENTS)
    rebuilt = open_task(settings, store)
    copy = rebuilt.processor
    assert copy.as_of_bucket() == 6
    assert kpis_without_history(copy) == kpis_without_history(original)
    assert copy.evaluate() == original.evaluate()
    for K in (7, 12):
        assert kpis_without_history(copy, K) == kpis_without_history(original, K)
    # records it already holds are skipped; the same events in new records are duplicates,
    # known from the stored member states and the stored seen entries
    assert commit_batch(rebuilt, records) is None
    again = commit_batch(rebuilt, input_records(settings, MIXED_EVENTS, first_offset=100))
    assert outcomes(again) == {"duplicate": len(MIXED_EVENTS)}
    assert kpis_without_history(copy) == kpis_without_history(original)
    # and both go on identically
    later = [purchase("p-c", "c", 7, 9.0, points=2), purchase("g-2", None, 8, 11.0)]
    assert outcomes(commit_batch(rebuilt, input_records(settings, later, first_offset=200))) == {
        "applied": 2}
    feed(original, later)
    assert kpis_without_history(copy) == kpis_without_history(original)


def test_a_batch_that_was_not_committed_is_applied_by_the_next_owner(make_settings):
    settings = make_settings(windows=(4,))
    events = [purchase("p-1", "m", 1, 10.0), purchase("g-1", None, 2, 5.0),
              purchase("p-2", "m", 3, 30.0), survey("s-1", None, 3, nps=9)]
    records = input_records(settings, events)
    store = MemoryStore()
    task = open_task(settings, store)
    commit_batch(task, records[:2])
    task.apply(records[2:])
    assert task.take_commit() is not None  # ... but its transaction never completes
    successor = open_task(settings, store)
    assert successor.position("loyalty.purchases") == 2
    assert outcomes(commit_batch(successor, records)) == {"applied": 2}
    records_out = successor.processor.evaluate()
    # every event counted once: member orders 10 + 30 over 2, one guest order of 5, one survey
    assert record(records_out, "aov_member", "4h")["numerator"] == 40.0
    assert record(records_out, "aov_member", "4h")["denominator"] == 2
    assert record(records_out, "aov_guest", "4h")["denominator"] == 1
    assert value(records_out, "survey_responses", "4h") == 1


def test_rebuilt_members_keep_their_signal_state(make_settings):
    # at_risk 2, churned 4, V = 5 buckets, notice 1. m: touch 2; n: touch 1, a lot of 3 points
    # earned in bucket 1 that expires in bucket 6
    settings = make_settings(at_risk=2, h=4, validity_ms=5 * B, notice=1)
    store = MemoryStore()
    task = open_task(settings, store)
    events = [enrollment("e-m", "m", 1), enrollment("e-n", "n", 1),
              purchase("p-n", "n", 1, points=3), purchase("p-m", "m", 2)]
    assert signals_of(commit_batch(task, input_records(settings, events))) == []  # K = 2
    # K = 4: touch <= 2: m and n at risk; expiry 6 > 4 + 1: no notice yet
    assert sorted(signals_of(commit_batch(task, advance_to=4))) == [
        ("m", "at_risk", hour(5)), ("n", "at_risk", hour(5))]
    handed_over = MemoryStore()  # the next owner's copy (the original goes on with its own)
    handed_over.write(store.items(), store.offset)
    rebuilt = open_task(settings, handed_over)
    assert signals_of(commit_batch(rebuilt, advance_to=4)) == []  # nothing is announced twice
    again = signals_of(commit_batch(rebuilt, advance_to=5)) + signals_of(
        commit_batch(rebuilt, advance_to=6))
    # K = 5: n 1 <= 1 churned, n's 3 points expire in bucket 6 <= 5 + 1. K = 6: m 2 <= 2 churned
    assert again == [("n", "churned", hour(6)), ("n", "points_expiring", hour(6)),
                     ("m", "churned", hour(7))]
    assert again == signals_of(commit_batch(task, advance_to=5)) + signals_of(
        commit_batch(task, advance_to=6))


@pytest.mark.parametrize(
    "last",
    [purchase("g-late", None, 9, 5.0), survey("s-late", None, 9, nps=8),
     enrollment("e-late", "z", 9, "web")],
    ids=["guest-purchase", "survey", "enrollment"],
)
def test_rebuild_keeps_the_as_of_bucket_when_the_last_event_is_not_member_activity(
        make_settings, last):
    # event clock: K is the bucket of the largest event ts seen (SPEC 2), whatever its type
    settings = make_settings(windows=(3,))
    events = [purchase("p-m", "m", 2, 10.0), last]
    original = feed(Processor(settings), events)
    assert original.as_of_bucket() == 9
    store = MemoryStore()
    commit_batch(open_task(settings, store), input_records(settings, events))
    copy = open_task(settings, store).processor
    assert copy.as_of_bucket() == 9
    assert copy.evaluate() == original.evaluate()


# --- bounded history (Aggregates.collapse) ---------------------------------------------------

def test_history_reach_is_the_longest_lookback_of_any_formula():
    from stream_kpis.core.kpis import history_reach

    # churn_rate_w reads back to K-w-h+1 for windows w <= h; one_and_done to K-s; windows to K-w+1
    assert history_reach([3, 7, 12], horizon=8, settle=5) == 8 + 7
    assert history_reach([30, 90, 365], horizon=90, settle=90) == 365
    assert history_reach([3], horizon=4, settle=9) == 9


def _long_stream(buckets: int) -> list[dict]:
    """Members enrolling, buying, redeeming and answering surveys over ``buckets`` buckets,
    with a late event (50 buckets old) every 10 buckets and a tier change now and then."""
    events = []
    for k in range(buckets):
        member = f"m{k % 17}"
        events.append(enrollment(f"e{k}", f"n{k}", k, "web" if k % 3 else "app",
                                 tier="gold" if k % 5 == 0 else None))
        events.append(purchase(f"p{k}", member, k, 10.0 + k % 7, points=k % 4, margin=2.5,
                               tier="silver" if k % 23 == 0 else None))
        events.append(purchase(f"g{k}", None, k, 4.0))
        if k % 4 == 0:
            events.append(redemption(f"r{k}", member, k, 1))
        events.append(survey(f"s{k}", member if k % 2 else None, k, nps=k % 11, comment="slow"))
        if k % 10 == 9 and k >= 50:
            events.append(purchase(f"late{k}", f"n{k - 50}", k - 50, 3.0, points=1))
    return events


@pytest.mark.parametrize("validity_ms", [None, 6 * B])
def test_bounded_history_equals_the_whole_history(make_settings, validity_ms):
    settings = make_settings(windows=(3, 5), h=4, s=6, validity_ms=validity_ms,
                             lexicons={"friction": ["slow"]},
                             segments=["tier", "enrollment_channel", "home_store", "channel",
                                       "store_id"])
    events = _long_stream(300)
    bounded = feed(Processor(settings), events)
    whole = feed(Processor(settings, bounded_history=False), events)
    K = bounded.as_of_bucket()
    floor = bounded.aggs.floor
    reach = bounded.reach  # max(3, 5, 4 + 3, 4, 6) = 7
    assert reach == 7 and K - reach - 2 * bounded.floor_step < floor <= K - reach - bounded.floor_step
    for later in (0, 1, 9, 40):  # as of K and later buckets (the clock only moves forward)
        assert bounded.evaluate(K + later) == whole.evaluate(K + later)
    # bounded by the reach (and lots by their validity ahead of K), not by 300 buckets of history
    ahead = 0 if validity_ms is None else validity_ms // B
    hists = [h for aggs in (bounded.aggs, *bounded.aggs.segments.values())
             for h in (*aggs.hists, *aggs.sums.values(), *aggs.mentions.values())]
    bound = reach + 2 * bounded.floor_step + 1 + ahead
    assert len(bounded.aggs.segments) > 5 and all(len(h) <= bound for h in hists)
    assert max(len(h) for h in whole.aggs.hists) > 250


def test_bucket_records_of_folded_buckets_are_deleted_and_a_rebuild_agrees(make_settings):
    settings = make_settings(windows=(3,), h=4, s=4, segments=["store_id"])
    events = _long_stream(40)
    store = MemoryStore()
    task = open_task(settings, store)
    records = input_records(settings, events)
    deleted: set[bytes] = set()
    for i in range(0, len(records), 25):  # batches of 25 records
        commit = commit_batch(task, records[i:i + 25])
        deleted |= {key for key, value in commit.state if value is None}
    floor = task.processor.aggs.floor
    buckets = {int(key[2:]) for key, _ in store.items() if key.startswith(b"b:")}
    assert buckets and min(buckets) > floor
    assert {b"b:%d" % k for k in range(floor - 5, floor + 1)} <= deleted
    # the order-dimension value of a purchase older than every window is still known
    assert b"v:store_id\tunknown" in dict(store.items())
    rebuilt = open_task(settings, store).processor
    assert rebuilt.aggs.floor == floor
    assert rebuilt.evaluate() == task.processor.evaluate()
    assert rebuilt.evaluate() == feed(Processor(settings, bounded_history=False),
                                      events).evaluate(rebuilt.as_of_bucket())


def _slots(aggs) -> dict:
    from stream_kpis.core.kpis import Aggregates

    return {name: getattr(aggs, name) for name in Aggregates.__slots__
            if name not in ("segments", "floor")} | {
        "segments": {key: _slots(segment) for key, segment in aggs.segments.items()}}


def test_segments_merged_one_at_a_time_equal_those_of_the_merged_partials(make_settings):
    """merged_segments (the exporter's way) gives the segments of merging whole partials, in
    key order, also with a partial of an earlier format among them, and the same records."""
    import zlib

    from stream_kpis.core.kpis import Aggregates, merged_segments

    settings = make_settings(windows=(3,), segments=["tier", "enrollment_channel", "home_store",
                                                     "channel", "store_id"], cohorts=3)
    partitions = [Processor(settings) for _ in range(3)]
    for n, raw in enumerate(_long_stream(60)):
        if raw["type"] == "purchase":
            raw = {**raw, "store_id": f"s{n % 4}", "channel": "web" if n % 3 else "store"}
        key = (raw.get("member_id") or raw["event_id"]).encode()
        feed(partitions[zlib.crc32(key) % 3], [raw])
    encoded = [p.aggs.to_bytes() for p in partitions]
    encoded[1] = orjson.dumps({"format": 2, **partitions[1].aggs._to_dict()})  # an older worker
    whole = Aggregates()
    for data in encoded:
        whole.merge_bytes(data)
    assert len({frozenset(p.aggs.segments) for p in partitions}) > 1  # not all in every partial
    total = Aggregates()
    streams = [total.merge_head(data) for data in encoded]
    assert not total.segments
    assert _slots(total) == _slots(whole) | {"segments": {}}
    got = list(merged_segments(streams))
    assert [key for key, _ in got] == sorted(whole.segments)
    assert {key: _slots(segment) for key, segment in got} == _slots(whole)["segments"]
    K = max(p.as_of_bucket() for p in partitions)
    total = Aggregates()
    records = evaluate_kpis(settings, total, K, segments=merged_segments(
        [total.merge_head(data) for data in encoded]))
    assert records == evaluate_kpis(settings, whole, K)


def test_aggregates_round_trip_and_the_format_1_partials_of_earlier_versions_still_load(
        make_settings):
    from stream_kpis.core.kpis import Aggregates

    settings = make_settings(windows=(3,), segments=["tier", "store_id"], cohorts=3,
                             lexicons={"friction": ["slow"]})
    aggs = feed(Processor(settings), _long_stream(12)).aggs
    data = aggs.to_bytes()
    assert _slots(Aggregates.from_bytes(data)) == _slots(aggs)
    # format 3: a line without the segments, then a line per segment (decoded one at a time)
    lines = data.split(b"\n")
    assert "segments" not in orjson.loads(lines[0]) and len(aggs.segments) > 1
    assert sorted(orjson.loads(line)[0] for line in lines[1:]) == sorted(aggs.segments)
    # format 2, written before format 3: one JSON document with the segments inside
    format_2 = orjson.dumps({"format": 2, **aggs._to_dict()})
    assert b"\n" not in format_2
    assert _slots(Aggregates.from_bytes(format_2)) == _slots(aggs)
    # format 1, written before format 2: histograms as [[key, value], ...] pairs
    one = Aggregates()
    one.move_member(None, (3, 5, 5, None, 5, None, 5, 5, "web", "gold"))
    one.add("member_revenue", 5, 12.5)
    one.segment("tier", "gold").add("member_orders", 5, 1)
    format_1 = orjson.dumps({
        "hists": [[[3, 1]], [[5, 1]], [[5, 1]], [], [[5, 1]], [], [[5, 1]], [[5, 1]]],
        "by_channel": {"web": [[3, 1]]}, "tiers": {"gold": 1},
        "sums": {"member_revenue": [[5, 12.5]]}, "mentions": {},
        "totals": {"members": 1, "purchasers": 0, "lifetime_spend": 0, "points_balance": 0,
                   "unbacked": 0},
        "segments": {"tier\tgold": {"hists": [[]] * 8, "by_channel": {}, "tiers": {},
                                    "sums": {"member_orders": [[5, 1]]}, "mentions": {},
                                    "totals": dict.fromkeys(one.totals, 0)}},
        "cohort_members": [], "cohort_active": [], "cohort_max": [], "clv": None})
    assert _slots(Aggregates.from_bytes(format_1)) == _slots(one)
