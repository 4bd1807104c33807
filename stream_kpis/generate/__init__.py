"""Seeded synthetic loyalty-program event stream (pure Python + orjson, no Kafka).

Used by the demo, the tests and the benchmarks. :func:`generate_events` yields one JSON Lines
line (bytes, no newline) per event, each object carrying a ``"type"`` field (``purchase``,
``redemption``, ``enrollment``, ``survey``) plus the SPEC section 1 fields.

The stream is a discrete-event simulation (a calendar queue of hourly slots), so it comes out
in timestamp order at a small, constant cost per event, with the program's realism built in:

- members enroll over the whole period (a launch wave first) through ``web``, ``app``,
  ``store``, ``partner`` and ``referral``, with tiers ``bronze`` .. ``platinum``; a purchase
  that lifts lifetime spend over a threshold carries the new tier;
- some members never send an enrollment event: their first purchase creates them;
- buying behaviour varies: heavy, regular and light buyers, one-and-done buyers, members who
  never buy, and churners who stop buying after a while;
- activity follows a daily curve, busier weekends and a gentle trend (one shared intensity);
- guests (``member_id`` null) buy smaller baskets than members; purchases carry points and
  usually a ``margin`` (sometimes negative);
- redemptions mostly spend points already earned, occasionally more;
- surveys (``nps`` and/or ``csat``) from members and guests, some with comments in English,
  Portuguese, Spanish, Arabic and Persian that mention friction or motivation words.

Delivery noise: duplicates are byte-identical repeats emitted soon after the original, late
events are held back (up to ``max_late_ms``) and emitted after later events, and malformed lines
(broken JSON, missing fields, wrong types, negative amounts, ...) are extra lines, one defect
each, that never stand in for a real event. Timestamps are epoch ms, some RFC 3339 strings with
offsets. Everything is a pure function of :class:`GeneratorConfig` (seed included).

The package: :mod:`.config` (what to generate, what was generated), :mod:`.population` (the
activity curve and the members' profiles), :mod:`.simulation` (the event loop and the delivery
noise) and :mod:`.text` (timestamps, comments, malformed lines).
"""

from __future__ import annotations

from collections.abc import Iterator
from os import PathLike
from typing import IO

from .config import GenerateSummary, GeneratorConfig
from .population import Members, Timeline
from .simulation import Simulation
from .text import MALFORMED_REASONS

__all__ = [
    "GeneratorConfig",
    "GenerateSummary",
    "generate_events",
    "write_jsonl",
    "estimate_event_count",
    "MALFORMED_REASONS",
]

# For estimate_event_count: points of a mean member purchase at points_per_unit 1 (basket x tier
# bonus), and earned points per redemption, measured at the default redemption settings.
_MEAN_POINTS_PER_PURCHASE = 49.0 * 1.15
_EARNED_POINTS_PER_REDEMPTION = 550.0


def generate_events(config: GeneratorConfig | None = None) -> Iterator[bytes]:
    """The synthetic stream for ``config``: one JSON line (bytes, no trailing newline) per item.

    Memory is O(members + pending events), not O(events). Same config (seed included), same
    bytes.
    """
    return Simulation(config or GeneratorConfig()).lines()


def write_jsonl(config: GeneratorConfig,
                path_or_file: str | PathLike[str] | IO[bytes]) -> GenerateSummary:
    """Write the stream as JSON Lines (each line ends in ``\\n``) to a path or a binary file.

    Returns what was written. A path is created or truncated; a file object is left open.
    """
    simulation = Simulation(config)
    if isinstance(path_or_file, str | PathLike):
        with open(path_or_file, "wb") as handle:
            _write_lines(simulation.lines(), handle)
    else:
        _write_lines(simulation.lines(), path_or_file)
    return simulation.summary()


def _write_lines(lines: Iterator[bytes], handle: IO[bytes], batch: int = 4096) -> None:
    chunk: list[bytes] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) == batch:
            chunk.append(b"")
            handle.write(b"\n".join(chunk))
            chunk = []
    if chunk:
        chunk.append(b"")
        handle.write(b"\n".join(chunk))


def estimate_event_count(config: GeneratorConfig) -> int:
    """Roughly how many lines :func:`generate_events` yields for ``config`` (within ~10%).

    Costs O(members + days): it draws the member profiles but simulates no events.
    """
    timeline = Timeline(config)
    members = Members(config, timeline)
    member_purchases = members.expected_purchases(timeline)
    purchases = member_purchases / (1.0 - config.guest_share)
    enrollments = sum(members.enrolls)
    earned = member_purchases * _MEAN_POINTS_PER_PURCHASE * config.points_per_unit
    redemptions = earned / _EARNED_POINTS_PER_REDEMPTION * min(1.0, config.redeem_propensity / 0.3)
    surveys = purchases * config.survey_rate
    events = purchases + enrollments + redemptions + surveys
    return round(events * (1.0 + config.duplicate_rate + config.malformed_rate))
