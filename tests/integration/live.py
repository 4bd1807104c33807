"""A real stream-kpis deployment for integration tests: topics on the real broker, real worker
processes (``stream-kpis worker``), the same files produced with ``stream-kpis produce``'s code,
and readers for the KPI, signal and DLQ topics and for ``/metrics``.

Every stack gets its own app id, topic prefix, Redis key prefix and web ports, so stacks never
see each other's data on the shared broker.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson
from kafka import KafkaConsumer

from stream_kpis.kafka_tools import create_topics, produce_sources
from stream_kpis.replay import Source, source_for_path
from stream_kpis.settings import load_settings

REPO = Path(__file__).resolve().parents[2]
STREAM_KPIS = str(Path(sys.executable).with_name("stream-kpis"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def record_key(record: dict[str, Any]) -> tuple:
    return (record["kpi"], record["window"], tuple(sorted(record.get("labels", {}).items())))


class Worker:
    """One ``stream-kpis worker`` process."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = int(env["STREAM_KPIS_WEB_PORT"])
        self.log_path = log_path
        self.log = open(log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen([STREAM_KPIS, "worker", "-l", "info"], env=env,
                                        stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

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

    def start_worker(self, **env: str) -> Worker:
        index = len(self.workers)
        worker_env = {**self.env, "STREAM_KPIS_WEB_PORT": str(free_port()),
                      "STREAM_KPIS_DATA_DIR": str(self.tmp / f"worker-{index}"), **env}
        worker = Worker(worker_env, self.tmp / f"worker-{index}.log")
        self.workers.append(worker)
        return worker

    def produce(self, paths: Iterable[Path | Source], rate: float = 0) -> int:
        sources = [p if isinstance(p, Source) else source_for_path(p) for p in paths]
        return produce_sources(sources, self.settings, rate)

    def produce_raw(self, messages: Iterable[tuple[str, bytes | None, bytes]]) -> None:
        """(event type or topic name, key, value) straight to the input topics."""
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=self.env["STREAM_KPIS_BROKER"].split("//")[1],
                                 acks="all")
        inputs = self.settings.topics.inputs()
        for topic, key, value in messages:
            producer.send(inputs.get(topic, topic), key=key, value=value)
        producer.flush()
        producer.close()

    def consumer(self, topics: list[str]) -> KafkaConsumer:
        return KafkaConsumer(*topics, bootstrap_servers=self.env["STREAM_KPIS_BROKER"].split("//")[1],
                             auto_offset_reset="earliest", enable_auto_commit=False, group_id=None,
                             consumer_timeout_ms=1000)

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


def _close(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


def records_equal(got: dict[str, Any], want: dict[str, Any]) -> bool:
    return (got["as_of"] == want["as_of"]
            and all(_close(got[f], want[f]) for f in ("value", "numerator", "denominator")))
