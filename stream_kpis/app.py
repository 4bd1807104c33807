"""The live worker: a Faust app that runs the ingest and exporter loops beside its web server.

Data flow (docs/design/state.md has the why):

* :class:`~stream_kpis.live.kafka_log.IngestConsumer` reads the four co-partitioned input topics
  in the consumer group ``<app_id>-ingest``. Each fetch goes to
  :class:`~stream_kpis.live.ingest.Ingest`, which applies it to one
  :class:`~stream_kpis.core.Processor` per owned partition and commits, per partition and in one
  Kafka transaction, the changed state records (``<app_id>-state``), dead letters, member
  signals, the partition's partial and the input offsets.
* :class:`~stream_kpis.live.exporter.ExporterConsumer`: the one worker holding the single
  partition of ``<app_id>-partials`` (group ``<app_id>-exporter``) merges the partials and
  publishes the global KPIs: KPI topics, ``loyalty_*`` gauges, Redis.
* Faust runs both loops as tasks, serves ``/metrics`` and, every ``emit_interval``, flushes the
  Redis read model and samples lag, stalls and sizes.

``faust -A stream_kpis.app worker -l info`` works as Faust users expect; ``stream-kpis worker``
does the same with our settings.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from typing import Any

import faust
import orjson
from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from .live.exporter import ExporterConsumer
from .live.ingest import Ingest
from .live.kafka_log import IngestConsumer, KafkaStateLog
from .live.kafka_tools import create_topics
from .live.metrics import CONTENT_TYPE_LATEST, KpiCollector, WorkerMetrics, render_latest
from .live.partition import Commit, statuses_from_records
from .live.stall import StallDetector
from .live.store import open_store
from .runtime import tune_gc
from .settings import Settings, load_settings

__all__ = ["Pipeline", "create_app", "app", "faust_app_kwargs"]

log = logging.getLogger(__name__)

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
        "producer_linger": 0.02,
        "web_in_thread": False,
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
    """The worker: a Faust app wired to the ingest and exporter loops."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.app = faust.App(settings.app_id, **faust_app_kwargs(settings))
        self.registry = registry or CollectorRegistry()
        self.metrics = WorkerMetrics(self.registry)
        self.kpi_gauges = KpiCollector.for_settings(settings, self.registry, worker_metrics=self.metrics)
        self.readmodel = None
        if settings.redis_url:
            from .live.readmodel import ReadModel

            self.readmodel = ReadModel.from_url(settings.redis_url, prefix=settings.redis_prefix,
                                                on_error=self.metrics.count_redis_error)
        self.state_log = KafkaStateLog(settings)
        self.ingest = Ingest(
            settings, self.state_log,
            lambda partition: open_store(settings.store, settings.data_dir, settings.app_id,
                                         partition),
            metrics=self.metrics, on_committed=self._committed)
        self.consumer = IngestConsumer(settings, self.ingest, self.state_log)
        self.exporter = ExporterConsumer(settings, self._publish, self.kpi_gauges.set_exporting)
        self.stalls = StallDetector(settings.emit_interval_s)
        self.tasks: list[asyncio.Task] = []
        self._define()

    def _define(self) -> None:
        app = self.app

        @app.task
        async def run_loops() -> None:
            try:  # idempotent: a worker started before `stream-kpis topics create` works too
                await asyncio.to_thread(create_topics, self.settings, self.settings.replication)
            except Exception as exc:  # noqa: BLE001 (ConfigError or the broker unreachable)
                log.critical("cannot set up the topics: %s", exc)
                await app.crash(exc)
                return
            self.tasks = [asyncio.ensure_future(self.consumer.run()),
                          asyncio.ensure_future(self.exporter.run())]
            if self.settings.clv and self.readmodel is not None:
                self.tasks.append(asyncio.ensure_future(self._follow_clv_params()))
            done, _ = await asyncio.wait(self.tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    log.critical("a worker loop failed; stopping", exc_info=task.exception())
                    await app.crash(task.exception())

        @app.timer(self.settings.emit_interval_s)
        async def tick() -> None:
            await self.tick()

        @app.page("/metrics")
        async def metrics_page(web: Any, request: Any) -> Any:
            return web.bytes(render_latest(self.registry),
                             content_type=CONTENT_TYPE_LATEST.split(";")[0].strip())

        app.on_before_shutdown.connect(self._on_shutdown)
        self.agents = (run_loops, tick, metrics_page)

    async def _follow_clv_params(self) -> None:
        """Keep the latest CLV fit's parameters (from the exporter's ``clv_param`` records) for
        the per-member predictions in the read model."""
        from aiokafka import AIOKafkaConsumer

        from .core.predictive import params_from_records
        from .live.kafka_log import aiokafka_config

        topic = TopicPartition(self.settings.topics.kpi_clv, 0)
        consumer = AIOKafkaConsumer(**aiokafka_config(self.settings), group_id=None,
                                    enable_auto_commit=False)
        await consumer.start()
        try:
            consumer.assign([topic])
            end = (await consumer.end_offsets([topic]))[topic]
            consumer.seek(topic, max(0, end - 500))  # the last emissions' records
            latest: dict[tuple, dict] = {}
            while not self.consumer.stopping.is_set():
                fetched = await consumer.getmany(timeout_ms=1000)
                for record in fetched.get(topic, ()):
                    value = orjson.loads(record.value)
                    labels = value.get("labels", {})
                    latest[(value["kpi"], labels.get("model"), labels.get("param"))] = value
                bgnbd, gamma_gamma = params_from_records(latest.values())
                if bgnbd is not None:
                    self.ingest.clv_params = (bgnbd, gamma_gamma)
        finally:
            await consumer.stop()

    def _committed(self, commit: Commit) -> None:
        """A batch is durable: count it, and hand its member statuses to the read model."""
        metrics = self.metrics
        for (topic, outcome), n in commit.outcomes.items():
            if outcome == "applied":
                metrics.count_applied(topic, n)
            elif outcome == "duplicate":
                metrics.count_duplicates(topic, n)
            else:
                metrics.count_dead_letters(topic, outcome.removeprefix("dead_letter:"), n)
        for signal, n in commit.signal_counts.items():
            metrics.count_signal(signal, n)
        if commit.partial is not None:
            metrics.set_partial_bytes(commit.partition, len(commit.partial))
        if self.readmodel is not None and commit.as_of is not None:
            # the statuses are made at the read model's next flush, from the committed state
            # records: once per member and flush, not once per member and batch
            members = commit.members
            if members:
                self.readmodel.update_member_snapshots(
                    members, partial(statuses_from_records, self.settings, commit.as_of,
                                     commit.clv_params))

    def _publish(self, records: list[dict[str, Any]]) -> None:
        self.kpi_gauges.update(records)
        if self.readmodel is not None:
            self.readmodel.publish_kpis(records)
        self.metrics.record_kpi_emission(seconds=self.exporter.last_evaluation_s)

    async def tick(self) -> None:
        """Every emit interval: the read model, lags, stalls, sizes."""
        if self.readmodel is not None:
            await self.readmodel.flush()
        max_ts = self.ingest.max_ts()
        if max_ts is not None:
            self.metrics.set_watermark_lag(max(0.0, time.time() - max_ts / 1000))
        self.metrics.set_table_rows("members", self.ingest.members())
        await self._sample_lag()

    async def _sample_lag(self) -> None:
        consumer = self.consumer.consumer
        if consumer is None:
            return
        assigned = list(consumer.assignment())
        if not assigned:
            self.metrics.stalled_partitions.set(0)
            return
        try:
            ends = await consumer.end_offsets(assigned)
        except Exception:  # noqa: BLE001 (broker away: no sample this time)
            return
        samples: dict[TopicPartition, tuple[int, int]] = {}
        lags: dict[str, int] = {}
        for tp in assigned:
            task = self.ingest.tasks.get(tp.partition)
            position = task.position(tp.topic) if task is not None else \
                self.stalls.progress.get(tp, (0, 0.0))[0]
            samples[tp] = (position, ends[tp])
            lags[tp.topic] = lags.get(tp.topic, 0) + max(0, ends[tp] - position)
        for topic, lag in lags.items():
            self.metrics.set_consumer_lag(topic, lag)
        stalled, fresh = self.stalls.observe(time.monotonic(), samples)
        self.metrics.stalled_partitions.set(len(stalled))
        for tp, lag, idle in fresh:
            log.warning("input partition %s[%d] is stalled: %d records behind and no progress "
                        "for %.0f s (this worker is assigned it; owns it: %s)", tp.topic,
                        tp.partition, lag, idle, self.ingest.owns(tp.partition))

    async def _on_shutdown(self, sender: Any, **_: Any) -> None:
        """SIGTERM: finish the batch being committed, leave both groups, flush the read model."""
        self.consumer.stop()
        self.exporter.stop()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=15)
        if self.readmodel is not None:
            await self.readmodel.flush()


def create_app(settings: Settings | None = None) -> faust.App:
    """A Faust app for these settings (default: config file and environment)."""
    return Pipeline(settings or load_settings()).app


# ``faust -A stream_kpis.app worker``: the module-level app, configured from the environment.
tune_gc()
pipeline = Pipeline(load_settings())
app = pipeline.app
