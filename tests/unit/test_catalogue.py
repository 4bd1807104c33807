"""The KPI catalogue against the SPEC, the core's records, the README table and the KPI guide.

The SPEC lists below are copied from SPEC.md sections 4, 4.2, 4.3, 4.4 and 6 by hand, not from the
catalogue; the records come from replaying tests/data/events.jsonl through the core with every
segment dimension and CLV on. Everything else (counts, label sets, the derived views) is derived
from the catalogue, so a KPI added to the SPEC and the catalogue needs no edit here beyond the
SPEC lists.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from stream_kpis.core.catalogue import (
    CATALOGUE,
    KPIS,
    MEMBER_DIMENSIONS,
    ORDER_DIMENSIONS,
    SEGMENT_DIMENSIONS,
    SEGMENT_KINDS,
    TOPIC_KEYS,
    UNITS,
    formula_table,
    label_names,
)
from stream_kpis.core.kpis import KPI_TOPICS
from stream_kpis.live import metrics
from stream_kpis.ops import alerts
from stream_kpis.replay import replay, source_for_path
from stream_kpis.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
EVENTS = ROOT / "tests" / "data" / "events.jsonl"
README = ROOT / "README.md"
GUIDE = ROOT / "docs" / "kpi-guide.md"

# SPEC section 6, "KPI topics".
SPEC_TOPICS = {
    "active-rate": """members active_members active_rate new_members member_growth_rate
                      enrollment_rate tier_members""",
    "redemption": """redeemers redemption_rate redemption_participation points_earned
                     points_redeemed points_burn_rate points_liability expired_points
                     points_expiring breakage_rate""",
    "churn": "churned_members churn_rate retention_rate churn_reduction one_and_done_rate",
    "engagement": """repeat_purchase_rate aov_member aov_guest member_spend_lift
                     member_revenue_share avg_margin_member avg_margin_guest margin_lift
                     avg_lifetime_spend""",
    "satisfaction": "survey_responses nps nps_member nps_guest csat feedback_mentions",
    "cohorts": "cohort_size cohort_retention",
    "clv": "clv_param expected_active_members predicted_purchases predicted_revenue",
}
# SPEC sections 4, 4.3, 4.4 and 6: the labelled KPIs and their labels (new_members_w{channel},
# cohort_retention{cohort, age}, clv_param{model, param}, ...).
SPEC_LABELS = {"new_members": ("channel",), "tier_members": ("tier",),
               "feedback_mentions": ("lexicon", "term"), "cohort_size": ("cohort",),
               "cohort_retention": ("cohort", "age"), "clv_param": ("model", "param")}
# SPEC section 4.2: the dimensions of each kind.
SPEC_DIMENSIONS = {"member": ("tier", "enrollment_channel", "home_store"),
                   "order": ("channel", "store_id")}
# SPEC section 4.2: the KPIs each kind of segment dimension applies to.
SPEC_SEGMENTS = {
    "member": """members active_members active_rate redeemers redemption_rate
                 redemption_participation churned_members churn_rate retention_rate
                 repeat_purchase_rate one_and_done_rate points_liability avg_lifetime_spend""",
    "order": """aov_member aov_guest member_spend_lift member_revenue_share avg_margin_member
                avg_margin_guest margin_lift""",
}
WINDOWS = ("7d", "30d", "90d")  # the default windows; all of them within the 90d churn horizon


# --- the table itself ----------------------------------------------------------------------------


def test_names_are_unique_metric_names():
    names = [kpi.name for kpi in CATALOGUE]
    spec_names = [name for names in SPEC_TOPICS.values() for name in names.split()]
    assert len(names) == len(set(names)) == len(KPIS) == len(spec_names)
    for name in names:
        assert re.fullmatch(r"[a-z][a-z_]*[a-z]", name), name


def test_topics_are_those_of_the_spec_and_of_the_settings():
    assert {kpi.name: kpi.topic for kpi in CATALOGUE} == {
        name: topic for topic, names in SPEC_TOPICS.items() for name in names.split()}
    assert set(TOPIC_KEYS) == set(Settings().topics.kpi_topics())


def test_labels_and_segments_are_those_of_the_spec():
    assert {kpi.name: kpi.labels for kpi in CATALOGUE if kpi.labels} == SPEC_LABELS
    for kind, names in SPEC_SEGMENTS.items():
        assert sorted(kpi.name for kpi in CATALOGUE if kpi.segment == kind) == sorted(names.split())
    assert {kpi.segment for kpi in CATALOGUE} == set(SEGMENT_KINDS)
    assert (MEMBER_DIMENSIONS, ORDER_DIMENSIONS) == (SPEC_DIMENSIONS["member"],
                                                     SPEC_DIMENSIONS["order"])
    assert SEGMENT_DIMENSIONS == MEMBER_DIMENSIONS + ORDER_DIMENSIONS
    # a segment label never collides with a label the KPI carries of its own
    assert not {label for kpi in CATALOGUE if kpi.segment for label in kpi.labels}


@pytest.mark.parametrize("kpi", CATALOGUE, ids=lambda kpi: kpi.name)
def test_entry_is_well_formed(kpi):
    assert kpi.unit in UNITS
    # one line for Prometheus HELP and one table cell for the README
    assert kpi.help.endswith(".") and "\n" not in kpi.help and len(kpi.help) <= 160
    assert kpi.formula and not kpi.formula.endswith(".")
    assert "\n" not in kpi.formula and "|" not in kpi.formula


def test_units_follow_the_kind_of_kpi():
    """Spot checks written from the SPEC: what each of these measures."""
    expected = {"members": "count", "active_rate": "ratio", "points_liability": "points",
                "aov_member": "currency", "nps": "score", "csat": "ratio",
                "member_growth_rate": "ratio", "feedback_mentions": "count"}
    assert {name: KPIS[name].unit for name in expected} == expected


def test_derived_views_agree_with_the_catalogue():
    names = set(KPIS)
    assert KPI_TOPICS == {kpi.name: kpi.topic for kpi in CATALOGUE}
    assert metrics.KPI_HELP == {kpi.name: kpi.help for kpi in CATALOGUE}
    assert metrics.KPI_LABEL_NAMES == {"window"} | label_names() | set(SEGMENT_DIMENSIONS)
    spec_labels = {label for labels in SPEC_LABELS.values() for label in labels}
    assert metrics.KPI_LABEL_NAMES == {"window"} | spec_labels | {
        dimension for dimensions in SPEC_DIMENSIONS.values() for dimension in dimensions}
    assert "member_id" not in metrics.KPI_LABEL_NAMES
    assert alerts.ALL_KPIS == names
    assert alerts.WINDOWED_KPIS == {kpi.name for kpi in CATALOGUE if kpi.windowed}
    assert alerts.UNWINDOWED_KPIS == names - alerts.WINDOWED_KPIS
    assert dict(alerts.KPI_LABELS) == SPEC_LABELS


# --- the core emits exactly the catalogue ----------------------------------------------------------


@pytest.fixture(scope="module")
def records() -> list[dict]:
    settings = Settings(points_validity_ms=30 * 86_400_000,
                        lexicons={"motivation": ("rewards", "discount"), "friction": ("slow",)},
                        segments=SEGMENT_DIMENSIONS, clv=True)
    result = replay([source_for_path(EVENTS)], settings)
    assert result.applied > 0
    return result.records


def test_core_emits_every_catalogue_kpi_and_no_other(records):
    emitted = {record["kpi"] for record in records}
    assert sorted(emitted - set(KPIS)) == [], "KPIs the core emits that the catalogue lacks"
    assert sorted(set(KPIS) - emitted) == [], "catalogue KPIs the core does not emit"


def test_core_records_have_the_catalogue_window_and_labels(records):
    """A record carries its KPI's own labels, or (a segment record, SPEC 4.2) exactly one
    dimension of the KPI's segment kind; every segmented KPI is emitted for every dimension."""
    dimensions = dict(zip(("member", "order"), (MEMBER_DIMENSIONS, ORDER_DIMENSIONS), strict=True))
    windows: dict[str, set] = {}
    segmented: dict[str, set] = {}
    for record in records:
        kpi = KPIS[record["kpi"]]
        assert (record["window"] is not None) == kpi.windowed, record
        labels = set(record.get("labels", {}))
        if labels != set(kpi.labels):
            (dimension,) = labels
            assert kpi.segment is not None and dimension in dimensions[kpi.segment], record
            segmented.setdefault(kpi.name, set()).add(dimension)
        windows.setdefault(kpi.name, set()).add(record["window"])
    assert segmented == {kpi.name: set(dimensions[kpi.segment]) for kpi in CATALOGUE if kpi.segment}
    for name, seen in windows.items():
        assert seen == (set(WINDOWS) if KPIS[name].windowed else {None}), name


# --- the README table and the KPI guide --------------------------------------------------------------


def readme_kpi_rows(text: str) -> list[tuple[str, str]]:
    """(KPI, formula) rows of the table under the README's "## The KPIs" heading."""
    section = text.split("\n## The KPIs\n", 1)[1].split("\n## ", 1)[0]
    lines = section.splitlines()
    start = lines.index("| KPI | formula |")
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        assert len(cells) == 2, line
        rows.append((cells[0], cells[1]))
    return rows


def test_readme_rows_are_read_as_written():
    text = "intro\n## The KPIs\n\ntext\n\n| KPI | formula |\n|---|---|\n| a_w{x} | b / c |\n" \
           "| d | e |\n\nafter | not | a row\n## Next\n| KPI | formula |\n"
    assert readme_kpi_rows(text) == [("a_w{x}", "b / c"), ("d", "e")]


def test_readme_table_is_the_catalogue():
    rows = readme_kpi_rows(README.read_text(encoding="utf-8"))
    expected = [(kpi.display_name, kpi.formula) for kpi in CATALOGUE]
    assert rows == expected, (
        "README.md's KPI table and stream_kpis/core/catalogue.py disagree; the table should read:"
        f"\n{formula_table()}")


def test_kpi_guide_has_a_heading_for_every_kpi_with_its_labels():
    headings = [line for line in GUIDE.read_text(encoding="utf-8").splitlines()
                if line.startswith("#")]
    named: dict[str, set[tuple[str, ...]]] = {}
    for heading in headings:
        for name, labels in re.findall(r"`([a-z_]+)(?:\{([^}]*)\})?`", heading):
            named.setdefault(name, set()).add(tuple(labels.split(",")) if labels else ())
    assert sorted(set(KPIS) - set(named)) == [], "KPIs without a heading in docs/kpi-guide.md"
    for kpi in CATALOGUE:
        assert named[kpi.name] == {kpi.labels}, kpi.name
