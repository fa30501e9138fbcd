"""The Alembic migrations build exactly the schema the models declare, on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from core.db import _alembic_config, make_engine, make_sessions, utcnow
from core.schema import Base, DriftReport, GroundTruth, ModelVersion, PredictionLog


def test_migrations_match_the_models(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"compare_type": True, "compare_server_default": False}
            )
            differences = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert differences == []


def test_migrating_keeps_the_rows_of_a_rebuilt_table_and_those_pointing_at_it(db_url: str) -> None:
    """SQLite drops a column by rebuilding the table (0005's downgrade rebuilds drift_report, which a
    model_version row points at; a change to prediction_log would take its ground_truth along)."""
    now = utcnow()
    engine = make_engine(db_url)
    with make_sessions(engine).begin() as session:
        session.add(
            DriftReport(
                id=1, created_at=now, rows=10, labelled_rows=1, sampled_rows=10, features={},
                prediction_drift={}, breach=True, reasons=[], decision={}, duration_s=0.5,
            )
        )  # fmt: skip
        session.flush()
        session.add(
            ModelVersion(
                version=1, created_at=now, status="champion", trigger="drift", artifact_path="a",
                sha256="0" * 64, reference_path="r", train_rows=10, metrics={}, params={},
                feature_importance={}, data_sources={}, report_id=1,
            )
        )  # fmt: skip
        session.add(
            PredictionLog(
                id="p1", created_at=now, model_version=1, features={}, prediction=1.0, latency_ms=1.0
            )
        )
        session.flush()
        session.add(GroundTruth(prediction_id="p1", actual=2.0, received_at=now))
    engine.dispose()

    config = _alembic_config(db_url)
    command.downgrade(config, "0001")
    command.upgrade(config, "head")

    with engine.connect() as connection:
        tables = ("drift_report", "model_version", "prediction_log", "ground_truth")
        counts = {t: connection.scalar(text(f"SELECT count(*) FROM {t}")) for t in tables}
        report_id = connection.scalar(text("SELECT report_id FROM model_version"))
    engine.dispose()
    assert counts == {"drift_report": 1, "model_version": 1, "prediction_log": 1, "ground_truth": 1}
    assert report_id == 1


def test_0007_keys_the_rows_loaded_before_it_as_an_ingest_keys_them(db_url: str, tmp_path) -> None:
    """Rows loaded before labelled_row.row_key existed are known to the next ingest of an overlapping file;
    a row dated by its ingest (no time column) stays unkeyed."""
    from core.generator import generate_transactions
    from core.ingest import ingest_csv
    from core.spec import load_spec, parse_spec

    engine = make_engine(db_url)
    sessions = make_sessions(engine)
    path, plain = tmp_path / "jan.csv", tmp_path / "meters.csv"
    generate_transactions(20, seed=1).to_csv(path, index=False)
    plain.write_text("hour,kwh\n3,1.5\n")
    ingest_csv(path, spec=load_spec(), sessions=sessions)
    meters = parse_spec({"dataset": "m", "target": "kwh", "features": [{"name": "hour", "type": "integer"}]})
    ingest_csv(plain, spec=meters, sessions=sessions)
    keys = "SELECT row_key FROM labelled_row ORDER BY id"
    with engine.connect() as connection:
        loaded = connection.scalars(text(keys)).all()
    engine.dispose()
    assert all(loaded[:20]) and loaded[20] is None

    config = _alembic_config(db_url)
    command.downgrade(config, "0006")
    command.upgrade(config, "head")

    with engine.connect() as connection:
        assert connection.scalars(text(keys)).all() == loaded
    path.write_bytes(path.read_bytes() + b"\n")  # other bytes, the same rows
    assert ingest_csv(path, spec=load_spec(), sessions=sessions).repeated == 20
    engine.dispose()


def test_0007_keys_a_missing_number_stored_as_nan_as_an_ingest_keys_it_now(sqlite_url: str, tmp_path) -> None:
    """Ingests before a96dad8 stored a number written NaN as the float NaN, which SQLite's JSON kept; the
    backfill failed on it ("Out of range float values are not JSON compliant") and 0007 could not be
    applied. Such a row is the row a fresh ingest stores with null, and is found so."""
    from core.ingest import ingest_csv
    from core.spec import parse_spec

    config = _alembic_config(sqlite_url)
    command.downgrade(config, "0006")
    engine = make_engine(sqlite_url)
    with engine.begin() as connection:  # as such an ingest wrote the row 2025-06-01,3,NaN,1.5
        connection.execute(
            text(
                "INSERT INTO labelled_row (features, target, event_time, source, ingested_at) VALUES "
                "('{\"hour\": 3, \"outdoor_temp_c\": NaN}', 1.5, '2025-06-01 00:00:00.000000', 'old.csv', "
                "'2025-06-02 00:00:00.000000')"
            )
        )
    command.upgrade(config, "head")
    spec = parse_spec({
        "dataset": "buildings", "target": "kwh", "time_column": "ts",
        "features": [
            {"name": "hour", "type": "integer"},
            {"name": "outdoor_temp_c", "type": "numeric", "nullable": True},
        ],
    })  # fmt: skip
    path = tmp_path / "meters.csv"
    path.write_text("ts,hour,outdoor_temp_c,kwh\n2025-06-01,3,,1.5\n")
    report = ingest_csv(path, spec=spec, sessions=make_sessions(engine))
    engine.dispose()
    assert (report.loaded, report.repeated) == (0, 1)
