"""Test oracle: a deliberately naive, brute-force computation of every KPI.

The real core computes KPIs incrementally from per-bucket histograms. This module
recomputes them from scratch from the raw event list, the most obvious way, so that
property tests can check the core against it (SPEC section 4: "it must equal a
brute-force computation over the same events"). It was written from SPEC.md
sections 1-4.1 and the internal CONTRACT.md only, without looking at the core.

Rules of the game: no histograms, no incremental structures, no cleverness. Every
KPI is a loop over the de-duplicated events or over the members, whose fields are
built from each member's own event list with max/min/sorted. Bucket comparisons use
``clamp(ts) = min(ts // bucket_ms, K)`` ("timestamps after K count as K"). Float sums
use ``math.fsum`` so that the result does not depend on the arrival order.

``churn_reduction`` is not computed: it depends on the evaluation history, not on
the events alone.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["brute_force_kpis", "mentions"]

Labels = tuple[tuple[str, str], ...]
Key = tuple[str, str | None, Labels]
Value = tuple[float | int | None, float | int | None, float | int | None]

_WORD_CHAR = re.compile(r"\w")


@dataclass
class _Member:
    """A member's fields (SPEC section 3), rebuilt from scratch from their events."""

    enrolled_at: int
    channel: str
    tier: str
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

    last_activity = max(activity) if activity else None
    purchase_ts_desc = sorted((e["ts"] for e in purchases), reverse=True)
    return _Member(
        enrolled_at=enrolled_at,
        channel=channel,
        tier=tier,
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
) -> dict[Key, Value]:
    """Every KPI except churn_reduction, as of bucket ``as_of``, by brute force.

    ``events``: validated event dicts in arrival order (duplicates allowed, first wins).
    ``windows``, ``churn_horizon``, ``settle``: in buckets. Returns
    ``{(kpi, window_label or None, labels): (value, numerator, denominator)}``, labels
    being a tuple of sorted (key, value) pairs, () when unlabelled.
    """
    K = as_of
    h = churn_horizon
    events = _dedupe(events)
    window_labels = window_labels or {}
    lexicons = lexicons or {}

    def clamp(ts: int) -> int:
        return min(ts // bucket_ms, K)

    def within(ts: int | None, lo: float, hi: float) -> bool:
        return ts is not None and lo <= clamp(ts) <= hi

    own_events = _members_events(events)
    members = [_build_member(own) for own in own_events.values()]

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
    return out
