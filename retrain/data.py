"""Reading labelled data and splitting it by time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from core.spec import MAX_MAGNITUDE, Feature, FeatureSpec, FeatureType
from core.times import ISO_EXAMPLE, guess_format, parse_times


class DataError(ValueError):
    """Labelled data that does not fit the spec; the message names the column or row."""


def read_labelled_csv(path: Path, spec: FeatureSpec) -> pd.DataFrame:
    """A CSV with every spec feature and the target; the time column (if the spec has one) parsed as UTC.

    Categorical columns are read as text, exactly as written ("01" stays "01", "NA" is a category), and
    only an empty cell is missing in them; numbers read as pandas does.
    """
    categorical = spec.categorical_features
    try:
        frame = pd.read_csv(path, dtype=dict.fromkeys(categorical, "string"))
        present = [c for c in categorical if c in frame.columns]
        if present:  # again, as written: pandas would read "NA" or "null" as missing
            text = pd.read_csv(path, usecols=present, dtype="string", keep_default_na=False, na_values=[""])
            frame[present] = text[present]
    except FileNotFoundError as exc:
        raise DataError(f"file not found: {path}") from exc
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV: {exc}") from exc
    required = [*spec.feature_names, spec.target] + ([spec.time_column] if spec.time_column else [])
    missing = [c for c in required if c not in frame.columns]
    if missing:
        hint = ""
        if len(frame.columns) == 1 and ";" in str(frame.columns[0]):
            hint = " (the header is one column holding ';': save the file comma-separated)"
        raise DataError(f"{path}: missing column(s): {', '.join(missing)}{hint}")
    if frame.empty:
        raise DataError(f"{path}: no data rows, only a header")
    if spec.time_column:
        frame[spec.time_column] = _times(frame[spec.time_column], spec.time_column, path)
    target = pd.to_numeric(frame[spec.target], errors="coerce")
    bad = frame.index[target.isna()]
    if len(bad):
        raise DataError(
            f"{path}: target {spec.target!r} is missing or not a number in {len(bad)} row(s), "
            f"first at row {bad[0] + 2}"
        )
    limits = [
        (~np.isfinite(target), "is infinite"),
        (target.abs() > MAX_MAGNITUDE, f"is beyond ±{MAX_MAGNITUDE:g}"),
    ]
    if spec.target_min is not None:
        limits.append((target < spec.target_min, f"is below the spec's target_min {spec.target_min:g}"))
    if spec.target_max is not None:
        limits.append((target > spec.target_max, f"is above the spec's target_max {spec.target_max:g}"))
    for outside, what in limits:
        rows = frame.index[outside]
        if len(rows):
            raise DataError(
                f"{path}: target {spec.target!r} {what} in {len(rows)} row(s), first at row {rows[0] + 2} "
                f"({target[rows[0]]:g})"
            )
    frame[spec.target] = target.astype(float)
    check_features(frame, spec, source=str(path))
    return frame


def _times(values: pd.Series, column: str, path: Path) -> pd.Series:
    """The time column as UTC, read as core.times reads every file's times: one format inferred once (from
    the first value that has one), or else any ISO 8601 form; numbers are refused, not read as
    nanoseconds."""
    if values.isna().all():
        raise DataError(f"{path}: column {column!r} is empty")
    if pd.api.types.is_numeric_dtype(values):
        raise DataError(
            f"{path}: column {column!r} holds numbers (first {plain(values.iloc[0])}), not dates or times; "
            f"write them as e.g. {ISO_EXAMPLE}"
        )
    guess = guess_format(values)
    parsed = parse_times(values, guess[1] if guess else None)
    bad = values.index[parsed.isna()]
    if len(bad):
        raise DataError(
            f"{path}: column {column!r} has {len(bad)} unparsable value(s), first at row {bad[0] + 2} "
            f"({_shown(values[bad[0]])}); every time must be a date or time in one format, ISO 8601 is safest"
        )
    return parsed


def _shown(value: object) -> object:
    return "empty" if pd.isna(value) else plain(value)


def plain(value: object) -> object:
    """A value as a message should show it: a numpy scalar as the Python value it holds (30, not
    np.int64(30)), and a whole float as an integer (100000, not 100000.0 or 1e+05)."""
    value = value.item() if isinstance(value, np.generic) else value
    return int(value) if isinstance(value, float) and value.is_integer() else value


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
        shown = ", ".join(feature.categories[:10]) + (", …" if len(feature.categories) > 10 else "")
        what = f"unknown categories (the spec's: {shown})"
    else:
        numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
        bad = ~missing & ~np.isfinite(numbers)
        what = "values that are not finite numbers"
        if not bad.any():
            low = feature.min if feature.min is not None else -MAX_MAGNITUDE
            high = feature.max if feature.max is not None else MAX_MAGNITUDE
            with np.errstate(invalid="ignore"):
                bad = ~missing & ((numbers < low) | (numbers > high))
            what = f"values outside [{low:g}, {high:g}]"
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
        f"first at row {first + 2} ({plain(values.iloc[first])!r})"
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
