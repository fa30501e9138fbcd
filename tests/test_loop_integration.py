"""The automatic loop end to end: monitor → policy → alert → retrain → gate → hot swap, on real parts."""

import json
import logging
import math
import os
import signal
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import pandas as pd
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import func, insert, select

from bench.loadgen import LoadResult, json_payloads, run_load
from core.db import utcnow
from core.figures import figure
from core.generator import DRIFTED_FEATURES, generate_transactions
from core.lease import current_holder, try_acquire
from core.metrics import build_metrics
from core.registry import NewVersion, Registry
from core.schema import (
    DriftReport,
    GroundTruth,
    LabelledRow,
    ModelVersion,
    Notification,
    PredictionLog,
    RetrainRun,
)
from core.spec import FeatureSpec
from monitor import LOOP_LOGGER
from monitor.jobs import MONITOR_LEASE, MONITOR_LEASE_TTL_S, Loop, MonitorBusy, schedule_check_s
from monitor.notify import enqueue_retrain_outcome
from monitor.policy import load_history
from retrain.runs import NoChampion, start_run
from retrain.train import predict, reference_snapshot, train_model
from tests.conftest import TINY, make_settings
from tests.live import start_server, wait_until
from tests.webhook import Receiver, running_receiver

ADMIN = {"Authorization": "Bearer test-admin-token"}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with running_receiver() as receiver:
        yield receiver


def traffic(scenario: str, n: int, seed: int) -> pd.DataFrame:
    """2022 transactions; for a drift scenario the change has fully landed before the first row."""
    return generate_transactions(
        n, start="2022-07-01", end="2022-12-31", scenario=scenario, change_at="2022-04-01", seed=seed
    )


def log_traffic(
    registry: Registry,
    champion: ModelVersion,
    spec: FeatureSpec,
    frame: pd.DataFrame,
    *,
    labelled: bool = True,
    ago: timedelta = timedelta(0),
) -> None:
    """What the service would have logged: the champion's predictions, one second apart, ending `ago`
    before now, with their labels (received now)."""
    predictions = predict(registry.load(champion), frame, spec)
    now = utcnow()
    ids = [str(uuid4()) for _ in range(len(frame))]
    rows = [
        {
            "id": pid,
            "created_at": now - ago - timedelta(seconds=len(frame) - i),
            "model_version": champion.version,
            "features": features,
            "prediction": float(p),
            "latency_ms": 1.0,
        }
        for i, (pid, features, p) in enumerate(
            zip(ids, frame[spec.feature_names].to_dict("records"), predictions, strict=True)
        )
    ]
    with registry.sessions.begin() as session:
        session.execute(insert(PredictionLog), rows)
        if labelled:
            labels = [
                {"prediction_id": pid, "actual": float(a), "received_at": now}
                for pid, a in zip(ids, frame[spec.target], strict=True)
            ]
            session.execute(insert(GroundTruth), labels)


@pytest.fixture
def make_loop(registry, spec, metrics, db_url, tmp_path) -> Iterator[Callable[..., Loop]]:
    """Loops on the test database, each stopped (its announcers finished) before the engine is disposed."""
    made: list[Loop] = []

    def _make(**overrides: Any) -> Loop:
        settings = make_settings(
            db_url, tmp_path, min_window_rows=300, window_rows=1200, min_labelled_rows=100, **overrides
        )
        made.append(
            Loop(settings=settings, spec=spec, sessions=registry.sessions, registry=registry, metrics=metrics)
        )
        return made[-1]

    yield _make
    for loop in made:
        loop.stop()


def report_row(registry: Registry, report_id: int) -> DriftReport:
    with registry.sessions() as session:
        return session.get(DriftReport, report_id)


def runs(registry: Registry) -> list[RetrainRun]:
    with registry.sessions() as session:
        return list(session.scalars(select(RetrainRun).order_by(RetrainRun.id)))


def test_a_stable_window_is_not_flagged(make_loop, registry, champion, spec, metrics) -> None:
    log_traffic(registry, champion, spec, traffic("none", 1200, seed=3))
    loop = make_loop()
    outcome = loop.run_monitor()
    assert (outcome.verdict, outcome.decision.breach, outcome.retrain_run_id) == ("ok", False, None)
    row = report_row(registry, outcome.report_id)
    # 1,200 rows, all labelled; accuracy is measured on the newest 500 (DRIFTLOOP_ACCURACY_WINDOW_ROWS)
    assert (row.rows, row.labelled_rows, row.champion_version, row.breach) == (1200, 500, 1, False)
    assert Path(row.html_path).is_file()
    # The run's own time is recorded (no longer 0), and it is part of what the monitor's histogram counted.
    assert 0 < row.duration_s <= metrics_value(metrics)("driftloop_monitor_seconds_sum")
    assert not [f for f in ("district", "area_m2", "build_year") if row.features[f]["detected"]]
    sample = metrics_value(metrics)
    assert sample("driftloop_drift_breach") == 0
    assert sample("driftloop_window_mae") == pytest.approx(row.mae)
    assert sample("driftloop_drift_share") == pytest.approx(row.drift_share)
    assert sample("driftloop_monitor_last_run_timestamp_seconds") > 0
    assert sample("driftloop_monitor_runs_total", outcome="ok") == 1
    assert runs(registry) == []


def test_a_scheduled_monitor_run_is_skipped_within_half_an_interval_of_the_last_report(
    make_loop, registry, champion, spec
) -> None:
    """A standby that takes over runs on its own process's timer, perhaps seconds after the old leader's last
    run: a second report over nearly the same window counted as a second breach in a row."""
    log_traffic(registry, champion, spec, traffic("none", 1200, seed=3))
    loop = make_loop(monitor_interval_s=600)
    assert loop.renew_lease() is True
    now = utcnow()
    loop.clock = lambda: now
    first = loop.run_monitor().report_id  # the previous leader's, or an operator's
    loop._scheduled_monitor()
    loop.clock = lambda: now + timedelta(seconds=299)
    loop._scheduled_monitor()
    with registry.sessions() as session:
        assert session.scalars(select(DriftReport.id)).all() == [first]
    loop.clock = lambda: now + timedelta(seconds=300)
    loop._scheduled_monitor()
    with registry.sessions() as session:
        assert len(session.scalars(select(DriftReport.id)).all()) == 2
    loop.clock = lambda: now  # behind the clock that dated the newest report: not held for the skew
    loop._scheduled_monitor()
    with registry.sessions() as session:
        assert len(session.scalars(select(DriftReport.id)).all()) == 3


def test_pruning_deletes_only_pages_inside_the_report_dir(make_loop, registry, champion, tmp_path) -> None:
    loop = make_loop(report_html_keep=1)
    pages = loop.settings.report_dir
    pages.mkdir(parents=True)
    outside, target = tmp_path / "outside.html", tmp_path / "target.html"
    for path in (outside, target, pages / "newest.html"):
        path.write_text("<html></html>", encoding="utf-8")
    (pages / "link.html").symlink_to(target)
    stored = [outside, pages / "gone.html", pages / "link.html", pages / "newest.html"]
    with registry.sessions.begin() as session:
        session.add_all(page_report(path) for path in stored)
    outcome = loop.run_monitor()  # an empty window: an insufficient report without a page, then the pruning
    assert (outcome.verdict, outcome.report_id) == ("insufficient", 5)
    with registry.sessions() as session:
        paths = [row.html_path for row in session.scalars(select(DriftReport).order_by(DriftReport.id))]
    assert paths == [None, None, None, str(pages / "newest.html"), None]  # every row stays
    assert sorted(pages.iterdir()) == [pages / "newest.html"]
    assert outside.is_file() and target.is_file()  # outside the report dir: forgotten, never deleted


def page_report(html_path: Path) -> DriftReport:
    """A stored report with a verdict and a page, as an earlier monitor run left it."""
    return DriftReport(
        created_at=utcnow(), champion_version=1, rows=300, labelled_rows=0, sampled_rows=300, features={},
        prediction_drift={}, reasons=[], decision={"verdict": "ok"}, html_path=str(html_path),
    )  # fmt: skip


@pytest.mark.parametrize("scenario", ["new_town", "unit_bug"])
def test_covariate_drift_is_flagged_naming_the_features(
    make_loop, registry, champion, spec, metrics, scenario
) -> None:
    log_traffic(registry, champion, spec, traffic(scenario, 1200, seed=4), labelled=False)
    loop = make_loop(auto_retrain=False)
    outcome = loop.run_monitor()
    assert outcome.verdict == "breach"
    assert outcome.decision.held_by == "alert-only mode"
    row = report_row(registry, outcome.report_id)
    detected = {f for f, v in row.features.items() if v["detected"]}
    assert set(DRIFTED_FEATURES[scenario]) <= detected
    assert row.breach and row.labelled_rows == 0 and row.mae is None
    assert (outcome.decision.soft, row.decision["soft"]) == (True, True)  # drift alone: the backoff applies
    sample = metrics_value(metrics)
    assert sample("driftloop_drift_breach") == 1
    for feature in DRIFTED_FEATURES[scenario]:
        assert sample("driftloop_feature_drift_detected", feature=feature) == 1
        assert sample("driftloop_feature_drift_score", feature=feature) == pytest.approx(
            row.features[feature]["score"]
        )


def test_concept_drift_is_an_accuracy_breach(make_loop, registry, champion, spec) -> None:
    log_traffic(registry, champion, spec, traffic("rate_shock", 1200, seed=5))
    outcome = make_loop(auto_retrain=False).run_monitor()
    assert (outcome.verdict, outcome.decision.trigger) == ("breach", "accuracy")
    row = report_row(registry, outcome.report_id)
    assert row.drift_share < 0.5  # the features did not move; the prices did
    assert row.mae > 1.25 * champion.metrics["val_mae"]


def test_a_run_without_a_verdict_leaves_no_figures_of_the_last_window(
    make_loop, registry, champion, spec, metrics
) -> None:
    """After a swap the new champion has answered nothing yet and (trained up to now) has no unseen label:
    the run has no verdict, and the drift and accuracy gauges must not go on showing the previous champion's
    breaching window (WindowMaeHigh would compare its MAE with the new champion's). With unseen labels the
    accuracy gauges show the new champion's figures on them (see the test below)."""
    log_traffic(registry, champion, spec, traffic("rate_shock", 1200, seed=5))
    loop = make_loop(auto_retrain=False)
    assert loop.run_monitor().verdict == "breach"
    sample = metrics_value(metrics)
    assert sample("driftloop_window_mae") > 1.25 * champion.metrics["val_mae"]
    v2 = registry.register(
        NewVersion(
            model=registry.load(champion), reference=registry.reference(champion), trigger="manual",
            metrics=champion.metrics, params={}, train_rows=champion.train_rows, train_end=utcnow(),
        )
    )  # fmt: skip
    registry.promote(version=v2.version, reason="test")  # trained up to now: every label is seen

    outcome = loop.run_monitor()

    assert (outcome.verdict, outcome.result, outcome.accuracy) == ("insufficient", None, None)
    assert (sample("driftloop_window_rows"), sample("driftloop_window_labelled_rows")) == (0, 0)
    assert sample("driftloop_min_labelled_rows") == 100  # what WindowMaeHigh compares the labelled rows with
    assert (
        sample("driftloop_mae_degradation_ratio") == loop.settings.mae_degradation_ratio == 1.25
    )  # and the MAE
    window = ("drift_share", "drift_weighted_score", "prediction_drift_score", "window_mae", "window_rmse",
              "window_mape", "window_mean_error")  # fmt: skip
    assert all(math.isnan(sample(f"driftloop_{name}")) for name in window)
    for feature in spec.feature_names:
        assert math.isnan(sample("driftloop_feature_drift_score", feature=feature))
        assert math.isnan(sample("driftloop_feature_drift_detected", feature=feature))
    assert sample("driftloop_drift_breach") == 0


def test_a_monitor_run_in_another_process_holds_off_this_ones(
    make_loop, registry, champion, spec, metrics
) -> None:
    """An API replica's POST /monitor/run, the worker's scheduled run and `driftloop monitor` share one
    database lease: a second run over the same window would not see the first's report and open a breach
    episode (and an alert) of its own. A run refused so stores nothing; a lease left by a process that died
    mid-run is taken over once it expires."""
    log_traffic(registry, champion, spec, traffic("rate_shock", 600, seed=5))
    elsewhere = make_loop(auto_retrain=False)
    loop = make_loop(auto_retrain=False)
    now = utcnow()
    assert try_acquire(
        registry.sessions, name=MONITOR_LEASE, holder=elsewhere.holder_id, ttl_s=MONITOR_LEASE_TTL_S, now=now
    )
    expires = now + timedelta(seconds=MONITOR_LEASE_TTL_S)

    with pytest.raises(MonitorBusy) as refused:
        loop.run_monitor(now + timedelta(seconds=5))

    assert str(refused.value) == (
        f"a monitor run is already in progress in {elsewhere.holder_id} (its lease expires "
        f"{expires:%Y-%m-%d %H:%M:%S} UTC); at most one runs at a time"
    )
    with registry.sessions() as session:
        assert session.scalar(select(func.count()).select_from(DriftReport)) == 0
    assert metrics_value(metrics)("driftloop_monitor_seconds_count") == 0  # no run, nothing to time
    outcome = loop.run_monitor(expires + timedelta(seconds=1))  # the holder died: its lease has expired
    assert outcome.verdict == "breach"
    assert current_holder(registry.sessions, name=MONITOR_LEASE) is None  # released at the end of the run
    assert elsewhere.run_monitor(expires + timedelta(seconds=2)).report_id == outcome.report_id + 1


def import_labels(registry: Registry, spec: FeatureSpec, frame: pd.DataFrame, times: list) -> None:
    """What `driftloop ingest` stores: labelled rows with their event times, no prediction behind them."""
    rows = [
        {
            "features": f,
            "target": float(t),
            "event_time": at,
            "source": "test",
            "ingested_at": utcnow(),
        }
        for f, t, at in zip(
            frame[spec.feature_names].to_dict("records"), frame[spec.target], times, strict=True
        )
    ]
    with registry.sessions.begin() as session:
        session.execute(insert(LabelledRow), rows)


def test_imported_labels_the_champion_has_not_trained_on_measure_its_accuracy(
    make_loop, registry, champion, spec
) -> None:
    """Labels that come only by import still measure the champion: a concept drift seen in imported rows
    alone is an accuracy breach. Imported rows dated within its training data are not counted."""
    log_traffic(registry, champion, spec, traffic("rate_shock", 1200, seed=5), labelled=False)
    shocked = traffic("rate_shock", 400, seed=6)
    now = utcnow()
    import_labels(registry, spec, shocked, [now - timedelta(minutes=400 - i) for i in range(400)])
    trained_on = generate_transactions(300, start="2021-01-01", end="2021-06-30", seed=7)
    trained_on[spec.target] *= 3  # would breach by far if counted
    assert champion.train_end is not None and trained_on["contract_date"].max() < champion.train_end
    import_labels(registry, spec, trained_on, list(trained_on["contract_date"]))

    outcome = make_loop(auto_retrain=False).run_monitor()

    assert (outcome.verdict, outcome.decision.trigger) == ("breach", "accuracy")
    row = report_row(registry, outcome.report_id)
    answers = predict(registry.load(champion), shocked, spec)
    assert row.labelled_rows == 400
    assert row.mae == pytest.approx(float((answers - shocked[spec.target]).abs().mean()))


def promote_trained_on(
    registry: Registry, champion: ModelVersion, spec: FeatureSpec, frame: pd.DataFrame
) -> tuple[Any, ModelVersion]:
    """v2, trained on `frame` (its data ends with it) and promoted with v1's validation MAE: (model, v2)."""
    model = train_model(frame, spec, TINY)
    v2 = registry.register(
        NewVersion(
            model=model, reference=reference_snapshot(model, frame, spec), trigger="manual",
            metrics={"val_mae": champion.metrics["val_mae"]}, params={}, train_rows=len(frame),
            train_end=frame["contract_date"].max().to_pydatetime(),
        )
    )  # fmt: skip
    registry.promote(version=v2.version, reason="test")
    return model, registry.champion()


def test_a_new_champion_is_measured_at_once_on_labels_for_answers_it_did_not_give(
    make_loop, registry, champion, spec
) -> None:
    """Labels that arrive after a promotion are for the previous champion's answers. Scored by the new
    champion, they measure it at once, instead of a label delay later; and by its own answers, not by the
    ones it replaced: v1's answers to shocked traffic breach, v2 learnt the shock and does not."""
    shocked = traffic("rate_shock", 1200, seed=5)
    log_traffic(registry, champion, spec, shocked)  # v1's answers, labelled after the swap
    model, v2 = promote_trained_on(registry, champion, spec, traffic("rate_shock", 3000, seed=8))
    log_traffic(registry, v2, spec, traffic("rate_shock", 1200, seed=9), labelled=False)
    loop = make_loop(auto_retrain=False)

    outcome = loop.run_monitor()

    row = report_row(registry, outcome.report_id)
    newest = shocked.tail(500)  # DRIFTLOOP_ACCURACY_WINDOW_ROWS
    assert row.labelled_rows == 500
    assert row.mae == pytest.approx(float((predict(model, newest, spec) - newest[spec.target]).abs().mean()))
    assert outcome.verdict == "ok" and row.mae < champion.metrics["val_mae"] * 1.25


def test_a_champion_with_too_few_answers_to_judge_drift_is_judged_on_its_labels(
    make_loop, registry, champion, spec, metrics
) -> None:
    """Right after a swap the new champion's drift window holds only its first few answers, too few to
    judge drift. The labels have a window of their own: a swap that did not cure the loss (v2 learnt the
    old market) breaches on them at once, rather than after DRIFTLOOP_MIN_WINDOW_ROWS more answers."""
    shocked = traffic("rate_shock", 1200, seed=5)
    log_traffic(registry, champion, spec, shocked)  # v1's answers, labelled
    model, v2 = promote_trained_on(registry, champion, spec, traffic("none", 3000, seed=8))  # the old market
    log_traffic(registry, v2, spec, traffic("rate_shock", 100, seed=9), labelled=False)  # < 300 rows
    loop = make_loop(auto_retrain=False)

    outcome = loop.run_monitor()

    row = report_row(registry, outcome.report_id)
    newest = shocked.tail(500)
    v2_mae = float((predict(model, newest, spec) - newest[spec.target]).abs().mean())
    assert (row.rows, row.labelled_rows, row.drift_share, row.html_path) == (100, 500, None, None)
    assert row.mae == pytest.approx(v2_mae) and v2_mae > champion.metrics["val_mae"] * 1.25
    assert (outcome.verdict, outcome.decision.trigger) == ("breach", "accuracy")
    assert outcome.decision.reasons[0].startswith(f"MAE {figure(v2_mae)} on 500 labelled rows >")
    assert outcome.to_json()["accuracy"]["mae"] == pytest.approx(v2_mae)
    sample = metrics_value(metrics)
    assert sample("driftloop_window_mae") == pytest.approx(v2_mae)
    assert math.isnan(sample("driftloop_drift_share"))  # no drift verdict: no figure


def test_labels_within_policy_end_a_run_of_accuracy_breaches_while_the_drift_window_is_short(
    make_loop, registry, champion, spec
) -> None:
    """With too few of v2's answers to judge drift, a report whose labels are within policy is no "ok"
    (drift was not judged), but the next accuracy breach starts a new run: two breaches around it are not
    two in a row, so hysteresis holds the retrain."""
    hours = timedelta(hours=1)
    log_traffic(registry, champion, spec, traffic("rate_shock", 600, seed=5), ago=3 * hours)  # v1's, labelled
    _, v2 = promote_trained_on(registry, champion, spec, traffic("none", 3000, seed=8))  # the old market
    log_traffic(registry, v2, spec, traffic("none", 100, seed=9), labelled=False)  # < 300 rows
    loop = make_loop(consecutive_breaches=2)

    first = loop.run_monitor()
    log_traffic(registry, champion, spec, traffic("none", 600, seed=10), ago=2 * hours)  # newest 500: fine
    calm = loop.run_monitor()
    log_traffic(registry, champion, spec, traffic("rate_shock", 600, seed=11), ago=hours)
    again = loop.run_monitor()

    assert (first.verdict, first.decision.trigger, first.decision.held_by) == (
        "breach", "accuracy", "hysteresis 1/2",
    )  # fmt: skip
    assert (calm.verdict, calm.decision.labels_within_policy) == ("insufficient", True)
    assert report_row(registry, calm.report_id).decision["labels_within_policy"] is True
    assert calm.decision.reasons[1].endswith("on 500 labelled rows is within policy")
    assert (again.verdict, again.decision.consecutive, again.decision.held_by) == (
        "breach", 1, "hysteresis 1/2",
    )  # fmt: skip
    assert again.retrain_run_id is None and runs(registry) == []


def test_one_alert_per_breach_then_a_gated_retrain_promotes(
    make_loop, registry, champion, spec, receiver, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="driftloop.loop")
    log_traffic(registry, champion, spec, traffic("rate_shock", 1200, seed=6))
    loop = make_loop(consecutive_breaches=2, webhook_url=receiver.url)
    first = loop.run_monitor()
    assert (first.verdict, first.decision.retrain, first.decision.held_by) == (
        "breach",
        False,
        "hysteresis 1/2",
    )
    second = loop.run_monitor()
    assert second.decision.retrain and second.retrain_run_id is not None
    run = wait_until(lambda: finished(registry, second.retrain_run_id), timeout=120, what="the retrain run")
    assert run.status == "promoted"
    assert registry.champion().version == 2
    v2 = registry.get(2)
    assert (v2.parent_version, v2.trigger, v2.report_id, v2.retrain_run_id) == (
        1,
        "accuracy",
        second.report_id,
        run.id,
    )
    assert set(run.steps) == {"assemble", "train", "validate", "refit", "register", "promote"}
    # MAE over the champion's own yardstick: a hard breach, and its run starts the backoff count afresh.
    assert report_row(registry, second.report_id).decision["soft"] is False
    with registry.sessions() as session:
        assert load_history(session, champion_version=2, now=utcnow()).soft_runs == 0
    wait_until(lambda: "retrain_outcome" in receiver.kinds(), timeout=30, what="the retrain outcome message")
    loop.deliver()
    assert receiver.kinds().count("drift_breach") == 1  # two breaching reports, one episode, one alert
    assert "text" in receiver.bodies[0] and "breach" in receiver.bodies[0]["text"]
    with registry.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Notification)) == 2
    # The service's log tells the same story, a line a run and one for the outcome.
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "driftloop.loop"]
    assert ("WARNING", f"monitor run: report #{first.report_id}, BREACH (1 in a row)") == (
        lines[0][0], lines[0][1].split(" (drift share")[0],
    )  # fmt: skip
    assert "no retraining: hysteresis 1/2" in lines[0][1] and "MAE " in lines[0][1]
    assert f"retrain run {run.id} launched (trigger: accuracy)" in lines[1][1]
    outcome = [m for _, m in lines if m.startswith(f"driftloop retrain run #{run.id} ")]
    assert outcome == [
        f"driftloop retrain run #{run.id} (trigger: accuracy): candidate v2 promoted, replacing v1. | "
        f"Reason: {'; '.join(second.decision.reasons)}"
    ]


def test_a_worse_candidate_is_rejected_and_cooldown_holds(make_loop, registry, champion, spec) -> None:
    log_traffic(registry, champion, spec, traffic("rate_shock", 1200, seed=7))
    loop = make_loop(consecutive_breaches=1, gate_margin=0.99)
    first = loop.run_monitor()
    run = wait_until(lambda: finished(registry, first.retrain_run_id), timeout=120, what="the retrain run")
    assert run.status == "rejected"
    assert "rejected: mae: candidate MAE" in registry.get(run.candidate_version).note
    assert registry.champion().version == 1  # the champion keeps serving
    again = loop.run_monitor()
    assert again.decision.breach and not again.decision.retrain
    assert again.decision.held_by.startswith("cooldown")
    assert len(runs(registry)) == 1


def test_a_failing_receiver_is_retried_until_delivered(make_loop, registry, champion, spec) -> None:
    with running_receiver(statuses=[500]) as flaky:
        log_traffic(registry, champion, spec, traffic("unit_bug", 600, seed=8), labelled=False)
        loop = make_loop(auto_retrain=False, webhook_url=flaky.url, webhook_backoff_s=0)
        loop.run_monitor()  # delivers once: the receiver answers 500
        assert (flaky.attempts, flaky.kinds()) == (1, [])
        loop.deliver()
        assert (flaky.attempts, flaky.kinds()) == (2, ["drift_breach"])
        with registry.sessions() as session:
            note = session.scalars(select(Notification)).one()
        assert (note.status, note.attempts) == ("delivered", 2)


def test_scheduler_lease_one_leader_and_takeover(make_loop, registry, champion, caplog) -> None:
    caplog.set_level(logging.INFO, logger=LOOP_LOGGER)
    long_ago = utcnow() - timedelta(minutes=5)
    with registry.sessions.begin() as session:  # a run whose process died: no heartbeat for 5 minutes
        session.add(RetrainRun(trigger="manual", status="running", metrics={}, steps={}, started_at=long_ago))
    a = make_loop()
    b = make_loop()
    assert a.renew_lease() is True
    assert b.renew_lease() is False
    assert b.renew_lease() is False
    # The standby says once whose lease it waits on, rather than nothing at all.
    standby = [m for m in caplog.messages if "this process stands by" in m]
    assert len(standby) == 1, caplog.messages
    assert standby[0].startswith(f"scheduler lease held by {a.holder_id} until ")
    assert [r.status for r in runs(registry)] == ["failed"]  # the leader cleared what a crash left
    # A run another process (an API replica) is doing and keeping alive is left alone.
    alive = start_run(registry.sessions, trigger="manual", now=utcnow())
    assert a.renew_lease() is True  # renewal by the holder
    assert [(r.id, r.status) for r in runs(registry)][-1] == (alive, "running")
    a.stop()  # releases the lease
    assert b.renew_lease() is True


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_scheduled_monitor_run_in_a_database_outage_is_one_line_not_a_traceback(
    make_loop, registry, champion, pg_cluster, caplog
) -> None:
    """Seen live: pg_ctl stop while the worker led gave `ERROR monitor run failed` with a ~60-line
    traceback, at every interval the outage lasted, where the lease and delivery jobs beside it said one
    line each."""
    loop = make_loop()
    assert loop.renew_lease() is True
    caplog.set_level(logging.INFO, logger=LOOP_LOGGER)
    pg_cluster.stop()
    try:
        loop._scheduled_monitor()
        loop._scheduled_monitor()
    finally:
        pg_cluster.start()
    during = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == LOOP_LOGGER]
    assert not [r for r in caplog.records if r.exc_info], "an outage is not a bug: no traceback"
    assert len(during) == 1, during
    assert during[0][0] == "WARNING"
    assert during[0][1].startswith("monitor run: database unavailable (OperationalError: ")
    caplog.clear()
    loop._scheduled_monitor()
    assert "monitor run: database reachable again" in [
        r.getMessage() for r in caplog.records if r.name == LOOP_LOGGER
    ]


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_database_outage_is_logged_once_per_job_not_at_every_attempt(
    make_loop, registry, pg_cluster, caplog
) -> None:
    """Every worker renews its lease every TTL/3 and delivers notifications every 2 s: during an outage
    each attempt used to log a full traceback (~115 lines every 2 s per worker), burying the one fact."""
    loop = make_loop()
    assert loop.renew_lease() is True
    caplog.set_level(logging.INFO, logger=LOOP_LOGGER)
    pg_cluster.stop()  # fast: the pooled connections are cut, new ones refused
    try:
        for _ in range(3):
            loop.deliver()
            assert loop.renew_lease() is False
    finally:
        pg_cluster.start()
    during = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == LOOP_LOGGER]
    assert not [r for r in caplog.records if r.exc_info], "an outage is not a bug: no traceback"
    assert [level for level, _ in during] == ["WARNING", "WARNING", "WARNING"], during
    assert during[0][1].startswith("notification delivery: database unavailable (OperationalError: ")
    assert during[1][1].startswith("scheduler lease: database unavailable (OperationalError: ")
    assert during[2][1] == "scheduler lease lost; this process idles"
    caplog.clear()
    loop.deliver()
    assert loop.renew_lease() is True
    assert [r.getMessage() for r in caplog.records if r.name == LOOP_LOGGER] == [
        "notification delivery: database reachable again",
        "scheduler lease: database reachable again",
        f"scheduler lease taken by {loop.holder_id}",
    ]


def outcomes(registry: Registry) -> dict[str, str]:
    """dedup_key → status of every retrain outcome in the outbox."""
    with registry.sessions() as session:
        rows = session.scalars(select(Notification).where(Notification.kind == "retrain_outcome"))
        return {row.dedup_key: row.status for row in rows}


@pytest.mark.slow
def test_stop_announces_a_finished_run_and_leaves_a_running_one_to_the_leader(
    make_loop, registry, champion, receiver
) -> None:
    loop = make_loop(webhook_url=receiver.url)
    first = loop.launch_retrain(trigger="manual", reason="waited for")
    assert first.wait(120) in ("promoted", "rejected", "failed")
    loop.stop()  # the `driftloop retrain` CLI: its run has ended, so stop() lets the announcer finish
    assert outcomes(registry) == {f"retrain:{first.run_id}": "delivered"}
    assert receiver.kinds() == ["retrain_outcome"]

    loop = make_loop(webhook_url=receiver.url)
    second = loop.launch_retrain(trigger="manual", reason="not waited for")
    loop.stop()  # `--no-wait`, or a restart mid-run: the announcer gives up rather than hold the exit
    assert second.poll() is None, "the run should outlive stop(); make it slower if it does not"
    assert not [w for w in loop._watchers if w.is_alive()]
    wait_until(lambda: finished(registry, second.run_id), timeout=120, what="the second run")
    assert f"retrain:{second.run_id}" not in outcomes(registry)

    leader = make_loop(webhook_url=receiver.url)
    # The sweep leaves a run that just ended to its launcher for a lease TTL; this one's launcher is gone.
    leader.clock = lambda: utcnow() + timedelta(seconds=leader.settings.lease_ttl_s)
    assert leader.renew_lease() is True  # the leader's sweep announces what nobody did, once
    leader.deliver()  # the scheduler's delivery job
    assert outcomes(registry) == {
        f"retrain:{first.run_id}": "delivered",
        f"retrain:{second.run_id}": "delivered",
    }
    text = receiver.bodies[-1]["text"]
    assert f"retrain run #{second.run_id} (trigger: manual)" in text and "not waited for" in text
    assert leader.renew_lease() is True
    leader.deliver()
    assert receiver.kinds() == ["retrain_outcome", "retrain_outcome"]


class EndsAsStopBegins:
    """A run handle whose run ends between the announcer's poll and its look at the stop flag: the
    interleaving of a run finishing just before `stop()` is called, made certain."""

    def __init__(self, run_id: int, loop: Loop) -> None:
        self.run_id, self.loop, self.ended = run_id, loop, False

    def poll(self) -> str | None:
        if self.ended:
            return "rejected"
        self.ended = True  # the run ends, then stop() begins, before the announcer looks at the flag
        self.loop._stopping.set()
        return None

    def wait(self, timeout: float | None = None) -> str:
        return "rejected" if self.ended else "running"


def add_run(
    registry: Registry,
    status: str,
    *,
    started: timedelta,
    finished: timedelta | None,
    trigger: str = "manual",
    now: datetime | None = None,
) -> int:
    """A retrain run row against v1, begun `started` and ended `finished` before `now` (None: running); its
    id. A promoted or rejected run has candidate v2."""
    now = now or utcnow()
    with registry.sessions.begin() as session:
        run = RetrainRun(
            trigger=trigger, status=status, metrics={}, steps={}, champion_version=1,
            candidate_version=2 if status in ("promoted", "rejected") else None,
            started_at=now - started, finished_at=None if finished is None else now - finished,
        )  # fmt: skip
        session.add(run)
        session.flush()
        return run.id


def test_a_run_that_ends_just_before_stop_is_announced(make_loop, registry, champion, receiver) -> None:
    run_id = add_run(registry, "rejected", started=timedelta(minutes=5), finished=timedelta(0))
    loop = make_loop(webhook_url=receiver.url)
    loop._announce(EndsAsStopBegins(run_id, loop))  # type: ignore[arg-type]
    assert outcomes(registry) == {f"retrain:{run_id}": "delivered"}
    assert receiver.kinds() == ["retrain_outcome"]


def test_the_leader_announces_recent_runs_nobody_announced_and_only_those(
    make_loop, registry, champion, receiver
) -> None:
    now = utcnow()
    drift_run = partial(add_run, registry, trigger="drift", now=now)
    recent = drift_run("rejected", started=timedelta(hours=2), finished=timedelta(hours=1))
    announced = drift_run("promoted", started=timedelta(hours=3), finished=timedelta(hours=2))
    with registry.sessions.begin() as session:
        enqueue_retrain_outcome(session, announced, now=now)
    old = drift_run("failed", started=timedelta(days=3), finished=timedelta(days=2))
    dead = drift_run("running", started=timedelta(minutes=10), finished=None)  # its process died

    loop = make_loop(webhook_url=receiver.url)
    assert loop.renew_lease() is True
    loop.deliver()
    assert set(outcomes(registry)) == {f"retrain:{i}" for i in (recent, announced, dead)}
    texts = {body["payload"]["run_id"]: body["text"] for body in receiver.bodies}
    assert set(texts) == {recent, announced, dead}  # the pending one goes out too
    assert f"retrain run #{recent} (trigger: drift): candidate v2 rejected" in texts[recent]
    assert ": failed; v1 stays champion" in texts[dead] and "no heartbeat" in texts[dead]
    assert f"retrain:{old}" not in outcomes(registry)
    alive = start_run(registry.sessions, trigger="manual", now=utcnow())  # running, its process beating
    assert loop.renew_lease() is True
    loop.deliver()
    assert len(receiver.bodies) == 3  # each announced once; the live run is not yet news
    assert f"retrain:{alive}" not in outcomes(registry)


@pytest.mark.slow
def test_a_run_a_cli_waited_for_is_the_leader_s_to_announce_and_count(
    make_loop, registry, champion, spec, metrics, db_url, tmp_path
) -> None:
    """Seen live: `driftloop retrain` counted its failed run in its own process's metrics, which nobody
    scrapes, so RetrainFailed never fired. While a leader holds the lease, the command leaves the run to it;
    with none, it announces the run itself (else nobody would)."""
    settings = make_settings(db_url, tmp_path)
    cli_metrics = build_metrics(CollectorRegistry())
    cli = Loop(
        settings=settings, spec=spec, sessions=registry.sessions, registry=registry, metrics=cli_metrics,
        unscraped=True,
    )  # fmt: skip
    try:
        alone = cli.launch_retrain(trigger="manual", reason="no worker running")
        alone_status = alone.wait(120)
        assert alone_status in ("promoted", "rejected")
        own = metrics_value(cli_metrics)
        counted = partial(own, "driftloop_retrain_runs_total", trigger="manual", status=alone_status)
        wait_until(lambda: counted() == 1, timeout=30, what="the run announced and counted by the command")
        assert f"retrain:{alone.run_id}" in outcomes(registry)

        leader = make_loop(lease_ttl_s=600)  # not renewed here: held through the run however slow
        assert leader.renew_lease() is True
        waited = cli.launch_retrain(trigger="manual", reason="a worker leads")
        status = waited.wait(120)
        assert status in ("promoted", "rejected")
    finally:
        cli.stop()
    assert f"retrain:{waited.run_id}" not in outcomes(registry)  # not the command's to announce
    assert own("driftloop_retrain_runs_total", trigger="manual", status=status) == (
        1 if status == alone_status else None
    )
    leader.clock = lambda: utcnow() + timedelta(seconds=leader.settings.lease_ttl_s)  # past the grace
    assert leader.renew_lease() is True
    assert f"retrain:{waited.run_id}" in outcomes(registry)
    scraped = metrics_value(metrics)
    assert scraped("driftloop_retrain_runs_total", trigger="manual", status=status) == 1


def test_the_leader_counts_the_runs_it_announces_for_a_launcher_that_is_gone(
    make_loop, registry, champion, metrics
) -> None:
    """Seen live on PostgreSQL: a replica SIGKILLed with its retrain child left run 9 `running`; the worker
    marked it failed and announced it, but no process counted it in driftloop_retrain_runs_total, so the
    RetrainFailed alert (which reads that counter) never fired. The same for a run whose child finished it
    after its launcher exited: announced by the leader, counted by nobody."""
    now = utcnow()
    dead = add_run(registry, "running", started=timedelta(minutes=10), finished=None, now=now)
    orphan = add_run(
        registry, "promoted", started=timedelta(minutes=5), finished=timedelta(minutes=2), trigger="drift",
        now=now,
    )  # fmt: skip
    loop = make_loop()
    assert loop.renew_lease() is True
    assert set(outcomes(registry)) == {f"retrain:{dead}", f"retrain:{orphan}"}
    sample = metrics_value(metrics)
    assert sample("driftloop_retrain_runs_total", trigger="manual", status="failed") == 1
    assert sample("driftloop_retrain_runs_total", trigger="drift", status="promoted") == 1
    assert loop.renew_lease() is True  # each is announced, and counted, once
    assert sample("driftloop_retrain_runs_total", trigger="manual", status="failed") == 1
    assert sample("driftloop_retrain_runs_total", trigger="drift", status="promoted") == 1


@pytest.mark.slow
def test_a_run_the_leader_fails_while_its_launcher_lives_is_counted_once(
    make_loop, registry, champion, metrics
) -> None:
    """A database outage longer than three lease TTLs: the child trains on, but no heartbeat lands, so the
    leader, back, fails the run and counts it. The launcher (this same process, as in `driftloop serve`)
    counted it again when its child exited: 2 failures in driftloop_retrain_runs_total for one run."""
    loop = make_loop(train_iterations=1_000_000, retrain_timeout_s=120)
    handle = loop.launch_retrain(trigger="drift", reason="outage")
    wait_until(lambda: "train" in run_row(registry, handle.run_id).steps, timeout=60, what="training")
    later = utcnow() + timedelta(seconds=4 * loop.settings.lease_ttl_s)
    loop.clock = lambda: later  # the leader's first renewal once the outage is over
    assert loop.renew_lease() is True
    assert run_row(registry, handle.run_id).status == "failed"
    os.kill(handle.pid, signal.SIGKILL)  # the child's end, however it comes
    assert handle.wait(60) == "failed"
    loop.stop()  # its announcer has finished
    assert set(outcomes(registry)) == {f"retrain:{handle.run_id}"}
    sample = metrics_value(metrics)
    assert sample("driftloop_retrain_runs_total", trigger="drift", status="failed") == 1


def test_the_leader_leaves_a_run_that_just_ended_to_its_launcher(make_loop, registry, champion) -> None:
    """A replica's run ends: between its row's finish and the replica's announcement lie the child's exit
    and the announcer's poll. A leader renewing its lease then must not announce it in its stead."""
    run_id = add_run(registry, "rejected", started=timedelta(minutes=1), finished=timedelta(0))
    leader = make_loop()
    assert leader.renew_lease() is True
    assert outcomes(registry) == {}  # the launcher, alive, announces it
    # Its launcher exited instead: a lease TTL after the run ended, the leader announces it.
    leader.clock = lambda: utcnow() + timedelta(seconds=leader.settings.lease_ttl_s)
    assert leader.renew_lease() is True
    assert set(outcomes(registry)) == {f"retrain:{run_id}"}


@pytest.mark.slow
def test_two_simultaneous_manual_triggers_start_one_run(champion, db_url, tmp_path) -> None:
    server = start_server(make_settings(db_url, tmp_path, scheduler=False), tmp_path)
    try:
        answers: list[httpx.Response] = []
        barrier = threading.Barrier(2)

        def trigger() -> None:
            barrier.wait()
            answers.append(server.post("/retrain", headers=ADMIN))

        threads = [threading.Thread(target=trigger) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(a.status_code for a in answers) == [202, 409]
        conflict = next(a for a in answers if a.status_code == 409)
        assert "already running" in conflict.json()["message"]
        run_id = next(a for a in answers if a.status_code == 202).json()["run_id"]
        wait_until(
            lambda: server.get(f"/retrain/runs/{run_id}").json()["status"] != "running",
            timeout=120, what="the manual run to finish",
        )  # fmt: skip
        assert len(server.get("/retrain/runs").json()) == 1
    finally:
        assert server.terminate()


@pytest.mark.slow
def test_drift_is_detected_retrained_and_swapped_under_load_without_a_failed_request(
    champion, db_url, tmp_path, spec, receiver
) -> None:
    settings = make_settings(
        db_url, tmp_path, monitor_interval_s=1, min_window_rows=300, window_rows=800, min_labelled_rows=100,
        consecutive_breaches=1, champion_poll_s=0.2, webhook_url=receiver.url,
    )  # fmt: skip
    server = start_server(settings, tmp_path)
    burst = LoadResult()
    background = json_payloads(traffic("none", 300, seed=9)[spec.feature_names].to_dict("records"))
    load = threading.Thread(
        target=run_load, args=(server.url + "/predict", background),
        kwargs={"total": 1_000_000, "concurrency": 4, "max_seconds": 240, "keep_bodies": True,
                "result": burst},
        daemon=True,
    )  # fmt: skip
    try:
        load.start()
        drifted = traffic("rate_shock", 3000, seed=10)
        sent = 0
        with httpx.Client(base_url=server.url, timeout=60) as client:
            while served_version(burst) != 2:
                assert sent < len(drifted), "the loop did not swap in a new champion"
                chunk = drifted.iloc[sent : sent + 100]
                sent += len(chunk)
                body = client.post(
                    "/predict/batch", json={"instances": chunk[spec.feature_names].to_dict("records")}
                ).json()
                labels = [
                    {"prediction_id": p["prediction_id"], "actual": float(a)}
                    for p, a in zip(body["predictions"], chunk[spec.target], strict=True)
                ]
                assert client.post("/feedback", json=labels).json()["accepted"] == len(labels)
                if sent >= 1200:
                    wait_until(lambda: served_version(burst) == 2, timeout=120, what="v2 to be served")
        seen = burst.ok
        wait_until(lambda: burst.ok >= seen + 200, timeout=30, what="traffic on v2")
        v2 = server.get("/models/2").json()
        assert (v2["status"], v2["lineage"]["replaced_version"]) == ("champion", 1)
        # Prices fell: an accuracy breach, unless a small early window also crossed a drift threshold first.
        assert v2["lineage"]["trigger"] in ("accuracy", "drift")
        assert v2["lineage"]["report"]["breach"] is True
    finally:
        burst.stop()
        load.join(timeout=60)
        assert server.terminate()
    assert burst.errors == [] and burst.failed == 0
    assert "drift_breach" in receiver.kinds()


def served_version(result: LoadResult) -> int | None:
    return json.loads(result.bodies[-1])["model_version"] if result.bodies else None


def run_row(registry: Registry, run_id: int) -> RetrainRun:
    with registry.sessions() as session:
        return session.get_one(RetrainRun, run_id)


def finished(registry: Registry, run_id: int) -> RetrainRun | None:
    with registry.sessions() as session:
        run = session.get(RetrainRun, run_id)
    return run if run is not None and run.status != "running" else None


def metrics_value(metrics):  # type: ignore[no-untyped-def]
    """Read one sample of the loop's metrics by name and labels."""

    def sample(name: str, **labels: str) -> float | None:
        for family in _collect(metrics):
            for s in family.samples:
                if s.name == name and s.labels == labels:
                    return s.value
        return None

    return sample


def _collect(metrics):  # type: ignore[no-untyped-def]
    for field in metrics.__dataclass_fields__:
        yield from getattr(metrics, field).collect()


def test_a_scheduled_retrain_runs_on_the_leader_only_and_is_gated(
    make_loop, registry, champion, spec, receiver
) -> None:
    log_traffic(registry, champion, spec, traffic("rate_shock", 1200, seed=12))
    loop = make_loop(scheduled_retrain_s=3600, webhook_url=receiver.url)
    assert loop.scheduled_retrain() is None  # not the leader: a standby never retrains
    assert runs(registry) == []
    assert loop.renew_lease() is True
    run_id = loop.scheduled_retrain()
    assert run_id is not None
    wait_until(lambda: "retrain_outcome" in receiver.kinds(), timeout=120, what="the scheduled run's outcome")
    (run,) = runs(registry)
    assert (run.id, run.trigger, run.reason) == (run_id, "schedule", "scheduled retrain (every 3600 s)")
    assert run.status in ("promoted", "rejected") and "validate" in run.steps  # through the gate like any run
    loop.stop()


def test_a_scheduled_retrain_is_due_by_the_last_scheduled_run_not_by_the_leaders_start(
    make_loop, registry, champion
) -> None:
    """A standby that takes over (or a restarted worker) keeps the cadence the database records: two
    scheduled runs seconds apart at a hand-over, or none at all under restarts, were what a process-local
    interval gave."""
    first = make_loop(scheduled_retrain_s=3600)
    started = utcnow()
    first.clock = lambda: started  # the run's start
    assert first.renew_lease() is True
    first_run = first.scheduled_retrain()
    assert first_run is not None
    wait_until(lambda: runs(registry)[0].status != "running", timeout=120, what="the scheduled run to end")
    first.stop()  # releases the lease, as a SIGTERMed worker does

    successor = make_loop(scheduled_retrain_s=3600)
    assert successor.renew_lease() is True
    assert successor.scheduled_retrain() is None  # the first leader's run started moments ago
    assert [run.id for run in runs(registry)] == [first_run]

    successor.clock = lambda: started + timedelta(seconds=3600 - 1)  # never early
    assert successor.scheduled_retrain() is None
    successor.clock = lambda: started + timedelta(seconds=3600)
    second_run = successor.scheduled_retrain()
    assert second_run is not None
    wait_until(lambda: runs(registry)[-1].status != "running", timeout=120, what="the second run to end")
    assert [(run.id, run.trigger) for run in runs(registry)] == [
        (first_run, "schedule"),
        (second_run, "schedule"),
    ]


@pytest.mark.parametrize(("period", "check"), [(5, 1.0), (30, 3.0), (89, 8.9), (600, 60.0), (86_400, 60.0)])
def test_a_scheduled_retrain_is_looked_for_often_enough_to_come_at_most_a_tenth_late(
    period: int, check: float
) -> None:
    """Checked every min(period, 60 s) and due half a check early, periods of 61-89 s ran every 60 s and of
    90-119 s every 120 s."""
    assert schedule_check_s(period) == check


def test_without_a_champion_no_retrain_run_is_started(make_loop, registry, caplog) -> None:
    loop = make_loop(scheduled_retrain_s=3600)
    with pytest.raises(NoChampion) as refused:
        loop.launch_retrain(trigger="manual", reason="by hand")
    assert (
        str(refused.value)
        == "no champion to retrain against: run `driftloop bootstrap` (or promote a version)"
    )
    assert loop.renew_lease() is True
    assert loop.scheduled_retrain() is None
    assert loop.scheduled_retrain() is None  # the next minute's check: not said again
    assert caplog.text.count("scheduled retrain skipped: no champion to retrain against") == 1
    assert runs(registry) == []
