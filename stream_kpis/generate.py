"""Seeded synthetic loyalty-program event stream (pure Python + orjson, no Kafka).

Used by the demo, the tests and the benchmarks. :func:`generate_events` yields one JSON Lines
line (bytes, no newline) per event, each object carrying a ``"type"`` field (``purchase``,
``redemption``, ``enrollment``, ``survey``) plus the SPEC section 1 fields.

The stream is a discrete-event simulation (a calendar queue of hourly slots), so it comes out
in timestamp order at a small, constant cost per event, with the program's realism built in:

- members enroll over the whole period (a launch wave first) through ``web``, ``app``,
  ``store``, ``partner`` and ``referral``, with tiers ``bronze`` .. ``platinum``; a purchase
  that lifts lifetime spend over a threshold carries the new tier;
- some members never send an enrollment event: their first purchase creates them;
- buying behaviour varies: heavy, regular and light buyers, one-and-done buyers, members who
  never buy, and churners who stop buying after a while;
- activity follows a daily curve, busier weekends and a gentle trend (one shared intensity);
- guests (``member_id`` null) buy smaller baskets than members; purchases carry points and
  usually a ``margin`` (sometimes negative);
- redemptions mostly spend points already earned, occasionally more;
- surveys (``nps`` and/or ``csat``) from members and guests, some with comments in English,
  Portuguese, Spanish, Arabic and Persian that mention friction or motivation words.

Delivery noise: duplicates are byte-identical repeats emitted soon after the original, late
events are held back (up to ``max_late_ms``) and emitted after later events, and malformed lines
(broken JSON, missing fields, wrong types, negative amounts, ...) are extra lines, one defect
each, that never stand in for a real event. Timestamps are epoch ms, some RFC 3339 strings with
offsets. Everything is a pure function of :class:`GeneratorConfig` (seed included).
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from heapq import heapify, heappop, heappush
from os import PathLike
from statistics import NormalDist
from typing import IO

import orjson

__all__ = [
    "GeneratorConfig",
    "GenerateSummary",
    "generate_events",
    "write_jsonl",
    "estimate_event_count",
    "MALFORMED_REASONS",
]

_SECOND_MS = 1000
_HOUR_MS = 3_600_000
_DAY_MS = 86_400_000
_DEFAULT_START_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z


def _pool(*weighted: tuple[object, int]) -> tuple:
    """Each value repeated weight times: ``pool[int(random() * len(pool))]`` draws one."""
    return tuple(value for value, weight in weighted for _ in range(weight))


_TIERS = ("bronze", "silver", "gold", "platinum")
_TIER_POOL = _pool((0, 70), (1, 20), (2, 8), (3, 2))  # tier at enrollment (index into _TIERS)
_TIER_POINT_MULTIPLIER = (1.0, 1.25, 1.5, 2.0)
#: Lifetime spend (currency units) at which a member moves up to tier i.
_TIER_SPEND = (0.0, 400.0, 1200.0, 3000.0)
_ENROLL_CHANNELS = _pool(("web", 30), ("app", 30), ("store", 25), ("partner", 8),
                         ("referral", 7))
_MEMBER_PURCHASE_CHANNELS = _pool(("store", 6), ("web", 2), ("app", 2))
_GUEST_PURCHASE_CHANNELS = _pool(("store", 8), ("web", 2))
_SURVEY_CHANNELS = _pool(("email", 2), ("app", 1), ("web", 1), ("sms", 1))
_STORES = tuple(f"store-{i:03d}" for i in range(1, 41))
#: (reward_id, points, value in currency units)
_REWARDS = (
    ("rw-coffee", 150, 1.5),
    ("rw-5off", 500, 5.0),
    ("rw-10off", 1000, 10.0),
    ("rw-tote-bag", 2000, 20.0),
    ("rw-25off", 2500, 25.0),
)
_CHEAPEST_REWARD = min(points for _, points, _ in _REWARDS)
#: Offsets used for RFC 3339 timestamps: (suffix, minutes east of UTC).
_OFFSETS = (
    ("Z", 0), ("+00:00", 0), ("+01:00", 60), ("+02:00", 120), ("-03:00", -180),
    ("-05:00", -300), ("+03:30", 210), ("+05:30", 330), ("+09:00", 540), ("-09:30", -570),
)
#: Relative activity by hour of day (UTC) and by weekday (Monday first).
_HOUR_PROFILE = (
    0.15, 0.1, 0.08, 0.08, 0.1, 0.2, 0.4, 0.7, 1.0, 1.2, 1.3, 1.4,
    1.5, 1.4, 1.3, 1.3, 1.4, 1.6, 1.7, 1.6, 1.3, 0.9, 0.5, 0.3,
)
_WEEKDAY_PROFILE = (0.9, 0.9, 0.95, 1.0, 1.1, 1.35, 1.3)

# Buying segments: heavy, regular and light repeat buyers (purchase-rate multipliers applied to
# GeneratorConfig.purchase_rate), one-and-done buyers and members who never buy.
_HEAVY, _REGULAR, _LIGHT, _ONCE, _NEVER = range(5)
_SEGMENT_RATE = (3.0, 1.0, 0.3, 0.0, 0.0)
_SEGMENT_POOL = _pool((_HEAVY, 15), (_REGULAR, 40), (_LIGHT, 25), (_ONCE, 15), (_NEVER, 5))
_ONCE_MEAN_DELAY_DAYS = 10.0   # one-and-done buyers buy this long after joining, on average
_LAUNCH_SHARE = 0.35           # members who join in the launch wave (the first _LAUNCH_DAYS)
_LAUNCH_DAYS = 14
_REDEEMER_SHARE = 0.65         # members who redeem when they can; the rest almost never do
_GUEST_BASKET_FACTOR = 0.72    # guests' baskets relative to members'
#: Members' basket-size factors (lognormal, sigma 0.3, by 9 quantiles); each member gets one.
_BASKET_FACTORS = tuple(math.exp(0.3 * NormalDist().inv_cdf((i + 0.5) / 9)) for i in range(9))
_TIER_ON_PURCHASE = 0.2        # share of member purchases that carry the (unchanged) tier
_GUEST_WITHOUT_MEMBER_KEY = 0.1  # guest purchases that omit member_id instead of sending null
_POOL_SIZE = 1 << 12  # entries per basket pool
# For estimate_event_count: points of a mean member purchase at points_per_unit 1 (basket x tier
# bonus), and earned points per redemption, measured at the default redemption settings.
_MEAN_POINTS_PER_PURCHASE = 49.0 * 1.15
_EARNED_POINTS_PER_REDEMPTION = 550.0

# Event kinds, in the order they are applied when timestamps tie (purchases before redemptions).
_PURCHASE, _GUEST, _REDEEM, _SURVEY, _ENROLL = range(5)
#: A scheduled event: (ts, kind, member index or -1, extra: the reward index of a redemption).
_Entry = tuple[int, int, int, int]

#: Malformed-line reasons (the dead-letter reasons a validator following SPEC section 1 gives),
#: with their relative frequency.
MALFORMED_REASONS = {
    "malformed_json": 35,
    "not_an_object": 5,
    "missing_field": 20,
    "bad_type": 20,
    "bad_value": 8,
    "bad_timestamp": 4,
    "negative_amount": 8,
}

# Survey comments by language and sentiment. Lexicon terms (SPEC 4: feedback_mentions) appear
# as whole words: friction "slow", "frustrating", "lento", "frustrante", "بطيء", "کند";
# motivation "rewards", "discount", "recompensa", "descuento", "مكافأة", "پاداش".
_COMMENTS: dict[str, dict[str, tuple[str, ...]]] = {
    "en": {
        "negative": (
            "Checkout was slow and the app kept crashing.",
            "Really frustrating to find my points balance.",
            "Slow queue at the till, frustrating experience.",
            "My coupon did not work at the register.",
            "The app is SLOW after the last update.",
        ),
        "neutral": (
            "It was okay.",
            "Prices are fine, nothing special.",
            "Friendly staff but the website is slow sometimes.",
        ),
        "positive": (
            "Love the rewards, the discount on coffee was great!",
            "Great rewards program, easy to use.",
            "The member discount keeps me coming back.",
            "Fast delivery and friendly staff.",
        ),
    },
    "pt": {
        "negative": (
            "O aplicativo é muito lento.",
            "Experiência frustrante no caixa.",
            "Atendimento lento e frustrante.",
            "Não consegui usar os meus pontos.",
        ),
        "neutral": ("Tudo normal.", "Preços razoáveis, nada de especial."),
        "positive": (
            "Adoro a recompensa por cada compra.",
            "Ótimo programa, a recompensa vale a pena.",
            "Bom atendimento e entrega rápida.",
        ),
    },
    "es": {
        "negative": (
            "El servicio fue lento.",
            "Muy frustrante esperar tanto en la caja.",
            "La web va lento y es frustrante.",
        ),
        "neutral": ("Todo bien.", "Normal, nada especial."),
        "positive": (
            "Me encanta el descuento para socios.",
            "La recompensa llegó rápido, excelente.",
            "Buen descuento y buena atención.",
        ),
    },
    "ar": {
        "negative": ("التطبيق بطيء جدا", "الدفع بطيء والانتظار طويل", "لم أستطع استخدام النقاط"),
        "neutral": ("الخدمة جيدة", "لا بأس"),
        "positive": ("حصلت على مكافأة رائعة", "برنامج ممتاز وكل شراء فيه مكافأة"),
    },
    "fa": {
        "negative": ("اپلیکیشن خیلی کند است", "پرداخت کند بود", "امتیازهایم را نتوانستم استفاده کنم"),
        "neutral": ("خوب بود", "معمولی"),
        "positive": ("پاداش خرید عالی است", "پاداش خوبی گرفتم"),
    },
}
_COMMENT_LANGUAGES = _pool(("en", 4), ("pt", 2), ("es", 2), ("ar", 1), ("fa", 1))


@dataclass(frozen=True)
class GeneratorConfig:
    """What to generate. Every field has a realistic default; the output depends only on these.

    Fields ending in ``_rate`` or ``_share`` are probabilities in [0, 1], except
    ``purchase_rate`` (purchases per day).
    """

    members: int = 1000
    """Members in the program; every one of them appears in at least one valid event."""
    days: int = 90
    """Length of the simulated period; all valid event timestamps fall inside it."""
    seed: int = 42
    """Same seed and config, same bytes."""
    start_ms: int = _DEFAULT_START_MS
    """Start of the period, epoch ms (default 2024-01-01T00:00:00Z, a Monday)."""
    purchase_rate: float = 0.1
    """Purchases per day of a regular member while active (heavy x3, light x0.3), modulated by
    the daily/weekly intensity curve."""
    guest_share: float = 0.3
    """Expected share of purchases made by guests (member_id null)."""
    implicit_share: float = 0.1
    """Share of members without an enrollment event: their first purchase creates them."""
    churn_share: float = 0.3
    """Share of repeat-buying members who stop buying (and redeeming) at some point."""
    churn_after_days: float = 30.0
    """Mean time from joining to stopping, for churners (exponential)."""
    points_per_unit: float = 1.0
    """Points a bronze member earns per currency unit (silver x1.25, gold x1.5, platinum x2)."""
    redeem_propensity: float = 0.3
    """Chance that a redeeming member redeems after a purchase that leaves enough points."""
    over_redemption_rate: float = 0.02
    """Share of redemptions that spend more points than the member has left."""
    margin_share: float = 0.8
    """Share of purchases that carry a ``margin`` (gross margin, sometimes negative)."""
    survey_rate: float = 0.05
    """Chance that a purchase (member or guest) is followed by a survey response."""
    comment_rate: float = 0.5
    """Share of survey responses with a free-text comment."""
    rfc3339_rate: float = 0.05
    """Share of events whose ``ts`` is an RFC 3339 string with an offset instead of epoch ms."""
    trend_per_year: float = 0.2
    """Linear growth of activity intensity per year (0.2 = +20%/year; negative shrinks)."""
    duplicate_rate: float = 0.005
    """Share of events emitted twice (byte-identical, within ``duplicate_window_ms``)."""
    duplicate_window_ms: int = 10 * 60 * 1000
    """Duplicates follow their original within this much stream time."""
    late_rate: float = 0.02
    """Share of events held back and emitted after later events."""
    max_late_ms: int = 3 * _DAY_MS
    """Largest delay of a late event (delays are 1 min + exponential with mean max_late_ms / 12)."""
    malformed_rate: float = 0.001
    """Extra broken lines per valid event (see MALFORMED_REASONS for the kinds)."""

    def __post_init__(self) -> None:
        if self.members < 1:
            raise ValueError(f"members must be >= 1, got {self.members}")
        if self.days < 1:
            raise ValueError(f"days must be >= 1, got {self.days}")
        if self.purchase_rate <= 0:
            raise ValueError(f"purchase_rate must be > 0, got {self.purchase_rate}")
        if self.points_per_unit < 0:
            raise ValueError(f"points_per_unit must be >= 0, got {self.points_per_unit}")
        if self.churn_after_days <= 0:
            raise ValueError(f"churn_after_days must be > 0, got {self.churn_after_days}")
        if self.duplicate_window_ms < 0 or self.max_late_ms < 2 * 60_000:
            raise ValueError("duplicate_window_ms must be >= 0 and max_late_ms >= 120000 (2 min)")
        if not 0 <= self.guest_share < 1:
            raise ValueError(f"guest_share must be in [0, 1), got {self.guest_share}")
        if self.trend_per_year * self.days / 365 <= -0.9:
            raise ValueError("trend_per_year is so negative that activity would vanish")
        for name in ("implicit_share", "churn_share", "redeem_propensity", "over_redemption_rate",
                     "margin_share", "survey_rate", "comment_rate", "rfc3339_rate",
                     "duplicate_rate", "late_rate", "malformed_rate"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        if self.duplicate_rate + self.late_rate + self.malformed_rate > 1:
            raise ValueError("duplicate_rate + late_rate + malformed_rate must not exceed 1")

    @property
    def end_ms(self) -> int:
        """End of the period (exclusive)."""
        return self.start_ms + self.days * _DAY_MS


@dataclass(frozen=True)
class GenerateSummary:
    """What a generation run produced (counts of lines as written)."""

    lines: int
    """All lines: valid events + duplicates + malformed."""
    events: int
    """Distinct valid events (duplicates and malformed lines excluded)."""
    by_type: dict[str, int]
    """Distinct valid events per type."""
    guest_purchases: int
    duplicates: int
    """Extra byte-identical copies of earlier lines."""
    malformed: int
    malformed_by_reason: dict[str, int]
    late: int
    """Distinct valid events emitted after a valid event with a larger ts."""
    members: int
    """Distinct members appearing in valid events (== config.members)."""
    points_earned: int
    """Sum of ``points`` over member purchases."""
    points_redeemed: int
    first_ts: int | None
    """Smallest and largest ts (epoch ms) of the valid events."""
    last_ts: int | None

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


class _Timeline:
    """Activity intensity over the period, as cumulative "effective days" per hour.

    Event processes run in effective time L (mean intensity 1 per day), so a Poisson process
    with rate r per effective day follows the daily and weekly curve and the trend exactly,
    without rejection sampling; :meth:`ts_at` maps L back to epoch ms.
    """

    def __init__(self, config: GeneratorConfig) -> None:
        hours = config.days * 24
        first_hour = config.start_ms // _HOUR_MS
        weights = []
        for h in range(hours):
            hour = first_hour + h
            weekday = (hour // 24 + 3) % 7  # 1970-01-01 was a Thursday
            trend = 1.0 + config.trend_per_year * (h / 24) / 365
            weights.append(_HOUR_PROFILE[hour % 24] * _WEEKDAY_PROFILE[weekday] * trend)
        scale = hours / sum(weights)  # normalise: mean weight 1
        self.start_ms = config.start_ms
        self.hours = hours
        self.cumulative = [0.0] * (hours + 1)  # effective days before hour h
        self.ms_per_unit = [0.0] * hours  # epoch ms per effective day within hour h
        for h, weight in enumerate(weights):
            weight *= scale
            self.cumulative[h + 1] = self.cumulative[h] + weight / 24
            self.ms_per_unit[h] = _DAY_MS / weight
        self.total = self.cumulative[hours]

    def at(self, ts: int) -> float:
        """Effective time of epoch ms ``ts`` (inside the period)."""
        offset = ts - self.start_ms
        h = min(offset // _HOUR_MS, self.hours - 1)
        return self.cumulative[h] + (offset - h * _HOUR_MS) / self.ms_per_unit[h]

    def ts_at(self, effective: float) -> int | None:
        """Epoch ms of effective time ``effective``; None when it is past the period."""
        h = bisect_right(self.cumulative, effective) - 1
        if h >= self.hours:
            return None
        return (self.start_ms + h * _HOUR_MS
                + int((effective - self.cumulative[h]) * self.ms_per_unit[h]))


class _Members:
    """Per-member profiles (drawn from their own seeded stream) and mutable simulation state."""

    def __init__(self, config: GeneratorConfig, timeline: _Timeline) -> None:
        rng = random.Random(f"stream-kpis:{config.seed}:members")
        n = config.members
        width = max(6, len(str(n - 1)))
        self.ids = [f"m-{i:0{width}d}" for i in range(n)]
        launch_end = timeline.at(
            config.start_ms + min(_LAUNCH_DAYS, config.days) * _DAY_MS - 1)
        self.joined: list[int] = []
        self.joined_effective: list[float] = []
        self.enrolls: list[bool] = []
        self.segment: list[int] = []
        self.rate: list[float] = []
        self.churn_at: list[int] = []
        self.tier: list[int] = []
        self.channel: list[str] = []
        self.basket: list[int] = []  # index into _BASKET_FACTORS
        self.home_store: list[str] = []
        self.propensity: list[float] = []
        self.mood: list[float] = []
        rand, gauss = rng.random, rng.gauss
        for _ in range(n):
            upper = launch_end if rand() < _LAUNCH_SHARE else timeline.total
            joined = timeline.ts_at(rand() * upper)
            joined = (joined if joined is not None else config.end_ms - 1)
            joined = max(joined - joined % _SECOND_MS, config.start_ms)  # stamped to the second
            segment = _SEGMENT_POOL[int(rand() * len(_SEGMENT_POOL))]
            enrolls = rand() >= config.implicit_share
            if segment == _NEVER and not enrolls:
                segment = _ONCE  # a member with no enrollment is created by a purchase
            churner = segment <= _LIGHT and rand() < config.churn_share
            churn_at = (joined - int(math.log(1.0 - rand()) * config.churn_after_days * _DAY_MS)
                        if churner else config.end_ms)
            self.joined.append(joined)
            self.joined_effective.append(timeline.at(joined))
            self.enrolls.append(enrolls)
            self.segment.append(segment)
            self.rate.append(config.purchase_rate * _SEGMENT_RATE[segment]
                             * math.exp(gauss(0.0, 0.4)))
            self.churn_at.append(max(churn_at, joined + 1))
            self.tier.append(_TIER_POOL[int(rand() * len(_TIER_POOL))] if enrolls else 0)
            self.channel.append(_ENROLL_CHANNELS[int(rand() * len(_ENROLL_CHANNELS))])
            self.basket.append(int(rand() * len(_BASKET_FACTORS)))
            self.home_store.append(_STORES[int(rand() * len(_STORES))])
            self.propensity.append(config.redeem_propensity if rand() < _REDEEMER_SHARE
                                   else config.redeem_propensity * 0.05)
            self.mood.append(gauss(0.0, 1.0) - (1.5 if churner else 0.0))
        self.spend = [0.0] * n
        self.balance = [0] * n

    def expected_purchases(self, timeline: _Timeline) -> float:
        """Expected number of member purchases over the period."""
        total = 0.0
        for m, segment in enumerate(self.segment):
            remaining = timeline.total - self.joined_effective[m]
            if segment == _ONCE:
                total += 1.0 if not self.enrolls[m] else (
                    1.0 - math.exp(-remaining / _ONCE_MEAN_DELAY_DAYS))
            elif segment != _NEVER:
                stop = min(self.churn_at[m], timeline.start_ms + timeline.hours * _HOUR_MS - 1)
                active = max(0.0, timeline.at(stop) - self.joined_effective[m])
                total += self.rate[m] * active + (0.0 if self.enrolls[m] else 1.0)
        return total


_EPOCH_NAIVE = datetime(1970, 1, 1)


def _format_rfc3339(ts: int, suffix: str, offset_minutes: int) -> str:
    """``ts`` as an RFC 3339 string in the given offset; milliseconds only when non-zero."""
    local = _EPOCH_NAIVE + timedelta(milliseconds=ts + offset_minutes * 60_000)
    millis = ts % _SECOND_MS
    text = local.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}.{millis:03d}{suffix}" if millis else text + suffix


class _Simulation:
    """One generation run: iterate :meth:`lines` once, then read :meth:`summary`."""

    def __init__(self, config: GeneratorConfig) -> None:
        self.config = config
        self.timeline = _Timeline(config)
        self.members = _Members(config, self.timeline)
        expected_member_purchases = self.members.expected_purchases(self.timeline)
        guest_ratio = config.guest_share / (1.0 - config.guest_share)
        #: Guest purchases per effective day.
        self.guest_rate = guest_ratio * expected_member_purchases / self.timeline.total
        self.counts = [0] * 5  # by event kind
        self.duplicates = 0
        self.malformed: dict[str, int] = dict.fromkeys(MALFORMED_REASONS, 0)
        self.late = 0
        self.points_earned = 0
        self.points_redeemed = 0
        self.first_ts: int | None = None
        self.last_ts: int | None = None
        self._started = False

    # -- helpers off the hot path ------------------------------------------------------------

    @staticmethod
    def _rfc3339(rng: random.Random, ts: int) -> str:
        suffix, minutes = _OFFSETS[rng.randrange(len(_OFFSETS))]
        return _format_rfc3339(ts, suffix, minutes)

    def _survey(self, rng: random.Random, event_id: str, ts: int | str,
                member: int) -> dict[str, object]:
        """A survey response; member -1 is a non-member respondent."""
        members = self.members
        latent = 7.9 + (0.4 + 0.8 * members.mood[member] if member >= 0 else -0.4)
        latent += rng.gauss(0.0, 1.8)
        event: dict[str, object] = {
            "type": "survey",
            "event_id": event_id,
            "member_id": members.ids[member] if member >= 0 else None,
            "ts": ts,
        }
        kind = rng.random()
        if kind < 0.85:  # 60% nps only, 25% both, 15% csat only
            event["nps"] = min(10, max(0, round(latent)))
        if kind >= 0.6:
            event["csat"] = min(5, max(1, round(1.0 + 0.4 * latent + rng.gauss(0.0, 0.5))))
        if rng.random() < self.config.comment_rate:
            sentiment = ("positive" if latent >= 8.5 else
                         "negative" if latent <= 6.5 else "neutral")
            language = _COMMENT_LANGUAGES[rng.randrange(len(_COMMENT_LANGUAGES))]
            choices = _COMMENTS[language][sentiment]
            event["comment"] = choices[rng.randrange(len(choices))]
        event["channel"] = _SURVEY_CHANNELS[rng.randrange(len(_SURVEY_CHANNELS))]
        return event

    def _malformed(self, rng: random.Random, ts: int) -> tuple[str, bytes]:
        """One broken line (exactly one defect) and the reason a SPEC validator gives for it.

        Its event ids ("p-x000001", ...) never collide with those of valid events.
        """
        reason = rng.choices(tuple(MALFORMED_REASONS), tuple(MALFORMED_REASONS.values()))[0]
        n = sum(self.malformed.values()) + 1
        member = self.members.ids[rng.randrange(len(self.members.ids))]
        amount = round(rng.uniform(1.0, 120.0), 2)
        purchase = {"type": "purchase", "event_id": f"p-x{n:06d}", "member_id": member,
                    "ts": ts, "amount": amount, "points": int(amount), "channel": "store"}
        redemption = {"type": "redemption", "event_id": f"r-x{n:06d}", "member_id": member,
                      "ts": ts, "points": 500, "reward_id": "rw-5off", "value": 5.0}
        survey = {"type": "survey", "event_id": f"s-x{n:06d}", "member_id": None,
                  "ts": ts, "nps": 3, "comment": "Checkout was slow."}
        enrollment = {"type": "enrollment", "event_id": f"e-x{n:06d}", "member_id": member,
                      "ts": ts, "channel": "web", "tier": "bronze"}
        pick = rng.randrange(4)
        if reason == "malformed_json":
            if pick == 0:  # cut short
                line = orjson.dumps(purchase)
                return reason, line[: rng.randrange(1, len(line) - 1)]
            if pick == 1:  # trailing garbage
                return reason, orjson.dumps(redemption) + b"}"
            if pick == 2:  # not UTF-8
                return reason, orjson.dumps(survey).replace(b"slow", b"sl\xff\xfew")
            return reason, repr(enrollment).encode()  # a Python literal: single quotes
        if reason == "not_an_object":
            return reason, orjson.dumps([purchase] if pick < 2 else "purchase")
        if reason == "missing_field":
            target, name = ((purchase, "amount"), (redemption, "member_id"),
                            (survey, "nps"), (enrollment, ("ts", "event_id")[n % 2]))[pick]
            del target[name]
        elif reason == "bad_type":
            target, name, value = ((purchase, "amount", str(amount)),
                                   (redemption, "points", "500"),
                                   (enrollment, "member_id", 12345),
                                   (survey, "ts", [ts]))[pick]
            target[name] = value
        elif reason == "bad_value":
            target, name, value = ((survey, "nps", 11), (redemption, "points", 0),
                                   (survey, "csat", 0), (purchase, "event_id", ""))[pick]
            target[name] = value
        elif reason == "bad_timestamp":
            target = (purchase, redemption, survey, enrollment)[pick]
            target["ts"] = ("yesterday", "2024-02-30T10:00:00Z", "2024-01-05 10:00:00", -5)[pick]
        else:  # negative_amount
            target = purchase
            target["amount"] = -amount
        return reason, orjson.dumps(target)

    def _first_events(self, rng: random.Random) -> list[_Entry]:
        """Every member's first event(s): enrollment or creating purchase, first repeat buy."""
        members, timeline = self.members, self.timeline
        entries = []
        for m in range(len(members.ids)):
            joined = members.joined[m]
            if members.enrolls[m]:
                entries.append((joined, _ENROLL, m, 0))
            else:
                entries.append((joined, _PURCHASE, m, 0))  # the purchase that creates the member
            segment = members.segment[m]
            if segment == _NEVER or (segment == _ONCE and not members.enrolls[m]):
                continue
            if segment == _ONCE:
                delay = rng.expovariate(1.0 / _ONCE_MEAN_DELAY_DAYS)
                first = timeline.ts_at(members.joined_effective[m] + delay)
            else:
                # from here on joined_effective holds the effective time of the latest purchase
                members.joined_effective[m] += rng.expovariate(members.rate[m])
                first = timeline.ts_at(members.joined_effective[m])
            if first is not None and first < members.churn_at[m]:
                entries.append((first, _PURCHASE, m, 0))
        return entries

    def _basket_pools(self) -> list[list[tuple[float, float | None]]]:
        """(amount, margin or None) pools, one per member basket factor and one for guests.

        Drawing a pre-rounded pair costs one random() in the hot loop.
        """
        rng = random.Random(f"stream-kpis:{self.config.seed}:baskets")
        raw = [(math.exp(rng.gauss(math.log(38.0), 0.65)), rng.gauss(0.24, 0.12),
                rng.random() < self.config.margin_share) for _ in range(_POOL_SIZE)]
        pools = []
        for factor in (*_BASKET_FACTORS, _GUEST_BASKET_FACTOR):
            pool = []
            for amount, ratio, has_margin in raw:
                amount = round(amount * factor, 2)
                pool.append((amount, round(amount * ratio, 2) if has_margin else None))
            pools.append(pool)
        return pools

    def _plan_redemption(self, rng: random.Random, t: int, m: int,
                         points: int) -> _Entry | None:
        """Maybe a redemption after member m's purchase at t that left ``points`` unspent."""
        if rng.random() < self.config.over_redemption_rate:
            options = [i for i, (_, cost, _) in enumerate(_REWARDS) if cost > points]
        else:
            options = [i for i, (_, cost, _) in enumerate(_REWARDS) if cost <= points]
        if not options:
            return None
        choice = options[rng.randrange(len(options))]
        due = t + _SECOND_MS + int(rng.expovariate(1.0) * _DAY_MS)
        if due >= self.config.end_ms:
            return None
        self.members.balance[m] = points - _REWARDS[choice][1]
        return (due, _REDEEM, m, choice)

    # -- the simulation ----------------------------------------------------------------------

    def lines(self) -> Iterator[bytes]:
        """The event stream, one JSON line (bytes, no newline) at a time.

        Future events wait in a calendar queue: one list per hour of the period, turned into a
        small heap when its hour comes (far cheaper than one heap of every member's next event).
        The hot loop keeps everything in locals: it runs once per event.
        """
        if self._started:
            raise RuntimeError("a _Simulation runs once; make a new one")
        self._started = True
        config = self.config
        rng = random.Random(f"stream-kpis:{config.seed}:events")
        rand = rng.random
        log = math.log
        dumps = orjson.dumps
        timeline, members = self.timeline, self.members
        cumulative, ms_per_unit, hours = timeline.cumulative, timeline.ms_per_unit, timeline.hours
        start_ms = config.start_ms
        member_ids, rate, churn_at = members.ids, members.rate, members.churn_at
        last_buy, segment, tier, spend = (members.joined_effective, members.segment,
                                          members.tier, members.spend)
        balance, basket, propensity = members.balance, members.basket, members.propensity
        home_store, channel = members.home_store, members.channel
        rfc3339, rfc3339_rate = self._rfc3339, config.rfc3339_rate
        ppu, survey_rate = config.points_per_unit, config.survey_rate
        plan_redemption, make_survey = self._plan_redemption, self._survey
        counts = self.counts
        late_cut = config.late_rate
        dup_cut = late_cut + config.duplicate_rate
        bad_cut = dup_cut + config.malformed_rate
        late_mean_ms, late_cap = config.max_late_ms / 12, config.max_late_ms
        dup_window = config.duplicate_window_ms
        n_member_channels = len(_MEMBER_PURCHASE_CHANNELS)
        n_guest_channels = len(_GUEST_PURCHASE_CHANNELS)

        baskets = self._basket_pools()
        guest_baskets = baskets[-1]

        calendar: list[list[_Entry]] = [[] for _ in range(hours)]
        first_events = self._first_events(rng)
        for entry in first_events:
            calendar[(entry[0] - start_ms) // _HOUR_MS].append(entry)
        guest_rate = self.guest_rate
        guest_at = rng.expovariate(guest_rate) if guest_rate > 0 else timeline.total
        guest_ts = timeline.ts_at(guest_at)
        self.first_ts = min(entry[0] for entry in first_events)
        if guest_ts is not None:
            self.first_ts = min(self.first_ts, guest_ts)
        n_purchase = n_redeem = n_enroll = n_survey = 0
        earned = redeemed = 0
        delayed: list[tuple[int, int, bytes, int]] = []  # (release, seq, line, ts or -1 = dup)
        seq = 0
        shown = -1  # the largest ts of a valid event emitted so far

        for hour in range(hours):
            due_now = calendar[hour]
            calendar[hour] = []  # release the memory; late pushes for this hour go to due_now
            hour_end = start_ms + (hour + 1) * _HOUR_MS
            while guest_ts is not None and guest_ts < hour_end:  # this hour's guest purchases
                due_now.append((guest_ts, _GUEST, -1, 0))
                guest_at -= log(1.0 - rand()) / guest_rate
                guest_ts = timeline.ts_at(guest_at)
            heapify(due_now)
            while due_now:
                t, kind, m, extra = heappop(due_now)
                if delayed and delayed[0][0] <= t:
                    shown = yield from self._release(delayed, t, shown)
                tv = t if rand() >= rfc3339_rate else rfc3339(rng, t)

                if kind <= _GUEST:
                    n_purchase += 1
                    if kind == _PURCHASE:
                        amount, margin = baskets[basket[m]][int(rand() * _POOL_SIZE)]
                        level = tier[m]
                        points = int(amount * ppu * _TIER_POINT_MULTIPLIER[level])
                        ch = _MEMBER_PURCHASE_CHANNELS[int(rand() * n_member_channels)]
                        event = {"type": "purchase", "event_id": f"p-{n_purchase:08d}",
                                 "member_id": member_ids[m], "ts": tv, "amount": amount,
                                 "points": points, "currency": "EUR", "channel": ch}
                        if ch == "store":
                            event["store_id"] = home_store[m]
                        total = spend[m] = spend[m] + amount
                        if level < 3 and total >= _TIER_SPEND[level + 1]:
                            tier[m] = level = level + 1
                            event["tier"] = _TIERS[level]
                        elif rand() < _TIER_ON_PURCHASE:
                            event["tier"] = _TIERS[level]
                        earned += points
                        points = balance[m] = balance[m] + points
                        if points >= _CHEAPEST_REWARD and rand() < propensity[m]:
                            planned = plan_redemption(rng, t, m, points)
                            if planned is not None:
                                self._push(calendar, due_now, hour, planned)
                        if segment[m] <= _LIGHT:  # a repeat buyer: schedule the next purchase
                            at = last_buy[m] = last_buy[m] - log(1.0 - rand()) / rate[m]
                            h = bisect_right(cumulative, at) - 1
                            if h < hours:
                                nxt = start_ms + h * _HOUR_MS + int((at - cumulative[h])
                                                                    * ms_per_unit[h])
                                if nxt < churn_at[m]:
                                    if h == hour:
                                        heappush(due_now, (nxt, _PURCHASE, m, 0))
                                    else:
                                        calendar[h].append((nxt, _PURCHASE, m, 0))
                    else:
                        amount, margin = guest_baskets[int(rand() * _POOL_SIZE)]
                        ch = _GUEST_PURCHASE_CHANNELS[int(rand() * n_guest_channels)]
                        if rand() < _GUEST_WITHOUT_MEMBER_KEY:
                            event = {"type": "purchase", "event_id": f"p-{n_purchase:08d}",
                                     "ts": tv, "amount": amount, "currency": "EUR", "channel": ch}
                        else:
                            event = {"type": "purchase", "event_id": f"p-{n_purchase:08d}",
                                     "member_id": None, "ts": tv, "amount": amount,
                                     "currency": "EUR", "channel": ch}
                        if ch == "store":
                            event["store_id"] = _STORES[int(rand() * len(_STORES))]
                    if margin is not None:
                        event["margin"] = margin
                    if rand() < survey_rate:
                        self._push(calendar, due_now, hour, (
                            t + _HOUR_MS + int(rand() * 71 * _HOUR_MS), _SURVEY, m, 0))
                elif kind == _SURVEY:
                    n_survey += 1
                    event = make_survey(rng, f"s-{n_survey:08d}", tv, m)
                elif kind == _REDEEM:
                    n_redeem += 1
                    reward_id, points, value = _REWARDS[extra]
                    redeemed += points
                    event = {"type": "redemption", "event_id": f"r-{n_redeem:08d}",
                             "member_id": member_ids[m], "ts": tv, "points": points,
                             "reward_id": reward_id, "value": value,
                             "channel": _MEMBER_PURCHASE_CHANNELS[
                                 int(rand() * n_member_channels)]}
                else:
                    n_enroll += 1
                    event = {"type": "enrollment", "event_id": f"e-{n_enroll:08d}",
                             "member_id": member_ids[m], "ts": tv, "channel": channel[m],
                             "tier": _TIERS[tier[m]]}

                counts[kind] += 1
                line = dumps(event)
                fate = rand()
                if fate >= bad_cut:
                    yield line
                    shown = t
                elif fate < late_cut:  # hold back: emitted once the stream is past ts + delay
                    seq += 1
                    delay = 60_000 - int(log(1.0 - rand()) * late_mean_ms)
                    heappush(delayed, (t + min(delay, late_cap), seq, line, t))
                elif fate < dup_cut:
                    yield line
                    shown = t
                    seq += 1
                    self.duplicates += 1
                    heappush(delayed, (t + int(rand() * dup_window), seq, line, -1))
                else:
                    yield line
                    shown = t
                    reason, broken = self._malformed(rng, t)
                    self.malformed[reason] += 1
                    yield broken
            self.points_earned, self.points_redeemed = earned, redeemed

        shown = yield from self._release(delayed, None, shown)
        self.last_ts = shown if shown >= 0 else None

    def _release(self, delayed: list[tuple[int, int, bytes, int]], until: int | None,
                 shown: int) -> Generator[bytes, None, int]:
        """Emit held-back lines due by ``until`` (all when None), counting late ones.

        ``shown`` is the largest ts emitted so far; the generator returns its new value.
        """
        while delayed and (until is None or delayed[0][0] <= until):
            _, _, line, ts = heappop(delayed)
            if ts >= 0:  # a late event (duplicates carry -1)
                if ts < shown:
                    self.late += 1
                else:
                    shown = ts
            yield line
        return shown

    def _push(self, calendar: list[list[_Entry]], due_now: list[_Entry], hour: int,
              entry: _Entry) -> None:
        """Queue a future event in the calendar (dropped when past the period)."""
        h = (entry[0] - self.config.start_ms) // _HOUR_MS
        if h == hour:
            heappush(due_now, entry)
        elif h < len(calendar):
            calendar[h].append(entry)

    def summary(self) -> GenerateSummary:
        """Counts of the run so far (complete once :meth:`lines` is exhausted)."""
        counts = self.counts
        by_type = {
            "purchase": counts[_PURCHASE] + counts[_GUEST],
            "redemption": counts[_REDEEM],
            "enrollment": counts[_ENROLL],
            "survey": counts[_SURVEY],
        }
        events = sum(counts)
        malformed = sum(self.malformed.values())
        return GenerateSummary(
            lines=events + self.duplicates + malformed,
            events=events,
            by_type=by_type,
            guest_purchases=counts[_GUEST],
            duplicates=self.duplicates,
            malformed=malformed,
            malformed_by_reason={k: v for k, v in self.malformed.items() if v},
            late=self.late,
            members=len(self.members.ids),
            points_earned=self.points_earned,
            points_redeemed=self.points_redeemed,
            first_ts=self.first_ts,
            last_ts=self.last_ts,
        )


def generate_events(config: GeneratorConfig | None = None) -> Iterator[bytes]:
    """The synthetic stream for ``config``: one JSON line (bytes, no trailing newline) per item.

    Memory is O(members + pending events), not O(events). Same config (seed included), same
    bytes.
    """
    return _Simulation(config or GeneratorConfig()).lines()


def write_jsonl(config: GeneratorConfig,
                path_or_file: str | PathLike[str] | IO[bytes]) -> GenerateSummary:
    """Write the stream as JSON Lines (each line ends in ``\\n``) to a path or a binary file.

    Returns what was written. A path is created or truncated; a file object is left open.
    """
    simulation = _Simulation(config)
    if isinstance(path_or_file, str | PathLike):
        with open(path_or_file, "wb") as handle:
            _write_lines(simulation.lines(), handle)
    else:
        _write_lines(simulation.lines(), path_or_file)
    return simulation.summary()


def _write_lines(lines: Iterator[bytes], handle: IO[bytes], batch: int = 4096) -> None:
    chunk: list[bytes] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) == batch:
            chunk.append(b"")
            handle.write(b"\n".join(chunk))
            chunk = []
    if chunk:
        chunk.append(b"")
        handle.write(b"\n".join(chunk))


def estimate_event_count(config: GeneratorConfig) -> int:
    """Roughly how many lines :func:`generate_events` yields for ``config`` (within ~10%).

    Costs O(members + days): it draws the member profiles but simulates no events.
    """
    timeline = _Timeline(config)
    members = _Members(config, timeline)
    member_purchases = members.expected_purchases(timeline)
    purchases = member_purchases / (1.0 - config.guest_share)
    enrollments = sum(members.enrolls)
    earned = member_purchases * _MEAN_POINTS_PER_PURCHASE * config.points_per_unit
    redemptions = earned / _EARNED_POINTS_PER_REDEMPTION * min(1.0, config.redeem_propensity / 0.3)
    surveys = purchases * config.survey_rate
    events = purchases + enrollments + redemptions + surveys
    return round(events * (1.0 + config.duplicate_rate + config.malformed_rate))
