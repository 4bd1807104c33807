"""Shared plumbing of the benchmarks: the local broker, topics, producing, worker processes,
memory readings and the result table.

Everything talks to a broker on 127.0.0.1 only (``KAFKA_PORT``, default 9092) and is bounded in
time: a step that does not finish within its timeout raises :class:`BenchTimeout`, and the
caller records the row as failed instead of hanging the run.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

with warnings.catch_warnings():  # kafka-python's import-time DeprecationWarnings
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
    from kafka.errors import KafkaError

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
STREAM_KPIS = str(Path(sys.executable).with_name("stream-kpis"))
BOOTSTRAP = f"127.0.0.1:{int(os.environ.get('KAFKA_PORT', 9092))}"
BROKER_URL = f"kafka://{BOOTSTRAP}"

__all__ = ["BOOTSTRAP", "BROKER_URL", "BenchTimeout", "Process", "Row", "admin", "bench_id",
           "committed_total", "delete_topics", "end_offsets", "end_offsets_total", "free_port",
           "kafka_version", "local_store_offset", "produce", "rss_bytes", "wait_until",
           "worker_groups"]


class BenchTimeout(RuntimeError):
    """A benchmark step did not finish within its time bound."""


def wait_until(probe: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.1) -> Any:
    """Poll ``probe`` until it returns something truthy; BenchTimeout after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise BenchTimeout(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


def bench_id(label: str) -> str:
    """A name no earlier run used (topics outlive runs on a shared broker)."""
    return f"bench-{label}-{uuid.uuid4().hex[:8]}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- broker ------------------------------------------------------------------------------------

def broker_reachable() -> bool:
    host, port = BOOTSTRAP.split(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return True
    except OSError:
        return False


def admin() -> KafkaAdminClient:
    return KafkaAdminClient(bootstrap_servers=BOOTSTRAP, client_id="stream-kpis-bench",
                            request_timeout_ms=30_000)


def delete_topics(prefix: str) -> list[str]:
    """Delete every topic whose name starts with ``prefix`` (a run's own topics only)."""
    if not prefix.startswith("bench-"):
        raise ValueError(f"refusing to delete topics outside the benchmark namespace: {prefix!r}")
    client = admin()
    try:
        doomed = [name for name in client.list_topics() if name.startswith(prefix)]
        for start in range(0, len(doomed), 50):
            try:
                client.delete_topics(doomed[start:start + 50], timeout_ms=30_000)
            except KafkaError:
                pass  # an already deleted topic; leftovers are harmless (retention)
        return doomed
    finally:
        client.close()


def worker_groups(app_id: str) -> list[str]:
    """The consumer groups a worker of ``app_id`` uses: its input group ``<app_id>-ingest``,
    which holds the offsets committed in its transactions, the exporter role's group, and the
    Faust app's own."""
    return [f"{app_id}-ingest", f"{app_id}-exporter", app_id]


def delete_groups(groups: Iterable[str]) -> None:
    """Delete the run's consumer groups (a group that never committed does not exist: ignored)."""
    client = admin()
    try:
        for group in groups:
            if group.startswith("bench-"):
                try:
                    client.delete_groups([group])
                except KafkaError:
                    pass
    finally:
        client.close()


def _partitions(topics: Iterable[str], partitions: int) -> list[TopicPartition]:
    return [TopicPartition(topic, p) for topic in topics for p in range(partitions)]


def end_offsets_total(topics: Iterable[str], partitions: int) -> int:
    consumer = KafkaConsumer(bootstrap_servers=BOOTSTRAP, request_timeout_ms=30_000)
    try:
        return sum(consumer.end_offsets(_partitions(topics, partitions)).values())
    finally:
        consumer.close()


def end_offsets(topic: str, partitions: int) -> dict[int, int]:
    """End offset of each partition of ``topic``."""
    consumer = KafkaConsumer(bootstrap_servers=BOOTSTRAP, request_timeout_ms=30_000)
    try:
        ends = consumer.end_offsets(_partitions([topic], partitions))
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        consumer.close()


def local_store_offset(path: Path) -> int | None:
    """The state log offset a worker's local RocksDB store of one partition reflects (the
    ``\\x00offset`` key of stream_kpis/live/store.py), read-only; None without a store."""
    if not path.is_dir():
        return None
    from rocksdict import AccessType, Options, Rdict

    db = Rdict(str(path), options=Options(raw_mode=True), access_type=AccessType.read_only())
    try:
        raw = db.get(b"\x00offset")
        return None if raw is None else int(raw)
    finally:
        db.close()


class GroupOffsets:
    """The committed offsets of one consumer group on some topics, summed (one admin client)."""

    def __init__(self, group: str, topics: Iterable[str]) -> None:
        self.group, self.topics = group, set(topics)
        self.client = admin()

    def total(self) -> int:
        try:
            offsets = self.client.list_group_offsets({self.group: None})[self.group]
        except (KafkaError, KeyError):
            return 0
        return sum(meta.offset for tp, meta in offsets.items()
                   if tp.topic in self.topics and meta.offset > 0)

    def close(self) -> None:
        self.client.close()


def committed_total(group: str, topics: Iterable[str]) -> int:
    offsets = GroupOffsets(group, topics)
    try:
        return offsets.total()
    finally:
        offsets.close()


async def produce_async(messages: Iterable[tuple[str, bytes | None, bytes]]) -> int:
    """Send (topic, key, value) with aiokafka (linger 20 ms, acks=1); returns the count."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, linger_ms=20,
                                max_batch_size=256 * 1024, acks=1)
    await producer.start()
    sent = 0
    try:
        pending = []
        for topic, key, value in messages:
            pending.append(await producer.send(topic, value, key=key))
            sent += 1
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        await producer.flush()
    finally:
        await producer.stop()
    return sent


def produce(messages: Iterable[tuple[str, bytes | None, bytes]], timeout: float) -> int:
    try:
        return asyncio.run(asyncio.wait_for(produce_async(messages), timeout))
    except TimeoutError:
        raise BenchTimeout(f"producing did not finish within {timeout:.0f} s") from None


# ---- processes ---------------------------------------------------------------------------------

def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` and its descendants (from /proc), in bytes."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        total += int(match.group(1)) * 1024 if match else 0
        todo.extend(children.get(current, ()))
    return total


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


_LIVE: list[Process] = []


class Process:
    """A child process in its own session, logging to a file; stopped by its own pid with
    ``stop_signal`` (then SIGKILL after the timeout)."""

    stop_signal = signal.SIGTERM

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self.log = open(log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.started = time.monotonic()
        self.process = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True, cwd=REPO)
        _LIVE.append(self)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 30) -> int | None:
        if self.alive():
            os.killpg(self.process.pid, self.stop_signal)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        if not self.log.closed:
            self.log.close()
        if self in _LIVE:
            _LIVE.remove(self)
        return self.process.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = 1500) -> str:
        return self.log_text()[-chars:]


def stop_all() -> None:
    """Stop every process this run started (at exit, also after an error or Ctrl-C)."""
    for process in list(_LIVE):
        process.stop(timeout=15)


class Worker(Process):
    """One ``stream-kpis worker`` with its /metrics endpoint."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = int(env["STREAM_KPIS_WEB_PORT"])
        super().__init__([STREAM_KPIS, "worker", "-l", "info"], env, log_path)

    def metrics(self) -> dict[str, float]:
        """Samples of /metrics summed by name plus ``name{outcome=...}`` keys; {} if unreachable."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics",
                                        timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return {}
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line[0] == "#":
                continue
            name_labels, _, value = line.rpartition(" ")
            name = name_labels.split("{", 1)[0]
            out[name] = out.get(name, 0.0) + float(value)
            if name_labels != name:
                out[name_labels] = float(value)
        return out

    def events_seen(self, metrics: dict[str, float] | None = None) -> int:
        """Input records accounted for: events_total over all outcomes (dead letters included;
        added from dead_letters_total if a version stops counting them there)."""
        metrics = self.metrics() if metrics is None else metrics
        events = metrics.get("stream_kpis_events_total", 0.0)
        dead = metrics.get("stream_kpis_dead_letters_total", 0.0)
        counted_dead = sum(v for k, v in metrics.items()
                           if k.startswith("stream_kpis_events_total{")
                           and 'outcome="dead_letter"' in k)
        return int(events + max(0.0, dead - counted_dead))

    def check_alive(self) -> None:
        if not self.alive():
            raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log_tail()}")


def kafka_version() -> str:
    """The broker's version, from the jar the local broker runs (best effort)."""
    cache = Path(os.environ.get("STREAM_KPIS_CACHE", Path.home() / ".cache" / "stream-kpis"))
    jars = sorted(cache.glob("kafka-*/lib/kafka_2.13-*.jar"))
    if jars:
        return jars[-1].stem.split("-", 1)[1]
    return os.environ.get("KAFKA_VERSION", "unknown")


# ---- results -----------------------------------------------------------------------------------

@dataclass
class Row:
    """One line of the result table; ``ratio`` is value / the baseline's value."""

    bench: str
    what: str
    value: float | None
    unit: str
    baseline: str = ""
    ratio: float | None = None
    note: str = ""

    def cells(self) -> list[str]:
        return [self.bench, self.what, format_value(self.value, self.unit), self.unit,
                self.baseline or "-", "-" if self.ratio is None else f"{self.ratio:.2f}x",
                self.note]


HEADERS = ["bench", "what", "value", "unit", "baseline", "ratio", "note"]


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit in ("events/s", "members", "events", "lines/s", "bytes/member") or abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.2f}"


def table(rows: list[list[str]], headers: list[str]) -> str:
    """A Markdown table (readable in a terminal too)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    numeric = {2, 5}

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in numeric else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if i in numeric else "-" * (w + 2)
                         for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


@dataclass
class Timer:
    """Wall time of a step, for the log."""

    label: str
    started: float = field(default_factory=time.monotonic)

    def done(self) -> str:
        return f"{self.label}: {time.monotonic() - self.started:.1f} s"


def json_lines(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        for line in handle:
            line = line.rstrip(b"\r\n")
            if line:
                yield line


def loads_or_none(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
