"""What the garbage collector's thresholds cost a replay: Python's defaults against
``stream_kpis.runtime.GC_THRESHOLDS``, which ``stream-kpis`` sets for every command.

The same JSONL file is replayed end to end (``stream_kpis.replay.replay``, as ``stream-kpis
replay`` runs it) in fresh processes, alternating the two settings ``--rounds`` times, and each
process reports its CPU time (``time.process_time``: the machines are shared, and CPU time is
less disturbed by other jobs than wall time). Printed: the best and median CPU time per event
of each setting, and the ratio of the tuned setting to the defaults (above 1.00x: faster).
Not part of ``run.py``.

    .venv/bin/python benchmarks/gc_thresholds.py [--members 112000] [--rounds 3] [--file F.jsonl]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.replay import add_file_arguments, file_of  # noqa: E402
from stream_kpis.runtime import GC_THRESHOLDS  # noqa: E402

SETTINGS = {"python defaults": None, f"tuned {GC_THRESHOLDS}": GC_THRESHOLDS}


def measure_one(path: Path, thresholds: tuple[int, ...] | None) -> tuple[float, int]:
    """CPU seconds of one end-to-end replay of ``path`` in this process, and its lines."""
    from stream_kpis.replay import replay, source_for_path
    from stream_kpis.settings import Settings

    if thresholds is not None:
        gc.set_threshold(*thresholds)
    started = time.process_time()
    result = replay([source_for_path(path)], Settings())
    seconds = time.process_time() - started
    return seconds, result.applied + result.duplicates + sum(result.dead_letters.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_file_arguments(parser)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:  # one measurement, in a fresh process
        seconds, lines = measure_one(args.file, SETTINGS[args.child])
        print(f"{seconds} {lines}")
        return

    path = file_of(args)
    per_event: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name in SETTINGS:
            out = subprocess.run([sys.executable, __file__, "--file", str(path), "--child", name],
                                 check=True, capture_output=True, text=True).stdout.split()
            per_event[name].append(float(out[0]) / int(out[1]) * 1e6)
    default = min(per_event["python defaults"])
    print(f"\n{path}: {args.rounds} rounds, replay end to end, CPU time")
    print(f"{'gc thresholds':<32} {'best us/event':>14} {'median':>8} {'ratio':>7}")
    for name, values in per_event.items():
        print(f"{name:<32} {min(values):>14.2f} {statistics.median(values):>8.2f} "
              f"{default / min(values):>6.2f}x")


if __name__ == "__main__":
    main()
