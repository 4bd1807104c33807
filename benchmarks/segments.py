"""Issue 14 at scale: segments and cohorts with 1M members, 50 stores and 3 tiers (core only).

Synthetic events go straight into core Processors, one per partition (8 by default, members
hashed to them like Kafka keys), with ``[kpis] segments`` = all five dimensions and the default
cohorts (12 x 12); then, as the live exporter does at each emission, every partition's partial
(``Aggregates.to_bytes``) is decoded, merged and evaluated (``Exporter.evaluate``). Printed:

- ``maxrss``: the process's peak RSS (``resource.getrusage``), all member states held in dicts as
  in a replay (a live worker keeps them in its RocksDB store behind a bounded cache, so this is
  an upper bound of what segments cost a worker), and ``rss`` just before the emissions;
- the partial of each partition: ``aggs.to_bytes()`` bytes (min / max), the record the worker
  publishes (``partial_value``: zlib-compressed) and the time to make it, the memory one partial
  takes once decoded (``tracemalloc``), and the bytes of partition 0's partial by dimension;
- per emission, what the exporter does (``Exporter.evaluate``, median of 5): decode the
  published partials' first lines one at a time into their total, then evaluate the KPIs while
  the segments are summed one at a time across the partials (``kpis.merged_segments``); and the
  records.

``--segments none`` runs the same without segments, for comparison; ``--compare`` runs both, each
in a fresh process (RSS is per process), and prints one table. Not part of ``run.py``.

``--live`` measures what a user runs instead: the same events produced to fresh topics on the
local broker (4 partitions), one ``stream-kpis worker`` (RocksDB store, no Redis, event clock,
``[kpis] segments`` = all five or none) consuming them all and exporting; printed are the worker's
RSS once everything is applied (the largest reading over the next three emit intervals, which
cover the last partials and the exporter's evaluation of them),
its ``stream_kpis_partial_bytes`` (the published partials) and ``stream_kpis_kpi_evaluation_seconds``
(merge + evaluate of the last emission). ``--live --compare`` runs none, then all.

Data, per member (members enroll evenly over 330 days from 2024-01-01, in that order): an
enrollment with a channel (web/app/store/partner) and a tier (bronze 70 %, silver 22 %, gold 8 %);
a first purchase 0-20 days later at one of 50 stores (its home store) with a channel and the tier;
40 % a second purchase 5-60 days later (20 % of those at another store, 10 % of them carrying a
tier upgrade); 20 % a redemption; one guest purchase per 5 members. Events of a member arrive in
time order, members one after the other (event time moves forward by enrollment).

    .venv/bin/python benchmarks/segments.py --compare                # 1M members, ~3 min
    .venv/bin/python benchmarks/segments.py --members 100000 --segments none
    .venv/bin/python benchmarks/segments.py --live --compare               # ~10 min, broker up
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream_kpis.core import Processor  # noqa: E402
from stream_kpis.core.catalogue import SEGMENT_DIMENSIONS  # noqa: E402
from stream_kpis.core.events import Event  # noqa: E402
from stream_kpis.core.kpis import Aggregates  # noqa: E402
from stream_kpis.live.exporter import Exporter  # noqa: E402
from stream_kpis.live.partition import partial_value  # noqa: E402
from stream_kpis.settings import Settings  # noqa: E402

DAY_MS = 86_400_000
START_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
STORES = tuple(f"store-{i:02d}" for i in range(1, 51))
TIERS = ("bronze",) * 70 + ("silver",) * 22 + ("gold",) * 8
ENROLL_CHANNELS = ("web", "app", "store", "partner")
PURCHASE_CHANNELS = ("store", "store", "store", "web", "app")
EMISSIONS = 5
EMIT_INTERVAL_S = 10  # --live: the worker's emit_interval (the default)


def events(members: int, seed: int) -> Iterator[Event]:
    """The synthetic stream described in the module docstring."""
    rng = random.Random(seed)
    rand, choice = rng.random, rng.choice
    for m in range(members):
        member = f"m{m:07d}"
        enrolled = START_MS + int(330 * DAY_MS * m / members) + int(rand() * DAY_MS)
        tier = choice(TIERS)
        yield Event("enrollment", f"e{m}", member, enrolled, channel=choice(ENROLL_CHANNELS),
                    tier=tier)
        store = choice(STORES)
        first = enrolled + int(rand() * 20 * DAY_MS)
        amount = round(10 + rand() * 90, 2)
        yield Event("purchase", f"p{m}", member, first, amount=amount, points=int(amount),
                    margin=round(amount * 0.3, 2), channel=choice(PURCHASE_CHANNELS),
                    store_id=store, tier=tier)
        if rand() < 0.4:
            later = first + int((5 + rand() * 55) * DAY_MS)
            upgrade = "silver" if tier == "bronze" else "gold"
            amount = round(10 + rand() * 90, 2)
            yield Event("purchase", f"q{m}", member, later, amount=amount, points=int(amount),
                        channel=choice(PURCHASE_CHANNELS),
                        store_id=choice(STORES) if rand() < 0.2 else store,
                        tier=upgrade if rand() < 0.1 else None)
        if rand() < 0.2:
            yield Event("redemption", f"r{m}", member, first + int(rand() * 30 * DAY_MS),
                        points=1 + int(rand() * 20))
        if m % 5 == 0:
            amount = round(5 + rand() * 60, 2)
            yield Event("purchase", f"g{m}", None, first + int(rand() * DAY_MS), amount=amount,
                        channel=choice(("store", "web")), store_id=choice(STORES))


def _rss_mib() -> float:
    """The current resident set size (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(members: int, partitions: int, segments: bool, seed: int) -> dict[str, float]:
    settings = Settings(segments=SEGMENT_DIMENSIONS if segments else ())
    processors = [Processor(settings) for _ in range(partitions)]
    start = time.perf_counter()
    count = 0
    for event in events(members, seed):
        key = (event.member_id or event.event_id).encode()
        processors[zlib.crc32(key) % partitions].process(event)
        count += 1
    ingest_s = time.perf_counter() - start
    rss = _rss_mib()
    encode_s, raw, partials = [], [], []
    for processor in processors:
        t0 = time.perf_counter()
        raw.append(processor.aggs.to_bytes())
        partials.append(partial_value(processor.max_ts, {}, raw[-1]))
        encode_s.append(time.perf_counter() - t0)
    K = max(p.as_of_bucket() for p in processors)
    by_dimension = {dimension: sum(len(segment.to_bytes())
                                   for key, segment in processors[0].aggs.segments.items()
                                   if key.split("\t", 1)[0] == dimension) / 1024
                    for dimension in settings.segments}
    tracemalloc.start()
    one = Aggregates.from_bytes(raw[0])
    decoded_mib = tracemalloc.get_traced_memory()[0] / 2**20
    tracemalloc.stop()
    del one
    exporter = Exporter(settings)
    for partition, value in enumerate(partials):
        exporter.take(str(partition).encode(), value)
    assert exporter.as_of_bucket() == K
    emission = []
    records: list[dict] = []
    for _ in range(EMISSIONS):
        exporter.last_state = None  # evaluate again although nothing changed
        t0 = time.perf_counter()
        records = exporter.evaluate()
        emission.append(time.perf_counter() - t0)
    return {
        "members": members, "events": count, "events_per_s": count / ingest_s,
        "rss_mib": rss, "maxrss_mib": _maxrss_mib(),
        "partial_min_kib": min(map(len, raw)) / 1024,
        "partial_max_kib": max(map(len, raw)) / 1024,
        "published_max_kib": max(map(len, partials)) / 1024,
        "encode_ms": 1000 * statistics.median(encode_s),
        "decoded_mib": decoded_mib,
        "by_dimension_kib": by_dimension,
        "emission_ms": 1000 * statistics.median(emission),
        "records": len(records),
        "segment_records": sum(1 for r in records if set(r.get("labels", ())) & set(SEGMENT_DIMENSIONS)
                               and r["kpi"] not in ("new_members", "tier_members")),
        "cohort_records": sum(1 for r in records if r["kpi"].startswith("cohort_")),
    }


def _json(event: Event) -> bytes:
    body = {name: getattr(event, name) for name in ("event_id", "member_id", "ts", "amount",
                                                     "margin", "channel", "store_id", "tier")}
    if event.type != "enrollment" and event.points:
        body["points"] = event.points
    return json.dumps({k: v for k, v in body.items() if v is not None or k == "member_id"}).encode()


def measure_live(members: int, segments: bool, seed: int) -> dict[str, float]:
    """One stream-kpis worker over the same events on the local broker (see the docstring)."""
    import shutil
    import tempfile

    import common  # benchmarks/common.py

    from stream_kpis.live.kafka_tools import create_topics
    from stream_kpis.settings import load_settings

    if not common.broker_reachable():
        raise SystemExit("--live needs the local broker: deploy/local/kafka.sh up")
    app_id = common.bench_id("segments-" + ("all" if segments else "none"))
    tmp = Path(tempfile.mkdtemp(prefix="stream-kpis-segments-"))
    config = tmp / "config.toml"
    dimensions = ", ".join(f'"{d}"' for d in SEGMENT_DIMENSIONS) if segments else ""
    config.write_text(f"[kpis]\nsegments = [{dimensions}]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_KPIS_")}
    env.update({"STREAM_KPIS_BROKER": common.BROKER_URL, "STREAM_KPIS_APP_ID": app_id,
                "STREAM_KPIS_TOPIC_PREFIX": f"{app_id}.", "STREAM_KPIS_PARTITIONS": "4",
                "STREAM_KPIS_CLOCK": "event", "STREAM_KPIS_REDIS_URL": "none",
                "STREAM_KPIS_STORE": "rocksdb://", "STREAM_KPIS_DATA_DIR": str(tmp / "data"),
                "STREAM_KPIS_WEB_HOST": "127.0.0.1", "STREAM_KPIS_WEB_PORT": str(common.free_port()),
                "STREAM_KPIS_CONFIG": str(config),
                "STREAM_KPIS_EMIT_INTERVAL": f"{EMIT_INTERVAL_S}s"})
    settings = load_settings(None, env=env)
    create_topics(settings)
    topics = settings.topics.inputs()
    worker = None
    try:
        started = time.monotonic()
        count = common.produce(((topics[e.type], (e.member_id or e.event_id).encode(), _json(e))
                                for e in events(members, seed)), timeout=900)
        produced_s = time.monotonic() - started
        worker = common.Worker(env, tmp / "worker.log")
        started = time.monotonic()
        common.wait_until(lambda: worker.check_alive() or worker.events_seen() >= count, 1800,
                          f"the worker applying {count:,} events", 1.0)
        applied_s = time.monotonic() - started
        # the last partials go out within an emit interval, and the exporter evaluates them
        # within the next: RSS over three intervals covers both (an emission without a change
        # publishes nothing, so there is no counter to wait for)
        readings = []
        for _ in range(int(3 * EMIT_INTERVAL_S / 0.5)):
            time.sleep(0.5)
            readings.append(common.rss_bytes(worker.pid))
        worker.check_alive()
        metrics = worker.metrics()
        partials = [v for k, v in metrics.items() if k.startswith("stream_kpis_partial_bytes{")]
        return {"members": members, "events": count, "produce_s": produced_s,
                "apply_s": applied_s, "events_per_s": count / applied_s,
                "rss_mib": max(readings) / 2**20,
                "partial_max_kib": max(partials, default=0) / 1024,
                "partial_total_kib": sum(partials) / 1024,
                "evaluation_s": metrics.get("stream_kpis_kpi_evaluation_seconds", float("nan")),
                "members_gauge": metrics.get('stream_kpis_table_rows{table="members"}', 0)}
    finally:
        if worker is not None:
            worker.stop()
        common.delete_topics(f"{app_id}.")
        common.delete_topics(f"{app_id}-")
        common.delete_groups(common.worker_groups(app_id))
        shutil.rmtree(tmp, ignore_errors=True)


LIVE_ROWS = (
    ("events", "events", "{:,.0f}"),
    ("members (gauge)", "members_gauge", "{:,.0f}"),
    ("produce, s / worker applies everything, s", ("produce_s", "apply_s"), "{:,.0f} / {:,.0f}"),
    ("worker, events/s", "events_per_s", "{:,.0f}"),
    ("worker RSS (largest over 3 emit intervals after), MiB", "rss_mib", "{:,.0f}"),
    ("published partial (zlib), max KiB / all partitions", ("partial_max_kib", "partial_total_kib"),
     "{:,.0f} / {:,.0f}"),
    ("last emission: merge + evaluate, s", "evaluation_s", "{:,.2f}"),
)

ROWS = (
    ("events", "events", "{:,.0f}"),
    ("ingest, events/s (one process, all partitions)", "events_per_s", "{:,.0f}"),
    ("RSS after ingest, MiB", "rss_mib", "{:,.0f}"),
    ("peak RSS (maxrss), MiB", "maxrss_mib", "{:,.0f}"),
    ("partial of one partition, KiB (min / max)", ("partial_min_kib", "partial_max_kib"),
     "{:,.0f} / {:,.0f}"),
    ("published partial (zlib), max KiB", "published_max_kib", "{:,.0f}"),
    ("encode one partial (to_bytes + zlib), ms", "encode_ms", "{:,.1f}"),
    ("one partial decoded, MiB", "decoded_mib", "{:,.0f}"),
    ("emission: merge and evaluate (Exporter.evaluate), ms", "emission_ms", "{:,.0f}"),
    ("records per emission (segment / cohort)", ("records", "segment_records", "cohort_records"),
     "{:,} ({:,} / {:,})"),
)


def table(results: dict[str, dict[str, float]], members: int, partitions: int,
          live: bool = False) -> str:
    names = list(results)
    title = (f"{members:,} members, one stream-kpis worker, 4 partitions" if live else
             f"{members:,} members, {partitions} partitions, median of {EMISSIONS} emissions")
    lines = [title, "",
             "| " + " | ".join(["what", *names]) + " |",
             "|" + "---|" * (len(names) + 1)]
    for label, keys, fmt in LIVE_ROWS if live else ROWS:
        keys = keys if isinstance(keys, tuple) else (keys,)
        cells = [fmt.format(*(results[name][k] for k in keys)) for name in names]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    for name, result in results.items():
        if result.get("by_dimension_kib"):
            parts = ", ".join(f"{dimension} {kib:,.0f}"
                              for dimension, kib in result["by_dimension_kib"].items())
            lines.append(f"\n{name}: KiB of partition 0's partial by dimension: {parts}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--segments", choices=("all", "none"), default="all")
    parser.add_argument("--compare", action="store_true",
                        help="run --segments none and all, each in its own process")
    parser.add_argument("--live", action="store_true",
                        help="one stream-kpis worker on the local broker instead of the core alone")
    parser.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)  # one result line
    args = parser.parse_args(argv)
    if args.compare:
        results = {}
        for mode in ("none", "all"):
            done = subprocess.run(
                [sys.executable, __file__, "--members", str(args.members), "--partitions",
                 str(args.partitions), "--seed", str(args.seed), "--segments", mode, "--raw",
                 *(["--live"] if args.live else [])],
                capture_output=True, text=True, check=True)
            results[f"segments: {mode}"] = json.loads(done.stdout.strip().splitlines()[-1])
        print(table(results, args.members, args.partitions, args.live))
        return 0
    if args.live:
        result = measure_live(args.members, args.segments == "all", args.seed)
    else:
        result = measure(args.members, args.partitions, args.segments == "all", args.seed)
    if args.raw:
        print(json.dumps(result))
    else:
        print(table({f"segments: {args.segments}": result}, args.members, args.partitions,
                    args.live))
    return 0


if __name__ == "__main__":
    sys.exit(main())
