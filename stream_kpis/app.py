"""The Faust app: topics, tables, agents and timers. Thin: every decision is in the pure core.

Data flow (see docs/production.md):

* The four co-partitioned input topics arrive in batches: by default each fetch of Faust's
  consumer goes straight to :meth:`Pipeline.handle_batch` (:mod:`stream_kpis.fastpath`, ~10x less
  framework CPU per event); with ``STREAM_KPIS_FAST_PATH=off`` the ``ingest`` agent's
  ``take_events`` batches do. Each record is validated with
  :class:`~stream_kpis.core.events.EventParser` (bad input -> ``loyalty.dlq``) and applied to one
  :class:`~stream_kpis.core.Processor` per partition. At the end of each batch the changed
  member states, bucket sums and de-duplication entries are written to three changelog-backed
  tables, in the partition they belong to.
* Every ``emit_interval`` each worker publishes its partitions' aggregates (histograms and sums, a
  few KB) to the single-partition ``<app_id>-partials`` topic. The worker that Kafka assigns that
  one partition is the global exporter: ``combine`` merges the latest partial of every partition,
  evaluates the global KPIs, publishes them to the KPI topics, the ``loyalty_*`` gauges and Redis.
  Losing the partition in a rebalance ends the role, so exactly one worker exports at a time.

``faust -A stream_kpis.app worker -l info`` works as Faust users expect; ``stream-kpis worker``
does the same with our settings.

Delivery (docs/reliability.md): at-least-once from Kafka, exactly-once KPIs. A batch's events are
acknowledged -- and so become committable -- only after everything the batch produced (changelog
records, dead letters, signals) has been acknowledged by the broker; each persisted record
carries the input offsets it includes, so a record delivered again after a crash is recognised
("redelivered") and changes nothing twice. An unexpected error while applying a batch stops the
worker without acknowledging it (exit code 70), rather than letting Faust acknowledge a batch
that was never applied.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
import weakref
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import faust
import orjson
from faust.streams import _current_event
from faust.tables.recovery import Recovery
from prometheus_client import CollectorRegistry

from . import fastpath
from .core import (
    DUPLICATE,
    REDELIVERED,
    PartitionStore,
    Processor,
    evaluate_kpis,
    member_status,
    seen_key,
)
from .core.events import SURVEY, DeadLetter, Event, EventParser
from .core.kpis import KPI_TOPICS, Aggregates
from .core.member import MemberState
from .live.metrics import CONTENT_TYPE_LATEST, KpiCollector, WorkerMetrics, render_latest
from .settings import Settings, load_settings

__all__ = ["Pipeline", "create_app", "app", "faust_app_kwargs"]

log = logging.getLogger(__name__)

_TICK = b"__tick__"
_HISTORY = b"__churn_history__"
#: Exit code of a worker that stopped on an internal error without acknowledging its batch.
EXIT_INTERNAL_ERROR = 70
#: aiokafka loggers that repeat one line thousands of times a second while the broker is away.
_NOISY_LOGGERS = ("aiokafka", "aiokafka.consumer.fetcher",
                  "aiokafka.consumer.group_coordinator", "aiokafka.producer.sender")


class _Throttle(logging.Filter):
    """Lets through the first record of each message and then one per ``interval`` seconds,
    saying how many were held back. aiokafka's producer retries metadata without a back-off
    while the broker is unreachable: a 10 s outage wrote 60,000 ERROR lines."""

    def __init__(self, interval: float = 30.0) -> None:
        super().__init__()
        self.interval = interval
        self.last: dict[tuple[str, object], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.msg)
        now = time.monotonic()
        last, held = self.last.get(key, (-self.interval, 0))
        if now - last < self.interval:
            self.last[key] = (last, held + 1)
            return False
        self.last[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} ({held} more like this in the last {self.interval:.0f} s)"
        return True


for _name in _NOISY_LOGGERS:
    logging.getLogger(_name).addFilter(_Throttle())


def _seek_before_resuming(recovery: type) -> None:
    """Make Faust resume the input partitions only after seeking them to the committed offsets.

    After an assignment faust-streaming 0.15 resumes the partitions first and seeks second: the
    records fetched in between are delivered, then the seek moves the consumer's read offset
    back, and its fetch loop either delivers them again or, when its gap filling takes the
    difference for compacted-away offsets, acknowledges records no agent has seen, which the
    next commit loses (10 runs of tests/integration/test_faults.py's kill test: records twice
    in 3, records lost in 1; faust-streaming issues #216, #596). With the resume held back
    until the seek is done, the first record delivered is the committed one (10 of 10 runs).
    """
    for name in ("on_recovery_completed", "_resume_streams"):
        original = getattr(recovery, name)

        @functools.wraps(original)
        async def seek_then_resume(self: Any, *args: Any, _original: Any = original,
                                   **kwargs: Any) -> Any:
            consumer = self.app.consumer
            held: list[Any] = []
            resume, seek = consumer.resume_partitions, consumer.perform_seek

            async def perform_seek() -> None:
                await seek()
                while held:
                    resume(held.pop())

            consumer.resume_partitions, consumer.perform_seek = held.append, perform_seek
            try:
                return await _original(self, *args, **kwargs)
            finally:
                del consumer.resume_partitions, consumer.perform_seek
                while held:  # no seek happened (e.g. a new rebalance began): as Faust would
                    resume(held.pop())

        setattr(recovery, name, seek_then_resume)


_seek_before_resuming(Recovery)


@contextmanager
def _in_partition(event: Any) -> Iterator[None]:
    """Make ``event`` Faust's current event, so table writes and RocksDB reads use its partition.

    ``take_events`` batches mix partitions; Faust tables route by the current event.
    """
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


class _Record:
    """A fetched record in the shape of a Faust event (``.message``), so that the table context
    and handle_batch work the same on the fast path."""

    __slots__ = ("message", "__weakref__")

    def __init__(self, record: Any) -> None:
        self.message = record


class _TableMembers(MutableMapping):
    """MemberState view of the members table for one partition; writes are buffered until flush."""

    def __init__(self, table: Any, partition: int) -> None:
        self.table = table
        self.prefix = b"%d|" % partition
        self.dirty: dict[str, MemberState] = {}

    def get(self, member_id: str, default: Any = None) -> MemberState | None:
        state = self.dirty.get(member_id)
        if state is not None:
            return state
        raw = self.table.get(member_id.encode())
        if raw is None:
            return default
        return MemberState.from_bytes(raw[len(self.prefix):])

    def __getitem__(self, member_id: str) -> MemberState:
        state = self.get(member_id)
        if state is None:
            raise KeyError(member_id)
        return state

    def __setitem__(self, member_id: str, state: MemberState) -> None:
        self.dirty[member_id] = state

    def __delitem__(self, member_id: str) -> None:  # members are never deleted
        raise NotImplementedError

    def __iter__(self) -> Iterator[str]:
        return iter(self.dirty)

    def __len__(self) -> int:
        return len(self.dirty)

    def flush(self) -> list[str]:
        table, prefix = self.table, self.prefix
        for member_id, state in self.dirty.items():
            table[member_id.encode()] = prefix + state.to_bytes()
        changed = list(self.dirty)
        self.dirty.clear()
        return changed


def faust_app_kwargs(settings: Settings) -> dict[str, Any]:
    """Faust settings derived from ours (broker, store, web, security, batching)."""
    kwargs: dict[str, Any] = {
        "broker": settings.broker,
        "store": settings.store,
        "datadir": settings.data_dir,
        "web_bind": settings.web_host,
        "web_host": settings.web_host,
        "web_port": settings.web_port,
        "topic_partitions": settings.partitions,
        "topic_replication_factor": settings.replication,
        "consumer_auto_offset_reset": "earliest",
        # buffer far above the poll size: Faust sleeps a whole second when every partition's
        # buffer is under pressure (benchmarks/README.md)
        "stream_buffer_maxsize": 131_072,
        "broker_max_poll_records": 10_000,
        "producer_linger": 0.02,
        "producer_max_batch_size": 262_144,
        "table_standby_replicas": 0,
        "web_in_thread": False,
        # A worker that dies without leaving the group (kill -9, OOM, lost host) holds its
        # partitions until the broker gives up on its session; Faust's default of 60 s stalls
        # those partitions -- and a restarted worker's join -- for a minute. Heartbeats every 3 s.
        # Faust's BROKER_SESSION_TIMEOUT / BROKER_HEARTBEAT_INTERVAL env vars override these.
        "broker_session_timeout": 10.0,
        "broker_heartbeat_interval": 3.0,
    }
    if settings.kafka_security_protocol != "PLAINTEXT":
        if settings.kafka_sasl_mechanism:
            ssl_context = None
            if settings.kafka_security_protocol == "SASL_SSL":
                import ssl

                ssl_context = ssl.create_default_context(cafile=settings.kafka_ssl_cafile)
            kwargs["broker_credentials"] = faust.SASLCredentials(
                username=settings.kafka_username, password=settings.kafka_password,
                mechanism=settings.kafka_sasl_mechanism, ssl_context=ssl_context)
        elif settings.kafka_security_protocol == "SSL":
            import ssl

            kwargs["broker_credentials"] = faust.SSLCredentials(
                ssl.create_default_context(cafile=settings.kafka_ssl_cafile))
    return kwargs


class Pipeline:
    """The worker: one Faust app wired to the pure core."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.app = faust.App(settings.app_id, **faust_app_kwargs(settings))
        self.registry = registry or CollectorRegistry()
        self.metrics = WorkerMetrics(self.registry)
        self.kpi_gauges = KpiCollector(self.registry, worker_metrics=self.metrics)
        self.parser = EventParser(settings.max_event_bytes, settings.max_skew_ms)
        self.processors: dict[int, Processor] = {}
        self.last_event: dict[int, Any] = {}           # partition -> an event for table context
        self.published_version: dict[int, int] = {}    # partition -> applied count last published
        self.positions: dict[tuple[str, int], int] = {}
        self.partials: dict[int, tuple[int | None, Aggregates]] = {}
        self.partial_progress: dict[int, int] = {}
        self.churn_history: dict[int, dict[int, tuple[int, int]]] = {}
        self.last_emit = 0.0
        self.last_emitted_state: tuple | None = None
        self.exporting = False
        self.readmodel = None
        if settings.redis_url:
            from .live.readmodel import ReadModel

            self.readmodel = ReadModel.from_url(settings.redis_url, prefix=settings.redis_prefix,
                                                on_error=self.metrics.count_redis_error)
        self._define()

    # ---- topology --------------------------------------------------------------------------
    def _define(self) -> None:
        app, topics, raw = self.app, self.settings.topics, {"key_serializer": "raw",
                                                             "value_serializer": "raw"}
        self.topic_types = {name: kind for kind, name in topics.inputs().items()}
        self.inputs = app.topic(*self.topic_types, **raw)
        self.dlq = app.topic(topics.dlq, **raw)
        self.signals = app.topic(topics.signals, **raw)
        self.kpi_topics = {key: app.topic(name, **raw) for key, name in topics.kpi_topics().items()}
        self.partials_topic = app.topic(f"{self.settings.app_id}-partials", partitions=1, **raw)
        schema = faust.Schema(key_type=bytes, value_type=bytes, **raw)
        # key_type/value_type pick the changelog serializers (raw), the schema the topic's
        table = {"partitions": self.settings.partitions, "schema": schema, "key_type": bytes,
                 "value_type": bytes}
        self.members = app.Table("members", **table)
        self.buckets = app.Table("buckets", **table)
        self.seen = app.Table("seen", **table)
        self.partials_table = app.Table("partials", **{**table, "partitions": 1})

        @app.agent(self.inputs, name="ingest")
        async def ingest(stream: Any) -> None:
            async for events in stream.take_events(5_000, within=0.1):
                try:
                    self.handle_batch(events)
                except Exception:
                    _stop_unacknowledged("applying a batch of input events failed")
                # take_events acknowledges the batch when the loop asks for the next one
                await self._wait_produced()

        @app.agent(self.partials_topic, name="combine")
        async def combine(stream: Any) -> None:
            async for event in stream.events():
                await self.combine(event)

        @app.timer(self.settings.emit_interval_s)
        async def tick() -> None:
            await self.tick()

        @app.page("/metrics")
        async def metrics_page(web: Any, request: Any) -> Any:
            self._update_gauges()
            return web.bytes(render_latest(self.registry),
                             content_type=CONTENT_TYPE_LATEST.split(";")[0].strip())

        app.on_partitions_revoked.connect(self._on_revoked)
        app.on_partitions_assigned.connect(self._on_assigned)
        app.on_before_shutdown.connect(self._on_shutdown)
        self.agents = (ingest, combine, tick, metrics_page)
        if self.settings.fast_path:
            # input records skip Faust's per-message streams (``ingest`` then stays idle, but keeps
            # the input topics in the consumer group's subscription)
            fastpath.install({topic: self._fast_batch for topic in self.topic_types})

    async def _fast_batch(self, records: Any) -> None:
        """One fetch of input records from the fast path: apply, then wait until everything it
        produced is acknowledged by the broker; the fast path acks the offsets after this."""
        try:
            self.handle_batch([_Record(record) for batch in records.values() for record in batch])
        except Exception:
            _stop_unacknowledged("applying a batch of input events failed")
        await self._wait_produced()

    async def _wait_produced(self) -> None:
        """Until the broker has acknowledged everything sent so far (table changelogs, DLQ).

        Faust commits acknowledged offsets after a producer flush that gives up when its buffer
        makes no progress for 0.1 s (a slow or restarting broker), so a commit could otherwise
        overtake the changelog records of the events it covers; a crash then loses them.
        While the broker is away this waits, which holds back the batch: backpressure.
        """
        producer = self.app.producer
        while producer.buffer.size:
            await producer.buffer.flush()
        await producer.flush()

    async def _on_shutdown(self, sender: Any, **_: Any) -> None:
        """Stopping (SIGTERM): the consumer has committed and the tables are flushed; write what
        the read model still holds, which would otherwise wait for the next timer tick."""
        if self.readmodel is not None:
            await self.readmodel.flush()

    async def _on_revoked(self, sender: Any, revoked: Any, **_: Any) -> None:
        self.metrics.assigned_partitions.set(0)
        for tp in revoked:
            self.positions.pop((tp.topic, tp.partition), None)
            if tp.topic in self.topic_types:
                self.processors.pop(tp.partition, None)
                self.last_event.pop(tp.partition, None)
                self.published_version.pop(tp.partition, None)
        self._set_exporting(False)

    async def _on_assigned(self, sender: Any, assigned: Any, **_: Any) -> None:
        owned = self.app.assignor.assigned_actives()
        self.metrics.assigned_partitions.set(
            len({tp.partition for tp in owned if tp.topic in self.topic_types}))
        self._set_exporting(any(tp.topic == self.partials_topic.get_topic_name() for tp in owned))

    def _set_exporting(self, exporting: bool) -> None:
        if exporting != self.exporting:
            log.info("global KPI exporter role: %s", "taken" if exporting else "released")
            self.partials.clear()
            self.partial_progress.clear()
            self.last_emitted_state = None
        self.exporting = exporting
        self.kpi_gauges.set_exporting(exporting)

    # ---- ingest ----------------------------------------------------------------------------
    def _processor(self, partition: int) -> Processor:
        processor = self.processors.get(partition)
        if processor is None:
            processor = self._rebuild(partition)
        return processor

    def _rebuild(self, partition: int) -> Processor:
        """A Processor for a newly assigned partition, from the recovered tables."""
        started = time.perf_counter()
        processor = Processor(self.settings, _TableMembers(self.members, partition),
                              on_signal=self._send_signal, track_changes=True)
        prefix = b"%d|" % partition
        members = 0
        for key, value in self.members.items():
            if value.startswith(prefix):
                PartitionStore.load_member(processor, key.decode(),
                                           MemberState.from_bytes(value[len(prefix):]))
                members += 1
        for key, value in self.buckets.items():
            if key.startswith(prefix):
                PartitionStore.load_bucket(processor, int(key[len(prefix):]), value)
        for key, value in self.seen.items():
            if key.startswith(prefix):
                processor.seen_without_member[key[len(prefix):].decode()] = value.decode() or None
        if processor.max_ts is not None:
            processor.K = processor.max_ts // self.settings.bucket_ms
        if self.settings.clock == "wall":
            processor.K = int(time.time() * 1000) // self.settings.bucket_ms
        self.processors[partition] = processor
        log.info("partition %d: state rebuilt from tables (%d members) in %.2fs", partition,
                 members, time.perf_counter() - started)
        return processor

    def handle_batch(self, events: list[Any]) -> None:
        started = time.perf_counter()
        by_partition: dict[int, list[Any]] = {}
        for event in events:
            by_partition.setdefault(event.message.partition, []).append(event)
        now_ms = int(time.time() * 1000) if self.settings.clock == "wall" else None
        counts: dict[tuple[str, str], int] = {}
        for partition, group in by_partition.items():
            with _in_partition(group[-1]):
                processor = self._processor(partition)
                self.last_event[partition] = group[-1]
                for event in group:
                    self._apply(processor, event.message, now_ms, counts)
                self._flush(partition, processor)
            if processor.max_ts is not None:  # one sample per partition and batch: newest event
                self.metrics.observe_event_lag(max(0.0, time.time() - processor.max_ts / 1000))
        for (topic, outcome), n in counts.items():
            if outcome == DUPLICATE:
                self.metrics.count_duplicates(topic, n)
            elif outcome == REDELIVERED:
                self.metrics.count_redelivered(topic, n)
            else:
                self.metrics.count_applied(topic, n)
        self.metrics.observe_batch(time.perf_counter() - started)

    def _apply(self, processor: Processor, message: Any, now_ms: int | None,
               counts: dict[tuple[str, str], int]) -> None:
        topic = message.topic
        position = (topic, message.partition)
        if message.offset <= self.positions.get(position, -1):
            # Faust delivered this record again while we still own the partition (a consumer
            # seek racing its fetch loop): this worker has applied it already
            return
        self.positions[position] = message.offset
        item = self.parser.parse(message.value or b"", self.topic_types[topic], now_ms)
        if item.__class__ is not DeadLetter and message.key != item.partition_key.encode():
            item = DeadLetter("wrong_key", "the Kafka message key must be the member_id (the "
                              "event_id for guest events) so that a member's events share a "
                              "partition; fix the producer's key", message.value or b"")
        if item.__class__ is DeadLetter:
            item.topic, item.partition, item.offset = topic, message.partition, message.offset
            self.dlq.send_soon(key=message.key, value=orjson.dumps(item.to_record()))
            self.metrics.count_dead_letters(topic, item.reason)
            return
        outcome = processor.process(item, (topic, message.offset))
        counts[(topic, outcome)] = counts.get((topic, outcome), 0) + 1
        if outcome != DUPLICATE:
            self._persist_again(processor, item, outcome)

    def _persist_again(self, processor: Processor, event: Event, outcome: str) -> None:
        """Write the tables' records of this event again at the next flush.

        After a crash the local store (RocksDB) may hold writes whose changelog records never
        reached the broker: the process died between the two. Their events were not
        acknowledged, so they come again -- and find their effects already in the local state
        (``redelivered``, or their bucket sums already counted), so nothing would be written
        and the changelog, which the partition's next owner recovers from, would stay without
        them. Writing the current records again closes that gap; normally the bucket is
        written anyway and this costs nothing.
        """
        processor.changed_buckets.add(event.ts // self.settings.bucket_ms)
        if outcome != REDELIVERED:
            return
        if event.member_id is not None and event.type != SURVEY:
            processor.members[event.member_id] = processor.members[event.member_id]
        else:
            processor.changed_seen.add(seen_key(event))

    def _flush(self, partition: int, processor: Processor) -> None:
        """Write what changed in this partition to its tables (inside its partition context)."""
        changed_members = processor.members.flush()
        prefix = b"%d|" % partition
        for bucket in processor.changed_buckets:
            self.buckets[prefix + str(bucket).encode()] = PartitionStore.bucket_record(processor,
                                                                                     bucket)
        for key in processor.changed_seen:
            token = processor.seen_without_member.get(key)
            table_key = prefix + key.encode()
            if token is None and key not in processor.seen_without_member:
                self.seen.pop(table_key, None)
            else:
                self.seen[table_key] = (token or "").encode()
        processor.changed_buckets.clear()
        processor.changed_seen.clear()
        if self.readmodel is not None and changed_members and processor.K is not None:
            self.readmodel.update_members({
                member_id: member_status(processor.members[member_id], processor.K, self.settings)
                for member_id in changed_members})

    def _send_signal(self, signal: dict[str, Any]) -> None:
        self.signals.send_soon(key=signal["member_id"].encode(), value=orjson.dumps(signal))
        self.metrics.count_signal(signal["signal"])

    # ---- timers: clock, partials, read model -------------------------------------------------
    async def tick(self) -> None:
        now_bucket = int(time.time() * 1000) // self.settings.bucket_ms
        for partition, processor in list(self.processors.items()):
            event = self.last_event.get(partition)
            if event is None:
                continue
            with _in_partition(event):
                if self.settings.clock == "wall":
                    processor.advance(now_bucket)
                    self._flush(partition, processor)
                version = processor.version
                if self.published_version.get(partition) != version:
                    self.published_version[partition] = version
                    value = b"%d|%d|" % (processor.max_ts or -1, self._progress(partition))
                    self.partials_topic.send_soon(key=str(partition).encode(),
                                                  value=value + processor.aggs.to_bytes())
        self.partials_topic.send_soon(key=_TICK, value=b"")
        self._update_gauges()
        if self.readmodel is not None:
            await self.readmodel.flush()

    def _update_gauges(self) -> None:
        for processor in self.processors.values():
            if processor.max_ts is not None:
                self.metrics.set_watermark_lag(max(0.0, time.time() - processor.max_ts / 1000))
        self.metrics.set_table_rows("members", int(sum(p.aggs.totals["members"]
                                                       for p in self.processors.values())))
        consumer = self.app.consumer
        lags: dict[str, int] = {}
        for (topic, partition), offset in self.positions.items():
            try:
                from faust.types import TP

                highwater = consumer.highwater(TP(topic, partition))
            except Exception:  # consumer not started or partition gone: skip this sample
                continue
            if highwater is not None:
                lags[topic] = lags.get(topic, 0) + max(0, highwater - offset - 1)
        for topic, lag in lags.items():
            self.metrics.set_consumer_lag(topic, lag)

    # ---- the global exporter -----------------------------------------------------------------
    async def combine(self, event: Any) -> None:
        key, value = event.message.key, event.message.value
        if not self.exporting:
            return
        if key == _HISTORY:
            return
        if key != _TICK and self._take_partial(int(key), value):
            self.partials_table[key] = value
        if time.monotonic() - self.last_emit >= self.settings.emit_interval_s or key == _TICK:
            self.emit()
            if self.churn_history:
                self.partials_table[_HISTORY] = orjson.dumps(
                    [[k, {str(w): v for w, v in snap.items()}] for k, snap in
                     sorted(self.churn_history.items())[-4096:]])

    def _progress(self, partition: int) -> int:
        """How far this worker has read the partition: the sum over input topics of the next
        offset. It only grows across owners once a new owner has caught up."""
        return sum(offset + 1 for (_, part), offset in self.positions.items() if part == partition)

    def _take_partial(self, partition: int, value: bytes) -> bool:
        """Keep a partition's partial unless it is older than the one held: after a rebalance the
        previous owner's last partial can arrive after the new owner's, and would otherwise
        stand until the partition's next change."""
        max_ts, progress, data = value.split(b"|", 2)
        if int(progress) < self.partial_progress.get(partition, -1):
            return False
        self.partial_progress[partition] = int(progress)
        self.partials[partition] = (int(max_ts) if int(max_ts) >= 0 else None,
                                    Aggregates.from_bytes(data))
        return True

    def _load_partials(self) -> None:
        """After taking the exporter role: the latest partial of every partition and the history."""
        for key, value in self.partials_table.items():
            if key == _HISTORY:
                for K, snap in orjson.loads(value):
                    self.churn_history[K] = {int(w): tuple(v) for w, v in snap.items()}
            elif key != _TICK:
                self._take_partial(int(key), value)

    def emit(self) -> list[dict[str, Any]]:
        """Evaluate global KPIs from all partitions' partials and publish them (exporter only)."""
        if not self.partials:
            self._load_partials()
        if not self.partials:
            return []
        if self.settings.clock == "wall":
            K = int(time.time() * 1000) // self.settings.bucket_ms
        else:
            stamps = [max_ts for max_ts, _ in self.partials.values() if max_ts is not None]
            if not stamps:
                return []
            K = max(stamps) // self.settings.bucket_ms
        state = (K, tuple(sorted((p, id(aggs)) for p, (_, aggs) in self.partials.items())))
        if state == self.last_emitted_state:
            return []
        self.last_emitted_state = state
        merged = Aggregates.merged(aggs for _, aggs in self.partials.values())
        records = evaluate_kpis(self.settings, merged, K, self.churn_history)
        for record in records:
            self.kpi_topics[KPI_TOPICS[record["kpi"]]].send_soon(
                key=record["kpi"].encode(), value=orjson.dumps(record))
        self.kpi_gauges.update(records)
        if self.readmodel is not None:
            self.readmodel.publish_kpis(records)
        self.metrics.record_kpi_emission()
        self.last_emit = time.monotonic()
        return records


def _stop_unacknowledged(what: str) -> None:
    """Log the error and exit at once: no acknowledgement, no commit, no shutdown hooks.

    Faust would acknowledge the failed batch (take_events does so on the way out) and commit
    it at shutdown or when the agent restarts, losing the events. Exiting like a crash leaves
    them uncommitted: the next worker gets them again, and the state records' input offsets
    make that redelivery exact. Bad input never gets here (it goes to the DLQ); this is a bug
    or a broken environment, so a restart loop is visible rather than silent data loss.
    """
    log.critical("%s; stopping the worker without committing (exit code %d) so that the batch "
                 "is delivered again after a restart", what, EXIT_INTERNAL_ERROR, exc_info=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(EXIT_INTERNAL_ERROR)


def create_app(settings: Settings | None = None) -> faust.App:
    """A Faust app for these settings (default: config file and environment)."""
    return Pipeline(settings or load_settings()).app


# ``faust -A stream_kpis.app worker``: the module-level app, configured from the environment.
pipeline = Pipeline(load_settings())
app = pipeline.app
