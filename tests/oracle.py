"""Test oracle: a deliberately naive, brute-force computation of every KPI.

The real core computes KPIs incrementally from per-bucket histograms. This module
recomputes them from scratch from the raw event list, the most obvious way, so that
property tests can check the core against it (SPEC section 4: "it must equal a
brute-force computation over the same events"). It was written from SPEC.md
sections 1-4.3 and the internal CONTRACT.md only, without looking at the core.

Rules of the game: no histograms, no incremental structures, no cleverness. Every
KPI is a loop over the de-duplicated events or over the members, whose fields are
built from each member's own event list with max/min/sorted. Bucket comparisons use
``clamp(ts) = min(ts // bucket_ms, K)`` ("timestamps after K count as K"). Float sums
use ``math.fsum`` so that the result does not depend on the arrival order.

``churn_reduction`` is not computed: it depends on the evaluation history, not on
the events alone.

Segments (SPEC 4.2) are computed by re-running this same brute force over a sub-stream:
for a member dimension, the events of the members whose value is v; for an order
dimension, the purchases whose value is v. The KPIs the SPEC lists for that kind of
dimension are then taken from that run and labelled ``{dimension: v}``. Cohorts (SPEC
4.3) are a loop over calendar months and members. Decisions where the SPEC is silent:

- "As of K" means over all the events given, as everywhere in this oracle (timestamps
  after K count as K): a member's tier, enrollment channel and home store take events
  after K into account.
- Segment values: for a member dimension, the values the known members have (every
  known member counts in ``members``); for an order dimension, the values of all
  purchases given, member or guest, inside any window or not. Every value gets every
  KPI of its kind for every window (churn_rate/retention_rate only for w <= h, like the
  unsegmented ones), even when no member or order of that value falls in the window:
  counts are then 0 and ratios null, exactly as the unsegmented KPIs over no data.
- A field "carries" a value when it is present and not empty (None or "" -> "unknown"),
  as for the enrollment channel. ``home_store``: earliest purchase by raw event time
  (not clamped), ties by the smaller event_id; a member with no store-carrying purchase
  (or no purchase at all) is "unknown". Enrollment channels never create ``channel``
  order values and guest stores never create ``home_store`` values.
- An unknown dimension name raises ValueError; a name given twice is computed once.
- Months are UTC calendar months. The month of K is the month in which bucket K starts.
  A member's cohort is the month of ``min(enrolled_at, start of bucket K)``: the month of
  enrolled_at, except that an enrollment after bucket K counts as K (so it is in the
  cohort of month(K), and every member counts in some cohort). An activity (purchase or
  redemption; not enrollments, not surveys) is in the month in which its clamped bucket
  ``min(ts // bucket, K)`` starts. Activity is matched by month only: an activity before
  enrolled_at in the cohort month counts at age 0, one in an earlier month at no age.
- ``cohorts <= 0`` gives no cohort records; ``cohort_ages <= 0`` gives cohort_size only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

__all__ = [
    "MEMBER_DIMENSIONS",
    "MEMBER_SEGMENT_KPIS",
    "ORDER_DIMENSIONS",
    "ORDER_SEGMENT_KPIS",
    "brute_force_kpis",
    "mentions",
]

Labels = tuple[tuple[str, str], ...]
Key = tuple[str, str | None, Labels]
Value = tuple[float | int | None, float | int | None, float | int | None]

_WORD_CHAR = re.compile(r"\w")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

#: SPEC 4.2: the dimensions and the KPIs each kind of dimension applies to.
MEMBER_DIMENSIONS = ("tier", "enrollment_channel", "home_store")
ORDER_DIMENSIONS = ("channel", "store_id")
MEMBER_SEGMENT_KPIS = frozenset(
    {
        "members",
        "active_members",
        "active_rate",
        "redeemers",
        "redemption_rate",
        "redemption_participation",
        "churned_members",
        "churn_rate",
        "retention_rate",
        "repeat_purchase_rate",
        "one_and_done_rate",
        "points_liability",
        "avg_lifetime_spend",
    }
)
ORDER_SEGMENT_KPIS = frozenset(
    {
        "aov_member",
        "aov_guest",
        "member_spend_lift",
        "member_revenue_share",
        "avg_margin_member",
        "avg_margin_guest",
        "margin_lift",
    }
)


@dataclass
class _Member:
    """A member's fields (SPEC section 3), rebuilt from scratch from their events."""

    enrolled_at: int
    channel: str
    tier: str
    home_store: str
    last_activity: int | None
    last_touch: int
    first_purchase: int | None
    last_purchase: int | None
    prev_purchase: int | None
    purchase_count: int
    lifetime_spend: float
    points_earned: int
    points_redeemed: int
    last_redemption: int | None


def _dedupe(events: list[dict]) -> list[dict]:
    """Keep the first arrival of each (type, member_id, event_id)."""
    seen: set[tuple] = set()
    kept = []
    for event in events:
        key = (event["type"], event.get("member_id"), event["event_id"])
        if key not in seen:
            seen.add(key)
            kept.append(event)
    return kept


def _points(event: dict) -> int:
    return event.get("points") or 0


def _build_member(own: list[dict]) -> _Member:
    """Build one member's fields from all of their (de-duplicated) events."""
    enrollments = [e for e in own if e["type"] == "enrollment"]
    purchases = [e for e in own if e["type"] == "purchase"]
    redemptions = [e for e in own if e["type"] == "redemption"]
    activity = [e["ts"] for e in purchases + redemptions]

    if enrollments:
        first_enrollment = min(enrollments, key=lambda e: (e["ts"], e["event_id"]))
        enrolled_at = first_enrollment["ts"]
        channel = first_enrollment.get("channel") or "unknown"
    else:
        enrolled_at = min(activity)
        channel = "unknown"

    # Latest tier-carrying enrollment or purchase. The event type is a last tie-breaker
    # (only matters if an enrollment and a purchase share ts AND event_id).
    tiered = [e for e in enrollments + purchases if e.get("tier") is not None]
    if tiered:
        tier = max(tiered, key=lambda e: (e["ts"], e["event_id"], e["type"]))["tier"]
    else:
        tier = "unknown"

    stored = [e for e in purchases if e.get("store_id")]
    home_store = min(stored, key=lambda e: (e["ts"], e["event_id"]))["store_id"] if stored else "unknown"

    last_activity = max(activity) if activity else None
    purchase_ts_desc = sorted((e["ts"] for e in purchases), reverse=True)
    return _Member(
        enrolled_at=enrolled_at,
        channel=channel,
        tier=tier,
        home_store=home_store,
        last_activity=last_activity,
        last_touch=enrolled_at if last_activity is None else max(enrolled_at, last_activity),
        first_purchase=min(purchase_ts_desc) if purchase_ts_desc else None,
        last_purchase=purchase_ts_desc[0] if len(purchase_ts_desc) >= 1 else None,
        prev_purchase=purchase_ts_desc[1] if len(purchase_ts_desc) >= 2 else None,
        purchase_count=len(purchases),
        lifetime_spend=math.fsum(e["amount"] for e in purchases),
        points_earned=sum(_points(e) for e in purchases),
        points_redeemed=sum(e["points"] for e in redemptions),
        last_redemption=max((e["ts"] for e in redemptions), default=None),
    )


def _members_events(events: list[dict]) -> dict[str, list[dict]]:
    """Events of each known member. Surveys do not create members, so they are left out."""
    by_member: dict[str, list[dict]] = {}
    for event in events:
        if event["type"] != "survey" and event.get("member_id") is not None:
            by_member.setdefault(event["member_id"], []).append(event)
    return by_member


@dataclass
class _Lot:
    earned_at: int
    event_id: str
    points: int
    expires_at: int
    remaining: int


def _simulate_lots(own: list[dict], validity_ms: int) -> tuple[list[_Lot], int]:
    """Replay one member's purchases and redemptions in event-time order (SPEC 4.1).

    Order: ts, then purchases before redemptions at the same ts, then event_id.
    Returns the member's lots (with remaining points) and their unbacked points.
    """
    rank = {"purchase": 0, "redemption": 1}
    timeline = sorted(
        (e for e in own if e["type"] in rank),
        key=lambda e: (e["ts"], rank[e["type"]], e["event_id"]),
    )
    lots: list[_Lot] = []
    unbacked = 0
    for event in timeline:
        if event["type"] == "purchase":
            if _points(event) > 0:
                expires_at = event["ts"] + validity_ms
                lots.append(_Lot(event["ts"], event["event_id"], _points(event), expires_at, _points(event)))
            continue
        r = event["ts"]
        usable = [lot for lot in lots if lot.earned_at <= r < lot.expires_at and lot.remaining]
        usable.sort(key=lambda lot: (lot.earned_at, lot.event_id))
        wanted = event["points"]
        for lot in usable:
            taken = min(wanted, lot.remaining)
            lot.remaining -= taken
            wanted -= taken
        unbacked += wanted
    return lots, unbacked


def mentions(comment: str | None, term: str) -> bool:
    """True if ``term`` occurs in ``comment`` as a whole word, case-insensitively.

    Both are casefolded; an occurrence counts when the character before it and the
    character after it (if any) are not word characters (``\\w``, Unicode-aware).
    """
    if not comment or not term:
        return False
    text, needle = comment.casefold(), term.casefold()
    start = text.find(needle)
    while start != -1:
        end = start + len(needle)
        before_ok = start == 0 or not _WORD_CHAR.fullmatch(text[start - 1])
        after_ok = end == len(text) or not _WORD_CHAR.fullmatch(text[end])
        if before_ok and after_ok:
            return True
        start = text.find(needle, start + 1)
    return False


def _ratio(numerator, denominator) -> Value:
    value = None if not denominator else numerator / denominator
    return (value, numerator, denominator)


def _lift(top: float | None, bottom: float | None) -> Value:
    """``top / bottom - 1``, where top and bottom are themselves (possibly null) averages."""
    value = None if top is None or not bottom else top / bottom - 1
    return (value, top, bottom)


def _month(ts_ms: int) -> int:
    """The UTC calendar month of an epoch-ms instant, as a month count (year * 12 + month - 1)."""
    moment = _EPOCH + timedelta(milliseconds=ts_ms)
    return moment.year * 12 + moment.month - 1


def _month_label(month: int) -> str:
    return f"{month // 12:04d}-{month % 12 + 1:02d}"


def brute_force_kpis(
    events: list[dict],
    *,
    bucket_ms: int,
    windows: list[int],
    churn_horizon: int,
    settle: int,
    as_of: int,
    points_validity_ms: int | None = None,
    lexicons: dict[str, list[str]] | None = None,
    window_labels: dict[int, str] | None = None,
    segments: Sequence[str] = (),
    cohorts: int = 12,
    cohort_ages: int = 12,
) -> dict[Key, Value]:
    """Every KPI except churn_reduction, as of bucket ``as_of``, by brute force.

    ``events``: validated event dicts in arrival order (duplicates allowed, first wins).
    ``windows``, ``churn_horizon``, ``settle``: in buckets. Returns
    ``{(kpi, window_label or None, labels): (value, numerator, denominator)}``, labels
    being a tuple of sorted (key, value) pairs, () when unlabelled.

    ``segments``: dimensions of SPEC 4.2 (``MEMBER_DIMENSIONS``, ``ORDER_DIMENSIONS``); each
    adds its KPIs per value v under labels ``((dimension, v),)``. ``cohorts`` and
    ``cohort_ages`` (SPEC 4.3, defaults 12 and 12) add ``cohort_size`` under
    ``(("cohort", "YYYY-MM"),)`` and ``cohort_retention`` under
    ``(("age", "a"), ("cohort", "YYYY-MM"))``, both with window None.
    """
    K = as_of
    h = churn_horizon
    events = _dedupe(events)
    window_labels = window_labels or {}
    lexicons = lexicons or {}
    for dimension in segments:
        if dimension not in MEMBER_DIMENSIONS + ORDER_DIMENSIONS:
            raise ValueError(
                f"unknown segment dimension {dimension!r}: use {MEMBER_DIMENSIONS + ORDER_DIMENSIONS}"
            )

    def clamp(ts: int) -> int:
        return min(ts // bucket_ms, K)

    def within(ts: int | None, lo: float, hi: float) -> bool:
        return ts is not None and lo <= clamp(ts) <= hi

    own_events = _members_events(events)
    members_by_id = {member_id: _build_member(own) for member_id, own in own_events.items()}
    members = list(members_by_id.values())

    def count(field: str, lo: float, hi: float, where=lambda m: True) -> int:
        return sum(1 for m in members if within(getattr(m, field), lo, hi) and where(m))

    def events_in(kind: str, lo: float, hi: float) -> list[dict]:
        return [e for e in events if e["type"] == kind and within(e["ts"], lo, hi)]

    out: dict[Key, Value] = {}

    def put(kpi: str, window: str | None, value: Value, labels: Labels = ()) -> None:
        out[(kpi, window, labels)] = value

    def plain(value) -> Value:
        return (value, None, None)

    # Non-windowed KPIs.
    n_members = len(members)
    put("members", None, plain(n_members))
    for tier in sorted({m.tier for m in members}):
        put("tier_members", None, plain(sum(1 for m in members if m.tier == tier)), (("tier", tier),))
    put("churned_members", None, plain(count("last_touch", -math.inf, K - h)))
    settled = count("first_purchase", -math.inf, K - settle)
    one_and_done = count("first_purchase", -math.inf, K - settle, lambda m: m.purchase_count == 1)
    put("one_and_done_rate", None, _ratio(one_and_done, settled))
    buyers = [m for m in members if m.purchase_count >= 1]
    put("avg_lifetime_spend", None, _ratio(math.fsum(m.lifetime_spend for m in buyers), len(buyers)))

    # Points validity (SPEC 4.1). Lot expiry buckets are NOT clamped: they are compared
    # with K as they are (clamping would make points_expiring always 0).
    all_lots: list[_Lot] = []
    if points_validity_ms is None:
        liability = sum(m.points_earned - m.points_redeemed for m in members)
    else:
        liability = 0
        for own in own_events.values():
            lots, unbacked = _simulate_lots(own, points_validity_ms)
            all_lots.extend(lots)
            liability += sum(lot.remaining for lot in lots if lot.expires_at // bucket_ms > K)
            liability -= unbacked
    put("points_liability", None, plain(liability))
    lapsed = [lot for lot in all_lots if lot.expires_at // bucket_ms <= K]
    put(
        "breakage_rate", None, _ratio(sum(lot.remaining for lot in lapsed), sum(lot.points for lot in lapsed))
    )

    def lot_remaining(lo: int, hi: int) -> int:
        return sum(lot.remaining for lot in all_lots if lo <= lot.expires_at // bucket_ms <= hi)

    channels = sorted({m.channel for m in members})
    for w in windows:
        label = window_labels.get(w, f"{w}b")
        lo = K - w + 1

        active = count("last_activity", lo, K)
        put("active_members", label, plain(active))
        put("active_rate", label, _ratio(active, n_members))

        new_total = 0
        for channel in channels:
            new = count("enrolled_at", lo, K, lambda m, c=channel: m.channel == c)
            new_total += new
            put("new_members", label, plain(new), (("channel", channel),))
        grown_from = count("enrolled_at", -math.inf, K - w)
        growth = _ratio(n_members, grown_from)
        put(
            "member_growth_rate", label, (None if growth[0] is None else growth[0] - 1, n_members, grown_from)
        )

        member_orders = [e for e in events_in("purchase", lo, K) if e.get("member_id") is not None]
        guest_orders = [e for e in events_in("purchase", lo, K) if e.get("member_id") is None]
        put("enrollment_rate", label, _ratio(new_total, new_total + len(guest_orders)))

        redeemers = count("last_redemption", lo, K)
        put("redeemers", label, plain(redeemers))
        put("redemption_rate", label, _ratio(redeemers, n_members))
        put("redemption_participation", label, _ratio(redeemers, active))
        earned = sum(_points(e) for e in member_orders)
        redeemed = sum(e["points"] for e in events_in("redemption", lo, K))
        put("points_earned", label, plain(earned))
        put("points_redeemed", label, plain(redeemed))
        put("points_burn_rate", label, _ratio(redeemed, earned))
        put("expired_points", label, plain(lot_remaining(lo, K)))
        put("points_expiring", label, plain(lot_remaining(K + 1, K + w)))

        if w <= h:
            churned = count("last_touch", K - w - h + 1, K - h)
            at_risk_base = count("last_touch", K - w - h + 1, K) - count("enrolled_at", lo, K)
            churn = _ratio(churned, at_risk_base)
            put("churn_rate", label, churn)
            put(
                "retention_rate",
                label,
                (None if churn[0] is None else 1 - churn[0], at_risk_base - churned, at_risk_base),
            )

        put(
            "repeat_purchase_rate",
            label,
            _ratio(count("prev_purchase", lo, K), count("last_purchase", lo, K)),
        )

        aov = {}
        avg_margin = {}
        for who, orders in (("member", member_orders), ("guest", guest_orders)):
            aov[who] = _ratio(math.fsum(e["amount"] for e in orders), len(orders))
            put(f"aov_{who}", label, aov[who])
            with_margin = [e for e in orders if e.get("margin") is not None]
            avg_margin[who] = _ratio(math.fsum(e["margin"] for e in with_margin), len(with_margin))
            put(f"avg_margin_{who}", label, avg_margin[who])
        put("member_spend_lift", label, _lift(aov["member"][0], aov["guest"][0]))
        put("margin_lift", label, _lift(avg_margin["member"][0], avg_margin["guest"][0]))
        put(
            "member_revenue_share",
            label,
            _ratio(aov["member"][1], math.fsum(e["amount"] for e in member_orders + guest_orders)),
        )

        surveys = events_in("survey", lo, K)
        put("survey_responses", label, plain(len(surveys)))
        for kpi, respondents in (
            ("nps", surveys),
            ("nps_member", [e for e in surveys if e.get("member_id") is not None]),
            ("nps_guest", [e for e in surveys if e.get("member_id") is None]),
        ):
            scores = [e["nps"] for e in respondents if e.get("nps") is not None]
            net = sum(1 for s in scores if s >= 9) - sum(1 for s in scores if s <= 6)
            put(kpi, label, (None if not scores else 100 * net / len(scores), net, len(scores)))
        csats = [e["csat"] for e in surveys if e.get("csat") is not None]
        put("csat", label, _ratio(sum(1 for c in csats if c >= 4), len(csats)))
        for lexicon, terms in lexicons.items():
            for term in terms:
                hits = sum(1 for e in surveys if mentions(e.get("comment"), term))
                put("feedback_mentions", label, plain(hits), (("lexicon", lexicon), ("term", term)))

    # Segments (SPEC 4.2): the unsegmented brute force above, re-run over a sub-stream.
    def over(sub_events: list[dict]) -> dict[Key, Value]:
        return brute_force_kpis(
            sub_events,
            bucket_ms=bucket_ms,
            windows=windows,
            churn_horizon=churn_horizon,
            settle=settle,
            as_of=as_of,
            points_validity_ms=points_validity_ms,
            window_labels=window_labels,
            cohorts=0,
        )

    def put_segment(dimension: str, value: str, kpis: frozenset[str], sub_events: list[dict]) -> None:
        for (kpi, window, _), result in over(sub_events).items():
            if kpi in kpis:
                put(kpi, window, result, ((dimension, value),))

    member_value = {
        "tier": lambda m: m.tier,
        "enrollment_channel": lambda m: m.channel,
        "home_store": lambda m: m.home_store,
    }
    purchases = [e for e in events if e["type"] == "purchase"]
    for dimension in dict.fromkeys(segments):
        if dimension in MEMBER_DIMENSIONS:
            value_of = member_value[dimension]
            for value in sorted({value_of(m) for m in members}):
                chosen = [member_id for member_id, m in members_by_id.items() if value_of(m) == value]
                sub_events = [e for member_id in chosen for e in own_events[member_id]]
                put_segment(dimension, value, MEMBER_SEGMENT_KPIS, sub_events)
        else:
            for value in sorted({e.get(dimension) or "unknown" for e in purchases}):
                sub_events = [e for e in purchases if (e.get(dimension) or "unknown") == value]
                put_segment(dimension, value, ORDER_SEGMENT_KPIS, sub_events)

    # Cohorts (SPEC 4.3).
    month_of_K = _month(K * bucket_ms)
    for cohort in range(month_of_K - cohorts + 1, month_of_K + 1):
        in_cohort = [
            member_id
            for member_id, m in members_by_id.items()
            if _month(min(m.enrolled_at, K * bucket_ms)) == cohort
        ]
        if not in_cohort:
            continue
        cohort_label = ("cohort", _month_label(cohort))
        put("cohort_size", None, plain(len(in_cohort)), (cohort_label,))
        for age in range(cohort_ages):
            if cohort + age > month_of_K:
                break
            retained = 0
            for member_id in in_cohort:
                activity_months = {
                    _month(clamp(e["ts"]) * bucket_ms)
                    for e in own_events[member_id]
                    if e["type"] in ("purchase", "redemption")
                }
                if cohort + age in activity_months:
                    retained += 1
            put("cohort_retention", None, _ratio(retained, len(in_cohort)), (("age", str(age)), cohort_label))
    return out
