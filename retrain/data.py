"""Reading labelled data and splitting it by time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from core.spec import Feature, FeatureSpec, FeatureType


class DataError(ValueError):
    """Labelled data that does not fit the spec; the message names the column or row."""


def read_labelled_csv(path: Path, spec: FeatureSpec) -> pd.DataFrame:
    """A CSV with every spec feature and the target; the time column (if the spec has one) parsed as UTC."""
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError as exc:
        raise DataError(f"file not found: {path}") from exc
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV: {exc}") from exc
    required = [*spec.feature_names, spec.target] + ([spec.time_column] if spec.time_column else [])
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s): {', '.join(missing)}")
    if spec.time_column:
        parsed = pd.to_datetime(frame[spec.time_column], errors="coerce", utc=True)
        bad = frame.index[parsed.isna()]
        if len(bad):
            raise DataError(
                f"{path}: column {spec.time_column!r} has {len(bad)} unparsable value(s), "
                f"first at row {bad[0] + 2}"
            )
        frame[spec.time_column] = parsed
    target = pd.to_numeric(frame[spec.target], errors="coerce")
    bad = frame.index[target.isna()]
    if len(bad):
        raise DataError(
            f"{path}: target {spec.target!r} is missing or not a number in {len(bad)} row(s), "
            f"first at row {bad[0] + 2}"
        )
    frame[spec.target] = target.astype(float)
    check_features(frame, spec, source=str(path))
    return frame


def check_features(frame: pd.DataFrame, spec: FeatureSpec, *, source: str) -> None:
    """Every feature column against the spec (categories, numbers, bounds, whole numbers, nullability).

    Raises DataError naming each offending column, how many rows, and the first (as a CSV line number).
    """
    problems = [p for f in spec.features if (p := _column_problem(frame[f.name], f, source))]
    if problems:
        raise DataError("; ".join(problems))


def _column_problem(values: pd.Series, feature: Feature, source: str) -> str | None:
    missing = values.isna().to_numpy()
    if feature.type is FeatureType.categorical:
        text = values.astype("string")
        bad = ~missing & ~text.isin(feature.categories).fillna(False).to_numpy(dtype=bool)
        what = "unknown categories"
    else:
        numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
        bad = ~missing & ~np.isfinite(numbers)
        what = "values that are not finite numbers"
        if not bad.any():
            low = feature.min if feature.min is not None else -np.inf
            high = feature.max if feature.max is not None else np.inf
            with np.errstate(invalid="ignore"):
                bad = ~missing & ((numbers < low) | (numbers > high))
            what = f"values outside [{feature.min}, {feature.max}]"
        if not bad.any() and feature.type is FeatureType.integer:
            bad = ~missing & (numbers != np.round(numbers))
            what = "values that are not whole numbers"
    if not feature.nullable and missing.any():
        bad, what = missing, "empty values (the feature is not nullable)"
    if not bad.any():
        return None
    first = int(np.flatnonzero(bad)[0])
    return (
        f"{source}: column {feature.name!r} has {int(bad.sum())} row(s) with {what}, "
        f"first at row {first + 2} ({values.iloc[first]!r})"
    )


def time_split(
    frame: pd.DataFrame, spec: FeatureSpec, *, holdout_fraction: float
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train on the older rows, hold out the most recent `holdout_fraction` (by the spec's time column)."""
    if spec.time_column and spec.time_column in frame:
        frame = frame.sort_values(spec.time_column, kind="stable")
    cut = round(len(frame) * (1 - holdout_fraction))
    cut = min(max(cut, 1), len(frame) - 1)
    return frame.iloc[:cut], frame.iloc[cut:]
