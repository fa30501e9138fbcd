"""The validation gate: a candidate replaces the champion only if it is clearly better and sane."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from catboost import CatBoostRegressor

from core.spec import FeatureSpec
from retrain.train import predict, regression_metrics

# Predictions whose spread is far from the actuals' spread are a collapsed or exploded model.
MIN_SPREAD_RATIO = 0.2
MAX_SPREAD_RATIO = 5.0
TARGET_MIN_SLACK = 0.05  # × the actuals' std: how far under target_min a prediction may dip


@dataclass(frozen=True, slots=True)
class GateResult:
    passed: bool
    reasons: list[str]
    candidate_metrics: dict[str, float]
    champion_metrics: dict[str, float]
    margin: float = 0.0
    checks: dict[str, bool] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, for model_version.metrics and retrain_run.metrics."""
        return {
            "passed": self.passed,
            "reasons": list(self.reasons),
            "margin": self.margin,
            "checks": dict(self.checks),
            "candidate": dict(self.candidate_metrics),
            "champion": dict(self.champion_metrics),
        }


def evaluate_gate(
    *,
    candidate: CatBoostRegressor,
    champion: CatBoostRegressor,
    holdout: pd.DataFrame,
    spec: FeatureSpec,
    margin: float,
) -> GateResult:
    """Pass only if candidate MAE <= champion MAE × (1 − margin) on `holdout` and every sanity check holds.

    Each failed check adds one reason that names it and its figures.
    """
    if len(holdout) == 0:
        return GateResult(False, ["holdout: no rows to validate on"], {}, {}, margin, {"holdout": False})
    actual = holdout[spec.target].to_numpy(dtype=float)
    # Accuracy of what each would serve (clipped to the target bounds); sanity of the models' own output.
    cand_pred = predict(candidate, holdout, spec, raw=True)
    champ_pred = predict(champion, holdout, spec, raw=True)
    cand = _metrics(actual, spec.clip(cand_pred))
    champ = _metrics(actual, spec.clip(champ_pred))

    checks: dict[str, bool] = {}
    reasons: list[str] = []
    threshold = champ["mae"] * (1 - margin)
    checks["mae"] = bool(cand["mae"] <= threshold)  # NaN on either side fails
    if not checks["mae"]:
        reasons.append(
            f"mae: candidate MAE {cand['mae']:.6g} is not <= champion MAE {champ['mae']:.6g} "
            f"× (1 − {margin:g}) = {threshold:.6g} on {actual.size} holdout rows"
        )
    for name, reason in sanity_reasons(cand_pred, actual, spec, champion=champ_pred).items():
        checks[name] = reason is None
        if reason is not None:
            reasons.append(reason)
    return GateResult(not reasons, reasons, cand, champ, margin, checks)


def sanity_reasons(
    predicted: np.ndarray, actual: np.ndarray, spec: FeatureSpec, *, champion: np.ndarray | None = None
) -> dict[str, str | None]:
    """Each sanity check by name → why it failed, or None when it holds. `champion`: its predictions on the
    same rows; the candidate's spread may then be as narrow or as wide as the champion's, and it may dip
    under target_min as often as the champion does, or as there are actuals at the bound (within the
    slack), no more."""
    predicted = np.asarray(predicted, dtype=float)
    actual = np.asarray(actual, dtype=float)
    out: dict[str, str | None] = {"finite": None, "spread": None}
    bad = int((~np.isfinite(predicted)).sum())
    if bad:
        out["finite"] = f"finite: {bad} of {predicted.size} candidate predictions are not finite"
    finite = predicted[np.isfinite(predicted)]
    pred_std = _std(finite)
    actual_std = float(np.std(actual))
    low, high = MIN_SPREAD_RATIO * actual_std, MAX_SPREAD_RATIO * actual_std
    # Features that explain little of the target (a noisy count, a weak spec) give any model of them a
    # narrow spread: a candidate as narrow as the champion (or as wide) is that data, not a broken model.
    champ_std = None if champion is None else _std(np.asarray(champion, dtype=float))
    spread_range = (low, high) if champ_std is None else (min(low, champ_std), max(high, champ_std))
    if pred_std <= 0:
        out["spread"] = "spread: candidate predictions are constant (std 0)"
    elif actual_std > 0 and not spread_range[0] <= pred_std <= spread_range[1]:
        than = "" if champ_std is None else f", and beyond the champion's prediction std {champ_std:.6g}"
        out["spread"] = (
            f"spread: candidate prediction std {pred_std:.6g} is outside [{MIN_SPREAD_RATIO:g}, "
            f"{MAX_SPREAD_RATIO:g}] × actual std {actual_std:.6g} = [{low:.6g}, {high:.6g}]{than}"
        )
    if spec.target_min is not None:
        # A regressor's estimate for rows whose actual sits at the bound (no rentals at 4 am) may dip a
        # little under it: by up to TARGET_MIN_SLACK × the actuals' std, when some actual is that close to
        # the bound. Where every actual is far above it (prices), any value under it is impossible.
        slack = TARGET_MIN_SLACK * actual_std
        if not (actual.size and actual.min() - spec.target_min <= slack):
            slack = 0.0
        below = int((finite < spec.target_min - slack).sum())
        # A count model's champion may dip under the bound too (a quiet night): that is the model family,
        # not a broken candidate, so only a candidate worse at it than the champion is refused.
        champ_dips = (
            0
            if champion is None
            else int((np.asarray(champion, dtype=float) < spec.target_min - slack).sum())
        )
        # Nor is the champion the only yardstick: after a change towards the bound (a rate that fell), a
        # stale champion predicting the old level seldom dips, while a candidate that learnt the new level
        # estimates the rows now at the bound and may undershoot some of them. As many dips as holdout
        # actuals at the bound are such estimates (served clipped to it), not a broken model.
        at_bound = int((actual - spec.target_min <= slack).sum()) if slack else 0
        allowed = max(champ_dips, at_bound)
        by = f" by more than {slack:.6g} ({TARGET_MIN_SLACK:.0%} of the actual std)" if slack else ""
        yardsticks = [f"the champion's {champ_dips}"] if champ_dips else []
        if at_bound:
            yardsticks.append(f"the {at_bound} holdout actual(s) within that of it")
        than = f", more than {' and '.join(yardsticks)}" if yardsticks else ""
        out["target_min"] = (
            f"target_min: {below} of {predicted.size} candidate predictions are below "
            f"{spec.target_min:g}{by}{than}"
            if below > allowed
            else None
        )
    return out


def _metrics(actual: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    metrics = regression_metrics(actual, predicted)
    metrics["prediction_std"] = _std(predicted)
    return metrics


def _std(predicted: np.ndarray) -> float:
    """The standard deviation of the finite predictions (0 for none)."""
    finite = predicted[np.isfinite(predicted)]
    return float(np.std(finite)) if finite.size else 0.0
