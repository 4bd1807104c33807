"""The live layer's small pure parts: stall detection, local stores, partials."""

from __future__ import annotations

import pytest

from stream_kpis.live.partition import parse_partial, partial_value
from stream_kpis.live.stall import StallDetector
from stream_kpis.live.store import MemoryStore, RocksStore


def test_a_partition_with_lag_and_no_progress_is_stalled_once_per_stall():
    detector = StallDetector(interval_s=10, intervals=3)  # 30 s without progress
    tp = ("loyalty.purchases", 0)
    assert detector.observe(0, {tp: (5, 9)}) == (set(), [])
    assert detector.observe(29, {tp: (5, 9)}) == (set(), [])
    assert detector.observe(30, {tp: (5, 9)}) == ({tp}, [(tp, 4, 30)])
    assert detector.observe(40, {tp: (5, 9)}) == ({tp}, [])  # reported once
    assert detector.observe(41, {tp: (6, 9)}) == (set(), [])  # progress clears it
    assert detector.observe(80, {tp: (6, 9)}) == ({tp}, [(tp, 3, 39)])


def test_no_lag_is_never_a_stall_and_lost_partitions_are_forgotten():
    detector = StallDetector(interval_s=1, intervals=1)
    idle, gone = ("t", 0), ("t", 1)
    detector.observe(0, {idle: (7, 7), gone: (0, 5)})
    assert detector.observe(100, {idle: (7, 7), gone: (0, 5)})[0] == {gone}
    assert detector.observe(200, {idle: (7, 7)}) == (set(), [])
    assert gone not in detector.progress


@pytest.mark.parametrize("kind", ["memory", "rocksdb"])
def test_store_writes_atomically_with_its_offset_and_survives_reopening(tmp_path, kind):
    store = MemoryStore() if kind == "memory" else RocksStore(tmp_path / "p0")
    assert store.offset == 0 and store.get(b"m:a") is None
    store.write([(b"m:a", b"1"), (b"s:x", b"")], 7)
    store.write([(b"m:a", b"2"), (b"s:x", None)], None)  # offset unchanged
    assert (store.get(b"m:a"), store.get(b"s:x"), store.offset) == (b"2", None, 7)
    assert dict(store.items()) == {b"m:a": b"2"}
    if kind == "rocksdb":
        store.close()
        store = RocksStore(tmp_path / "p0")
        assert (dict(store.items()), store.offset) == ({b"m:a": b"2"}, 7)
    store.clear()
    assert (dict(store.items()), store.offset) == ({}, 0)
    store.close()


def test_rocks_stores_share_one_block_cache(tmp_path):
    """The stores of a process read through one block cache (store.BLOCK_CACHE_BYTES), not
    one each: what one store's reads put there, every store's cache usage shows."""
    from stream_kpis.live.store import BLOCK_CACHE_BYTES

    reader, idle = RocksStore(tmp_path / "p0"), RocksStore(tmp_path / "p1")
    records = [(b"m:%06d" % i, b"x" * 200) for i in range(5000)]
    reader.write(records, 1)
    reader.db.flush()  # to a file: reads now go through the block cache
    for key, value in records:
        assert reader.get(key) == value

    def usage(store):
        return store.db.property_int_value("rocksdb.block-cache-usage")

    assert 0 < usage(reader) == usage(idle) <= BLOCK_CACHE_BYTES
    reader.close()
    idle.close()


def test_partial_round_trip():
    value = partial_value(1_700_000_000_000, {"a": 3, "b": 4}, b"AGGS|with|bars")
    assert parse_partial(value) == (1_700_000_000_000, 7, b"AGGS|with|bars")
    assert parse_partial(partial_value(None, {}, b""))[:2] == (None, 0)


class _SentRecords:
    """Stands in for the exporter's AIOKafkaProducer: keeps what it is given."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def send(self, topic: str, value: bytes, key: bytes | None = None,
                   partition: int | None = None) -> None:
        self.sent.append((topic, key))


@pytest.mark.parametrize("role_lost", [False, True])
def test_an_emission_whose_role_was_lost_meanwhile_publishes_nothing(role_lost):
    """The evaluation runs on a thread while the consumer group may move the exporter role: an
    exporter that lost it meanwhile must not publish its (older) records after the new
    exporter's, nor set its gauges; one that kept it publishes the records and the history."""
    import asyncio

    from stream_kpis.core.kpis import KPI_TOPICS
    from stream_kpis.live.exporter import HISTORY_KEY, Exporter, ExporterConsumer
    from stream_kpis.settings import Settings

    settings = Settings()
    published: list[list[dict]] = []
    roles: list[bool] = []
    owner = ExporterConsumer(settings, published.append, roles.append)
    owner.producer = _SentRecords()
    kpi = next(iter(KPI_TOPICS))
    records = [{"kpi": kpi, "window": None, "value": 1.0}]

    class Evaluated(Exporter):
        def evaluate(self) -> list[dict]:
            if role_lost:
                owner.set_role(False)  # a rebalance revoked the partials partition meanwhile
            return records

    exporter = owner.exporter = Evaluated(settings)
    asyncio.run(owner._emit(exporter))
    if role_lost:
        assert owner.producer.sent == [] and published == [] and roles == [False]
    else:
        kpi_topic = settings.topics.kpi_topics()[KPI_TOPICS[kpi]]
        assert owner.producer.sent == [(kpi_topic, kpi.encode()), (owner.topic, HISTORY_KEY)]
        assert published == [records] and roles == []
