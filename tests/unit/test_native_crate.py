"""The Rust unit tests of native/ (the JSON reader, timestamps, numbers and white space as
Python reads them), run by cargo with libpython linked; the properties against the Python
reference are in tests/property/test_native.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

NATIVE = Path(__file__).resolve().parents[2] / "native"


def test_native_crate_unit_tests_pass():
    cargo = shutil.which("cargo") or shutil.which(str(Path.home() / ".cargo" / "bin" / "cargo"))
    if cargo is None:
        pytest.fail("cargo not found: `pip install` builds native/ with it (see the README)")
    result = subprocess.run(
        [cargo, "test", "--release", "--no-default-features", "--quiet"], cwd=NATIVE,
        env={**os.environ, "PYO3_PYTHON": sys.executable}, capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " 0 failed" in result.stdout and "test result: ok" in result.stdout, result.stdout
