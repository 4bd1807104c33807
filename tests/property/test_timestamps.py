"""Property tests of the timestamp parsers of stream_kpis.core.timebase against the standard
library, on generated text: well-formed, out of range (month 13, Feb 30, hour 24, second 60,
offset 24:00), not zero-padded, with other separators, other digits and garbage. Both must give
the same epoch ms, or both a ValueError (a CSV row's dead letter, bad_timestamp): strptime_ms's
fast path for zero-padded text and its strptime fallback, and parse_rfc3339_ms.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from stream_kpis.core.timebase import parse_rfc3339_ms, strptime_ms

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _outcome(parse, text: str) -> int | str:
    try:
        return parse(text)
    except ValueError:
        return "ValueError"


def _stdlib_rfc3339(text: str) -> int:
    """What RFC 3339 means, by datetime.fromisoformat (which reads more than RFC 3339: the
    parser's shape check comes first)."""
    moment = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in "Zz" else text)
    if moment.tzinfo is None:
        raise ValueError("no offset")
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def _padded(low: int, high: int, width: int) -> st.SearchStrategy[str]:
    return st.integers(low, high).map(lambda n: f"{n:0{width}d}")


def _number(low: int, high: int, width: int) -> st.SearchStrategy[str]:
    """Zero-padded mostly; sometimes not padded, too wide, or other digits."""
    return st.one_of(
        _padded(low, high, width),
        st.integers(low, high).map(str),
        st.integers(low, high).map(lambda n: f"{n:0{width + 1}d}"),
        st.integers(low, high).map(lambda n: f"{n:0{width}d}".replace("2", "\u0662")),  # Arabic-Indic
    )


years, months, days = _number(0, 10_000, 4), _number(0, 13, 2), _number(0, 32, 2)
hours, minutes, seconds = _number(0, 25, 2), _number(0, 61, 2), _number(0, 61, 2)
garbage = st.text(alphabet="0123456789-:T tZz+.\u0662/", max_size=30)

offsets = st.one_of(st.sampled_from(["Z", "z", "", "+00:00", "-00:00"]),
                    st.builds(lambda sign, h, m: f"{sign}{h}:{m}", st.sampled_from("+-"),
                              _number(0, 25, 2), _number(0, 61, 2)))
fractions = st.one_of(st.just(""), st.text(alphabet="0123456789", min_size=0, max_size=9)
                      .map(lambda digits: "." + digits))
rfc3339_texts = st.one_of(
    st.builds(lambda y, mo, d, sep, h, mi, s, f, off: f"{y}-{mo}-{d}{sep}{h}:{mi}:{s}{f}{off}",
              years, months, days, st.sampled_from("Tt x"), hours, minutes, seconds, fractions,
              offsets),
    # the fast path's shape, with values out of range
    st.builds(lambda y, mo, d, h, mi, s, off: f"{y}-{mo}-{d}T{h}:{mi}:{s}.123{off}",
              _padded(0, 9999, 4), _padded(0, 13, 2), _padded(0, 32, 2), _padded(0, 25, 2),
              _padded(0, 61, 2), _padded(0, 61, 2),
              st.sampled_from(["Z", "+24:00", "-23:59", "+01:60", "+00:00"])),
    garbage)


@settings(max_examples=1000, deadline=None)
@given(text=rfc3339_texts)
def test_parse_rfc3339_ms_agrees_with_datetime(text):
    got = _outcome(parse_rfc3339_ms, text)
    if got != "ValueError":  # RFC 3339 is a subset of what fromisoformat reads
        assert got == _outcome(_stdlib_rfc3339, text), text


@settings(max_examples=300, deadline=None)
@given(moment=st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31)),
       offset=st.sampled_from(["Z", "+05:30", "-11:00", "+00:00"]))
def test_parse_rfc3339_ms_reads_every_well_formed_timestamp(moment, offset):
    text = moment.isoformat(timespec="microseconds") + offset
    assert parse_rfc3339_ms(text) == _stdlib_rfc3339(text)


PATTERNS = ["%Y-%m-%d %H:%M", "%d/%m/%Y %H:%M:%S", "%Y%m%d%H%M%S", "%Y-%m-%dT%H:%M:%SZ",
            "%m/%d/%Y", "%H:%M %d.%m.%Y", "%Y-%m-%d %H:%M:%S%z", "%Y-%m-%d %I %p"]


def _strptime_ms(pattern: str, text: str) -> int:
    moment = datetime.strptime(text, pattern)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _strptime_texts(pattern: str) -> st.SearchStrategy[str]:
    pieces = {"Y": years, "m": months, "d": days, "H": hours, "M": minutes, "S": seconds,
              "z": st.sampled_from(["+0200", "Z", "-0130"]), "I": _number(0, 13, 2),
              "p": st.sampled_from(["AM", "pm"])}
    parts = pattern.split("%")
    strategies = [st.just(parts[0])]
    for part in parts[1:]:
        strategies += [pieces[part[0]], st.sampled_from([part[1:], part[1:].upper(), "  "])]
    padded = {"Y": _padded(0, 9999, 4), "m": _padded(0, 13, 2), "d": _padded(0, 32, 2),
              "H": _padded(0, 25, 2), "M": _padded(0, 61, 2), "S": _padded(0, 61, 2)}
    fixed_width = [st.just(parts[0])]  # the fast path's shape, with values out of range
    for part in parts[1:]:
        fixed_width += [padded.get(part[0], pieces[part[0]]), st.just(part[1:])]
    return st.one_of(st.tuples(*strategies).map("".join), st.tuples(*fixed_width).map("".join),
                     garbage)


@settings(max_examples=2000, deadline=None)
@given(data=st.data(), pattern=st.sampled_from(PATTERNS))
def test_strptime_ms_agrees_with_strptime(data, pattern):
    text = data.draw(_strptime_texts(pattern))
    assert _outcome(strptime_ms(pattern), text) == \
        _outcome(lambda t: _strptime_ms(pattern, t), text), (pattern, text)


@settings(max_examples=1000, deadline=None)
@given(moment=st.datetimes(min_value=datetime(1000, 1, 1), max_value=datetime(9999, 12, 31)),
       pattern=st.sampled_from(PATTERNS[:6]))  # strftime writes years before 1000 unpadded
def test_strptime_ms_reads_what_strftime_writes(moment, pattern):
    text = moment.strftime(pattern)
    assert strptime_ms(pattern)(text) == _strptime_ms(pattern, text), (pattern, text)
