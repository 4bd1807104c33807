"""Shared test helpers: event-dict builders, settings in whole buckets, a Processor fed with dicts.

The builders are plain functions (``from tests.conftest import purchase``); the factories are
fixtures (``make_settings``, ``make_processor``, ``result_of``).

Event dicts are the validated-event shape of CONTRACT.md (``type``, ``event_id``, ``member_id``,
``ts`` in epoch ms, ...); optional fields may be present with a None value. They go through
``EventParser.validate`` exactly as replay's mapped CSV rows do, so a malformed dict fails loudly
here instead of being silently dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytest

from stream_kpis.core import Processor
from stream_kpis.core.events import Event, EventParser
from stream_kpis.settings import Settings

HOUR_MS = 3_600_000
B = HOUR_MS  # the bucket width of the event-dict builders below: 1 h

# --- event-dict builders: times are a bucket index (of B) plus an offset in ms ---------------


def at(bucket: int, offset_ms: int = 0) -> int:
    return bucket * B + offset_ms


def purchase(eid, member, bucket, amount=10.0, *, points=0, margin=None, tier=None, offset=0):
    return {
        "type": "purchase",
        "event_id": eid,
        "member_id": member,
        "ts": at(bucket, offset),
        "amount": amount,
        "points": points,
        "margin": margin,
        "tier": tier,
    }


def redemption(eid, member, bucket, points, *, offset=0):
    return {
        "type": "redemption",
        "event_id": eid,
        "member_id": member,
        "ts": at(bucket, offset),
        "points": points,
    }


def enrollment(eid, member, bucket, channel=None, tier=None, *, offset=0):
    return {
        "type": "enrollment",
        "event_id": eid,
        "member_id": member,
        "ts": at(bucket, offset),
        "channel": channel,
        "tier": tier,
    }


def survey(eid, member, bucket, *, nps=None, csat=None, comment=None, offset=0):
    return {
        "type": "survey",
        "event_id": eid,
        "member_id": member,
        "ts": at(bucket, offset),
        "nps": nps,
        "csat": csat,
        "comment": comment,
    }


#: The oracle's result shape: (kpi, window label, sorted label pairs) -> (value, num, den).
Result = dict[tuple[str, str | None, tuple[tuple[str, str], ...]], tuple[Any, Any, Any]]


def build_settings(*, bucket_ms: int = HOUR_MS, windows: Iterable[int] = (3,), h: int = 4,
                   s: int = 4, at_risk: int | None = None, notice: int | None = None,
                   validity_ms: int | None = None,
                   lexicons: Mapping[str, Iterable[str]] | None = None,
                   segments: Iterable[str] = (), cohorts: int | None = None,
                   cohort_ages: int | None = None) -> Settings:
    """Settings whose durations are given in buckets (validity in ms, as the oracle takes it);
    ``segments``, ``cohorts`` and ``cohort_ages`` as in ``[kpis]`` (None: the default)."""
    extra: dict[str, Any] = {}
    if cohorts is not None:
        extra["cohorts"] = cohorts
    if cohort_ages is not None:
        extra["cohort_ages"] = cohort_ages
    if at_risk is not None:
        extra["at_risk_ms"] = at_risk * bucket_ms
    if notice is not None:
        extra["points_expiring_notice_ms"] = notice * bucket_ms
    return Settings(
        bucket_ms=bucket_ms,
        windows_ms=tuple(w * bucket_ms for w in windows),
        churn_horizon_ms=h * bucket_ms,
        settle_ms=s * bucket_ms,
        points_validity_ms=validity_ms,
        lexicons={name: tuple(terms) for name, terms in (lexicons or {}).items()},
        segments=tuple(segments),
        **extra,
    )


def to_event(raw: Mapping[str, Any]) -> Event:
    """A validated Event from an event dict (fails the test if the dict is not valid)."""
    event = EventParser().validate(dict(raw), b"", raw["type"])
    assert isinstance(event, Event), (raw, event)
    return event


def feed(processor: Processor, events: Iterable[Mapping[str, Any]]) -> Processor:
    """Process event dicts in the given (arrival) order."""
    for raw in events:
        processor.process(to_event(raw))
    return processor


def as_result(records: Iterable[Mapping[str, Any]], rename: Mapping[str, str] | None = None
              ) -> Result:
    """KPI records in the oracle's shape; ``rename`` maps window labels (e.g. "3h" -> "3b")."""
    rename = rename or {}
    out: Result = {}
    for record in records:
        window = record["window"]
        key = (record["kpi"], rename.get(window, window),
               tuple(sorted(record.get("labels", {}).items())))
        assert key not in out, f"two records for {key}"
        out[key] = (record["value"], record["numerator"], record["denominator"])
    return out


@pytest.fixture
def make_settings() -> Callable[..., Settings]:
    return build_settings


@pytest.fixture
def make_processor() -> Callable[..., Processor]:
    """``make_processor(events=(), signals=None, history=False, **settings_in_buckets)``."""

    def make(events: Iterable[Mapping[str, Any]] = (), *, signals: list | None = None,
             history: bool = False, **settings: Any) -> Processor:
        processor = Processor(build_settings(**settings),
                              on_signal=None if signals is None else signals.append,
                              record_churn_history=history)
        return feed(processor, events)

    return make


@pytest.fixture
def result_of() -> Callable[..., Result]:
    """``result_of(records, rename=None)``: KPI records in the oracle's result shape."""
    return as_result
