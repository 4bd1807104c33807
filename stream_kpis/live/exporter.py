"""The global exporter: merges every partition's partial into the global KPIs.

Each partition's owner publishes its aggregates (histograms and sums) to the one-partition
``<app_id>-partials`` topic inside the same transaction as the batch they reflect, keyed by the
partition number, so a ``read_committed`` reader sees exactly the committed states, in commit
order: the latest record of a key is that partition's current state.

The worker that the consumer group ``<app_id>-exporter`` gives that one partition is the
exporter: it reads the topic from the beginning (it is compacted), then follows it, and every
``emit_interval`` evaluates the merged aggregates and publishes the KPI records (KPI topics,
``loyalty_*`` gauges, Redis). Losing the partition ends the role, so one worker exports at a
time. The churn-rate history that ``churn_reduction`` needs is kept in the same topic under
``__churn_history__``, so a new exporter continues it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition

from ..core import evaluate_kpis
from ..core.kpis import KPI_TOPICS, Aggregates, merged_segments
from ..settings import Settings
from .allocator import release_free_memory
from .kafka_log import aiokafka_config, exporter_group, partials_topic
from .kafka_tools import MAX_RECORD_BYTES
from .partition import parse_partial, partial_max_ts

__all__ = ["Exporter", "ExporterConsumer", "HISTORY_KEY"]

log = logging.getLogger(__name__)

HISTORY_KEY = b"__churn_history__"
_HISTORY_KEEP = 4096


class Exporter:
    """The latest partial of every partition, and the KPI records they give (pure)."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self.raw: dict[int, bytes] = {}  # partition -> its latest partial, as published
        self.churn_history: dict[int, dict[int, tuple[int, int]]] = {}
        self.version = 0
        self.last_state: tuple[int, int] | None = None
        self.clv_model = None
        if settings.clv:
            from ..core.predictive import ClvModel

            self.clv_model = ClvModel(settings)

    def take(self, key: bytes | None, value: bytes | None) -> None:
        """One record of the partials topic."""
        if key is None or value is None:
            return
        if key == HISTORY_KEY:
            for K, snapshot in orjson.loads(value):
                self.churn_history[K] = {int(w): tuple(v) for w, v in snapshot.items()}
            return
        partition = int(key)
        self.raw[partition] = value
        self.version += 1

    def as_of_bucket(self) -> int | None:
        if self.settings.clock == "wall":
            return int(self.clock() * 1000) // self.settings.bucket_ms
        stamps = [max_ts for max_ts in map(partial_max_ts, self.raw.values()) if max_ts is not None]
        return max(stamps) // self.settings.bucket_ms if stamps else None

    def merged(self) -> tuple[Aggregates, Iterator[tuple[str, Aggregates]]]:
        """The sum of every partition's partial without its segments, decoded one partial at a
        time into the total, and the segments summed one at a time as they are asked for
        (:func:`merged_segments`): the exporter holds the published bytes, their decompressed
        JSON and one total, never a decoded copy per partition nor every merged segment."""
        total = Aggregates()
        segments = [total.merge_head(parse_partial(value)[2]) for value in self.raw.values()]
        return total, merged_segments(segments)

    def evaluate(self) -> list[dict[str, Any]]:
        """The KPI records, or [] when neither a partial nor the as-of bucket changed."""
        K = self.as_of_bucket()
        if K is None:
            return []
        state = (K, self.version)
        if state == self.last_state:
            return []
        self.last_state = state
        total, segments = self.merged()
        records = evaluate_kpis(self.settings, total, K, self.churn_history, self.clv_model,
                                segments)
        del total, segments
        release_free_memory()  # the merged total is gone: its pages go back to the system
        return records

    def history_record(self) -> bytes:
        recent = sorted(self.churn_history.items())[-_HISTORY_KEEP:]
        return orjson.dumps([[K, {str(w): v for w, v in snapshot.items()}] for K, snapshot in recent])


class _Listener(ConsumerRebalanceListener):
    def __init__(self, owner: ExporterConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: Any) -> None:
        self.owner.set_role(False)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        if assigned:
            await self.owner.take_role()


class ExporterConsumer:
    """Competes for the exporter role and, while it holds it, publishes the global KPIs."""

    def __init__(self, settings: Settings, publish: Callable[[list[dict[str, Any]]], None],
                 on_role: Callable[[bool], None]) -> None:
        self.settings = settings
        self.publish = publish
        self.on_role = on_role
        self.topic = partials_topic(settings)
        self.exporter: Exporter | None = None
        self.catch_up_to = 0
        self.last_emit = 0.0
        self.last_evaluation_s: float | None = None  # merge + evaluate of the latest emission
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.stopping = asyncio.Event()

    def set_role(self, exporting: bool) -> None:
        if not exporting and self.exporter is not None:
            log.info("global KPI exporter role: released")
        self.exporter = None
        self.on_role(exporting)

    async def take_role(self) -> None:
        tp = TopicPartition(self.topic, 0)
        self.catch_up_to = (await self.consumer.end_offsets([tp]))[tp]
        await self.consumer.seek_to_beginning(tp)
        self.exporter = Exporter(self.settings)
        self.last_emit = 0.0
        log.info("global KPI exporter role: taken (reading %d partial records)", self.catch_up_to)

    async def run(self) -> None:
        config = aiokafka_config(self.settings)
        self.producer = AIOKafkaProducer(**config, linger_ms=5)
        await self.producer.start()
        consumer = self.consumer = AIOKafkaConsumer(
            **config, group_id=exporter_group(self.settings), enable_auto_commit=False,
            isolation_level="read_committed", auto_offset_reset="earliest",
            fetch_max_wait_ms=100, session_timeout_ms=10_000, heartbeat_interval_ms=3_000,
            max_partition_fetch_bytes=MAX_RECORD_BYTES, fetch_max_bytes=MAX_RECORD_BYTES)
        consumer.subscribe([self.topic], listener=_Listener(self))
        await consumer.start()
        tp = TopicPartition(self.topic, 0)
        try:
            while not self.stopping.is_set():
                fetched = await consumer.getmany(timeout_ms=200, max_records=10_000)
                exporter = self.exporter
                if exporter is None:
                    continue
                for records in fetched.values():
                    for record in records:
                        exporter.take(record.key, record.value)
                if tp not in consumer.assignment():
                    continue
                if await consumer.position(tp) < self.catch_up_to:
                    continue
                if self.last_emit == 0.0:
                    self.on_role(True)
                if time.monotonic() - self.last_emit >= self.settings.emit_interval_s:
                    await self._emit(exporter)
        finally:
            await consumer.stop()
            await self.producer.stop()

    async def _emit(self, exporter: Exporter) -> None:
        # merging, segments and the CLV fit take a while: off the loop the ingest shares
        started = time.monotonic()
        records = await asyncio.to_thread(exporter.evaluate)
        self.last_emit = time.monotonic()
        self.last_evaluation_s = self.last_emit - started
        if not records or self.exporter is not exporter:
            # nothing new, or the role was lost (or taken anew) during the evaluation: the
            # exporter that holds it now publishes, and records of this older evaluation
            # published after its own would make the KPI topics go back in time
            return
        topics = self.settings.topics.kpi_topics()
        producer = self.producer
        for record in records:
            await producer.send(topics[KPI_TOPICS[record["kpi"]]], orjson.dumps(record),
                                key=record["kpi"].encode())
        await producer.send(self.topic, exporter.history_record(), key=HISTORY_KEY, partition=0)
        self.publish(records)

    def stop(self) -> None:
        self.stopping.set()
