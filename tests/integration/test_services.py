"""The local services started by ``deploy/local`` really work: a message makes a round trip
through the Kafka broker, Redis stores and returns a value, Prometheus is ready and answers
a PromQL query with scraped data."""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Callable

import redis
from kafka import KafkaConsumer, KafkaProducer

CONSUME_TIMEOUT_S = 30
SCRAPE_TIMEOUT_S = 60


def test_kafka_produce_consume_roundtrip(
    kafka_bootstrap: str, create_topics: Callable[..., list[str]]
) -> None:
    (topic,) = create_topics("roundtrip", partitions=4)
    sent = [(f"member-{i % 5}".encode(), f"event-{i}".encode()) for i in range(40)]

    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=5)
    try:
        for key, value in sent:
            producer.send(topic, key=key, value=value)
        producer.flush(timeout=CONSUME_TIMEOUT_S)
    finally:
        producer.close()

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=f"{topic}-group",
        auto_offset_reset="earliest",
        consumer_timeout_ms=CONSUME_TIMEOUT_S * 1000,
    )
    received = []
    try:
        for record in consumer:
            received.append(record)
            if len(received) == len(sent):
                break
    finally:
        consumer.close()

    assert sorted((r.key, r.value) for r in received) == sorted(sent)
    partitions_by_key: dict[bytes, set[int]] = defaultdict(set)
    for record in received:
        partitions_by_key[record.key].add(record.partition)
    # A key always lands in one partition, and within it the send order is kept.
    assert all(len(parts) == 1 for parts in partitions_by_key.values())
    for key in partitions_by_key:
        expected = [value for k, value in sent if k == key]
        assert [r.value for r in received if r.key == key] == expected


def test_redis_set_get(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    key = f"stream-kpis-it:{uuid.uuid4().hex}"
    try:
        assert client.set(key, "42.5", ex=60)
        assert client.get(key) == b"42.5"
        assert 0 < client.ttl(key) <= 60
    finally:
        client.delete(key)
        client.close()
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.get(key) is None
    finally:
        client.close()


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read()


def test_prometheus_ready_and_up_query(prometheus_url: str) -> None:
    status, body = _get(f"{prometheus_url}/-/ready")
    assert status == 200
    assert b"Ready" in body

    query = urllib.parse.urlencode({"query": "up"})
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
    while True:
        status, body = _get(f"{prometheus_url}/api/v1/query?{query}")
        answer = json.loads(body)
        assert status == 200
        assert answer["status"] == "success"
        results = answer["data"]["result"]
        # The first scrape of each target happens within one scrape interval of startup.
        if results or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert results, f"no `up` series after {SCRAPE_TIMEOUT_S}s"
    for series in results:
        assert series["metric"]["__name__"] == "up"
        assert "job" in series["metric"] and "instance" in series["metric"]
        assert series["value"][1] in ("0", "1")
