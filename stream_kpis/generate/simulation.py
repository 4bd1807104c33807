"""The event loop of the synthetic stream.

Future events wait in a calendar queue: one list per hour of the period, turned into a small
heap when its hour comes (far cheaper than one heap of every member's next event). Each event
popped from the queue becomes one JSON line and may schedule later ones (the member's next
purchase, a redemption, a survey); delivery noise then holds lines back (late), repeats them
(duplicates) or adds a broken line next to them (malformed).
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Callable, Generator, Iterator
from heapq import heapify, heappop, heappush

import orjson

from .config import DAY_MS, HOUR_MS, SECOND_MS, GenerateSummary, GeneratorConfig, pool
from .population import (
    LIGHT,
    NEVER,
    ONCE,
    ONCE_MEAN_DELAY_DAYS,
    POOL_SIZE,
    STORES,
    TIERS,
    Members,
    Timeline,
    basket_pools,
)
from .text import MALFORMED_REASONS, malformed_line, rfc3339, survey_comment

__all__ = ["Simulation"]

_TIER_POINT_MULTIPLIER = (1.0, 1.25, 1.5, 2.0)
#: Lifetime spend (currency units) at which a member moves up to tier i.
_TIER_SPEND = (0.0, 400.0, 1200.0, 3000.0)
_MEMBER_PURCHASE_CHANNELS = pool(("store", 6), ("web", 2), ("app", 2))
_GUEST_PURCHASE_CHANNELS = pool(("store", 8), ("web", 2))
_SURVEY_CHANNELS = pool(("email", 2), ("app", 1), ("web", 1), ("sms", 1))
#: (reward_id, points, value in currency units)
_REWARDS = (
    ("rw-coffee", 150, 1.5),
    ("rw-5off", 500, 5.0),
    ("rw-10off", 1000, 10.0),
    ("rw-tote-bag", 2000, 20.0),
    ("rw-25off", 2500, 25.0),
)
_CHEAPEST_REWARD = min(points for _, points, _ in _REWARDS)
_TIER_ON_PURCHASE = 0.2        # share of member purchases that carry the (unchanged) tier
_GUEST_WITHOUT_MEMBER_KEY = 0.1  # guest purchases that omit member_id instead of sending null

# Event kinds, in the order they are applied when timestamps tie (purchases before redemptions).
_PURCHASE, _GUEST, _REDEEM, _SURVEY, _ENROLL = range(5)
#: A scheduled event: (ts, kind, member index or -1, extra: the reward index of a redemption).
_Entry = tuple[int, int, int, int]
#: A held-back line: (release ts, sequence number, line, event ts or -1 for a duplicate).
_Delayed = tuple[int, int, bytes, int]


class Simulation:
    """One generation run: iterate :meth:`lines` once, then read :meth:`summary`."""

    def __init__(self, config: GeneratorConfig) -> None:
        self.config = config
        self.timeline = Timeline(config)
        self.members = Members(config, self.timeline)
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
        # the run's state, used by lines() and the event builders it calls
        self._rng = random.Random(f"stream-kpis:{config.seed}:events")
        self._rand = self._rng.random
        self._baskets: list[list[tuple[float, float | None]]] = []
        self._calendar: list[list[_Entry]] = []
        self._hour = 0
        self._due_now: list[_Entry] = []  # the current hour's heap
        self._guest_at = 0.0  # effective time of the next guest purchase
        self._guest_ts: int | None = None  # ... as epoch ms; None: past the period
        self._serial = dict.fromkeys("prse", 0)  # event ids issued, by id prefix
        self._delayed: list[_Delayed] = []  # held-back lines, a heap by release ts
        self._seq = 0
        # delivery noise: fate = random() below late_cut is late, below dup_cut a duplicate,
        # below bad_cut followed by a malformed line
        self._late_cut = config.late_rate
        self._dup_cut = self._late_cut + config.duplicate_rate
        self._bad_cut = self._dup_cut + config.malformed_rate
        self._late_mean_ms = config.max_late_ms / 12

    # -- the stream ---------------------------------------------------------------------------

    def lines(self) -> Iterator[bytes]:
        """The event stream, one JSON line (bytes, no newline) at a time."""
        if self._started:
            raise RuntimeError("a Simulation runs once; make a new one")
        self._started = True
        rng, rand, rfc3339_rate = self._rng, self._rand, self.config.rfc3339_rate
        build: tuple[Callable[[int, int | str, int, int], dict[str, object]], ...] = (
            self._member_purchase, self._guest_purchase, self._redemption, self._survey,
            self._enrollment)  # indexed by event kind
        counts, delayed, dumps, bad_cut = self.counts, self._delayed, orjson.dumps, self._bad_cut
        self._baskets = basket_pools(self.config)
        self._start_calendar()
        shown = -1  # the largest ts of a valid event emitted so far
        for hour in range(self.timeline.hours):
            self._hour = hour
            due_now = self._due_now = self._calendar[hour]
            self._calendar[hour] = []  # release the memory; pushes for this hour go to due_now
            self._queue_guest_purchases()
            heapify(due_now)
            while due_now:
                t, kind, m, extra = heappop(due_now)
                if delayed and delayed[0][0] <= t:
                    shown = yield from self._release(t, shown)
                tv = t if rand() >= rfc3339_rate else rfc3339(rng, t)
                event = build[kind](t, tv, m, extra)
                counts[kind] += 1
                fate = rand()
                if fate >= bad_cut:  # most lines: emitted once, now
                    yield dumps(event)
                    shown = t
                    continue
                emitted = self._noise(dumps(event), t, fate)
                if emitted:
                    yield from emitted
                    shown = t
        shown = yield from self._release(None, shown)
        self.last_ts = shown if shown >= 0 else None

    def _start_calendar(self) -> None:
        """The calendar with every member's first events, and the first guest purchase."""
        timeline = self.timeline
        self._calendar = [[] for _ in range(timeline.hours)]
        first_events = self._first_events()
        for entry in first_events:
            self._calendar[(entry[0] - self.config.start_ms) // HOUR_MS].append(entry)
        guest_rate = self.guest_rate
        self._guest_at = self._rng.expovariate(guest_rate) if guest_rate > 0 else timeline.total
        self._guest_ts = timeline.ts_at(self._guest_at)
        self.first_ts = min(entry[0] for entry in first_events)
        if self._guest_ts is not None:
            self.first_ts = min(self.first_ts, self._guest_ts)

    def _first_events(self) -> list[_Entry]:
        """Every member's first event(s): enrollment or creating purchase, first repeat buy."""
        members, timeline, rng = self.members, self.timeline, self._rng
        entries = []
        for m in range(len(members.ids)):
            joined = members.joined[m]
            if members.enrolls[m]:
                entries.append((joined, _ENROLL, m, 0))
            else:
                entries.append((joined, _PURCHASE, m, 0))  # the purchase that creates the member
            segment = members.segment[m]
            if segment == NEVER or (segment == ONCE and not members.enrolls[m]):
                continue
            if segment == ONCE:
                delay = rng.expovariate(1.0 / ONCE_MEAN_DELAY_DAYS)
                first = timeline.ts_at(members.joined_effective[m] + delay)
            else:
                # from here on joined_effective holds the effective time of the latest purchase
                members.joined_effective[m] += rng.expovariate(members.rate[m])
                first = timeline.ts_at(members.joined_effective[m])
            if first is not None and first < members.churn_at[m]:
                entries.append((first, _PURCHASE, m, 0))
        return entries

    def _queue_guest_purchases(self) -> None:
        """Add the guest purchases of the current hour (a Poisson process in effective time)."""
        hour_end = self.config.start_ms + (self._hour + 1) * HOUR_MS
        guest_rate, ts_at, rand = self.guest_rate, self.timeline.ts_at, self._rand
        while self._guest_ts is not None and self._guest_ts < hour_end:
            self._due_now.append((self._guest_ts, _GUEST, -1, 0))
            self._guest_at -= math.log(1.0 - rand()) / guest_rate
            self._guest_ts = ts_at(self._guest_at)

    def _schedule(self, entry: _Entry) -> None:
        """Queue a future event in the calendar (dropped when past the period)."""
        h = (entry[0] - self.config.start_ms) // HOUR_MS
        if h == self._hour:
            heappush(self._due_now, entry)
        elif h < len(self._calendar):
            self._calendar[h].append(entry)

    def _next_id(self, prefix: str) -> str:
        n = self._serial[prefix] = self._serial[prefix] + 1
        return f"{prefix}-{n:08d}"

    # -- delivery noise -----------------------------------------------------------------------

    def _noise(self, line: bytes, t: int, fate: float) -> tuple[bytes, ...]:
        """The lines to emit now for an event at ``t`` whose ``fate`` is below ``_bad_cut``:
        none (held back, emitted late), the line (its duplicate is held back for later), or the
        line and a malformed line."""
        rand = self._rand
        if fate < self._late_cut:  # emitted once the stream is past ts + delay
            self._seq += 1
            delay = 60_000 - int(math.log(1.0 - rand()) * self._late_mean_ms)
            heappush(self._delayed, (t + min(delay, self.config.max_late_ms), self._seq, line, t))
            return ()
        if fate < self._dup_cut:
            self._seq += 1
            self.duplicates += 1
            release = t + int(rand() * self.config.duplicate_window_ms)
            heappush(self._delayed, (release, self._seq, line, -1))
            return (line,)
        reason, broken = malformed_line(self._rng, sum(self.malformed.values()) + 1,
                                        self.members.ids, t)
        self.malformed[reason] += 1
        return (line, broken)

    def _release(self, until: int | None, shown: int) -> Generator[bytes, None, int]:
        """Emit held-back lines due by ``until`` (all when None), counting late ones.

        ``shown`` is the largest ts emitted so far; the generator returns its new value.
        """
        delayed = self._delayed
        while delayed and (until is None or delayed[0][0] <= until):
            _, _, line, ts = heappop(delayed)
            if ts >= 0:  # a late event (duplicates carry -1)
                if ts < shown:
                    self.late += 1
                else:
                    shown = ts
            yield line
        return shown

    # -- the events ---------------------------------------------------------------------------
    # Each builder takes (ts, ts as written, member index or -1, extra) and returns the event.

    def _member_purchase(self, t: int, tv: int | str, m: int, extra: int) -> dict[str, object]:
        """A member's purchase: points, tier upgrades, maybe a redemption, the next purchase."""
        members, rand = self.members, self._rand
        amount, margin = self._baskets[members.basket[m]][int(rand() * POOL_SIZE)]
        level = members.tier[m]
        points = int(amount * self.config.points_per_unit * _TIER_POINT_MULTIPLIER[level])
        channel = _MEMBER_PURCHASE_CHANNELS[int(rand() * len(_MEMBER_PURCHASE_CHANNELS))]
        event: dict[str, object] = {
            "type": "purchase", "event_id": self._next_id("p"), "member_id": members.ids[m],
            "ts": tv, "amount": amount, "points": points, "currency": "EUR", "channel": channel}
        if channel == "store":
            event["store_id"] = members.home_store[m]
        total = members.spend[m] = members.spend[m] + amount
        if level < 3 and total >= _TIER_SPEND[level + 1]:
            members.tier[m] = level = level + 1
            event["tier"] = TIERS[level]
        elif rand() < _TIER_ON_PURCHASE:
            event["tier"] = TIERS[level]
        self.points_earned += points
        balance = members.balance[m] = members.balance[m] + points
        if balance >= _CHEAPEST_REWARD and rand() < members.propensity[m]:
            planned = self._plan_redemption(t, m, balance)
            if planned is not None:
                self._schedule(planned)
        if members.segment[m] <= LIGHT:  # a repeat buyer
            self._schedule_next_purchase(m)
        return self._after_purchase(event, margin, t, m)

    def _guest_purchase(self, t: int, tv: int | str, m: int, extra: int) -> dict[str, object]:
        """A guest's purchase: member_id null, or (sometimes) absent."""
        rand = self._rand
        amount, margin = self._baskets[-1][int(rand() * POOL_SIZE)]
        channel = _GUEST_PURCHASE_CHANNELS[int(rand() * len(_GUEST_PURCHASE_CHANNELS))]
        event: dict[str, object] = {"type": "purchase", "event_id": self._next_id("p")}
        if rand() >= _GUEST_WITHOUT_MEMBER_KEY:
            event["member_id"] = None
        event.update(ts=tv, amount=amount, currency="EUR", channel=channel)
        if channel == "store":
            event["store_id"] = STORES[int(rand() * len(STORES))]
        return self._after_purchase(event, margin, t, m)

    def _after_purchase(self, event: dict[str, object], margin: float | None, t: int,
                        m: int) -> dict[str, object]:
        """The margin, when the basket has one, and maybe a survey within three days."""
        if margin is not None:
            event["margin"] = margin
        if self._rand() < self.config.survey_rate:
            self._schedule((t + HOUR_MS + int(self._rand() * 71 * HOUR_MS), _SURVEY, m, 0))
        return event

    def _schedule_next_purchase(self, m: int) -> None:
        """Member m's next purchase, unless it falls after the period or after m stops buying."""
        members, timeline = self.members, self.timeline
        at = members.joined_effective[m] = (members.joined_effective[m]
                                            - math.log(1.0 - self._rand()) / members.rate[m])
        h = bisect_right(timeline.cumulative, at) - 1
        if h >= timeline.hours:
            return
        nxt = (self.config.start_ms + h * HOUR_MS
               + int((at - timeline.cumulative[h]) * timeline.ms_per_unit[h]))
        if nxt < members.churn_at[m]:
            if h == self._hour:
                heappush(self._due_now, (nxt, _PURCHASE, m, 0))
            else:
                self._calendar[h].append((nxt, _PURCHASE, m, 0))

    def _plan_redemption(self, t: int, m: int, points: int) -> _Entry | None:
        """Maybe a redemption after member m's purchase at t that left ``points`` unspent."""
        rng = self._rng
        if rng.random() < self.config.over_redemption_rate:
            options = [i for i, (_, cost, _) in enumerate(_REWARDS) if cost > points]
        else:
            options = [i for i, (_, cost, _) in enumerate(_REWARDS) if cost <= points]
        if not options:
            return None
        choice = options[rng.randrange(len(options))]
        due = t + SECOND_MS + int(rng.expovariate(1.0) * DAY_MS)
        if due >= self.config.end_ms:
            return None
        self.members.balance[m] = points - _REWARDS[choice][1]
        return (due, _REDEEM, m, choice)

    def _redemption(self, t: int, tv: int | str, m: int, extra: int) -> dict[str, object]:
        reward_id, points, value = _REWARDS[extra]
        self.points_redeemed += points
        channel = _MEMBER_PURCHASE_CHANNELS[int(self._rand() * len(_MEMBER_PURCHASE_CHANNELS))]
        return {"type": "redemption", "event_id": self._next_id("r"), "member_id": self.members.ids[m],
                "ts": tv, "points": points, "reward_id": reward_id, "value": value,
                "channel": channel}

    def _enrollment(self, t: int, tv: int | str, m: int, extra: int) -> dict[str, object]:
        members = self.members
        return {"type": "enrollment", "event_id": self._next_id("e"), "member_id": members.ids[m],
                "ts": tv, "channel": members.channel[m], "tier": TIERS[members.tier[m]]}

    def _survey(self, t: int, tv: int | str, m: int, extra: int) -> dict[str, object]:
        """A survey response; member -1 is a non-member respondent."""
        members, rng = self.members, self._rng
        latent = 7.9 + (0.4 + 0.8 * members.mood[m] if m >= 0 else -0.4)
        latent += rng.gauss(0.0, 1.8)
        event: dict[str, object] = {
            "type": "survey",
            "event_id": self._next_id("s"),
            "member_id": members.ids[m] if m >= 0 else None,
            "ts": tv,
        }
        kind = rng.random()
        if kind < 0.85:  # 60% nps only, 25% both, 15% csat only
            event["nps"] = min(10, max(0, round(latent)))
        if kind >= 0.6:
            event["csat"] = min(5, max(1, round(1.0 + 0.4 * latent + rng.gauss(0.0, 0.5))))
        if rng.random() < self.config.comment_rate:
            event["comment"] = survey_comment(rng, latent)
        event["channel"] = _SURVEY_CHANNELS[rng.randrange(len(_SURVEY_CHANNELS))]
        return event

    # -- the result ---------------------------------------------------------------------------

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
