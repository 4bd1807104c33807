"""Replay and core throughput on a generated file of >= 1M events; prints a table.

Every row is measured in this run on the same file, with its ratio to the baseline row (reading
the file and orjson-parsing every line, nothing else): the machines are shared and noisy, so the
ratios are what to compare between runs, not the absolute numbers.

    python benchmarks/replay.py [--members 120000] [--days 90] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import orjson

from stream_kpis.core import Processor
from stream_kpis.events import Event, EventParser
from stream_kpis.generate import GeneratorConfig, write_jsonl
from stream_kpis.replay import replay, source_for_path
from stream_kpis.settings import Settings


def best_of(repeat: int, run) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        gc.collect()
        started = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - started)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=120_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--file", type=Path, default=None, help="use this JSONL file instead")
    args = parser.parse_args()

    path = args.file
    if path is None:
        path = Path(tempfile.mkdtemp()) / "events.jsonl"
        summary = write_jsonl(GeneratorConfig(members=args.members, days=args.days), path)
        print(f"generated {summary.lines:,} lines ({path.stat().st_size / 1e6:.0f} MB)")
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

    def evaluate() -> list:
        return processor.evaluate()

    def end_to_end():
        return replay([source_for_path(path)], settings)

    rows = []
    t_base, _ = best_of(args.repeat, baseline)
    rows.append(("baseline: read file + orjson.loads", n, t_base))
    t_parse, _ = best_of(args.repeat, parse_only)
    rows.append(("parse + validate (EventParser)", n, t_parse))
    t_core, processor = best_of(args.repeat, core_only)
    rows.append(("core: Processor.process (parsed events)", len(events), t_core))
    t_eval, records = best_of(args.repeat, evaluate)
    rows.append((f"evaluate all KPIs once ({len(records)} records)", 1, t_eval))
    t_replay, result = best_of(args.repeat, end_to_end)
    rows.append(("replay end to end (stream-kpis replay)", n, t_replay))

    print(f"\n{'what':<46} {'items':>10} {'seconds':>9} {'items/s':>12} {'us/item':>9} {'vs baseline':>12}")
    base_rate = n / t_base
    for what, items, seconds in rows:
        rate = items / seconds
        ratio = f"{rate / base_rate:.2f}x" if items > 1 else "-"
        print(f"{what:<46} {items:>10,} {seconds:>9.3f} {rate:>12,.0f} {1e6 / rate:>9.2f} {ratio:>12}")
    print(f"\nmembers {processor.aggs.totals['members']:,}, applied {result.applied:,}, "
          f"duplicates {result.duplicates:,}, dead letters {sum(result.dead_letters.values()):,}")


if __name__ == "__main__":
    main()
