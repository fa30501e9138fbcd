"""Training data for a retrain: the champion's reference snapshot plus every labelled row seen since.

Three sources, one frame (spec features, target, `event_time` in UTC, `source`):

- ``reference``: the rows of the champion's reference snapshot (up to 20k rows) that came from its own
  reference lineage. Snapshots written by `candidate_reference` keep each row's event time and source;
  rows that came from the database are dropped here because they are read afresh from it below (no row
  twice, and no holdout row hiding in the training part). A bootstrap snapshot keeps its rows' times when
  v1's data had a time column; one without times has its rows stamped with the champion's ``train_end``
  (else its ``created_at``).
- ``production_labelled``: logged predictions that received ground truth; event time = the prediction's
  ``created_at``.
- ``ingested``: ``labelled_row`` rows; event time = their ``event_time``.

Window: with ``window_days`` set, only rows whose event time lies in ``[now - window_days, now]`` are kept,
and that applies to reference rows too, by their own or stamped time: data older than the window never
trains a windowed retrain, however many generations of references it passed through. Without a window
every row up to ``now`` is kept and the reference always is. Database rows stamped after ``now`` are left
for a later assembly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import numpy as np
import pandas as pd
from catboost import CatBoostRegressor
from sqlalchemy import Select, select
from sqlalchemy.orm import Session, sessionmaker

from core.registry import Registry
from core.schema import GroundTruth, LabelledRow, ModelVersion, PredictionLog
from core.spec import FeatureSpec
from retrain.train import REFERENCE_MAX_ROWS, reference_snapshot

EVENT_TIME = "event_time"
SOURCE = "source"
REFERENCE = "reference"
PRODUCTION = "production_labelled"
INGESTED = "ingested"
SOURCES = (REFERENCE, PRODUCTION, INGESTED)
# A holdout of fewer new rows than this is too noisy for the gate's margin (see `holdout`).
MIN_HOLDOUT_ROWS = 50
HoldoutBasis = Literal["unseen", "new", "all"]


@dataclass(frozen=True, slots=True)
class TrainingData:
    frame: pd.DataFrame
    sources: dict[str, int]
    start: datetime | None
    end: datetime | None

    def __len__(self) -> int:
        return len(self.frame)


def assemble(
    *,
    sessions: sessionmaker[Session],
    registry: Registry,
    champion: ModelVersion,
    spec: FeatureSpec,
    window_days: int | None,
    now: datetime,
) -> TrainingData:
    """All labelled data for a retrain, sorted by event time (ties keep source order), index 0..n-1."""
    since = now - timedelta(days=window_days) if window_days is not None else None
    parts = [
        part
        for part in (
            _reference(registry, champion, spec, since=since),
            _production(sessions, spec, since=since, until=now),
            _ingested(sessions, spec, since=since, until=now),
        )
        if len(part)
    ]
    frame = pd.concat(parts, ignore_index=True) if parts else _empty(spec)
    frame = frame.sort_values(EVENT_TIME, kind="stable").reset_index(drop=True)
    counts = frame[SOURCE].value_counts()
    times = frame[EVENT_TIME]
    return TrainingData(
        frame=frame,
        sources={name: int(counts.get(name, 0)) for name in SOURCES},
        start=times.min().to_pydatetime() if len(frame) else None,
        end=times.max().to_pydatetime() if len(frame) else None,
    )


def holdout(
    data: TrainingData, spec: FeatureSpec, *, fraction: float, seen_until: datetime | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, HoldoutBasis]:
    """(train, holdout, basis): the holdout is `fraction` of a pool of labelled rows, taken from its newest.

    The pool is, by preference, the new rows (production_labelled + ingested) stamped after `seen_until`,
    the end of the champion's training data ("unseen"): the gate compares candidate and champion on rows
    that neither trained on, where a champion scored on its own training rows would look better than it
    is. When that pool would give fewer than MIN_HOLDOUT_ROWS holdout rows (just after a promotion,
    say), it is every new row ("new"): the champion may have trained on some of them, which makes the gate
    stricter, where a holdout of a dozen rows would make it a coin toss. When every new row would not give
    MIN_HOLDOUT_ROWS either, it is every row ("all"), reference included, stricter again.

    Of the newest 2 × `fraction` of the pool, every other row (the newest first) is held out and the rest
    train; with `fraction` over one half the holdout is simply the newest rows. Held out from the recent
    past, not cut off at its end: right after a change in the data, a plain time tail would hold out
    every post-change row, and the gate would judge a candidate that never saw the new data on nothing
    but the new data. Train is every row not held out. Both keep time order.
    """
    frame = data.frame
    is_new = frame[SOURCE] != REFERENCE
    unseen = frame.index[is_new & (frame[EVENT_TIME] > seen_until)] if seen_until is not None else None
    new = frame.index[is_new]
    basis: HoldoutBasis
    if unseen is not None and _held_size(len(unseen), fraction) >= MIN_HOLDOUT_ROWS:
        pool, basis = unseen, "unseen"
    elif _held_size(len(new), fraction) >= MIN_HOLDOUT_ROWS:
        pool, basis = new, "new"
    else:
        pool, basis = frame.index, "all"
    size = _held_size(len(pool), fraction)
    held = pool[len(pool) - 2 * size :][1::2] if 2 * size <= len(pool) else pool[len(pool) - size :]
    return frame.drop(index=held), frame.loc[held], basis


def _held_size(pool: int, fraction: float) -> int:
    return min(max(math.ceil(round(pool * fraction, 9)), 1), pool) if pool else 0


def sample_weights(
    train: pd.DataFrame, *, new_share: float, half_life_days: float | None = None
) -> np.ndarray | None:
    """Training weights that average 1 (so CatBoost's learning rate holds), or None for equal weights.

    Two adjustments, each optional: new labelled rows get `new_share` of the total when the reference
    outweighs them (nothing to do with no new rows, no reference rows, share 0, or new rows already
    carrying that share); and with `half_life_days`, a row's weight halves for every that many days it is
    older than the newest row, so that after a change in the market the candidate learns its new level
    rather than the average of old and new.
    """
    weights = _share_weights(train, new_share=new_share)
    if half_life_days is not None and len(train):
        times = pd.to_datetime(train[EVENT_TIME], utc=True)
        age_days = ((times.max() - times).dt.total_seconds() / 86400).to_numpy(dtype=float)
        decay = np.power(0.5, age_days / half_life_days)
        weights = decay if weights is None else weights * decay
    if weights is None:
        return None
    return np.asarray(weights * (len(weights) / weights.sum()), dtype=float)


def _share_weights(train: pd.DataFrame, *, new_share: float) -> np.ndarray | None:
    is_new = (train[SOURCE] != REFERENCE).to_numpy()
    n_new, n_ref = int(is_new.sum()), int((~is_new).sum())
    if new_share <= 0 or n_new == 0 or n_ref == 0 or n_new / len(train) >= new_share:
        return None
    return np.where(is_new, new_share / n_new, (1 - new_share) / n_ref)


def candidate_reference(model: CatBoostRegressor, data: TrainingData, spec: FeatureSpec) -> pd.DataFrame:
    """The candidate's reference snapshot (train.reference_snapshot) plus each row's event time and source."""
    return timed_reference(model, data.frame, spec)


def timed_reference(
    model: CatBoostRegressor, frame: pd.DataFrame, spec: FeatureSpec, *, seed: int = 0
) -> pd.DataFrame:
    """train.reference_snapshot of `frame`, which has EVENT_TIME and SOURCE columns, keeping both for each
    row: a windowed retrain then keeps only the reference rows inside its window (see `assemble`)."""
    if len(frame) > REFERENCE_MAX_ROWS:
        frame = frame.sample(REFERENCE_MAX_ROWS, random_state=seed).sort_values(EVENT_TIME, kind="stable")
    reference = reference_snapshot(model, frame, spec)
    reference[EVENT_TIME] = frame[EVENT_TIME].to_numpy()
    reference[SOURCE] = frame[SOURCE].to_numpy()
    return reference


def _reference(
    registry: Registry, champion: ModelVersion, spec: FeatureSpec, *, since: datetime | None
) -> pd.DataFrame:
    stamp = champion.data_end
    reference = registry.reference(champion, spec=spec)
    if SOURCE in reference.columns:
        reference = reference[reference[SOURCE] == REFERENCE]
    times = reference[EVENT_TIME] if EVENT_TIME in reference.columns else [stamp] * len(reference)
    out = _tidy(reference, spec, target=reference[spec.target], times=times, source=REFERENCE)
    return out if since is None else out[out[EVENT_TIME] >= since]


def _production(
    sessions: sessionmaker[Session], spec: FeatureSpec, *, since: datetime | None, until: datetime
) -> pd.DataFrame:
    query = (
        select(PredictionLog.features, GroundTruth.actual, PredictionLog.created_at)
        .join(GroundTruth, GroundTruth.prediction_id == PredictionLog.id)
        .where(PredictionLog.created_at <= until)
        .order_by(PredictionLog.created_at, PredictionLog.id)
    )
    if since is not None:
        query = query.where(PredictionLog.created_at >= since)
    return _from_rows(sessions, query, spec, source=PRODUCTION)


def _ingested(
    sessions: sessionmaker[Session], spec: FeatureSpec, *, since: datetime | None, until: datetime
) -> pd.DataFrame:
    query = (
        select(LabelledRow.features, LabelledRow.target, LabelledRow.event_time)
        .where(LabelledRow.event_time <= until)
        .order_by(LabelledRow.event_time, LabelledRow.id)
    )
    if since is not None:
        query = query.where(LabelledRow.event_time >= since)
    return _from_rows(sessions, query, spec, source=INGESTED)


def _from_rows(
    sessions: sessionmaker[Session], query: Select[Any], spec: FeatureSpec, *, source: str
) -> pd.DataFrame:
    with sessions() as session:
        rows = session.execute(query).all()
    if not rows:
        return _empty(spec)
    features = spec.frame([r[0] for r in rows])
    return _tidy(features, spec, target=[r[1] for r in rows], times=[r[2] for r in rows], source=source)


def _tidy(features: pd.DataFrame, spec: FeatureSpec, *, target: Any, times: Any, source: str) -> pd.DataFrame:
    out = spec.coerce(features).reset_index(drop=True)
    out[spec.target] = pd.to_numeric(pd.Series(list(target), dtype=object), errors="coerce").astype(float)
    out[EVENT_TIME] = pd.to_datetime(pd.Series(list(times), dtype=object), utc=True)
    out[SOURCE] = source
    # A label that is not a finite number cannot train anything.
    return out[out[spec.target].notna() & (out[spec.target].abs() != float("inf"))]


def _empty(spec: FeatureSpec) -> pd.DataFrame:
    out = spec.frame([])
    out[spec.target] = pd.Series(dtype=float)
    out[EVENT_TIME] = pd.Series(dtype="datetime64[ns, UTC]")
    out[SOURCE] = pd.Series(dtype=object)
    return out
