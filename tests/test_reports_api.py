"""Monitor runs and drift reports over HTTP: the admin gate, verdicts, report views, no token in logs."""

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from core.db import utcnow
from core.figures import figure
from core.generator import DRIFTED_FEATURES, generate_transactions
from core.registry import sha256_file
from core.schema import DriftReport, ModelVersion
from core.spec import FeatureSpec
from service.app import create_app
from service.process import free_port
from tests.conftest import make_settings
from tests.live import start_server, wait_until

ADMIN = {"Authorization": "Bearer test-admin-token"}
MISSING_TOKEN = "missing bearer token: send 'Authorization: Bearer <DRIFTLOOP_ADMIN_TOKEN>'"
ADMIN_OFF = (
    "admin endpoints are disabled: set DRIFTLOOP_ADMIN_TOKEN, then send 'Authorization: Bearer <token>'"
)
NO_REPORT_YET = "no drift report yet: the monitor has not run (POST /monitor/run)"


@pytest.fixture
def client(champion, db_url: str, tmp_path: Path) -> Iterator[TestClient]:
    # A breach alerts, no child retrain; every served row is inside the accuracy window.
    settings = make_settings(db_url, tmp_path, auto_retrain=False, accuracy_window_rows=1000)
    with TestClient(create_app(settings, scheduler=False)) as client:
        yield client


@dataclass(frozen=True)
class Served:
    mae: float
    mean_error: float  # prediction − actual


def serve_traffic(
    client: TestClient, spec: FeatureSpec, scenario: str, n: int, *, seed: int, labelled: bool
) -> Served | None:
    """Predict `n` generated late-2022 transactions through the API (a drift scenario has fully landed),
    optionally label them via /feedback; returns the champion's errors on them when labelled."""
    frame = generate_transactions(
        n, start="2022-07-01", end="2022-12-31", scenario=scenario, change_at="2022-04-01", seed=seed
    )
    response = client.post("/predict/batch", json={"instances": frame[spec.feature_names].to_dict("records")})
    assert response.status_code == 200
    predictions = response.json()["predictions"]
    assert client.app.state.ctx.logger.flush(timeout=30)
    if not labelled:
        return None
    actuals = frame[spec.target].astype(float).tolist()
    labels = [
        {"prediction_id": p["prediction_id"], "actual": a} for p, a in zip(predictions, actuals, strict=True)
    ]
    assert client.post("/feedback", json=labels).json()["accepted"] == n
    errors = [p["prediction"] - a for p, a in zip(predictions, actuals, strict=True)]
    return Served(mae=sum(abs(e) for e in errors) / n, mean_error=sum(errors) / n)


def run_monitor(client: TestClient) -> dict[str, Any]:
    response = client.post("/monitor/run", headers=ADMIN)
    assert response.status_code == 200
    return response.json()


def test_monitor_run_needs_the_admin_token(client) -> None:
    missing = client.post("/monitor/run")
    assert (missing.status_code, missing.json()["message"]) == (401, MISSING_TOKEN)
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = client.post("/monitor/run", headers={"Authorization": "Bearer nope"})
    assert (wrong.status_code, wrong.json()) == (
        401,
        {"error": "unauthorized", "message": "invalid bearer token"},
    )
    basic = client.post("/monitor/run", headers={"Authorization": "Basic test-admin-token"})
    no_bearer = MISSING_TOKEN.replace("missing bearer token", "no bearer token in the Authorization header")
    assert (basic.status_code, basic.json()["message"]) == (401, no_bearer)
    assert client.get("/reports").json() == []  # a refused run stores nothing


def test_monitor_run_is_off_without_a_token(champion, db_url, tmp_path) -> None:
    settings = make_settings(db_url, tmp_path, admin_token=None)
    with TestClient(create_app(settings, scheduler=False)) as client:
        response = client.post("/monitor/run", headers=ADMIN)
        assert (response.status_code, response.json()) == (403, {"error": "forbidden", "message": ADMIN_OFF})
        assert client.get("/reports").json() == []


def test_a_second_monitor_run_is_refused_while_one_is_going(client) -> None:
    inside, finish = threading.Event(), threading.Event()

    def clock() -> Any:  # the loop's clock: the first run waits in it, mid-run, until told to go on
        if not inside.is_set():
            inside.set()
            assert finish.wait(30)
        return utcnow()

    client.app.state.ctx.loop.clock = clock
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.post, "/monitor/run", headers=ADMIN)
        assert inside.wait(30)
        second = client.post("/monitor/run", headers=ADMIN)
        finish.set()
        assert first.result(timeout=60).status_code == 200
    assert (second.status_code, second.json()["message"]) == (
        409,
        "a monitor run is already in progress in this process; at most one runs at a time: "
        "try again when it has finished (GET /reports/latest)",
    )
    assert len(client.get("/reports").json()) == 1  # the refused run stored no report
    assert client.post("/monitor/run", headers=ADMIN).status_code == 200  # the next one runs


def test_a_damaged_reference_stops_the_monitor_by_name_and_serving_goes_on(client, champion, spec) -> None:
    serve_traffic(client, spec, "none", 300, seed=32, labelled=False)
    path = Path(champion.reference_path)
    pd.read_parquet(path).iloc[:50].to_parquet(path, index=False)  # readable, but not v1's snapshot
    response = client.post("/monitor/run", headers=ADMIN)
    assert response.status_code == 409
    assert response.json()["message"] == (
        f"the monitor cannot run: {path}: sha256 {sha256_file(path)} does not match the registry's "
        f"{champion.reference_sha256}"
    )
    assert client.get("/reports").json() == []  # no verdict judged against the wrong reference
    assert client.post("/predict", json=generate_transactions(1, seed=3)[spec.feature_names].to_dict(
        "records")[0]).status_code == 200  # fmt: skip


def test_a_thin_window_is_insufficient_and_its_report_has_no_page(client, spec) -> None:
    serve_traffic(client, spec, "none", 20, seed=31, labelled=False)
    reason = "window has 20 rows, fewer than the 200 needed for a verdict"
    assert run_monitor(client) == {
        "verdict": "insufficient",
        "report_id": 1,
        "breach": False,
        "retrain": False,
        "reasons": [reason],
        "held_by": None,
        "soft": False,
        "retrain_run_id": None,
        "drift": None,
        "accuracy": None,
        "notes": [],
    }
    report = client.get("/reports/1").json()
    assert (report["rows"], report["labelled_rows"], report["sampled_rows"], report["champion_version"]) == (
        20, 0, 0, 1,
    )  # fmt: skip
    assert (report["features"], report["drift_share"], report["weighted_drift_score"], report["mae"]) == (
        {}, None, None, None,
    )  # fmt: skip
    assert (report["breach"], report["reasons"], report["html_url"]) == (False, [reason], None)
    assert "html_path" not in report  # the server's file system is not the API's business
    assert report["decision"]["verdict"] == "insufficient"
    page = client.get("/reports/1/html")
    assert (page.status_code, page.json()) == (
        404,
        {
            "error": "not_found",
            "message": "report 1 has no HTML page (too few rows for a verdict, or file removed)",
        },
    )


def test_a_report_judged_on_labels_alone_has_no_page_and_does_not_say_it_was_pruned(
    champion, db_url, tmp_path, spec
) -> None:
    # Too few of the champion's answers for a drift verdict (no Evidently page), but enough labels to breach.
    settings = make_settings(db_url, tmp_path, auto_retrain=False, min_window_rows=500)
    with TestClient(create_app(settings, scheduler=False)) as client:
        serve_traffic(client, spec, "unit_bug", 150, seed=38, labelled=True)
        outcome = run_monitor(client)
        assert (outcome["verdict"], outcome["drift"]) == ("breach", None)
        page = client.get(f"/reports/{outcome['report_id']}/html")
    assert (page.status_code, page.json()["message"]) == (
        404,
        f"report {outcome['report_id']} has no HTML page (too few rows for a verdict, or file removed)",
    )


def test_a_unit_bug_breaches_on_the_weighted_score_and_the_report_shows_the_figures(
    client, spec, champion
) -> None:
    served = serve_traffic(client, spec, "unit_bug", 600, seed=32, labelled=True)
    assert served is not None
    mae = served.mae
    outcome = run_monitor(client)
    assert (outcome["verdict"], outcome["breach"], outcome["retrain"], outcome["held_by"]) == (
        "breach", True, False, "alert-only mode",
    )  # fmt: skip
    drift = outcome["drift"]
    assert set(DRIFTED_FEATURES["unit_bug"]) <= set(drift["drifted"])
    report = client.get(f"/reports/{outcome['report_id']}").json()
    assert (report["id"], report["rows"], report["labelled_rows"], report["champion_version"]) == (
        outcome["report_id"], 600, 600, 1,
    )  # fmt: skip
    features = report["features"]
    assert features == drift["features"]
    assert list(features) == spec.feature_names
    assert [f for f, v in features.items() if v["detected"]] == drift["drifted"]
    assert report["drift_share"] == pytest.approx(len(drift["drifted"]) / len(features))
    assert report["drift_share"] < 0.5  # too few features for the share rule: the weighted score breaches
    importance = {f: v["importance"] for f, v in features.items()}
    weighted = sum(importance[f] for f in drift["drifted"]) / sum(importance.values())
    assert report["weighted_drift_score"] == pytest.approx(weighted)
    assert report["mae"] == pytest.approx(mae)
    assert report["mean_error"] == pytest.approx(served.mean_error)
    gauge = [
        line for line in client.get("/metrics").text.splitlines() if line.startswith("driftloop_window_mean")
    ]
    assert len(gauge) == 1 and float(gauge[0].split()[1]) == pytest.approx(served.mean_error)
    champion_mae = champion.metrics["val_mae"]
    assert report["champion_mae"] == pytest.approx(champion_mae)
    assert report["breach"] is True
    assert report["reasons"] == [
        f"weighted drift score {weighted:.3f} ≥ threshold 0.300",
        f"MAE {figure(mae)} on 600 labelled rows > {figure(champion_mae * 1.25)} "
        f"(champion MAE {figure(champion_mae)} × 1.25)",
    ]
    assert outcome["reasons"] == report["reasons"]
    assert report["decision"]["trigger"] == "accuracy"


def test_the_accuracy_rule_holds_the_champion_to_the_best_mae_of_its_line(
    client, spec, champion, registry
) -> None:
    served = serve_traffic(client, spec, "none", 600, seed=35, labelled=True)
    assert served is not None
    mae = served.mae
    assert mae is not None
    # A champion promoted mid-change: its own validation MAE is lax, its line once did better.
    own, baseline = mae, mae / 1.25 * 0.9
    with registry.sessions.begin() as session:
        row = session.get(ModelVersion, champion.version)
        row.metrics = {**row.metrics, "val_mae": own, "baseline_mae": baseline}
    outcome = run_monitor(client)
    assert outcome["reasons"][-1] == (
        f"MAE {figure(mae)} on 600 labelled rows > {figure(baseline * 1.25)} (baseline MAE "
        f"{figure(baseline)}, the best validation MAE of this model line, × 1.25; champion's own validation "
        f"MAE {figure(own)})"
    )
    assert client.get(f"/reports/{outcome['report_id']}").json()["decision"]["trigger"] == "accuracy"


def test_a_new_town_breach_names_the_drifted_features(client, spec) -> None:
    serve_traffic(client, spec, "new_town", 600, seed=33, labelled=False)
    outcome = run_monitor(client)
    drifted = outcome["drift"]["drifted"]
    assert set(DRIFTED_FEATURES["new_town"]) <= set(drifted)
    report = client.get(f"/reports/{outcome['report_id']}").json()
    assert (report["labelled_rows"], report["mae"], report["decision"]["trigger"]) == (0, None, "drift")
    assert report["reasons"] == [
        f"drift share {report['drift_share']:.3f} ≥ threshold 0.500 (drifted: {', '.join(drifted)})",
        f"weighted drift score {report['weighted_drift_score']:.3f} ≥ threshold 0.300",
    ]


def test_the_report_page_is_evidentlys_dashboard_of_that_window(client, spec) -> None:
    serve_traffic(client, spec, "unit_bug", 600, seed=34, labelled=False)
    report_id = run_monitor(client)["report_id"]
    report = client.get(f"/reports/{report_id}").json()
    assert (
        client.get("/reports/latest").json()["html_url"] == report["html_url"] == f"/reports/{report_id}/html"
    )
    page = client.get(report["html_url"])
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["content-security-policy"] == "frame-ancestors 'self'"  # no framing by another site
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "window.drawDashboard(" in page.text  # Evidently's page template
    assert '"Drift by feature"' in page.text
    assert f'"{report["features"]["area_m2"]["score"]:.4f}"' in page.text  # this report's figures
    (page_file,) = (client.app.state.ctx.settings.report_dir).glob("*.html")
    # A path pointing elsewhere, in the row or through a link in the report directory, is not served.
    secret = client.app.state.ctx.settings.report_dir.parent / "secret.html"
    secret.write_text("<p>not a report</p>")
    link = page_file.with_name("link.html")
    link.symlink_to(secret)
    for path in (secret, link):
        with client.app.state.ctx.sessions.begin() as session:
            session.get(DriftReport, report_id).html_path = str(path)
        refused = client.get(f"/reports/{report_id}/html")
        assert (refused.status_code, refused.json()["message"]) == (
            404,
            f"report {report_id}'s page is not in DRIFTLOOP_REPORT_DIR, so it is not served",
        )
    link.unlink()
    with client.app.state.ctx.sessions.begin() as session:
        session.get(DriftReport, report_id).html_path = str(page_file)
    assert client.get(f"/reports/{report_id}/html").status_code == 200
    page_file.unlink()
    gone = client.get(f"/reports/{report_id}/html")
    assert (gone.status_code, gone.json()["message"]) == (
        404,
        f"report {report_id} has no HTML page (too few rows for a verdict, or file removed)",
    )


def test_only_the_newest_pages_are_kept_and_a_pruned_one_says_where_its_json_is(
    champion, db_url, tmp_path, spec
) -> None:
    settings = make_settings(db_url, tmp_path, auto_retrain=False, report_html_keep=2)
    with TestClient(create_app(settings, scheduler=False)) as client:
        serve_traffic(client, spec, "none", 300, seed=36, labelled=False)
        outcomes = [run_monitor(client) for _ in range(3)]
        Path(html_paths(client)[2]).unlink()  # a page already gone is pruned all the same
        outcomes.append(run_monitor(client))
        assert [o["report_id"] for o in outcomes] == [1, 2, 3, 4]
        paths = html_paths(client)
        assert (paths[1], paths[2]) == (None, None)  # the rows stay, their pages are forgotten
        assert sorted(settings.report_dir.glob("*.html")) == sorted(Path(paths[n]) for n in (3, 4))
        for report_id in (3, 4):
            assert client.get(f"/reports/{report_id}").json()["html_url"] == f"/reports/{report_id}/html"
            assert client.get(f"/reports/{report_id}/html").status_code == 200
        for report_id, outcome in zip((1, 2), outcomes, strict=False):
            page = client.get(f"/reports/{report_id}/html")
            assert (page.status_code, page.json()) == (
                404,
                {
                    "error": "not_found",
                    "message": f"the HTML page of report {report_id} was pruned by "
                    f"DRIFTLOOP_REPORT_HTML_KEEP=2; its JSON is at /reports/{report_id}",
                },
            )
            report = client.get(f"/reports/{report_id}").json()
            assert (report["html_url"], report["rows"], report["drift_share"]) == (
                None, 300, outcome["drift"]["drift_share"],
            )  # fmt: skip
            assert report["features"] == outcome["drift"]["features"]


def test_keep_0_writes_no_page_and_the_report_says_so(champion, db_url, tmp_path, spec) -> None:
    settings = make_settings(db_url, tmp_path, auto_retrain=False, report_html_keep=0)
    with TestClient(create_app(settings, scheduler=False)) as client:
        serve_traffic(client, spec, "none", 300, seed=37, labelled=False)
        outcome = run_monitor(client)
        report = client.get(f"/reports/{outcome['report_id']}").json()
        assert (report["html_url"], report["features"]) == (None, outcome["drift"]["features"])
        assert html_paths(client) == {1: None}
        assert list(settings.report_dir.glob("*")) == []
        page = client.get("/reports/1/html")
        assert (page.status_code, page.json()["message"]) == (
            404,
            "report 1 has no HTML page: DRIFTLOOP_REPORT_HTML_KEEP=0 keeps none; its JSON is at /reports/1",
        )


def html_paths(client: TestClient) -> dict[int, str | None]:
    with client.app.state.ctx.sessions() as session:
        return {row.id: row.html_path for row in session.scalars(select(DriftReport))}


def test_reports_are_listed_newest_first_and_latest_is_the_newest(client) -> None:
    assert client.get("/reports").json() == []
    none_yet = client.get("/reports/latest")
    assert (none_yet.status_code, none_yet.json()) == (404, {"error": "not_found", "message": NO_REPORT_YET})
    for _ in range(3):
        run_monitor(client)  # an empty window: an insufficient report, no Evidently run
    listed = client.get("/reports").json()
    assert [r["id"] for r in listed] == [3, 2, 1]
    assert set(listed[0]) == {
        "id", "created_at", "champion_version", "rows", "labelled_rows", "drift_share",
        "weighted_drift_score", "mae", "mean_error", "breach", "verdict", "reasons",
    }  # fmt: skip
    assert (listed[0]["verdict"], listed[0]["rows"], listed[0]["breach"]) == ("insufficient", 0, False)
    assert [r["id"] for r in client.get("/reports", params={"limit": 2}).json()] == [3, 2]
    assert [r["id"] for r in client.get("/reports", params={"limit": 1}).json()] == [3]
    assert [r["id"] for r in client.get("/reports", params={"limit": 10_000}).json()] == [
        3,
        2,
        1,
    ]  # at most 500
    latest = client.get("/reports/latest")
    assert latest.status_code == 200
    assert latest.json() == client.get("/reports/3").json()


def test_unknown_and_malformed_report_ids(client) -> None:
    for path in ("/reports/99", "/reports/99/html"):
        response = client.get(path)
        assert (response.status_code, response.json()) == (
            404,
            {"error": "not_found", "message": "drift report 99 does not exist"},
        )
    not_an_int = "Input should be a valid integer, unable to parse string as an integer"
    for path in ("/reports/abc", "/reports/abc/html", "/reports/1.5"):
        bad = client.get(path)
        assert (bad.status_code, bad.json()) == (
            422,
            {
                "error": "invalid_request",
                "message": f"path.report_id: {not_an_int}",
                "errors": [{"field": "path.report_id", "message": not_an_int}],
            },
        )
    bad_limit = client.get("/reports", params={"limit": "many"})
    assert (bad_limit.status_code, bad_limit.json()["message"]) == (422, f"query.limit: {not_an_int}")


def test_the_admin_token_never_reaches_the_server_log(sqlite_url, tmp_path) -> None:
    token, wrong = f"admin-{uuid4().hex}", f"guess-{uuid4().hex}"
    settings = make_settings(sqlite_url, tmp_path, admin_token=token)
    server = start_server(settings, tmp_path, command=("serve", "--access-log", "--log-level", "debug"))
    right, guess = {"Authorization": f"Bearer {token}"}, {"Authorization": f"Bearer {wrong}"}
    try:
        run = server.post("/monitor/run", headers=right)
        assert (run.status_code, run.json()["reasons"]) == (200, ["no champion model yet"])
        assert server.post("/monitor/run", headers=guess).status_code == 401
        assert server.post("/models/rollback", headers=right).status_code == 409
    finally:
        assert server.terminate()
    log = server.log()
    for line in ('"POST /monitor/run HTTP/1.1" 200', '"POST /monitor/run HTTP/1.1" 401'):
        assert line in log  # the requests did reach the log
    assert token not in log
    assert wrong not in log


def test_a_window_labelled_all_zero_is_reported_with_no_mape(champion, db_url, tmp_path, spec) -> None:
    """Every label so far 0 (the spec's target_min): the monitor run failed with Evidently's IndexError, and
    the MAPE it has nothing to measure, NaN, was stored on PostgreSQL and made GET /reports/{id} a 500."""
    settings = make_settings(db_url, tmp_path, auto_retrain=False)
    frame = generate_transactions(600, start="2022-07-01", end="2022-12-31", scenario="none", seed=41)
    with TestClient(create_app(settings, scheduler=False)) as client:
        response = client.post(
            "/predict/batch", json={"instances": frame[spec.feature_names].to_dict("records")}
        )
        assert client.app.state.ctx.logger.flush(timeout=30)
        labels = [
            {"prediction_id": p["prediction_id"], "actual": 0} for p in response.json()["predictions"][:300]
        ]
        assert client.post("/feedback", json=labels).json()["accepted"] == 300
        outcome = run_monitor(client)
        report = client.get(f"/reports/{outcome['report_id']}")
        page = client.get(f"/reports/{outcome['report_id']}/html").text
    assert report.status_code == 200
    figures = report.json()
    assert (figures["mape"], figures["labelled_rows"]) == (None, 300)
    assert '{"value": "n/a", "label": "MAPE %"}' in page  # the page's counter said "nan"
    assert figures["mae"] > 0 and figures["mean_error"] == pytest.approx(figures["mae"])


def workspace_runs(path: Path) -> dict[str, list[str]]:
    """The Evidently workspace at `path`: each project's name → its snapshots' names, oldest first."""
    from evidently.ui.workspace import Workspace

    workspace = Workspace(str(path))
    return {
        project.name: [
            workspace.get_run(project.id, run).name for run in sorted(workspace.list_runs(project.id))
        ]
        for project in workspace.list_projects()
    }


def test_each_judged_run_adds_its_snapshots_to_the_evidently_workspace(
    champion, db_url, tmp_path, spec
) -> None:
    """Evidently's snapshots of a run that judged drift (and, with labels, accuracy) go to the workspace,
    one project per spec, named after the report; a run without a verdict adds none; the newest `keep`
    stay."""
    workspace = tmp_path / "evidently"
    settings = make_settings(
        db_url, tmp_path, auto_retrain=False, accuracy_window_rows=1000, evidently_workspace=workspace,
        evidently_workspace_keep=3,
    )  # fmt: skip
    with TestClient(create_app(settings, scheduler=False)) as client:
        assert run_monitor(client)["verdict"] == "insufficient"  # no answers yet
        assert not workspace.exists()
        serve_traffic(client, spec, "unit_bug", 600, seed=7, labelled=True)
        first = run_monitor(client)["report_id"]
        assert workspace_runs(workspace) == {
            f"driftloop: {spec.dataset}": [
                f"report {first} · v1 · breach: drift",
                f"report {first} · v1 · breach: accuracy",
            ]
        }
        second = run_monitor(client)["report_id"]
    assert workspace_runs(workspace) == {
        f"driftloop: {spec.dataset}": [
            f"report {first} · v1 · breach: accuracy",
            f"report {second} · v1 · breach: drift",
            f"report {second} · v1 · breach: accuracy",
        ]
    }


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_workspace_that_cannot_be_written_is_logged_and_the_run_goes_on(
    champion, db_url, tmp_path, spec, caplog
) -> None:
    workspace = tmp_path / "evidently"
    settings = make_settings(db_url, tmp_path, auto_retrain=False, evidently_workspace=workspace)
    with TestClient(create_app(settings, scheduler=False)) as client:
        serve_traffic(client, spec, "none", 600, seed=8, labelled=False)
        run_monitor(client)
        (snapshots,) = workspace.glob("*/snapshots")
        for run in snapshots.iterdir():
            run.unlink()
        snapshots.rmdir()
        snapshots.write_text("in the way")  # the project's snapshot directory is now a file
        with caplog.at_level("WARNING", logger="driftloop.loop"):
            outcome = run_monitor(client)
        stored = client.get(f"/reports/{outcome['report_id']}")
    assert (outcome["verdict"], stored.status_code) == ("ok", 200)
    problem = [r.getMessage() for r in caplog.records if "Evidently workspace" in r.getMessage()]
    assert len(problem) == 1
    assert problem[0].startswith(
        f"could not add report {outcome['report_id']} to the Evidently workspace {workspace}: "
    )


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_run_adds_its_snapshots_without_reading_those_already_kept(
    champion, db_url, tmp_path, spec, caplog
) -> None:
    """A run writes its snapshots and lists the files to prune; it parses none of the kept ones. Evidently's
    `Workspace(dir)` reads and parses every snapshot there (0.28 s for 13, 11 s and 1.1 GB for 600; the
    default keep is 576), and fails on one a full disk left half-written, after which no run added any."""
    workspace = tmp_path / "evidently"
    settings = make_settings(
        db_url, tmp_path, auto_retrain=False, evidently_workspace=workspace, evidently_workspace_keep=2
    )
    with TestClient(create_app(settings, scheduler=False)) as client:
        serve_traffic(client, spec, "none", 600, seed=8, labelled=False)
        run_monitor(client)
        (kept,) = workspace.glob("*/snapshots/*.json")
        kept.write_bytes(kept.read_bytes()[:1000])  # as a disk that filled mid-write leaves it
        with caplog.at_level("WARNING", logger="driftloop.loop"):
            second = run_monitor(client)["report_id"]
            third = run_monitor(client)["report_id"]
    assert [r.getMessage() for r in caplog.records if "Evidently workspace" in r.getMessage()] == []
    assert not kept.exists()  # pruned, as the oldest
    assert workspace_runs(workspace) == {
        f"driftloop: {spec.dataset}": [f"report {n} · v1 · ok: drift" for n in (second, third)]
    }


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_evidentlys_own_ui_lists_the_runs_and_plots_the_dashboard(champion, db_url, tmp_path, spec) -> None:
    """`evidently ui --workspace DIR` (a real one, over HTTP) finds the project, and every series of the
    dashboard driftloop gave it has one point per run: the panels name metrics and labels the snapshots
    hold. DO_NOT_TRACK keeps Evidently's UI from sending its usage telemetry."""
    workspace = tmp_path / "evidently"
    settings = make_settings(db_url, tmp_path, auto_retrain=False, evidently_workspace=workspace)
    with TestClient(create_app(settings, scheduler=False)) as client:
        serve_traffic(client, spec, "new_town", 600, seed=9, labelled=True)
        runs = [run_monitor(client) for _ in range(2)]
    assert all(r["verdict"] != "insufficient" for r in runs)
    port = free_port()
    ui = tmp_path / "evidently-ui.log"
    command = [str(Path(sys.executable).with_name("evidently")), "ui", "--workspace", str(workspace),
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with ui.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "DO_NOT_TRACK": "1"}
        )
    base = f"http://127.0.0.1:{port}/api"
    try:
        projects = wait_until(lambda: _get_json(f"{base}/projects"), timeout=120, what="evidently ui")
        assert [p["name"] for p in projects] == [f"driftloop: {spec.dataset}"]
        project = projects[0]["id"]
        snapshots = httpx.get(f"{base}/projects/{project}/snapshots", timeout=30).json()
        assert len(snapshots) == 4  # drift and accuracy, twice
        panels = httpx.get(f"{base}/v2/dashboards/{project}", timeout=30).json()["panels"]
        assert [len(p["values"]) for p in panels] == [len(spec.feature_names), 1, 2]
        for panel in panels:
            filters = [
                {k: v[k] for k in ("tags", "metadata", "metric", "metric_labels")} for v in panel["values"]
            ]
            answer = httpx.post(
                f"{base}/v2/snapshots/{project}/data_series_batch",
                json={"series_filter": filters},
                timeout=30,
            )
            series = answer.json()["series"]
            assert sorted(s["filter_index"] for s in series) == list(range(len(filters))), panel["title"]
            assert all(sum(v is not None for v in s["values"]) == 2 for s in series), panel["title"]
    finally:
        process.terminate()
        process.wait(timeout=30)


def _get_json(url: str) -> Any:
    try:
        answer = httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None
    return answer.json() if answer.status_code == 200 else None
