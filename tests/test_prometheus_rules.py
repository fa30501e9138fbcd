"""promtool on the Prometheus config, the rules and their unit tests; dashboard PromQL on a real Prometheus.

Needs the `prometheus` package's binaries (promtool, prometheus); .ci/run installs them. Without them these
tests skip and say so. The alert-coverage check is static and always runs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, start_http_server

from core.metrics import build_metrics
from tests.promql import (
    dashboard_queries,
    evaluate_all,
    evaluate_until_clean,
    prometheus_server,
    rule_expressions,
)

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = ROOT / "prometheus"
RULES = PROMETHEUS / "rules" / "driftloop.yml"
RULE_TESTS = PROMETHEUS / "tests" / "driftloop_test.yml"
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
pytestmark = pytest.mark.prometheus
MISSING = "{0} not found: install Debian's 'prometheus' package (.ci/run does) to run this check"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(MISSING.format("promtool"))
    return path


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


# --- promtool -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus.k8s.yml"])
def test_promtool_check_config(promtool: str, config: str) -> None:
    result = run(promtool, "check", "config", str(PROMETHEUS / config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 9 rules found" in result.stdout  # the config's rule_files reach the rules


def test_promtool_check_rules(promtool: str) -> None:
    result = run(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 9 rules found" in result.stdout


def test_promtool_test_rules(promtool: str) -> None:
    result = run(promtool, "test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_test_rules_fails_on_a_wrong_expectation(promtool: str, tmp_path: Path) -> None:
    """The unit tests can fail: a firing case expected quiet is reported."""
    tests = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))
    tests["rule_files"] = [str(RULES)]
    firing = next(case for case in tests["tests"][0]["alert_rule_test"] if case["exp_alerts"])
    firing["exp_alerts"] = []
    broken = tmp_path / "broken_test.yml"
    broken.write_text(yaml.safe_dump(tests), encoding="utf-8")
    result = run(promtool, "test", "rules", str(broken))
    assert result.returncode != 0
    assert "alertname: DriftBreach" in result.stdout + result.stderr


def test_dashboard_expressions_parse(promtool: str, tmp_path: Path) -> None:
    """Every panel's PromQL, interval variables substituted, is accepted by Prometheus's parser."""
    queries = [q for path in DASHBOARDS for q in dashboard_queries(path)]
    rules = [{"record": f"dashboard:query_{i}:check", "expr": expr} for i, (_, expr) in enumerate(queries)]
    path = tmp_path / "dashboards_as_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}), encoding="utf-8")
    result = run(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_amtool_checks_the_alertmanager_config(tmp_path: Path) -> None:
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.skip(
            "amtool not found: install Debian's 'prometheus-alertmanager' package to check alertmanager.yml"
        )
    text = (ROOT / "alertmanager" / "alertmanager.yml").read_text(encoding="utf-8")
    version = run(amtool, "--version")
    found = re.search(r"version (\d+)\.(\d+)", version.stdout + version.stderr)
    if found and (int(found.group(1)), int(found.group(2))) < (0, 26):
        # webhook url_file arrived in Alertmanager 0.26 (compose runs 0.27); older amtool checks the rest.
        text = text.replace("url_file: /etc/alertmanager/webhook_url", "url: http://127.0.0.1:9/placeholder")
    config = tmp_path / "alertmanager.yml"
    config.write_text(text, encoding="utf-8")
    result = run(amtool, "check-config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 receivers" in result.stdout


# --- coverage of the rule unit tests (static) ---------------------------------------------------------


def alert_cases() -> dict[str, dict[str, int]]:
    """For each alert: how many promtool cases expect it firing, and how many expect it quiet."""
    counts: dict[str, dict[str, int]] = {}
    for group in yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]:
        for case in group.get("alert_rule_test") or ():
            kind = "firing" if case.get("exp_alerts") else "quiet"
            counts.setdefault(case["alertname"], {"firing": 0, "quiet": 0})[kind] += 1
    return counts


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    alerts = [name for name, _ in rule_expressions(RULES)]
    cases = alert_cases()
    no_firing = [a for a in alerts if cases.get(a, {}).get("firing", 0) == 0]
    no_quiet = [a for a in alerts if cases.get(a, {}).get("quiet", 0) == 0]
    assert (no_firing, no_quiet) == ([], [])
    assert sorted(cases) == sorted(alerts), "test cases for alerts that do not exist"


# --- the dashboards on a real Prometheus --------------------------------------------------------------


def exercise(registry: CollectorRegistry) -> None:
    """Move every metric as a service does after serving traffic, a drifting monitor run and a retrain."""
    m = build_metrics(registry)
    for endpoint, status in (
        ("/predict", "200"),
        ("/predict/batch", "200"),
        ("/predict", "422"),
        ("/feedback", "200"),
    ):
        m.http_requests.labels(endpoint=endpoint, status=status).inc()
        m.http_seconds.labels(endpoint=endpoint).observe(0.004)
    m.http_errors.labels(endpoint="/predict", status="422").inc()
    for version, value in (("1", 650_000.0), ("2", 720_000.0)):
        m.predictions.labels(model_version=version).inc()
        m.prediction_value.observe(value)
        m.predict_seconds.observe(0.002)
    m.model_info.labels(version="1").set(0)
    m.model_info.labels(version="2").set(1)
    m.model_loaded.set(1)
    m.model_swaps.inc()
    m.champion_created.set(time.time() - 60)
    m.feedback.labels(outcome="accepted").inc(2)
    m.logger_rows.labels(outcome="logged").inc(3)
    m.monitor_interval.set(60)
    m.drift_share_threshold.set(0.5)
    m.drift_weighted_threshold.set(0.3)
    m.drift_share.set(0.67)
    m.drift_weighted_score.set(0.71)
    m.drift_breach.set(1)
    for feature, score in (("area_m2", 0.31), ("district", 0.02)):
        m.feature_drift_score.labels(feature=feature).set(score)
        m.feature_drift_detected.labels(feature=feature).set(int(score > 0.1))
    m.prediction_drift_score.set(0.4)
    m.window_rows.set(1000)
    m.window_labelled_rows.set(400)
    m.window_mae.set(61_000.0)
    m.window_rmse.set(80_000.0)
    m.window_mape.set(9.5)
    m.champion_validation_mae.set(40_000.0)
    m.monitor_runs.labels(outcome="breach").inc()
    m.monitor_seconds.observe(3.2)
    m.monitor_last_run.set(time.time())
    m.retrain_runs.labels(trigger="drift", status="promoted").inc()
    m.retrain_last_finished.set(time.time())
    m.notifications.labels(kind="drift_breach", outcome="delivered").inc()


@pytest.fixture
def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.skip(MISSING.format("prometheus"))
    return path


@pytest.fixture
def exporter() -> Any:
    """A prometheus_client HTTP server on 127.0.0.1 serving an exercised driftloop registry."""
    registry = CollectorRegistry()
    exercise(registry)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    yield f"127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.mark.slow
def test_every_panel_returns_data_and_failures_name_the_panel(
    prometheus_binary: str, exporter: str, tmp_path: Path
) -> None:
    queries = [(f"{p.name}: {title}", expr) for p in DASHBOARDS for title, expr in dashboard_queries(p)]
    with prometheus_server(tmp_path / "prom", [exporter], binary=prometheus_binary) as base_url:
        assert evaluate_until_clean(base_url, queries) == []
        failures = evaluate_all(
            base_url,
            [
                ("Broken panel", "sum(rate(driftloop_http_requests_total[1m])"),
                ("Typo panel", "driftloop_predictons_total"),
                ("Fine panel", "sum(driftloop_model_loaded)"),
            ],
        )
    assert len(failures) == 2
    assert failures[0].startswith("Broken panel: bad_data: ")
    assert failures[1] == "Typo panel: empty result for driftloop_predictons_total"
