"""An automation driven by a KPI topic: act when the 30-day active rate falls below a goal.

What it shows: the workers publish every KPI record to a Kafka topic (``loyalty.kpi.active-rate``
for ``active_rate`` and ``active_members``), a JSON object per record with ``kpi``, ``window``,
``as_of``, ``value``, ``numerator`` and ``denominator``. A consumer of that topic can start a
campaign, open a ticket or page someone. Read it with ``isolation_level="read_committed"``: the
workers write in Kafka transactions, and a record of an aborted transaction must never trigger
anything. The broker and security settings come from the same settings as the workers'.

Run it next to a worker (``make demo`` starts one):

    .venv/bin/python examples/kpi_automation.py --goal 0.35 [--window 30d] [--config my.toml]

It prints an action line each time a new ``as_of`` drops below the goal, and a recovery line
when it is back at or above it; Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator

import orjson

from stream_kpis.live.kafka_tools import client_config
from stream_kpis.settings import load_settings


def below_goal_changes(records: Iterable[dict], goal: float, window: str) -> Iterator[str]:
    """Action lines for the ``active_rate`` records of ``window``: one when the rate falls below
    ``goal``, one when it recovers; nothing while it stays on the same side, and nothing for a
    rate without members (value null)."""
    below = False
    for record in records:
        if record.get("kpi") != "active_rate" or record.get("window") != window:
            continue
        value = record.get("value")
        if value is None:
            continue
        if value < goal and not below:
            below = True
            yield (f"{record['as_of']} ACT: active_rate {window} = {value:.3f} "
                   f"({record['numerator']} of {record['denominator']} members) < goal {goal}")
        elif value >= goal and below:
            below = False
            yield f"{record['as_of']} recovered: active_rate {window} = {value:.3f} >= goal {goal}"


def kpi_records(config: str | None) -> Iterator[dict]:
    """Every record published to the active-rate KPI topic from now on (committed ones only)."""
    from kafka import KafkaConsumer

    settings = load_settings(config)
    consumer = KafkaConsumer(settings.topics.kpi_active_rate,
                             isolation_level="read_committed",  # never act on an aborted write
                             auto_offset_reset="latest", enable_auto_commit=False, group_id=None,
                             **client_config(settings))
    try:
        for message in consumer:
            yield orjson.loads(message.value)
    finally:
        consumer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--goal", type=float, required=True, help="e.g. 0.35 for 35%%")
    parser.add_argument("--window", default="30d", help="a window the workers compute")
    parser.add_argument("--config", default=None, help="the workers' TOML settings file")
    args = parser.parse_args()
    try:
        for line in below_goal_changes(kpi_records(args.config), args.goal, args.window):
            print(line, flush=True)  # here: start the win-back campaign, open a ticket, ...
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
