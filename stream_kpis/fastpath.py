"""Batch fast path for the input topics inside Faust's own consumer.

Measured on the real broker (benchmarks/README.md): a stock Faust agent spends ~75 us of CPU per
message in the framework (a task pair and an ``asyncio.wait`` per message in
``Consumer._drain_messages``, then Event objects, sensors and ack bookkeeping), whatever the
settings. That caps a worker at ~13k events/s, 20x below what the KPI core can do.

This module replaces ``Consumer._drain_messages`` (the loop that hands fetched records to the
conductor) with one that passes each fetch of the input topics, a whole batch at a time, to a
handler, then marks their offsets acked in bulk so that Faust's own commit loop commits them.
Everything else stays Faust's: the consumer group and rebalancing, offset commits, table
changelogs and their recovery, other agents' topics (they go through the stock per-message path
below). Records applied but not acked because a rebalance started are fetched again later; the
core's per-record offset tokens recognise them (``redelivered``), so nothing counts twice.

It overrides a private method of faust-streaming; ``check_compatible`` refuses versions it was not
written against, and tests/unit/test_fastpath.py fails if the method changes shape.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import faust
from faust.transport import consumer as consumer_module

__all__ = ["install", "uninstall", "check_compatible", "BatchHandler", "SUPPORTED_FAUST"]

log = logging.getLogger(__name__)

#: faust-streaming versions whose ``Consumer._drain_messages`` this replaces (see the guard test).
SUPPORTED_FAUST = ("0.15.",)

#: await handler(records by TP); records are aiokafka ConsumerRecords (topic, partition, offset,
#: key, value, timestamp), in offset order per TP. The offsets are acked when it returns.
BatchHandler = Callable[[Mapping[Any, Sequence[Any]]], Awaitable[None]]

_ORIGINAL = consumer_module.Consumer._drain_messages
_handlers: dict[str, BatchHandler] = {}


def check_compatible() -> None:
    """Raise RuntimeError unless this faust-streaming has the internals the fast path uses."""
    version = faust.__version__
    needed = ("_wait_next_records", "_acked_index", "_acked", "_n_acked", "_committed_offset",
              "_read_offset", "_add_gap", "_to_message", "perform_seek")
    source = inspect.getsource(consumer_module.Consumer)
    missing = [name for name in needed if name not in source]
    if not version.startswith(SUPPORTED_FAUST) or missing:
        raise RuntimeError(
            f"the batch fast path supports faust-streaming {SUPPORTED_FAUST}, found {version} "
            f"(missing {missing}); set STREAM_KPIS_FAST_PATH=off to use Faust's stock streams")


def install(handlers: Mapping[str, BatchHandler]) -> None:
    """Route the records of these topics to their batch handler (process-wide)."""
    check_compatible()
    _handlers.update(handlers)
    consumer_module.Consumer._drain_messages = _drain_messages


def uninstall() -> None:
    _handlers.clear()
    consumer_module.Consumer._drain_messages = _ORIGINAL


def _mark_acked(consumer: Any, tp: Any, offsets: list[int]) -> None:
    """What ``Consumer.ack`` does per message, for a whole batch."""
    committed = consumer._committed_offset[tp]
    if committed is not None:
        offsets = [offset for offset in offsets if offset >= committed]
    index = consumer._acked_index[tp]
    fresh = [offset for offset in offsets if offset not in index]
    index.update(fresh)
    consumer._acked[tp].extend(fresh)
    consumer._n_acked += len(fresh)


async def _drain_messages(self: Any, fetcher: Any) -> None:  # noqa: C901 (one loop, as in Faust)
    """Replacement of ``faust.transport.consumer.Consumer._drain_messages``."""
    consumer_should_stop = self._stopped.is_set
    fetcher_should_stop = fetcher._stopped.is_set
    read_offset = self._read_offset
    handlers = _handlers
    app = self.app
    try:
        while not (consumer_should_stop() or fetcher_should_stop()):
            records, active = await self._wait_next_records(1.0)
            await asyncio.sleep(0)
            if not records or self.should_stop:
                continue
            if not self.flow_active:
                await self.perform_seek()  # as Faust's getmany: re-read from committed offsets
                continue
            generation = app.consumer_generation_id
            batches: dict[str, dict[Any, list]] = {}
            others: list[tuple[Any, list]] = []
            for tp, tp_records in records.items():
                if active is not None and tp not in active and tp not in self._buffered_partitions:
                    continue
                last = read_offset[tp]
                if last is not None:
                    tp_records = [r for r in tp_records if r.offset >= last]
                if not tp_records:
                    continue
                if tp.topic in handlers:
                    batches.setdefault(tp.topic, {})[tp] = tp_records
                else:
                    others.append((tp, tp_records))
            by_handler: dict[int, tuple[BatchHandler, dict]] = {}
            for topic, tps in batches.items():
                handler = handlers[topic]
                by_handler.setdefault(id(handler), (handler, {}))[1].update(tps)
            for handler, tps in by_handler.values():
                await handler(tps)
                if app.consumer_generation_id != generation or self.suspend_flow.is_set():
                    break  # a rebalance started: do not ack, these are fetched again later
                for tp, tp_records in tps.items():
                    offsets = [r.offset for r in tp_records]
                    previous = read_offset[tp]
                    for before, after in zip([previous, *offsets[:-1]], offsets, strict=True):
                        if before is not None and after - before > 1:
                            await self._add_gap(tp, before + 1, after - 1)
                    _mark_acked(self, tp, offsets)
                    read_offset[tp] = offsets[-1]
            for tp, tp_records in others:  # Faust's stock path, message by message
                for record in tp_records:
                    if app.consumer_generation_id != generation:
                        break
                    message = self._to_message(tp, record)
                    await self.wait_first(self.callback(message), self.suspend_flow.wait())
                    read_offset[tp] = record.offset
            commit_every = self._commit_every
            if commit_every is not None and self._n_acked >= commit_every:
                self._n_acked = 0
                await self.commit()
    except self.consumer_stopped_errors:
        if self.transport.app.should_stop:
            return
        raise
    except asyncio.CancelledError:
        if self.transport.app.should_stop:
            return
        raise
