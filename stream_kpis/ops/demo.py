"""The live demo behind ``make demo`` / ``stream-kpis demo``.

Starts the local Kafka broker and Redis (deploy/local), creates this run's topics, generates a
loyalty event stream that ends now, starts a worker, produces the stream at a steady rate and
shows the KPIs updating as the worker publishes them. Ctrl-C (or ``--duration``) stops everything
the demo started.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from ..exceptions import StreamKpisError
from ..generate import GeneratorConfig, write_jsonl
from ..live.kafka_tools import bootstrap_servers, client_config, create_topics, produce_sources
from ..replay import source_for_path
from ..settings import load_settings

__all__ = ["run_demo"]

REPO = Path(__file__).resolve().parents[2]
DEPLOY_LOCAL = REPO / "deploy" / "local"

#: (kpi, window) rows of the live table.
SHOWN = [
    ("members", None), ("active_rate", "30d"), ("new_members", "30d"), ("member_growth_rate", "30d"),
    ("redemption_rate", "30d"), ("redemption_participation", "30d"), ("points_liability", None),
    ("churn_rate", "90d"), ("retention_rate", "90d"), ("one_and_done_rate", None),
    ("repeat_purchase_rate", "30d"), ("aov_member", "30d"), ("aov_guest", "30d"),
    ("member_spend_lift", "30d"), ("member_revenue_share", "30d"), ("margin_lift", "30d"),
    ("nps", "30d"), ("csat", "30d"), ("feedback_mentions", "30d"),
]


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _service(name: str, action: str) -> None:
    done = subprocess.run([str(DEPLOY_LOCAL / f"{name}.sh"), action], capture_output=True, text=True)
    if done.returncode:
        raise StreamKpisError(f"deploy/local/{name}.sh {action} failed:\n{done.stdout}{done.stderr}")


def _table(latest: dict[tuple, dict], produced: int, total: int, metrics_url: str) -> Any:
    from rich.table import Table

    from ..cli import _format_value

    as_of = max((r["as_of"] for r in latest.values()), default="-")
    table = Table(title=f"stream-kpis live demo   as of {as_of}   produced {produced:,}/{total:,}",
                  caption=f"metrics: {metrics_url}   Ctrl-C stops the demo")
    for column in ("kpi", "window", "labels", "value"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for kpi, window in SHOWN:
        rows = [r for (name, win, _), r in latest.items() if name == kpi and win == window]
        if kpi == "feedback_mentions":  # the most mentioned terms
            rows = sorted((r for r in rows if r["value"]), key=lambda r: -r["value"])
        else:
            rows = sorted(rows, key=lambda r: sorted(r.get("labels", {}).items()))
        for record in rows[:6]:
            labels = ",".join(f"{k}={v}" for k, v in record.get("labels", {}).items())
            table.add_row(kpi, window or "", labels, _format_value(record["value"]))
    return table


def run_demo(members: int = 3000, days: int = 120, rate: float = 3000,
             keep_services: bool = False, duration: float | None = None) -> dict[tuple, dict]:
    """Run the demo; returns the latest KPI records seen (used by the demo's test)."""
    from kafka import KafkaConsumer
    from rich.console import Console
    from rich.live import Live

    console = Console()
    run = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:4]
    workdir = REPO / ".local" / "demo" / run
    workdir.mkdir(parents=True, exist_ok=True)
    started_services = []
    for name, port in (("kafka", int(os.environ.get("KAFKA_PORT", 9092))),
                       ("redis", int(os.environ.get("REDIS_PORT", 6379)))):
        if not _port_open(port):
            console.print(f"starting local {name} (deploy/local/{name}.sh up) ...")
            _service(name, "up")
            started_services.append(name)
    web_port = int(os.environ.get("STREAM_KPIS_WEB_PORT", 6066))
    env = {**os.environ, "STREAM_KPIS_APP_ID": f"demo-{run}", "STREAM_KPIS_TOPIC_PREFIX": f"demo-{run}.",
           "STREAM_KPIS_CLOCK": "event", "STREAM_KPIS_EMIT_INTERVAL": "2s",
           "STREAM_KPIS_DATA_DIR": str(workdir / "worker"), "STREAM_KPIS_WEB_PORT": str(web_port),
           "STREAM_KPIS_REDIS_PREFIX": f"demo-{run}:"}
    settings = load_settings(None, env=env)
    create_topics(settings)
    events = workdir / "events.jsonl"
    now_hour = int(time.time() * 1000) // 3_600_000 * 3_600_000
    summary = write_jsonl(GeneratorConfig(members=members, days=days,
                                          start_ms=now_hour - days * 86_400_000), events)
    console.print(f"generated {summary.lines:,} events for {members:,} members over {days} days "
                  f"-> {events}")
    worker_log = open(workdir / "worker.log", "wb")  # noqa: SIM115 (closed below)
    worker = subprocess.Popen([sys.executable, "-m", "stream_kpis", "worker", "-l", "info"], env=env,
                              stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True)
    stop = threading.Event()
    produced = [0]

    def produce() -> None:
        produced[0] = produce_sources([source_for_path(events)], settings, rate,
                                      on_progress=lambda n: produced.__setitem__(0, n),
                                      should_stop=stop.is_set)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    consumer = KafkaConsumer(*settings.topics.kpi_topics().values(), auto_offset_reset="earliest",
                             group_id=None, enable_auto_commit=False, consumer_timeout_ms=500,
                             **client_config(settings))
    latest: dict[tuple, dict] = {}
    metrics_url = f"http://127.0.0.1:{web_port}/metrics"
    console.print(f"worker log: {workdir / 'worker.log'}   broker: {bootstrap_servers(settings)}")
    started = time.monotonic()
    try:
        with Live(_table(latest, 0, summary.lines, metrics_url), console=console,
                  refresh_per_second=2) as live:
            while duration is None or time.monotonic() - started < duration:
                for message in consumer:
                    record = orjson.loads(message.value)
                    latest[(record["kpi"], record["window"],
                            tuple(sorted(record.get("labels", {}).items())))] = record
                live.update(_table(latest, produced[0], summary.lines, metrics_url))
                if worker.poll() is not None:
                    raise StreamKpisError(f"the worker exited; see {workdir / 'worker.log'}")
    except KeyboardInterrupt:
        console.print("stopping ...")
    finally:
        stop.set()
        consumer.close()
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
        worker_log.close()
        if not keep_services:
            for name in reversed(started_services):
                _service(name, "down")
    return latest
