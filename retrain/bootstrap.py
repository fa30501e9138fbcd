"""First champion: train v1 on generated (or given) labelled data, register it and promote it. Idempotent."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from catboost import CatBoostRegressor

from core.db import Clock, utcnow
from core.generator import generate_transactions
from core.registry import ChampionChanged, NewVersion, Registry
from core.schema import ModelVersion, Trigger
from core.spec import FeatureSpec
from retrain.data import DataError, plain, read_labelled_csv, time_split
from retrain.dataset import EVENT_TIME, REFERENCE, SOURCE, timed_reference
from retrain.train import (
    MIN_TRAIN_ROWS,
    TrainParams,
    feature_importance,
    predict,
    reference_snapshot,
    regression_metrics,
    train_model,
)


@dataclass(frozen=True, slots=True)
class BootstrapResult:
    version: ModelVersion
    created: bool
    # The version this bootstrap trained and marked rejected, another's v1 promoted first; else None
    rejected: int | None = None


def bootstrap(
    *,
    registry: Registry,
    spec: FeatureSpec,
    params: TrainParams,
    holdout_fraction: float = 0.2,
    data: pd.DataFrame | None = None,
    csv_path: Path | None = None,
    rows: int = 20_000,
    seed: int = 0,
    source: str | None = None,
    clock: Clock = utcnow,
) -> BootstrapResult:
    """Return the existing champion, or train, register and promote v1.

    `source` names the training data in v1's lineage when it is passed in as `data`. Two bootstraps at once
    (two workers started together on an empty database) both train, but only the first to promote makes its
    model the champion; the other marks its own version rejected and returns that champion.
    """
    existing = registry.champion()
    if existing is not None:
        registry.load(existing, spec=spec)  # FeatureMismatchError for another spec's model
        return BootstrapResult(existing, created=False)
    if data is None and csv_path is not None:
        # v1's train_end ahead of now would hide every label until then from the accuracy window
        data = read_labelled_csv(csv_path, spec, now=clock())
    elif data is None:
        data = generate_transactions(rows, seed=seed)
        missing = [c for c in (*spec.feature_names, spec.target) if c not in data.columns]
        if missing:  # the generator makes apartment sales only
            raise DataError(
                f"no --csv given, and the generated apartment data has no column(s) {', '.join(missing)} "
                f"of spec '{spec.dataset}': train v1 on your own labelled data with --csv FILE"
            )
    train, holdout = time_split(data, spec, holdout_fraction=holdout_fraction)
    _check_learnable(train, spec, rows=len(data), where=str(csv_path) if csv_path else source or "the data")
    model = train_model(train, spec, params)
    metrics = {
        "val_" + k: v
        for k, v in regression_metrics(holdout[spec.target].to_numpy(), predict(model, holdout, spec)).items()
    }
    times = data[spec.time_column] if spec.time_column and spec.time_column in data else None
    row = registry.register(
        NewVersion(
            model=model,
            reference=_reference(model, data, spec, times=times, seed=seed),
            trigger=Trigger.bootstrap,
            metrics=metrics,
            params=params.as_dict(),
            train_rows=len(train),
            train_start=times.min().to_pydatetime() if times is not None else None,
            train_end=times.max().to_pydatetime() if times is not None else None,
            feature_importance=feature_importance(model, spec),
            data_sources={
                "bootstrap": source
                or (str(csv_path) if csv_path else f"generated:none seed={seed} rows={rows}")
            },
        )
    )
    try:
        promoted = registry.promote(version=row.version, reason="bootstrap", first=True)
    except ChampionChanged:
        winner = registry.champion()
        if winner is None:  # a champion is replaced, never unset
            raise
        registry.reject(
            version=row.version, reason=f"bootstrap: v{winner.version}, trained meanwhile, is champion"
        )
        return BootstrapResult(winner, created=False, rejected=row.version)
    return BootstrapResult(promoted, created=True)


def _check_learnable(train: pd.DataFrame, spec: FeatureSpec, *, rows: int, where: str) -> None:
    """A DataError naming the problem, where CatBoost would stop with a traceback (no rows, one target value)
    or train v1 on a handful of rows."""
    if len(train) < MIN_TRAIN_ROWS:
        raise DataError(
            f"{where}: {rows} labelled row(s), of which {len(train)} to train v1 on (the rest validate it); "
            f"it needs at least {MIN_TRAIN_ROWS}"
        )
    values = train[spec.target].unique()
    if len(values) == 1:
        raise DataError(
            f"{where}: target {spec.target!r} is {plain(values[0])} in every one of v1's {len(train)} "
            "training rows: a model cannot learn from a target that never varies"
        )


def _reference(
    model: CatBoostRegressor, data: pd.DataFrame, spec: FeatureSpec, *, times: pd.Series | None, seed: int
) -> pd.DataFrame:
    """v1's reference snapshot, with each row's event time when the data has them: a windowed retrain
    (DRIFTLOOP_TRAIN_WINDOW_DAYS) then keeps only the history inside its window, as it does for every later
    generation's reference (retrain.dataset.candidate_reference), rather than all of it stamped with v1's
    train_end."""
    if times is None:
        return reference_snapshot(model, data, spec, seed=seed)
    timed = data.assign(**{EVENT_TIME: pd.to_datetime(times, utc=True), SOURCE: REFERENCE})
    return timed_reference(model, timed, spec, seed=seed)
