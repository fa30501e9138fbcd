"""Loading labelled transactions (a CSV) into labelled_row, every line checked against the spec.

A file is loaded whole or not at all. Its lines are checked first, in batches (memory stays bounded), with
no write lock held: the good rows wait in a temporary table on the ingest's own connection. Then one short
transaction copies them into labelled_row, unless a line was bad and the caller did not ask to skip bad
lines. A file already loaded (the same bytes, by sha256) is not loaded again unless forced, so re-running an
ingest never counts rows twice by accident; nor is a row that an earlier file gave (the same event time,
features and target, by `row_key`), so overlapping exports ("the last 90 days", every month) load each sale
once. A file may give the same row more than once (two sales alike in every column): it is loaded as often as
the file gives it beyond the times it is already there.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import math
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
from pandas._libs.parsers import STR_NA_VALUES
from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Index,
    Integer,
    MetaData,
    Table,
    and_,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from core.db import Clock, utcnow
from core.files import missing_columns, read_errors
from core.schema import IngestedFile, LabelledRow, row_key
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

MAX_LISTED = 1000  # bad lines kept with their problems; beyond, only counted
FUTURE_SLACK = timedelta(days=1)  # an event time further ahead of now is a typo or a wrong format
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
_TO_UTF8 = 'save it as UTF-8 (e.g. "CSV UTF-8" in a spreadsheet)'


# The lengths of labelled_row.source and ingested_file.name (the path, kept to say where a file was loaded
# from: its end is what tells one file from another).
MAX_SOURCE = 200
MAX_NAME = 500


class IngestError(ValueError):
    """The file as a whole cannot be ingested (unreadable, not UTF-8 text, header lacks columns)."""


@dataclass(frozen=True, slots=True)
class CsvFile:
    """A readable UTF-8 file, with the sha256 of its bytes and how many lines follow its header."""

    path: Path
    sha256: str
    lines: int


@dataclass(frozen=True, slots=True)
class PreviousLoad:
    name: str
    source: str
    rows: int
    loads: int
    last_loaded_at: datetime


@dataclass(slots=True)
class IngestReport:
    sha256: str = ""
    good: int = 0  # rows that passed every check
    bad: int = 0  # lines that did not
    rejected: list[tuple[int, list[str]]] = field(default_factory=list)  # the first MAX_LISTED bad lines
    loaded: int = 0  # rows committed to labelled_row
    repeated: int = 0  # good rows not loaded because an earlier file loaded them (unless forced)
    already: PreviousLoad | None = None  # set when the file was loaded before and not loaded again
    ignored_columns: list[str] = field(default_factory=list)  # header columns the spec does not read

    @property
    def total(self) -> int:
        return self.good + self.bad


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


def count_rows(path: Path) -> int:
    """Lines after the header (an upper bound on the rows, for a progress bar)."""
    return inspect_file(path).lines


def ingest_csv(
    file: Path | CsvFile,
    *,
    spec: FeatureSpec,
    sessions: sessionmaker[Session],
    source: str | None = None,
    skip_bad: bool = False,
    force: bool = False,
    chunk_size: int = 2000,
    on_progress: Callable[[int], None] | None = None,
    clock: Clock = utcnow,
) -> IngestReport:
    """Check every line of a CSV and load its rows into labelled_row, all or nothing.

    If any line is bad, nothing is loaded (the report lists them with their line numbers) unless
    `skip_bad`, which loads the good rows only. A file whose bytes were loaded before is not loaded again
    (`report.already` says when and as what), nor are rows an earlier file loaded (`report.repeated`),
    unless `force`. The lines are checked with no write lock held:
    the good rows wait in a temporary table on the ingest's own connection, and one short transaction then
    claims the file and copies them into labelled_row, so other writers wait for the copy, not the checks."""
    csv_file = file if isinstance(file, CsvFile) else inspect_file(file)
    report = IngestReport(sha256=csv_file.sha256)
    source = source or csv_file.path.name
    if len(source) > MAX_SOURCE:  # PostgreSQL refused it after every line was checked (a traceback)
        given = "source" if source != csv_file.path.name else "source (the file's name)"
        raise IngestError(
            f"{given} {source[:50]!r}… is {len(source)} characters, over the {MAX_SOURCE} a source may have: "
            "give a shorter --source"
        )
    now = clock()
    with _connection(sessions, csv_file.path) as conn:
        previous = _previous_load(conn, csv_file.sha256)
        if previous and not force:
            report.already = previous
            return report
        staging = _staging_table(conn)
        for line_count, rows, rejected in _checked(csv_file, spec, chunk_size, now, report):
            report.good += len(rows)
            report.bad += len(rejected)
            report.rejected.extend(rejected[: MAX_LISTED - len(report.rejected)])
            if rows and (skip_bad or not report.bad):
                conn.execute(insert(staging), [{**row, "source": source} for row in rows])
                conn.commit()  # the temporary table only: no lock on the database's tables
            if on_progress:
                on_progress(line_count)
        if (report.bad and not skip_bad) or not report.good:
            return report
        if not force:
            _index_keys(conn, staging)
        report.already = _load(
            conn, staging, csv_file=csv_file, source=source, report=report, force=force, now=now
        )
    report.loaded = 0 if report.already else report.good - report.repeated
    return report


@contextmanager
def _connection(sessions: sessionmaker[Session], path: Path) -> Iterator[Connection]:
    """One connection for the whole ingest, closed (not pooled) afterwards so its temporary table goes
    with it; a write lock held elsewhere for longer than SQLite's busy timeout is an IngestError."""
    with sessions() as session:
        engine = session.get_bind()
    if not isinstance(engine, Engine):
        raise TypeError("ingest_csv needs sessions bound to an engine, not to a connection")
    try:
        with engine.connect() as conn:
            try:
                yield conn
            finally:
                conn.invalidate()  # discards the staging table and any transaction left open
    except OperationalError as exc:
        if not _is_sqlite_busy(exc):
            raise
        raise IngestError(
            f"{path}: nothing was loaded: another write holds the database (SQLite: one writer at a time, "
            "e.g. another ingest) and kept it past the busy timeout; try again when it has finished"
        ) from None


def _is_sqlite_busy(exc: OperationalError) -> bool:
    return isinstance(exc.orig, sqlite3.OperationalError) and (
        exc.orig.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY
    )


def _previous_load(conn: Connection, sha256: str, *, lock: bool = False) -> PreviousLoad | None:
    query = select(
        IngestedFile.name, IngestedFile.source, IngestedFile.rows, IngestedFile.loads,
        IngestedFile.last_loaded_at,
    ).where(IngestedFile.sha256 == sha256)  # fmt: skip
    row = conn.execute(query.with_for_update() if lock else query).first()
    return PreviousLoad(*row) if row else None


def _staging_table(conn: Connection) -> Table:
    """A temporary table with labelled_row's columns, a sequence (to keep the file's order) and `nth`, the
    row's number among the rows with its key (see `_index_keys`)."""
    columns = [Column(c.name, c.type) for c in LabelledRow.__table__.columns if not c.primary_key]
    staging = Table(
        "ingest_staging", MetaData(), Column("seq", Integer, primary_key=True), *columns,
        Column("nth", Integer), prefixes=["TEMPORARY"],
    )  # fmt: skip
    staging.create(conn)
    conn.commit()
    return staging


def _load(
    conn: Connection, staging: Table, *, csv_file: CsvFile, source: str, report: IngestReport, force: bool,
    now: datetime,
) -> PreviousLoad | None:  # fmt: skip
    """Claim the file and copy the staged rows into labelled_row, in one transaction. Returns the previous
    load instead, loading nothing, if another ingest loaded the same bytes while these were checked."""
    try:
        previous = _previous_load(conn, csv_file.sha256, lock=True)
        if previous and not force:
            conn.rollback()
            return previous
        file = {
            "name": str(csv_file.path)[-MAX_NAME:],
            "source": source,
            "skipped": report.bad,
            "last_loaded_at": now,
        }
        if previous is None:  # claims the file: a concurrent ingest of the same bytes fails here or at commit
            conn.execute(
                insert(IngestedFile).values(
                    sha256=csv_file.sha256, rows=report.good, loads=1, first_loaded_at=now, **file
                )
            )
        else:
            conn.execute(
                update(IngestedFile)
                .where(IngestedFile.sha256 == csv_file.sha256)
                .values(rows=IngestedFile.rows + report.good, loads=IngestedFile.loads + 1, **file)
            )
        if conn.dialect.name == "postgresql":  # two overlapping files' copies must not both find a row absent
            conn.execute(text("LOCK TABLE labelled_row IN SHARE ROW EXCLUSIVE MODE"))
        copied = conn.execute(
            _copy(staging, every_row=force), execution_options={"preserve_rowcount": True}
        ).rowcount
        report.repeated = report.good - copied
        conn.commit()
    except IntegrityError:
        raise IngestError(
            f"{csv_file.path} was being loaded by another ingest at the same time; this one loaded nothing"
        ) from None
    return None


def _copy(staging: Table, *, every_row: bool) -> Any:
    """INSERT … SELECT of the staged rows in the file's order; unless `every_row`, the n-th staged row with
    a key (its `nth`) goes in only if labelled_row holds fewer than n rows with that key. The rows held are
    counted once per key, not again for each alike staged row: that cost k² index steps for k alike rows
    under the write lock (20,000 alike rows, loaded a second time: 45 s on SQLite)."""
    columns = [c.name for c in staging.columns if c.name not in ("seq", "nth")]
    query = select(*(staging.c[c] for c in columns)).order_by(staging.c.seq)
    if every_row:
        return insert(LabelledRow).from_select(columns, query)
    first = staging.alias("first")
    same = and_(LabelledRow.event_time == first.c.event_time, LabelledRow.row_key == first.c.row_key)
    held = (  # through labelled_row's (event_time, row_key) index
        select(first.c.event_time, first.c.row_key, func.count().label("n"))
        .select_from(first.join(LabelledRow, same))
        .where(first.c.nth == 1)
        .group_by(first.c.event_time, first.c.row_key)
        .subquery("held")
    )
    query = query.select_from(
        staging.outerjoin(
            held, and_(held.c.event_time == staging.c.event_time, held.c.row_key == staging.c.row_key)
        )
    ).where(or_(staging.c.row_key.is_(None), staging.c.nth > func.coalesce(held.c.n, 0)))
    return insert(LabelledRow).from_select(columns, query)


def _index_keys(conn: Connection, staging: Table) -> None:
    """Number each staged row among those with its key (`nth`), through an index on (event_time, row_key)
    as labelled_row's, before the copy: on the temporary table, no lock held."""
    Index("ix_ingest_staging_key", staging.c.event_time, staging.c.row_key, staging.c.seq).create(conn)
    key = (staging.c.event_time, staging.c.row_key)
    numbered = select(
        staging.c.seq, func.row_number().over(partition_by=key, order_by=staging.c.seq).label("n")
    ).subquery()
    conn.execute(update(staging).where(staging.c.seq == numbered.c.seq).values(nth=numbered.c.n))
    conn.commit()


def _checked(
    csv_file: CsvFile, spec: FeatureSpec, chunk_size: int, now: datetime, report: IngestReport
) -> Iterator[tuple[int, list[dict[str, Any]], list[tuple[int, list[str]]]]]:
    """Per batch of lines: how many, the good rows (ready to insert) and the bad lines with their problems;
    `report.ignored_columns` gets the header's columns that the spec does not read.

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
            report.ignored_columns = list(dict.fromkeys(c for c in header if c not in checker.columns))
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
