"""The monitored window: the most recent logged predictions, with their labels where they have arrived."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pandas as pd
from sqlalchemy import Row, select
from sqlalchemy.orm import Session

from core.schema import GroundTruth, PredictionLog
from core.spec import FeatureSpec
from retrain.train import PREDICTION

PREDICTION_ID = "prediction_id"
CREATED_AT = "created_at"
MODEL_VERSION = "model_version"


@dataclass(frozen=True, slots=True)
class Window:
    frame: pd.DataFrame
    start: datetime | None  # created_at of the oldest row; None when the window is empty
    end: datetime | None  # created_at of the newest row
    rows: int
    labelled_rows: int


def load_window(
    session: Session,
    spec: FeatureSpec,
    *,
    max_rows: int,
    seconds: int | None,
    now: datetime,
    model_version: int | None = None,
    labelled_only: bool = False,
) -> Window:
    """The newest `max_rows` predictions logged at or before `now` (and, with `seconds`, not before
    `now - seconds`), optionally only those served by `model_version`, each with its actual or NaN.
    `labelled_only`: only predictions whose actual has arrived (the accuracy window).

    Frame columns: the spec features (spec order and dtypes), "prediction", the spec target, "prediction_id",
    "created_at" (UTC), "model_version"; rows ordered by created_at, oldest first. One query.
    """
    if max_rows < 1:
        raise ValueError("max_rows must be >= 1")
    query = (
        select(
            PredictionLog.id,
            PredictionLog.created_at,
            PredictionLog.model_version,
            PredictionLog.features,
            PredictionLog.prediction,
            GroundTruth.actual,
        )
        .join(GroundTruth, GroundTruth.prediction_id == PredictionLog.id, isouter=not labelled_only)
        .where(PredictionLog.created_at <= now)
        .order_by(PredictionLog.created_at.desc(), PredictionLog.id.desc())
        .limit(max_rows)
    )
    if seconds is not None:
        query = query.where(PredictionLog.created_at >= now - timedelta(seconds=seconds))
    if model_version is not None:
        query = query.where(PredictionLog.model_version == model_version)
    rows = session.execute(query).all()[::-1]
    frame = _frame(rows, spec)
    return Window(
        frame=frame,
        start=rows[0].created_at if rows else None,
        end=rows[-1].created_at if rows else None,
        rows=len(frame),
        labelled_rows=int(frame[spec.target].notna().sum()),
    )


def _frame(rows: Sequence[Row[Any]], spec: FeatureSpec) -> pd.DataFrame:
    frame = spec.frame([row.features for row in rows])
    frame[PREDICTION] = pd.Series([row.prediction for row in rows], dtype=float)
    frame[spec.target] = pd.Series([row.actual for row in rows], dtype=float)
    frame[PREDICTION_ID] = pd.Series([row.id for row in rows], dtype=object)
    frame[CREATED_AT] = pd.to_datetime(pd.Series([row.created_at for row in rows], dtype=object), utc=True)
    frame[MODEL_VERSION] = pd.Series([row.model_version for row in rows], dtype="int64")
    return frame
