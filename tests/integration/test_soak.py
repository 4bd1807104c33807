"""One round of every ``make soak`` scenario (scripts/soak.py), strictly.

Each scenario runs once with a smaller event file (~6,000 events) against real ``stream-kpis
worker`` processes, driven only through the CLI, Kafka topics and ``/metrics``; the round must be
exact: every KPI record the workers publish equals ``stream-kpis replay`` of the same file, no
worker exits on its own. A failing round keeps its directory under ``.local/soak/`` (worker logs,
data dirs, expected/actual KPIs, mismatches, timeline) and the assertion names it.

broker-restart stops and starts a private broker (deploy/local/kafka.sh on free ports with its
own state directory), never the shared one. ``STREAM_KPIS_SOAK_REV=<git rev>`` soaks that
revision's ``stream_kpis`` (as ``scripts/soak.py --rev``) instead of the working tree.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_soak():
    spec = importlib.util.spec_from_file_location("stream_kpis_soak", REPO / "scripts" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


soak = _load_soak()

#: Events per round: about 20-35 s per passing round on 2 shared cores.
EVENTS = 6_000
#: Seconds after the last produce for the KPIs to become exact.
TIMEOUT_S = 90


@pytest.fixture(scope="module")
def code_path(tmp_path_factory: pytest.TempPathFactory) -> str | None:
    rev = os.environ.get("STREAM_KPIS_SOAK_REV", "")
    return soak.export_revision(rev, tmp_path_factory.mktemp("code")) if rev else None


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[object]:
    broker = soak.PrivateBroker(tmp_path / "broker").up()
    try:
        yield broker
    finally:
        broker.close()


@pytest.mark.parametrize("scenario", soak.SCENARIOS)  # broker-restart last
def test_soak_round_is_exact(scenario: str, request: pytest.FixtureRequest, code_path: str | None):
    if scenario in soak.PRIVATE_BROKER_SCENARIOS:
        broker = request.getfixturevalue("private_broker")
        bootstrap = broker.bootstrap
    else:
        broker, bootstrap = None, request.getfixturevalue("kafka_bootstrap")
    result = soak.run_round(scenario, 1, bootstrap=bootstrap, events=EVENTS, broker=broker,
                            timeout=TIMEOUT_S, pythonpath=code_path)
    assert result.exact, result.describe()
