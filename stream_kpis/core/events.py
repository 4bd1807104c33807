"""Parse and validate raw input bytes into typed events, or into a dead letter with a reason (pure).

Nothing here raises on bad input: :meth:`EventParser.parse` returns either an :class:`Event` or a
:class:`DeadLetter` whose ``reason`` is one of :data:`REASONS`. See SPEC section 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import orjson

from .native import native_module
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
    "MAX_POINTS",
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
#: The most points one event can carry: 2**53 - 1, the largest integer a KPI record's JSON number
#: (a double to most readers, and to Prometheus) holds exactly. More is a data error (bad_value).
MAX_POINTS = 2**53 - 1
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
                 points=_int_in(obj, "points", 0, MAX_POINTS) or 0, margin=_number(obj, "margin", False),
                 channel=obj.get("channel"), tier=obj.get("tier"), store_id=obj.get("store_id"))


def _redemption(obj: Mapping[str, Any], event_id: str, ts: int) -> Event:
    member_id = _id(obj, "member_id", True)
    _require(obj, "points")
    points = _int_in(obj, "points", 1, MAX_POINTS)
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
    """Validates events. ``now_ms`` (live mode) enables the future-timestamp check.

    ``native`` False reads every input in Python; by default a valid event in bytes is read by
    the native fast path when it is built (:mod:`~stream_kpis.core.native`), with the same
    result."""

    def __init__(self, max_event_bytes: int = 65_536, max_skew_ms: int = 3_600_000,
                 native: bool = True) -> None:
        self.max_event_bytes = max_event_bytes
        self.max_skew_ms = max_skew_ms
        self._native_parse = None
        module = native_module() if native else None
        if module is not None:
            try:
                self._native_parse = module.JsonEvents(Event, list(EVENT_TYPES), max_event_bytes,
                                                       max_skew_ms).parse
            except (OverflowError, TypeError):  # limits beyond 64 bits: Python reads them
                pass
        self.native = self._native_parse is not None  # the native fast paths are in use

    def parse(self, raw: bytes, event_type: str | None = None, now_ms: int | None = None
              ) -> Event | DeadLetter:
        """Raw message bytes to an Event or a DeadLetter. ``event_type`` None: read ``type``."""
        native_parse = self._native_parse
        if native_parse is not None and raw.__class__ is bytes:
            event = native_parse(raw, event_type, now_ms)
            if event is not None:
                return event
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
        if type(obj) is dict:
            event = _valid_event(obj, event_type)
            if event is not None and (now_ms is None or event.ts <= now_ms + self.max_skew_ms):
                return event
        return self._validate_fully(obj, raw, event_type, now_ms)

    def _validate_fully(self, obj: Any, raw: bytes, event_type: str | None = None,
                        now_ms: int | None = None) -> Event | DeadLetter:
        """:meth:`validate` one check at a time: the rules, and the reason of a dead letter."""
        if type(obj) is not dict:
            return DeadLetter("not_an_object", f"expected a JSON object, got {type(obj).__name__}",
                              raw)
        try:
            if event_type is None:
                event_type = obj.get("type")
                if type(event_type) is not str or event_type not in _BUILDERS:
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


def _valid_event(obj: dict, event_type: str | None) -> Event | None:
    """The Event of an object that passes every check of :meth:`EventParser._validate_fully`
    (the future-timestamp check aside), or None when some check might fail: then the full
    checks decide, and name the reason. The same rules written as one pass, because this runs
    once per event of a replay."""
    get = obj.get
    if event_type is None:
        event_type = get("type")
    event_id = get("event_id")
    if type(event_id) is not str or not 0 < len(event_id) <= _MAX_ID_LEN:
        return None
    ts = get("ts")
    if type(ts) is not int:
        if type(ts) is not str:
            return None
        try:
            ts = parse_rfc3339_ms(ts)
        except ValueError:
            return None
    if not 0 <= ts < _MAX_TS:
        return None
    member_id = get("member_id")
    if member_id is not None and (type(member_id) is not str
                                  or not 0 < len(member_id) <= _MAX_ID_LEN):
        return None
    channel, tier, store_id, comment = get("channel"), get("tier"), get("store_id"), get("comment")
    for value in (channel, tier, store_id, comment, get("currency"), get("reward_id")):
        if value is not None and type(value) is not str:
            return None
    if event_type == PURCHASE:
        amount = _finite(get("amount"))
        if amount is None or amount < 0:
            return None
        points = get("points")
        if points is None:
            points = 0
        elif type(points) is not int or points < 0 or points > MAX_POINTS:
            return None
        margin = get("margin")
        if margin is not None:
            margin = _finite(margin)
            if margin is None:
                return None
        return Event(PURCHASE, event_id, member_id, ts, amount=amount, points=points,
                     margin=margin, channel=channel, tier=tier, store_id=store_id)
    if member_id is None and (event_type == REDEMPTION or event_type == ENROLLMENT):
        return None
    if event_type == ENROLLMENT:
        return Event(ENROLLMENT, event_id, member_id, ts, channel=channel, tier=tier)
    if event_type == REDEMPTION:
        points = get("points")
        if type(points) is not int or points < 1 or points > MAX_POINTS:
            return None
        value = get("value")
        if value is not None:
            value = _finite(value)
            if value is None or value < 0:
                return None
        return Event(REDEMPTION, event_id, member_id, ts, points=points, value=value,
                     channel=channel)
    if event_type == SURVEY:
        nps, csat = get("nps"), get("csat")
        if nps is None:
            if csat is None:
                return None
        elif type(nps) is not int or not 0 <= nps <= 10:
            return None
        if csat is not None and (type(csat) is not int or not 1 <= csat <= 5):
            return None
        return Event(SURVEY, event_id, member_id, ts, nps=nps, csat=csat, comment=comment,
                     channel=channel)
    return None


def _finite(value: Any) -> float | None:
    """A JSON number as a float, or None when it is not one or not finite."""
    if type(value) is float:
        return value if value - value == 0.0 else None  # inf - inf and nan - nan are nan
    if type(value) is int:
        return float(value)
    return None
