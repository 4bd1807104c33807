"""scripts/render_charts.py --records: the README's charts from replayed KPI records, without a
broker or a Prometheus (the Prometheus path is tested in tests/integration/test_prometheus.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import orjson
from click.testing import CliRunner

from stream_kpis.cli import cli

ROOT = Path(__file__).resolve().parents[2]
EVENTS = ROOT / "tests" / "data" / "events.jsonl"


def test_charts_from_replayed_records(tmp_path):
    replayed = CliRunner().invoke(cli, ["replay", str(EVENTS), "--every", "1d", "--output", "jsonl"])
    assert replayed.exit_code == 0, replayed.output
    records_path = tmp_path / "kpis.jsonl"
    records_path.write_text(replayed.stdout + "not a record\n", encoding="utf-8")
    done = subprocess.run([sys.executable, "scripts/render_charts.py", "--records", str(records_path),
                           "--dpi", "30", "-o", str(tmp_path / "charts")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    drawn = {name: (int(series), int(points)) for name, series, points
             in re.findall(r"/(\w+)\.png: (\d+) series, (\d+) points", done.stdout)}
    # one point per record with a value: counted here from the records themselves
    records = [orjson.loads(line) for line in replayed.stdout.splitlines()]
    with_value = Counter((r["kpi"], r["window"]) for r in records if r["value"] is not None)
    assert drawn["active_rate"] == (1, with_value[("active_rate", "30d")])
    assert drawn["points_liability"] == (1, with_value[("points_liability", None)])
    channels = {r["labels"]["channel"] for r in records
                if r["kpi"] == "new_members" and r["window"] == "30d"}
    assert drawn["new_members"] == (len(channels), with_value[("new_members", "30d")])
    # the cohort heatmap: the cohorts and cells of the latest evaluation (the final one)
    latest = max(r["as_of"] for r in records)
    cohort = [r for r in records if r["as_of"] == latest and r["kpi"].startswith("cohort_")]
    assert drawn["cohort_retention"] == (
        sum(r["kpi"] == "cohort_size" for r in cohort),
        sum(r["kpi"] == "cohort_retention" for r in cohort)) == (1, 1)  # Jan 2024, age 0
    for name in [*drawn, "overview"]:
        assert (tmp_path / "charts" / f"{name}.png").read_bytes().startswith(b"\x89PNG")


def test_records_without_kpis_fail(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"member_id": "m", "signal": "at_risk"}\n', encoding="utf-8")
    done = subprocess.run([sys.executable, "scripts/render_charts.py", "--records", str(empty),
                           "-o", str(tmp_path / "charts")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "no chart got any data" in done.stderr
