"""load_window on a real database (SQLite file and PostgreSQL): rows, labels, order and filters."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Engine, event, insert
from sqlalchemy.orm import Session, sessionmaker

from core.generator import generate_transactions
from core.registry import Registry
from core.schema import GroundTruth, LabelledRow, ModelVersion, PredictionLog
from core.spec import FeatureSpec
from monitor.report import compute_drift
from monitor.window import load_unseen_labelled, load_window
from retrain.train import PREDICTION, predict

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

Log = Callable[..., str]


@pytest.fixture
def log(sessions: sessionmaker[Session], make_features: Callable[..., dict[str, Any]]) -> Log:
    """Insert one prediction_log row (and its ground truth when `actual` is given); returns its id."""
    counter = iter(range(1_000_000))

    def _log(
        minute: float,
        *,
        actual: float | None = None,
        version: int = 1,
        prediction: float | None = None,
        pid: str | None = None,
        **features: Any,
    ) -> str:
        n = next(counter)
        pid = pid or f"{n:08d}-0000-0000-0000-000000000000"
        created = T0 + timedelta(minutes=minute)
        with sessions.begin() as session:
            session.add(
                PredictionLog(
                    id=pid,
                    created_at=created,
                    model_version=version,
                    features=make_features(**features),
                    prediction=prediction if prediction is not None else 50_000.0 + n,
                    latency_ms=1.0,
                )
            )
            if actual is not None:
                session.flush()
                session.add(GroundTruth(prediction_id=pid, actual=actual, received_at=created))
        return pid

    return _log


def test_rows_come_oldest_first_with_labels_joined(
    sessions: sessionmaker[Session], spec: FeatureSpec, log: Log
) -> None:
    late = log(3, actual=61_000.0, floor=3)
    early = log(1, prediction=40_000.0, district="Gangnam-gu", area_m2=59.9)
    middle = log(2, actual=52_500.5)

    with sessions() as session:
        window = load_window(session, spec, max_rows=100, seconds=None, now=T0 + timedelta(hours=1))

    frame = window.frame
    assert list(frame.columns) == [
        *spec.feature_names, PREDICTION, spec.target, "prediction_id", "created_at", "model_version",
    ]  # fmt: skip
    assert (window.rows, window.labelled_rows) == (3, 2)
    assert (window.start, window.end) == (T0 + timedelta(minutes=1), T0 + timedelta(minutes=3))
    assert list(frame["prediction_id"]) == [early, middle, late]
    assert list(frame["created_at"]) == [T0 + timedelta(minutes=m) for m in (1, 2, 3)]
    assert str(frame["created_at"].dtype) == "datetime64[ns, UTC]"
    assert frame[spec.target].tolist()[1:] == [52_500.5, 61_000.0]
    assert np.isnan(frame[spec.target].iloc[0])
    assert frame[PREDICTION].iloc[0] == 40_000.0
    assert frame.loc[0, ["district", "area_m2", "floor"]].tolist() == ["Gangnam-gu", 59.9, 12.0]
    assert frame.loc[2, "floor"] == 3.0
    assert frame["model_version"].tolist() == [1, 1, 1]
    assert frame[spec.feature_names].dtypes.tolist() == spec.coerce(frame).dtypes.tolist()
    assert frame["area_m2"].dtype == float and frame["district"].dtype == object


def test_max_rows_keeps_the_most_recent(sessions: sessionmaker[Session], spec: FeatureSpec, log: Log) -> None:
    ids = [log(m, actual=1000.0 * m if m % 2 else None) for m in range(10)]

    with sessions() as session:
        window = load_window(session, spec, max_rows=4, seconds=None, now=T0 + timedelta(hours=1))

    assert list(window.frame["prediction_id"]) == ids[6:]
    assert (window.rows, window.labelled_rows) == (4, 2)
    assert window.start == T0 + timedelta(minutes=6)


def test_the_accuracy_window_is_the_newest_labelled_rows_after_the_training_data(
    sessions: sessionmaker[Session], spec: FeatureSpec, log: Log, make_features: Callable[..., dict[str, Any]]
) -> None:
    # Labels arrive late: the newest rows have none, so the labelled window reaches back past them. Any
    # version's answers count, and imported rows, merged by time; rows dated up to `after` do not (the
    # champion trained on them), nor labels received or rows imported after `now`.
    now = T0 + timedelta(hours=1)
    ids = [log(m, actual=100.0 * m if m < 6 else None) for m in range(10)]
    other = log(4.5, actual=5.0, version=2)
    late = log(3.5)
    imported = [(3.2, 7.0, now), (5.5, 9.0, now), (4.2, 11.0, now + timedelta(seconds=1))]
    with sessions.begin() as session:
        session.add(GroundTruth(prediction_id=late, actual=1.0, received_at=now + timedelta(seconds=1)))
        for minute, target, ingested_at in imported:
            session.add(
                LabelledRow(
                    features=make_features(floor=int(target)), target=target, source="test",
                    event_time=T0 + timedelta(minutes=minute), ingested_at=ingested_at,
                )
            )  # fmt: skip

    with sessions() as session:
        window = load_unseen_labelled(session, spec, max_rows=5, after=T0 + timedelta(minutes=2), now=now)
        everything = load_unseen_labelled(session, spec, max_rows=100, after=T0 - timedelta(days=1), now=now)
        none_after = load_unseen_labelled(
            session, spec, max_rows=100, after=T0 + timedelta(minutes=6), now=now
        )
        # A row dated exactly at `after` is the training data's last: out, logged or imported.
        after_answer = load_unseen_labelled(
            session, spec, max_rows=100, after=T0 + timedelta(minutes=3), now=now
        )
        after_import = load_unseen_labelled(
            session, spec, max_rows=100, after=T0 + timedelta(minutes=3.2), now=now
        )
        newest = load_unseen_labelled(session, spec, max_rows=1, after=T0 + timedelta(minutes=2), now=now)
        newest_two = load_unseen_labelled(session, spec, max_rows=2, after=T0 + timedelta(minutes=2), now=now)

    frame = window.frame
    assert list(frame[spec.target]) == [7.0, 400.0, 5.0, 500.0, 9.0]  # minutes 3.2, 4, 4.5, 5, 5.5
    assert list(frame["prediction_id"]) == [None, ids[4], other, ids[5], None]
    assert list(frame["source"]) == ["ingested", *["production_labelled"] * 3, "ingested"]
    assert list(frame["model_version"]) == [0, 1, 2, 1, 0]
    assert frame["prediction"].isna().tolist() == [True, False, False, False, True]
    assert (frame.loc[0, "floor"], frame.loc[4, "floor"]) == (7, 9)
    assert (window.rows, window.labelled_rows) == (5, 5)
    assert (window.start, window.end) == (T0 + timedelta(minutes=3.2), T0 + timedelta(minutes=5.5))
    # Every row labelled by `now`: minute 5.5 is an imported one, newer than any labelled answer.
    assert list(everything.frame[spec.target]) == [0.0, 100.0, 200.0, 300.0, 7.0, 400.0, 5.0, 500.0, 9.0]
    assert none_after.rows == 0 and list(none_after.frame.columns) == list(window.frame.columns)
    assert list(after_answer.frame[spec.target]) == [7.0, 400.0, 5.0, 500.0, 9.0]
    assert list(after_import.frame[spec.target]) == [400.0, 5.0, 500.0, 9.0]
    assert list(newest.frame[spec.target]) == [9.0]  # the newest of either kind
    assert list(newest_two.frame[spec.target]) == [500.0, 9.0]


def test_seconds_bounds_the_window_and_later_rows_are_left_out(
    sessions: sessionmaker[Session], spec: FeatureSpec, log: Log
) -> None:
    ids = [log(m, actual=1.0) for m in range(6)]
    log(7)  # after `now`: not part of this window

    with sessions() as session:
        window = load_window(session, spec, max_rows=100, seconds=150, now=T0 + timedelta(minutes=5))
        on_the_edge = load_window(session, spec, max_rows=100, seconds=180, now=T0 + timedelta(minutes=5))

    assert list(window.frame["prediction_id"]) == ids[3:]
    assert (window.rows, window.labelled_rows) == (3, 3)
    assert list(on_the_edge.frame["prediction_id"]) == ids[2:]  # created_at == now - seconds is inside


def test_model_version_keeps_only_that_models_rows(
    sessions: sessionmaker[Session], spec: FeatureSpec, log: Log
) -> None:
    v1 = [log(m, version=1, actual=1.0) for m in (0, 2, 4)]
    v2 = [log(m, version=2) for m in (1, 3)]

    with sessions() as session:
        only_v2 = load_window(
            session, spec, max_rows=100, seconds=None, now=T0 + timedelta(hours=1), model_version=2
        )
        last_two_v1 = load_window(
            session, spec, max_rows=2, seconds=None, now=T0 + timedelta(hours=1), model_version=1
        )
        both = load_window(session, spec, max_rows=100, seconds=None, now=T0 + timedelta(hours=1))

    assert list(only_v2.frame["prediction_id"]) == v2
    assert (only_v2.rows, only_v2.labelled_rows) == (2, 0)
    assert only_v2.frame["model_version"].tolist() == [2, 2]
    assert list(last_two_v1.frame["prediction_id"]) == v1[1:]
    assert both.frame["model_version"].tolist() == [1, 2, 1, 2, 1]


def test_equal_timestamps_are_ordered_by_id(
    sessions: sessionmaker[Session], spec: FeatureSpec, log: Log
) -> None:
    b = log(1, pid="bbbbbbbb-0000-0000-0000-000000000000")
    a = log(1, pid="aaaaaaaa-0000-0000-0000-000000000000")
    log(0, pid="cccccccc-0000-0000-0000-000000000000")

    with sessions() as session:
        window = load_window(session, spec, max_rows=2, seconds=None, now=T0 + timedelta(hours=1))

    assert list(window.frame["prediction_id"]) == [a, b]


def test_an_empty_window(sessions: sessionmaker[Session], spec: FeatureSpec, log: Log) -> None:
    log(10)

    with sessions() as session:
        window = load_window(session, spec, max_rows=100, seconds=60, now=T0)

    assert (window.rows, window.labelled_rows, window.start, window.end) == (0, 0, None, None)
    assert list(window.frame.columns) == [
        *spec.feature_names, PREDICTION, spec.target, "prediction_id", "created_at", "model_version",
    ]  # fmt: skip
    assert window.frame.empty


@pytest.fixture
def statements(sessions: sessionmaker[Session]) -> Iterator[list[str]]:
    engine: Engine = sessions.kw["bind"]
    seen: list[str] = []

    def _record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", _record)
    yield seen
    event.remove(engine, "before_cursor_execute", _record)


def test_one_query_however_many_rows(
    sessions: sessionmaker[Session], spec: FeatureSpec, log: Log, statements: list[str]
) -> None:
    for m in range(50):
        log(m, actual=float(m) if m % 3 == 0 else None)
    statements.clear()

    with sessions() as session:
        window = load_window(session, spec, max_rows=1000, seconds=3600, now=T0 + timedelta(hours=1))

    assert (window.rows, window.labelled_rows) == (50, 17)
    assert len([s for s in statements if s.lstrip().upper().startswith("SELECT")]) == 1


def test_a_loaded_window_feeds_compute_drift(
    sessions: sessionmaker[Session], spec: FeatureSpec, registry: Registry, champion: ModelVersion
) -> None:
    raw = generate_transactions(
        1200, start="2022-01-01", end="2022-02-01", scenario="unit_bug", change_at="2022-01-01", seed=7
    )
    served = predict(registry.load(champion), raw, spec)
    features = spec.coerce(raw).to_dict("records")
    ids = [f"{i:08d}-1111-1111-1111-111111111111" for i in range(len(raw))]
    with sessions.begin() as session:
        session.execute(
            insert(PredictionLog),
            [
                {"id": pid, "created_at": T0 + timedelta(seconds=i), "model_version": champion.version,
                 "features": features[i], "prediction": float(served[i]), "latency_ms": 1.0}
                for i, pid in enumerate(ids)
            ],
        )  # fmt: skip
        session.execute(
            insert(GroundTruth),
            [
                {"prediction_id": ids[i], "actual": float(raw[spec.target].iloc[i]), "received_at": T0}
                for i in range(0, len(raw), 4)
            ],
        )

    with sessions() as session:
        window = load_window(
            session,
            spec,
            max_rows=5000,
            seconds=None,
            now=T0 + timedelta(hours=1),
            model_version=champion.version,
        )
    result = compute_drift(
        registry.reference(champion), window.frame, spec, importance=champion.feature_importance
    )

    assert (result.rows, result.labelled_rows) == (1200, 300)
    assert result.accuracy is not None and result.accuracy.rows == 300
    assert result.drifted() == ["area_m2"]

    # Accuracy from a separate labelled window: the newest 100 labelled rows, drift still on `window`.
    with sessions() as session:
        labelled = load_unseen_labelled(
            session, spec, max_rows=100, after=T0 - timedelta(days=1), now=T0 + timedelta(hours=1)
        )
    apart = compute_drift(
        registry.reference(champion), window.frame, spec, importance=champion.feature_importance,
        labelled=labelled.frame,
    )  # fmt: skip
    newest = [i for i in range(0, len(raw), 4)][-100:]
    expected_mae = float(np.mean(np.abs(served[newest] - raw[spec.target].to_numpy()[newest])))
    assert (apart.rows, apart.labelled_rows) == (1200, 100)
    assert apart.accuracy is not None and apart.accuracy.mae == pytest.approx(expected_mae)
    assert apart.drifted() == ["area_m2"]
