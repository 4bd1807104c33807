"""Process-wide settings of the long-running commands (``worker``, ``replay``).

Python's cyclic garbage collector runs a young-generation pass every 700 container allocations
and an older-generation pass every 10 of those. A worker or a replay allocates several short-lived
containers per event (events, tuples, dicts) while holding millions of long-lived ones (member
states, histograms), and those passes were 6-11% of a replay's CPU time before replay froze its
state between batches (``benchmarks/gc_thresholds.py``; ~4% since) and showed up in the worker's
profile, which does not freeze. Almost nothing here forms reference cycles, so passes that run
100x less often free the same memory, later.
"""

from __future__ import annotations

import gc

__all__ = ["GC_THRESHOLDS", "tune_gc"]

#: gc.set_threshold arguments: a young pass every 100k container allocations, an older pass
#: every 50 young ones, a full pass every 100 older ones (and, as always, only once the
#: long-lived objects have grown by a quarter since the last one).
GC_THRESHOLDS = (100_000, 50, 100)


def tune_gc() -> None:
    """Set :data:`GC_THRESHOLDS` (idempotent)."""
    gc.set_threshold(*GC_THRESHOLDS)
