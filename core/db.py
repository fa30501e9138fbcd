"""Engines, sessions and migrations."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    from alembic.config import Config


def utcnow() -> datetime:
    return datetime.now(UTC)


SQLITE_BUSY_TIMEOUT_S = 30  # how long a SQLite write waits for another writer's lock before it fails

# Where time matters, the time source is passed in (the backtest's is simulated); utcnow by default.
Clock = Callable[[], datetime]


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine with SQLite set up for concurrent readers and one writer (WAL, busy timeout)."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        connect = {"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}
        engine = create_engine(url, connect_args=connect, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
    cursor.close()


def make_sessions(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with sessions.begin() as session:
        yield session


def _alembic_config(url: str) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("core").joinpath("migrations")))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(url: str) -> tuple[str | None, str | None]:
    """Bring the database at `url` to the newest schema (alembic upgrade head). Returns the revision it
    was at (None: no schema yet) and the one it is at now."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    cfg = _alembic_config(url)
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            before = MigrationContext.configure(connection).get_current_revision()
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "head")
            return before, MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def schema_problem(url: str) -> str | None:
    """Why the database at `url` is not at the newest schema (none yet, or another revision), or None."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config(url)).get_current_head()
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
    if current == head:
        return None
    found = "has no driftloop schema yet" if current is None else f"is at schema revision {current}"
    return f"the database {found}, and this driftloop needs revision {head}"


# SQLite raises OperationalError for SQL it cannot run too ("no such table"): only these are waited out.
_SQLITE_UNAVAILABLE = ("database is locked", "unable to open database", "disk i/o error")
# SQLSTATE classes: connection exception, transaction rollback (serialization, deadlock), insufficient
# resources, object not in prerequisite state (lock not available), operator intervention, system error.
_POSTGRES_UNAVAILABLE = ("08", "40", "53", "55", "57", "58")


def error_line(exc: BaseException) -> str:
    """An exception in one line for a log: its class and the first line of its message (SQLAlchemy's run on
    with the statement and a link)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def unreachable(exc: BaseException) -> bool:
    """The database could not be reached (refused, shutting down, the connection dropped, SQLite's lock not
    given up in time or its file gone): a condition to wait out, not a fault. A missing table is a fault.

    So is no pooled connection freed within the pool's timeout: every one is held by a request waiting on a
    database that accepts connections but does not reply."""
    if isinstance(exc, PoolTimeout):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if not isinstance(exc, OperationalError):
        return False
    if isinstance(exc.orig, sqlite3.OperationalError):
        return str(exc.orig).lower().startswith(_SQLITE_UNAVAILABLE)
    # psycopg's: no SQLSTATE (the connection failed), or a class to wait out; not 54 (a limit the statement
    # exceeds), which retrying cannot cure.
    sqlstate = getattr(exc.orig, "sqlstate", None)
    return sqlstate is None or str(sqlstate)[:2] in _POSTGRES_UNAVAILABLE


T = TypeVar("T")
OUTAGE_RETRY_S = 1.0  # how often a call waiting out a database outage tries again


def wait_out_outage(
    call: Callable[[], T], *, patience_s: float, log: logging.Logger | None = None, what: str = ""
) -> T:
    """`call()`, tried again every OUTAGE_RETRY_S while it fails because the database is unreachable, for up
    to `patience_s`; with `log`, the outage is logged once as `what` meets it and once when it is over. Any
    other error, or the outage past the patience, is raised."""
    deadline = time.monotonic() + patience_s
    waited = False
    while True:
        try:
            result = call()
        except Exception as exc:
            if not unreachable(exc) or time.monotonic() >= deadline:
                raise
            if log is not None and not waited:  # once per outage, not every second of it
                log.warning(
                    "%s: database unavailable (%s); trying again for up to %.0f s",
                    what, error_line(exc), deadline - time.monotonic(),
                )  # fmt: skip
            waited = True
            time.sleep(OUTAGE_RETRY_S)
        else:
            if log is not None and waited:
                log.info("%s: database reachable again", what)
            return result
