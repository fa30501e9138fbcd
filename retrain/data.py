"""Reading labelled data and splitting it by time."""

from __future__ import annotations

import csv
from array import array
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from core.csvcheck import FUTURE_SLACK
from core.files import missing_columns, read_errors
from core.spec import MAX_MAGNITUDE, Feature, FeatureSpec, FeatureType, lookalike_hint
from core.times import (
    ISO_EXAMPLE,
    OUT_OF_RANGE,
    ZONE_ADVICE,
    guess_format,
    ns_times,
    out_of_range,
    parse_times,
    zone_names,
)


class DataError(ValueError):
    """Labelled data that does not fit the spec; the message names the column or row."""


class MissingColumnsError(DataError):
    """The header lacks columns the spec reads; a caller that knows where the spec came from may say so."""


@dataclass(frozen=True, slots=True)
class Rows:
    """How a message names a frame's row: by its line in the CSV it came from (blank lines and quoted line
    breaks make that differ from its position), or else by position, the first data row being row 2."""

    lines: np.ndarray | None = None

    def name(self, position: int) -> str:
        return f"line {int(self.lines[position])}" if self.lines is not None else f"row {position + 2}"


def read_labelled_csv(
    path: Path, spec: FeatureSpec, *, time_ordered: bool = False, now: datetime | None = None
) -> pd.DataFrame:
    """A CSV with every spec feature and the target; the time column (if the spec has one) parsed as UTC,
    refused with `time_ordered` unless its rows are in time order, and given `now` if a time is more than a
    day ahead of it, as ingest refuses one (a typo or a misread format). Errors name the file's line.

    Categorical columns are read as text, exactly as written ("01" stays "01", "NA" is a category), and
    only an empty cell is missing in them; numbers read as pandas does.
    """
    required = [*spec.feature_names, spec.target] + ([spec.time_column] if spec.time_column else [])
    header, odd, lines = _scan(path)
    _check_header(path, header, odd, required)
    frame = _read(path, spec.categorical_features)
    # Should pandas and csv ever count the rows differently, rows are named by position rather than wrongly
    rows = Rows(lines if len(lines) == len(frame) else None)
    if column := spec.time_column:
        frame[column] = _times(frame[column], column, path, rows)
        _check_times(frame[column], column, path, rows, time_ordered=time_ordered, now=now)
    frame[spec.target] = _target(frame[spec.target], spec, path, rows)
    check_features(frame, spec, source=str(path), rows=rows)
    return frame


def _read(path: Path, categorical: list[str]) -> pd.DataFrame:
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
    return frame


def _check_times(
    times: pd.Series, column: str, path: Path, rows: Rows, *, time_ordered: bool, now: datetime | None
) -> None:
    if now is not None and len(ahead := np.flatnonzero(times > now + FUTURE_SLACK)):
        raise DataError(
            f"{path}: column {column!r} has {len(ahead)} time(s) more than a day ahead of now "
            f"({now:%Y-%m-%d %H:%M} UTC), first at {rows.name(ahead[0])} "
            f"({times.iloc[ahead[0]]:%Y-%m-%d %H:%M})"
        )
    if time_ordered and (back := unordered(times)) is not None:
        raise DataError(
            f"{path}: not sorted by {column!r}: {rows.name(back)} ({times.iloc[back]}) comes after "
            f"{rows.name(back - 1)} ({times.iloc[back - 1]}); sort the file by time"
        )


def _target(written: pd.Series, spec: FeatureSpec, path: Path, rows: Rows) -> pd.Series:
    """The target as floats, refused where it is missing, not a number or outside the spec's bounds."""
    target = pd.to_numeric(written.mask(_true_false(written)), errors="coerce")
    bad = np.flatnonzero(target.isna())
    if len(bad):
        value = written.iloc[bad[0]]
        raise DataError(
            f"{path}: target {spec.target!r} is missing or not a number in {len(bad)} row(s), "
            f"first at {rows.name(bad[0])} ({MISSING_NUMBER if pd.isna(value) else repr(plain(value))})"
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
        at = np.flatnonzero(outside)
        if len(at):
            raise DataError(
                f"{path}: target {spec.target!r} {what} in {len(at)} row(s), first at {rows.name(at[0])} "
                f"({target.iloc[at[0]]:g})"
            )
    return target.astype(float)


def unordered(times: pd.Series) -> int | None:
    """The position of the first time earlier than the one before it, if any."""
    back = np.flatnonzero(np.diff(ns_times(times).astype(np.int64)) < 0)
    return int(back[0]) + 1 if back.size else None


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


def _scan(path: Path) -> tuple[list[str], _OddRows, np.ndarray]:
    """The header, the rows not as wide as it, and each row's first line (blank lines are no rows), read
    once with csv."""
    odd, lines = _OddRows(), array("q")
    try:
        with read_errors(path, DataError, kind="CSV file"), path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path} is empty: the first line must be the header")
            line = reader.line_num + 1
            for fields in reader:
                if fields:
                    lines.append(line)
                    if len(fields) != len(header):
                        odd.add(line, fields)
                line = reader.line_num + 1
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x}); save it as UTF-8"
        ) from None
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable CSV: {exc}") from None
    return header, odd, np.frombuffer(lines, dtype=np.int64)


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


def _times(values: pd.Series, column: str, path: Path, rows: Rows) -> pd.Series:
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
            f"first at {rows.name(zoned[0])} ({values.iloc[zoned[0]]}); {ZONE_ADVICE}"
        )
    guess = guess_format(values)
    parsed = parse_times(values, guess[1] if guess else None)
    bad = np.flatnonzero(parsed.isna())
    if len(bad):
        first = values.iloc[bad[0]]
        outside = isinstance(first, str) and out_of_range(first, guess[1] if guess else None)
        why = (
            OUT_OF_RANGE if outside else "every time must be a date or time in one format, ISO 8601 is safest"
        )
        raise DataError(
            f"{path}: column {column!r} has {len(bad)} unparsable value(s), first at {rows.name(bad[0])} "
            f"({_shown(first)}); {why}"
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


def check_features(frame: pd.DataFrame, spec: FeatureSpec, *, source: str, rows: Rows = Rows()) -> None:
    """Every feature column against the spec (categories, numbers, bounds, whole numbers, nullability).

    Raises DataError naming each offending column, how many rows, and the first (as `rows` names it).
    """
    problems = [p for f in spec.features if (p := _column_problem(frame[f.name], f, source, rows))]
    if problems:
        raise DataError("; ".join(problems))


def _column_problem(values: pd.Series, feature: Feature, source: str, rows: Rows) -> str | None:
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
        f"first at {rows.name(first)} ({shown})"
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
