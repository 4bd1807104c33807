"""The streaming core, natively: :class:`NativeProcessor` runs replay's :class:`Processor` rules
in ``stream_kpis._native.Core`` (Rust, ``native/src/engine.rs``), with the part of the
:class:`Processor` interface that replay uses (issue 12).

The Python :class:`Processor` stays the reference. The native core owns the member states,
histograms, event sums, segments, cohorts, indexes and churn snapshots; this wrapper keeps what
is cheaper or safer in Python: matching survey comments against the lexicons (Python's ``re``),
the CLV statistics (numpy, moved purchase by purchase as the core says), formatting signals, the
churn history dict, and evaluation (the native aggregates are exported as an :class:`Aggregates`
for :func:`evaluate_kpis`). With ``STREAM_KPIS_NATIVE=0`` (or no extension built) replay runs the
Python core. tests/property/test_native_core.py compares the two event for event.

Signals reach ``on_signal`` at the end of each :meth:`NativeProcessor.process_batch`, in the
order the Python core gives them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .events import EVENT_TYPES, Event
from .kpis import NO_FLOOR, SUM_NAMES, Aggregates, MentionMatcher
from .native import native_module
from .processor import Processor, Signal, evaluate_kpis, history_bounds
from .timebase import format_rfc3339

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["NativeProcessor", "make_processor", "LINES_END", "LINES_PYTHON", "LINES_EMIT"]

#: Why :meth:`NativeProcessor.process_lines` stopped: the lines ran out; the line at the index
#: is one for the Python parser; the event at the index is after the series' next as-of bucket.
LINES_END, LINES_PYTHON, LINES_EMIT = 0, 1, 2


def make_processor(settings: Settings, **options: Any) -> Processor | NativeProcessor:
    """A :class:`NativeProcessor` when the native module is on, else the Python
    :class:`Processor` (``options``: on_signal, record_churn_history, bounded_history)."""
    if native_module() is not None:
        return NativeProcessor(settings, **options)
    return Processor(settings, **options)


#: The parts of an Aggregates the core exports in full every time (small beside the rest).
_WHOLE_PARTS = ("by_channel", "tiers", "totals", "cohort_members", "cohort_active", "cohort_max",
                "floor")


def _update(aggs: Aggregates, parts: dict[str, Any]) -> None:
    """Bring ``aggs`` to what the core exported: histograms and sums whole, or what changed."""
    if "hists" in parts:
        aggs.hists, aggs.sums = parts["hists"], parts["sums"]
    else:
        hists, sums = aggs.hists, aggs.sums
        for histogram, bucket, value in parts["changes"]:
            hist = hists[histogram] if histogram < 8 else sums[SUM_NAMES[histogram - 8]]
            if value is None:
                hist.pop(bucket, None)
            else:
                hist[bucket] = value
    for name in _WHOLE_PARTS:
        setattr(aggs, name, parts[name])


class NativeProcessor:
    """:class:`Processor`'s results for replay, from the native core (see the module doc)."""

    def __init__(self, settings: Settings, *, on_signal: Callable[[Signal], None] | None = None,
                 record_churn_history: bool = False, bounded_history: bool = True) -> None:
        module = native_module()
        if module is None:
            raise RuntimeError("stream_kpis._native is not available (or STREAM_KPIS_NATIVE=0)")
        reach, floor_step = history_bounds(settings)
        self.settings = settings
        self.bucket_ms = settings.bucket_ms
        self.core = module.Core(
            Event, list(EVENT_TYPES), bucket_ms=settings.bucket_ms,
            validity_ms=settings.points_validity_ms, at_risk=settings.at_risk,
            horizon=settings.churn_horizon, notice=settings.expiring_notice,
            # a bound below 0 keeps nothing, as 0 does (len(seen) > bound forgets the new key)
            dedupe_per_member=max(0, settings.dedupe_per_member),
            guest_dedupe=max(0, settings.guest_dedupe),
            cohorts=settings.cohorts > 0, reach=reach, floor_step=floor_step,
            bounded_history=bounded_history, windows=list(settings.windows),
            record_churn_history=record_churn_history, event_clock=settings.clock == "event",
            signals=on_signal is not None, segments=list(settings.segments), clv=settings.clv,
            sum_names=list(SUM_NAMES))
        self.exported = Aggregates()  # what the core exported so far (see aggs)
        self.on_signal = on_signal
        self.matcher = MentionMatcher(settings.lexicons)
        self.mentions: dict[str, dict[int, int]] = {}  # Aggregates.mentions, kept here
        self.mentions_floor = NO_FLOOR
        self.churn_history: dict[int, dict[int, tuple[int, int]]] = {}
        self.history_low: int | None = None  # no key of churn_history is below it
        self.clv_stats = self.clv_model = None
        if settings.clv:  # the CLV statistics stay in Python (numpy): the core hands over moves
            from .clv import SufficientStats
            from .predictive import ClvModel

            self.clv_stats = SufficientStats()
            self.clv_model = ClvModel(settings)

    # ---- the Processor interface replay uses -----------------------------------------------
    def process_batch(self, events: Iterable[Event]) -> None:
        """Apply events in order, as :meth:`Processor.process_batch`; then deliver the batch's
        signals."""
        self.core.process(events if isinstance(events, list) else list(events))
        self._collect()

    def process_lines(self, lines: list[bytes], start: int, event_type: str | None,
                      max_event_bytes: int, stop_bucket: int | None = None
                      ) -> tuple[int, int, int]:
        """Read and apply JSON lines from ``lines[start]`` on, natively, as replay reads a line
        and ``EventParser.parse(line, event_type)`` parses it, without an Event object;
        stop at a line the native JSON reader does not answer for (``LINES_PYTHON``) or at an
        event in a bucket after ``stop_bucket`` (``LINES_EMIT``). Returns (index, why,
        bucket); then delivers the signals so far."""
        stopped = self.core.process_lines(lines, start, event_type, max_event_bytes, stop_bucket)
        self._collect()
        return stopped

    def advance(self, K: int) -> None:
        """Move the as-of bucket to K (:meth:`Processor.advance`)."""
        self.core.advance(K)
        self._collect()

    @property
    def K(self) -> int | None:
        return self.core.K

    @property
    def max_ts(self) -> int | None:
        return self.core.max_ts

    @property
    def applied(self) -> int:
        return self.core.applied

    @property
    def duplicates(self) -> int:
        return self.core.duplicates

    def as_of_bucket(self) -> int | None:
        return self.core.K

    @property
    def aggs(self) -> Aggregates:
        """The aggregates now, as :attr:`Processor.aggs`: one object, brought up to date by each
        read. The core exports only what changed since the last read (a replay with ``--every``
        reads them at every evaluation)."""
        parts = self.core.export()
        aggs = self.exported
        _update(aggs, parts)
        for dimension, value, segment_parts in parts["segments"]:
            key = f"{dimension}\t{value}"
            segment = aggs.segments.get(key)
            if segment is None:
                segment = aggs.segments[key] = Aggregates()
            _update(segment, segment_parts)
        aggs.mentions = {key: dict(hist) for key, hist in self.mentions.items()}
        aggs.clv = self.clv_stats
        return aggs

    def evaluate(self, K: int | None = None, aggregates: Aggregates | None = None
                 ) -> list[dict[str, Any]]:
        """KPI records as of K (default: the current as-of bucket)."""
        K = self.K if K is None else K
        if K is None:
            return []
        if self.history_low is not None and K < self.history_low:
            self.history_low = K  # evaluate_kpis records K's snapshot in the history
        return evaluate_kpis(self.settings, aggregates or self.aggs, K, self.churn_history,
                             self.clv_model)

    # ---- what the Python side keeps --------------------------------------------------------
    def _collect(self) -> None:
        """Take what the native core left for Python since the last call: survey comments to
        match, churn snapshots and signals."""
        core = self.core
        floor = core.floor
        mentions = self.mentions
        if floor > self.mentions_floor:  # Aggregates.collapse: mentions at or before the floor go
            for hist in mentions.values():
                for bucket in [b for b in hist if b <= floor]:
                    del hist[bucket]
            self.mentions_floor = floor
        # A survey's mentions count once its bucket is after the floor, and a floor only rises:
        # matched now or as the event was applied, the same mentions remain.
        for comment, bucket in core.take_comments():
            if bucket > floor:
                for key in self.matcher.matches(comment):
                    hist = mentions.setdefault(key, {})
                    hist[bucket] = hist.get(bucket, 0) + 1
        if self.clv_stats is not None:  # Processor._move_clv, purchase by purchase
            from .clv import UNCLAMPED_DAY, member_key

            stats = self.clv_stats
            for before, after in core.take_clv():
                if before is not None:
                    stats.remove(member_key(dict(before), UNCLAMPED_DAY))
                stats.add(member_key(dict(after), UNCLAMPED_DAY))
        history = self.churn_history
        for oldest_needed, snapshots in core.take_churn():
            history.update(snapshots)
            # what Processor._record_churn_history deletes, without a scan of the history per
            # bucket: every key below history_low was deleted already
            low = self.history_low
            if low is None or oldest_needed - low > len(history):
                stale = [b for b in history if b < oldest_needed]
            else:
                stale = [b for b in range(low, oldest_needed) if b in history]
            for bucket in stale:
                del history[bucket]
            self.history_low = oldest_needed
        if self.on_signal is not None:
            for member_id, signal, K, last_touch, points, expiry in core.take_signals():
                record: Signal = {"member_id": member_id, "signal": signal,
                                  "as_of": format_rfc3339((K + 1) * self.bucket_ms),
                                  "last_touch": format_rfc3339(last_touch)}
                if points is not None:
                    record["points"] = points
                    record["expires_at"] = format_rfc3339(expiry * self.bucket_ms)
                self.on_signal(record)
