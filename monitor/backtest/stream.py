"""The history a backtest replays: a time-ordered labelled data set, checked whole before any work starts."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from core.generator import SCENARIOS, generate_transactions
from core.generator import to_utc as _utc
from core.spec import FeatureSpec
from core.times import ISO_EXAMPLE, ZONE_ADVICE, zone_names
from retrain.data import DataError, MissingColumnsError, check_features, plain, read_labelled_csv, unordered

GENERATED_PREFIX = "generated:"
# The built-in stream: three years of transactions; v1 learns 2020–2021, 2022 is replayed, and a drift
# scenario's change lands on 2022-04-01.
GENERATED_START = "2020-01-01"
GENERATED_END = "2023-01-01"
GENERATED_CHANGE_AT = "2022-04-01"
GENERATED_TRAIN_UNTIL = "2022-01-01"
GENERATED_ROWS = 36_000
MIN_INITIAL_ROWS = 50
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class BacktestInputError(ValueError):
    """The backtest's input cannot be used; the message names the file, column, row or option."""


@dataclass(frozen=True, slots=True)
class Stream:
    frame: pd.DataFrame  # spec features, target, the time column (UTC); sorted by time, index 0..n-1
    spec: FeatureSpec  # its time_column is the stream's time column
    source: str
    # None: unknown (a user's CSV without --change-at); () a stable stream
    change_points: tuple[datetime, ...] | None

    @property
    def times(self) -> pd.Series:
        return self.frame[self.time_column]

    @property
    def time_column(self) -> str:
        assert self.spec.time_column is not None
        return self.spec.time_column

    def split(
        self, until: datetime, *, cut: str = "--initial-train-until"
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(initial training rows before `until`, rows replayed from `until` on); neither may be empty, and
        the initial rows must give v1 something to learn. `cut` names `until` in the messages."""
        before = self.times < pd.Timestamp(until)
        initial, replay = self.frame[before], self.frame[~before]
        where = f"{cut} {until:%Y-%m-%d %H:%M}"
        if len(initial) < MIN_INITIAL_ROWS:
            raise BacktestInputError(
                f"{where}: only {len(initial)} row(s) before it; the initial champion needs at least "
                f"{MIN_INITIAL_ROWS}"
            )
        if replay.empty:
            raise BacktestInputError(f"{where}: no rows left to replay")
        values = initial[self.spec.target].unique()
        if len(values) < 2:
            raise BacktestInputError(
                f"{where}: target {self.spec.target!r} is {plain(values[0])} in all {len(initial)} rows "
                "before it; the initial champion has nothing to learn"
            )
        return initial, replay.reset_index(drop=True)

    def with_change_points(self, text: str, *, until: datetime, cut: str = "--initial-train-until") -> Stream:
        """This stream with the change points a user knows of their own data (`--change-at`): comma-separated
        times, or `none` for a stream known to be stable. Each must fall inside the replayed history."""
        option = "--change-at"
        if self.change_points is not None:
            known = ", ".join(f"{c:%Y-%m-%d}" for c in self.change_points) or "none: a stable stream"
            raise BacktestInputError(
                f"{option}: {self.source} knows its own change points ({known}); give it only with a CSV"
            )
        if text.strip().lower() == "none":
            return dataclasses.replace(self, change_points=())
        parts = [part for part in text.split(",") if part.strip()]
        if not parts:
            raise BacktestInputError(f"{option} is empty: give times such as {ISO_EXAMPLE}, or none")
        first, last = _utc(self.times.iloc[0]), _utc(self.times.iloc[-1])
        changes = sorted({parse_time(part.strip(), option=option) for part in parts})
        for change in changes:
            if change <= until:
                raise BacktestInputError(
                    f"{option} {change:%Y-%m-%d %H:%M}: not after {cut} {until:%Y-%m-%d %H:%M}; v1 would "
                    "train across the change, and no policy could react to it"
                )
            if change > last:
                raise BacktestInputError(
                    f"{option} {change:%Y-%m-%d %H:%M}: after the last row of {self.source} "
                    f"({last:%Y-%m-%d %H:%M}; it starts {first:%Y-%m-%d %H:%M})"
                )
        return dataclasses.replace(self, change_points=tuple(changes))

    def default_train_until(self) -> datetime:
        """Generated data: 2022-01-01; otherwise the time of the row at 40 % of the history."""
        if self.source.startswith(GENERATED_PREFIX):
            return _utc(GENERATED_TRAIN_UNTIL)
        return _utc(self.times.iloc[int(len(self.frame) * 0.4)])


def parse_duration(text: str, *, option: str) -> timedelta:
    """'30d', '12h', '2w', '90m', '45s' (or a plain number of days) → timedelta."""
    match = _DURATION.match(text) or re.match(r"^\s*(\d+(?:\.\d+)?)\s*()$", text)
    if match is None:
        raise BacktestInputError(f"{option} {text!r}: expected a duration such as 30d, 12h, 2w or 90m")
    value, unit = float(match.group(1)), match.group(2) or "d"
    return timedelta(seconds=value * _UNIT_SECONDS[unit])


def duration_text(delta: timedelta) -> str:
    """`parse_duration`'s inverse, for messages: 7d, 12h, 1m (minutes), 0.5s (the largest whole unit)."""
    seconds = delta.total_seconds()
    for unit in ("d", "h", "m"):
        size = _UNIT_SECONDS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


_UNIT_WORDS = {"d": "day", "h": "hour", "m": "minute", "s": "second"}


def duration_words(delta: timedelta) -> str:
    """`duration_text` spelt out (7 days, 1 minute), for echoing what an option was read as: `1m` is a
    minute, not a month."""
    text = duration_text(delta)
    value, unit = text[:-1], _UNIT_WORDS[text[-1]]
    return f"{value} {unit}" + ("" if value == "1" else "s")


def parse_time(text: str, *, option: str) -> datetime:
    """A fixed point in the history: not empty, not now or today (which pandas would read as the clock's),
    and with an offset rather than a zone name (which pandas would drop)."""
    if not text.strip():
        raise BacktestInputError(f"{option} is empty: give a date or time such as {ISO_EXAMPLE}")
    if not re.search(r"\d", text):  # now, today: a backtest's cut is a point in its history, not the clock
        raise BacktestInputError(f"{option} {text!r}: not a date or time; give one such as {ISO_EXAMPLE}")
    zone = zone_names(pd.Series([text])).iloc[0]
    if not pd.isna(zone):
        raise BacktestInputError(
            f"{option} {text!r} names its time zone ({zone}), which is not read; {ZONE_ADVICE}"
        )
    try:
        return _utc(text)
    except (ValueError, TypeError) as exc:
        raise BacktestInputError(f"{option} {text!r}: not a date or time ({exc})") from None


def load_stream(
    data: str, spec: FeatureSpec, *, time_column: str | None = None, rows: int = GENERATED_ROWS, seed: int = 0
) -> Stream:
    """`generated:SCENARIO` (the apartment generator, change points known) or a CSV path (unknown)."""
    if time_column is not None and not time_column.strip():  # "$TIME_COL" unset: not the spec's, in silence
        raise BacktestInputError(
            "--time-column is empty: name the file's time column, or leave the option out for the spec's"
        )
    column = time_column or spec.time_column
    if not column:
        raise BacktestInputError("no time column: pass --time-column, or set time_column in the spec")
    if column in spec.feature_names or column == spec.target:
        raise BacktestInputError(f"--time-column {column!r} is a feature or the target in the spec")
    spec = dataclasses.replace(spec, time_column=column, _by_name={})
    if data.startswith(GENERATED_PREFIX):
        return _generated(data.removeprefix(GENERATED_PREFIX), spec, rows=rows, seed=seed)
    path = Path(data)
    try:
        frame = read_labelled_csv(path, spec, time_ordered=True)  # and with a finite target
    except MissingColumnsError:
        raise  # the caller knows where the spec came from
    except DataError as exc:
        raise BacktestInputError(str(exc)) from None
    return Stream(frame.reset_index(drop=True), spec, str(path), change_points=None)


def _generated(scenario: str, spec: FeatureSpec, *, rows: int, seed: int) -> Stream:
    if scenario not in SCENARIOS:
        raise BacktestInputError(
            f"--data generated:{scenario}: unknown scenario; choose one of {', '.join(SCENARIOS)}"
        )
    frame = generate_transactions(
        rows, start=GENERATED_START, end=GENERATED_END, scenario=scenario,
        change_at=GENERATED_CHANGE_AT, seed=seed,
    )  # fmt: skip
    frame = frame.rename(columns={"contract_date": spec.time_column})
    source = f"{GENERATED_PREFIX}{scenario}"
    missing = [c for c in [*spec.feature_names, spec.target] if c not in frame.columns]
    if missing:
        raise BacktestInputError(
            f"--data {source} makes the apartment columns; the spec asks for {', '.join(missing)}"
        )
    _check(frame, spec, source=source)
    try:
        check_features(frame, spec, source=source)  # a CSV gets this from read_labelled_csv
    except DataError as exc:
        raise BacktestInputError(str(exc)) from None
    change = () if scenario == "none" else (_utc(GENERATED_CHANGE_AT),)
    return Stream(frame, spec, source, change_points=change)


def _check(frame: pd.DataFrame, spec: FeatureSpec, *, source: str) -> None:
    """Time order and a finite target, which read_labelled_csv checks in a CSV."""
    times = frame[spec.time_column]
    if (i := unordered(times)) is not None:
        raise BacktestInputError(
            f"{source}: not sorted by {spec.time_column!r}: row {i + 2} ({times.iloc[i]}) comes after "
            f"row {i + 1} ({times.iloc[i - 1]}); sort the file by time"
        )
    target = pd.to_numeric(frame[spec.target], errors="coerce").to_numpy(dtype=float)
    bad = np.flatnonzero(~np.isfinite(target))
    if bad.size:
        raise BacktestInputError(
            f"{source}: target {spec.target!r} is missing or not finite in {bad.size} row(s), "
            f"first at row {bad[0] + 2}"
        )
