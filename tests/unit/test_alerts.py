"""KPI targets file -> Prometheus rules: parsing, errors, rendering, and promtool on the result.

Expected PromQL and goal texts are written out by hand here; promtool runs the committed rule
tests and, for every target in deploy/targets.toml, a generated fire / no-fire case.
"""

from __future__ import annotations

import shutil
import subprocess
import textwrap
import tomllib
from pathlib import Path

import pytest
import yaml

from stream_kpis.exceptions import ConfigError
from stream_kpis.ops.alerts import (
    HEALTH_ALERTS,
    JOB,
    HealthThresholds,
    Target,
    TargetsConfig,
    TargetsConfigError,
    goal_text,
    kpi_selector,
    load_targets,
    parse_targets,
    promql_metric_names,
    render_rules,
    render_to_yaml,
    rule_queries,
    segment_matchers,
)

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ROOT / "deploy" / "targets.toml"
RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"
RULES = RULES_DIR / "stream-kpis.rules.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found (apt-get install prometheus)"
)

# SPEC 4.2: the dimensions of each kind, written out here (not read from the catalogue)
MEMBER_DIMENSIONS = ("tier", "enrollment_channel", "home_store")
ORDER_DIMENSIONS = ("channel", "store_id")
#: the matchers of a member KPI's whole-program series: none of its segment labels
WHOLE = ",".join(f'{dimension}=""' for dimension in MEMBER_DIMENSIONS)


def write(tmp_path: Path, text: str, name: str = "targets.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def target(**fields) -> Target:
    base = dict(index=1, kpi="active_rate", window="30d", labels=(), op=">=", value=0.35,
                change=None, per=None, for_="1h", severity="warning")  # fmt: skip
    base.update(fields)
    return Target(**base)


def alert_rules(rules: dict) -> dict[str, list[dict]]:
    by_name: dict[str, list[dict]] = {}
    for group in rules["groups"]:
        for rule in group["rules"]:
            by_name.setdefault(rule["alert"], []).append(rule)
    return by_name


# --------------------------------------------------------------------------- parsing


def test_absolute_target_with_defaults_and_canonical_window(tmp_path):
    path = write(tmp_path, """
        [defaults]
        for = "90m"
        severity = "critical"

        [[target]]
        kpi = "active_rate"
        window = "720h"
        op = ">="
        value = 0.35

        [[target]]
        kpi = "nps"
        window = "4w"
        op = ">"
        value = 20
        for = "1d"
        severity = "info"
        note = "board goal"
    """)
    config = load_targets(path)
    first, second = config.targets
    assert (first.index, first.kpi, first.window, first.op, first.value) == (
        1, "active_rate", "30d", ">=", 0.35)  # fmt: skip
    assert (first.for_, first.severity, first.kind, first.change) == ("90m", "critical", "absolute", None)
    assert (second.window, second.for_, second.severity, second.note) == ("28d", "1d", "info", "board goal")
    assert config.health == HealthThresholds()
    assert config.source == str(path)


def test_relative_target_defaults_period_to_window_and_direction_to_sign(tmp_path):
    path = write(tmp_path, """
        [[target]]
        kpi = "churn_rate"
        window = "90d"
        change = -0.01

        [[target]]
        kpi = "active_rate"
        window = "30d"
        change = 0.02
        per = "2160h"

        [[target]]
        kpi = "points_liability"
        change = 0
        op = "<="
        per = "7d"
    """)
    churn, active, liability = load_targets(path).targets
    assert (churn.kind, churn.op, churn.change) == ("relative", "<=", -0.01)
    assert (churn.per, churn.value) == ("90d", None)
    assert (active.op, active.per) == (">=", "90d")
    assert (liability.window, liability.op, liability.per) == (None, "<=", "7d")


def test_labels_and_health_overrides(tmp_path):
    path = write(tmp_path, """
        [[target]]
        kpi = "feedback_mentions"
        window = "7d"
        labels = { term = "slow", lexicon = "friction" }
        op = "<"
        value = 50

        [health]
        worker_down_for = "5m"
        dead_letter_share = 0.05
        consumer_lag_min_messages = 10
    """)
    config = load_targets(path)
    assert config.targets[0].labels == (("lexicon", "friction"), ("term", "slow"))
    assert (config.health.worker_down_for, config.health.dead_letter_share) == ("5m", 0.05)
    assert config.health.consumer_lag_min_messages == 10
    assert config.health.exporter_for == "5m"


BAD_TARGETS = [
    # (body, [[target]] index or None, field, words the message must contain)
    ('[[target]]\nkpi = "active_rat"\nwindow = "30d"\nop = ">="\nvalue = 0.3\n',
     1, "kpi", ["unknown KPI", "did you mean 'active_rate'"]),
    ('[[target]]\nkpi = "active_rate"\nop = ">="\nvalue = 0.3\n',
     1, "window", ["computed per window", 'window = "30d"']),
    ('[[target]]\nkpi = "members"\nwindow = "30d"\nop = ">="\nvalue = 3\n',
     1, "window", ["has no window", "Remove"]),
    ('[[target]]\nkpi = "active_rate"\nwindow = "30 days"\nop = ">="\nvalue = 0.3\n',
     1, "window", ["cannot read duration", 'window = "30d"']),
    ('[[target]]\nkpi = "active_rate"\nwindow = "30d"\nop = "=>"\nvalue = 0.3\n',
     1, "op", ["'=>' is not allowed", "'>='"]),
    ('[[target]]\nkpi = "active_rate"\nwindow = "30d"\nop = ">="\nvalue = "0.3"\n',
     1, "value", ["expected a number", "without quotes"]),
    ('[[target]]\nkpi = "active_rate"\nwindow = "30d"\nvalue = 0.3\n',
     1, "op", ["missing", 'op = ">="']),
    ('[[target]]\nkpi = "active_rate"\nwindow = "30d"\nop = ">="\nvalue = 0.3\nchange = 0.1\n',
     1, "value", ["exactly one of 'value'", "'change'"]),
    ('[[target]]\nkpi = "active_rate"\nwindow = "30d"\n',
     1, None, ["exactly one of 'value'"]),
    ('[[target]]\nkpi = "churn_rate"\nwindow = "90d"\nchange = 0\n',
     1, "op", ["no direction", 'op = "<="']),
    ('[[target]]\nkpi = "points_liability"\nchange = -5\n',
     1, "per", ["no window", 'per = "30d"']),
    ('[[target]]\nkpi = "active_rate"\nwindow = "30d"\nop = ">="\nvalue = 0.3\nper = "30d"\n',
     1, "per", ["only relative targets"]),
    ('[[target]]\nkpi = "active_rate"\nwindow = "30d"\nop = ">="\nvalue = 0.3\nseverity = "page"\n',
     1, "severity", ["'page' is not allowed", "'critical'"]),
    ('[[target]]\nkpi = "active_rate"\nwindow = "30d"\nop = ">="\nvalue = 0.3\nlabels = {channel = "web"}\n',
     1, "labels", ["'channel' is not a label of active_rate", "has no labels"]),
    ('[[target]]\nkpi = "new_members"\nwindow = "30d"\nop = ">="\nvalue = 3\nlabels = { tier = "gold" }\n',
     1, "labels", ["'tier' is not a label of new_members", "channel"]),
    ('[[target]]\nkpi = "active_rate"\nwindow = "30d"\nop = ">="\nvalue = 0.3\nfor_ = "1h"\n',
     1, "for_", ["unknown field", "did you mean 'for'"]),
    ('[[target]]\nkpi = "csat"\nwindow = "30d"\nop = ">="\nvalue = 0.8\n\n'
     '[[target]]\nkpi = "csat"\nwindow = "30d"\nop = ">="\nvalue = 0.8\n',
     2, None, ["repeats [[target]] #2"]),  # #1 is the prefix below
    ('[[targets]]\nkpi = "csat"\n', None, "targets", ["unknown section", "did you mean 'target'"]),
    ('[health]\nworker_down = "2m"\n', None, "worker_down", ["unknown field", "worker_down_for"]),
    ('[health]\ndead_letter_rate = -1\n', None, "dead_letter_rate", ["negative"]),
    ('[health]\ndead_letter_share = 5\n', None, "dead_letter_share", ["must be <= 1", "0.01"]),
    ('[defaults]\nfor = 60\n', None, "for", ["expected a text value", 'for = "1h"']),
]  # fmt: skip


@pytest.mark.parametrize(("body", "index", "field", "words"), BAD_TARGETS)
def test_bad_targets_name_file_target_field_and_fix(tmp_path, body, index, field, words):
    # a valid first target shifts every bad one to position #2 (or #3 for the duplicate case)
    prefix = '[[target]]\nkpi = "members"\nop = ">="\nvalue = 1\n\n' if index is not None else ""
    path = write(tmp_path, prefix + body)
    with pytest.raises(ConfigError) as caught:
        load_targets(path)
    error = caught.value
    assert isinstance(error, TargetsConfigError)
    message = str(error)
    assert message.startswith(f"{path}: ")
    if index is not None:
        assert error.index == index + 1
        assert f"[[target]] #{index + 1}" in message
    assert error.field == field
    if field is not None:
        assert f"field '{field}'" in message
    for word in words:
        assert word in message


def test_toml_syntax_error_names_the_file_and_position(tmp_path):
    path = write(tmp_path, '[[target]]\nkpi = active_rate\n')
    with pytest.raises(ConfigError, match=r"not valid TOML.*line 2.*double quotes") as caught:
        load_targets(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_missing_file_says_which_and_what_to_pass(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read the targets file.*--targets"):
        load_targets(tmp_path / "nope.toml")


def test_known_windows_reject_a_window_the_workers_do_not_compute():
    data = {"target": [{"kpi": "active_rate", "window": "60d", "op": ">=", "value": 0.3}]}
    with pytest.raises(ConfigError, match=r"window '60d'.*7d, 90d"):
        parse_targets(data, "t.toml", known_windows=["7d", "2160h"])
    assert parse_targets(data, "t.toml", known_windows=["1440h"]).targets[0].window == "60d"
    # settings hold windows in milliseconds
    assert parse_targets(data, "t.toml", known_windows=[60 * 86_400_000]).targets[0].window == "60d"


def test_committed_targets_file_is_valid():
    config = load_targets(TARGETS)
    raw = tomllib.loads(TARGETS.read_text(encoding="utf-8"))
    assert len(config.targets) == len(raw["target"]) > 0
    assert any(t.kind == "relative" for t in config.targets)
    assert any(t.kind == "absolute" for t in config.targets)


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize(("op", "violated"), [(">=", "<"), (">", "<="), ("<=", ">"), ("<", ">=")])
def test_absolute_rule_fires_on_the_negated_comparison(op, violated):
    rules = render_rules(TargetsConfig((target(op=op, value=0.35),)))
    (rule,) = alert_rules(rules)["LoyaltyActiveRateTarget"]
    assert rule["expr"] == (
        f'max by (window) (loyalty_active_rate{{job="stream-kpis",window="30d",{WHOLE}}}) '
        f"{violated} 0.35"
    )
    assert rule["for"] == "1h"
    assert rule["labels"] == {"severity": "warning", "kpi": "active_rate", "audience": "crm"}
    assert "{{ $value" in rule["annotations"]["description"]


def test_relative_rule_compares_with_offset():
    t = target(kpi="churn_rate", window="90d", op="<=", value=None, change=-0.01, per="90d",
               for_="6h", note="quarterly")  # fmt: skip
    (rule,) = alert_rules(render_rules(TargetsConfig((t,))))["LoyaltyChurnRateTrendTarget"]
    assert rule["expr"] == (
        f'(max by (window) (loyalty_churn_rate{{job="stream-kpis",window="90d",{WHOLE}}})'
        f' - max by (window) (loyalty_churn_rate{{job="stream-kpis",window="90d",{WHOLE}}} '
        "offset 90d)) > -0.01"
    )
    description = rule["annotations"]["description"]
    current = f'max by (window) (loyalty_churn_rate{{job="stream-kpis",window="90d",{WHOLE}}})'
    assert f"query `{current}`" in description
    assert "fall by at least 0.01 per 90d" in description
    assert description.endswith("Why: quarterly")


def test_labelled_kpi_selects_fixed_labels_and_keeps_free_ones():
    t = target(kpi="feedback_mentions", window="7d", labels=(("lexicon", "friction"),), op="<",
               value=50)  # fmt: skip
    assert kpi_selector(t.kpi, t.window, t.labels) == (
        'max by (window, lexicon, term) '
        '(loyalty_feedback_mentions{job="stream-kpis",window="7d",lexicon="friction"})'
    )
    (rule,) = alert_rules(render_rules(TargetsConfig((t,))))["LoyaltyFeedbackMentionsTarget"]
    assert "term={{ $labels.term }}" in rule["annotations"]["summary"]
    assert "lexicon=friction" in rule["annotations"]["summary"]
    # relative on a free label: the current-value query is filled from the alert's labels
    rel = target(kpi="feedback_mentions", window="7d", labels=(("lexicon", "friction"),), op=">=",
                 value=None, change=5, per="7d")  # fmt: skip
    (rule,) = alert_rules(render_rules(TargetsConfig((rel,))))["LoyaltyFeedbackMentionsTrendTarget"]
    assert ',lexicon="friction",term=%q})` $labels.term | query' in rule["annotations"]["description"]


def test_label_values_are_escaped_in_promql():
    t = target(kpi="new_members", labels=(("channel", 'we"b\\'),))
    assert 'channel="we\\"b\\\\"' in kpi_selector(t.kpi, t.window, t.labels)


def test_unwindowed_kpi_has_no_window_matcher_or_grouping():
    assert kpi_selector("breakage_rate") == 'max(loyalty_breakage_rate{job="stream-kpis"})'


@pytest.mark.parametrize("kpi, dimensions", [
    ("members", MEMBER_DIMENSIONS), ("churn_rate", MEMBER_DIMENSIONS),
    ("aov_guest", ORDER_DIMENSIONS), ("margin_lift", ORDER_DIMENSIONS),
    ("nps", ()), ("new_members", ()), ("cohort_retention", ()),
])  # fmt: skip
def test_selector_of_a_segmented_kpi_is_its_whole_program_series(kpi, dimensions):
    """Segment series (``tier="gold"``) carry a dimension label; the whole program's series
    has none, which ``dimension=""`` selects in PromQL."""
    assert segment_matchers(kpi) == [f'{d}=""' for d in dimensions]
    selector = kpi_selector(kpi, "30d")
    assert all(f'{d}=""' in selector for d in dimensions)


def test_selector_per_segment_value():
    assert kpi_selector("active_rate", "30d", segment="tier") == (
        'max by (window, tier) (loyalty_active_rate{job="stream-kpis",window="30d",tier!="",'
        'enrollment_channel="",home_store=""})'
    )
    assert kpi_selector("aov_member", "30d", segment="store_id") == (
        'max by (window, store_id) (loyalty_aov_member{job="stream-kpis",window="30d",'
        'channel="",store_id!=""})'
    )
    # a dimension fixed by a label is left to it
    assert segment_matchers("members", labels=(("tier", "gold"),)) == [
        'enrollment_channel=""', 'home_store=""']
    with pytest.raises(ValueError, match="store_id"):
        kpi_selector("members", segment="store_id")
    with pytest.raises(ValueError, match="tier"):
        kpi_selector("nps", "30d", segment="tier")


@pytest.mark.parametrize(
    ("op", "change", "words"),
    [
        ("<=", -0.01, "fall by at least 0.01 per 90d"),
        ("<", -0.01, "fall by more than 0.01 per 90d"),
        (">=", -0.01, "fall by at most 0.01 per 90d"),
        (">", -2, "fall by less than 2 per 90d"),
        (">=", 0.5, "rise by at least 0.5 per 90d"),
        ("<=", 0.5, "rise by at most 0.5 per 90d"),
        ("<=", 0, "not rise per 90d"),
        (">=", 0, "not fall per 90d"),
    ],
)
def test_goal_text_of_relative_targets(op, change, words):
    assert goal_text(target(op=op, value=None, change=change, per="90d")) == words


def test_goal_text_of_absolute_targets():
    assert goal_text(target(op=">=", value=0.35)) == "at least 0.35"
    assert goal_text(target(op="<", value=100.0)) == "below 100"


def test_no_data_rules_are_deduplicated_per_series():
    warn = target(value=0.35)
    crit = target(index=2, value=0.30, severity="critical")
    rules = alert_rules(render_rules(TargetsConfig((warn, crit))))
    assert len(rules["LoyaltyActiveRateTarget"]) == 2
    (no_data,) = rules["LoyaltyKpiTargetNoData"]
    assert no_data["expr"] == f'absent(loyalty_active_rate{{job="stream-kpis",window="30d",{WHOLE}}})'


def test_health_rules_use_the_thresholds():
    health = HealthThresholds(no_emission_after="2h", consumer_lag_min_messages=5000,
                              dead_letter_rate=0.5, dead_letter_share=0.02, worker_down_for="3m")  # fmt: skip
    rules = alert_rules(render_rules(TargetsConfig((), health)))
    assert tuple(rules) == HEALTH_ALERTS  # no targets: health group only
    assert rules["StreamKpisNoKpiEmitted"][0]["expr"].endswith(") > 7200")
    assert rules["StreamKpisConsumerLagGrowing"][0]["expr"].endswith("> 5000")
    assert rules["StreamKpisDeadLetterRateHigh"][0]["expr"].endswith("> 0.5")
    assert rules["StreamKpisDeadLetterShareHigh"][0]["expr"].endswith("> 0.02")
    assert "More than 2% of" in rules["StreamKpisDeadLetterShareHigh"][0]["annotations"]["summary"]
    assert rules["StreamKpisWorkerDown"][0]["for"] == "3m"
    for name, (rule,) in rules.items():
        assert rule["labels"]["audience"] == "ops"
        assert rule["annotations"]["runbook_url"] == f"docs/production.md#{name.lower()}"
        assert f'job="{JOB}"' in rule["expr"]


def test_yaml_is_the_rendered_structure_with_a_generated_header():
    text = render_to_yaml(TARGETS)
    assert text.startswith("# Generated by `stream-kpis alerts render`")
    assert yaml.safe_load(text) == render_rules(load_targets(TARGETS))


def test_committed_rule_file_is_up_to_date(monkeypatch):
    monkeypatch.chdir(ROOT)  # the header names the targets file as the CLI is given it
    assert RULES.read_text(encoding="utf-8") == render_to_yaml(Path("deploy/targets.toml")), (
        "deploy/prometheus/rules/stream-kpis.rules.yml is out of date: run "
        "stream-kpis alerts render --targets deploy/targets.toml "
        "--output deploy/prometheus/rules/stream-kpis.rules.yml"
    )


# --------------------------------------------------------------------------- queries


def test_rule_queries_lists_every_expr_and_annotation_query():
    rules = render_rules(load_targets(TARGETS))
    queries = rule_queries(rules)
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    relative = [t for t in load_targets(TARGETS).targets if t.kind == "relative"]
    assert set(exprs) <= set(queries)
    assert len(queries) == len(exprs) + len(relative)
    assert all("%q" not in q and "{{" not in q for q in queries)


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('up{job="stream-kpis"} == 0', {"up"}),
        ('sum by (reason) (rate(stream_kpis_dead_letters_total{job="x",reason="a b"}[5m])) > 1',
         {"stream_kpis_dead_letters_total"}),
        ("histogram_quantile(0.99, sum by (le) (rate(stream_kpis_processing_seconds_bucket[5m])))",
         {"stream_kpis_processing_seconds_bucket"}),
        ("time() - max(stream_kpis_last_emit_timestamp_seconds) > 5400",
         {"stream_kpis_last_emit_timestamp_seconds"}),
        ('(max by (window) (loyalty_churn_rate{window="90d"}) - max by (window) '
         '(loyalty_churn_rate{window="90d"} offset 90d)) > -0.01', {"loyalty_churn_rate"}),
        ("deriv(sum by (topic) (lag)[10m:1m]) > 0 and sum(x) > 1e3 or vector(1)",
         {"lag", "x"}),
    ],
)  # fmt: skip
def test_promql_metric_names(expr, names):
    assert promql_metric_names(expr) == names


# --------------------------------------------------------------------------- promtool


def promtool(*args: str, cwd: Path = RULES_DIR) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@needs_promtool
def test_promtool_check_rules_accepts_the_committed_rules():
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    raw = tomllib.loads(TARGETS.read_text(encoding="utf-8"))["target"]
    series = {(t["kpi"], t.get("window"), tuple(sorted(t.get("labels", {}).items()))) for t in raw}
    expected = len(raw) + len(series) + len(HEALTH_ALERTS)
    assert f"SUCCESS: {expected} rules found" in result.stdout


@needs_promtool
@pytest.mark.parametrize("test_file", sorted(p.name for p in RULES_DIR.glob("*.test.yml")))
def test_promtool_unit_tests_of_the_committed_rules_pass(test_file):
    result = promtool("test", "rules", test_file)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_promtool_unit_tests_can_fail(tmp_path):
    """The same case passes with the right current value and fails with a wrong one."""
    shutil.copy(RULES, tmp_path / RULES.name)

    def run(shown: str) -> subprocess.CompletedProcess:
        case = {
            "rule_files": [RULES.name],
            "evaluation_interval": "1m",
            "tests": [{
                "interval": "1m",
                "input_series": [{"series": 'loyalty_nps{job="stream-kpis",window="90d"}',
                                  "values": "29x130"}],
                "alert_rule_test": [{"eval_time": "121m", "alertname": "LoyaltyNpsTarget", "exp_alerts": [{
                    "exp_labels": {"severity": "critical", "kpi": "nps", "audience": "crm", "window": "90d"},
                    "exp_annotations": {
                        "summary": "nps over 90d missed its goal: at least 30",
                        "description": f"nps over 90d is {shown}; the goal is at least 30 "
                                       "(missed for 2h or more).",
                        "runbook_url": "docs/production.md#kpi-target-alerts",
                    },
                }]}],
            }],
        }  # fmt: skip
        (tmp_path / "case.test.yml").write_text(yaml.safe_dump(case), encoding="utf-8")
        return promtool("test", "rules", "case.test.yml", cwd=tmp_path)

    good = run("29")
    assert good.returncode == 0, good.stdout + good.stderr
    bad = run("28")
    assert bad.returncode != 0
    assert "LoyaltyNpsTarget" in bad.stdout + bad.stderr


def _series_name(t: Target, extra: dict[str, str]) -> str:
    labels = {"job": JOB, "instance": "w0"}
    if t.window:
        labels["window"] = t.window
    labels.update(dict(t.labels))
    labels.update(extra)
    return f"loyalty_{t.kpi}{{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


_LABELS = {"new_members": ("channel",), "tier_members": ("tier",),
           "feedback_mentions": ("lexicon", "term")}  # fmt: skip
_STEP = {"m": 60, "h": 3600, "d": 86400, "s": 1}


def _seconds(duration: str) -> int:
    return int(duration[:-1]) * _STEP[duration[-1]]


def _miss_and_meet(op: str, bound: float) -> tuple[float, float]:
    margin = max(abs(bound) * 0.1, 0.01)
    below, above = bound - margin, bound + margin
    return (below, above) if op in (">=", ">") else (above, below)


def _expected_labels(t: Target, free: dict[str, str]) -> dict[str, str]:
    labels = {"severity": t.severity, "kpi": t.kpi, "audience": "crm"}
    if t.window:
        labels["window"] = t.window
    labels.update(dict(t.labels))
    labels.update(free)
    return labels


def _case(t: Target, step_s: int) -> list[dict]:
    """A promtool test that the target's alert fires when missed and not when met."""
    free = {key: "x" for key in _LABELS.get(t.kpi, ()) if key not in dict(t.labels)}
    name = f"Loyalty{''.join(p.capitalize() for p in t.kpi.split('_'))}"
    miss, meet = _miss_and_meet(t.op, t.bound)
    for_s = _seconds(t.for_)
    if t.kind == "absolute":
        samples = (for_s + 3 * step_s) // step_s

        def values(v: float) -> str:
            return f"{v!r}x{samples}"

        eval_s = for_s + 2 * step_s
        alert = name + "Target"
    else:
        per_s = _seconds(t.per)
        if for_s + 2 * step_s >= per_s:
            pytest.skip(f"target #{t.index}: for >= per, no generic case")
        # reference 1.0 for the first `per`, then 1.0 + delta: missed during [per, 2 per)
        before, after = per_s // step_s, 2 * per_s // step_s

        def values(v: float) -> str:
            return f"1.0x{before} {1.0 + v!r}x{after - before}"

        eval_s = per_s + for_s + 2 * step_s
        alert = name + "TrendTarget"
    cases = []
    for value, fires in ((miss, True), (meet, False)):
        expected = [{"exp_labels": _expected_labels(t, free)}] if fires else []
        cases.append({
            "name": f"target #{t.index} {t.kpi} {'missed' if fires else 'met'}",
            "interval": f"{step_s}s",
            "input_series": [
                {"series": _series_name(t, free), "values": values(value)},
                {"series": f'stream_kpis_global_exporter{{job="{JOB}",instance="w0"}}',
                 "values": f"1x{eval_s // step_s + 1}"},
            ],
            "alert_rule_test": [{"eval_time": f"{eval_s}s", "alertname": alert, "exp_alerts": expected}],
        })  # fmt: skip
    return cases


@needs_promtool
@pytest.mark.parametrize("kind", ["absolute", "relative"])
def test_every_committed_target_fires_when_missed_and_not_when_met(tmp_path, kind):
    """Independent of the hand-written cases: one generated case per target in targets.toml.

    Uses the committed target rules without annotations (those are checked by hand elsewhere).
    """
    rules = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    target_rules = [
        {k: v for k, v in rule.items() if k != "annotations"}
        for group in rules["groups"] for rule in group["rules"]
        if rule["alert"].endswith("Target")
    ]  # fmt: skip
    (tmp_path / "targets.rules.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "targets", "rules": target_rules}]}), encoding="utf-8"
    )
    step_s = 60 if kind == "absolute" else 3600
    targets = [t for t in load_targets(TARGETS).targets if t.kind == kind]
    if not targets:
        pytest.skip(f"no {kind} target in {TARGETS}")
    tests = [case for t in targets for case in _case(t, step_s)]
    (tmp_path / "targets.test.yml").write_text(
        yaml.safe_dump({"rule_files": ["targets.rules.yml"], "evaluation_interval": f"{step_s}s",
                        "tests": tests}),
        encoding="utf-8",
    )  # fmt: skip
    result = promtool("test", "rules", "targets.test.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
