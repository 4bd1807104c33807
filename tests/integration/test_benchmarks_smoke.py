"""Smoke test of the benchmark runner: ``benchmarks/run.py --quick --only replay,limit`` runs
against the real local broker, prints its table with a ratio column, and leaves no topics behind.

It checks the machinery (produce, raw consume, replay, table, cleanup), not the numbers: speed is
measured by ``make bench``, never by a timed test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from kafka import KafkaAdminClient

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_prints_a_table_with_ratios(kafka_bootstrap: str,
                                               kafka_admin: KafkaAdminClient) -> None:
    env_port = kafka_bootstrap.rsplit(":", 1)[1]
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "run.py"), "--quick", "--only", "replay,limit"],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("STREAM_KPIS_")},
             "KAFKA_PORT": env_port})
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"

    lines = done.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| bench"))
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    assert "ratio" in columns and "baseline" in columns
    ratio = columns.index("ratio")
    rows = {}
    for line in lines:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == len(columns) and cells[0] in ("limit", "replay"):
            rows[(cells[0], cells[1])] = cells
    limit = [cells for (bench, _), cells in rows.items() if bench == "limit"]
    replay = [cells for (bench, _), cells in rows.items() if bench == "replay"]
    assert len(limit) == 1 and limit[0][ratio] == "1.00x"  # the limit is its own baseline
    assert len(replay) >= 3
    # every throughput row of the replay has a ratio to the read+orjson baseline
    for cells in replay:
        if cells[columns.index("unit")] == "events/s":
            assert re.fullmatch(r"\d+\.\d\dx", cells[ratio]), cells

    run_id = re.search(r"run (bench-run-[0-9a-f]+)", done.stderr).group(1)
    assert not [name for name in kafka_admin.list_topics() if name.startswith(run_id)]
