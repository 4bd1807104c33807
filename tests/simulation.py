"""A deterministic, broker-free model of the live layer's surroundings.

:class:`SimLog` models what the live layer relies on Kafka for: the state log partitions with
transactional writers (a newer writer fences older ones; a commit is all or nothing), the
committed dead letters, signals and partials, and crashes. :class:`Cluster` models input topics,
a consumer group (eager rebalances, members that crash, zombies that are not told they left)
and workers whose local stores survive a crash or not. The workers run the real
:class:`~stream_kpis.live.ingest.Ingest` code; only Kafka is replaced.

A crash is injected at the n-th await point of the whole run (``crash_at``): the worker that
reaches it dies there, mid-batch or mid-hand-over, and every later call it makes fails.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

from stream_kpis.live.ingest import Fenced, Ingest
from stream_kpis.live.partition import Commit, InputRecord
from stream_kpis.live.store import MemoryStore
from stream_kpis.settings import Settings

__all__ = ["SimLog", "Cluster", "Crash", "partition_of"]

_MARKER = object()


class Crash(BaseException):  # noqa: N818 (not an error: the simulated process dies here)
    """The simulated worker process dies at this point."""


def partition_of(key: bytes, partitions: int) -> int:
    return zlib.crc32(key) % partitions


class SimLog:
    """State log, output topics and the fault injector, shared by all simulated workers."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.logs: dict[int, list] = {}
        self.epochs: dict[int, int] = {}
        self.dead_letters: list[bytes] = []
        self.signals: list[bytes] = []
        self.partials: list[tuple[bytes, bytes]] = []
        self.group_offsets: dict[tuple[str, int], int] = {}
        self.awaits = 0
        self.crash_at = crash_at
        self.crashed: set[int] = set()
        self.commits = 0
        self.fenced = 0

    async def point(self, worker: int) -> None:
        """An await point of worker ``worker``: maybe the place it crashes."""
        if worker in self.crashed:
            raise Crash()
        self.awaits += 1
        if self.awaits == self.crash_at:
            self.crashed.add(worker)
            raise Crash()

    def view(self, worker: int) -> _WorkerLog:
        return _WorkerLog(self, worker)


class _WorkerLog:
    """One worker's connection to the SimLog (the StateLog protocol)."""

    def __init__(self, sim: SimLog, worker: int) -> None:
        self.sim = sim
        self.worker = worker

    async def open_writer(self, partition: int) -> _Writer:
        await self.sim.point(self.worker)
        self.sim.epochs[partition] = self.sim.epochs.get(partition, 0) + 1
        return _Writer(self.sim, self.worker, partition, self.sim.epochs[partition])

    async def end(self, partition: int) -> int:
        await self.sim.point(self.worker)
        return len(self.sim.logs.get(partition, ()))

    async def read(self, ranges: Mapping[int, tuple[int, int]]
                   ) -> AsyncIterator[tuple[int, list[tuple[bytes, bytes | None]]]]:
        for partition, (start, end) in ranges.items():
            await self.sim.point(self.worker)
            records = self.sim.logs.get(partition, [])[start:end]
            yield partition, [r for r in records if r is not _MARKER]


class _Writer:
    def __init__(self, sim: SimLog, worker: int, partition: int, epoch: int) -> None:
        self.sim, self.worker, self.partition, self.epoch = sim, worker, partition, epoch

    async def commit(self, commit: Commit) -> int | None:
        sim = self.sim
        await sim.point(self.worker)                      # before: nothing written
        if sim.epochs[self.partition] != self.epoch:
            sim.fenced += 1
            raise Fenced(f"partition {self.partition}: epoch {self.epoch} < "
                         f"{sim.epochs[self.partition]}")
        log = sim.logs.setdefault(self.partition, [])
        log.extend(commit.state)
        log.append(_MARKER)
        sim.dead_letters.extend(value for _, value in commit.dead_letters)
        sim.signals.extend(value for _, value in commit.signals)
        if commit.partial is not None:
            sim.partials.append((b"%d" % self.partition, commit.partial))
        for topic, offset in commit.positions.items():
            sim.group_offsets[(topic, self.partition)] = offset
        sim.commits += 1
        await sim.point(self.worker)                      # after: written, not yet known
        return len(log)

    async def close(self) -> None:
        pass


@dataclass
class _Worker:
    ident: int
    ingest: Ingest
    disk: dict[int, MemoryStore]
    fetch: dict[tuple[str, int], int] = field(default_factory=dict)  # tp -> next offset
    zombie: bool = False


class Cluster:
    """Input topics, one consumer group, and workers running the real Ingest."""

    def __init__(self, settings: Settings, sim: SimLog, partitions: int) -> None:
        self.settings = settings
        self.sim = sim
        self.partitions = partitions
        self.topics = list(settings.topics.inputs().values())
        self.inputs: dict[tuple[str, int], list[InputRecord]] = {
            (t, p): [] for t in self.topics for p in range(partitions)}
        self.workers: dict[int, _Worker] = {}
        self.members: list[int] = []          # the group's current members
        self.owner: dict[int, int] = {}       # partition -> member (the group's assignment)
        self.disks: dict[int, dict[int, MemoryStore]] = {}
        self.next_ident = 0
        self.now = 0.0  # the workers' clock: one second per poll

    # ---- input ------------------------------------------------------------------------------
    def produce(self, topic: str, key: bytes, value: bytes) -> None:
        partition = partition_of(key, self.partitions)
        records = self.inputs[(topic, partition)]
        records.append(InputRecord(topic, partition, len(records), key, value))

    # ---- membership -------------------------------------------------------------------------
    async def start_worker(self, disk: int | None = None) -> int:
        ident = self.next_ident
        self.next_ident += 1
        stores = self.disks.setdefault(ident if disk is None else disk, {})
        ingest = Ingest(self.settings, self.sim.view(ident),
                        lambda p: stores.setdefault(p, MemoryStore()), clock=lambda: self.now)
        self.workers[ident] = _Worker(ident, ingest, stores)
        self.members.append(ident)
        await self.rebalance()
        return ident

    async def rebalance(self) -> None:
        """Eager: every live, non-zombie member gives back everything, then gets its share."""
        for ident in self.members:
            worker = self.workers[ident]
            await self._guard(worker, worker.ingest.revoke(range(self.partitions)))
        members = [m for m in self.members if m in self.workers]
        self.owner = {p: members[p % len(members)] for p in range(self.partitions)} if members else {}
        for ident in members:
            worker = self.workers.get(ident)
            if worker is None:
                continue
            mine = [p for p, owner in self.owner.items() if owner == ident]
            worker.fetch = {}
            await self._guard(worker, worker.ingest.assign(mine))

    async def leave(self, ident: int) -> None:
        """A graceful stop: the member leaves the group."""
        if ident in self.members:
            self.members.remove(ident)
            worker = self.workers.pop(ident)
            await self._guard(worker, worker.ingest.revoke(range(self.partitions)))
            await self.rebalance()

    def crash(self, ident: int) -> None:
        """kill -9: the process is gone; the group notices (session timeout) at the next
        rebalance."""
        self.sim.crashed.add(ident)
        self.workers.pop(ident, None)
        if ident in self.members:
            self.members.remove(ident)

    async def isolate(self, ident: int) -> None:
        """The group drops this member (a long pause) without it being told: a zombie that
        goes on fetching and committing its old partitions."""
        if ident in self.members and ident in self.workers:
            self.members.remove(ident)
            self.workers[ident].zombie = True
            await self.rebalance()

    async def _guard(self, worker: _Worker, call) -> None:
        try:
            await call
        except Crash:
            self.sim.crashed.add(worker.ident)
            self.workers.pop(worker.ident, None)
            if worker.ident in self.members:
                self.members.remove(worker.ident)

    # ---- processing -------------------------------------------------------------------------
    async def poll(self, ident: int, max_records: int) -> None:
        """One fetch of worker ``ident`` and the Ingest step it drives."""
        worker = self.workers.get(ident)
        if worker is None:
            return
        self.now += 1.0
        ingest = worker.ingest
        for partition, offsets in ingest.take_seeks().items():
            for topic, offset in offsets.items():
                worker.fetch[(topic, partition)] = offset
        batch: dict[int, list[InputRecord]] = {}
        for partition in list(ingest.tasks):
            for topic in self.topics:
                tp = (topic, partition)
                start = worker.fetch.get(tp, self.sim.group_offsets.get(tp, 0))
                records = self.inputs[tp][start:start + max_records]
                worker.fetch[tp] = start + len(records)
                batch.setdefault(partition, []).extend(records)
        await self._guard(worker, ingest.step(batch))

    def caught_up(self) -> bool:
        ends = {tp: len(records) for tp, records in self.inputs.items()}
        for partition in range(self.partitions):
            owner = self.workers.get(self.owner.get(partition, -1))
            if owner is None or partition not in owner.ingest.tasks:
                return False
            task = owner.ingest.tasks[partition]
            if any(task.position(t) < ends[(t, partition)] for t in self.topics):
                return False
        return True

    async def drain(self, max_rounds: int = 200) -> None:
        """Let the group settle and consume everything: zombies wake up and rejoin, a crashed
        group gets a fresh worker, and the members poll until every partition is caught up."""
        self.sim.crash_at = None
        for worker in self.workers.values():
            if worker.zombie:
                worker.zombie = False
                self.members.append(worker.ident)
        if not [m for m in self.members if m in self.workers]:
            await self.start_worker()
        else:
            await self.rebalance()
        for _ in range(max_rounds):
            if self.caught_up():
                for ident in list(self.workers):  # one more step each: partials are due
                    await self.poll(ident, 1000)
                return
            for ident in list(self.workers):
                await self.poll(ident, 1000)
            # a partition whose owner lost it (fenced) is retaken on a later step
            if any(self.workers.get(o) is None for o in self.owner.values()):
                await self.rebalance()
        raise AssertionError("the workers did not catch up with the input")
