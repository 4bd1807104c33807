"""The local copy of one partition's state log: a key-value store that remembers how far it is.

A :class:`LocalStore` holds the latest value of every key of one partition's state log, and the
state log offset up to which it reflects the log (``offset``). It is only ever written with
records of committed batches, so after a crash or a hand-over it is a correct, possibly older,
prefix of the log: recovery reads the log from ``offset`` on and writes what it finds.

:class:`RocksStore` keeps it in RocksDB under the worker's data directory (one database per
partition, kept across restarts); :class:`MemoryStore` is its twin for ``memory://`` stores and
the broker-free tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any, Protocol

__all__ = ["LocalStore", "MemoryStore", "RocksStore", "open_store"]

_OFFSET_KEY = b"\x00offset"


class LocalStore(Protocol):
    offset: int  # the state log offset the next record to apply would have

    def get(self, key: bytes) -> bytes | None: ...

    def items(self) -> Iterator[tuple[bytes, bytes]]: ...

    def write(self, records: Iterable[tuple[bytes, bytes | None]], offset: int | None) -> None:
        """Apply records (None deletes) and, when given, set ``offset``, in one atomic write."""

    def clear(self) -> None: ...

    def close(self) -> None: ...


class MemoryStore:
    """A dict. Survives what its owner keeps: the tests keep one per simulated data dir."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.offset = 0

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(list(self.data.items()))

    def write(self, records: Iterable[tuple[bytes, bytes | None]], offset: int | None) -> None:
        data = self.data
        for key, value in records:
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value
        if offset is not None:
            self.offset = offset

    def clear(self) -> None:
        self.data.clear()
        self.offset = 0

    def close(self) -> None:
        pass


#: RocksDB keeps recent writes in memtables until it flushes them; left at its defaults that is
#: up to 128 MiB per database, i.e. per owned partition. One budget for every store of the
#: process bounds it whatever the number of partitions (a flush is cheap: the state is small).
MEMTABLE_BUDGET_BYTES = 64 << 20
MEMTABLE_BYTES = 16 << 20  # one store's memtable before it is flushed
#: The same for the cache of blocks read from the database files: RocksDB gives each database
#: its own (32 MiB, filled by the member states the bounded cache of decoded states misses), so
#: a worker with 4 partitions held 128 MiB of it. The files stay in the OS page cache anyway.
BLOCK_CACHE_BYTES = 32 << 20


@cache
def _shared_write_buffers() -> Any:
    """The one memtable budget of the process's stores (made when the first store opens)."""
    from rocksdict import WriteBufferManager

    return WriteBufferManager(MEMTABLE_BUDGET_BYTES, False)


@cache
def _shared_block_cache() -> Any:
    """The one block cache of the process's stores: an LRU that outlives every database."""
    from rocksdict import Cache

    return Cache(BLOCK_CACHE_BYTES)


class RocksStore:
    """One RocksDB database (rocksdict) per partition; the offset is a key written atomically
    with the records it covers. Their memtables share one budget (MEMTABLE_BUDGET_BYTES), and
    their block cache is one (BLOCK_CACHE_BYTES)."""

    def __init__(self, path: Path) -> None:
        from rocksdict import BlockBasedOptions, Options, Rdict, WriteBatch

        self._batch_type = WriteBatch
        path.mkdir(parents=True, exist_ok=True)
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        options.set_write_buffer_size(MEMTABLE_BYTES)
        options.set_write_buffer_manager(_shared_write_buffers())
        table = BlockBasedOptions()
        table.set_block_cache(_shared_block_cache())
        options.set_block_based_table_factory(table)
        self.db = Rdict(str(path), options=options)
        raw = self.db.get(_OFFSET_KEY)
        self.offset = int(raw) if raw is not None else 0

    def get(self, key: bytes) -> bytes | None:
        return self.db.get(key)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        for key, value in self.db.items():
            if key != _OFFSET_KEY:
                yield key, value

    def write(self, records: Iterable[tuple[bytes, bytes | None]], offset: int | None) -> None:
        batch = self._batch_type(raw_mode=True)
        for key, value in records:
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        if offset is not None:
            batch.put(_OFFSET_KEY, b"%d" % offset)
        self.db.write(batch)
        if offset is not None:
            self.offset = offset

    def clear(self) -> None:
        batch = self._batch_type(raw_mode=True)
        for key in list(self.db.keys()):
            batch.delete(key)
        self.db.write(batch)
        self.offset = 0

    def close(self) -> None:
        self.db.close()


def open_store(store_url: str, data_dir: str | Path, app_id: str, partition: int) -> LocalStore:
    """The local store of one partition: RocksDB for ``rocksdb://``, else in memory."""
    if store_url.startswith("rocksdb"):
        return RocksStore(Path(data_dir) / app_id / "state" / str(partition))
    return MemoryStore()
