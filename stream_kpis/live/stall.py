"""Stall detection: an owned input partition with lag that makes no progress.

A partition that the consumer group assigned to this worker but that it does not consume (a
hand-over that failed, a fenced writer that was never replaced) would otherwise look healthy:
the worker is up and its other partitions move. :class:`StallDetector` is fed, every emit
interval, each assigned partition's applied position and end offset; a partition with lag whose
position has not moved for ``intervals`` emit intervals is stalled, reported once per stall
(a WARNING log line) and counted in ``stream_kpis_stalled_partitions``, which the
``StreamKpisPartitionStalled`` alert watches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["StallDetector", "STALL_INTERVALS"]

#: Emit intervals without progress, with lag, before a partition counts as stalled.
STALL_INTERVALS = 6


class StallDetector:
    """Pure: positions in, stalled partitions out."""

    def __init__(self, interval_s: float, intervals: int = STALL_INTERVALS) -> None:
        self.limit_s = interval_s * intervals
        self.progress: dict[Any, tuple[int, float]] = {}  # tp -> (position, when it last moved)
        self.reported: set[Any] = set()

    def observe(self, now: float, samples: Mapping[Any, tuple[int, int]]
                ) -> tuple[set[Any], list[tuple[Any, int, float]]]:
        """``samples``: tp -> (position, end offset). Returns (all stalled tps, the newly
        stalled ones as (tp, lag, seconds without progress))."""
        stalled: set[Any] = set()
        fresh: list[tuple[Any, int, float]] = []
        for tp, (position, end) in samples.items():
            last = self.progress.get(tp)
            if last is None or last[0] != position or end <= position:
                self.progress[tp] = (position, now)
                self.reported.discard(tp)
                continue
            idle = now - last[1]
            if idle >= self.limit_s:
                stalled.add(tp)
                if tp not in self.reported:
                    self.reported.add(tp)
                    fresh.append((tp, end - position, idle))
        for tp in set(self.progress) - set(samples):
            del self.progress[tp]
            self.reported.discard(tp)
        return stalled, fresh
