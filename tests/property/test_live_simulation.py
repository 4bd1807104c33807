"""Deterministic simulation of the live layer: crashes, hand-overs and zombies at every await.

Hypothesis draws an event stream (members, guests, duplicates, late events, malformed records)
and a schedule: produce, poll, join, graceful leave, kill -9 (with the data dir kept or wiped),
a zombie the group dropped without telling it, and a crash at the n-th await point of the run,
mid-batch or mid-hand-over. The workers run the real :class:`~stream_kpis.live.ingest.Ingest`
against :class:`tests.simulation.SimLog` (transactions, fencing, compaction-free state log).

After the group settles, the KPIs that the exporter computes from the committed partials must
equal the brute-force oracle over the input, every bad record must be in the dead letters
exactly once, and the state log must equal one clean pass.
"""

from __future__ import annotations

import asyncio

import orjson
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from stream_kpis.core.member import MemberState
from stream_kpis.live.exporter import Exporter
from stream_kpis.live.partition import PartitionTask
from stream_kpis.live.store import MemoryStore
from stream_kpis.settings import Settings
from tests.property.test_core_vs_oracle import _settings, compare_records, streams
from tests.simulation import Cluster, SimLog

PARTITIONS = 3
BAD_VALUES = [b"{not json", b"[1, 2]", b'{"event_id": "x"}', b'{"event_id": "z", "ts": "later"}']

steps = st.lists(st.one_of(
    st.tuples(st.just("produce"), st.integers(1, 25)),
    st.tuples(st.just("poll"), st.integers(0, 3), st.integers(1, 6)),
    st.tuples(st.just("poll"), st.integers(0, 3), st.integers(1, 6)),
    st.tuples(st.just("poll"), st.integers(0, 3), st.integers(1, 6)),
    st.tuples(st.just("join"), st.none() | st.integers(0, 3)),
    st.tuples(st.just("leave"), st.integers(0, 3)),
    st.tuples(st.just("kill"), st.integers(0, 3)),
    st.tuples(st.just("zombie"), st.integers(0, 3)),
), min_size=5, max_size=40)


def _config(validity: int | None) -> Settings:
    return Settings(**{**_settings(validity).__dict__, "emit_interval_s": 0.0})


def _messages(events: list[dict], bad: list[int]) -> list[tuple[str, bytes, bytes]]:
    """(event type, key, value) in production order; bad records interleaved."""
    out = []
    for i, item in enumerate(events):
        body = {k: v for k, v in item.items() if k != "type"}
        key = (item.get("member_id") or item["event_id"]).encode()
        out.append((item["type"], key, orjson.dumps(body)))
        if i in bad:
            out.append(("survey", b"bad-%d" % i, BAD_VALUES[i % len(BAD_VALUES)]))
    return out


async def _run(config: Settings, messages, schedule, crash_at) -> tuple[Cluster, SimLog]:
    sim = SimLog(crash_at=crash_at)
    cluster = Cluster(config, sim, PARTITIONS)
    topics = config.topics.inputs()
    pending = list(messages)
    await cluster.start_worker()
    for step in schedule:
        alive = sorted(cluster.workers)
        kind = step[0]
        if kind == "produce":
            for kind_, key, value in pending[:step[1]]:
                cluster.produce(topics[kind_], key, value)
            del pending[:step[1]]
        elif kind == "join":
            disk = step[1] if step[1] is not None and step[1] in cluster.disks else None
            if disk is None or disk not in cluster.workers:  # a disk is used by one process
                await cluster.start_worker(disk)
        elif alive:
            ident = alive[step[1] % len(alive)]
            if kind == "poll":
                await cluster.poll(ident, step[2])
            elif kind == "leave":
                await cluster.leave(ident)
            elif kind == "kill":
                cluster.crash(ident)
                if step[1] % 2:
                    cluster.disks.pop(ident, None)  # an empty data dir on the next start
            elif kind == "zombie":
                await cluster.isolate(ident)
    for kind_, key, value in pending:
        cluster.produce(topics[kind_], key, value)
    await cluster.drain()
    return cluster, sim


def _clean_pass(config: Settings, cluster: Cluster) -> dict[int, dict[bytes, bytes]]:
    """Each partition's state after one pass over all its input, in one batch."""
    states = {}
    for partition in range(PARTITIONS):
        task = PartitionTask(config, partition, MemoryStore(),
                             {name: kind for kind, name in config.topics.inputs().items()})
        task.apply([r for t in cluster.topics for r in cluster.inputs[(t, partition)]])
        commit = task.take_commit()
        state = {}
        for key, value in commit.state if commit else ():
            if value is None:
                state.pop(key, None)
            else:
                state[key] = value
        states[partition] = state
    return states


def _member(value: bytes) -> dict[str, object]:
    """A member's state, less the expiry notices already sent: which notices a member got
    depends on the order in which the clock passed their lots (the clean pass applies each
    topic in turn, the live run interleaves them); no KPI reads it."""
    state = MemberState.from_bytes(value)
    return {name: getattr(state, name) for name in MemberState.__slots__
            if name != "notified_expiry"}


def _decoded(value: bytes) -> object:
    return orjson.loads(value) if value else value


def _log_state(sim: SimLog, partition: int) -> dict[bytes, bytes]:
    state: dict[bytes, bytes] = {}
    for record in sim.logs.get(partition, []):
        if isinstance(record, tuple):
            key, value = record
            if value is None:
                state.pop(key, None)
            else:
                state[key] = value
    return state


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(events=streams.filter(lambda events: len(events) >= 8),
       validity=st.none() | st.integers(2, 12), schedule=steps,
       crash_at=st.none() | st.integers(1, 150), bad=st.sets(st.integers(0, 59), max_size=4))
def test_live_layer_is_exact_under_any_schedule(events, validity, schedule, crash_at, bad):
    config = _config(validity)
    messages = _messages(events, sorted(bad))
    cluster, sim = asyncio.run(_run(config, messages, schedule, crash_at))
    event(f"crashed workers: {min(len(sim.crashed), 2)}")
    event(f"fenced commits: {min(sim.fenced, 2)}")
    event(f"commits: {min(sim.commits // 5 * 5, 20)}+")

    # the state log of every partition equals one clean pass over its input
    clean = _clean_pass(config, cluster)
    for partition in range(PARTITIONS):
        got = _log_state(sim, partition)
        assert got.keys() == clean[partition].keys(), partition
        for key, want in clean[partition].items():
            if key.startswith(b"m:"):
                assert _member(got[key]) == _member(want), key
            else:
                assert _decoded(got[key]) == _decoded(want), key
    # the dead letters: each bad input record exactly once
    bad_records = sorted((r.topic, r.partition, r.offset) for records in cluster.inputs.values()
                         for r in records if r.key.startswith(b"bad-"))
    dead = sorted((d["topic"], d["partition"], d["offset"])
                  for d in map(orjson.loads, sim.dead_letters))
    assert dead == bad_records
    # the global KPIs from the committed partials equal the brute-force oracle
    exporter = Exporter(config)
    for key, value in sim.partials:
        exporter.take(key, value)
    records = exporter.evaluate()
    if not events:
        assert records == []
        return
    K = exporter.as_of_bucket()
    assert K == max(e["ts"] for e in events) // config.bucket_ms
    ordered = [orjson.loads(r.value) | {"type": kind}
               for t, kind in ((name, kind) for kind, name in config.topics.inputs().items())
               for p in range(PARTITIONS) for r in cluster.inputs[(t, p)]
               if not r.key.startswith(b"bad-")]
    compare_records(records, ordered, config, K)
