"""Alembic environment: runs on a connection handed in by core.db.migrate, or on sqlalchemy.url."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from core.db import make_engine
from core.schema import Base

config = context.config
target_metadata = Base.metadata


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection)
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.begin() as conn:
        _run_on(conn)
    engine.dispose()


def _run_on(connection: Connection) -> None:
    """On SQLite, batch mode rebuilds a table by dropping it; with foreign keys on, that drop deletes the
    rows pointing at it (ground_truth's ON DELETE CASCADE) or fails. So they are off while migrating (the
    caller disposes of the connection after) and checked once the migrations are done."""
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:  # before any statement: inside a transaction SQLite ignores this pragma
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
        if sqlite and (dangling := connection.exec_driver_sql("PRAGMA foreign_key_check").all()):
            raise RuntimeError(f"the migration left rows referencing missing rows: {dangling}")


run()
