"""Replay a retailer's own CSV exports through a column mapping, and print the KPIs.

What it shows: a shop's exports keep their own column names and timestamp formats; a
``Source`` per file maps our field names (``event_id``, ``member_id``, ``ts``, ``amount``, ...) to
theirs and says how to read the time, and ``replay()`` runs the files through the same core as
the live worker, interleaved by time. Bad rows would become dead letters (counted, not fatal).

The data is the worked example of docs/kpi-guide.md (docs/examples/*.csv); the KPI settings come
from its config's ``[kpis]`` table. The same mapping written as TOML is the ``[[replay.sources]]``
of docs/examples/kpi-guide.toml, for ``stream-kpis replay --config docs/examples/kpi-guide.toml``.

Run it from the repository root:

    .venv/bin/python examples/replay_retailer_csv.py

It prints one line per KPI record, ``kpi{labels} window = value (numerator / denominator)``,
the format of the KPI guide's tables.
"""

from __future__ import annotations

from pathlib import Path

from stream_kpis.replay import Source, replay
from stream_kpis.settings import load_settings

DATA = Path(__file__).resolve().parents[1] / "docs" / "examples"

#: our field -> the shop's column, per export
SOURCES = [
    Source(DATA / "signups.csv", format="csv", type="enrollment",
           ts_format="%Y-%m-%d",  # a date only: midnight UTC
           columns={"event_id": "signup_id", "member_id": "card_no", "ts": "signup_date",
                    "channel": "source", "tier": "level"}),
    Source(DATA / "orders.csv", format="csv", type="purchase",
           ts_format="%Y-%m-%d %H:%M%z",  # local time with its UTC offset
           columns={"event_id": "order_no", "member_id": "card_no", "ts": "ordered_at",
                    "amount": "total", "margin": "margin", "points": "pts",
                    "store_id": "store", "tier": "level"}),
    Source(DATA / "redemptions.csv", format="csv", type="redemption",
           ts_format="%d/%m/%Y",  # day/month/year
           columns={"event_id": "redemption_id", "member_id": "card_no", "ts": "redeemed_on",
                    "points": "points_used", "reward_id": "reward"}),
    Source(DATA / "surveys.csv", format="csv", type="survey", ts_format="rfc3339",
           columns={"event_id": "response_id", "member_id": "card_no", "ts": "answered_at",
                    "nps": "recommend", "csat": "satisfaction", "comment": "comment"}),
]


def format_record(record: dict) -> str:
    """``kpi{label=value,...} window = value (numerator / denominator)``."""
    labels = ",".join(f"{name}={value}" for name, value in record.get("labels", {}).items())
    text = record["kpi"] + (f"{{{labels}}}" if labels else "")
    if record["window"] is not None:
        text += f" {record['window']}"
    text += f" = {record['value']}"
    if record["numerator"] is not None or record["denominator"] is not None:
        text += f" ({record['numerator']} / {record['denominator']})"
    return text


def main() -> None:
    settings = load_settings(DATA / "kpi-guide.toml")  # bucket 1d, windows 7d and 30d, ...
    result = replay(SOURCES, settings)
    print(f"as_of = {result.records[0]['as_of']}")
    for record in result.records:
        print(format_record(record))
    bad = sum(result.dead_letters.values())
    print(f"# {result.applied} events applied, {result.duplicates} duplicates, {bad} dead letters")


if __name__ == "__main__":
    main()
