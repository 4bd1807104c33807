"""A real stream-kpis deployment for integration tests: topics on the real broker, real worker
processes (``stream-kpis worker``), the same files produced with ``stream-kpis produce``'s code,
and readers for the KPI, signal and DLQ topics and for ``/metrics``.

Every stack gets its own app id, topic prefix, Redis key prefix and web ports, so stacks never
see each other's data on the shared broker.

For the fault tests: :meth:`LiveStack.send` produces (optionally paced, optionally in a
background thread), :meth:`LiveStack.read_inputs` reads back what the input topics really hold
and :func:`classify` says what a worker must do with each of those records (dead letter with
which reason, duplicate, or first delivery), so a test can check that every record is accounted
for. :class:`RedisServer` is a throwaway redis-server a test may stop and restart.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from stream_kpis.core.events import DeadLetter, EventParser
from stream_kpis.live.kafka_log import exporter_group, ingest_group
from stream_kpis.live.kafka_tools import _file_messages, client_config, create_topics, produce_sources
from stream_kpis.replay import Source, replay, source_for_path
from stream_kpis.settings import Settings, load_settings
from tests.helpers import free_port, wait_until

REPO = Path(__file__).resolve().parents[2]
STREAM_KPIS = str(Path(sys.executable).with_name("stream-kpis"))


def record_key(record: dict[str, Any]) -> tuple:
    return (record["kpi"], record["window"], tuple(sorted(record.get("labels", {}).items())))


@dataclass(frozen=True)
class Record:
    """One record of an input topic, as the broker holds it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


#: What a worker must do with a record: a dead-letter reason, or one of these two.
FIRST, DUPLICATE = "first", "duplicate"


def classify(records: Iterable[Record], settings: Settings) -> dict[Record, str]:
    """The outcome every record must have, worked out from the records alone.

    A record is a dead letter (its reason) when the parser rejects it or its Kafka key is not
    the member_id (event_id for guests); otherwise it is the FIRST delivery of its
    (type, member_id, event_id) in its partition, or a DUPLICATE of an earlier offset. FIRST
    records end up ``applied``.
    """
    parser = EventParser(settings.max_event_bytes, settings.max_skew_ms)
    kinds = {name: kind for kind, name in settings.topics.inputs().items()}
    seen: set[tuple] = set()
    out: dict[Record, str] = {}
    for record in sorted(records, key=lambda r: (r.topic, r.partition, r.offset)):
        item = parser.parse(record.value or b"", kinds[record.topic])
        if isinstance(item, DeadLetter):
            out[record] = item.reason
            continue
        key = item.member_id if item.member_id is not None else item.event_id
        if record.key != key.encode():
            out[record] = "wrong_key"
            continue
        identity = (record.partition, item.type, item.member_id, item.event_id)
        out[record] = DUPLICATE if identity in seen else FIRST
        seen.add(identity)
    return out


def outcome_totals(outcomes: Iterable[str]) -> dict[str, int]:
    """``classify`` outcomes summed as the worker counts them: first/duplicate/dead_letter."""
    totals = {FIRST: 0, DUPLICATE: 0, "dead_letter": 0}
    for outcome in outcomes:
        totals[outcome if outcome in (FIRST, DUPLICATE) else "dead_letter"] += 1
    return totals


class Worker:
    """One ``stream-kpis worker`` process."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = int(env["STREAM_KPIS_WEB_PORT"])
        self.data_dir = env.get("STREAM_KPIS_DATA_DIR")
        self.log_path = log_path
        self.log = open(log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen([STREAM_KPIS, "worker", "-l", "info"], env=env,
                                        stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def samples(self) -> list[tuple[str, dict[str, str], float]]:
        """Every sample of ``/metrics`` as (name, labels, value); empty when unreachable."""
        try:
            text = self.metrics()
        except OSError:
            return []
        return [(sample.name, sample.labels, sample.value)
                for family in text_string_to_metric_families(text) for sample in family.samples]

    def total(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        return sum(value for sample, have, value in self.samples()
                   if sample == name and all(have.get(k) == v for k, v in labels.items()))

    def outcomes(self) -> dict[str, int]:
        """stream_kpis_events_total summed over topics, by outcome (0 for applied, duplicate
        and dead_letter when none was counted)."""
        totals: Counter[str] = Counter(applied=0, duplicate=0, dead_letter=0)
        for name, labels, value in self.samples():
            if name == "stream_kpis_events_total":
                totals[labels["outcome"]] += int(value)
        return dict(totals)

    def listening(self) -> list[tuple[str, int]]:
        """(address, port) of every TCP socket this process listens on (from /proc)."""
        inodes = set()
        for fd in Path(f"/proc/{self.pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        found = []
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    address, port = fields[1].split(":")
                    found.append((_proc_address(address), int(port, 16)))
        return found

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as response:
            return response.read().decode()

    def sample(self, name: str, labels: str = "") -> float | None:
        """The value of one metric sample (``name{labels}``) or None."""
        try:
            text = self.metrics()
        except OSError:
            return None
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.rsplit(" ", 1)[1])
        return None

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.alive():
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.log.close()
        return self.process.returncode

    def kill(self) -> None:
        """kill -9: no shutdown, no flush."""
        self.stop(signal.SIGKILL)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def _proc_address(hex_address: str) -> str:
    """/proc/net/tcp{,6} address (little-endian 32-bit words) to text."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


class LiveStack:
    """Topics + workers + readers for one isolated deployment on the real broker."""

    def __init__(self, tmp: Path, broker: str, redis_url: str | None = None,
                 partitions: int = 4, store: str = "memory://", extra_env: dict | None = None) -> None:
        run = uuid.uuid4().hex[:8]
        self.tmp = tmp
        self.env = {**os.environ,
                    "STREAM_KPIS_BROKER": f"kafka://{broker}",
                    "STREAM_KPIS_APP_ID": f"it-{run}",
                    "STREAM_KPIS_TOPIC_PREFIX": f"it-{run}.",
                    "STREAM_KPIS_STORE": store,
                    "STREAM_KPIS_EMIT_INTERVAL": "1s",
                    "STREAM_KPIS_CLOCK": "event",
                    "STREAM_KPIS_PARTITIONS": str(partitions),
                    "STREAM_KPIS_REDIS_URL": redis_url or "none",
                    "STREAM_KPIS_REDIS_PREFIX": f"it-{run}:",
                    **(extra_env or {})}
        self.settings = load_settings(None, env=self.env)
        self.workers: list[Worker] = []
        create_topics(self.settings)

    def start_worker(self, data_dir: str | Path | None = None, **env: str) -> Worker:
        """A new worker process; ``data_dir`` reuses a (stopped) worker's RocksDB directory."""
        index = len(self.workers)
        worker_env = {**self.env, "STREAM_KPIS_WEB_PORT": str(free_port()),
                      "STREAM_KPIS_DATA_DIR": str(data_dir or self.tmp / f"worker-{index}"), **env}
        worker = Worker(worker_env, self.tmp / f"worker-{index}.log")
        self.workers.append(worker)
        return worker

    def live_workers(self) -> list[Worker]:
        return [worker for worker in self.workers if worker.alive()]

    def wait_assigned(self, workers: Sequence[Worker], timeout: float = 90) -> None:
        """Until ``workers`` together own every input partition, each owning some."""
        def balanced() -> bool:
            owned = [w.sample("stream_kpis_assigned_partitions") or 0 for w in workers]
            return sum(owned) == self.settings.partitions and all(owned)
        wait_until(balanced, timeout, "partitions assigned", self.logs_tail)

    def wait_exporter_settled(self, workers: Sequence[Worker], timeout: float = 90) -> Worker:
        """Until the exporter group is stable with a member for each of ``workers`` and exactly
        one of them exports: its role flag set and its ``loyalty_*`` gauges published, the
        others' neither. Returns that worker.

        The role moves with a rebalance of its own group, which each worker joins on its own,
        so it can settle after the ingest group has (``wait_assigned``) and after the final KPIs
        are on their topics (``wait_for_kpis``: an earlier exporter may have published them).
        Until then a handover legitimately has a moment with no exporter: the new one announces
        the role once it has read the partials, and its gauges follow its first evaluation."""
        from kafka import KafkaAdminClient

        group = exporter_group(self.settings)

        def stable_group() -> bool:
            admin = KafkaAdminClient(**client_config(self.settings))
            try:
                info = admin.describe_groups([group])[group]
            finally:
                admin.close()
            return info["group_state"] == "Stable" and len(info["members"]) == len(workers)

        def one_exporter() -> bool:
            roles = [w.sample("stream_kpis_global_exporter") for w in workers]
            gauges = [w.sample("loyalty_members") is not None for w in workers]
            return sorted(roles) == [0.0] * (len(workers) - 1) + [1.0] and gauges == [
                role == 1.0 for role in roles]

        wait_until(stable_group, timeout, f"{len(workers)} members in {group}", self.logs_tail,
                   interval=1.0)
        wait_until(one_exporter, timeout, "one exporter with its gauges", self.logs_tail)
        return next(w for w in workers if w.sample("stream_kpis_global_exporter") == 1.0)

    def file_messages(self, path: Path) -> list[tuple[str, bytes | None, bytes]]:
        """(topic, key, value) of every line of a file, as ``stream-kpis produce`` sends them."""
        return list(_file_messages(source_for_path(path), self.settings))

    def send(self, messages: Iterable[tuple[str, bytes | None, bytes]], rate: float = 0,
             should_stop: Callable[[], bool] = lambda: False) -> int:
        """(event type or topic name, key, value) to the input topics, paced at ``rate``/s."""
        producer = KafkaProducer(linger_ms=5, acks="all", **client_config(self.settings))
        inputs = self.settings.topics.inputs()
        started, sent = time.monotonic(), 0
        try:
            for topic, key, value in messages:
                if should_stop():
                    break
                producer.send(inputs.get(topic, topic), key=key, value=value)
                sent += 1
                if rate and sent % 50 == 0:
                    ahead = sent / rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
            producer.flush()
        finally:
            producer.close()
        return sent

    def send_in_background(self, messages: Iterable[tuple[str, bytes | None, bytes]],
                           rate: float) -> BackgroundSend:
        return BackgroundSend(self, list(messages), rate)

    def _input_partitions(self) -> list[TopicPartition]:
        return [TopicPartition(topic, p) for topic in self.settings.topics.inputs().values()
                for p in range(self.settings.partitions)]

    def end_offsets(self) -> dict[tuple[str, int], int]:
        consumer = KafkaConsumer(**client_config(self.settings))
        try:
            ends = consumer.end_offsets(self._input_partitions())
        finally:
            consumer.close()
        return {(tp.topic, tp.partition): offset for tp, offset in ends.items()}

    def committed_offsets(self) -> dict[tuple[str, int], int]:
        """The ingest group's committed offsets on the input topics (0 where none): committed in
        the same transactions as the state they include."""
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(**client_config(self.settings))
        try:
            group = ingest_group(self.settings)
            offsets = admin.list_group_offsets({group: None})[group]
        finally:
            admin.close()
        committed = {(tp.topic, tp.partition): 0 for tp in self._input_partitions()}
        for tp, meta in offsets.items():
            if (tp.topic, tp.partition) in committed and meta.offset >= 0:
                committed[(tp.topic, tp.partition)] = meta.offset
        return committed

    def read_inputs(self) -> list[Record]:
        """Every record the input topics hold (up to their current end)."""
        ends = self.end_offsets()
        wanted = sum(ends.values())
        consumer = KafkaConsumer(auto_offset_reset="earliest", enable_auto_commit=False,
                                 group_id=None, consumer_timeout_ms=2000,
                                 **client_config(self.settings))
        consumer.assign(self._input_partitions())
        consumer.seek_to_beginning()
        records: list[Record] = []
        try:
            deadline = time.monotonic() + 60
            while len(records) < wanted and time.monotonic() < deadline:
                for message in consumer:
                    if message.offset < ends[(message.topic, message.partition)]:
                        records.append(Record(message.topic, message.partition, message.offset,
                                              message.key, message.value))
                    if len(records) == wanted:
                        break
        finally:
            consumer.close()
        assert len(records) == wanted, f"read {len(records)} of {wanted} input records"
        return records

    def dead_letters(self) -> list[dict[str, Any]]:
        return self.read_topic(self.settings.topics.dlq)

    def wait_accounted(self, worker: Worker, total: int, timeout: float = 120) -> dict[str, int]:
        """Until the worker's outcome counters add up to ``total`` records; returns them."""
        def accounted() -> tuple[dict[str, int]] | None:
            outcomes = worker.outcomes()
            return (outcomes,) if sum(outcomes.values()) >= total else None
        return wait_until(accounted, timeout, f"{total} records accounted for by the worker",
                          lambda: f"{worker.outcomes()}\n{self.logs_tail()}")[0]

    def produce(self, paths: Iterable[Path | Source], rate: float = 0) -> int:
        sources = [p if isinstance(p, Source) else source_for_path(p) for p in paths]
        return produce_sources(sources, self.settings, rate)

    def produce_raw(self, messages: Iterable[tuple[str, bytes | None, bytes]]) -> None:
        """(event type or topic name, key, value) straight to the input topics."""
        producer = KafkaProducer(acks="all", **client_config(self.settings))
        inputs = self.settings.topics.inputs()
        for topic, key, value in messages:
            producer.send(inputs.get(topic, topic), key=key, value=value)
        producer.flush()
        producer.close()

    def consumer(self, topics: list[str]) -> KafkaConsumer:
        return KafkaConsumer(*topics, auto_offset_reset="earliest", enable_auto_commit=False,
                             group_id=None, consumer_timeout_ms=1000,
                             isolation_level="read_committed", **client_config(self.settings))

    def read_topic(self, topic: str) -> list[dict[str, Any]]:
        consumer = self.consumer([topic])
        records = [orjson.loads(message.value) for message in consumer]
        consumer.close()
        return records

    def latest_kpis(self, consumer: KafkaConsumer, latest: dict[tuple, dict]) -> None:
        for message in consumer:
            record = orjson.loads(message.value)
            latest[record_key(record)] = record

    def wait_for_kpis(self, expected: list[dict[str, Any]], timeout: float = 120,
                      equal: Callable[[dict, dict], bool] | None = None) -> dict[tuple, dict]:
        """Consume the KPI topics until the latest record of every expected KPI equals it.

        Returns the latest records; fails with the differences when the timeout passes.
        """
        equal = equal or records_equal
        want = {record_key(r): r for r in expected}
        consumer = self.consumer(list(self.settings.topics.kpi_topics().values()))
        latest: dict[tuple, dict] = {}
        deadline = time.monotonic() + timeout
        try:
            while True:
                self.latest_kpis(consumer, latest)
                missing = [k for k, r in want.items() if k not in latest or not equal(latest[k], r)]
                if not missing:
                    return latest
                if time.monotonic() > deadline:
                    detail = [(k, latest.get(k), want[k]) for k in missing[:5]]
                    raise AssertionError(f"{len(missing)} KPI records differ after {timeout}s: "
                                         f"{detail}\n{self.logs_tail()}")
                for worker in self.workers:
                    if not worker.alive() and worker.process.returncode not in (0, -9, -15):
                        raise AssertionError(f"worker died:\n{worker.log_text()[-3000:]}")
        finally:
            consumer.close()

    def logs_tail(self) -> str:
        return "\n".join(f"--- {w.log_path.name}\n{w.log_text()[-2000:]}" for w in self.workers)

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()


class BackgroundSend(threading.Thread):
    """:meth:`LiveStack.send` in a thread: ``start()``, then ``join()`` / ``sent``."""

    def __init__(self, stack: LiveStack, messages: list, rate: float) -> None:
        super().__init__(daemon=True)
        self.stack, self.messages, self.rate = stack, messages, rate
        self.sent = 0
        self.error: BaseException | None = None
        self._stop_event = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            self.sent = self.stack.send(self.messages, self.rate, self._stop_event.is_set)
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def finish(self, timeout: float = 180) -> int:
        self.join(timeout)
        assert not self.is_alive(), "the producer did not finish"
        if self.error is not None:
            raise self.error
        return self.sent

    def cancel(self) -> None:
        self._stop_event.set()
        self.join(30)


class LocalBroker:
    """A private Kafka broker started with ``deploy/local/kafka.sh`` on free ports and its own
    state directory, for tests that stop the broker or need a SASL listener without touching
    the shared one (other tests, or pytest-xdist workers, may be using it)."""

    SASL_USER, SASL_PASSWORD = "stream-kpis-it", "it-secret-d41d8cd9"

    def __init__(self, directory: Path, sasl: bool = False) -> None:
        self.directory = directory
        self.port, self.controller_port = free_port(), free_port()
        self.sasl_port = free_port() if sasl else None
        self.env = {**os.environ, "STREAM_KPIS_LOCAL": str(directory),
                    "KAFKA_PORT": str(self.port), "KAFKA_CONTROLLER_PORT": str(self.controller_port),
                    "KAFKA_HEAP_OPTS": "-Xms256m -Xmx512m", "KAFKA_STOP_TIMEOUT": "20"}
        if sasl:
            self.env.update(KAFKA_SASL_PORT=str(self.sasl_port), KAFKA_SASL_USER=self.SASL_USER,
                            KAFKA_SASL_PASSWORD=self.SASL_PASSWORD)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _script(self, action: str) -> None:
        done = subprocess.run([str(REPO / "deploy" / "local" / "kafka.sh"), action], env=self.env,
                              capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, f"kafka.sh {action}: {done.stdout}{done.stderr}"

    def up(self) -> LocalBroker:
        self._script("up")
        return self

    def down(self) -> None:
        self._script("down")


class RedisServer:
    """A throwaway redis-server on 127.0.0.1:``port`` (RDB saved on stop, so a restart keeps
    the data); ``stop()`` and ``start()`` again simulate an outage."""

    def __init__(self, directory: Path, port: int | None = None, *options: str) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.options = options
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / "redis.log", "ab") as log_file:  # the child keeps a dup
            self.process = subprocess.Popen(
                ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir",
                 str(self.directory), "--save", "3600 1", "--appendonly", "no", *self.options],
                stdout=log_file, stderr=subprocess.STDOUT)
        wait_until(lambda: self.process.poll() is not None or _tcp_open(self.port), 10,
                   "redis-server listening")
        assert self.process.poll() is None, (self.directory / "redis.log").read_text()
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: Redis saves the RDB and exits
            self.process.wait(15)
        self.process = None


def _tcp_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        return True
    except OSError:
        return False


def _close(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


def expected_kpis(path: Path, settings: Settings) -> list[dict[str, Any]]:
    """The KPI records a clean replay of ``path`` gives, which the live worker must publish.

    churn_reduction is left out: it is defined by the evaluation history, which differs between
    a live worker (every emit interval) and a replay (every bucket).
    """
    result = replay([source_for_path(path)], settings)
    return [r for r in result.records if r["kpi"] != "churn_reduction"]


def records_equal(got: dict[str, Any], want: dict[str, Any]) -> bool:
    return (got["as_of"] == want["as_of"]
            and all(_close(got[f], want[f]) for f in ("value", "numerator", "denominator")))
