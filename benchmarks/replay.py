"""Replay and core throughput on generated files of >= 1M events; prints a table.

Two inputs, each against its own baseline, every row measured in this run on the same data:

* JSON Lines (the generator's file, 1M lines): the baseline reads the file and orjson-parses every
  line, nothing else.
* Mapped CSV (the same events written as four CSV exports with their own column names,
  delimiters and timestamp formats, with every KPI on: points validity, surveys, lexicons): the
  baseline is ``csv.DictReader`` reading the same files, nothing else.

Then the stages of a replay one at a time (read, parse, validate, apply, evaluate) and the
replay end to end. The machines are shared and noisy, so the ratios are what to compare between
runs, not the absolute numbers. ``benchmarks/run.py`` runs the same measurements as its
``replay`` rows.

    python benchmarks/replay.py [--members 112000] [--days 90] [--repeat 3] [--file F.jsonl]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import io
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from stream_kpis.core import Processor
from stream_kpis.core.events import Event, EventParser
from stream_kpis.core.native import NATIVE_ENV, native_module, native_status
from stream_kpis.core.native_core import NativeProcessor
from stream_kpis.generate import GeneratorConfig, write_jsonl
from stream_kpis.replay import BATCH_EVENTS, load_sources, read_csv_rows, read_source, replay, source_for_path
from stream_kpis.settings import Settings, load_settings

__all__ = ["BASELINE", "CSV_BASELINE", "ReplayMeasurement", "add_file_arguments", "best_of",
           "file_of", "generate_file", "generate_csv", "measure", "measure_csv"]

#: The what of the baseline rows.
BASELINE = "baseline: read file + orjson.loads"
CSV_BASELINE = "baseline: csv.DictReader over the CSV files"
#: Members for ~1M lines over the default 90 days (stream_kpis.generate.estimate_event_count).
DEFAULT_MEMBERS = 112_000


def best_of(repeat: int, run: Callable[[], Any]) -> tuple[float, Any]:
    """The fastest of ``repeat`` runs (seconds) and the last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        gc.collect()
        started = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - started)
    return best, result


@dataclass
class ReplayMeasurement:
    """(what, items, seconds, baseline) rows and what the replay saw. ``baseline`` names the row
    a row's ratio divides by (None: the row is a baseline, or a time rather than a rate)."""

    rows: list[tuple[str, int, float, str | None]]
    lines: int
    members: int
    applied: int
    duplicates: int
    dead_letters: int


@contextlib.contextmanager
def pure_python() -> Any:
    """The native fast paths off (as STREAM_KPIS_NATIVE=0) for what runs inside."""
    before = os.environ.get(NATIVE_ENV)
    os.environ[NATIVE_ENV] = "0"
    native_module.cache_clear()
    try:
        yield
    finally:
        if before is None:
            del os.environ[NATIVE_ENV]
        else:
            os.environ[NATIVE_ENV] = before
        native_module.cache_clear()


def _native_rows(what: str, items: int, baseline: str, repeat: int, run: Callable[[], Any]
                 ) -> tuple[list[tuple[str, int, float, str | None]], Any]:
    """``what`` measured with the native fast paths as built, then in pure Python: two rows
    (one row when they are not built), and the result of a run as built."""
    t_default, result = best_of(repeat, run)
    rows = [(f"{what}{', native' if native_module() else ''}", items, t_default, baseline)]
    if native_module() is not None:
        with pure_python():
            t_pure, _ = best_of(repeat, run)
        rows.append((f"{what}, pure Python ({NATIVE_ENV}=0)", items, t_pure, baseline))
    return rows, result


def add_file_arguments(parser: argparse.ArgumentParser) -> None:
    """``--members``, ``--days`` and ``--file``: the JSONL file a benchmark replays (see
    :func:`file_of`)."""
    parser.add_argument("--members", type=int, default=DEFAULT_MEMBERS)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--file", type=Path, default=None, help="use this JSONL file instead")


def file_of(args: argparse.Namespace) -> Path:
    """The ``--file`` given, or one generated with ``--members`` over ``--days``."""
    return args.file or generate_file(args.members, args.days)


def generate_file(members: int, days: int, directory: Path | None = None) -> Path:
    path = Path(directory or tempfile.mkdtemp(prefix="stream-kpis-bench-")) / "events.jsonl"
    write_jsonl(GeneratorConfig(members=members, days=days), path)
    return path


def _core_rows(events: list[Event], settings: Settings, repeat: int, baseline: str, prefix: str = ""
               ) -> tuple[list[tuple[str, int, float, str | None]], Processor]:
    """The apply and evaluate stages: Processor.process per event, process_batch as replay
    calls it, and one evaluation."""

    def apply() -> Processor:
        processor = Processor(settings, record_churn_history=True)
        process = processor.process
        for event in events:
            process(event)
        return processor

    def apply_batches() -> Processor:
        processor = Processor(settings, record_churn_history=True)
        for start in range(0, len(events), BATCH_EVENTS):
            processor.process_batch(events[start:start + BATCH_EVENTS])
        return processor

    def apply_native() -> NativeProcessor:
        processor = NativeProcessor(settings, record_churn_history=True)
        for start in range(0, len(events), BATCH_EVENTS):
            processor.process_batch(events[start:start + BATCH_EVENTS])
        return processor

    t_core, processor = best_of(repeat, apply)
    t_batch, _ = best_of(repeat, apply_batches)
    t_eval, records = best_of(repeat, processor.evaluate)
    rows = [(f"{prefix}apply: Processor.process (parsed events)", len(events), t_core, baseline),
            (f"{prefix}apply: Processor.process_batch ({BATCH_EVENTS:,} a batch)", len(events),
             t_batch, baseline)]
    if native_module() is not None:
        t_native, _ = best_of(repeat, apply_native)
        rows.append((f"{prefix}apply: NativeProcessor.process_batch (the native core, as replay)",
                     len(events), t_native, baseline))
    rows.append((f"{prefix}evaluate all KPIs once ({len(records)} records)", 1, t_eval, None))
    return rows, processor


def measure(path: Path, repeat: int = 3) -> ReplayMeasurement:
    """Time the baseline, each stage and the end-to-end replay of a JSON Lines file."""
    settings = Settings()
    event_parser = EventParser()

    def read() -> list[bytes]:
        with open(path, "rb") as handle:
            return handle.read().splitlines()

    def baseline() -> int:
        loads = orjson.loads
        count = 0
        with open(path, "rb") as handle:
            for line in handle:
                try:
                    loads(line)
                except orjson.JSONDecodeError:
                    pass
                count += 1
        return count

    lines = read()
    n = len(lines)

    def parse() -> list[Any]:
        loads, decoded = orjson.loads, []
        for line in lines:
            try:
                decoded.append(loads(line))
            except orjson.JSONDecodeError:
                pass
        return decoded

    rows: list[tuple[str, int, float, str | None]] = []
    t_base, _ = best_of(repeat, baseline)
    rows.append((BASELINE, n, t_base, None))
    t_read, _ = best_of(repeat, read)
    rows.append(("read: lines of the file", n, t_read, BASELINE))
    t_parse, decoded = best_of(repeat, parse)
    rows.append(("parse: orjson.loads of every line", n, t_parse, BASELINE))
    validate = event_parser.validate
    t_validate, _ = best_of(repeat, lambda: [validate(obj, b"") for obj in decoded])
    rows.append(("validate: EventParser.validate (decoded lines)", len(decoded), t_validate,
                 BASELINE))
    def parse_all() -> list[Any]:
        parse = EventParser().parse  # made inside the run: pure_python() turns the native off
        return [parse(line) for line in lines]

    rows += _native_rows("parse + validate (EventParser.parse)", n, BASELINE, repeat, parse_all)[0]
    events = [e for e in (event_parser.parse(line) for line in lines) if isinstance(e, Event)]
    core_rows, processor = _core_rows(events, settings, repeat, BASELINE)
    rows += core_rows
    if native_module() is not None:
        def parse_and_apply() -> None:
            native = NativeProcessor(settings.with_overrides(clock="event"),
                                     record_churn_history=True)
            start, max_bytes = 0, settings.max_event_bytes
            while start < n:  # the lines the native reader leaves to Python are skipped here
                start = native.process_lines(lines, start, None, max_bytes)[0] + 1

        t_fused, _ = best_of(repeat, parse_and_apply)
        rows.append(("parse + validate + apply: NativeProcessor.process_lines (replay's JSON "
                     "Lines path, no Event objects)", n, t_fused, BASELINE))
    end_to_end, result = _native_rows("JSONL replay end to end (stream-kpis replay)", n, BASELINE,
                                      repeat, lambda: replay([source_for_path(path)], settings))
    rows += end_to_end
    return ReplayMeasurement(rows, n, int(processor.aggs.totals["members"]), result.applied,
                             result.duplicates, sum(result.dead_letters.values()))


# ---- mapped CSV ----------------------------------------------------------------------------------

#: The exports of a shop whose column names, delimiters and timestamp formats are not ours:
#: event type -> (file, delimiter, ts_format, [(their column, our field)]).
_CSV_FILES = {
    "enrollment": ("signups.csv", ",", "%Y-%m-%d %H:%M",
                   [("signup_id", "event_id"), ("card", "member_id"), ("joined", "ts"),
                    ("source", "channel"), ("level", "tier")]),
    "purchase": ("tills.csv", ";", "rfc3339",
                 [("receipt", "event_id"), ("card_id", "member_id"), ("sold_at", "ts"),
                  ("total", "amount"), ("pts", "points"), ("gross_margin", "margin"),
                  ("till_type", "channel"), ("shop", "store_id"), ("level", "tier")]),
    "redemption": ("redemptions.csv", ",", "epoch_ms",
                   [("id", "event_id"), ("card", "member_id"), ("at_ms", "ts"), ("pts", "points"),
                    ("worth", "value")]),
    "survey": ("nps.csv", ",", "epoch_s",
               [("response", "event_id"), ("card", "member_id"), ("answered", "ts"),
                ("score", "nps"), ("stars", "csat"), ("text", "comment")]),
}
#: Every KPI on: points validity and expiry notices; the shipped lexicons; surveys in the data.
_CSV_KPIS = '[kpis]\npoints_validity = "180d"\npoints_expiring_notice = "30d"\n'


def _csv_config() -> str:
    """The TOML config of the exports: [kpis] and one [[replay.sources]] per file."""
    parts = [_CSV_KPIS]
    for kind, (name, delimiter, ts_format, columns) in _CSV_FILES.items():
        mapping = ", ".join(f'{ours} = "{theirs}"' for theirs, ours in columns)
        parts.append(f'\n[[replay.sources]]\npath = "{name}"\ntype = "{kind}"\n'
                     f'delimiter = "{delimiter}"\nts_format = "{ts_format}"\n'
                     f"columns = {{ {mapping} }}\n")
    return "".join(parts)


def _csv_ts(kind: str, ts: int) -> str:
    moment = datetime.fromtimestamp(ts / 1000, tz=UTC)
    if kind == "enrollment":
        return moment.strftime("%Y-%m-%d %H:%M")
    if kind == "purchase":
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if kind == "redemption":
        return str(ts)
    return f"{ts / 1000:.3f}"


def generate_csv(jsonl_path: Path, directory: Path) -> Path:
    """The events of a generated JSONL file as the four mapped CSV exports of _CSV_FILES (its
    malformed lines left out); returns the config's path."""
    directory.mkdir(parents=True, exist_ok=True)
    handles, writers = {}, {}
    for kind, (name, delimiter, _, columns) in _CSV_FILES.items():
        handles[kind] = open(directory / name, "w", newline="", encoding="utf-8")  # noqa: SIM115
        writers[kind] = csv.writer(handles[kind], delimiter=delimiter)
        writers[kind].writerow([theirs for theirs, _ in columns])
    try:
        with open(jsonl_path, "rb") as source:
            for line in source:
                try:
                    event = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if type(event) is not dict or event.get("type") not in _CSV_FILES:
                    continue
                kind = event["type"]
                ts = event.get("ts")
                if type(ts) is str:
                    try:
                        ts = int(datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1000)
                    except ValueError:
                        continue
                if type(ts) is not int:
                    continue
                cells = []
                for _, ours in _CSV_FILES[kind][3]:
                    value = _csv_ts(kind, ts) if ours == "ts" else event.get(ours)
                    cells.append("" if value is None else value)
                writers[kind].writerow(cells)
    finally:
        for handle in handles.values():
            handle.close()
    config = directory / "shop.toml"
    config.write_text(_csv_config())
    return config


def measure_csv(config: Path, repeat: int = 3) -> ReplayMeasurement:
    """Time csv.DictReader, each stage and the end-to-end replay of the mapped CSV exports."""
    settings = load_settings(config, env={})
    sources = load_sources(config)
    event_parser = EventParser(settings.max_event_bytes, settings.max_skew_ms)

    def baseline() -> int:
        count = 0
        for source in sources:
            with open(source.path, newline="", encoding=source.encoding) as handle:
                for _ in csv.DictReader(handle, delimiter=source.delimiter):
                    count += 1
        return count

    def read_and_map() -> list[tuple[Any, Any]]:
        mapped = []
        for source in sources:
            with open(source.path, "rb") as handle:
                text = io.TextIOWrapper(handle, encoding=source.encoding, newline="")
                mapped += [(source, row) for row in read_csv_rows(source, text)]
        return mapped

    rows: list[tuple[str, int, float, str | None]] = []
    t_base, n = best_of(repeat, baseline)
    rows.append((CSV_BASELINE, n, t_base, None))
    t_map, mapped = best_of(repeat, read_and_map)
    rows.append(("CSV read + map: read_csv_rows (columns, ts_format, types)", n, t_map, CSV_BASELINE))

    def read_events() -> int:
        parser = EventParser(settings.max_event_bytes, settings.max_skew_ms)
        return sum(1 for source in sources for _ in read_source(source, parser))

    rows += _native_rows("CSV read + map + validate: replay's read_source", n, CSV_BASELINE,
                         repeat, read_events)[0]
    validate = event_parser.validate
    t_validate, _ = best_of(repeat, lambda: [validate(row.fields, row.raw, source.type)
                                             for source, row in mapped if row.error is None])
    rows.append(("CSV validate: EventParser.validate (mapped rows)", n, t_validate, CSV_BASELINE))
    events = [e for e in (validate(row.fields, row.raw, source.type) for source, row in mapped
                          if row.error is None) if isinstance(e, Event)]
    events.sort(key=lambda event: event.ts)  # replay merges the sources by time
    core_rows, processor = _core_rows(events, settings.with_overrides(clock="event"), repeat,
                                      CSV_BASELINE, "CSV ")
    rows += core_rows
    end_to_end, result = _native_rows("mapped CSV replay end to end, every KPI on", n,
                                      CSV_BASELINE, repeat, lambda: replay(sources, settings))
    rows += end_to_end
    return ReplayMeasurement(rows, n, int(processor.aggs.totals["members"]), result.applied,
                             result.duplicates, sum(result.dead_letters.values()))


def print_table(result: ReplayMeasurement) -> None:
    rates = {what: items / seconds for what, items, seconds, _ in result.rows if items > 1}
    width = max(len(what) for what, *_ in result.rows)
    print(f"\n{'what':<{width}} {'items':>10} {'seconds':>9} {'items/s':>12} {'us/item':>9} {'ratio':>7}")
    for what, items, seconds, baseline in result.rows:
        if items == 1:
            print(f"{what:<{width}} {'':>10} {seconds:>9.4f}")
            continue
        rate = rates[what]
        ratio = f"{rate / rates[baseline]:.2f}x" if baseline else "1.00x"
        print(f"{what:<{width}} {items:>10,} {seconds:>9.3f} {rate:>12,.0f} {1e6 / rate:>9.2f} "
              f"{ratio:>7}")
    print(f"members {result.members:,}, applied {result.applied:,}, "
          f"duplicates {result.duplicates:,}, dead letters {result.dead_letters:,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_file_arguments(parser)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=("jsonl", "csv"), default=None)
    args = parser.parse_args()

    path = file_of(args)
    print(f"{path}: {path.stat().st_size / 1e6:.0f} MB; native fast paths {native_status()}")
    if args.only != "csv":
        print_table(measure(path, args.repeat))
    if args.only != "jsonl":
        config = generate_csv(path, path.parent / "csv")
        print_table(measure_csv(config, args.repeat))


if __name__ == "__main__":
    main()
