"""Bucket histograms and the KPI formulas of SPEC section 4 (pure).

:class:`Aggregates` holds, for one partition (or merged over all), count histograms keyed by
bucket (how many members have field x in bucket k) and per-bucket sums of event values.
Members move between buckets when one of their timestamps changes. KPIs are range counts and
range sums over these histograms, so they are exact and cheap to evaluate; aggregates of several
partitions are merged by adding them up (:meth:`Aggregates.merge`).
"""

from __future__ import annotations

import datetime
import heapq
import re
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import accumulate, groupby
from operator import itemgetter, sub
from typing import Any

import orjson

from .catalogue import CATALOGUE
from .timebase import as_of_time

__all__ = [
    "Aggregates",
    "MemberView",
    "member_view",
    "evaluate",
    "evaluate_with_churn",
    "churn_snapshot",
    "churn_snapshots",
    "KPI_TOPICS",
    "MentionMatcher",
    "Contribution",
    "member_contribution",
    "member_value",
    "cohort_records",
    "month_of",
    "NO_FLOOR",
    "history_reach",
    "merged_segments",
]

# Indexes into MemberView for the member count histograms.
ENROLLED, LAST_ACTIVITY, LAST_TOUCH, LAST_REDEMPTION, LAST_PURCHASE, PREV_PURCHASE, \
    FIRST_PURCHASE, FIRST_PURCHASE_SINGLE = range(8)
_MEMBER_HISTS = 8

#: Per-bucket sums of event values (names are the keys of Aggregates.sums).
SUM_NAMES = (
    "points_earned", "points_redeemed",
    "member_revenue", "member_orders", "guest_revenue", "guest_orders",
    "member_margin", "member_margin_orders", "guest_margin", "guest_margin_orders",
    "surveys", "nps_n", "nps_net", "nps_n_member", "nps_net_member", "nps_n_guest",
    "nps_net_guest", "csat_n", "csat_pos",
    "lot_points", "lot_remaining",  # keyed by expiry bucket (points validity)
)
TOTAL_NAMES = ("members", "purchasers", "lifetime_spend", "points_balance", "unbacked")

#: A member's position in the count histograms: 8 buckets (or None), then channel and tier.
MemberView = tuple


def member_view(state: Any, bucket_ms: int) -> MemberView:
    """Buckets of the histogram fields of a member state (see ENROLLED ... constants).

    Written out by hand (no helper calls): it runs twice per event on the hot path.
    """
    enrolled = state.enrolled_ts if state.enrolled_ts is not None else state.first_seen
    activity = state.last_activity
    touch = activity if activity is not None and (enrolled is None or activity > enrolled) \
        else enrolled
    first = state.first_purchase
    redemption, last, prev = state.last_redemption, state.last_purchase, state.prev_purchase
    first_b = None if first is None else first // bucket_ms
    return (
        None if enrolled is None else enrolled // bucket_ms,
        None if activity is None else activity // bucket_ms,
        None if touch is None else touch // bucket_ms,
        None if redemption is None else redemption // bucket_ms,
        None if last is None else last // bucket_ms,
        None if prev is None else prev // bucket_ms,
        first_b,
        first_b if state.purchase_count == 1 else None,
        state.channel, state.tier,
    )


def member_value(state: Any, dimension: str) -> str:
    """A member's value of a member dimension (SPEC 4.2); "unknown" when it has none."""
    if dimension == "tier":
        return state.tier
    if dimension == "enrollment_channel":
        return state.channel
    return state.home_store


#: A whole member's part of the aggregates: (view, lifetime spend, points balance, has a
#: purchase, unbacked points, lot contributions).
Contribution = tuple


def member_contribution(state: Any, bucket_ms: int, validity_ms: int | None) -> Contribution:
    lots = (tuple(state.lot_contributions(validity_ms, bucket_ms))
            if validity_ms is not None and state.lots else ())
    return (member_view(state, bucket_ms), state.lifetime_spend,
            state.points_earned - state.points_redeemed, state.purchase_count > 0,
            state.unbacked, lots)


#: The floor of aggregates that keep their whole history (nothing folded yet).
NO_FLOOR = -(1 << 62)


def history_reach(windows: Iterable[int], horizon: int, settle: int) -> int:
    """How many buckets before the as-of bucket K any KPI formula reads (SPEC section 4, in
    buckets): every range starts at K - reach + 1 or later, and every range that runs from
    the beginning ends at K - reach or later. Buckets at or before K - reach are therefore
    never told apart: :meth:`Aggregates.collapse` folds them into one."""
    windows = list(windows)
    churn = [horizon + w for w in windows if w <= horizon]
    return max([*windows, *churn, horizon, settle])


#: One int object per bucket number, shared by every histogram that has the bucket as a key:
#: with segments, a bucket is a key of dozens of histograms, and a separate 32-byte int per
#: entry is a third of the aggregates' memory. Grows by one entry per bucket of event time.
_BUCKET_KEYS: dict[int, int] = {}
shared_key = _BUCKET_KEYS.setdefault  # shared_key(bucket, bucket): the shared int


def _add(hist: dict, key: Any, amount: float) -> None:
    value = hist.get(key)
    if value is None:
        if amount:
            hist[shared_key(key, key)] = amount
        return
    value += amount
    if value:
        hist[key] = value
    else:
        del hist[key]


class Aggregates:
    """Histograms and sums for a set of members and events (one partition, or merged)."""

    __slots__ = ("hists", "by_channel", "tiers", "sums", "mentions", "totals", "segments",
                 "cohort_members", "cohort_active", "cohort_max", "clv", "floor")

    def __init__(self) -> None:
        self.hists: list[dict[int, int]] = [{} for _ in range(_MEMBER_HISTS)]
        self.by_channel: dict[str, dict[int, int]] = {}   # enrolled bucket histogram by channel
        self.tiers: dict[str, int] = {}
        self.sums: dict[str, dict[int, float]] = {name: {} for name in SUM_NAMES}
        self.mentions: dict[str, dict[int, int]] = {}      # "lexicon\tterm" -> bucket histogram
        self.totals: dict[str, float] = dict.fromkeys(TOTAL_NAMES, 0)
        # SPEC 4.2: "dimension\tvalue" -> the aggregates of that segment's members or purchases
        self.segments: dict[str, Aggregates] = {}
        # SPEC 4.3, by raw month (year*12 + month-1): members by enrollment month; members by
        # (enrollment month, month with activity >= it); members by (enrollment month, their
        # latest month with activity), which is what clamping to the month of K needs
        self.cohort_members: dict[int, int] = {}
        self.cohort_active: dict[int, dict[int, int]] = {}
        self.cohort_max: dict[int, dict[int, int]] = {}
        self.clv: Any = None  # SPEC 4.4: clv.SufficientStats of the members, when CLV is on
        # Bounded history (see collapse): the count histograms hold everything at or before
        # ``floor`` in the floor bucket; event sums and mentions there are gone.
        self.floor = NO_FLOOR

    def move_member(self, old: MemberView | None, new: MemberView) -> None:
        """Move one member from its old histogram positions to the new ones (a bucket at or
        before the floor counts in the floor bucket)."""
        hists, floor = self.hists, self.floor
        if old is None:
            self.totals["members"] += 1
            for i in range(_MEMBER_HISTS):
                after = new[i]
                if after is not None:
                    _add(hists[i], after if after > floor else floor, 1)
            enrolled = new[0]
            if enrolled is not None and enrolled < floor:
                enrolled = floor
            _add(self.by_channel.setdefault(new[8], {}), enrolled, 1)
            _add(self.tiers, new[9], 1)
            return
        for hist, before, after in zip(hists, old, new, strict=False):  # the 8 histograms only
            if before != after:
                if before is not None:
                    if before < floor:
                        before = floor
                    count = hist[before] - 1
                    if count:
                        hist[before] = count
                    else:
                        del hist[before]
                if after is not None:
                    if after < floor:
                        after = floor
                    count = hist.get(after)
                    if count is None:
                        hist[shared_key(after, after)] = 1
                    else:
                        hist[after] = count + 1
        if old[0] != new[0] or old[8] != new[8]:
            before, after = old[0], new[0]
            if before is not None and before < floor:
                before = floor
            if after is not None and after < floor:
                after = floor
            _add(self.by_channel.setdefault(old[8], {}), before, -1)
            _add(self.by_channel.setdefault(new[8], {}), after, 1)
        if old[9] != new[9]:
            _add(self.tiers, old[9], -1)
            _add(self.tiers, new[9], 1)

    def add(self, name: str, bucket: int, amount: float) -> None:
        """Add to an event sum (nothing at or before the floor: no window reaches there)."""
        if bucket > self.floor:
            _add(self.sums[name], bucket, amount)

    def segment(self, dimension: str, value: str) -> Aggregates:
        key = f"{dimension}\t{value}"
        segment = self.segments.get(key)
        if segment is None:
            segment = self.segments[key] = Aggregates()
            segment.floor = self.floor
        return segment

    def add_contribution(self, contribution: Contribution, sign: int) -> None:
        """Add (sign=1) or remove (sign=-1) a whole member of a member-dimension segment: the
        histograms, totals and lots its KPIs read (SPEC 4.2; not the enrollment channel and
        tier breakdowns, which no segment reports)."""
        view, spend, balance, purchaser, unbacked, lots = contribution
        hists, floor = self.hists, self.floor
        for i in range(_MEMBER_HISTS):
            bucket = view[i]
            if bucket is not None:
                _add(hists[i], bucket if bucket > floor else floor, sign)
        totals = self.totals
        totals["members"] += sign
        totals["lifetime_spend"] += sign * spend
        totals["points_balance"] += sign * balance
        totals["purchasers"] += sign * purchaser
        totals["unbacked"] += sign * unbacked
        if lots:
            self.add_lots(lots, sign)

    def replace_contribution(self, old: Contribution, new: Contribution) -> None:
        """``add_contribution(old, -1)`` then ``add_contribution(new, 1)``, touching only what
        differs."""
        old_view, new_view = old[0], new[0]
        hists, floor = self.hists, self.floor
        for i in range(_MEMBER_HISTS):
            before, after = old_view[i], new_view[i]
            if before != after:
                if before is not None:
                    _add(hists[i], before if before > floor else floor, -1)
                if after is not None:
                    _add(hists[i], after if after > floor else floor, 1)
        totals = self.totals
        totals["lifetime_spend"] += new[1] - old[1]
        totals["points_balance"] += new[2] - old[2]
        totals["purchasers"] += new[3] - old[3]
        totals["unbacked"] += new[4] - old[4]
        if old[5] != new[5]:
            self.add_lots(old[5], -1)
            self.add_lots(new[5], 1)

    def add_cohort(self, cohort: int, months: Iterable[int], sign: int) -> None:
        """Add or remove a member of ``cohort`` (raw enrollment month) with these activity
        months (sorted)."""
        _add(self.cohort_members, cohort, sign)
        months = list(months)
        if months:
            active = self.cohort_active.setdefault(cohort, {})
            for month in months:
                if month >= cohort:
                    _add(active, month, sign)
            _add(self.cohort_max.setdefault(cohort, {}), months[-1], sign)

    def add_cohort_month(self, cohort: int, month: int, old_max: int | None) -> None:
        """One member of ``cohort`` has a new activity month."""
        if month >= cohort:
            _add(self.cohort_active.setdefault(cohort, {}), month, 1)
        if old_max is None or month > old_max:
            latest = self.cohort_max.setdefault(cohort, {})
            if old_max is not None:
                _add(latest, old_max, -1)
            _add(latest, month, 1)

    def add_lots(self, contributions: Iterable[tuple[int, int, int]], sign: int) -> None:
        """Add (sign=1) or remove (sign=-1) a member's (expiry bucket, points, remaining) lots."""
        points, remaining = self.sums["lot_points"], self.sums["lot_remaining"]
        floor = self.floor
        for expiry, lot_points, lot_remaining in contributions:
            if expiry < floor:
                expiry = floor
            _add(points, expiry, sign * lot_points)
            _add(remaining, expiry, sign * lot_remaining)

    def mention(self, key: str, bucket: int) -> None:
        if bucket > self.floor:
            _add(self.mentions.setdefault(key, {}), bucket, 1)

    def collapse(self, floor: int) -> set[int]:
        """Fold everything at or before bucket ``floor`` into it, for good: member counts and
        point lots move into the floor bucket (the ranges "up to K - x" still count them), and
        event sums and mentions there are dropped (every range over them starts later). Exact
        for every as-of bucket K with K - :func:`history_reach` >= floor, which keeps holding as
        K only moves forward; it bounds the aggregates by the reach instead of the history.

        Returns the buckets whose event sums were dropped (the state log deletes their
        records)."""
        old = self.floor
        if floor <= old:
            return set()
        dropped: set[int] = set()
        count_hists = [*self.hists, *self.by_channel.values(),
                       self.sums["lot_points"], self.sums["lot_remaining"]]
        event_hists = [*(h for name, h in self.sums.items() if not name.startswith("lot_")),
                       *self.mentions.values()]
        for hist in count_hists:
            _fold(hist, old, floor)
        for hist in event_hists:
            dropped.update(_drop(hist, old, floor))
        # a histogram is a sliding window of buckets (new ones in, folded ones out), and a dict
        # that lost keys keeps its table at up to 3x the entries it holds: copies are compact
        self.hists = [dict(hist) for hist in self.hists]
        self.by_channel = {channel: dict(hist) for channel, hist in self.by_channel.items()}
        self.sums = {name: dict(hist) for name, hist in self.sums.items()}
        self.mentions = {key: dict(hist) for key, hist in self.mentions.items()}
        for segment in self.segments.values():
            dropped |= segment.collapse(floor)
        self.floor = floor
        return dropped

    # merging and transport (per-partition partials -> one global aggregate)
    def merge(self, other: Aggregates) -> None:
        self._merge_parts(other._parts(), dict.items)

    def merge_bytes(self, data: bytes) -> None:
        """Add the aggregates encoded by :meth:`to_bytes` (format 3, 2 or 1) without building
        them first: what an exporter needs to hold is the total, not every partition's part,
        and with format 3 it decodes one segment at a time, never the whole partial."""
        for key, parts, items in self.merge_head(data):
            self._merge_segment(key, parts, items)

    def merge_head(self, data: bytes) -> Iterator[tuple[str, Any, Callable[[Any], Iterable]]]:
        """Add the aggregates encoded by :meth:`to_bytes` without their segments, and return
        the segments: (key, encoded segment, how its histograms give (key, value) pairs) in key
        order, each decoded only when the iterator gets to it (see :func:`merged_segments`)."""
        head, items = _decode_head(data)
        inside = head.pop("segments", {})  # formats 1 and 2
        self._merge_parts(head, items)
        return ((key, parts, items) for key, parts in _segment_parts(data, inside))

    def _parts(self) -> dict[str, Any]:
        """The parts in the shape :meth:`_to_dict` encodes, as dicts (see _merge_parts)."""
        return {"hists": self.hists, "by_channel": self.by_channel, "tiers": self.tiers,
                "sums": self.sums, "mentions": self.mentions, "totals": self.totals,
                "segments": {key: seg._parts() for key, seg in self.segments.items()},
                "cohort_members": self.cohort_members,
                "cohort_active": list(self.cohort_active.items()),
                "cohort_max": list(self.cohort_max.items()), "clv": self.clv}

    def _merge_parts(self, parts: Mapping[str, Any], items: Callable[[Any], Iterable]) -> None:
        """Add ``parts`` (:meth:`_parts`, or a decoded :meth:`_to_dict`), whose histograms
        ``items`` turns into (bucket, value) pairs."""
        for mine, theirs in zip(self.hists, parts["hists"], strict=True):
            _merge_items(mine, items(theirs))
        for channel, hist in parts.get("by_channel", {}).items():
            _merge_items(self.by_channel.setdefault(channel, {}), items(hist))
        _merge_items(self.tiers, parts["tiers"].items())
        for name, hist in parts.get("sums", {}).items():
            _merge_items(self.sums[name], items(hist))
        for key, hist in parts.get("mentions", {}).items():
            _merge_items(self.mentions.setdefault(key, {}), items(hist))
        for name, value in parts["totals"].items():
            self.totals[name] += value
        for key, segment in parts.get("segments", {}).items():
            self._merge_segment(key, segment, items)
        if "cohort_members" in parts:
            _merge_items(self.cohort_members, items(parts["cohort_members"]))
            for mine_nested, theirs_nested in ((self.cohort_active, parts["cohort_active"]),
                                               (self.cohort_max, parts["cohort_max"])):
                for cohort, hist in theirs_nested:
                    _merge_items(mine_nested.setdefault(cohort, {}), items(hist))
        clv = parts.get("clv")
        if clv is not None:
            from .clv import SufficientStats  # numpy and scipy: only when CLV is on

            if self.clv is None:
                self.clv = SufficientStats()
            self.clv.merge(clv if isinstance(clv, SufficientStats)
                           else SufficientStats.from_dict(clv))

    def _merge_segment(self, key: str, parts: Mapping[str, Any],
                       items: Callable[[Any], Iterable]) -> None:
        mine = self.segments.get(key)
        if mine is None:
            mine = self.segments[key] = Aggregates()
        mine._merge_parts(parts, items)

    def to_bytes(self) -> bytes:
        """JSON lines of the aggregates (``"format": 3``): the aggregates without their
        segments, then one ``[key, segment]`` line per segment. A histogram is [key deltas,
        values] over its sorted keys (flat lists, which encode, compress and decode several
        times faster than the [[key, value], ...] pairs of format 1). With segments most of
        the bytes are theirs: line by line, neither the writer nor a reader (:meth:`merge_bytes`)
        ever holds more than one segment as Python lists (format 2, one line with the segments
        inside, took ~5x the JSON's size at once; formats 2 and 1 are still read). The segment
        lines are in key order, so that :func:`merged_segments` can merge partials key by key."""
        head = self._to_dict(segments=False)
        head["format"] = 3
        out = bytearray(orjson.dumps(head))
        for key, segment in sorted(self.segments.items()):  # one orjson buffer at a time
            out += b"\n"
            out += orjson.dumps([key, segment._to_dict()])
        return bytes(out)

    def _to_dict(self, segments: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "hists": [_columns(h) for h in self.hists],
            "tiers": self.tiers,
            "totals": self.totals,
        }
        if any(self.by_channel.values()):
            out["by_channel"] = {c: _columns(h) for c, h in self.by_channel.items() if h}
        if any(self.sums.values()):
            out["sums"] = {n: _columns(h) for n, h in self.sums.items() if h}
        if self.mentions:
            out["mentions"] = {k: _columns(h) for k, h in self.mentions.items()}
        if segments and self.segments:
            out["segments"] = {key: seg._to_dict() for key, seg in self.segments.items()}
        if self.cohort_members:
            out["cohort_members"] = _columns(self.cohort_members)
            out["cohort_active"] = [[c, _columns(h)] for c, h in self.cohort_active.items() if h]
            out["cohort_max"] = [[c, _columns(h)] for c, h in self.cohort_max.items() if h]
        if self.clv is not None:
            out["clv"] = self.clv.to_dict()
        return out

    @classmethod
    def from_bytes(cls, data: bytes) -> Aggregates:
        aggs = cls()
        aggs.merge_bytes(data)
        return aggs


def _decode_head(data: bytes) -> tuple[dict[str, Any], Callable[[Any], Iterable]]:
    """The first line of encoded aggregates (all of formats 1 and 2), and how its histograms
    turn into (key, value) pairs."""
    end = data.find(b"\n")
    head = orjson.loads(data if end < 0 else memoryview(data)[:end])
    return head, (_column_items if head.get("format", 1) >= 2 else iter)


def _segment_parts(data: bytes, inside: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """(key, encoded segment) of each segment of encoded aggregates, in key order: the lines
    after the first (format 3), decoded one at a time as they are asked for, or the segments
    ``inside`` the first line (formats 1 and 2)."""
    if inside:
        yield from sorted(inside.items())
        return
    view = memoryview(data)  # slices of it copy nothing
    start = data.find(b"\n")
    while start >= 0:
        end = data.find(b"\n", start + 1)
        key, parts = orjson.loads(view[start + 1:end if end >= 0 else len(data)])
        yield key, parts
        start = end


def merged_segments(streams: Iterable[Iterator[tuple[str, Any, Callable[[Any], Iterable]]]]
                    ) -> Iterator[tuple[str, Aggregates]]:
    """The segments of several encoded aggregates (e.g. every partition's partial), given by
    what :meth:`Aggregates.merge_head` returned for each, summed one segment at a time in key
    order: the segments :meth:`Aggregates.merge_bytes` of them all would give, while holding
    one decoded segment per input and one sum instead of every merged segment (which
    :func:`evaluate_kpis` reads one at a time anyway)."""
    first = itemgetter(0)
    for key, group in groupby(heapq.merge(*streams, key=first), key=first):
        segment = Aggregates()
        for _, parts, items in group:
            segment._merge_parts(parts, items)
        yield key, segment


def _below(hist: dict, old: int, floor: int) -> list[int]:
    """The keys of ``hist`` at or before ``floor``, given that none is before ``old`` (the
    previous floor): a scan of [old, floor] (a collapse moves the floor by a few buckets),
    or of the keys when that is shorter."""
    if floor - old > len(hist):
        return [key for key in hist if key <= floor]
    return [key for key in range(old, floor + 1) if key in hist]


def _fold(hist: dict, old: int, floor: int) -> None:
    keys = _below(hist, old, floor)
    if keys:
        total = 0
        for key in keys:
            total += hist.pop(key)
        if total:
            hist[floor] = total


def _drop(hist: dict, old: int, floor: int) -> list[int]:
    keys = _below(hist, old, floor)
    for key in keys:
        del hist[key]
    return keys


def _columns(hist: Mapping[int, float]) -> list[list]:
    """[deltas of the sorted keys, their values]: flat lists of small numbers."""
    keys = sorted(hist)
    return [[*keys[:1], *map(sub, keys[1:], keys)], list(map(hist.__getitem__, keys))]


def _column_items(columns: list[list]) -> Iterable[tuple[int, float]]:
    return zip(accumulate(columns[0]), columns[1], strict=True)


def _merge_items(mine: dict, theirs: Iterable) -> None:
    """Add (key, value) pairs to a histogram (a sum that comes to zero is no entry)."""
    if not mine:
        mine.update(theirs)
        return
    get = mine.get
    for key, value in theirs:
        total = get(key, 0) + value
        if total:
            mine[key] = total
        else:
            mine.pop(key, None)


class _Ranges:
    """Range sums over a bucket histogram as of K, where buckets after K count as K.

    Expiry buckets of point lots are not event times and are not clamped (``clamp=False``).
    An evaluation asks each histogram for a handful of ranges, so a histogram of integers (every
    count, points) sums the slice of its sorted values that a range covers: exact, and cheaper
    than building prefix sums of its whole history. A histogram holding floats (amounts,
    margins) answers from prefix sums, the difference of two left-to-right sums as always, so
    that no reported value changes by a rounding.
    """

    __slots__ = ("keys", "values", "prefix", "K")

    def __init__(self, hist: Mapping[int, float], K: int, clamp: bool = True) -> None:
        keys = sorted(hist)
        values = list(map(hist.__getitem__, keys))
        if clamp:
            cut = bisect_left(keys, K)
            if cut < len(keys):  # buckets at or after K all count as K
                keys[cut:] = [K]
                values[cut:] = [sum(values[cut:])]
        self.keys = keys
        self.K = K
        if type(sum(values)) is int:  # no float among the values
            self.values, self.prefix = values, None
        else:
            self.values, self.prefix = None, [0, *accumulate(values)]

    def between(self, lo: int, hi: int) -> float:
        """Sum over clamped buckets in [lo, hi]."""
        if hi < lo:
            return 0
        start, stop = bisect_left(self.keys, lo), bisect_right(self.keys, hi)
        if self.prefix is None:
            return sum(self.values[start:stop])
        return self.prefix[stop] - self.prefix[start]

    def upto(self, hi: int) -> float:
        stop = bisect_right(self.keys, hi)
        return sum(self.values[:stop]) if self.prefix is None else self.prefix[stop]

    def since(self, lo: int) -> float:
        start = bisect_left(self.keys, lo)
        if self.prefix is None:
            return sum(self.values[start:])
        return self.prefix[-1] - self.prefix[start]


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def _lift(top: float | None, bottom: float | None) -> float | None:
    if top is None or bottom is None or not bottom:
        return None
    return top / bottom - 1


def _nps(net: float, n: float) -> float | None:
    return 100 * net / n if n else None


def churn_snapshot(aggs: Aggregates, K: int, windows: Iterable[int], horizon: int
                   ) -> dict[int, tuple[int, int]]:
    """churn_rate (numerator, denominator) per window w <= h, as of K (SPEC section 4)."""
    return churn_snapshots(aggs, [K], windows, horizon)[K]


def churn_snapshots(aggs: Aggregates, Ks: Iterable[int], windows: Iterable[int], horizon: int
                    ) -> dict[int, dict[int, tuple[int, int]]]:
    """:func:`churn_snapshot` for several as-of buckets over the same aggregates.

    Every range in the churn formula either ends before K or runs to the end, so clamping
    buckets after K changes nothing and one pair of prefix sums serves all Ks.
    """
    touch = _Ranges(aggs.hists[LAST_TOUCH], 0, clamp=False)
    enrolled = _Ranges(aggs.hists[ENROLLED], 0, clamp=False)
    windows = [w for w in windows if w <= horizon]
    return {K: _churn_pairs(touch, enrolled, K, windows, horizon) for K in Ks}


def _churn_pairs(touch: _Ranges, enrolled: _Ranges, K: int, windows: Iterable[int], horizon: int
                 ) -> dict[int, tuple[int, int]]:
    """The churn formula's (numerator, denominator) per window w <= h, from the range sums of
    the last_touch and enrolled_at histograms."""
    return {w: (touch.between(K - w - horizon + 1, K - horizon),
                touch.since(K - w - horizon + 1) - enrolled.since(K - w + 1))
            for w in windows if w <= horizon}


class MentionMatcher:
    """Whole-word, case-insensitive, Unicode-aware lexicon matching of survey comments."""

    def __init__(self, lexicons: Mapping[str, Iterable[str]]) -> None:
        self.keys: list[str] = []
        patterns = []
        for lexicon, terms in lexicons.items():
            for term in terms:
                key = f"{lexicon}\t{term}"
                self.keys.append(key)
                folded = term.casefold()
                patterns.append((folded, re.compile(rf"(?<!\w){re.escape(folded)}(?!\w)")))
        self.patterns = patterns

    def matches(self, comment: str) -> list[str]:
        text = comment.casefold()
        # a whole-word match is first a substring: the substring test (~20x cheaper than a
        # search) leaves the regex only the few terms the comment contains
        return [key for key, (folded, pattern) in zip(self.keys, self.patterns, strict=True)
                if folded in text and pattern.search(text)]


#: KPI name -> output topic key (SPEC section 6), from the catalogue.
KPI_TOPICS: dict[str, str] = {kpi.name: kpi.topic for kpi in CATALOGUE}


class _Records:
    """Builds the SPEC section 6 records of one evaluation."""

    def __init__(self, as_of: str) -> None:
        self.as_of = as_of
        self.items: list[dict[str, Any]] = []

    def add(self, kpi: str, window: str | None, value: float | None,
            numerator: float | None = None, denominator: float | None = None,
            labels: dict[str, str] | None = None) -> None:
        record = {"kpi": kpi, "window": window, "as_of": self.as_of, "value": value,
                  "numerator": numerator, "denominator": denominator}
        if labels is not None:
            record["labels"] = labels
        self.items.append(record)

    def ratio(self, kpi: str, window: str | None, numerator: float, denominator: float) -> None:
        self.add(kpi, window, _ratio(numerator, denominator), numerator, denominator)


def evaluate(aggs: Aggregates, K: int, *, bucket_ms: int, windows: Mapping[int, str],
             horizon: int, settle: int, points_validity: bool = False,
             mention_keys: Iterable[str] = (),
             churn_history: Mapping[int, Mapping[int, tuple[int, int]]] | None = None
             ) -> list[dict[str, Any]]:
    """All KPI records as of bucket K. ``windows`` maps window length in buckets to its label.

    ``churn_history`` maps an earlier as-of bucket to its :func:`churn_snapshot`, for
    churn_reduction; missing entries give null.
    """
    return evaluate_with_churn(aggs, K, bucket_ms=bucket_ms, windows=windows, horizon=horizon,
                               settle=settle, points_validity=points_validity,
                               mention_keys=mention_keys, churn_history=churn_history)[0]


def evaluate_with_churn(aggs: Aggregates, K: int, *, bucket_ms: int, windows: Mapping[int, str],
                        horizon: int, settle: int, points_validity: bool = False,
                        mention_keys: Iterable[str] = (),
                        churn_history: Mapping[int, Mapping[int, tuple[int, int]]] | None = None
                        ) -> tuple[list[dict[str, Any]], dict[int, tuple[int, int]]]:
    """:func:`evaluate`, and K's :func:`churn_snapshot` (read from the same range sums)."""
    evaluation = _Evaluation(aggs, K, as_of_time(K, bucket_ms))
    evaluation.as_of_kpis(horizon, settle, points_validity)
    now_churn = evaluation.churn_snapshot(windows, horizon)
    mention_keys = tuple(mention_keys)
    for w, label in windows.items():
        active = evaluation.membership(w, label)
        evaluation.redemption(w, label, active)
        if w in now_churn:
            past = (churn_history or {}).get(K - w, {}).get(w)
            evaluation.churn(label, now_churn[w], past)
        evaluation.spend(w, label)
        evaluation.satisfaction(w, label, mention_keys)
    return evaluation.out.items, now_churn


#: Sums keyed by the expiry bucket of point lots: those lie in the future of K, not clamped.
_UNCLAMPED_SUMS = frozenset(name for name in SUM_NAMES if name.startswith("lot_"))


class _LazyRanges:
    """:class:`_Ranges` of each histogram of a mapping, built once per evaluation and only when
    first asked for (a segment's evaluation reads only some of them)."""

    __slots__ = ("hists", "K", "unclamped", "built")

    def __init__(self, hists: Mapping[Any, Mapping[int, float]], K: int,
                 unclamped: frozenset = frozenset()) -> None:
        self.hists = hists
        self.K = K
        self.unclamped = unclamped
        self.built: dict[Any, _Ranges] = {}

    def __getitem__(self, name: Any) -> _Ranges:
        ranges = self.built.get(name)
        if ranges is None:
            ranges = self.built[name] = _Ranges(self.hists[name], self.K,
                                                clamp=name not in self.unclamped)
        return ranges


class _Evaluation:
    """Range sums of one :class:`Aggregates` as of K, and the records evaluated from them.

    One method per group of KPIs; each adds its records to ``out`` in the order of the topics.
    """

    def __init__(self, aggs: Aggregates, K: int, as_of: str) -> None:
        self.aggs = aggs
        self.K = K
        self.out = _Records(as_of)
        self.hist = _LazyRanges(dict(enumerate(aggs.hists)), K)
        self.sums = _LazyRanges(aggs.sums, K, _UNCLAMPED_SUMS)
        self.channels = _LazyRanges(aggs.by_channel, K)
        self.mentions = _LazyRanges(aggs.mentions, K)
        self.members = aggs.totals["members"]

    def in_window(self, name: str, w: int) -> float:
        """Sum of ``name`` over the buckets of window w, [K-w+1, K]."""
        return self.sums[name].since(self.K - w + 1)

    def as_of_kpis(self, horizon: int, settle: int, points_validity: bool) -> None:
        """The KPIs without a window."""
        out, hist, totals, K = self.out, self.hist, self.aggs.totals, self.K
        out.add("members", None, self.members)
        for tier, count in sorted(self.aggs.tiers.items()):
            out.add("tier_members", None, count, labels={"tier": tier})
        out.add("churned_members", None, hist[LAST_TOUCH].upto(K - horizon))
        settled = hist[FIRST_PURCHASE].upto(K - settle)
        out.ratio("one_and_done_rate", None, hist[FIRST_PURCHASE_SINGLE].upto(K - settle), settled)
        out.ratio("avg_lifetime_spend", None, totals["lifetime_spend"], totals["purchasers"])
        remaining, lot_points = self.sums["lot_remaining"], self.sums["lot_points"]
        if points_validity:
            out.add("points_liability", None, remaining.since(K + 1) - totals["unbacked"])
        else:
            out.add("points_liability", None, totals["points_balance"])
        out.ratio("breakage_rate", None, remaining.upto(K), lot_points.upto(K))

    def churn_snapshot(self, windows: Iterable[int], horizon: int) -> dict[int, tuple[int, int]]:
        """:func:`churn_snapshot` as of K from this evaluation's (clamped) range sums: every range
        of the churn formula ends before K or runs to the end, and counts are integers, so
        clamping changes no value."""
        return _churn_pairs(self.hist[LAST_TOUCH], self.hist[ENROLLED], self.K, windows, horizon)

    def membership(self, w: int, label: str) -> float:
        """active_members, active_rate, new_members, member_growth_rate, enrollment_rate;
        returns active_members."""
        out, K, members = self.out, self.K, self.members
        lo = K - w + 1
        active = self.hist[LAST_ACTIVITY].since(lo)
        out.add("active_members", label, active)
        out.ratio("active_rate", label, active, members)
        new_total = 0
        for channel, channel_hist in sorted(self.aggs.by_channel.items()):
            if not channel_hist:
                continue  # no member has this channel any more
            count = self.channels[channel].since(lo)
            new_total += count
            out.add("new_members", label, count, labels={"channel": channel})
        base = self.hist[ENROLLED].upto(K - w)
        out.add("member_growth_rate", label, _lift(members, base), members, base)
        out.ratio("enrollment_rate", label, new_total,
                  new_total + self.in_window("guest_orders", w))
        return active

    def redemption(self, w: int, label: str, active: float) -> None:
        """Redeemers and their rates, points earned, redeemed, expired and expiring."""
        out, K = self.out, self.K
        redeemers = self.hist[LAST_REDEMPTION].since(K - w + 1)
        out.add("redeemers", label, redeemers)
        out.ratio("redemption_rate", label, redeemers, self.members)
        out.ratio("redemption_participation", label, redeemers, active)
        earned, redeemed = self.in_window("points_earned", w), self.in_window("points_redeemed", w)
        out.add("points_earned", label, earned)
        out.add("points_redeemed", label, redeemed)
        out.ratio("points_burn_rate", label, redeemed, earned)
        remaining = self.sums["lot_remaining"]
        out.add("expired_points", label, remaining.between(K - w + 1, K))
        out.add("points_expiring", label, remaining.between(K + 1, K + w))

    def churn(self, label: str, now: tuple[int, int], past: tuple[int, int] | None) -> None:
        """churn_rate, retention_rate and churn_reduction from churn snapshots (num, den)."""
        churn_num, churn_den = now
        rate = _ratio(churn_num, churn_den)
        self.out.add("churn_rate", label, rate, churn_num, churn_den)
        self.out.add("retention_rate", label, None if rate is None else 1 - rate,
                     churn_den - churn_num, churn_den)
        past_rate = None if past is None else _ratio(*past)
        self.out.add("churn_reduction", label,
                     None if past_rate is None or rate is None else past_rate - rate)

    def spend(self, w: int, label: str) -> None:
        """Repeat purchases, order values, revenue share and margins of members and guests."""
        out, in_window, lo = self.out, self.in_window, self.K - w + 1
        out.ratio("repeat_purchase_rate", label, self.hist[PREV_PURCHASE].since(lo),
                  self.hist[LAST_PURCHASE].since(lo))
        member_revenue, member_orders = in_window("member_revenue", w), in_window("member_orders", w)
        guest_revenue, guest_orders = in_window("guest_revenue", w), in_window("guest_orders", w)
        aov_member, aov_guest = (_ratio(member_revenue, member_orders),
                                 _ratio(guest_revenue, guest_orders))
        out.add("aov_member", label, aov_member, member_revenue, member_orders)
        out.add("aov_guest", label, aov_guest, guest_revenue, guest_orders)
        out.add("member_spend_lift", label, _lift(aov_member, aov_guest), aov_member, aov_guest)
        out.ratio("member_revenue_share", label, member_revenue, member_revenue + guest_revenue)
        margin_m, orders_m = in_window("member_margin", w), in_window("member_margin_orders", w)
        margin_g, orders_g = in_window("guest_margin", w), in_window("guest_margin_orders", w)
        avg_m, avg_g = _ratio(margin_m, orders_m), _ratio(margin_g, orders_g)
        out.add("avg_margin_member", label, avg_m, margin_m, orders_m)
        out.add("avg_margin_guest", label, avg_g, margin_g, orders_g)
        out.add("margin_lift", label, _lift(avg_m, avg_g), avg_m, avg_g)

    def satisfaction(self, w: int, label: str, mention_keys: Iterable[str]) -> None:
        """Survey responses, NPS of all, members and guests, CSAT, lexicon mentions."""
        out, in_window = self.out, self.in_window
        out.add("survey_responses", label, in_window("surveys", w))
        for kpi, suffix in (("nps", ""), ("nps_member", "_member"), ("nps_guest", "_guest")):
            net, n = in_window("nps_net" + suffix, w), in_window("nps_n" + suffix, w)
            out.add(kpi, label, _nps(net, n), net, n)
        out.ratio("csat", label, in_window("csat_pos", w), in_window("csat_n", w))
        for key in mention_keys:
            lexicon, term = key.split("\t", 1)
            mentions = self.aggs.mentions.get(key)
            count = self.mentions[key].since(self.K - w + 1) if mentions else 0
            out.add("feedback_mentions", label, count, labels={"lexicon": lexicon, "term": term})


_MONTHS: dict[int, int] = {}


def month_of(ms: int) -> int:
    """The UTC calendar month of an epoch-ms instant, as year * 12 + month - 1."""
    day = ms // 86_400_000
    month = _MONTHS.get(day)
    if month is None:
        date = datetime.date(1970, 1, 1) + datetime.timedelta(days=day)
        month = _MONTHS[day] = date.year * 12 + date.month - 1
    return month


def _month_label(month: int) -> str:
    return f"{month // 12:04d}-{month % 12 + 1:02d}"


def cohort_records(aggs: Aggregates, K: int, bucket_ms: int, cohorts: int, ages: int
                   ) -> list[dict[str, Any]]:
    """cohort_size{cohort} and cohort_retention{cohort, age} as of K (SPEC 4.3).

    Enrollments and activity after K count as K, so everything in or after the month of K
    counts in that month: the members of later raw cohorts join K's cohort, and a member whose
    latest activity month is at or after K's month was active in K's month.
    """
    out = _Records(as_of_time(K, bucket_ms))
    if cohorts <= 0:
        return out.items
    mK = month_of(K * bucket_ms)
    later = [c for c in aggs.cohort_members if c >= mK]
    for cohort in range(mK - cohorts + 1, mK + 1):
        raw = later if cohort == mK else [cohort]
        size = sum(aggs.cohort_members.get(c, 0) for c in raw)
        if size <= 0:
            continue
        label = _month_label(cohort)
        out.add("cohort_size", None, size, labels={"cohort": label})
        for age in range(min(ages, mK - cohort + 1)):
            month = cohort + age
            if month < mK:
                active = aggs.cohort_active.get(cohort, {}).get(month, 0)
            else:  # K's month: every member whose latest activity is at or after it
                active = sum(n for c in raw for latest, n in aggs.cohort_max.get(c, {}).items()
                             if latest >= mK)
            out.add("cohort_retention", None, _ratio(active, size), active, size,
                    labels={"age": str(age), "cohort": label})
    return out.items
