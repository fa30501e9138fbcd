"""promtool on the Prometheus config, the rules and their unit tests; dashboard and alert PromQL on a real
Prometheus scraping a real driftloop service that has served traffic, seen drift and retrained.

Needs the `prometheus` package's binaries (promtool, prometheus); .ci/run installs them. Without them these
tests skip and say so. The alert-coverage check is static and always runs.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
import yaml

from core.db import make_engine, make_sessions, migrate
from core.registry import ArtifactStore, Registry
from core.spec import FeatureSpec, load_spec
from retrain.bootstrap import bootstrap
from tests.conftest import TINY, make_settings
from tests.live import LiveServer, start_server, wait_until
from tests.promql import (
    dashboard_failures,
    dashboard_queries,
    instant_query,
    iter_panels,
    prometheus_server,
    rule_expressions,
    rule_failures,
)
from tests.test_loop_integration import traffic
from tests.webhook import Receiver, running_receiver

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
    assert "SUCCESS: 11 rules found" in result.stdout  # the config's rule_files reach the rules


def test_promtool_check_rules(promtool: str) -> None:
    result = run(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 11 rules found" in result.stdout


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


def test_amtool_routes_each_alert_by_its_category(tmp_path: Path) -> None:
    """Every alert, with the labels its rule gives it, reaches drift-webhook when its category is drift and
    ops-webhook otherwise: a typo in a category (or a matcher) would send model alerts to the ops channel."""
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.skip("amtool not found: install Debian's 'prometheus-alertmanager' package")
    text = (ROOT / "alertmanager" / "alertmanager.yml").read_text(encoding="utf-8")
    config = tmp_path / "alertmanager.yml"
    config.write_text(text.replace("url_file: /etc/alertmanager/webhook_url", "url: http://127.0.0.1:9/x"))
    routed = {}
    for rule in yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"][0]["rules"]:
        labels = [f"alertname={rule['alert']}", *(f"{k}={v}" for k, v in rule["labels"].items())]
        result = run(amtool, "config", "routes", "test", f"--config.file={config}", *labels)
        assert result.returncode == 0, result.stdout + result.stderr
        expected = "drift-webhook" if rule["labels"]["category"] == "drift" else "ops-webhook"
        routed[rule["alert"]] = (result.stdout.strip(), expected)
    assert {name: got for name, (got, _) in routed.items()} == {
        name: want for name, (_, want) in routed.items()
    }
    assert [name for name, (got, _) in routed.items() if got == "drift-webhook"] == [
        "DriftBreach",
        "WindowMaeHigh",
    ]


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


# --- the dashboards and alerts on a real Prometheus scraping a real service ----------------------------

BATCH = 100
SINGLES = 20


@dataclass(frozen=True, slots=True)
class LiveStack:
    """A `driftloop serve` (API + scheduler) after a drifting burst and a finished retrain, and a Prometheus
    that has scraped it since."""

    prometheus: str  # base URL
    server: LiveServer
    retrain: dict[str, Any]  # the finished run, as GET /retrain/runs/{id} shows it
    notified: list[str]  # kinds of the notifications the webhook receiver got


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip(MISSING.format("prometheus"))
    tmp = tmp_path_factory.mktemp("live")
    db_url = f"sqlite:///{tmp / 'driftloop.db'}"
    spec = load_spec()
    bootstrap_champion(db_url, tmp / "artifacts", spec)
    with running_receiver() as receiver:
        yield from live_stack(tmp, spec, db_url, receiver, binary)


def live_stack(
    tmp: Path, spec: FeatureSpec, db_url: str, receiver: Receiver, binary: str
) -> Iterator[LiveStack]:
    """The service with the receiver as its webhook, Prometheus scraping it, traffic and a retrain done."""
    settings = make_settings(
        db_url, tmp, monitor_interval_s=2, window_rows=800, min_window_rows=300, min_labelled_rows=100,
        consecutive_breaches=1, webhook_url=receiver.url, webhook_backoff_s=0,
    )  # fmt: skip
    server = start_server(settings, tmp)
    try:
        target = server.url.removeprefix("http://")
        with prometheus_server(tmp / "prometheus", [target], binary=binary) as prometheus:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                # Stable sales, then sales whose area arrives in pyeong (the unit bug); a scrape between
                # the two, so every endpoint's counters rise between scrapes and rates see the traffic.
                for sales in (traffic("none", 400, seed=11), traffic("unit_bug", 800, seed=12)):
                    serve_sales(client, spec, sales)
                    wait_for_scrape(prometheus, after=time.time())
            run = wait_for_retrain(server, receiver)
            wait_for_scrape(prometheus, after=time.time())  # every metric has moved by now
            yield LiveStack(prometheus, server, run, receiver.kinds())
    finally:
        assert server.terminate()


def bootstrap_champion(db_url: str, artifact_dir: Path, spec: FeatureSpec) -> None:
    """v1 in a fresh database: the tiny CatBoost model the `champion` fixture trains."""
    migrate(db_url)
    engine = make_engine(db_url)
    try:
        registry = Registry(make_sessions(engine), ArtifactStore(artifact_dir))
        bootstrap(registry=registry, spec=spec, params=TINY, rows=3000, seed=1)
    finally:
        engine.dispose()


def serve_sales(client: httpx.Client, spec: FeatureSpec, sales: pd.DataFrame) -> None:
    """The sales as predictions (a few one by one, the rest in batches) each labelled through /feedback,
    and three requests the service rejects."""
    singles = sales.iloc[:SINGLES]
    ids = [
        answer(client.post("/predict", json=row))["prediction_id"]
        for row in singles[spec.feature_names].to_dict("records")
    ]
    label(client, ids, singles[spec.target])
    assert client.post("/predict", json={"district": "Mapo-gu"}).status_code == 422
    assert client.post("/predict/batch", json={"instances": []}).status_code == 422
    assert client.get("/models/999").status_code == 404
    for start in range(SINGLES, len(sales), BATCH):
        chunk = sales.iloc[start : start + BATCH]
        instances = chunk[spec.feature_names].to_dict("records")
        body = answer(client.post("/predict/batch", json={"instances": instances}))
        label(client, [p["prediction_id"] for p in body["predictions"]], chunk[spec.target])


def wait_for_scrape(prometheus: str, *, after: float) -> None:
    """Until Prometheus holds a successful scrape of the service that started after `after` (a Unix time)."""
    # timestamp() gives the sample's time only around a bare selector; around `up == 1` it gives now.
    up = 'up{job="driftloop"}'
    wait_until(
        lambda: instant_query(prometheus, f"timestamp({up}) > {after} and {up} == 1"),
        timeout=30, interval=0.2, what=f"a scrape of the service after {after}",
    )  # fmt: skip


def answer(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    return response.json()


def label(client: httpx.Client, prediction_ids: list[str], actuals: pd.Series) -> None:
    labels = [{"prediction_id": p, "actual": float(a)} for p, a in zip(prediction_ids, actuals, strict=True)]
    assert answer(client.post("/feedback", json=labels))["accepted"] == len(labels)


def wait_for_retrain(server: LiveServer, receiver: Receiver) -> dict[str, Any]:
    """The run the monitor launched on the drift, once finished, announced and (if promoted) served."""
    run = wait_until(
        lambda: next((r for r in server.get("/retrain/runs").json() if r["status"] != "running"), None),
        timeout=120, interval=0.2, what="the monitor to launch a retrain run and the run to finish",
    )  # fmt: skip
    # The outcome is announced after the process has counted the run in its metrics.
    wait_until(lambda: "retrain_outcome" in receiver.kinds(), timeout=30, what="the retrain outcome message")
    if run["status"] == "promoted":
        version = run["candidate_version"]
        wait_until(
            lambda: server.get("/ready").json()["model_version"] == version,
            timeout=30, what=f"v{version} to be served",
        )  # fmt: skip
    return run


@pytest.mark.slow
def test_the_live_service_breached_retrained_and_notified(stack: LiveStack) -> None:
    """What the panels are checked against: a monitor breach on the unit bug, the retrain it launched
    promoting v2, both announced on the webhook, rejected requests counted."""
    run = stack.retrain
    report = stack.server.get(f"/reports/{run['report_id']}").json()
    assert (run["status"], run["candidate_version"], report["breach"]) == ("promoted", 2, True)
    assert run["trigger"] in ("drift", "accuracy")  # which breaches first depends on where the window falls
    assert {"drift_breach", "retrain_outcome"} <= set(stack.notified)
    assert stack.server.metric('driftloop_http_errors_total{endpoint="/predict",status="422"}') == 2.0


@pytest.mark.slow
def test_every_dashboard_panel_returns_data_from_a_live_service(stack: LiveStack) -> None:
    assert dashboard_failures(stack.prometheus, DASHBOARDS) == []


@pytest.mark.slow
def test_every_alert_expression_evaluates_on_a_live_service(stack: LiveStack) -> None:
    assert rule_failures(stack.prometheus, RULES) == []


@pytest.mark.slow
def test_a_panel_reading_a_missing_metric_fails_naming_that_panel(stack: LiveStack, tmp_path: Path) -> None:
    original = ROOT / "dashboards" / "serving.json"
    assert dashboard_failures(stack.prometheus, [original]) == []
    dashboard = json.loads(original.read_text(encoding="utf-8"))
    panel = next(p for p in iter_panels(dashboard) if p.get("title") == "Hot swaps")
    for target in panel["targets"]:
        target["expr"] = target["expr"].replace("driftloop_model_swaps_total", "driftloop_model_swapz_total")
    broken = tmp_path / "serving.json"
    broken.write_text(json.dumps(dashboard), encoding="utf-8")
    assert dashboard_failures(stack.prometheus, [broken]) == [
        "serving.json: Hot swaps: empty result for sum(increase(driftloop_model_swapz_total[1m]))"
    ]


@pytest.mark.slow
def test_an_alert_expression_that_does_not_parse_fails_naming_the_alert(
    stack: LiveStack, tmp_path: Path
) -> None:
    rules = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    rule = next(r for r in rules["groups"][0]["rules"] if r["alert"] == "HighErrorRate")
    rule["expr"] = rule["expr"].replace("[5m]))", "[5m])", 1)
    broken = tmp_path / "driftloop.yml"
    broken.write_text(yaml.safe_dump(rules), encoding="utf-8")
    failures = rule_failures(stack.prometheus, broken)
    assert [f.partition(": bad_data: ")[0] for f in failures] == ["driftloop.yml: HighErrorRate"]
