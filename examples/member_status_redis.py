"""Read a member's status, and the program's KPIs, from the Redis read model.

What it shows: with ``redis_url`` set, the workers keep the latest state in Redis for
applications that must not talk to Kafka: one hash per member (``last_touch``, ``status``,
``points_balance``, ``tier``, ``next_expiry_points``, ``next_expiry_at``), one hash per KPI
series, and a sorted set of the members at risk, longest-silent first. The read functions of
``stream_kpis.live.readmodel`` turn that layout back into plain dicts (numbers as numbers, nulls
as None), so a call-centre screen or a CRM sync needs a Redis client and nothing else.

Run it next to a worker that writes to Redis (``make demo`` starts both):

    .venv/bin/python examples/member_status_redis.py m-000042 [--config my.toml]

It prints the member's status (or says the read model does not know the member), the 30-day
active rate, and the five members at risk for longest.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

import redis

from stream_kpis.live.readmodel import at_risk_members, read_kpi, read_member
from stream_kpis.settings import load_settings


def describe_member(member_id: str, status: dict | None) -> str:
    """One readable line about a member's stored status."""
    if status is None:
        return f"{member_id}: not in the read model (unknown member, or no worker wrote it yet)"
    text = (f"{member_id}: {status['status']}, tier {status['tier']}, "
            f"{status['points_balance']} points, last touch {status['last_touch']}")
    if status["next_expiry_points"] is not None:
        text += f"; {status['next_expiry_points']} points expire at {status['next_expiry_at']}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("member_id")
    parser.add_argument("--config", default=None, help="the workers' TOML settings file")
    args = parser.parse_args()
    settings = load_settings(args.config)
    if settings.redis_url is None:
        parser.error("these settings have no redis_url: the workers write no read model")
    prefix = settings.redis_prefix
    with redis.Redis.from_url(settings.redis_url) as client:
        print(describe_member(args.member_id, read_member(client, prefix, args.member_id)))
        rate = read_kpi(client, prefix, "active_rate", "30d")
        if rate is not None:
            print(f"active_rate 30d as of {rate['as_of']}: {rate['value']} "
                  f"({rate['numerator']} / {rate['denominator']})")
        for member_id, last_touch in at_risk_members(client, prefix, 5):
            since = datetime.fromtimestamp(last_touch, UTC).date()
            print(f"at risk: {member_id}, silent since {since}")


if __name__ == "__main__":
    main()
