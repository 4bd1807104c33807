"""Small helpers shared by the test suites: a free local port and polling with a deadline.

Plain functions, no fixtures, so that test modules, integration stacks and scripts run from a
checkout can import them (``from tests.helpers import wait_until``).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

__all__ = ["free_port", "wait_until"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the operating system just reported free."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(probe: Callable[[], Any], timeout: float, what: str,
               detail: Callable[[], str] = lambda: "", interval: float = 0.25) -> Any:
    """Poll ``probe`` until it returns something truthy and return that; after ``timeout``
    seconds fail with an AssertionError naming ``what``, followed by ``detail()``."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s\n{detail()}")
        time.sleep(interval)
