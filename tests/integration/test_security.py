"""Safe by default: SASL/SCRAM to Kafka, AUTH to Redis, nothing personal in metrics or INFO logs,
the web port on loopback only.

The SASL tests run a private broker (``deploy/local/kafka.sh`` with ``KAFKA_SASL_PORT`` on free
ports and its own state directory) so that the shared plain broker stays as it is.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import time
from pathlib import Path

import orjson
import pytest
import redis

from stream_kpis.generate import GeneratorConfig, write_jsonl
from stream_kpis.live.readmodel import read_kpi
from stream_kpis.replay import replay, source_for_path
from tests.integration.live import STREAM_KPIS, LiveStack, LocalBroker, RedisServer, wait_until

REDIS_PASSWORD = "redis-it-7f3a9c"


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory: pytest.TempPathFactory):
    broker = LocalBroker(tmp_path_factory.mktemp("sasl-broker"), sasl=True).up()
    yield broker
    broker.down()


@pytest.fixture(scope="module")
def stream_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("security") / "events.jsonl"
    write_jsonl(GeneratorConfig(members=300, days=100, seed=5), path)
    return path


def sasl_env(broker: LocalBroker, password: str) -> dict[str, str]:
    return {"STREAM_KPIS_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "STREAM_KPIS_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "STREAM_KPIS_KAFKA_USERNAME": broker.SASL_USER,
            "STREAM_KPIS_KAFKA_PASSWORD": password}


def member_ids(path: Path) -> set[str]:
    ids = set()
    for line in path.read_bytes().splitlines():
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(event, dict) and isinstance(event.get("member_id"), str):
            ids.add(event["member_id"])
    return ids


def test_worker_over_sasl_scram_with_redis_auth(tmp_path, sasl_broker, stream_file):
    """A worker that speaks SCRAM-SHA-512 to Kafka and AUTH to Redis computes the same KPIs;
    its metrics and INFO logs name no member, its logs no secret, and it listens on loopback."""
    redis_server = RedisServer(tmp_path / "redis", None, "--requirepass", REDIS_PASSWORD).start()
    redis_url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis_server.port}/0"
    stack = LiveStack(tmp_path, f"127.0.0.1:{sasl_broker.sasl_port}", redis_url,
                      extra_env=sasl_env(sasl_broker, sasl_broker.SASL_PASSWORD))
    try:
        worker = stack.start_worker()
        stack.send(stack.file_messages(stream_file))
        expected = [r for r in replay([source_for_path(stream_file)], stack.settings).records
                    if r["kpi"] != "churn_reduction"]
        stack.wait_for_kpis(expected, timeout=90)

        members = next(r for r in expected if r["kpi"] == "members")
        client = redis.Redis.from_url(redis_url)
        wait_until(lambda: (read_kpi(client, stack.settings.redis_prefix, "members", None) or {})
                   .get("as_of") == members["as_of"], 30, "KPIs in the password-protected Redis")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=redis_server.port).ping()

        ids = member_ids(stream_file)
        assert len(ids) > 250
        text = worker.metrics()
        assert "loyalty_members" in text
        assert not [m for m in ids if m in text], "a member id in /metrics"
        log = worker.log_text()
        assert "partition 0 taken: state recovered" in log  # INFO lines are there
        assert not [m for m in ids if m in log], "a member id in the INFO log"
        for secret in (sasl_broker.SASL_PASSWORD, REDIS_PASSWORD):
            assert secret not in log and secret not in text

        # the web server, and every other listening socket, is on loopback only
        sockets = worker.listening()
        assert ("127.0.0.1", worker.port) in sockets, sockets
        assert all(ipaddress.ip_address(address).is_loopback for address, _ in sockets), sockets
        assert "STREAM_KPIS_WEB_HOST" not in os.environ
    finally:
        stack.stop()
        redis_server.stop()


def test_wrong_password_is_refused_with_a_clear_error(tmp_path, sasl_broker):
    stack = LiveStack(tmp_path, f"127.0.0.1:{sasl_broker.sasl_port}",
                      extra_env=sasl_env(sasl_broker, sasl_broker.SASL_PASSWORD))
    env = {**stack.env, **sasl_env(sasl_broker, "not-the-password")}
    started = time.monotonic()
    done = subprocess.run([STREAM_KPIS, "worker"], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    # the broker answers a failed SCRAM exchange with an error or with a bare disconnect
    assert re.search(r"(rejected the credentials of|SASL_PLAINTEXT login failed for) user "
                     r"'stream-kpis-it' \(SCRAM-SHA-512\): check STREAM_KPIS_KAFKA_USERNAME and "
                     r"STREAM_KPIS_KAFKA_PASSWORD", done.stderr), done.stderr[-2000:]
    assert "not-the-password" not in done.stderr
    assert time.monotonic() - started < 60
