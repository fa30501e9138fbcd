"""Retention (`driftloop prune`) on real SQLite files and a real PostgreSQL server."""

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

import core.retention
from core.registry import sha256_file
from core.retention import plan, prune, prune_artifacts
from core.schema import GroundTruth, LabelledRow, ModelVersion, PredictionLog
from core.settings import Settings
from service.cli import cli
from service.cli.common import open_sessions

NOW = datetime.now(UTC).replace(microsecond=0)
DAY = timedelta(days=1)


def add_champion(
    session: Session,
    *,
    train_end: datetime | None,
    version: int = 1,
    status: str = "champion",
    age_days: float = 400,
    artifact_dir: Path | None = None,
) -> None:
    """A version row; given `artifact_dir`, with its directory there holding a model file and a snapshot."""
    model, reference = Path("a"), Path("r")
    if artifact_dir is not None:
        (artifact_dir / f"v{version}").mkdir(parents=True)
        model, reference = (
            artifact_dir / f"v{version}" / "model.cbm",
            artifact_dir / f"v{version}" / "ref.parquet",
        )
        model.write_bytes(b"m" * 1000)
        reference.write_bytes(b"r" * 1000)
    session.add(
        ModelVersion(
            version=version, created_at=NOW - age_days * DAY, status=status, trigger="bootstrap",
            artifact_path=str(model), sha256=sha256_file(model) if artifact_dir else "0" * 64,
            reference_path=str(reference), train_rows=10, metrics={}, params={}, feature_importance={},
            data_sources={}, train_end=train_end,
        )
    )  # fmt: skip


def log(
    session: Session, name: str, *, age_days: float, version: int = 1, actual: float | None = None
) -> None:
    """A logged prediction `age_days` old, with its label when `actual` is given."""
    session.add(
        PredictionLog(
            id=name, created_at=NOW - age_days * DAY, model_version=version, features={"floor": 3},
            prediction=100.0, latency_ms=1.0,
        )
    )  # fmt: skip
    if actual is not None:
        session.flush()
        session.add(GroundTruth(prediction_id=name, actual=actual, received_at=NOW))


def ingested(session: Session, *, age_days: float) -> None:
    session.add(
        LabelledRow(
            features={"floor": 3}, target=90.0, event_time=NOW - age_days * DAY, source="x.csv",
            ingested_at=NOW, row_key=None,
        )
    )  # fmt: skip


def left(sessions: sessionmaker[Session]) -> tuple[list[str], list[str], list[float]]:
    """Prediction ids, labelled prediction ids and ingested rows' ages in days, all sorted."""
    with sessions() as session:
        predictions = sorted(session.scalars(select(PredictionLog.id)))
        labels = sorted(session.scalars(select(GroundTruth.prediction_id)))
        ages = sorted(
            round((NOW - t).total_seconds() / 86400) for t in session.scalars(select(LabelledRow.event_time))
        )
    return predictions, labels, ages


def test_old_unlabelled_predictions_go_and_labelled_data_stays_unless_asked(sessions) -> None:
    with sessions.begin() as session:
        add_champion(session, train_end=NOW - 300 * DAY)
        for age in (200, 150, 100, 10, 5):
            log(session, f"u{age}", age_days=age)
        log(session, "l200", age_days=200, actual=1.0)
        ingested(session, age_days=200)

    with sessions() as session:
        retention = plan(session, cutoff=NOW - 90 * DAY, window_rows=2, labelled=False)
    assert (retention.predictions, retention.labelled_predictions, retention.labelled_rows) == (3, 0, 0)
    assert retention.predictions_before == NOW - 90 * DAY and retention.labelled_before is None
    done = prune(sessions, retention)
    assert done.total == 3
    assert left(sessions) == (["l200", "u10", "u5"], ["l200"], [200])


def test_labelled_data_newer_than_the_champions_training_data_is_kept(sessions) -> None:
    with sessions.begin() as session:
        add_champion(session, train_end=NOW - 150 * DAY)
        for age in (200, 160, 140, 100, 2):
            log(session, f"l{age}", age_days=age, actual=float(age))
            ingested(session, age_days=age)

    with sessions() as session:
        retention = plan(session, cutoff=NOW - 90 * DAY, window_rows=1, labelled=True)
    assert retention.labelled_before == NOW - 150 * DAY
    assert (retention.predictions, retention.labelled_predictions, retention.labelled_rows) == (0, 2, 2)
    prune(sessions, retention)
    assert left(sessions) == (["l100", "l140", "l2"], ["l100", "l140", "l2"], [2, 100, 140])


def test_the_drift_windows_rows_are_kept_whatever_their_age_the_champions_too(sessions) -> None:
    """The monitor reads the newest window_rows predictions, or the newest the champion served: v2 is the
    champion but served only its 3 oldest rows, so they stay, older than the cutoff as they are."""
    with sessions.begin() as session:
        add_champion(session, train_end=None, version=2)
        for age in (400, 300, 200, 100):
            log(session, f"v2-{age}", age_days=age, version=2)
        for age in (50, 40, 30):
            log(session, f"v1-{age}", age_days=age, version=1)

    with sessions() as session:
        retention = plan(session, cutoff=NOW - 10 * DAY, window_rows=3, labelled=True)
    assert retention.predictions_before == NOW - 300 * DAY
    assert retention.predictions == 1
    prune(sessions, retention)
    assert left(sessions)[0] == ["v1-30", "v1-40", "v1-50", "v2-100", "v2-200", "v2-300"]


@pytest.mark.parametrize("served_by_champion", [2, 7])
def test_a_log_shorter_than_the_drift_window_is_all_kept(sessions, served_by_champion: int) -> None:
    """Fewer predictions than window_rows (of all, or of the champion's) are all in the window the monitor
    reads: none of them goes, however old (a live prune at the default 5,000 deleted a 2,101-row log)."""
    with sessions.begin() as session:
        add_champion(session, train_end=None, version=2)
        for n in range(7):
            log(session, f"p{n}", age_days=400 - n, version=2 if n < served_by_champion else 1)

    with sessions() as session:
        retention = plan(session, cutoff=NOW - 10 * DAY, window_rows=8, labelled=True)
    assert retention.predictions_before == NOW - 400 * DAY
    assert retention.total == 0
    prune(sessions, retention)
    assert left(sessions)[0] == [f"p{n}" for n in range(7)]


def test_deletes_go_in_batches_oldest_first_past_rows_kept_and_times_shared(
    sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each batch reads on from the last one's time: rows sharing a time across a batch's end, and labelled
    rows kept between them, leave none of the rows to delete behind."""
    monkeypatch.setattr(core.retention, "BATCH_ROWS", 4)
    with sessions.begin() as session:
        for n in range(10):
            log(session, f"u{n}", age_days=100 + n // 3)  # three rows to a time
            log(session, f"l{n}", age_days=100 + n // 3, actual=1.0)
        log(session, "new", age_days=1)
    with sessions() as session:
        retention = plan(session, cutoff=NOW - 90 * DAY, window_rows=1, labelled=False)
    batches: list[int] = []
    done = prune(sessions, retention, on_progress=batches.append)
    assert batches == [4, 4, 2] and done.predictions == 10
    assert left(sessions)[0] == sorted(["new", *(f"l{n}" for n in range(10))])


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path / 'prune.db'}"
    monkeypatch.setenv("DRIFTLOOP_DATABASE_URL", url)
    monkeypatch.setenv("DRIFTLOOP_ARTIFACT_DIR", str(tmp_path / "artifacts"))
    monkeypatch.setenv("DRIFTLOOP_WINDOW_ROWS", "1")
    monkeypatch.setenv("DRIFTLOOP_MIN_WINDOW_ROWS", "1")
    monkeypatch.setenv("COLUMNS", "250")
    with open_sessions(Settings()) as sessions, sessions.begin() as session:
        add_champion(session, train_end=NOW - 190 * DAY)
        for age in (200, 150, 100, 10):
            log(session, f"u{age}", age_days=age)
        log(session, "l200", age_days=200, actual=1.0)
    return url


def run(*args: str):
    result = CliRunner().invoke(cli, ["prune", *args])
    return result, " ".join(result.output.split())


def test_cli_dry_run_counts_and_deletes_nothing_then_prune_deletes(env: str) -> None:
    result, output = run("--older-than", "90", "--dry-run")
    assert result.exit_code == 0, output
    assert "unlabelled predictions: 3" in output
    assert "labelled predictions and ingested rows: kept (--labelled deletes them)" in output
    with open_sessions(Settings()) as sessions:
        assert len(left(sessions)[0]) == 5

    result, output = run("--older-than", "90", "--labelled")
    assert result.exit_code == 0, output
    assert (
        "labelled predictions, each with its label: 1 (kept from "
        f"{NOW - 190 * DAY:%Y-%m-%d %H:%M} UTC on: the drift window's, and the rows newer than the "
        "champion's training data)" in output
    )
    assert (
        "warning: a retrain reads every labelled row (DRIFTLOOP_TRAIN_WINDOW_DAYS): the labelled rows pruned "
        "are training data it would have used" in output
    )
    assert "deleted 4 row(s)" in output
    assert "SQLite keeps the file's size" in output
    with open_sessions(Settings()) as sessions:
        assert left(sessions) == (["u10"], [], [])

    result, output = run("--older-than", "90", "--labelled")
    assert result.exit_code == 0 and "unlabelled predictions: 0" in output and "deleted" not in output
    assert "warning" not in output  # no labelled row left to prune


def test_cli_no_warning_when_the_training_window_ends_before_the_cutoff(
    env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DRIFTLOOP_TRAIN_WINDOW_DAYS", "90")
    result, output = run("--older-than", "90", "--labelled", "--dry-run")
    assert result.exit_code == 0 and "labelled predictions, each with its label: 1" in output
    assert "warning" not in output
    monkeypatch.setenv("DRIFTLOOP_TRAIN_WINDOW_DAYS", "120")
    result, output = run("--older-than", "90", "--labelled", "--dry-run")
    assert "warning: a retrain reads labelled rows up to 120 days old" in output


@pytest.mark.parametrize("days", ["0", "-5", "ninety", "1.5", "1000000"])
def test_cli_refuses_an_older_than_that_is_not_a_number_of_days(env: str, days: str) -> None:
    result, output = run("--older-than", days)
    assert result.exit_code == 2
    assert "--older-than" in output
    with open_sessions(Settings()) as sessions:
        assert len(left(sessions)[0]) == 5


def test_cli_refuses_a_prune_without_older_than(env: str) -> None:
    result, output = run("--labelled")
    assert result.exit_code == 2
    assert "Missing option '--older-than'" in output
    with open_sessions(Settings()) as sessions:
        assert len(left(sessions)[0]) == 5


def test_cli_a_database_error_midway_keeps_what_was_deleted_and_says_to_run_again(
    env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(core.retention, "BATCH_ROWS", 1)
    with open_sessions(Settings()) as sessions, sessions.begin() as session:
        # A real SQLite error on the second batch (the oldest row goes first): as a full disk would fail it.
        session.execute(text(
            "CREATE TRIGGER refuse BEFORE DELETE ON prediction_log WHEN old.id = 'u150' "
            "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
        ))  # fmt: skip
    result, output = run("--older-than", "90")
    assert result.exit_code == 1
    assert (
        "pruning stopped after 1 row(s): IntegrityError: database or disk is full. What was deleted stays "
        "deleted; run it again to go on" in output
    )
    with open_sessions(Settings()) as sessions:
        assert left(sessions)[0] == ["l200", "u10", "u100", "u150"]


def test_rejected_versions_artifacts_go_and_every_other_version_s_stay(sessions, tmp_path: Path) -> None:
    """--artifacts: the directories of gate-rejected versions created before the cutoff go, their rows stay
    with a note. The champion, former champions (rollback's), candidates, newer rejected versions and a row
    naming a file outside the artifact directory keep theirs; a version promoted since the plan keeps its."""
    store = tmp_path / "artifacts"
    with sessions.begin() as session:
        add_champion(session, train_end=None, version=1, status="archived", age_days=300, artifact_dir=store)
        add_champion(session, train_end=None, version=2, status="rejected", age_days=200, artifact_dir=store)
        add_champion(session, train_end=None, version=3, status="rejected", age_days=150, artifact_dir=store)
        add_champion(session, train_end=None, version=4, status="candidate", age_days=120, artifact_dir=store)
        add_champion(session, train_end=None, version=5, status="champion", age_days=100, artifact_dir=store)
        add_champion(session, train_end=None, version=6, status="rejected", age_days=10, artifact_dir=store)
        add_champion(
            session, train_end=None, version=7, status="rejected", age_days=200, artifact_dir=tmp_path
        )
        (store / "v7").mkdir()  # a directory by its name, not the one its row names
    with sessions() as session:
        retention = plan(session, cutoff=NOW - 90 * DAY, window_rows=1, labelled=False, artifact_dir=store)
    assert [version for version, _ in retention.artifacts] == [2, 3]
    assert retention.artifact_bytes == 4000 and retention.total == 0
    with sessions.begin() as session:
        session.get(ModelVersion, 5).status = "archived"  # v3 promoted by hand since the plan
        session.flush()
        session.get(ModelVersion, 3).status = "champion"

    assert prune_artifacts(sessions, retention, now=NOW) == 1
    assert sorted(p.name for p in store.iterdir()) == ["v1", "v3", "v4", "v5", "v6", "v7"]
    assert (tmp_path / "v7" / "model.cbm").is_file()
    with sessions() as session:
        rows = {row.version: row for row in session.scalars(select(ModelVersion))}
    assert len(rows) == 7 and rows[2].status == "rejected"
    assert rows[2].note == f"artifacts pruned {NOW:%Y-%m-%d %H:%M} UTC: it can no longer be promoted"
    assert rows[3].note == ""


@pytest.mark.parametrize("first", ["prune_reads", "promote_verifies"])
def test_a_promotion_racing_prune_artifacts_never_leaves_a_champion_without_its_files(
    sessions, tmp_path: Path, first: str
) -> None:
    """`driftloop promote` of an old rejected version while `prune --artifacts` deletes its directory, in
    each order: prune having read the row as rejected as the promotion commits, or the promotion having
    checked the files as prune deletes them. Either the version is promoted and keeps its files, or its
    files go and it is not promoted; never a champion whose model is gone (on SQLite, which has no row
    locks, both happened)."""
    from sqlalchemy import create_engine

    from core.db import make_sessions
    from core.registry import ArtifactStore, Registry, RegistryError

    store = tmp_path / "artifacts"
    with sessions.begin() as session:
        add_champion(session, train_end=None, version=1, age_days=300, artifact_dir=store)
        add_champion(session, train_end=None, version=2, status="rejected", age_days=200, artifact_dir=store)
    with sessions() as session:
        retention = plan(session, cutoff=NOW - 90 * DAY, window_rows=1, labelled=False, artifact_dir=store)
    assert [version for version, _ in retention.artifacts] == [2]
    other = create_engine(sessions.kw["bind"].url)  # the other process
    registry = Registry(make_sessions(other), ArtifactStore(store))
    promote = lambda: registry.promote(version=2, reason="better after all")  # noqa: E731
    deleting = lambda: prune_artifacts(sessions, retention, now=NOW)  # noqa: E731
    # `first` runs until its write, the other runs then (or waits for `first`'s lock a while), `first` goes on
    engine, then = (sessions.kw["bind"], promote) if first == "prune_reads" else (other, deleting)
    outcome: list[object] = []

    def interleave(conn, cursor, statement, *args) -> None:  # type: ignore[no-untyped-def]
        if statement.startswith("UPDATE model_version") and not outcome:
            outcome.append(pool.submit(then))
            time.sleep(0.5)

    with ThreadPoolExecutor(1) as pool:
        event.listen(engine, "before_cursor_execute", interleave)
        try:
            for step in (deleting, promote) if first == "prune_reads" else (promote, deleting):
                if step is not then:
                    with contextlib.suppress(RegistryError):
                        step()
            with contextlib.suppress(RegistryError):
                outcome[0].result(timeout=30)  # type: ignore[attr-defined]
        finally:
            event.remove(engine, "before_cursor_execute", interleave)
            other.dispose()
    with sessions() as session:
        champion = session.scalar(select(ModelVersion).where(ModelVersion.status == "champion"))
    assert Path(champion.artifact_path).is_file(), f"v{champion.version} is the champion without its model"


def test_cli_artifacts_leaves_a_symlinked_version_directory_and_prunes_the_rows(
    env: str, tmp_path: Path
) -> None:
    """A rejected version whose directory in the store is a symlink (moved to another disk) is left alone;
    it used to stop every run (rmtree refuses a symlink: "run it again"), the rows' prune with it."""
    store = tmp_path / "artifacts"
    with open_sessions(Settings()) as sessions, sessions.begin() as session:
        disk = tmp_path / "disk"
        add_champion(session, train_end=None, version=2, status="rejected", age_days=200, artifact_dir=disk)
        store.mkdir()
        (store / "v2").symlink_to(tmp_path / "disk" / "v2")
        session.flush()
        session.get(ModelVersion, 2).artifact_path = str(store / "v2" / "model.cbm")
    result, output = run("--older-than", "90", "--artifacts")
    assert result.exit_code == 0, output
    assert "artifacts of gate-rejected versions: none" in output and "deleted 3" in output
    assert (tmp_path / "disk" / "v2" / "model.cbm").is_file() and (store / "v2").is_symlink()


def test_cli_artifacts_with_no_artifact_directory_says_so_and_prunes_the_rows(
    env: str, tmp_path: Path
) -> None:
    """Run where the artifact volume is not mounted, it said "none", as if nothing were there to prune."""
    with open_sessions(Settings()) as sessions, sessions.begin() as session:
        add_champion(session, train_end=None, version=2, status="rejected", age_days=200)
    result, output = run("--older-than", "90", "--artifacts")
    assert result.exit_code == 0, output
    assert "artifacts of gate-rejected versions: none" in output and "deleted 3" in output
    assert (
        f"warning: DRIFTLOOP_ARTIFACT_DIR {tmp_path / 'artifacts'} is not a directory here, so no artifacts "
        "were looked at: is the artifact volume mounted?" in output
    )
    (tmp_path / "artifacts").mkdir()
    assert "DRIFTLOOP_ARTIFACT_DIR" not in run("--older-than", "90", "--artifacts")[1]


def test_cli_artifacts_counts_then_deletes_and_the_version_cannot_be_promoted(
    env: str, tmp_path: Path
) -> None:
    store = tmp_path / "artifacts"
    with open_sessions(Settings()) as sessions, sessions.begin() as session:
        add_champion(session, train_end=None, version=2, status="rejected", age_days=200, artifact_dir=store)
    result, output = run("--older-than", "90", "--artifacts", "--dry-run")
    assert result.exit_code == 0, output
    assert "artifacts of gate-rejected versions: v2 (0.0 MiB)" in output and (store / "v2").is_dir()
    result, output = run("--older-than", "90")
    assert "artifacts" not in output and (store / "v2").is_dir()  # not without --artifacts

    result, output = run("--older-than", "90", "--artifacts")
    assert result.exit_code == 0, output
    assert "deleted the artifacts of 1 rejected version(s)" in output and not (store / "v2").exists()
    promote = CliRunner().invoke(cli, ["promote", "2", "--reason", "it was better after all"])
    assert promote.exit_code != 0
    assert "model version 2 not promoted" in promote.output and "missing" in promote.output


def test_a_label_stored_as_a_batch_deletes_keeps_its_prediction(sessions) -> None:
    """POST /feedback for an old unlabelled prediction while prune deletes it: the label, stored and
    answered accepted, makes the prediction labelled, kept with it. On SQLite the label is committed between
    the batch's read and its delete; on PostgreSQL it is being stored as prune starts (prune skips the row
    the request holds) and committed afterwards."""
    with sessions.begin() as session:
        for age in (200, 150):
            log(session, f"u{age}", age_days=age)
        log(session, "new", age_days=1)
    with sessions() as session:
        retention = plan(session, cutoff=NOW - 90 * DAY, window_rows=1, labelled=False)
    engine = sessions.kw["bind"]
    label = {"prediction_id": "u200", "actual": 1.0, "received_at": NOW}
    if engine.dialect.name == "sqlite":
        stored: list[str] = []

        def label_after_the_read(conn, cursor, statement: str, *args: object) -> None:
            if not stored and statement.lstrip().upper().startswith("SELECT"):
                stored.append("u200")
                with engine.begin() as other:  # another connection: the feedback request's
                    other.execute(GroundTruth.__table__.insert(), label)

        event.listen(engine, "after_cursor_execute", label_after_the_read)
        try:
            done = prune(sessions, retention)
        finally:
            event.remove(engine, "after_cursor_execute", label_after_the_read)
        assert stored == ["u200"]
    else:
        with engine.connect() as feedback, ThreadPoolExecutor(1) as pool:
            feedback.execute(GroundTruth.__table__.insert(), label)  # its transaction still open
            pruning = pool.submit(prune, sessions, retention)
            while not pruning.done() and not _waiting_for_a_lock(engine):
                time.sleep(0.01)
            feedback.commit()
            done = pruning.result()
    assert done.predictions == 1
    assert left(sessions)[:2] == (["new", "u200"], ["u200"])


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("labelled", [False, True], ids=["unlabelled", "labelled"])
def test_a_request_holding_one_of_a_batch_s_rows_is_not_waited_for(sessions, labelled: bool) -> None:
    """One POST /feedback storing (or changing) labels for two old predictions while prune deletes them: it
    holds the first and waits for the second, which a batch that waited for the first would hold too, and
    PostgreSQL would abort one of them as deadlocked. The batch skips the row the request holds, deletes the
    rest, and the request's second label finds its prediction gone (answered unknown); nobody deadlocks."""
    from psycopg.errors import ForeignKeyViolation
    from sqlalchemy.exc import IntegrityError

    actual = 1.0 if labelled else None
    with sessions.begin() as session:
        add_champion(session, train_end=NOW - 100 * DAY)
        log(session, "older", age_days=200, actual=actual)  # the batch reaches it first
        log(session, "newer", age_days=150, actual=actual)
        log(session, "new", age_days=1)
    with sessions() as session:
        retention = plan(session, cutoff=NOW - 90 * DAY, window_rows=1, labelled=labelled)
    engine = sessions.kw["bind"]
    table = GroundTruth.__table__

    with engine.connect() as feedback, ThreadPoolExecutor(1) as pool:
        # The request holds its first row (a label changed, or stored), its transaction still open.
        if labelled:
            feedback.execute(table.update().where(table.c.prediction_id == "newer").values(actual=2.0))
        else:
            feedback.execute(table.insert(), {"prediction_id": "newer", "actual": 2.0, "received_at": NOW})
        pruning = pool.submit(prune, sessions, retention)
        try:
            done = pruning.result(timeout=30)  # not waiting for the request: it may be waiting for prune
            with pytest.raises(IntegrityError) as second:  # its next label, whose prediction prune deleted
                feedback.execute(
                    table.insert(), {"prediction_id": "older", "actual": 2.0, "received_at": NOW}
                )
        finally:
            feedback.rollback()
    assert isinstance(second.value.orig, ForeignKeyViolation)  # POST /feedback answers it unknown
    assert (done.predictions, done.labelled_predictions) == ((0, 1) if labelled else (1, 0))
    assert left(sessions)[0] == ["new", "newer"]


def _waiting_for_a_lock(engine) -> bool:
    waiting = (
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE wait_event_type = 'Lock' AND datname = current_database()"
    )
    with engine.connect() as conn:
        return bool(conn.scalar(text(waiting)))


def test_a_champion_without_train_end_keeps_the_labelled_rows_after_its_creation(sessions) -> None:
    """A bootstrap without a time column has no train_end: its training data ends at its created_at
    (retrain.dataset.data_end), and the accuracy window reads the labelled rows after it."""
    with sessions.begin() as session:
        add_champion(session, train_end=None)  # created 400 days ago
        for age in (500, 300, 100):
            log(session, f"l{age}", age_days=age, actual=1.0)
            ingested(session, age_days=age)
        log(session, "new", age_days=1)

    with sessions() as session:
        retention = plan(session, cutoff=NOW - 90 * DAY, window_rows=1, labelled=True)
    assert retention.labelled_before == NOW - 400 * DAY
    assert (retention.labelled_predictions, retention.labelled_rows) == (1, 1)
    prune(sessions, retention)
    assert left(sessions) == (["l100", "l300", "new"], ["l100", "l300"], [100, 300])
