"""What to generate (:class:`GeneratorConfig`), what a run produced (:class:`GenerateSummary`),
and the time units and weighted-pool helper the other generator modules share."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GeneratorConfig", "GenerateSummary", "SECOND_MS", "HOUR_MS", "DAY_MS", "pool"]

SECOND_MS = 1000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
_DEFAULT_START_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z


def pool(*weighted: tuple[object, int]) -> tuple:
    """Each value repeated weight times: ``pool[int(random() * len(pool))]`` draws one."""
    return tuple(value for value, weight in weighted for _ in range(weight))


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
    max_late_ms: int = 3 * DAY_MS
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
        return self.start_ms + self.days * DAY_MS


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
