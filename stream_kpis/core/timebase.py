"""Time: durations, timestamps, buckets and windows (pure).

Event time is quantized into buckets of width ``bucket_ms``; bucket k = ts // bucket_ms.
A window of w buckets "as of" bucket K covers [K - w + 1, K]. Timestamps in buckets after K
count as K (the range sums of :mod:`stream_kpis.core.kpis` clamp them).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from functools import lru_cache

__all__ = [
    "parse_duration",
    "duration_label",
    "parse_rfc3339_ms",
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

