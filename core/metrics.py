"""Every Prometheus metric driftloop exports, built on a registry that the caller passes in.

Names here are a contract with dashboards/ and prometheus/ rules: rename only with them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from core.settings import Settings
    from core.spec import FeatureSpec

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Prediction values span orders of magnitude (prices, counts): log-spaced buckets.
VALUE_BUCKETS = tuple(float(10**e * m) for e in range(0, 7) for m in (1, 2, 5))
EXAMPLE = "0.1,0.5,1,5"
BOUNDED_BUCKETS = 20  # equal buckets across [target_min, target_max] when the spec sets both
LOGGER_OUTCOMES = ("logged", "spooled", "replayed", "dropped")
FEEDBACK_OUTCOMES = ("accepted", "updated", "duplicate", "unknown")
RETRAIN_STATUSES = ("promoted", "rejected", "failed")
RETRAIN_TRIGGERS = ("drift", "accuracy", "manual", "schedule")
MONITOR_OUTCOMES = ("ok", "breach", "insufficient", "error")
NOTIFICATION_OUTCOMES = ("delivered", "failed", "retried", "suppressed", "skipped")


@dataclass(frozen=True, slots=True)
class Metrics:
    # serving
    http_requests: Counter
    http_errors: Counter
    http_seconds: Histogram
    predictions: Counter
    predict_seconds: Histogram
    prediction_value: Histogram
    model_info: Gauge
    model_loaded: Gauge
    model_swaps: Counter
    champion_created: Gauge
    feedback: Counter
    # prediction logger
    logger_rows: Counter
    logger_queue_depth: Gauge
    logger_spool_rows: Gauge
    # monitor
    drift_share: Gauge
    drift_weighted_score: Gauge
    drift_share_threshold: Gauge
    drift_weighted_threshold: Gauge
    feature_drift_score: Gauge
    feature_drift_detected: Gauge
    prediction_drift_score: Gauge
    drift_breach: Gauge
    window_rows: Gauge
    window_labelled_rows: Gauge
    min_labelled_rows: Gauge
    mae_degradation_ratio: Gauge
    window_mae: Gauge
    window_rmse: Gauge
    window_mean_error: Gauge
    window_mape: Gauge
    champion_validation_mae: Gauge
    champion_baseline_mae: Gauge
    monitor_runs: Counter
    monitor_seconds: Histogram
    monitor_last_run: Gauge
    monitor_interval: Gauge
    # retraining
    retrain_runs: Counter
    retrain_running: Gauge
    retrain_last_finished: Gauge
    # notifications
    notifications: Counter
    notifications_pending: Gauge


def parse_buckets(text: str) -> tuple[float, ...]:
    """DRIFTLOOP_PREDICTION_BUCKETS: comma-separated finite numbers, increasing (the upper bounds of the
    prediction histogram's buckets; +Inf is added)."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise ValueError(f"give increasing numbers separated by commas, such as {EXAMPLE}")
    values = []
    for part in parts:
        try:
            values.append(float(part))
        except ValueError:
            raise ValueError(f"{part!r} is not a number; give increasing numbers such as {EXAMPLE}") from None
    if not all(math.isfinite(v) for v in values):
        raise ValueError("bucket bounds must be finite (+Inf is always added)")
    if any(b <= a for a, b in pairwise(values)):
        raise ValueError(f"bucket bounds must increase: {text.strip()}")
    return tuple(values)


def prediction_buckets(settings: Settings, spec: FeatureSpec) -> tuple[float, ...]:
    """The prediction histogram's buckets: DRIFTLOOP_PREDICTION_BUCKETS when set; else BOUNDED_BUCKETS equal
    ones across the spec's target range when it sets both ends; else 1, 2, 5 … 5,000,000, which fit prices
    and counts but would put a target in [0, 1] in one bucket (set the setting then)."""
    if settings.prediction_buckets:
        return parse_buckets(settings.prediction_buckets)
    low, high = spec.target_min, spec.target_max
    if low is not None and high is not None:
        # The last bound is target_max itself (low + (high - low) * k / n can fall short of it, leaving the
        # values clipped to it in +Inf alone); a range float64 cannot split into n steps, or none (a
        # constant target), gives fewer buckets rather than one series per repeated bound.
        steps = (low + (high - low) * k / BOUNDED_BUCKETS for k in range(1, BOUNDED_BUCKETS))
        return tuple(sorted({*(step for step in steps if low < step < high), high}))
    return VALUE_BUCKETS


def build_metrics(registry: CollectorRegistry, *, buckets: tuple[float, ...] = VALUE_BUCKETS) -> Metrics:
    """Every metric on `registry`; `buckets`: the prediction histogram's (see `prediction_buckets`)."""
    r = registry
    m = Metrics(
        http_requests=Counter(
            "driftloop_http_requests_total",
            "HTTP requests by endpoint and status; 499: the client hung up before its body was in.",
            ["endpoint", "status"],
            registry=r,
        ),
        http_errors=Counter(
            "driftloop_http_errors_total",
            "HTTP 4xx/5xx answers by endpoint and status.",
            ["endpoint", "status"],
            registry=r,
        ),
        http_seconds=Histogram(
            "driftloop_http_request_seconds",
            "Request handling time.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        ),
        predictions=Counter(
            "driftloop_predictions_total", "Predictions served.", ["model_version"], registry=r
        ),
        predict_seconds=Histogram(
            "driftloop_predict_seconds",
            "Time inside model.predict per request.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        ),
        prediction_value=Histogram(
            "driftloop_prediction_value",
            "Predicted values as served (within the target bounds); buckets: DRIFTLOOP_PREDICTION_BUCKETS.",
            buckets=buckets,
            registry=r,
        ),
        model_info=Gauge(
            "driftloop_model_info", "1 for the model version being served.", ["version"], registry=r
        ),
        model_loaded=Gauge("driftloop_model_loaded", "1 when a champion is loaded and serving.", registry=r),
        model_swaps=Counter(
            "driftloop_model_swaps_total", "Champion swaps performed by this process.", registry=r
        ),
        champion_created=Gauge(
            "driftloop_champion_created_timestamp_seconds",
            "When the served champion was trained.",
            registry=r,
        ),
        feedback=Counter(
            "driftloop_feedback_total", "Ground-truth labels received.", ["outcome"], registry=r
        ),
        logger_rows=Counter(
            "driftloop_logger_rows_total", "Prediction-log rows by outcome.", ["outcome"], registry=r
        ),
        logger_queue_depth=Gauge(
            "driftloop_logger_queue_depth", "Prediction-log rows waiting in memory.", registry=r
        ),
        logger_spool_rows=Gauge(
            "driftloop_logger_spool_rows",
            "Prediction-log rows on the disk spool awaiting replay.",
            registry=r,
        ),
        drift_share=Gauge(
            "driftloop_drift_share", "Share of features drifted in the last window.", registry=r
        ),
        drift_weighted_score=Gauge(
            "driftloop_drift_weighted_score",
            "Importance-weighted drift score of the last window.",
            registry=r,
        ),
        drift_share_threshold=Gauge(
            "driftloop_drift_share_threshold", "Configured drift-share threshold.", registry=r
        ),
        drift_weighted_threshold=Gauge(
            "driftloop_drift_weighted_threshold", "Configured weighted drift threshold.", registry=r
        ),
        feature_drift_score=Gauge(
            "driftloop_feature_drift_score", "Per-feature drift statistic.", ["feature"], registry=r
        ),
        feature_drift_detected=Gauge(
            "driftloop_feature_drift_detected", "1 if the feature drifted.", ["feature"], registry=r
        ),
        prediction_drift_score=Gauge(
            "driftloop_prediction_drift_score", "Drift statistic of the prediction column.", registry=r
        ),
        drift_breach=Gauge(
            "driftloop_drift_breach", "1 if the last monitor run breached policy.", registry=r
        ),
        window_rows=Gauge("driftloop_window_rows", "Rows in the last monitored window.", registry=r),
        window_labelled_rows=Gauge(
            "driftloop_window_labelled_rows",
            "Rows in the last accuracy window (the newest labelled rows the champion has not trained on).",
            registry=r,
        ),
        mae_degradation_ratio=Gauge(
            "driftloop_mae_degradation_ratio",
            "Accuracy-window MAE over this times the champion's validation MAE breaches "
            "(DRIFTLOOP_MAE_DEGRADATION_RATIO).",
            registry=r,
        ),
        min_labelled_rows=Gauge(
            "driftloop_min_labelled_rows",
            "Labelled rows the accuracy rule needs to judge a window (DRIFTLOOP_MIN_LABELLED_ROWS).",
            registry=r,
        ),
        window_mae=Gauge("driftloop_window_mae", "MAE on the accuracy window.", registry=r),
        window_rmse=Gauge("driftloop_window_rmse", "RMSE on the accuracy window.", registry=r),
        window_mean_error=Gauge(
            "driftloop_window_mean_error",
            "Mean error (prediction − actual) on the accuracy window: > 0 over-predicts, < 0 under-predicts.",
            registry=r,
        ),
        window_mape=Gauge("driftloop_window_mape", "MAPE (%) on the accuracy window.", registry=r),
        champion_validation_mae=Gauge(
            "driftloop_champion_validation_mae", "The champion's MAE on its validation holdout.", registry=r
        ),
        champion_baseline_mae=Gauge(
            "driftloop_champion_baseline_mae",
            "The best validation MAE of the champion's model line: the accuracy rule's second yardstick.",
            registry=r,
        ),
        monitor_runs=Counter(
            "driftloop_monitor_runs_total", "Monitor runs by outcome.", ["outcome"], registry=r
        ),
        monitor_seconds=Histogram(
            "driftloop_monitor_seconds",
            "Monitor run duration (runs refused because another holds the monitor lease are not timed).",
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
            registry=r,
        ),
        monitor_last_run=Gauge(
            "driftloop_monitor_last_run_timestamp_seconds", "When the monitor last completed.", registry=r
        ),
        monitor_interval=Gauge(
            "driftloop_monitor_interval_seconds", "Configured monitor interval.", registry=r
        ),
        retrain_runs=Counter(
            "driftloop_retrain_runs_total",
            "Finished retrain runs by trigger and status.",
            ["trigger", "status"],
            registry=r,
        ),
        retrain_running=Gauge(
            "driftloop_retrain_running", "1 while a retrain run is in progress.", registry=r
        ),
        retrain_last_finished=Gauge(
            "driftloop_retrain_last_finished_timestamp_seconds",
            "When the last retrain run finished.",
            registry=r,
        ),
        notifications=Counter(
            "driftloop_notifications_total",
            "Notification deliveries by kind and outcome.",
            ["kind", "outcome"],
            registry=r,
        ),
        notifications_pending=Gauge(
            "driftloop_notifications_pending", "Notifications waiting for delivery.", registry=r
        ),
    )
    for outcome in LOGGER_OUTCOMES:
        m.logger_rows.labels(outcome=outcome)
    for outcome in FEEDBACK_OUTCOMES:
        m.feedback.labels(outcome=outcome)
    for outcome in MONITOR_OUTCOMES:
        m.monitor_runs.labels(outcome=outcome)
    for trigger in RETRAIN_TRIGGERS:
        for status in RETRAIN_STATUSES:
            m.retrain_runs.labels(trigger=trigger, status=status)
    return m
