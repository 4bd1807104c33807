"""Property tests of a member's point lots (stream_kpis.core.member): the lot changes a points
event reports, moved into histograms, give the histograms of the lots allocated from scratch by
:func:`allocate_points`; and ``lots_expiring`` is the filter of ``lot_contributions`` it stands in
for. Time-ordered streams take the fast paths (a lot or a redemption after all others), shuffled
ones the full re-allocation.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from stream_kpis.core.events import PURCHASE, REDEMPTION, Event
from stream_kpis.core.member import MemberState, allocate_points

BUCKET = 10

points_events = st.lists(
    st.tuples(st.sampled_from([PURCHASE, REDEMPTION]), st.integers(0, 120), st.integers(1, 30)),
    max_size=40)


def _events(raw: list[tuple[str, int, int]]) -> list[Event]:
    return [Event(type=kind, event_id=f"e{i:02d}", member_id="m", ts=ts, amount=1.0, points=points)
            for i, (kind, ts, points) in enumerate(raw)]


def _histograms(state: MemberState, validity: int) -> tuple[Counter, Counter]:
    """(points, remaining) by expiry bucket, from the member's lots as they are now."""
    points, remaining = Counter(), Counter()
    for expiry, lot_points, lot_remaining in state.lot_contributions(validity, BUCKET):
        points[expiry] += lot_points
        remaining[expiry] += lot_remaining
    return +points, +remaining


@settings(max_examples=400, deadline=None)
@given(raw=points_events, validity=st.integers(1, 80), ordered=st.booleans(), seed=st.randoms())
def test_lot_changes_move_histograms_to_those_of_a_full_allocation(raw, validity, ordered, seed):
    events = _events(raw)
    if ordered:
        events.sort(key=lambda event: event.ts)
    else:
        seed.shuffle(events)
    state = MemberState()
    points, remaining = Counter(), Counter()
    for event in events:
        old_remaining = list(state.remaining or [])
        changes = state.apply(event, validity)
        assert state.remaining is not None and changes is not None
        new_lots = [i for i, before in changes if before is None]
        assert len(new_lots) == (event.type == PURCHASE)
        for i, before in changes:
            ts, _, lot_points = state.lots[i]
            expiry = (ts + validity) // BUCKET
            if before is None:
                points[expiry] += lot_points
                before = 0
            remaining[expiry] += state.remaining[i] - before
        assert (state.remaining, state.unbacked) == allocate_points(
            state.lots or [], state.redemptions or [], validity)
        assert (+points, +remaining) == _histograms(state, validity)
        # a redemption only takes points: no lot gains any
        if event.type == REDEMPTION:
            assert all(a <= b for a, b in zip(state.remaining, old_remaining, strict=True))


@settings(max_examples=300, deadline=None)
@given(raw=points_events, validity=st.integers(1, 80), after=st.integers(-5, 25),
       length=st.integers(0, 25))
def test_lots_expiring_is_a_filter_of_lot_contributions(raw, validity, after, length):
    state = MemberState()
    for event in _events(raw):
        state.apply(event, validity)
    upto = after + length
    expected = [(expiry, rem) for expiry, _, rem in state.lot_contributions(validity, BUCKET)
                if after < expiry <= upto]
    assert state.lots_expiring(after, upto, validity, BUCKET) == expected
