"""The examples under examples/ run and print what they should.

The retailer-CSV replay and the custom lexicon run as subprocesses, as a reader would run them;
their numbers are checked against values obtained another way (the TOML mapping of the KPI
guide through ``stream-kpis replay``, the guide's hand-worked numbers, and a word count of the
survey export written here). The Kafka and Redis examples need a running worker, so they are
imported (they must compile and import) and their pure parts are called.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import re
import subprocess
import sys
import tomllib
from datetime import date, datetime, timedelta
from pathlib import Path
from types import ModuleType

import orjson
import pytest
from click.testing import CliRunner

from stream_kpis.cli import cli

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
GUIDE_CONFIG = ROOT / "docs" / "examples" / "kpi-guide.toml"
STREAM_KPIS = str(Path(sys.executable).with_name("stream-kpis"))
_LINE = re.compile(r"^(?P<kpi>[a-z_]+)(?:\{(?P<labels>[^}]*)\})?(?: (?P<window>\d+[a-z]+))? = "
                   r"(?P<value>\S+)(?: \((?P<num>\S+) / (?P<den>\S+)\))?$")


def run(*args: str) -> str:
    """Run a command from the repository root, without the caller's STREAM_KPIS_* settings."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("STREAM_KPIS_")}
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def number(text: str | None) -> float | None:
    return None if text in (None, "None") else float(text)


def key(kpi: str, window: str | None, labels: dict[str, str]) -> tuple:
    return kpi, window, tuple(sorted(labels.items()))


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_says_what_it_shows_and_how_to_run_it():
    files = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".py", ".toml"))
    assert len(files) >= 4
    for path in files:
        head = path.read_text(encoding="utf-8")[:2500]
        assert "What it shows" in head and "Run it" in head, path.name


def test_replay_retailer_csv_prints_the_kpis_of_the_mapped_exports():
    lines = run(sys.executable, "examples/replay_retailer_csv.py").splitlines()
    assert lines[0] == "as_of = 2024-05-01T00:00:00Z"  # docs/kpi-guide.md: K = Apr 30
    assert lines[-1] == "# 39 events applied, 0 duplicates, 0 dead letters"
    printed = {}
    for line in lines[1:-1]:
        match = _LINE.match(line)
        assert match, line
        labels = dict(pair.split("=", 1) for pair in (match["labels"] or "").split(",") if pair)
        printed[key(match["kpi"], match["window"], labels)] = tuple(
            number(match[name]) for name in ("value", "num", "den"))
    # the guide's hand-worked numbers
    assert printed[key("members", None, {})] == (9, None, None)
    assert printed[key("tier_members", None, {"tier": "gold"})] == (1, None, None)
    # the same exports through the guide's TOML mapping and the command line
    result = CliRunner().invoke(cli, ["replay", "--config", str(GUIDE_CONFIG), "--output", "jsonl"],
                                env={"STREAM_KPIS_CONFIG": None})
    assert result.exit_code == 0, result.output
    expected = {key(r["kpi"], r["window"], r.get("labels", {})):
                (r["value"], r["numerator"], r["denominator"])
                for r in map(orjson.loads, result.stdout.splitlines())}
    assert printed == expected


def _surveys(config_path: Path) -> list[tuple[date, str]]:
    """(UTC day, comment) of the example's survey export, read with the csv module."""
    config = tomllib.loads(config_path.read_text(encoding="utf-8"))
    (source,) = config["replay"]["sources"]
    columns = source["columns"]
    with open(config_path.parent / source["path"], encoding="utf-8", newline="") as handle:
        return [(datetime.fromisoformat(row[columns["ts"]]).date(), row[columns["comment"]])
                for row in csv.DictReader(handle)]


def test_custom_lexicon_counts_the_comments_that_contain_each_term():
    config_path = EXAMPLES / "custom_lexicon.toml"
    lexicons = tomllib.loads(config_path.read_text(encoding="utf-8"))["feedback"]["lexicons"]
    output = run(STREAM_KPIS, "replay", "--config", str(config_path), "--output", "jsonl")
    got = {key(r["kpi"], r["window"], r["labels"]): r["value"]
           for r in map(orjson.loads, output.splitlines()) if r["kpi"] == "feedback_mentions"}
    surveys = _surveys(config_path)
    last_day = max(day for day, _ in surveys)  # daily buckets: K is the last event's day
    expected = {}
    for days in (7, 30):
        first_day = last_day - timedelta(days=days - 1)
        words = [set(re.findall(r"\w+", comment.casefold())) for day, comment in surveys
                 if first_day <= day <= last_day]
        for lexicon, terms in lexicons.items():
            for term in terms:
                labels = {"lexicon": lexicon, "term": term}
                expected[key("feedback_mentions", f"{days}d", labels)] = sum(term in w for w in words)
    assert got == expected
    # by hand: "slow" in Q-5 ("Slowly ... slow") and Q-8 in Apr 1-30; Q-1 (Mar 28) is older
    assert got[key("feedback_mentions", "30d", {"lexicon": "speed", "term": "slow"})] == 2
    assert got[key("feedback_mentions", "30d", {"lexicon": "service", "term": "checkout"})] == 0


def test_kpi_automation_acts_once_per_fall_below_the_goal():
    example = load("kpi_automation")
    rates = [("2024-05-01T00:00:00Z", "30d", 0.5), ("2024-05-01T00:00:00Z", "7d", 0.1),
             ("2024-05-02T00:00:00Z", "30d", 0.3), ("2024-05-03T00:00:00Z", "30d", 0.2),
             ("2024-05-04T00:00:00Z", "30d", None), ("2024-05-05T00:00:00Z", "30d", 0.35),
             ("2024-05-06T00:00:00Z", "30d", 0.34)]
    records = [{"kpi": "active_rate", "window": window, "as_of": as_of, "value": value,
                "numerator": None if value is None else round(value * 100), "denominator": 100}
               for as_of, window, value in rates]
    records.insert(2, {"kpi": "active_members", "window": "30d", "as_of": "x", "value": 1})
    lines = list(example.below_goal_changes(records, goal=0.35, window="30d"))
    assert [line.split(" ", 2)[:2] for line in lines] == [
        ["2024-05-02T00:00:00Z", "ACT:"], ["2024-05-05T00:00:00Z", "recovered:"],
        ["2024-05-06T00:00:00Z", "ACT:"]]
    assert "(30 of 100 members)" in lines[0]


@pytest.mark.parametrize("status", [None, {
    "last_touch": "2024-04-27T00:00:00Z", "status": "active", "points_balance": 190,
    "tier": "gold", "next_expiry_points": 90, "next_expiry_at": "2024-05-25T00:00:00Z"}])
def test_member_status_example_describes_a_stored_status(status):
    example = load("member_status_redis")
    text = example.describe_member("ana", status)
    if status is None:
        assert text.startswith("ana: not in the read model")
    else:
        assert text == ("ana: active, tier gold, 190 points, last touch 2024-04-27T00:00:00Z; "
                        "90 points expire at 2024-05-25T00:00:00Z")
