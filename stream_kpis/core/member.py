"""Per-member state and its update rules (pure).

A :class:`MemberState` holds what SPEC section 3 lists. Updates are idempotent per event through
the bounded ``recent`` record of de-duplication keys; everything else is a max/min/sum that does
not depend on arrival order, so out-of-order and late events give the same state as a sorted pass.
With points validity, the member's point lots are re-allocated (FIFO, in event-time order) on
every points event, see :func:`allocate_points`.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any

import orjson

from .events import ENROLLMENT, PURCHASE, REDEMPTION, Event
from .jsonbytes import dumps

__all__ = ["MemberState", "allocate_points", "UNKNOWN", "ACTIVE", "AT_RISK", "CHURNED"]

UNKNOWN = "unknown"
ACTIVE, AT_RISK, CHURNED = "active", "at_risk", "churned"


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


def _insert_sorted(items: list[list], item: list) -> None:
    key = (item[0], item[1])
    i = len(items)
    while i and (items[i - 1][0], items[i - 1][1]) > key:
        i -= 1
    items.insert(i, item)


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

    def apply(self, event: Event, validity_ms: int | None) -> None:
        """Apply one (already de-duplicated) event."""
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
                    if self.lots is None:
                        self.lots = []
                    _insert_sorted(self.lots, [ts, event.event_id, event.points])
                    self._reallocate(validity_ms)
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
                if self.redemptions is None:
                    self.redemptions = []
                _insert_sorted(self.redemptions, [ts, event.event_id, event.points])
                self._reallocate(validity_ms)
        elif kind == ENROLLMENT:
            if (self.enrolled_ts is None or ts < self.enrolled_ts
                    or (ts == self.enrolled_ts and event.event_id < self.enroll_key)):
                self.enrolled_ts = ts
                self.enroll_key = event.event_id
                self.channel = event.channel or UNKNOWN
            self._maybe_tier(event)

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

    def _reallocate(self, validity_ms: int) -> None:
        self.remaining, self.unbacked = allocate_points(self.lots or [], self.redemptions or [],
                                                        validity_ms)

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
