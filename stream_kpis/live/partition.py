"""One owned input partition: its Processor, its input positions, and the batch it commits.

No Kafka here. :class:`PartitionTask` applies the records of one input partition (all four
co-partitioned topics) to a :class:`~stream_kpis.core.Processor` and turns what changed into a
:class:`Commit`: the state records of the partition's state log, the dead letters, the member
signals, optionally the partition's partial for the exporter, and the input positions after the
batch. The caller writes a Commit atomically (one Kafka transaction) and only then calls
:meth:`PartitionTask.committed`, which writes the records to the local store. A Commit that
could not be written leaves the task unusable: its owner drops it and recovers the partition
from the local store and the state log, which only ever hold committed batches
(docs/design/state.md).

State log records (key -> value, one per changed key and batch):

* ``m:<member_id>`` -> ``MemberState.to_bytes()``
* ``b:<bucket>`` -> the event sums of one bucket (guests, surveys, revenue, points, mentions),
  or None once the bucket is at or before the aggregates' floor (no window reaches it)
* ``s:<dedupe key>`` -> b"" (de-duplication entry of an event without member state),
  or None (a tombstone: the entry was evicted)
* ``v:<dimension>\t<value>`` -> b"": an order-dimension value some purchase had (SPEC 4.2)
* ``p`` -> ``{"positions": {topic: next offset}, "max_ts": largest event ts seen}``, written by
  every batch
"""

from __future__ import annotations

import itertools
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..core import PartitionStore, Processor, member_status
from ..core.events import DeadLetter, EventParser
from ..core.jsonbytes import dumps
from ..core.member import MemberState
from ..settings import Settings
from .store import LocalStore

__all__ = ["PartitionTask", "Commit", "InputRecord", "POSITIONS_KEY", "partial_value",
           "parse_partial", "partial_max_ts", "member_statuses", "statuses_from_records"]

MEMBER, BUCKET, SEEN, VALUE = b"m:", b"b:", b"s:", b"v:"
POSITIONS_KEY = b"p"

WRONG_KEY_DETAIL = ("the Kafka message key must be the member_id (the event_id for guest events) "
                    "so that a member's events share a partition; fix the producer's key")


@dataclass(frozen=True, slots=True)
class InputRecord:
    """The parts of a Kafka record the pipeline uses (aiokafka's ConsumerRecord has them too)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass
class Commit:
    """Everything one batch of one partition writes, atomically."""

    partition: int
    state: list[tuple[bytes, bytes | None]]              # state log records, one per key
    dead_letters: list[tuple[bytes | None, bytes]] = field(default_factory=list)
    signals: list[tuple[bytes, bytes]] = field(default_factory=list)
    signal_counts: dict[str, int] = field(default_factory=dict)  # signal -> n, for the metrics
    partial: bytes | None = None                          # this partition's aggregates
    positions: dict[str, int] = field(default_factory=dict)  # input topic -> next offset
    members: dict[str, bytes] = field(default_factory=dict)  # member_id -> its state record
    as_of: int | None = None            # the as-of bucket of the batch's member states
    clv_params: tuple | None = None     # the CLV fit the member states' predictions use
    outcomes: dict[tuple[str, str], int] = field(default_factory=dict)  # (topic, outcome) -> n


def partial_value(max_ts: int | None, positions: Mapping[str, int], aggs_bytes: bytes) -> bytes:
    """The exporter's record of one partition: ``max_ts|progress|z|<zlib of the aggregates>``.

    The aggregates are JSON of integer histograms, which compresses about tenfold; with
    segments on, a partition's partial runs to megabytes."""
    progress = sum(positions.values())
    return (b"%d|%d|z|" % (-1 if max_ts is None else max_ts, progress)
            + zlib.compress(aggs_bytes, 1))


def partial_max_ts(value: bytes) -> int | None:
    """The largest event ts of a partial, read from its header alone."""
    max_ts = int(value[:value.index(b"|")])
    return None if max_ts < 0 else max_ts


def member_statuses(states: list[MemberState], K: int, settings: Settings,
                    clv_params: tuple | None = None) -> list[dict[str, Any]]:
    """The read-model statuses of these member states as of K, with their CLV predictions
    when ``clv_params`` (BG/NBD, Gamma-Gamma parameters of the latest fit) are given."""
    statuses = [member_status(state, K, settings) for state in states]
    if clv_params is not None and clv_params[0]:
        from ..core.predictive import member_predictions  # numpy and scipy: CLV only

        predictions = member_predictions(states, K, settings, *clv_params)
        for status, prediction in zip(statuses, predictions, strict=True):
            if prediction is not None:
                status.update(prediction)
    return statuses


def statuses_from_records(settings: Settings, K: int, clv_params: tuple | None,
                          records: list[bytes]) -> list[dict[str, Any]]:
    """:func:`member_statuses` of members given by their state records (``MemberState.to_bytes``)."""
    return member_statuses([MemberState.from_bytes(record) for record in records], K, settings,
                           clv_params)


def parse_partial(value: bytes) -> tuple[int | None, int, bytes]:
    max_ts, progress, data = value.split(b"|", 2)
    if data.startswith(b"z|"):
        data = zlib.decompress(data[2:])
    return (None if int(max_ts) < 0 else int(max_ts)), int(progress), data


class _StoreMembers(MutableMapping):
    """Member states of one partition: the local store, the batch's changes (``dirty``) and a
    bounded cache of decoded committed states (decoding is most of a store read's cost).

    The Processor changes a state object in place and then assigns it back, so a cached object
    may hold uncommitted changes until the batch commits; a failed commit discards the whole
    task, cache included."""

    def __init__(self, store: LocalStore, cache_size: int = 20_000) -> None:
        self.store = store
        self.dirty: dict[str, MemberState] = {}
        self.cache: dict[str, MemberState] = {}  # insertion order = least recently used first
        self.cache_size = cache_size

    def get(self, member_id: str, default: Any = None) -> MemberState | None:
        state = self.dirty.get(member_id)
        if state is not None:
            return state
        state = self.cache.pop(member_id, None)
        if state is None:
            raw = self.store.get(MEMBER + member_id.encode())
            if raw is None:
                return default
            state = MemberState.from_bytes(raw)
        self.cache[member_id] = state
        return state

    def committed(self) -> None:
        """The dirty states are durable: keep them as cached, forget the oldest beyond the bound."""
        cache = self.cache
        for member_id, state in self.dirty.items():
            cache.pop(member_id, None)
            cache[member_id] = state
        self.dirty.clear()
        excess = len(cache) - self.cache_size
        if excess > 0:
            for member_id in list(itertools.islice(cache, excess)):
                del cache[member_id]

    def __getitem__(self, member_id: str) -> MemberState:
        state = self.get(member_id)
        if state is None:
            raise KeyError(member_id)
        return state

    def __setitem__(self, member_id: str, state: MemberState) -> None:
        self.dirty[member_id] = state

    def __delitem__(self, member_id: str) -> None:  # members are never deleted
        raise NotImplementedError

    def __iter__(self) -> Iterator[str]:
        return iter(self.dirty)

    def __len__(self) -> int:
        return len(self.dirty)


class PartitionTask:
    """The live state of one input partition, rebuilt from a local store."""

    def __init__(self, settings: Settings, partition: int, store: LocalStore,
                 topic_types: Mapping[str, str], parser: EventParser | None = None) -> None:
        self.settings = settings
        self.partition = partition
        self.store = store
        self.topic_types = topic_types
        self.parser = parser or EventParser(settings.max_event_bytes, settings.max_skew_ms)
        self.signals: list[tuple[bytes, bytes]] = []
        self.signal_counts: dict[str, int] = {}
        self.members = _StoreMembers(store)
        self.processor = Processor(settings, self.members, on_signal=self._signal,
                                   track_changes=True)
        self.positions: dict[str, int] = {}
        self.published_version = -1
        self.pending: Commit | None = None
        self.log_end: int | None = None  # state log end offset after this task's last commit
        self._load()

    # ---- recovery ---------------------------------------------------------------------------
    def _load(self) -> None:
        """Rebuild the Processor from the local store (members, buckets, dedupe, positions)."""
        processor = self.processor
        recorded_max_ts = None
        for key, value in self.store.items():
            kind = key[:2]
            if kind == MEMBER:
                PartitionStore.load_member(processor, key[2:].decode(), MemberState.from_bytes(value))
            elif kind == BUCKET:
                PartitionStore.load_bucket(processor, int(key[2:]), value)
            elif kind == SEEN:
                processor.seen_without_member[key[2:].decode()] = None
            elif kind == VALUE:
                processor.aggs.segment(*key[2:].decode().split("\t", 1))
            elif key == POSITIONS_KEY:
                recorded = orjson.loads(value)
                if "positions" in recorded:
                    self.positions = recorded["positions"]
                    # the largest ts seen counts duplicates too, which no other record keeps
                    if recorded["max_ts"] is not None:
                        recorded_max_ts = recorded["max_ts"]
                else:  # written before max_ts was recorded: the offsets alone
                    self.positions = recorded
        if recorded_max_ts is not None:
            processor.max_ts = recorded_max_ts
        if processor.max_ts is not None:
            processor.K = processor.max_ts // self.settings.bucket_ms
        if self.settings.clock == "wall":
            processor.K = int(time.time() * 1000) // self.settings.bucket_ms
        processor.forget_churned()
        processor.trim_history()
        self.published_version = -1 if processor.max_ts is not None else 0

    def position(self, topic: str) -> int:
        """The offset of the next record of ``topic`` this partition has not applied."""
        return self.positions.get(topic, 0)

    # ---- a batch ----------------------------------------------------------------------------
    def apply(self, records: Iterable[InputRecord], now_ms: int | None = None) -> None:
        """Apply input records (any order across topics, offset order within a topic); records
        before the partition's position in their topic are skipped (already in the state)."""
        if self.pending is None:
            self.pending = Commit(self.partition, [])
        commit = self.pending
        positions = self.positions
        outcomes = commit.outcomes
        live_now = now_ms if self.settings.clock == "wall" else None
        for record in records:
            topic = record.topic
            if record.offset < positions.get(topic, 0):
                continue
            positions[topic] = record.offset + 1
            value = record.value or b""
            item = self.parser.parse(value, self.topic_types[topic], live_now)
            if item.__class__ is not DeadLetter and record.key != item.partition_key.encode():
                item = DeadLetter("wrong_key", WRONG_KEY_DETAIL, value)
            if item.__class__ is DeadLetter:
                item.topic, item.partition, item.offset = topic, record.partition, record.offset
                commit.dead_letters.append((record.key, dumps(item.to_record())))
                outcome = "dead_letter:" + item.reason
            else:
                outcome = self.processor.process(item)
            outcomes[(topic, outcome)] = outcomes.get((topic, outcome), 0) + 1

    def advance(self, K: int) -> None:
        """Move the as-of bucket (wall clock): time-based signals and statuses."""
        if self.pending is None:
            self.pending = Commit(self.partition, [])
        self.processor.advance(K)

    def take_commit(self, with_partial: bool = False, clv_params: tuple | None = None
                    ) -> Commit | None:
        """What the batch changed, as a Commit (None when there is nothing to write). It carries
        the changed members' state records with its as-of bucket and ``clv_params`` (the latest
        CLV fit), from which the read model makes their statuses (statuses_from_records)."""
        commit = self.pending or Commit(self.partition, [])
        self.pending = commit
        processor = self.processor
        state = commit.state
        dirty = self.members.dirty
        records = [member.to_bytes() for member in dirty.values()]
        state += zip([MEMBER + member_id.encode() for member_id in dirty], records, strict=True)
        commit.members = dict(zip(dirty, records, strict=True))
        commit.as_of, commit.clv_params = processor.K, clv_params
        floor = processor.aggs.floor
        for bucket in processor.changed_buckets:  # at or before the floor: folded away
            state.append((BUCKET + str(bucket).encode(), None if bucket <= floor
                          else PartitionStore.bucket_record(processor, bucket)))
        for key in processor.changed_seen:
            value = b"" if key in processor.seen_without_member else None
            state.append((SEEN + key.encode(), value))
        for key in processor.changed_values:
            state.append((VALUE + key.encode(), b""))
        processor.changed_buckets.clear()
        processor.changed_seen.clear()
        processor.changed_values.clear()
        commit.signals, self.signals = self.signals, []
        commit.signal_counts, self.signal_counts = self.signal_counts, {}
        version = processor.version
        if with_partial and version != self.published_version:
            commit.partial = partial_value(processor.max_ts, self.positions, processor.aggs.to_bytes())
            self.published_version = version
        if not (state or commit.dead_letters or commit.signals or commit.partial or commit.outcomes):
            self.pending = None
            return None
        commit.positions = dict(self.positions)
        state.append((POSITIONS_KEY, orjson.dumps({"positions": commit.positions,
                                                   "max_ts": processor.max_ts})))
        return commit

    def committed(self, commit: Commit, log_end: int | None) -> None:
        """The Commit is durable: write its state records to the local store."""
        self.store.write(commit.state, log_end)
        self.members.committed()
        self.pending = None
        self.log_end = log_end

    def _signal(self, signal: dict[str, Any]) -> None:
        self.signals.append((signal["member_id"].encode(), dumps(signal)))
        self.signal_counts[signal["signal"]] = self.signal_counts.get(signal["signal"], 0) + 1

