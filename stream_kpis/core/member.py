"""Per-member state and its update rules (pure).

A :class:`MemberState` holds what SPEC section 3 lists. Updates are idempotent per event through
the bounded ``recent`` record of de-duplication keys; everything else is a max/min/sum that does
not depend on arrival order, so out-of-order and late events give the same state as a sorted pass.
With points validity, the member's point lots are FIFO-allocated in event-time order (see
:func:`allocate_points`): a points event that comes after all the member's others (the usual case
in a time-ordered stream) extends the allocation, any other re-allocates from scratch; either way
:meth:`MemberState.apply` says which lots changed, so the aggregates move only those.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from itertools import compress
from operator import attrgetter, itemgetter
from typing import Any

import orjson

from .events import ENROLLMENT, PURCHASE, REDEMPTION, Event
from .jsonbytes import dumps

__all__ = ["MemberState", "LotChanges", "allocate_points", "UNKNOWN", "ACTIVE", "AT_RISK",
           "CHURNED"]

UNKNOWN = "unknown"
ACTIVE, AT_RISK, CHURNED = "active", "at_risk", "churned"

#: The lots a points event changed: (lot index, its remaining points before the event, or None
#: for the event's own new lot), in lot order.
LotChanges = list[tuple[int, int | None]]

_lot_ts = itemgetter(0)  # lots and redemptions are [ts, event_id, points], sorted by (ts, id)


def allocate_points(lots: list[list], redemptions: list[list], validity_ms: int
                    ) -> tuple[list[int], int]:
    """FIFO allocation of redemptions to lots, in event-time order (SPEC 4.1).

    ``lots`` and ``redemptions`` are ``[ts, event_id, points]`` lists sorted by (ts, event_id).
    A redemption at r consumes from lots earned at or before r and not expired at r
    (t <= r < t + V), oldest first. Returns (remaining points per lot, unbacked points).
    """
    remaining = [lot[2] for lot in lots]
    unbacked = 0
    first = 0
    count = len(lots)
    for r, _, need in redemptions:
        # lots are sorted by t, so expired or exhausted lots at the front stay useless for later r
        while first < count and (lots[first][0] + validity_ms <= r or not remaining[first]):
            first += 1
        i = first
        while need and i < count and lots[i][0] <= r:
            if remaining[i] and lots[i][0] + validity_ms > r:
                take = need if need < remaining[i] else remaining[i]
                remaining[i] -= take
                need -= take
            i += 1
        unbacked += need
    return remaining, unbacked


def _insert_sorted(items: list[list], item: list) -> int:
    """Insert ``item`` in (ts, event_id) order, searching from the end (where a time-ordered
    stream adds); returns its index."""
    i = len(items)
    if not i or items[-1][0] < item[0]:  # later than all: the usual case in a time-ordered stream
        items.append(item)
        return i
    key = (item[0], item[1])
    while i and (items[i - 1][0], items[i - 1][1]) > key:
        i -= 1
    items.insert(i, item)
    return i


class MemberState:
    """Everything kept per member; timestamps in epoch ms, None when not seen yet."""

    __slots__ = (
        "enrolled_ts", "enroll_key", "channel", "first_seen", "tier", "tier_key",
        "last_activity", "last_purchase", "prev_purchase", "first_purchase", "purchase_count",
        "lifetime_spend", "points_earned", "points_redeemed", "last_redemption",
        "redemption_count", "recent", "lots", "redemptions", "remaining", "unbacked",
        "status", "notified_expiry", "home_store", "home_key", "months", "purchase_days",
    )

    def __init__(self) -> None:
        self.enrolled_ts: int | None = None   # ts of the earliest explicit enrollment
        self.enroll_key: str | None = None    # its event_id (ties on ts broken by event_id)
        self.channel: str = UNKNOWN
        self.first_seen: int | None = None    # min ts of purchases and redemptions
        self.tier: str = UNKNOWN
        self.tier_key: list | None = None     # [ts, event_id] of the event that set the tier
        self.last_activity: int | None = None
        self.last_purchase: int | None = None
        self.prev_purchase: int | None = None
        self.first_purchase: int | None = None
        self.purchase_count = 0
        self.lifetime_spend = 0.0
        self.points_earned = 0
        self.points_redeemed = 0
        self.last_redemption: int | None = None
        self.redemption_count = 0
        self.recent: dict[str, Any] = {}  # dedupe keys, oldest first (values unused: see seen)
        self.lots: list[list] | None = None         # with points validity: [ts, event_id, points]
        self.redemptions: list[list] | None = None  # with points validity: [ts, event_id, points]
        self.remaining: list[int] | None = None     # per lot, after allocation
        self.unbacked = 0
        self.status = ACTIVE
        self.notified_expiry: list[int] = []        # expiry buckets a notice was sent for (>= K)
        self.home_store: str = UNKNOWN              # store_id of the earliest purchase with one
        self.home_key: list | None = None           # [ts, event_id] of that purchase
        self.months: list[int] | None = None        # sorted months with activity (year*12+month-1)
        self.purchase_days: list[list] | None = None  # with CLV: [UTC day, total amount], sorted

    # derived fields
    @property
    def enrolled_at(self) -> int | None:
        return self.enrolled_ts if self.enrolled_ts is not None else self.first_seen

    @property
    def last_touch(self) -> int | None:
        enrolled = self.enrolled_at
        if self.last_activity is None:
            return enrolled
        return self.last_activity if enrolled is None or self.last_activity > enrolled else enrolled

    def seen(self, key: str, bound: int) -> bool:
        """Whether the event with this de-duplication key was applied; remembers it if not.

        Only the last ``bound`` keys are kept. New keys map to None; states written by older
        versions map keys to delivery tokens, which are kept as they are and never read.
        """
        recent = self.recent
        if key in recent:
            return True
        recent[key] = None
        if len(recent) > bound:
            del recent[next(iter(recent))]
        return False

    def apply(self, event: Event, validity_ms: int | None) -> LotChanges | None:
        """Apply one (already de-duplicated) event. With points validity, a points event returns
        the lots it changed (see :data:`LotChanges`); anything else returns None."""
        changes = None
        ts = event.ts
        kind = event.type
        if kind == PURCHASE:
            self._activity(ts)
            self.purchase_count += 1
            self.lifetime_spend += event.amount
            if self.last_purchase is None or ts >= self.last_purchase:
                self.prev_purchase = self.last_purchase
                self.last_purchase = ts
            elif self.prev_purchase is None or ts > self.prev_purchase:
                self.prev_purchase = ts
            if self.first_purchase is None or ts < self.first_purchase:
                self.first_purchase = ts
            if event.points:
                self.points_earned += event.points
                if validity_ms is not None:
                    changes = self._add_lot([ts, event.event_id, event.points], validity_ms)
            self._maybe_tier(event)
            if event.store_id:
                key = [ts, event.event_id]
                if self.home_key is None or key < self.home_key:
                    self.home_key = key
                    self.home_store = event.store_id
        elif kind == REDEMPTION:
            self._activity(ts)
            self.redemption_count += 1
            self.points_redeemed += event.points
            if self.last_redemption is None or ts > self.last_redemption:
                self.last_redemption = ts
            if validity_ms is not None:
                changes = self._add_redemption([ts, event.event_id, event.points], validity_ms)
        elif kind == ENROLLMENT:
            if (self.enrolled_ts is None or ts < self.enrolled_ts
                    or (ts == self.enrolled_ts and event.event_id < self.enroll_key)):
                self.enrolled_ts = ts
                self.enroll_key = event.event_id
                self.channel = event.channel or UNKNOWN
            self._maybe_tier(event)
        return changes

    def _activity(self, ts: int) -> None:
        if self.last_activity is None or ts > self.last_activity:
            self.last_activity = ts
        if self.first_seen is None or ts < self.first_seen:
            self.first_seen = ts

    def _maybe_tier(self, event: Event) -> None:
        if event.tier is None:
            return
        key = [event.ts, event.event_id]
        if self.tier_key is None or key > self.tier_key:
            self.tier_key = key
            self.tier = event.tier

    def _add_lot(self, lot: list, validity_ms: int) -> LotChanges:
        """Add a purchase's lot and allocate; the lots that changed."""
        if self.lots is None:
            self.lots = []
        index = _insert_sorted(self.lots, lot)
        remaining, redemptions = self.remaining, self.redemptions
        if remaining is None and len(self.lots) == 1 and not redemptions:
            remaining = self.remaining = []  # the first points event: nothing allocated yet
        if (remaining is not None and index == len(remaining)
                and (not redemptions or redemptions[-1][0] < lot[0])):
            # the latest lot, earned after every redemption: none can take from it, and the
            # allocation of the others stays as it was
            remaining.append(lot[2])
            return [(index, None)]
        return self._reallocate(validity_ms, index)

    def _add_redemption(self, redemption: list, validity_ms: int) -> LotChanges:
        """Add a redemption and allocate it; the lots that changed."""
        if self.redemptions is None:
            self.redemptions = []
        index = _insert_sorted(self.redemptions, redemption)
        lots, remaining = self.lots or [], self.remaining
        if remaining is None and not lots:
            remaining = self.remaining = []  # as allocate_points gives it
        if index < len(self.redemptions) - 1 or remaining is None or len(remaining) != len(lots):
            return self._reallocate(validity_ms, None)
        # the latest redemption: FIFO allocation takes it last, from what the earlier ones left
        r, _, need = redemption
        changes = []
        # lots earned at or before r and not expired at r (t <= r < t + V) are a slice of the
        # lots; of those, only the ones with points left (compress skips the rest in C: a
        # member's old lots are mostly used up)
        start = bisect_right(lots, r - validity_ms, key=_lot_ts)
        end = bisect_right(lots, r, lo=start, key=_lot_ts)
        for i in compress(range(start, end), remaining[start:end]):
            before = remaining[i]
            take = need if need < before else before
            remaining[i] = before - take
            need -= take
            changes.append((i, before))
            if not need:
                break
        self.unbacked += need
        return changes

    def _reallocate(self, validity_ms: int, inserted: int | None) -> LotChanges:
        """Allocate all lots again; ``inserted`` is the index of a new lot, if any."""
        before: list[int | None] = list(self.remaining or [])
        if inserted is not None:
            before.insert(inserted, None)
        self.remaining, self.unbacked = allocate_points(self.lots or [], self.redemptions or [],
                                                        validity_ms)
        return [(i, old) for i, (old, new) in enumerate(zip(before, self.remaining, strict=True))
                if old != new]

    def has_lots_expiring(self, after: int, upto: int, validity_ms: int, bucket_ms: int) -> bool:
        """Whether some lot's expiry bucket is in (after, upto]: such a lot was earned in
        [(after+1)*bucket - V, (upto+1)*bucket - V), and the lots are sorted by ts, so the first
        and the last lot answer without a search (the usual answer is no: all the member's lots
        expire later, or have expired)."""
        lots = self.lots
        return bool(lots) and lots[0][0] < (upto + 1) * bucket_ms - validity_ms \
            and lots[-1][0] >= (after + 1) * bucket_ms - validity_ms

    def lots_expiring(self, after: int, upto: int, validity_ms: int, bucket_ms: int
                      ) -> list[tuple[int, int]]:
        """(expiry bucket, remaining) of the lots whose expiry bucket is in (after, upto], in lot
        order: lots are sorted by ts and the expiry bucket (ts + V) // bucket_ms grows with it,
        so they are one slice of the lots."""
        if not self.has_lots_expiring(after, upto, validity_ms, bucket_ms):
            return []
        lots = self.lots
        first_ts, end_ts = (after + 1) * bucket_ms - validity_ms, (upto + 1) * bucket_ms - validity_ms
        start = bisect_left(lots, first_ts, key=_lot_ts)
        end = bisect_left(lots, end_ts, lo=start, key=_lot_ts)
        remaining = self.remaining
        return [((lots[i][0] + validity_ms) // bucket_ms, remaining[i]) for i in range(start, end)]

    def lot_contributions(self, validity_ms: int, bucket_ms: int) -> list[tuple[int, int, int]]:
        """(expiry bucket, points, remaining) per lot."""
        if not self.lots:
            return []
        return [((lot[0] + validity_ms) // bucket_ms, lot[2], rem)
                for lot, rem in zip(self.lots, self.remaining, strict=True)]

    def balance(self, as_of_bucket: int, validity_ms: int | None, bucket_ms: int) -> int:
        """Points the member holds as of K (unexpired remaining minus unbacked)."""
        if validity_ms is None:
            return self.points_earned - self.points_redeemed
        live = sum(rem for expiry, _, rem in self.lot_contributions(validity_ms, bucket_ms)
                   if expiry > as_of_bucket)
        return live - self.unbacked

    # persistence: a compact list, orjson-encoded, for the state log and the local stores
    def to_bytes(self) -> bytes:
        """The fields in slot order as a JSON array (one C call gathers them all)."""
        return dumps(_slot_values(self))

    @classmethod
    def from_bytes(cls, data: bytes) -> MemberState:
        """A state from :meth:`to_bytes`; states written before the last fields were added get
        their defaults for them."""
        values = orjson.loads(data)
        if len(values) < len(cls.__slots__):
            state = cls()
            for name, value in zip(cls.__slots__, values, strict=False):
                setattr(state, name, value)
            return state
        state = cls.__new__(cls)
        # one unpacking instead of a setattr per field: most of a state read's cost otherwise
        (state.enrolled_ts, state.enroll_key, state.channel, state.first_seen, state.tier,
         state.tier_key, state.last_activity, state.last_purchase, state.prev_purchase,
         state.first_purchase, state.purchase_count, state.lifetime_spend, state.points_earned,
         state.points_redeemed, state.last_redemption, state.redemption_count, state.recent,
         state.lots, state.redemptions, state.remaining, state.unbacked, state.status,
         state.notified_expiry, state.home_store, state.home_key, state.months,
         state.purchase_days) = values
        return state

    def add_purchase_day(self, day: int, amount: float) -> None:
        """Add a purchase's amount to its UTC day's total (SPEC 4.4)."""
        days = self.purchase_days
        if days is None:
            self.purchase_days = [[day, amount]]
            return
        for entry in days:
            if entry[0] == day:
                entry[1] += amount
                return
        days.append([day, amount])
        days.sort()

    def add_month(self, month: int) -> bool:
        """Remember a month with activity; whether it is new."""
        months = self.months
        if months is None:
            self.months = [month]
            return True
        if month in months:
            return False
        months.append(month)
        months.sort()
        return True


#: Every field of a state, in slot order, as a tuple (orjson writes a tuple as an array).
_slot_values = attrgetter(*MemberState.__slots__)
