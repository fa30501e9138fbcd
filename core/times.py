"""Reading a column of written times the same way everywhere (ingest, bootstrap --csv, the backtest).

A file's times are in one format, inferred once from its first value that has one (month first when a
value such as 01/02/2022 could be either, but day first in 01.02.2022, as dotted dates are written), or
else in any ISO 8601 form (with or without a time, fractional seconds or an offset; forms may mix). A value
is never guessed on its own: one that fits neither is unparsable, so 13/02/2022 in a file whose format is
%m/%d/%Y is refused rather than read day first. Numbers (20220401, 1648771200) are refused, not read as
dates or as nanoseconds since 1970, and so are times whose zone is a name (CET, KST, Europe/Paris): pandas
would drop it and read the time as UTC, and an abbreviation can stand for more than one offset; UTC and
GMT are read as what they are. Times without an offset are UTC.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Hashable
from datetime import UTC, datetime

import numpy as np
import pandas as pd
from pandas.tseries.api import guess_datetime_format

ISO_EXAMPLE = "2022-04-01 or 2022-04-01T09:30:00+09:00"
ZONE_ADVICE = "write the offset instead (e.g. 2022-04-01T09:30:00+09:00), or Z for UTC"
_NUMBER = r"\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\s*"
# What pandas' nanosecond timestamps hold, to the day.
EARLIEST, LATEST = datetime(1677, 9, 22), datetime(2262, 4, 11)
OUT_OF_RANGE = f"outside the times pandas can hold, {EARLIEST:%Y-%m-%d} … {LATEST:%Y-%m-%d}: a typo?"
# An upper-case abbreviation (CET, CEST, KST) or an IANA name (Europe/Paris) standing on its own, not
# AM/PM, UTC, GMT or a month's or weekday's abbreviation.
_NOT_ZONES = "AM|PM|UTC|GMT|JAN|FEB|MAR|APR|MAY|JUN|JUL|AUG|SEPT?|OCT|NOV|DEC|MON|TUE|WED|THU|FRI|SAT|SUN"
_ZONE_NAME = re.compile(
    rf"(?<![A-Za-z])(?!(?:{_NOT_ZONES})(?![A-Za-z]))([A-Z]{{2,5}}|[A-Z][A-Za-z_]+(?:/[A-Za-z_]+)+)(?![A-Za-z])"
)


def is_number(values: pd.Series) -> pd.Series:
    """True where a value is written as a number (which is not a time)."""
    return values.astype("string").str.fullmatch(_NUMBER).fillna(False).astype(bool)


def zone_names(values: pd.Series) -> pd.Series:
    """The time-zone name each written time gives (CET, Europe/Paris), or NA where it gives none."""
    return values.astype("string").str.extract(_ZONE_NAME, expand=False)


def guess_format(values: pd.Series) -> tuple[Hashable, str] | None:
    """(label, format) of the first value, not a number, from which a strftime format can be inferred."""
    text = values.dropna().astype(str).str.strip()
    text = text[(text != "") & ~is_number(text) & zone_names(text).isna()]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Parsing dates in", UserWarning)  # 13/02/2022: day first, fine
        for index, value in text.items():
            fmt = guess_datetime_format(value)
            if fmt:
                return index, _day_first_when_dotted(fmt)
    return None


def _day_first_when_dotted(fmt: str) -> str:
    """01.02.2014 is 1 February wherever dates are written with dots and the year last (de, ru, pl, …); no
    convention writes the month first so. pandas guesses month first as for slashes, which would read a
    monthly file dated on the 1st (01.02.2014, 01.03.2014, …) as days of January, in order and unnoticed."""
    return "%d.%m." + fmt.removeprefix("%m.%d.") if fmt.startswith("%m.%d.%Y") else fmt


def parse_times(values: pd.Series, fmt: str | None) -> pd.Series:
    """Written times -> UTC timestamps: each in `fmt`, else in ISO 8601; NaT where neither reads it (and
    for every missing or empty value, every number and every time with a zone name)."""
    text = values.astype("string").str.strip()
    text = text.mask(text.eq("") | is_number(text) | zone_names(text).notna())
    parsed = pd.Series(pd.NaT, index=values.index, dtype="datetime64[ns, UTC]")
    if fmt:
        parsed = pd.to_datetime(text, format=fmt, errors="coerce", utc=True)
    rest = parsed.isna() & text.notna()
    if rest.any():
        parsed[rest] = pd.to_datetime(text[rest], format="ISO8601", errors="coerce", utc=True)
    return parsed


def out_of_range(value: str, fmt: str | None) -> bool:
    """Whether a time pandas could not read is one in `fmt` or ISO 8601 that falls outside EARLIEST…LATEST
    (a sale in 2302 or 1022), which a message should not call unparsable."""
    parsers = [lambda text: datetime.strptime(text, fmt)] if fmt else []
    for parse in [*parsers, datetime.fromisoformat]:
        try:
            written = parse(value.strip())
        except ValueError:
            continue
        try:
            utc = written.astimezone(UTC).replace(tzinfo=None) if written.tzinfo else written
        except OverflowError:  # 0001-01-01T00:00+09:00 is in year 0 in UTC
            return True
        return not EARLIEST <= utc <= LATEST
    return False


def ns_times(times: pd.Series) -> np.ndarray:
    """UTC times as naive datetime64[ns], for numpy comparisons and searches."""
    naive = pd.to_datetime(times, utc=True).dt.tz_localize(None)
    return np.asarray(naive.to_numpy(dtype="datetime64[ns]"))
