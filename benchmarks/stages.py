"""Where the live worker's time goes, stage by stage (issue 12), measured in one process.

The worker's path for one fetch: Kafka records are read and decoded (aiokafka), each value is
parsed and validated into an Event (natively when built), the Event is applied to the
partition's Processor, the batch's changed state becomes state-log records
(``PartitionTask.take_commit``) that go to the local RocksDB store once the transaction
committed, the changed members' statuses go to the Redis read model, and every emit interval
the exporter decodes the partitions' partials, merges them and evaluates every KPI. This script
times each of those steps on the same records, by driving the worker's own classes
(``PartitionTask``, ``RocksStore``, ``ReadModel``) without a broker, in batches the size the
worker takes them (a 20,000-record fetch over 4 partitions). The Kafka transaction itself
(producing the state records, committing) is not a stage here: it is what remains of the
worker's end-to-end time (``run.py --only stages`` measures both in the same run, and reads the
records from the broker for the read stage).

    python benchmarks/stages.py [--members 33669] [--redis redis://127.0.0.1:6379/0]

Standalone, the throughput dataset of run.py is generated and keyed and partitioned as
``stream-kpis produce`` does (murmur2 of the key, as the Java and aiokafka producers).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from stream_kpis.core.events import DeadLetter, EventParser
from stream_kpis.generate import GeneratorConfig, write_jsonl
from stream_kpis.live.exporter import Exporter
from stream_kpis.live.kafka_tools import _file_messages
from stream_kpis.live.partition import (
    WRONG_KEY_DETAIL,
    InputRecord,
    PartitionTask,
    partial_value,
    statuses_from_records,
)
from stream_kpis.live.store import RocksStore
from stream_kpis.replay import source_for_path
from stream_kpis.settings import Settings

__all__ = ["STAGES", "StageTimes", "measure", "partitioned_file", "read_topics"]

PARTITIONS = 4
#: Records per partition and batch: the worker fetches up to 20,000 records over its partitions.
BATCH = 5_000
#: (stage, what it covers), in the order of the path.
STAGES = (
    ("read", "aiokafka getmany: fetch and decode the records (no value parsing)"),
    ("parse", "EventParser.parse of each value to an Event or a dead letter (the native fast "
              "path when built; else orjson.loads and validation in Python)"),
    ("validate", "the key check (the Kafka key is the event's partition key)"),
    ("apply", "Processor.process (member state from the cache/RocksDB, aggregates, signals)"),
    ("persist: state records", "PartitionTask.take_commit: member, bucket, dedupe and position "
                               "records of each batch"),
    ("persist: local store", "PartitionTask.committed: one RocksDB write batch per commit"),
    ("read model: enqueue", "the committed member records to the read model, coalesced per "
                            "member (ReadModel.update_member_snapshots)"),
    ("read model: flush", "ReadModel.flush: each pending member's status made once from its "
                          "record, written to Redis (one flush per emit interval; here one at "
                          "the end)"),
    ("evaluate", "exporter: decode the 4 partials, merge, evaluate_kpis (once per emission)"),
)


@dataclass
class StageTimes:
    """Seconds per stage, and what they covered."""

    seconds: dict[str, float] = field(default_factory=dict)
    records: int = 0
    events: int = 0             # records that became Events (not dead letters)
    commits: int = 0
    statuses: int = 0           # member updates enqueued (a member per commit it changed in)
    members_flushed: int = 0    # distinct members written to Redis
    partial_ms: float = 0.0     # making the 4 partials (aggs.to_bytes + zlib), once
    kpi_records: int = 0

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


def murmur2_partition(key: bytes | None, partitions: int) -> int:
    from aiokafka.partitioner import murmur2

    return 0 if key is None else (murmur2(key) & 0x7FFFFFFF) % partitions


def partitioned_file(path: Path, settings: Settings, partitions: int = PARTITIONS
                     ) -> dict[int, list[InputRecord]]:
    """The records of a JSONL file as the worker would fetch them after ``stream-kpis produce``:
    by partition, offsets counted per topic and partition."""
    offsets: dict[tuple[str, int], int] = {}
    by_partition: dict[int, list[InputRecord]] = {p: [] for p in range(partitions)}
    for topic, key, value in _file_messages(source_for_path(path), settings):
        partition = murmur2_partition(key, partitions)
        offset = offsets.get((topic, partition), 0)
        offsets[(topic, partition)] = offset + 1
        by_partition[partition].append(InputRecord(topic, partition, offset, key, value))
    return by_partition


async def read_topics(topics: list[str], bootstrap: str, total: int, partitions: int = PARTITIONS
                      ) -> tuple[dict[int, list[InputRecord]], float]:
    """Every record of the topics with a raw aiokafka consumer (getmany, the worker's fetch
    sizes), by partition; and the seconds from the end of the first fetch to the last (as the
    limit row)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                max_partition_fetch_bytes=4 << 20, fetch_max_bytes=64 << 20)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        by_partition: dict[int, list[InputRecord]] = {p: [] for p in range(partitions)}
        n, first, deadline = 0, None, time.monotonic() + 120
        while n < total and time.monotonic() < deadline:
            fetched = await consumer.getmany(timeout_ms=1000, max_records=20_000)
            for tp, records in fetched.items():
                by_partition[tp.partition].extend(records)
                n += len(records)
            if first is None and n:
                first = (time.perf_counter(), n)
        seconds = time.perf_counter() - first[0]
        # the stages below apply the records in full; the read stage's rate excludes the
        # first fetch (as the limit row), so it is scaled to every record
        return by_partition, seconds * n / max(1, n - first[1])
    finally:
        await consumer.stop()


def _batches(records: list[InputRecord], size: int) -> Iterator[list[InputRecord]]:
    """A partition's records in fetch-sized batches: each batch takes the next records of every
    topic (a fetch returns each topic-partition's records in offset order)."""
    by_topic: dict[str, list[InputRecord]] = {}
    for record in records:
        by_topic.setdefault(record.topic, []).append(record)
    per_topic = max(1, size // max(1, len(by_topic)))
    start = 0
    while any(start < len(rs) for rs in by_topic.values()):
        yield [r for rs in by_topic.values() for r in rs[start:start + per_topic]]
        start += per_topic


def measure(by_partition: dict[int, list[InputRecord]], settings: Settings, data_dir: Path, *,
            redis_url: str | None = None, redis_prefix: str | None = None,
            batch: int = BATCH, clock: Callable[[], float] = time.thread_time) -> StageTimes:
    """Apply the records partition by partition, batch by batch, timing each stage (see
    ``STAGES``); RocksDB stores in ``data_dir``; the read model stages only with ``redis_url``.
    The apply loop mirrors ``PartitionTask.apply`` with a clock between the steps. The clock is
    this thread's CPU time: on a shared machine, wall time would count other processes' turns
    (and the read model flush's wait for Redis, which the worker spends on other work)."""
    times = StageTimes()
    topic_types = {name: kind for kind, name in settings.topics.inputs().items()}
    parser = EventParser(settings.max_event_bytes, settings.max_skew_ms)
    readmodel = None
    if redis_url:
        from stream_kpis.live.readmodel import ReadModel

        readmodel = ReadModel.from_url(redis_url, prefix=redis_prefix or "bench-stages:")
    parse = parser.parse
    tasks: list[PartitionTask] = []
    gc.collect()
    for partition, records in sorted(by_partition.items()):
        store = RocksStore(data_dir / str(partition))
        task = PartitionTask(settings, partition, store, topic_types, parser)
        tasks.append(task)
        processor = task.processor
        for chunk in _batches(records, batch):
            started = clock()
            parsed_items = [parse(record.value or b"", topic_types[record.topic])
                            for record in chunk]
            parsed = clock()
            items = []
            for record, item in zip(chunk, parsed_items, strict=True):
                if item.__class__ is not DeadLetter and record.key != item.partition_key.encode():
                    item = DeadLetter("wrong_key", WRONG_KEY_DETAIL, record.value or b"")
                items.append(item)
            validated = clock()
            for record, item in zip(chunk, items, strict=True):
                task.positions[record.topic] = record.offset + 1
                if item.__class__ is not DeadLetter:
                    processor.process(item)
                    times.events += 1
            applied = clock()
            commit = task.take_commit()
            taken = clock()
            task.committed(commit, None)
            stored = clock()
            if readmodel is not None:  # as the worker's Pipeline._committed
                members = commit.members
                readmodel.update_member_snapshots(
                    members, partial(statuses_from_records, settings, commit.as_of, None))
                times.statuses += len(members)
            enqueued = clock()
            times.add("parse", parsed - started)
            times.add("validate", validated - parsed)
            times.add("apply", applied - validated)
            times.add("persist: state records", taken - applied)
            times.add("persist: local store", stored - taken)
            times.add("read model: enqueue", enqueued - stored)
            times.records += len(chunk)
            times.commits += 1
    if readmodel is not None:
        times.members_flushed = readmodel.pending_members

        async def flush() -> float:
            started = clock()
            ok = await readmodel.flush()
            seconds = clock() - started
            await readmodel.aclose()
            if not ok:
                raise RuntimeError("the read model flush failed (is Redis up?)")
            return seconds

        times.add("read model: flush", asyncio.run(flush()))
    started = clock()
    partials = [partial_value(t.processor.max_ts, t.positions, t.processor.aggs.to_bytes())
                for t in tasks]
    times.partial_ms = (clock() - started) * 1000
    started = clock()
    exporter = Exporter(settings)  # what the exporter does with the partials, each emission
    for task, value in zip(tasks, partials, strict=True):
        exporter.take(b"%d" % task.partition, value)
    times.kpi_records = len(exporter.evaluate())
    times.add("evaluate", clock() - started)
    for task in tasks:
        task.store.close()
    return times


def rows(times: StageTimes, read: tuple[int, float] | None = None
         ) -> list[tuple[str, str, float | None, float | None]]:
    """(stage, what, us per event, events/s) per stage; "per event" is per input record, and
    evaluate is per emission (ms in the us column's place is said in the what)."""
    out = []
    n = times.records
    for stage, what in STAGES:
        if stage == "read":
            if read is None:
                continue
            count, seconds = read
            out.append((stage, what, seconds / count * 1e6, count / seconds))
            continue
        seconds = times.seconds.get(stage)
        if seconds is None:
            continue
        if stage == "evaluate":
            out.append((stage, f"{what}: {seconds * 1000:.1f} ms for {times.kpi_records} records",
                        None, None))
            continue
        out.append((stage, what, seconds / n * 1e6, n / seconds if seconds else None))
    return out


def _print(table: list[tuple[str, str, float | None, float | None]], times: StageTimes) -> None:
    total = sum(us for stage, _, us, _ in table if us is not None and stage != "read")
    print(f"{times.records:,} records ({times.events:,} events), {times.commits} commits, "
          f"{times.statuses:,} member updates, {times.members_flushed:,} members flushed")
    print(f"{'stage':<24} {'us/event':>9} {'events/s':>11}  what")
    for stage, what, us, rate in table:
        print(f"{stage:<24} {'-' if us is None else f'{us:.2f}':>9} "
              f"{'-' if rate is None else f'{rate:,.0f}':>11}  {what}")
    print(f"{'sum (no read)':<24} {total:>9.2f} {1e6 / total:>11,.0f}")


def main(argv: list[str] | None = None, on_times: Callable[[StageTimes], None] | None = None
         ) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=33_669)
    parser.add_argument("--redis", help="a Redis URL: also the read model stages")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="stream-kpis-stages-"))
    try:
        path = tmp / "events.jsonl"
        write_jsonl(GeneratorConfig(members=args.members, days=90), path)
        settings = Settings(clock="event")
        by_partition = partitioned_file(path, settings)
        prefix = f"bench-stages-{uuid.uuid4().hex[:8]}:"
        times = measure(by_partition, settings, tmp / "data", redis_url=args.redis,
                        redis_prefix=prefix)
        _print(rows(times), times)
        if on_times is not None:
            on_times(times)
        if args.redis:
            import redis

            client = redis.Redis.from_url(args.redis)
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            for start in range(0, len(keys), 500):
                client.delete(*keys[start:start + 500])
            client.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
