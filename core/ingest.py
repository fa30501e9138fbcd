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

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

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

from core.csvcheck import CsvFile, IngestError, checked_batches, inspect_file
from core.db import Clock, utcnow
from core.schema import IngestedFile, LabelledRow
from core.spec import FeatureSpec

MAX_LISTED = 1000  # bad lines kept with their problems; beyond, only counted


# The lengths of labelled_row.source and ingested_file.name (the path, kept to say where a file was loaded
# from: its end is what tells one file from another).
MAX_SOURCE = 200
MAX_NAME = 500


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
    if source is not None and not source.strip():  # stored, it would name no source in /models/{v}'s lineage
        raise IngestError("source is blank: give --source a name, or leave it out for the file's name")
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
        for line_count, rows, rejected in checked_batches(
            csv_file, spec, chunk_size, now, report.ignored_columns
        ):
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
