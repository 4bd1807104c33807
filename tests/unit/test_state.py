"""Tests of stream_kpis.core.member: FIFO point allocation (SPEC 4.1), member fields, persistence and
the bounded de-duplication memory. Every expected number is worked out in the comments.
"""

from __future__ import annotations

import itertools

import orjson
import pytest

from stream_kpis.core.events import ENROLLMENT, PURCHASE, REDEMPTION, Event
from stream_kpis.core.member import ACTIVE, UNKNOWN, MemberState, allocate_points

V = 100  # points validity in ms for the allocation examples: a lot earned at t expires at t + 100


def lot(ts, points, eid=None):
    return [ts, eid or f"p{ts}", points]


def redeem(ts, points, eid=None):
    return [ts, eid or f"r{ts}", points]


# --- allocate_points ------------------------------------------------------------------------


def test_fifo_across_lots():
    # A 10 @0, B 5 @10, C 7 @20; redeem 12 @30: A gives 10, B gives 2 -> A 0, B 3, C 7
    assert allocate_points([lot(0, 10), lot(10, 5), lot(20, 7)], [redeem(30, 12)], V) == ([0, 3, 7], 0)


def test_several_redemptions_continue_where_the_last_stopped():
    # 4 @30 takes A 10 -> 6; 9 @40 takes A 6 -> 0 and B 3 -> 2; C untouched
    lots = [lot(0, 10), lot(10, 5), lot(20, 7)]
    assert allocate_points(lots, [redeem(30, 4), redeem(40, 9)], V) == ([0, 2, 7], 0)


def test_redemption_exactly_at_expiry_cannot_use_the_lot():
    # A earned at 0 expires at 0 + 100 = 100: at r = 100 it is expired (t <= r < t + V fails)
    assert allocate_points([lot(0, 10)], [redeem(100, 4)], V) == ([10], 4)
    # ... and the next lot is used instead
    assert allocate_points([lot(0, 10), lot(50, 5)], [redeem(100, 4)], V) == ([10, 1], 0)


def test_redemption_one_ms_before_expiry_uses_the_lot():
    assert allocate_points([lot(0, 10)], [redeem(99, 4)], V) == ([6], 0)


def test_purchase_and_redemption_at_the_same_instant():
    # t <= r: a lot earned at the very ms of the redemption is usable
    assert allocate_points([lot(50, 10)], [redeem(50, 4)], V) == ([6], 0)


def test_lot_earned_after_the_redemption_is_not_usable():
    # the lot arrives 1 ms too late: all 4 points are unbacked and the lot stays whole
    assert allocate_points([lot(51, 10)], [redeem(50, 4)], V) == ([10], 4)


def test_redemption_larger_than_the_balance_is_unbacked_and_never_netted():
    # A 10 @0, redeem 15 @10: A -> 0, 5 unbacked. B 10 @20 comes later: not used to cover the 5
    assert allocate_points([lot(0, 10), lot(20, 10)], [redeem(10, 15)], V) == ([0, 10], 5)
    # only expired lots: everything is unbacked
    assert allocate_points([lot(0, 10)], [redeem(500, 3)], V) == ([10], 3)
    assert allocate_points([], [redeem(5, 3), redeem(6, 2)], V) == ([], 5)


def test_exhausted_or_expired_front_lots_are_skipped_for_later_redemptions():
    # A 2 @0, B 3 @10, C 4 @120. r1 2 @50: A -> 0. r2 5 @115: A exhausted, B expired (110),
    # C not yet earned -> 5 unbacked. r3 3 @130: C -> 1.
    lots = [lot(0, 2), lot(10, 3), lot(120, 4)]
    assert allocate_points(lots, [redeem(50, 2), redeem(115, 5), redeem(130, 3)], V) == ([0, 3, 1], 5)


def test_ties_on_the_earn_time_go_by_event_id():
    # both lots earned at 0; sorted by (ts, event_id): "a" is older than "b"
    lots = [lot(0, 5, "a"), lot(0, 5, "b")]
    assert allocate_points(lots, [redeem(1, 3)], V) == ([2, 5], 0)


# --- MemberState ----------------------------------------------------------------------------


def purchase(eid, ts, amount=10.0, points=0, tier=None):
    return Event(PURCHASE, eid, "m", ts, amount=amount, points=points, tier=tier)


def redemption(eid, ts, points):
    return Event(REDEMPTION, eid, "m", ts, points=points)


def enrollment(eid, ts, channel=None, tier=None):
    return Event(ENROLLMENT, eid, "m", ts, channel=channel, tier=tier)


def points_events():
    # V = 100. P1 10 @0, P2 5 @10, R1 12 @30 (P1 -> 0, P2 -> 3), P3 7 @105,
    # R2 8 @110 (P1 exhausted, P2 expired at exactly 110 -> P3 7 -> 0, 1 unbacked)
    return [purchase("P1", 0, points=10), purchase("P2", 10, points=5), redemption("R1", 30, 12),
            purchase("P3", 105, points=7), redemption("R2", 110, 8)]


def apply_all(events, validity=V):
    state = MemberState()
    for event in events:
        state.apply(event, validity)
    return state


def test_member_lots_worked_example():
    state = apply_all(points_events())
    assert state.remaining == [0, 3, 0]
    assert state.unbacked == 1
    assert (state.points_earned, state.points_redeemed) == (22, 20)


def test_out_of_order_insertion_gives_the_same_allocation():
    for order in itertools.permutations(points_events()):
        state = apply_all(order)
        assert [lot[1] for lot in state.lots] == ["P1", "P2", "P3"]
        assert (state.remaining, state.unbacked) == ([0, 3, 0], 1), [e.event_id for e in order]


def test_balance_and_lot_contributions():
    state = apply_all(points_events())
    # bucket 50 ms: expiry buckets P1 100 // 50 = 2, P2 110 // 50 = 2, P3 205 // 50 = 4
    assert state.lot_contributions(V, 50) == [(2, 10, 0), (2, 5, 3), (4, 7, 0)]
    # as of bucket 2: live lots have expiry bucket > 2 -> P3 0 remaining, minus 1 unbacked
    assert state.balance(2, V, 50) == -1
    # as of bucket 1: P2's 3 are still live: 3 + 0 - 1
    assert state.balance(1, V, 50) == 2
    # without validity: earned - redeemed
    assert apply_all(points_events(), None).balance(2, None, 50) == 22 - 20
    assert apply_all(points_events(), None).lots is None


def test_member_fields():
    state = apply_all([
        purchase("a", 50, 20.0, tier="gold"),
        enrollment("e2", 30, "store"),
        purchase("b", 70, 5.0),
        enrollment("e1", 30, "web", tier="silver"),  # same ts as e2, smaller event_id: wins
        purchase("c", 40, 1.0),
        redemption("r", 60, 1),
    ], None)
    assert (state.enrolled_at, state.channel) == (30, "web")
    assert state.first_seen == 40
    assert state.last_activity == 70 and state.last_touch == 70
    assert (state.first_purchase, state.prev_purchase, state.last_purchase) == (40, 50, 70)
    assert state.purchase_count == 3 and state.lifetime_spend == 26.0
    assert (state.last_redemption, state.redemption_count) == (60, 1)
    assert state.tier == "gold"  # purchase @50 is later than the silver enrollment @30


def test_implicit_member_and_touch_without_activity():
    implicit = apply_all([redemption("r", 80, 1), purchase("p", 90)], None)
    assert (implicit.enrolled_at, implicit.channel, implicit.tier) == (80, UNKNOWN, UNKNOWN)
    enrolled_only = apply_all([enrollment("e", 25)], None)
    assert enrolled_only.last_activity is None
    assert enrolled_only.last_touch == 25
    assert enrolled_only.channel == UNKNOWN  # enrollment without channel
    late_enrollment = apply_all([purchase("p", 10), enrollment("e", 20, "app")], None)
    assert late_enrollment.enrolled_at == 20  # an enrollment event wins over first activity
    assert late_enrollment.last_touch == 20  # max(enrolled_at 20, last_activity 10)


def fields(state: MemberState) -> dict:
    return {name: getattr(state, name) for name in MemberState.__slots__}


def test_to_bytes_round_trip():
    state = apply_all(points_events() + [enrollment("e", 5, "web", "gold")])
    state.seen("pP1", 10)
    state.status = "at_risk"
    state.notified_expiry = 4
    copy = MemberState.from_bytes(state.to_bytes())
    assert fields(copy) == fields(state)
    assert copy.enrolled_at == 5 and copy.tier == "gold" and copy.channel == "web"
    # the copy keeps working like the original
    assert copy.seen("pP1", 10) is True
    for target in (state, copy):
        target.apply(purchase("P4", 120, points=2), V)
    assert fields(copy) == fields(state)
    # P4 2 @120 changes nothing before it: remaining [0, 3, 0, 2]
    assert copy.remaining == [0, 3, 0, 2] and copy.unbacked == 1


def test_fresh_state_round_trip():
    state = MemberState()
    assert fields(MemberState.from_bytes(state.to_bytes())) == fields(state)
    assert state.status == ACTIVE


def test_states_written_with_delivery_tokens_still_read():
    # earlier versions kept a Kafka delivery token ("topic:offset") per de-duplication key
    old = fields(apply_all([enrollment("e", 5, "web"), purchase("P1", 20)]))
    old["recent"] = {"eE1": None, "pP1": "loyalty.purchases:7"}
    state = MemberState.from_bytes(orjson.dumps([old[name] for name in MemberState.__slots__]))
    assert state.seen("pP1", 10) is True and state.seen("eE1", 10) is True
    assert state.seen("pP2", 10) is False
    assert list(state.recent) == ["eE1", "pP1", "pP2"]
    assert (state.purchase_count, state.last_touch) == (1, 20)


# --- seen -----------------------------------------------------------------------------------


def test_seen_remembers_a_new_key():
    state = MemberState()
    assert state.seen("pA", 5) is False  # new: remembered now
    assert state.seen("pA", 5) is True
    assert state.seen("rA", 5) is False  # the key includes the type
    assert state.seen("rA", 5) is True


def test_seen_is_bounded_oldest_first():
    state = MemberState()
    for key in ("k1", "k2", "k3"):
        assert state.seen(key, 2) is False
    assert len(state.recent) == 2
    assert list(state.recent) == ["k2", "k3"]
    assert state.seen("k3", 2) is True
    assert state.seen("k1", 2) is False  # forgotten: treated as new (and k2 drops out)
    assert list(state.recent) == ["k3", "k1"]


@pytest.mark.parametrize("bound", [1, 3, 128])
def test_seen_never_exceeds_its_bound(bound):
    state = MemberState()
    for i in range(bound * 3):
        state.seen(f"k{i}", bound)
        assert len(state.recent) <= bound


def test_from_bytes_restores_every_field_in_slot_order():
    """from_bytes unpacks the fields by hand: a field added to __slots__ must be added there."""
    state = MemberState()
    for i, name in enumerate(MemberState.__slots__):
        setattr(state, name, i)
    copy = MemberState.from_bytes(state.to_bytes())
    assert [getattr(copy, name) for name in MemberState.__slots__] == \
        list(range(len(MemberState.__slots__)))
