"""Hand-worked examples, run against the brute-force oracle (tests/oracle.py) and the real core.

The ``run`` fixture is parametrized: ``[oracle]`` calls the oracle, ``[core]`` feeds the same
event dicts through EventParser.validate into stream_kpis.core.Processor and evaluates as of
the same bucket. Oracle-only helpers (``mentions``) are tested directly.

Every expected number below is worked out by hand in the comments from SPEC.md
sections 1-4.3 and CONTRACT.md, never copied from the oracle's output. Buckets are
1 h wide; ``at(k)`` is the start of bucket k. Window [a, b] means buckets a..b.

The segment (SPEC 4.2) and cohort (SPEC 4.3) examples at the end run on both too, with the
same ``segments``, ``cohorts`` and ``cohort_ages`` on each side.
"""

from __future__ import annotations

import math
import random
from datetime import datetime

import pytest
from pytest import approx

from stream_kpis.exceptions import ConfigError
from tests.conftest import B, enrollment, purchase, redemption, survey
from tests.oracle import brute_force_kpis, mentions


def run_oracle(
    events,
    *,
    as_of,
    windows=(3,),
    h=4,
    s=4,
    validity=None,
    lexicons=None,
    labels=None,
    segments=(),
    cohorts=0,
    cohort_ages=12,
):
    """The oracle with the examples' defaults. Cohorts are off unless asked for (``cohorts=0``),
    on the core too (see ``run``), so that the section 4-4.1 examples see only their own KPIs."""
    return brute_force_kpis(
        list(events),
        bucket_ms=B,
        windows=list(windows),
        churn_horizon=h,
        settle=s,
        as_of=as_of,
        points_validity_ms=validity,
        lexicons=lexicons,
        window_labels=labels,
        segments=list(segments),
        cohorts=cohorts,
        cohort_ages=cohort_ages,
    )


@pytest.fixture(params=["oracle", "core"])
def run(request, make_processor, result_of):
    """The runner of the hand-worked examples, for the oracle and for the real core.

    The core path validates the same event dicts with EventParser, feeds them to a Processor
    and evaluates as of the same bucket. Its window labels (Settings.window_labels, "3h") are
    mapped back to the examples' labels ("3b" unless ``labels`` names them), and
    churn_reduction, which depends on the evaluation history, is left to tests/unit/test_core.py.
    ``segments``, ``cohorts`` (0: off, as in ``run_oracle``) and ``cohort_ages`` go to both sides.
    """
    if request.param == "oracle":
        return run_oracle

    def run_core(events, *, as_of, windows=(3,), h=4, s=4, validity=None, lexicons=None, labels=None,
                 segments=(), cohorts=0, cohort_ages=12):
        processor = make_processor(events, windows=windows, h=h, s=s, validity_ms=validity, lexicons=lexicons,
                                   segments=segments, cohorts=cohorts, cohort_ages=cohort_ages)
        labels = labels or {}
        rename = {
            core_label: labels.get(w, f"{w}b") for w, core_label in processor.settings.window_labels.items()
        }
        result = result_of(processor.evaluate(as_of), rename)
        return {key: value for key, value in result.items() if key[0] != "churn_reduction"}

    return run_core


def kpi(result, name, window=None, **labels):
    return result[(name, window, tuple(sorted(labels.items())))]


# --- scenarios (each member / guest event id unique across scenarios) -----------------


def rates_events():
    # ann: enrolled b0 (web), bought b2 (10 pts), redeemed 4 pts at b9 -> last_activity 9
    # ben: enrolled b1 (store), bought b5 (3 pts)                    -> last_activity 5
    # cat: no enrollment, bought b8 (2 pts)                          -> last_activity 8
    # a guest purchase with 7 pts (ignored), and dan who only answered a survey (not a member)
    return [
        enrollment("e-ann", "ann", 0, "web"),
        purchase("p-ann", "ann", 2, 100.0, points=10),
        redemption("r-ann", "ann", 9, 4),
        enrollment("e-ben", "ben", 1, "store"),
        purchase("p-ben", "ben", 5, 30.0, points=3),
        purchase("p-cat", "cat", 8, 20.0, points=2),
        purchase("g-rates", None, 9, 40.0, points=7),
        survey("s-dan", "dan", 9, nps=10),
    ]


def churn_events():
    # member  enrolled_at  last_activity  last_touch
    # m1      0            -              0
    # m2      1            4              4
    # m3      2            5 (redeem)     5
    # m4      3            7              7
    # m5      9            -              9
    # m6      7 (implicit) 7              7
    # m7      3            -              3
    return [
        enrollment("e-m1", "m1", 0),
        enrollment("e-m2", "m2", 1),
        purchase("p-m2", "m2", 4),
        enrollment("e-m3", "m3", 2),
        redemption("r-m3", "m3", 5, 1),
        enrollment("e-m4", "m4", 3),
        purchase("p-m4", "m4", 7),
        enrollment("e-m5", "m5", 9),
        purchase("p-m6", "m6", 7),
        enrollment("e-m7", "m7", 3),
    ]


def enrollment_events():
    # e1: enrolled b8 via web.
    # e2: bought at b2 (implicit member, "unknown"), then an enrollment at b9 via app
    #     arrives: the enrollment wins -> enrolled_at 9, channel app, last_touch 9.
    # e3: only a redemption at b5 -> implicit, enrolled_at 5, channel unknown.
    # e4: enrollment at b7 (channel None) arrives first, then an earlier one at b3 via
    #     store: earliest enrollment wins -> enrolled_at 3, channel store.
    # guest orders at b9, b6, b5.
    return [
        enrollment("e-e1", "e1", 8, "web"),
        purchase("p-e2", "e2", 2),
        enrollment("e-e2", "e2", 9, "app"),
        redemption("r-e3", "e3", 5, 1),
        enrollment("e-e4-b", "e4", 7, None),
        enrollment("e-e4-a", "e4", 3, "store"),
        purchase("g-e1", None, 9),
        purchase("g-e2", None, 6),
        purchase("g-e3", None, 5),
    ]


def validity_events(r2_offset=0):
    # V = 3 buckets. v1's lots: P1 (ts 0, 10 pts, expires at(3), exactly a bucket edge),
    # P2 (ts at(1), 5 pts, expires at(4)), P3 (at(4)+10, 9 pts, expires at(7)+10 -> b7),
    # P4 (at(6), 2 pts, expires at(9)). v2: P5 (at(2), 3 pts, expires at(5)) and
    # P6 (at(3)+7, 4 pts, expires at(6)+7 -> b6).
    return [
        purchase("P1", "v1", 0, points=10),
        redemption("R1", "v1", 0, 4),
        purchase("P2", "v1", 1, points=5),
        redemption("R2", "v1", 3, 8, offset=r2_offset),
        purchase("P3", "v1", 4, points=9, offset=10),
        purchase("P4", "v1", 6, points=2),
        redemption("R3", "v1", 6, 1, offset=5),
        purchase("P5", "v2", 2, points=3),
        purchase("P6", "v2", 3, points=4, offset=7),
        purchase("g-valid", None, 2, points=100),
    ]


# --- tests ----------------------------------------------------------------------------


def test_active_and_redemption_rates(run):
    r = run(rates_events(), as_of=10, windows=(3, 10))
    assert kpi(r, "members") == (3, None, None)  # ann, ben, cat; dan only answered a survey
    # 3b = [8, 10]: active ann (9), cat (8); ben (5) is not.
    assert kpi(r, "active_members", "3b") == (2, None, None)
    assert kpi(r, "active_rate", "3b") == approx((2 / 3, 2, 3))
    # 10b = [1, 10]: all three.
    assert kpi(r, "active_rate", "10b") == (1.0, 3, 3)
    # redeemers: ann (b9) in both windows.
    assert kpi(r, "redeemers", "3b") == (1, None, None)
    assert kpi(r, "redemption_rate", "3b") == approx((1 / 3, 1, 3))
    assert kpi(r, "redemption_participation", "3b") == (0.5, 1, 2)
    assert kpi(r, "redemption_participation", "10b") == approx((1 / 3, 1, 3))
    # points in [8, 10]: earned cat 2 (guest's 7 ignored), redeemed ann 4 -> burn 2.0
    assert kpi(r, "points_earned", "3b") == (2, None, None)
    assert kpi(r, "points_redeemed", "3b") == (4, None, None)
    assert kpi(r, "points_burn_rate", "3b") == (2.0, 4, 2)
    # points in [1, 10]: earned 10 + 3 + 2 = 15, redeemed 4
    assert kpi(r, "points_burn_rate", "10b") == approx((4 / 15, 4, 15))
    # without validity: liability = (10 - 4) + 3 + 2 = 11
    assert kpi(r, "points_liability") == (11, None, None)


def test_churn_rate_follows_the_spec_formula(run):
    r = run(churn_events(), as_of=10, h=4, windows=(3, 4, 5))
    # churned: last_touch <= K-h = 6 -> m1 (0), m2 (4), m3 (5), m7 (3)
    assert kpi(r, "churned_members") == (4, None, None)
    # w=3: num last_touch in [10-3-4+1, 6] = [4, 6] -> m2, m3 = 2
    #      den count(last_touch >= 4) = m2 m3 m4 m5 m6 = 5, minus count(enrolled_at >= 8) = m5
    #      -> 4
    assert kpi(r, "churn_rate", "3b") == (0.5, 2, 4)
    assert kpi(r, "retention_rate", "3b") == (0.5, 2, 4)
    # w=4: num last_touch in [3, 6] -> m2, m3, m7 = 3
    #      den count(last_touch >= 3) = 6 (all but m1), minus enrolled_at >= 7 (m5, m6) -> 4
    assert kpi(r, "churn_rate", "4b") == (0.75, 3, 4)
    assert kpi(r, "retention_rate", "4b") == (0.25, 1, 4)
    # w=5 > h: no churn windows, but other windowed KPIs exist
    assert ("churn_rate", "5b", ()) not in r
    assert ("retention_rate", "5b", ()) not in r
    assert ("active_rate", "5b", ()) in r


def test_repeat_purchase_and_one_and_done_with_settle(run):
    events = [
        purchase("q-p1a", "p1", 2),
        purchase("q-p1b", "p1", 9),  # last 9, prev 2
        purchase("q-p2a", "p2", 8),
        purchase("q-p2b", "p2", 9),  # last 9, prev 8
        purchase("q-p3", "p3", 6),  # single purchase exactly at K-s: settled
        purchase("q-p4", "p4", 7),  # single purchase after K-s: not settled yet
        purchase("q-p5", "p5", 1),  # single purchase, settled
        enrollment("e-p6", "p6", 0),  # never bought
        purchase("q-p7a", "p7", 9),
        purchase("q-p7b", "p7", 9),  # same ts: last 9, prev 9
        purchase("q-p8a", "p8", 0),
        purchase("q-p8b", "p8", 3),  # last 3, prev 0
        purchase("q-p9a", "p9", 9),
        purchase("q-p9b", "p9", 1),  # last 9, prev 8 (not 1)
        purchase("q-p9c", "p9", 8),
    ]
    r = run(events, as_of=10, s=4, windows=(3,))
    # 3b = [8, 10]: prev in window: p2 (8), p7 (9), p9 (8) = 3;
    # last in window: p1, p2, p7, p9 = 4
    assert kpi(r, "repeat_purchase_rate", "3b") == (0.75, 3, 4)
    # K-s = 6: first_purchase <= 6 -> p1 (2), p3 (6), p5 (1), p8 (0), p9 (1) = 5; of them
    # with exactly one purchase: p3, p5 = 2
    assert kpi(r, "one_and_done_rate") == (0.4, 2, 5)


def test_aov_lift_share_and_lifetime_spend(run):
    events = [
        purchase("a-1", "ann", 9, 100.0),
        purchase("a-2", "ann", 8, 50.0),
        purchase("a-3", "ann", 2, 1000.0),  # outside [8, 10]
        enrollment("e-bob", "bob", 0),  # member without purchases
        purchase("c-1", "cat", 5, 50.0),  # outside [8, 10]
        purchase("g-1", None, 8, 30.0),
        purchase("g-2", None, 9, 20.0),
        purchase("g-3", None, 10, 10.0),
        purchase("g-4", None, 1, 500.0),  # g-4 outside
    ]
    r = run(events, as_of=10, windows=(3,))
    # members in [8, 10]: 150 over 2 orders; guests: 60 over 3 orders
    assert kpi(r, "aov_member", "3b") == (75.0, 150.0, 2)
    assert kpi(r, "aov_guest", "3b") == (20.0, 60.0, 3)
    assert kpi(r, "member_spend_lift", "3b") == (2.75, 75.0, 20.0)  # 75 / 20 - 1
    assert kpi(r, "member_revenue_share", "3b") == approx((150 / 210, 150.0, 210.0))
    # lifetime: ann 1150, cat 50 over 2 buyers (bob has no purchase)
    assert kpi(r, "avg_lifetime_spend") == (600.0, 1200.0, 2)


def test_margin_lift_with_negative_margins(run):
    events = [
        purchase("m-1", "m1", 8, 10.0, margin=10.0),
        purchase("m-2", "m1", 9, 10.0, margin=-30.0),
        purchase("m-3", "m2", 9, 10.0),  # no margin: counts for AOV, not margin
        purchase("m-4", "m1", 1, 10.0, margin=999.0),  # outside [8, 10]
        purchase("g-m1", None, 8, 10.0, margin=5.0),
        purchase("g-m2", None, 10, 10.0, margin=15.0),
    ]
    r = run(events, as_of=10, windows=(3,))
    assert kpi(r, "aov_member", "3b") == (10.0, 30.0, 3)
    assert kpi(r, "avg_margin_member", "3b") == (-10.0, -20.0, 2)  # (10 - 30) / 2
    assert kpi(r, "avg_margin_guest", "3b") == (10.0, 20.0, 2)  # (5 + 15) / 2
    assert kpi(r, "margin_lift", "3b") == (-2.0, -10.0, 10.0)  # -10 / 10 - 1

    # negative guest average: -10 / -4 - 1 = 1.5
    negative_guest = events[:4] + [purchase("g-m3", None, 9, 10.0, margin=-4.0)]
    r = run(negative_guest, as_of=10, windows=(3,))
    assert kpi(r, "margin_lift", "3b") == (1.5, -10.0, -4.0)


def test_lifts_are_null_without_a_guest_baseline(run):
    members_only = [purchase("n-1", "m1", 9, 10.0, margin=4.0)]
    r = run(members_only, as_of=10, windows=(3,))
    assert kpi(r, "aov_guest", "3b") == (None, 0.0, 0)
    assert kpi(r, "member_spend_lift", "3b") == (None, 10.0, None)
    assert kpi(r, "margin_lift", "3b") == (None, 4.0, None)
    assert kpi(r, "member_revenue_share", "3b") == (1.0, 10.0, 10.0)
    # guest margins averaging exactly 0: (5 - 5) / 2 -> lift has a zero denominator
    zero_guest = members_only + [
        purchase("g-n1", None, 9, margin=5.0),
        purchase("g-n2", None, 9, margin=-5.0),
    ]
    r = run(zero_guest, as_of=10, windows=(3,))
    assert kpi(r, "avg_margin_guest", "3b") == (0.0, 0.0, 2)
    assert kpi(r, "margin_lift", "3b") == (None, 4.0, 0.0)


def test_enrollment_implicit_vs_explicit(run):
    events = enrollment_events()
    r = run(events, as_of=10, windows=(3, 6), h=2)
    assert kpi(r, "members") == (4, None, None)
    # enrolled_at/channel: e1 8 web, e2 9 app, e3 5 unknown, e4 3 store
    # 3b = [8, 10]: e1, e2
    for channel, expected in {"web": 1, "app": 1, "unknown": 0, "store": 0}.items():
        assert kpi(r, "new_members", "3b", channel=channel) == (expected, None, None)
    # 6b = [5, 10]: e1, e2, e3
    for channel, expected in {"web": 1, "app": 1, "unknown": 1, "store": 0}.items():
        assert kpi(r, "new_members", "6b", channel=channel) == (expected, None, None)
    # guest orders: [8, 10] has 1, [5, 10] has 3
    assert kpi(r, "enrollment_rate", "3b") == approx((2 / 3, 2, 3))
    assert kpi(r, "enrollment_rate", "6b") == (0.5, 3, 6)
    # growth: members 4 / enrolled_at <= K-w: w=3 -> <= 7: e3, e4; w=6 -> <= 4: e4
    assert kpi(r, "member_growth_rate", "3b") == (1.0, 4, 2)
    assert kpi(r, "member_growth_rate", "6b") == (3.0, 4, 1)
    # h=2: last_touch <= 8 -> e1 (8), e3 (5), e4 (3); e2's late enrollment moved it to 9
    assert kpi(r, "churned_members") == (3, None, None)

    # Before e2's enrollment arrives, e2 is implicit: enrolled_at 2, "unknown", last_touch 2.
    before = [e for e in events if e["event_id"] != "e-e2"]
    r = run(before, as_of=10, windows=(3, 6), h=2)
    assert ("new_members", "3b", (("channel", "app"),)) not in r
    assert kpi(r, "new_members", "3b", channel="unknown") == (0, None, None)
    assert kpi(r, "new_members", "6b", channel="unknown") == (1, None, None)  # e3 only
    assert kpi(r, "churned_members") == (4, None, None)


def test_tier_comes_from_the_latest_tier_carrying_event(run):
    events = [
        enrollment("e-t1", "t1", 0, tier="silver"),
        purchase("p-t1a", "t1", 5, tier="gold"),
        purchase("p-t1b", "t1", 7),  # no tier: keeps gold
        purchase("p-t2", "t2", 4, tier="gold"),
        enrollment("e-t2", "t2", 6, tier="platinum"),  # later ts: an enrollment can win
        enrollment("e-t3", "t3", 1),  # never a tier
        purchase("p-t4b", "t4", 3, tier="gold"),  # same ts as p-t4a: larger event_id wins
        purchase("p-t4a", "t4", 3, tier="silver"),
        purchase("p-t6a", "t6", 3, tier="silver"),  # same again, other arrival order
        purchase("p-t6b", "t6", 3, tier="gold"),
        purchase("p-t5", "t5", 9, tier="gold"),
        enrollment("e-t5", "t5", 1, tier="bronze"),  # arrives late but is older: loses
        purchase("g-t", None, 9, tier="diamond"),  # guests have no tier
    ]
    r = run(events, as_of=10)
    tiers = {labels: value for (name, _, labels), value in r.items() if name == "tier_members"}
    assert tiers == {
        (("tier", "gold"),): (4, None, None),  # t1, t4, t5, t6
        (("tier", "platinum"),): (1, None, None),  # t2
        (("tier", "unknown"),): (1, None, None),  # t3
    }


def test_surveys_nps_csat_member_and_guest(run):
    events = [
        survey("s1", "m1", 8, nps=10, csat=5),
        survey("s2", "m2", 9, nps=8, csat=3),
        survey("s3", "m3", 10, nps=9),
        survey("s4", None, 9, nps=3, csat=4),
        survey("s5", None, 9, csat=1),
        survey("s6", None, 8, nps=7),
        survey("s8", "m4", 9, nps=10),
        survey("s9", None, 10, nps=6),  # 6 is still a detractor
        survey("s7", "m1", 2, nps=0, csat=1),  # outside [8, 10]
    ]
    r = run(events, as_of=10, windows=(3, 10))
    # surveys create no members
    assert kpi(r, "members") == (0, None, None)
    assert kpi(r, "survey_responses", "3b") == (8, None, None)
    # 3b nps scores 10, 8, 9, 3, 7, 10, 6: promoters 3 (10, 9, 10), detractors 2 (3, 6)
    assert kpi(r, "nps", "3b") == approx((100 / 7, 1, 7))
    assert kpi(r, "nps_member", "3b") == (75.0, 3, 4)  # 10, 8, 9, 10
    assert kpi(r, "nps_guest", "3b") == approx((-200 / 3, -2, 3))  # 3, 7, 6
    assert kpi(r, "csat", "3b") == (0.5, 2, 4)  # 5, 3, 4, 1
    # 10b adds s7 (nps 0 = detractor, csat 1)
    assert kpi(r, "survey_responses", "10b") == (9, None, None)
    assert kpi(r, "nps", "10b") == (0.0, 0, 8)
    assert kpi(r, "nps_member", "10b") == (40.0, 2, 5)
    assert kpi(r, "csat", "10b") == (0.4, 2, 5)


LEXICONS = {
    "friction": ["slow", "lento", "frustrante", "بطيء", "too expensive"],
    "motivation": ["reward", "straße", "points"],
}


def test_feedback_mentions_whole_word_case_insensitive_unicode(run):
    comments = [
        "Checkout was SLOW today",  # slow
        "Atendimento Lento.",  # lento
        "it loaded slowly",  # nothing: slowly is not slow
        "slow, slow, slow",  # slow, once per comment
        "التطبيق بطيء جدا",  # بطيء
        "Way TOO expensive!",  # too expensive
        "rewards are nice",  # nothing: rewards is not reward
        "slow-ish checkout",  # slow: "-" is not a word character
        "STRASSE closed",  # straße: casefold("straße") == "strasse"
        "lentos e frustrantes",  # nothing
        "slow_ish",  # nothing: "_" is a word character
        "وبطيء",  # nothing: the attached prefix makes it another word
        "reward!",  # reward
        None,
    ]
    events = [
        survey(f"c{i}", None if i % 2 else f"m{i}", 9, csat=3, comment=c) for i, c in enumerate(comments)
    ]
    events.append(survey("c-old", "m0", 2, csat=3, comment="slow"))  # outside [8, 10]
    r = run(events, as_of=10, windows=(3, 10), lexicons=LEXICONS)
    expected_3b = {
        ("friction", "slow"): 3,
        ("friction", "lento"): 1,
        ("friction", "frustrante"): 0,
        ("friction", "بطيء"): 1,
        ("friction", "too expensive"): 1,
        ("motivation", "reward"): 1,
        ("motivation", "straße"): 1,
        ("motivation", "points"): 0,
    }
    for (lexicon, term), count in expected_3b.items():
        assert kpi(r, "feedback_mentions", "3b", lexicon=lexicon, term=term) == (count, None, None)
    assert kpi(r, "feedback_mentions", "10b", lexicon="friction", term="slow") == (4, None, None)


@pytest.mark.parametrize(
    ("comment", "term", "expected"),
    [
        ("Lento", "lento", True),
        ("muito lento!", "Lento", True),
        ("slowly", "slow", False),
        ("بطيء", "بطيء", True),
        ("too  expensive", "too expensive", False),  # the term's spacing must match
        ("", "slow", False),
        (None, "slow", False),
    ],
)
def test_mentions_directly(comment, term, expected):
    assert mentions(comment, term) is expected


def test_points_validity_unbacked_and_bucket_edge_expiry(run):
    # Event-time replay of v1 with V = 3 buckets:
    #   P1 +10 (ts 0). R1 -4 at ts 0 (purchases first at equal ts): P1 -> 6.
    #   P2 +5. R2 -8 at at(3): P1 expires at(3) exactly, so it is NOT usable (r < t+V fails);
    #     P2 gives 5 -> 0, 3 unbacked.
    #   P3 +9, P4 +2. R3 -1 at at(6)+5: P3 and P4 usable, oldest P3 -> 8.
    # Lots (expiry bucket, remaining/points): P1 (3, 6/10), P2 (4, 0/5), P3 (7, 8/9),
    # P4 (9, 2/2), v2's P5 (5, 3/3) and P6 (6, 4/4). The guest's 100 points belong to nobody.
    r = run(validity_events(), as_of=6, windows=(2, 4), validity=3 * B)
    # expiry > 6: P3 8 + P4 2 = 10, minus 3 unbacked (P6 expires in bucket K: not liability)
    assert kpi(r, "points_liability") == (7, None, None)
    assert kpi(r, "expired_points", "2b") == (7, None, None)  # [5, 6]: P5 3 + P6 4
    # [3, 6]: P1 6 + P2 0 + P5 3 + P6 4
    assert kpi(r, "expired_points", "4b") == (13, None, None)
    # [7, 8]: P3 8 (unbacked points are not netted against later lots: not 8 - 3)
    assert kpi(r, "points_expiring", "2b") == (8, None, None)
    assert kpi(r, "points_expiring", "4b") == (10, None, None)  # [7, 10]: P3 8 + P4 2
    # expiry <= 6: (6 + 0 + 3 + 4) / (10 + 5 + 3 + 4)
    assert kpi(r, "breakage_rate") == approx((13 / 22, 13, 22))


def test_points_validity_redemption_one_ms_before_expiry(run):
    # R2 at at(3)-1: P1 (6 left) still usable, oldest first: P1 -> 0, P2 5 -> 3, nothing
    # unbacked. R3 as before: P3 -> 8.
    r = run(validity_events(r2_offset=-1), as_of=6, windows=(2, 4), validity=3 * B)
    assert kpi(r, "points_liability") == (10, None, None)  # P3 8 + P4 2 - 0
    assert kpi(r, "expired_points", "4b") == (10, None, None)  # P1 0 + P2 3 + P5 3 + P6 4
    assert kpi(r, "breakage_rate") == approx((10 / 22, 10, 22))


def test_points_without_validity(run):
    r = run(validity_events(), as_of=6, windows=(2,))
    # earned 10 + 5 + 9 + 2 + 3 + 4 = 33, redeemed 4 + 8 + 1 = 13
    assert kpi(r, "points_liability") == (20, None, None)
    assert kpi(r, "expired_points", "2b") == (0, None, None)
    assert kpi(r, "points_expiring", "2b") == (0, None, None)
    assert kpi(r, "breakage_rate") == (None, 0, 0)


def test_timestamps_after_as_of_count_as_as_of(run):
    events = [enrollment("e-zoe", "zoe", 12, "web"), purchase("p-zoe", "zoe", 15, points=5)]
    r = run(events, as_of=10, windows=(1,), h=4)
    # both clamp to bucket 10 = the 1-bucket window [10, 10]
    assert kpi(r, "active_members", "1b") == (1, None, None)
    assert kpi(r, "new_members", "1b", channel="web") == (1, None, None)
    assert kpi(r, "points_earned", "1b") == (5, None, None)
    assert kpi(r, "churned_members") == (0, None, None)
    assert kpi(r, "member_growth_rate", "1b") == (None, 1, 0)  # nobody enrolled by bucket 9


def test_arrival_order_does_not_matter(run):
    events = rates_events() + churn_events() + enrollment_events() + validity_events()
    params = {"as_of": 10, "windows": (3, 6), "h": 4, "validity": 3 * B, "lexicons": LEXICONS}
    expected = run(events, **params)
    assert run(list(reversed(events)), **params) == expected
    rng = random.Random(7)
    for _ in range(5):
        shuffled = events[:]
        rng.shuffle(shuffled)
        assert run(shuffled, **params) == expected


def test_duplicates_are_ignored_first_arrival_wins(run):
    events = [
        purchase("x1", "ann", 9, 10.0, points=5),
        purchase("x1", "ann", 9, 999.0, points=500),  # redelivery: ignored
        redemption("x2", "ann", 9, 2),
        redemption("x2", "ann", 9, 2),
        purchase("x1", None, 9, 30.0),  # same event_id, guest: a different event
        purchase("x1", None, 9, 70.0),  # guest redelivery: ignored
        enrollment("x1", "ann", 8, "web"),  # same event_id, other type: a different event
        survey("x3", None, 9, nps=10),
        survey("x3", None, 9, nps=0),
    ]
    r = run(events, as_of=10, windows=(3,))
    assert kpi(r, "members") == (1, None, None)
    assert kpi(r, "aov_member", "3b") == (10.0, 10.0, 1)
    assert kpi(r, "aov_guest", "3b") == (30.0, 30.0, 1)
    assert kpi(r, "points_earned", "3b") == (5, None, None)
    assert kpi(r, "points_redeemed", "3b") == (2, None, None)
    assert kpi(r, "new_members", "3b", channel="web") == (1, None, None)
    assert kpi(r, "survey_responses", "3b") == (1, None, None)
    assert kpi(r, "nps", "3b") == (100.0, 1, 1)


RATIO_KPIS = {
    "active_rate",
    "redemption_rate",
    "redemption_participation",
    "points_burn_rate",
    "churn_rate",
    "retention_rate",
    "repeat_purchase_rate",
    "one_and_done_rate",
    "aov_member",
    "aov_guest",
    "member_spend_lift",
    "member_revenue_share",
    "avg_lifetime_spend",
    "member_growth_rate",
    "enrollment_rate",
    "avg_margin_member",
    "avg_margin_guest",
    "margin_lift",
    "nps",
    "nps_member",
    "nps_guest",
    "csat",
    "breakage_rate",
}
COUNT_KPIS = {
    "members",
    "active_members",
    "redeemers",
    "points_earned",
    "points_redeemed",
    "churned_members",
    "points_liability",
    "expired_points",
    "points_expiring",
    "survey_responses",
}
LABELLED_KPIS = {"new_members", "tier_members", "feedback_mentions"}
NON_WINDOWED = {
    "members",
    "churned_members",
    "one_and_done_rate",
    "points_liability",
    "avg_lifetime_spend",
    "breakage_rate",
    "tier_members",
}
CHURN_WINDOWED = {"churn_rate", "retention_rate"}


def test_zero_denominators_are_null(run):
    r = run([], as_of=10, windows=(3,), validity=3 * B)
    assert {name for name, _, _ in r} == RATIO_KPIS | COUNT_KPIS
    for (name, _, _), (value, numerator, denominator) in r.items():
        if name in RATIO_KPIS:
            assert value is None, name
            assert denominator in (0, None), name
        else:
            assert value == 0, name
            assert numerator is None and denominator is None, name
    assert kpi(r, "member_spend_lift", "3b") == (None, None, None)
    assert kpi(r, "churn_rate", "3b") == (None, 0, 0)


def test_every_kpi_for_every_window_with_labels(run):
    events = rates_events() + [survey("s-kpi", None, 9, nps=9, comment="slow")]
    r = run(
        events, as_of=10, windows=(3, 24), h=3, lexicons={"friction": ["slow"]}, labels={3: "3h", 24: "1d"},
        cohorts=12,
    )
    all_kpis = RATIO_KPIS | COUNT_KPIS | LABELLED_KPIS
    # everybody enrolled in 1970-01 (bucket 0 is the epoch), the month of K: one cohort, age 0
    expected = {("cohort_size", None), ("cohort_retention", None)}
    expected |= {(name, None) for name in NON_WINDOWED}
    expected |= {(name, "3h") for name in all_kpis - NON_WINDOWED}
    expected |= {(name, "1d") for name in all_kpis - NON_WINDOWED - CHURN_WINDOWED}
    assert {(name, window) for name, window, _ in r} == expected
    assert not any(isinstance(v, float) and math.isnan(v) for value in r.values() for v in value)
    # ann, ben and cat (not dan, who only answered a survey) all bought or redeemed in 1970-01
    assert kpi(r, "cohort_size", cohort="1970-01") == (3, None, None)
    assert kpi(r, "cohort_retention", cohort="1970-01", age="0") == (1.0, 3, 3)
    # channels of the known members: ann web, ben store, cat unknown
    assert {labels for name, window, labels in r if name == "new_members" and window == "1d"} == {
        (("channel", "web"),),
        (("channel", "store"),),
        (("channel", "unknown"),),
    }


# --- segments (SPEC 4.2) and cohorts (SPEC 4.3) -------------------------------------------

MEMBER_KPIS_NON_WINDOWED = {
    "members",
    "churned_members",
    "one_and_done_rate",
    "points_liability",
    "avg_lifetime_spend",
}
MEMBER_KPIS_WINDOWED = {
    "active_members",
    "active_rate",
    "redeemers",
    "redemption_rate",
    "redemption_participation",
    "repeat_purchase_rate",
}
ORDER_KPIS = {
    "aov_member",
    "aov_guest",
    "member_spend_lift",
    "member_revenue_share",
    "avg_margin_member",
    "avg_margin_guest",
    "margin_lift",
}
SEGMENTED_KPIS = MEMBER_KPIS_NON_WINDOWED | MEMBER_KPIS_WINDOWED | CHURN_WINDOWED | ORDER_KPIS


def with_fields(event, **fields):
    """An event dict with extra fields (the conftest builders take no channel or store_id)."""
    return {**event, **fields}


def segment(result, dimension, value):
    """``{(kpi, window): (value, num, den)}`` of the segmented records labelled {dimension: value}.

    Only the KPIs of SPEC 4.2: new_members{channel} shares the label name "channel"."""
    return {
        (name, window): v
        for (name, window, labels), v in result.items()
        if name in SEGMENTED_KPIS and labels == ((dimension, value),)
    }


def segment_values(result, dimension):
    return {
        labels[0][1]
        for name, _, labels in result
        if name in SEGMENTED_KPIS and labels and labels[0][0] == dimension
    }


def hour(text):
    """The bucket (of B = 1 h) of a UTC time written "YYYY-MM-DDTHH"."""
    return int(datetime.fromisoformat(f"{text}:00+00:00").timestamp() * 1000) // B


def tier_events():
    # K = 10, 3b = [8, 10], h = 4 (churned: last_touch <= 6; churn window [4, 6]), s = 4 (K-s = 6)
    # t1: enrolled b0 as bronze, bought b2 (40.0, 10 pts, tier gold), bought b9 (20.0, no tier)
    #     -> gold; last_activity 9; 2 purchases (first 2, last 9, prev 2); spend 60; points +10
    # t2: enrolled b1 as gold, redeemed 4 pts at b9 -> gold; last_activity = last_redemption = 9;
    #     no purchase; points -4
    # t3: enrolled b2 as gold, bought b3 (30.0, 3 pts, tier silver): the newer tier moves t3, with
    #     all of its history, to silver; last_touch 3; one purchase (first 3); spend 30; points +3
    # t4: implicit, bought b8 (10.0), never a tier -> unknown; enrolled_at 8; one purchase
    return [
        enrollment("e-st1", "t1", 0, tier="bronze"),
        purchase("p-st1a", "t1", 2, 40.0, points=10, tier="gold"),
        purchase("p-st1b", "t1", 9, 20.0),
        enrollment("e-st2", "t2", 1, tier="gold"),
        redemption("r-st2", "t2", 9, 4),
        enrollment("e-st3", "t3", 2, tier="gold"),
        purchase("p-st3", "t3", 3, 30.0, points=3, tier="silver"),
        purchase("p-st4", "t4", 8, 10.0),
        purchase("g-st", None, 9, 99.0, tier="diamond"),  # guests have no tier
    ]


def test_segments_by_tier_every_member_kpi(run):
    r = run(tier_events(), as_of=10, windows=(3,), h=4, s=4, segments=["tier"])
    # bronze (t1's old tier) and diamond (a guest's) are nobody's current tier
    assert segment_values(r, "tier") == {"gold", "silver", "unknown"}
    # gold = t1, t2. active in [8, 10]: t1 (9), t2 (9); redeemer t2 (9). churn: nobody's
    # last_touch in [4, 6]; base = last_touch >= 4 (t1, t2) - enrolled_at >= 8 (none) = 2.
    # repeat: last in window t1 (9), its prev 2 is not. one-and-done: first <= 6 t1 (2), who has 2
    # purchases. liability 10 - 4 = 6. lifetime: t1's 60 over 1 buyer.
    assert segment(r, "tier", "gold") == {
        ("members", None): (2, None, None),
        ("active_members", "3b"): (2, None, None),
        ("active_rate", "3b"): (1.0, 2, 2),
        ("redeemers", "3b"): (1, None, None),
        ("redemption_rate", "3b"): (0.5, 1, 2),
        ("redemption_participation", "3b"): (0.5, 1, 2),
        ("churned_members", None): (0, None, None),
        ("churn_rate", "3b"): (0.0, 0, 2),
        ("retention_rate", "3b"): (1.0, 2, 2),
        ("repeat_purchase_rate", "3b"): (0.0, 0, 1),
        ("one_and_done_rate", None): (0.0, 0, 1),
        ("points_liability", None): (6, None, None),
        ("avg_lifetime_spend", None): (60.0, 60.0, 1),
    }
    # silver = t3: last_touch 3 -> churned, but outside the churn window [4, 6] and not in the base
    # (last_touch >= 4): churn 0 / 0. One purchase at 3 <= 6: one-and-done 1 / 1.
    assert segment(r, "tier", "silver") == {
        ("members", None): (1, None, None),
        ("active_members", "3b"): (0, None, None),
        ("active_rate", "3b"): (0.0, 0, 1),
        ("redeemers", "3b"): (0, None, None),
        ("redemption_rate", "3b"): (0.0, 0, 1),
        ("redemption_participation", "3b"): (None, 0, 0),
        ("churned_members", None): (1, None, None),
        ("churn_rate", "3b"): (None, 0, 0),
        ("retention_rate", "3b"): (None, 0, 0),
        ("repeat_purchase_rate", "3b"): (None, 0, 0),
        ("one_and_done_rate", None): (1.0, 1, 1),
        ("points_liability", None): (3, None, None),
        ("avg_lifetime_spend", None): (30.0, 30.0, 1),
    }
    # unknown = t4: active (8); base = last_touch >= 4 (t4) - enrolled_at >= 8 (t4) = 0.
    # repeat: last 8 in window, no prev. first purchase 8 > 6: not settled.
    assert segment(r, "tier", "unknown") == {
        ("members", None): (1, None, None),
        ("active_members", "3b"): (1, None, None),
        ("active_rate", "3b"): (1.0, 1, 1),
        ("redeemers", "3b"): (0, None, None),
        ("redemption_rate", "3b"): (0.0, 0, 1),
        ("redemption_participation", "3b"): (0.0, 0, 1),
        ("churned_members", None): (0, None, None),
        ("churn_rate", "3b"): (None, 0, 0),
        ("retention_rate", "3b"): (None, 0, 0),
        ("repeat_purchase_rate", "3b"): (0.0, 0, 1),
        ("one_and_done_rate", None): (None, 0, 0),
        ("points_liability", None): (0, None, None),
        ("avg_lifetime_spend", None): (10.0, 10.0, 1),
    }

    # Without t3's silver purchase, t3 stays gold (enrolled b2, no activity: last_touch 2).
    r = run(
        [e for e in tier_events() if e["event_id"] != "p-st3"], as_of=10, windows=(3,), segments=["tier"]
    )
    assert segment_values(r, "tier") == {"gold", "unknown"}
    assert kpi(r, "members", tier="gold") == (3, None, None)
    assert kpi(r, "churned_members", tier="gold") == (1, None, None)
    assert kpi(r, "active_rate", "3b", tier="gold") == approx((2 / 3, 2, 3))


def test_segments_points_liability_with_validity(run):
    # validity_events with V = 3 buckets as of 6 (worked out in
    # test_points_validity_unbacked_and_bucket_edge_expiry): liability 7, v1 and v2 have no tier.
    r = run(validity_events(), as_of=6, windows=(2,), validity=3 * B, segments=["tier"])
    assert segment_values(r, "tier") == {"unknown"}
    assert kpi(r, "points_liability", tier="unknown") == (7, None, None)


def test_segments_by_enrollment_channel_explicit_vs_implicit(run):
    # K = 10, 3b = [8, 10], h = 4: churned = last_touch <= 6, churn window [4, 6]
    # c1: enrolled b0 via web, bought b9                         -> web;     last_touch 9
    # c2: implicit, bought b4                                    -> unknown; last_touch 4
    # c3: enrolled b2 without a channel                          -> unknown; last_touch 2
    # c4: bought b1, then an explicit enrollment at b6 via app   -> app;     enrolled 6, last_touch 6
    # c5: enrolled b7 via app                                    -> app;     last_touch 7
    events = [
        enrollment("e-sc1", "c1", 0, "web"),
        purchase("p-sc1", "c1", 9),
        purchase("p-sc2", "c2", 4),
        enrollment("e-sc3", "c3", 2, None),
        purchase("p-sc4", "c4", 1),
        enrollment("e-sc4", "c4", 6, "app"),
        enrollment("e-sc5", "c5", 7, "app"),
    ]
    r = run(events, as_of=10, windows=(3,), h=4, segments=["enrollment_channel"])
    assert segment_values(r, "enrollment_channel") == {"web", "unknown", "app"}
    # members and active (last_activity in [8, 10]: only c1)
    assert kpi(r, "members", enrollment_channel="web") == (1, None, None)
    assert kpi(r, "members", enrollment_channel="unknown") == (2, None, None)
    assert kpi(r, "members", enrollment_channel="app") == (2, None, None)
    assert kpi(r, "active_rate", "3b", enrollment_channel="web") == (1.0, 1, 1)
    assert kpi(r, "active_rate", "3b", enrollment_channel="unknown") == (0.0, 0, 2)
    assert kpi(r, "active_rate", "3b", enrollment_channel="app") == (0.0, 0, 2)
    # churned: unknown c2 (4), c3 (2); app c4 (6); web none
    assert kpi(r, "churned_members", enrollment_channel="unknown") == (2, None, None)
    assert kpi(r, "churned_members", enrollment_channel="app") == (1, None, None)
    assert kpi(r, "churned_members", enrollment_channel="web") == (0, None, None)
    # churn: web 0 / (c1) 1; unknown c2 / (c2) 1; app c4 / (c4, c5) 2 (nobody enrolled >= 8)
    assert kpi(r, "churn_rate", "3b", enrollment_channel="web") == (0.0, 0, 1)
    assert kpi(r, "churn_rate", "3b", enrollment_channel="unknown") == (1.0, 1, 1)
    assert kpi(r, "retention_rate", "3b", enrollment_channel="unknown") == (0.0, 0, 1)
    assert kpi(r, "churn_rate", "3b", enrollment_channel="app") == (0.5, 1, 2)

    # Before c4's enrollment arrives, c4 is implicit: unknown, enrolled_at 1, last_touch 1.
    r = run(
        [e for e in events if e["event_id"] != "e-sc4"],
        as_of=10,
        windows=(3,),
        h=4,
        segments=["enrollment_channel"],
    )
    assert kpi(r, "members", enrollment_channel="unknown") == (3, None, None)
    assert kpi(r, "members", enrollment_channel="app") == (1, None, None)
    assert kpi(r, "churned_members", enrollment_channel="unknown") == (3, None, None)
    assert kpi(r, "churn_rate", "3b", enrollment_channel="app") == (0.0, 0, 1)  # c5 (7) only


def test_segments_by_home_store_earliest_purchase_that_carries_one(run):
    # K = 10, 5b = [6, 10]
    # h1: bought b5 at s2 (50.0), then an older purchase at b3 at s1 (10.0) arrives -> s1; last 5
    # h2: bought b4 without a store (20.0), then b6 at s2 (20.0): the earliest purchase that
    #     carries a store -> s2; last 6
    # h3: enrolled b0, never bought -> unknown
    # h4: two purchases at the same ts b7 (5.0 each), "p-sh4b" at s2 and "p-sh4a" at s3: ties by
    #     event_id, the smaller "p-sh4a" -> s3; last 7
    # h5: bought b8 without a store (7.0) and b9 with an empty store_id (3.0, counts as missing)
    #     -> unknown; last 9, prev 8
    # a guest purchase at s9: guests have no home store
    def bought(eid, member, bucket, amount, store):
        return with_fields(purchase(eid, member, bucket, amount), store_id=store)

    events = [
        bought("p-sh1b", "h1", 5, 50.0, "s2"),
        bought("p-sh1a", "h1", 3, 10.0, "s1"),
        bought("p-sh2a", "h2", 4, 20.0, None),
        bought("p-sh2b", "h2", 6, 20.0, "s2"),
        enrollment("e-sh3", "h3", 0, "web"),
        bought("p-sh4b", "h4", 7, 5.0, "s2"),
        bought("p-sh4a", "h4", 7, 5.0, "s3"),
        bought("p-sh5a", "h5", 8, 7.0, None),
        bought("p-sh5b", "h5", 9, 3.0, ""),
        bought("g-sh", None, 9, 80.0, "s9"),
    ]
    r = run(events, as_of=10, windows=(5,), segments=["home_store"])
    assert segment_values(r, "home_store") == {"s1", "s2", "s3", "unknown"}
    expected = {
        # store: (members, active in [6, 10], avg_lifetime_spend)
        "s1": (1, 0, (60.0, 60.0, 1)),  # h1 (last 5)
        "s2": (1, 1, (40.0, 40.0, 1)),  # h2 (last 6)
        "s3": (1, 1, (10.0, 10.0, 1)),  # h4
        "unknown": (2, 1, (10.0, 10.0, 1)),  # h3 (no purchase), h5 (last 9)
    }
    for store, (members, active, lifetime) in expected.items():
        assert kpi(r, "members", home_store=store) == (members, None, None), store
        assert kpi(r, "active_members", "5b", home_store=store) == (active, None, None), store
        assert kpi(r, "avg_lifetime_spend", home_store=store) == lifetime, store
    assert kpi(r, "active_rate", "5b", home_store="unknown") == (0.5, 1, 2)
    assert kpi(r, "repeat_purchase_rate", "5b", home_store="unknown") == (1.0, 1, 1)  # h5: 9 and 8


def test_segments_by_order_channel(run):
    # K = 10, 3b = [8, 10], 10b = [1, 10]
    #       who     bucket amount channel        margin
    # m1    member  9      100.0  web            30
    # m2    member  8       50.0  store          10
    # m3    member  9       60.0  (none:unknown) -6
    # g1    guest   9       20.0  web            5
    # g2    guest   10      40.0  web            (none: AOV only)
    # g3    guest   2       70.0  app            (none), outside 3b
    # an enrollment via "kiosk" is not an order: no order value "kiosk"
    def bought(eid, member, bucket, amount, channel, margin=None):
        return with_fields(purchase(eid, member, bucket, amount, margin=margin), channel=channel)

    events = [
        bought("p-so1", "m1", 9, 100.0, "web", 30.0),
        bought("p-so2", "m2", 8, 50.0, "store", 10.0),
        bought("p-so3", "m3", 9, 60.0, None, -6.0),
        bought("g-so1", None, 9, 20.0, "web", 5.0),
        bought("g-so2", None, 10, 40.0, "web"),
        bought("g-so3", None, 2, 70.0, "app"),
        enrollment("e-so4", "m4", 9, "kiosk"),
    ]
    r = run(events, as_of=10, windows=(3, 10), segments=["channel"])
    assert segment_values(r, "channel") == {"web", "store", "unknown", "app"}
    # web: member 100 / 1; guest 60 / 2 = 30; lift 100 / 30 - 1; share 100 / 160;
    # margins member 30 / 1, guest 5 / 1 (g2 has none); margin lift 30 / 5 - 1 = 5
    web = {
        "aov_member": (100.0, 100.0, 1),
        "aov_guest": (30.0, 60.0, 2),
        "member_spend_lift": approx((7 / 3, 100.0, 30.0)),
        "member_revenue_share": (0.625, 100.0, 160.0),
        "avg_margin_member": (30.0, 30.0, 1),
        "avg_margin_guest": (5.0, 5.0, 1),
        "margin_lift": (5.0, 30.0, 5.0),
    }
    # all of web's orders are in both windows
    assert segment(r, "channel", "web") == {(k, w): v for k, v in web.items() for w in ("3b", "10b")}
    # store: members only
    store = {
        "aov_member": (50.0, 50.0, 1),
        "aov_guest": (None, 0.0, 0),
        "member_spend_lift": (None, 50.0, None),
        "member_revenue_share": (1.0, 50.0, 50.0),
        "avg_margin_member": (10.0, 10.0, 1),
        "avg_margin_guest": (None, 0.0, 0),
        "margin_lift": (None, 10.0, None),
    }
    assert segment(r, "channel", "store") == {(k, w): v for k, v in store.items() for w in ("3b", "10b")}
    assert kpi(r, "aov_member", "3b", channel="unknown") == (60.0, 60.0, 1)
    assert kpi(r, "avg_margin_member", "3b", channel="unknown") == (-6.0, -6.0, 1)
    # app in 3b: no order at all, every KPI is there and null
    assert segment(r, "channel", "app") == {
        ("aov_member", "3b"): (None, 0.0, 0),
        ("aov_guest", "3b"): (None, 0.0, 0),
        ("member_spend_lift", "3b"): (None, None, None),
        ("member_revenue_share", "3b"): (None, 0.0, 0.0),
        ("avg_margin_member", "3b"): (None, 0.0, 0),
        ("avg_margin_guest", "3b"): (None, 0.0, 0),
        ("margin_lift", "3b"): (None, None, None),
        # 10b has g3
        ("aov_member", "10b"): (None, 0.0, 0),
        ("aov_guest", "10b"): (70.0, 70.0, 1),
        ("member_spend_lift", "10b"): (None, None, 70.0),
        ("member_revenue_share", "10b"): (0.0, 0.0, 70.0),
        ("avg_margin_member", "10b"): (None, 0.0, 0),
        ("avg_margin_guest", "10b"): (None, 0.0, 0),
        ("margin_lift", "10b"): (None, None, None),
    }
    # order dimensions label no member KPI; new_members{channel} is unchanged (m4 via kiosk)
    assert ("members", None, (("channel", "web"),)) not in r
    assert kpi(r, "new_members", "3b", channel="kiosk") == (1, None, None)


def test_segments_by_order_store_id(run):
    # K = 10, 3b = [8, 10]
    # member b9 30.0 at s1; member b9 10.0 at s2; guest b9 20.0 at s1; guest b8 5.0 without a store;
    # member at b12 8.0 at s3: after K, counts as K (in 3b); guest b1 4.0 at s0: outside every window
    def bought(eid, member, bucket, amount, store):
        return with_fields(purchase(eid, member, bucket, amount), store_id=store)

    events = [
        bought("p-ss1", "n1", 9, 30.0, "s1"),
        bought("p-ss2", "n2", 9, 10.0, "s2"),
        bought("g-ss1", None, 9, 20.0, "s1"),
        bought("g-ss2", None, 8, 5.0, None),
        bought("p-ss3", "n3", 12, 8.0, "s3"),
        bought("g-ss3", None, 1, 4.0, "s0"),
    ]
    r = run(events, as_of=10, windows=(3,), segments=["store_id"])
    assert segment_values(r, "store_id") == {"s0", "s1", "s2", "s3", "unknown"}
    # s1: 30 / 1 vs 20 / 1 -> lift 0.5, share 30 / 50
    assert kpi(r, "aov_member", "3b", store_id="s1") == (30.0, 30.0, 1)
    assert kpi(r, "aov_guest", "3b", store_id="s1") == (20.0, 20.0, 1)
    assert kpi(r, "member_spend_lift", "3b", store_id="s1") == (0.5, 30.0, 20.0)
    assert kpi(r, "member_revenue_share", "3b", store_id="s1") == (0.6, 30.0, 50.0)
    # s2: members only
    assert kpi(r, "member_revenue_share", "3b", store_id="s2") == (1.0, 10.0, 10.0)
    assert kpi(r, "member_spend_lift", "3b", store_id="s2") == (None, 10.0, None)
    # unknown: guests only
    assert kpi(r, "aov_guest", "3b", store_id="unknown") == (5.0, 5.0, 1)
    assert kpi(r, "member_revenue_share", "3b", store_id="unknown") == (0.0, 0.0, 5.0)
    assert kpi(r, "member_spend_lift", "3b", store_id="unknown") == (None, None, 5.0)
    # s3: the future purchase clamped into bucket K
    assert kpi(r, "aov_member", "3b", store_id="s3") == (8.0, 8.0, 1)
    # s0: a value of the data with no order in the window still gets every order KPI, null
    assert segment(r, "store_id", "s0") == {
        ("aov_member", "3b"): (None, 0.0, 0),
        ("aov_guest", "3b"): (None, 0.0, 0),
        ("member_spend_lift", "3b"): (None, None, None),
        ("member_revenue_share", "3b"): (None, 0.0, 0.0),
        ("avg_margin_member", "3b"): (None, 0.0, 0),
        ("avg_margin_guest", "3b"): (None, 0.0, 0),
        ("margin_lift", "3b"): (None, None, None),
    }


def test_segments_every_kpi_of_each_kind_and_nothing_else(run):
    # k1: enrolled b0 via web as gold, bought b9 via app at s1 -> tier gold, enrollment_channel web,
    #     home_store s1. A guest bought b9 via web without a store.
    # -> member values: tier gold, enrollment_channel web, home_store s1;
    #    order values: channel app, web; store_id s1, unknown. Windows 3b, 6b; h = 4: churn in 3b only.
    events = [
        enrollment("e-sk1", "k1", 0, "web", tier="gold"),
        with_fields(purchase("p-sk1", "k1", 9), channel="app", store_id="s1"),
        with_fields(purchase("g-sk", None, 9), channel="web"),
    ]
    params = {"as_of": 10, "windows": (3, 6), "h": 4}
    r = run(
        events, segments=["tier", "enrollment_channel", "home_store", "channel", "store_id", "tier"], **params
    )
    member_keys = {(name, None) for name in MEMBER_KPIS_NON_WINDOWED}
    member_keys |= {(name, w) for name in MEMBER_KPIS_WINDOWED for w in ("3b", "6b")}
    member_keys |= {(name, "3b") for name in CHURN_WINDOWED}
    order_keys = {(name, w) for name in ORDER_KPIS for w in ("3b", "6b")}
    expected = {
        (name, w, ((dim, v),))
        for dim, v in (("tier", "gold"), ("enrollment_channel", "web"), ("home_store", "s1"))
        for name, w in member_keys
    }
    expected |= {
        (name, w, ((dim, v),))
        for dim, v in (("channel", "app"), ("channel", "web"), ("store_id", "s1"), ("store_id", "unknown"))
        for name, w in order_keys
    }
    plain = run(events, **params)
    assert set(r) - set(plain) == expected
    assert {key: r[key] for key in plain} == plain  # the unsegmented records are untouched
    # k1 is every member value's only member, so its KPIs equal the unsegmented ones
    for dim, v in (("tier", "gold"), ("enrollment_channel", "web"), ("home_store", "s1")):
        assert {(name, w): r[(name, w, ((dim, v),))] for name, w in member_keys} == {
            (name, w): plain[(name, w, ())] for name, w in member_keys
        }
    assert run(events, segments=[], **params) == plain
    with pytest.raises((ValueError, ConfigError), match="region"):  # oracle, core (Settings)
        run(events, segments=["region"], **params)


def test_cohort_retention(run):
    # K = 2024-03-10 12h, month(K) = 2024-03; cohorts = 5 -> months 2023-11 .. 2024-03;
    # cohort_ages = 3 -> ages 0, 1, 2 while cohort + age <= 2024-03.
    #   g   enrolled 2023-10-01: a cohort older than the last 5 -> no records
    #   e   enrolled 2023-12-15, bought 2024-01-10 (age 1) and 2024-03-01 (age 3: beyond cohort_ages)
    #   a   enrolled 2024-01-05, bought 2024-01-20 (age 0), redeemed 2024-03-02 (age 2)
    #   b   enrolled 2024-01-31 23h (Jan), bought 2024-02-01 00h (Feb: age 1)
    #   c   bought 2024-01-25 (before enrolling, an earlier month: no age), bought 2024-02-03
    #       (before enrolling, but in the cohort month: age 0), enrolled 2024-02-10
    #   f   enrolled 2024-02-20, only a survey on 2024-03-01 (not activity)
    #   ih  implicit: bought 2024-02-14 (enrolled_at: cohort Feb, age 0) and 2024-03-01 (age 1)
    #   d   enrolled 2024-03-05, bought 2024-04-02: after K, counts as K -> March, age 0
    #   i   enrolled 2024-04-01: after K, counts as K -> cohort 2024-03, no activity
    #   a guest purchase in Feb belongs to no cohort; nobody enrolled in 2023-11 -> no records
    events = [
        enrollment("e-cg", "g", hour("2023-10-01T00")),
        purchase("p-cg", "g", hour("2024-03-05T00")),
        enrollment("e-ce", "e", hour("2023-12-15T00")),
        purchase("p-ce1", "e", hour("2024-01-10T00")),
        purchase("p-ce2", "e", hour("2024-03-01T00")),
        enrollment("e-ca", "a", hour("2024-01-05T00")),
        purchase("p-ca", "a", hour("2024-01-20T00"), points=5),
        redemption("r-ca", "a", hour("2024-03-02T00"), 5),
        enrollment("e-cb", "b", hour("2024-01-31T23")),
        purchase("p-cb", "b", hour("2024-02-01T00")),
        purchase("p-cc1", "c", hour("2024-01-25T00")),
        purchase("p-cc2", "c", hour("2024-02-03T00")),
        enrollment("e-cc", "c", hour("2024-02-10T00")),
        enrollment("e-cf", "f", hour("2024-02-20T00")),
        survey("s-cf", "f", hour("2024-03-01T00"), nps=9),
        purchase("p-cih1", "ih", hour("2024-02-14T00")),
        purchase("p-cih2", "ih", hour("2024-03-01T00")),
        enrollment("e-cd", "d", hour("2024-03-05T00")),
        purchase("p-cd", "d", hour("2024-04-02T00")),
        enrollment("e-ci", "i", hour("2024-04-01T00")),
        purchase("g-c", None, hour("2024-02-15T00")),
    ]
    r = run(events, as_of=hour("2024-03-10T12"), windows=(3,), cohorts=5, cohort_ages=3)
    cohort_records = {key: value for key, value in r.items() if key[0].startswith("cohort")}

    def size(cohort, n):
        return ("cohort_size", None, (("cohort", cohort),)), (n, None, None)

    def retention(cohort, age, retained, n):
        return ("cohort_retention", None, (("age", str(age)), ("cohort", cohort))), (
            retained / n,
            retained,
            n,
        )

    assert cohort_records == dict(
        [
            size("2023-12", 1),  # e
            retention("2023-12", 0, 0, 1),
            retention("2023-12", 1, 1, 1),  # e in Jan
            retention("2023-12", 2, 0, 1),
            size("2024-01", 2),  # a, b
            retention("2024-01", 0, 1, 2),  # a
            retention("2024-01", 1, 1, 2),  # b
            retention("2024-01", 2, 1, 2),  # a's redemption
            size("2024-02", 3),  # c, f, ih
            retention("2024-02", 0, 2, 3),  # c, ih
            retention("2024-02", 1, 1, 3),  # ih; age 2 would be April
            size("2024-03", 2),  # d, i
            retention("2024-03", 0, 1, 2),  # d's future purchase
        ]
    )
    assert kpi(r, "members") == (9, None, None)  # g to i, all counted
    assert not any(key[0].startswith("cohort") for key in run(events, as_of=hour("2024-03-10T12")))


def test_cohort_defaults_are_the_last_12_months_and_12_ages(run):
    # K = 2024-03-10 12h: the last 12 cohorts are 2023-04 .. 2024-03.
    # o1 enrolled 2023-03-31 23h: the 13th month back -> no records.
    # o2 enrolled 2023-04-01 00h, bought 2023-04-02 (age 0) and 2024-03-10 (age 11 = month(K)).
    events = [
        enrollment("e-do1", "o1", hour("2023-03-31T23")),
        enrollment("e-do2", "o2", hour("2023-04-01T00")),
        purchase("p-do2a", "o2", hour("2023-04-02T00")),
        purchase("p-do2b", "o2", hour("2024-03-10T00")),
    ]
    r = brute_force_kpis(
        events, bucket_ms=B, windows=[3], churn_horizon=4, settle=4, as_of=hour("2024-03-10T12")
    )
    cohort_records = {key: value for key, value in r.items() if key[0].startswith("cohort")}
    expected = {("cohort_size", None, (("cohort", "2023-04"),)): (1, None, None)}
    for age in range(12):
        retained = 1 if age in (0, 11) else 0
        expected[("cohort_retention", None, (("age", str(age)), ("cohort", "2023-04")))] = (
            float(retained),
            retained,
            1,
        )
    assert cohort_records == expected
