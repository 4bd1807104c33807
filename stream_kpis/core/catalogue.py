"""Every KPI of SPEC sections 4 and 4.1, once: the one table the rest of the project reads.

Each :class:`Kpi` says where the KPI is published (its topic key, as in
``Settings.topics.kpi_topics()``), whether it is computed per window, which labels its records
carry, its unit, a one-line help text (the Prometheus ``HELP`` of ``loyalty_<name>``), its
formula as the README states it, and which kind of segment dimension applies to it (SPEC 4.2).

Derived from this table: the KPI topic map (``core.kpis.KPI_TOPICS``), the gauge help texts
and label allow-list (``live.metrics``), the KPI checks of the targets file (``ops.targets``)
and the dashboard panel descriptions (``ops.dashboard``). Checked against it by tests: the
records the core emits, the README formula table and the KPI guide.

Formulas use the README's notation: K is the as-of bucket, w the window in buckets, h the churn
horizon, s the one-and-done settle period; ``count(x in S)`` counts members whose field x falls
in S.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = [
    "CATALOGUE",
    "KPIS",
    "SEGMENT_KINDS",
    "TOPIC_KEYS",
    "UNITS",
    "Kpi",
    "MEMBER_DIMENSIONS",
    "ORDER_DIMENSIONS",
    "SEGMENT_DIMENSIONS",
    "formula_table",
    "label_names",
]

#: Output topic keys, in the order of SPEC section 6 (``Settings.topics.kpi_topics()`` keys).
TOPIC_KEYS = ("active-rate", "redemption", "churn", "engagement", "satisfaction", "cohorts", "clv")
#: ratio: a share or a relative change (1 = 100 %); score: NPS, -100..100; currency: the
#: order currency; count: members, orders, responses or comments; points: loyalty points.
#: number: a model parameter or log-likelihood.
UNITS = ("count", "ratio", "points", "currency", "score", "number")
#: SPEC 4.2: "member" KPIs are evaluated over the members with a dimension value, "order" KPIs
#: over the purchases with it; None: the KPI is never segmented.
SEGMENT_KINDS = (None, "member", "order")
#: SPEC 4.2 dimensions: a member's value as of K ("member" KPIs), or the purchase's own field
#: ("order" KPIs).
MEMBER_DIMENSIONS = ("tier", "enrollment_channel", "home_store")
ORDER_DIMENSIONS = ("channel", "store_id")
SEGMENT_DIMENSIONS = MEMBER_DIMENSIONS + ORDER_DIMENSIONS


@dataclass(frozen=True)
class Kpi:
    """One KPI: its name (``loyalty_<name>`` as a gauge) and how it is published."""

    name: str
    topic: str
    windowed: bool
    labels: tuple[str, ...]
    unit: str
    help: str
    formula: str
    segment: str | None = None

    @property
    def display_name(self) -> str:
        """The name as the README writes it: ``_w`` when windowed, then ``{labels}``."""
        name = self.name + ("_w" if self.windowed else "")
        return name + (f"{{{','.join(self.labels)}}}" if self.labels else "")


def _group(topic: str, *rows: tuple) -> tuple[Kpi, ...]:
    """Catalogue rows of one topic: (name, windowed, labels, unit, segment, help, formula)."""
    return tuple(Kpi(name, topic, windowed, labels, unit, help_text, formula, segment)
                 for name, windowed, labels, unit, segment, help_text, formula in rows)


_W, _ONE = True, False  # computed per window, or one value as of K
_M, _O = "member", "order"  # segment kinds

CATALOGUE: tuple[Kpi, ...] = (
    *_group(
        "active-rate",
        ("members", _ONE, (), "count", _M,
         "Known loyalty members as of the current bucket.",
         "count(enrolled_at <= K); a member is known from their enrollment, or from their first "
         "purchase or redemption"),
        ("active_members", _W, (), "count", _M,
         "Members with a purchase or redemption in the window.",
         "count(last_activity in [K-w+1, K]), last_activity = latest purchase or redemption"),
        ("active_rate", _W, (), "ratio", _M,
         "Active members in the window divided by all members.",
         "active_members_w / members"),
        ("new_members", _W, ("channel",), "count", None,
         "Members enrolled in the window, per enrollment channel.",
         "count(enrolled_at in [K-w+1, K]) by acquisition channel"),
        ("member_growth_rate", _W, (), "ratio", None,
         "Members now divided by members one window earlier, minus 1.",
         "members / count(enrolled_at <= K-w) - 1"),
        ("enrollment_rate", _W, (), "ratio", None,
         "New members / (new members + guest orders) in the window.",
         "new_members_w / (new_members_w + guest orders in window): the share of non-member "
         "checkouts that joined"),
        ("tier_members", _ONE, ("tier",), "count", None,
         "Members per current tier.",
         "members by current tier"),
    ),
    *_group(
        "redemption",
        ("redeemers", _W, (), "count", _M,
         "Members with at least one redemption in the window.",
         "count(last_redemption in [K-w+1, K])"),
        ("redemption_rate", _W, (), "ratio", _M,
         "Redeemers in the window divided by all members.",
         "redeemers_w / members"),
        ("redemption_participation", _W, (), "ratio", _M,
         "Redeemers in the window divided by active members.",
         "redeemers_w / active_members_w"),
        ("points_earned", _W, (), "points", None,
         "Points earned by members in the window.",
         "sum of `points` of member purchases in window"),
        ("points_redeemed", _W, (), "points", None,
         "Points redeemed by members in the window.",
         "sum of `points` of redemptions in window"),
        ("points_burn_rate", _W, (), "ratio", None,
         "Points redeemed divided by points earned in the window.",
         "points_redeemed_w / points_earned_w"),
        ("points_liability", _ONE, (), "points", _M,
         "Outstanding points: earned minus redeemed, or with points validity the remaining "
         "points of unexpired lots minus unbacked points.",
         "points_earned - points_redeemed over members; with `points_validity`: remaining points "
         "of unexpired lots - unbacked points"),
        ("expired_points", _W, (), "points", None,
         "Points that expired unredeemed in the window.",
         "remaining points of lots whose expiry bucket is in [K-w+1, K] (with `points_validity`)"),
        ("points_expiring", _W, (), "points", None,
         "Points that will expire unredeemed within the next window.",
         "remaining points of lots whose expiry bucket is in [K+1, K+w] (with `points_validity`)"),
        ("breakage_rate", _ONE, (), "ratio", None,
         "Share of the points of lots past their expiry that expired unredeemed.",
         "expired points / points of lots whose expiry bucket <= K"),
    ),
    *_group(
        "churn",
        ("churned_members", _ONE, (), "count", _M,
         "Members currently churned (no touch for the churn horizon).",
         "count(last_touch <= K-h), last_touch = max(enrolled_at, last_activity)"),
        ("churn_rate", _W, (), "ratio", _M,
         "Share of members at risk of churning in the window that churned.",
         "count(last_touch in [K-w-h+1, K-h]) / (count(last_touch >= K-w-h+1) - "
         "count(enrolled_at >= K-w+1)); only windows w <= h"),
        ("retention_rate", _W, (), "ratio", _M,
         "Share of members at risk of churning in the window that were retained.",
         "1 - churn_rate_w"),
        ("churn_reduction", _W, (), "ratio", None,
         "Churn rate one window earlier minus churn rate now (positive: churn went down).",
         "churn_rate_w as evaluated when the as-of bucket was K-w, minus churn_rate_w now"),
        ("one_and_done_rate", _ONE, (), "ratio", _M,
         "Share of settled purchasing members with exactly one purchase.",
         "count(purchase_count = 1 and first_purchase <= K-s) / count(first_purchase <= K-s)"),
    ),
    *_group(
        "engagement",
        ("repeat_purchase_rate", _W, (), "ratio", _M,
         "Share of members buying in the window who bought at least twice in it.",
         "count(prev_purchase in [K-w+1, K]) / count(last_purchase in [K-w+1, K])"),
        ("aov_member", _W, (), "currency", _O,
         "Average order value of member purchases in the window.",
         "revenue / orders of member purchases in window"),
        ("aov_guest", _W, (), "currency", _O,
         "Average order value of guest purchases in the window.",
         "revenue / orders of guest purchases in window"),
        ("member_spend_lift", _W, (), "ratio", _O,
         "Member AOV divided by guest AOV, minus 1.",
         "aov_member_w / aov_guest_w - 1"),
        ("member_revenue_share", _W, (), "ratio", _O,
         "Member revenue divided by all revenue in the window.",
         "member revenue / all revenue in window"),
        ("avg_margin_member", _W, (), "currency", _O,
         "Average margin of member orders carrying a margin in the window.",
         "margin / orders of member purchases in window that carry `margin`"),
        ("avg_margin_guest", _W, (), "currency", _O,
         "Average margin of guest orders carrying a margin in the window.",
         "margin / orders of guest purchases in window that carry `margin`"),
        ("margin_lift", _W, (), "ratio", _O,
         "Average member margin divided by average guest margin, minus 1.",
         "avg_margin_member_w / avg_margin_guest_w - 1"),
        ("avg_lifetime_spend", _ONE, (), "currency", _M,
         "Average lifetime spend of members with at least one purchase (historic CLV).",
         "sum of lifetime_spend / count of members with a purchase"),
    ),
    *_group(
        "satisfaction",
        ("survey_responses", _W, (), "count", None,
         "Survey responses received in the window.",
         "survey events in window (members and non-members)"),
        ("nps", _W, (), "score", None,
         "Net promoter score (100 * (promoters - detractors) / responses) in the window.",
         "100 * (responses with nps >= 9 - responses with nps <= 6) / responses with nps, "
         "in window"),
        ("nps_member", _W, (), "score", None,
         "Net promoter score of member responses in the window.",
         "nps_w over the responses of members"),
        ("nps_guest", _W, (), "score", None,
         "Net promoter score of guest responses in the window.",
         "nps_w over the responses of non-members"),
        ("csat", _W, (), "ratio", None,
         "Share of CSAT responses scoring 4 or 5 in the window.",
         "responses with csat >= 4 / responses with csat, in window"),
        ("feedback_mentions", _W, ("lexicon", "term"), "count", None,
         "Survey comments mentioning a lexicon term in the window.",
         "comments in window containing the term (whole word, case-insensitive, Unicode)"),
    ),
    *_group(
        "cohorts",
        ("cohort_size", _ONE, ("cohort",), "count", None,
         "Members of an enrollment-month cohort.",
         "members whose enrolled_at is in the cohort's UTC month (enrollments after K count as K)"),
        ("cohort_retention", _ONE, ("cohort", "age"), "ratio", None,
         "Share of a cohort's members active in the month `age` months after the cohort's.",
         "members of the cohort with a purchase or redemption whose (clamped) bucket starts in "
         "month cohort + age / cohort_size"),
    ),
    *_group(
        "clv",
        ("clv_param", _ONE, ("model", "param"), "number", None,
         "A fitted parameter of the CLV models (bgnbd: r, alpha, a, b; gamma_gamma: p, q, "
         "gamma) or their maximised log-likelihood (param=ll).",
         "maximum-likelihood fit over all members with a purchase (SPEC 4.4)"),
        ("expected_active_members", _ONE, (), "count", None,
         "Members expected to be still active (alive) by the BG/NBD model.",
         "sum of P(alive) over members with a purchase"),
        ("predicted_purchases", _W, (), "count", None,
         "Purchase days the members are expected to make in the next window (BG/NBD).",
         "sum over members of E[X(w)]"),
        ("predicted_revenue", _W, (), "currency", None,
         "Revenue the members are expected to bring in the next window (BG/NBD x Gamma-Gamma).",
         "sum over members of E[X(w)] * E[M]"),
    ),
)

#: name -> :class:`Kpi`, read-only.
KPIS: Mapping[str, Kpi] = MappingProxyType({kpi.name: kpi for kpi in CATALOGUE})


def label_names(kpis: Iterable[Kpi] = CATALOGUE) -> frozenset[str]:
    """Every label name (besides ``window``) that a record of these KPIs carries."""
    return frozenset(label for kpi in kpis for label in kpi.labels)


def formula_table(kpis: Iterable[Kpi] = CATALOGUE) -> str:
    """The README's KPI table (Markdown): one row per KPI, its display name and formula."""
    rows = ["| KPI | formula |", "|---|---|"]
    rows += [f"| {kpi.display_name} | {kpi.formula} |" for kpi in kpis]
    return "\n".join(rows) + "\n"
