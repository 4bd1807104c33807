"""The simulated population: activity over the period (:class:`Timeline`), the members' drawn
profiles (:class:`Members`) and the basket-size pools purchases draw from."""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from statistics import NormalDist

from .config import DAY_MS, HOUR_MS, SECOND_MS, GeneratorConfig, pool

__all__ = ["Timeline", "Members", "basket_pools", "TIERS", "STORES", "LIGHT", "ONCE", "NEVER",
           "ONCE_MEAN_DELAY_DAYS", "POOL_SIZE"]

TIERS = ("bronze", "silver", "gold", "platinum")
_TIER_POOL = pool((0, 70), (1, 20), (2, 8), (3, 2))  # tier at enrollment (index into TIERS)
_ENROLL_CHANNELS = pool(("web", 30), ("app", 30), ("store", 25), ("partner", 8),
                        ("referral", 7))
STORES = tuple(f"store-{i:03d}" for i in range(1, 41))
#: Relative activity by hour of day (UTC) and by weekday (Monday first).
_HOUR_PROFILE = (
    0.15, 0.1, 0.08, 0.08, 0.1, 0.2, 0.4, 0.7, 1.0, 1.2, 1.3, 1.4,
    1.5, 1.4, 1.3, 1.3, 1.4, 1.6, 1.7, 1.6, 1.3, 0.9, 0.5, 0.3,
)
_WEEKDAY_PROFILE = (0.9, 0.9, 0.95, 1.0, 1.1, 1.35, 1.3)

# Buying segments: heavy, regular and light repeat buyers (purchase-rate multipliers applied to
# GeneratorConfig.purchase_rate), one-and-done buyers and members who never buy.
HEAVY, REGULAR, LIGHT, ONCE, NEVER = range(5)
_SEGMENT_RATE = (3.0, 1.0, 0.3, 0.0, 0.0)
_SEGMENT_POOL = pool((HEAVY, 15), (REGULAR, 40), (LIGHT, 25), (ONCE, 15), (NEVER, 5))
ONCE_MEAN_DELAY_DAYS = 10.0    # one-and-done buyers buy this long after joining, on average
_LAUNCH_SHARE = 0.35           # members who join in the launch wave (the first _LAUNCH_DAYS)
_LAUNCH_DAYS = 14
_REDEEMER_SHARE = 0.65         # members who redeem when they can; the rest almost never do
_GUEST_BASKET_FACTOR = 0.72    # guests' baskets relative to members'
#: Members' basket-size factors (lognormal, sigma 0.3, by 9 quantiles); each member gets one.
_BASKET_FACTORS = tuple(math.exp(0.3 * NormalDist().inv_cdf((i + 0.5) / 9)) for i in range(9))
POOL_SIZE = 1 << 12  # entries per basket pool


def basket_pools(config: GeneratorConfig) -> list[list[tuple[float, float | None]]]:
    """(amount, margin or None) pools, one per member basket factor and the guests' last.

    Drawing a pre-rounded pair costs one random() per purchase.
    """
    rng = random.Random(f"stream-kpis:{config.seed}:baskets")
    raw = [(math.exp(rng.gauss(math.log(38.0), 0.65)), rng.gauss(0.24, 0.12),
            rng.random() < config.margin_share) for _ in range(POOL_SIZE)]
    pools = []
    for factor in (*_BASKET_FACTORS, _GUEST_BASKET_FACTOR):
        entries = []
        for amount, ratio, has_margin in raw:
            amount = round(amount * factor, 2)
            entries.append((amount, round(amount * ratio, 2) if has_margin else None))
        pools.append(entries)
    return pools


class Timeline:
    """Activity intensity over the period, as cumulative "effective days" per hour.

    Event processes run in effective time L (mean intensity 1 per day), so a Poisson process
    with rate r per effective day follows the daily and weekly curve and the trend exactly,
    without rejection sampling; :meth:`ts_at` maps L back to epoch ms.
    """

    def __init__(self, config: GeneratorConfig) -> None:
        hours = config.days * 24
        first_hour = config.start_ms // HOUR_MS
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
            self.ms_per_unit[h] = DAY_MS / weight
        self.total = self.cumulative[hours]

    def at(self, ts: int) -> float:
        """Effective time of epoch ms ``ts`` (inside the period)."""
        offset = ts - self.start_ms
        h = min(offset // HOUR_MS, self.hours - 1)
        return self.cumulative[h] + (offset - h * HOUR_MS) / self.ms_per_unit[h]

    def ts_at(self, effective: float) -> int | None:
        """Epoch ms of effective time ``effective``; None when it is past the period."""
        h = bisect_right(self.cumulative, effective) - 1
        if h >= self.hours:
            return None
        return (self.start_ms + h * HOUR_MS
                + int((effective - self.cumulative[h]) * self.ms_per_unit[h]))


class Members:
    """Per-member profiles (drawn from their own seeded stream) and mutable simulation state."""

    def __init__(self, config: GeneratorConfig, timeline: Timeline) -> None:
        rng = random.Random(f"stream-kpis:{config.seed}:members")
        n = config.members
        width = max(6, len(str(n - 1)))
        self.ids = [f"m-{i:0{width}d}" for i in range(n)]
        launch_end = timeline.at(
            config.start_ms + min(_LAUNCH_DAYS, config.days) * DAY_MS - 1)
        self.joined: list[int] = []
        self.joined_effective: list[float] = []
        self.enrolls: list[bool] = []
        self.segment: list[int] = []
        self.rate: list[float] = []
        self.churn_at: list[int] = []
        self.tier: list[int] = []
        self.channel: list[str] = []
        self.basket: list[int] = []  # index into the member pools of basket_pools
        self.home_store: list[str] = []
        self.propensity: list[float] = []
        self.mood: list[float] = []
        rand, gauss = rng.random, rng.gauss
        for _ in range(n):
            upper = launch_end if rand() < _LAUNCH_SHARE else timeline.total
            joined = timeline.ts_at(rand() * upper)
            joined = (joined if joined is not None else config.end_ms - 1)
            joined = max(joined - joined % SECOND_MS, config.start_ms)  # stamped to the second
            segment = _SEGMENT_POOL[int(rand() * len(_SEGMENT_POOL))]
            enrolls = rand() >= config.implicit_share
            if segment == NEVER and not enrolls:
                segment = ONCE  # a member with no enrollment is created by a purchase
            churner = segment <= LIGHT and rand() < config.churn_share
            churn_at = (joined - int(math.log(1.0 - rand()) * config.churn_after_days * DAY_MS)
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
            self.home_store.append(STORES[int(rand() * len(STORES))])
            self.propensity.append(config.redeem_propensity if rand() < _REDEEMER_SHARE
                                   else config.redeem_propensity * 0.05)
            self.mood.append(gauss(0.0, 1.0) - (1.5 if churner else 0.0))
        self.spend = [0.0] * n
        self.balance = [0] * n

    def expected_purchases(self, timeline: Timeline) -> float:
        """Expected number of member purchases over the period."""
        total = 0.0
        for m, segment in enumerate(self.segment):
            remaining = timeline.total - self.joined_effective[m]
            if segment == ONCE:
                total += 1.0 if not self.enrolls[m] else (
                    1.0 - math.exp(-remaining / ONCE_MEAN_DELAY_DAYS))
            elif segment != NEVER:
                stop = min(self.churn_at[m], timeline.start_ms + timeline.hours * HOUR_MS - 1)
                active = max(0.0, timeline.at(stop) - self.joined_effective[m])
                total += self.rate[m] * active + (0.0 if self.enrolls[m] else 1.0)
        return total


