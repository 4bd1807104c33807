"""Fixtures for integration tests against real local services.

Kafka, Redis and Prometheus are the real programs, started by the project's own scripts in
``deploy/local/`` when they are not already reachable; the ports come from the same
environment variables the scripts read (``KAFKA_PORT``, ``REDIS_PORT``, ``PROMETHEUS_PORT``,
``REDIS_PASSWORD``). A fixture never skips: when a service cannot be started the test fails
with the script's own output, because a green run that tested nothing hides a broken setup.

Every test collected under ``tests/integration`` is marked ``integration``.

Lifetime: a service that was already running (started by a developer, by ``.ci/run`` or by
another test session) is left alone. A service that this session started is stopped at the
end of the session, so a plain ``pytest`` leaves the machine as it found it, except under
pytest-xdist, where another worker may still be using it (the scripts serialise concurrent
``up`` calls with a lock, so workers start each service once), and except when
``STREAM_KPIS_KEEP_SERVICES=1`` asks to keep them for the next run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import urllib.request
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# kafka-python 3.0 loads its protocol schemas with the deprecated importlib.resources.read_text
# at import time (~200 DeprecationWarnings); they say nothing about this project.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import KafkaError

from tests.helpers import wait_until

__all__ = ["unique_topic_prefix"]

INTEGRATION_DIR = Path(__file__).resolve().parent
REPO_ROOT = INTEGRATION_DIR.parents[1]
DEPLOY_LOCAL = REPO_ROOT / "deploy" / "local"

# Kafka's first start on a fresh machine also fetches its jars with Maven.
SCRIPT_TIMEOUT_S = 600
READY_TIMEOUT_S = 60


def _port(env_var: str, default: int) -> int:
    return int(os.environ.get(env_var, default))


def unique_topic_prefix(label: str = "it") -> str:
    """A topic-name prefix no other test, run or worker uses: ``it-<label>-<random>-``.

    Topics outlive a test run on a shared broker, so names must never repeat.
    """
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in label)[:40]
    return f"it-{safe}-{uuid.uuid4().hex[:10]}-"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test below this directory as ``integration``."""
    for item in items:
        if INTEGRATION_DIR in item.path.parents:
            item.add_marker(pytest.mark.integration)


def _tcp_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _run_script(script: str, action: str) -> None:
    """Run ``deploy/local/<script> <action>``; fail the test with its output on error."""
    cmd = [str(DEPLOY_LOCAL / script), action]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(cmd)} did not finish within {SCRIPT_TIMEOUT_S}s:\n{exc}", pytrace=False)
    if done.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} failed with exit code {done.returncode}:\n{done.stdout}{done.stderr}",
            pytrace=False,
        )


def _should_stop_at_end() -> bool:
    keep = os.environ.get("STREAM_KPIS_KEEP_SERVICES", "") not in ("", "0")
    return not keep and "PYTEST_XDIST_WORKER" not in os.environ


def _ensure_service(script: str, probe: Callable[[], bool], what: str) -> Iterator[None]:
    """Start a service with its script unless ``probe`` already succeeds; stop at the end
    only what was started here (see the module docstring)."""
    started_here = False
    if not probe():
        _run_script(script, "up")
        started_here = True
        wait_until(probe, READY_TIMEOUT_S, f"{what} reachable", interval=0.3)
    yield
    if started_here and _should_stop_at_end():
        subprocess.run(
            [str(DEPLOY_LOCAL / script), "down"], check=False, capture_output=True, timeout=SCRIPT_TIMEOUT_S
        )


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """``127.0.0.1:<KAFKA_PORT>`` of a running real Kafka broker."""
    port = _port("KAFKA_PORT", 9092)
    for _ in _ensure_service("kafka.sh", lambda: _tcp_open(port), f"Kafka on port {port}"):
        yield f"127.0.0.1:{port}"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """``redis://127.0.0.1:<REDIS_PORT>/0`` (with the password when REDIS_PASSWORD is set)."""
    import redis

    port = _port("REDIS_PORT", 6379)
    password = os.environ.get("REDIS_PASSWORD", "")
    url = f"redis://{':' + password + '@' if password else ''}127.0.0.1:{port}/0"

    def ping() -> bool:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    for _ in _ensure_service("redis.sh", ping, f"Redis on port {port}"):
        yield url


@pytest.fixture(scope="session")
def prometheus_url() -> Iterator[str]:
    """``http://127.0.0.1:<PROMETHEUS_PORT>`` of a ready Prometheus."""
    url = f"http://127.0.0.1:{_port('PROMETHEUS_PORT', 9090)}"

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    for _ in _ensure_service("prometheus.sh", ready, f"Prometheus at {url}"):
        yield url


@pytest.fixture(scope="session")
def kafka_admin(kafka_bootstrap: str) -> Iterator[KafkaAdminClient]:
    """A kafka-python admin client on the real broker."""
    admin = KafkaAdminClient(
        bootstrap_servers=kafka_bootstrap, client_id="stream-kpis-it", request_timeout_ms=30000
    )
    yield admin
    admin.close()


@pytest.fixture
def topic_prefix(request: pytest.FixtureRequest) -> str:
    """:func:`unique_topic_prefix` labelled with the test's name."""
    return unique_topic_prefix(request.node.name)


@pytest.fixture
def create_topics(kafka_admin: KafkaAdminClient, topic_prefix: str) -> Iterator[Callable[..., list[str]]]:
    """Factory: ``create_topics("events", "kpis", partitions=4)`` creates uniquely named topics
    (``<topic_prefix><name>``), waits until their partitions have leaders, returns the full
    names, and deletes them after the test."""
    created: list[str] = []

    def create(*names: str, partitions: int = 4) -> list[str]:
        full = [topic_prefix + name for name in names]
        kafka_admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1) for name in full]
        )
        created.extend(full)
        wait_until(lambda: _topics_have_leaders(kafka_admin, full, partitions), READY_TIMEOUT_S,
                   f"leaders for topics {full}", interval=0.3)
        return full

    yield create
    if created:
        try:
            kafka_admin.delete_topics(created)
        except KafkaError:
            pass  # The broker keeps only a day of data; a leftover topic is harmless.


def _topics_have_leaders(admin: KafkaAdminClient, topics: list[str], partitions: int) -> bool:
    try:
        described = admin.describe_topics(topics)
    except KafkaError:
        return False
    return len(described) == len(topics) and all(
        entry.get("error_code", 0) == 0
        and len(entry["partitions"]) == partitions
        and all(part["leader_id"] >= 0 for part in entry["partitions"])
        for entry in described
    )
