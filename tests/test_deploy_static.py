"""Static checks of the deployment artefacts: compose, Dockerfile, Kubernetes, dashboards, CI and docs.

Offline: schemas are vendored in tests/data (see its README), Kubernetes schemas ship with
kubernetes-validate. Nothing here starts a server; tests/test_prometheus_rules.py runs promtool.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from core.metrics import build_metrics
from core.settings import Settings
from tests.promql import (
    cumulative_series,
    dashboard_queries,
    iter_panels,
    known_series,
    metric_names,
    metrics_markdown,
    raw_counters,
    rule_expressions,
    substitute,
    unknown_metrics,
    vars_of,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
COMPOSE = ROOT / "compose.yaml"
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.30.0"
RULES = ROOT / "prometheus" / "rules" / "driftloop.yml"
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
DATASOURCE = ROOT / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER = ROOT / "grafana" / "provisioning" / "dashboards" / "driftloop.yml"
SECRET_WORDS = re.compile(r"PASSWORD|TOKEN|SECRET|DATABASE_URL|WEBHOOK")
REQUIRED = re.compile(r"\$\{(\w+):\?[^}]+\}")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def environment(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def schema_errors(document: Any, schema_path: Path) -> list[str]:
    schema = json.loads(schema_path.read_text(encoding="utf-8"))
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


# --- compose ------------------------------------------------------------------------------------------


def test_compose_matches_the_compose_specification() -> None:
    assert schema_errors(compose(), DATA / "compose-spec.json") == []


def test_compose_spec_schema_catches_a_mistake() -> None:
    broken = compose()
    broken["services"]["api"]["depends_on"]["migrate"]["condition"] = "service_finished"
    broken["services"]["api"]["healthchek"] = {}
    errors = schema_errors(broken, DATA / "compose-spec.json")
    assert errors  # the vendored schema is strict enough to notice both
    assert any("healthchek" in e for e in errors)


def test_every_file_compose_mounts_exists() -> None:
    doc = compose()
    sources = []
    for name, service in doc["services"].items():
        for volume in service.get("volumes") or ():
            source = volume.split(":")[0]
            if ":" in volume and source.startswith("/"):
                pytest.fail(f"{name}: {volume} mounts a host path outside the repository")
            if source.startswith("."):  # a bind mount from the repository
                sources.append(source)
        build = service.get("build")
        if build:
            sources += [build["context"], str(Path(build["context"]) / build.get("dockerfile", "Dockerfile"))]
    sources += [config["file"] for config in (doc.get("configs") or {}).values() if "file" in config]
    assert len(sources) >= 5, sources
    missing = [s for s in sources if not (ROOT / s).exists()]
    assert missing == []


def test_every_depends_on_names_a_condition() -> None:
    allowed = {"service_started", "service_healthy", "service_completed_successfully"}
    problems = []
    for name, service in services().items():
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):
            problems.append(f"{name}: depends_on is a list, so it waits for nothing but the start")
            continue
        for other, spec in depends.items():
            if other not in services():
                problems.append(f"{name}: depends on unknown service {other}")
            elif (spec or {}).get("condition") not in allowed:
                problems.append(f"{name} -> {other}: no condition")
    assert problems == []


def test_every_long_running_service_has_a_healthcheck() -> None:
    lacking = []
    for name, service in services().items():
        if service.get("restart") == "no":
            continue  # one-shot (migrate)
        check = service.get("healthcheck") or {}
        if check.get("disable") or not check.get("test"):
            lacking.append(name)
    assert lacking == []


def test_required_secrets_use_error_interpolation() -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    required = set(REQUIRED.findall(text))
    assert {
        "POSTGRES_PASSWORD",
        "DRIFTLOOP_ADMIN_TOKEN",
        "GRAFANA_ADMIN_PASSWORD",
        "ALERT_WEBHOOK_URL",
    } <= required
    problems = []
    for name, service in services().items():
        for key, value in environment(service).items():
            if not SECRET_WORDS.search(key):
                continue
            if key in ("DRIFTLOOP_WEBHOOK_URL", "DRIFTLOOP_FEEDBACK_TOKEN") and value is None:
                continue  # optional: passed through from the caller's environment when set
            if not REQUIRED.search(str(value)):
                problems.append(f"{name}: {key}={value!r} does not use ${{VAR:?message}}")
    assert problems == []


def test_no_default_password_anywhere() -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    assert re.findall(r"\$\{\w*(?:PASSWORD|TOKEN)\w*:-", text) == []


def test_api_and_worker_share_artifacts_but_not_spools() -> None:
    svc = services()
    artifact_dir = environment(svc["api"])["DRIFTLOOP_ARTIFACT_DIR"]
    spool_dir = environment(svc["api"])["DRIFTLOOP_SPOOL_DIR"]
    named = set(compose()["volumes"])

    def named_mount(service: str, target: str) -> str | None:
        for volume in svc[service].get("volumes") or ():
            parts = volume.split(":")
            if len(parts) >= 2 and parts[1] == target and parts[0] in named:
                return parts[0]
        return None

    assert named_mount("api", artifact_dir) == named_mount("worker", artifact_dir) == "artifacts"
    assert named_mount("api", environment(svc["api"])["DRIFTLOOP_REPORT_DIR"]) == "reports"
    assert named_mount("api", spool_dir) is None  # a named volume would be one spool for two replicas
    assert spool_dir in svc["api"]["volumes"]  # an anonymous volume per replica


def test_evidentlys_ui_reads_the_workspace_the_monitor_writes_and_sends_no_telemetry() -> None:
    svc = services()
    workspace = environment(svc["worker"])["DRIFTLOOP_EVIDENTLY_WORKSPACE"]
    assert environment(svc["api"])["DRIFTLOOP_EVIDENTLY_WORKSPACE"] == workspace
    mount = f"evidently:{workspace}"
    assert mount in svc["worker"]["volumes"] and mount in svc["api"]["volumes"]
    ui = svc["evidently-ui"]
    assert ui["entrypoint"] == ["evidently"] and ui["command"][:3] == ["ui", "--workspace", workspace]
    assert ui["volumes"] == [mount]
    assert environment(ui)["DO_NOT_TRACK"] == "1"
    assert "DRIFTLOOP_ADMIN_TOKEN" not in environment(ui)  # it needs no secret of driftloop's
    assert ui["ports"] == ["127.0.0.1:8010:8010"]  # no login of its own: loopback only
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert workspace in dockerfile  # made in the image, so the named volume starts owned by driftloop


def test_compose_topology() -> None:
    svc = services()
    assert svc["api"]["deploy"]["replicas"] == 2
    assert svc["api"]["command"][:1] == ["serve"] and "--no-scheduler" in svc["api"]["command"]
    assert svc["api"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "migrate": {"condition": "service_completed_successfully"},
    }
    assert svc["migrate"]["command"] == ["migrate"]
    assert svc["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert svc["worker"]["command"] == [
        "driftloop bootstrap && exec driftloop worker --host 0.0.0.0 --port 9100"
    ]
    assert "pg_isready" in " ".join(svc["postgres"]["healthcheck"]["test"])
    assert environment(svc["grafana"])["GF_AUTH_ANONYMOUS_ENABLED"] == "false"


def test_prometheus_grafana_and_alertmanager_mount_this_repository() -> None:
    svc = services()
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in svc["prometheus"]["volumes"]
    assert "./prometheus/rules:/etc/prometheus/rules:ro" in svc["prometheus"]["volumes"]
    assert (
        "./alertmanager/alertmanager.yml:/etc/alertmanager/alertmanager.yml:ro"
        in svc["alertmanager"]["volumes"]
    )
    grafana_mounts = dict(v.split(":")[:2] for v in svc["grafana"]["volumes"] if v.startswith("./"))
    assert all(v.endswith(":ro") for v in svc["grafana"]["volumes"] if v.startswith("./"))
    provider = load_yaml(DASHBOARD_PROVIDER)["providers"][0]
    assert provider["type"] == "file"
    assert grafana_mounts["./dashboards"] == provider["options"]["path"]
    assert grafana_mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


def test_alertmanager_routes_drift_alerts_to_the_webhook_from_env() -> None:
    config = load_yaml(ROOT / "alertmanager" / "alertmanager.yml")
    drift_route = [r for r in config["route"]["routes"] if 'category="drift"' in r.get("matchers", [])]
    assert len(drift_route) == 1
    receiver = next(r for r in config["receivers"] if r["name"] == drift_route[0]["receiver"])
    url_file = receiver["webhook_configs"][0]["url_file"]
    mounted = [c for c in services()["alertmanager"]["configs"] if c["target"] == url_file]
    assert len(mounted) == 1
    assert compose()["configs"][mounted[0]["source"]]["content"].startswith("${ALERT_WEBHOOK_URL:?")
    drift_alerts = {
        r["alert"]
        for g in load_yaml(RULES)["groups"]
        for r in g["rules"]
        if r["labels"]["category"] == "drift"
    }
    assert drift_alerts == {"DriftBreach", "WindowMaeHigh"}


# --- Dockerfile ---------------------------------------------------------------------------------------


def dockerfile() -> list[str]:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_is_multi_stage_slim_and_unprivileged() -> None:
    lines = dockerfile()
    stages = [line for line in lines if line.startswith("FROM ")]
    assert len(stages) == 2 and stages[0].endswith(" AS builder")
    assert stages[-1] == "FROM python:3.11-slim"
    final = lines[lines.index(stages[-1]) :]
    assert "build-essential" not in " ".join(final)
    assert any(line.startswith("COPY --from=builder /opt/venv") for line in final)
    user = [line for line in final if line.startswith("USER ")]
    assert user and user[-1].split()[1].split(":")[0] not in ("0", "root")
    assert "EXPOSE 8000" in final
    healthcheck = [line for line in final if line.startswith("HEALTHCHECK ")]
    assert len(healthcheck) == 1 and 'CMD ["python", "-c", ' in healthcheck[0]  # slim has no curl
    assert "HEALTHCHECK_URL=http://127.0.0.1:8000/health" in " ".join(final)
    assert 'ENTRYPOINT ["driftloop"]' in final


def test_dockerfile_copies_only_what_exists_and_dockerignore_lets_through() -> None:
    copies = [
        line.split()[1:-1] for line in dockerfile() if line.startswith("COPY ") and "--from" not in line
    ]
    sources = [s for group in copies for s in group]
    assert sources == ["pyproject.toml", "README.md", "core", "retrain", "monitor", "service"]
    missing = [s for s in sources if not (ROOT / s).exists()]
    assert missing == [], f"docker build would fail: {missing} not in the repository"
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    assert set(sources) <= allowed
    packages = set(load_pyproject()["tool"]["setuptools"]["packages"]["find"]["include"])
    assert {p.rstrip("*") for p in packages} <= set(sources)


def load_pyproject() -> dict[str, Any]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


# --- Kubernetes ---------------------------------------------------------------------------------------


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                docs.append((path.name, doc))
    return docs


@pytest.mark.parametrize("name,doc", k8s_documents(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_k8s_manifest_is_valid(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_k8s_validation_catches_a_mistake() -> None:
    deployment = next(doc for name, doc in k8s_documents() if name == "api-deployment.yaml")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(on_disk)


@pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl not installed (it renders kustomize offline)"
)
def test_kustomization_builds() -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(out.stdout) if doc)
    assert kinds == sorted(doc["kind"] for _, doc in k8s_documents())
    assert all(
        doc["metadata"].get("namespace") in ("driftloop", None) for doc in yaml.safe_load_all(out.stdout)
    )


def k8s(kind: str, name: str) -> dict[str, Any]:
    return next(d for _, d in k8s_documents() if d["kind"] == kind and d["metadata"]["name"] == name)


def test_k8s_api_deployment() -> None:
    api = k8s("Deployment", "driftloop-api")
    pod = api["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert api["spec"]["replicas"] == 3
    assert container["args"] == ["serve", "--host", "0.0.0.0", "--port", "8000", "--no-scheduler"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert set(container["resources"]) == {"requests", "limits"}
    assert pod["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "8000",
        "prometheus.io/path": "/metrics",
    }
    hpa = k8s("HorizontalPodAutoscaler", "driftloop-api")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == "driftloop-api"
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert hpa["spec"]["minReplicas"] == api["spec"]["replicas"]


def test_k8s_worker_is_single_and_recreated() -> None:
    worker = k8s("Deployment", "driftloop-worker")
    assert worker["spec"]["replicas"] == 1
    assert worker["spec"]["strategy"] == {"type": "Recreate"}
    spec = worker["spec"]["template"]["spec"]
    assert spec["initContainers"][0]["args"] == ["bootstrap"]
    assert spec["containers"][0]["args"] == ["worker", "--host", "0.0.0.0", "--port", "9100"]
    job = k8s("Job", "driftloop-migrate")
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate"]


def test_k8s_prune_runs_daily_one_at_a_time_with_the_database_and_config() -> None:
    cron = k8s("CronJob", "driftloop-prune")
    assert (cron["spec"]["schedule"], cron["spec"]["concurrencyPolicy"]) == ("17 3 * * *", "Forbid")
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["prune", "--older-than", "90"]
    assert container["envFrom"] == [{"configMapRef": {"name": "driftloop-config"}}]
    assert [e["name"] for e in container["env"]] == ["DRIFTLOOP_DATABASE_URL"]


def test_k8s_state_and_secrets() -> None:
    pvc = k8s("PersistentVolumeClaim", "driftloop-artifacts")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert not [d for _, d in k8s_documents() if d["kind"] == "Secret"], "secrets are created, not committed"
    config = k8s("ConfigMap", "driftloop-config")["data"]
    for deployment in ("driftloop-api", "driftloop-worker"):
        spec = k8s("Deployment", deployment)["spec"]["template"]["spec"]
        claims = {
            v["name"]
            for v in spec["volumes"]
            if v.get("persistentVolumeClaim", {}).get("claimName") == "driftloop-artifacts"
        }
        for container in spec.get("initContainers", []) + spec["containers"]:
            for directory in (config["DRIFTLOOP_ARTIFACT_DIR"], config["DRIFTLOOP_REPORT_DIR"]):
                # the deepest mount holding the directory is the shared claim, whole (no subPath)
                holder = max(
                    (
                        m
                        for m in container["volumeMounts"]
                        if directory.startswith(m["mountPath"].rstrip("/") + "/")
                    ),
                    key=lambda m: len(m["mountPath"]),
                )
                assert holder["name"] in claims and "subPath" not in holder, (deployment, directory)
            refs = {
                e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", []) if "valueFrom" in e
            }
            assert refs == {"driftloop-secrets"}
    readme = (K8S / "README.md").read_text(encoding="utf-8")
    assert "create secret generic driftloop-secrets" in readme


# --- Prometheus config, rules and dashboards ----------------------------------------------------------


def known() -> set[str]:
    registry = CollectorRegistry()
    build_metrics(registry)
    return known_series(registry)


def all_queries() -> list[tuple[str, str]]:
    queries = [
        (f"{path.name}: {title}", expr) for path in DASHBOARDS for title, expr in dashboard_queries(path)
    ]
    return queries + [(f"rule {name}", expr) for name, expr in rule_expressions(RULES)]


def test_dashboards_and_rules_use_only_exported_metrics() -> None:
    queries = all_queries()
    assert len(queries) > 50
    assert unknown_metrics(queries, known()) == []


def cumulative() -> set[str]:
    registry = CollectorRegistry()
    build_metrics(registry)
    return cumulative_series(registry)


def test_dashboards_read_counters_through_rate_or_increase() -> None:
    """A panel plotting a counter's raw value shows totals since each process started: they fall at every
    restart or swap of replicas, and say nothing about the dashboard's time range."""
    queries = [
        (f"{path.name}: {title}", expr) for path in DASHBOARDS for title, expr in dashboard_queries(path)
    ]
    assert raw_counters(queries, cumulative()) == []


def test_a_raw_counter_is_named_and_rate_or_increase_pass() -> None:
    queries = [
        ("raw", "sum by (outcome) (driftloop_monitor_runs_total)"),
        ("raw bucket", "histogram_quantile(0.9, sum by (le) (driftloop_monitor_seconds_bucket))"),
        ("fine", 'sum(increase(driftloop_logger_rows_total{outcome="dropped"}[5m])) or vector(0)'),
        ("fine too", "sum by (le) (rate(driftloop_predict_seconds_bucket[1m])) / sum(irate(x_total[1m]))"),
        ("a gauge", "max(driftloop_notifications_pending)"),
    ]
    assert raw_counters(queries, cumulative()) == [
        "raw: 'driftloop_monitor_runs_total' is read raw, not through rate() or increase() "
        "(expr: sum by (outcome) (driftloop_monitor_runs_total))",
        "raw bucket: 'driftloop_monitor_seconds_bucket' is read raw, not through rate() or increase() "
        "(expr: histogram_quantile(0.9, sum by (le) (driftloop_monitor_seconds_bucket)))",
    ]


def test_every_metric_is_on_a_dashboard() -> None:
    used = {name for _, expr in all_queries() for name in metric_names(expr)}
    registry = CollectorRegistry()
    families = {next(iter(c.describe())).name for c in vars_of(build_metrics(registry))}
    unused = sorted(f for f in families if not any(u == f or u.startswith(f + "_") for u in used))
    assert unused == []


def test_dashboards_have_fixed_unique_uids_and_use_the_provisioned_datasource() -> None:
    datasource = load_yaml(DATASOURCE)["datasources"][0]
    assert datasource["uid"] == "driftloop-prom" and datasource["type"] == "prometheus"
    uids = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text(encoding="utf-8"))
        uids.append(board["uid"])
        assert board["schemaVersion"] >= 39
        ids = [p["id"] for p in iter_panels(board)]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for panel in iter_panels(board):
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == datasource["uid"], panel["title"]
    assert sorted(uids) == ["driftloop-drift", "driftloop-serving"]
    assert len(set(uids)) == len(uids)


def test_dashboard_panels_fit_the_grid_without_overlapping() -> None:
    for path in DASHBOARDS:
        cells: dict[tuple[int, int], str] = {}
        for panel in iter_panels(json.loads(path.read_text(encoding="utf-8"))):
            pos = panel["gridPos"]
            assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
            for x in range(pos["x"], pos["x"] + pos["w"]):
                for y in range(pos["y"], pos["y"] + pos["h"]):
                    assert (x, y) not in cells, f"{path.name}: {panel['title']} overlaps {cells[(x, y)]}"
                    cells[(x, y)] = panel["title"]


def test_dashboards_show_what_operators_asked_for() -> None:
    titles = {json.loads(p.read_text())["title"]: {q[0] for q in dashboard_queries(p)} for p in DASHBOARDS}
    assert {
        "Request rate by endpoint",
        "Error ratio",
        "Latency p50 / p99 by endpoint",
        "Prediction value distribution",
        "Serving processes by model version",
        "Logged rows by outcome",
        "Queue depth and spool",
        "Dropped rows",
    } <= titles["Serving"]
    assert {
        "Drift share vs threshold",
        "Weighted drift score vs threshold",
        "Per-feature drift score",
        "Window MAE vs champion validation MAE",
        "Retrain runs by outcome",
        "Notifications delivered / failed",
        "Current champion",
        "Champion age",
    } <= titles["Drift & retraining"]


def test_the_mae_ratio_is_read_from_the_monitor_not_written_in() -> None:
    """WindowMaeHigh and the dashboard's alert lines use the ratio the monitor exports, so an operator's
    DRIFTLOOP_MAE_DEGRADATION_RATIO moves them with the policy; a ratio written in stayed at the default."""
    default = str(Settings.model_fields["mae_degradation_ratio"].default)
    rule = dict(rule_expressions(RULES))["WindowMaeHigh"]
    assert "> driftloop_mae_degradation_ratio * driftloop_champion_validation_mae" in rule
    lines = [
        expr
        for title, expr in dashboard_queries(ROOT / "dashboards" / "drift.json")
        if title == "Window MAE vs champion validation MAE" and "driftloop_mae_degradation_ratio *" in expr
    ]
    assert len(lines) == 2  # the champion's line and the model line's baseline
    assert default not in rule and not any(default in expr for expr in lines)


RATE_RANGE = re.compile(r"\b(?:rate|irate|increase)\(\s*[^\[()]*\[([^\]]+)\]")
GRAFANA_RANGES = ("$__rate_interval", "$__range")  # $__interval, one step, can be shorter than 4 scrapes


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h|d)", duration))


def short_rate_windows(queries: list[tuple[str, str]], shortest_s: float) -> list[str]:
    """Each rate()/irate()/increase() window that is a literal under `shortest_s` or a Grafana variable other
    than $__rate_interval/$__range, as `title: [window]`."""
    return [
        f"{title}: [{window}]"
        for title, expr in queries
        for window in RATE_RANGE.findall(expr)
        if (window not in GRAFANA_RANGES if window.startswith("$") else seconds(window) < shortest_s)
    ]


def test_rate_windows_hold_four_scrapes() -> None:
    """rate()/increase() need two samples in the window, and one missed scrape must not empty it: at least
    4 scrape intervals. Dashboards get that from $__rate_interval, which reads the datasource's timeInterval,
    so that must be the scrape interval of both shipped configs."""
    configs = [load_yaml(ROOT / "prometheus" / name) for name in ("prometheus.yml", "prometheus.k8s.yml")]
    scrape = {config["global"]["scrape_interval"] for config in configs}
    assert scrape == {load_yaml(DATASOURCE)["datasources"][0]["jsonData"]["timeInterval"]}
    raw = [  # the dashboards' own text, variables not substituted
        (f"{path.name}: {panel['title']}", target.get("expr") or "")
        for path in DASHBOARDS
        for panel in iter_panels(json.loads(path.read_text(encoding="utf-8")))
        for target in panel.get("targets") or ()
    ]
    queries = raw + [(f"rule {name}", expr) for name, expr in rule_expressions(RULES)]
    assert sum(len(RATE_RANGE.findall(expr)) for _, expr in queries) >= 30  # the pattern finds them
    assert short_rate_windows(queries, 4 * seconds(scrape.pop())) == []
    assert short_rate_windows(
        [("a", "rate(x_total[30s])"), ("b", "increase(x_total[$__interval])"), ("c", "sum(rate(y[1m]))"),
         ("d", 'increase(z{a="b"}[$__range]) + rate(z[$__rate_interval]) + max_over_time(u[10s])')],
        60,
    ) == ["a: [30s]", "b: [$__interval]"]  # fmt: skip


PER_SECOND_UNITS = ("reqps", "ops", "cps", "rps", "wps", "suffix:/s")
BARE_RATE = re.compile(r"^\s*sum(?:\s+by\s*\([^)]*\))?\s*\(\s*i?rate\([^/]*\)\s*$")


def test_panels_of_bare_rates_have_a_per_second_unit() -> None:
    """A panel that only plots sum(rate(…)) shows events per second; with a plain number unit the axis
    does not say per what (a per-minute reading would be 60 times off)."""
    wrong = [
        f"{path.name}: {panel['title']}: unit {panel['fieldConfig']['defaults'].get('unit')!r}"
        for path in DASHBOARDS
        for panel in iter_panels(json.loads(path.read_text(encoding="utf-8")))
        if panel.get("targets")
        and all(BARE_RATE.match(target.get("expr") or "") for target in panel["targets"])
        and panel["fieldConfig"]["defaults"].get("unit") not in PER_SECOND_UNITS
    ]
    assert wrong == []
    assert BARE_RATE.match("sum by (outcome) (rate(driftloop_feedback_total[$__rate_interval]))")
    assert not BARE_RATE.match("sum(rate(a_total[1m])) / sum(rate(b_total[1m]))")


QUANTILE = re.compile(r"histogram_quantile\(\s*[\d.]+\s*,\s*(?:sum\s+by\s*\(([^)]*)\)\s*)?")


def unaggregated_quantiles(queries: list[tuple[str, str]]) -> list[str]:
    """Each histogram_quantile() whose buckets are not `sum by (…, le)`: without the sum it gives one
    quantile per replica (and per status, …), not the service's."""
    return [
        f"{title}: {expr}"
        for title, expr in queries
        for labels in QUANTILE.findall(expr)
        if "le" not in re.split(r"\s*,\s*", labels.strip())
    ]


def test_histogram_quantiles_sum_buckets_by_le() -> None:
    queries = all_queries()
    assert sum(len(QUANTILE.findall(expr)) for _, expr in queries) >= 8
    assert unaggregated_quantiles(queries) == []
    assert unaggregated_quantiles(
        [
            ("a", "histogram_quantile(0.99, rate(x_bucket[5m]))"),
            ("b", "histogram_quantile(0.9, sum by (job) (rate(x_bucket[5m])))"),
            ("c", "histogram_quantile(0.5, sum by (endpoint, le) (rate(x_bucket[5m])))"),
        ]
    ) == [
        "a: histogram_quantile(0.99, rate(x_bucket[5m]))",
        "b: histogram_quantile(0.9, sum by (job) (rate(x_bucket[5m])))",
    ]


def test_rules_file_has_the_driftloop_group_and_every_alert() -> None:
    groups = load_yaml(RULES)["groups"]
    assert [g["name"] for g in groups] == ["driftloop"]
    assert [name for name, _ in rule_expressions(RULES)] == [
        "DriftBreach", "WindowMaeHigh", "MonitorStale", "RetrainFailed", "NotificationFailed",
        "PredictionLogSpooling",
        "PredictionLogDropping", "ServingDown", "NoChampionLoaded", "HighErrorRate", "HighP99Latency",
    ]  # fmt: skip
    assert "driftloop_monitor_interval_seconds" in dict(rule_expressions(RULES))["MonitorStale"]


def test_every_alert_has_severity_category_summary_description_and_a_runbook_that_exists() -> None:
    """What Alertmanager routes on and what the on-call reads; the runbook anchor must be a heading of the
    file it names, and the docs' alert table must list the alert."""
    operations = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    anchors = {
        re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in operations.splitlines()
        if line.startswith("#")
    }
    problems = []
    for rule in load_yaml(RULES)["groups"][0]["rules"]:
        name, labels, notes = rule["alert"], rule.get("labels") or {}, rule.get("annotations") or {}
        if labels.get("severity") not in ("warning", "critical"):
            problems.append(f"{name}: severity {labels.get('severity')!r}")
        if labels.get("category") not in ("drift", "serving", "pipeline"):
            problems.append(f"{name}: category {labels.get('category')!r}")
        problems += [
            f"{name}: no {key}" for key in ("summary", "description", "runbook") if not notes.get(key)
        ]
        path, _, anchor = str(notes.get("runbook", "")).partition("#")
        if path != "docs/operations.md" or anchor not in anchors:
            problems.append(
                f"{name}: runbook {notes.get('runbook')!r} is not a heading of docs/operations.md"
            )
        if f"| {name} |" not in operations:
            problems.append(f"{name}: not in the alert table of docs/operations.md")
    assert problems == []


def test_prometheus_scrapes_the_compose_services() -> None:
    config = load_yaml(ROOT / "prometheus" / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["driftloop-api"]["dns_sd_configs"][0]["names"] == ["api"]
    assert jobs["driftloop-api"]["dns_sd_configs"][0]["port"] == 8000
    assert jobs["driftloop-worker"]["static_configs"][0]["targets"] == ["worker:9100"]
    assert set(services()) >= {"api", "worker", "alertmanager"}
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]
    assert config["rule_files"] == ["rules/*.yml"]


# --- the PromQL extractor -----------------------------------------------------------------------------


def write_dashboard(tmp_path: Path, panels: list[dict[str, Any]]) -> Path:
    path = tmp_path / "board.json"
    path.write_text(json.dumps({"uid": "t", "title": "t", "panels": panels}), encoding="utf-8")
    return path


def test_broken_panel_metric_is_named(tmp_path: Path) -> None:
    path = write_dashboard(tmp_path, [
        {"type": "row", "title": "Collapsed", "collapsed": True, "panels": [
            {"type": "timeseries", "title": "Typo panel", "targets": [
                {"expr": "sum(rate(driftloop_predictons_total[$__rate_interval]))"}]},
        ]},
        {"type": "timeseries", "title": "Fine panel", "targets": [{"expr": "sum(driftloop_model_loaded)"}]},
    ])  # fmt: skip
    assert unknown_metrics(dashboard_queries(path), known()) == [
        "Typo panel: metric 'driftloop_predictons_total' is not exported by driftloop "
        "(expr: sum(rate(driftloop_predictons_total[1m])))"
    ]


def test_extractor_walks_rows_and_every_target(tmp_path: Path) -> None:
    path = write_dashboard(tmp_path, [
        {"type": "row", "title": "Open row", "panels": []},
        {"type": "stat", "title": "Two targets", "targets": [
            {"refId": "A", "expr": "sum(driftloop_model_loaded)"},
            {"refId": "B", "expr": "  "},
            {"refId": "C", "expr": "increase(driftloop_model_swaps_total[${__interval}])"}]},
        {"type": "row", "title": "Collapsed", "collapsed": True, "panels": [
            {"type": "timeseries", "title": "Inside", "targets": [
                {"expr": "rate(driftloop_http_requests_total[$__rate_interval]) * $__range_s"}]}]},
        {"type": "text", "title": "No targets"},
    ])  # fmt: skip
    assert dashboard_queries(path) == [
        ("Two targets", "sum(driftloop_model_loaded)"),
        ("Two targets", "increase(driftloop_model_swaps_total[1m])"),
        ("Inside", "rate(driftloop_http_requests_total[1m]) * 60"),
    ]


def test_substitute_handles_every_interval_form() -> None:
    assert substitute("x[$__rate_interval] x[$__interval] x[${__range}]", "5m") == "x[5m] x[5m] x[5m]"
    assert substitute("$__interval_ms $__range_ms $__range_s", "2m") == "120000 120000 120"
    with pytest.raises(ValueError, match="not a Prometheus duration"):
        substitute("x", "five minutes")


def test_metric_names_skips_functions_keywords_labels_and_durations() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (job, le) (rate(a_bucket{endpoint=~"/predict|b_total"}[5m])))'
        " > on (job) group_left () 2 * max without (instance) (c_gauge offset 1h) or vector(0)"
        ' unless d_total{x="y"} and bool 1e3 and time() - e_seconds @ start()'
    )
    assert metric_names(expr) == {"a_bucket", "c_gauge", "d_total", "e_seconds"}
    assert metric_names('label_replace(up, "dst", "$1", "instance", "(.*):.*")') == {"up"}


def test_rule_expressions_reads_every_rule(tmp_path: Path) -> None:
    path = tmp_path / "rules.yml"
    path.write_text(
        "groups:\n- name: g\n  rules:\n  - alert: A\n    expr: |\n      up == 0\n"
        "  - record: job:up:sum\n    expr: sum by (job) (up)\n",
        encoding="utf-8",
    )
    assert rule_expressions(path) == [("A", "up == 0"), ("job:up:sum", "sum by (job) (up)")]


# --- CI and docs --------------------------------------------------------------------------------------


def test_ci_workflow_is_valid_and_runs_tests_lint_and_docker() -> None:
    workflow = load_yaml(ROOT / ".github" / "workflows" / "ci.yml")
    workflow["on"] = workflow.pop(True)  # YAML 1.1 reads the key `on` as a boolean
    assert schema_errors(workflow, DATA / "github-workflows.json") == []
    assert set(workflow["on"]) == {"push", "pull_request"}
    steps = {name: job["steps"] for name, job in workflow["jobs"].items()}
    runs = {name: " ".join(s.get("run", "") for s in job) for name, job in steps.items()}
    python = [
        s["with"]["python-version"]
        for job in steps.values()
        for s in job
        if "setup-python" in s.get("uses", "")
    ]
    assert python == ["3.11", "3.11"]
    assert "bash .ci/run" in runs["test"]
    assert "make lint" in runs["lint"]
    assert any("docker/build-push-action" in s.get("uses", "") for s in steps["docker"])


@pytest.mark.parametrize("doc_path", ["README.md", "docs/operations.md"])
def test_docs_list_every_metric_exactly(doc_path: str) -> None:
    doc = (ROOT / doc_path).read_text(encoding="utf-8")
    table = metrics_markdown(build_metrics(CollectorRegistry()))
    assert table in doc, (
        "regenerate the table: python -c 'from tests.promql import …; print(metrics_markdown(…))'"
    )
