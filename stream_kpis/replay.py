"""Batch/backfill: run files of events through the same core as the live worker.

Sources are JSON Lines (one event per line with a ``type`` field) or CSV exports mapped to our
field names by ``[[replay.sources]]`` entries of the TOML config (``path``, ``type``, ``format``,
``ts_format``, ``columns``; see README). The path ``-`` is standard input (JSON Lines). Bad lines
become dead letters with the file and line; they are counted, optionally written to a file, and
never stop the replay.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import heapq
import io
import math
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from .core import Processor, evaluate_kpis
from .core.events import EVENT_TYPES, DeadLetter, Event, EventParser
from .core.native import native_module
from .core.native_core import LINES_EMIT, LINES_END, NativeProcessor, make_processor
from .core.timebase import parse_rfc3339_ms, strptime_ms
from .exceptions import ConfigError, InputFileError
from .settings import Settings, read_toml

__all__ = ["Source", "STDIN", "load_sources", "source_for_path", "read_source", "CsvRow",
           "read_csv_rows", "replay", "ReplayResult"]

STDIN = Path("-")  # the path of standard input on the command line
#: Events handed to the core at a time (Processor.process_batch; the split changes no result).
BATCH_EVENTS = 4096

_NUMBER_FIELDS = {"amount", "margin", "value"}
_INT_FIELDS = {"points", "nps", "csat"}
_FIELDS = {"event_id", "member_id", "ts", "amount", "points", "margin", "value", "channel", "tier",
           "store_id", "currency", "reward_id", "nps", "csat", "comment", "type"}


@dataclass(frozen=True)
class Source:
    """One input file and how to read it."""

    path: Path
    format: str = "jsonl"                     # jsonl | csv
    type: str | None = None                   # event type of every row; None: a "type" field
    ts_format: str = "auto"                   # auto (epoch ms or RFC 3339) | epoch_ms | epoch_s |
    #                                           rfc3339 | a strftime pattern (naive = UTC)
    columns: dict[str, str] = field(default_factory=dict)  # our field -> their column
    delimiter: str = ","
    encoding: str = "utf-8"

    @property
    def is_stdin(self) -> bool:
        return self.path == STDIN

    @property
    def name(self) -> str:
        """The file as dead letters name it (their ``topic``)."""
        return "<stdin>" if self.is_stdin else str(self.path)


def _where(config: Path, index: int) -> str:
    return f"{config}: [[replay.sources]] #{index + 1}"


def load_sources(config_path: str | Path) -> list[Source]:
    """The ``[[replay.sources]]`` entries of a config file; paths relative to the file."""
    config_path = Path(config_path)
    data = read_toml(config_path)
    entries = data.get("replay", {}).get("sources", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{config_path}: write sources as [[replay.sources]] tables")
    sources = []
    allowed = {"path", "type", "format", "ts_format", "columns", "delimiter", "encoding"}
    for index, entry in enumerate(entries):
        where = _where(config_path, index)
        unknown = set(entry) - allowed
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        if "path" not in entry:
            raise ConfigError(f"{where}: missing 'path' (the file to read, relative to the config)")
        fmt = entry.get("format") or _format_of(Path(entry["path"]))
        if fmt not in ("csv", "jsonl"):
            raise ConfigError(f"{where}: format must be 'csv' or 'jsonl', got {fmt!r}")
        kind = entry.get("type")
        if kind is not None and kind not in EVENT_TYPES:
            raise ConfigError(f"{where}: type must be one of {list(EVENT_TYPES)}, got {kind!r}")
        if fmt == "csv" and kind is None and "type" not in entry.get("columns", {}):
            raise ConfigError(f"{where}: a CSV source needs type = \"purchase\" (or redemption, "
                              "enrollment, survey), or a 'type' column in columns")
        columns = entry.get("columns", {})
        if not isinstance(columns, dict) or not all(isinstance(v, str) for v in columns.values()):
            raise ConfigError(f"{where}: columns must map our field names to your column names, "
                              "e.g. columns = { event_id = \"order_no\" }")
        unknown_fields = set(columns) - _FIELDS
        if unknown_fields:
            raise ConfigError(f"{where}: columns names unknown field(s) {sorted(unknown_fields)}; "
                              f"our fields are {sorted(_FIELDS)}")
        path = Path(entry["path"])
        if not path.is_absolute():
            path = config_path.parent / path
        sources.append(Source(path=path, format=fmt, type=kind,
                              ts_format=entry.get("ts_format", "auto"), columns=dict(columns),
                              delimiter=entry.get("delimiter", ","),
                              encoding=entry.get("encoding", "utf-8")))
    return sources


def _format_of(path: Path) -> str:
    return "csv" if path.suffix.lower() == ".csv" else "jsonl"


def source_for_path(path: str | Path) -> Source:
    """A source for a file named on the command line: JSONL, or CSV with our column names;
    ``-`` is standard input, read as JSONL."""
    return Source(path=Path(path), format=_format_of(Path(path)))


def _timestamp_converter(ts_format: str) -> Callable[[str], Any]:
    if ts_format == "auto":
        return lambda text: int(text) if text.lstrip("-").isdigit() else text
    if ts_format == "epoch_ms":
        return int
    if ts_format == "epoch_s":
        return _epoch_s_ms
    if ts_format == "rfc3339":
        return parse_rfc3339_ms
    return strptime_ms(ts_format)


def _epoch_s_ms(text: str) -> int:
    """Epoch seconds (a decimal) to ms, rounded half to even; ValueError for inf and nan too."""
    ms = float(text) * 1000
    if not math.isfinite(ms):
        raise ValueError(f"not a finite number of seconds: {text!r}")
    return int(round(ms))


class _RowError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class CsvRow:
    """One CSV data row mapped to our field names, or the reason it could not be."""

    line: int                      # the row's line in the file (the dead letter's offset)
    fields: dict[str, Any]         # our field name -> converted value; {} when ``error``
    error: tuple[str, str] | None  # (dead-letter reason, detail) when the row is unusable
    header: list[str]
    cells: list[str]

    @property
    def raw(self) -> bytes:
        """The row as JSON (see :func:`_row_json`), made when asked for."""
        return _row_json(self.header, self.cells)


def _row_json(header: list[str], cells: list[str]) -> bytes:
    """A CSV row as JSON, header -> cell (missing cells null, cells beyond the header under
    ``_extra_cells``): the original value of a dead letter."""
    row: dict[str, Any] = dict(zip(header, cells, strict=False))
    for name in header[len(cells):]:
        row[name] = None
    if len(cells) > len(header):
        row["_extra_cells"] = cells[len(header):]
    return orjson.dumps(row)


#: How a row maps to our fields: (our field, cell index, converter or None for text) per field.
_Plan = list[tuple[str, int, Callable[[str], Any] | None]]


def read_csv_rows(source: Source, handle: io.TextIOBase) -> Iterator[CsvRow]:
    """The rows of a CSV source, mapped through its ``columns`` and ``ts_format``.

    The first line is the header; blank lines are skipped (as csv.DictReader does). Raises
    InputFileError when a column named in the config is missing from the header; a bad cell
    makes that row an error row, never an exception.
    """
    reader, header, plan = _csv_reader(source, handle)
    width = len(header)
    for cells in reader:
        if cells:
            fields, error = _map_row(cells, width, plan, source.ts_format)
            yield CsvRow(reader.line_num, fields, error, header, cells)


def _csv_reader(source: Source, handle: io.TextIOBase) -> tuple[Any, list[str], _Plan]:
    """A csv.reader of the source's data rows, its header (read now: a missing column raises
    InputFileError here) and the plan that maps its rows."""
    reader = csv.reader(handle, delimiter=source.delimiter)
    header = next(reader, None) or []
    return reader, header, _csv_plan(source, header)


def _csv_plan(source: Source, header: list[str]) -> _Plan:
    """The plan of a source's rows under ``header``; raises InputFileError when a column named
    in the config is missing from the header."""
    missing = [theirs for theirs in source.columns.values() if theirs not in header]
    if missing:
        raise InputFileError(f"{source.path}: column(s) {missing} named in the config are not in "
                             f"the header {header}; fix [[replay.sources]] columns")
    mapping = {ours: ours for ours in header if ours in _FIELDS}
    mapping.update(source.columns)
    column = {name: index for index, name in enumerate(header)}  # a repeated name: its last
    to_ts = _timestamp_converter(source.ts_format)
    converters = {"ts": to_ts, **dict.fromkeys(_NUMBER_FIELDS, float),
                  **dict.fromkeys(_INT_FIELDS, int)}
    return [(ours, column[theirs], converters.get(ours)) for ours, theirs in mapping.items()]


def _map_row(cells: list[str], width: int, plan: _Plan, ts_format: str
             ) -> tuple[dict[str, Any], tuple[str, str] | None]:
    """(fields, None) of a data row, or ({}, (dead-letter reason, detail))."""
    try:
        if len(cells) > width:
            raise _RowError("bad_value", f"the row has {len(cells) - width} more cell(s) "
                                         "than the header")
        return _mapped_fields(cells, plan, ts_format), None
    except _RowError as exc:
        return {}, (exc.reason, str(exc))


def _mapped_fields(cells: list[str], plan: _Plan, ts_format: str) -> dict[str, Any]:
    """Our fields of one row: (our field, cell index, converter or None for text) per field."""
    event: dict[str, Any] = {}
    count = len(cells)
    for ours, index, convert in plan:
        if index >= count:
            continue  # a missing cell is a missing value
        # an empty or blank cell is a missing value (an empty card id: a non-member); strip()
        # and isspace() agree on what is white space
        text = cells[index].strip()
        if not text:
            continue
        if convert is None:
            event[ours] = text
            continue
        try:
            event[ours] = convert(text)
        except ValueError:
            raise _conversion_error(ours, text, convert, ts_format) from None
    return event


def _conversion_error(name: str, text: str, kind: Callable[[str], Any], ts_format: str
                      ) -> _RowError:
    """The dead letter of a cell its converter rejected: bad_timestamp or bad_type."""
    if name == "ts":
        return _RowError("bad_timestamp", f"ts {text!r} does not match ts_format {ts_format!r}")
    return _RowError("bad_type", f"{name} {text!r} is not a"
                                 f"{'n integer' if kind is int else ' number'}")


def read_source(source: Source, parser: EventParser,
                on_bytes: Callable[[int], None] | None = None
                ) -> Iterator[Event | DeadLetter]:
    """Events and dead letters of one source, in file order.

    ``on_bytes`` receives the bytes read so far, now and then (not for standard input).
    """
    with _opened(source) as handle:
        yield from _read_file(source, handle, parser, None if source.is_stdin else on_bytes)


def _read_file(source: Source, handle: BinaryIO, parser: EventParser,
               on_bytes: Callable[[int], None] | None) -> Iterator[Event | DeadLetter]:
    if source.format == "jsonl":
        return _read_jsonl(source, handle, parser, on_bytes)
    return _read_csv(source, handle, parser, on_bytes)


def _read_csv(source: Source, handle: BinaryIO, parser: EventParser,
              on_bytes: Callable[[int], None] | None) -> Iterator[Event | DeadLetter]:
    text = io.TextIOWrapper(handle, encoding=source.encoding, newline="")
    validate = parser.validate
    try:
        reader, header, plan = _csv_reader(source, text)
        width = len(header)
        native = _native_rows(source, plan, width) if parser.native else None
        number = 0
        for cells in reader:
            if not cells:
                continue
            number += 1
            if on_bytes is not None and number % 4096 == 0:
                on_bytes(handle.tell())  # the text layer reads ahead: close enough for progress
            if native is not None:
                event = native(cells)
                if event is not None:
                    yield event
                    continue
            fields, error = _map_row(cells, width, plan, source.ts_format)
            if error is not None:
                dead = DeadLetter(*error, _row_json(header, cells))
            else:
                dead_or_event = validate(fields, b"", source.type)
                if dead_or_event.__class__ is Event:
                    yield dead_or_event
                    continue
                dead = dead_or_event
                dead.raw = _row_json(header, cells)
            dead.topic, dead.offset = source.name, reader.line_num
            yield dead
    finally:
        text.detach()  # the caller closes the handle (never standard input)


def _native_rows(source: Source, plan: _Plan, width: int
                 ) -> Callable[[list[str]], Event | None] | None:
    """The native reader of this source's rows (see :mod:`stream_kpis.core.native`): a row's
    Event when it is sure of it, else None; None when it is not built or does not read this
    source's ts_format."""
    module = native_module()
    if module is None:
        return None
    rows = module.CsvEvents.for_source(Event, list(EVENT_TYPES),
                                       [(ours, index) for ours, index, _ in plan],
                                       source.ts_format, width, source.type)
    return None if rows is None else rows.event


def _read_jsonl(source: Source, handle: BinaryIO, parser: EventParser,
                on_bytes: Callable[[int], None] | None) -> Iterator[Event | DeadLetter]:
    for number, line in enumerate(handle, 1):
        if on_bytes is not None and number % 4096 == 0:
            on_bytes(handle.tell())
        if line.strip():  # (a blank line, its line break apart, is skipped)
            yield _parsed_line(parser, source, line, number)


def _parsed_line(parser: EventParser, source: Source, line: bytes, number: int
                 ) -> Event | DeadLetter:
    """The event or dead letter of line ``number`` of a JSON Lines source (with its line
    break)."""
    item = parser.parse(line.rstrip(b"\r\n"), source.type)
    if item.__class__ is DeadLetter:
        item.topic, item.offset = source.name, number
    return item


def _by_time(item: Event | DeadLetter) -> int:
    return item.ts if item.__class__ is Event else -1


@dataclass
class ReplayResult:
    """What a replay produced: final KPI records, the series (with --every) and counts."""

    records: list[dict[str, Any]]
    series: list[dict[str, Any]]
    applied: int
    duplicates: int
    dead_letters: Counter
    signals: int
    as_of_bucket: int | None


class _Series:
    """``--every``: the KPI records as of each multiple of the step the event clock passes."""

    def __init__(self, processor: Processor | NativeProcessor, bucket_ms: int,
                 every_ms: int | None, on_series: Callable[[list[dict]], None] | None) -> None:
        self.processor = processor
        self.step = None if every_ms is None else max(1, every_ms // bucket_ms)
        self.next_emit: int | None = None  # the next as-of bucket of the series
        self.on_series = on_series
        self.records: list[dict[str, Any]] = []

    def due(self, bucket: int) -> bool:
        """Whether an event in ``bucket`` comes after the next as-of bucket: then what came
        before it is evaluated first (:meth:`emit`)."""
        if self.step is None:
            return False
        if self.next_emit is None:
            self.next_emit = (bucket // self.step + 1) * self.step - 1
        return bucket > self.next_emit

    def stop_bucket(self) -> int | None:
        """The bucket after which an event must wait for :meth:`due` (None: never)."""
        if self.step is None:
            return None
        # before the first event, every event: it sets the series' first as-of bucket
        return -(1 << 62) if self.next_emit is None else self.next_emit

    def emit(self, bucket: int) -> None:
        """Evaluate as of every as-of bucket before ``bucket``."""
        while bucket > self.next_emit:
            records = self.processor.evaluate(self.next_emit)
            self.records.extend(records)
            if self.on_series is not None:
                self.on_series(records)
            self.next_emit += self.step


def _process(processor: Processor | NativeProcessor, events: list[Event]) -> None:
    processor.process_batch(events)
    # What the core keeps (member states, histograms) lives until the end: out of the cyclic
    # collector's sight, which otherwise traverses all of it again each time the heap has
    # grown by a quarter (~12% of a replay). Replay makes no reference cycles (a test checks
    # this), so nothing frozen is garbage; replay's finally unfreezes it all.
    gc.freeze()


def _replay_items(items: Iterable[Event | DeadLetter], processor: Processor | NativeProcessor,
                  series: _Series, dead_letter: Callable[[DeadLetter], None]) -> None:
    """Apply the events of ``items`` in batches, and take their dead letters."""
    bucket_ms = processor.settings.bucket_ms
    batch: list[Event] = []
    for item in items:
        if item.__class__ is DeadLetter:
            dead_letter(item)
            continue
        if series.step is not None and series.due(item.ts // bucket_ms):
            _process(processor, batch)  # the series evaluates what came before this event
            batch = []
            series.emit(item.ts // bucket_ms)
        batch.append(item)
        if len(batch) == BATCH_EVENTS:
            _process(processor, batch)
            batch = []
    _process(processor, batch)


#: About how many bytes of a JSON Lines file the native core reads at a time.
_CHUNK_BYTES = 1 << 20


def _replay_jsonl_natively(source: Source, processor: NativeProcessor, parser: EventParser,
                           series: _Series, dead_letter: Callable[[DeadLetter], None],
                           on_bytes: Callable[[int], None] | None) -> None:
    """One JSON Lines source through the native core line by line (no Event objects): what
    :func:`_replay_items` does with what :func:`read_source` reads, the same results. A line
    the native JSON reader does not answer for is parsed here (a dead letter, or an event in a
    form only Python reads), and the series evaluates where it is due."""
    bucket_ms = processor.settings.bucket_ms
    before = 0  # lines of the file before this chunk
    with _opened(source) as handle:
        while lines := handle.readlines(_CHUNK_BYTES):
            index = 0
            while index < len(lines):
                index, why, bucket = processor.process_lines(lines, index, source.type,
                                                             parser.max_event_bytes,
                                                             series.stop_bucket())
                if why == LINES_EMIT:
                    if series.due(bucket):
                        series.emit(bucket)
                    continue
                if why == LINES_END:
                    break
                item = _parsed_line(parser, source, lines[index], before + index + 1)
                if item.__class__ is DeadLetter:
                    dead_letter(item)
                else:
                    if series.due(item.ts // bucket_ms):
                        series.emit(item.ts // bucket_ms)
                    processor.process_batch([item])
                index += 1
            before += len(lines)
            gc.freeze()
            if on_bytes is not None and not source.is_stdin:
                on_bytes(handle.tell())


@contextlib.contextmanager
def _opened(source: Source) -> Iterator[BinaryIO]:
    """The source's bytes: standard input (not ours to close) or the file, opened."""
    if source.is_stdin:
        yield sys.stdin.buffer
        return
    try:
        handle: BinaryIO = open(source.path, "rb")  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise InputFileError(f"cannot read {source.path}: {exc.strerror}; check the path") from None
    with handle:
        yield handle


def replay(sources: Iterable[Source], settings: Settings, *, every_ms: int | None = None,
           on_dead_letter: Callable[[DeadLetter], None] | None = None,
           on_signal: Callable[[dict], None] | None = None,
           on_series: Callable[[list[dict]], None] | None = None,
           on_bytes: Callable[[int], None] | None = None) -> ReplayResult:
    """Run the sources through one Processor in event-clock mode and evaluate as of the end.

    Several sources are interleaved by timestamp (each is read in file order). ``every_ms``
    evaluates a series as event time passes each multiple of it. Between batches the process's
    objects are frozen out of the cyclic garbage collector (``gc.freeze``) and unfrozen at the
    end (``gc.unfreeze``, which also unfreezes what a caller froze before).
    """
    settings = settings.with_overrides(clock="event")
    signals = 0

    def count_signal(signal: dict) -> None:
        nonlocal signals
        signals += 1
        if on_signal is not None:
            on_signal(signal)

    processor = make_processor(settings, on_signal=count_signal, record_churn_history=True)
    parser = EventParser(settings.max_event_bytes, settings.max_skew_ms)
    dead_letters: Counter = Counter()
    series = _Series(processor, settings.bucket_ms, every_ms, on_series)

    def dead_letter(item: DeadLetter) -> None:
        dead_letters[item.reason] += 1
        if on_dead_letter is not None:
            on_dead_letter(item)

    sources = list(sources)
    try:
        if (len(sources) == 1 and sources[0].format == "jsonl" and parser.native
                and isinstance(processor, NativeProcessor)):
            _replay_jsonl_natively(sources[0], processor, parser, series, dead_letter, on_bytes)
        else:
            streams = [read_source(source, parser, on_bytes) for source in sources]
            items = streams[0] if len(streams) == 1 else heapq.merge(*streams, key=_by_time)
            _replay_items(items, processor, series, dead_letter)
    finally:
        gc.unfreeze()
    K = processor.as_of_bucket()
    records = [] if K is None else evaluate_kpis(settings, processor.aggs, K, processor.churn_history,
                                                 processor.clv_model)
    return ReplayResult(records=records, series=series.records, applied=processor.applied,
                        duplicates=processor.duplicates, dead_letters=dead_letters,
                        signals=signals, as_of_bucket=K)
