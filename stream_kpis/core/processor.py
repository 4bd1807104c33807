"""The streaming core: applies validated events to member state and aggregates (pure).

One :class:`Processor` owns a set of members (one Kafka partition live, everything in replay),
their :class:`~stream_kpis.core.kpis.Aggregates`, bounded de-duplication of events that have no member
state (guest purchases, surveys), and the member-signal transitions of SPEC section 5. The live
worker, replay and the tests all drive this same class.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, MutableMapping
from typing import TYPE_CHECKING, Any

import orjson

from .catalogue import CATALOGUE, MEMBER_DIMENSIONS, ORDER_DIMENSIONS
from .events import ENROLLMENT, PURCHASE, REDEMPTION, SURVEY, Event
from .jsonbytes import dumps
from .kpis import (
    LAST_TOUCH,
    Aggregates,
    MentionMatcher,
    churn_snapshots,
    cohort_records,
    evaluate,
    evaluate_with_churn,
    history_reach,
    member_contribution,
    member_value,
    member_view,
    month_of,
    shared_key,
)
from .member import ACTIVE, AT_RISK, CHURNED, UNKNOWN, LotChanges, MemberState
from .timebase import format_rfc3339

# Settings is only a type here; a runtime import would be circular, because stream_kpis.settings
# imports stream_kpis.core.timebase and so runs this package's __init__ first.
if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["Processor", "PartitionStore", "Signal", "seen_key", "evaluate_kpis", "member_status",
           "history_bounds", "APPLIED", "DUPLICATE"]

Signal = dict[str, Any]
_REACTIVATED = "reactivated"
APPLIED, DUPLICATE = "applied", "duplicate"
_MEMBER_SUMS = ("member_revenue", "member_orders", "member_margin", "member_margin_orders")
_GUEST_SUMS = ("guest_revenue", "guest_orders", "guest_margin", "guest_margin_orders")


def seen_key(event: Event) -> str:
    """The de-duplication key of an event without member state (guest purchase, survey)."""
    return f"{event.type[0]}|{event.member_id or ''}|{event.event_id}"


class Processor:
    """Incremental KPI state for a set of members.

    ``members`` is any mutable mapping member_id -> MemberState (a dict, or the live worker's
    store-backed mapping); every changed state is assigned back so that stores see the change.
    ``on_signal`` receives member signals; ``record_churn_history`` keeps a churn snapshot each
    time the event clock leaves a bucket (replay), for churn_reduction.

    The aggregates keep only the history the KPI formulas can still read as the as-of bucket
    moves on (``bounded_history``, see :meth:`Aggregates.collapse`), so they can no longer be
    evaluated as of a bucket much before the current one; ``bounded_history=False`` keeps all.
    """

    def __init__(self, settings: Settings, members: MutableMapping[str, MemberState] | None = None,
                 *, on_signal: Callable[[Signal], None] | None = None,
                 record_churn_history: bool = False, track_changes: bool = False,
                 bounded_history: bool = True) -> None:
        self.settings = settings
        self.bucket_ms = settings.bucket_ms
        self.validity_ms = settings.points_validity_ms
        # Settings properties, computed on every read: read once here for the per-event path
        self.at_risk, self.expiring_notice = settings.at_risk, settings.expiring_notice
        self.dedupe_per_member = settings.dedupe_per_member
        self.event_clock = settings.clock == "event"
        self.members: MutableMapping[str, MemberState] = {} if members is None else members
        self.aggs = Aggregates()
        self.matcher = MentionMatcher(settings.lexicons)
        # guest and survey dedupe keys, oldest first; an OrderedDict forgets its oldest in O(1),
        # where next(iter(dict)) steps over every key deleted from the front since the dict was
        # last resized (~20 us an event at the default bound of 200k)
        self.seen_without_member: OrderedDict[str, None] = OrderedDict()
        self.track_changes = track_changes  # live: remember what to persist at the next flush
        self.changed_buckets: set[int] = set()
        self.changed_seen: set[str] = set()
        self.changed_values: set[str] = set()  # order-dimension values new in this batch
        self.on_signal = on_signal
        self.record_churn_history = record_churn_history
        self.churn_history: dict[int, dict[int, tuple[int, int]]] = {}
        self.max_ts: int | None = None
        self.K: int | None = None  # as-of bucket the member statuses were last evaluated at
        # last-touch bucket -> members, for the status signals as K passes it; only buckets
        # after K - churn horizon (see forget_churned). This index and the expiry index are
        # defaultdicts: an event adds to its bucket's set without making a set to throw away
        self.touch_index: defaultdict[int, set[str]] = defaultdict(set)
        self.forgotten_upto: int | None = None  # touch buckets at or before it were dropped
        self.expiry_index: defaultdict[int, set[str]] = defaultdict(set)
        self.applied = 0
        self.duplicates = 0
        self.version = 0  # bumped by every event processed: "did anything change since?"
        self.member_dims = tuple(d for d in settings.segments if d in MEMBER_DIMENSIONS)
        self.order_dims = tuple(d for d in settings.segments if d in ORDER_DIMENSIONS)
        self.cohorts = settings.cohorts > 0
        self.reach, self.floor_step = history_bounds(settings)
        self.bounded_history = bounded_history
        self.clv_model = None
        if settings.clv:
            from .clv import SufficientStats  # numpy and scipy: only when CLV is on
            from .predictive import ClvModel

            self.aggs.clv = SufficientStats()
            self.clv_model = ClvModel(settings)

    # ---- applying events -------------------------------------------------------------------
    def process(self, event: Event) -> str:
        """Apply one event. Returns ``"applied"``, or ``"duplicate"`` when an event with the same
        type and event_id (and member) was applied before and is still remembered."""
        ts = event.ts
        max_ts = self.max_ts
        if max_ts is None or ts > max_ts:
            self.max_ts = ts
            if self.event_clock and (self.K is None or ts // self.bucket_ms > self.K):
                self.advance(ts // self.bucket_ms)
        self.version += 1
        if event.member_id is None or event.type == SURVEY:
            if self._seen_without_member(event):
                self.duplicates += 1
                return DUPLICATE
            self._event_sums(event, event.member_id is not None)
            self.applied += 1
            return APPLIED
        return self._apply_member_event(event)

    def process_batch(self, events: Iterable[Event]) -> None:
        """Apply events in order, each as :meth:`process` does, so how a stream is cut into
        batches changes nothing; replay hands the core batches (cut where ``--every``
        evaluates)."""
        process = self.process
        for event in events:
            process(event)

    def _seen_without_member(self, event: Event) -> bool:
        """Whether this event without member state was applied before; remembers it if not
        (at most ``guest_dedupe`` keys: the oldest is forgotten)."""
        key = seen_key(event)
        seen = self.seen_without_member
        if key in seen:
            return True
        seen[key] = None
        if self.track_changes:
            self.changed_seen.add(key)
        if len(seen) > self.settings.guest_dedupe:
            oldest, _ = seen.popitem(last=False)
            if self.track_changes:
                self.changed_seen.add(oldest)
        return False

    def _apply_member_event(self, event: Event) -> str:
        member_id = event.member_id
        kind = event.type
        state = self.members.get(member_id)
        validity, bucket_ms = self.validity_ms, self.bucket_ms
        if state is None:
            state = MemberState()
            old_view = None
            state.seen(kind[0] + event.event_id, self.dedupe_per_member)
        else:
            if state.seen(kind[0] + event.event_id, self.dedupe_per_member):
                self.duplicates += 1
                return DUPLICATE
            old_view = member_view(state, bucket_ms)
        aggs = self.aggs
        segments_before = self._segments_of(state) if self.member_dims and old_view else None
        if self.cohorts and old_view:
            old_enrolled = state.enrolled_at
            old_max = state.months[-1] if state.months else None
        else:
            old_enrolled = old_max = None
        had_purchase = state.purchase_count > 0
        points_event = validity is not None and (kind == REDEMPTION or event.points)
        if points_event:
            old_unbacked = state.unbacked
        lot_changes = state.apply(event, validity)
        new_view = member_view(state, bucket_ms)
        aggs.move_member(old_view, new_view)
        totals = aggs.totals
        if kind == PURCHASE:
            totals["lifetime_spend"] += event.amount
            totals["points_balance"] += event.points
            if not had_purchase:
                totals["purchasers"] += 1
        elif kind == REDEMPTION:
            totals["points_balance"] -= event.points
        if points_event:
            self._move_lots(member_id, state, lot_changes)
            totals["unbacked"] += state.unbacked - old_unbacked
        self._event_sums(event, True)
        if self.cohorts:
            self._move_cohort(state, event, old_view is None, old_enrolled, old_max)
        if self.clv_model is not None and kind == PURCHASE:
            self._move_clv(state, event)
        if self.member_dims:
            self._move_segments(segments_before, self._segments_of(state))
        old_touch = None if old_view is None else old_view[LAST_TOUCH]
        touch = new_view[LAST_TOUCH]
        K = self.K
        if touch != old_touch:
            if old_touch is not None:
                indexed = self.touch_index.get(old_touch)
                if indexed is not None:  # else forgotten: churned (forget_churned)
                    indexed.discard(member_id)
            if self.forgotten_upto is None or touch > self.forgotten_upto:
                self.touch_index[touch].add(member_id)
            # an active member touched within the at-risk horizon stays active: skip the check
            if state.status != ACTIVE or K is None or touch <= K - self.at_risk:
                self._update_status(member_id, state)
        if points_event and K is not None and self._notice_may_be_due(state, K):
            self._expiry_notices(member_id, state, K)
        self.members[member_id] = state
        self.applied += 1
        return APPLIED

    def _move_lots(self, member_id: str, state: MemberState, changes: LotChanges) -> None:
        """Move the lots a points event changed in the lot sums (the others keep their
        contributions), and index the expiry bucket of a new lot for the expiry notices."""
        lots, remaining = state.lots, state.remaining
        validity, bucket_ms = self.validity_ms, self.bucket_ms
        deltas = []
        for i, before in changes:
            lot = lots[i]
            expiry = (lot[0] + validity) // bucket_ms
            if before is None:
                deltas.append((expiry, lot[2], remaining[i]))
                self.expiry_index[expiry].add(member_id)
            else:
                deltas.append((expiry, 0, remaining[i] - before))
        self.aggs.add_lots(deltas, 1)

    # ---- segments and cohorts (SPEC 4.2, 4.3) ----------------------------------------------
    def _segments_of(self, state: MemberState) -> tuple[Any, tuple[str, ...]]:
        """A member's contribution to the aggregates, and its value of each member dimension."""
        return (member_contribution(state, self.bucket_ms, self.validity_ms),
                tuple(member_value(state, d) for d in self.member_dims))

    def _move_segments(self, before: tuple | None, after: tuple) -> None:
        """Take the member out of the segments it was in, and into those it is in now: a tier
        change moves the member and all their history."""
        aggs = self.aggs
        if before is None:
            for dimension, value in zip(self.member_dims, after[1], strict=True):
                aggs.segment(dimension, value).add_contribution(after[0], 1)
            return
        if before[0] == after[0] and before[1] == after[1]:
            return
        for dimension, old, new in zip(self.member_dims, before[1], after[1], strict=True):
            if old == new:  # the usual case: only what the event changed moves
                aggs.segment(dimension, new).replace_contribution(before[0], after[0])
            else:
                aggs.segment(dimension, old).add_contribution(before[0], -1)
                aggs.segment(dimension, new).add_contribution(after[0], 1)

    def _cohort_of(self, state: MemberState) -> tuple[int, tuple[int, ...]]:
        return month_of(state.enrolled_at), tuple(state.months or ())

    def _move_cohort(self, state: MemberState, event: Event, new_member: bool,
                     old_enrolled: int | None, old_max: int | None) -> None:
        """Move the member in the cohort counts after ``event`` was applied, from what its
        cohort was made of before it: enrolled_at and the latest activity month."""
        new_month = None
        if event.type == PURCHASE or event.type == REDEMPTION:
            month = month_of(event.ts // self.bucket_ms * self.bucket_ms)  # the bucket's month
            # the usual month is the member's latest with activity already: not new
            if month != old_max and state.add_month(month):
                new_month = month
        aggs = self.aggs
        if new_member:
            aggs.add_cohort(*self._cohort_of(state), 1)
            return
        enrolled = state.enrolled_at
        if enrolled != old_enrolled:
            before, cohort = month_of(old_enrolled), month_of(enrolled)
            if before != cohort:
                months = state.months or []
                aggs.add_cohort(before, [m for m in months if m != new_month], -1)
                aggs.add_cohort(cohort, months, 1)
                return
        if new_month is not None:
            aggs.add_cohort_month(month_of(enrolled), new_month, old_max)

    def _move_clv(self, state: MemberState, event: Event) -> None:
        """Re-group the member in the CLV statistics after a purchase (SPEC 4.4)."""
        from .clv import DAY_MS, UNCLAMPED_DAY, member_key

        stats = self.aggs.clv
        if state.purchase_days:
            stats.remove(member_key(dict(state.purchase_days), UNCLAMPED_DAY))
        state.add_purchase_day(event.ts // DAY_MS, event.amount)
        stats.add(member_key(dict(state.purchase_days), UNCLAMPED_DAY))

    def _order_segments(self, event: Event) -> list[Aggregates]:
        """The segments of a purchase's order-dimension values; a value is known (reported)
        from its first purchase on, even one older than every window."""
        out = []
        segments = self.aggs.segments
        for dimension in self.order_dims:
            value = (event.channel if dimension == "channel" else event.store_id) or UNKNOWN
            segment = segments.get(f"{dimension}\t{value}")
            if segment is None:
                segment = self.aggs.segment(dimension, value)
                if self.track_changes:
                    self.changed_values.add(f"{dimension}\t{value}")
            out.append(segment)
        return out

    def _event_sums(self, event: Event, member: bool) -> None:
        bucket = event.ts // self.bucket_ms
        kind = event.type
        order_segments = self._order_segments(event) if self.order_dims and kind == PURCHASE else ()
        if bucket <= self.aggs.floor or kind == ENROLLMENT:
            return  # no window reaches back there any more; an enrollment has no event sums
        bucket = shared_key(bucket, bucket)
        if self.track_changes:
            self.changed_buckets.add(bucket)
        sums = self.aggs.sums
        if kind == PURCHASE:
            who = _MEMBER_SUMS if member else _GUEST_SUMS
            hist = sums[who[0]]
            hist[bucket] = hist.get(bucket, 0) + event.amount
            hist = sums[who[1]]
            hist[bucket] = hist.get(bucket, 0) + 1
            if event.margin is not None:
                hist = sums[who[2]]
                hist[bucket] = hist.get(bucket, 0) + event.margin
                hist = sums[who[3]]
                hist[bucket] = hist.get(bucket, 0) + 1
            for segment in order_segments:
                segment.add(who[0], bucket, event.amount)
                segment.add(who[1], bucket, 1)
                if event.margin is not None:
                    segment.add(who[2], bucket, event.margin)
                    segment.add(who[3], bucket, 1)
            if member and event.points:
                hist = sums["points_earned"]
                hist[bucket] = hist.get(bucket, 0) + event.points
        elif kind == REDEMPTION:
            hist = sums["points_redeemed"]
            hist[bucket] = hist.get(bucket, 0) + event.points
        elif kind == SURVEY:
            add = self.aggs.add
            add("surveys", bucket, 1)
            if event.nps is not None:
                score = 1 if event.nps >= 9 else (-1 if event.nps <= 6 else 0)
                suffix = "_member" if member else "_guest"
                for name in ("nps_n", "nps_n" + suffix):
                    add(name, bucket, 1)
                if score:
                    for name in ("nps_net", "nps_net" + suffix):
                        add(name, bucket, score)
            if event.csat is not None:
                add("csat_n", bucket, 1)
                if event.csat >= 4:
                    add("csat_pos", bucket, 1)
            if event.comment:
                for key in self.matcher.matches(event.comment):
                    self.aggs.mention(key, bucket)

    # ---- clock and member signals ----------------------------------------------------------
    def advance(self, K: int) -> None:
        """Move the as-of bucket to K: record history, fire time-based member signals."""
        previous = self.K
        if previous is not None and K <= previous:
            return
        if self.record_churn_history and previous is not None:
            self._record_churn_history(previous, K)
        self.K = K
        if previous is None:
            # in bucket order, as _newly_passed gives them (the index holds them as they came)
            touch_buckets = sorted(b for b in self.touch_index if b <= K - self.at_risk)
            expiry_buckets = sorted(b for b in self.expiry_index if b <= K + self.expiring_notice)
        else:
            touch_buckets = self._newly_passed(self.touch_index, previous - self.at_risk,
                                               K - self.at_risk)
            touch_buckets += self._newly_passed(self.touch_index,
                                                previous - self.settings.churn_horizon,
                                                K - self.settings.churn_horizon)
            expiry_buckets = self._newly_passed(self.expiry_index,
                                                previous + self.expiring_notice,
                                                K + self.expiring_notice)
        # members in id order: the signals of one as_of come in the same order in every run (a
        # set's order follows the process's string hash seed)
        for bucket in touch_buckets:
            for member_id in sorted(self.touch_index.get(bucket, ())):
                self._update_status(member_id, self.members[member_id])
        for bucket in expiry_buckets:
            for member_id in sorted(self.expiry_index.get(bucket, ())):
                self._expiry_notices(member_id, self.members[member_id], K)
        self.forget_churned()
        self.trim_history()

    def forget_churned(self) -> None:
        """Drop the touch index's buckets at or before K - churn horizon. Their members are
        churned and were told so when K passed their bucket; they stay churned until their next
        event, which indexes them again, and no later move of K reads these buckets, so the
        index holds the members touched within the churn horizon instead of every member."""
        if self.K is None:
            return
        upto = self.K - self.settings.churn_horizon
        index, after = self.touch_index, self.forgotten_upto
        if after is not None and upto <= after:
            return
        for bucket in ([b for b in index if b <= upto] if after is None
                       else self._newly_passed(index, after, upto)):
            del index[bucket]
        self.forgotten_upto = upto

    def history_floor(self, K: int) -> int:
        """The floor of the aggregates as of K: a function of K alone (a recovered partition
        folds exactly what it had folded), at most K - reach - step."""
        step = self.floor_step
        return ((K - self.reach) // step - 1) * step

    def trim_history(self) -> None:
        """Fold the history no KPI can read any more as of the current K (bounded_history);
        with track_changes the dropped buckets' records are deleted at the next flush."""
        if not self.bounded_history or self.K is None:
            return
        floor = self.history_floor(self.K)
        if floor > self.aggs.floor:
            dropped = self.aggs.collapse(floor)
            if self.track_changes:
                self.changed_buckets |= dropped

    def _record_churn_history(self, previous: int, K: int) -> None:
        """Snapshots as of every bucket the clock passed through, [previous, K) (the state did
        not change in a gap without events), keeping only what churn_reduction can still use."""
        oldest_needed = K - max(self.settings.windows)
        history = self.churn_history
        history.update(churn_snapshots(self.aggs, range(max(previous, oldest_needed), K),
                                       self.settings.windows, self.settings.churn_horizon))
        for bucket in [b for b in history if b < oldest_needed]:
            del history[bucket]

    @staticmethod
    def _newly_passed(index: dict[int, Any], after: int, upto: int) -> list[int]:
        """Buckets of ``index`` in (after, upto], in bucket order (the order of the signals they
        give, which must not depend on how many buckets the index holds)."""
        if upto - after > len(index):
            return sorted(b for b in index if after < b <= upto)
        return [b for b in range(after + 1, upto + 1) if b in index]

    def _status_of(self, touch_bucket: int) -> str:
        K = self.K
        if touch_bucket <= K - self.settings.churn_horizon:
            return CHURNED
        if touch_bucket <= K - self.at_risk:
            return AT_RISK
        return ACTIVE

    def _update_status(self, member_id: str, state: MemberState) -> None:
        if self.K is None:
            return
        status = self._status_of(state.last_touch // self.bucket_ms)
        if status == state.status:
            return
        previous, state.status = state.status, status
        self.members[member_id] = state
        if status == ACTIVE and previous == AT_RISK:
            return
        signal = _REACTIVATED if previous == CHURNED and status != CHURNED else status
        if signal == ACTIVE:
            return
        self._signal(member_id, signal, state)

    def _expiry_notices(self, member_id: str, state: MemberState, K: int) -> None:
        horizon = K + self.expiring_notice
        due: dict[int, int] = {}
        for expiry, remaining in state.lots_expiring(K, horizon, self.validity_ms, self.bucket_ms):
            if remaining and expiry not in state.notified_expiry:
                due[expiry] = due.get(expiry, 0) + remaining
        if due:  # forget notices of lots that have expired since
            state.notified_expiry = [e for e in state.notified_expiry if e > K]
        for expiry in sorted(due):
            state.notified_expiry.append(expiry)
            self._signal(member_id, "points_expiring", state, points=due[expiry],
                         expires_at=format_rfc3339(expiry * self.bucket_ms))
        if due:
            self.members[member_id] = state

    def _notice_may_be_due(self, state: MemberState, K: int) -> bool:
        """Whether a lot of the member expires in (K, K + notice], so that
        :meth:`_expiry_notices` has something to look at: asked before calling it, because the
        usual member has none and the full check costs ~0.5 us a points event."""
        return state.has_lots_expiring(K, K + self.expiring_notice, self.validity_ms,
                                       self.bucket_ms)

    def _signal(self, member_id: str, signal: str, state: MemberState, **extra: Any) -> None:
        if self.on_signal is None:
            return
        record = {"member_id": member_id, "signal": signal,
                  "as_of": format_rfc3339((self.K + 1) * self.bucket_ms),
                  "last_touch": format_rfc3339(state.last_touch), **extra}
        self.on_signal(record)

    # ---- evaluation -----------------------------------------------------------------------
    def as_of_bucket(self) -> int | None:
        return self.K

    def evaluate(self, K: int | None = None, aggregates: Aggregates | None = None
                 ) -> list[dict[str, Any]]:
        """KPI records as of K (default: the current as-of bucket)."""
        K = self.K if K is None else K
        if K is None:
            return []
        return evaluate_kpis(self.settings, aggregates or self.aggs, K, self.churn_history,
                             self.clv_model)

    def member_status(self, member_id: str) -> dict[str, Any] | None:
        """The read-model view of one member (SPEC section 6)."""
        state = self.members.get(member_id)
        if state is None or self.K is None:
            return None
        return member_status(state, self.K, self.settings)


def history_bounds(settings: Settings) -> tuple[int, int]:
    """(reach, floor step) of bounded history: how many buckets before K the KPI formulas read
    (:func:`~stream_kpis.core.kpis.history_reach`), and the step the floor moves in: at least a
    bucket and at most a week (fewer collapses), which is also the slack for an exporter whose
    wall clock lags this one's."""
    reach = history_reach(settings.windows, settings.churn_horizon, settings.settle)
    return reach, max(1, min(reach // 8, 7 * 86_400_000 // settings.bucket_ms))


def evaluate_kpis(settings: Settings, aggs: Aggregates, K: int,
                  churn_history: dict[int, dict[int, tuple[int, int]]] | None = None,
                  clv_model: Any = None,
                  segments: Iterable[tuple[str, Aggregates]] | None = None) -> list[dict[str, Any]]:
    """All KPI records as of K for these settings; records K's churn snapshot in the history.
    With CLV on, ``clv_model`` (a :class:`~stream_kpis.core.predictive.ClvModel`) gives the
    SPEC 4.4 records and keeps its fit between evaluations. ``segments`` are the (key,
    aggregates) of the segments in key order when they are not ``aggs.segments`` (the exporter
    merges them one at a time: :func:`~stream_kpis.core.kpis.merged_segments`)."""
    matcher_keys = [f"{lexicon}\t{term}" for lexicon, terms in settings.lexicons.items()
                    for term in terms]
    options = {"bucket_ms": settings.bucket_ms, "windows": settings.window_labels,
               "horizon": settings.churn_horizon, "settle": settings.settle,
               "points_validity": settings.points_validity_ms is not None}
    records, now_churn = evaluate_with_churn(aggs, K, mention_keys=matcher_keys,
                                             churn_history=churn_history, **options)
    if churn_history is not None:
        churn_history[K] = now_churn
    if segments is None:
        segments = sorted(aggs.segments.items())
    records += _segment_records(settings, segments, K, options)
    records += cohort_records(aggs, K, settings.bucket_ms, settings.cohorts, settings.cohort_ages)
    if settings.clv and clv_model is not None:
        records += clv_model.records(aggs.clv, K)
    return records


#: SPEC 4.2: the KPIs reported per value of a member dimension, and of an order dimension.
_SEGMENT_KPIS = {kind: frozenset(k.name for k in CATALOGUE if k.segment == kind)
                 for kind in ("member", "order")}


def _segment_records(settings: Settings, segments: Iterable[tuple[str, Aggregates]], K: int,
                     options: dict[str, Any]) -> list[dict[str, Any]]:
    """The SPEC 4.2 records of every value of every configured dimension, labelled with it,
    from the (key, aggregates) of the segments in key order.

    A member dimension's value is reported while some member has it; an order dimension's
    once some purchase had it."""
    out: list[dict[str, Any]] = []
    for key, segment in segments:
        dimension, value = key.split("\t", 1)
        if dimension not in settings.segments:
            continue
        kind = "member" if dimension in MEMBER_DIMENSIONS else "order"
        if kind == "member" and segment.totals["members"] <= 0:
            continue
        wanted = _SEGMENT_KPIS[kind]
        for record in evaluate(segment, K, **options):
            if record["kpi"] in wanted:
                record["labels"] = {dimension: value}
                out.append(record)
    return out


def member_status(state: MemberState, K: int, settings: Settings) -> dict[str, Any]:
    """last_touch, status, points balance, tier and next expiry of one member as of K."""
    status: dict[str, Any] = {
        "last_touch": format_rfc3339(state.last_touch),
        "status": state.status,
        "points_balance": state.balance(K, settings.points_validity_ms, settings.bucket_ms),
        "tier": state.tier,
    }
    if settings.points_validity_ms is not None:
        upcoming = [(expiry, remaining) for expiry, _, remaining in
                    state.lot_contributions(settings.points_validity_ms, settings.bucket_ms)
                    if expiry > K and remaining]
        if upcoming:
            first = min(expiry for expiry, _ in upcoming)
            status["next_expiry_points"] = sum(r for e, r in upcoming if e == first)
            status["next_expiry_at"] = format_rfc3339(first * settings.bucket_ms)
    return status


class PartitionStore:
    """Persistence of one Processor's state as records (the live worker's state log).

    Four record kinds, all plain bytes: member states (``MemberState.to_bytes``), bucket records
    (the event sums of one bucket), de-duplication entries for events without member state,
    and the order-dimension values seen (their sums may all be folded away, see
    :meth:`Processor.trim_history`).
    Everything else (histograms, indexes) is derived from them when a partition is (re)assigned,
    so the state log is the only state that moves.
    """

    @staticmethod
    def bucket_record(processor: Processor, bucket: int) -> bytes:
        aggs = processor.aggs
        sums = {name: hist[bucket] for name, hist in aggs.sums.items()
                if hist.get(bucket) and not name.startswith("lot_")}  # a zero sum is no sum
        mentions = {key: hist[bucket] for key, hist in aggs.mentions.items() if bucket in hist}
        record: dict[str, Any] = {"sums": sums, "mentions": mentions}
        if processor.order_dims:  # order-dimension segments hold event sums too
            segments = {}
            for key, segment in aggs.segments.items():
                if key.split("\t", 1)[0] in processor.order_dims:
                    values = {name: hist[bucket] for name, hist in segment.sums.items()
                              if hist.get(bucket)}
                    if values:
                        segments[key] = values
            record["segments"] = segments
        return dumps(record)

    @staticmethod
    def load_bucket(processor: Processor, bucket: int, data: bytes) -> None:
        """Add a stored bucket record (an "offsets" entry of older records is ignored)."""
        record = orjson.loads(data)
        aggs = processor.aggs
        for name, value in record["sums"].items():
            aggs.add(name, bucket, value)
        for key, value in record["mentions"].items():
            aggs.mentions.setdefault(key, {})[bucket] = value
        for key, values in record.get("segments", {}).items():
            dimension, value = key.split("\t", 1)
            if dimension in processor.order_dims:
                segment = aggs.segment(dimension, value)
                for name, amount in values.items():
                    segment.add(name, bucket, amount)
        start = bucket * processor.bucket_ms  # guest and survey events live only here: keep K
        if processor.max_ts is None or start > processor.max_ts:
            processor.max_ts = start

    @staticmethod
    def load_member(processor: Processor, member_id: str, state: MemberState) -> None:
        """Add a stored member to the aggregates and indexes (no signals, no store write)."""
        view = member_view(state, processor.bucket_ms)
        aggs = processor.aggs
        aggs.move_member(None, view)
        totals = aggs.totals
        totals["lifetime_spend"] += state.lifetime_spend
        totals["points_balance"] += state.points_earned - state.points_redeemed
        totals["purchasers"] += state.purchase_count > 0
        if processor.validity_ms is not None and state.lots:
            contributions = state.lot_contributions(processor.validity_ms, processor.bucket_ms)
            aggs.add_lots(contributions, 1)
            for expiry, _, _ in contributions:
                processor.expiry_index.setdefault(expiry, set()).add(member_id)
        totals["unbacked"] += state.unbacked
        if processor.member_dims:
            processor._move_segments(None, processor._segments_of(state))
        if processor.cohorts:
            aggs.add_cohort(*processor._cohort_of(state), 1)
        if processor.clv_model is not None and state.purchase_days:
            from .clv import UNCLAMPED_DAY, member_key

            aggs.clv.add(member_key(dict(state.purchase_days), UNCLAMPED_DAY))
        processor.touch_index.setdefault(view[LAST_TOUCH], set()).add(member_id)
        touch = state.last_touch
        if processor.max_ts is None or touch > processor.max_ts:
            processor.max_ts = touch
