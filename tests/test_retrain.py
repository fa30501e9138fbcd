"""Dataset assembly, the validation gate and whole retrain runs in-process, on both databases."""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import numpy as np
import pandas as pd
import pytest
from catboost import CatBoostRegressor
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.db import utcnow
from core.generator import generate_transactions
from core.registry import Registry
from core.schema import (
    DriftReport,
    GroundTruth,
    LabelledRow,
    ModelStatus,
    ModelVersion,
    PredictionLog,
    RetrainRun,
)
from core.settings import Settings
from core.spec import Feature, FeatureSpec, FeatureType, load_spec
from retrain.dataset import EVENT_TIME, SOURCE, TrainingData, assemble, holdout
from retrain.gate import evaluate_gate, sanity_reasons
from retrain.runner import execute_run
from retrain.runs import start_run
from retrain.train import predict, train_model
from tests.conftest import TINY, make_settings, register_copy

NOW = datetime(2022, 7, 1, tzinfo=UTC)
STEPS = ["assemble", "train", "validate", "refit", "register", "promote"]


def log_predictions(
    sessions: sessionmaker[Session],
    frame: pd.DataFrame,
    spec: FeatureSpec,
    *,
    times: list[datetime] | None = None,
    labelled: int | None = None,
) -> list[str]:
    """Log `frame` as predictions (at `times`, default the contract dates); label the first `labelled`."""
    times = [t.to_pydatetime() for t in frame[spec.time_column]] if times is None else times
    labelled = len(frame) if labelled is None else labelled
    ids = [str(uuid4()) for _ in range(len(frame))]
    rows = frame[spec.feature_names].to_dict("records")
    targets = frame[spec.target].tolist()
    with sessions.begin() as session:
        for i, (pid, features, at) in enumerate(zip(ids, rows, times, strict=True)):
            session.add(
                PredictionLog(
                    id=pid, created_at=at, model_version=1, features=features, prediction=1.0, latency_ms=1.0
                )
            )
            if i < labelled:
                session.flush()
                session.add(GroundTruth(prediction_id=pid, actual=targets[i], received_at=at))
    return ids


def ingest(
    sessions: sessionmaker[Session], frame: pd.DataFrame, spec: FeatureSpec, *, times: list[datetime]
) -> None:
    rows = frame[spec.feature_names].to_dict("records")
    with sessions.begin() as session:
        for features, target, at in zip(rows, frame[spec.target].tolist(), times, strict=True):
            session.add(
                LabelledRow(
                    features=features, target=target, event_time=at, source="deals.csv", ingested_at=at
                )
            )


def add_report(sessions: sessionmaker[Session]) -> int:
    with sessions.begin() as session:
        report = DriftReport(
            created_at=utcnow(),
            champion_version=1,
            window_start=None,
            window_end=None,
            rows=0,
            labelled_rows=0,
            sampled_rows=0,
            features={},
            prediction_drift={},
            breach=True,
            reasons=["test"],
            decision={},
        )
        session.add(report)
        session.flush()
        return report.id


def run_row(sessions: sessionmaker[Session], run_id: int) -> RetrainRun:
    with sessions() as session:
        row = session.get(RetrainRun, run_id)
        assert row is not None
        return row


def versions(registry: Registry) -> dict[int, str]:
    return {row.version: row.status for row in registry.list()}


# --- assembly ------------------------------------------------------------------------------------------


@pytest.fixture
def mixed(sessions: sessionmaker[Session], spec: FeatureSpec, champion: ModelVersion) -> pd.DataFrame:
    """40 logged predictions 1..40 days before NOW (the 30 newest labelled), 2 labelled ones after NOW;
    25 ingested rows 1.5, 3.5, .., 49.5 days before NOW and one after NOW."""
    logged = generate_transactions(42, start="2022-01-01", end="2022-06-30", seed=3)
    times = [NOW - timedelta(days=i) for i in range(1, 41)]
    log_predictions(sessions, logged.iloc[:40], spec, times=times, labelled=30)
    log_predictions(sessions, logged.iloc[40:], spec, times=[NOW + timedelta(days=1)] * 2)
    ingested = generate_transactions(26, start="2022-01-01", end="2022-06-30", seed=4)
    ingest(
        sessions,
        ingested,
        spec,
        times=[NOW - timedelta(days=2 * i) + timedelta(hours=12) for i in range(1, 26)]
        + [NOW + timedelta(hours=1)],
    )
    return logged


def test_assemble_counts_rows_per_source_up_to_now(
    sessions: sessionmaker[Session],
    registry: Registry,
    champion: ModelVersion,
    spec: FeatureSpec,
    mixed: pd.DataFrame,
) -> None:
    data = assemble(
        sessions=sessions, registry=registry, champion=champion, spec=spec, window_days=None, now=NOW
    )

    assert data.sources == {"reference": 3000, "production_labelled": 30, "ingested": 25}
    assert list(data.frame.columns) == [*spec.feature_names, spec.target, EVENT_TIME, SOURCE]
    assert len(data) == 3055
    assert data.frame[EVENT_TIME].is_monotonic_increasing
    assert champion.train_start is not None
    assert data.start == champion.train_start  # v1's reference rows keep their own times
    assert data.end == NOW - timedelta(days=1)
    newest = data.frame.iloc[-1]
    first = mixed.iloc[0]
    assert newest[SOURCE] == "production_labelled"
    assert newest[spec.target] == first[spec.target]
    assert [newest[name] for name in spec.feature_names] == [first[name] for name in spec.feature_names]


def test_assemble_with_a_window_keeps_only_recent_rows_and_drops_an_old_reference(
    sessions: sessionmaker[Session],
    registry: Registry,
    champion: ModelVersion,
    spec: FeatureSpec,
    mixed: pd.DataFrame,
) -> None:
    data = assemble(
        sessions=sessions, registry=registry, champion=champion, spec=spec, window_days=20, now=NOW
    )

    assert data.sources == {"reference": 0, "production_labelled": 20, "ingested": 10}
    assert data.start == NOW - timedelta(days=20)
    assert data.end == NOW - timedelta(days=1)


def test_a_window_keeps_only_the_bootstrap_history_inside_it(
    sessions: sessionmaker[Session], registry: Registry, champion: ModelVersion, spec: FeatureSpec
) -> None:
    """v1 learnt 2019–2021 (a time column): a 180-day window a day after its data ends keeps the last 180
    days of that history, not all three years stamped with v1's train_end."""
    assert champion.train_end is not None
    now = champion.train_end + timedelta(days=1)
    since = now - timedelta(days=180)
    history = generate_transactions(3000, seed=1)  # what the champion fixture bootstrapped on

    data = assemble(
        sessions=sessions, registry=registry, champion=champion, spec=spec, window_days=180, now=now
    )

    assert data.sources["reference"] == int((history["contract_date"] >= since).sum())
    assert data.start is not None and data.start >= since
    everything = assemble(
        sessions=sessions, registry=registry, champion=champion, spec=spec, window_days=None, now=now
    )
    assert everything.start == champion.train_start  # the lineage's training window starts where v1's did


def test_holdout_is_every_other_row_of_the_newest_new_rows_or_the_newest_over_half(spec: FeatureSpec) -> None:
    # 100 reference rows, then 300 new rows an hour apart, production and ingested in turn.
    hours = [NOW - timedelta(hours=400 - i) for i in range(400)]
    sources = ["reference"] * 100 + ["production_labelled", "ingested"] * 150
    data = TrainingData(
        frame=pd.DataFrame({EVENT_TIME: hours, SOURCE: sources}), sources={}, start=None, end=None
    )

    train, held, basis = holdout(data, spec, fraction=0.2)

    assert basis == "new"  # no champion data end given
    assert held.index.tolist() == list(range(280, 400))[1::2]  # 0.2 × 300: the newest held out, the one
    assert set(range(280, 400)[0::2]) <= set(
        train.index
    )  # before trains: the candidate learns the recent past
    assert len(train) == 400 - 60
    assert set(held[SOURCE]) == {"ingested"} and held[EVENT_TIME].min() > hours[279]
    # Over half of the rows: no room to interleave, so the newest rows.
    train, held, _ = holdout(data, spec, fraction=0.6)
    assert held.index.tolist() == list(range(220, 400))  # 0.6 × 300
    assert len(train) == 400 - 180


def test_a_holdout_of_a_dozen_new_rows_is_not_a_gate(
    sessions: sessionmaker[Session],
    registry: Registry,
    champion: ModelVersion,
    spec: FeatureSpec,
    mixed: pd.DataFrame,
) -> None:
    """55 new labelled rows would hold out 11: a 2 % margin on 11 rows is a coin toss (a review promoted a
    candidate on 12 so). The pool is every row then, reference included, which the champion trained on:
    a stricter gate, as with fewer new rows still."""
    data = assemble(
        sessions=sessions, registry=registry, champion=champion, spec=spec, window_days=None, now=NOW
    )
    assert sum(data.frame[SOURCE] != "reference") == 55

    train, held, basis = holdout(data, spec, fraction=0.2)

    assert basis == "all"
    assert len(held) == 611  # ceil(0.2 × 3,055), every other row of the newest 1,222
    assert len(train) == 3055 - 611


def test_holdout_comes_from_rows_the_champion_never_trained_on_when_there_are_enough(
    spec: FeatureSpec,
) -> None:
    # 100 reference rows, then 2,000 new rows an hour apart; the champion trained on data up to row 1,849.
    hours = [NOW - timedelta(hours=2100 - i) for i in range(2100)]
    frame = pd.DataFrame({EVENT_TIME: hours, SOURCE: ["reference"] * 100 + ["production_labelled"] * 2000})
    data = TrainingData(frame=frame, sources={}, start=hours[0], end=hours[-1])
    seen_until = hours[1849]

    train, held, basis = holdout(data, spec, fraction=0.2, seen_until=seen_until)

    # 0.2 × 250 unseen rows, every other one of the newest 100. Counted over all 2,000 new rows the
    # holdout would be 400 rows from the newest 800, most of them rows the champion trained on.
    assert basis == "unseen"
    assert held.index.tolist() == list(range(2000, 2100))[1::2]
    assert held[EVENT_TIME].min() > seen_until
    assert len(train) == 2050
    # 245 unseen rows would give 49 holdout rows, under MIN_HOLDOUT_ROWS (50): too few to judge on,
    # so the pool is every new row.
    train, held, basis = holdout(data, spec, fraction=0.2, seen_until=hours[1854])
    assert basis == "new"
    assert held.index.tolist() == list(range(1300, 2100))[1::2]


def test_holdout_falls_back_to_the_most_recent_rows_overall_when_few_are_new(
    sessions: sessionmaker[Session], registry: Registry, champion: ModelVersion, spec: FeatureSpec
) -> None:
    log_predictions(sessions, generate_transactions(5, start="2022-01-01", end="2022-06-30", seed=3), spec)
    data = assemble(
        sessions=sessions, registry=registry, champion=champion, spec=spec, window_days=None, now=NOW
    )
    train, held, basis = holdout(data, spec, fraction=0.2, seen_until=champion.train_end)

    assert basis == "all"
    assert data.sources == {"reference": 3000, "production_labelled": 5, "ingested": 0}
    assert len(held) == 601  # ceil(0.2 × 3005), every other row of the newest 1,202
    assert held[SOURCE].value_counts().to_dict() == {"reference": 598, "production_labelled": 3}
    assert len(train) == 2404


# --- the gate ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def old_model() -> CatBoostRegressor:
    """A tiny champion-like model on 2019–2021 data; the gate needs no database."""
    spec = load_spec()
    return train_model(generate_transactions(2400, seed=1), spec, TINY)


def test_gate_rejects_a_candidate_no_better_than_the_champion(
    old_model: CatBoostRegressor, spec: FeatureSpec
) -> None:
    model = old_model
    held = generate_transactions(400, start="2022-01-01", end="2022-06-30", seed=9)

    result = evaluate_gate(candidate=model, champion=model, holdout=held, spec=spec, margin=0.02)

    mae = result.champion_metrics["mae"]
    assert result.candidate_metrics == result.champion_metrics
    assert not result.passed
    assert result.reasons == [
        f"mae: candidate MAE {mae:.6g} is not <= champion MAE {mae:.6g} × (1 − 0.02) = {mae * 0.98:.6g} "
        "on 400 holdout rows"
    ]
    assert result.checks == {"mae": False, "finite": True, "spread": True, "target_min": True}


def test_gate_refuses_an_empty_holdout(old_model: CatBoostRegressor, spec: FeatureSpec) -> None:
    empty = generate_transactions(10, seed=9).iloc[:0]
    result = evaluate_gate(candidate=old_model, champion=old_model, holdout=empty, spec=spec, margin=0.0)
    assert (result.passed, result.reasons, result.checks) == (
        False,
        ["holdout: no rows to validate on"],
        {"holdout": False},
    )


def test_gate_refuses_a_more_accurate_candidate_that_fails_a_sanity_check(
    old_model: CatBoostRegressor, spec: FeatureSpec
) -> None:
    """The MAE is one check of several: a candidate that wins on it but dips under target_min more often than
    the champion (which never does) and the holdout's actuals (all well above it) allow is refused."""
    held = generate_transactions(400, start="2022-01-01", end="2022-06-30", seed=9)
    bound = float(np.quantile(predict(old_model, held, spec, raw=True), 0.1))
    counts = dataclasses.replace(spec, target_min=bound)
    held = held.assign(**{spec.target: np.maximum(held[spec.target], bound + held[spec.target].std())})
    data = generate_transactions(1000, seed=2)
    tripled = train_model(data.assign(**{spec.target: data[spec.target] * 3}), spec, TINY)

    result = evaluate_gate(candidate=old_model, champion=tripled, holdout=held, spec=counts, margin=0.02)

    assert result.checks["mae"] is True
    assert result.checks["target_min"] is False
    assert [reason.split(":")[0] for reason in result.reasons] == ["target_min"]
    assert not result.passed


def test_gate_passes_a_clearly_better_candidate(old_model: CatBoostRegressor, spec: FeatureSpec) -> None:
    shocked = generate_transactions(
        2000, start="2022-01-01", end="2022-12-31", scenario="rate_shock", change_at="2022-01-01", seed=6
    )
    recent = shocked[shocked["contract_date"] >= "2022-04-01"]
    train, held = recent.iloc[:-300], recent.iloc[-300:]

    result = evaluate_gate(
        candidate=train_model(train, spec, TINY),
        champion=old_model,
        holdout=held,
        spec=spec,
        margin=0.02,
    )

    assert result.reasons == []
    assert result.passed
    assert result.candidate_metrics["mae"] <= 0.98 * result.champion_metrics["mae"]


def test_gate_rejects_negative_predictions_for_a_non_negative_target(
    old_model: CatBoostRegressor, spec: FeatureSpec
) -> None:
    data = generate_transactions(1000, seed=2)
    shifted = data.assign(**{spec.target: data[spec.target] - 1_000_000})
    broken = train_model(shifted, spec, TINY)
    held = data.iloc[-200:]

    result = evaluate_gate(candidate=broken, champion=old_model, holdout=held, spec=spec, margin=0.0)

    below = int((predict(broken, held, spec, raw=True) < 0).sum())
    assert below == 200
    assert not result.passed
    assert result.checks["target_min"] is False
    assert "target_min: 200 of 200 candidate predictions are below 0" in result.reasons  # prices: no slack


def test_sanity_checks_name_each_failure_with_figures(spec: FeatureSpec) -> None:
    actual = np.array([1.0, 2.0, 3.0, 4.0])  # std 1.118034
    assert sanity_reasons(np.array([1.0, 2.0, 3.0, 4.0]), actual, spec) == {
        "finite": None,
        "spread": None,
        "target_min": None,
    }
    assert sanity_reasons(np.array([1.0, np.nan, 3.0, np.inf]), actual, spec)["finite"] == (
        "finite: 2 of 4 candidate predictions are not finite"
    )
    assert sanity_reasons(np.full(4, 2.5), actual, spec)["spread"] == (
        "spread: candidate predictions are constant (std 0)"
    )
    assert sanity_reasons(np.array([2.4, 2.5, 2.5, 2.6]), actual, spec)["spread"] == (
        "spread: candidate prediction std 0.0707107 is outside [0.2, 5] × actual std 1.11803 "
        "= [0.223607, 5.59017]"
    )
    # Features that explain little of the target: a champion as narrow makes that spread the data's.
    narrow = np.array([2.4, 2.5, 2.5, 2.6])
    assert sanity_reasons(narrow, actual, spec, champion=np.array([2.45, 2.5, 2.5, 2.55]))["spread"] is None
    assert sanity_reasons(narrow, actual, spec, champion=np.array([1.0, 2.0, 3.0, 4.0]))["spread"] == (
        "spread: candidate prediction std 0.0707107 is outside [0.2, 5] × actual std 1.11803 "
        "= [0.223607, 5.59017], and beyond the champion's prediction std 1.11803"
    )
    assert sanity_reasons(np.full(4, 2.5), actual, spec, champion=np.full(4, 2.5))["spread"] == (
        "spread: candidate predictions are constant (std 0)"
    )
    # Every actual is far above the bound: any prediction under it is impossible.
    assert sanity_reasons(np.array([-0.05, 2.0, 3.0, 4.0]), actual, spec)["target_min"] == (
        "target_min: 1 of 4 candidate predictions are below 0"
    )
    # An actual at the bound: a dip under it within 5 % of the actuals' std is an estimate near it.
    at_bound = np.array([0.0, 1.0, 2.0, 3.0])  # std 1.118034
    assert sanity_reasons(np.array([-0.05, 1.0, 2.0, 3.0]), at_bound, spec)["target_min"] is None
    # One dip beyond it per actual at the bound is an estimate of that row; more is not.
    assert sanity_reasons(np.array([-1.0, 1.0, 2.0, 3.0]), at_bound, spec)["target_min"] is None
    assert sanity_reasons(np.array([-1.0, -1.0, 2.0, 3.0]), at_bound, spec)["target_min"] == (
        "target_min: 2 of 4 candidate predictions are below 0 by more than 0.0559017 (5% of the actual std), "
        "more than the 1 holdout actual(s) within that of it"
    )
    # A count model's champion dips under the bound as well (quiet nights): the candidate may do so as
    # often, not more often.
    dips = np.array([-1.0, -2.0, 2.0, 3.0])
    assert (
        sanity_reasons(np.array([-1.0, 1.0, 2.0, 3.0]), at_bound, spec, champion=dips)["target_min"] is None
    )
    assert sanity_reasons(dips, at_bound, spec, champion=dips)["target_min"] is None
    assert sanity_reasons(np.array([-1.0, -1.0, -2.0, 3.0]), at_bound, spec, champion=dips)["target_min"] == (
        "target_min: 3 of 4 candidate predictions are below 0 by more than 0.0559017 (5% of the actual std), "
        "more than the champion's 2 and the 1 holdout actual(s) within that of it"
    )


def test_sanity_check_boundaries(spec: FeatureSpec) -> None:
    actual = np.array([1.0, 2.0, 3.0, 4.0])  # std 1.118034
    # A prediction at the bound is not under it.
    assert sanity_reasons(np.array([0.0, 2.0, 3.0, 4.0]), actual, spec)["target_min"] is None
    # The lowest actual exactly one slack (5 % of the std: 1) above the bound still earns the slack.
    assert sanity_reasons(np.array([-0.5, 41.0]), np.array([1.0, 41.0]), spec)["target_min"] is None
    # Constant actuals give the spread no yardstick: any spread passes.
    assert sanity_reasons(actual, np.full(4, 2.0), spec)["spread"] is None
    # A champion wider than 5 × the actual std widens the range as a narrower one lowers it.
    assert sanity_reasons(actual * 10, actual, spec, champion=actual * 10)["spread"] is None
    assert sanity_reasons(actual * 10, actual, spec)["spread"] is not None


def test_a_candidate_may_dip_under_target_min_as_often_as_actuals_sit_at_it(spec: FeatureSpec) -> None:
    """A rate in [0, 1] that fell after a change: the stale champion predicts the old level and hardly ever
    dips under 0, while the candidate that learnt the new level undershoots a few of the rows now at 0.
    Measured live: a candidate with holdout MAE 0.091 against the champion's 0.169 was refused for 7 of
    2,800 predictions under 0 (the champion: 2), with 13 holdout actuals at 0, and the loop stalled."""
    rng = np.random.default_rng(3)
    actual = rng.uniform(0.15, 0.95, 2800)
    actual[:13] = 0.0
    champion = np.clip(actual + 0.17, 0.0, 1.0)  # the old level
    champion[13:15] = -0.05
    candidate = actual + rng.uniform(-0.05, 0.05, 2800)
    candidate[:7] = -0.03  # beyond the slack (5 % of a std of about 0.24)
    candidate[7:13] = 0.02

    assert sanity_reasons(candidate, actual, spec, champion=champion)["target_min"] is None
    candidate[20:30] = -0.2  # dips where no actual is at the bound: more than the rows at it
    assert sanity_reasons(candidate, actual, spec, champion=champion)["target_min"] == (
        "target_min: 17 of 2800 candidate predictions are below 0 by more than 0.0118211 (5% of the actual "
        "std), more than the champion's 2 and the 13 holdout actual(s) within that of it"
    )


def test_gate_holds_a_candidate_to_the_champion_s_dips_under_target_min(
    old_model: CatBoostRegressor, spec: FeatureSpec
) -> None:
    """Where the champion itself predicts under target_min on the holdout, a candidate that does so no more
    often passes on its MAE; before, every candidate for a count target was refused and the loop stalled."""
    held = generate_transactions(400, start="2022-01-01", end="2022-06-30", seed=9)
    predicted = predict(old_model, held, spec)
    bound = float(np.quantile(predicted, 0.1))  # the champion predicts under it for 40 rows
    counts = dataclasses.replace(spec, target_min=bound)
    held = held.assign(**{spec.target: np.maximum(held[spec.target], bound)})  # the actuals respect it

    same = evaluate_gate(candidate=old_model, champion=old_model, holdout=held, spec=counts, margin=0.0)
    assert same.checks["target_min"] is True and same.passed
    # Every actual well above the bound (no slack, none at it): the champion's dips are the one yardstick.
    clear = held.assign(**{spec.target: held[spec.target] + held[spec.target].std()})
    same = evaluate_gate(candidate=old_model, champion=old_model, holdout=clear, spec=counts, margin=0.0)
    assert same.checks["target_min"] is True and same.passed


# --- whole runs, in-process ----------------------------------------------------------------------------


@pytest.fixture
def shocked(sessions: sessionmaker[Session], spec: FeatureSpec, champion: ModelVersion) -> pd.DataFrame:
    """1,500 logged and labelled 2022 predictions of a market 20 % down: a retrain has much to gain."""
    frame = generate_transactions(
        1500, start="2022-01-01", end="2022-12-31", scenario="rate_shock", change_at="2022-01-01", seed=5
    )
    log_predictions(sessions, frame, spec)
    return frame


def test_the_next_run_holds_out_only_rows_its_refit_champion_never_trained_on(
    db_url: str,
    tmp_path: Path,
    sessions: sessionmaker[Session],
    registry: Registry,
    champion: ModelVersion,
    spec: FeatureSpec,
    shocked: pd.DataFrame,
) -> None:
    settings = make_settings(db_url, tmp_path)
    first_at, second_at = datetime(2023, 1, 1, tzinfo=UTC), datetime(2023, 4, 1, tzinfo=UTC)
    first = start_run(sessions, trigger="manual", reason="first", now=first_at)
    assert execute_run(
        first, settings=settings, spec=spec, registry=registry, clock=lambda: first_at
    ).status == ("promoted")
    v2 = registry.champion()
    assert v2 is not None and v2.version == 2 and v2.train_rows == 4500  # refit on all 1,500 new rows
    later = generate_transactions(
        400, start="2023-01-02", end="2023-03-31", scenario="rate_shock", change_at="2022-01-01", seed=6
    )
    log_predictions(sessions, later, spec)

    second = start_run(sessions, trigger="manual", reason="second", now=second_at)
    execute_run(second, settings=settings, spec=spec, registry=registry, clock=lambda: second_at)

    v3 = registry.get(3)
    assert v3 is not None
    # ceil(0.2 × 400 rows dated after v2's training data); over all 1,900 new rows it would be 380, half
    # of them rows v2 trained on.
    assert (v3.data_sources["holdout_basis"], v3.data_sources["holdout_rows"]) == ("unseen", 80)
    assert v3.metrics["val_rows"] == 80


def test_a_better_candidate_is_promoted_with_its_lineage(
    db_url: str,
    tmp_path: Path,
    sessions: sessionmaker[Session],
    registry: Registry,
    champion: ModelVersion,
    spec: FeatureSpec,
    shocked: pd.DataFrame,
) -> None:
    report_id = add_report(sessions)
    now = datetime(2023, 1, 1, tzinfo=UTC)
    run_id = start_run(sessions, trigger="drift", reason="rate shock", report_id=report_id, now=now)

    outcome = execute_run(
        run_id, settings=make_settings(db_url, tmp_path), spec=spec, registry=registry, clock=lambda: now
    )

    assert (outcome.status, outcome.candidate_version, outcome.error) == ("promoted", 2, None)
    assert versions(registry) == {1: ModelStatus.archived, 2: ModelStatus.champion}
    v2 = registry.get(2)
    assert v2 is not None
    times = shocked["contract_date"]
    assert (v2.parent_version, v2.trigger, v2.retrain_run_id, v2.report_id) == (1, "drift", run_id, report_id)
    # The gate judged a model trained on 4,200 rows; the one promoted was refit on all 4,500.
    assert (v2.train_start, v2.train_end, v2.train_rows) == (
        champion.train_start,
        times.iloc[-1].to_pydatetime(),
        4500,
    )
    assert v2.data_sources == {
        "rows": {"reference": 3000, "production_labelled": 1500, "ingested": 0},
        "reference_version": 1,
        "window_days": None,
        "start": champion.train_start.isoformat() if champion.train_start else None,
        "end": times.iloc[-1].isoformat(),
        "train_rows": 4500,
        "holdout_rows": 300,
        "holdout_basis": "unseen",
        "new_data_weight_share": 0.7,
        "half_life_days": None,
        "refit": True,
    }
    assert v2.metrics["val_rows"] == 300
    assert v2.metrics["refit"] == {"used": True, "rows": 4500}
    assert v2.metrics["baseline_mae"] == min(v2.metrics["val_mae"], champion.metrics["val_mae"])
    assert v2.metrics["val_mae"] <= 0.98 * v2.metrics["champion_val_mae"]
    assert v2.metrics["gate"]["passed"] is True
    assert set(v2.feature_importance) == set(spec.feature_names)
    reference = registry.reference(v2)
    assert list(reference.columns) == [*spec.feature_names, spec.target, "prediction", EVENT_TIME, SOURCE]
    assert reference[SOURCE].value_counts().to_dict() == {"reference": 3000, "production_labelled": 1500}
    assert len(reference) == 4500
    assert reference[EVENT_TIME].iloc[-1] == times.iloc[-1]

    # The next generation reads v2's database-born reference rows afresh from the database, never twice.
    again = assemble(sessions=sessions, registry=registry, champion=v2, spec=spec, window_days=None, now=now)
    assert again.sources == {"reference": 3000, "production_labelled": 1500, "ingested": 0}
    recent = assemble(sessions=sessions, registry=registry, champion=v2, spec=spec, window_days=180, now=now)
    in_window = int((times >= now - timedelta(days=180)).sum())
    assert recent.sources == {"reference": 0, "production_labelled": in_window, "ingested": 0}

    run = run_row(sessions, run_id)
    assert (run.status, run.champion_version, run.candidate_version, run.error) == ("promoted", 1, 2, None)
    assert run.finished_at == now
    assert run.metrics == v2.metrics
    assert list(run.steps) == STEPS
    assert all(step["started_at"] == now.isoformat() and step["seconds"] >= 0 for step in run.steps.values())


def test_without_refit_the_validated_model_is_promoted(
    db_url: str, tmp_path: Path, sessions: sessionmaker[Session], registry: Registry, shocked: pd.DataFrame
) -> None:
    spec = load_spec()
    now = datetime(2023, 1, 1, tzinfo=UTC)
    run_id = start_run(sessions, trigger="manual", now=now)
    settings = make_settings(db_url, tmp_path, refit=False)

    outcome = execute_run(run_id, settings=settings, spec=spec, registry=registry, clock=lambda: now)

    assert outcome.status == "promoted"
    v2 = registry.get(2)
    assert v2 is not None
    assert (v2.train_rows, v2.data_sources["refit"], "refit" in v2.metrics) == (4200, False, False)
    # The newest row was held out; the one before it trained.
    assert v2.train_end == shocked["contract_date"].iloc[-2].to_pydatetime()
    assert list(run_row(sessions, run_id).steps) == [s for s in STEPS if s != "refit"]


def test_a_refit_that_fails_the_sanity_checks_gives_way_to_the_validated_model(
    db_url: str,
    tmp_path: Path,
    sessions: sessionmaker[Session],
    registry: Registry,
    spec: FeatureSpec,
    shocked: pd.DataFrame,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fault injection at the trainer: the refit (the run's second training, on all 4,500 rows) learns a
    target shifted below the spec's target_min, as a corrupted label batch would make it."""
    trained: list[int] = []

    def train_on_all_but_corrupt_the_refit(frame: pd.DataFrame, *args: object, **kwargs: object) -> object:
        trained.append(len(frame))
        if len(trained) == 2:
            frame = frame.assign(**{spec.target: frame[spec.target] - 10 * frame[spec.target].max()})
        return train_model(frame, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("retrain.runner.train_model", train_on_all_but_corrupt_the_refit)
    now = datetime(2023, 1, 1, tzinfo=UTC)
    run_id = start_run(sessions, trigger="manual", now=now)

    outcome = execute_run(
        run_id, settings=make_settings(db_url, tmp_path), spec=spec, registry=registry, clock=lambda: now
    )

    assert trained == [4200, 4500]
    assert outcome.status == "promoted"
    v2 = registry.get(2)
    assert v2 is not None and v2.status == ModelStatus.champion
    # The validated model (4,200 rows) is the one registered, and the run says why.
    assert (v2.train_rows, v2.data_sources["refit"]) == (4200, False)
    assert v2.metrics["refit"]["used"] is False
    (reason,) = v2.metrics["refit"]["reasons"]
    assert reason.startswith("target_min: ") and "below 0" in reason
    assert (predict(registry.load(v2), shocked, spec, raw=True) >= 0).mean() > 0.99  # a sane model serves
    assert list(run_row(sessions, run_id).steps) == STEPS


def test_a_worse_candidate_is_rejected_and_the_champion_kept(
    db_url: str,
    tmp_path: Path,
    sessions: sessionmaker[Session],
    registry: Registry,
    champion: ModelVersion,
    spec: FeatureSpec,
) -> None:
    log_predictions(sessions, generate_transactions(600, start="2022-01-01", end="2022-06-30", seed=7), spec)
    run_id = start_run(sessions, trigger="manual", now=NOW)
    settings = make_settings(db_url, tmp_path, train_iterations=1)

    outcome = execute_run(run_id, settings=settings, spec=spec, registry=registry, clock=lambda: NOW)

    assert (outcome.status, outcome.candidate_version) == ("rejected", 2)
    assert outcome.gate is not None
    cand, champ = outcome.gate.candidate_metrics["mae"], outcome.gate.champion_metrics["mae"]
    mae_reason = (
        f"mae: candidate MAE {cand:.6g} is not <= champion MAE {champ:.6g} × (1 − 0.02) = {champ * 0.98:.6g} "
        "on 120 holdout rows"
    )
    assert outcome.gate.reasons[0] == mae_reason
    assert versions(registry) == {1: ModelStatus.champion, 2: ModelStatus.rejected}
    v2 = registry.get(2)
    assert v2 is not None
    assert v2.note == "rejected: " + "; ".join(outcome.gate.reasons)
    run = run_row(sessions, run_id)
    assert (run.status, run.candidate_version, run.error) == ("rejected", 2, None)
    assert run.metrics["gate"]["reasons"] == outcome.gate.reasons


def test_a_failing_run_is_marked_failed_and_leaves_the_champion_serving(
    db_url: str,
    tmp_path: Path,
    sessions: sessionmaker[Session],
    registry: Registry,
    champion: ModelVersion,
    spec: FeatureSpec,
) -> None:
    log_predictions(sessions, generate_transactions(200, start="2022-01-01", end="2022-06-30", seed=7), spec)
    Path(champion.artifact_path).write_bytes(b"not a model")  # the run cannot load the champion
    run_id = start_run(sessions, trigger="manual", now=NOW)

    outcome = execute_run(
        run_id, settings=make_settings(db_url, tmp_path), spec=spec, registry=registry, clock=lambda: NOW
    )

    assert outcome.status == "failed"
    assert outcome.error is not None and outcome.error.startswith("ArtifactIntegrityError: ")
    assert versions(registry) == {1: ModelStatus.champion}
    run = run_row(sessions, run_id)
    assert (run.status, run.candidate_version, run.error, run.finished_at) == (
        "failed",
        None,
        outcome.error,
        NOW,
    )
    assert run.steps == {}  # found before the data is assembled, not after a candidate was trained
    with sessions() as session:
        assert session.scalars(select(ModelVersion.version)).all() == [1]


def failed_run_error(
    settings: Settings, sessions: sessionmaker[Session], registry: Registry, spec: FeatureSpec
) -> str:
    """A manual run at NOW that must fail, leaving its error on its row and v1 the only version: the error."""
    run_id = start_run(sessions, trigger="manual", now=NOW)
    outcome = execute_run(run_id, settings=settings, spec=spec, registry=registry, clock=lambda: NOW)
    assert outcome.status == "failed"
    assert outcome.error is not None
    assert run_row(sessions, run_id).error == outcome.error
    assert versions(registry) == {1: ModelStatus.champion}
    return outcome.error


def test_a_run_left_too_little_data_by_its_window_fails_naming_the_window(
    db_url: str,
    tmp_path: Path,
    sessions: sessionmaker[Session],
    registry: Registry,
    champion: ModelVersion,
    spec: FeatureSpec,
) -> None:
    """v1's history ends in 2021 and 4 labels came since: a 30-day window leaves too little to train on,
    and the error says where the rows went rather than only '0 train rows'."""
    log_predictions(sessions, generate_transactions(4, start="2022-06-10", end="2022-06-20", seed=7), spec)

    error = failed_run_error(make_settings(db_url, tmp_path, train_window_days=30), sessions, registry, spec)

    assert error == (
        "RuntimeError: too little data: 3 train and 1 holdout rows (at least 10 train rows are needed), of 0 "
        "reference, 4 production_labelled, 0 ingested row(s) dated since 2022-06-01 00:00 UTC "
        "(DRIFTLOOP_TRAIN_WINDOW_DAYS=30)"
    )


def test_a_half_life_that_leaves_no_rows_any_weight_fails_the_run_naming_it(
    db_url: str,
    tmp_path: Path,
    sessions: sessionmaker[Session],
    registry: Registry,
    champion: ModelVersion,
    spec: FeatureSpec,
) -> None:
    """Rows a day apart under a half-life of 0.0864 s: every weight but the newest day's underflows to 0,
    which CatBoost would refuse as 'Too few sampling units (subsample=0.8, bootstrap_type=MVS)'."""
    data = generate_transactions(300, start="2022-01-01", end="2022-06-30", seed=8)
    log_predictions(sessions, data, spec)

    error = failed_run_error(
        make_settings(db_url, tmp_path, train_half_life_days=1e-6), sessions, registry, spec
    )

    weighted, said = error.removeprefix("RuntimeError: only ").split(" ", 1)
    assert 1 <= int(weighted) < 10  # the rows of the newest training day
    assert said == (
        f"of {3000 + 300 - 60} training rows carry any weight under DRIFTLOOP_TRAIN_HALF_LIFE_DAYS=1e-06 (a "
        "row's weight halves with each half-life it is older than the newest row); at least 10 are needed"
    )


def test_a_run_under_a_spec_the_champion_does_not_fit_fails_naming_the_difference(
    db_url: str,
    tmp_path: Path,
    sessions: sessionmaker[Session],
    registry: Registry,
    champion: ModelVersion,
    spec: FeatureSpec,
) -> None:
    """A feature added to the spec file: the run fails before it assembles or trains anything, as /ready
    and bootstrap do, naming the feature, rather than with pandas' KeyError from deep in the assembly."""
    log_predictions(sessions, generate_transactions(200, start="2022-01-01", end="2022-06-30", seed=7), spec)
    extra = dataclasses.replace(
        spec, features=(*spec.features, Feature(name="view", type=FeatureType.numeric, nullable=True))
    )
    run_id = start_run(sessions, trigger="manual", now=NOW)

    outcome = execute_run(
        run_id, settings=make_settings(db_url, tmp_path), spec=extra, registry=registry, clock=lambda: NOW
    )

    assert outcome.status == "failed"
    assert outcome.error is not None
    assert outcome.error.startswith(
        "FeatureMismatchError: v1 does not fit the spec (the spec lists view, which it was not trained on)"
    )
    assert run_row(sessions, run_id).steps == {}
    assert versions(registry) == {1: ModelStatus.champion}


def test_metrics_are_json_safe(
    db_url: str,
    tmp_path: Path,
    sessions: sessionmaker[Session],
    registry: Registry,
    champion: ModelVersion,
    spec: FeatureSpec,
) -> None:
    """A NaN (e.g. MAPE over all-zero actuals) is stored as null: PostgreSQL's JSON rejects NaN."""
    data = generate_transactions(300, start="2022-01-01", end="2022-06-30", seed=8)  # a holdout of 60
    log_predictions(sessions, data.assign(**{spec.target: 0.0}), spec)
    run_id = start_run(sessions, trigger="manual", now=NOW)

    outcome = execute_run(
        run_id, settings=make_settings(db_url, tmp_path), spec=spec, registry=registry, clock=lambda: NOW
    )

    assert outcome.gate is not None
    assert math.isnan(outcome.gate.candidate_metrics["mape"])
    run = run_row(sessions, run_id)
    assert run.status == outcome.status
    assert run.metrics["val_mape"] is None


def test_sample_weights_give_new_rows_their_share() -> None:
    import numpy as np
    import pandas as pd

    from retrain.dataset import REFERENCE, SOURCE, sample_weights

    train = pd.DataFrame({SOURCE: [REFERENCE] * 8 + ["production_labelled"] * 2})
    weights = sample_weights(train, new_share=0.7)
    assert weights is not None
    assert weights.mean() == pytest.approx(1.0)
    assert weights[8:].sum() / weights.sum() == pytest.approx(0.7)
    assert np.allclose(weights[:8], weights[0]) and np.allclose(weights[8:], weights[8])
    assert sample_weights(train, new_share=0.0) is None
    assert sample_weights(train, new_share=0.2) is None  # new rows already carry 20 %
    assert sample_weights(train.iloc[:8], new_share=0.7) is None  # no new rows


def test_sample_weights_halve_with_each_half_life_of_age() -> None:
    import numpy as np
    import pandas as pd

    from retrain.dataset import EVENT_TIME, REFERENCE, SOURCE, sample_weights

    days = pd.to_datetime(["2022-01-01", "2022-01-31", "2022-03-02", "2022-03-02"], utc=True)
    train = pd.DataFrame({SOURCE: [REFERENCE, "ingested", "ingested", "ingested"], EVENT_TIME: days})
    decayed = sample_weights(train, new_share=0.0, half_life_days=30)
    assert decayed is not None
    assert decayed.mean() == pytest.approx(1.0)
    assert np.allclose(decayed / decayed[-1], [0.25, 0.5, 1.0, 1.0])  # 60 and 30 days older than the newest
    both = sample_weights(train, new_share=0.9, half_life_days=30)  # the new rows' share, then the decay
    assert both is not None
    share = np.array([0.1 / 1, 0.9 / 3, 0.9 / 3, 0.9 / 3]) * [0.25, 0.5, 1.0, 1.0]
    assert np.allclose(both, share * 4 / share.sum())


def test_a_promotion_landing_just_before_the_runs_own_is_kept(
    db_url: str,
    tmp_path: Path,
    sessions: sessionmaker[Session],
    registry: Registry,
    champion: ModelVersion,
    spec: FeatureSpec,
    shocked: pd.DataFrame,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The run looked (v1 still champion) and then promoted: an operator's promote or rollback in between
    # was silently undone by the run's candidate.
    operators = register_copy(registry, champion)
    now = datetime(2023, 1, 1, tzinfo=UTC)
    run_id = start_run(sessions, trigger="manual", now=now)
    promote = registry.promote

    def operator_first(**kwargs: Any) -> ModelVersion:
        promote(version=operators.version, reason="operator, while the run was deciding")
        return promote(**kwargs)

    monkeypatch.setattr(registry, "promote", operator_first)
    outcome = execute_run(
        run_id, settings=make_settings(db_url, tmp_path), spec=spec, registry=registry, clock=lambda: now
    )

    assert (outcome.status, outcome.candidate_version) == ("rejected", 3)
    assert versions(registry) == {1: ModelStatus.archived, 2: ModelStatus.champion, 3: ModelStatus.rejected}
    assert registry.get(3).note.endswith(
        "rejected: champion changed during the run: model version 3 not promoted: it was to replace v1, "
        "but the champion is now v2"
    )


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_run_waits_out_a_database_outage_at_the_end_of_a_step(
    db_url: str,
    tmp_path: Path,
    sessions: sessionmaker[Session],
    registry: Registry,
    champion: ModelVersion,
    spec: FeatureSpec,
    shocked: pd.DataFrame,
    pg_cluster: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Seen live on PostgreSQL: a 12 s outage failed a run whose training was done, at the step's bookkeeping
    (its row's update is not retried). The database now goes away, for real, as training ends and comes back
    2 s later; the run waits for it and is decided as usual."""
    import threading

    import retrain.runner

    back: list[threading.Timer] = []

    def train_then_outage(*args: Any, **kwargs: Any) -> CatBoostRegressor:
        model = train_model(*args, **kwargs)
        if not back:  # the first training only, not the refit
            pg_cluster.stop()
            back.append(threading.Timer(2.0, pg_cluster.start))
            back[0].start()
        return model

    monkeypatch.setattr(retrain.runner, "train_model", train_then_outage)
    now = datetime(2023, 1, 1, tzinfo=UTC)
    run_id = start_run(sessions, trigger="manual", now=now)
    try:
        with caplog.at_level("WARNING", logger="driftloop.retrain"):
            outcome = execute_run(
                run_id,
                settings=make_settings(db_url, tmp_path),
                spec=spec,
                registry=registry,
                clock=lambda: now,
            )
    finally:
        back[0].join()
        pg_cluster.start()  # whatever happened, the next test has its database
    assert (outcome.status, outcome.error) == ("promoted", None)
    run = run_row(sessions, run_id)
    assert (run.status, run.error) == ("promoted", None)
    assert run.steps["train"]["seconds"] is not None
    waited = [m for m in caplog.messages if m.startswith(f"retrain run {run_id}: database unavailable (")]
    assert len(waited) == 1, caplog.messages  # once for the outage, not once a second
