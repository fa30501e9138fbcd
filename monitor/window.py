"""The monitored windows: the most recent logged predictions (drift), and the newest labelled rows the
champion has not trained on (accuracy)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pandas as pd
from sqlalchemy import Row, Select, literal, null, select
from sqlalchemy.orm import Session

from core.schema import GroundTruth, LabelledRow, PredictionLog
from core.spec import FeatureSpec
from retrain.dataset import INGESTED, PRODUCTION, SOURCE
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
) -> Window:
    """The drift window: the newest `max_rows` predictions logged at or before `now` (and, with `seconds`,
    not before `now - seconds`), optionally only those served by `model_version`, each with its actual or
    NaN.

    Frame columns: the spec features (spec order and dtypes), "prediction", the spec target, "prediction_id",
    "created_at" (UTC), "model_version"; rows ordered by created_at, oldest first. One query.
    """
    if max_rows < 1:
        raise ValueError("max_rows must be >= 1")
    query = (
        _logged()
        .join(GroundTruth, GroundTruth.prediction_id == PredictionLog.id, isouter=True)
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


def _logged() -> Select[Any]:
    """A logged prediction and its actual, as `_frame` reads them (the caller joins ground_truth)."""
    return select(
        PredictionLog.id,
        PredictionLog.created_at,
        PredictionLog.model_version,
        PredictionLog.features,
        PredictionLog.prediction,
        GroundTruth.actual,
    )


def _frame(rows: Sequence[Row[Any]], spec: FeatureSpec) -> pd.DataFrame:
    frame = spec.frame([row.features for row in rows])
    frame[PREDICTION] = pd.Series([row.prediction for row in rows], dtype=float)
    frame[spec.target] = pd.Series([row.actual for row in rows], dtype=float)
    frame[PREDICTION_ID] = pd.Series([row.id for row in rows], dtype=object)
    frame[CREATED_AT] = pd.to_datetime(pd.Series([row.created_at for row in rows], dtype=object), utc=True)
    frame[MODEL_VERSION] = pd.Series([row.model_version for row in rows], dtype="int64")
    return frame


def load_unseen_labelled(
    session: Session, spec: FeatureSpec, *, max_rows: int, after: datetime, now: datetime
) -> Window:
    """The accuracy window: the newest `max_rows` labelled rows dated after `after` (the end of the
    champion's training data, `retrain.dataset.data_end`) whose label was in by `now`. Logged predictions
    with their actual, whichever model answered them (dated by `created_at`), and imported rows (dated by
    their `event_time`): the champion trained on none of them, so scored by it they measure how it does
    now. Its own answers alone would leave it unmeasured for a label delay after every promotion, measure
    a rolled-back version on its stale answers, and never count imported labels.

    Frame columns: as `load_window`'s, plus "source" (`production_labelled` or `ingested`); "prediction"
    is the logged answer, NaN for imported rows (the caller scores them all with the champion);
    "prediction_id" is None and "model_version" 0 for imported rows. Oldest first.
    """
    if max_rows < 1:
        raise ValueError("max_rows must be >= 1")
    answered = session.execute(
        _logged()
        .join(GroundTruth, GroundTruth.prediction_id == PredictionLog.id)
        .where(
            PredictionLog.created_at > after,
            PredictionLog.created_at <= now,
            GroundTruth.received_at <= now,
        )
        .order_by(PredictionLog.created_at.desc(), PredictionLog.id.desc())
        .limit(max_rows)
    ).all()
    imported = session.execute(
        select(  # shaped as the rows above: no id, answer or version
            null().label("id"),
            LabelledRow.event_time.label("created_at"),
            literal(0).label("model_version"),
            LabelledRow.features,
            null().label("prediction"),
            LabelledRow.target.label("actual"),
        )
        .where(LabelledRow.event_time > after, LabelledRow.event_time <= now, LabelledRow.ingested_at <= now)
        .order_by(LabelledRow.event_time.desc(), LabelledRow.id.desc())
        .limit(max_rows)
    ).all()
    frame = pd.concat(
        [
            _frame(answered, spec).assign(**{SOURCE: PRODUCTION}),
            _frame(imported, spec).assign(**{SOURCE: INGESTED}),
        ],
        ignore_index=True,
    )
    frame = frame.sort_values(CREATED_AT, kind="stable").tail(max_rows).reset_index(drop=True)
    times = frame[CREATED_AT]
    return Window(
        frame=frame,
        start=times.iloc[0].to_pydatetime() if len(frame) else None,
        end=times.iloc[-1].to_pydatetime() if len(frame) else None,
        rows=len(frame),
        labelled_rows=len(frame),
    )
