"""Giving freed memory back to the operating system after the worker's large, short-lived
allocations.

Each emission the exporter builds the merged total of every partition's partial (tens of MB
with segments) and drops it, and each partition builds its partial's JSON. CPython frees these
to the C allocator, but glibc's malloc returns a freed region to the system only when it sits at
the top of its heap; elsewhere it stays in the process as free space, so the worker's RSS is the
high-water mark of those peaks (fragmented among the long-lived histograms and member states).
The exporter also merges on a thread of its own, whose allocations land in another malloc arena.
``malloc_trim(0)`` hands the free pages of every arena back (glibc 2.8 and later); it takes a
few milliseconds, once per emit interval. Elsewhere (musl, macOS) :func:`release_free_memory`
does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

__all__ = ["release_free_memory"]


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None


_TRIM = _malloc_trim()


def release_free_memory() -> bool:
    """Return the C allocator's free pages to the system; whether it could (glibc only)."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True
