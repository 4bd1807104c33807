"""Tests of stream_kpis.core.timebase: durations, labels, RFC 3339 timestamps and as-of times.

Anchor worked out by hand: 2024-01-01T00:00:00Z = 19_723 days after 1970-01-01
(54 years, 13 of them leap: 1972 ... 2020) = 1_704_067_200 s; as 1 h buckets, 473_352.
"""

from __future__ import annotations

import pytest

from stream_kpis.core.timebase import (
    as_of_time,
    duration_label,
    format_rfc3339,
    parse_duration,
    parse_rfc3339_ms,
)

JAN_1_2024_MS = 1_704_067_200_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000


def test_epoch_anchor_is_right():
    assert (54 * 365 + 13) * 86_400 * 1000 == JAN_1_2024_MS
    assert JAN_1_2024_MS // HOUR_MS == 473_352


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("250ms", 250),
        ("10s", 10_000),
        ("5m", 300_000),
        ("1h", 3_600_000),
        ("36h", 129_600_000),
        ("7d", 604_800_000),
        ("30d", 2_592_000_000),
        ("2w", 1_209_600_000),
        (" 7d ", 604_800_000),
        ("7 d", 604_800_000),
        (5000, 5000),  # an int is already milliseconds
    ],
)
def test_parse_duration(text, ms):
    assert parse_duration(text) == ms


@pytest.mark.parametrize(
    "bad",
    ["0s", "0ms", "7", "d", "1.5h", "-1h", "7days", "1y", "", "1h30m", 0, -5, True, None, 1.5],
)
def test_parse_duration_errors(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_parse_duration_error_says_what_to_write():
    with pytest.raises(ValueError, match=r"'7days'.*e\.g\. 10s, 1h, 30d"):
        parse_duration("7days")


@pytest.mark.parametrize(
    ("ms", "label"),
    [
        (7 * DAY_MS, "7d"),
        (2 * 7 * DAY_MS, "14d"),  # weeks are written as days
        (24 * HOUR_MS, "1d"),
        (36 * HOUR_MS, "36h"),
        (HOUR_MS, "1h"),
        (90 * 60_000, "90m"),  # 1.5 h is not whole hours
        (45_000, "45s"),
        (1500, "1500ms"),
    ],
)
def test_duration_label(ms, label):
    assert duration_label(ms) == label


def test_duration_label_round_trips_through_parse():
    for text in ("7d", "36h", "90m", "45s", "1500ms"):
        assert duration_label(parse_duration(text)) == text


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("2024-01-01T00:00:00Z", JAN_1_2024_MS),
        ("2024-01-01T00:00:00+00:00", JAN_1_2024_MS),
        ("2024-01-01t00:00:00z", JAN_1_2024_MS),
        ("2024-01-01 00:00:00Z", JAN_1_2024_MS),  # RFC 3339 allows a space
        # an offset east of UTC is earlier in UTC, west is later
        ("2024-01-01T02:00:00+02:00", JAN_1_2024_MS),
        ("2023-12-31T19:00:00-05:00", JAN_1_2024_MS),
        ("2024-01-01T05:30:00+05:30", JAN_1_2024_MS),
        ("2023-12-31T20:30:00-03:30", JAN_1_2024_MS),
        # fractions: milliseconds, fewer digits, more digits (truncated to the ms)
        ("2024-01-01T00:00:00.250Z", JAN_1_2024_MS + 250),
        ("2024-01-01T00:00:00.5Z", JAN_1_2024_MS + 500),
        ("2024-01-01T00:00:00.123456Z", JAN_1_2024_MS + 123),
        ("2024-01-01T00:00:00.9999999Z", JAN_1_2024_MS + 999),
        ("2023-12-31T21:00:00.001-03:00", JAN_1_2024_MS + 1),
        ("1970-01-01T00:00:00Z", 0),
        ("1969-12-31T23:59:59.999Z", -1),  # parsing is not range checking (events.py does that)
        # Feb 29 2024 exists: Jan 31 + Feb 28 days after Jan 1
        ("2024-02-29T00:00:00Z", JAN_1_2024_MS + 59 * DAY_MS),
    ],
)
def test_parse_rfc3339_ms(text, ms):
    assert parse_rfc3339_ms(text) == ms


@pytest.mark.parametrize(
    "bad",
    [
        "2024-01-01T00:00:00",  # no offset: ambiguous
        "2024-01-01",
        "2024-01-01T00:00Z",  # no seconds
        "2024-01-01T00:00:00+0200",  # offset without colon
        "2024-01-01T00:00:00+02",
        "2024-01-01T00:00:00.Z",
        "2023-02-29T00:00:00Z",  # 2023 is not a leap year
        "2024-13-01T00:00:00Z",
        "2024-01-01T24:00:01Z",
        "2024-01-01T00:00:00+24:00",
        "1704067200000",
        " 2024-01-01T00:00:00Z",
        "",
    ],
)
def test_parse_rfc3339_errors(bad):
    with pytest.raises(ValueError):
        parse_rfc3339_ms(bad)


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "1970-01-01T00:00:00Z"),
        (JAN_1_2024_MS, "2024-01-01T00:00:00Z"),
        (JAN_1_2024_MS + 30 * DAY_MS, "2024-01-31T00:00:00Z"),
        (JAN_1_2024_MS + 7, "2024-01-01T00:00:00.007Z"),
        (JAN_1_2024_MS + 36 * HOUR_MS + 250, "2024-01-02T12:00:00.250Z"),
        (-1, "1969-12-31T23:59:59.999Z"),
    ],
)
def test_format_rfc3339(ms, text):
    assert format_rfc3339(ms) == text
    assert parse_rfc3339_ms(text) == ms


def test_as_of_time_is_the_end_of_bucket_k():
    # hourly bucket 473_352 is [00:00, 01:00) on 2024-01-01: as of its end, 01:00
    assert as_of_time(473_352, HOUR_MS) == "2024-01-01T01:00:00Z"
    # daily bucket of 2024-01-30 (19_723 + 29) ends at 2024-01-31T00:00Z (the SPEC example)
    assert as_of_time(19_752, DAY_MS) == "2024-01-31T00:00:00Z"


def test_format_rfc3339_agrees_with_datetime_isoformat():
    """The arithmetic formatter against datetime's own ISO formatting, over 1970-2100."""
    import random
    from datetime import UTC, datetime

    rng = random.Random(7)
    stamps = [rng.randrange(-DAY_MS, 4_102_444_800_000) for _ in range(20_000)]
    stamps += [s - s % 1000 for s in stamps[:2000]]  # whole seconds: no fraction
    for ms in stamps:
        moment = datetime.fromtimestamp(ms // 1000, UTC).replace(microsecond=ms % 1000 * 1000)
        expected = moment.isoformat(timespec="milliseconds" if ms % 1000 else "seconds")
        assert format_rfc3339(ms) == expected.replace("+00:00", "Z"), ms
