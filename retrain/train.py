"""Training and scoring a CatBoost regressor on the columns the feature spec names."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from catboost import CatBoostRegressor

from core.settings import Settings
from core.spec import FeatureSpec

PREDICTION = "prediction"
REFERENCE_MAX_ROWS = 20_000
MIN_TRAIN_ROWS = 10  # fewer rows than this train nothing worth serving or gating


@dataclass(frozen=True, slots=True)
class TrainParams:
    iterations: int = 300
    depth: int = 6
    learning_rate: float = 0.1
    task_type: str = "CPU"
    thread_count: int = 1
    random_seed: int = 0
    loss_function: str = "RMSE"

    @classmethod
    def from_settings(cls, settings: Settings) -> TrainParams:
        return cls(
            iterations=settings.train_iterations,
            depth=settings.train_depth,
            learning_rate=settings.train_learning_rate,
            task_type=settings.train_task_type,
            thread_count=settings.train_thread_count,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_model(
    train: pd.DataFrame, spec: FeatureSpec, params: TrainParams, *, sample_weight: np.ndarray | None = None
) -> CatBoostRegressor:
    model = CatBoostRegressor(
        iterations=params.iterations,
        depth=params.depth,
        learning_rate=params.learning_rate,
        task_type=params.task_type,
        thread_count=params.thread_count,
        random_seed=params.random_seed,
        loss_function=params.loss_function,
        cat_features=spec.categorical_features,
        allow_writing_files=False,
        verbose=False,
    )
    model.fit(spec.coerce(train), train[spec.target].astype(float), sample_weight=sample_weight)
    return model


def predict(
    model: CatBoostRegressor, frame: pd.DataFrame, spec: FeatureSpec, *, raw: bool = False
) -> np.ndarray:
    """The predictions the service would answer: clipped to the spec's target bounds unless `raw` (the
    model's own output, which the gate's sanity checks judge)."""
    values = np.asarray(model.predict(spec.coerce(frame)), dtype=float)
    return values if raw else spec.clip(values)


def regression_metrics(actual: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """MAE, RMSE and MAPE (%, over non-zero actuals)."""
    actual = np.asarray(actual, dtype=float)
    err = np.asarray(predicted, dtype=float) - actual
    nonzero = actual != 0
    mape = float(np.mean(np.abs(err[nonzero] / actual[nonzero])) * 100) if nonzero.any() else float("nan")
    return {
        "mae": float(np.mean(np.abs(err))),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "mape": mape,
        "rows": int(actual.size),
    }


def feature_importance(model: CatBoostRegressor, spec: FeatureSpec) -> dict[str, float]:
    """CatBoost's importance per feature, normalised to sum to 1."""
    raw = dict(zip(model.feature_names_, model.get_feature_importance(), strict=True))
    total = sum(raw.values()) or 1.0
    return {name: float(raw.get(name, 0.0)) / total for name in spec.feature_names}


def reference_snapshot(
    model: CatBoostRegressor, frame: pd.DataFrame, spec: FeatureSpec, *, seed: int = 0
) -> pd.DataFrame:
    """Features, target and the model's own predictions: what the monitor compares windows against."""
    if len(frame) > REFERENCE_MAX_ROWS:
        frame = frame.sample(REFERENCE_MAX_ROWS, random_state=seed)
    ref = spec.coerce(frame)
    ref[spec.target] = frame[spec.target].astype(float).to_numpy()
    ref[PREDICTION] = predict(model, frame, spec)
    return ref.reset_index(drop=True)
