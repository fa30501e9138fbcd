"""Retention: delete logged predictions, and on request labelled data, older than a cutoff.

Deletes go in short batches, each its own transaction, so serving processes writing the log wait at most one
batch for SQLite's write lock. Two kinds of rows are kept whatever their age:
- the drift window's: the newest `window_rows` predictions, and the newest `window_rows` the champion served
  (the monitor reads one or the other);
- labelled rows newer than the champion's training data: the accuracy window reads them, and the next
  retrain learns from them as the new data.

On request it also deletes the artifact directories (model, reference snapshot) of gate-rejected versions
older than the cutoff; their rows stay, with a note, and the champion's, former champions' (rollback's) and
candidates' directories are never touched.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Select, delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from core.schema import GroundTruth, LabelledRow, ModelStatus, ModelVersion, PredictionLog

BATCH_ROWS = 2_000


@dataclass(frozen=True, slots=True)
class Retention:
    """What a prune deletes (or, dry, would): rows before each bound."""

    cutoff: datetime  # what was asked
    predictions_before: datetime  # the cutoff, or the drift window's oldest row when older
    # None: labelled data is kept; else the cutoff, or the end of the champion's training data when older
    labelled_before: datetime | None
    predictions: int  # unlabelled predictions
    labelled_predictions: int  # labelled predictions, each with its label
    labelled_rows: int  # ingested rows (labelled_row)
    # With artifacts asked for: the gate-rejected versions created before the cutoff, with their directories
    artifacts: tuple[tuple[int, Path], ...] = ()
    artifact_bytes: int = 0

    @property
    def total(self) -> int:
        """Rows, not artifacts."""
        return self.predictions + self.labelled_predictions + self.labelled_rows


def plan(
    session: Session, *, cutoff: datetime, window_rows: int, labelled: bool, artifact_dir: Path | None = None
) -> Retention:
    """The bounds and row counts of a prune at `cutoff`; `labelled` also deletes labelled data, and
    `artifact_dir` the directories there of gate-rejected versions created before the cutoff."""
    champion = session.scalar(select(ModelVersion).where(ModelVersion.status == ModelStatus.champion))
    predictions_before = min([cutoff, *_window_starts(session, window_rows, champion)])
    labelled_before = None
    if labelled:
        labelled_before = min(predictions_before, champion.data_end) if champion else predictions_before
    artifacts = _rejected_artifacts(session, cutoff, artifact_dir) if artifact_dir is not None else ()
    return Retention(
        cutoff=cutoff,
        predictions_before=predictions_before,
        labelled_before=labelled_before,
        predictions=_count(session, _unlabelled(predictions_before)),
        labelled_predictions=_count(session, _labelled(labelled_before)) if labelled_before else 0,
        labelled_rows=_count(session, _ingested(labelled_before)) if labelled_before else 0,
        artifacts=artifacts,
        artifact_bytes=sum(f.stat().st_size for _, d in artifacts for f in d.rglob("*") if f.is_file()),
    )


def prune(
    sessions: sessionmaker[Session],
    retention: Retention,
    *,
    on_progress: Callable[[int], None] = lambda rows: None,
) -> Retention:
    """Delete what `retention` (from `plan`) counted, in batches; the rows actually deleted, which may differ
    from the plan's counts by labels and rows that arrived meanwhile."""
    predictions = _delete_batches(
        sessions, PredictionLog, _unlabelled(retention.predictions_before), on_progress
    )
    labelled_predictions = labelled_rows = 0
    if (before := retention.labelled_before) is not None:
        labelled_predictions = _delete_batches(
            sessions, PredictionLog, _labelled(before), on_progress, also_lock=(GroundTruth,)
        )
        labelled_rows = _delete_batches(sessions, LabelledRow, _ingested(before), on_progress)
    return replace(
        retention,
        predictions=predictions,
        labelled_predictions=labelled_predictions,
        labelled_rows=labelled_rows,
    )


def prune_artifacts(sessions: sessionmaker[Session], retention: Retention, *, now: datetime) -> int:
    """Delete the directories `retention.artifacts` names (from `plan`); how many.

    Each goes while its row is locked and still rejected, and the row's note says so: a version promoted
    since the plan keeps its files, and a promotion waiting for the lock then finds them gone and is refused.
    """
    deleted = 0
    for version, directory in retention.artifacts:
        with sessions.begin() as session:
            # Still rejected, checked by a write: it takes SQLite's write lock (a read there locks nothing,
            # and a promotion could commit between it and the delete) and PostgreSQL's row lock, held until
            # the files are gone.
            still = (ModelVersion.version == version, ModelVersion.status == ModelStatus.rejected)
            marked = session.execute(update(ModelVersion).where(*still).values(status=ModelStatus.rejected))
            if marked.rowcount != 1:  # type: ignore[attr-defined]
                continue
            row = session.get(ModelVersion, version)
            assert row is not None
            pruned = f"artifacts pruned {now:%Y-%m-%d %H:%M} UTC: it can no longer be promoted"
            row.note = (row.note + "\n" if row.note else "") + pruned
            session.flush()
            if directory.is_dir():  # else removed by hand since the plan
                shutil.rmtree(directory)
        deleted += 1
    return deleted


def _rejected_artifacts(
    session: Session, cutoff: datetime, artifact_dir: Path
) -> tuple[tuple[int, Path], ...]:
    """Gate-rejected versions created before `cutoff` whose directory under `artifact_dir` is there and is
    the one their row names (a row naming a file elsewhere is left alone, and so is a symlinked directory)."""
    from core.registry import ArtifactStore  # here: it imports CatBoost, which pruning rows does not need

    rows = session.execute(
        select(ModelVersion.version, ModelVersion.artifact_path)
        .where(ModelVersion.status == ModelStatus.rejected, ModelVersion.created_at < cutoff)
        .order_by(ModelVersion.version)
    ).all()
    store, found = ArtifactStore(artifact_dir), []
    for version, artifact_path in rows:
        directory = store.version_dir(version)
        if (
            directory.is_dir()
            and not directory.is_symlink()  # rmtree refuses one: every run would stop there
            and Path(artifact_path).parent.resolve() == directory.resolve()
        ):
            found.append((version, directory))
    return tuple(found)


def _window_starts(session: Session, window_rows: int, champion: ModelVersion | None) -> list[datetime]:
    """The oldest of the newest `window_rows` predictions, of all and of the champion's: the oldest of them
    all when there are fewer (the window holds every one); none for a query with no rows."""
    newest = select(PredictionLog.created_at).order_by(PredictionLog.created_at.desc())
    queries = [newest]
    if champion is not None:
        queries.append(newest.where(PredictionLog.model_version == champion.version))
    windows = (q.limit(window_rows).subquery() for q in queries)  # read newest first, by index, as before
    starts = (session.scalar(select(func.min(window.c.created_at))) for window in windows)
    return [start for start in starts if start is not None]


def _unlabelled(before: datetime) -> Select[Any, datetime]:
    return (
        select(PredictionLog.id, PredictionLog.created_at)
        .join(GroundTruth, GroundTruth.prediction_id == PredictionLog.id, isouter=True)
        .where(PredictionLog.created_at < before, GroundTruth.prediction_id.is_(None))
    )


def _labelled(before: datetime) -> Select[Any, datetime]:
    return (
        select(PredictionLog.id, PredictionLog.created_at)
        .join(GroundTruth, GroundTruth.prediction_id == PredictionLog.id)
        .where(PredictionLog.created_at < before)
    )


def _ingested(before: datetime) -> Select[Any, datetime]:
    return select(LabelledRow.id, LabelledRow.event_time).where(LabelledRow.event_time < before)


def _count(session: Session, rows: Select[Any, datetime]) -> int:
    return int(session.scalar(select(func.count()).select_from(rows.subquery())) or 0)


def _delete_batches(
    sessions: sessionmaker[Session],
    table: type[PredictionLog] | type[LabelledRow],
    rows: Select[Any, datetime],
    on_progress: Callable[[int], None],
    also_lock: tuple[type[GroundTruth], ...] = (),
) -> int:
    """Delete the rows of `table` that `rows` (id, time) selects, oldest first, BATCH_ROWS per transaction;
    how many. Each batch reads on from the last one's time, not past the rows kept before it again.
    `also_lock`: the other tables `rows` joins whose rows go with them (labels, by cascade)."""
    row_id, time = rows.selected_columns
    deleted, since = 0, None
    while True:
        with sessions.begin() as session:
            query = rows if since is None else rows.where(time >= since)
            # FOR UPDATE (PostgreSQL): a label being stored for one of these waits for this transaction, and
            # then finds its prediction gone (POST /feedback answers it unknown), or was stored first. SKIP
            # LOCKED: a row a request holds (a label being stored or changed) is left to the next prune, so
            # the batch never waits for a request that may be waiting for it (one /feedback labelling two
            # of its rows would deadlock with it).
            locked = (
                query.order_by(time)
                .limit(BATCH_ROWS)
                .with_for_update(of=(table, *also_lock), skip_locked=True)
            )
            batch: Sequence[Any] = session.execute(locked).all()
            if not batch:
                return deleted
            # Only the rows `rows` still selects: a label stored since the read makes a prediction labelled,
            # kept without --labelled. The DELETE runs under SQLite's write lock, so none comes in between.
            still = rows.with_only_columns(row_id).where(row_id.in_([row[0] for row in batch]))
            done = session.connection().execute(delete(table).where(table.id.in_(still)))  # labels: cascade
        deleted, since = deleted + done.rowcount, batch[-1][1]
        on_progress(done.rowcount)
