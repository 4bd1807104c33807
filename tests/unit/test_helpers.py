"""Tests of tests/helpers.py, which the integration tests poll and pick ports with."""

from __future__ import annotations

import socket

import pytest

from tests.helpers import free_port, wait_until


def test_wait_until_returns_the_first_truthy_result():
    answers = iter([None, 0, [], "ready", "later"])
    assert wait_until(lambda: next(answers), 5, "ready", interval=0) == "ready"


def test_wait_until_names_what_it_waited_for():
    with pytest.raises(AssertionError, match=r"the answer: not within 0.01s\nlast seen: nothing"):
        wait_until(lambda: None, 0.01, "the answer", lambda: "last seen: nothing", interval=0.001)


def test_free_port_can_be_bound():
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
