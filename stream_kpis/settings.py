"""One frozen settings object, read from a TOML file and overridden by environment variables.

The TOML file is the same one ``stream-kpis replay --config`` reads: ``[kpis]`` holds the time
model, ``[feedback.lexicons]`` the comment lexicons, ``[kafka]``, ``[redis]`` and ``[worker]``
the live deployment, ``[[replay.sources]]`` the file mappings (read by :mod:`replay`).
Environment variables (names below) win over the file, so containers need no file at all.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .core.catalogue import SEGMENT_DIMENSIONS
from .core.timebase import duration_label, parse_duration
from .exceptions import ConfigError

__all__ = ["Settings", "Topics", "load_settings", "read_toml", "DEFAULT_LEXICONS", "ENV"]

DAY_MS = 86_400_000

#: Environment variables that override the config file.
ENV = {
    "config": "STREAM_KPIS_CONFIG",
    "broker": "STREAM_KPIS_BROKER",
    "app_id": "STREAM_KPIS_APP_ID",
    "store": "STREAM_KPIS_STORE",
    "data_dir": "STREAM_KPIS_DATA_DIR",
    "redis_url": "STREAM_KPIS_REDIS_URL",
    "redis_prefix": "STREAM_KPIS_REDIS_PREFIX",
    "web_host": "STREAM_KPIS_WEB_HOST",
    "web_port": "STREAM_KPIS_WEB_PORT",
    "clock": "STREAM_KPIS_CLOCK",
    "emit_interval": "STREAM_KPIS_EMIT_INTERVAL",
    "topic_prefix": "STREAM_KPIS_TOPIC_PREFIX",
    "partitions": "STREAM_KPIS_PARTITIONS",
    "replication": "STREAM_KPIS_REPLICATION",
    "fast_path": "STREAM_KPIS_FAST_PATH",
    "kafka_security_protocol": "STREAM_KPIS_KAFKA_SECURITY_PROTOCOL",
    "kafka_sasl_mechanism": "STREAM_KPIS_KAFKA_SASL_MECHANISM",
    "kafka_username": "STREAM_KPIS_KAFKA_USERNAME",
    "kafka_password": "STREAM_KPIS_KAFKA_PASSWORD",
    "kafka_ssl_cafile": "STREAM_KPIS_KAFKA_SSL_CAFILE",
}

#: Shipped lexicons (English, Portuguese, Spanish, Arabic, Persian); ``[feedback.lexicons]`` replaces them.
DEFAULT_LEXICONS: dict[str, tuple[str, ...]] = {
    "friction": (
        "slow", "frustrating", "frustrated", "broken", "confusing", "expensive", "waiting",
        "lento", "frustrante", "demorado", "confuso", "caro",
        "lenta", "complicado",
        "بطيء", "محبط", "معقد", "غالي",
        "کند", "گران", "خراب", "پیچیده",
    ),
    "motivation": (
        "rewards", "reward", "discount", "points", "easy", "love", "fast",
        "recompensa", "recompensas", "desconto", "pontos", "fácil", "rápido",
        "descuento", "puntos",
        "مكافأة", "خصم", "نقاط", "سهل",
        "پاداش", "تخفیف", "امتیاز", "آسان",
    ),
}


#: Settings field -> the [kpis] key a user writes, for error messages.
_TOML_NAMES = {"churn_horizon_ms": "churn_horizon", "settle_ms": "settle", "at_risk_ms": "at_risk_horizon",
               "points_validity_ms": "points_validity",
               "points_expiring_notice_ms": "points_expiring_notice"}
_INT_FIELDS = ("web_port", "partitions", "replication")


@dataclass(frozen=True)
class Topics:
    """Kafka topic names; all prefixed by ``topic_prefix`` (default ``loyalty.``)."""

    purchases: str = "loyalty.purchases"
    redemptions: str = "loyalty.redemptions"
    enrollments: str = "loyalty.enrollments"
    surveys: str = "loyalty.surveys"
    dlq: str = "loyalty.dlq"
    signals: str = "loyalty.member-signals"
    kpi_active_rate: str = "loyalty.kpi.active-rate"
    kpi_redemption: str = "loyalty.kpi.redemption"
    kpi_churn: str = "loyalty.kpi.churn"
    kpi_engagement: str = "loyalty.kpi.engagement"
    kpi_satisfaction: str = "loyalty.kpi.satisfaction"
    kpi_cohorts: str = "loyalty.kpi.cohorts"
    kpi_clv: str = "loyalty.kpi.clv"

    @classmethod
    def with_prefix(cls, prefix: str) -> Topics:
        base = cls()
        return cls(**{name: prefix + value.removeprefix("loyalty.") for name, value in vars(base).items()})

    def inputs(self) -> dict[str, str]:
        """Event type -> input topic."""
        return {
            "purchase": self.purchases,
            "redemption": self.redemptions,
            "enrollment": self.enrollments,
            "survey": self.surveys,
        }

    def kpi_topics(self) -> dict[str, str]:
        """KPI topic key (as in :data:`kpis.KPI_TOPICS`) -> topic name."""
        return {
            "active-rate": self.kpi_active_rate,
            "redemption": self.kpi_redemption,
            "churn": self.kpi_churn,
            "engagement": self.kpi_engagement,
            "satisfaction": self.kpi_satisfaction,
            "cohorts": self.kpi_cohorts,
            "clv": self.kpi_clv,
        }


@dataclass(frozen=True)
class Settings:
    """Everything configurable. Durations are milliseconds; see :func:`load_settings`."""

    # time model (SPEC section 2 and 4)
    bucket_ms: int = 3_600_000
    windows_ms: tuple[int, ...] = (7 * DAY_MS, 30 * DAY_MS, 90 * DAY_MS)
    churn_horizon_ms: int = 90 * DAY_MS
    settle_ms: int = 90 * DAY_MS
    at_risk_ms: int = 60 * DAY_MS
    points_validity_ms: int | None = None
    points_expiring_notice_ms: int = 30 * DAY_MS
    clock: str = "event"
    max_skew_ms: int = 3_600_000
    # segments and cohorts (SPEC 4.2, 4.3)
    segments: tuple[str, ...] = ()
    segment_limit: int = 50   # per dimension, in Prometheus (KPI topics and replay carry all)
    cohorts: int = 12
    cohort_ages: int = 12
    # predictive CLV (SPEC 4.4): on when the config has a [clv] table
    clv: bool = False
    clv_unit_ms: int = 7 * DAY_MS
    clv_refit_ms: int = DAY_MS
    # input hygiene
    max_event_bytes: int = 65_536
    dedupe_per_member: int = 128
    guest_dedupe: int = 200_000
    lexicons: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_LEXICONS))
    # live deployment
    app_id: str = "stream-kpis"
    broker: str = "kafka://127.0.0.1:9092"
    topics: Topics = field(default_factory=Topics)
    partitions: int = 4
    replication: int = 1  # replication factor of the topics we create, changelogs included
    store: str = "rocksdb://"
    fast_path: bool = True  # accepted for compatibility; every fetch is one batch now
    data_dir: str = ".local/worker"
    emit_interval_s: float = 10.0
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    redis_url: str | None = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "stream-kpis:"
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    kafka_username: str | None = None
    kafka_password: str | None = field(default=None, repr=False)
    kafka_ssl_cafile: str | None = None
    source_path: str | None = None

    def __post_init__(self) -> None:
        for name in ("churn_horizon_ms", "settle_ms", "at_risk_ms", "points_expiring_notice_ms"):
            self._whole_buckets(name, getattr(self, name))
        if self.points_validity_ms is not None:
            self._whole_buckets("points_validity_ms", self.points_validity_ms)
        if not self.windows_ms:
            raise ConfigError("[kpis] windows is empty: list at least one window, e.g. [\"30d\"]")
        for window in self.windows_ms:
            self._whole_buckets("windows", window)
        # a dimension named twice is reported once (as from TOML), never counted twice
        object.__setattr__(self, "segments", tuple(dict.fromkeys(self.segments)))
        unknown = [d for d in self.segments if d not in SEGMENT_DIMENSIONS]
        if unknown:
            raise ConfigError(f"[kpis] segments: unknown dimension(s) {unknown}; choose from "
                              f"{list(SEGMENT_DIMENSIONS)}")
        if self.clock not in ("event", "wall"):
            raise ConfigError(f"clock must be 'event' (replay) or 'wall' (live), got {self.clock!r}")

    def _whole_buckets(self, name: str, value: int) -> None:
        if value % self.bucket_ms:
            name = _TOML_NAMES.get(name, name)
            raise ConfigError(
                f"[kpis] {name} = {duration_label(value)} is not a whole number of buckets of "
                f"{duration_label(self.bucket_ms)}: choose a multiple of the bucket"
            )

    # derived, in buckets
    @property
    def windows(self) -> tuple[int, ...]:
        return tuple(w // self.bucket_ms for w in self.windows_ms)

    @property
    def window_labels(self) -> dict[int, str]:
        return {w // self.bucket_ms: duration_label(w) for w in self.windows_ms}

    @property
    def churn_horizon(self) -> int:
        return self.churn_horizon_ms // self.bucket_ms

    @property
    def settle(self) -> int:
        return self.settle_ms // self.bucket_ms

    @property
    def at_risk(self) -> int:
        return self.at_risk_ms // self.bucket_ms

    @property
    def expiring_notice(self) -> int:
        return self.points_expiring_notice_ms // self.bucket_ms

    def with_overrides(self, **changes: Any) -> Settings:
        return replace(self, **changes)


def _duration(section: str, key: str, value: Any) -> int:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ConfigError(f"[{section}] {key}: {exc}") from None


def _kpi_settings(kpis: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    simple = {
        "bucket": "bucket_ms",
        "churn_horizon": "churn_horizon_ms",
        "settle": "settle_ms",
        "at_risk_horizon": "at_risk_ms",
        "points_expiring_notice": "points_expiring_notice_ms",
        "max_skew": "max_skew_ms",
    }
    known = set(simple) | {"windows", "points_validity", "clock", "emit_interval",
                           "dedupe_per_member", "guest_dedupe", "max_event_bytes", "segments",
                           "segment_limit", "cohorts", "cohort_ages"}
    unknown = set(kpis) - known
    if unknown:
        raise ConfigError(f"[kpis] unknown key(s) {sorted(unknown)}; known keys: {sorted(known)}")
    for key, target in simple.items():
        if key in kpis:
            out[target] = _duration("kpis", key, kpis[key])
    if "windows" in kpis:
        if not isinstance(kpis["windows"], list):
            raise ConfigError('[kpis] windows must be a list such as ["7d", "30d"]')
        out["windows_ms"] = tuple(_duration("kpis", "windows", w) for w in kpis["windows"])
    if kpis.get("points_validity") not in (None, "", "none"):
        out["points_validity_ms"] = _duration("kpis", "points_validity", kpis["points_validity"])
    if "clock" in kpis:
        out["clock"] = kpis["clock"]
    if "emit_interval" in kpis:
        out["emit_interval_s"] = _duration("kpis", "emit_interval", kpis["emit_interval"]) / 1000
    for key in ("dedupe_per_member", "guest_dedupe", "max_event_bytes", "segment_limit"):
        if key in kpis:
            if not isinstance(kpis[key], int) or kpis[key] < 1:
                raise ConfigError(f"[kpis] {key} must be a positive integer, got {kpis[key]!r}")
            out[key] = kpis[key]
    for key in ("cohorts", "cohort_ages"):  # 0 turns cohort retention off
        if key in kpis:
            if not isinstance(kpis[key], int) or kpis[key] < 0:
                raise ConfigError(f"[kpis] {key} must be a whole number >= 0, got {kpis[key]!r}")
            out[key] = kpis[key]
    if "segments" in kpis:
        segments = kpis["segments"]
        if not isinstance(segments, list) or not all(isinstance(d, str) for d in segments):
            raise ConfigError('[kpis] segments must be a list such as ["tier", "store_id"]')
        out["segments"] = tuple(dict.fromkeys(segments))
    return out


def _clv_settings(clv: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(clv, dict):
        raise ConfigError('[clv] must be a table, e.g. [clv] time_unit = "7d"')
    known = {"time_unit", "refit"}
    unknown = set(clv) - known
    if unknown:
        raise ConfigError(f"[clv] unknown key(s) {sorted(unknown)}; known keys: {sorted(known)}")
    out: dict[str, Any] = {"clv": True}
    if "time_unit" in clv:
        out["clv_unit_ms"] = _duration("clv", "time_unit", clv["time_unit"])
        if out["clv_unit_ms"] % DAY_MS:
            raise ConfigError(f"[clv] time_unit must be whole days, got {clv['time_unit']!r}")
    if "refit" in clv:  # "0s" (or 0): refit at every evaluation
        refit = clv["refit"]
        out["clv_refit_ms"] = 0 if refit in (0, "0", "0s") else _duration("clv", "refit", refit)
    return out


def _lexicons(feedback: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    lexicons = feedback.get("lexicons", {})
    if not isinstance(lexicons, dict):
        raise ConfigError("[feedback.lexicons] must be a table of name = [\"term\", ...]")
    out = {}
    for name, terms in lexicons.items():
        if not isinstance(terms, list) or not all(isinstance(t, str) and t.strip() for t in terms):
            raise ConfigError(f"[feedback.lexicons] {name} must be a list of non-empty strings")
        out[name] = tuple(t.strip() for t in terms)
    return out


def _section_strings(section: Mapping[str, Any], name: str, mapping: dict[str, str]) -> dict:
    out = {}
    for key, target in mapping.items():
        if key in section:
            value = section[key]
            wanted = int if target in _INT_FIELDS else str
            if type(value) is not wanted:
                raise ConfigError(f"[{name}] {key} must be {'an integer' if wanted is int else 'a string'}, "
                                  f"got {value!r}")
            out[target] = value
    unknown = set(section) - set(mapping)
    if unknown:
        raise ConfigError(f"[{name}] unknown key(s) {sorted(unknown)}; known keys: {sorted(mapping)}")
    return out


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("broker", "app_id", "store", "data_dir", "redis_url", "redis_prefix", "web_host",
                "clock", "kafka_security_protocol", "kafka_sasl_mechanism", "kafka_username",
                "kafka_password", "kafka_ssl_cafile"):
        if env.get(ENV[key]):
            out[key] = env[ENV[key]]
    for key in _INT_FIELDS:
        if env.get(ENV[key]):
            try:
                out[key] = int(env[ENV[key]])
            except ValueError:
                raise ConfigError(f"{ENV[key]} must be an integer, got {env[ENV[key]]!r}") from None
    if env.get(ENV["fast_path"]):
        value = env[ENV["fast_path"]].lower()
        if value not in ("on", "off", "1", "0", "true", "false"):
            raise ConfigError(f"{ENV['fast_path']} must be on or off, got {value!r}")
        out["fast_path"] = value in ("on", "1", "true")
    if env.get(ENV["emit_interval"]):
        out["emit_interval_s"] = _duration("env", ENV["emit_interval"], env[ENV["emit_interval"]]) / 1000
    if env.get(ENV["topic_prefix"]):
        out["topics"] = Topics.with_prefix(env[ENV["topic_prefix"]])
    if out.get("redis_url") in ("none", "off"):
        out["redis_url"] = None
    return out


def load_settings(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
                  **overrides: Any) -> Settings:
    """Settings from an optional TOML file, then environment variables, then keyword overrides."""
    env = os.environ if env is None else env
    path = path or env.get(ENV["config"]) or None
    values: dict[str, Any] = {}
    if path is not None:
        values.update(settings_from_toml(path))
    values.update(_from_env(env))
    values.update(overrides)
    try:
        return Settings(**values)
    except ConfigError as exc:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}{exc}") from None


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """A config file's content; ConfigError naming the file when it is missing or not TOML."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found: check the path") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def settings_from_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Settings fields from a TOML file (``[replay]`` is left to the replay module)."""
    data = read_toml(path)
    values: dict[str, Any] = {"source_path": str(path)}
    try:
        values.update(_kpi_settings(data.get("kpis", {})))
        lexicons = _lexicons(data.get("feedback", {}))
        if lexicons:
            values["lexicons"] = lexicons
        if "clv" in data:
            values.update(_clv_settings(data["clv"]))
        values.update(_section_strings(data.get("kafka", {}), "kafka", {
            "broker": "broker", "security_protocol": "kafka_security_protocol",
            "sasl_mechanism": "kafka_sasl_mechanism", "username": "kafka_username",
            "password": "kafka_password", "ssl_cafile": "kafka_ssl_cafile",
            "partitions": "partitions", "replication": "replication", "app_id": "app_id",
            "topic_prefix": "topic_prefix"}))
        topic_prefix = values.pop("topic_prefix", None)
        if topic_prefix:
            values["topics"] = Topics.with_prefix(topic_prefix)
        values.update(_section_strings(data.get("redis", {}), "redis", {
            "url": "redis_url", "prefix": "redis_prefix"}))
        values.update(_section_strings(data.get("worker", {}), "worker", {
            "store": "store", "data_dir": "data_dir", "web_host": "web_host",
            "web_port": "web_port"}))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return values
