"""`driftloop backtest`: a replay of labelled history through the policies, with the live loop's own code."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
import unicodedata
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from importlib import resources
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from sqlalchemy import create_engine, func, select
from typer.testing import CliRunner

from core.figures import figure
from core.generator import generate_transactions
from core.schema import DriftReport, ModelVersion, Notification, PredictionLog, RetrainRun
from core.spec import load_spec
from monitor import LOOP_LOGGER
from monitor.backtest.compare import paired_ratio, time_blocks
from monitor.backtest.replay import ReplayConfig, run_replay
from monitor.backtest.results import summarize
from monitor.backtest.stream import load_stream
from retrain import RETRAIN_LOGGER
from retrain.data import DataError, read_labelled_csv
from service.cli import cli
from tests.conftest import make_settings

# Small and fast: 12,000 generated rows (4,000 a year), two-week steps, tiny CatBoost models; the policy's
# window settings are the defaults.
SMALL = {
    "DRIFTLOOP_TRAIN_ITERATIONS": "60",
    "DRIFTLOOP_TRAIN_DEPTH": "4",
    "DRIFTLOOP_TRAIN_LEARNING_RATE": "0.2",
    "DRIFTLOOP_TRAIN_THREAD_COUNT": "2",
}
STEP_ARGS = ["--rows", "12000", "--step", "14d", "--label-delay", "14d", "--period", "90d"]


def backtest(tmp: Path, *args: str) -> Any:
    return CliRunner().invoke(cli, ["backtest", "--out", str(tmp), *args], env=SMALL, catch_exceptions=False)


def refused(out: Path, *args: str) -> str:
    """Run a backtest that must be refused before any work: exit 2, nothing trained; its output on a line."""
    result = backtest(out, *args)
    assert result.exit_code == 2, result.output
    assert not (out / "work").exists()  # nothing was trained or replayed
    return " ".join(result.output.split())


def summary(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / "summary.json").read_text())
    return data


@pytest.fixture(scope="module")
def unit_bug(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("unit_bug")
    policies = "never,drift,periodic,oracle"
    result = backtest(out, "--data", "generated:unit_bug", "--policies", policies, *STEP_ARGS)
    assert result.exit_code == 0, result.output
    yield out


def test_drift_is_detected_after_the_change_and_the_drift_policy_recovers(unit_bug: Path) -> None:
    s = summary(unit_bug)
    change = pd.Timestamp(s["change_points"][0])
    assert change == pd.Timestamp("2022-04-01", tz="UTC")
    drift, never = s["policies"]["drift"], s["policies"]["never"]
    detection = drift["detections"][0]
    assert pd.Timestamp(detection["first_breach_at"]) >= change  # not before the change
    assert drift["false_breaches"] == 0 and drift["false_retrains"] == 0
    # Within one monitor cycle of the window holding min_window_rows post-change rows (0: even before).
    assert detection["cycles_after_ready"] <= 2
    assert pd.Timestamp(detection["first_swap_at"]) > pd.Timestamp(detection["first_breach_at"])
    assert never["retrains"] == 0
    # v1 forever: the error rises after the change; the drift policy retrains and recovers.
    assert never["mae_after_change"] > 2 * never["mae_before_change"]
    assert drift["promotions"] >= 1
    assert drift["mae_after_change"] < 0.8 * never["mae_after_change"]
    assert drift["mae_before_change"] == never["mae_before_change"]  # the same v1 until the change
    # The gain is far outside the noise: its whole 95 % interval lies below never's error.
    low, high = drift["mae_vs_never_ci"]
    assert low <= drift["mae_vs_never"] <= high < 0.9
    assert never["mae_vs_never"] == 1.0 and never["mae_vs_never_ci"] == [1.0, 1.0]


def test_the_oracle_retrains_once_post_change_labels_can_exist(unit_bug: Path) -> None:
    s = summary(unit_bug)
    oracle, never, drift = s["policies"]["oracle"], s["policies"]["never"], s["policies"]["drift"]
    periods = pd.read_csv(unit_bug / "periods.csv", parse_dates=["period_end"])
    retrained = periods[(periods["policy"] == "oracle") & periods["retrain"].notna()]["period_end"]
    first_turn = pd.Timestamp(s["change_points"][0]) + timedelta(days=s["label_delay_days"])
    assert retrained.min() >= first_turn and oracle["retrains"] == len(retrained) >= 10
    assert oracle["mae_after_change"] < 0.8 * never["mae_after_change"]
    assert drift["post_swap_oracle_mae"] > 0  # the drift policy's post-swap rows, scored for the oracle


def test_outputs_are_json_csv_and_a_png(unit_bug: Path) -> None:
    s = summary(unit_bug)
    assert set(s["policies"]) == {"never", "drift", "periodic", "oracle"}
    assert s["rows"]["replayed"] + s["rows"]["initial"] == 12000
    periods = pd.read_csv(unit_bug / "periods.csv")
    assert list(periods.columns) == [
        "policy", "period_start", "period_end", "rows", "mae", "champion_version", "retrain", "breach",
    ]  # fmt: skip
    for policy, frame in periods.groupby("policy"):
        assert frame["rows"].sum() == s["rows"]["replayed"], policy
        assert (frame["retrain"].fillna("") != "").sum() == s["policies"][policy]["retrains"], policy
    assert (unit_bug / "backtest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_replay_ran_the_live_monitor_policy_and_retrain_code(unit_bug: Path) -> None:
    """The drift policy's scratch database holds what the live loop writes: reports, alerts, runs, lineage."""
    s = summary(unit_bug)
    engine = create_engine(f"sqlite:///{unit_bug / 'work' / 'drift' / 'backtest.db'}")
    with engine.connect() as db:
        reports = db.scalar(select(func.count(DriftReport.id)))
        breaches = db.scalar(select(func.count(DriftReport.id)).where(DriftReport.breach))
        alerts = db.scalar(select(func.count(Notification.id)).where(Notification.kind == "drift_breach"))
        runs = db.execute(select(RetrainRun.trigger, RetrainRun.status, RetrainRun.report_id)).all()
        promoted = db.execute(
            select(ModelVersion.version, ModelVersion.trigger, ModelVersion.parent_version).where(
                ModelVersion.retrain_run_id.is_not(None), ModelVersion.status != "rejected"
            )
        ).all()
        logged = db.scalar(select(func.count(PredictionLog.id)))
    engine.dispose()
    assert logged == s["rows"]["replayed"]
    periods = pd.read_csv(unit_bug / "periods.csv")
    assert reports == len(periods[periods["policy"] == "drift"])  # one monitor run per two-week step
    assert breaches >= 1 and 1 <= alerts <= breaches  # one alert per breach episode
    assert len(runs) == s["policies"]["drift"]["retrains"]
    assert all(trigger in ("drift", "accuracy") and report_id is not None for trigger, _, report_id in runs)
    assert len(promoted) == s["policies"]["drift"]["promotions"]
    assert all(parent is not None for _, _, parent in promoted)
    engine = create_engine(f"sqlite:///{unit_bug / 'work' / 'drift' / 'backtest.db'}")
    with engine.connect() as db:
        v1_sources = db.scalar(select(ModelVersion.data_sources).where(ModelVersion.version == 1))
    engine.dispose()
    assert v1_sources == {"bootstrap": "generated:unit_bug, rows before 2022-01-01 00:00"}


def test_soft_breaches_that_outlive_their_retrains_wait_ever_longer(tmp_path: Path) -> None:
    """End to end through the live monitor: drift-only breaches (soft) that retraining does not cure are
    stored with their decision, counted back from the database, and each run waits cooldown × 2ⁿ.
    A small 28-day window keeps the drift share over its threshold for the whole replay."""
    cooldown = timedelta(days=28)
    settings = make_settings(
        "sqlite://", tmp_path, min_window_rows=200, min_labelled_rows=100,
        retrain_cooldown_s=int(cooldown.total_seconds()), window_seconds=int(cooldown.total_seconds()),
    )  # fmt: skip
    stream = load_stream("generated:new_town", load_spec(), rows=12000)
    config = ReplayConfig(step=timedelta(days=7), label_delay=timedelta(days=14))
    run_replay(
        stream, settings=settings, config=config, policies=("drift",), until=stream.default_train_until(),
        workdir=tmp_path / "w",
    )  # fmt: skip
    engine = create_engine(f"sqlite:///{tmp_path / 'w' / 'drift' / 'backtest.db'}")
    with engine.connect() as db:
        reports = db.execute(
            select(DriftReport.created_at, DriftReport.decision).order_by(DriftReport.id)
        ).all()
        runs = db.scalars(select(RetrainRun.started_at).order_by(RetrainRun.id)).all()
        triggers = set(db.scalars(select(RetrainRun.trigger)))
    engine.dispose()
    assert triggers == {"drift"} and len(runs) >= 3
    assert all(d["soft"] for _, d in reports if d.get("breach"))
    # No "ok" report came between them, so the n-th gap is at least cooldown × 2ⁿ.
    assert not any(d.get("verdict") == "ok" for at, d in reports if runs[0] <= at <= runs[-1])
    for n, (before, after) in enumerate(pairwise(runs), start=1):
        assert after - before >= cooldown * 2**n
    held = [
        (at, d["held_by"]) for at, d in reports if (d.get("held_by") or "").startswith("backoff after 2 ")
    ]
    assert held and held[0][1].startswith(
        "backoff after 2 soft-breach runs in a row: the next waits 112 d (cooldown × 2^2), "
    )


def test_a_stable_stream_gets_no_retrain(tmp_path: Path) -> None:
    result = backtest(tmp_path, "--data", "generated:none", "--policies", "never,drift", *STEP_ARGS)
    assert result.exit_code == 0, result.output
    s = summary(tmp_path)
    drift, never = s["policies"]["drift"], s["policies"]["never"]
    assert s["change_points"] == []
    assert drift["retrains"] == 0 and drift["false_breaches"] == 0
    assert drift["cumulative_mae"] == never["cumulative_mae"]
    assert "never" in result.output and "drift" in result.output  # the printed table


# --- is a policy's difference real? ---------------------------------------------------------------


def _blocks(count: int, size: int) -> np.ndarray:
    return np.repeat(np.arange(count), size)


def test_a_policy_that_halves_the_error_is_told_apart_from_its_baseline() -> None:
    rng = np.random.default_rng(1)
    baseline = rng.exponential(100.0, 4000)
    better = baseline * rng.uniform(0.3, 0.7, 4000)
    ratio, (low, high) = paired_ratio(better, baseline, _blocks(20, 200))
    assert low <= ratio <= high < 0.6
    assert paired_ratio(baseline, baseline, _blocks(20, 200)) == (1.0, (1.0, 1.0))


def test_an_error_that_moves_in_stretches_gives_an_interval_that_straddles_one() -> None:
    """A policy 6 % better in half the blocks and 6 % worse in the other half is not better: resampling whole
    blocks says so, where resampling rows would take its 4,000 rows for 4,000 independent facts."""
    rng = np.random.default_rng(2)
    baseline = rng.exponential(100.0, 4000)
    factors = rng.permutation(np.repeat([0.94, 1.06], 10))
    other = baseline * np.repeat(factors, 200)
    ratio, (low, high) = paired_ratio(other, baseline, _blocks(20, 200))
    assert low < 1 < high and low <= ratio <= high
    assert high - low > 0.03  # about the blocks' spread, not the rows'


def test_blocks_are_drawn_apart_before_and_after_a_change() -> None:
    """Half the replay before a change (no difference), half after (the policy halves the error): how much
    of each a draw holds is the replay's design, not noise, so the strata keep the interval narrow."""
    rng = np.random.default_rng(3)
    baseline = rng.exponential(100.0, 4000)
    factors = np.repeat(np.r_[np.ones(10), rng.uniform(0.45, 0.55, 10)], 200)
    strata = np.repeat([0, 1], 10)
    ratio, (low, high) = paired_ratio(baseline * factors, baseline, _blocks(20, 200), strata)
    _, (mixed_low, mixed_high) = paired_ratio(baseline * factors, baseline, _blocks(20, 200))
    assert low <= ratio <= high and 0.7 < ratio < 0.8
    assert high - low < (mixed_high - mixed_low) / 3


def test_a_ratio_without_enough_replay_or_error_says_so() -> None:
    errors = np.array([1.0, 2.0, 3.0])
    assert paired_ratio(errors, 2 * errors, np.zeros(3, dtype=int)) == (0.5, None)  # one block: no interval
    assert paired_ratio(errors, np.zeros(3), np.array([0, 1, 1])) is None  # a perfect baseline: no ratio
    rng = np.random.default_rng(4)
    baseline = rng.exponential(100.0, 2000)
    # Seven blocks are too few to resample, and a stratum of one block would be the same in every draw.
    assert paired_ratio(0.8 * baseline, baseline, _blocks(7, 2000 // 7 + 1)[:2000]) == (
        pytest.approx(0.8),
        None,
    )
    lone_first = np.r_[0, np.zeros(9, dtype=int) + 1]
    assert paired_ratio(0.8 * baseline, baseline, _blocks(10, 200), lone_first)[1] is None
    # And a draw whose baseline made no error at all has no ratio to give.
    sparse = np.where(np.arange(2000) < 200, baseline, 0.0)
    assert paired_ratio(baseline, sparse, _blocks(10, 200))[1] is None


def test_blocks_are_equal_stretches_of_time_cut_at_the_change() -> None:
    """The generated replay (2022, changed on 2022-04-01) in 6-hour rows: 3 blocks before the change and 10
    after, all of one length within their stratum, so no stub block counts as much as a full one."""
    stamps = pd.date_range("2022-01-01", "2022-12-31 18:00", freq="6h", tz="UTC")
    codes, strata = time_blocks(
        stamps.tz_localize(None).to_numpy("datetime64[ns]"),
        start=stamps[0].to_pydatetime(),
        end=stamps[-1].to_pydatetime(),
        cuts=[datetime(2022, 4, 1, tzinfo=UTC)],
        block=timedelta(days=28),
    )
    assert strata.tolist() == [0] * 3 + [1] * 10
    sizes = np.bincount(codes)
    assert sizes[:3].tolist() == [120, 120, 120]  # 90 days in three 30-day blocks
    assert sizes[3:].max() - sizes[3:].min() <= 1  # 275 days in ten
    assert (np.diff(codes) >= 0).all() and codes[-1] == 12  # in time order, the last row included
    assert (codes[stamps < "2022-04-01"] < 3).all() and (codes[stamps >= "2022-04-01"] >= 3).all()


# --- any CSV + spec, and bad input ---------------------------------------------------------------


@pytest.fixture
def history_csv(tmp_path: Path) -> Path:
    """A user's file: the apartment columns, the time in a column named `sold_on`."""
    frame = generate_transactions(1500, start="2020-01-01", end="2021-12-31", seed=3)
    path = tmp_path / "history.csv"
    frame.rename(columns={"contract_date": "sold_on"}).to_csv(path, index=False)
    return path


def test_a_csv_with_its_own_time_column_replays(tmp_path: Path, history_csv: Path) -> None:
    out = tmp_path / "out"
    result = backtest(
        out, "--data", str(history_csv), "--time-column", "sold_on", "--policies", "never,periodic",
        "--step", "30d", "--period", "120d", "--initial-train-until", "2021-01-01",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    s = summary(out)
    assert s["change_points"] is None  # unknown for a user's data
    assert s["initial_train_until"].startswith("2021-01-01")
    assert s["policies"]["periodic"]["retrains"] == 3  # every 120 days of 2021
    assert s["policies"]["never"]["retrains"] == 0
    assert s["policies"]["periodic"]["false_retrains"] is None  # unknowable without change points


def test_known_change_points_of_a_csv_are_measured(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """--change-at gives a user's history what generated data has: detections, and false retrains before."""
    caplog.set_level(logging.INFO)
    frame = generate_transactions(
        9000, start="2020-01-01", end="2021-12-31", scenario="unit_bug", change_at="2021-05-01", seed=5
    )
    path = tmp_path / "history.csv"
    frame.to_csv(path, index=False)
    out = tmp_path / "out"
    # The user believes in a change in March too, when nothing happened; given out of order.
    result = backtest(
        out, "--data", str(path), "--policies", "never,drift", "--step", "14d", "--label-delay", "14d",
        "--initial-train-until", "2021-01-01", "--change-at", "2021-05-01, 2021-03-01",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    s = summary(out)
    march, may = (pd.Timestamp(c) for c in s["change_points"])  # sorted
    assert (march, may) == (pd.Timestamp("2021-03-01", tz="UTC"), pd.Timestamp("2021-05-01", tz="UTC"))
    drift, never = s["policies"]["drift"], s["policies"]["never"]
    assert never["mae_after_change"] > 2 * never["mae_before_change"]  # after the first change point
    assert drift["false_retrains"] == 0 and drift["false_breaches"] == 0
    quiet, bug = drift["detections"]
    # The unit bug's breach and swap answer May's change point, not March's, which nothing answered.
    assert (quiet["first_breach_at"], quiet["first_swap_at"], quiet["delay_days"]) == (None, None, None)
    assert may <= pd.Timestamp(bug["first_breach_at"]) < pd.Timestamp(bug["first_swap_at"])
    assert f"-, {bug['delay_days']:g} d" in " ".join(result.output.split())  # a figure per change point
    # The live loop's line a monitor run would be hundreds here: the replay keeps them in its traces.
    assert [r.getMessage() for r in caplog.records if r.name == LOOP_LOGGER] == []


def test_a_stable_csv_counts_every_retrain_as_false(tmp_path: Path, history_csv: Path) -> None:
    out = tmp_path / "out"
    result = backtest(
        out, "--data", str(history_csv), "--time-column", "sold_on", "--policies", "never,periodic",
        "--step", "30d", "--period", "120d", "--initial-train-until", "2021-01-01", "--change-at", "none",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    s = summary(out)
    assert s["change_points"] == []
    assert s["policies"]["periodic"]["false_retrains"] == s["policies"]["periodic"]["retrains"] == 3


def test_steps_without_rows_keep_their_retrains_in_periods_csv(tmp_path: Path, history_csv: Path) -> None:
    """A history with a two-month hole: the steps in it serve nothing, yet the periodic policy retrains at
    their ends. periods.csv (and the plot's swaps, drawn from it) dropped those steps and their retrains."""
    frame = pd.read_csv(history_csv)
    sold = pd.to_datetime(frame["sold_on"])
    frame[(sold < "2021-03-01") | (sold >= "2021-05-01")].to_csv(history_csv, index=False)
    out = tmp_path / "out"
    result = backtest(
        out, "--data", str(history_csv), "--time-column", "sold_on", "--policies", "never,periodic",
        "--step", "14d", "--period", "14d", "--initial-train-until", "2021-01-01",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    s = summary(out)
    periods = pd.read_csv(out / "periods.csv", parse_dates=["period_start", "period_end"])
    last = pd.to_datetime(frame["sold_on"], utc=True).max()
    steps = int((last - pd.Timestamp("2021-01-01", tz="UTC")) / timedelta(days=14)) + 1
    for policy, rows in periods.groupby("policy"):
        assert len(rows) == steps, policy  # every step, one row
        assert rows["rows"].sum() == s["rows"]["replayed"], policy
        assert (rows["retrain"].fillna("") != "").sum() == s["policies"][policy]["retrains"], policy
    empty = periods[periods["rows"] == 0]
    assert len(empty) == 2 * 3  # the three steps wholly in the hole, for both policies
    assert empty["mae"].isna().all() and empty["champion_version"].isna().all()
    assert (empty[empty["policy"] == "periodic"]["retrain"].fillna("") != "").all()
    assert s["policies"]["periodic"]["retrains"] == steps  # one a step: the hole's steps too


def test_failed_retrain_runs_are_counted_and_named_not_printed_as_tracebacks(
    tmp_path: Path, history_csv: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The oracle's first runs after a change train on the labels since it, a handful of rows: they fail.
    Each printed its traceback through the progress bar, and nothing after the replay said runs had failed;
    the table counted them as retrains."""
    caplog.set_level(logging.INFO)
    frame = pd.read_csv(history_csv)
    frame[pd.to_datetime(frame["sold_on"]) < "2021-07-01"].to_csv(history_csv, index=False)
    out = tmp_path / "out"
    result = backtest(
        out, "--data", str(history_csv), "--time-column", "sold_on", "--policies", "never,oracle",
        "--step", "2d", "--label-delay", "2d", "--initial-train-until", "2021-05-01",
        "--change-at", "2021-06-01",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    oracle = summary(out)["policies"]["oracle"]
    periods = pd.read_csv(out / "periods.csv")
    failed = int((periods[periods["policy"] == "oracle"]["retrain"] == "failed").sum())
    assert oracle["failed_retrains"] == failed >= 1
    assert oracle["first_retrain_error"].startswith("at 2021-06-04 00:00: RuntimeError: too little data")
    text = " ".join(result.output.split())
    assert (
        f"warning: oracle: {failed} of {oracle['retrains']} retrain runs failed and trained nothing" in text
    )
    assert "Traceback" not in result.output
    assert [r for r in caplog.records if r.name == RETRAIN_LOGGER] == []
    quiet = backtest(
        tmp_path / "b", "--data", str(history_csv), "--time-column", "sold_on", "--policies", "never",
        "--step", "2d", "--initial-train-until", "2021-05-01",
    )  # fmt: skip
    assert quiet.exit_code == 0 and "retrain runs failed" not in " ".join(quiet.output.split())


@pytest.mark.parametrize(
    ("change_at", "message"),
    [
        ("2020-06-01", "--change-at 2020-06-01 00:00: not after --initial-train-until 2021-01-01 00:00; v1"),
        ("2024-01-01", "--change-at 2024-01-01 00:00: after the last row of"),
        ("", "--change-at is empty: give times such as"),
        (" , ", "--change-at is empty: give times such as"),
        ("2021-06-01,soon", "--change-at 'soon': not a date or time"),
        ("2021-06-01 KST", "names its time zone (KST), which is not read"),
    ],
)
def test_bad_change_points_are_refused_before_any_work(
    tmp_path: Path, history_csv: Path, change_at: str, message: str
) -> None:
    said = refused(
        tmp_path / "out", "--data", str(history_csv), "--time-column", "sold_on",
        "--initial-train-until", "2021-01-01", "--change-at", change_at,
    )  # fmt: skip
    assert message in said


def test_generated_data_keeps_its_own_change_points(tmp_path: Path) -> None:
    result = backtest(tmp_path / "out", "--data", "generated:unit_bug", "--change-at", "2022-06-01")
    assert result.exit_code == 2
    assert (
        "--change-at: generated:unit_bug knows its own change points (2022-04-01); give it only with a CSV"
        in (" ".join(result.output.split()))
    )


def _broken(history_csv: Path, change: str) -> Path:
    frame = pd.read_csv(history_csv)
    if change == "missing column":
        frame = frame.drop(columns=["floor"])
    elif change == "unsorted":
        frame.loc[[10, 11]] = frame.loc[[11, 10]].to_numpy()
    elif change == "unparsable time":
        frame["sold_on"] = frame["sold_on"].astype(object)
        frame.loc[7, "sold_on"] = "last tuesday"
    elif change == "target NaN":
        frame["price_10k_krw"] = frame["price_10k_krw"].astype(float)
        frame.loc[4, "price_10k_krw"] = float("nan")
    elif change == "true/false floor":
        frame["floor"] = [bool(i % 2) for i in range(len(frame))]
    elif change == "target true/false":
        frame["price_10k_krw"] = [bool(i % 2) for i in range(len(frame))]
    elif change == "target in words":
        frame["price_10k_krw"] = frame["price_10k_krw"].astype(object)
        frame.loc[5, "price_10k_krw"] = "1.2 EUR"
    elif change == "empty category":
        frame.loc[4, "district"] = ""
    elif change == "N/A area":
        frame["area_m2"] = frame["area_m2"].astype(object)
        frame.loc[4, "area_m2"] = "N/A"
    elif change == "unknown category":
        frame.loc[5, "district"] = "Atlantis-gu"
    elif change == "out of bounds":
        frame["area_m2"] = frame["area_m2"].astype(float)
        frame.loc[9, "area_m2"] = 9999.0
    elif change == "epoch times":
        frame["sold_on"] = pd.to_datetime(frame["sold_on"]).astype("int64") // 10**9
    elif change == "target below target_min":
        frame.loc[3, "price_10k_krw"] = -5
    elif change == "absurd target":
        frame["price_10k_krw"] = frame["price_10k_krw"].astype(float)
        frame.loc[6, "price_10k_krw"] = 1e300
    elif change == "an epoch among dates":
        frame["sold_on"] = frame["sold_on"].astype(object)
        frame.loc[0, "sold_on"] = "1577836800"
    elif change == "empty time column":
        frame["sold_on"] = ""
    elif change == "header only":
        frame = frame.iloc[:0]
    elif change in ("trailing comma", "a row too wide"):
        header, *rows = frame.to_csv(index=False).splitlines()
        if change == "trailing comma":
            rows = [row + "," for row in rows]
        else:
            rows[29] += ",7"
        history_csv.write_text("\n".join([header, *rows, ""]))
        return history_csv
    elif change.startswith("twice: "):
        column = change.removeprefix("twice: ")
        frame = pd.concat([frame, frame[[column]]], axis=1)
    elif change == "zone names":
        frame["sold_on"] = frame["sold_on"].str.slice(0, 16) + " CET"
    elif change == "header 'floor '":
        frame = frame.rename(columns={"floor": "floor "})
    elif change == "header 'Floor'":
        frame = frame.rename(columns={"floor": "Floor"})
    elif change == "semicolons":
        frame.to_csv(history_csv, index=False, sep=";")
        return history_csv
    frame.to_csv(history_csv, index=False)
    return history_csv


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("missing column", "missing column(s): floor"),
        ("unsorted", "not sorted by 'sold_on': line 13"),
        ("unparsable time", "column 'sold_on' has 1 unparsable value(s), first at line 9"),
        (
            "target NaN",
            "target 'price_10k_krw' is missing or not a number in 1 row(s), first at line 6 (empty, or a "
            "mark pandas reads as missing",
        ),
        (  # pandas reads the column as booleans, which would pass as 1/0; ingest and /predict refuse them
            "true/false floor",
            "column 'floor' has 1500 row(s) with values that are not finite numbers (true/false: write 1/0, "
            "or make the feature categorical), first at line 2 (False)",
        ),
        (
            "target true/false",
            "target 'price_10k_krw' is missing or not a number in 1500 row(s), first at line 2 (False)",
        ),
        (
            "target in words",
            "target 'price_10k_krw' is missing or not a number in 1 row(s), first at line 7 ('1.2 EUR')",
        ),
        (
            "unknown category",
            "column 'district' has 1 row(s) with unknown categories (the spec's: Gangnam-gu,",
        ),
        ("out of bounds", "column 'area_m2' has 1 row(s) with values outside [5, 350], first at line 11"),
        (  # not "(<NA>)" or "(nan)", which the cell does not hold
            "empty category",
            "column 'district' has 1 row(s) with empty values (the feature is not nullable), first at line 6 "
            "(empty)",
        ),
        (
            "N/A area",
            "column 'area_m2' has 1 row(s) with empty values (the feature is not nullable), first at line 6 "
            "(empty, or a mark pandas reads as missing: NA, N/A, NULL, nan…)",
        ),
        ("epoch times", "column 'sold_on' holds numbers (first 1577"),  # not nanoseconds since 1970
        (
            "target below target_min",
            "target 'price_10k_krw' is below the spec's target_min 0 in 1 row(s), first at line 5 (-5)",
        ),
        ("absurd target", "target 'price_10k_krw' is beyond ±1e+15 in 1 row(s), first at line 8 (1e+300)"),
        ("header only", "no data rows, only a header"),
        ("empty time column", "column 'sold_on' is empty"),
        ("an epoch among dates", "column 'sold_on' has 1 unparsable value(s), first at line 2 (1577836800)"),
        ("semicolons", "(the header is one column holding ';': save the file comma-separated)"),
        ("trailing comma", "1500 row(s) have 9 fields, the header 8 (a trailing comma?); first at line 2"),
        ("a row too wide", "1 row(s) have 9 fields, the header 8; first at line 31"),
        ("twice: area_m2", "column 'area_m2' appears twice in the header"),
        ("twice: price_10k_krw", "column 'price_10k_krw' appears twice in the header"),
        ("twice: sold_on", "column 'sold_on' appears twice in the header"),
        (
            "zone names",
            "column 'sold_on' has 1500 time(s) naming their time zone, which is not read, first at line 2 "
            "(2020-01-01 13:38 CET); write the offset instead (e.g. 2022-04-01T09:30:00+09:00), or Z for UTC",
        ),
        ("header 'floor '", "missing column(s): floor (the header has 'floor ')"),
        ("header 'Floor'", "missing column(s): floor (the header has 'Floor')"),
    ],
)
def test_bad_data_is_refused_naming_the_problem_before_any_work(
    tmp_path: Path, history_csv: Path, change: str, message: str
) -> None:
    said = refused(tmp_path / "out", "--data", str(_broken(history_csv, change)), "--time-column", "sold_on")
    assert message in said


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "generated:tsunami"], "unknown scenario; choose one of none, rate_shock"),
        (["--data", "generated:none", "--label-delay", "soon"], "--label-delay 'soon': expected a duration"),
        (["--data", "generated:none", "--policies", "drift,yolo"], "--policies: unknown yolo"),
        (["--data", "generated:none", "--initial-train-until", "2030-01-01"], "no rows left to replay"),
        (["--data", "generated:none", "--initial-train-until", "2019-06-01"], "only 0 row(s) before it"),
        (["--data", "generated:none", "--initial-train-until", "someday"], "not a date or time"),
        (["--data", "generated:none", "--initial-train-until", ""], "--initial-train-until is empty: give a"),
        (["--data", "generated:none", "--initial-train-until", "now"], "'now': not a date or time; give one"),
        (
            ["--data", "generated:none", "--initial-train-until", "2022-01-01 09:00 KST"],
            "'2022-01-01 09:00 KST' names its time zone (KST), which is not read; write the offset instead",
        ),
        (["--data", "generated:none", "--step", "0d"], "--step (step) must be positive"),
        (["--data", "generated:none", "--rows", "5000000"], "Invalid value for '--rows'"),
        (["--data", "nowhere.csv"], "file not found: nowhere.csv"),
        (
            ["--data", "my.csv", "--rows", "500"],
            "--rows makes generated data (--data generated:SCENARIO); my.csv",
        ),
        (
            ["--data", "my.csv", "--seed", "3"],
            "--seed makes generated data (--data generated:SCENARIO); my.csv is",
        ),
        (["--data", "generated:none", "--time-column", "area_m2"], "is a feature or the target"),
        # An empty name (an unset shell variable: --time-column "$TIME_COL") took the spec's in silence.
        (["--data", "nowhere.csv", "--time-column", ""], "--time-column is empty: name the file's time"),
        (["--data", "nowhere.csv", "--time-column", "  "], "--time-column is empty: name the file's time"),
        (
            ["--data", "generated:none", "--policies", "drift,never,drift"],
            "--policies: drift listed more than once",
        ),
        (["--data", "generated:none", "--step", "1000d"], "--step 1000d: longer than the replayed"),
        (
            ["--data", "generated:none", "--step", "1m"],
            "--step 1m: 525,",
        ),
        (["--data", "generated:none", "--label-delay", "400d"], "--label-delay 400d: no label would arrive"),
        (["--data", "generated:none", "--period", "400d"], "the periodic policy would never retrain"),
        (
            ["--data", "generated:none", "--monitor-every", "400d", "--policies", "drift"],
            "--monitor-every 400d: the monitor would never run",
        ),
        (
            ["--data", "generated:none", "--step", "14d", "--monitor-every", "1d", "--policies", "drift"],
            "--monitor-every 1d: shorter than --step 14d; policies act once a step",
        ),
        (
            ["--data", "generated:none", "--step", "14d", "--monitor-every", "2d", "--policies", "oracle"],
            "--monitor-every 2d: shorter than --step 14d",
        ),
        (
            ["--data", "generated:none", "--step", "14d", "--period", "3d", "--policies", "periodic"],
            "--period 3d: shorter than --step 14d; policies act once a step",
        ),
        (
            ["--data", "generated:none", "--step", "120d", "--policies", "periodic"],
            "--period 90d (the default): shorter than --step 120d",
        ),
    ],
)
def test_bad_options_are_refused_before_any_work(tmp_path: Path, args: list[str], message: str) -> None:
    assert message in refused(tmp_path / "out", *args)


def test_generated_data_under_a_spec_chosen_by_the_environment_says_which_variable_chose_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Generated data makes apartment columns; a spec of one's own set in DRIFTLOOP_SPEC_PATH (for the
    service) asks for others. The refusal says where that spec came from, as no --spec was given."""
    own = tmp_path / "bikes.yaml"
    own.write_text(
        "dataset: bikes\ntarget: rentals\ntime_column: ts\nfeatures:\n  - {name: hour, type: integer}\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("DRIFTLOOP_SPEC_PATH", str(own))
    said = refused(tmp_path / "out", "--data", "generated:none")
    assert "the spec asks for hour, rentals" in said
    assert f"(the spec is DRIFTLOOP_SPEC_PATH's, {own}: generated data needs the apartment spec" in said


def test_a_directory_for_data_or_spec_is_refused_by_name(tmp_path: Path, history_csv: Path) -> None:
    result = backtest(tmp_path / "out", "--data", str(tmp_path))
    assert result.exit_code == 2
    assert f"backtest: {tmp_path} is a directory; give the CSV file in it" in " ".join(result.output.split())
    result = backtest(tmp_path / "out", "--data", str(history_csv), "--spec", str(tmp_path))
    assert result.exit_code == 2
    assert f"backtest: {tmp_path} is a directory; give the spec file (YAML) in it" in " ".join(
        result.output.split()
    )


def test_missing_columns_without_a_spec_say_the_shipped_one_was_used(
    tmp_path: Path, history_csv: Path
) -> None:
    result = backtest(tmp_path / "out", "--data", str(history_csv))
    assert result.exit_code == 2
    assert (
        f"backtest: {history_csv}: missing column(s): contract_date; the spec used was the shipped apartment "
        "spec: pass --spec FILE describing your data's columns"
    ) in " ".join(result.output.split())


def test_times_in_any_iso_8601_form_are_read(tmp_path: Path, history_csv: Path) -> None:
    """pandas infers one format from the first row; Python's isoformat() drops zero microseconds, and a
    file may mix dates with times: all of it is ISO 8601, and all of it is read."""
    frame = pd.read_csv(history_csv)
    times = pd.to_datetime(frame["sold_on"], utc=True) + pd.to_timedelta(
        np.arange(len(frame)) * 250, unit="ms"
    )
    frame["sold_on"] = [t.isoformat() for t in times]
    frame.loc[:9, "sold_on"] = [t.date().isoformat() for t in times[:10]]
    frame.to_csv(history_csv, index=False)
    stream = load_stream(str(history_csv), load_spec(), time_column="sold_on")
    assert stream.times.iloc[0] == pd.Timestamp(times[0].date(), tz="UTC")
    assert stream.times.iloc[10:].tolist() == times[10:].tolist()


def test_times_are_read_as_ingest_reads_them(tmp_path: Path) -> None:
    """One format inferred from the first row (month first), ISO 8601 besides; a value that fits neither is
    refused, not guessed on its own (13/02/2022 is not read day first)."""
    frame = generate_transactions(4, seed=1)
    frame["contract_date"] = ["01/02/2022", "2022-03-04T05:06:07+09:00", "02/01/2022", "13/02/2022"]
    path = tmp_path / "times.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"1 unparsable value\(s\), first at line 5 \(13/02/2022\)"):
        read_labelled_csv(path, load_spec())
    frame.loc[3, "contract_date"] = "12/02/2022"
    frame.to_csv(path, index=False)
    assert read_labelled_csv(path, load_spec())["contract_date"].tolist() == [
        pd.Timestamp("2022-01-02", tz="UTC"),
        pd.Timestamp("2022-03-03T20:06:07", tz="UTC"),
        pd.Timestamp("2022-02-01", tz="UTC"),
        pd.Timestamp("2022-12-02", tz="UTC"),
    ]


def test_dotted_dates_with_the_year_last_are_read_day_first(tmp_path: Path) -> None:
    """Monthly data on the 1st written as 01.02.2014 (German, Russian, Polish …): pandas guesses month first
    as for slashes, so the file was read as 2 to 12 January, still in order, and replayed without a word."""
    frame = generate_transactions(3, seed=1)
    frame["contract_date"] = ["01.02.2014", "01.03.2014", "01.04.2014"]
    path = tmp_path / "times.csv"
    frame.to_csv(path, index=False)
    assert read_labelled_csv(path, load_spec())["contract_date"].tolist() == [
        pd.Timestamp("2014-02-01", tz="UTC"),
        pd.Timestamp("2014-03-01", tz="UTC"),
        pd.Timestamp("2014-04-01", tz="UTC"),
    ]
    frame["contract_date"] = ["02.13.2014", "2014.02.01", "2014.03.01"]  # month first, had it been written so
    frame.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"1 unparsable value\(s\), first at line 2 \(02.13.2014\)"):
        read_labelled_csv(path, load_spec())


def test_categories_are_read_as_written(tmp_path: Path) -> None:
    """A zero-padded code stays "01", and "NA" is a category like any other: only an empty cell is missing."""
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(
        "dataset: shops\ntarget: sales\ntime_column: day\nfeatures:\n"
        "  - {name: region, type: categorical, categories: ['01', '02', NA]}\n"
        "  - {name: size_m2, type: numeric, min: 0}\n"
    )
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "day": pd.date_range("2021-01-01", periods=300, freq="D").strftime("%Y-%m-%d"),
            "region": rng.choice(["01", "02", "NA"], 300),
            "size_m2": rng.uniform(20, 200, 300).round(1),
        }
    )
    frame["sales"] = frame["size_m2"] * 3 + rng.normal(0, 5, 300)
    frame.to_csv(tmp_path / "shops.csv", index=False)
    stream = load_stream(str(tmp_path / "shops.csv"), load_spec(spec_path))
    assert stream.frame["region"].tolist() == frame["region"].tolist()


def test_a_constant_target_is_refused_before_v1_trains(tmp_path: Path, history_csv: Path) -> None:
    frame = pd.read_csv(history_csv)
    frame["price_10k_krw"] = 50_000
    frame.to_csv(history_csv, index=False)
    result = backtest(tmp_path / "out", "--data", str(history_csv), "--time-column", "sold_on")
    assert result.exit_code == 2
    assert (
        "the default --initial-train-until 2020-10-18 17:58: target 'price_10k_krw' is 50000 in all 600 rows "
        "before it; the initial champion has nothing to learn"
    ) in " ".join(result.output.split())


def test_a_refusal_says_when_the_option_it_names_was_left_at_its_default(tmp_path: Path) -> None:
    """A short file: the 90-day period does not fit, and nobody typed --period."""
    frame = generate_transactions(300, start="2021-01-01", end="2021-03-31", seed=5)
    frame.to_csv(tmp_path / "short.csv", index=False)
    args = ["--data", str(tmp_path / "short.csv"), "--time-column", "contract_date", "--step", "1d"]
    result = backtest(tmp_path / "out", *args, "--label-delay", "7d")
    assert result.exit_code == 2
    assert "--period 90d (the default): the periodic policy would never retrain" in " ".join(
        result.output.split()
    )
    typed = backtest(tmp_path / "out", *args, "--label-delay", "7d", "--period", "90d")
    assert "--period 90d: the periodic policy" in " ".join(typed.output.split())


@pytest.mark.parametrize("below", ["", "sub/dir"])
def test_an_out_that_is_or_lies_under_a_file_is_refused(tmp_path: Path, below: str) -> None:
    (tmp_path / "out").write_text("not a directory")
    result = backtest(tmp_path / "out" / below, "--data", "generated:none", *STEP_ARGS)
    assert result.exit_code == 2
    assert f"{tmp_path / 'out'} is a file, not a directory" in " ".join(result.output.split())


def test_a_spec_that_does_not_match_the_data_is_refused(tmp_path: Path, history_csv: Path) -> None:
    raw = yaml.safe_load(
        resources.files("core.specs").joinpath("apartments.yaml").read_text(encoding="utf-8")
    )
    raw["features"].append({"name": "balcony", "type": "integer", "min": 0, "max": 3})
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(raw))
    result = backtest(
        tmp_path / "out", "--data", str(history_csv), "--spec", str(spec), "--time-column", "sold_on"
    )
    assert result.exit_code == 2
    assert "missing column(s): balcony" in " ".join(result.output.split())


def test_a_header_spelling_a_column_in_another_unicode_form_is_named(tmp_path: Path) -> None:
    """기온 typed in the spec (NFC, one code point a syllable) and in a header saved on macOS (NFD, its
    jamo): the same text to the eye, other strings to Python; the refusal says so, not just "missing 기온"
    beside a header that plainly has it."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "dataset: weather\ntarget: sales\ntime_column: day\nfeatures:\n  - {name: 기온, type: numeric}\n",
        encoding="utf-8",
    )
    data = tmp_path / "sales.csv"
    header = f"day,{unicodedata.normalize('NFD', '기온')},sales"
    data.write_text(f"{header}\n2021-01-01,3.5,10\n", encoding="utf-8")
    said = refused(tmp_path / "out", "--data", str(data), "--spec", str(spec))
    nfd = unicodedata.normalize("NFD", "기온")
    assert f"missing column(s): 기온 (the header has '{nfd}' in another Unicode form: NFD and NFC" in said


def test_a_replay_starts_from_empty_scratch_state(tmp_path: Path) -> None:
    """Replaying twice into the same work directory gives the same answer: nothing of the first leaks in."""
    settings = make_settings("sqlite://", tmp_path, min_window_rows=500, min_labelled_rows=200)
    stream = load_stream("generated:unit_bug", load_spec(), rows=6000)
    config = ReplayConfig(
        step=timedelta(days=28), label_delay=timedelta(days=14), monitor_every=timedelta(days=28)
    )
    until = stream.default_train_until()
    answers = []
    for _ in range(2):
        replay = run_replay(
            stream, settings=settings, config=config, policies=("drift",), until=until, workdir=tmp_path / "w"
        )
        (drift,), _ = summarize(replay)
        engine = create_engine(f"sqlite:///{tmp_path / 'w' / 'drift' / 'backtest.db'}")
        with engine.connect() as db:
            logged = db.scalar(select(func.count(PredictionLog.id)))
        engine.dispose()
        answers.append((drift.cumulative_mae, drift.retrains, logged))
    assert answers[0] == answers[1]
    assert answers[0][2] == len(replay.replay)


def test_an_out_directory_the_backtest_did_not_make_is_never_wiped(tmp_path: Path) -> None:
    mine = tmp_path / "work" / "thesis.tex"
    mine.parent.mkdir()
    mine.write_text("months of work")
    result = backtest(tmp_path, "--data", "generated:none", *STEP_ARGS)
    assert result.exit_code == 2
    assert "was not made by a backtest, which would wipe it" in " ".join(result.output.split())
    assert mine.read_text() == "months of work"


def test_a_drift_policy_that_could_rarely_judge_says_so(tmp_path: Path) -> None:
    """Sparse data: the window seldom holds min_window_rows of the champion's predictions. The figures
    would look like any others; the verdict counts and a warning say the monitor mostly could not look."""
    env = {**SMALL, "DRIFTLOOP_MIN_WINDOW_ROWS": "3500"}  # most of the replayed year
    result = CliRunner().invoke(
        cli, ["backtest", "--out", str(tmp_path), "--data", "generated:none", "--policies", "never,drift",
              *STEP_ARGS], env=env, catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    verdicts = summary(tmp_path)["policies"]["drift"]["monitor_verdicts"]
    runs, blind = sum(verdicts.values()), verdicts["insufficient"]
    assert runs > 20 and blind > runs / 2
    assert summary(tmp_path)["policies"]["never"]["monitor_verdicts"] == {}
    text = " ".join(result.output.split())
    assert (
        f"warning: drift: {blind} of {runs} monitor runs had fewer than DRIFTLOOP_MIN_WINDOW_ROWS=3500 rows "
        "of the serving champion's predictions to judge"
    ) in text
    quiet = backtest(tmp_path / "dense", "--data", "generated:none", "--policies", "drift", *STEP_ARGS)
    assert "warning:" not in quiet.output


def test_a_breach_at_a_change_point_s_own_time_answers_the_change_before_it() -> None:
    # A monitor run at time t judges the rows before t, so the run at a change point's time saw none of its
    # rows: its breach answered the previous change point (or none: a false breach), never this one at 0 d.
    from types import SimpleNamespace

    from monitor.backtest.replay import MonitorRecord, RetrainRecord
    from monitor.backtest.results import _before, _detection

    def at(day: int) -> datetime:
        return datetime(2021, 1, day, tzinfo=UTC)

    first, second = at(10), at(20)
    monitors = [  # rows before the 10th: the stable stream's; before the 20th: the first change's
        SimpleNamespace(at=at(10), breach=True, verdict="breach", champion_version=1),
        SimpleNamespace(at=at(20), breach=True, verdict="breach", champion_version=1),
        SimpleNamespace(at=at(22), breach=True, verdict="breach", champion_version=2),  # swapped on the 20th
    ]
    retrains = [SimpleNamespace(at=at(20), status="promoted"), SimpleNamespace(at=at(22), status="promoted")]
    assert {f.name for f in dataclasses.fields(MonitorRecord)} >= {
        "at",
        "breach",
        "verdict",
        "champion_version",
    }
    assert {f.name for f in dataclasses.fields(RetrainRecord)} >= {"at", "status"}
    trace = SimpleNamespace(monitors=monitors, retrains=retrains)
    replay = SimpleNamespace(
        settings=SimpleNamespace(min_labelled_rows=1, min_window_rows=1),
        config=SimpleNamespace(label_delay=timedelta(days=1)),
    )
    times = np.array([np.datetime64(f"2021-01-{d:02d}T12:00", "ns") for d in range(1, 31)])
    one = _detection(replay, trace, first, second, times)  # type: ignore[arg-type]
    two = _detection(replay, trace, second, None, times)  # type: ignore[arg-type]
    assert (one.first_breach_at, one.first_swap_at) == (at(20), at(20))
    assert (two.first_breach_at, two.first_swap_at, two.delay_days) == (at(22), at(22), 2.0)
    assert _before(first, [m.at for m in monitors], known=True) == 1  # the run on the 10th: a false breach
    # The first change's breach continues v1's run begun on the 10th; the second's is v2's first, after it.
    assert (one.breaching_since, two.breaching_since) == (at(10), None)


def test_a_breach_that_only_continues_breaches_from_before_a_change_is_not_passed_off_as_its_detection() -> (
    None
):
    """Repair jobs booked in bursts: the monitor breached on drift for a month before the change and went on
    breaching; the first breach after it, 0.78 d later, was reported as the change's detection with nothing
    to say it had been breaching all along."""
    from types import SimpleNamespace

    from monitor.backtest.results import _detection, carried_breach_warnings

    def at(day: int, hour: int = 0) -> datetime:
        return datetime(2023, 9, day, hour, tzinfo=UTC)

    change = at(8)
    verdicts = [(1, "ok"), (2, "breach"), (4, "breach"), (6, "insufficient"), (7, "breach"), (8, "breach")]
    monitors = [
        SimpleNamespace(at=at(d, 18), verdict=v, breach=v == "breach", champion_version=1)
        for d, v in verdicts
    ]
    trace = SimpleNamespace(monitors=monitors, retrains=[])
    replay = SimpleNamespace(
        settings=SimpleNamespace(min_labelled_rows=1, min_window_rows=1),
        config=SimpleNamespace(label_delay=timedelta(days=1)),
    )
    times = np.array([np.datetime64(f"2023-09-{d:02d}T12:00", "ns") for d in range(1, 30)])
    carried = _detection(replay, trace, change, None, times)  # type: ignore[arg-type]
    assert (carried.first_breach_at, carried.delay_days) == (at(8, 18), 0.75)
    assert carried.breaching_since == at(2, 18)  # the insufficient run on the 6th neither counts nor ends it
    summary = SimpleNamespace(policy="drift", detections=(carried,))
    (warning,) = carried_breach_warnings(summary)  # type: ignore[arg-type]
    assert warning == (
        "drift: the breach counted as detecting the change at 2023-09-08 00:00 (0.75 d after it) continues a "
        "run of breaches begun 2023-09-02 18:00, before the change; that delay does not measure how soon the "
        "monitor saw it"
    )
    # A run of breaches that began after the change is the change's own: no warning.
    monitors[4] = SimpleNamespace(at=at(7, 18), verdict="ok", breach=False, champion_version=1)
    fresh = _detection(replay, trace, change, None, times)  # type: ignore[arg-type]
    assert (fresh.first_breach_at, fresh.breaching_since) == (at(8, 18), None)
    assert carried_breach_warnings(SimpleNamespace(policy="drift", detections=(fresh,))) == []  # type: ignore[arg-type]


def test_a_rate_s_errors_read_in_its_units(tmp_path: Path) -> None:
    """A click-through rate in [0, 1] has an MAE of a few ten-thousandths: the table showed it as 0 (no
    decimals, as for a price) and periods.csv rounded it to 3 decimals, 0.0 or 0.001."""
    rng = np.random.default_rng(4)
    rows = 1200
    position = rng.integers(1, 6, rows)
    impressions = rng.integers(3000, 8000, rows)
    ctr = 0.001 + 0.003 / position
    frame = pd.DataFrame(
        {
            "day": pd.date_range("2021-01-01", "2021-12-31", periods=rows).strftime("%Y-%m-%d"),
            "position": position,
            "impressions": impressions,
            "ctr": rng.binomial(impressions, ctr) / impressions,
        }
    )
    data, spec = tmp_path / "ctr.csv", tmp_path / "ctr.yaml"
    frame.to_csv(data, index=False)
    spec.write_text(
        "dataset: ads\ntarget: ctr\ntarget_min: 0\ntarget_max: 1\ntime_column: day\nfeatures:\n"
        "  - {name: position, type: integer, min: 1, max: 10}\n"
        "  - {name: impressions, type: integer, min: 1, max: 100000}\n"
    )
    out = tmp_path / "out"
    result = backtest(
        out, "--data", str(data), "--spec", str(spec), "--policies", "never", "--step", "30d",
        "--initial-train-until", "2021-07-01",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    never = summary(out)["policies"]["never"]
    mae = never["cumulative_mae"]
    assert 0.0001 < mae < 0.001
    row = next(line for line in result.output.splitlines() if "never" in line and "│" in line)
    assert row.split("│")[2].strip() == figure(mae)  # 0.000…, three significant digits
    periods = pd.read_csv(out / "periods.csv")
    weighted = float((periods["mae"] * periods["rows"]).sum() / periods["rows"].sum())
    assert weighted == pytest.approx(mae, rel=1e-3)


def test_the_plotted_accuracy_ratio_is_over_the_yardstick_the_policy_judged_by() -> None:
    """A champion promoted mid-change has a lax validation MAE (8.2); its line's best (7.4) is the yardstick
    the policy breached on. The plot divided by the champion's own, so the breach sat below the threshold
    line (9.98 / 8.22 = 1.21 < 1.25), as if the red band had no cause."""
    from monitor.backtest.replay import MonitorRecord
    from monitor.backtest.results import accuracy_ratios
    from monitor.policy import NO_HISTORY, Observation, PolicyConfig, decide

    at = datetime(2023, 8, 12, tzinfo=UTC)
    obs = Observation(
        at=at, rows=600, labelled_rows=500, drift_share=0.0, weighted_score=0.0, mae=9.98, champion_mae=8.22,
        baseline_mae=7.36,
    )  # fmt: skip
    config = PolicyConfig()
    assert decide(obs, NO_HISTORY, config).breach  # on the line's baseline: 9.98 > 7.36 × 1.25
    record = MonitorRecord(
        at=at, verdict="breach", breach=True, retrain=False, drift_share=0.0, weighted_score=0.0,
        mae=obs.mae, champion_mae=obs.champion_mae, baseline_mae=obs.baseline_mae, reasons=(),
    )  # fmt: skip
    (ratio,) = accuracy_ratios([record], lineage_baseline=True)
    assert ratio == pytest.approx(9.98 / 7.36) and ratio > config.mae_degradation_ratio
    # Without the lineage baseline the policy judges by the champion's own, and so does the plot.
    assert not decide(obs, NO_HISTORY, dataclasses.replace(config, lineage_baseline=False)).breach
    assert accuracy_ratios([record], lineage_baseline=False) == [pytest.approx(9.98 / 8.22)]
    assert accuracy_ratios([dataclasses.replace(record, mae=None)], lineage_baseline=True) == [None]


def test_summary_records_every_setting_that_changes_the_replay(tmp_path: Path, history_csv: Path) -> None:
    """Two replays, one with DRIFTLOOP_LINEAGE_BASELINE=false, breach differently; their summaries' settings
    read the same, since lineage_baseline, the accuracy window and the trainer's window and decay were left
    out of policy_config."""
    from monitor.policy import PolicyConfig

    env = {
        **SMALL, "DRIFTLOOP_LINEAGE_BASELINE": "false", "DRIFTLOOP_ACCURACY_WINDOW_ROWS": "300",
        "DRIFTLOOP_TRAIN_WINDOW_DAYS": "200", "DRIFTLOOP_TRAIN_HALF_LIFE_DAYS": "30",
    }  # fmt: skip
    result = CliRunner().invoke(
        cli, ["backtest", "--out", str(tmp_path), "--data", str(history_csv), "--time-column", "sold_on",
              "--policies", "never", "--step", "30d", "--initial-train-until", "2021-01-01"],
        env=env, catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    config = summary(tmp_path)["policy_config"]
    assert {f.name for f in dataclasses.fields(PolicyConfig)} <= set(config)  # every rule of the policy
    assert config["lineage_baseline"] is False and config["accuracy_window_rows"] == 300
    assert (config["train_window_days"], config["train_half_life_days"]) == (200, 30)
    assert (config["train_iterations"], config["train_depth"], config["train_learning_rate"]) == (60, 4, 0.2)


def test_the_table_marks_a_ratio_whose_interval_could_not_be_drawn() -> None:
    """Too few blocks to resample: the ratio is shown with "(-)", as the README says, not alone."""
    from monitor.backtest.results import PolicySummary, table_row

    summary = PolicySummary(
        policy="drift", rows=3000, cumulative_mae=7.5, mae_vs_never=0.93, mae_vs_never_ci=None,
        mae_before_change=None, mae_after_change=None, retrains=1, promotions=1, retrain_seconds=1.0,
        false_retrains=None, false_breaches=None, post_swap_mae=None, post_swap_oracle_mae=None,
        detections=(),
    )  # fmt: skip
    assert table_row(summary)[2] == "0.930 (-)"
    drawn = dataclasses.replace(summary, mae_vs_never_ci=(0.9, 0.97))
    assert table_row(drawn)[2] == "0.930 (0.900–0.970)"
    assert table_row(dataclasses.replace(summary, mae_vs_never=None))[2] == "-"


def test_a_rerun_cut_short_leaves_no_earlier_run_s_outputs_beside_its_scratch(tmp_path: Path) -> None:
    """A run into an --out holding an earlier run's summary.json, periods.csv and backtest.png removes them
    before it replays: one interrupted (Ctrl-C) must not leave them looking like its own results."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("summary.json", "periods.csv", "backtest.png"):
        (out / name).write_text("an earlier run's")
    env = {**os.environ, **SMALL}
    command = [sys.executable, "-m", "service.cli", "backtest", "--out", str(out), "--data", "generated:none"]
    quiet = subprocess.DEVNULL
    proc = subprocess.Popen([*command, *STEP_ARGS], env=env, stdout=quiet, stderr=quiet)
    try:
        deadline = time.monotonic() + 120
        while not (out / "work" / "never" / "backtest.db").exists():  # the replay has begun
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        # Ctrl-C until it stops, as a user would press it again: in one CI run a single SIGINT was lost and
        # the replay went on to its end (exit 0). Cause not proven; one way is a KeyboardInterrupt raised
        # inside a finaliser, which Python drops, and which the replay now remembers (the test below).
        for _ in range(60):
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
                break
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode != 0
    assert not [p.name for p in out.iterdir() if p.name != "work"]


def test_a_ctrl_c_lost_in_a_finaliser_still_stops_the_replay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python drops a KeyboardInterrupt raised inside a finaliser ("Exception ignored in ..."). One Ctrl-C
    landing in a finaliser is remembered by the replay's handler and stops the replay after the step it came
    in; before, the replay went on to its end as if it had not been pressed."""

    class DroppedOnFinalise:
        def __del__(self) -> None:
            signal.raise_signal(signal.SIGINT)  # its KeyboardInterrupt is raised here, inside __del__

    steps: list[int] = []
    dropped: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", dropped.append)  # where Python puts what it drops

    def on_step(now: datetime, k: int, n: int) -> None:
        steps.append(k)
        if k == 2:
            DroppedOnFinalise()  # finalised at once, and its KeyboardInterrupt dropped

    settings = make_settings("sqlite://", tmp_path, min_window_rows=200, min_labelled_rows=100)
    stream = load_stream("generated:none", load_spec(), rows=3000)
    config = ReplayConfig(step=timedelta(days=28), label_delay=timedelta(days=14))
    with pytest.raises(KeyboardInterrupt):
        run_replay(
            stream, settings=settings, config=config, policies=("never",), until=stream.default_train_until(),
            workdir=tmp_path / "w", on_step=on_step,
        )  # fmt: skip
    assert [type(d.exc_value) for d in dropped] == [KeyboardInterrupt]
    assert steps == [1, 2]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler before it, restored


def test_the_run_says_how_it_read_its_durations(tmp_path: Path, history_csv: Path) -> None:
    """`1m` is a minute, not a month: the run spells out the step and label delay it replays with."""
    result = backtest(
        tmp_path / "out", "--data", str(history_csv), "--time-column", "sold_on", "--policies", "never",
        "--step", "30d", "--label-delay", "1m", "--initial-train-until", "2021-01-01",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "steps of 30 days, labels 1 minute after their predictions" in " ".join(result.output.split())


def test_a_breach_by_a_champion_swapped_in_before_the_change_starts_its_own_run() -> None:
    """Hourly energy load with a seasonal drift before the change: v3 breached for weeks, was swapped for v4
    the day before the change; v4's first judged run breached on the change (an MAE 4x its yardstick, the
    policy's own count at 1, "hysteresis 1/2"), yet was reported as continuing a run of v1's, v2's and
    v3's breaches begun months before, with a warning that its delay did not measure how soon the monitor
    saw it."""
    from types import SimpleNamespace

    from monitor.backtest.results import _detection, carried_breach_warnings

    def at(month: int, day: int) -> datetime:
        return datetime(2023, month, day, tzinfo=UTC)

    change = at(8, 1)
    runs = [
        (at(5, 15), "breach", 1), (at(5, 22), "breach", 1), (at(5, 29), "insufficient", 2),
        (at(7, 17), "breach", 3), (at(7, 24), "breach", 3), (at(7, 31), "breach", 3),  # v4 promoted on 7-31
        (at(8, 7), "insufficient", 4), (at(8, 14), "breach", 4),
    ]  # fmt: skip
    monitors = [
        SimpleNamespace(at=t, verdict=v, breach=v == "breach", champion_version=c) for t, v, c in runs
    ]
    trace = SimpleNamespace(monitors=monitors, retrains=[])
    replay = SimpleNamespace(
        settings=SimpleNamespace(min_labelled_rows=1, min_window_rows=1),
        config=SimpleNamespace(label_delay=timedelta(days=2)),
    )
    times = np.array(
        [np.datetime64("2023-05-01T00:00", "ns") + np.timedelta64(h, "h") for h in range(24 * 120)]
    )
    detection = _detection(replay, trace, change, None, times)  # type: ignore[arg-type]
    assert (detection.first_breach_at, detection.breaching_since) == (at(8, 14), None)
    assert carried_breach_warnings(SimpleNamespace(policy="drift", detections=(detection,))) == []  # type: ignore[arg-type]
    # Had v3 still served on the 14th, its breach would continue v3's run, begun on 7-17 (not v1's on 5-15).
    monitors[-2:] = [SimpleNamespace(at=at(8, 14), verdict="breach", breach=True, champion_version=3)]
    assert _detection(replay, trace, change, None, times).breaching_since == at(7, 17)  # type: ignore[arg-type]


def test_each_policy_keeps_one_colour_and_none_is_the_breach_bands_red() -> None:
    """The plot coloured policies by their order in --policies: the oracle of a full run was drawn in the
    red of the drift policy's breach bands, and drift was green in one run's plot and blue in the next's."""
    from monitor.backtest.replay import POLICIES
    from monitor.backtest.results import BREACH_COLOR, POLICY_COLORS

    colours = [POLICY_COLORS[p] for p in POLICIES]
    assert len(set(colours)) == len(POLICIES) and BREACH_COLOR not in colours


def test_the_error_axis_names_the_step_in_its_own_unit() -> None:
    """A 12-hour --step was labelled "MAE per 1-day period", and a 36-hour one the same."""
    from monitor.backtest.results import error_axis_label

    assert error_axis_label(timedelta(hours=12)) == "MAE per step (12 hours)"
    assert error_axis_label(timedelta(hours=36)) == "MAE per step (36 hours)"
    assert error_axis_label(timedelta(days=7)) == "MAE per step (7 days)"


def test_the_output_paths_are_printed_as_given(tmp_path: Path) -> None:
    """--out is the user's text: '[/]' in it ended a finished backtest in a rich MarkupError traceback."""
    out = tmp_path / "[/]bt"
    result = backtest(out, "--data", "generated:none", "--rows", "2000", "--policies", "never")
    assert result.exit_code == 0, result.output
    printed = "".join(result.output.splitlines())  # rich wraps the long paths at the terminal's width
    for kind, name in (("summary", "summary.json"), ("periods", "periods.csv"), ("plot", "backtest.png")):
        assert f"{kind}: {out / name}" in printed


def test_a_csv_is_named_as_given(tmp_path: Path) -> None:
    """The --data path is the user's text: '[/]' in it ended the backtest in a rich MarkupError traceback
    before its first step."""
    history = tmp_path / "d[/]" / "history.csv"
    history.parent.mkdir(parents=True)
    generate_transactions(3000).to_csv(history, index=False)
    result = backtest(tmp_path / "out", "--data", str(history), "--policies", "never")
    assert result.exit_code == 0, result.output
    assert f"{history}: 3,000 rows; v1 trains before" in "".join(result.output.splitlines())
