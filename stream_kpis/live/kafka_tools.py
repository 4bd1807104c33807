"""Kafka plumbing for the CLI: create topics, produce files, tail output topics (kafka-python).

Kept out of the core: nothing here computes a KPI.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import orjson

from ..exceptions import ConfigError, StreamKpisError
from ..replay import Source, read_csv_rows
from ..settings import ENV, Settings

__all__ = ["bootstrap_servers", "client_config", "create_topics", "check_copartitioning",
           "produce_sources", "tail", "event_key"]


def bootstrap_servers(settings: Settings) -> str:
    """``kafka://host:port;host2:port`` (Faust style) to kafka-python's ``host:port,host2:port``."""
    return ",".join(part.split("://", 1)[-1] for part in settings.broker.replace(";", ",").split(","))


def connection_config(settings: Settings) -> dict[str, Any]:
    """Bootstrap servers, security protocol and SASL credentials, in the key names that
    kafka-python and aiokafka share; each client adds its own form of the TLS CA."""
    config: dict[str, Any] = {"bootstrap_servers": bootstrap_servers(settings),
                              "security_protocol": settings.kafka_security_protocol}
    if settings.kafka_sasl_mechanism:
        config.update(sasl_mechanism=settings.kafka_sasl_mechanism,
                      sasl_plain_username=settings.kafka_username,
                      sasl_plain_password=settings.kafka_password)
    return config


def client_config(settings: Settings) -> dict[str, Any]:
    """kafka-python security settings from ours."""
    config = connection_config(settings)
    if settings.kafka_ssl_cafile:
        config["ssl_cafile"] = settings.kafka_ssl_cafile
    return config


#: How long a command waits for the broker before saying it cannot reach it.
ADMIN_TIMEOUT_MS = 15_000


class _AuthFailures(logging.Handler):
    """Notices the authentication failures kafka-python logs (it raises only a timeout)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if "AuthenticationFailed" in record.getMessage():
            self.failed = True


def _admin(settings: Settings):
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    watcher = _AuthFailures()
    kafka_log = logging.getLogger("kafka")
    kafka_log.addHandler(watcher)
    try:
        return KafkaAdminClient(client_id="stream-kpis-admin", request_timeout_ms=ADMIN_TIMEOUT_MS,
                                bootstrap_timeout_ms=ADMIN_TIMEOUT_MS, **client_config(settings))
    except KafkaError:
        servers = bootstrap_servers(settings)
        login = (f"user {settings.kafka_username!r} ({settings.kafka_sasl_mechanism}): check "
                 f"{ENV['kafka_username']} and {ENV['kafka_password']}")
        if watcher.failed:
            raise StreamKpisError(f"the Kafka broker at {servers} rejected the credentials of "
                                  f"{login}") from None
        if settings.kafka_security_protocol != "PLAINTEXT" and _accepts_connections(servers):
            # a failed SCRAM exchange often ends in a bare disconnect, not an error reply
            raise StreamKpisError(
                f"the Kafka broker at {servers} accepts connections but the "
                f"{settings.kafka_security_protocol} login failed for {login}, "
                f"{ENV['kafka_sasl_mechanism']} and {ENV['kafka_security_protocol']} (and "
                f"{ENV['kafka_ssl_cafile']} for TLS)") from None
        raise StreamKpisError(f"no Kafka broker at {servers}: start one "
                              "(deploy/local/up kafka) or set STREAM_KPIS_BROKER") from None
    finally:
        kafka_log.removeHandler(watcher)


def _accepts_connections(servers: str) -> bool:
    """Whether any of ``host:port,host:port`` accepts a TCP connection."""
    for server in servers.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()
            return True
        except (OSError, ValueError):
            continue
    return False


def create_topics(settings: Settings, replication: int = 1) -> list[str]:
    """Create the input, DLQ, signal, KPI, partials and state topics (existing ones are kept).

    The state topic gets as many partitions as the input topics have (its partition p holds
    the state of input partition p); a state topic with another count is a ConfigError.
    """
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    topics = settings.topics
    partitioned = [*topics.inputs().values(), topics.dlq, topics.signals]
    wanted = [NewTopic(name, settings.partitions, replication) for name in partitioned]
    wanted += [NewTopic(name, 1, replication) for name in topics.kpi_topics().values()]
    # compacted; small segments so that compaction keeps the exporter's takeover read short
    compact = {"cleanup.policy": "compact", "segment.ms": "600000", "segment.bytes": "67108864",
               "min.cleanable.dirty.ratio": "0.1"}
    partials = f"{settings.app_id}-partials"
    wanted.append(NewTopic(partials, 1, replication,
                           topic_configs={**compact, **_MAX_RECORD_CONFIG}))
    admin = _admin(settings)
    created = []
    try:
        existing = set(admin.list_topics())
        for topic in wanted:
            if topic.name in existing:
                continue
            try:
                admin.create_topics([topic])
                created.append(topic.name)
            except TopicAlreadyExistsError:
                pass
        for topic in (partials, f"{settings.app_id}-state"):  # made by older versions:
            if topic in existing:                              # allow large records
                _set_topic_config(admin, topic, _MAX_RECORD_CONFIG)
        counts = check_copartitioning(settings, admin)
        inputs = next(iter(counts.values()), settings.partitions)
        state = f"{settings.app_id}-state"
        if state not in existing:
            try:
                admin.create_topics([NewTopic(state, inputs, replication, topic_configs={
                    **compact, **_MAX_RECORD_CONFIG})])
                created.append(state)
            except TopicAlreadyExistsError:
                pass
        described = {d.get("name") or d.get("topic"): len(d["partitions"])
                     for d in admin.describe_topics([state]) if d.get("error_code", 0) == 0}
        if described.get(state, inputs) != inputs:
            raise ConfigError(
                f"the state topic {state} has {described[state]} partitions but the input topics "
                f"have {inputs}; the state of input partition p lives in partition p. Delete "
                f"{state} (the state is rebuilt from the input topics) or use another app id")
    finally:
        admin.close()
    return created


#: The largest record of the partials and state topics: a partial with segments can be
#: megabytes, and so can a rare state record (a member with a very long history).
MAX_RECORD_BYTES = 64 << 20
_MAX_RECORD_CONFIG = {"max.message.bytes": str(MAX_RECORD_BYTES)}


def _set_topic_config(admin: Any, topic: str, configs: dict[str, str]) -> None:
    from kafka.admin import ConfigResource, ConfigResourceType

    try:
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs=configs)])
    except Exception as exc:  # noqa: BLE001 (no ALTER permission: large partials then fail loudly)
        logging.getLogger(__name__).warning("could not set %s on topic %s: %s", configs, topic,
                                            exc)


def check_copartitioning(settings: Settings, admin: Any = None) -> dict[str, int]:
    """Partition counts of the input topics; ConfigError unless they are all equal."""
    own = admin is None
    admin = admin or _admin(settings)
    try:
        names = list(settings.topics.inputs().values())
        counts = {}
        for description in admin.describe_topics(names):
            if description.get("error_code", 0) == 0:
                name = description.get("name") or description.get("topic")
                counts[name] = len(description["partitions"])
    finally:
        if own:
            admin.close()
    if len(set(counts.values())) > 1:
        raise ConfigError(
            f"input topics are not co-partitioned: {counts}. All input topics need the same "
            "partition count (a member's events must meet in one partition); recreate or "
            "add partitions with kafka-topics.sh --alter so that the counts match")
    return counts


def event_key(obj: Any) -> bytes | None:
    """The key an event must carry: member_id, or event_id for guest events."""
    if not isinstance(obj, dict):
        return None
    key = obj.get("member_id") or obj.get("event_id")
    return key.encode() if isinstance(key, str) else None


def _file_messages(source: Source, settings: Settings) -> Iterator[tuple[str, bytes | None, bytes]]:
    topics = settings.topics.inputs()
    fallback = settings.topics.purchases  # unreadable lines still reach a worker, and its DLQ
    if source.format == "jsonl":
        with open(source.path, "rb") as handle:
            for line in handle:
                line = line.rstrip(b"\r\n")
                if not line.strip():
                    continue
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError:
                    yield fallback, None, line
                    continue
                kind = source.type or (obj.get("type") if isinstance(obj, dict) else None)
                yield topics.get(kind, fallback), event_key(obj), line
    else:
        with open(source.path, encoding=source.encoding, newline="") as handle:
            for row in read_csv_rows(source, handle):
                if row.error is not None:
                    yield topics.get(source.type, fallback), None, row.raw
                    continue
                kind = source.type or row.fields.get("type")
                yield topics.get(kind, fallback), event_key(row.fields), orjson.dumps(row.fields)


def produce_sources(sources: Iterable[Source], settings: Settings, rate: float = 0,
                    on_progress: Callable[[int], None] | None = None,
                    should_stop: Callable[[], bool] = lambda: False) -> int:
    """Send every line of the sources to its input topic, keyed by member_id; returns the count.

    ``rate`` > 0 paces the sending at that many events per second.
    """
    from kafka import KafkaProducer

    producer = KafkaProducer(linger_ms=20, batch_size=262_144, acks="all",
                             max_in_flight_requests_per_connection=1, **client_config(settings))
    sent = 0
    started = time.monotonic()
    try:
        for source in sources:
            for topic, key, value in _file_messages(source, settings):
                if should_stop():
                    return sent
                producer.send(topic, key=key, value=value)
                sent += 1
                if rate and sent % 100 == 0:
                    ahead = sent / rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
                if on_progress is not None and sent % 1000 == 0:
                    on_progress(sent)
        producer.flush()
    finally:
        producer.close()
    return sent


def tail(settings: Settings, topics: list[str], from_beginning: bool = False,
         timeout_s: float | None = None) -> Iterator[tuple[str, dict]]:
    """(topic, record) from output topics as they arrive."""
    from kafka import KafkaConsumer

    # read_committed: records of batches whose transaction was aborted are never shown
    consumer = KafkaConsumer(*topics, isolation_level="read_committed",
                             auto_offset_reset="earliest" if from_beginning else "latest",
                             enable_auto_commit=False, group_id=None,
                             consumer_timeout_ms=int(timeout_s * 1000) if timeout_s else float("inf"),
                             **client_config(settings))
    try:
        for message in consumer:
            try:
                yield message.topic, orjson.loads(message.value)
            except orjson.JSONDecodeError:
                continue
    finally:
        consumer.close()
