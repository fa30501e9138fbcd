"""Database schema (SQLAlchemy 2.x). Alembic migrations in core/migrations mirror this file."""

from __future__ import annotations

import hashlib
import json
import math
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Ids and version numbers are INTEGER columns: 32-bit on PostgreSQL, which refuses a larger value in a query.
MAX_ID = 2**31 - 1


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on the way in and out, on SQLite (which drops tzinfo) as on PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime stored; use core.db.utcnow()")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JSON,
        list[Any]: JSON,
        datetime: UTCDateTime(),
    }


class ModelStatus(StrEnum):
    candidate = "candidate"
    champion = "champion"
    archived = "archived"
    rejected = "rejected"


class Trigger(StrEnum):
    bootstrap = "bootstrap"
    drift = "drift"
    accuracy = "accuracy"
    manual = "manual"
    schedule = "schedule"


class RunStatus(StrEnum):
    running = "running"
    promoted = "promoted"
    rejected = "rejected"
    failed = "failed"


class PredictionLog(Base):
    __tablename__ = "prediction_log"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(index=True)
    model_version: Mapped[int]
    features: Mapped[dict[str, Any]]
    prediction: Mapped[float] = mapped_column(Float)
    latency_ms: Mapped[float] = mapped_column(Float)


class GroundTruth(Base):
    __tablename__ = "ground_truth"

    prediction_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("prediction_log.id", ondelete="CASCADE"), primary_key=True
    )
    actual: Mapped[float] = mapped_column(Float)
    received_at: Mapped[datetime] = mapped_column(index=True)  # the policy counts labels received since a run


class LabelledRow(Base):
    __tablename__ = "labelled_row"
    # Reads select by event_time (its prefix); an ingest finds a row loaded before by both. Rows come in
    # time order, so the copy adds to this index near its end, where one on row_key alone is added to at
    # random (3.4 s against 13.9 s under SQLite's write lock for 1,000,000 rows, in bench/ingest.py).
    __table_args__ = (Index("ix_labelled_row_event_time_row_key", "event_time", "row_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    features: Mapped[dict[str, Any]]
    target: Mapped[float] = mapped_column(Float)
    event_time: Mapped[datetime]
    source: Mapped[str] = mapped_column(String(200))
    ingested_at: Mapped[datetime] = mapped_column(index=True)  # as ground_truth.received_at
    # row_key(...) when the row's file gave its event time, so a later file that repeats it (overlapping
    # exports) does not load it twice; NULL when the time is the ingest's own (no time column to tell by)
    row_key: Mapped[int | None] = mapped_column(BigInteger)


def row_key(event_time: datetime, features: dict[str, Any], target: float) -> int:
    """A labelled row's event time (to the microsecond, in UTC), features and target, hashed: the first 8
    bytes of their sha256 as a signed 64-bit integer, cheaper to index than hex text. Equal for the same
    sale however its file wrote it ("84" or "84.0", "-0" or "0", "2022-04-01" or "2022-04-01T00:00:00Z").
    A missing feature is left out, as one the row does not have: a row loaded before the spec gained a
    nullable feature is the row a later file gives with that feature empty. Rows are only compared with
    rows of the same event time: two different ones share a key once in 1.8e19 pairs."""
    moment = event_time.astimezone(UTC) if event_time.tzinfo else event_time
    present = {name: value for name, raw in features.items() if (value := _canonical(raw)) is not None}
    canonical = [moment.strftime("%Y-%m-%dT%H:%M:%S.%f"), present, target + 0.0]
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big", signed=True)


def _canonical(value: Any) -> Any:
    """A feature as a fresh ingest stores it: NaN (how ingests before a96dad8 stored a missing number, on
    SQLite) as None, and -0.0 as 0.0 (+ 0.0: equal numbers, which JSON writes apart)."""
    if isinstance(value, float):
        return None if math.isnan(value) else value + 0.0
    return value


class IngestedFile(Base):
    """A CSV file loaded into labelled_row, by the sha256 of its bytes: loading it again is refused unless
    forced (its rows would count twice in training and in the gate's holdout)."""

    __tablename__ = "ingested_file"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(500))  # the path it was loaded from, the last time
    source: Mapped[str] = mapped_column(String(200))
    rows: Mapped[int]  # its good rows, over every load (rows an earlier file loaded stay under that file's)
    skipped: Mapped[int]  # bad lines not loaded (--skip-bad), in its last load
    loads: Mapped[int]
    first_loaded_at: Mapped[datetime]
    last_loaded_at: Mapped[datetime]


class ModelVersion(Base):
    __tablename__ = "model_version"
    __table_args__ = (
        # Exactly one champion: a partial unique index that both SQLite and PostgreSQL enforce.
        Index(
            "uq_model_version_one_champion",
            "status",
            unique=True,
            sqlite_where=text("status = 'champion'"),
            postgresql_where=text("status = 'champion'"),
        ),
    )

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    created_at: Mapped[datetime]
    status: Mapped[str] = mapped_column(String(20))
    trigger: Mapped[str] = mapped_column(String(20))
    artifact_path: Mapped[str] = mapped_column(String(500))
    sha256: Mapped[str] = mapped_column(String(64))
    reference_path: Mapped[str] = mapped_column(String(500))
    reference_sha256: Mapped[str | None] = mapped_column(String(64))  # None: registered before 0004
    train_start: Mapped[datetime | None]
    train_end: Mapped[datetime | None]
    train_rows: Mapped[int]
    metrics: Mapped[dict[str, Any]]
    params: Mapped[dict[str, Any]]
    feature_importance: Mapped[dict[str, Any]]
    data_sources: Mapped[dict[str, Any]]
    parent_version: Mapped[int | None]
    report_id: Mapped[int | None] = mapped_column(ForeignKey("drift_report.id"))
    retrain_run_id: Mapped[int | None]
    promoted_at: Mapped[datetime | None]
    note: Mapped[str] = mapped_column(Text, default="")

    @property
    def data_end(self) -> datetime:
        """The newest event time this version's training data can hold: its `train_end`, else (a bootstrap
        without times) its `created_at`. Reference rows without times are stamped with it, and only rows
        after it are unseen by it (the accuracy window, the gate's holdout, what prune keeps)."""
        return self.train_end or self.created_at


class DriftReport(Base):
    __tablename__ = "drift_report"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(index=True)
    champion_version: Mapped[int | None]
    window_start: Mapped[datetime | None]
    window_end: Mapped[datetime | None]
    rows: Mapped[int]
    labelled_rows: Mapped[int]
    sampled_rows: Mapped[int]
    features: Mapped[dict[str, Any]]
    drift_share: Mapped[float | None] = mapped_column(Float)
    weighted_drift_score: Mapped[float | None] = mapped_column(Float)
    prediction_drift: Mapped[dict[str, Any]]
    mae: Mapped[float | None] = mapped_column(Float)
    rmse: Mapped[float | None] = mapped_column(Float)
    mape: Mapped[float | None] = mapped_column(Float)
    mean_error: Mapped[float | None] = mapped_column(Float)  # prediction − actual; None before 0005
    champion_mae: Mapped[float | None] = mapped_column(Float)
    breach: Mapped[bool] = mapped_column(Boolean, default=False)
    reasons: Mapped[list[Any]]
    decision: Mapped[dict[str, Any]]
    html_path: Mapped[str | None] = mapped_column(String(500))
    duration_s: Mapped[float] = mapped_column(Float, default=0.0)


class RetrainRun(Base):
    __tablename__ = "retrain_run"
    __table_args__ = (
        Index(
            "uq_retrain_run_one_running",
            "status",
            unique=True,
            sqlite_where=text("status = 'running'"),
            postgresql_where=text("status = 'running'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    trigger: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str] = mapped_column(Text, default="")
    report_id: Mapped[int | None]
    champion_version: Mapped[int | None]
    candidate_version: Mapped[int | None]
    metrics: Mapped[dict[str, Any]]
    steps: Mapped[dict[str, Any]]
    error: Mapped[str | None] = mapped_column(Text)
    pid: Mapped[int | None]
    started_at: Mapped[datetime] = mapped_column(index=True)
    finished_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]  # renewed by the process doing the run while it is alive


class Notification(Base):
    __tablename__ = "notification"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(40))
    dedup_key: Mapped[str] = mapped_column(String(200), index=True, unique=True)  # one alert per episode
    payload: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(20), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime]
    delivered_at: Mapped[datetime | None]


class Lease(Base):
    """A named lock held by one process until it expires; the worker renews it."""

    __tablename__ = "lease"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    acquired_at: Mapped[datetime]
    expires_at: Mapped[datetime]
