"""docs/kpi-guide.md's worked example, checked against ``stream-kpis replay``.

The guide states the numbers of its example (docs/examples/) in fenced blocks that this test reads:

- ```` ```kpi [variant] ````: one record per line, ``kpi{label=value,...} window = value
  (numerator / denominator)``; no window for non-windowed KPIs, no parentheses for KPIs whose
  numerator and denominator are null; ``as_of = <RFC 3339>`` for the as-of time of every record.
  A value rounded to n decimals must be within half a unit of its n-th decimal of the replay's.
- ```` ```signals [variant] ````: one member signal per line, ``as_of member signal
  last_touch=... [points=... expires_at=...]``; in a variant's block each line starts with ``-`` or
  ``+``: the change from the main example's list.

Variants: none (the main example, ``kpi-guide.toml``), ``no-expiry`` (``kpi-guide-no-expiry.toml``),
``on-time`` (the main example with orders.csv in time order, so the late receipt is in its
place) and ``segments`` (``kpi-guide-segments.toml``: the main example with ``[kpis] segments``,
whose blocks state some of the segment records it adds) and ``clv`` (``kpi-guide-clv.toml``: its
own data, clv-orders.csv, with ``[clv]``; its blocks state every predictive CLV record, the only
KPIs the main example, without ``[clv]``, does not have). The numbers in the guide were worked out
by hand from SPEC.md (the reasoning is written next to them), not copied from the tool's output;
this test is what keeps the two in step.

A ```` ```console ```` block whose first line is ``$ stream-kpis cohorts ...`` is followed by that
command's exact standard output.
"""

from __future__ import annotations

import csv
import re
import shlex
import shutil
import tomllib
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from stream_kpis.cli import cli
from stream_kpis.core.kpis import KPI_TOPICS

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "kpi-guide.md"
EXAMPLES = ROOT / "docs" / "examples"
MAIN = "main"
SEGMENTS = "segments"
CLV = "clv"
CONFIGS = {MAIN: "kpi-guide.toml", "no-expiry": "kpi-guide-no-expiry.toml", "on-time": "kpi-guide.toml",
           SEGMENTS: "kpi-guide-segments.toml", CLV: "kpi-guide-clv.toml"}
SIGNAL_TYPES = {"at_risk", "churned", "reactivated", "points_expiring"}

_BLOCK = re.compile(r"^```(kpi|signals)(?:[ \t]+([\w-]+))?[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
_KPI_LINE = re.compile(
    r"^(?P<kpi>[a-z_]+)(?:\{(?P<labels>[^}]*)\})?(?:[ \t]+(?P<window>\d+[a-z]+))?[ \t]*=[ \t]*"
    r"(?P<value>\S+)(?:[ \t]+\((?P<num>\S+)[ \t]*/[ \t]*(?P<den>\S+)\))?[ \t]*$")
_AS_OF_LINE = re.compile(r"^as_of[ \t]*=[ \t]*(?P<as_of>\S+)[ \t]*$")
_SIGNAL_LINE = re.compile(
    r"^(?:(?P<op>[+-])[ \t]+)?(?P<as_of>\S+)[ \t]+(?P<member>\S+)[ \t]+(?P<signal>[a-z_]+)[ \t]+"
    r"last_touch=(?P<touch>\S+)(?:[ \t]+points=(?P<points>\d+)[ \t]+expires_at=(?P<expires>\S+))?"
    r"[ \t]*$")
_SUMMARY_LINE = re.compile(r"^applied \d+ events.*$", re.M)
_COHORTS_BLOCK = re.compile(r"^```console\n\$ stream-kpis (cohorts [^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)

Key = tuple[str, str | None, tuple[tuple[str, str], ...]]
SignalRow = tuple[str, str, str, str, int | None, str | None]


@dataclass(frozen=True)
class Statement:
    """One ``kpi`` line of the guide."""

    variant: str
    line: int
    text: str
    key: Key
    value: str
    numerator: str | None
    denominator: str | None


@dataclass(frozen=True)
class SignalStatement:
    variant: str
    line: int
    op: str | None
    row: SignalRow


def _line_number(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def parse_guide(text: str):
    """(kpi statements, as_of statements, signal statements, lines that do not parse)."""
    statements: list[Statement] = []
    as_ofs: list[tuple[str, str]] = []
    signals: list[SignalStatement] = []
    bad: list[str] = []
    for block in _BLOCK.finditer(text):
        kind, variant, body = block.group(1), block.group(2) or MAIN, block.group(3)
        first = _line_number(text, block.start(3))
        if variant not in CONFIGS:
            bad.append(f"line {first - 1}: unknown variant {variant!r}")
            continue
        for index, raw in enumerate(body.splitlines()):
            line, number = raw.strip(), first + index
            if not line:
                continue
            if kind == "kpi":
                as_of = _AS_OF_LINE.match(line)
                match = _KPI_LINE.match(line)
                if as_of:
                    as_ofs.append((variant, as_of["as_of"]))
                elif match:
                    labels = tuple(sorted(
                        tuple(pair.split("=", 1)) for pair in (match["labels"] or "").split(",") if pair))
                    statements.append(Statement(variant, number, line,
                                                (match["kpi"], match["window"], labels),
                                                match["value"], match["num"], match["den"]))
                else:
                    bad.append(f"line {number}: {line}")
            else:
                match = _SIGNAL_LINE.match(line)
                if not match or (match["op"] is None) != (variant == MAIN):
                    bad.append(f"line {number}: {line}")
                    continue
                points = None if match["points"] is None else int(match["points"])
                signals.append(SignalStatement(variant, number, match["op"], (
                    match["as_of"], match["member"], match["signal"], match["touch"], points,
                    match["expires"])))
    return statements, as_ofs, signals, bad


GUIDE_TEXT = GUIDE.read_text(encoding="utf-8")
STATEMENTS, AS_OFS, SIGNALS, BAD_LINES = parse_guide(GUIDE_TEXT)


# --- running the example ---------------------------------------------------------------------


@dataclass
class Run:
    records: dict[Key, dict]
    signals: list[SignalRow]
    summary: str


def _key(record: dict) -> Key:
    return (record["kpi"], record["window"], tuple(sorted(record.get("labels", {}).items())))


def _signal_row(signal: dict) -> SignalRow:
    return (signal["as_of"], signal["member_id"], signal["signal"], signal["last_touch"],
            signal.get("points"), signal.get("expires_at"))


def _replay(config: Path, signals_path: Path) -> Run:
    result = CliRunner().invoke(cli, ["replay", "--config", str(config), "--output", "jsonl",
                                      "--signals", str(signals_path), "--no-progress"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    records: dict[Key, dict] = {}
    for line in result.stdout.splitlines():
        record = orjson.loads(line)
        assert _key(record) not in records, record
        records[_key(record)] = record
    signals = [_signal_row(orjson.loads(line)) for line in signals_path.read_bytes().splitlines()]
    return Run(records, signals, result.stderr.strip())


def _orders_in_time_order(directory: Path) -> None:
    """Rewrite the purchase export of the copied example in timestamp order (the on-time variant)."""
    config = tomllib.loads((directory / CONFIGS["on-time"]).read_text(encoding="utf-8"))
    (source,) = [s for s in config["replay"]["sources"] if s["type"] == "purchase"]
    path = directory / source["path"]
    with path.open(newline="", encoding="utf-8") as handle:
        header, *rows = list(csv.reader(handle))
    column = header.index(source["columns"]["ts"])
    ordered = sorted(rows, key=lambda row: datetime.strptime(row[column], source["ts_format"]))
    assert ordered != rows, "orders.csv is already in time order: the on-time variant shows nothing"
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, lineterminator="\n").writerows([header, *ordered])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    out = {}
    for variant, config in CONFIGS.items():
        work = tmp_path_factory.mktemp(variant)
        directory = EXAMPLES
        if variant == "on-time":
            directory = work / "examples"
            shutil.copytree(EXAMPLES, directory)
            _orders_in_time_order(directory)
        out[variant] = _replay(directory / config, work / "signals.jsonl")
    return out


# --- comparing --------------------------------------------------------------------------------


def number_matches(stated: str, actual: float | int | None) -> bool:
    """``stated`` as written in the guide (``null``, ``9``, ``0.3333``) against the tool's value.

    A number written with n decimals must be within half a unit of the n-th decimal; an integer
    must be exact.
    """
    if stated == "null":
        return actual is None
    if actual is None or isinstance(actual, bool):
        return False
    number = Decimal(stated)
    exponent = number.as_tuple().exponent
    if exponent >= 0:
        return actual == int(number)
    return abs(Decimal(repr(float(actual))) - number) <= Decimal(5).scaleb(exponent - 1)


@pytest.mark.parametrize("rounded, actual, ok", [
    ("0.3333", 1 / 3, True), ("0.333", 1 / 3, True), ("0.3334", 1 / 3, False),
    ("-0.0667", 1 / 3 - 0.4, True), ("-0.0666", 1 / 3 - 0.4, False), ("25", 25.0, True),
    ("25", 25.4, False), ("0", 0.0, True), ("null", None, True), ("0", None, False),
    ("null", 0, False), ("0.125", 0.125, True),
])
def test_number_matches(rounded, actual, ok):
    assert number_matches(rounded, actual) is ok


def test_every_line_of_the_guide_blocks_parses():
    assert not BAD_LINES, "lines in kpi/signals blocks the test cannot read:\n" + "\n".join(BAD_LINES)
    assert len(STATEMENTS) > 90 and len(SIGNALS) > 19


@pytest.mark.parametrize("statement", STATEMENTS,
                         ids=[f"{s.variant}:{s.line}:{s.text.split(' = ')[0]}" for s in STATEMENTS])
def test_stated_number_equals_replay(runs, statement: Statement):
    record = runs[statement.variant].records.get(statement.key)
    assert record is not None, f"guide line {statement.line} states {statement.key}; replay has none"
    got = (record["value"], record["numerator"], record["denominator"])
    assert number_matches(statement.value, record["value"]), (statement.text, got)
    if statement.numerator is None:
        assert record["numerator"] is None and record["denominator"] is None, (statement.text, got)
    else:
        assert number_matches(statement.numerator, record["numerator"]), (statement.text, got)
        assert number_matches(statement.denominator, record["denominator"]), (statement.text, got)


def test_stated_as_of(runs):
    assert (MAIN, "2024-05-01T00:00:00Z") in AS_OFS
    for variant, as_of in AS_OFS:
        assert {r["as_of"] for r in runs[variant].records.values()} == {as_of}


def test_guide_states_every_record_of_the_example(runs):
    stated = Counter(s.key for s in STATEMENTS if s.variant == MAIN)
    assert not [key for key, n in stated.items() if n > 1], "stated twice"
    replayed = set(runs[MAIN].records)
    assert sorted(replayed - set(stated)) == [], "records of the example the guide does not state"
    assert sorted(set(stated) - replayed) == [], "stated records the replay does not produce"
    assert {key[0] for key in replayed} == set(KPI_TOPICS) - CLV_KPIS


CLV_KPIS = {kpi for kpi, topic in KPI_TOPICS.items() if topic == "clv"}


def test_guide_states_every_record_of_the_clv_example(runs):
    """The CLV example (its own data) is stated for its predictive CLV records, all of them."""
    stated = Counter(s.key for s in STATEMENTS if s.variant == CLV)
    assert not [key for key, n in stated.items() if n > 1], "stated twice"
    replayed = {key for key in runs[CLV].records if key[0] in CLV_KPIS}
    assert {key[0] for key in replayed} == CLV_KPIS
    assert sorted(replayed - set(stated)) == [], "CLV records of the example the guide does not state"
    assert sorted(set(stated) - replayed) == [], "stated records that are not CLV records"


@pytest.mark.parametrize("variant", [v for v in CONFIGS if v not in (MAIN, SEGMENTS, CLV)])
def test_variant_differs_only_where_the_guide_says(runs, variant):
    """The guide says that every number it does not restate for a variant is the main example's."""
    stated = {s.key for s in STATEMENTS if s.variant == variant}
    assert stated
    main, other = runs[MAIN].records, runs[variant].records
    assert set(main) == set(other)
    for key in set(main) - stated:
        assert other[key] == main[key], key
    for key in stated:
        assert other[key] != main[key], f"{variant} restates {key} but it is the same as the main example"


def test_segments_variant_adds_segment_records_and_changes_nothing_else(runs):
    """The segments config adds one record per KPI and value of its dimensions (the guide states
    some of them); every record of the main example stays as it is."""
    main, segmented = runs[MAIN].records, runs[SEGMENTS].records
    assert {key: segmented[key] for key in main} == main
    added = set(segmented) - set(main)
    config = tomllib.loads((EXAMPLES / CONFIGS[SEGMENTS]).read_text(encoding="utf-8"))
    assert {label for _, _, labels in added for label, _ in labels} == set(config["kpis"]["segments"])
    assert all(len(labels) == 1 for _, _, labels in added)
    stated = {s.key for s in STATEMENTS if s.variant == SEGMENTS}
    assert stated and stated <= added
    assert {labels[0][0] for _, _, labels in stated} == set(config["kpis"]["segments"])


COHORT_COMMANDS = _COHORTS_BLOCK.findall(GUIDE_TEXT)


def test_guide_shows_the_cohorts_command():
    assert COHORT_COMMANDS


@pytest.mark.parametrize("command, output", COHORT_COMMANDS, ids=[c for c, _ in COHORT_COMMANDS])
def test_stated_cohorts_output_equals_the_command(command, output, monkeypatch):
    monkeypatch.chdir(ROOT)  # the guide's commands run from the repository root
    result = CliRunner().invoke(cli, [*shlex.split(command), "--no-progress"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.stdout == output


def _stated_signals(variant: str) -> list[SignalRow]:
    rows = Counter(s.row for s in SIGNALS if s.variant == MAIN)
    for statement in (s for s in SIGNALS if s.variant == variant != MAIN):
        if statement.op == "-":
            assert rows[statement.row], f"guide line {statement.line} removes an unlisted signal"
            rows[statement.row] -= 1
        else:
            rows[statement.row] += 1
    return sorted(rows.elements())


@pytest.mark.parametrize("variant", [v for v in CONFIGS if v != CLV])  # CLV: its own data
def test_stated_signals_equal_replay(runs, variant):
    assert _stated_signals(variant) == sorted(runs[variant].signals)


def test_example_has_every_kind_of_signal():
    assert {s.row[2] for s in SIGNALS if s.variant == MAIN} == SIGNAL_TYPES


def test_stated_replay_summary(runs):
    lines = _SUMMARY_LINE.findall(GUIDE_TEXT)
    assert lines
    assert set(lines) == {runs[MAIN].summary}


def test_every_kpi_and_signal_has_a_heading():
    headings = "\n".join(line for line in GUIDE_TEXT.splitlines() if line.startswith("#"))
    named = set(re.findall(r"`([a-z_]+)(?:\{[^}]*\})?`", headings))
    assert set(KPI_TOPICS) <= named, sorted(set(KPI_TOPICS) - named)
    for signal in SIGNAL_TYPES:
        assert f"- `{signal}`:" in GUIDE_TEXT, signal
