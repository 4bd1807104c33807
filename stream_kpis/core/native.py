"""The native fast paths of the input stage (``stream_kpis._native``, Rust, built from ``native/``
by every ``pip install``), and the switch that turns them off.

They read a JSON event (:class:`~stream_kpis.core.events.EventParser`) or a mapped CSV row
(replay) to the :class:`~stream_kpis.core.events.Event` the Python code makes of it, and answer
only for input they are sure of: anything else (a dead letter, a form they do not read) returns
None and the Python code reads it as before. So results never depend on whether they are on;
the Python code is the reference, and tests/property/test_native.py compares the two.

``STREAM_KPIS_NATIVE=0`` turns them off for a process (the pure-Python path), as does running
from a source tree where the extension was not built.
"""

from __future__ import annotations

import os
from functools import cache
from types import ModuleType

__all__ = ["NATIVE_ENV", "native_module", "native_status"]

#: Set to ``0`` to run without the native fast paths.
NATIVE_ENV = "STREAM_KPIS_NATIVE"


def _turned_off() -> bool:
    return os.environ.get(NATIVE_ENV, "1").strip() == "0"


@cache
def native_module() -> ModuleType | None:
    """``stream_kpis._native`` when it is built and not turned off, else None."""
    if _turned_off():
        return None
    try:
        from stream_kpis import _native
    except ImportError:
        return None
    return _native


def native_status() -> str:
    """One line for reports: whether the native fast paths are on, and why not."""
    if _turned_off():
        return f"off ({NATIVE_ENV}=0)"
    return "on" if native_module() is not None else "off (stream_kpis._native is not built)"
