"""Drift and accuracy of a window of served predictions against the champion's reference, via Evidently.

Evidently runs per-column `ValueDrift` metrics (its default method choice per column) on a uniform sample of
at most `max_rows` rows, and `MAE`/`RMSE`/`MeanError` on the labelled rows (MAPE is measured here, as the
champion's validation MAPE is). With a reference over 1,000 rows Evidently picks distances (Wasserstein,
Jensen-Shannon), which a large sample estimates closely, so verdicts match `DataDriftPreset` +
`RegressionPreset` on the whole window at a fraction of the time and memory (bench/monitor.py checks this).
A reference of 1,000 rows or fewer gets p-value tests (KS, chi²), whose verdicts do depend on the number of
rows. Where Evidently would pick its chi-square (a categorical column, or a numeric one of 3 to 5 values),
the two-sample chi-square of both sides' counts is run instead (`monitor.drift_tests`). The page is
`monitor.page`'s.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from evidently import DataDefinition, Dataset, Regression, Report
from evidently.core.report import Snapshot
from evidently.legacy.tests.base_test import TestStatus
from evidently.metrics import MAE, RMSE, MeanError, ValueDrift
from sklearn.exceptions import UndefinedMetricWarning

from core.spec import MAX_MAGNITUDE, FeatureSpec
from monitor.drift_tests import display_name, register_two_sample_chi2, value_drift
from monitor.page import DRIFT_TEST_ID, save_page
from retrain.train import PREDICTION, regression_metrics

# How a column judged here, not by Evidently, names its method: `_empty_drift`, `_missing_share_drift`.
NO_VALUES = "no values in"
MISSING_SHARE = "missing share"
# A numeric feature whose share of missing values moved this far (absolute) has drifted, whatever its values
# do: Evidently compares the values alone, so a sensor failing for half the rows went unflagged. Sampling
# moves a share of 500 rows by ~0.02, so 0.1 is a change, not noise.
MISSING_SHARE_SHIFT = 0.1


@dataclass(frozen=True, slots=True)
class FeatureDrift:
    feature: str
    method: str
    score: float
    threshold: float
    detected: bool
    importance: float
    # Judged here (no values on a side, a moved missing share), not by Evidently: the page adds its test.
    judged_here: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "score": _finite(self.score),
            "threshold": _finite(self.threshold),
            "detected": self.detected,
            "importance": _finite(self.importance),
        }


@dataclass(frozen=True, slots=True)
class Accuracy:
    mae: float
    rmse: float
    mape: float  # percent
    rows: int
    mean_error: float = math.nan  # prediction − actual, averaged: > 0 over-predicts, < 0 under-predicts

    def to_json(self) -> dict[str, Any]:
        return {
            "mae": _finite(self.mae),
            "rmse": _finite(self.rmse),
            "mape": _finite(self.mape),
            "mean_error": _finite(self.mean_error),
            "rows": self.rows,
        }


@dataclass(frozen=True, slots=True)
class DriftResult:
    features: tuple[FeatureDrift, ...]
    drift_share: float
    weighted_score: float
    prediction: FeatureDrift | None  # drift of the "prediction" column
    accuracy: Accuracy | None  # None when no row of the window is labelled
    rows: int
    sampled_rows: int
    labelled_rows: int
    # Evidently's own results, the drift one, then the accuracy one when labels were measured: for the
    # Evidently workspace (monitor.workspace). Not part of the report's JSON.
    snapshots: tuple[Snapshot, ...] = field(default=(), repr=False, compare=False)

    def drifted(self) -> list[str]:
        """Names of the drifted features, in spec order."""
        return [f.feature for f in self.features if f.detected]

    def to_json(self) -> dict[str, Any]:
        """JSON-safe (plain floats, NaN as null) for the drift_report row."""
        return {
            "features": {f.feature: f.to_json() for f in self.features},
            "drifted": self.drifted(),
            "drift_share": _finite(self.drift_share),
            "weighted_score": _finite(self.weighted_score),
            "prediction": self.prediction.to_json() if self.prediction else None,
            "accuracy": self.accuracy.to_json() if self.accuracy else None,
            "rows": self.rows,
            "sampled_rows": self.sampled_rows,
            "labelled_rows": self.labelled_rows,
        }


def compute_drift(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    spec: FeatureSpec,
    *,
    importance: Mapping[str, float],
    max_rows: int = 50_000,
    seed: int = 0,
    stattest_threshold: float | None = None,
    html_path: Path | None = None,
    labelled: pd.DataFrame | None = None,
) -> DriftResult:
    """Drift of each spec feature and of the prediction in `current`, and accuracy on `labelled` (by
    default the labelled rows of `current`).

    `reference` holds the spec features, the target and "prediction"; `current` the same, with the target NaN
    where no label has arrived; `labelled` the same. Frames over `max_rows` rows are sampled uniformly (with
    `seed`) before Evidently sees them; the labelled rows are sampled separately. `importance` weighs
    drifted features in `weighted_score` (features it lacks weigh 0; all-zero weights fall back to equal
    weights).
    Raises ValueError naming missing columns, or when a frame is empty.
    """
    if max_rows < 1:
        raise ValueError("max_rows must be >= 1")
    needed = [*spec.feature_names, spec.target, PREDICTION]
    _require_columns(reference, needed, "reference")
    _require_columns(current, needed, "current")
    if reference.empty or current.empty:
        raise ValueError(f"{'reference' if reference.empty else 'current'} has no rows")

    if labelled is not None:
        _require_columns(labelled, needed, "labelled")
    source = current if labelled is None else labelled
    ref = _prepare(_sample(reference, max_rows, seed), spec)
    cur = _prepare(_sample(current, max_rows, seed), spec)
    features, prediction, drift = _drift(ref, cur, spec, importance, stattest_threshold)

    accuracy, accuracy_snapshot = _labelled_accuracy(ref, source, spec, max_rows=max_rows, seed=seed)

    result = DriftResult(
        features=features,
        drift_share=sum(f.detected for f in features) / len(features),
        weighted_score=_weighted_score(features),
        prediction=prediction,
        accuracy=accuracy,
        rows=len(current),
        sampled_rows=len(cur),
        labelled_rows=int(source[spec.target].notna().sum()),
        snapshots=(drift,) if accuracy_snapshot is None else (drift, accuracy_snapshot),
    )
    if html_path is not None:
        save_page(html_path, result, drift, accuracy_snapshot)
    return result


def compute_accuracy(
    reference: pd.DataFrame,
    labelled: pd.DataFrame,
    spec: FeatureSpec,
    *,
    max_rows: int = 50_000,
    seed: int = 0,
) -> Accuracy | None:
    """Accuracy alone on the rows of `labelled` that have an actual (None when none has), as `compute_drift`
    measures it: for a monitor run whose drift window is too short to judge while labels are not."""
    needed = [*spec.feature_names, spec.target, PREDICTION]
    _require_columns(reference, needed, "reference")
    _require_columns(labelled, needed, "labelled")
    ref = _prepare(_sample(reference, max_rows, seed), spec)
    return _labelled_accuracy(ref, labelled, spec, max_rows=max_rows, seed=seed)[0]


def _labelled_accuracy(
    reference: pd.DataFrame, source: pd.DataFrame, spec: FeatureSpec, *, max_rows: int, seed: int
) -> tuple[Accuracy | None, Snapshot | None]:
    """`_accuracy` on a sample of the rows of `source` with an actual; (None, None) when none has."""
    with_actual = np.flatnonzero(source[spec.target].notna().to_numpy())
    if not with_actual.size:
        return None, None
    return _accuracy(reference, _prepare(_sample(source, max_rows, seed, rows=with_actual), spec), spec)


def _drift(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    spec: FeatureSpec,
    importance: Mapping[str, float],
    threshold: float | None,
) -> tuple[tuple[FeatureDrift, ...], FeatureDrift, Snapshot]:
    """One Evidently `ValueDrift` per feature and for the prediction; Evidently picks each method, but for
    its chi-square (see `monitor.drift_tests`).

    A (nullable) column with no value at all on one side or both cannot be compared by Evidently, which
    refuses an empty column; it is judged here instead (see `_empty_drift`), and so is a numeric one whose
    share of missing values moved (`_missing_share_drift`), which Evidently drops before it compares."""
    register_two_sample_chi2()
    empty = {
        name: side
        for name in spec.numeric_features
        if (side := _empty_side(reference[name], current[name])) is not None
    }
    columns = [*(c for c in spec.feature_names if c not in empty), PREDICTION]
    metrics = {c: value_drift(c, reference, current, spec, threshold) for c in columns}
    definition = DataDefinition(
        numerical_columns=[c for c in [*spec.numeric_features, PREDICTION] if c not in empty],
        categorical_columns=spec.categorical_features,
    )
    snapshot = Report(list(metrics.values()), include_tests=True).run(
        Dataset.from_pandas(current[columns], data_definition=definition),
        Dataset.from_pandas(reference[columns], data_definition=definition),
    )
    numeric = set(spec.numeric_features)

    def judged(name: str) -> FeatureDrift:
        weight = float(importance.get(name, 0.0))
        if name in empty:
            return _empty_drift(name, empty[name], weight)
        drift = _feature_drift(snapshot, metrics[name], name, weight)
        return _missing_share_drift(drift, reference[name], current[name]) if name in numeric else drift

    features = tuple(judged(name) for name in spec.feature_names)
    return features, _feature_drift(snapshot, metrics[PREDICTION], PREDICTION, 0.0), snapshot


def _empty_side(reference: pd.Series, current: pd.Series) -> str | None:
    """Which side of a column holds no value at all: "reference", "current", "both", or None."""
    ref, cur = reference.isna().all(), current.isna().all()
    return "both" if ref and cur else "reference" if ref else "current" if cur else None


def _empty_drift(name: str, side: str, importance: float) -> FeatureDrift:
    """A column empty on one side has drifted as far as a column can: a sensor that died (no value in the
    window) or one added since the model was trained (none in its reference). Empty on both sides, it is
    unchanged."""
    drifted = side != "both"
    return FeatureDrift(
        feature=name,
        method=f"{NO_VALUES} {'either' if side == 'both' else 'the ' + side}",
        score=1.0 if drifted else 0.0,
        threshold=math.nan,
        detected=drifted,
        importance=importance,
        judged_here=True,
    )


def _missing_share_drift(drift: FeatureDrift, reference: pd.Series, current: pd.Series) -> FeatureDrift:
    """`drift` (Evidently's, on the values), unless the column's share of missing values moved by
    MISSING_SHARE_SHIFT or more while its values did not: then drifted, scored by that move."""
    before, now = float(reference.isna().mean()), float(current.isna().mean())
    if drift.detected or abs(now - before) < MISSING_SHARE_SHIFT:
        return drift
    return FeatureDrift(
        feature=drift.feature,
        method=f"{MISSING_SHARE} {before:.0%} to {now:.0%}",
        score=abs(now - before),
        threshold=MISSING_SHARE_SHIFT,
        detected=True,
        importance=drift.importance,
        judged_here=True,
    )


def _require_columns(frame: pd.DataFrame, needed: list[str], name: str) -> None:
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise ValueError(f"{name} is missing columns: {', '.join(missing)}")


def _sample(frame: pd.DataFrame, max_rows: int, seed: int, *, rows: np.ndarray | None = None) -> pd.DataFrame:
    """At most `max_rows` of `rows` (positions; default all), uniformly, without replacement, in order."""
    if rows is None:
        if len(frame) <= max_rows:
            return frame
        rows = np.arange(len(frame))
    if rows.size > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=max_rows, replace=False))
    return frame.iloc[rows]


def _prepare(frame: pd.DataFrame, spec: FeatureSpec) -> pd.DataFrame:
    """Spec dtypes; numbers clipped to ±MAX_MAGNITUDE. The service refuses larger ones, but a row written
    some other way must not overflow Evidently's binning and stop every report while it is in the window:
    clipped, it still reads as an outlier."""
    out = spec.coerce(frame)
    out[spec.target] = pd.to_numeric(frame[spec.target], errors="coerce").astype(float).to_numpy()
    out[PREDICTION] = pd.to_numeric(frame[PREDICTION], errors="coerce").astype(float).to_numpy()
    numbers = [*spec.numeric_features, spec.target, PREDICTION]
    out[numbers] = out[numbers].clip(-MAX_MAGNITUDE, MAX_MAGNITUDE)
    return out.reset_index(drop=True)


def _feature_drift(snapshot: Snapshot, metric: ValueDrift, name: str, importance: float) -> FeatureDrift:
    """Score, method and threshold as Evidently resolved them; detected = Evidently's drift test failed."""
    result = snapshot.metric_results[metric.metric_id]
    config = result.to_dict()["config"]
    tests = {t.id: t for t in result.tests}
    if DRIFT_TEST_ID not in tests:
        raise RuntimeError(f"Evidently returned no drift test for column {name!r}")
    method = display_name(str(config["method"]))
    return FeatureDrift(
        feature=name,
        method=method,
        score=float(result.value),
        threshold=float(config["threshold"]),
        detected=tests[DRIFT_TEST_ID].status is TestStatus.FAIL,
        importance=importance,
    )


def _weighted_score(features: tuple[FeatureDrift, ...]) -> float:
    weights = [max(f.importance, 0.0) for f in features]
    total = sum(weights)
    if total <= 0:
        weights, total = [1.0] * len(features), float(len(features))
    return sum(w for w, f in zip(weights, features, strict=True) if f.detected) / total


def _accuracy(
    reference: pd.DataFrame, labelled: pd.DataFrame, spec: FeatureSpec
) -> tuple[Accuracy, Snapshot | None]:
    """Evidently's MAE, RMSE and mean error (the model's bias) on the labelled rows; the reference is shown
    alongside in the report. MAPE is the champion's validation MAPE's (retrain.train.regression_metrics:
    each error over its actual's size, zero actuals skipped), not Evidently's, which divides by
    max(actual, 2.2e-16) (a MAPE of 1e17 % and more for a target that can be negative) and counts a zero
    actual as 100 %; so Evidently's MAPE widget is left off the page, whose summary shows this one.

    Without Evidently's tests: with a reference they ask each figure to equal the reference's within 10 %,
    and the reference's predictions are the champion's on its own training rows, so a window within
    policy (an MAE within `mae_degradation_ratio` of the validation MAE, a bias near 0) failed them on the
    page. The policy judges accuracy (monitor.policy); the page's tests are the drift verdicts alone.

    Where either side has no actual but 0 (a count or a delay that came out 0 for every label so far),
    Evidently's regression figures raise IndexError looking for one: the figures are then numpy's, as
    Evidently's equal them, and the page has no accuracy section."""
    figures = regression_metrics(labelled[spec.target], labelled[PREDICTION])
    if not all((side[spec.target] != 0).any() for side in (reference, labelled)):
        errors = labelled[PREDICTION].to_numpy(dtype=float) - labelled[spec.target].to_numpy(dtype=float)
        mean_error = float(errors.mean())
        return Accuracy(figures["mae"], figures["rmse"], figures["mape"], len(labelled), mean_error), None
    columns = [spec.target, PREDICTION]
    definition = DataDefinition(
        numerical_columns=columns, regression=[Regression(target=spec.target, prediction=PREDICTION)]
    )
    mae, rmse, bias = MAE(), RMSE(), MeanError()
    with warnings.catch_warnings():
        # Evidently's accuracy plots score R² per target bin (a bin may hold one row) and test the errors for
        # normality (undefined for one labelled row): expected here, not a problem to report.
        warnings.filterwarnings("ignore", r"R\^2 score is not well-defined", UndefinedMetricWarning)
        warnings.filterwarnings("ignore", "One or more sample arguments is too small", RuntimeWarning)
        snapshot = Report([mae, rmse, bias], include_tests=False).run(
            Dataset.from_pandas(labelled[columns], data_definition=definition),
            Dataset.from_pandas(reference[columns], data_definition=definition),
        )
    results = snapshot.metric_results
    accuracy = Accuracy(
        mae=float(results[mae.metric_id].mean.value),
        rmse=float(results[rmse.metric_id].value),
        mape=figures["mape"],
        rows=len(labelled),
        mean_error=float(results[bias.metric_id].mean.value),
    )
    return accuracy, snapshot


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None
