"""A py-spy profile of a running worker, summarised: where its event loop spends its time.

``benchmarks/run.py --profile`` records the default worker with py-spy while it drains the
throughput dataset (``py-spy record --idle --threads --function --format raw``, 100 Hz) and
prints this summary; the raw file stays in the run's temp dir (with ``--keep``). Standalone:

    python benchmarks/pyspy.py FILE.txt [--top 25]

py-spy is not a dependency of the project: ``.venv/bin/pip install py-spy``. Sampling another
process needs ptrace permission (root, or ``kernel.yama.ptrace_scope=0``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sys
from collections import Counter
from pathlib import Path

from common import Process  # benchmarks/ is not a package

__all__ = ["Recorder", "available", "summarize"]

#: Functions where a thread waits rather than works (the leaf frame of an idle sample).
IDLE_FUNCTIONS = {"EpollSelector.select", "PollSelector.select", "SelectSelector.select",
                  "Condition.wait", "Event.wait", "Thread.join", "_worker", "sleep", "select",
                  "poll"}
_FRAME_LINE = re.compile(r":\d+\)$")


def executable() -> str | None:
    """py-spy next to the running interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def available() -> bool:
    return executable() is not None


class Recorder(Process):
    """``py-spy record`` of one process until :meth:`stop` (or ``seconds``); py-spy writes
    its file when interrupted (SIGINT)."""

    stop_signal = signal.SIGINT

    def __init__(self, pid: int, output: Path, seconds: float = 60, rate: int = 100) -> None:
        self.output = output
        super().__init__([executable() or "py-spy", "record", "--pid", str(pid), "--rate",
                          str(rate), "--duration", str(int(seconds)), "--idle", "--threads",
                          "--function", "--format", "raw", "--output", str(output)],
                         dict(os.environ), output.with_suffix(".log"))

    def stop(self, timeout: float = 30) -> bool:  # type: ignore[override]
        """Stop sampling and wait for the file; True when it was written."""
        super().stop(timeout)
        return self.output.exists() and self.output.stat().st_size > 0


def _frame(frame: str) -> str:
    return _FRAME_LINE.sub(")", frame.strip())


def summarize(path: Path, top: int = 25) -> str:
    """Self and inclusive shares of the busiest thread's samples, by function."""
    threads: Counter[str] = Counter()
    stacks: list[tuple[str, list[str], int]] = []
    for line in path.read_text(errors="replace").splitlines():
        head, _, count = line.rpartition(" ")
        if not head or not count.isdigit():
            continue
        frames = head.split(";")
        thread, frames = frames[0], [_frame(f) for f in frames[1:]]
        stacks.append((thread, frames, int(count)))
        threads[thread] += int(count)
    if not stacks:
        return f"{path}: no samples"

    def idle(frames: list[str]) -> bool:
        return not frames or frames[-1].split(" (", 1)[0] in IDLE_FUNCTIONS

    busy_by_thread: Counter[str] = Counter()
    for thread, frames, count in stacks:
        if not idle(frames):
            busy_by_thread[thread] += count
    main = (busy_by_thread or threads).most_common(1)[0][0]
    total = threads[main]
    busy = busy_by_thread[main]
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for thread, frames, count in stacks:
        if thread != main or idle(frames):
            continue
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    lines = [f"py-spy profile {path.name}: {main}, {total:,} samples, "
             f"{busy / total:.0%} busy (the rest waiting in select or sleeping); "
             f"shares below are of all its samples",
             "", "self (the function itself):"]
    lines += [f"  {n / total:6.1%}  {frame}" for frame, n in own.most_common(top)]
    lines += ["", "inclusive (the function and what it calls; frames on every busy stack left out):"]
    lines += [f"  {n / total:6.1%}  {frame}" for frame, n in inclusive.most_common()
              if n < busy][:top]
    others = [(t, n, busy_by_thread[t]) for t, n in threads.items() if t != main]
    if others:
        lines += ["", "other threads (busy samples / samples): " + ", ".join(
            f"{t} {b:,}/{n:,}" for t, n, b in sorted(others, key=lambda x: -x[2])[:5])]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print(summarize(args.file, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
