"""Tests of ``stream-kpis replay``: JSONL and mapped CSV files through the core, outputs, dead
letters, member signals and config errors. Expected values are worked out in the comments.

tests/data/events.jsonl (default settings: 1 h buckets, windows 7d/30d/90d), line by line:
  1 ann enrolls Jan 1 09:00 (web, gold)      7 "not json": malformed_json
  2 ann buys 40.0, 40 points, Jan 2 09:00Z   8 guest purchase with amount -3: negative_amount
  3 guest buys 10, Jan 3 12:00               9 blank
  4 bob enrolls Jan 4 00:00 (store)          10 type "refund": unknown_type
  5 ann redeems 15 points, Jan 5 08:00      11 bob's survey, nps 9, "Love the rewards", Jan 5 10:00
  6 line 2 again: duplicate                 12 bob buys 20, 20 points, Jan 6 10:30
K = the bucket of Jan 6 10:30 -> as of its end, 2024-01-06T11:00:00Z.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from stream_kpis.cli import cli, main
from stream_kpis.core.events import REASONS

DATA = Path(__file__).resolve().parent.parent / "data"
EVENTS = DATA / "events.jsonl"
SHOP = DATA / "shop" / "shop.toml"


@pytest.fixture
def replay():
    """``replay(*args)``: run ``stream-kpis replay`` in-process; returns the click Result."""
    runner = CliRunner()

    def run(*args: str):
        result = runner.invoke(cli, ["replay", *map(str, args)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result

    return run


def jsonl(text: str | bytes) -> list[dict]:
    return [orjson.loads(line) for line in (text.splitlines() if text else []) if line.strip()]


def by_key(records: list[dict]) -> dict:
    out = {}
    for record in records:
        key = (record["kpi"], record["window"], tuple(sorted(record.get("labels", {}).items())))
        assert key not in out, key
        out[key] = record
    return out


def kpi(records: dict, name: str, window: str | None = None, **labels) -> tuple:
    record = records[(name, window, tuple(sorted(labels.items())))]
    return record["value"], record["numerator"], record["denominator"]


# --- JSONL ------------------------------------------------------------------------------------


def test_replay_jsonl_values(replay):
    result = replay(EVENTS, "--output", "jsonl")
    records = by_key(jsonl(result.stdout))
    assert {r["as_of"] for r in records.values()} == {"2024-01-06T11:00:00Z"}
    assert kpi(records, "members") == (2, None, None)
    # the 7d window [Dec 30 11:00, Jan 6 11:00) holds everything
    assert kpi(records, "active_rate", "7d") == (1.0, 2, 2)  # ann (Jan 5), bob (Jan 6)
    assert kpi(records, "redemption_participation", "7d") == (0.5, 1, 2)
    assert kpi(records, "aov_member", "7d") == (30.0, 60.0, 2)  # (40 + 20) / 2; line 6 ignored
    assert kpi(records, "aov_guest", "7d") == (10.0, 10.0, 1)  # line 8 was a dead letter
    assert kpi(records, "member_spend_lift", "7d") == (2.0, 30.0, 10.0)
    assert kpi(records, "points_burn_rate", "7d") == (0.25, 15, 60)
    assert kpi(records, "points_liability") == (45, None, None)  # 60 - 15, no validity
    assert kpi(records, "new_members", "7d", channel="web") == (1, None, None)
    assert kpi(records, "new_members", "7d", channel="store") == (1, None, None)
    assert kpi(records, "enrollment_rate", "7d")[1:] == (2, 3)  # 2 new / (2 + 1 guest order)
    assert kpi(records, "nps_member", "7d") == (100.0, 1, 1)
    # shipped lexicons: "love" and "rewards" are motivation terms
    assert kpi(records, "feedback_mentions", "7d", lexicon="motivation", term="rewards")[0] == 1
    assert kpi(records, "feedback_mentions", "7d", lexicon="motivation", term="reward")[0] == 0
    assert kpi(records, "tier_members", tier="gold") == (1, None, None)
    assert kpi(records, "tier_members", tier="unknown") == (1, None, None)
    assert kpi(records, "avg_lifetime_spend") == (30.0, 60.0, 2)


def test_replay_summary_on_stderr(replay):
    result = replay(EVENTS, "--output", "jsonl")
    assert result.stderr.strip() == (
        "applied 7 events, 1 duplicates, 3 dead letters (malformed_json: 1, negative_amount: 1, "
        "unknown_type: 1), 0 member signals")
    assert "applied" not in result.stdout


def table_rows(text: str) -> dict[tuple[str, str, str], list[str]]:
    """(kpi, window, labels) -> [value, numerator, denominator] from the rich tables."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if len(cells) == 6 and cells[0] not in ("kpi", ""):
            rows[(cells[0], cells[1], cells[2])] = cells[3:]
    return rows


def test_replay_table(replay):
    result = replay(EVENTS)
    assert "KPIs as of 2024-01-06T11:00:00Z" in result.stdout
    for topic in ("active-rate", "redemption", "churn", "engagement", "satisfaction"):
        assert f"loyalty.kpi.{topic}" in result.stdout
    rows = table_rows(result.stdout)
    assert rows[("members", "", "")] == ["2", "null", "null"]
    assert rows[("active_rate", "7d", "")] == ["1.0000", "2", "2"]
    assert rows[("aov_member", "30d", "")] == ["30.0000", "60.0000", "2"]
    assert rows[("new_members", "7d", "channel=store")] == ["1", "null", "null"]
    assert rows[("one_and_done_rate", "", "")] == ["null", "0", "0"]  # nobody settled (90d)


def test_replay_every_day_gives_a_series(replay):
    result = replay(EVENTS, "--output", "jsonl", "--every", "1d")
    records = jsonl(result.stdout)
    as_of = list(dict.fromkeys(r["as_of"] for r in records))  # in order of appearance
    # an evaluation at each midnight that event time passed, then the final one
    assert as_of == ["2024-01-02T00:00:00Z", "2024-01-03T00:00:00Z", "2024-01-04T00:00:00Z",
                     "2024-01-05T00:00:00Z", "2024-01-06T00:00:00Z", "2024-01-06T11:00:00Z"]
    members = {r["as_of"]: r["value"] for r in records if r["kpi"] == "members"}
    # bob enrolls at Jan 4 00:00, i.e. after the evaluation as of Jan 4 00:00
    assert members == {"2024-01-02T00:00:00Z": 1, "2024-01-03T00:00:00Z": 1,
                       "2024-01-04T00:00:00Z": 1, "2024-01-05T00:00:00Z": 2,
                       "2024-01-06T00:00:00Z": 2, "2024-01-06T11:00:00Z": 2}
    guest_orders = {r["as_of"]: r["denominator"] for r in records
                    if r["kpi"] == "aov_guest" and r["window"] == "7d"}
    assert guest_orders["2024-01-03T00:00:00Z"] == 0 and guest_orders["2024-01-04T00:00:00Z"] == 1


def test_replay_dead_letters_file(replay, tmp_path):
    dead_path = tmp_path / "dead.jsonl"
    replay(EVENTS, "--output", "jsonl", "--dead-letters", dead_path)
    dead = jsonl(dead_path.read_bytes())
    assert [(d["reason"], d["offset"]) for d in dead] == [
        ("malformed_json", 7), ("negative_amount", 8), ("unknown_type", 10)]
    assert all(d["topic"] == str(EVENTS) for d in dead)  # the file, and the line as offset
    assert dead[0]["value"] == "not json"
    assert orjson.loads(dead[1]["value"])["amount"] == -3


def test_replay_member_signals_file(replay, tmp_path):
    config = tmp_path / "risk.toml"
    config.write_text('[kpis]\nat_risk_horizon = "1d"\n', encoding="utf-8")
    signals_path = tmp_path / "signals.jsonl"
    result = replay(EVENTS, "--config", config, "--output", "jsonl", "--signals", signals_path)
    # At risk when the touch bucket is <= K - 24 (1 h buckets), checked as the clock moves:
    # p1 moves it to Jan 2 09:00: ann (enrolled Jan 1 09:00) is at risk just before p1 applies;
    # p1 makes her active (silently). p2 moves it to Jan 3 12:00 >= Jan 2 09:00 + 24 h: at risk.
    # r1 moves it to Jan 5 08:00: bob (Jan 4 00:00) at risk; then r1 makes ann active.
    # p4 moves it to Jan 6 10:00 >= Jan 5 08:00 + 24 h: ann at risk (before p4 makes bob active).
    signals = jsonl(signals_path.read_bytes())
    assert [(s["member_id"], s["signal"], s["as_of"], s["last_touch"]) for s in signals] == [
        ("ann", "at_risk", "2024-01-02T10:00:00Z", "2024-01-01T09:00:00Z"),
        ("ann", "at_risk", "2024-01-03T13:00:00Z", "2024-01-02T09:00:00Z"),
        ("bob", "at_risk", "2024-01-05T09:00:00Z", "2024-01-04T00:00:00Z"),
        ("ann", "at_risk", "2024-01-06T11:00:00Z", "2024-01-05T08:00:00Z"),
    ]
    assert result.stderr.strip().endswith("4 member signals")


def test_replay_member_signals_come_in_the_same_order_in_every_run(tmp_path):
    """Members whose status changes as the clock passes their touch bucket are told in id order,
    not in the order of a set of ids (which follows the process's string hash seed): two runs
    with other seeds write the same file."""
    events = tmp_path / "events.jsonl"
    run = [sys.executable, "-m", "stream_kpis"]
    subprocess.run([*run, "generate", "--seed", "5", "--members", "150", "--days", "120", "-o",
                    str(events)], check=True, capture_output=True)
    config = tmp_path / "days.toml"  # day buckets: many members change status at one as_of
    config.write_text('[kpis]\nbucket = "1d"\n', encoding="utf-8")
    written = []
    for seed in ("1", "2"):
        path = tmp_path / f"signals-{seed}.jsonl"
        subprocess.run([*run, "replay", str(events), "--config", str(config), "--signals", str(path)],
                       check=True, capture_output=True, env={**os.environ, "PYTHONHASHSEED": seed})
        written.append(path.read_bytes())
    signals = jsonl(written[0])
    as_of = [signal["as_of"] for signal in signals]
    assert len(signals) > 20 and len(set(as_of)) < len(as_of)  # some as_of with several
    assert written[0] == written[1]


def test_replay_csv_with_our_column_names(replay, tmp_path):
    csv_path = tmp_path / "mixed.csv"
    csv_path.write_text(
        "type,event_id,member_id,ts,amount,points\n"
        "enrollment,e1,m1,2024-01-01T00:00:00Z,,\n"
        "purchase,p1,m1,2024-01-01T05:00:00Z,12.5,3\n"
        "purchase,p2,,1704085200000,7.5,\n",  # 2024-01-01T05:00Z, a guest
        encoding="utf-8")
    records = by_key(jsonl(replay(csv_path, "--output", "jsonl").stdout))
    assert kpi(records, "members") == (1, None, None)
    assert kpi(records, "member_revenue_share", "7d") == (12.5 / 20.0, 12.5, 20.0)
    assert kpi(records, "points_earned", "7d") == (3, None, None)


# --- standard input ---------------------------------------------------------------------------


def test_replay_dash_reads_standard_input(replay, tmp_path):
    """``replay -`` through a real pipe (a pipe has no size and no position, unlike a file)."""
    dead_path = tmp_path / "dead.jsonl"
    piped = subprocess.run(
        [sys.executable, "-m", "stream_kpis", "replay", "-", "--output", "jsonl",
         "--dead-letters", str(dead_path)],
        input=EVENTS.read_bytes(), capture_output=True, timeout=120, check=True)
    records = by_key(jsonl(piped.stdout))
    # the same hand-worked values as from the file (see the module docstring)
    assert {r["as_of"] for r in records.values()} == {"2024-01-06T11:00:00Z"}
    assert kpi(records, "members") == (2, None, None)
    assert kpi(records, "aov_member", "7d") == (30.0, 60.0, 2)
    assert kpi(records, "points_burn_rate", "7d") == (0.25, 15, 60)
    assert records == by_key(jsonl(replay(EVENTS, "--output", "jsonl").stdout))
    assert piped.stderr.decode().strip().startswith("applied 7 events, 1 duplicates, 3 dead letters")
    dead = jsonl(dead_path.read_bytes())
    assert [(d["topic"], d["offset"], d["reason"]) for d in dead] == [
        ("<stdin>", 7, "malformed_json"), ("<stdin>", 8, "negative_amount"),
        ("<stdin>", 10, "unknown_type")]


# --- mapped CSV -------------------------------------------------------------------------------

# tests/data/shop, daily buckets, V = 30 d, windows 7d/30d (all dates 2024):
#   signups  C1 Jan 1 web, C2 Jan 10 store                          (ts_format %Y%m%d)
#   tills    R1 C1 Jan 2 50.00 50 pts, R2 guest Jan 3 20.00 (empty card id), R3 C2 Jan 10 30.00
#            30 pts, R4 C1 Jan 15 10.00 10 pts, R6 amount "abc" (line 6)  (%d/%m/%Y %H:%M, ";")
#   redemptions  X1 C1 Jan 20 30 pts; X2 empty card id (line 3)     (epoch_ms)
#   nps      N1 C1 Jan 21 12:00 10 "Muito lento"; N2 no card Jan 22 08:00 3 "lento demais..."
# K = Jan 22, as of 2024-01-23T00:00:00Z. 7d = [Jan 16, Jan 22], 30d = [Dec 24, Jan 22].


@pytest.fixture
def shop(replay, tmp_path):
    dead_path = tmp_path / "dead.jsonl"
    result = replay("--config", SHOP, "--output", "jsonl", "--dead-letters", dead_path)
    return by_key(jsonl(result.stdout)), jsonl(dead_path.read_bytes()), result.stderr


def test_mapped_csv_values(shop):
    records, _, _ = shop
    assert {r["as_of"] for r in records.values()} == {"2024-01-23T00:00:00Z"}
    assert kpi(records, "members") == (2, None, None)  # C1, C2; the guest and N2 are not
    assert kpi(records, "new_members", "30d", channel="web") == (1, None, None)
    assert kpi(records, "new_members", "30d", channel="store") == (1, None, None)
    assert kpi(records, "enrollment_rate", "30d")[1:] == (2, 3)  # 2 / (2 + guest R2)
    assert kpi(records, "active_rate", "7d") == (0.5, 1, 2)  # C1's redemption Jan 20
    assert kpi(records, "aov_member", "30d") == (30.0, 90.0, 3)  # 50 + 30 + 10
    assert kpi(records, "aov_guest", "30d") == (20.0, 20.0, 1)
    assert kpi(records, "member_spend_lift", "30d") == (0.5, 30.0, 20.0)
    assert kpi(records, "repeat_purchase_rate", "30d") == (0.5, 1, 2)  # C1 twice, C2 once
    assert kpi(records, "points_earned", "30d") == (90, None, None)  # the guest's 20 belong to nobody
    assert kpi(records, "points_redeemed", "30d") == (30, None, None)


def test_mapped_csv_points_validity(shop):
    records, _, _ = shop
    # lots: C1 R1 50 (Jan 2, expires Feb 1), R4 10 (Feb 14); C2 R3 30 (Feb 9).
    # X1 30 on Jan 20 takes from R1 (Jan 2 <= Jan 20 < Feb 1): R1 20 left. Nothing unbacked.
    assert kpi(records, "points_liability") == (60, None, None)  # 20 + 10 + 30
    assert kpi(records, "points_expiring", "7d") == (0, None, None)  # [Jan 23, Jan 29]
    assert kpi(records, "points_expiring", "30d") == (60, None, None)  # [Jan 23, Feb 21]
    assert kpi(records, "expired_points", "30d") == (0, None, None)
    assert kpi(records, "breakage_rate") == (None, 0, 0)  # no lot has expired yet


def test_mapped_csv_survey_source(shop):
    records, _, _ = shop
    assert kpi(records, "survey_responses", "7d") == (2, None, None)
    assert kpi(records, "nps", "7d") == (0.0, 0, 2)  # one promoter (10), one detractor (3)
    assert kpi(records, "nps_member", "7d") == (100.0, 1, 1)
    assert kpi(records, "nps_guest", "7d") == (-100.0, -1, 1)
    assert kpi(records, "feedback_mentions", "7d", lexicon="friction", term="lento") == (2, None, None)


def test_mapped_csv_dead_letters_and_summary(shop):
    _, dead, stderr = shop
    assert sorted((Path(d["topic"]).name, d["offset"], d["reason"]) for d in dead) == [
        ("redemptions.csv", 3, "missing_field"),  # a redemption needs a card id
        ("tills.csv", 6, "bad_type"),  # amount "abc"
    ]
    assert stderr.strip() == ("applied 9 events, 0 duplicates, 2 dead letters (bad_type: 1, "
                              "missing_field: 1), 0 member signals")


def write_shop(tmp_path: Path, source: str, csv_name: str = "tills.csv",
               csv_text: str = "receipt,card,when,total\nR1,C1,20240105,5\n") -> Path:
    (tmp_path / csv_name).write_text(csv_text, encoding="utf-8")
    config = tmp_path / "shop.toml"
    config.write_text(textwrap.dedent(source), encoding="utf-8")
    return config


@pytest.mark.parametrize("ts_format, cells, bad", [
    ("%Y%m%d", ["20240105", "2024-01-06"], [3]),
    # inf, nan and seconds whose milliseconds overflow a float: dead letters, not a crash
    ("epoch_s", ["1704412800.5", "inf", "1e306", "nan", "1e400"], [3, 4, 5, 6]),
])
def test_csv_timestamp_its_format_cannot_read_is_a_bad_timestamp(replay, tmp_path, ts_format,
                                                                  cells, bad):
    rows = "".join(f"R{i},C1,{cell},5\n" for i, cell in enumerate(cells, 1))
    config = write_shop(tmp_path, f"""
        [[replay.sources]]
        path = "tills.csv"
        type = "purchase"
        ts_format = "{ts_format}"
        columns = {{ event_id = "receipt", member_id = "card", ts = "when", amount = "total" }}
        """, csv_text="receipt,card,when,total\n" + rows)
    dead_path = tmp_path / "dead.jsonl"
    result = replay("--config", config, "--output", "jsonl", "--dead-letters", dead_path)
    dead = jsonl(dead_path.read_bytes())
    assert [(d["offset"], d["reason"]) for d in dead] == [(line, "bad_timestamp") for line in bad]
    assert f"applied {len(cells) - len(bad)} events" in result.stderr


def test_csv_row_with_more_cells_than_the_header_is_a_dead_letter(tmp_path, capsys):
    config = write_shop(tmp_path, """
        [[replay.sources]]
        path = "tills.csv"
        type = "purchase"
        ts_format = "%Y%m%d"
        columns = { event_id = "receipt", member_id = "card", ts = "when", amount = "total" }
        """, csv_text="receipt,card,when,total\nR1,C1,20240105,5,EXTRA\nR2,C1,20240106,5\n")
    dead_path = tmp_path / "dead.jsonl"
    # bad input never stops a replay (SPEC 1): the row goes to the dead letters
    main(["replay", "--config", str(config), "--output", "jsonl", "--dead-letters", str(dead_path)])
    dead = jsonl(dead_path.read_bytes())
    assert [d["offset"] for d in dead] == [2]
    assert dead[0]["reason"] in REASONS
    assert "applied 1 events" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("source", "fragments"),
    [
        ('[[replay.sources]]\ntype = "purchase"\n', ["[[replay.sources]] #1", "missing 'path'"]),
        ('[[replay.sources]]\npath = "tills.csv"\ntype = "purchase"\n'
         'columns = { event_id = "receipt", total_amount = "total" }\n',
         ["[[replay.sources]] #1", "total_amount"]),
        ('[[replay.sources]]\npath = "tills.csv"\ntype = "purchase"\nsheet = 1\n',
         ["[[replay.sources]] #1", "sheet"]),
        ('[[replay.sources]]\npath = "tills.csv"\n', ["[[replay.sources]] #1", "type"]),
        ('[[replay.sources]]\npath = "tills.csv"\ntype = "refund"\n',
         ["[[replay.sources]] #1", "'refund'"]),
        ('[[replay.sources]]\npath = "tills.csv"\ntype = "purchase"\n'
         '[[replay.sources]]\npath = "tills.csv"\ntype = "purchase"\nformat = "xlsx"\n',
         ["[[replay.sources]] #2", "'xlsx'"]),
    ],
    ids=["missing-path", "unknown-field-in-columns", "unknown-key", "csv-without-type",
         "unknown-type", "bad-format-second-entry"],
)
def test_config_errors_name_the_file_entry_and_field(tmp_path, capsys, source, fragments):
    config = write_shop(tmp_path, source)
    with pytest.raises(SystemExit) as exit_info:
        main(["replay", "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert str(config) in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_column_missing_from_the_header_names_the_file_and_column(tmp_path, capsys):
    config = write_shop(tmp_path, """
        [[replay.sources]]
        path = "tills.csv"
        type = "purchase"
        columns = { event_id = "receipt_no", member_id = "card", ts = "when", amount = "total" }
        """)
    with pytest.raises(SystemExit) as exit_info:
        main(["replay", "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "tills.csv") in err
    assert "'receipt_no'" in err and "columns" in err


def test_missing_input_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["replay", str(tmp_path / "nope.jsonl")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "nope.jsonl" in err and "check the path" in err


def test_missing_config_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["replay", "--config", str(tmp_path / "nope.toml"), str(EVENTS)])
    assert exit_info.value.code == 2
    assert "nope.toml not found" in capsys.readouterr().err


def test_replay_needs_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["replay"])
    assert exit_info.value.code == 2
    assert "at least one FILE" in capsys.readouterr().err


def test_batches_change_no_replay_output(tmp_path, monkeypatch):
    """A replay hands the core batches of events; the final records, the --every series, the
    counts and every signal are what one event at a time gives (generated data: late and
    duplicate events, points validity, surveys with comments)."""
    from stream_kpis import replay as replay_module
    from stream_kpis.core import Processor
    from stream_kpis.generate import GeneratorConfig, write_jsonl
    from stream_kpis.settings import Settings

    path = tmp_path / "events.jsonl"
    write_jsonl(GeneratorConfig(members=400, days=40), path)
    settings = Settings(points_validity_ms=20 * 86_400_000, points_expiring_notice_ms=5 * 86_400_000)

    def run():
        signals: list = []
        result = replay_module.replay([replay_module.source_for_path(path)], settings,
                                      every_ms=3 * 86_400_000, on_signal=signals.append)
        return result, signals

    monkeypatch.setattr(replay_module, "BATCH_EVENTS", 97)  # batches end mid-bucket too
    batched, batched_signals = run()
    monkeypatch.setattr(Processor, "process_batch",
                        lambda self, events: [self.process(event) for event in events])
    one_by_one, signals = run()
    assert batched.applied > 1000 and batched.duplicates and signals  # the data exercises it
    assert batched_signals == signals
    assert batched.series == one_by_one.series
    assert batched.records == one_by_one.records
    assert (batched.applied, batched.duplicates, batched.dead_letters, batched.signals) == \
        (one_by_one.applied, one_by_one.duplicates, one_by_one.dead_letters, one_by_one.signals)


def test_csv_rows_are_what_csv_dictreader_reads(tmp_path):
    """read_csv_rows reads cells by index; its rows (the dead letters' original values) and
    line numbers are csv.DictReader's: blank lines skipped, short rows padded with nulls,
    cells beyond the header kept under _extra_cells, a repeated column name's last cell."""
    import csv
    import io

    from stream_kpis.replay import Source, read_csv_rows

    text = ('id,card,day,card\r\n"a, quoted",C1,20240101,C9\r\n\r\ns2,C2\r\n'
            's3,C3,20240103,C4,extra,more\r\n"multi\nline",  ,20240104,\r\n')
    source = Source(path=tmp_path / "x.csv", format="csv", type="enrollment",
                    ts_format="%Y%m%d", columns={"event_id": "id", "member_id": "card", "ts": "day"})
    rows = list(read_csv_rows(source, io.StringIO(text, newline="")))
    reader = csv.DictReader(io.StringIO(text, newline=""))
    expected = []
    for row in reader:
        extra = row.pop(None, None)
        expected.append((reader.line_num, row if extra is None else {**row, "_extra_cells": extra}))
    assert [(row.line, orjson.loads(row.raw)) for row in rows] == expected
    assert [row.error[0] if row.error else row.fields for row in rows] == [
        {"event_id": "a, quoted", "member_id": "C9", "ts": 1_704_067_200_000},
        {"event_id": "s2"},  # no card, no day: the parser names what is missing
        "bad_value",
        {"event_id": "multi\nline", "ts": 1_704_326_400_000},
    ]


def test_commands_collect_garbage_less_often(replay):
    """Every command sets stream_kpis.runtime.GC_THRESHOLDS (benchmarks/gc_thresholds.py says
    why); Python's defaults are a young pass every 700 allocations."""
    from stream_kpis.runtime import GC_THRESHOLDS

    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        replay(EVENTS, "--output", "jsonl")
        assert gc.get_threshold() == GC_THRESHOLDS != (700, 10, 10)
    finally:
        gc.set_threshold(*before)


def test_replay_leaves_no_reference_cycles():
    """Replay keeps the cyclic garbage collector off what the core holds (gc.freeze between
    batches), which is only sound while it makes no reference cycles: with the collector off,
    a replay of JSONL and mapped CSV with dead letters, duplicates and signals leaves nothing
    for it to find, and gives back what it froze."""
    from stream_kpis.replay import load_sources, replay, source_for_path
    from stream_kpis.settings import load_settings

    settings = load_settings(SHOP, env={})
    sources = [*load_sources(SHOP), source_for_path(EVENTS)]
    replay(sources, settings)  # first use: imports and caches (regex, lru_cache) settle
    gc.collect()
    gc.disable()
    try:
        result = replay(sources, settings, every_ms=86_400_000, on_dead_letter=lambda d: None)
        assert sum(result.dead_letters.values()) > 0 and result.duplicates > 0
        assert gc.collect() == 0
    finally:
        gc.enable()
    assert gc.get_freeze_count() == 0
