"""Guard for the batch fast path: it replaces a private method of faust-streaming, so a Faust
upgrade that changes that method's shape must fail here rather than in production."""

from __future__ import annotations

import inspect

import faust
import pytest
from faust.transport import consumer as consumer_module

from stream_kpis import fastpath


def test_installed_faust_is_supported():
    fastpath.check_compatible()


def test_replaced_method_still_has_the_shape_the_fast_path_mirrors():
    original = fastpath._ORIGINAL
    assert list(inspect.signature(original).parameters) == ["self", "fetcher"]
    source = inspect.getsource(original)
    # what the replacement re-implements: read offsets, gaps, commit_every, the per-message
    # callback raced against suspend_flow
    for piece in ("_read_offset", "_add_gap", "_commit_every", "self.callback",
                  "suspend_flow.wait()", "getmany(timeout=1.0)"):
        assert piece in source, piece
    wait_next = inspect.signature(consumer_module.Consumer._wait_next_records)
    assert list(wait_next.parameters) == ["self", "timeout"]


def test_install_and_uninstall_swap_the_method():
    calls = []
    fastpath.install({"topic-a": calls.append})
    try:
        assert consumer_module.Consumer._drain_messages is fastpath._drain_messages
    finally:
        fastpath.uninstall()
    assert consumer_module.Consumer._drain_messages is fastpath._ORIGINAL


def test_unsupported_version_is_refused(monkeypatch):
    monkeypatch.setattr(faust, "__version__", "0.99.0")
    with pytest.raises(RuntimeError, match="STREAM_KPIS_FAST_PATH=off"):
        fastpath.check_compatible()


def test_bulk_ack_skips_committed_and_already_acked_offsets():
    class FakeConsumer:  # only the bookkeeping attributes Consumer.ack maintains
        def __init__(self):
            self._committed_offset = {"tp": 10}
            self._acked_index = {"tp": {11}}
            self._acked = {"tp": [11]}
            self._n_acked = 1

    consumer = FakeConsumer()
    fastpath._mark_acked(consumer, "tp", [9, 10, 11, 12, 13])
    # 9 is below the committed offset; 11 was acked already
    assert consumer._acked["tp"] == [11, 10, 12, 13]
    assert consumer._acked_index["tp"] == {10, 11, 12, 13}
    assert consumer._n_acked == 4
