"""Parse and validate raw input bytes into typed events, or into a dead letter with a reason (pure).

Nothing here raises on bad input: :meth:`EventParser.parse` returns either an :class:`Event` or a
:class:`DeadLetter` whose ``reason`` is one of :data:`REASONS`. See SPEC section 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import orjson

from .timebase import parse_rfc3339_ms

__all__ = [
    "PURCHASE",
    "REDEMPTION",
    "ENROLLMENT",
    "SURVEY",
    "EVENT_TYPES",
    "REASONS",
    "Event",
    "DeadLetter",
    "EventParser",
]

PURCHASE = "purchase"
REDEMPTION = "redemption"
ENROLLMENT = "enrollment"
SURVEY = "survey"
EVENT_TYPES = (PURCHASE, REDEMPTION, ENROLLMENT, SURVEY)

#: Machine-readable dead-letter reasons.
REASONS = (
    "malformed_json",    # not JSON, or not UTF-8, or NaN/Infinity literals
    "not_an_object",     # valid JSON but not an object
    "too_large",         # message over max_event_bytes
    "missing_field",     # a required field is absent or null
    "bad_type",          # a field has the wrong JSON type
    "bad_value",         # right type, impossible value (empty id, nps 11, points 0 on a redemption)
    "bad_timestamp",     # ts not RFC 3339 with offset / epoch ms, before 1970 or after 2100
    "negative_amount",   # purchase amount < 0
    "future_timestamp",  # live mode only: ts beyond wall clock + max skew
    "unknown_type",      # replay only: the line's "type" is not one of EVENT_TYPES
    "wrong_key",         # live only: the Kafka key is not the member_id (or event_id for guests)
)

_MAX_TS = 4_102_444_800_000  # 2100-01-01T00:00:00Z: later timestamps are data errors
_MAX_ID_LEN = 256
_OPTIONAL_STRINGS = ("channel", "tier", "store_id", "currency", "reward_id", "comment")


class Event:
    """A validated event. Fields a type does not carry are None (points defaults to 0)."""

    __slots__ = ("type", "event_id", "member_id", "ts", "amount", "points", "margin", "value",
                 "channel", "tier", "nps", "csat", "comment", "store_id")

    def __init__(self, type: str, event_id: str, member_id: str | None, ts: int, *,
                 amount: float | None = None, points: int = 0, margin: float | None = None,
                 value: float | None = None, channel: str | None = None, tier: str | None = None,
                 nps: int | None = None, csat: int | None = None, comment: str | None = None,
                 store_id: str | None = None) -> None:
        self.type = type
        self.event_id = event_id
        self.member_id = member_id
        self.ts = ts
        self.amount = amount
        self.points = points
        self.margin = margin
        self.value = value
        self.channel = channel
        self.tier = tier
        self.nps = nps
        self.csat = csat
        self.comment = comment
        self.store_id = store_id

    @property
    def partition_key(self) -> str:
        """The Kafka key this event must carry: member_id, or event_id for guest events."""
        return self.member_id if self.member_id is not None else self.event_id

    def __repr__(self) -> str:
        return f"Event({self.type}, {self.event_id!r}, ts={self.ts})"


class DeadLetter:
    """Input that cannot be applied, with the reason and where it came from."""

    __slots__ = ("reason", "detail", "raw", "topic", "partition", "offset")

    def __init__(self, reason: str, detail: str, raw: bytes, topic: str | None = None,
                 partition: int | None = None, offset: int | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.raw = raw
        self.topic = topic
        self.partition = partition
        self.offset = offset

    def to_record(self) -> dict[str, Any]:
        """The SPEC section 1 dead-letter record (original bytes as text, or base64 if not UTF-8)."""
        try:
            original: dict[str, str] = {"value": self.raw.decode("utf-8")}
        except UnicodeDecodeError:
            import base64

            original = {"value_base64": base64.b64encode(self.raw).decode("ascii")}
        return {"reason": self.reason, "detail": self.detail, "topic": self.topic,
                "partition": self.partition, "offset": self.offset, **original}

    def __repr__(self) -> str:
        return f"DeadLetter({self.reason}: {self.detail})"


class _Invalid(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail


def _require(obj: Mapping[str, Any], name: str) -> Any:
    value = obj.get(name)
    if value is None:
        raise _Invalid("missing_field", f"required field {name!r} is missing")
    return value


def _id(obj: Mapping[str, Any], name: str, required: bool) -> str | None:
    value = obj.get(name)
    if value is None:
        if required:
            raise _Invalid("missing_field", f"required field {name!r} is missing")
        return None
    if type(value) is not str:
        raise _Invalid("bad_type", f"{name} must be a string, got {type(value).__name__}")
    if not value or len(value) > _MAX_ID_LEN:
        raise _Invalid("bad_value", f"{name} must be 1 to {_MAX_ID_LEN} characters")
    return value


def _timestamp(value: Any) -> int:
    if type(value) is int:
        ts = value
    elif type(value) is str:
        try:
            ts = parse_rfc3339_ms(value)
        except ValueError:
            raise _Invalid("bad_timestamp", "ts must be RFC 3339 with offset or epoch ms") from None
    else:
        raise _Invalid("bad_type", f"ts must be epoch ms (int) or RFC 3339 string, got "
                                   f"{type(value).__name__}")
    if not 0 <= ts < _MAX_TS:
        raise _Invalid("bad_timestamp", "ts must be between 1970 and 2100")
    return ts


def _number(obj: Mapping[str, Any], name: str, required: bool) -> float | None:
    value = obj.get(name)
    if value is None:
        if required:
            raise _Invalid("missing_field", f"required field {name!r} is missing")
        return None
    if type(value) is float:
        if not math.isfinite(value):
            raise _Invalid("bad_value", f"{name} must be finite")
        return value
    if type(value) is int:
        return float(value)
    raise _Invalid("bad_type", f"{name} must be a number, got {type(value).__name__}")


def _int_in(obj: Mapping[str, Any], name: str, low: int, high: int | None) -> int | None:
    value = obj.get(name)
    if value is None:
        return None
    if type(value) is not int:
        raise _Invalid("bad_type", f"{name} must be an integer, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise _Invalid("bad_value", f"{name} must be {bound}, got {value}")
    return value


def _check_strings(obj: Mapping[str, Any]) -> None:
    for name in _OPTIONAL_STRINGS:
        value = obj.get(name)
        if value is not None and type(value) is not str:
            raise _Invalid("bad_type", f"{name} must be a string, got {type(value).__name__}")


def _purchase(obj: Mapping[str, Any], event_id: str, ts: int) -> Event:
    amount = _number(obj, "amount", True)
    if amount < 0:
        raise _Invalid("negative_amount", "amount must be >= 0")
    return Event(PURCHASE, event_id, _id(obj, "member_id", False), ts, amount=amount,
                 points=_int_in(obj, "points", 0, None) or 0, margin=_number(obj, "margin", False),
                 channel=obj.get("channel"), tier=obj.get("tier"), store_id=obj.get("store_id"))


def _redemption(obj: Mapping[str, Any], event_id: str, ts: int) -> Event:
    member_id = _id(obj, "member_id", True)
    _require(obj, "points")
    points = _int_in(obj, "points", 1, None)
    value = _number(obj, "value", False)
    if value is not None and value < 0:
        raise _Invalid("bad_value", "value must be >= 0")
    return Event(REDEMPTION, event_id, member_id, ts, points=points, value=value,
                 channel=obj.get("channel"))


def _enrollment(obj: Mapping[str, Any], event_id: str, ts: int) -> Event:
    return Event(ENROLLMENT, event_id, _id(obj, "member_id", True), ts,
                 channel=obj.get("channel"), tier=obj.get("tier"))


def _survey(obj: Mapping[str, Any], event_id: str, ts: int) -> Event:
    nps = _int_in(obj, "nps", 0, 10)
    csat = _int_in(obj, "csat", 1, 5)
    if nps is None and csat is None:
        raise _Invalid("missing_field", "a survey needs nps (0-10) and/or csat (1-5)")
    return Event(SURVEY, event_id, _id(obj, "member_id", False), ts, nps=nps, csat=csat,
                 comment=obj.get("comment"), channel=obj.get("channel"))


_BUILDERS = {PURCHASE: _purchase, REDEMPTION: _redemption, ENROLLMENT: _enrollment, SURVEY: _survey}


class EventParser:
    """Validates events. ``now_ms`` (live mode) enables the future-timestamp check."""

    def __init__(self, max_event_bytes: int = 65_536, max_skew_ms: int = 3_600_000) -> None:
        self.max_event_bytes = max_event_bytes
        self.max_skew_ms = max_skew_ms

    def parse(self, raw: bytes, event_type: str | None = None, now_ms: int | None = None
              ) -> Event | DeadLetter:
        """Raw message bytes to an Event or a DeadLetter. ``event_type`` None: read ``type``."""
        if len(raw) > self.max_event_bytes:
            return DeadLetter("too_large", f"{len(raw)} bytes > {self.max_event_bytes}", raw)
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return DeadLetter("malformed_json", str(exc)[:200], raw)
        return self.validate(obj, raw, event_type, now_ms)

    def validate(self, obj: Any, raw: bytes, event_type: str | None = None,
                 now_ms: int | None = None) -> Event | DeadLetter:
        """A decoded JSON value (or a CSV row mapped to our field names) to an Event or DeadLetter."""
        if type(obj) is not dict:
            return DeadLetter("not_an_object", f"expected a JSON object, got {type(obj).__name__}",
                              raw)
        try:
            if event_type is None:
                event_type = obj.get("type")
                if event_type not in _BUILDERS:
                    raise _Invalid("unknown_type", f"type must be one of {list(EVENT_TYPES)}, "
                                                   f"got {str(event_type)[:40]!r}")
            event_id = _id(obj, "event_id", True)
            ts = _timestamp(_require(obj, "ts"))
            if now_ms is not None and ts > now_ms + self.max_skew_ms:
                raise _Invalid("future_timestamp", "ts is beyond the wall clock plus max skew")
            _check_strings(obj)
            return _BUILDERS[event_type](obj, event_id, ts)
        except _Invalid as bad:
            return DeadLetter(bad.reason, bad.detail, raw)
