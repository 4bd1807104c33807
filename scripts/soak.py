#!/usr/bin/env python3
"""make soak: a fault soak of the live workers on the real local Kafka broker.

Black box on purpose: it drives only the CLI (``stream-kpis topics create | worker | produce |
generate | replay``), Kafka topics and the workers' ``/metrics``, so it keeps working while the
worker's internals are rewritten.

For each scenario, ``--rounds`` rounds. A round gets fresh topics (a unique
``STREAM_KPIS_TOPIC_PREFIX`` and ``STREAM_KPIS_APP_ID``, 4 input partitions), fresh worker data
directories, its own web ports, ``STREAM_KPIS_CLOCK=event``, ``STREAM_KPIS_EMIT_INTERVAL=1s``
and no Redis. It generates a seeded event file, computes the expected KPIs with ``stream-kpis
replay`` (the records as of the last bucket, churn_reduction left out: it depends on the
evaluation history), runs the scenario's workers and faults while producing the file, then
consumes the KPI topics (read_committed, the latest record per (kpi, window, labels)) until
every expected record is matched (as_of equal, value/numerator/denominator within a relative
1e-9) or the timeout passes. After a match it waits until the consumer group has committed the
end of the input (when the broker knows the group) and reads the KPI topics once more: a value
that changes after matching is a failure too, and so is a worker that exits on its own.

A passing round deletes its directory and topics; a failing one keeps ``.local/soak/<round>/``
(the event file, data dirs, worker logs, /metrics at the end, expected.json, actual.json,
mismatches.json, timeline.log, verdict.txt). A table is printed at the end; exit code 1 when
any round was wrong.

    .venv/bin/python scripts/soak.py [--rounds N] [--scenarios a,b] [--events N] [--keep]
                                      [--rev REV] [--timeout S]

``--rev REV`` soaks a committed revision (``git archive REV stream_kpis`` on the workers'
PYTHONPATH) instead of the working tree. broker-restart always runs on a private broker
(``deploy/local/kafka.sh`` on free ports with its own state directory), never on the shared
one, and runs last. The shared broker (``KAFKA_PORT``, default 9092) is started when it is not
reachable and stopped at the end only if this script started it.

Importable: :func:`run_round` runs one round (tests/integration/test_soak.py runs each
scenario once).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# kafka-python 3.0 loads its protocol schemas with the deprecated importlib.resources.read_text
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
    from kafka.partitioner.default import murmur2

REPO = Path(__file__).resolve().parents[1]
SOAK_ROOT = REPO / ".local" / "soak"
KAFKA_SH = REPO / "deploy" / "local" / "kafka.sh"
PARTITIONS = 4
INPUT_TOPICS = ("purchases", "redemptions", "enrollments", "surveys")
#: Events the generator writes per member over 90 days (measured: 8.5-8.6).
EVENTS_PER_MEMBER = 8.55
#: broker-restart must stay last: it is the one that restarts a broker.
SCENARIOS = ("empty-start", "join-mid-batch", "kill-mid-batch", "kill-exporter", "two-one-three",
             "late-partition", "four-chunks", "broker-restart")
PRIVATE_BROKER_SCENARIOS = frozenset({"broker-restart"})
#: Wrong KPIs are final when no KPI record came for this long and all input is committed.
QUIET_S = 30.0


def stream_kpis_bin() -> str:
    here = Path(sys.executable).with_name("stream-kpis")
    return str(here) if here.exists() else (shutil.which("stream-kpis") or "stream-kpis")


STREAM_KPIS = stream_kpis_bin()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tcp_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


class RoundError(Exception):
    """Something in the round went wrong before the KPIs could be compared."""


# ---------------------------------------------------------------- brokers


class SharedBroker:
    """The developer's broker on 127.0.0.1:KAFKA_PORT: started when not reachable, stopped at
    the end only when started here."""

    def __init__(self) -> None:
        self.port = int(os.environ.get("KAFKA_PORT", "9092"))
        self.started_here = False

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ensure(self) -> SharedBroker:
        if not tcp_open(self.port):
            print(f"soak: starting the local Kafka broker on {self.bootstrap}", flush=True)
            _kafka_sh("up", os.environ)
            self.started_here = True
        return self

    def release(self) -> None:
        if self.started_here:
            print("soak: stopping the Kafka broker it started", flush=True)
            _kafka_sh("down", os.environ)
            self.started_here = False


class PrivateBroker:
    """A broker of its own (``deploy/local/kafka.sh`` with ``STREAM_KPIS_LOCAL`` = ``directory``
    and free ports), for the scenarios that stop the broker: the shared one is never touched."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port, self.controller_port = free_port(), free_port()
        self.env = {**os.environ, "STREAM_KPIS_LOCAL": str(directory),
                    "KAFKA_PORT": str(self.port), "KAFKA_CONTROLLER_PORT": str(self.controller_port),
                    "KAFKA_HEAP_OPTS": "-Xms256m -Xmx512m", "KAFKA_STOP_TIMEOUT": "20"}
        self.env.pop("KAFKA_SASL_PORT", None)
        self.running = False

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def up(self) -> PrivateBroker:
        _kafka_sh("up", self.env)
        self.running = True
        return self

    def down(self) -> None:
        _kafka_sh("down", self.env)
        self.running = False

    def server_log(self) -> Path:
        return self.directory / "kafka" / "logs" / "server.log"

    def close(self, remove: bool = True) -> None:
        if self.running:
            self.down()
        if remove:
            shutil.rmtree(self.directory, ignore_errors=True)


def _kafka_sh(action: str, env: Any) -> None:
    done = subprocess.run([str(KAFKA_SH), action], env=dict(env), capture_output=True, text=True,
                          timeout=600, check=False)
    if done.returncode != 0:
        raise RoundError(f"deploy/local/kafka.sh {action} failed ({done.returncode}):\n"
                         f"{done.stdout}{done.stderr}")


# ---------------------------------------------------------------- workers


def parse_metrics(text: str) -> Iterator[tuple[str, str, float]]:
    """(name, labels text, value) of each sample line of a Prometheus text page."""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        try:
            yield name, labels.rstrip("}"), float(value)
        except ValueError:
            continue


class Worker:
    """One ``stream-kpis worker`` process, in a session of its own (so only it gets signals)."""

    def __init__(self, name: str, env: dict[str, str], directory: Path, data_dir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.data_dir = data_dir
        self.log_path = directory / f"{name}.log"
        self.signalled: int | None = None  # the signal this harness sent, if any
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [STREAM_KPIS, "worker", "-l", "info"], cwd=directory, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
            env={**env, "STREAM_KPIS_WEB_PORT": str(self.port), "STREAM_KPIS_WEB_HOST": "127.0.0.1",
                 "STREAM_KPIS_DATA_DIR": str(data_dir)})

    def alive(self) -> bool:
        return self.process.poll() is None

    def metrics(self) -> str | None:
        if not self.alive():
            return None
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=3) as response:
                return response.read().decode()
        except (OSError, ValueError):
            return None

    def processed(self) -> int | None:
        """Input records this worker counted (stream_kpis_events_total, every outcome)."""
        text = self.metrics()
        if text is None:
            return None
        return int(sum(v for n, _, v in parse_metrics(text) if n.endswith("events_total")))

    def assigned(self) -> float | None:
        """Input partitions it owns; None when /metrics is unreachable, -1 without such a gauge."""
        text = self.metrics()
        if text is None:
            return None
        values = [v for n, _, v in parse_metrics(text) if n.endswith("assigned_partitions")]
        return values[0] if values else -1

    def exporter(self) -> bool | None:
        """Whether /metrics say this worker is the global exporter (a gauge named *export*)."""
        text = self.metrics()
        if text is None:
            return None
        values = [v for n, _, v in parse_metrics(text) if "export" in n and not n.endswith("_created")]
        return any(v == 1 for v in values) if values else None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.signalled = sig
            os.killpg(self.process.pid, sig)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def died_unasked(self) -> bool:
        """Exited although this harness sent it no signal."""
        return not self.alive() and self.signalled is None

    def close(self) -> None:
        self._log.close()


# ---------------------------------------------------------------- KPI comparison


def record_key(record: dict[str, Any]) -> str:
    labels = ",".join(f"{k}={v}" for k, v in sorted((record.get("labels") or {}).items()))
    return f"{record['kpi']} {record['window']} {{{labels}}}".replace(" None ", " - ")


def _close(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


def records_equal(got: dict[str, Any] | None, want: dict[str, Any]) -> bool:
    return (got is not None and got.get("as_of") == want["as_of"]
            and all(_close(got.get(f), want.get(f)) for f in ("value", "numerator", "denominator")))


def mismatches(latest: dict[str, dict], expected: dict[str, dict]) -> list[dict[str, Any]]:
    return [{"key": key, "expected": want, "actual": latest.get(key)}
            for key, want in expected.items() if not records_equal(latest.get(key), want)]


# ---------------------------------------------------------------- a round


@dataclass
class RoundResult:
    scenario: str
    index: int
    exact: bool
    seconds: float
    directory: Path | None = None
    reason: str = ""
    notes: list[str] = field(default_factory=list)
    mismatches: list[dict[str, Any]] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"{self.scenario} round {self.index}: {'exact' if self.exact else 'WRONG'} "
                 f"in {self.seconds:.1f}s" + (f": {self.reason}" if self.reason else "")]
        lines += [f"  note: {note}" for note in self.notes]
        for m in self.mismatches[:5]:
            lines.append(f"  {m['key']}: expected {_brief(m['expected'])}, got {_brief(m['actual'])}")
        if self.directory is not None:
            lines.append(f"  kept: {self.directory}")
        return "\n".join(lines)


def _brief(record: dict[str, Any] | None) -> str:
    if record is None:
        return "nothing"
    return (f"{record.get('value')} ({record.get('numerator')}/{record.get('denominator')}, "
            f"as_of {record.get('as_of')})")


class Round:
    """Topics, workers, data and clock of one round; the scenarios drive it."""

    def __init__(self, scenario: str, index: int, directory: Path, bootstrap: str, events: int,
                 seed: int, broker: PrivateBroker | None, pythonpath: str | None) -> None:
        self.scenario, self.index, self.directory = scenario, index, directory
        self.bootstrap, self.broker, self.seed = bootstrap, broker, seed
        self.rng = random.Random(seed)
        self.started = time.monotonic()
        self.notes: list[str] = []
        self.workers: list[Worker] = []
        self.last_produce = time.monotonic()
        self.actual: dict[str, dict] | None = None
        run = uuid.uuid4().hex[:10]
        self.app_id = f"soak-{run}"
        self.prefix = f"soak-{run}."
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_KPIS_")}
        if pythonpath:
            env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
        self.env = {**env, "STREAM_KPIS_BROKER": f"kafka://{bootstrap}",
                    "STREAM_KPIS_APP_ID": self.app_id, "STREAM_KPIS_TOPIC_PREFIX": self.prefix,
                    "STREAM_KPIS_PARTITIONS": str(PARTITIONS), "STREAM_KPIS_REDIS_URL": "none",
                    "STREAM_KPIS_REDIS_PREFIX": f"{self.app_id}:", "STREAM_KPIS_CLOCK": "event",
                    "STREAM_KPIS_EMIT_INTERVAL": "1s", "PYTHONUNBUFFERED": "1"}
        self._timeline = open(directory / "timeline.log", "a")  # noqa: SIM115 (closed in close)
        self.log(f"round {scenario}#{index} seed {seed} app_id {self.app_id} broker {bootstrap}")
        self.events_file = directory / "events.jsonl"
        members = max(50, round(events / EVENTS_PER_MEMBER))
        self.cli("generate", "--members", str(members), "--days", "90", "--seed", str(seed),
                 "-o", str(self.events_file))
        self.lines = [line for line in self.events_file.read_bytes().splitlines(keepends=True)
                      if line.strip()]
        self.expected = self._expected()
        self.log(f"{len(self.lines)} lines, {len(self.expected)} expected KPI records")
        self.cli("topics", "create", "--partitions", str(PARTITIONS))

    # -- plumbing

    def log(self, message: str) -> None:
        self._timeline.write(f"{time.monotonic() - self.started:7.2f}s {message}\n")
        self._timeline.flush()

    def cli(self, *args: str, timeout: float = 300) -> str:
        done = subprocess.run([STREAM_KPIS, *args], env=self.env, cwd=self.directory,
                              capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RoundError(f"stream-kpis {' '.join(args)} exited {done.returncode}:\n"
                             f"{done.stdout[-2000:]}{done.stderr[-3000:]}")
        return done.stdout

    def _expected(self) -> dict[str, dict]:
        out = self.cli("replay", str(self.events_file), "--output", "jsonl", "--no-progress")
        records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        if not records:
            raise RoundError("stream-kpis replay printed no KPI records")
        last = max(r["as_of"] for r in records)
        return {record_key(r): r for r in records
                if r["as_of"] == last and r["kpi"] != "churn_reduction"}

    def write_lines(self, name: str, lines: list[bytes]) -> Path:
        path = self.directory / name
        path.write_bytes(b"".join(lines))
        return path

    def chunks(self, n: int) -> list[Path]:
        size = -(-len(self.lines) // n)
        return [self.write_lines(f"chunk-{i + 1}.jsonl", self.lines[i * size:(i + 1) * size])
                for i in range(n)]

    # -- producing

    def produce(self, path: Path, rate: float = 0) -> None:
        """``stream-kpis produce`` (blocking); checks that every line was sent."""
        self.finish(self.produce_in_background(path, rate))

    def produce_in_background(self, path: Path, rate: float = 0) -> subprocess.Popen:
        args = [STREAM_KPIS, "produce", str(path)] + (["--rate", f"{rate:.1f}"] if rate else [])
        self.log(f"produce {path.name}" + (f" at {rate:.0f}/s" if rate else ""))
        process = subprocess.Popen(args, env=self.env, cwd=self.directory, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        process.path = path  # type: ignore[attr-defined]
        return process

    def finish(self, process: subprocess.Popen, timeout: float = 300) -> None:
        out, err = process.communicate(timeout=timeout)
        path: Path = process.path  # type: ignore[attr-defined]
        want = sum(1 for line in path.read_bytes().splitlines() if line.strip())
        if process.returncode != 0 or not re.search(rf"\bproduced {want} events\b", out + err):
            raise RoundError(f"stream-kpis produce {path.name} ({want} lines) exited "
                             f"{process.returncode}: {out[-500:]}{err[-2000:]}")
        self.last_produce = time.monotonic()
        self.log(f"produced {path.name}: {want} lines (processed so far: {self.processed()})")

    # -- workers

    def start_worker(self, data_dir: Path | None = None) -> Worker:
        name = f"w{len(self.workers)}"
        worker = Worker(name, self.env, self.directory, data_dir or self.directory / f"data-{name}")
        self.workers.append(worker)
        self.log(f"start {name} (port {worker.port}, data {worker.data_dir.name}, pid "
                 f"{worker.process.pid}; processed so far: {self.processed()})")
        return worker

    def live(self) -> list[Worker]:
        return [w for w in self.workers if w.alive()]

    def processed(self) -> int:
        return sum(w.processed() or 0 for w in self.live())

    def kill(self, worker: Worker, sig: int = signal.SIGKILL) -> int | None:
        before = self.processed()
        worker.signal(sig)
        code = worker.wait(30 if sig != signal.SIGKILL else 10)
        if code is None and sig != signal.SIGKILL:
            self.notes.append(f"{worker.name} did not exit within 30s of {signal.Signals(sig).name}")
            worker.signal(signal.SIGKILL)
            code = worker.wait(10)
        self.log(f"{signal.Signals(sig).name} {worker.name}: exit {code} (processed before: {before})")
        if sig == signal.SIGTERM and code not in (0, None):
            self.notes.append(f"{worker.name} exited {code} after SIGTERM")
        return code

    def wait_until(self, probe: Callable[[], Any], timeout: float, what: str,
                   required: bool = True, poll: float = 0.1) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            result = probe()
            if result:
                return result
            self.check_workers()
            if time.monotonic() > deadline:
                self.log(f"timeout after {timeout}s: {what}")
                if required:
                    raise RoundError(f"{what}: not within {timeout}s")
                return result
            time.sleep(poll)

    def wait_assigned(self, workers: list[Worker], timeout: float = 90) -> None:
        """Until ``workers`` together own every input partition, each some (when the workers
        publish an assigned-partitions gauge; else until their /metrics answer, plus 5 s)."""
        def balanced() -> str:
            owned = [w.assigned() for w in workers]
            if any(v is None for v in owned):
                return ""
            if all(v == -1 for v in owned):
                return "no gauge"
            return "balanced" if sum(owned) == PARTITIONS and all(owned) else ""
        if self.wait_until(balanced, timeout,
                           f"partitions assigned to {[w.name for w in workers]}") == "no gauge":
            time.sleep(5)
        self.log(f"assigned: {[(w.name, w.assigned()) for w in workers]}")

    def wait_processed(self, count: float, timeout: float = 60) -> None:
        """Until the live workers counted ``count`` input records (a trigger, not a check)."""
        self.wait_until(lambda: self.processed() >= count, timeout,
                        f"{int(count)} records processed", required=False, poll=0.05)

    def check_workers(self) -> None:
        for worker in self.workers:
            if worker.died_unasked():
                raise RoundError(f"{worker.name} exited with code {worker.process.returncode} "
                                 f"on its own; last log lines:\n{_tail(worker.log_path)}")

    # -- verdict

    def kpi_consumer(self) -> KafkaConsumer:
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None,
                                 auto_offset_reset="earliest", enable_auto_commit=False,
                                 isolation_level="read_committed")
        topics = sorted(t for t in consumer.topics() if t.startswith(self.prefix + "kpi."))
        if not topics:
            consumer.close()
            raise RoundError(f"no KPI topics {self.prefix}kpi.* on the broker")
        consumer.subscribe(topics)
        return consumer

    def read_kpis(self, consumer: KafkaConsumer, latest: dict[str, dict], seconds: float = 2) -> int:
        """Poll the KPI topics (one partition each: the last record of a key is the latest)
        until nothing more arrives or ``seconds`` passed; returns the number of records read."""
        until, read = time.monotonic() + seconds, 0
        while time.monotonic() < until:
            batch = consumer.poll(timeout_ms=300)
            if not batch:
                return read
            for messages in batch.values():
                for message in messages:
                    read += 1
                    try:
                        record = json.loads(message.value)
                        latest[record_key(record)] = record
                    except (ValueError, KeyError, TypeError):
                        continue
        return read

    def verify(self, timeout: float) -> list[dict[str, Any]]:
        """Mismatches after the KPI topics settled (empty when exact); see the module doc.

        Gives up before ``timeout`` when the KPIs are wrong but final: no KPI record for
        QUIET_S seconds while the consumer group has committed the end of every input partition.
        """
        latest: dict[str, dict] = {}
        consumer = self.kpi_consumer()
        try:
            deadline = self.last_produce + timeout
            last_record, next_lag_check = time.monotonic(), 0.0
            while True:
                if self.read_kpis(consumer, latest):
                    last_record = time.monotonic()
                wrong = mismatches(latest, self.expected)
                if not wrong:
                    break
                self.check_workers()
                now = time.monotonic()
                if now - last_record >= QUIET_S and now >= next_lag_check:
                    next_lag_check = now + 5
                    if self.input_lag() == {}:
                        self.notes.append(f"wrong and final: no KPI record for {QUIET_S:.0f}s "
                                          "with all input committed")
                        self.log(f"final: {len(wrong)} KPI records differ")
                        self.actual = latest
                        return wrong
                if now > deadline:
                    lag = self.input_lag()
                    if lag:
                        self.notes.append(f"input not committed at the timeout: {sum(lag.values())} "
                                          f"records on {len(lag)} partitions {sorted(lag)}")
                    self.log(f"timeout: {len(wrong)} KPI records differ; uncommitted input: {lag}")
                    self.actual = latest
                    return wrong
            self.log("all expected KPI records matched")
            self._wait_committed()
            settle = time.monotonic() + 3
            while time.monotonic() < settle:
                self.read_kpis(consumer, latest)
            self.actual = latest
            wrong = mismatches(latest, self.expected)
            if wrong:
                self.notes.append("the KPIs matched, then changed")
            self.check_workers()
            return wrong
        finally:
            consumer.close()

    def input_lag(self) -> dict[tuple[str, int], int] | None:
        """Records between the committed offset (of the groups named <app_id>*) and the end, per
        input partition that has any; None when unknown (no such group, or an error)."""
        try:
            admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=10000)
        except Exception:  # noqa: BLE001 -- unknown, not a verdict
            return None
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap)
        try:
            ends = consumer.end_offsets([TopicPartition(self.prefix + t, p) for t in INPUT_TOPICS
                                         for p in range(PARTITIONS)])
            groups = [g.get("group_id") if isinstance(g, dict) else
                      g[0] if isinstance(g, tuple) else getattr(g, "group_id", g)
                      for g in admin.list_groups()]
            groups = [g for g in groups if str(g).startswith(self.app_id)]
            if not groups:
                return None
            committed: dict[tuple[str, int], int] = {}
            for offsets in admin.list_group_offsets({g: None for g in groups}).values():
                for tp, meta in offsets.items():
                    key = (tp.topic, tp.partition)
                    committed[key] = max(committed.get(key, 0), meta.offset)
            lag = {(tp.topic, tp.partition): end - committed.get((tp.topic, tp.partition), 0)
                   for tp, end in ends.items()}
            return {key: n for key, n in lag.items() if n > 0}
        except Exception:  # noqa: BLE001 -- kafka-python API drift: unknown, not a verdict
            return None
        finally:
            consumer.close()
            admin.close()

    def _wait_committed(self, timeout: float = 30) -> None:
        """Until the consumer group committed the end of the input (a note when it does not)."""
        deadline = time.monotonic() + timeout
        while True:
            lag = self.input_lag()
            if lag is None:
                self.notes.append(f"committed offsets of {self.app_id}* unknown: not checked")
                return
            if not lag:
                self.log("committed offsets == end offsets")
                return
            if time.monotonic() > deadline:
                self.notes.append(f"committed offsets still behind the end after {timeout}s: "
                                  f"{sum(lag.values())} records on {len(lag)} partitions")
                return
            time.sleep(0.5)

    def end_offsets(self, partition: int) -> int:
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap)
        try:
            ends = consumer.end_offsets([TopicPartition(self.prefix + t, partition)
                                         for t in INPUT_TOPICS])
        finally:
            consumer.close()
        return sum(ends.values())

    def snapshot_metrics(self) -> None:
        for worker in self.live():
            text = worker.metrics()
            if text is not None:
                (self.directory / f"{worker.name}.metrics.txt").write_text(text)

    def stop_workers(self) -> None:
        for worker in self.live():
            worker.signal(signal.SIGTERM)
        for worker in self.workers:
            if worker.wait(30) is None:
                worker.signal(signal.SIGKILL)
                worker.wait(10)
            worker.close()

    def delete_topics(self) -> None:
        try:
            admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=15000)
            try:
                mine = [t for t in admin.list_topics() if t.startswith(self.app_id)]
                if mine:
                    admin.delete_topics(mine, raise_errors=False)
            finally:
                admin.close()
        except Exception as exc:  # noqa: BLE001 -- a leftover topic is harmless (24 h retention)
            self.log(f"topics not deleted: {exc!r}")

    def close(self) -> None:
        self._timeline.close()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------- scenarios


def _event_key_function() -> Callable[[Any], bytes | None]:
    """stream-kpis produce's own key function (member_id, or event_id for guests)."""
    for module in ("stream_kpis.live.kafka_tools", "stream_kpis.kafka_tools"):
        try:
            return __import__(module, fromlist=["event_key"]).event_key
        except Exception:  # noqa: BLE001,S112 -- moved, or a half-finished rewrite: try the next
            continue

    def event_key(obj: Any) -> bytes | None:
        if not isinstance(obj, dict):
            return None
        key = obj.get("member_id") or obj.get("event_id")
        return key.encode() if isinstance(key, str) else None
    return event_key


def partition_of(line: bytes, event_key: Callable[[Any], bytes | None]) -> int | None:
    """The input partition the producer's default (murmur2) partitioner picks; None: unkeyed."""
    try:
        key = event_key(json.loads(line))
    except ValueError:
        return None
    return None if key is None else (murmur2(key) & 0x7FFFFFFF) % PARTITIONS


def empty_start(r: Round) -> None:
    """A worker on empty topics, then every event."""
    w0 = r.start_worker()
    r.wait_assigned([w0])
    r.produce(r.events_file)


def join_mid_batch(r: Round) -> None:
    """One worker, every event at once, a second worker started 0.5-2 s after the producer
    (it joins while the first applies them)."""
    w0 = r.start_worker()
    r.wait_assigned([w0])
    producer = r.produce_in_background(r.events_file)
    time.sleep(r.rng.uniform(0.5, 2.0))
    r.start_worker()  # its process needs ~2 s more before it joins the group
    r.finish(producer)


def kill_mid_batch(r: Round) -> None:
    """Two workers; kill -9 one while the backlog is being applied; restart it on its data dir."""
    workers = [r.start_worker(), r.start_worker()]
    r.wait_assigned(workers)
    producer = r.produce_in_background(r.events_file)
    r.wait_processed(r.rng.uniform(0.2, 0.6) * len(r.lines))
    victim = r.rng.choice(workers)
    r.kill(victim)
    r.finish(producer)
    time.sleep(r.rng.uniform(1.0, 3.0))
    r.start_worker(data_dir=victim.data_dir)


def kill_exporter(r: Round) -> None:
    """Two workers; kill -9 the one whose /metrics say it exports; a third joins."""
    workers = [r.start_worker(), r.start_worker()]
    r.wait_assigned(workers)
    producer = r.produce_in_background(r.events_file, rate=len(r.lines) / 10)
    r.wait_processed(r.rng.uniform(0.2, 0.4) * len(r.lines))
    exporter = r.wait_until(lambda: next((w for w in workers if w.exporter()), None), 20,
                            "a worker reporting the exporter role in /metrics")
    r.kill(exporter)
    time.sleep(r.rng.uniform(0.0, 3.0))
    r.start_worker()
    r.finish(producer)


def two_one_three(r: Round) -> None:
    """2 workers -> SIGTERM one -> 1 -> two more -> 3; a chunk of events before each step."""
    chunks = r.chunks(3)
    workers = [r.start_worker(), r.start_worker()]
    r.wait_assigned(workers)
    r.produce(chunks[0])
    r.kill(r.rng.choice(workers), signal.SIGTERM)
    r.produce(chunks[1])
    r.start_worker()
    r.start_worker()
    r.produce(chunks[2])


def late_partition(r: Round) -> None:
    """The events of one input partition are held back until a second worker joined."""
    event_key = _event_key_function()
    held_partition = r.rng.randrange(PARTITIONS)
    held, rest = [], []
    for line in r.lines:
        (held if partition_of(line, event_key) == held_partition else rest).append(line)
    unkeyed = sum(1 for line in rest if partition_of(line, event_key) is None)
    r.log(f"holding back partition {held_partition}: {len(held)} lines")
    w0 = r.start_worker()
    r.wait_assigned([w0])
    r.produce(r.write_lines("rest.jsonl", rest))
    if r.end_offsets(held_partition) > unkeyed:
        raise RoundError(f"partition {held_partition} got more than the {unkeyed} unkeyed records: "
                         "the key -> partition prediction is wrong")
    r.wait_processed(len(rest), timeout=60)
    w1 = r.start_worker()
    r.wait_assigned([w0, w1])
    before = r.end_offsets(held_partition)
    r.produce(r.write_lines("held.jsonl", held))
    if r.end_offsets(held_partition) != before + len(held):
        raise RoundError(f"the held-back lines did not all go to partition {held_partition}")


def four_chunks(r: Round) -> None:
    """Four paced chunks: a second worker joins during the first, the first is killed -9 during
    the second, a third joins during the third."""
    chunks = r.chunks(4)
    rate = len(r.lines) / 4 / 4  # each chunk takes about 4 s
    w0 = r.start_worker()
    r.wait_assigned([w0])
    producer = r.produce_in_background(chunks[0], rate)
    time.sleep(r.rng.uniform(0.5, 2.0))
    r.start_worker()
    r.finish(producer)
    producer = r.produce_in_background(chunks[1], rate)
    time.sleep(r.rng.uniform(1.0, 3.0))
    r.kill(w0)
    r.finish(producer)
    producer = r.produce_in_background(chunks[2], rate)
    time.sleep(r.rng.uniform(0.5, 2.0))
    r.start_worker()
    r.finish(producer)
    r.produce(chunks[3])


def broker_restart(r: Round) -> None:
    """One worker; the (private) broker stops for 5-10 s while it applies the backlog."""
    if r.broker is None:
        raise RoundError("broker-restart needs a private broker")
    cut = len(r.lines) * 3 // 4
    first = r.write_lines("backlog.jsonl", r.lines[:cut])
    tail = r.write_lines("after-restart.jsonl", r.lines[cut:])
    w0 = r.start_worker()
    r.wait_assigned([w0])
    r.produce(first)
    r.wait_processed(r.rng.uniform(0.1, 0.4) * cut)
    r.log(f"broker down (processed: {r.processed()})")
    r.broker.down()
    outage = r.rng.uniform(5.0, 10.0)
    r.log(f"broker stopped; up again in {outage:.1f}s")
    time.sleep(outage)
    r.broker.up()
    r.log(f"broker up (processed: {r.processed()})")
    r.produce(tail)


SCENARIO_FUNCTIONS: dict[str, Callable[[Round], None]] = {
    "empty-start": empty_start, "join-mid-batch": join_mid_batch, "kill-mid-batch": kill_mid_batch,
    "kill-exporter": kill_exporter, "two-one-three": two_one_three,
    "late-partition": late_partition, "four-chunks": four_chunks, "broker-restart": broker_restart,
}
assert tuple(SCENARIO_FUNCTIONS) == SCENARIOS


def round_seed(base: int, scenario: str, index: int) -> int:
    return (base * 1_000_003 + zlib.crc32(f"{scenario}#{index}".encode())) % 2**31


def run_round(scenario: str, index: int = 1, *, bootstrap: str, events: int = 30_000,
              broker: PrivateBroker | None = None, root: Path = SOAK_ROOT, keep: bool = False,
              timeout: float = 120, seed: int = 1, pythonpath: str | None = None) -> RoundResult:
    """One round of ``scenario`` on the broker at ``bootstrap`` (``broker`` is the private
    broker broker-restart stops and starts; its bootstrap is used then)."""
    if scenario in PRIVATE_BROKER_SCENARIOS:
        if broker is None:
            raise ValueError(f"{scenario} needs a PrivateBroker")
        bootstrap = broker.bootstrap
    root.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix=f"{scenario}-r{index}-", dir=root))
    started = time.monotonic()
    result = RoundResult(scenario, index, exact=False, seconds=0.0)
    r: Round | None = None
    try:
        r = Round(scenario, index, directory, bootstrap, events, round_seed(seed, scenario, index),
                  broker, pythonpath)
        SCENARIO_FUNCTIONS[scenario](r)
        r.log(f"scenario done; waiting for the KPIs (timeout {timeout}s after the last produce)")
        result.mismatches = r.verify(timeout)
        result.exact = not result.mismatches
        if result.mismatches:
            result.reason = (f"{len(result.mismatches)} of {len(r.expected)} KPI records differ"
                             + (" (matched, then changed)" if "the KPIs matched, then changed"
                                in r.notes else ""))
    except RoundError as exc:
        result.reason = str(exc).splitlines()[0]
        if r is not None:
            r.log(f"error: {exc}")
        (directory / "error.txt").write_text(str(exc))
    except Exception as exc:  # noqa: BLE001 -- reported as a wrong round with its traceback
        import traceback

        result.reason = f"harness error: {exc!r}"
        (directory / "error.txt").write_text(traceback.format_exc())
    finally:
        if r is not None:
            r.snapshot_metrics()
            r.stop_workers()
            result.notes = r.notes
            for worker in r.workers:
                if worker.died_unasked() and worker.process.returncode not in (0, None):
                    result.notes.append(f"{worker.name} exited {worker.process.returncode} on its own")
    result.seconds = time.monotonic() - started
    if r is not None:
        r.log(f"verdict: {'exact' if result.exact else 'WRONG'} {result.reason}")
        if result.exact:
            r.delete_topics()
        else:
            _write_evidence(r, result, broker)
        r.close()
    if result.exact and not keep:
        shutil.rmtree(directory, ignore_errors=True)
    else:
        result.directory = directory
    return result


def _write_evidence(r: Round, result: RoundResult, broker: PrivateBroker | None) -> None:
    d = r.directory
    expected = getattr(r, "expected", {})
    (d / "expected.json").write_text(json.dumps(list(expected.values()), indent=1))
    actual = r.actual
    if actual is not None:
        (d / "actual.json").write_text(json.dumps(list(actual.values()), indent=1))
    (d / "mismatches.json").write_text(json.dumps(result.mismatches[:50], indent=1))
    (d / "verdict.txt").write_text(
        f"{result.describe()}\nseed {r.seed}\nbroker {r.bootstrap}\napp_id {r.app_id}\n"
        f"topic prefix {r.prefix}\nworkers: "
        + ", ".join(f"{w.name} exit {w.process.returncode} signal {w.signalled}" for w in r.workers)
        + "\n")
    if broker is not None and broker.server_log().exists():
        shutil.copy(broker.server_log(), d / "broker-server.log")


# ---------------------------------------------------------------- the soak


def export_revision(rev: str, root: Path) -> str:
    """``git archive REV stream_kpis`` into a directory; returns it (for PYTHONPATH)."""
    target = Path(tempfile.mkdtemp(prefix="code-", dir=root))
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "stream_kpis"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return str(target)


def print_table(results: list[RoundResult], scenarios: list[str]) -> None:
    rows = [("scenario", "exact/total", "mean s/round")]
    for name in scenarios:
        mine = [r for r in results if r.scenario == name]
        if mine:
            rows.append((name, f"{sum(r.exact for r in mine)}/{len(mine)}",
                         f"{sum(r.seconds for r in mine) / len(mine):.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    print()
    for n, row in enumerate(rows):
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            print("-+-".join("-" * w for w in widths))
    failed = [r for r in results if not r.exact]
    if failed:
        print("\nfailed rounds:")
        for r in failed:
            print(r.describe())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="rounds per scenario (10)")
    parser.add_argument("--scenarios", default="",
                        help=f"comma-separated subset of: {','.join(SCENARIOS)} (default: all)")
    parser.add_argument("--events", type=int, default=30_000, help="events per round (about; 30000)")
    parser.add_argument("--keep", action="store_true", help="keep the directories of passing rounds")
    parser.add_argument("--timeout", type=float, default=120,
                        help="seconds after the last produce for the KPIs to become exact (120)")
    parser.add_argument("--seed", type=int, default=1, help="base seed of the rounds' data (1)")
    parser.add_argument("--rev", default="", help="soak this git revision's stream_kpis, not the "
                                                  "working tree (e.g. HEAD)")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()] or list(SCENARIOS)
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
    chosen = [s for s in SCENARIOS if s in chosen]  # the broker restart always last

    SOAK_ROOT.mkdir(parents=True, exist_ok=True)
    pythonpath = export_revision(args.rev, SOAK_ROOT) if args.rev else None
    if pythonpath:
        sys.path.insert(0, pythonpath)  # partition_of() uses that revision's event_key
        print(f"soak: stream_kpis of {args.rev} from {pythonpath}", flush=True)
    shared = SharedBroker()
    private: PrivateBroker | None = None
    results: list[RoundResult] = []
    try:
        if any(s not in PRIVATE_BROKER_SCENARIOS for s in chosen):
            shared.ensure()
        for scenario in chosen:
            if scenario in PRIVATE_BROKER_SCENARIOS and private is None:
                private = PrivateBroker(Path(tempfile.mkdtemp(prefix="broker-", dir=SOAK_ROOT)))
                print(f"soak: starting a private broker on {private.bootstrap} for {scenario}",
                      flush=True)
                private.up()
            for index in range(1, args.rounds + 1):
                result = run_round(scenario, index, bootstrap=shared.bootstrap, events=args.events,
                                   broker=private if scenario in PRIVATE_BROKER_SCENARIOS else None,
                                   keep=args.keep, timeout=args.timeout, seed=args.seed,
                                   pythonpath=pythonpath)
                results.append(result)
                print(result.describe().splitlines()[0]
                      + (f" -> {result.directory}" if result.directory and not result.exact else ""),
                      flush=True)
    except KeyboardInterrupt:
        print("\nsoak: interrupted", flush=True)
    finally:
        if private is not None:
            private.close()
        shared.release()
        if pythonpath:
            shutil.rmtree(pythonpath, ignore_errors=True)
    print_table(results, chosen)
    return 0 if results and all(r.exact for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
