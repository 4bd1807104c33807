"""The Redis read model against real redis-server processes.

Most tests use the shared ``redis_url`` server (tests/integration/conftest.py) with a unique
key prefix each. Outage, AUTH and TLS tests start their own redis-server so they can stop,
restart or configure it.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import redis

from stream_kpis.core.catalogue import SEGMENT_DIMENSIONS
from stream_kpis.live.readmodel import (
    ReadModel,
    at_risk_members,
    kpi_key,
    read_kpi,
    read_member,
)
from stream_kpis.replay import load_sources, replay
from stream_kpis.settings import load_settings
from tests.helpers import free_port

pytestmark = pytest.mark.integration

AS_OF = "2024-01-31T00:00:00Z"
GUIDE_EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "kpi-guide.toml"
# 2024-01-01T00:00:00Z is 19723 days (54 years, 13 of them leap) after the epoch.
JAN_1_2024 = 19723 * 86400


def kpi(name, value, window=None, labels=None, numerator=None, denominator=None):
    record = {"kpi": name, "window": window, "as_of": AS_OF, "value": value,
              "numerator": numerator, "denominator": denominator}
    if labels is not None:
        record["labels"] = labels
    return record


def member(status, last_touch, **fields):
    return {"status": status, "last_touch": last_touch, **fields}


@pytest.fixture
def prefix():
    return f"test-{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def client(redis_url):
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        yield client


class RedisServer:
    """A throwaway redis-server on 127.0.0.1:``port`` that a test can stop and restart."""

    def __init__(self, directory: Path, port: int, *options: str) -> None:
        self.directory = directory
        self.port = port
        self.options = options
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.directory / "redis.log", "ab") as log_file:  # the child keeps a dup
            self.process = subprocess.Popen(
                ["redis-server", "--bind", "127.0.0.1", "--dir", str(self.directory),
                 "--save", "", "--appendonly", "no", "--port", str(self.port), *self.options],
                stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited, see {self.directory / 'redis.log'}")
            try:
                socket.create_connection(("127.0.0.1", self.listen_port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not listen on {self.listen_port} within 10 s")

    @property
    def listen_port(self) -> int:
        if "--tls-port" in self.options:
            return int(self.options[self.options.index("--tls-port") + 1])
        return self.port

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None


@pytest.fixture
def own_redis(tmp_path):
    servers: list[RedisServer] = []

    def start(*options: str) -> RedisServer:
        server = RedisServer(tmp_path, free_port(), *options)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


# -- writing to a healthy Redis ------------------------------------------------------------

def test_kpi_hashes_are_written_with_as_of(redis_url, client, prefix):
    records = [
        kpi("members", 12),
        kpi("active_rate", 0.25, "30d", numerator=3, denominator=12),
        kpi("active_rate", None, "7d", numerator=0, denominator=0),
        kpi("new_members", 4, "7d", {"channel": "web"}),
        kpi("feedback_mentions", 2, "30d", {"term": "long wait", "lexicon": "friction"}),
    ]

    async def scenario():
        model = ReadModel.from_url(redis_url, prefix=prefix)
        model.publish_kpis(records)
        assert model.pending_kpis == 5
        assert await model.flush() is True
        assert model.pending_kpis == 0
        await model.aclose()

    asyncio.run(scenario())
    assert client.hgetall(f"{prefix}kpi:members:-") == {"value": "12", "as_of": AS_OF}
    assert client.hgetall(f"{prefix}kpi:active_rate:30d") == {
        "value": "0.25", "numerator": "3", "denominator": "12", "as_of": AS_OF}
    # A null value is an absent field, never "None" or "nan".
    assert client.hgetall(f"{prefix}kpi:active_rate:7d") == {
        "numerator": "0", "denominator": "0", "as_of": AS_OF}
    assert client.hgetall(f"{prefix}kpi:new_members:7d:channel=web") == {
        "value": "4", "as_of": AS_OF}
    assert client.hgetall(f"{prefix}kpi:feedback_mentions:30d:lexicon=friction:term=long wait"
                          ) == {"value": "2", "as_of": AS_OF}
    for record in records:  # the reader gives back the published record
        assert read_kpi(client, prefix, record["kpi"], record["window"],
                        record.get("labels")) == record
    assert read_kpi(client, prefix, "members", "30d") is None


def test_segment_and_cohort_records_each_get_their_own_key(redis_url, client, prefix):
    """SPEC 4.2 and 4.3: ``members`` for the whole program, per tier, per home store ... and
    every cohort_retention cell are separate series; none overwrites another in Redis."""
    settings = load_settings(GUIDE_EXAMPLE, env={}).with_overrides(segments=SEGMENT_DIMENSIONS)
    records = replay(load_sources(GUIDE_EXAMPLE), settings).records
    keys = {kpi_key(prefix, r["kpi"], r["window"], r.get("labels")) for r in records}
    assert len(keys) == len(records)

    async def scenario():
        model = ReadModel.from_url(redis_url, prefix=prefix)
        model.publish_kpis(records)
        assert model.pending_kpis == len(records)  # nothing coalesced
        assert await model.flush() is True
        await model.aclose()

    asyncio.run(scenario())
    assert len(client.keys(f"{prefix}kpi:*")) == len(records)
    for record in records:
        got = read_kpi(client, prefix, record["kpi"], record["window"], record.get("labels"))
        assert got == record
    # the example's numbers (docs/kpi-guide.md): 9 members, 7 of them silver; a 2024-03 cohort of
    # 4 of whom 3 came back in April
    assert client.hget(f"{prefix}kpi:members:-", "value") == "9"
    assert client.hget(f"{prefix}kpi:members:-:tier=silver", "value") == "7"
    assert client.hgetall(f"{prefix}kpi:cohort_retention:-:age=1:cohort=2024-03") == {
        "value": "0.75", "numerator": "3", "denominator": "4", "as_of": "2024-05-01T00:00:00Z"}
    assert client.hget(f"{prefix}kpi:aov_member:30d:store_id=lisboa", "value") == "95.0"


def test_latest_kpi_wins_and_stale_fields_vanish(redis_url, client, prefix):
    async def scenario():
        model = ReadModel.from_url(redis_url, prefix=prefix)
        model.publish_kpis([kpi("active_rate", 0.1, "30d", numerator=1, denominator=10)])
        model.publish_kpis([kpi("active_rate", 0.2, "30d", numerator=2, denominator=10)])
        assert model.pending_kpis == 1  # coalesced by key
        await model.flush()
        model.publish_kpis([kpi("active_rate", None, "30d", numerator=0, denominator=0)])
        await model.flush()
        await model.aclose()

    asyncio.run(scenario())
    assert client.hgetall(f"{prefix}kpi:active_rate:30d") == {
        "numerator": "0", "denominator": "0", "as_of": AS_OF}


def test_member_hash_and_at_risk_set(redis_url, client, prefix):
    statuses = {
        "m-1": member("active", "2024-01-30T08:00:00Z", points_balance=120, tier="gold",
                      next_expiry_points=20, next_expiry_at="2024-03-01T00:00:00Z"),
        "m-2": member("at_risk", "2024-01-20T12:00:00Z", points_balance=0, tier="silver",
                      p_alive=0.25, expected_purchases=0.5, expected_value=12.75),
        # int last_touch is epoch ms: 2024-01-21T12:00:00.500Z
        "m-3": member("at_risk", (JAN_1_2024 + 20 * 86400 + 43200) * 1000 + 500),
    }

    async def scenario(updates):
        model = ReadModel.from_url(redis_url, prefix=prefix)
        model.update_members(updates)
        assert await model.flush() is True
        await model.aclose()

    asyncio.run(scenario(statuses))
    assert client.hgetall(f"{prefix}member:m-1") == {
        "last_touch": "2024-01-30T08:00:00Z", "status": "active", "points_balance": "120",
        "tier": "gold", "next_expiry_points": "20", "next_expiry_at": "2024-03-01T00:00:00Z"}
    assert read_member(client, prefix, "m-2") == {
        "last_touch": "2024-01-20T12:00:00Z", "status": "at_risk", "points_balance": 0,
        "tier": "silver", "next_expiry_points": None, "next_expiry_at": None, "p_alive": 0.25,
        "expected_purchases": 0.5, "expected_value": 12.75}
    assert read_member(client, prefix, "m-3")["last_touch"] == "2024-01-21T12:00:00.500Z"
    assert read_member(client, prefix, "nobody") is None
    m2_seconds = JAN_1_2024 + 19 * 86400 + 43200
    assert client.zscore(f"{prefix}at_risk", "m-1") is None
    assert client.zscore(f"{prefix}at_risk", "m-2") == m2_seconds
    assert at_risk_members(client, prefix, 10) == [("m-2", m2_seconds),
                                                    ("m-3", m2_seconds + 86400.5)]
    assert at_risk_members(client, prefix, 1) == [("m-2", m2_seconds)]

    asyncio.run(scenario({"m-2": member("active", "2024-01-31T09:00:00Z")}))
    assert client.zscore(f"{prefix}at_risk", "m-2") is None
    assert client.hgetall(f"{prefix}member:m-2") == {
        "last_touch": "2024-01-31T09:00:00Z", "status": "active"}
    assert at_risk_members(client, prefix, 10) == [("m-3", m2_seconds + 86400.5)]


def test_catch_up_is_written_in_several_transactions(redis_url, client, prefix):
    statuses = {f"m-{i}": member("at_risk", (JAN_1_2024 + i) * 1000) for i in range(7)}

    async def scenario():
        model = ReadModel.from_url(redis_url, prefix=prefix, members_per_pipeline=3)
        model.update_members(statuses)
        assert await model.flush() is True
        assert model.pending_members == 0
        await model.aclose()

    asyncio.run(scenario())
    assert at_risk_members(client, prefix, 100) == [
        (f"m-{i}", float(JAN_1_2024 + i)) for i in range(7)]


@pytest.mark.parametrize("bad, message", [
    ({"status": "sleeping", "last_touch": AS_OF}, "status"),
    ({"status": "active", "last_touch": "2024-01-31T00:00:00"}, "UTC offset"),
    ({"status": "active", "last_touch": 1.5}, "epoch ms"),
    ({"status": "active", "last_touch": AS_OF, "points_balance": "12"}, "points_balance"),
])
def test_invalid_member_status_is_rejected_at_enqueue(prefix, bad, message):
    model = ReadModel.from_url("redis://127.0.0.1:1/0", prefix=prefix)
    with pytest.raises(ValueError, match=message):
        model.update_members({"m-1": bad})


# -- outages ---------------------------------------------------------------------------------

def test_outage_keeps_pending_state_and_catches_up(own_redis, prefix, caplog):
    caplog.set_level(logging.INFO, logger="stream_kpis.live.readmodel")
    server = own_redis()
    url = f"redis://127.0.0.1:{server.port}/0"
    error_calls = []

    async def scenario():
        model = ReadModel.from_url(url, prefix=prefix, on_error=lambda: error_calls.append(1))
        model.publish_kpis([kpi("members", 1)])
        assert await model.flush() is True

        server.stop()
        model.publish_kpis([kpi("members", 2),
                            kpi("active_rate", 0.5, "30d", numerator=1, denominator=2)])
        model.update_members({"m-secret-1": member("at_risk", "2024-01-29T00:00:00Z"),
                              "m-secret-2": member("active", "2024-01-30T00:00:00Z")})
        started = time.monotonic()
        assert await model.flush() is False
        assert time.monotonic() - started < 2.0
        assert (model.errors, len(error_calls)) == (1, 1)
        assert (model.pending_kpis, model.pending_members) == (2, 2)

        # Still down: newer updates coalesce over the kept ones.
        model.update_members({"m-secret-1": member("churned", "2024-01-29T00:00:00Z")})
        model.publish_kpis([kpi("members", 3)])
        assert await model.flush() is False
        assert (model.errors, model.pending_kpis, model.pending_members) == (2, 2, 2)

        server.start()  # same port, empty data set
        assert await model.flush() is True
        assert (model.errors, model.pending_kpis, model.pending_members) == (2, 0, 0)
        await model.aclose()

    asyncio.run(scenario())
    # Two failed flushes in a row: one WARNING, then one INFO on recovery.
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]
    assert "m-secret" not in caplog.text
    with redis.Redis(port=server.port, decode_responses=True) as client:
        assert read_kpi(client, prefix, "members", None)["value"] == 3
        assert read_kpi(client, prefix, "active_rate", "30d")["value"] == 0.5
        assert read_member(client, prefix, "m-secret-1")["status"] == "churned"
        assert read_member(client, prefix, "m-secret-2")["status"] == "active"
        assert at_risk_members(client, prefix, 10) == []


def test_unresponsive_redis_does_not_stall_the_flush(prefix):
    # A socket that accepts TCP connections (kernel backlog) but never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"

        async def scenario():
            model = ReadModel.from_url(url, prefix=prefix, socket_timeout=0.3)
            model.publish_kpis([kpi("members", 1)])
            started = time.monotonic()
            assert await model.flush() is False
            assert time.monotonic() - started < 1.5
            assert (model.errors, model.pending_kpis) == (1, 1)

            # A caller cancelling a flush loses nothing either.
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(model.flush(), 0.05)
            assert model.pending_kpis == 1
            await model.aclose()

        asyncio.run(scenario())


def test_backlog_bound_drops_new_members_and_counts_them(prefix, caplog):
    dropped_calls = []

    async def scenario():
        model = ReadModel.from_url(f"redis://127.0.0.1:{free_port()}/0", prefix=prefix,
                                   max_pending_members=3, on_drop=dropped_calls.append)
        with caplog.at_level(logging.WARNING, logger="stream_kpis.live.readmodel"):
            model.update_members({f"m-{i}": member("active", AS_OF) for i in range(5)})
            assert (model.pending_members, model.dropped_member_updates) == (3, 2)
            # Members already pending keep coalescing past the bound.
            model.update_members({"m-0": member("at_risk", AS_OF)})
            assert (model.pending_members, model.dropped_member_updates) == (3, 2)
            assert await model.flush() is False  # nothing listens on that port
            model.update_members({"m-9": member("active", AS_OF)})
            assert (model.pending_members, model.dropped_member_updates) == (3, 3)
        await model.aclose()

    asyncio.run(scenario())
    assert dropped_calls == [2, 1]
    assert sum("max_pending_members" in r.getMessage() for r in caplog.records) == 1


# -- AUTH and TLS through the URL --------------------------------------------------------------

def test_auth_password_and_username_in_url(own_redis, prefix):
    server = own_redis("--requirepass", "s3cret")
    port = server.port

    async def flush_to(url):
        model = ReadModel.from_url(url, prefix=prefix)
        model.publish_kpis([kpi("members", 5)])
        ok = await model.flush()
        await model.aclose()
        return ok, model.errors

    assert asyncio.run(flush_to(f"redis://127.0.0.1:{port}/0")) == (False, 1)
    assert asyncio.run(flush_to(f"redis://:wrong@127.0.0.1:{port}/0")) == (False, 1)
    assert asyncio.run(flush_to(f"redis://:s3cret@127.0.0.1:{port}/0")) == (True, 0)
    assert asyncio.run(flush_to(f"redis://default:s3cret@127.0.0.1:{port}/0")) == (True, 0)
    with redis.Redis(port=port, password="s3cret", decode_responses=True) as client:
        assert read_kpi(client, prefix, "members", None)["value"] == 5


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_via_rediss_url(own_redis, tmp_path, prefix):
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True)
    tls_port = free_port()
    server = own_redis("--port", "0", "--tls-port", str(tls_port), "--tls-cert-file", str(cert),
                       "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
                       "--tls-auth-clients", "no")
    url = f"rediss://127.0.0.1:{server.listen_port}/0?ssl_ca_certs={cert}"

    async def scenario():
        model = ReadModel.from_url(url, prefix=prefix)
        model.publish_kpis([kpi("members", 7)])
        assert await model.flush() is True
        await model.aclose()

        plain = ReadModel.from_url(f"redis://127.0.0.1:{tls_port}/0", prefix=prefix)
        plain.publish_kpis([kpi("members", 8)])
        assert await plain.flush() is False  # plaintext against a TLS port fails, counted
        assert plain.errors == 1
        await plain.aclose()

    asyncio.run(scenario())
    with redis.Redis.from_url(url, decode_responses=True) as client:
        assert read_kpi(client, prefix, "members", None)["value"] == 7
