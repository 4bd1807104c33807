"""The package layout: ``stream_kpis.core`` is pure and never imports Faust, Kafka or Redis, and
the core and the top-level settings import cleanly in either order.

Each check runs in a fresh interpreter, so that modules the test session has already imported
(Faust via conftest or other tests) cannot hide or fake an import made by the core.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable

import pytest

#: Top-level packages the core must never load (``mode`` is Faust's service framework).
FORBIDDEN = ("faust", "aiokafka", "kafka", "redis", "rocksdict", "mode")

#: Modules the walk below must find, so that an empty walk cannot pass the test.
CORE_MODULES = {"stream_kpis.core", "stream_kpis.core.events", "stream_kpis.core.timebase",
                "stream_kpis.core.member", "stream_kpis.core.kpis", "stream_kpis.core.processor"}

_IMPORT_CORE = """
import importlib, json, pkgutil, sys
import stream_kpis.core as core
walked = ["stream_kpis.core"]
for info in pkgutil.walk_packages(core.__path__, "stream_kpis.core."):
    importlib.import_module(info.name)
    walked.append(info.name)
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps({"walked": walked, "loaded": sorted(sys.modules)}))
"""


def forbidden_modules(module_names: Iterable[str]) -> list[str]:
    """The names in ``module_names`` that are, or live under, a FORBIDDEN top-level package."""
    return sorted(name for name in module_names if name.split(".", 1)[0] in FORBIDDEN)


def import_core_in_fresh_interpreter(*extra: str) -> dict[str, list[str]]:
    """Import stream_kpis.core and every module under it (then ``extra``) in a new process;
    return the walked core modules and everything that ended up in sys.modules."""
    result = subprocess.run([sys.executable, "-c", _IMPORT_CORE, *extra], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_core_imports_no_faust_kafka_or_redis():
    seen = import_core_in_fresh_interpreter()
    assert CORE_MODULES <= set(seen["walked"]), seen["walked"]
    assert forbidden_modules(seen["loaded"]) == []


def test_check_flags_forbidden_modules():
    assert forbidden_modules(["json", "redis", "redis.asyncio", "stream_kpis.core"]) == [
        "redis", "redis.asyncio"]
    # a name that merely starts like a forbidden package, or contains one, is not flagged
    assert forbidden_modules(["modest", "kafkaesque", "stream_kpis.live.kafka_tools"]) == []


def test_fresh_interpreter_check_sees_an_import_of_redis():
    """The same subprocess, told to import redis as well, reports it: the check is not blind."""
    seen = import_core_in_fresh_interpreter("redis")
    assert "redis" in forbidden_modules(seen["loaded"])


@pytest.mark.parametrize("module", ["stream_kpis.settings", *sorted(CORE_MODULES)])
def test_module_imports_first_in_a_fresh_interpreter(module):
    """The core uses the top-level settings and settings uses core.timebase: whichever of them is
    imported first, the import must not run into a half-initialised module."""
    result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
