"""prediction_log rows as the logger writes them: a row, its insert parameters and its spool document, and
idempotent batch inserts that tell rows the database refuses from a database it cannot reach."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, Insert, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, StatementError
from sqlalchemy.orm import Session, sessionmaker

from core.schema import PredictionLog

Row = dict[str, Any]


@dataclass(frozen=True, slots=True)
class LogRow:
    id: str
    created_at: datetime
    model_version: int
    features: dict[str, Any]
    prediction: float
    latency_ms: float


class LogTable:
    """Idempotent batch inserts into prediction_log, each database call timed (`call_since`) so that the
    logger can tell one that hangs."""

    def __init__(
        self, engine_or_sessions: Engine | sessionmaker[Session], *, clock: Callable[[], float]
    ) -> None:
        self._engine = _engine_of(engine_or_sessions)
        self._upsert = _idempotent_insert(self._engine)
        self._clock = clock
        self.call_since: float | None = None  # when the writer's current database call began

    def insert_or_isolate(self, rows: list[Row]) -> list[tuple[Any, Exception]]:
        """Insert rows in one transaction; if the database refuses some, insert one by one and return those.

        Raises on an unreachable database; rows already inserted then are harmless, inserts being idempotent.
        """
        try:
            self._insert(rows)
            return []
        except Exception as exc:
            if not _is_refusal(exc):
                raise
        refused: list[tuple[Any, Exception]] = []
        for row in rows:
            try:
                self._insert([row])
            except Exception as exc:
                if not _is_refusal(exc):
                    raise
                refused.append((row, exc))
        return refused

    def _insert(self, rows: list[Row]) -> None:
        if not rows:
            return
        self.call_since = self._clock()
        try:
            with self._engine.begin() as conn:
                if self._upsert is not None:
                    conn.execute(self._upsert, rows)
                    return
                ids = [r["id"] for r in rows]  # a dialect without ON CONFLICT: skip ids already present
                present = set(conn.scalars(select(PredictionLog.id).where(PredictionLog.id.in_(ids))))
                fresh = [r for r in rows if r["id"] not in present]
                if fresh:
                    conn.execute(insert(PredictionLog), fresh)
        finally:
            self.call_since = None


def _is_refusal(exc: Exception) -> bool:
    """The database refused the rows, or they could not be encoded for it: retrying them cannot help.

    Encoding fails inside SQLAlchemy's bind step (StatementError) on SQLite, but inside the driver
    (a bare TypeError/ValueError from psycopg's JSON dump) on PostgreSQL.
    """
    if isinstance(exc, IntegrityError | DataError | TypeError | ValueError):
        return True
    return isinstance(exc, StatementError) and not isinstance(exc, DBAPIError)


def _engine_of(target: Engine | sessionmaker[Session]) -> Engine:
    if isinstance(target, Engine):
        return target
    bind = target.kw.get("bind")
    if not isinstance(bind, Engine):
        raise TypeError("PredictionLogger needs an Engine or a sessionmaker bound to one")
    return bind


def _idempotent_insert(engine: Engine) -> Insert | None:
    if engine.dialect.name == "sqlite":
        return sqlite.insert(PredictionLog).on_conflict_do_nothing(index_elements=["id"])
    if engine.dialect.name == "postgresql":
        return postgresql.insert(PredictionLog).on_conflict_do_nothing(index_elements=["id"])
    return None


def params(row: LogRow) -> Row:
    return {
        "id": row.id,
        "created_at": row.created_at,
        "model_version": row.model_version,
        "features": row.features,
        "prediction": row.prediction,
        "latency_ms": row.latency_ms,
    }


def to_doc(row: Row) -> Row:
    created = row["created_at"]
    return {**row, "created_at": created.isoformat() if isinstance(created, datetime) else created}


def from_doc(doc: Row) -> Row:
    return {
        "id": str(doc["id"]),
        "created_at": datetime.fromisoformat(doc["created_at"]),
        "model_version": int(doc["model_version"]),
        "features": dict(doc["features"]),
        "prediction": float(doc["prediction"]),
        "latency_ms": float(doc["latency_ms"]),
    }
