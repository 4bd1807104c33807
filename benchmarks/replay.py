"""Replay and core throughput on a generated file of >= 1M events; prints a table.

Every row is measured in this run on the same file, with its ratio to the baseline row (reading
the file and orjson-parsing every line, nothing else): the machines are shared and noisy, so the
ratios are what to compare between runs, not the absolute numbers. ``benchmarks/run.py`` runs the
same measurements as its ``replay`` rows.

    python benchmarks/replay.py [--members 112000] [--days 90] [--repeat 3] [--file F.jsonl]
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from stream_kpis.core import Processor
from stream_kpis.core.events import Event, EventParser
from stream_kpis.generate import GeneratorConfig, write_jsonl
from stream_kpis.replay import replay, source_for_path
from stream_kpis.settings import Settings

__all__ = ["BASELINE", "ReplayMeasurement", "best_of", "generate_file", "measure"]

#: The what of the baseline row.
BASELINE = "baseline: read file + orjson.loads"
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
    """(what, items, seconds) rows, the first being the baseline, and what the replay saw."""

    rows: list[tuple[str, int, float]]
    lines: int
    members: int
    applied: int
    duplicates: int
    dead_letters: int


def generate_file(members: int, days: int, directory: Path | None = None) -> Path:
    path = Path(directory or tempfile.mkdtemp(prefix="stream-kpis-bench-")) / "events.jsonl"
    write_jsonl(GeneratorConfig(members=members, days=days), path)
    return path


def measure(path: Path, repeat: int = 3) -> ReplayMeasurement:
    """Time the baseline, parsing, the core, one evaluation and the end-to-end replay on ``path``."""
    lines = path.read_bytes().splitlines()
    n = len(lines)
    settings = Settings()
    event_parser = EventParser()
    events = [e for e in (event_parser.parse(line) for line in lines) if isinstance(e, Event)]

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

    def parse_only() -> int:
        parse = event_parser.parse
        return sum(1 for line in lines if parse(line))

    def core_only() -> Processor:
        processor = Processor(settings)
        process = processor.process
        for event in events:
            process(event)
        return processor

    def end_to_end():
        return replay([source_for_path(path)], settings)

    rows = []
    t_base, _ = best_of(repeat, baseline)
    rows.append((BASELINE, n, t_base))
    t_parse, _ = best_of(repeat, parse_only)
    rows.append(("parse + validate (EventParser)", n, t_parse))
    t_core, processor = best_of(repeat, core_only)
    rows.append(("core: Processor.process (parsed events)", len(events), t_core))
    t_eval, records = best_of(repeat, processor.evaluate)
    rows.append((f"evaluate all KPIs once ({len(records)} records)", 1, t_eval))
    t_replay, result = best_of(repeat, end_to_end)
    rows.append(("replay end to end (stream-kpis replay)", n, t_replay))
    return ReplayMeasurement(rows, n, int(processor.aggs.totals["members"]), result.applied,
                             result.duplicates, sum(result.dead_letters.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=DEFAULT_MEMBERS)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--file", type=Path, default=None, help="use this JSONL file instead")
    args = parser.parse_args()

    path = args.file or generate_file(args.members, args.days)
    print(f"{path}: {path.stat().st_size / 1e6:.0f} MB")
    result = measure(path, args.repeat)
    print(f"\n{'what':<46} {'items':>10} {'seconds':>9} {'items/s':>12} {'us/item':>9} {'vs baseline':>12}")
    base_rate = result.rows[0][1] / result.rows[0][2]
    for what, items, seconds in result.rows:
        rate = items / seconds
        ratio = f"{rate / base_rate:.2f}x" if items > 1 else "-"
        print(f"{what:<46} {items:>10,} {seconds:>9.3f} {rate:>12,.0f} {1e6 / rate:>9.2f} {ratio:>12}")
    print(f"\nmembers {result.members:,}, applied {result.applied:,}, "
          f"duplicates {result.duplicates:,}, dead letters {result.dead_letters:,}")


if __name__ == "__main__":
    main()
