"""The owner of a worker's input partitions: hand-overs, batches, atomic commits (no Kafka here).

:class:`Ingest` is driven by a consumer (the aiokafka one in :mod:`.kafka_log`, or the simulated
one of the broker-free tests) through four calls: :meth:`~Ingest.assign` and
:meth:`~Ingest.revoke` from the consumer group's rebalance callbacks, :meth:`~Ingest.step` with
each fetch, and :meth:`~Ingest.take_seeks` to learn where to read each partition from.

It keeps the invariant of docs/design/state.md: a partition's state log holds a chain of
committed batches, each extending the state its writer recovered, and the local store and the
in-memory state hold nothing that is not in that chain.

* Taking a partition: open its writer first (this fences every earlier writer, and waits until
  their transactions are committed or aborted), then read the log to its committed end, then
  resume each input topic at the positions recorded in the state: never at an offset the
  consumer group happens to hold.
* A batch: apply, then one transaction per partition with the state records, dead letters,
  signals, partial and input offsets. Only after it committed does anything reach the local
  store or the read model.
* A failed commit: the partition's in-memory state is discarded and the partition is taken
  again (after a pause when another writer fenced it: that writer is the group's new owner, or
  a stale one that the group is about to correct).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, Protocol

from ..core.events import EventParser
from ..core.native import native_status
from ..settings import Settings
from .allocator import release_free_memory
from .partition import Commit, InputRecord, PartitionTask
from .store import LocalStore

__all__ = ["Ingest", "StateLog", "PartitionWriter", "Fenced"]

log = logging.getLogger(__name__)

#: Seconds before a fenced partition is taken again (the group reassigns it meanwhile).
FENCED_RETRY_S = 2.0


class Fenced(Exception):
    """Another writer opened this partition's state log since this one did."""


class PartitionWriter(Protocol):
    async def commit(self, commit: Commit) -> int | None:
        """Write the commit atomically; return the state log's end offset after it, if known.
        Raises :class:`Fenced` when a newer writer exists, anything else on other failures
        (in which case the commit may or may not have been written)."""

    async def close(self) -> None: ...


class StateLog(Protocol):
    async def open_writer(self, partition: int) -> PartitionWriter:
        """A writer of the partition's state log that fences every earlier one; returns once
        their open transactions are resolved."""

    async def end(self, partition: int) -> int:
        """The committed end offset of the partition's state log."""

    def read(self, ranges: Mapping[int, tuple[int, int]]
             ) -> AsyncIterator[tuple[int, list[tuple[bytes, bytes | None]]]]:
        """Committed records of each partition's log in [start, end), in order."""


class Ingest:
    """The input partitions a worker owns, and what it does with their records."""

    def __init__(self, settings: Settings, state_log: StateLog,
                 open_store: Callable[[int], LocalStore], *, metrics: Any = None,
                 on_committed: Callable[[Commit], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.state_log = state_log
        self.open_store = open_store
        self.metrics = metrics
        self.on_committed = on_committed
        # the latest fit's parameters: each Commit carries them, and the read model's statuses
        # (made from the commit's member records at its next flush) use them
        self.clv_params: tuple | None = None
        self.clock = clock
        self.topic_types = {name: kind for kind, name in settings.topics.inputs().items()}
        self.parser = EventParser(settings.max_event_bytes, settings.max_skew_ms)
        log.info("input parsing: native fast paths %s", native_status())
        self.assigned: set[int] = set()
        self.tasks: dict[int, PartitionTask] = {}
        self.writers: dict[int, PartitionWriter] = {}
        self.parked: dict[int, PartitionTask] = {}   # revoked; reused if taken back unchanged
        self.stores: dict[int, LocalStore] = {}
        self.retry_at: dict[int, float] = {}         # lost partitions -> when to take them again
        self.seeks: dict[int, dict[str, int]] = {}   # partition -> topic -> offset to read next
        self.last_partial = 0.0
        self.lock = asyncio.Lock()

    # ---- hand-overs -------------------------------------------------------------------------
    async def assign(self, partitions: Iterable[int]) -> None:
        """The group gave this worker these partitions (all of them, eager rebalancing)."""
        async with self.lock:
            self.assigned = set(partitions)
            for partition in list(self.parked):
                if partition not in self.assigned:
                    del self.parked[partition]
            await asyncio.gather(*(self._take_or_retry(partition)
                                   for partition in sorted(self.assigned - set(self.tasks))))

    async def revoke(self, partitions: Iterable[int]) -> None:
        """The group takes these partitions back; waits for the batch being committed."""
        async with self.lock:
            for partition in partitions:
                self.assigned.discard(partition)
                self.retry_at.pop(partition, None)
                self.seeks.pop(partition, None)
                task = self.tasks.pop(partition, None)
                if task is not None and task.pending is None:
                    self.parked[partition] = task
                await self._close_writer(partition)
            self._set_gauges()

    async def _take(self, partition: int) -> None:
        started = time.perf_counter()
        writer = await self.state_log.open_writer(partition)
        self.writers[partition] = writer
        end = await self.state_log.end(partition)
        task = self.parked.pop(partition, None)
        how = "kept in memory"
        if task is None or task.log_end != end:
            task = await self._recover(partition, end)
            how = "recovered"
        self.tasks[partition] = task
        self.retry_at.pop(partition, None)
        self.seeks[partition] = {topic: task.position(topic) for topic in self.topic_types}
        self._set_gauges()
        log.info("partition %d taken: state %s (%d members, log end %d) in %.2fs", partition, how,
                 int(task.processor.aggs.totals["members"]), end, time.perf_counter() - started)

    async def _recover(self, partition: int, end: int) -> PartitionTask:
        store = self.stores.get(partition)
        if store is None:
            store = self.stores[partition] = self.open_store(partition)
        if store.offset > end:  # the log is shorter than what the store reflects: a new topic
            log.warning("partition %d: local state is ahead of the state log (offset %d > %d); "
                        "discarding it", partition, store.offset, end)
            store.clear()
        if store.offset < end:
            async for _, records in self.state_log.read({partition: (store.offset, end)}):
                store.write(records, None)
        store.write((), end)
        # seconds for a large partition: in a thread, so that the consumers' heartbeats (on
        # this event loop) go on and the group does not time this worker out meanwhile
        task = await asyncio.to_thread(PartitionTask, self.settings, partition, store,
                                       self.topic_types, self.parser)
        task.log_end = end
        return task

    def take_seeks(self) -> dict[int, dict[str, int]]:
        """Partitions (re)taken since the last call, with the offset to read next per topic."""
        seeks, self.seeks = self.seeks, {}
        return seeks

    def owns(self, partition: int) -> bool:
        return partition in self.tasks

    # ---- batches ----------------------------------------------------------------------------
    async def step(self, records: Mapping[int, list[InputRecord]]) -> None:
        """Apply a fetch (records grouped by partition) and commit what changed; also the clock,
        the partials due and the retries of lost partitions. Called with every fetch, empty
        or not."""
        async with self.lock:
            now = self.clock()
            for partition, when in list(self.retry_at.items()):
                if when <= now and partition in self.assigned and partition not in self.tasks:
                    await self._take_or_retry(partition)
            now_ms = int(now * 1000)
            partial_due = now - self.last_partial >= self.settings.emit_interval_s
            if partial_due:
                self.last_partial = now
            commits: list[Commit] = []
            for partition, task in self.tasks.items():
                batch = records.get(partition)
                if batch:
                    task.apply(batch, now_ms)
                if self.settings.clock == "wall":
                    task.advance(now_ms // self.settings.bucket_ms)
                commit = task.take_commit(with_partial=partial_due, clv_params=self.clv_params)
                if commit is not None:
                    commits.append(commit)
            if commits:
                await asyncio.gather(*(self._commit(commit) for commit in commits))
            if partial_due:  # the JSON the partials were made from is gone
                release_free_memory()
            if self.metrics is not None and records:
                self.metrics.observe_batch(self.clock() - now)
                for partition in records:
                    task = self.tasks.get(partition)
                    if task is not None and task.processor.max_ts is not None:  # newest event
                        self.metrics.observe_event_lag(max(0.0, now - task.processor.max_ts / 1000))

    async def _commit(self, commit: Commit) -> None:
        partition = commit.partition
        writer, task = self.writers[partition], self.tasks[partition]
        try:
            end = await writer.commit(commit)
        except Exception as exc:  # noqa: BLE001 (any failure: the state is recovered from the log)
            self._lose(partition, exc)
            return
        task.committed(commit, end)
        if self.on_committed is not None:
            self.on_committed(commit)

    def _lose(self, partition: int, exc: BaseException) -> None:
        fenced = isinstance(exc, Fenced)
        log.warning("partition %d: commit failed (%s: %s); its state is recovered from the state "
                    "log %s", partition, type(exc).__name__, exc,
                    "after the group's next hand-over" if fenced else "now")
        self.tasks.pop(partition, None)
        writer = self.writers.pop(partition, None)
        if writer is not None:
            asyncio.ensure_future(writer.close())
        self.retry_at[partition] = self.clock() + (FENCED_RETRY_S if fenced else 0.0)
        if self.metrics is not None:
            self.metrics.count_lost_commit("fenced" if fenced else "error")
        self._set_gauges()

    async def _take_or_retry(self, partition: int) -> None:
        try:
            await self._take(partition)
        except Exception as exc:  # noqa: BLE001 (broker away: try again shortly)
            log.warning("partition %d: taking it failed (%s); retrying", partition, exc)
            self.retry_at[partition] = self.clock() + FENCED_RETRY_S

    async def _close_writer(self, partition: int) -> None:
        writer = self.writers.pop(partition, None)
        if writer is not None:
            await writer.close()

    async def close(self) -> None:
        async with self.lock:
            for partition in list(self.writers):
                await self._close_writer(partition)
            for store in self.stores.values():
                store.close()
            self.stores.clear()

    def _set_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.assigned_partitions.set(len(self.tasks))

    # ---- reporting --------------------------------------------------------------------------
    def max_ts(self) -> int | None:
        stamps = [t.processor.max_ts for t in self.tasks.values() if t.processor.max_ts is not None]
        return max(stamps) if stamps else None

    def members(self) -> int:
        return int(sum(t.processor.aggs.totals["members"] for t in self.tasks.values()))
