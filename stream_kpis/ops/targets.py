"""The KPI targets file: its format, the checks that make it usable, the checked model.

A program manager writes the goals of the loyalty program in one TOML file
(``deploy/targets.toml``); :func:`load_targets` reads and checks it, and every error names the
place and what to write instead. :mod:`stream_kpis.ops.alerts` renders the Prometheus rules
and :mod:`stream_kpis.ops.dashboard` draws the goals from the checked :class:`TargetsConfig`.
Which KPIs exist, which have a window and which labels they carry come from the KPI catalogue
(:mod:`stream_kpis.core.catalogue`).

Targets file format::

    [defaults]                 # optional; applies to every [[target]] that omits the field
    for = "1h"                 # how long a target must be missed before the alert fires
    severity = "warning"       # info | warning | critical

    [[target]]                 # absolute: the KPI must satisfy `op value`
    kpi = "active_rate"
    window = "30d"             # required for windowed KPIs, forbidden for the others
    op = ">="                  # >=, >, <=, <
    value = 0.35
    note = "Q3 goal"           # optional free text, shown in the alert

    [[target]]                 # relative: value now - value `per` ago must satisfy `op change`
    kpi = "churn_rate"
    window = "90d"
    change = -0.01             # negative: must fall by at least 0.01 ...
    per = "90d"                # ... per 90 days (PromQL `offset`; default: the window)

    [[target]]                 # labelled KPIs may select one label value
    kpi = "new_members"
    window = "30d"
    labels = { channel = "web" }
    op = ">="
    value = 500

    [health]                   # optional; thresholds of the worker health alerts
    worker_down_for = "2m"

For a relative target without ``op``, a negative change means "must fall by at least",
a positive one "must rise by at least"; ``change = 0`` needs an explicit ``op``.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.catalogue import CATALOGUE
from ..core.timebase import duration_label, parse_duration
from ..exceptions import ConfigError

__all__ = [
    "ALL_KPIS",
    "DEFAULT_RUNBOOK",
    "KPI_LABELS",
    "OPS",
    "SEVERITIES",
    "UNWINDOWED_KPIS",
    "WINDOWED_KPIS",
    "HealthThresholds",
    "Target",
    "TargetsConfig",
    "TargetsConfigError",
    "load_targets",
    "parse_targets",
]

ALL_KPIS = frozenset(kpi.name for kpi in CATALOGUE)
WINDOWED_KPIS = frozenset(kpi.name for kpi in CATALOGUE if kpi.windowed)
UNWINDOWED_KPIS = ALL_KPIS - WINDOWED_KPIS
#: Labels (besides ``window``) that a KPI gauge carries, for the KPIs that have any.
KPI_LABELS: Mapping[str, tuple[str, ...]] = {kpi.name: kpi.labels for kpi in CATALOGUE
                                             if kpi.labels}  # fmt: skip

SEVERITIES = ("info", "warning", "critical")
#: Comparison operators of a target.
OPS = (">=", ">", "<=", "<")
DEFAULT_RUNBOOK = "docs/production.md"


class TargetsConfigError(ConfigError):
    """A targets file that cannot be used; the message says where and what to fix.

    ``path``, ``index`` (1-based position of the ``[[target]]``) and ``field`` locate it.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        index: int | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.index = index
        self.field = field



# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Target:
    """One goal on one KPI series.

    ``kind`` is "absolute" (KPI ``op`` ``value``) or "relative" (KPI now minus KPI ``per``
    ago ``op`` ``change``).
    """

    index: int
    kpi: str
    window: str | None
    labels: tuple[tuple[str, str], ...]
    op: str
    value: float | None
    change: float | None
    per: str | None
    for_: str
    severity: str
    note: str | None = None

    @property
    def kind(self) -> str:
        return "absolute" if self.change is None else "relative"

    @property
    def bound(self) -> float:
        """The number compared against: ``value`` or ``change``."""
        return self.value if self.change is None else self.change


@dataclass(frozen=True)
class HealthThresholds:
    """Thresholds of the worker health alerts (the ``[health]`` table)."""

    worker_down_for: str = "2m"
    # KPIs are emitted every emit_interval when something changed and whenever the as-of
    # bucket advances, so a quiet but healthy worker emits at least once per bucket (1h):
    # this must exceed the bucket width.
    no_emission_after: str = "90m"
    consumer_lag_min_messages: float = 1000
    consumer_lag_growing_for: str = "15m"
    dead_letter_rate: float = 1.0
    dead_letter_share: float = 0.01
    dead_letter_for: str = "5m"
    exporter_for: str = "5m"
    redis_errors_for: str = "10m"
    # the worker itself waits 6 emit intervals without progress before it counts a partition
    # as stalled; this is how long it must stay so before the alert fires
    stalled_for: str = "2m"
    target_no_data_for: str = "6h"
    runbook_url: str = DEFAULT_RUNBOOK


@dataclass(frozen=True)
class TargetsConfig:
    """A checked targets file."""

    targets: tuple[Target, ...] = ()
    health: HealthThresholds = field(default_factory=HealthThresholds)
    source: str = "<targets>"


# --------------------------------------------------------------------------- parsing

_TARGET_FIELDS = ("kpi", "window", "labels", "op", "value", "change", "per", "for", "severity",
                  "note")  # fmt: skip
_DEFAULT_FIELDS = ("for", "severity")
_TOP_LEVEL = ("target", "defaults", "health")
_HEALTH_DURATIONS = tuple(
    name for name, f in HealthThresholds.__dataclass_fields__.items()
    if f.type == "str" and name != "runbook_url"
)  # fmt: skip
_HEALTH_NUMBERS = tuple(
    name for name, f in HealthThresholds.__dataclass_fields__.items() if f.type == "float"
)


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


class _Place:
    """Where in the file we are, to build errors that point there."""

    def __init__(self, source: str, section: str, index: int | None = None) -> None:
        self.source = source
        self.section = section
        self.index = index

    def error(self, key: str | None, problem: str, fix: str) -> TargetsConfigError:
        where = f"{self.source}: {self.section}"
        if key is not None:
            where += f", field '{key}'"
        return TargetsConfigError(
            f"{where}: {problem}. {fix}", path=self.source, index=self.index, field=key
        )

    def check_keys(self, table: Mapping[str, Any], allowed: Iterable[str]) -> None:
        allowed = tuple(allowed)
        for key in table:
            if key not in allowed:
                raise self.error(
                    key,
                    f"unknown field{_did_you_mean(key, allowed)}",
                    f"Allowed fields: {', '.join(allowed)}.",
                )

    def string(self, table: Mapping[str, Any], key: str, example: str) -> str:
        value = table[key]
        if not isinstance(value, str) or not value.strip():
            raise self.error(
                key, f"expected a text value, got {value!r}", f'Write e.g. {key} = "{example}".'
            )
        return value.strip()

    def number(self, table: Mapping[str, Any], key: str, example: str) -> float:
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
            value
        ):
            raise self.error(
                key,
                f"expected a number, got {value!r}",
                f"Write a plain number without quotes, e.g. {key} = {example}.",
            )
        return float(value)

    def duration(self, table: Mapping[str, Any], key: str, example: str) -> str:
        text = self.string(table, key, example)
        try:
            return duration_label(parse_duration(text))
        except ValueError as exc:
            raise self.error(key, str(exc), f'Write e.g. {key} = "{example}".') from None

    def choice(self, table: Mapping[str, Any], key: str, choices: Iterable[str]) -> str:
        choices = tuple(choices)
        value = table[key]
        if value not in choices:
            raise self.error(
                key,
                f"{value!r} is not allowed",
                f"Use one of: {', '.join(repr(c) for c in choices)}.",
            )
        return value


def _parse_defaults(data: Mapping[str, Any], source: str) -> dict[str, str]:
    defaults = {"for": "1h", "severity": "warning"}
    table = data.get("defaults", {})
    place = _Place(source, "[defaults]")
    if not isinstance(table, Mapping):
        raise place.error(None, "must be a table", "Write a [defaults] section with for/severity.")
    place.check_keys(table, _DEFAULT_FIELDS)
    if "for" in table:
        defaults["for"] = place.duration(table, "for", "1h")
    if "severity" in table:
        defaults["severity"] = place.choice(table, "severity", SEVERITIES)
    return defaults


def _parse_target(
    table: Any,
    index: int,
    defaults: Mapping[str, str],
    source: str,
    known_windows: frozenset[str] | None,
) -> Target:
    place = _Place(source, f"[[target]] #{index}", index)
    if not isinstance(table, Mapping):
        raise place.error(None, "is not a table", "Write each target as a [[target]] section.")
    kpi = _parse_kpi(table, place)
    place.section = f"[[target]] #{index} (kpi = {kpi!r})"
    place.check_keys(table, _TARGET_FIELDS)
    window = _parse_window(table, place, kpi, known_windows)
    labels = _parse_labels(table, place, kpi)
    op, value, change, per = _parse_goal(table, place, kpi, window)
    for_ = place.duration(table, "for", "2h") if "for" in table else defaults["for"]
    severity = (
        place.choice(table, "severity", SEVERITIES) if "severity" in table else defaults["severity"]
    )
    note = place.string(table, "note", "Q3 goal") if "note" in table else None
    return Target(
        index=index, kpi=kpi, window=window, labels=labels, op=op, value=value,
        change=change, per=per, for_=for_, severity=severity, note=note,
    )  # fmt: skip


def _parse_kpi(table: Mapping[str, Any], place: _Place) -> str:
    """The target's KPI, one of the catalogue."""
    if "kpi" not in table:
        raise place.error("kpi", "missing", 'Name the KPI, e.g. kpi = "active_rate".')
    kpi = place.string(table, "kpi", "active_rate")
    if kpi not in ALL_KPIS:
        raise place.error(
            "kpi",
            f"unknown KPI {kpi!r}{_did_you_mean(kpi, ALL_KPIS)}",
            f"Known KPIs: {', '.join(sorted(ALL_KPIS))}.",
        )
    return kpi


def _parse_window(
    table: Mapping[str, Any], place: _Place, kpi: str, known_windows: frozenset[str] | None
) -> str | None:
    """The window label: required for a windowed KPI (and one the workers compute), else none."""
    if kpi not in WINDOWED_KPIS:
        if "window" in table:
            raise place.error("window", f"{kpi} has no window", "Remove the window field.")
        return None
    if "window" not in table:
        raise place.error(
            "window", f"{kpi} is computed per window; none given", 'Add e.g. window = "30d".'
        )
    window = place.duration(table, "window", "30d")
    if known_windows is not None and window not in known_windows:
        raise place.error(
            "window",
            f"the workers do not compute window {window!r}",
            f"Use one of the configured windows: {', '.join(sorted(known_windows))}.",
        )
    return window


def _parse_labels(table: Mapping[str, Any], place: _Place, kpi: str) -> tuple[tuple[str, str], ...]:
    """The selected label values (sorted pairs), each a label the KPI carries."""
    if "labels" not in table:
        return ()
    raw = table["labels"]
    allowed = KPI_LABELS.get(kpi, ())
    if not isinstance(raw, Mapping) or not raw:
        raise place.error(
            "labels", f"expected a table, got {raw!r}", 'Write e.g. labels = { channel = "web" }.'
        )
    for key, value in raw.items():
        if key not in allowed:
            fix = (
                f"{kpi} carries the labels: {', '.join(allowed)}."
                if allowed
                else f"{kpi} has no labels; remove the labels field."
            )
            raise place.error("labels", f"label {key!r} is not a label of {kpi}", fix)
        if not isinstance(value, str) or not value:
            raise place.error(
                "labels", f"label {key!r} must be a text value, got {value!r}",
                f'Write e.g. labels = {{ {key} = "..." }}.',
            )  # fmt: skip
    return tuple(sorted((str(k), str(v)) for k, v in raw.items()))


def _parse_goal(
    table: Mapping[str, Any], place: _Place, kpi: str, window: str | None
) -> tuple[str, float | None, float | None, str | None]:
    """(op, value, change, per): an absolute goal has a value, a relative one a change per period."""
    has_value, has_change = "value" in table, "change" in table
    if has_value == has_change:
        raise place.error(
            "value" if has_value else None,
            "needs exactly one of 'value' (absolute target) or 'change' (relative target)",
            'Write e.g. op = ">=" with value = 0.35, or change = -0.01 with per = "90d".',
        )
    op = place.choice(table, "op", OPS) if "op" in table else None
    if has_value:
        if op is None:
            raise place.error("op", "missing", 'Say how to compare, e.g. op = ">=".')
        if "per" in table:
            raise place.error(
                "per", "only relative targets (with 'change') have a period",
                "Remove per, or replace value by change.",
            )  # fmt: skip
        return op, place.number(table, "value", "0.35"), None, None
    change = place.number(table, "change", "-0.01")
    if op is None:
        if change == 0:
            raise place.error(
                "op", "change = 0 has no direction",
                'Add op = "<=" (must not rise) or op = ">=" (must not fall).',
            )  # fmt: skip
        op = "<=" if change < 0 else ">="
    if "per" in table:
        per = place.duration(table, "per", "90d")
    elif window is not None:
        per = window
    else:
        raise place.error(
            "per", f"{kpi} has no window to default the period to", 'Add e.g. per = "30d".'
        )
    return op, None, change, per


def _parse_health(data: Mapping[str, Any], source: str) -> HealthThresholds:
    table = data.get("health", {})
    place = _Place(source, "[health]")
    if not isinstance(table, Mapping):
        raise place.error(None, "must be a table", "Write a [health] section of thresholds.")
    place.check_keys(table, HealthThresholds.__dataclass_fields__)
    values: dict[str, Any] = {}
    for key in table:
        if key in _HEALTH_DURATIONS:
            values[key] = place.duration(table, key, getattr(HealthThresholds, key))
        elif key in _HEALTH_NUMBERS:
            number = place.number(table, key, str(getattr(HealthThresholds, key)))
            if number < 0:
                raise place.error(key, f"{number} is negative", "Use a number >= 0.")
            values[key] = number
        else:
            values[key] = place.string(table, key, DEFAULT_RUNBOOK)
    if "dead_letter_share" in values and values["dead_letter_share"] > 1:
        raise place.error(
            "dead_letter_share", "is a share of all events and must be <= 1",
            "Write e.g. dead_letter_share = 0.01 for 1%.",
        )  # fmt: skip
    return HealthThresholds(**values)


def parse_targets(
    data: Mapping[str, Any],
    source: str = "<targets>",
    known_windows: Iterable[str | int] | None = None,
) -> TargetsConfig:
    """Check a parsed targets document (the dict tomllib returns).

    ``known_windows`` (e.g. the workers' configured windows) makes a target on a window the
    workers do not compute an error instead of an alert that can never fire.
    """
    place = _Place(source, "top level")
    for key in data:
        if key not in _TOP_LEVEL:
            raise place.error(
                key,
                f"unknown section{_did_you_mean(key, _TOP_LEVEL)}",
                "Use [[target]] sections, and optionally [defaults] and [health].",
            )
    windows = None
    if known_windows is not None:
        windows = frozenset(duration_label(parse_duration(w)) for w in known_windows)
    defaults = _parse_defaults(data, source)
    raw_targets = data.get("target", [])
    if not isinstance(raw_targets, list):
        raise place.error(
            "target", "must be a list of tables", "Write each target as a [[target]] section."
        )
    targets = tuple(
        _parse_target(table, number, defaults, source, windows)
        for number, table in enumerate(raw_targets, start=1)
    )
    seen: dict[tuple[Any, ...], int] = {}
    for target in targets:
        key = (target.kpi, target.window, target.labels, target.kind, target.op, target.bound,
               target.per, target.severity)  # fmt: skip
        if key in seen:
            place = _Place(source, f"[[target]] #{target.index} (kpi = {target.kpi!r})", target.index)
            raise place.error(
                None,
                f"repeats [[target]] #{seen[key]}",
                "Remove one of them, or give them different severities or thresholds.",
            )
        seen[key] = target.index
    return TargetsConfig(targets=targets, health=_parse_health(data, source), source=source)


def load_targets(path: str | Path, known_windows: Iterable[str | int] | None = None) -> TargetsConfig:
    """Read and check a targets TOML file; :class:`TargetsConfigError` names what to fix."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TargetsConfigError(
            f"{path}: cannot read the targets file ({exc.strerror}). "
            "Pass an existing file, e.g. --targets deploy/targets.toml.",
            path=str(path),
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TargetsConfigError(
            f"{path}: not valid TOML: {exc}. Fix the syntax at that place "
            '(text values need double quotes: kpi = "active_rate").',
            path=str(path),
        ) from None
    return parse_targets(data, source=str(path), known_windows=known_windows)


