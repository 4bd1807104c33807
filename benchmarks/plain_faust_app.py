"""The loyalty KPI app a Faust user would write from Faust's documentation: the baseline that
``benchmarks/run.py`` compares a stream-kpis worker with (row ``plain_faust``).

It follows the docs' patterns and nothing else: one agent per input topic iterating
``async for value in stream``, JSON values (decoded in the agent, see the topics), state in Faust
tables -- a ``last_seen`` table of each member's latest purchase/redemption, and tumbling windowed
tables (``.tumbling(...)``, time taken from the event's own ``ts`` with ``.relative_to(...)``)
counting the distinct active members per 7/30/90-day window, and revenue, orders, points, new
members and NPS answers per 7-day window -- and a timer that logs the current windows. A member
counts as active in a window the first time one of its events lands in it, which is exact for
in-order events (a late event in an older window is not counted again: the approximation a table
of last-seen times gives).

Deliberately the straightforward app, not a strawman: it uses Faust's own defaults (memory store,
default buffer/poll/commit settings) and skips nothing that would cost a Faust user time to get
right. Choices that favour it: raw values decoded with orjson (below), the producer linger the
benchmark sets to the worker's 20 ms, windows without ``expires`` (Faust expires windows against
the wall clock, which would drop every window of a replayed 2024 backlog and add a heap push per
write), and global counters with one key per metric in the in-memory store (a single dict per
worker, so the counts are right for one worker without a ``group_by`` repartition hop). It also
computes a handful of KPIs where stream-kpis computes all of them.

    python benchmarks/plain_faust_app.py worker -l info

Environment: PLAIN_FAUST_APP_ID, PLAIN_FAUST_TOPIC_PREFIX (``loyalty.``), PLAIN_FAUST_BROKER
(``kafka://127.0.0.1:9092``), PLAIN_FAUST_PARTITIONS (4), PLAIN_FAUST_WEB_PORT (6067),
PLAIN_FAUST_DATA_DIR, PLAIN_FAUST_PRODUCER_LINGER (seconds, Faust's default 0).
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timedelta
from typing import Any

import faust
import orjson

log = logging.getLogger(__name__)

PREFIX = os.environ.get("PLAIN_FAUST_TOPIC_PREFIX", "loyalty.")
DAY = timedelta(days=1)
WINDOWS = {"7d": 7 * DAY, "30d": 30 * DAY, "90d": 90 * DAY}

app = faust.App(
    os.environ.get("PLAIN_FAUST_APP_ID", "plain-loyalty-kpis"),
    broker=os.environ.get("PLAIN_FAUST_BROKER", "kafka://127.0.0.1:9092"),
    topic_partitions=int(os.environ.get("PLAIN_FAUST_PARTITIONS", "4")),
    web_bind="127.0.0.1",
    web_host="127.0.0.1",
    web_port=int(os.environ.get("PLAIN_FAUST_WEB_PORT", "6067")),
    datadir=os.environ.get("PLAIN_FAUST_DATA_DIR", "plain-faust-data"),
    # Faust's default (0: every table write is its own produce request to the changelog) unless
    # set; the benchmark gives it the stream-kpis worker's 20 ms so both batch the same way.
    producer_linger=float(os.environ.get("PLAIN_FAUST_PRODUCER_LINGER", "0")),
)

# Raw values decoded in the agents: with Faust's json codec one malformed message crashes the
# agent (ValueDecodeError out of ``async for``) and the supervisor restarts it after a pause, which
# a Faust user meets on the first bad line and fixes this way (the findings measured raw + orjson
# as the cheaper of the two, too).
purchases = app.topic(PREFIX + "purchases", value_serializer="raw")
redemptions = app.topic(PREFIX + "redemptions", value_serializer="raw")
enrollments = app.topic(PREFIX + "enrollments", value_serializer="raw")
surveys = app.topic(PREFIX + "surveys", value_serializer="raw")

latest_ts = 0.0   # the largest event time seen (seconds): "now" for the windows in the timer
current_ts = 0.0  # the time of the event being processed (seconds)


def event_seconds(event: Any) -> float:
    """The windows' clock: the time of the event being processed (``track`` keeps it), or the
    latest event time seen when called outside the stream (the timer)."""
    return current_ts if event is not None else latest_ts


def parse_ts(ts: Any) -> float:
    if isinstance(ts, str):
        return datetime.fromisoformat(ts).timestamp()
    return ts / 1000


def windowed(name: str, size: timedelta) -> Any:
    return app.Table(name, default=float).tumbling(size).relative_to(event_seconds)


last_seen = app.Table("last_seen", default=float)   # member_id -> latest activity (seconds)
members = app.Table("members", default=float)       # member_id -> first seen / enrolled (seconds)
totals = app.Table("totals", default=int)           # "members" -> members known
active = {w: windowed(f"active_members_{w}", size) for w, size in WINDOWS.items()}
sales = windowed("sales_7d", WINDOWS["7d"])                               # revenue/orders/points
redeemed = windowed("points_redeemed_7d", WINDOWS["7d"])
new_members = windowed("new_members_7d", WINDOWS["7d"])                   # by channel
nps = windowed("nps_7d", WINDOWS["7d"])                                   # responses/promoters/...


def decode(raw: bytes) -> dict[str, Any] | None:
    """The event as a dict, or None for input that is not a JSON object with a ``ts``."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) and "ts" in value else None


def track(value: dict[str, Any]) -> float:
    """Set the windows' clock to this event's time; returns it (seconds)."""
    global latest_ts, current_ts
    current_ts = ts = parse_ts(value["ts"])
    if ts > latest_ts:
        latest_ts = ts
    return ts


def seen_member(member_id: str, ts: float) -> None:
    if member_id not in members:
        members[member_id] = ts
        totals["members"] += 1


def activity(member_id: str, ts: float) -> None:
    """A purchase or redemption: count the member once per window it is active in."""
    seen_member(member_id, ts)
    previous = last_seen[member_id]
    if ts <= previous:
        return  # a late event: its windows may already count the member
    for w, size in WINDOWS.items():
        seconds = size.total_seconds()
        if previous < ts - ts % seconds:  # previous activity before this window started
            active[w]["active_members"] += 1
    last_seen[member_id] = ts


@app.agent(purchases)
async def on_purchase(stream: Any) -> None:
    async for raw in stream:
        value = decode(raw)
        if value is None:
            continue
        try:
            ts = track(value)
            amount = float(value["amount"])
            member_id = value.get("member_id")
            who = "member" if member_id else "guest"
            sales[f"revenue_{who}"] += amount
            sales[f"orders_{who}"] += 1
            if member_id:
                sales["points_earned"] += value.get("points") or 0
                activity(member_id, ts)
        except (KeyError, TypeError, ValueError):
            log.debug("skipping a bad purchase: %r", value)


@app.agent(redemptions)
async def on_redemption(stream: Any) -> None:
    async for raw in stream:
        value = decode(raw)
        if value is None or not value.get("member_id"):
            continue
        try:
            ts = track(value)
            redeemed["points_redeemed"] += int(value["points"])
            activity(value["member_id"], ts)
        except (KeyError, TypeError, ValueError):
            log.debug("skipping a bad redemption: %r", value)


@app.agent(enrollments)
async def on_enrollment(stream: Any) -> None:
    async for raw in stream:
        value = decode(raw)
        if value is None or not value.get("member_id"):
            continue
        try:
            ts = track(value)
            seen_member(value["member_id"], ts)
            new_members[value.get("channel") or "unknown"] += 1
        except (KeyError, TypeError, ValueError):
            log.debug("skipping a bad enrollment: %r", value)


@app.agent(surveys)
async def on_survey(stream: Any) -> None:
    async for raw in stream:
        value = decode(raw)
        if value is None:
            continue
        try:
            track(value)
            score = value.get("nps")
            if score is not None:
                nps["responses"] += 1
                if score >= 9:
                    nps["promoters"] += 1
                elif score <= 6:
                    nps["detractors"] += 1
        except (KeyError, TypeError, ValueError):
            log.debug("skipping a bad survey: %r", value)


@app.timer(10.0)
async def report() -> None:
    """The current windows (as of the latest event time), as a Faust user would log them."""
    if not latest_ts:
        return
    values = {f"active_members_{w}": active[w]["active_members"].value() for w in WINDOWS}
    values["members"] = totals["members"]
    responses = nps["responses"].value()
    if responses:
        values["nps_7d"] = 100 * (nps["promoters"].value() - nps["detractors"].value()) / responses
    log.info("KPIs as of %s: %s", datetime.fromtimestamp(latest_ts).isoformat(), values)


if __name__ == "__main__":
    app.main()
