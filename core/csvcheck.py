"""Which lines of a labelled CSV the spec accepts, and why not: the file read once as UTF-8 text, then
every line checked in batches (memory stays bounded), each bad line with its problems."""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
from pandas._libs.parsers import STR_NA_VALUES

from core.files import missing_columns, read_errors
from core.schema import row_key
from core.spec import FeatureSpec, FeatureType
from core.times import (
    ISO_EXAMPLE,
    OUT_OF_RANGE,
    ZONE_ADVICE,
    guess_format,
    is_number,
    out_of_range,
    parse_times,
    zone_names,
)

FUTURE_SLACK = timedelta(days=1)  # an event time further ahead of now is a typo or a wrong format
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
_TO_UTF8 = 'save it as UTF-8 (e.g. "CSV UTF-8" in a spreadsheet)'


class IngestError(ValueError):
    """The file as a whole cannot be ingested (unreadable, not UTF-8 text, header lacks columns)."""


@dataclass(frozen=True, slots=True)
class CsvFile:
    """A readable UTF-8 file, with the sha256 of its bytes and how many lines follow its header."""

    path: Path
    sha256: str
    lines: int


def inspect_file(path: Path) -> CsvFile:
    """Check that `path` is a file of UTF-8 text, reading it once (streaming): its sha256 and line count.

    Raises IngestError naming the problem (missing, a directory, UTF-16, a byte that is not UTF-8 and its
    line) before anything is loaded."""
    path = Path(path)
    digest = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")()
    newlines, last = 0, b""
    with read_errors(path, IngestError, kind="CSV file"), path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            if not last and chunk.startswith(_UTF16_BOMS):
                raise IngestError(f"{path} is UTF-16 text; {_TO_UTF8}")
            digest.update(chunk)
            if b"\x00" in chunk:
                line = newlines + chunk[: chunk.index(b"\x00")].count(b"\n") + 1
                raise IngestError(
                    f"{path}: line {line} holds a NUL byte: not a text file (UTF-16?); {_TO_UTF8}"
                )
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                line = newlines + exc.object[: exc.start].count(b"\n") + 1
                byte = exc.object[exc.start]
                raise IngestError(
                    f"{path}: line {line} is not UTF-8 text (byte 0x{byte:02x}); {_TO_UTF8}"
                ) from None
            newlines += chunk.count(b"\n")
            last = chunk[-1:]
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise IngestError(f"{path}: ends in the middle of a UTF-8 character; {_TO_UTF8}") from None
    lines = newlines + (1 if last and last != b"\n" else 0)
    return CsvFile(path=path, sha256=digest.hexdigest(), lines=max(lines - 1, 0))


def checked_batches(
    csv_file: CsvFile, spec: FeatureSpec, chunk_size: int, now: datetime, ignored_columns: list[str]
) -> Iterator[tuple[int, list[dict[str, Any]], list[tuple[int, list[str]]]]]:
    """Per batch of lines: how many, the good rows (ready to insert) and the bad lines with their problems;
    `ignored_columns` gets the header's columns that the spec does not read.

    Raises IngestError, after the last batch, if the bytes read are not those `csv_file` was inspected as."""
    path = csv_file.path
    ended = 0  # the line the last row ended on
    try:
        with path.open("rb") as raw:
            hashing = _Hashing(raw)
            fh = io.TextIOWrapper(io.BufferedReader(hashing), encoding="utf-8-sig", newline="")
            reader = csv.reader(fh)
            header = next(reader, None)
            if not header:
                raise IngestError(f"{path} is empty: the first line must be the header")
            checker = _Checker(path, spec, header, now)
            ignored_columns.extend(dict.fromkeys(c for c in header if c not in checker.columns))
            ended = reader.line_num
            batch: list[tuple[int, list[str]]] = []
            for fields in reader:
                if fields:  # a blank line is no row
                    batch.append((reader.line_num, fields))
                ended = reader.line_num
                if len(batch) >= chunk_size:
                    yield len(batch), *checker.check(batch)
                    batch = []
            if batch:
                yield len(batch), *checker.check(batch)
    except csv.Error as exc:  # e.g. an unclosed quote making the rest of the file one field
        raise IngestError(f"{path}: the row from line {ended + 1} is not valid CSV: {exc}") from None
    except UnicodeDecodeError:
        raise IngestError(f"{path} changed while being loaded: it is no longer UTF-8 text") from None
    if hashing.digest.hexdigest() != csv_file.sha256:
        raise IngestError(
            f"{path} changed while being loaded (its sha256 is no longer that of the file first read); "
            "nothing was loaded: run the ingest again once the file is complete"
        )


class _Hashing(io.RawIOBase):
    """Reads a binary file, keeping the sha256 of every byte read."""

    def __init__(self, raw: io.BufferedReader) -> None:
        self.raw = raw
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.raw.readinto(buffer)
        self.digest.update(memoryview(buffer)[:n])
        return n


def _number(text: str) -> float:
    """A CSV number cell as `bootstrap --csv` (pandas) reads it: Python's float() also takes digit groups
    with underscores (1_0.5 as 10.5), which pandas and other CSV readers refuse."""
    if "_" in text:
        raise ValueError(text)
    return float(text)


class _Checker:
    """Checks lines against the spec; the file's time format is inferred once, from the first line that
    has one, and holds for every later batch."""

    def __init__(self, path: Path, spec: FeatureSpec, header: list[str], now: datetime) -> None:
        required = [*spec.feature_names, spec.target] + ([spec.time_column] if spec.time_column else [])
        if missing := missing_columns(header, required):
            raise IngestError(f"{path}: header is missing column(s): {missing}")
        twice = [c for c in required if header.count(c) > 1]
        if twice:
            raise IngestError(f"{path}: header names column(s) more than once: {', '.join(twice)}")
        self.spec = spec
        self.width = len(header)
        self.columns = {name: header.index(name) for name in required}
        self.now = now
        self.time_format: tuple[str, int, str] | None = None  # (format, line inferred from, its value)

    def check(
        self, batch: list[tuple[int, list[str]]]
    ) -> tuple[list[dict[str, Any]], list[tuple[int, list[str]]]]:
        problems: list[list[str]] = []
        values: list[tuple[dict[str, Any], float]] = []
        for _, fields in batch:
            found = (
                []
                if len(fields) == self.width
                else [f"has {len(fields)} fields; the header has {self.width}"]
            )
            values.append(self._values(fields, found))
            problems.append(found)
        times = self._times(batch, problems)
        good: list[dict[str, Any]] = []
        bad: list[tuple[int, list[str]]] = []
        for (line, _), found, (features, target), event_time in zip(
            batch, problems, values, times, strict=True
        ):
            if found:
                bad.append((line, found))
            else:
                good.append(
                    {
                        "features": features,
                        "target": target,
                        "event_time": event_time or self.now,
                        "ingested_at": self.now,
                        "row_key": row_key(event_time, features, target) if event_time else None,
                    }
                )
        return good, bad

    def _text(self, fields: list[str], column: str, *, as_written: bool = False) -> str:
        """The cell, stripped of surrounding blanks unless `as_written` (categories: " office" is not
        "office" to the model, and `bootstrap --csv` and /predict keep it as it is too)."""
        i = self.columns[column]
        text = fields[i] if i < len(fields) else ""
        return text if as_written else text.strip()

    def _values(self, fields: list[str], problems: list[str]) -> tuple[dict[str, Any], float]:
        """Typed features and target from one line's strings, adding every problem (naming the column)."""
        features: dict[str, Any] = {}
        for f in self.spec.features:
            text = self._text(fields, f.name, as_written=f.type is FeatureType.categorical)
            if text == "":
                value: Any = None
            elif f.type is FeatureType.categorical:
                value = text
            elif text in STR_NA_VALUES:  # NA, null, N/A…: missing, as `bootstrap --csv` (pandas) reads them
                value = None
            else:
                try:
                    value = _number(text)
                except ValueError:
                    problems.append(f"{f.name}: {text!r} is not a number")
                    continue
                if math.isnan(value):  # how pandas and others write a missing number: JSON null, not NaN
                    value = None
                elif f.type is FeatureType.integer and value.is_integer():
                    value = int(value)
            why = f.check(value)
            if why:
                problems.append(f"{f.name}: {why}")
            features[f.name] = value
        target = float("nan")
        text = self._text(fields, self.spec.target)
        try:
            target = _number(text)
        except ValueError:
            problems.append(f"{self.spec.target}: {text!r} is not a number")
        else:
            why = self.spec.target_feature.check(target)
            if why:
                problems.append(f"{self.spec.target}: {why}")
        return features, target

    def _times(self, batch: list[tuple[int, list[str]]], problems: list[list[str]]) -> list[datetime | None]:
        """The batch's event times, parsed together in the file's one format (else ISO 8601)."""
        column = self.spec.time_column
        if not column:
            return [None] * len(batch)
        text = pd.Series([self._text(fields, column) for _, fields in batch], dtype=object)
        if self.time_format is None and (guess := guess_format(text)) is not None:
            at, fmt = guess
            self.time_format = (fmt, batch[text.index.get_loc(at)][0], str(text[at]))
        parsed = parse_times(text, self.time_format[0] if self.time_format else None)
        times = [None if pd.isna(stamp) else stamp.to_pydatetime() for stamp in parsed]
        horizon = self.now + FUTURE_SLACK
        for i, (value, stamp) in enumerate(zip(text, times, strict=True)):
            if stamp is None:
                problems[i].append(f"{column}: {self._unparsable(value)}")
            elif stamp > horizon:
                problems[i].append(
                    f"{column}: {value!r} is more than a day ahead of now ({self.now:%Y-%m-%d %H:%M} UTC)"
                )
        return times

    def _unparsable(self, value: str) -> str:
        if value == "":
            return "missing (every row needs its date/time)"
        if is_number(pd.Series([value])).iloc[0]:
            return f"{value!r} is a number, not a date/time; write e.g. {ISO_EXAMPLE}"
        zone = zone_names(pd.Series([value])).iloc[0]
        if not pd.isna(zone):
            return f"{value!r} names its time zone ({zone}), which is not read; {ZONE_ADVICE}"
        if out_of_range(value, self.time_format[0] if self.time_format else None):
            return f"{value!r} is {OUT_OF_RANGE}"
        if self.time_format is None:
            return f"{value!r} is not a date/time; write e.g. {ISO_EXAMPLE}"
        fmt, line, first = self.time_format
        return (
            f"{value!r} is neither in this file's time format {fmt} (inferred from line {line}, {first!r}) "
            "nor ISO 8601; write every time in one format, ISO 8601 (2022-04-01) is safest"
        )
