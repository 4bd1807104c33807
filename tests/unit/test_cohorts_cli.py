"""``stream-kpis cohorts``: the retention triangle of a replay, checked against the brute-force
oracle (tests/oracle.py) on a small file, and the table and CSV layouts.

The file (default settings: 1 h buckets), K = the bucket of the last event, in 2024-05:
  a  enrolls Jan 10 (web); buys Jan 20, Mar 5; redeems May 2
  b  enrolls Feb 28 23:30; buys Feb 29 (age 0), Apr 30 23:59 (age 2)
  c  buys Feb 10 before enrolling Feb 12 (age 0); the enrollment arrives after the purchase
  d  implicit: first seen buying Mar 31 23:00 -> cohort Mar
  e  enrolls Apr 1, only answers a survey (not activity) and is in no other event
  f  enrolls Dec 5 2023: older than the 4 cohorts shown (Feb .. May)
  g  enrolls May 3, buys May 3: K's month, age 0
  a guest buys in March (no cohort); a duplicate of b's February purchase
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime

import orjson
import pytest
from click.testing import CliRunner

from stream_kpis.cli import CohortRow, cli, cohort_csv, cohort_triangle
from stream_kpis.settings import Settings
from tests.oracle import brute_force_kpis


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


def enrollment(eid: str, member: str, ts: str, channel: str | None = None) -> dict:
    return {"type": "enrollment", "event_id": eid, "member_id": member, "ts": ms(ts), "channel": channel}


def purchase(eid: str, member: str | None, ts: str, amount: float = 10.0) -> dict:
    return {"type": "purchase", "event_id": eid, "member_id": member, "ts": ms(ts), "amount": amount}


EVENTS = [
    enrollment("e-f", "f", "2023-12-05T10:00"),
    enrollment("e-a", "a", "2024-01-10T09:00", "web"),
    purchase("p-a1", "a", "2024-01-20T12:00"),
    purchase("p-c1", "c", "2024-02-10T12:00"),
    enrollment("e-b", "b", "2024-02-28T23:30"),
    purchase("p-b1", "b", "2024-02-29T08:00"),
    purchase("p-a2", "a", "2024-03-05T12:00"),
    purchase("g-1", None, "2024-03-06T12:00"),
    purchase("p-d1", "d", "2024-03-31T23:00"),
    enrollment("e-e", "e", "2024-04-01T00:00"),
    {"type": "survey", "event_id": "s-e", "member_id": "e", "ts": ms("2024-04-02T10:00"), "nps": 9},
    purchase("p-b2", "b", "2024-04-30T23:59"),
    {"type": "redemption", "event_id": "r-a", "member_id": "a", "ts": ms("2024-05-02T10:00"), "points": 5},
    enrollment("e-c", "c", "2024-02-12T00:00"),  # late: after c's purchase in arrival order
    purchase("p-b1", "b", "2024-02-29T08:00"),   # duplicate
    enrollment("e-g", "g", "2024-05-03T08:00"),
    purchase("p-g1", "g", "2024-05-03T09:00"),
]


@pytest.fixture
def events_file(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in EVENTS))
    return path


def oracle_triangle(cohorts: int, ages: int) -> dict[str, tuple[int, list[float]]]:
    """cohort -> (cohort_size, [cohort_retention by age]) from the brute force, as of the last
    event's bucket with the default settings."""
    settings = Settings()
    K = max(e["ts"] for e in EVENTS) // settings.bucket_ms
    result = brute_force_kpis(EVENTS, bucket_ms=settings.bucket_ms, windows=list(settings.windows),
                              churn_horizon=settings.churn_horizon, settle=settings.settle,
                              as_of=K, cohorts=cohorts, cohort_ages=ages)
    triangle: dict[str, tuple[int, dict[int, float]]] = {}
    for (kpi, _, labels), (value, _, _) in result.items():
        labels = dict(labels)
        if kpi == "cohort_size":
            triangle.setdefault(labels["cohort"], (0, {}))
            triangle[labels["cohort"]] = (value, triangle[labels["cohort"]][1])
        elif kpi == "cohort_retention":
            triangle.setdefault(labels["cohort"], (0, {}))[1][int(labels["age"])] = value
    return {cohort: (size, [cells[a] for a in range(len(cells))])
            for cohort, (size, cells) in triangle.items()}


def run(*args: str):
    result = CliRunner().invoke(cli, ["cohorts", *map(str, args), "--no-progress"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("cohorts, ages", [(4, 3), (12, 12), (1, 1), (6, 2)])
def test_csv_equals_the_oracle(events_file, cohorts, ages):
    result = run(events_file, "--output", "csv", "--cohorts", cohorts, "--ages", ages)
    header, *rows = list(csv.reader(io.StringIO(result.stdout)))
    expected = oracle_triangle(cohorts, ages)
    width = max(len(cells) for _, cells in expected.values())
    assert header == ["cohort", "members", *[f"age_{a}" for a in range(width)]]
    got = {row[0]: (int(row[1]), [cell for cell in row[2:] if cell != ""]) for row in rows}
    assert got == {cohort: (size, [f"{100 * value:.2f}" for value in cells])
                   for cohort, (size, cells) in expected.items()}
    assert [row[0] for row in rows] == sorted(got)  # oldest cohort first
    assert "applied 16 events, 1 duplicates" in result.stderr


def test_the_oracle_triangle_is_the_hand_worked_one():
    """The file's triangle for 4 cohorts and 3 ages, worked out by hand (see the module
    docstring): the oracle must give it, or the comparison above proves nothing."""
    assert oracle_triangle(4, 3) == {
        # b and c; both active in Feb; nobody in Mar; b in Apr
        "2024-02": (2, [1.0, 0.0, 0.5]),
        # d only (implicit, first purchase Mar 31); active in Mar only
        "2024-03": (1, [1.0, 0.0, 0.0]),
        # e: a survey is not activity
        "2024-04": (1, [0.0, 0.0]),
        # g, active in May
        "2024-05": (1, [1.0]),
    }


def test_table_shows_percentages_and_sizes(events_file):
    out = run(events_file, "--cohorts", 4, "--ages", 3).stdout
    assert "Cohort retention as of 2024-05-03T10:00:00Z" in out
    rows = {line.split()[1]: line.split()[2:] for line in out.splitlines()
            if line.startswith("│ 20")}
    assert {cohort: [cell for cell in cells if cell != "│"] for cohort, cells in rows.items()} == {
        "2024-02": ["2", "100.0%", "0.0%", "50.0%"],
        "2024-03": ["1", "100.0%", "0.0%", "0.0%"],
        "2024-04": ["1", "0.0%", "0.0%"],
        "2024-05": ["1", "100.0%"],
    }


def test_config_cohort_settings_are_the_default(events_file, tmp_path):
    config = tmp_path / "kpis.toml"
    config.write_text("[kpis]\ncohorts = 2\ncohort_ages = 2\n", encoding="utf-8")
    header, *rows = list(csv.reader(io.StringIO(
        run(events_file, "--config", config, "--output", "csv").stdout)))
    assert header == ["cohort", "members", "age_0", "age_1"]
    assert [row[:2] for row in rows] == [["2024-04", "1"], ["2024-05", "1"]]


def test_cohorts_off_in_the_config_is_a_usage_error(events_file, tmp_path):
    config = tmp_path / "kpis.toml"
    config.write_text("[kpis]\ncohorts = 0\n", encoding="utf-8")
    result = CliRunner().invoke(cli, ["cohorts", str(events_file), "--config", str(config)])
    assert result.exit_code == 2 and "--cohorts N" in result.output


def test_triangle_and_csv_of_records():
    records = [
        {"kpi": "members", "window": None, "value": 3},
        {"kpi": "cohort_size", "window": None, "value": 4, "labels": {"cohort": "2024-03"}},
        {"kpi": "cohort_retention", "window": None, "value": 0.25,
         "labels": {"age": "1", "cohort": "2024-03"}},
        {"kpi": "cohort_retention", "window": None, "value": 1 / 3,
         "labels": {"age": "0", "cohort": "2024-03"}},
        {"kpi": "cohort_size", "window": None, "value": 2, "labels": {"cohort": "2024-02"}},
    ]
    rows = cohort_triangle(records)
    assert rows == [CohortRow("2024-02", 2, ()), CohortRow("2024-03", 4, (1 / 3, 0.25))]
    assert cohort_csv(rows) == "cohort,members,age_0,age_1\n2024-02,2,,\n2024-03,4,33.33,25.00\n"
