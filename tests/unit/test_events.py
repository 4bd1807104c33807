"""Tests of stream_kpis.core.events: every dead-letter reason the parser produces, valid events of each
type (epoch ms worked out by hand), guests, and the dead-letter record.

Epoch anchors used below, by hand: 2024-01-01T00:00:00Z = 1_704_067_200 s (19_723 days * 86_400).
"""

from __future__ import annotations

import base64

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_kpis.core.events import (
    ENROLLMENT,
    PURCHASE,
    REASONS,
    REDEMPTION,
    SURVEY,
    DeadLetter,
    Event,
    EventParser,
)

JAN_1_2024_MS = 1_704_067_200_000
HOUR_MS = 3_600_000

VALID = {
    PURCHASE: {"event_id": "p1", "member_id": "m1", "ts": JAN_1_2024_MS, "amount": 12.5},
    REDEMPTION: {"event_id": "r1", "member_id": "m1", "ts": JAN_1_2024_MS, "points": 100},
    ENROLLMENT: {"event_id": "e1", "member_id": "m1", "ts": JAN_1_2024_MS},
    SURVEY: {"event_id": "s1", "member_id": "m1", "ts": JAN_1_2024_MS, "nps": 9},
}


@pytest.fixture
def parser() -> EventParser:
    return EventParser()


def with_fields(kind: str, **changes) -> bytes:
    """The valid example of ``kind`` with fields changed (a value of ... removes the field)."""
    obj = {**VALID[kind], **changes}
    return orjson.dumps({k: v for k, v in obj.items() if v is not ...})


def reason(item: Event | DeadLetter) -> str:
    assert isinstance(item, DeadLetter), f"expected a dead letter, got {item!r}"
    assert item.reason in REASONS
    return item.reason


# --- dead letters ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b'{"event_id": "p1", "ts": 1, "amount": NaN}',  # NaN is not JSON
        b'{"event_id": "p1", "ts": 1, "amount": Infinity}',
        b'{"event_id": "p1", "ts": 1, "amount": -Infinity}',
        b'{"event_id": "p\xff1", "ts": 1, "amount": 1}',  # invalid UTF-8
        b'{"event_id": "p1"} trailing',
        b"",
    ],
    ids=["garbage", "nan", "infinity", "minus-infinity", "invalid-utf8", "trailing", "empty"],
)
def test_malformed_json(parser, raw):
    dead = parser.parse(raw, PURCHASE)
    assert reason(dead) == "malformed_json"
    assert dead.raw == raw  # the original bytes travel with the dead letter


def test_number_outside_double_range_is_a_dead_letter_not_a_crash(parser):
    # 1e999 overflows a double. orjson refuses to decode it, so it is reported as malformed_json
    # (the REASONS comment: NaN/Infinity are malformed). A decoded infinite value (a mapped CSV
    # cell "1e999" -> float inf) reaches validation and is a bad_value, see below.
    assert reason(parser.parse(with_fields(PURCHASE).replace(b"12.5", b"1e999"), PURCHASE)) == (
        "malformed_json")


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"purchase"', b"42", b"null", b"true"])
def test_not_an_object(parser, raw):
    assert reason(parser.parse(raw, PURCHASE)) == "not_an_object"


def test_too_large_is_checked_before_decoding():
    raw = with_fields(ENROLLMENT)
    assert isinstance(EventParser(max_event_bytes=len(raw)).parse(raw, ENROLLMENT), Event)
    dead = EventParser(max_event_bytes=len(raw) - 1).parse(raw, ENROLLMENT)
    assert reason(dead) == "too_large"
    # even garbage is "too large" first: nothing over the limit is decoded
    assert reason(EventParser(max_event_bytes=3).parse(b"{not json", PURCHASE)) == "too_large"


@pytest.mark.parametrize(
    ("kind", "changes"),
    [
        (PURCHASE, {"event_id": ...}),
        (PURCHASE, {"event_id": None}),
        (PURCHASE, {"ts": ...}),
        (PURCHASE, {"ts": None}),
        (PURCHASE, {"amount": ...}),
        (REDEMPTION, {"member_id": ...}),
        (REDEMPTION, {"member_id": None}),  # only purchases and surveys may be anonymous
        (REDEMPTION, {"points": ...}),
        (ENROLLMENT, {"member_id": ...}),
        (SURVEY, {"nps": ...}),  # neither nps nor csat
        (SURVEY, {"nps": None, "csat": None}),
    ],
)
def test_missing_field(parser, kind, changes):
    assert reason(parser.parse(with_fields(kind, **changes), kind)) == "missing_field"


@pytest.mark.parametrize(
    ("kind", "changes"),
    [
        (PURCHASE, {"amount": True}),  # a bool is not a number
        (PURCHASE, {"amount": "12.5"}),
        (PURCHASE, {"points": "10"}),
        (PURCHASE, {"points": 10.0}),  # points are an integer
        (PURCHASE, {"ts": 1_704_067_200_000.0}),  # epoch ms must be an int
        (PURCHASE, {"ts": True}),
        (PURCHASE, {"event_id": 7}),
        (PURCHASE, {"member_id": 7}),
        (PURCHASE, {"channel": 3}),
        (PURCHASE, {"margin": "high"}),
        (REDEMPTION, {"points": "100"}),
        (REDEMPTION, {"value": [1]}),
        (SURVEY, {"nps": 9.5}),
        (SURVEY, {"comment": {"text": "slow"}}),
    ],
)
def test_bad_type(parser, kind, changes):
    assert reason(parser.parse(with_fields(kind, **changes), kind)) == "bad_type"


@pytest.mark.parametrize(
    ("kind", "changes"),
    [
        (SURVEY, {"nps": 11}),
        (SURVEY, {"nps": -1}),
        (SURVEY, {"nps": ..., "csat": 0}),
        (SURVEY, {"nps": ..., "csat": 6}),
        (REDEMPTION, {"points": 0}),  # a redemption redeems at least one point
        (REDEMPTION, {"points": -5}),
        (REDEMPTION, {"value": -1.0}),
        (PURCHASE, {"points": -1}),
        (PURCHASE, {"member_id": ""}),
        (ENROLLMENT, {"member_id": ""}),
        (ENROLLMENT, {"event_id": ""}),
        (ENROLLMENT, {"event_id": "x" * 257}),  # ids are 1 to 256 characters
    ],
)
def test_bad_value(parser, kind, changes):
    assert reason(parser.parse(with_fields(kind, **changes), kind)) == "bad_value"


def test_longest_id_is_accepted(parser):
    assert isinstance(parser.parse(with_fields(ENROLLMENT, event_id="x" * 256), ENROLLMENT), Event)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_infinite_or_nan_decoded_number_is_bad_value(parser, value):
    # what a mapped CSV cell "1e999" or "nan" becomes after float(); validate() sees it
    obj = {**VALID[PURCHASE], "amount": value}
    assert reason(parser.validate(obj, b"row", PURCHASE)) == "bad_value"
    obj = {**VALID[PURCHASE], "margin": value}
    assert reason(parser.validate(obj, b"row", PURCHASE)) == "bad_value"


@pytest.mark.parametrize(
    "ts",
    [
        "2024-01-01T00:00:00",  # no offset
        "2024-01-01",
        "2024-01-01 00:00:00",
        "01/01/2024 00:00Z",
        "2024-02-30T00:00:00Z",  # no such day
        "2200-01-01T00:00:00Z",  # after 2100
        "1969-12-31T23:59:59Z",  # before 1970
        -1,
        4_102_444_800_000,  # 2100-01-01T00:00:00Z itself is out of range
        "yesterday",
    ],
)
def test_bad_timestamp(parser, ts):
    assert reason(parser.parse(with_fields(ENROLLMENT, ts=ts), ENROLLMENT)) == "bad_timestamp"


def test_timestamp_range_edges(parser):
    assert parser.parse(with_fields(ENROLLMENT, ts=0), ENROLLMENT).ts == 0
    last_ok = 4_102_444_800_000 - 1  # one ms before 2100
    assert parser.parse(with_fields(ENROLLMENT, ts=last_ok), ENROLLMENT).ts == last_ok


def test_negative_amount(parser):
    assert reason(parser.parse(with_fields(PURCHASE, amount=-0.01), PURCHASE)) == "negative_amount"
    assert parser.parse(with_fields(PURCHASE, amount=0), PURCHASE).amount == 0.0


def test_future_timestamp_only_when_now_is_given(parser):
    now = JAN_1_2024_MS
    skew = parser.max_skew_ms
    assert skew == HOUR_MS  # SPEC default: 1 h
    late = with_fields(PURCHASE, ts=now + skew + 1)
    assert reason(parser.parse(late, PURCHASE, now_ms=now)) == "future_timestamp"
    # exactly at wall clock + max skew is still accepted
    assert isinstance(parser.parse(with_fields(PURCHASE, ts=now + skew), PURCHASE, now_ms=now), Event)
    # replay (no wall clock): the same line is fine
    assert isinstance(parser.parse(late, PURCHASE), Event)
    strict = EventParser(max_skew_ms=1000)
    assert reason(strict.parse(with_fields(PURCHASE, ts=now + 1001), PURCHASE, now_ms=now)) == (
        "future_timestamp")


def test_unknown_type_when_the_type_is_read_from_the_line(parser):
    refund = orjson.dumps({**VALID[PURCHASE], "type": "refund"})
    assert reason(parser.parse(refund, None)) == "unknown_type"
    untyped = orjson.dumps(VALID[PURCHASE])
    assert reason(parser.parse(untyped, None)) == "unknown_type"
    # with the type given by the topic, a stray "type" field is not read
    assert isinstance(parser.parse(refund, PURCHASE), Event)
    typed = orjson.dumps({**VALID[REDEMPTION], "type": "redemption"})
    assert parser.parse(typed, None).type == REDEMPTION


def test_validate_takes_decoded_objects(parser):
    assert reason(parser.validate([1], b"[1]", PURCHASE)) == "not_an_object"
    assert parser.validate(dict(VALID[SURVEY]), b"", SURVEY).nps == 9


# --- valid events -----------------------------------------------------------------------------


def test_purchase_with_rfc3339_offset_and_fraction(parser):
    # 2024-03-10T12:30:00.250+02:00 = 10:30:00.250Z. March 10 is day 31 + 29 (leap Feb) + 9 = 69
    # after Jan 1: 1_704_067_200 + 69 * 86_400 = 1_710_028_800 s; + 10.5 h = 37_800 s -> ms + 250
    raw = orjson.dumps({
        "event_id": "p-9", "member_id": "m-9", "ts": "2024-03-10T12:30:00.250+02:00",
        "amount": 19.9, "points": 20, "margin": -1.5, "currency": "EUR", "channel": "web",
        "store_id": "s1", "tier": "gold",
    })
    event = parser.parse(raw, PURCHASE)
    assert isinstance(event, Event)
    assert event.ts == 1_710_066_600_250
    assert (event.type, event.event_id, event.member_id) == (PURCHASE, "p-9", "m-9")
    assert (event.amount, event.points, event.margin) == (19.9, 20, -1.5)
    assert (event.channel, event.tier) == ("web", "gold")
    assert event.partition_key == "m-9"


def test_purchase_defaults(parser):
    event = parser.parse(with_fields(PURCHASE, amount=3), PURCHASE)
    assert event.amount == 3.0 and isinstance(event.amount, float)
    assert event.points == 0  # no points field: nothing earned
    assert event.margin is None and event.tier is None


@pytest.mark.parametrize("member", [None, ...], ids=["null", "absent"])
def test_guest_purchase(parser, member):
    event = parser.parse(with_fields(PURCHASE, member_id=member), PURCHASE)
    assert isinstance(event, Event)
    assert event.member_id is None
    assert event.partition_key == "p1"  # guests are keyed by event_id


def test_redemption_with_negative_offset(parser):
    # 2023-12-31T19:00:00-05:00 is 2024-01-01T00:00:00Z
    raw = with_fields(REDEMPTION, ts="2023-12-31T19:00:00-05:00", value=4.5, reward_id="rw")
    event = parser.parse(raw, REDEMPTION)
    assert event.ts == JAN_1_2024_MS
    assert (event.points, event.value) == (100, 4.5)


def test_enrollment_with_z_and_epoch(parser):
    # 2024-01-02T03:04:05Z = Jan 1 + 1 day + 3 h 4 min 5 s = 1_704_067_200 + 86_400 + 11_045 s
    raw = with_fields(ENROLLMENT, ts="2024-01-02T03:04:05Z", channel="app", tier="silver")
    event = parser.parse(raw, ENROLLMENT)
    assert event.ts == 1_704_164_645_000
    assert (event.channel, event.tier) == ("app", "silver")
    assert parser.parse(with_fields(ENROLLMENT), ENROLLMENT).channel is None


@pytest.mark.parametrize(
    ("scores", "expected"),
    [({"nps": 0}, (0, None)), ({"nps": ..., "csat": 5}, (None, 5)),
     ({"nps": 10, "csat": 1}, (10, 1))],
)
def test_survey_needs_nps_or_csat(parser, scores, expected):
    event = parser.parse(with_fields(SURVEY, comment="Lento", **scores), SURVEY)
    assert (event.nps, event.csat) == expected
    assert event.comment == "Lento"


def test_anonymous_survey(parser):
    event = parser.parse(with_fields(SURVEY, member_id=None), SURVEY)
    assert event.member_id is None and event.partition_key == "s1"


# --- dead-letter records --------------------------------------------------------------------


def test_dead_letter_record_keeps_utf8_text():
    raw = '{"event_id": "é", "ts": "x"}'.encode()
    dead = EventParser().parse(raw, ENROLLMENT)
    dead.topic, dead.partition, dead.offset = "loyalty.enrollments", 3, 42
    record = dead.to_record()
    assert record["reason"] == "bad_timestamp"
    assert (record["topic"], record["partition"], record["offset"]) == ("loyalty.enrollments", 3, 42)
    assert record["value"] == '{"event_id": "é", "ts": "x"}'
    assert "value_base64" not in record
    assert record["detail"]


def test_dead_letter_record_base64_for_non_utf8():
    raw = b'{"a": "\xff\xfe"}'
    record = EventParser().parse(raw, PURCHASE).to_record()
    assert record["reason"] == "malformed_json"
    # not text: the original bytes travel base64-encoded and decode back to themselves
    assert base64.b64decode(record["value_base64"]) == raw
    assert "value" not in record
    assert record["topic"] is None and record["offset"] is None
    orjson.dumps(record)  # serialisable as it is sent to the DLQ topic


def test_dead_letter_record_base64_small_example():
    # b"\xff\xfe" is 11111111 11111110 -> 6-bit groups 111111 111111 111000 (+ pad) -> "//4="
    assert DeadLetter("malformed_json", "x", b"\xff\xfe").to_record()["value_base64"] == "//4="


# ---- the one-pass validation equals the check-by-check one ------------------------------------

_ANY_VALUE = (st.none() | st.booleans() | st.integers(-3, 12) | st.integers(-2**70, 2**70)
              | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(["", "x", "7"])
              | st.text(max_size=3) | st.just("y" * 257) | st.just([1]) | st.just({"a": 1})
              | st.sampled_from(["2024-01-01T00:00:00Z", "2024-01-01T01:00:00+01:00",
                                 "2024-01-01", "2101-01-01T00:00:00Z", "1969-12-31T23:59:59Z"])
              | st.sampled_from([JAN_1_2024_MS, -1, 4_102_444_800_000, 4_102_444_799_999]))
_FIELD_NAMES = ("type", "event_id", "member_id", "ts", "amount", "points", "margin", "value",
                "channel", "tier", "nps", "csat", "comment", "store_id", "currency", "reward_id")
_LIKELY = {"type": st.sampled_from([PURCHASE, REDEMPTION, ENROLLMENT, SURVEY, "refund"]),
           "event_id": st.sampled_from(["e1", "", "z" * 256]),
           "member_id": st.none() | st.just("m1"),
           "ts": st.sampled_from([JAN_1_2024_MS, "2024-01-01T00:00:00Z"]),
           "amount": st.floats(-1, 100) | st.integers(-1, 100),
           "points": st.integers(-1, 100), "nps": st.integers(-1, 11), "csat": st.integers(0, 6)}


def _fields(event: Event) -> tuple:
    return tuple((name, getattr(event, name), type(getattr(event, name))) for name in Event.__slots__)


@given(obj=st.fixed_dictionaries({}, optional={
           name: (_LIKELY[name] | _ANY_VALUE) if name in _LIKELY else _ANY_VALUE
           for name in _FIELD_NAMES}),
       event_type=st.none() | st.sampled_from([PURCHASE, REDEMPTION, ENROLLMENT, SURVEY]),
       now_ms=st.none() | st.sampled_from([JAN_1_2024_MS - 4 * HOUR_MS, JAN_1_2024_MS]))
@settings(max_examples=1500, deadline=None)
def test_validate_equals_the_check_by_check_validation(obj, event_type, now_ms):
    """validate's one-pass path gives the same Event, or the same dead letter and detail, as
    checking each rule in turn (mostly valid objects, and objects with any field wrong)."""
    parser = EventParser()
    got = parser.validate(dict(obj), b"raw", event_type, now_ms)
    want = parser._validate_fully(dict(obj), b"raw", event_type, now_ms)
    assert type(got) is type(want)
    if isinstance(want, Event):
        assert _fields(got) == _fields(want)
    else:
        assert (got.reason, got.detail) == (want.reason, want.detail)


def test_a_type_that_is_not_a_string_is_an_unknown_type():
    for kind in ([1], {"a": 1}, 3):
        dead = EventParser().validate({**VALID[PURCHASE], "type": kind}, b"x")
        assert isinstance(dead, DeadLetter) and dead.reason == "unknown_type", kind
