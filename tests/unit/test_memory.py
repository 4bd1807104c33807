"""Bytes the worker keeps are right-sized, and freed memory can go back to the system."""

from __future__ import annotations

import sys
import tracemalloc

import orjson
import pytest

from stream_kpis.core.jsonbytes import dumps
from stream_kpis.core.member import MemberState
from stream_kpis.live.allocator import release_free_memory


def _allocated(make, n: int = 200) -> float:
    """Bytes allocated per object made by ``make`` and kept."""
    tracemalloc.start()
    try:
        kept = [make(i) for i in range(n)]
        size = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(kept) == n
    return size / n


def test_dumps_is_orjson_in_a_buffer_of_its_own_size():
    value = {"member_id": "m0000042", "signal": "at_risk", "ts": 1_704_067_200_000}
    assert dumps(value) == orjson.dumps(value)
    assert type(dumps(value)) is bytes
    # a bytes object is its header and the data; orjson's own buffer is far larger (>= 4 KiB
    # from 3.12 on), which this bound would catch
    assert _allocated(lambda i: dumps({**value, "i": i})) < sys.getsizeof(dumps(value)) + 64


def test_member_records_are_right_sized():
    state = MemberState()
    state.channel, state.tier, state.recent = "web", "gold", {"enrollment\te1": None}
    record = state.to_bytes()
    assert MemberState.from_bytes(record).to_bytes() == record
    assert _allocated(lambda i: state.to_bytes()) < sys.getsizeof(record) + 64


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_free_memory_trims_the_c_allocator_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert release_free_memory() is True
