"""Fault tests on the real broker: crashes, rebalances, broker and Redis outages, redeliveries.

Each test streams a generated file (members, guests, late, duplicate and malformed events)
through real ``stream-kpis worker`` processes while a fault happens, then checks that

* the KPI records the workers publish equal ``replay`` of the same file (churn_reduction left
  out: it depends on the evaluation history, see test_live_pipeline), and
* every input record is accounted for: :func:`live.classify` works out from the records alone
  which must be dead letters (and why), which are true duplicates and which are first
  deliveries, and the worker's counters and the DLQ topic must say the same.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import orjson
import pytest
import redis
from kafka import KafkaAdminClient
from kafka.admin import NewTopic

from stream_kpis.core import Processor, member_status
from stream_kpis.core.events import Event, EventParser
from stream_kpis.generate import GeneratorConfig, write_jsonl
from stream_kpis.live.readmodel import read_kpi, read_member
from stream_kpis.settings import load_settings
from tests.integration.live import (
    DUPLICATE,
    FIRST,
    STREAM_KPIS,
    LiveStack,
    LocalBroker,
    RedisServer,
    classify,
    expected_kpis,
    outcome_totals,
    records_equal,
    wait_until,
)

#: Seconds from SIGTERM to exit of a busy worker (measured: about 2 s).
SHUTDOWN_BOUND_S = 15
#: Most records a worker applies at a time (one fetch: broker_max_poll_records = 10,000 on the
#: fast path; take_events(5,000) on Faust's stock streams).
INGEST_BATCH = 10_000


@pytest.fixture(scope="module")
def stream_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("faults") / "events.jsonl"
    write_jsonl(GeneratorConfig(members=600, days=120, seed=23), path)
    return path


def processed(worker) -> int:
    return sum(worker.outcomes().values())


def committed_total(stack) -> int:
    return sum(stack.committed_offsets().values())


def test_kill9_of_the_only_worker(tmp_path, kafka_bootstrap, stream_file):
    """kill -9 mid-stream, restart on the same data dir; kill -9 again, restart on an empty one:
    the state comes back from RocksDB plus changelog, then from the changelog alone."""
    stack = LiveStack(tmp_path, kafka_bootstrap, store="rocksdb://")
    messages = stack.file_messages(stream_file)
    data_dir = tmp_path / "state"
    try:
        first = stack.start_worker(data_dir=data_dir)
        stack.wait_assigned([first])
        sender = stack.send_in_background(messages, rate=250)
        # kill after a commit, with uncommitted work in flight
        wait_until(lambda: processed(first) >= len(messages) // 4 and committed_total(stack), 60,
                   "a quarter processed and committed", stack.logs_tail)
        first.kill()
        before = committed_total(stack)
        # same data dir: local RocksDB state, the changelog tail on top
        second = stack.start_worker(data_dir=data_dir)
        wait_until(lambda: processed(second) >= len(messages) // 4
                   and committed_total(stack) > before, 90, "another quarter", stack.logs_tail)
        second.kill()
        # empty data dir: the state comes from the changelog topics alone
        shutil.rmtree(data_dir)
        committed = stack.committed_offsets()
        third = stack.start_worker(data_dir=data_dir)
        assert sender.finish() == len(messages)
        records = stack.read_inputs()
        outcomes = classify(records, stack.settings)
        replayed = {r: o for r, o in outcomes.items() if r.offset >= committed[(r.topic, r.partition)]}
        want = outcome_totals(replayed.values())
        # the last worker starts at the committed offsets (committed with the state, in one
        # transaction): each record after them exactly once
        got = stack.wait_accounted(third, len(replayed))
        assert got["duplicate"] == want[DUPLICATE] and got["dead_letter"] == want["dead_letter"]
        assert got["applied"] == want[FIRST] and "redelivered" not in got, (got, want)
        assert third.total("stream_kpis_duplicates_total") == want[DUPLICATE]
        stack.wait_for_kpis(expected_kpis(stream_file, stack.settings))
        # each bad record in the DLQ with its reason, exactly once (read_committed)
        dead = {(r.topic, r.partition, r.offset): o for r, o in outcomes.items()
                if o not in (FIRST, DUPLICATE)}
        dlq = stack.dead_letters()
        assert {(d["topic"], d["partition"], d["offset"]): d["reason"] for d in dlq} == dead
        assert len(dlq) == len(dead)
    finally:
        stack.stop()


def test_kill9_of_one_of_two_workers_then_a_third_joins(tmp_path, kafka_bootstrap, stream_file):
    """Partitions and their state move to the survivor, then some to a newcomer; the global
    exporter role moves with the partials partition and ends on exactly one worker."""
    stack = LiveStack(tmp_path, kafka_bootstrap, store="rocksdb://")
    messages = stack.file_messages(stream_file)
    try:
        workers = [stack.start_worker(), stack.start_worker()]
        stack.wait_assigned(workers)
        sender = stack.send_in_background(messages, rate=300)
        wait_until(lambda: sum(processed(w) for w in workers) >= len(messages) // 4
                   and committed_total(stack), 60, "a quarter processed and committed")
        exporter = next(w for w in workers if w.sample("stream_kpis_global_exporter") == 1)
        survivor = next(w for w in workers if w is not exporter)
        exporter.kill()  # the exporter: both its partitions and the exporter role must move
        stack.wait_assigned([survivor], timeout=60)
        wait_until(lambda: survivor.sample("stream_kpis_global_exporter") == 1, 30,
                   "the survivor exports the global KPIs", stack.logs_tail)
        newcomer = stack.start_worker()
        stack.wait_assigned([survivor, newcomer])
        assert sender.finish() == len(messages)
        stack.wait_for_kpis(expected_kpis(stream_file, stack.settings))

        live = stack.live_workers()
        assert live == [survivor, newcomer]
        stack.wait_exporter_settled(live)
        assert sum(w.sample("stream_kpis_global_exporter") for w in live) == 1
        assert sum(w.sample("loyalty_members") is not None for w in live) == 1
        # the newcomer's partitions arrived with their members (from the changelog)
        assert newcomer.total("stream_kpis_table_rows", table="members") > 0
        records = stack.read_inputs()
        outcomes = classify(records, stack.settings)
        assert {(d["topic"], d["partition"], d["offset"]): d["reason"]
                for d in stack.dead_letters()} == {(r.topic, r.partition, r.offset): o
                                                   for r, o in outcomes.items()
                                                   if o not in (FIRST, DUPLICATE)}
    finally:
        stack.stop()


def test_broker_stopped_and_restarted_mid_stream(tmp_path, stream_file):
    """The broker goes away for a while; the worker reconnects by itself and loses nothing.

    A private broker (deploy/local/kafka.sh on its own ports and state directory) is stopped,
    not the shared one, so that nothing else running against the shared broker is disturbed.
    """
    broker = LocalBroker(tmp_path / "broker").up()
    stack = None
    try:
        stack = LiveStack(tmp_path, broker.bootstrap, store="rocksdb://")
        messages = stack.file_messages(stream_file)
        worker = stack.start_worker()
        stack.wait_assigned([worker])
        sender = stack.send_in_background(messages, rate=300)
        wait_until(lambda: processed(worker) >= len(messages) // 4 and committed_total(stack), 60,
                   "a quarter processed and committed")
        at_stop = processed(worker)
        broker.down()
        time.sleep(5)
        assert worker.alive() and processed(worker) < len(messages)
        broker.up()
        assert sender.finish() == len(messages)
        stack.wait_for_kpis(expected_kpis(stream_file, stack.settings), timeout=120)
        assert worker.alive() and processed(worker) > at_stop
        records = stack.read_inputs()
        outcomes = classify(records, stack.settings)
        got = stack.wait_accounted(worker, len(records))
        want = outcome_totals(outcomes.values())
        # nothing was lost, nothing counted twice: batches that failed while the broker was
        # away were read again from the positions their state records
        assert got["applied"] == want[FIRST] and got["duplicate"] == want[DUPLICATE], (got, want)
        assert got["dead_letter"] == want["dead_letter"]
    finally:
        if stack is not None:
            stack.stop()
        broker.down()


def test_redis_outage_does_not_stop_processing(tmp_path, kafka_bootstrap, stream_file):
    """Redis stops: KPIs keep flowing to Kafka; when it is back the read model catches up."""
    redis_server = RedisServer(tmp_path / "redis").start()
    stack = LiveStack(tmp_path, kafka_bootstrap, redis_server.url)
    messages = stack.file_messages(stream_file)
    half = len(messages) // 2
    client = redis.Redis.from_url(redis_server.url, socket_timeout=2)
    prefix = stack.settings.redis_prefix
    try:
        worker = stack.start_worker()
        stack.wait_assigned([worker])
        stack.send(messages[:half])
        wait_until(lambda: read_kpi(client, prefix, "members", None), 30, "KPIs in Redis")
        redis_server.stop()
        stack.send(messages[half:])
        expected = expected_kpis(stream_file, stack.settings)
        stack.wait_for_kpis(expected)  # from Kafka, while Redis is down
        assert worker.total("stream_kpis_redis_errors_total") > 0
        assert redis_server.process is None

        redis_server.start()
        members = next(r for r in expected if r["kpi"] == "members")
        wait_until(lambda: (read_kpi(client, prefix, "members", None) or {}).get("as_of")
                   == members["as_of"], 30, "the read model caught up", stack.logs_tail)
        for record in expected:
            stored = read_kpi(client, prefix, record["kpi"], record["window"], record.get("labels"))
            assert stored is not None and records_equal(stored, record), (stored, record)
        # member statuses written during the outage, as the core computes them
        processor = Processor(stack.settings)
        parser = EventParser()
        late = set()
        for i, (_, _, value) in enumerate(messages):
            item = parser.parse(value)
            if isinstance(item, Event):
                processor.process(item)
                if i >= half and item.member_id is not None:
                    late.add(item.member_id)
        for member_id in sorted(late & set(processor.members))[:50]:
            want = member_status(processor.members[member_id], processor.K, stack.settings)
            stored = read_member(client, prefix, member_id)
            assert stored is not None, member_id
            assert (stored["last_touch"], stored["tier"], stored["points_balance"]) == (
                want["last_touch"], want["tier"], want["points_balance"]), member_id
    finally:
        stack.stop()
        redis_server.stop()
        client.close()


def test_redeliveries_and_out_of_order_events(tmp_path, kafka_bootstrap, stream_file):
    """A producer that retries (records sent twice, some at once, some much later) and events
    in random order: each event is applied once, each extra copy counted as a duplicate."""
    rng = random.Random(8)
    stack = LiveStack(tmp_path, kafka_bootstrap)
    clean = stack.file_messages(stream_file)
    messages = []
    for message in clean:
        messages.append(message)
        if rng.random() < 0.1:
            messages.append(message)  # a retry right after
    messages += rng.sample(clean, len(clean) // 10)  # retries much later
    rng.shuffle(messages)
    try:
        worker = stack.start_worker()
        stack.wait_assigned([worker])
        stack.send(messages)
        records = stack.read_inputs()
        outcomes = classify(records, stack.settings)
        want = outcome_totals(outcomes.values())
        assert want[DUPLICATE] > len(clean) // 6
        got = stack.wait_accounted(worker, len(records))
        assert got == {"applied": want[FIRST], "duplicate": want[DUPLICATE],
                       "dead_letter": want["dead_letter"]}
        assert worker.total("stream_kpis_duplicates_total") == want[DUPLICATE]
        stack.wait_for_kpis(expected_kpis(stream_file, stack.settings))
    finally:
        stack.stop()


def test_sigterm_commits_flushes_and_restarts_exactly(tmp_path, kafka_bootstrap, redis_url,
                                                       stream_file):
    """SIGTERM in the middle of a stream: the worker finishes the batch it is committing,
    flushes the read model and exits within a bound; its successor (same data dir) counts
    every later record exactly once, and the KPIs are exact."""
    stack = LiveStack(tmp_path, kafka_bootstrap, redis_url, store="rocksdb://")
    messages = stack.file_messages(stream_file)
    data_dir = tmp_path / "state"
    client = redis.Redis.from_url(redis_url)
    prefix = stack.settings.redis_prefix
    try:
        # no timer tick for an hour: only the shutdown can write the read model
        first = stack.start_worker(data_dir=data_dir, STREAM_KPIS_EMIT_INTERVAL="1h")
        stack.wait_assigned([first])
        sender = stack.send_in_background(messages, rate=400)
        wait_until(lambda: processed(first) >= len(messages) // 3, 60, "a third processed")
        assert not client.keys(f"{prefix}member:*")
        started = time.monotonic()
        assert first.stop(signal.SIGTERM, timeout=60) == 0, first.log_text()[-3000:]
        shutdown_s = time.monotonic() - started
        assert shutdown_s < SHUTDOWN_BOUND_S, shutdown_s
        committed = stack.committed_offsets()
        # everything the worker applied is committed: it finished the batch in flight
        assert sum(committed.values()) >= len(messages) // 3
        # every member of the committed records reached Redis at shutdown (no tick ran)
        stored = {key.decode().removeprefix(f"{prefix}member:")
                  for key in client.keys(f"{prefix}member:*")}
        so_far = stack.read_inputs()
        members = {orjson.loads(r.value).get("member_id") for r, o in
                   classify(so_far, stack.settings).items()
                   if o == FIRST and r.topic != stack.settings.topics.surveys
                   and r.offset < committed[(r.topic, r.partition)]}
        members.discard(None)
        assert len(members) > 100 and members <= stored, len(members - stored)

        second = stack.start_worker(data_dir=data_dir)
        assert sender.finish() == len(messages)
        records = stack.read_inputs()
        outcomes = classify(records, stack.settings)
        after = [r for r in records if r.offset >= committed[(r.topic, r.partition)]]
        want = outcome_totals(outcomes[r] for r in after)
        got = stack.wait_accounted(second, len(after))
        assert got["duplicate"] == want[DUPLICATE] and got["dead_letter"] == want["dead_letter"]
        assert got["applied"] == want[FIRST] and "redelivered" not in got, (got, want)
        stack.wait_for_kpis(expected_kpis(stream_file, stack.settings))
        print(f"SIGTERM to exit: {shutdown_s:.2f}s")
    finally:
        stack.stop()
        client.close()


def test_input_topics_with_different_partition_counts_are_refused(tmp_path, kafka_bootstrap):
    run = uuid.uuid4().hex[:8]
    env = {**os.environ, "STREAM_KPIS_BROKER": f"kafka://{kafka_bootstrap}",
           "STREAM_KPIS_APP_ID": f"it-{run}", "STREAM_KPIS_TOPIC_PREFIX": f"it-{run}.",
           "STREAM_KPIS_REDIS_URL": "none", "STREAM_KPIS_DATA_DIR": str(tmp_path)}
    settings = load_settings(None, env=env)
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        counts = {"purchase": 4, "redemption": 4, "enrollment": 2, "survey": 4}
        admin.create_topics([NewTopic(settings.topics.inputs()[kind], n, 1)
                             for kind, n in counts.items()])
    finally:
        admin.close()
    for command in (["worker"], ["topics", "create"]):
        done = subprocess.run([STREAM_KPIS, *command], env=env, capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 2, (command, done.stdout, done.stderr[-2000:])
        assert "input topics are not co-partitioned" in done.stderr, done.stderr[-2000:]
        assert f"'{settings.topics.enrollments}': 2" in done.stderr
        assert "same partition count" in done.stderr
