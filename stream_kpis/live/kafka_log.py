"""The Kafka side of the live state layer: state log, transactional writers, the input consumer.

Only public aiokafka API is used: one consumer in the group ``<app_id>-ingest`` reads the four
co-partitioned input topics (``read_committed``, no auto-commit); one transactional producer per
owned partition (``transactional_id = <app_id>-state-<partition>``) writes each batch's state
records to partition p of the compacted ``<app_id>-state`` topic together with its dead letters,
signals, partial and the input offsets (``send_offsets_to_transaction``), as one transaction.
Opening a partition's producer fences every earlier one; see docs/design/state.md.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import sys
from collections.abc import AsyncIterator, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import InvalidProducerEpoch, ProducerFenced

from ..settings import Settings
from .ingest import Fenced, Ingest
from .kafka_tools import MAX_RECORD_BYTES, connection_config
from .partition import Commit, InputRecord

__all__ = ["KafkaStateLog", "IngestConsumer", "aiokafka_config", "state_topic", "ingest_group",
           "exporter_group"]

log = logging.getLogger(__name__)

#: Exit code of a worker that stopped on an internal error without committing its batch.
EXIT_INTERNAL_ERROR = 70
_MAX_BATCH_BYTES = 1_000_000  # the broker's default message.max.bytes is 1 MiB per batch


def state_topic(settings: Settings) -> str:
    return f"{settings.app_id}-state"


def partials_topic(settings: Settings) -> str:
    return f"{settings.app_id}-partials"


def ingest_group(settings: Settings) -> str:
    return f"{settings.app_id}-ingest"


def exporter_group(settings: Settings) -> str:
    """The consumer group whose one partition (of the partials topic) is the exporter role."""
    return f"{settings.app_id}-exporter"


def aiokafka_config(settings: Settings) -> dict[str, Any]:
    """aiokafka connection and security settings from ours."""
    config = connection_config(settings)
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        config["ssl_context"] = ssl.create_default_context(cafile=settings.kafka_ssl_cafile)
    return config


class _Writer:
    """One partition's transactional producer."""

    def __init__(self, settings: Settings, partition: int, producer: AIOKafkaProducer) -> None:
        self.partition = partition
        self.producer = producer
        self.topic = state_topic(settings)
        self.dlq = settings.topics.dlq
        self.signals = settings.topics.signals
        self.partials = partials_topic(settings)
        self.group = ingest_group(settings)

    async def commit(self, commit: Commit) -> int | None:
        producer, partition = self.producer, self.partition
        try:
            await producer.begin_transaction()
            try:
                last_base, last_count = await self._send_state(commit.state)
                for key, value in commit.dead_letters:
                    await producer.send(self.dlq, value, key=key)
                for key, value in commit.signals:
                    await producer.send(self.signals, value, key=key)
                if commit.partial is not None:
                    await producer.send(self.partials, commit.partial, key=b"%d" % partition,
                                        partition=0)
                await producer.send_offsets_to_transaction(
                    {TopicPartition(topic, partition): offset
                     for topic, offset in commit.positions.items()}, self.group)
            except BaseException:
                await _abort(producer)
                raise
            await producer.commit_transaction()
        except (ProducerFenced, InvalidProducerEpoch) as exc:
            raise Fenced(str(exc)) from exc
        if last_base is None:
            return None
        return last_base + last_count + 1  # the records, then the commit marker

    async def _send_state(self, records: list[tuple[bytes, bytes | None]]
                          ) -> tuple[int | None, int]:
        """Send the state records in as few record batches as fit; (base offset, count) of the
        last one."""
        producer = self.producer
        futures: list[tuple[Any, int]] = []
        batch = producer.create_batch()
        for key, value in records:
            if batch.append(key=key, value=value, timestamp=None) is None:
                futures.append((await producer.send_batch(batch, self.topic,
                                                          partition=self.partition),
                                batch.record_count()))
                batch = producer.create_batch()
                if batch.append(key=key, value=value, timestamp=None) is None:
                    # larger than a batch on its own: a record of its own (up to the request limit)
                    futures.append((await producer.send(self.topic, value, key=key,
                                                        partition=self.partition), 1))
        if batch.record_count():
            futures.append((await producer.send_batch(batch, self.topic, partition=self.partition),
                            batch.record_count()))
        if not futures:
            return None, 0
        metadata = await futures[-1][0]
        return metadata.offset, futures[-1][1]

    async def close(self) -> None:
        try:
            await self.producer.stop()
        except Exception:  # noqa: BLE001 (closing a fenced or disconnected producer)
            log.debug("closing the producer of partition %d failed", self.partition, exc_info=True)


async def _abort(producer: AIOKafkaProducer) -> None:
    try:
        await producer.abort_transaction()
    except Exception:  # noqa: BLE001 (fenced or broken: the broker aborts it anyway)
        log.debug("aborting a transaction failed", exc_info=True)


class KafkaStateLog:
    """The ``<app_id>-state`` topic: transactional writers and a read_committed reader."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = state_topic(settings)
        self.config = aiokafka_config(settings)
        self.reader: AIOKafkaConsumer | None = None
        self.reader_lock = asyncio.Lock()

    async def start(self) -> None:
        self.reader = AIOKafkaConsumer(**self.config, group_id=None, enable_auto_commit=False,
                                       isolation_level="read_committed",
                                       max_partition_fetch_bytes=8 << 20, fetch_max_bytes=64 << 20)
        await self.reader.start()

    async def stop(self) -> None:
        if self.reader is not None:
            await self.reader.stop()

    async def open_writer(self, partition: int) -> _Writer:
        producer = AIOKafkaProducer(
            **self.config, transactional_id=f"{self.settings.app_id}-state-{partition}",
            enable_idempotence=True, acks="all", linger_ms=5, max_batch_size=_MAX_BATCH_BYTES,
            max_request_size=MAX_RECORD_BYTES)
        await producer.start()
        try:
            # the producer id comes with the first transaction: this is the moment every earlier
            # writer of this transactional id is fenced and its open transaction aborted
            await producer.begin_transaction()
            await producer.abort_transaction()
        except BaseException:
            await producer.stop()
            raise
        return _Writer(self.settings, partition, producer)

    async def end(self, partition: int) -> int:
        tp = TopicPartition(self.topic, partition)
        async with self.reader_lock:
            return (await self.reader.end_offsets([tp]))[tp]

    async def read(self, ranges: Mapping[int, tuple[int, int]]
                   ) -> AsyncIterator[tuple[int, list[tuple[bytes, bytes | None]]]]:
        reader = self.reader
        wanted = {TopicPartition(self.topic, p): span for p, span in ranges.items()
                  if span[0] < span[1]}
        async with self.reader_lock:
            reader.assign(list(wanted))
            for tp, (start, _) in wanted.items():
                reader.seek(tp, start)
            open_tps = set(wanted)
            while open_tps:
                fetched = await reader.getmany(*open_tps, timeout_ms=1000, max_records=50_000)
                for tp, records in fetched.items():
                    yield tp.partition, [(r.key, r.value) for r in records]
                for tp in list(open_tps):
                    if await reader.position(tp) >= wanted[tp][1]:
                        open_tps.discard(tp)
            reader.assign([])


class _Listener(ConsumerRebalanceListener):
    def __init__(self, ingest: Ingest, topics: list[str]) -> None:
        self.ingest = ingest
        self.topics = topics

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.ingest.revoke({tp.partition for tp in revoked})

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.ingest.assign({tp.partition for tp in assigned})


class IngestConsumer:
    """Reads the input topics in the ingest group and drives :class:`Ingest` with every fetch."""

    def __init__(self, settings: Settings, ingest: Ingest, state_log: KafkaStateLog,
                 on_fetch: Any = None) -> None:
        self.settings = settings
        self.ingest = ingest
        self.state_log = state_log
        self.on_fetch = on_fetch
        self.topics = list(settings.topics.inputs().values())
        self.consumer: AIOKafkaConsumer | None = None
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        """Until :meth:`stop`; an error applying a batch ends the process (exit 70, nothing
        committed), so that the batch is read again after a restart."""
        await self.state_log.start()
        consumer = self.consumer = AIOKafkaConsumer(
            **aiokafka_config(self.settings), group_id=ingest_group(self.settings),
            enable_auto_commit=False, isolation_level="read_committed",
            auto_offset_reset="earliest", fetch_max_wait_ms=100, max_poll_interval_ms=300_000,
            session_timeout_ms=10_000, heartbeat_interval_ms=3_000,
            max_partition_fetch_bytes=4 << 20, fetch_max_bytes=64 << 20)
        consumer.subscribe(self.topics, listener=_Listener(self.ingest, self.topics))
        await consumer.start()
        try:
            while not self.stopping.is_set():
                fetched = await consumer.getmany(timeout_ms=100, max_records=20_000)
                # a partition taken during that fetch is read again from its recorded positions
                retaken = self._apply_seeks()
                by_partition: dict[int, list[InputRecord]] = {}
                for tp, records in fetched.items():
                    if self.ingest.owns(tp.partition) and tp.partition not in retaken:
                        by_partition.setdefault(tp.partition, []).extend(records)
                try:
                    await self.ingest.step(by_partition)
                except Exception:  # noqa: BLE001 (a bug or a broken environment, not bad input)
                    stop_uncommitted("applying a batch of input events failed")
                self._apply_seeks()
                if self.on_fetch is not None:
                    self.on_fetch(consumer)
        finally:
            await consumer.stop()  # leaves the group: its partitions move at once
            await self.ingest.close()
            await self.state_log.stop()

    def _apply_seeks(self) -> set[int]:
        """Seek the partitions taken since the last call to their recorded positions, pause the
        ones this worker lost, resume the others; returns the partitions seeked."""
        consumer = self.consumer
        owned = consumer.assignment()
        seeks = self.ingest.take_seeks()
        for partition, offsets in seeks.items():
            for topic, offset in offsets.items():
                tp = TopicPartition(topic, partition)
                if tp in owned:
                    consumer.seek(tp, offset)
        lost = [tp for tp in owned if not self.ingest.owns(tp.partition)]
        if lost:
            consumer.pause(*lost)
        consumer.resume(*[tp for tp in owned if self.ingest.owns(tp.partition)])
        return set(seeks)

    def stop(self) -> None:
        self.stopping.set()


def stop_uncommitted(what: str) -> None:
    """Log the error and exit at once: no commit, no shutdown hooks. The batch's transaction
    was never committed, so the next owner reads it again from the recorded positions."""
    import os

    log.critical("%s; stopping the worker without committing (exit code %d) so that the batch "
                 "is read again after a restart", what, EXIT_INTERNAL_ERROR, exc_info=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(EXIT_INTERNAL_ERROR)
