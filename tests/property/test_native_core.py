"""The native streaming core (NativeProcessor, Rust) against the Python reference (Processor).

On random streams cut into random batches, both cores get the same batches; after every batch
they agree on the counts, the clocks, every field of the exported aggregates (values of the same
types, floats bit for bit), the churn history, every signal so far (in order) and the KPI
records. The streams come from tests/property/test_core_vs_oracle.py: members and guests,
arrival out of time order, repeated event ids, ties on ts, redemptions beyond the points
earned, surveys with and without member and comments for the lexicons; on top, a few events
jump the clock far ahead (statuses at risk, churned, reactivated; expiry notices; history
folded) and hourly streams are stretched over months for the cohorts. Settings: points
validity or none, expiry notices, cohorts or none, lexicons or none, de-duplication bounds
small enough to forget, bounded history or not, segments on any of the five dimensions, CLV or
not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from stream_kpis.core import Processor
from stream_kpis.core.events import MAX_POINTS, DeadLetter, Event, EventParser
from stream_kpis.core.kpis import NO_FLOOR, Aggregates
from stream_kpis.core.native import NATIVE_ENV, native_module, native_status
from stream_kpis.core.native_core import NativeProcessor, make_processor
from stream_kpis.settings import Settings
from tests.property.test_core_vs_oracle import (
    BASE,
    DAY,
    HOUR,
    LEXICONS,
    SEGMENTS,
    _parsed,
    any_event,
    any_month_event,
    batches,
    compare_records,
    members,
    purchase,
    streams,
)
from tests.property.test_core_vs_oracle import (
    _settings as oracle_settings,
)

needs_native = pytest.mark.skipif(native_module() is None,
                                  reason=f"native fast paths {native_status()}")

#: The aggregates' fields the native core exports; mentions and cohort histograms may hold an
#: empty histogram in one core and none in the other (evaluation reads both as zeros).
_FIELDS = ("hists", "by_channel", "tiers", "sums", "mentions", "totals", "cohort_members",
           "cohort_active", "cohort_max", "floor")
_EMPTY_MAY_BE_MISSING = ("mentions", "cohort_active", "cohort_max")


def _typed(value: Any) -> Any:
    """``value`` with the type of every number kept (1 is not 1.0) and floats by their bits
    (-0.0 is not 0.0); dicts as sorted items, lists and tuples alike."""
    if isinstance(value, Mapping):
        return sorted(((_typed(k), _typed(v)) for k, v in value.items()), key=repr)
    if isinstance(value, list | tuple):
        return [_typed(item) for item in value]
    if type(value) is float:
        return ("float", value.hex())
    return (type(value).__name__, value)


def _exported(aggs: Aggregates) -> dict[str, Any]:
    fields = {name: getattr(aggs, name) for name in _FIELDS}
    for name in _EMPTY_MAY_BE_MISSING:
        fields[name] = {key: hist for key, hist in fields[name].items() if hist}
    return {name: _typed(value) for name, value in fields.items()}


def _records(processor: Any, K: int | None = None) -> list[bytes]:
    return [orjson.dumps(record) for record in processor.evaluate(K)]


# ---- settings and streams ------------------------------------------------------------------

@st.composite
def configs(draw: st.DrawFn) -> Settings:
    """Hourly or daily buckets with windows and horizons a stream outgrows (the history floor
    moves within it); the rest of the covered settings at random."""
    if draw(st.booleans()):
        unit, horizons = HOUR, {"windows_ms": (3 * HOUR, 7 * HOUR, 12 * HOUR),
                                "churn_horizon_ms": 8 * HOUR, "settle_ms": 5 * HOUR,
                                "at_risk_ms": 4 * HOUR}
        validity, notice = st.integers(2, 12), st.integers(0, 6)
    else:
        unit, horizons = DAY, {"windows_ms": (7 * DAY, 30 * DAY), "churn_horizon_ms": 30 * DAY,
                               "settle_ms": 20 * DAY, "at_risk_ms": 14 * DAY}
        validity, notice = st.integers(10, 90), st.integers(0, 20)
    validity_buckets = draw(st.none() | validity)
    return Settings(
        bucket_ms=unit, **horizons,
        points_validity_ms=None if validity_buckets is None else validity_buckets * unit,
        points_expiring_notice_ms=draw(notice) * unit,
        cohorts=draw(st.sampled_from([0, 1, 3, 6])), cohort_ages=draw(st.integers(0, 6)),
        lexicons=draw(st.sampled_from([LEXICONS, {}])),
        dedupe_per_member=draw(st.integers(1, 3) | st.just(128)),
        guest_dedupe=draw(st.integers(1, 5) | st.just(200_000)),
        segments=draw(st.just(()) | st.lists(st.sampled_from(SEGMENTS), unique=True).map(tuple)),
        clv=draw(st.sampled_from([False, False, False, True])))  # a CLV fit is slow: a quarter


def _in_days(raw: dict) -> dict:
    """An event of the hourly streams moved from hour h to day 4h (five months), at the same
    edge of it: the start, 1 ms after, or the last ms."""
    hour, offset = divmod(raw["ts"] - BASE, HOUR)
    return {**raw, "ts": BASE + 4 * hour * DAY + (DAY - 1 if offset == HOUR - 1 else offset)}


#: Member purchases that earn points (most purchases of the shared streams earn none): lots to
#: expire, redeem and give notice of; in cents, whose sums round (the shared streams' quarters
#: add up exactly in any order, so they would not tell the order of the additions apart).
earning = st.builds(
    lambda raw, member, points, cents: {**raw, "member_id": member, "points": points,
                                        "amount": cents / 100},
    purchase, members, st.integers(1, 50), st.integers(0, 100_000))


@st.composite
def event_streams(draw: st.DrawFn, bucket_ms: int) -> list[dict]:
    """Hourly streams (stretched over months with daily buckets) or the daily months streams,
    of 10 to 80 events; a few of them moved far ahead, so the clock jumps and the events after
    them are late; and a few sent again later (duplicates, or new when their key was
    forgotten)."""
    if draw(st.booleans()):
        events = draw(st.lists(any_event | earning, min_size=10, max_size=80))
        if bucket_ms == DAY:
            events = [_in_days(raw) for raw in events]
    else:
        events = draw(st.lists(any_month_event | earning.map(_in_days), min_size=10, max_size=80))
    positions = st.integers(0, len(events) - 1)
    for position, buckets in draw(st.lists(st.tuples(positions, st.integers(10, 400)),
                                           max_size=3)):
        events[position] = {**events[position], "ts": events[position]["ts"] + buckets * bucket_ms}
    for position, later in draw(st.lists(st.tuples(positions, st.integers(1, 40)), max_size=10)):
        events.insert(position + later, events[position])
    return events


@st.composite
def cases(draw: st.DrawFn) -> tuple[Settings, list[dict]]:
    config = draw(configs())
    return config, draw(event_streams(config.bucket_ms))


# ---- the differential property -------------------------------------------------------------

class _SideBySide:
    """A NativeProcessor and a Processor given the same calls, each with its signals."""

    def __init__(self, config: Settings, **options: Any) -> None:
        self.got_signals: list = []
        self.expected_signals: list = []
        self.got = NativeProcessor(config, on_signal=self.got_signals.append, **options)
        self.expected = Processor(config, on_signal=self.expected_signals.append, **options)

    def process_batch(self, batch: list) -> None:
        self.got.process_batch(batch)
        self.expected.process_batch(batch)

    def advance(self, K: int) -> None:
        self.got.advance(K)
        self.expected.advance(K)

    def assert_same(self, evaluate: bool) -> None:
        """Counts, clocks, aggregates, churn history and signals so far; with ``evaluate`` the
        KPI records (which record K's churn snapshot in the history of both)."""
        got, expected = self.got, self.expected
        assert (got.applied, got.duplicates, got.K, got.as_of_bucket(), got.max_ts) == \
            (expected.applied, expected.duplicates, expected.K, expected.as_of_bucket(),
             expected.max_ts)
        aggs = got.aggs
        assert type(aggs) is Aggregates
        if expected.clv_model is None:
            assert (aggs.clv, got.clv_model) == (None, None)
        else:
            stats, wanted = aggs.clv, expected.aggs.clv
            assert _typed([stats.bgnbd, stats.gamma_gamma, stats.m_sums]) == \
                _typed([wanted.bgnbd, wanted.gamma_gamma, wanted.m_sums])
        reference = expected.aggs
        for got_aggs, expected_aggs in [(aggs, reference), *(
                (aggs.segments.get(key), segment) for key, segment in reference.segments.items())]:
            assert got_aggs is not None
            exported, wanted = _exported(got_aggs), _exported(expected_aggs)
            for name in _FIELDS:
                assert exported[name] == wanted[name], name
        assert sorted(aggs.segments) == sorted(reference.segments)
        assert _typed(got.churn_history) == _typed(expected.churn_history)
        assert self.got_signals == self.expected_signals
        if evaluate:
            assert _records(got) == _records(expected)

    def assert_same_records(self, K: int) -> None:
        assert _records(self.got, K) == _records(self.expected, K)
        assert _typed(self.got.churn_history) == _typed(self.expected.churn_history)

    def report(self) -> None:
        """What the stream made happen, for --hypothesis-show-statistics."""
        expected = self.expected
        event(f"history folded: {expected.aggs.floor != NO_FLOOR}")
        event(f"duplicates: {expected.duplicates > 0}")
        for kind in sorted({signal["signal"] for signal in self.expected_signals}):
            event(f"signal {kind}")


cut_points = st.lists(st.integers(0, 60), max_size=8)


@needs_native
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), cuts=cut_points, bounded=st.booleans(), record=st.booleans(),
       evaluate_every_batch=st.booleans(), shift=st.integers(-15, 15))
def test_native_core_equals_processor_batch_by_batch(case, cuts, bounded, record,
                                                     evaluate_every_batch, shift):
    """After every batch, and at the end as of a later bucket (or an earlier one, when the
    whole history is kept)."""
    config, events = case
    pair = _SideBySide(config, record_churn_history=record, bounded_history=bounded)
    for batch in batches(_parsed(events), cuts):
        pair.process_batch(batch)
        pair.assert_same(evaluate_every_batch)
    if pair.expected.K is not None:
        pair.assert_same_records(max(0, pair.expected.K + (shift if shift >= 0 or not bounded
                                                           else -shift)))
    pair.report()


@needs_native
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), cuts=cut_points, clock=st.sampled_from(["event", "wall"]),
       moves=st.lists(st.tuples(st.integers(0, 8), st.integers(0, 300)), max_size=4))
def test_native_core_equals_processor_with_the_clock_moved(case, cuts, clock, moves):
    """advance(K) between batches (a wall clock, or an event clock pushed ahead): the same
    signals and state."""
    config, events = case
    config = config.with_overrides(clock=clock)
    pair = _SideBySide(config, record_churn_history=True)
    start = BASE // config.bucket_ms
    ahead = dict(moves)
    for n, batch in enumerate(batches(_parsed(events), cuts)):
        if n in ahead:
            pair.advance(start + ahead[n])
            pair.assert_same(evaluate=False)
        pair.process_batch(batch)
        pair.assert_same(evaluate=True)
    pair.report()


@needs_native
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=streams, validity=st.none() | st.integers(2, 12), later=st.integers(0, 15),
       cuts=cut_points, seed=st.randoms())
def test_native_core_equals_brute_force(events, validity, later, cuts, seed):
    """The native core against the oracle directly (segments on all five dimensions): any
    arrival order, any batches."""
    config = oracle_settings(validity)
    shuffled = list(events)
    seed.shuffle(shuffled)
    processor = NativeProcessor(config, on_signal=lambda signal: None)
    for batch in batches(_parsed(shuffled), cuts):
        processor.process_batch(batch)
    if processor.K is None:
        assert processor.evaluate() == []
        return
    for K in (processor.K, processor.K + later):
        compare_records(processor.evaluate(K), shuffled, config, K)


@needs_native
def test_point_sums_past_64_bits_count_as_in_python():
    """The native core sums points in 128 bits: 2,000 purchases of the most points an event can
    carry come to more than 2**63, as Python's ints count them."""
    pair = _SideBySide(Settings(points_validity_ms=30 * DAY))
    pair.process_batch(_parsed([
        {"type": "purchase", "event_id": f"p{i}", "member_id": f"m{i % 3}", "ts": BASE + i * 1000,
         "amount": 1.0, "points": MAX_POINTS} for i in range(2_000)]))
    assert pair.expected.aggs.totals["points_balance"] == 2_000 * MAX_POINTS > 2**63
    pair.assert_same(evaluate=True)


@needs_native
def test_negative_dedupe_bounds_keep_nothing_as_in_python():
    """A Settings made in code may carry a bound below 0 (TOML settings cannot): both cores
    then remember no key, as with 0."""
    pair = _SideBySide(Settings(dedupe_per_member=-1, guest_dedupe=-3))
    pair.process_batch(_parsed([
        {"type": kind, "event_id": "e1", "member_id": member, "ts": BASE, "amount": 1.0, "nps": 9}
        for kind, member in [("purchase", "m"), ("purchase", "m"), ("survey", None),
                             ("survey", None)]]))
    assert pair.expected.duplicates == 0
    pair.assert_same(evaluate=True)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("kind", ["purchase", "redemption"])
def test_points_past_the_most_an_event_carries_are_a_dead_letter(native, kind):
    """More than 2**53 - 1 points (what a KPI record's JSON number holds exactly) is a data
    error, read the same by the native and the Python parser."""
    parser = EventParser(native=native)
    line = orjson.dumps({"type": kind, "event_id": "e1", "member_id": "m", "ts": BASE,
                         "amount": 1.0})[:-1]  # points written by hand: orjson writes < 2**64
    ok = parser.parse(line + b',"points":%d}' % MAX_POINTS)
    assert isinstance(ok, Event) and ok.points == MAX_POINTS
    for points in (MAX_POINTS + 1, 2**63, 2**64 - 1):  # (orjson reads more as a float)
        dead = parser.parse(line + b',"points":%d}' % points)
        assert isinstance(dead, DeadLetter) and dead.reason == "bad_value", (points, dead)


# ---- what the native core covers, and the switch -------------------------------------------

@pytest.fixture
def native_turned_off(monkeypatch: pytest.MonkeyPatch):
    """STREAM_KPIS_NATIVE=0 for the test; native_module() is cached, so it is asked again
    before the test and after it (when monkeypatch has put the variable back)."""
    monkeypatch.setenv(NATIVE_ENV, "0")
    native_module.cache_clear()
    yield
    native_module.cache_clear()


def _made(config: Settings) -> Any:
    return make_processor(config, on_signal=lambda signal: None, record_churn_history=True,
                          bounded_history=False)


def test_make_processor_is_the_python_core_with_native_turned_off(native_turned_off):
    assert native_module() is None
    made = _made(Settings())
    assert type(made) is Processor
    assert (made.record_churn_history, made.bounded_history) == (True, False)


@needs_native
def test_make_processor_is_native_for_every_setting():
    assert type(_made(Settings())) is NativeProcessor
    assert type(_made(Settings(segments=("tier",)))) is NativeProcessor
    assert type(_made(Settings(clv=True))) is NativeProcessor


# ---- replay's JSON Lines path through the native core (no Event objects) ---------------------

#: Lines the native JSON reader leaves to Python, and lines replay skips or keeps apart.
_ODD_LINES = [
    b"", b"   ", b"\t\x0b\x0c ", b"\r", b"not json", b"[1, 2]", b'{"type": "purchase"}',
    b'{"type":"purchase","event_id":"big","member_id":"m0","ts":1704067200000,"amount":1.0,'
    b'"points":1,"other":18446744073709551615}',  # an int past 64 bits: Python reads it
    b'{"type":"purchase","event_id":"x","ts":1704067200000,"amount":-1.0}',
    b'{"type":"survey","event_id":"s","ts":1704067200000,"nps":11}',
    b'{"type":"purchase","event_id":"' + b"w" * 300 + b'","ts":1704067200000,"amount":1.0}',
]


@st.composite
def jsonl_files(draw: st.DrawFn) -> bytes:
    """A JSON Lines file: valid events in any order, odd lines among them, LF or CRLF line
    ends, with or without a last line break."""
    events = draw(st.lists(any_event | earning, min_size=1, max_size=60))
    lines = [orjson.dumps(raw) for raw in events]
    for position, line in draw(st.lists(st.tuples(st.integers(0, len(lines)),
                                                  st.sampled_from(_ODD_LINES)), max_size=8)):
        lines.insert(position, line)
    end = draw(st.sampled_from([b"\n", b"\r\n"]))
    return end.join(lines) + draw(st.sampled_from([end, b""]))


@needs_native
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(content=jsonl_files(), every=st.sampled_from([None, HOUR, 5 * HOUR]),
       chunk=st.sampled_from([64, 1 << 20]), validity=st.none() | st.integers(2, 12))
def test_replay_of_json_lines_through_the_native_core_is_the_python_replay(
        tmp_path_factory, monkeypatch, content, every, chunk, validity):
    """KPIs, the --every series, dead letters (reason, line number, bytes) and signals: the
    same as the Python replay's, whatever the lines, line ends and chunks read at a time."""
    from stream_kpis import replay as replay_module

    path = tmp_path_factory.mktemp("jsonl") / "events.jsonl"
    path.write_bytes(content)
    config = oracle_settings(validity).with_overrides(max_event_bytes=256)
    monkeypatch.setattr(replay_module, "_CHUNK_BYTES", chunk)

    calls = []
    process_lines = NativeProcessor.process_lines
    monkeypatch.setattr(NativeProcessor, "process_lines",
                        lambda self, *args: calls.append(args[1]) or process_lines(self, *args))

    def run() -> tuple:
        dead, signals = [], []
        result = replay_module.replay(
            [replay_module.source_for_path(path)], config, every_ms=every,
            on_dead_letter=lambda item: dead.append((item.reason, item.offset, item.raw)),
            on_signal=signals.append)
        return (orjson.dumps(result.records), orjson.dumps(result.series), result.applied,
                result.duplicates, dead, signals)

    native = run()
    assert calls  # the native path ran
    monkeypatch.setenv(NATIVE_ENV, "0")
    native_module.cache_clear()
    try:
        python = run()
    finally:
        monkeypatch.delenv(NATIVE_ENV)
        native_module.cache_clear()
    assert native == python
