"""Tests of the synthetic event stream (stream_kpis.generate).

Every line is checked by a validator written here from SPEC section 1, independently of the
generator and of stream_kpis.core.events; counts are recomputed from the lines themselves.
"""

from __future__ import annotations

import io
import re
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from stream_kpis.generate import (
    MALFORMED_REASONS,
    GeneratorConfig,
    estimate_event_count,
    generate_events,
    write_jsonl,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DAY_MS = 86_400_000
_REQUIRED = {
    "purchase": ("event_id", "ts", "amount"),
    "redemption": ("event_id", "member_id", "ts", "points"),
    "enrollment": ("event_id", "member_id", "ts"),
    "survey": ("event_id", "ts"),
}
_OPTIONAL_STRINGS = ("channel", "tier", "store_id", "currency", "reward_id", "comment")
_TIER_RANK = {"bronze": 0, "silver": 1, "gold": 2, "platinum": 3}


class _Bad(Exception):
    pass


def _ts_ms(value: object) -> int:
    """SPEC ts: epoch ms int, or an RFC 3339 string with an offset."""
    if type(value) is int:
        if value < 0:
            raise _Bad("bad_timestamp")
        return value
    if type(value) is not str:
        raise _Bad("bad_type")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise _Bad("bad_timestamp") from None
    if moment.tzinfo is None or "T" not in value:
        raise _Bad("bad_timestamp")
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def _number(obj: dict, name: str) -> float | None:
    value = obj.get(name)
    if value is not None and type(value) not in (int, float):
        raise _Bad("bad_type")
    return value


def _int_in(obj: dict, name: str, low: int, high: int) -> int | None:
    value = obj.get(name)
    if value is None:
        return None
    if type(value) is not int:
        raise _Bad("bad_type")
    if not low <= value <= high:
        raise _Bad("bad_value")
    return value


def _check(obj: dict) -> int:
    """Raise _Bad(reason) unless obj is a valid SPEC section 1 event; return its ts in ms."""
    kind = obj["type"]
    if any(obj.get(name) is None for name in _REQUIRED[kind]):
        raise _Bad("missing_field")
    if kind == "survey" and obj.get("nps") is None and obj.get("csat") is None:
        raise _Bad("missing_field")
    if type(obj["event_id"]) is not str:
        raise _Bad("bad_type")
    if not obj["event_id"]:
        raise _Bad("bad_value")
    if obj.get("member_id") is not None and type(obj["member_id"]) is not str:
        raise _Bad("bad_type")
    if any(obj.get(name) is not None and type(obj[name]) is not str
           for name in _OPTIONAL_STRINGS):
        raise _Bad("bad_type")
    ts = _ts_ms(obj["ts"])
    if kind == "purchase":
        if _number(obj, "amount") < 0:
            raise _Bad("negative_amount")
        _int_in(obj, "points", 0, 10**12)
        _number(obj, "margin")
    elif kind == "redemption":
        _int_in(obj, "points", 1, 10**12)
        if (_number(obj, "value") or 0) < 0:
            raise _Bad("bad_value")
    elif kind == "survey":
        _int_in(obj, "nps", 0, 10)
        _int_in(obj, "csat", 1, 5)
    return ts


def classify(line: bytes) -> tuple[str | None, dict | None]:
    """(None, event with "ts_ms" added) for a valid line, else (dead-letter reason, None)."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return "malformed_json", None
    if type(obj) is not dict:
        return "not_an_object", None
    if obj.get("type") not in _REQUIRED:
        return "unknown_type", None
    try:
        ts = _check(obj)
    except _Bad as bad:
        return str(bad), None
    return None, {**obj, "ts_ms": ts}


def _key(event: dict) -> tuple:
    return (event["type"], event.get("member_id"), event["event_id"])


class Stream:
    """A generated stream, classified line by line."""

    def __init__(self, config: GeneratorConfig) -> None:
        self.config = config
        buffer = io.BytesIO()
        self.summary = write_jsonl(config, buffer)
        self.raw = buffer.getvalue()
        self.lines = self.raw.split(b"\n")
        assert self.lines.pop() == b""  # every line ends in a newline
        self.reasons: Counter[str] = Counter()
        self.valid: list[tuple[bytes, dict]] = []  # (line, event) in arrival order
        for line in self.lines:
            reason, event = classify(line)
            if reason is None:
                self.valid.append((line, event))
            else:
                self.reasons[reason] += 1
        seen: set[tuple] = set()
        self.first: list[dict] = []  # first arrivals of distinct valid events
        for _, event in self.valid:
            if _key(event) not in seen:
                seen.add(_key(event))
                self.first.append(event)

    def of_type(self, kind: str) -> list[dict]:
        return [event for event in self.first if event["type"] == kind]


@pytest.fixture(scope="module")
def stream() -> Stream:
    return Stream(GeneratorConfig(members=2000, days=60, seed=7))


@pytest.fixture(scope="module")
def noisy() -> Stream:
    """Many malformed, late and duplicate lines, to check their shape and rates."""
    return Stream(GeneratorConfig(members=1500, days=45, seed=11, malformed_rate=0.05,
                                  late_rate=0.08, duplicate_rate=0.05))


def _binomial_ok(observed: int, trials: int, p: float, sigmas: float = 4.0) -> bool:
    sd = (trials * p * (1 - p)) ** 0.5
    return abs(observed - trials * p) <= sigmas * sd + 1


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    config = GeneratorConfig(members=200, days=20, seed=3)
    first = list(generate_events(config))
    assert first == list(generate_events(config))
    assert first != list(generate_events(GeneratorConfig(members=200, days=20, seed=4)))
    buffer = io.BytesIO()
    write_jsonl(config, buffer)
    assert buffer.getvalue() == b"".join(line + b"\n" for line in first)


@pytest.mark.parametrize(("members", "days"), [(1, 1), (7, 3), (150, 10)])
def test_the_requested_members_appear(members: int, days: int) -> None:
    s = Stream(GeneratorConfig(members=members, days=days, seed=5))
    member_ids = {event["member_id"] for event in s.first if event.get("member_id")}
    assert len(member_ids) == members == s.summary.members


def test_the_requested_members_appear_at_scale(stream: Stream) -> None:
    member_ids = {event["member_id"] for event in stream.first if event.get("member_id")}
    assert len(member_ids) == stream.config.members


def test_every_line_is_a_valid_event_or_counted_as_malformed(stream: Stream) -> None:
    summary = stream.summary
    assert len(stream.lines) == summary.lines
    assert sum(stream.reasons.values()) == summary.malformed
    assert dict(stream.reasons) == summary.malformed_by_reason
    # the stream carries no line this validator cannot place
    assert set(stream.reasons) <= set(MALFORMED_REASONS)
    start, end = stream.config.start_ms, stream.config.start_ms + stream.config.days * _DAY_MS
    assert all(start <= event["ts_ms"] < end for event in stream.first)
    assert summary.first_ts == min(event["ts_ms"] for event in stream.first)
    assert summary.last_ts == max(event["ts_ms"] for event in stream.first)


def test_counts_by_type_match_the_lines(stream: Stream) -> None:
    counts = Counter(event["type"] for event in stream.first)
    assert dict(counts) == stream.summary.by_type
    assert set(counts) == {"purchase", "redemption", "enrollment", "survey"}
    assert len(stream.first) == stream.summary.events
    guests = sum(1 for event in stream.of_type("purchase") if event.get("member_id") is None)
    assert guests == stream.summary.guest_purchases
    earned = sum(event.get("points", 0) for event in stream.of_type("purchase")
                 if event.get("member_id") is not None)
    redeemed = sum(event["points"] for event in stream.of_type("redemption"))
    assert (earned, redeemed) == (stream.summary.points_earned, stream.summary.points_redeemed)


def test_event_ids_are_unique_per_event(stream: Stream) -> None:
    ids = [event["event_id"] for event in stream.first]
    assert len(ids) == len(set(ids))


def test_malformed_share_is_as_configured(stream: Stream, noisy: Stream) -> None:
    for s in (stream, noisy):
        malformed = sum(s.reasons.values())
        assert _binomial_ok(malformed, len(s.first), s.config.malformed_rate)
    assert stream.reasons  # rare, but present at 12k events and 0.1%
    assert set(noisy.reasons) == set(MALFORMED_REASONS)  # every kind of breakage shows up
    assert dict(noisy.reasons) == noisy.summary.malformed_by_reason


def test_duplicates_are_byte_identical_repeats_soon_after(noisy: Stream) -> None:
    by_key: dict[tuple, list[int]] = defaultdict(list)
    for position, (_, event) in enumerate(noisy.valid):
        by_key[_key(event)].append(position)
    extra = 0
    for positions in by_key.values():
        lines = {noisy.valid[p][0] for p in positions}
        assert len(lines) == 1  # a repeat is the very same bytes
        extra += len(positions) - 1
        first, *repeats = positions
        for repeat in repeats:
            stream_time = max(event["ts_ms"] for _, event in noisy.valid[first:repeat])
            assert stream_time - noisy.valid[first][1]["ts_ms"] <= (
                noisy.config.duplicate_window_ms + 3_600_000)
    assert extra == noisy.summary.duplicates
    assert _binomial_ok(extra, len(noisy.first), noisy.config.duplicate_rate)


def _late_events(s: Stream) -> list[int]:
    """How far behind the stream (ms) each first arrival that comes out of ts order is."""
    behind, newest = [], -1
    for event in s.first:
        if event["ts_ms"] < newest:
            behind.append(newest - event["ts_ms"])
        newest = max(newest, event["ts_ms"])
    return behind


def test_late_events_arrive_after_later_ones(stream: Stream, noisy: Stream) -> None:
    for s in (stream, noisy):
        behind = _late_events(s)
        assert len(behind) == s.summary.late > 0
        # a late event is delayed by at most max_late_ms (plus the gap to the next event)
        assert max(behind) <= s.config.max_late_ms + 3_600_000
        assert _binomial_ok(len(behind), len(s.first), s.config.late_rate, sigmas=5)
    assert max(_late_events(noisy)) > 12 * 3_600_000  # some are hours late, not just jitter


def test_guests_buy_smaller_baskets(stream: Stream) -> None:
    purchases = stream.of_type("purchase")
    guests = [event["amount"] for event in purchases if event.get("member_id") is None]
    members = [event["amount"] for event in purchases if event.get("member_id") is not None]
    assert abs(len(guests) / len(purchases) - stream.config.guest_share) < 0.05
    assert sum(guests) / len(guests) < 0.85 * sum(members) / len(members)
    # guests earn no points; members do
    assert all(not event.get("points") for event in purchases if event.get("member_id") is None)
    assert sum(event.get("points", 0) for event in purchases) > 0


def test_margins_present_often_and_sometimes_negative(stream: Stream) -> None:
    purchases = stream.of_type("purchase")
    margins = [event["margin"] for event in purchases if "margin" in event]
    assert 0.6 < len(margins) / len(purchases) < 0.95
    assert any(margin < 0 for margin in margins)
    assert sum(margins) > 0


def test_enrollment_channels_tiers_and_upgrades(stream: Stream) -> None:
    enrollments = stream.of_type("enrollment")
    assert {event["channel"] for event in enrollments} == {
        "web", "app", "store", "partner", "referral"}
    assert {event["tier"] for event in enrollments} == set(_TIER_RANK)
    enrolled_tier = {event["member_id"]: _TIER_RANK[event["tier"]] for event in enrollments}
    upgrades = {event["member_id"] for event in stream.of_type("purchase")
                if event.get("tier") and event["member_id"] in enrolled_tier
                and _TIER_RANK[event["tier"]] > enrolled_tier[event["member_id"]]}
    assert upgrades
    # some members never enroll: a purchase is their first event
    buyers = {event["member_id"] for event in stream.of_type("purchase") if event.get("member_id")}
    assert buyers - set(enrolled_tier)


def test_purchase_frequency_varies_and_some_members_churn(stream: Stream) -> None:
    member_purchases: dict[str, list[int]] = defaultdict(list)
    for event in stream.of_type("purchase"):
        if event.get("member_id"):
            member_purchases[event["member_id"]].append(event["ts_ms"])
    counts = Counter(len(times) for times in member_purchases.values())
    assert counts[1] > 0.1 * len(member_purchases)  # one-and-done buyers
    assert sum(n for c, n in counts.items() if c >= 10) > 0.05 * len(member_purchases)
    end = stream.config.start_ms + stream.config.days * _DAY_MS
    stopped = [times for times in member_purchases.values()
               if len(times) >= 5 and end - max(times) > 25 * _DAY_MS]
    assert stopped  # frequent buyers who went quiet


def test_weekends_are_busier(stream: Stream) -> None:
    per_weekday: Counter[int] = Counter()
    days_per_weekday: Counter[int] = Counter()
    for day in range(stream.config.days):
        moment = datetime.fromtimestamp((stream.config.start_ms + day * _DAY_MS) / 1000, UTC)
        days_per_weekday[moment.weekday()] += 1
    for event in stream.of_type("purchase"):
        per_weekday[datetime.fromtimestamp(event["ts_ms"] / 1000, UTC).weekday()] += 1
    rate = {d: per_weekday[d] / days_per_weekday[d] for d in range(7)}
    weekend = (rate[5] + rate[6]) / 2
    assert weekend > 1.15 * max(rate[d] for d in range(4))


def test_redemptions_are_mostly_backed_by_earned_points(stream: Stream) -> None:
    order = {"purchase": 0, "redemption": 1}
    balance: Counter[str] = Counter()
    unbacked = redemptions = 0
    events = [e for e in stream.first if e["type"] in order and e.get("member_id")]
    for event in sorted(events, key=lambda e: (e["ts_ms"], order[e["type"]])):
        if event["type"] == "purchase":
            balance[event["member_id"]] += event.get("points", 0)
        else:
            redemptions += 1
            balance[event["member_id"]] -= event["points"]
            unbacked += balance[event["member_id"]] < 0
    assert redemptions > 100
    assert 0 < unbacked < 0.1 * redemptions


def test_surveys_from_members_and_non_members(stream: Stream) -> None:
    surveys = stream.of_type("survey")
    assert any(event.get("member_id") for event in surveys)
    assert any(event.get("member_id") is None for event in surveys)
    assert any("nps" in event and "csat" in event for event in surveys)
    assert any("nps" not in event for event in surveys)
    assert any("csat" not in event for event in surveys)


def _mentions(comment: str, term: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(term.casefold())}(?!\w)", comment.casefold()) is not None


def test_comments_in_several_languages_with_lexicon_terms(stream: Stream) -> None:
    comments = [event["comment"] for event in stream.of_type("survey") if event.get("comment")]
    assert len(comments) > 100
    for term in ("slow", "frustrating", "lento", "frustrante", "بطيء", "کند",
                 "rewards", "discount", "recompensa", "descuento", "مكافأة", "پاداش"):
        assert any(_mentions(comment, term) for comment in comments), term
    text = " ".join(comments)
    assert re.search("[ãçõ]", text)  # Portuguese
    assert re.search("[ñ]|llegó", text)  # Spanish
    assert re.search("[\u0627-\u064a]", text)  # Arabic script
    assert re.search("[پچژگکی]", text)  # Persian letters
    assert any(comment.isascii() for comment in comments)  # English


def test_timestamps_mostly_epoch_ms_some_rfc3339_with_offsets(stream: Stream) -> None:
    texts = [event["ts"] for event in stream.first if isinstance(event["ts"], str)]
    share = len(texts) / len(stream.first)
    assert abs(share - stream.config.rfc3339_rate) < 0.02
    offsets = {text[-6:] for text in texts if not text.endswith("Z")}
    assert "+02:00" in offsets and any(offset.startswith("-") for offset in offsets)
    assert any(text.endswith("Z") for text in texts)


def test_write_jsonl_to_a_path(tmp_path) -> None:
    config = GeneratorConfig(members=100, days=10, seed=9)
    summary = write_jsonl(config, tmp_path / "events.jsonl")
    written = (tmp_path / "events.jsonl").read_bytes()
    assert written == b"".join(line + b"\n" for line in generate_events(config))
    assert written.count(b"\n") == summary.lines


@pytest.mark.parametrize("config", [
    GeneratorConfig(members=500, days=30, seed=1),
    GeneratorConfig(members=2000, days=90, seed=2, guest_share=0.5, survey_rate=0.2),
    GeneratorConfig(members=300, days=120, seed=3, purchase_rate=0.3),
])
def test_estimate_event_count_is_roughly_right(config: GeneratorConfig) -> None:
    actual = sum(1 for _ in generate_events(config))
    assert 0.8 * actual <= estimate_event_count(config) <= 1.2 * actual


@pytest.mark.parametrize("changes", [
    {"members": 0}, {"days": 0}, {"guest_share": 1.0}, {"late_rate": -0.1},
    {"malformed_rate": 1.5}, {"purchase_rate": 0.0}, {"max_late_ms": 1000},
])
def test_config_rejects_impossible_values(changes: dict) -> None:
    with pytest.raises(ValueError):
        GeneratorConfig(**changes)
