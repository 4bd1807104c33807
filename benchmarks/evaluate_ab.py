"""One evaluation of every KPI: the code of a git revision against the working tree, same time.

Both evaluate the same Processor (the replay bench's: the generated ~1M-line file applied event by
event with the churn history on), alternating, in one process, so the machine's load falls on
both alike; the records of the two must be identical (bytes of their JSON and the type of every
value), or the run stops. Only ``stream_kpis/core/kpis.py`` and ``processor.py`` are taken from
the revision (loaded under other module names); everything else is the working tree's.

    python benchmarks/evaluate_ab.py [--base main] [--file F.jsonl] [--rounds 21] [--validity 180d]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import orjson

from stream_kpis.core import Processor
from stream_kpis.core import processor as working_tree
from stream_kpis.core.events import Event, EventParser
from stream_kpis.core.timebase import parse_duration
from stream_kpis.settings import Settings

sys.path.insert(0, str(Path(__file__).parent))
from replay import DEFAULT_MEMBERS, generate_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def load_revision(base: str, directory: Path) -> ModuleType:
    """``stream_kpis.core.processor`` of ``base``, importing that revision's ``kpis``."""
    def module(name: str, source: str) -> ModuleType:
        path = directory / f"ab_base_{name}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(f"stream_kpis.core.ab_base_{name}", path)
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = loaded
        spec.loader.exec_module(loaded)
        return loaded

    def show(path: str) -> str:
        return subprocess.check_output(["git", "-C", str(ROOT), "show", f"{base}:{path}"], text=True)

    module("kpis", show("stream_kpis/core/kpis.py"))
    return module("processor", show("stream_kpis/core/processor.py")
                  .replace("from .kpis import", "from .ab_base_kpis import"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="main", help="git revision to compare with")
    parser.add_argument("--file", type=Path, default=None, help="JSONL events (default: generate)")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--validity", default=None, help="points_validity, e.g. 180d")
    args = parser.parse_args()

    directory = Path(tempfile.mkdtemp(prefix="stream-kpis-ab-"))
    base = load_revision(args.base, directory)
    path = args.file or generate_file(DEFAULT_MEMBERS, 90, directory)
    settings = Settings() if args.validity is None else Settings(
        points_validity_ms=parse_duration(args.validity),
        points_expiring_notice_ms=parse_duration("30d"))
    event_parser = EventParser()
    processor = Processor(settings, record_churn_history=True)
    lines = 0
    for line in path.read_bytes().splitlines():
        lines += 1
        event = event_parser.parse(line)
        if isinstance(event, Event):
            processor.process(event)
    K = processor.K
    runs = {f"before ({args.base})": base.evaluate_kpis, "after (working tree)": working_tree.evaluate_kpis}

    def evaluate(evaluate_kpis) -> list[dict]:
        return evaluate_kpis(settings, processor.aggs, K, dict(processor.churn_history),
                             processor.clv_model)

    before, after = (evaluate(run) for run in runs.values())
    if orjson.dumps(before) != orjson.dumps(after) or \
            [list(map(type, r.values())) for r in before] != [list(map(type, r.values())) for r in after]:
        sys.exit("the records differ")
    print(f"{path}: {lines:,} lines, as of bucket {K}, {len(after)} records, identical")
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            gc.collect()
            started = time.perf_counter()
            evaluate(run)
            times[name].append(time.perf_counter() - started)
    for name, seconds in times.items():
        seconds.sort()
        print(f"{name:<28} best {seconds[0] * 1e3:6.2f} ms  median {seconds[len(seconds) // 2] * 1e3:6.2f} ms"
              f"  ({args.rounds} rounds, alternating)")


if __name__ == "__main__":
    main()
