"""Deployment files: docker-compose, Dockerfile, Kubernetes, Prometheus, Alertmanager, Grafana.

No Docker engine or cluster here, so each file is checked against its published schema or
its own tool (compose-spec JSON schema, kubernetes-validate, kubectl kustomize, promtool,
amtool) and against the others (ports, names, paths, env vars, metric names).
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from stream_kpis.ops.alerts import HEALTH_ALERTS, TARGET_NO_DATA_ALERT, load_targets, promql_metric_names
from stream_kpis.ops.dashboard import DATASOURCE_UID, dashboard_queries, render_dashboard_json
from stream_kpis.settings import ENV

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
K8S = DEPLOY / "k8s"
PROMETHEUS_DIR = DEPLOY / "prometheus"
RULES = PROMETHEUS_DIR / "rules" / "stream-kpis.rules.yml"
ALERTMANAGER = DEPLOY / "alertmanager" / "alertmanager.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "stream-kpis.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "stream-kpis.yml"
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found on PATH")
    return path


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


# Metric names of the project's metrics contract (README "Outputs", docs/production.md),
# written out independently of the code.
CONTRACT_KPIS = """
members active_members active_rate new_members member_growth_rate enrollment_rate tier_members
redeemers redemption_rate redemption_participation points_earned points_redeemed points_burn_rate
points_liability expired_points points_expiring breakage_rate churned_members churn_rate
retention_rate churn_reduction one_and_done_rate repeat_purchase_rate aov_member aov_guest
member_spend_lift member_revenue_share avg_margin_member avg_margin_guest margin_lift
avg_lifetime_spend survey_responses nps nps_member nps_guest csat feedback_mentions
cohort_size cohort_retention
clv_param expected_active_members predicted_purchases predicted_revenue
""".split()
CONTRACT_OPERATIONAL = """
stream_kpis_events_total stream_kpis_dead_letters_total stream_kpis_duplicates_total
stream_kpis_processing_seconds_bucket stream_kpis_processing_seconds_sum
stream_kpis_processing_seconds_count stream_kpis_event_lag_seconds_bucket
stream_kpis_event_lag_seconds_sum stream_kpis_event_lag_seconds_count
stream_kpis_watermark_lag_seconds stream_kpis_consumer_lag_messages stream_kpis_table_rows
stream_kpis_kpi_emissions_total stream_kpis_last_emit_timestamp_seconds stream_kpis_global_exporter
stream_kpis_signals_total stream_kpis_redis_errors_total
stream_kpis_lost_commits_total stream_kpis_stalled_partitions stream_kpis_segment_values_dropped
""".split()
CONTRACT_METRICS = {f"loyalty_{kpi}" for kpi in CONTRACT_KPIS} | set(CONTRACT_OPERATIONAL) | {"up"}


def test_contract_lists_are_complete():
    assert len(CONTRACT_KPIS) == len(set(CONTRACT_KPIS)) == 43


# --------------------------------------------------------------------------- docker-compose


def compose_schema() -> dict:
    """compose-spec.json as vendored by the check-jsonschema package (read, not imported)."""
    spec = importlib.util.find_spec("check_jsonschema")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("check-jsonschema (which ships the compose-spec schema) is not installed")
    path = Path(spec.submodule_search_locations[0]) / "builtin_schemas" / "vendor" / "compose-spec.json"
    return json.loads(path.read_text(encoding="utf-8"))


def schema_errors(schema: dict, document: dict) -> list[str]:
    # compose-spec.json declares draft-07 (as "https://json-schema.org/draft-07/schema")
    assert "draft-07" in schema["$schema"]
    jsonschema.Draft7Validator.check_schema(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in jsonschema.Draft7Validator(schema).iter_errors(document)]  # fmt: skip


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(COMPOSE)


def test_compose_file_is_valid_against_the_compose_spec(compose):
    assert schema_errors(compose_schema(), compose) == []


@pytest.mark.parametrize(
    "breakage",
    [
        lambda c: c["services"]["worker"].update(comand=["worker"]),
        lambda c: c["services"]["redis"].update(ports=6379),
        lambda c: c["services"]["worker"]["depends_on"]["topics"].update(condition="done"),
    ],
)
def test_compose_schema_rejects_broken_files(compose, breakage):
    broken = json.loads(json.dumps(compose))
    breakage(broken)
    assert schema_errors(compose_schema(), broken)


def test_compose_services_and_their_wiring(compose):
    services = compose["services"]
    assert set(services) == {"kafka", "redis", "topics", "worker", "prometheus", "alertmanager", "grafana"}
    for name, service in services.items():
        image = service.get("image", "")
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin an image tag"
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
    kafka_env = services["kafka"]["environment"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert set(kafka_env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}  # KRaft
    assert "kafka:9092" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]

    worker, topics = services["worker"], services["topics"]
    assert worker["command"] == ["worker"]
    assert topics["command"][:2] == ["topics", "create"]
    for service in (worker, topics):
        assert service["build"] == "." and (ROOT / "Dockerfile").is_file()
        env = service["environment"]
        assert env["STREAM_KPIS_BROKER"] == "kafka://kafka:9092"
        assert env["STREAM_KPIS_REDIS_URL"] == "redis://redis:6379/0"
        assert set(env) <= set(ENV.values()), "every variable must be one the settings read"
    assert topics["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert worker["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert worker["environment"]["STREAM_KPIS_WEB_PORT"] == "6066" and "6066" in worker["expose"]
    # anonymous volume: one RocksDB directory per replica
    assert worker["volumes"] == [worker["environment"]["STREAM_KPIS_DATA_DIR"]]


def mounts(service: dict) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts."""
    out = {}
    for volume in service.get("volumes", []):
        parts = volume.split(":")
        if parts[0].startswith("./"):
            out[parts[1]] = ROOT / parts[0]
    return out


def test_compose_bind_mounts_and_config_paths_exist(compose):
    services = compose["services"]
    for name, service in services.items():
        for container_path, host_path in mounts(service).items():
            assert host_path.exists(), f"{name}: {host_path} (mounted at {container_path}) is missing"

    prometheus = services["prometheus"]
    (config_flag,) = [a for a in prometheus["command"] if a.startswith("--config.file=")]
    config_in_container = config_flag.split("=", 1)[1]
    host_dirs = mounts(prometheus)
    container_dir = str(Path(config_in_container).parent)
    config = host_dirs[container_dir] / Path(config_in_container).name
    assert config.is_file()
    scrape = {job["job_name"]: job for job in load_yaml(config)["scrape_configs"]}
    (dns,) = scrape["stream-kpis"]["dns_sd_configs"]
    assert dns["names"] == ["worker"] and dns["port"] == 6066
    alertmanagers = load_yaml(config)["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert alertmanagers == ["alertmanager:9093"] and "9093:9093" in services["alertmanager"]["ports"]

    alertmanager = services["alertmanager"]
    (am_flag,) = [a for a in alertmanager["command"] if a.startswith("--config.file=")]
    am_path = Path(am_flag.split("=", 1)[1])
    assert (mounts(alertmanager)[str(am_path.parent)] / am_path.name).samefile(ALERTMANAGER)

    grafana = services["grafana"]
    grafana_mounts = mounts(grafana)
    assert grafana_mounts["/etc/grafana/provisioning"].samefile(DEPLOY / "grafana" / "provisioning")
    provider_path = load_yaml(DASHBOARD_PROVIDERS)["providers"][0]["options"]["path"]
    assert grafana_mounts[provider_path].samefile(DASHBOARD.parent)
    (datasource,) = load_yaml(DATASOURCES)["datasources"]
    variable = re.fullmatch(r"\$\{?(\w+)\}?", datasource["url"]).group(1)
    assert grafana["environment"][variable] == "http://prometheus:9090"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (grafana_mounts[str(Path(home).parent)] / Path(home).name).samefile(DASHBOARD)


# --------------------------------------------------------------------------- Dockerfile


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern[1:] if negate else pattern
        glob = glob.rstrip("/")
        if any(fnmatch.fnmatch(c, glob) or fnmatch.fnmatch(c, glob.removeprefix("**/"))
               for c in candidates):  # fmt: skip
            excluded = not negate
    return excluded


def dockerfile_commands() -> dict[str, list[tuple[str, ...]]]:
    """The values of each instruction; COPY only those that copy from the build context (not
    ``--from`` another stage)."""
    dockerfile = pytest.importorskip("dockerfile", reason="the `dockerfile` parser package")
    by_cmd: dict[str, list] = {}
    for command in dockerfile.parse_file(str(ROOT / "Dockerfile")):
        if command.cmd.upper() == "COPY" and any(f.startswith("--from=") for f in command.flags):
            continue
        by_cmd.setdefault(command.cmd.upper(), []).append(command.value)
    return by_cmd


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerfile_builds_the_worker_image():
    by_cmd = dockerfile_commands()
    # a build stage makes the wheel (with the native extension), the image installs it
    assert by_cmd["FROM"] == [("python:3.11-slim", "AS", "build"), ("python:3.11-slim",)]
    assert any("cargo" in " ".join(value) for value in by_cmd["RUN"])
    assert any("pip wheel" in " ".join(value) for value in by_cmd["RUN"])
    assert any("pip install /wheels/" in " ".join(value) for value in by_cmd["RUN"])
    assert by_cmd["ENTRYPOINT"] == [("stream-kpis",)] and by_cmd["CMD"] == [("worker",)]
    assert by_cmd["EXPOSE"] == [("6066",)]
    assert by_cmd["USER"][-1][0].split(":")[0] not in ("root", "0")
    patterns = dockerignore_patterns()
    for value in by_cmd["COPY"]:
        for source in value[:-1]:
            assert not dockerignore_excludes(source, patterns), f"COPY {source}: excluded by .dockerignore"
    assert dockerignore_excludes("native/target/release/x", patterns)
    assert dockerignore_excludes(".venv", patterns) and dockerignore_excludes("tests/unit", patterns)
    assert not dockerignore_excludes("stream_kpis/ops/alerts.py", patterns)
    assert dockerignore_excludes("stream_kpis/__pycache__/x.pyc", patterns)


def test_dockerfile_copies_files_that_exist():
    """`pip install .` needs pyproject.toml's readme (README.md) in the build context too."""
    for value in dockerfile_commands()["COPY"]:
        for source in value[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: missing in the repository"


# --------------------------------------------------------------------------- Kubernetes


def kustomization() -> dict:
    return load_yaml(K8S / "kustomization.yaml")


def k8s_documents() -> list[dict]:
    return [doc for name in kustomization()["resources"]
            for doc in yaml.safe_load_all((K8S / name).read_text(encoding="utf-8")) if doc]  # fmt: skip


def by_kind(kind: str) -> dict:
    (doc,) = [d for d in k8s_documents() if d["kind"] == kind]
    return doc


def test_kustomization_lists_every_manifest():
    listed = kustomization()["resources"]
    on_disk = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk
    assert kustomization()["namespace"] == by_kind("Namespace")["metadata"]["name"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_k8s_manifests_are_valid(version):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for document in k8s_documents():
        kubernetes_validate.validate(document, version, strict=True)


def test_k8s_validation_rejects_a_broken_statefulset():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    broken = json.loads(json.dumps(by_kind("StatefulSet")))
    del broken["spec"]["selector"]
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "6066"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


def test_kustomize_build_is_valid():
    kubectl = tool("kubectl")
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    result = run(kubectl, "kustomize", str(K8S))
    assert result.returncode == 0, result.stderr
    built = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert sorted(d["kind"] for d in built) == sorted(d["kind"] for d in k8s_documents())
    for document in built:
        kubernetes_validate.validate(document, KUBERNETES_VERSIONS[-1], strict=True)
        if document["kind"] != "Namespace":
            assert document["metadata"]["namespace"] == kustomization()["namespace"]


def test_k8s_statefulset_service_and_config_fit_together():
    statefulset, service = by_kind("StatefulSet"), by_kind("Service")
    configmap, pdb, job = by_kind("ConfigMap"), by_kind("PodDisruptionBudget"), by_kind("Job")
    pod = statefulset["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"  # headless
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert statefulset["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (service_port,) = service["spec"]["ports"]
    assert ports[service_port["targetPort"]] == 6066 == int(configmap["data"]["STREAM_KPIS_WEB_PORT"])
    assert container["args"] == ["worker"]
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][:2] == ["topics", "create"]
    assert container["envFrom"][0]["configMapRef"]["name"] == configmap["metadata"]["name"]
    assert set(configmap["data"]) <= set(ENV.values()), "every variable must be one the settings read"

    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    mounted = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounted[claim["metadata"]["name"]] == configmap["data"]["STREAM_KPIS_DATA_DIR"]

    # prometheus.k8s.yml finds the workers through this Service's SRV records
    namespace = kustomization()["namespace"]
    srv = f"_{service_port['name']}._tcp.{service['metadata']['name']}.{namespace}.svc.cluster.local"
    scrape = {j["job_name"]: j for j in load_yaml(PROMETHEUS_DIR / "prometheus.k8s.yml")["scrape_configs"]}
    assert scrape["stream-kpis"]["dns_sd_configs"][0]["names"] == [srv]


# --------------------------------------------------------------------------- Prometheus


PROMETHEUS_CONFIGS = sorted(PROMETHEUS_DIR.glob("prometheus*.yml"))


@pytest.mark.parametrize("config", PROMETHEUS_CONFIGS, ids=lambda p: p.name)
def test_prometheus_config_scrapes_the_workers_and_loads_the_rules(config):
    document = load_yaml(config)
    jobs = [job["job_name"] for job in document["scrape_configs"]]
    assert "stream-kpis" in jobs
    for rule_file in document["rule_files"]:
        assert (config.parent / rule_file).resolve() == RULES.resolve()
    result = run(tool("promtool"), "check", "config", config.name, cwd=config.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_local_prometheus_config_targets_the_local_worker():
    document = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    (job,) = [j for j in document["scrape_configs"] if j["job_name"] == "stream-kpis"]
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:6066"]
    assert job.get("metrics_path", "/metrics") == "/metrics"


# --------------------------------------------------------------------------- Alertmanager


def expected_receiver(labels: dict[str, str]) -> str:
    if labels["audience"] == "crm":
        return "crm"
    return "ops-pager" if labels["severity"] == "critical" else "ops"


def test_alertmanager_config_is_valid():
    result = run(tool("amtool"), "check-config", str(ALERTMANAGER))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_routes_to_its_audience():
    amtool = tool("amtool")
    rules = [r for g in load_yaml(RULES)["groups"] for r in g["rules"]]
    label_sets = {tuple(sorted({"alertname": r["alert"], **r["labels"]}.items())) for r in rules}
    for label_set in sorted(label_sets):
        labels = dict(label_set)
        result = run(amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER}",
                     *(f"{k}={v}" for k, v in labels.items()))  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == expected_receiver(labels), labels


def test_inhibit_rules_name_existing_alerts():
    names = {r["alert"] for g in load_yaml(RULES)["groups"] for r in g["rules"]}
    for rule in load_yaml(ALERTMANAGER)["inhibit_rules"]:
        for matcher in rule["source_matchers"] + rule["target_matchers"]:
            match = re.fullmatch(r'alertname="(\w+)"', matcher)
            if match:
                assert match.group(1) in names


# --------------------------------------------------------------------------- Grafana


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def all_panels(panels: list[dict]) -> list[dict]:
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(all_panels(panel.get("panels", [])))
    return out


def test_datasource_provisioning_matches_the_dashboard():
    (datasource,) = load_yaml(DATASOURCES)["datasources"]
    assert datasource["type"] == "prometheus" and datasource["uid"] == DATASOURCE_UID
    assert load_yaml(DASHBOARD_PROVIDERS)["providers"][0]["type"] == "file"


def test_dashboard_is_structurally_valid(dashboard):
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    panels = all_panels(dashboard["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    (datasource,) = load_yaml(DATASOURCES)["datasources"]
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}  # fmt: skip
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert isinstance(target["expr"], str) and target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == datasource["uid"]


def test_dashboard_queries_use_only_contract_metrics(dashboard):
    queries = dashboard_queries(dashboard)
    assert len(queries) == DASHBOARD.read_text(encoding="utf-8").count('"expr":')
    used = set().union(*(promql_metric_names(q) for q in queries))
    assert used <= CONTRACT_METRICS, used - CONTRACT_METRICS
    assert all("$" not in q for q in queries), "no Grafana variables: queries must run as they are"
    # the CRM audience's KPIs are all on the dashboard
    shown = {name.removeprefix("loyalty_") for name in used if name.startswith("loyalty_")}
    assert shown == set(CONTRACT_KPIS) - {"active_members", "redeemers", "points_earned",
                                           "points_redeemed"}  # fmt: skip


def test_rule_queries_use_only_contract_metrics():
    from stream_kpis.ops.alerts import rule_queries

    used = set().union(*(promql_metric_names(q) for q in rule_queries(load_yaml(RULES))))
    assert used <= CONTRACT_METRICS, used - CONTRACT_METRICS


def test_dashboard_draws_every_goal(dashboard):
    panels = [p for p in all_panels(dashboard["panels"]) if p["type"] != "row"]
    for target in load_targets(DEPLOY / "targets.toml").targets:
        showing = [p for p in panels
                   if any(f"loyalty_{target.kpi}{{" in t["expr"] for t in p["targets"])]  # fmt: skip
        assert showing, f"no panel shows {target.kpi}"
        if target.kind == "absolute":
            steps = [s["value"] for p in showing for s in p["fieldConfig"]["defaults"]["thresholds"]["steps"]]
            assert target.value in steps, f"goal {target.kpi} {target.op} {target.value} not drawn"
        else:
            exprs = [t["expr"] for p in showing for t in p["targets"]]
            assert any(f"offset {target.per}" in e for e in exprs), f"trend goal {target.kpi} not drawn"


def test_retention_table_and_segment_panels(dashboard):
    """The retention triangle (SPEC 4.3) as a Grafana table: instant queries in table format,
    turned into a cohort x age matrix with the cohort size as the first column; the segment
    panels read one series per dimension value (SPEC 4.2)."""
    panels = {p["title"]: p for p in all_panels(dashboard["panels"])}
    table = panels["Retention by enrollment month"]
    assert table["type"] == "table" and table["gridPos"]["w"] == 24
    (target,) = table["targets"]
    assert target["instant"] and not target["range"] and target["format"] == "table"
    assert promql_metric_names(target["expr"]) == {"loyalty_cohort_retention", "loyalty_cohort_size"}
    assert '"age", "members"' in target["expr"]  # the size becomes the "members" column
    matrix, organize = table["transformations"]
    assert matrix == {"id": "groupingToMatrix",
                      "options": {"columnField": "age", "rowField": "cohort", "valueField": "Value"}}
    order = organize["options"]["indexByName"]
    assert [order["cohort\\age"], order["members"], order["0"], order["11"]] == [0, 1, 2, 13]
    for title, kpi, dimension in [("Active rate by tier", "active_rate", "tier"),
                                  ("Churn rate by home store", "churn_rate", "home_store"),
                                  ("Member spend lift by store", "member_spend_lift", "store_id")]:
        (expr, *goals) = [t["expr"] for t in panels[title]["targets"]]
        assert f'loyalty_{kpi}{{' in expr and f'{dimension}!=""' in expr, expr
        assert f"by (window, {dimension})" in expr
        assert panels[title]["targets"][0]["legendFormat"] == f"{{{{{dimension}}}}}"


def test_committed_dashboard_is_up_to_date(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert DASHBOARD.read_text(encoding="utf-8") == render_dashboard_json(Path("deploy/targets.toml")), (
        "deploy/grafana/dashboards/stream-kpis.json is out of date: regenerate it with "
        "stream_kpis.ops.dashboard.render_dashboard_json('deploy/targets.toml')"
    )


# --------------------------------------------------------------------------- docs


def github_anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_alert_has_a_runbook_section():
    docs = (ROOT / "docs" / "production.md").read_text(encoding="utf-8")
    anchors = {github_anchor(line.lstrip("#")) for line in docs.splitlines() if line.startswith("#")}
    for name in (*HEALTH_ALERTS, TARGET_NO_DATA_ALERT):
        assert f"### {name}" in docs
    for group in load_yaml(RULES)["groups"]:
        for rule in group["rules"]:
            page, anchor = rule["annotations"]["runbook_url"].split("#")
            assert (ROOT / page).is_file() and anchor in anchors, rule["alert"]
