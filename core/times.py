"""Reading a column of written times the same way everywhere (ingest, bootstrap --csv, the backtest).

A file's times are in one format, inferred once from its first value that has one (month first when a
value such as 01/02/2022 could be either), or else in any ISO 8601 form (with or without a time, fractional
seconds or an offset; forms may mix). A value is never guessed on its own: one that fits neither is
unparsable, so 13/02/2022 in a file whose format is %m/%d/%Y is refused rather than read day first. Numbers
(20220401, 1648771200) are refused, not read as dates or as nanoseconds since 1970. Times without an
offset are UTC.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable

import pandas as pd
from pandas.tseries.api import guess_datetime_format

ISO_EXAMPLE = "2022-04-01 or 2022-04-01T09:30:00+09:00"
_NUMBER = r"\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\s*"


def is_number(values: pd.Series) -> pd.Series:
    """True where a value is written as a number (which is not a time)."""
    return values.astype("string").str.fullmatch(_NUMBER).fillna(False).astype(bool)


def guess_format(values: pd.Series) -> tuple[Hashable, str] | None:
    """(label, format) of the first value, not a number, from which a strftime format can be inferred."""
    text = values.dropna().astype(str).str.strip()
    text = text[(text != "") & ~is_number(text)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Parsing dates in", UserWarning)  # 13/02/2022: day first, fine
        for index, value in text.items():
            fmt = guess_datetime_format(value)
            if fmt:
                return index, fmt
    return None


def parse_times(values: pd.Series, fmt: str | None) -> pd.Series:
    """Written times -> UTC timestamps: each in `fmt`, else in ISO 8601; NaT where neither reads it (and
    for every missing or empty value, and every number)."""
    text = values.astype("string").str.strip()
    text = text.mask(text.eq("") | is_number(text))
    parsed = pd.Series(pd.NaT, index=values.index, dtype="datetime64[ns, UTC]")
    if fmt:
        parsed = pd.to_datetime(text, format=fmt, errors="coerce", utc=True)
    rest = parsed.isna() & text.notna()
    if rest.any():
        parsed[rest] = pd.to_datetime(text[rest], format="ISO8601", errors="coerce", utc=True)
    return parsed
