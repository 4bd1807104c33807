"""Tests of stream_kpis.settings: defaults, the TOML file, environment overrides and errors.

Every error must name the offending key and the file, so that a user can fix it.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from stream_kpis.exceptions import ConfigError
from stream_kpis.settings import DEFAULT_LEXICONS, ENV, Settings, Topics, load_settings

HOUR_MS = 3_600_000
DAY_MS = 86_400_000

FULL = """
[kpis]
bucket = "1d"
windows = ["7d", "4w"]
churn_horizon = "28d"
settle = "14d"
at_risk_horizon = "21d"
points_validity = "365d"
points_expiring_notice = "7d"
clock = "wall"
max_skew = "5m"
emit_interval = "30s"
dedupe_per_member = 64
guest_dedupe = 1000
max_event_bytes = 4096

[feedback.lexicons]
friction = ["lento", " long wait "]
praise = ["rápido"]

[kafka]
broker = "kafka://broker-1:9092"
security_protocol = "SASL_SSL"
sasl_mechanism = "SCRAM-SHA-512"
username = "kpis"
password = "s3cret"
ssl_cafile = "/etc/ca.pem"
partitions = 12
app_id = "kpis-prod"
topic_prefix = "acme."

[redis]
url = "redis://cache:6379/2"
prefix = "acme-kpis:"

[worker]
store = "memory://"
data_dir = "/var/lib/kpis"
web_host = "0.0.0.0"
web_port = 7070
"""


@pytest.fixture
def write_config(tmp_path):
    def write(text: str, name: str = "stream-kpis.toml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write


def test_defaults_are_the_spec_defaults():
    settings = load_settings(env={})
    assert settings.bucket_ms == HOUR_MS
    assert settings.windows_ms == (7 * DAY_MS, 30 * DAY_MS, 90 * DAY_MS)
    assert settings.window_labels == {168: "7d", 720: "30d", 2160: "90d"}  # 7 * 24, ...
    assert settings.churn_horizon_ms == settings.settle_ms == 90 * DAY_MS
    assert settings.at_risk_ms == 60 * DAY_MS
    assert settings.points_expiring_notice_ms == 30 * DAY_MS
    assert settings.points_validity_ms is None
    assert settings.max_skew_ms == HOUR_MS
    assert settings.emit_interval_s == 10.0
    assert settings.clock == "event"
    assert settings.topics.purchases == "loyalty.purchases"
    assert settings.topics.dlq == "loyalty.dlq"
    assert settings.redis_prefix == "stream-kpis:"
    assert settings.web_port == 6066
    assert dict(settings.lexicons) == DEFAULT_LEXICONS
    assert settings.source_path is None


def test_full_file(write_config):
    path = write_config(FULL)
    settings = load_settings(path, env={})
    assert settings.source_path == str(path)
    assert settings.bucket_ms == DAY_MS
    assert settings.windows_ms == (7 * DAY_MS, 28 * DAY_MS)
    # in buckets of one day
    assert settings.windows == (7, 28)
    assert settings.window_labels == {7: "7d", 28: "28d"}
    assert (settings.churn_horizon, settings.settle, settings.at_risk, settings.expiring_notice) == (
        28, 14, 21, 7)
    assert settings.points_validity_ms == 365 * DAY_MS
    assert settings.clock == "wall"
    assert settings.max_skew_ms == 300_000
    assert settings.emit_interval_s == 30.0
    assert (settings.dedupe_per_member, settings.guest_dedupe, settings.max_event_bytes) == (
        64, 1000, 4096)
    # the file's lexicons replace the shipped ones; terms are stripped
    assert dict(settings.lexicons) == {"friction": ("lento", "long wait"), "praise": ("rápido",)}
    assert settings.broker == "kafka://broker-1:9092"
    assert settings.kafka_security_protocol == "SASL_SSL"
    assert settings.kafka_sasl_mechanism == "SCRAM-SHA-512"
    assert (settings.kafka_username, settings.kafka_password) == ("kpis", "s3cret")
    assert settings.kafka_ssl_cafile == "/etc/ca.pem"
    assert settings.partitions == 12
    assert settings.app_id == "kpis-prod"
    assert settings.topics.purchases == "acme.purchases"
    assert settings.topics.kpi_churn == "acme.kpi.churn"
    assert settings.topics.signals == "acme.member-signals"
    assert (settings.redis_url, settings.redis_prefix) == ("redis://cache:6379/2", "acme-kpis:")
    assert (settings.store, settings.data_dir) == ("memory://", "/var/lib/kpis")
    assert (settings.web_host, settings.web_port) == ("0.0.0.0", 7070)
    assert "s3cret" not in repr(settings)  # never in a log line


def test_points_validity_none_means_never_expires(write_config):
    for text in ('points_validity = "none"', 'points_validity = ""'):
        path = write_config(f"[kpis]\n{text}\n")
        assert load_settings(path, env={}).points_validity_ms is None


def test_partial_file_keeps_the_other_defaults(write_config):
    settings = load_settings(write_config('[kpis]\nwindows = ["30d"]\n'), env={})
    assert settings.windows_ms == (30 * DAY_MS,)
    assert settings.bucket_ms == HOUR_MS
    assert settings.churn_horizon_ms == 90 * DAY_MS


def test_env_overrides_the_file(write_config):
    path = write_config(FULL)
    env = {
        ENV["broker"]: "kafka://other:9093",
        ENV["app_id"]: "kpis-staging",
        ENV["redis_url"]: "redis://other:6380/0",
        ENV["redis_prefix"]: "x:",
        ENV["web_port"]: "9000",
        ENV["partitions"]: "3",
        ENV["clock"]: "event",
        ENV["emit_interval"]: "2s",
        ENV["topic_prefix"]: "test.",
        ENV["kafka_password"]: "from-env",
        ENV["store"]: "rocksdb://",
        ENV["data_dir"]: "/tmp/w",
        ENV["web_host"]: "127.0.0.2",
    }
    settings = load_settings(path, env=env)
    assert settings.broker == "kafka://other:9093"
    assert settings.app_id == "kpis-staging"
    assert (settings.redis_url, settings.redis_prefix) == ("redis://other:6380/0", "x:")
    assert (settings.web_port, settings.partitions) == (9000, 3)
    assert settings.clock == "event"
    assert settings.emit_interval_s == 2.0
    assert settings.topics.enrollments == "test.enrollments"
    assert settings.kafka_password == "from-env"
    assert (settings.store, settings.data_dir, settings.web_host) == ("rocksdb://", "/tmp/w", "127.0.0.2")
    # what env does not name stays as in the file
    assert settings.bucket_ms == DAY_MS
    assert settings.kafka_username == "kpis"


def test_empty_env_values_do_not_override(write_config):
    settings = load_settings(write_config(FULL), env={ENV["broker"]: "", ENV["web_port"]: ""})
    assert settings.broker == "kafka://broker-1:9092"
    assert settings.web_port == 7070


@pytest.mark.parametrize("off", ["none", "off"])
def test_env_can_switch_redis_off(off):
    assert load_settings(env={ENV["redis_url"]: off}).redis_url is None


def test_config_path_from_env(write_config):
    path = write_config('[kpis]\nbucket = "1d"\nwindows = ["7d"]\nchurn_horizon = "7d"\n'
                        'settle = "7d"\nat_risk_horizon = "7d"\npoints_expiring_notice = "7d"\n')
    settings = load_settings(env={ENV["config"]: str(path)})
    assert settings.bucket_ms == DAY_MS
    assert settings.source_path == str(path)


def test_keyword_overrides_win_over_env_and_file(write_config):
    settings = load_settings(write_config(FULL), env={ENV["partitions"]: "3"}, partitions=8)
    assert settings.partitions == 8


def test_env_bad_integer_names_the_variable():
    with pytest.raises(ConfigError, match="STREAM_KPIS_WEB_PORT must be an integer"):
        load_settings(env={ENV["web_port"]: "http"})


def test_env_bad_duration_names_the_variable():
    with pytest.raises(ConfigError, match="STREAM_KPIS_EMIT_INTERVAL"):
        load_settings(env={ENV["emit_interval"]: "soon"})


def assert_config_error(path: Path, *fragments: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    message = str(info.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ('[kpis]\nbucket = "1 hour"\n', ["[kpis] bucket", "'1 hour'"]),
        ('[kpis]\nwindows = ["7d", "thirty days"]\n', ["[kpis] windows", "'thirty days'"]),
        ('[kpis]\nchurn_horizon = "0d"\n', ["[kpis] churn_horizon"]),
        ('[kpis]\npoints_validity = "1 year"\n', ["[kpis] points_validity"]),
        ('[kpis]\nemit_interval = "-1s"\n', ["[kpis] emit_interval"]),
        ('[kpis]\nwindows = "7d"\n', ["[kpis] windows must be a list"]),
    ],
)
def test_bad_durations(write_config, text, fragments):
    assert_config_error(write_config(text), *fragments)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ('[kpis]\nwindow = ["7d"]\n', ["[kpis]", "'window'"]),
        ('[kafka]\nbrokers = "x"\n', ["[kafka]", "'brokers'"]),
        ('[redis]\nhost = "x"\n', ["[redis]", "'host'"]),
        ('[worker]\nport = 1\n', ["[worker]", "'port'"]),
    ],
)
def test_unknown_keys(write_config, text, fragments):
    message = assert_config_error(write_config(text), *fragments)
    assert "known keys" in message  # and says what would have been accepted


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        # 36 h windows with 1 d buckets
        ('[kpis]\nbucket = "1d"\nwindows = ["7d", "36h"]\n', ["windows = 36h", "buckets of 1d"]),
        # 90 d default churn horizon with 7 d buckets (90 = 12 * 7 + 6)
        ('[kpis]\nbucket = "7d"\nwindows = ["14d"]\n', ["churn_horizon = 90d", "buckets of 7d"]),
        ('[kpis]\nsettle = "90m"\n', ["settle = 90m", "buckets of 1h"]),
        ('[kpis]\nat_risk_horizon = "30m"\n', ["at_risk_horizon = 30m"]),
        ('[kpis]\npoints_validity = "1000s"\n', ["points_validity = 1000s"]),
        ('[kpis]\npoints_expiring_notice = "30s"\n', ["points_expiring_notice = 30s"]),
    ],
    ids=["windows", "churn_horizon", "settle", "at_risk_horizon", "points_validity",
         "points_expiring_notice"],
)
def test_durations_must_be_whole_buckets(write_config, text, fragments):
    # the message names the key as written in the file ("settle", not the field "settle_ms")
    assert_config_error(write_config(text), *fragments, "multiple of the bucket")


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ('[kpis]\nwindows = []\n', ["windows is empty"]),
        ('[kpis]\nclock = "sundial"\n', ["'sundial'"]),
        ('[kpis]\ndedupe_per_member = 0\n', ["[kpis] dedupe_per_member"]),
        ('[kpis]\nmax_event_bytes = "64k"\n', ["[kpis] max_event_bytes"]),
        ('[feedback]\nlexicons = ["slow"]\n', ["[feedback.lexicons]"]),
        ('[feedback.lexicons]\nfriction = "slow"\n', ["[feedback.lexicons] friction"]),
        ('[feedback.lexicons]\nfriction = ["slow", "  "]\n', ["[feedback.lexicons] friction"]),
        ('[kpis\n', ["not valid TOML"]),
    ],
)
def test_other_errors_name_the_file(write_config, text, fragments):
    assert_config_error(write_config(text), *fragments)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="not found") as info:
        load_settings(path, env={})
    assert str(path) in str(info.value)


def test_settings_object_is_frozen_and_checked():
    settings = Settings()
    with pytest.raises(AttributeError):
        settings.bucket_ms = 1  # type: ignore[misc]
    changed = settings.with_overrides(windows_ms=(2 * HOUR_MS,))
    assert changed.windows == (2,) and settings.windows == (168, 720, 2160)
    with pytest.raises(ConfigError, match="windows"):
        settings.with_overrides(windows_ms=(HOUR_MS + 1,))


def test_segments_given_in_code_are_checked_and_named_once():
    """As from TOML: a dimension listed twice would otherwise be counted twice by the core."""
    assert Settings(segments=("tier", "store_id", "tier")).segments == ("tier", "store_id")
    assert Settings(segments=["channel"]).segments == ("channel",)
    with pytest.raises(ConfigError, match="region"):
        Settings(segments=("region",))


def test_topics_with_prefix_and_inputs():
    topics = Topics.with_prefix("shop.")
    assert topics.inputs() == {"purchase": "shop.purchases", "redemption": "shop.redemptions",
                               "enrollment": "shop.enrollments", "survey": "shop.surveys"}
    assert topics.kpi_topics()["active-rate"] == "shop.kpi.active-rate"
    assert topics.dlq == "shop.dlq"


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ('[worker]\nweb_port = "http"\n', ["[worker] web_port"]),
        ('[kafka]\npartitions = "four"\n', ["[kafka] partitions"]),
    ],
    ids=["web_port", "partitions"],
)
def test_integer_keys_are_type_checked(write_config, text, fragments):
    # an env var with the same mistake is an error (test_env_bad_integer_names_the_variable);
    # the file must not let it through to fail later inside Faust or aiokafka
    assert_config_error(write_config(text), *fragments)
