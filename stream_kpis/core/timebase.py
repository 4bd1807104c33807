"""Time: durations, timestamps, buckets and windows (pure).

Event time is quantized into buckets of width ``bucket_ms``; bucket k = ts // bucket_ms.
A window of w buckets "as of" bucket K covers [K - w + 1, K]. Timestamps in buckets after K
count as K (the range sums of :mod:`stream_kpis.core.kpis` clamp them).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache

__all__ = [
    "parse_duration",
    "duration_label",
    "parse_rfc3339_ms",
    "strptime_ms",
    "format_rfc3339",
    "as_of_time",
]

_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_DURATION_RE = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d|w)\s*$")


def parse_duration(text: str | int) -> int:
    """Parse ``"1h"``, ``"7d"``, ``"250ms"`` (or an int of milliseconds) into milliseconds."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ValueError(f"duration must be positive, got {text}")
        return text
    if not isinstance(text, str):
        raise ValueError(f"duration must be a string like '7d', got {text!r}")
    match = _DURATION_RE.match(text)
    if not match:
        raise ValueError(f"cannot read duration {text!r}: write a number and a unit, e.g. 10s, 1h, 30d")
    value = int(match.group(1)) * _UNITS_MS[match.group(2)]
    if value <= 0:
        raise ValueError(f"duration must be positive, got {text!r}")
    return value


def duration_label(ms: int) -> str:
    """The canonical short label of a duration: whole days as ``7d``, else hours, minutes, seconds."""
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)
_RFC3339_RE = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$"
)


def parse_rfc3339_ms(text: str) -> int:
    """RFC 3339 timestamp with an offset (``Z`` or ``+02:00``) to epoch milliseconds.

    Raises ValueError when the text is not RFC 3339 or has no offset.
    """
    if not _RFC3339_RE.match(text):
        raise ValueError(f"not an RFC 3339 timestamp with offset: {text[:40]!r}")
    if text[-1] in "Zz":
        text = text[:-1] + "+00:00"
    return (datetime.fromisoformat(text) - _EPOCH) // _ONE_MS


_EPOCH_ORDINAL = _EPOCH.toordinal()


@lru_cache(maxsize=65_536)
def _epoch_day(year: int, month: int, day: int) -> int | None:
    """Days since the epoch of a date; None when there is no such date."""
    try:
        return date(year, month, day).toordinal() - _EPOCH_ORDINAL
    except ValueError:
        return None


# strptime directives with a fixed-width zero-padded form, and that form
_FIXED_DIRECTIVES = {"Y": r"(\d{4})", "m": r"(\d{2})", "d": r"(\d{2})", "H": r"(\d{2})",
                     "M": r"(\d{2})", "S": r"(\d{2})"}


def strptime_ms(pattern: str) -> Callable[[str], int]:
    """A parser of timestamps written by ``pattern`` (a strptime pattern; naive is UTC) to epoch
    ms, as ``datetime.strptime`` reads them (same values, same ValueError).

    A pattern of ``%Y %m %d %H %M %S`` and literal text reads the zero-padded form (what an
    export writes) by a fixed-width regex and integer arithmetic, ~4x faster; any other text, and
    any other pattern, goes through ``datetime.strptime``.
    """

    def reference(text: str) -> int:
        moment = datetime.strptime(text, pattern)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return int(moment.timestamp() * 1000)

    fast = _fixed_width_re(pattern)
    if fast is None:
        return reference
    names = re.findall(r"%(.)", pattern)
    if "Y" not in names or "m" not in names or "d" not in names or len(set(names)) != len(names):
        return reference  # a missing date part defaults to 1900-01-01; repeats: strptime's rules
    # the group of each of Y m d H M S; a time part the pattern lacks reads the "0" put last
    at = [names.index(name) if name in names else len(names) for name in "YmdHMS"]
    year, month, day, hour, minute, second = at
    match_pattern = fast.fullmatch

    def parse(text: str) -> int:
        match = match_pattern(text)
        if match is not None:
            values = (*match.groups(), "0")
            days = _epoch_day(int(values[year]), int(values[month]), int(values[day]))
            h, m, s = int(values[hour]), int(values[minute]), int(values[second])
            if days is not None and h < 24 and m < 60 and s < 60:
                return ((days * 24 + h) * 60 + m) * 60_000 + s * 1000
        return reference(text)  # not the zero-padded form, or no such date or time: strptime's

    return parse


def _fixed_width_re(pattern: str) -> re.Pattern | None:
    """The fixed-width form of a strptime pattern made of _FIXED_DIRECTIVES and literal text
    (None for any other directive); text it matches, strptime matches the same way."""
    parts = re.split(r"(%.)", pattern)
    regex = []
    for index, part in enumerate(parts):
        if index % 2:
            directive = _FIXED_DIRECTIVES.get(part[1])
            if directive is None:
                return None
            regex.append(directive)
        else:
            if "%" in part:
                return None  # a trailing lone %
            regex.append(re.escape(part))
    return re.compile("".join(regex), re.ASCII)


_DAY_MS = 86_400_000
# the pieces of a time of day: "HH:MM:" per minute, "SS" per second, ".mmmZ" per millisecond
_MINUTES = [f"{hour:02d}:{minute:02d}:" for hour in range(24) for minute in range(60)]
_SECONDS = [f"{second:02d}" for second in range(60)]
_MILLIS = ["Z"] + [f".{milli:03d}Z" for milli in range(1, 1000)]


@lru_cache(maxsize=4096)
def _date_prefix(day: int) -> str:
    """``YYYY-MM-DDT`` of a day since the epoch."""
    return (_EPOCH + timedelta(days=day)).strftime("%Y-%m-%dT")


def format_rfc3339(ms: int) -> str:
    """Epoch milliseconds to an RFC 3339 UTC string (``2024-01-31T00:00:00Z``, with ``.mmm``
    when there are milliseconds).

    Assembled from cached dates and tables of the pieces of a time of day: the live worker
    formats a timestamp per changed member and signal, and a datetime per call was most of it."""
    day, rest = divmod(ms, _DAY_MS)
    minute, rest = divmod(rest, 60_000)
    second, milli = divmod(rest, 1000)
    return _date_prefix(day) + _MINUTES[minute] + _SECONDS[second] + _MILLIS[milli]


def as_of_time(bucket: int, bucket_ms: int) -> str:
    """The ``as_of`` reported with a value: the end of bucket K as RFC 3339 UTC."""
    return format_rfc3339((bucket + 1) * bucket_ms)

