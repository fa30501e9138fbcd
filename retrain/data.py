"""Reading labelled data and splitting it by time."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from core.files import missing_columns, read_errors
from core.spec import MAX_MAGNITUDE, Feature, FeatureSpec, FeatureType, lookalike_hint
from core.times import ISO_EXAMPLE, ZONE_ADVICE, guess_format, parse_times, zone_names


class DataError(ValueError):
    """Labelled data that does not fit the spec; the message names the column or row."""


class MissingColumnsError(DataError):
    """The header lacks columns the spec reads; a caller that knows where the spec came from may say so."""


def read_labelled_csv(path: Path, spec: FeatureSpec) -> pd.DataFrame:
    """A CSV with every spec feature and the target; the time column (if the spec has one) parsed as UTC.

    Categorical columns are read as text, exactly as written ("01" stays "01", "NA" is a category), and
    only an empty cell is missing in them; numbers read as pandas does.
    """
    required = [*spec.feature_names, spec.target] + ([spec.time_column] if spec.time_column else [])
    _check_header(path, *_header_and_odd_rows(path), required)
    categorical = spec.categorical_features
    try:  # index_col=False: the first column is never taken as the index, shifting the others
        frame = pd.read_csv(path, index_col=False, dtype=dict.fromkeys(categorical, "string"))
        if categorical:  # again, as written: pandas would read "NA" or "null" as missing
            text = pd.read_csv(
                path, index_col=False, usecols=categorical, dtype="string", keep_default_na=False,
                na_values=[""],
            )  # fmt: skip
            frame[categorical] = text[categorical]
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV: {exc}") from exc
    if frame.empty:
        raise DataError(f"{path}: no data rows, only a header")
    if spec.time_column:
        frame[spec.time_column] = _times(frame[spec.time_column], spec.time_column, path)
    written_target = frame[spec.target]
    target = pd.to_numeric(written_target.mask(_true_false(written_target)), errors="coerce")
    bad = np.flatnonzero(target.isna())
    if len(bad):
        written = written_target.iloc[bad[0]]
        raise DataError(
            f"{path}: target {spec.target!r} is missing or not a number in {len(bad)} row(s), "
            f"first at row {bad[0] + 2} ({MISSING_NUMBER if pd.isna(written) else repr(plain(written))})"
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
        rows = np.flatnonzero(outside)
        if len(rows):
            raise DataError(
                f"{path}: target {spec.target!r} {what} in {len(rows)} row(s), first at row {rows[0] + 2} "
                f"({target.iloc[rows[0]]:g})"
            )
    frame[spec.target] = target.astype(float)
    check_features(frame, spec, source=str(path))
    return frame


@dataclass(slots=True)
class _OddRows:
    """Rows whose number of fields differs from the header's: pandas would shift or pad their columns."""

    count: int = 0
    first_line: int = 0
    widths: set[int] = field(default_factory=set)
    empty_last: bool = True  # every such row's last field is empty

    def add(self, line: int, fields: list[str]) -> None:
        self.first_line = self.first_line or line
        self.count += 1
        self.widths.add(len(fields))
        self.empty_last = self.empty_last and fields[-1].strip() == ""


def _header_and_odd_rows(path: Path) -> tuple[list[str], _OddRows]:
    """The header, and the rows not as wide as it (blank lines are no rows), read once with csv."""
    odd = _OddRows()
    try:
        with read_errors(path, DataError, kind="CSV file"), path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path} is empty: the first line must be the header")
            line = 2
            for fields in reader:
                if fields and len(fields) != len(header):
                    odd.add(line, fields)
                line = reader.line_num + 1
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x}); save it as UTF-8"
        ) from None
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable CSV: {exc}") from None
    return header, odd


def _check_header(path: Path, header: list[str], odd: _OddRows, required: list[str]) -> None:
    """Every column the spec reads named once (pandas would rename a second one), and every row as wide as
    the header."""
    twice = [
        f"column {name!r} appears {'twice' if n == 2 else f'{n} times'} in the header"
        for name in dict.fromkeys(required)
        if (n := header.count(name)) > 1
    ]
    if twice:
        raise DataError(f"{path}: {'; '.join(twice)}")
    if missing := missing_columns(header, required):
        raise MissingColumnsError(f"{path}: missing column(s): {missing}")
    if odd.count:
        width = len(header)
        if len(odd.widths) > 1:
            raise DataError(
                f"{path}: {odd.count} row(s) have another number of fields than the header's {width}, "
                f"first at line {odd.first_line}"
            )
        hint = " (a trailing comma?)" if odd.empty_last and odd.widths == {width + 1} else ""
        raise DataError(
            f"{path}: {odd.count} row(s) have {min(odd.widths)} fields, the header {width}{hint}; "
            f"first at line {odd.first_line}"
        )


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
    zoned = np.flatnonzero(zone_names(values).notna())
    if len(zoned):
        raise DataError(
            f"{path}: column {column!r} has {len(zoned)} time(s) naming their time zone, which is not read, "
            f"first at row {zoned[0] + 2} ({values.iloc[zoned[0]]}); {ZONE_ADVICE}"
        )
    guess = guess_format(values)
    parsed = parse_times(values, guess[1] if guess else None)
    bad = np.flatnonzero(parsed.isna())
    if len(bad):
        raise DataError(
            f"{path}: column {column!r} has {len(bad)} unparsable value(s), first at row {bad[0] + 2} "
            f"({_shown(values.iloc[bad[0]])}); every time must be a date or time in one format, ISO 8601 is "
            "safest"
        )
    return parsed


def _true_false(values: pd.Series) -> np.ndarray:
    """The cells pandas read as booleans (from True/False): to_numeric would take them as 1/0, where ingest
    and /predict refuse them as numbers. Only a bool or object column can hold one, so a column of numbers
    costs no look at each cell."""
    if pd.api.types.is_bool_dtype(values.dtype):
        return np.ones(len(values), dtype=bool)
    if values.dtype != object:
        return np.zeros(len(values), dtype=bool)
    truth: np.ndarray = values.map(lambda v: isinstance(v, bool | np.bool_)).to_numpy(dtype=bool)
    return truth


# A number column's cell pandas read as missing: the text is gone, and it may not have been empty.
MISSING_NUMBER = "empty, or a mark pandas reads as missing: NA, N/A, NULL, nan…"


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
        truth = _true_false(values)
        numbers = pd.to_numeric(values.mask(truth), errors="coerce").to_numpy(dtype=float)
        bad = ~missing & (truth | ~np.isfinite(numbers))
        what = "values that are not finite numbers"
        if truth.any():
            what += " (true/false: write 1/0, or make the feature categorical)"
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
    value = plain(values.iloc[first])
    hint = lookalike_hint(value, feature.categories) if isinstance(value, str) else ""
    shown = f"{value!r}{hint}"
    if missing[first]:  # not <NA> or nan, which the cell does not hold; only an empty one in a category
        categorical = feature.type is FeatureType.categorical
        shown = "empty" if categorical else MISSING_NUMBER
    return (
        f"{source}: column {feature.name!r} has {int(bad.sum())} row(s) with {what}, "
        f"first at row {first + 2} ({shown})"
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
