"""stream-kpis benchmarks: throughput against the limit and against a plain Faust app, latency,
memory, recovery, replay, CLV and segments, measured in one run on one broker and printed as one
table.

    python benchmarks/run.py [--quick] [--profile]
        [--only limit,worker,stages,plain_faust,latency,memory,recovery,replay,clv,segments]

Machines are shared and noisy: every number in the table is measured in the same run, on the same
local broker (127.0.0.1 only) and the same data, and the ``ratio`` column compares it with the
baseline named next to it (the limit, the plain Faust app, a goal). Compare ratios between runs,
not absolute numbers. ``benchmarks/README.md`` describes the method and the last full run.

Every step is bounded in time; the run deletes its topics, consumer groups and Redis keys and
stops every process it started, also after an error or Ctrl-C. ``--quick`` uses small sizes
(a smoke test of the machinery, not a measurement).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

import clv as clv_bench  # noqa: E402
import common  # noqa: E402  (benchmarks/ is not a package)
import pyspy  # noqa: E402
import replay as replay_bench  # noqa: E402
import stages as stages_bench  # noqa: E402
from common import (  # noqa: E402
    BOOTSTRAP,
    BROKER_URL,
    PYTHON,
    REPO,
    BenchTimeout,
    GroupOffsets,
    Process,
    Row,
    Worker,
)

from stream_kpis.generate import GeneratorConfig, estimate_event_count, write_jsonl  # noqa: E402
from stream_kpis.live.kafka_tools import _file_messages, create_topics  # noqa: E402
from stream_kpis.replay import source_for_path  # noqa: E402
from stream_kpis.settings import Settings, load_settings  # noqa: E402

BENCHES = ("limit", "worker", "stages", "plain_faust", "latency", "memory", "recovery", "replay",
           "clv", "segments")
#: A bench whose ratios or state need another one.
NEEDS = {"worker": ("limit",), "stages": ("limit", "worker"), "plain_faust": ("limit",),
         "recovery": ("memory",)}
PARTITIONS = 4
#: Labels of the worker's variants (throughput rows, goals).
WORKER, WORKER_REDIS = "stream-kpis worker", "stream-kpis worker + Redis read model"
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
GIB = 1 << 30
#: Event time of the synthetic streams (latency, memory): well in the past, never "future".
EPOCH_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z


@dataclass(frozen=True)
class Sizes:
    events: int                  # lines of the throughput dataset (stream_kpis.generate)
    limit_repeat: int            # raw consumer runs (median reported)
    worker_timeout: float        # per worker run, to drain the whole dataset
    plain_seconds: float         # the plain Faust app is measured for at most this long
    latency_rates: tuple[int, ...]
    latency_seconds: float       # measured per rate, after the warm-up
    latency_warmup: float
    bucket_wall_s: float         # one event-time bucket per this much wall time
    memory_steps: tuple[int, int]
    memory_timeout: float        # to process one memory step
    replay_members: int
    replay_repeat: int
    clv_members: tuple[int, ...] = (100_000, 1_000_000)
    segments_members: int = 1_000_000


FULL = Sizes(events=300_000, limit_repeat=3, worker_timeout=300, plain_seconds=60,
             latency_rates=(1_000, 5_000, 10_000), latency_seconds=20, latency_warmup=4,
             bucket_wall_s=0.5, memory_steps=(100_000, 1_000_000), memory_timeout=420,
             replay_members=replay_bench.DEFAULT_MEMBERS, replay_repeat=1)
QUICK = Sizes(events=20_000, limit_repeat=1, worker_timeout=120, plain_seconds=20,
              latency_rates=(1_000,), latency_seconds=6, latency_warmup=2, bucket_wall_s=0.5,
              memory_steps=(5_000, 20_000), memory_timeout=120,
              replay_members=3_000, replay_repeat=1, clv_members=(10_000,),
              segments_members=20_000)

#: Goals of the open issues (11: exact state layer, 12: a faster core), evaluated at the end:
#: (name, text).
GOALS = {
    "worker_rate": "worker with the Redis read model >= 50k events/s (one process) (12)",
    "limit_ratio": "worker with the Redis read model >= 0.12x the limit (12)",
    "vs_plain": "worker ahead of the plain Faust app",
    "latency_p99": "p99 produce-to-KPI < 1 s at 5k events/s (11)",
    "memory": "1M members under 1 GiB RSS (12)",
    "recovery_empty": "recovery of 1M members from an empty data dir < 60 s (11)",
    "recovery_kept": "recovery of 1M members from a kept data dir < 10 s (11)",
    "replay": "JSONL replay >= 300k events/s (12)",
    "replay_csv": "mapped CSV replay, every KPI on, >= 0.3x csv.DictReader (12)",
}
#: Offered load of the latency goal (issue 11).
LATENCY_GOAL_RATE = 5_000


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- synthetic events --------------------------------------------------------------------------

def purchase(member_id: str, event_id: str, ts: int, amount: float = 25.0) -> bytes:
    """A member purchase as a producer would send it (RFC 3339 or epoch-ms ``ts``: epoch ms)."""
    return orjson.dumps({"event_id": event_id, "member_id": member_id, "ts": ts, "amount": amount,
                         "points": int(amount), "channel": "store"})


def member_purchases(start: int, stop: int, total: int) -> Iterator[tuple[str, bytes, bytes]]:
    """One purchase per member ``m-<i>`` for i in [start, stop), spread over 90 days by i/total."""
    for i in range(start, stop):
        member = f"m-{i:07d}"
        ts = EPOCH_MS + i * (90 * DAY_MS // total)
        yield "purchase", member.encode(), purchase(member, f"p-{i}", ts, 10.0 + i % 90)


# ---- the run -----------------------------------------------------------------------------------

@dataclass
class Throughput:
    """A drain observed from outside: (time, count) at the first non-zero reading and at the
    reading where the count last grew. The rate between them excludes startup and group join."""

    started: float
    first: tuple[float, int] | None = None
    last: tuple[float, int] | None = None
    complete: bool = False

    def see(self, now: float, count: int) -> None:
        if count <= 0:
            return
        if self.first is None:
            self.first = (now, count)
        if self.last is None or count > self.last[1]:
            self.last = (now, count)

    @property
    def rate(self) -> float | None:
        if self.first is None or self.last is None or self.last[0] <= self.first[0]:
            return None
        return (self.last[1] - self.first[1]) / (self.last[0] - self.first[0])

    @property
    def startup(self) -> float | None:
        return None if self.first is None else self.first[0] - self.started


@dataclass
class Run:
    sizes: Sizes
    quick: bool
    keep: bool
    run_id: str = field(default_factory=lambda: common.bench_id("run"))
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="stream-kpis-bench-")))
    rows: list[Row] = field(default_factory=list)
    goals: dict[str, tuple[bool | None, str]] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    redis_prefixes: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    latency_rates: tuple[int, ...] = ()
    profile: bool = False

    # -- environment ---------------------------------------------------------------------------
    def worker_env(self, app_id: str, prefix: str, data_dir: Path | None = None,
                   **extra: str) -> dict[str, str]:
        """A worker's environment: ours only (no STREAM_KPIS_* inherited from the caller)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_KPIS_")}
        env.update({
            "STREAM_KPIS_BROKER": BROKER_URL, "STREAM_KPIS_APP_ID": app_id,
            "STREAM_KPIS_TOPIC_PREFIX": prefix, "STREAM_KPIS_PARTITIONS": str(PARTITIONS),
            "STREAM_KPIS_CLOCK": "event", "STREAM_KPIS_REDIS_URL": "none",
            "STREAM_KPIS_REDIS_PREFIX": f"{app_id}:", "STREAM_KPIS_STORE": "rocksdb://",
            "STREAM_KPIS_DATA_DIR": str(data_dir or self.tmp / app_id),
            "STREAM_KPIS_WEB_HOST": "127.0.0.1", "STREAM_KPIS_WEB_PORT": str(common.free_port()),
            **extra})
        self.groups.extend(common.worker_groups(app_id))
        return env

    def settings(self, env: dict[str, str]) -> Settings:
        return load_settings(None, env=env)

    def start_worker(self, env: dict[str, str], label: str) -> Worker:
        create_topics(self.settings(env))
        return Worker(env, self.tmp / f"{label}.log")

    def add(self, *rows: Row) -> None:
        self.rows.extend(rows)

    def goal(self, name: str, met: bool | None, evidence: str) -> None:
        self.goals[name] = (met, evidence)

    # -- variants of the worker ------------------------------------------------------------------
    def variants(self) -> list[tuple[str, dict[str, str]]]:
        """(label, extra env) of each way the worker is run: as configured by default
        (``STREAM_KPIS_REDIS_URL=none``), and with the Redis read model when a local Redis
        answers."""
        variants = [(WORKER, {})]
        url = _redis_url()
        if url:
            variants.append((WORKER_REDIS, {"STREAM_KPIS_REDIS_URL": url}))
        return variants

    # -- the shared dataset ----------------------------------------------------------------------
    def dataset(self) -> tuple[str, int]:
        """Input topics (prefix) holding the throughput dataset; produced once per run."""
        if "dataset" in self.facts:
            return self.facts["dataset"]
        per_member = estimate_event_count(GeneratorConfig(members=10_000, days=90)) / 10_000
        members = max(100, round(self.sizes.events / per_member))
        path = self.tmp / "throughput.jsonl"
        summary = write_jsonl(GeneratorConfig(members=members, days=90), path)
        prefix = f"{self.run_id}."
        env = self.worker_env(f"{self.run_id}-topics", prefix)
        settings = self.settings(env)
        create_topics(settings)
        started = time.monotonic()
        sent = common.produce(_file_messages(source_for_path(path), settings), timeout=300)
        seconds = time.monotonic() - started
        log(f"dataset: {summary.lines:,} lines from {members:,} members ({summary.members:,} seen), "
            f"produced in {seconds:.1f} s ({sent / seconds:,.0f}/s)")
        self.facts["dataset"] = (prefix, sent)
        self.facts["dataset_members"] = members
        self.facts["dataset_by_type"] = summary.by_type
        self.facts["dataset_bad"] = (summary.duplicates, summary.malformed)
        self.facts["dataset_bytes"] = path.stat().st_size / max(1, summary.lines)
        self.add(Row("data", "throughput dataset: lines (stream_kpis.generate, 90 days)", sent,
                     "events", note=f"{members:,} members; {summary.duplicates:,} duplicates, "
                     f"{summary.malformed:,} malformed; {self.facts['dataset_bytes']:.0f} B/line"),
                 Row("data", "aiokafka producer (linger 20 ms, acks=1)", sent / seconds, "events/s"))
        return self.facts["dataset"]


# ---- 1: the limit ------------------------------------------------------------------------------

async def _raw_consume(topics: list[str], total: int, timeout: float) -> tuple[int, float]:
    """Raw aiokafka: getmany(max_records=10000) + orjson.loads of every value. Returns
    (records after the first batch, seconds from the end of the first batch to the last)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, group_id=None,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        partitions = [TopicPartition(t, p) for t in topics for p in range(PARTITIONS)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        loads, error = orjson.loads, orjson.JSONDecodeError
        n, first, deadline = 0, None, time.monotonic() + timeout
        while n < total:
            if time.monotonic() > deadline:
                raise BenchTimeout(f"raw consumer read {n:,} of {total:,} in {timeout:.0f} s")
            batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            for records in batch.values():
                for record in records:
                    try:
                        loads(record.value)
                    except error:
                        pass
                n += len(records)
            if first is None and n:
                first = (time.perf_counter(), n)
        return n - first[1], time.perf_counter() - first[0]
    finally:
        await consumer.stop()


def bench_limit(run: Run) -> None:
    prefix, total = run.dataset()
    topics = list(_topics(prefix).inputs().values())
    rates = []
    for _ in range(run.sizes.limit_repeat):
        n, seconds = asyncio.run(_raw_consume(topics, total, timeout=120))
        rates.append(n / seconds)
    rate = statistics.median(rates)
    run.facts["limit"] = rate
    spread = f"median of {len(rates)}: {min(rates):,.0f}-{max(rates):,.0f}" if len(rates) > 1 else ""
    run.add(Row("limit", "raw aiokafka getmany(10000) + orjson.loads, 4 topics", rate, "events/s",
                "limit", 1.0, spread))


def _topics(prefix: str):
    from stream_kpis.settings import Topics

    return Topics.with_prefix(prefix)


# ---- 2: the worker -----------------------------------------------------------------------------

def drain_worker(worker: Worker, total: int, timeout: float,
                 offsets: GroupOffsets | None = None,
                 on_first: Callable[[], None] | None = None) -> tuple[Throughput, Throughput | None]:
    """Poll /metrics every 50 ms (and the group's commits every ~0.5 s) until ``total``
    records are accounted for; ``on_first`` is called at the first non-zero reading."""
    by_metrics = Throughput(worker.started)
    by_commits = Throughput(worker.started) if offsets is not None else None
    deadline = worker.started + timeout
    polls = 0
    while True:
        worker.check_alive()
        seen = worker.events_seen()
        now = time.monotonic()
        if seen and by_metrics.first is None and on_first is not None:
            on_first()
        by_metrics.see(now, seen)
        if by_commits is not None and polls % 10 == 0:
            by_commits.see(time.monotonic(), offsets.total())
        polls += 1
        if seen >= total:
            by_metrics.complete = True
            break
        if now > deadline:
            break
        time.sleep(0.05)
    if by_commits is not None and by_metrics.complete:  # the last commits, for the cross-check
        commit_deadline = time.monotonic() + 15
        while time.monotonic() < commit_deadline:
            committed = offsets.total()
            by_commits.see(time.monotonic(), committed)
            if committed >= total:
                by_commits.complete = True
                break
            time.sleep(0.2)
    return by_metrics, by_commits


def bench_worker(run: Run) -> None:
    prefix, total = run.dataset()
    inputs = list(_topics(prefix).inputs().values())
    limit = run.facts.get("limit")
    for label, extra in run.variants():
        app_id = f"{run.run_id}-w{len(run.groups)}"
        env = run.worker_env(app_id, prefix, **extra)
        if "STREAM_KPIS_REDIS_URL" in extra:
            run.redis_prefixes.append(env["STREAM_KPIS_REDIS_PREFIX"])
        worker = run.start_worker(env, f"worker-{len(run.groups)}")
        offsets = GroupOffsets(f"{app_id}-ingest", inputs)  # committed in the transactions
        profile: list[pyspy.Recorder] = []

        def start_profile(worker: Worker = worker, label: str = label,
                          profile: list = profile) -> None:
            if run.profile:
                name = "worker-redis" if label == WORKER_REDIS else "worker"
                profile.append(pyspy.Recorder(worker.pid, run.tmp / f"{name}-pyspy.txt",
                                              seconds=run.sizes.worker_timeout))
        try:
            by_metrics, by_commits = drain_worker(worker, total, run.sizes.worker_timeout, offsets,
                                                  on_first=start_profile)
            rss = common.rss_bytes(worker.pid)
        finally:
            for recorder in profile:
                if recorder.stop():
                    run.facts.setdefault("profiles", []).append(
                        f"{label}: " + pyspy.summarize(recorder.output))
            worker.stop()
            offsets.close()
        rate = by_metrics.rate
        note = [f"startup {by_metrics.startup:.1f} s" if by_metrics.startup is not None else "",
                f"RSS {rss / 2**20:.0f} MiB"]
        if by_commits is not None and by_commits.rate:
            note.append(f"by commits {by_commits.rate:,.0f}/s")
        if by_metrics.first is not None and by_metrics.last is not None:
            note.append(f"drained in {by_metrics.last[0] - by_metrics.first[0]:.1f} s")
        if profile:
            note.append("under py-spy (--profile)")
        if not by_metrics.complete:
            seen = by_metrics.last[1] if by_metrics.last else 0
            note.append(f"INCOMPLETE: {seen:,} of {total:,} in {run.sizes.worker_timeout:.0f} s")
        run.facts.setdefault("worker", {})[label] = rate
        log(f"worker ({label}): {rate or 0:,.0f} events/s")
        run.add(Row("worker", label, rate, "events/s", "limit",
                    rate / limit if rate and limit else None, "; ".join(n for n in note if n)))


def _redis_url() -> str | None:
    """The local Redis when it answers (REDIS_PORT/REDIS_PASSWORD as the deploy scripts)."""
    password = os.environ.get("REDIS_PASSWORD", "")
    url = (f"redis://{':' + password + '@' if password else ''}127.0.0.1:"
           f"{int(os.environ.get('REDIS_PORT', 6379))}/0")
    try:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return url if client.ping() else None
        finally:
            client.close()
    except Exception:  # not installed, not running, refused: no Redis variant
        return None


# ---- 2b: the worker's path stage by stage ------------------------------------------------------

def bench_stages(run: Run) -> None:
    """The worker's path on the throughput dataset, stage by stage (benchmarks/stages.py): the
    records read from the broker by a raw consumer (the read stage), then parsed, validated,
    applied, persisted and sent to the read model in-process, in the worker's batch sizes."""
    prefix, total = run.dataset()
    topics = list(_topics(prefix).inputs().values())
    started = time.thread_time()
    by_partition, read_wall = asyncio.run(stages_bench.read_topics(topics, BOOTSTRAP, total))
    read_cpu = time.thread_time() - started
    records = sum(len(rs) for rs in by_partition.values())  # aiokafka's records serve as they are
    redis_url = _redis_url()
    redis_prefix = f"{run.run_id}-stages:"
    if redis_url:
        run.redis_prefixes.append(redis_prefix)
    settings = run.settings(run.worker_env(f"{run.run_id}-stages", prefix))
    times = stages_bench.measure(by_partition, settings, run.tmp / "stages", redis_url=redis_url,
                                 redis_prefix=redis_prefix)
    rows = stages_bench.rows(times, (records, read_cpu))
    cpu_total = sum(us for _, _, us, _ in rows if us is not None)
    worker = run.facts.get("worker", {})
    for stage, what, us, rate in rows:
        if stage == "read":
            what = f"{what}; wall {records / read_wall:,.0f} records/s"
        if us is None:
            run.add(Row("stages", f"{stage}: {what}", times.seconds[stage] * 1000, "ms"))
            continue
        run.add(Row("stages", f"{stage}: {what}", us, "us/event", "sum",
                    us / cpu_total, f"{rate:,.0f} events/s"))
    note = (f"{times.records:,} records in {times.commits} commits; {times.statuses:,} member "
            f"updates for {times.members_flushed:,} members; partials {times.partial_ms:.0f} ms")
    run.add(Row("stages", "sum of the stages (CPU time of one thread)", cpu_total, "us/event",
                "sum", 1.0, note))
    for label, rate in worker.items():
        if rate:
            run.add(Row("stages", f"{label}, end to end (its row above)", 1e6 / rate, "us/event",
                        "sum", 1e6 / rate / cpu_total, f"{rate:,.0f} events/s"))


# ---- 3: the plain Faust app --------------------------------------------------------------------

def bench_plain_faust(run: Run) -> None:
    prefix, total = run.dataset()
    inputs = list(_topics(prefix).inputs().values())
    limit = run.facts.get("limit")
    app_id = f"{run.run_id}-plain"
    run.groups.append(app_id)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAM_KPIS_", "PLAIN_FAUST_"))}
    env.update(PLAIN_FAUST_APP_ID=app_id, PLAIN_FAUST_TOPIC_PREFIX=prefix,
               PLAIN_FAUST_BROKER=BROKER_URL, PLAIN_FAUST_PARTITIONS=str(PARTITIONS),
               PLAIN_FAUST_WEB_PORT=str(common.free_port()),
               PLAIN_FAUST_DATA_DIR=str(run.tmp / app_id),
               # the worker's producer batching (app.faust_app_kwargs), so both batch alike
               PLAIN_FAUST_PRODUCER_LINGER="0.02")
    app = Process([PYTHON, str(REPO / "benchmarks" / "plain_faust_app.py"), "worker", "-l", "info"],
                  env, run.tmp / "plain-faust.log")
    offsets = GroupOffsets(app_id, inputs)
    seen = Throughput(app.started)
    try:
        deadline = app.started + 120  # to join and start consuming
        while True:
            if not app.alive():
                raise RuntimeError(f"plain Faust app exited:\n{app.log_tail()}")
            now = time.monotonic()
            seen.see(now, offsets.total())
            if seen.last is not None and seen.last[1] >= total:
                seen.complete = True
                break
            if seen.first is not None:
                deadline = min(deadline, seen.first[0] + run.sizes.plain_seconds)
            if now > deadline:
                break
            time.sleep(0.25)
        rss = common.rss_bytes(app.pid)
    finally:
        app.stop()
        offsets.close()
    rate = seen.rate
    done = seen.last[1] if seen.last else 0
    note = (f"by commits; {done:,} of {total:,} in the {run.sizes.plain_seconds:.0f} s cap"
            if not seen.complete else "by commits; drained")
    note += f"; RSS {rss / 2**20:.0f} MiB"
    run.facts["plain"] = rate
    log(f"plain Faust: {rate or 0:,.0f} events/s")
    run.add(Row("plain_faust", "plain Faust app (benchmarks/plain_faust_app.py)", rate, "events/s",
                "limit", rate / limit if rate and limit else None, note))
    for label, worker_rate in run.facts.get("worker", {}).items():
        if worker_rate and rate:
            run.add(Row("plain_faust", f"{label} vs plain Faust", worker_rate,
                        "events/s", "plain Faust", worker_rate / rate))


# ---- 4: latency --------------------------------------------------------------------------------

def _as_of_bucket(as_of: str) -> int:
    """KPI records carry the end of their as-of bucket K."""
    return int(datetime.fromisoformat(as_of).timestamp() * 1000) // HOUR_MS - 1


async def _offered_load(settings: Settings, rate: int, seconds: float, warmup: float,
                        bucket_wall_s: float, first_bucket: int
                        ) -> tuple[list[float], int, float, int]:
    """Produce purchases at ``rate``/s, moving event time to a new bucket every
    ``bucket_wall_s``; per bucket, the time from sending its first event to the first KPI record
    whose as-of bucket reaches it. Returns (latencies of buckets after the warm-up, buckets not
    visible in time, events/s really offered, next free bucket)."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    kpi_topic = settings.topics.kpi_active_rate
    consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, group_id=None,
                                enable_auto_commit=False, fetch_max_wait_ms=10)
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, linger_ms=5, acks=1)
    await consumer.start()
    await producer.start()
    visible: dict[int, float] = {}
    sent_first: dict[int, float] = {}

    async def watch() -> None:
        highest = None
        while True:
            batch = await consumer.getmany(timeout_ms=100)
            arrived = time.monotonic()
            for records in batch.values():
                for record in records:
                    K = _as_of_bucket(orjson.loads(record.value)["as_of"])
                    if highest is None or K > highest:
                        for k in range(K if highest is None else highest + 1, K + 1):
                            visible[k] = arrived
                        highest = K

    try:
        tp = TopicPartition(kpi_topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_end(tp)
        await consumer.position(tp)
        watcher = asyncio.create_task(watch())
        rng = random.Random(rate)
        topic = settings.topics.purchases
        total_s = warmup + seconds
        started = time.monotonic()
        sent = 0
        last_bucket = first_bucket
        while (elapsed := time.monotonic() - started) < total_s:
            bucket = first_bucket + int(elapsed / bucket_wall_s)
            due = int(rate * elapsed)
            while sent < due:
                if bucket not in sent_first:
                    sent_first[bucket] = time.monotonic()
                member = f"m-{rng.randrange(20_000):05d}"
                ts = bucket * HOUR_MS + sent % HOUR_MS
                await producer.send(topic, purchase(member, f"l-{first_bucket}-{sent}", ts),
                                    key=member.encode())
                sent += 1
            last_bucket = bucket
            await asyncio.sleep(0.005)
        offered = sent / (time.monotonic() - started)
        await producer.flush()
        wait_until = time.monotonic() + 10
        while time.monotonic() < wait_until and last_bucket not in visible:
            await asyncio.sleep(0.05)
        watcher.cancel()
        measured = [b for b in sent_first
                    if sent_first[b] - started >= warmup]
        latencies = [visible[b] - sent_first[b] for b in measured if b in visible]
        return latencies, len(measured) - len(latencies), offered, last_bucket + 1
    finally:
        await producer.stop()
        await consumer.stop()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(round(q * len(ordered) + 0.5)) - 1))]


def wait_ready(worker: Worker, timeout: float = 90) -> None:
    """Until the worker owns every input partition and the global exporter role."""
    def ready() -> bool:
        worker.check_alive()
        metrics = worker.metrics()
        return (metrics.get("stream_kpis_assigned_partitions", 0) >= PARTITIONS
                and metrics.get("stream_kpis_global_exporter", 0) >= 1)
    common.wait_until(ready, timeout, "worker ready (partitions and exporter role)", 0.2)


def _trend(latencies: list[float]) -> str:
    """Mean of the first and last tenth of the buckets: a rising series means the worker falls
    behind the offered load (a queue builds), a flat one is its steady-state latency."""
    k = max(1, len(latencies) // 10)
    first, last = statistics.mean(latencies[:k]), statistics.mean(latencies[-k:])
    trend = f"first/last {k} buckets {first:.2f} -> {last:.2f} s"
    return trend + (" (rising: falls behind)" if last > 2 * first + 0.5 else "")


def bench_latency(run: Run) -> None:
    emit = "250ms"
    app_id = f"{run.run_id}-lat"
    env = run.worker_env(app_id, f"{app_id}.", STREAM_KPIS_EMIT_INTERVAL=emit)
    worker = run.start_worker(env, "latency")
    try:
        wait_ready(worker)
        bucket = (int(time.time() * 1000) - 30 * DAY_MS) // HOUR_MS
        for rate in run.latency_rates:
            latencies, missing, offered, bucket = asyncio.run(asyncio.wait_for(
                _offered_load(run.settings(env), rate, run.sizes.latency_seconds,
                              run.sizes.latency_warmup, run.sizes.bucket_wall_s, bucket),
                run.sizes.latency_seconds + run.sizes.latency_warmup + 60))
            worker.check_alive()
            (run.tmp / f"latency-{rate}.json").write_text(
                json.dumps({"latencies_s": latencies, "missing": missing}))
            p50 = percentile(latencies, 0.5) if latencies else None
            p99 = percentile(latencies, 0.99) if latencies else None
            if missing and len(latencies) < 0.99 * (len(latencies) + missing):
                p99 = None  # buckets never visible within 10 s after the load: beyond that
            run.facts.setdefault("latency", {})[rate] = (p50, p99, missing)
            log(f"latency ({rate}/s): p50 {p50}, p99 {p99}, missing {missing}")
            note = (f"{len(latencies)} buckets, offered {offered:,.0f}/s, emit_interval {emit} "
                    f"(a floor){f', {missing} not visible in 10 s' if missing else ''}")
            run.add(Row("latency", f"produce->KPI p50 at {rate:,}/s", None if p50 is None
                        else p50 * 1000, "ms", "goal 1 s", p50, note),
                    Row("latency", f"produce->KPI p99 at {rate:,}/s", None if p99 is None
                        else p99 * 1000, "ms", "goal 1 s", p99,
                        _trend(latencies) if latencies else ""))
    finally:
        worker.stop()


# ---- 5: memory ---------------------------------------------------------------------------------

def _settle_rss(pid: int, seconds: float = 3.0) -> int:
    """RSS after ``seconds`` of quiet (the largest of the readings, a conservative figure)."""
    readings = []
    for _ in range(int(seconds / 0.5)):
        time.sleep(0.5)
        readings.append(common.rss_bytes(pid))
    return max(readings)


def bench_memory(run: Run) -> None:
    app_id = f"{run.run_id}-mem"
    prefix = f"{app_id}."
    data_dir = run.tmp / "memory-data"
    env = run.worker_env(app_id, prefix, data_dir, STREAM_KPIS_EMIT_INTERVAL="1s")
    settings = run.settings(env)
    topics = {"purchase": settings.topics.purchases}
    worker = run.start_worker(env, "memory")
    small, large = run.sizes.memory_steps
    try:
        wait_ready(worker)
        idle = _settle_rss(worker.pid)
        run.add(Row("memory", "worker RSS idle", idle / 2**20, "MiB"))
        done = 0
        for step in (small, large):
            started = time.monotonic()
            common.produce(((topics[t], k, v) for t, k, v in member_purchases(done, step, large)),
                           timeout=300)
            produced = time.monotonic() - started
            common.wait_until(lambda step=step: worker.check_alive() or worker.events_seen() >= step,
                              run.sizes.memory_timeout, f"worker processing {step:,} members", 0.25)
            processed = time.monotonic() - started
            rss = _settle_rss(worker.pid)
            metrics = worker.metrics()
            members = metrics.get('stream_kpis_table_rows{table="members"}')
            disk = common.dir_bytes(data_dir)
            per_member = (rss - idle) / step
            log(f"memory: {step:,} members: RSS {rss / 2**20:.0f} MiB, {per_member:.0f} B/member")
            run.add(Row("memory", f"worker RSS with {step:,} members", rss / 2**20, "MiB",
                        "goal 1 GiB" if step == large else "", rss / GIB if step == large else None,
                        f"members gauge {members or 0:,.0f}; RocksDB dir {disk / 2**20:.0f} MiB; "
                        f"produce+process {processed:.0f} s (produce {produced:.0f} s)"),
                    Row("memory", f"worker RSS per member above idle, {step:,} members",
                        per_member, "bytes/member"))
            if step == large:
                run.facts["memory"] = rss
            done = step
        run.facts["recovery_source"] = {"env": env, "members": large, "prefix": prefix}
    finally:
        worker.stop()
    for core in ("python", "native"):
        child = subprocess.run([PYTHON, __file__, "--child-processor-memory", str(large),
                                "--child-core", core],
                               capture_output=True, text=True, timeout=run.sizes.memory_timeout,
                               cwd=REPO)
        if child.returncode != 0:
            raise RuntimeError(f"processor memory child failed:\n{child.stderr[-2000:]}")
        result = json.loads(child.stdout.strip().splitlines()[-1])
        if result.get("core") != core:  # the native core is not built, or does not cover this
            continue
        grown = result["after"] - result["before"]
        name = "Processor" if core == "python" else "NativeProcessor (the native core)"
        run.add(Row("memory", f"replay {name} (in process) RSS with {result['members']:,} members",
                    result["after"] / 2**20, "MiB", "goal 1 GiB", result["after"] / GIB,
                    f"{result['before'] / 2**20:.0f} MiB before"),
                Row("memory", f"replay {name} RSS per member", grown / result["members"],
                    "bytes/member"))


def child_processor_memory(members: int, core: str) -> None:
    """In a fresh process: RSS of a replay core (``python``: Processor; ``native``:
    NativeProcessor when built) before and after ``members`` members."""
    import gc

    from stream_kpis.core import Processor
    from stream_kpis.core.events import EventParser
    from stream_kpis.core.native_core import make_processor

    parser = EventParser()
    settings = Settings()
    processor = Processor(settings) if core == "python" else make_processor(settings)
    gc.collect()
    before = common.rss_bytes(os.getpid())
    batch = []
    for _, _, value in member_purchases(0, members, members):
        batch.append(parser.parse(value, "purchase"))
        if len(batch) == 4096:
            processor.process_batch(batch)
            batch = []
    processor.process_batch(batch)
    batch = []
    gc.collect()
    after = common.rss_bytes(os.getpid())
    used = "python" if type(processor) is Processor else "native"
    print(json.dumps({"before": before, "after": after, "core": used,
                      "members": int(processor.aggs.totals["members"])}))


# ---- 6: recovery -------------------------------------------------------------------------------

#: The worker's line when it takes a partition (stream_kpis/live/ingest.py, Ingest._take).
TAKEN = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\].*partition (\d+) taken: state "
                   r"(recovered|kept in memory) \((\d+) members, log end (\d+)\) in ([\d.]+)s", re.M)
PROBES = 64


@dataclass
class Taken:
    """One 'partition N taken' log line."""

    wall: float
    partition: int
    how: str
    members: int
    log_end: int
    seconds: float


def taken_lines(text: str) -> dict[int, Taken]:
    """The first 'partition N taken' line of each partition in a worker's log."""
    found: dict[int, Taken] = {}
    for stamp, partition, how, members, end, seconds in TAKEN.findall(text):
        wall = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        found.setdefault(int(partition), Taken(wall, int(partition), how, int(members), int(end),
                                               float(seconds)))
    return found


def _recover(run: Run, env: dict[str, str], label: str, members: int, goal_s: float) -> None:
    """Start a worker on ``env``'s data dir; time process start -> every partition taken and
    -> PROBES new events applied (produced before the start, so every partition has input)."""
    settings = run.settings(env)
    app_id = env["STREAM_KPIS_APP_ID"]
    stores = Path(env["STREAM_KPIS_DATA_DIR"]) / app_id / "state"
    ends = common.end_offsets(f"{app_id}-state", PARTITIONS)
    offsets = {p: common.local_store_offset(stores / str(p)) or 0 for p in range(PARTITIONS)}
    log_size, to_read = sum(ends.values()), sum(max(0, ends[p] - offsets[p]) for p in ends)
    tag = label.split()[0]
    common.produce(((settings.topics.purchases, f"probe-{tag}-{i}".encode(),
                     purchase(f"probe-{tag}-{i}", f"probe-{tag}-{i}", EPOCH_MS + 91 * DAY_MS))
                    for i in range(PROBES)), timeout=60)
    timeout = 300 if not run.quick else 120
    started_wall = time.time()
    worker = Worker(env, run.tmp / f"recovery-{tag}.log")
    recorder = None
    try:
        if run.profile:
            time.sleep(0.3)  # py-spy needs the interpreter up
            recorder = pyspy.Recorder(worker.pid, run.tmp / f"recovery-{tag}-pyspy.txt",
                                      seconds=timeout)
        def all_taken() -> dict[int, Taken] | None:
            worker.check_alive()
            lines = taken_lines(worker.log_text())
            return lines if len(lines) >= PARTITIONS else None

        def applied_at() -> float | None:
            worker.check_alive()
            return time.time() if worker.events_seen() >= PROBES else None

        lines = common.wait_until(all_taken, timeout, f"every partition taken ({label})", 0.1)
        applied = common.wait_until(applied_at, timeout, f"{PROBES} new events applied ({label})",
                                    0.1)
        if recorder is not None and recorder.stop():
            run.facts.setdefault("profiles", []).append(
                f"recovery, {label} (process start to new events applied): "
                + pyspy.summarize(recorder.output))
        time.sleep(1.0)
        counted = worker.events_seen()
        rss = common.rss_bytes(worker.pid)
    finally:
        if recorder is not None:
            recorder.stop()
        worker.stop()
    to_taken = max(t.wall for t in lines.values()) - started_wall
    to_applied = applied - started_wall
    recovered = sum(t.how == "recovered" for t in lines.values())
    taken_members = sum(t.members for t in lines.values())
    slowest = max(t.seconds for t in lines.values())
    run.facts.setdefault("recovery", {})[tag] = (to_taken, to_applied)
    log(f"recovery ({label}): taken {to_taken:.1f} s, applied {to_applied:.1f} s, "
        f"{to_read:,} of {log_size:,} state log offsets to read")
    how = (f"'state recovered' x{recovered}" if recovered == len(lines)
           else f"NOT all recovered: {sorted(t.how for t in lines.values())}")
    run.add(Row("recovery", f"{label}: process start -> every partition taken", to_taken, "s",
                f"goal {goal_s:.0f} s", to_taken / goal_s,
                f"{how}, {taken_members:,} members; log tail read {to_read:,} of {log_size:,} "
                f"offsets; slowest partition's take {slowest:.2f} s"),
            Row("recovery", f"{label}: process start -> {PROBES} new events applied", to_applied,
                "s", f"goal {goal_s:.0f} s", to_applied / goal_s,
                f"{counted:,} events counted (expected {PROBES}); RSS after {rss / 2**20:.0f} MiB"))


def bench_recovery(run: Run) -> None:
    """1M members (the memory bench's state): a new worker of the same app id with an empty
    data dir reads the whole state log; then the memory bench's own worker is restarted on its
    kept data dir, which misses only what the first one committed (a short log tail)."""
    source = run.facts.get("recovery_source")
    if source is None:
        raise RuntimeError("needs the memory bench's state (it failed or did not run)")
    env = {**source["env"], "STREAM_KPIS_DATA_DIR": str(run.tmp / "recovery-data"),
           "STREAM_KPIS_WEB_PORT": str(common.free_port())}
    _recover(run, env, "empty data dir", source["members"], 60)
    env = {**source["env"], "STREAM_KPIS_WEB_PORT": str(common.free_port())}
    _recover(run, env, "kept data dir (restart)", source["members"], 10)


# ---- 7: replay ---------------------------------------------------------------------------------

def bench_replay(run: Run) -> None:
    """JSONL replay (against reading + orjson) and mapped-CSV replay with every KPI on (against
    csv.DictReader over the same files), and their stages one at a time (benchmarks/replay.py)."""
    path = replay_bench.generate_file(run.sizes.replay_members, 90, run.tmp)
    jsonl = replay_bench.measure(path, run.sizes.replay_repeat)
    mapped = replay_bench.measure_csv(replay_bench.generate_csv(path, run.tmp / "csv"),
                                      run.sizes.replay_repeat)
    for result, label, fact in ((jsonl, "read+orjson", "replay"),
                                (mapped, "csv.DictReader", "replay_csv")):
        rates = {what: items / seconds for what, items, seconds, _ in result.rows if items > 1}
        for what, items, seconds, baseline in result.rows:
            if items == 1:
                run.add(Row("replay", what, seconds * 1000, "ms"))
                continue
            rate = rates[what]
            base_rate = rates[baseline] if baseline else rate
            run.add(Row("replay", what, rate, "events/s", label, rate / base_rate,
                        f"{result.lines:,} lines, {result.members:,} members" if not baseline
                        else ""))
            if "end to end" in what and "pure Python" not in what:  # the goal: as built
                run.facts[fact] = (rate, rate / base_rate)


def bench_clv(run: Run) -> None:
    """The predictive CLV refit (SPEC 4.4) on synthetic sufficient statistics (benchmarks/clv.py),
    and one evaluation of its KPIs with the fitted parameters."""
    for members in run.sizes.clv_members:
        result = clv_bench.bench(members)
        note = (f"{result['bgnbd_rows']:,} BG/NBD + {result['gg_rows']:,} Gamma-Gamma groups, "
                f"{result['bytes'] / 1e6:.1f} MB of statistics")
        run.add(Row("clv", f"refit, {members:,} members", result["fit_s"], "s", "goal 5 s",
                    result["fit_s"] / 5.0, note))
        run.add(Row("clv", f"evaluate the CLV KPIs, {members:,} members", result["records_s"] * 1000,
                    "ms"))
        run.facts.setdefault("clv", {})[members] = result["fit_s"]


def bench_segments(run: Run) -> None:
    """Issue 14 at scale: all five segment dimensions, 50 stores and 3 tiers, in the core
    (benchmarks/segments.py, in its own process): the published partial of a partition and the
    time an emission takes to merge the partials and evaluate every KPI, against the default
    10 s emit interval. ``segments.py --live --compare`` measures one worker (not run here)."""
    members = run.sizes.segments_members
    child = subprocess.run([PYTHON, str(REPO / "benchmarks" / "segments.py"), "--members",
                            str(members), "--segments", "all", "--raw"],
                           capture_output=True, text=True, timeout=1200, cwd=REPO)
    if child.returncode != 0:
        raise RuntimeError(f"segments.py failed:\n{child.stderr[-2000:]}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    label = f"{members:,} members, all five dimensions"
    emission_s = result["emission_ms"] / 1000
    run.add(Row("segments", f"core ingest, 8 partitions in one process ({label})",
                result["events_per_s"], "events/s", "", None, f"{result['events']:,} events"),
            Row("segments", "published partial of one partition (zlib), largest",
                result["published_max_kib"], "KiB", "", None,
                f"{result['partial_max_kib']:,.0f} KiB before zlib; made in "
                f"{result['encode_ms']:,.0f} ms"),
            Row("segments", "emission: Exporter.evaluate of the 8 partials (merge + every KPI)",
                emission_s, "s", "emit_interval 10 s", emission_s / 10,
                f"{result['records']:,} records ({result['segment_records']:,} segment)"),
            Row("segments", "core process RSS after ingest / peak (member states in dicts)",
                result["rss_mib"], "MiB", "", None, f"peak {result['maxrss_mib']:,.0f} MiB"))


# ---- goals and output ----------------------------------------------------------------------------

def evaluate_goals(run: Run) -> None:
    workers = run.facts.get("worker", {})
    label = WORKER_REDIS if workers.get(WORKER_REDIS) else WORKER
    worker = workers.get(label)
    limit, plain = run.facts.get("limit"), run.facts.get("plain")
    if worker is not None:
        run.goal("worker_rate", worker >= 50_000, f"{worker:,.0f} events/s ({label})")
    if worker is not None and limit:
        run.goal("limit_ratio", worker >= 0.12 * limit, f"{worker / limit:.3f}x ({label})")
    if worker is not None and plain:
        run.goal("vs_plain", worker > plain, f"{worker / plain:.1f}x ({label})")
    latency = run.facts.get("latency", {})
    if LATENCY_GOAL_RATE in latency:
        p50, p99, missing = latency[LATENCY_GOAL_RATE]
        run.goal("latency_p99", p99 is not None and p99 < 1.0,
                 f"p99 {p99 * 1000:,.0f} ms at {LATENCY_GOAL_RATE:,}/s" if p99 is not None
                 else f"p99 not reached: {missing} buckets not visible at {LATENCY_GOAL_RATE:,}/s")
    if "memory" in run.facts:
        rss = run.facts["memory"]
        run.goal("memory", rss < GIB, f"{rss / 2**20:,.0f} MiB RSS with "
                 f"{run.sizes.memory_steps[1]:,} members")
    recovery = run.facts.get("recovery", {})
    members = run.sizes.memory_steps[1]
    for name, tag, goal_s in (("recovery_empty", "empty", 60), ("recovery_kept", "kept", 10)):
        if tag in recovery:
            worst = max(recovery[tag])
            run.goal(name, worst < goal_s, f"{worst:.2f} s to every partition taken and new "
                     f"events applied ({members:,} members)")
    if "replay" in run.facts:
        rate, _ = run.facts["replay"]
        run.goal("replay", rate >= 300_000, f"{rate:,.0f} events/s end to end")
    if "replay_csv" in run.facts:
        rate, ratio = run.facts["replay_csv"]
        run.goal("replay_csv", ratio >= 0.3, f"{ratio:.3f}x ({rate:,.0f} events/s end to end)")


def machine() -> str:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().split()[1]
    import aiokafka
    import faust

    return (f"{os.cpu_count()} CPUs ({cpu}), {int(mem) / 2**20:.1f} GiB RAM, Python "
            f"{platform.python_version()}, faust-streaming {faust.__version__}, aiokafka "
            f"{aiokafka.__version__}, Kafka {common.kafka_version()} on {BOOTSTRAP}")


def code_version() -> str:
    """The commit, and a digest of stream_kpis/**/*.py as measured (the tree may be uncommitted):
    of the package the workers import, which PYTHONPATH may point at another checkout."""
    import hashlib

    import stream_kpis

    package = Path(stream_kpis.__file__).resolve().parent
    digest = hashlib.sha1()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + path.read_bytes())
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=package, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "."], capture_output=True,
                               text=True, cwd=package, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", ""
    where = "" if package.parent == REPO else f" (stream_kpis from {package.parent})"
    from stream_kpis.core.native import native_status

    return f"{commit or 'unknown'}{' + uncommitted changes' if dirty else ''}{where}, " \
           f"stream_kpis/**/*.py sha1 {digest.hexdigest()[:12]}, native fast paths {native_status()}"


def report(run: Run, seconds: float, load: tuple[str, str]) -> str:
    status = {True: "met", False: "MISSED", None: "n/a"}
    if run.quick:
        status = {True: "met (quick sizes)", False: "missed (quick sizes)", None: "n/a"}
    lines = [f"stream-kpis benchmarks{' (--quick: smoke sizes, not a measurement)' if run.quick else ''}",
             f"machine: {machine()}", f"code: {code_version()}",
             f"load average: {load[0]} at start, {load[1]} at end; run took {seconds / 60:.1f} min",
             "", common.table([row.cells() for row in run.rows], common.HEADERS), "",
             common.table([[GOALS[name], status[met], evidence]
                           for name, (met, evidence) in run.goals.items()],
                          ["goal", "status", "measured"])]
    for profile in run.facts.get("profiles", []):
        lines += ["", profile]
    return "\n".join(lines)


BENCH_FUNCS: dict[str, Callable[[Run], None]] = {
    "limit": bench_limit, "worker": bench_worker, "stages": bench_stages,
    "plain_faust": bench_plain_faust,
    "latency": bench_latency, "memory": bench_memory, "recovery": bench_recovery,
    "replay": bench_replay, "clv": bench_clv, "segments": bench_segments,
}


def selected(only: str | None) -> list[str]:
    if not only:
        return list(BENCHES)
    names = {name.strip() for name in only.split(",") if name.strip()}
    unknown = names - set(BENCHES)
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {sorted(unknown)}; choose from {', '.join(BENCHES)}")
    for name in list(names):
        names.update(NEEDS.get(name, ()))
    return [name for name in BENCHES if name in names]


def ensure_broker() -> bool:
    """Start the local broker with deploy/local/kafka.sh unless it answers; True if started."""
    if common.broker_reachable():
        return False
    log(f"no broker on {BOOTSTRAP}: deploy/local/kafka.sh up")
    done = subprocess.run([str(REPO / "deploy" / "local" / "kafka.sh"), "up"], capture_output=True,
                          text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise SystemExit(f"could not start the broker:\n{done.stdout}{done.stderr}")
    return True


def cleanup(run: Run, broker_started: bool) -> None:
    common.stop_all()
    try:
        deleted = common.delete_topics(run.run_id)
        common.delete_groups(run.groups)
        log(f"cleanup: deleted {len(deleted)} topics and the run's consumer groups")
    except Exception as exc:  # the broker went away: topics expire with retention
        log(f"cleanup: could not delete topics ({exc})")
    if run.redis_prefixes:
        try:
            import redis

            client = redis.Redis.from_url(_redis_url() or "redis://127.0.0.1:6379/0")
            for prefix in run.redis_prefixes:
                keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
                for start in range(0, len(keys), 500):
                    client.delete(*keys[start:start + 500])
            client.close()
        except Exception as exc:
            log(f"cleanup: could not delete Redis keys ({exc})")
    if not run.keep:
        shutil.rmtree(run.tmp, ignore_errors=True)
    else:
        log(f"kept {run.tmp} (logs, data dirs)")
    if broker_started:
        subprocess.run([str(REPO / "deploy" / "local" / "kafka.sh"), "down"], capture_output=True,
                       timeout=120, check=False)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(BENCHES)}")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data)")
    parser.add_argument("--markdown", type=Path, help="also write the report to this file")
    parser.add_argument("--latency-rates", help="offered loads of the latency bench, events/s "
                        "(comma-separated; default 1000,5000,10000, --quick 1000)")
    parser.add_argument("--profile", action="store_true", help="record the workers of the worker "
                        "and recovery benches with py-spy and print where their time goes (those "
                        "rows are then measured under the profiler)")
    parser.add_argument("--child-processor-memory", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-core", default="python", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_processor_memory:
        child_processor_memory(args.child_processor_memory, args.child_core)
        return 0

    names = selected(args.only)
    run = Run(QUICK if args.quick else FULL, args.quick, args.keep)
    run.profile = args.profile
    if args.profile and not pyspy.available():
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    run.latency_rates = (tuple(int(r) for r in args.latency_rates.split(","))
                         if args.latency_rates else run.sizes.latency_rates)
    signal.signal(signal.SIGTERM, _interrupt)
    load_start = Path("/proc/loadavg").read_text().split()[0]
    started = time.monotonic()
    broker_started = False
    failed = False
    try:
        broker_started = ensure_broker()
        log(f"run {run.run_id}: {', '.join(names)}; temp dir {run.tmp}")
        for name in names:
            log(f"--- {name}")
            step = time.monotonic()
            try:
                BENCH_FUNCS[name](run)
            except Exception as exc:  # noqa: BLE001 (a failing step, even a bug in it, must not
                # lose the rows the other steps measured)
                failed = True
                log(f"{name} failed: {type(exc).__name__}: {exc}")
                detail = (str(exc).splitlines() or [""])[0]
                run.add(Row(name, "FAILED", None, "", note=f"{type(exc).__name__}: {detail}"[:160]))
                common.stop_all()
            log(f"{name}: {time.monotonic() - step:.0f} s")
    except KeyboardInterrupt:
        log("interrupted")
        failed = True
    finally:
        cleanup(run, broker_started)
    evaluate_goals(run)
    text = report(run, time.monotonic() - started,
                  (load_start, Path("/proc/loadavg").read_text().split()[0]))
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
