"""The prediction logger and its spool against real databases: batching, outages, replay, drain."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import Connection, Engine, event, select

from core.db import make_engine, utcnow
from core.metrics import LOGGER_OUTCOMES, build_metrics
from core.schema import PredictionLog
from service.logger import PredictionLogger
from service.logtable import LogRow
from service.spool import Spool, SpoolInUse

Outage = Callable[[], AbstractContextManager[None]]


class Harness:
    """One logger on a real database, with its own Prometheus registry and spool directory."""

    def __init__(self, engine: Engine, spool_dir: Path, **options: Any) -> None:
        self.engine = engine
        self.spool = Spool(spool_dir)
        self.registry = CollectorRegistry()
        settings = {
            "queue_size": 10_000,
            "batch_size": 100,
            "flush_interval_s": 0.02,
            "replay_interval_s": 0.05,
        }
        self.logger = PredictionLogger(
            engine, self.spool, build_metrics(self.registry), **{**settings, **options}
        )

    def counts(self) -> dict[str, int]:
        return {o: self._sample("driftloop_logger_rows_total", outcome=o) for o in LOGGER_OUTCOMES}

    def gauges(self) -> tuple[int, int]:
        return self._sample("driftloop_logger_queue_depth"), self._sample("driftloop_logger_spool_rows")

    def _sample(self, name: str, **labels: str) -> int:
        value = self.registry.get_sample_value(name, labels)
        assert value is not None, name
        return int(value)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def harness(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Harness]]:
    """Builds harnesses on the test database; every logger is stopped at teardown."""
    made: list[Harness] = []

    def _make(spool_dir: Path | None = None, **options: Any) -> Harness:
        made.append(Harness(engine, spool_dir or tmp_path_factory.mktemp("spool"), **options))
        return made[-1]

    yield _make
    for h in made:
        h.logger.stop(timeout=60)


@pytest.fixture
def outage(db_url: str, engine: Engine, request: pytest.FixtureRequest) -> Outage:
    """A context manager during which the database is really unreachable.

    PostgreSQL: the cluster is stopped and started again. SQLite: the folder holding the database is
    renamed away (chmod does not stop root) and the pool is emptied, so new connections fail to open it.
    """
    if db_url.startswith("postgresql"):
        cluster = request.getfixturevalue("pg_cluster")

        @contextmanager
        def pg_down() -> Iterator[None]:
            cluster.stop()
            try:
                yield
            finally:
                cluster.start()

        return pg_down

    folder = Path(db_url.split("///", 1)[1]).parent

    @contextmanager
    def sqlite_down() -> Iterator[None]:
        away = folder.with_name(folder.name + "-away")
        folder.rename(away)
        engine.dispose()
        try:
            yield
        finally:
            away.rename(folder)

    return sqlite_down


def make_row(i: int = 0) -> LogRow:
    features = {"district": "Mapo-gu", "area_m2": 84.5, "floor": i % 30, "build_year": 2008}
    return LogRow(str(uuid4()), utcnow(), 1, features, 500_000.0 + i, 1.25)


def stored(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(select(PredictionLog.id)))


@contextmanager
def write_lock(engine: Engine) -> Iterator[Connection]:
    """A connection holding prediction_log's write lock until it rolls back: the writer's inserts wait on it
    (PostgreSQL: a table lock; SQLite: an open write transaction)."""
    with engine.connect() as blocker:
        if engine.dialect.name == "postgresql":
            blocker.exec_driver_sql("LOCK TABLE prediction_log IN EXCLUSIVE MODE")
        else:
            blocker.execute(
                PredictionLog.__table__.insert().values(_doc(make_row()) | {"created_at": utcnow()})
            )
        yield blocker


def until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Bounded polling: fail (not hang) when `condition` does not become true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


# --- the logger -----------------------------------------------------------------------------------


def test_rows_from_many_threads_are_each_logged_once(harness: Callable[..., Harness], engine: Engine) -> None:
    h = harness()
    h.logger.start()
    per_thread, threads = 500, 4
    ids: list[list[str]] = [[] for _ in range(threads)]

    def produce(k: int) -> None:
        for i in range(per_thread):
            row = make_row(i)
            h.logger.submit(row)
            ids[k].append(row.id)

    workers = [threading.Thread(target=produce, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    submitted = [pid for chunk in ids for pid in chunk]
    assert h.logger.flush(timeout=60)
    assert h.logger.wait_written(submitted, timeout=60) == set()
    h.logger.stop()

    rows = stored(engine)
    assert len(rows) == 2000
    assert set(rows) == set(submitted)
    assert h.counts() == {"logged": 2000, "spooled": 0, "replayed": 0, "dropped": 0}
    assert h.gauges() == (0, 0)
    assert h.spool.segments() == []


def test_each_batch_is_one_transaction(harness: Callable[..., Harness], engine: Engine) -> None:
    commits: list[int] = []
    event.listen(engine, "commit", lambda conn: commits.append(1))
    h = harness(batch_size=10)  # more batches than rows in one: batches of 11 would make 91
    rows = [make_row(i) for i in range(1000)]
    for row in rows:  # queued before the writer starts, so every batch it takes is full
        h.logger.submit(row)
    assert h.gauges() == (1000, 0)
    h.logger.start()
    assert h.logger.flush(timeout=60)
    h.logger.stop()

    assert len(commits) == 100
    assert sorted(stored(engine)) == sorted(r.id for r in rows)
    assert h.counts()["logged"] == 1000


def test_written_row_round_trips(harness: Callable[..., Harness], engine: Engine) -> None:
    h = harness()
    row = make_row(7)
    h.logger.submit(row)
    h.logger.start()
    assert h.logger.wait_written([row.id], timeout=60) == set()
    with engine.connect() as conn:
        got = conn.execute(select(PredictionLog.__table__)).one()
    assert got.id == row.id
    assert got.created_at == row.created_at
    assert (got.model_version, got.features, got.prediction, got.latency_ms) == (
        1,
        row.features,
        500_007.0,
        1.25,
    )


def test_outage_mid_burst_spools_and_replays_every_row_once(
    harness: Callable[..., Harness], engine: Engine, outage: Outage
) -> None:
    h = harness(batch_size=50)
    h.logger.start()
    submitted: list[str] = []
    done = threading.Event()

    def produce() -> None:
        i = 0
        while not done.is_set():
            row = make_row(i)
            h.logger.submit(row)
            submitted.append(row.id)
            i += 1
            time.sleep(0.0005)  # pacing, not an assertion: keeps the burst going through the outage

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        until(lambda: h.counts()["logged"] >= 200, "rows logged before the outage")
        with outage():
            until(lambda: h.counts()["spooled"] >= 200, "rows spooled during the outage")
        logged = h.counts()["logged"]
        until(lambda: h.counts()["replayed"] > 0, "replay after the database returned")
        until(lambda: h.counts()["logged"] > logged, "direct writes after the database returned")
    finally:
        done.set()
        producer.join()
    assert h.logger.flush(timeout=60)
    assert h.logger.wait_written(submitted, timeout=60) == set()
    h.logger.stop()

    rows = stored(engine)
    assert len(rows) == len(submitted)
    assert set(rows) == set(submitted)
    counts = h.counts()
    assert counts["spooled"] > 0
    assert counts["replayed"] == counts["spooled"]
    assert counts["logged"] + counts["spooled"] == len(submitted)
    assert counts["dropped"] == 0
    assert h.gauges() == (0, 0)
    assert h.spool.segments() == []


def test_stop_drains_a_full_queue(harness: Callable[..., Harness], engine: Engine) -> None:
    h = harness(queue_size=500, batch_size=100)
    rows = [make_row(i) for i in range(500)]
    for row in rows:
        h.logger.submit(row)
    assert h.gauges() == (500, 0)
    h.logger.start()
    h.logger.stop()

    assert sorted(stored(engine)) == sorted(r.id for r in rows)
    assert h.counts() == {"logged": 500, "spooled": 0, "replayed": 0, "dropped": 0}
    assert h.gauges() == (0, 0)


def test_stop_spools_what_a_stuck_writer_holds(harness: Callable[..., Harness], engine: Engine) -> None:
    """A writer held up past the stop timeout (a lock the insert waits on): the batch it holds and the rows
    still queued go to the spool, so none is lost when the process exits."""
    h = harness(batch_size=10)
    rows = [make_row(i) for i in range(30)]
    for row in rows:
        h.logger.submit(row)
    with write_lock(engine) as blocker:
        h.logger.start()
        until(lambda: len(h.logger) == 20, "the writer to take its first batch")
        h.logger.stop(timeout=0.3)
        assert h.spool.pending_rows() == 30
        assert h.counts()["spooled"] == 30
        blocker.rollback()
    until(lambda: len(stored(engine)) == 10, "the stuck batch, written once the lock is gone")


def test_stop_without_start_still_drains(harness: Callable[..., Harness], engine: Engine) -> None:
    h = harness()
    rows = [make_row(i) for i in range(150)]
    for row in rows:
        h.logger.submit(row)
    h.logger.stop()

    assert sorted(stored(engine)) == sorted(r.id for r in rows)
    assert h.counts()["logged"] == 150


def test_full_queue_spills_to_the_spool_without_losing_rows(
    harness: Callable[..., Harness], engine: Engine
) -> None:
    h = harness(queue_size=100)
    rows = [make_row(i) for i in range(150)]
    for row in rows:
        h.logger.submit(row)
    assert h.gauges() == (100, 50)
    assert h.counts() == {"logged": 0, "spooled": 50, "replayed": 0, "dropped": 0}
    assert h.logger.is_pending(rows[-1].id)
    assert not h.logger.flush(timeout=0)  # no writer yet: the 100 queued rows are not written
    h.logger.start()
    assert h.logger.wait_written([r.id for r in rows], timeout=60) == set()
    h.logger.stop()

    assert sorted(stored(engine)) == sorted(r.id for r in rows)
    assert h.counts() == {"logged": 100, "spooled": 50, "replayed": 50, "dropped": 0}
    assert h.gauges() == (0, 0)


def test_a_row_the_spool_cannot_store_is_counted_dropped_and_no_longer_pending(
    harness: Callable[..., Harness], tmp_path_factory: pytest.TempPathFactory
) -> None:
    blocked = tmp_path_factory.mktemp("spool") / "spool"
    blocked.write_text("a file where the spool directory should be")
    h = harness(blocked, queue_size=1)
    queued, spilled = make_row(1), make_row(2)
    h.logger.submit(queued)
    h.logger.submit(spilled)  # no writer yet: the queue is full, and the spool write fails
    assert h.counts() == {"logged": 0, "spooled": 0, "replayed": 0, "dropped": 1}
    assert (h.logger.is_pending(queued.id), h.logger.is_pending(spilled.id)) == (True, False)
    assert not h.logger.losing_rows  # the database is not down: answered rows still reach it


def test_a_spool_that_works_again_ends_the_loss_while_the_database_is_still_down(
    harness: Callable[..., Harness], engine: Engine, outage: Outage, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`losing_rows` (what takes a replica out of /ready) clears on the first spool write that works, not
    only when the database comes back."""
    blocked = tmp_path_factory.mktemp("spool") / "spool"
    h = harness(blocked)
    with outage():
        h.logger.start()  # makes and claims the directory
        shutil.rmtree(blocked)
        blocked.write_text("a file where the spool directory should be")
        h.logger.submit(lost := make_row(1))
        until(lambda: h.logger.losing_rows, "the logger to report it is losing rows")
        blocked.unlink()
        h.logger.submit(kept := make_row(2))
        until(lambda: h.counts()["spooled"] == 1, "the second row to be spooled")
        assert not h.logger.losing_rows
        assert h.counts()["dropped"] == 1
    until(lambda: kept.id in stored(engine), "the spooled row to be replayed")
    assert lost.id not in stored(engine)


def test_a_second_logger_on_a_spool_directory_in_use_is_refused_naming_the_holder(
    harness: Callable[..., Harness], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Two replicas started from one working directory share the default var/spool. Each would count,
    replay and remove the other's segments (its gauge and /ready then report rows that are gone) and delete
    one the other is writing as unfinished; the second is refused at its start instead."""
    spool_dir = tmp_path_factory.mktemp("spool")
    first = harness(spool_dir)
    first.logger.start()
    second = harness(spool_dir)
    with pytest.raises(SpoolInUse) as refused:
        second.logger.start()
    assert str(refused.value) == (
        f"the spool directory {spool_dir} is in use by another driftloop process (pid {os.getpid()}): give "
        "each serving process its own DRIFTLOOP_SPOOL_DIR"
    )
    first.logger.stop()  # the directory is free again: the next process on it replays what is left
    third = harness(spool_dir)
    third.logger.start()
    assert third.spool.segments() == []  # the lock file is not a segment


def test_spool_left_at_shutdown_is_replayed_by_the_next_logger(
    harness: Callable[..., Harness],
    engine: Engine,
    outage: Outage,
    tmp_path_factory: pytest.TempPathFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="driftloop.logger")
    spool_dir = tmp_path_factory.mktemp("spool")
    rows = [make_row(i) for i in range(120)]
    first = harness(spool_dir)
    with outage():
        first.logger.start()
        for row in rows:
            first.logger.submit(row)
        first.logger.stop()  # the database is down at shutdown: everything ends up on the spool
        assert first.counts() == {"logged": 0, "spooled": 120, "replayed": 0, "dropped": 0}
        assert first.spool.pending_rows() == 120
        assert first.logger.is_pending(rows[0].id)
    assert stored(engine) == []
    # The operator learns that this replica's disk now holds rows the database does not.
    assert (
        f"prediction log: stopped with 120 rows on the spool at {spool_dir}, not in the database; a process "
        "started with this DRIFTLOOP_SPOOL_DIR replays them"
    ) in caplog.messages

    second = harness(spool_dir)  # a new process: a fresh Spool counts the segments on disk
    assert second.gauges() == (0, 120)
    second.logger.start()
    assert f"prediction log: 120 rows on the spool at {spool_dir} from an earlier run; replaying" in (
        caplog.messages
    )
    until(lambda: second.logger.spooled_pending == 0, "replay of the previous process's spool")
    second.logger.stop()

    assert sorted(stored(engine)) == sorted(r.id for r in rows)
    assert second.counts() == {"logged": 0, "spooled": 0, "replayed": 120, "dropped": 0}
    with engine.connect() as conn:
        got = conn.execute(select(PredictionLog.__table__).where(PredictionLog.id == rows[5].id)).one()
    assert (got.created_at, got.features, got.prediction) == (rows[5].created_at, rows[5].features, 500_005.0)


def test_replay_is_idempotent(harness: Callable[..., Harness], engine: Engine) -> None:
    """A crash after the commit but before the segment was removed: replaying it again adds nothing."""
    rows = [make_row(i) for i in range(30)]
    h = harness()
    for row in rows:
        h.logger.submit(row)
    h.logger.stop()
    Spool(h.spool.directory).append([_doc(r) for r in rows])  # the same rows, still on the spool

    again = harness(h.spool.directory)
    again.logger.start()
    until(lambda: again.logger.spooled_pending == 0, "replay")
    again.logger.stop()
    assert sorted(stored(engine)) == sorted(r.id for r in rows)
    assert again.counts() == {"logged": 0, "spooled": 0, "replayed": 30, "dropped": 0}


def test_torn_last_line_is_skipped_and_counted(
    harness: Callable[..., Harness], engine: Engine, tmp_path_factory: pytest.TempPathFactory
) -> None:
    spool_dir = tmp_path_factory.mktemp("spool")
    rows = [make_row(i) for i in range(3)]
    Spool(spool_dir).append([_doc(r) for r in rows])
    (segment,) = Spool(spool_dir).segments()
    data = segment.read_bytes()
    segment.write_bytes(data[: len(data) - 20])  # the last line stops mid-object

    h = harness(spool_dir)
    h.logger.start()
    until(lambda: h.logger.spooled_pending == 0, "replay of the torn segment")
    h.logger.stop()
    assert sorted(stored(engine)) == sorted(r.id for r in rows[:2])
    assert h.counts() == {"logged": 0, "spooled": 0, "replayed": 2, "dropped": 1}
    assert h.spool.segments() == []


def test_pending_until_written(harness: Callable[..., Harness]) -> None:
    h = harness()
    row = make_row()
    assert not h.logger.is_pending(row.id)
    h.logger.submit(row)
    assert h.logger.is_pending(row.id)
    assert h.logger.wait_written([row.id, "never-submitted"], timeout=0.05) == {row.id}  # no writer yet
    h.logger.start()
    assert h.logger.wait_written([row.id, "never-submitted"], timeout=60) == set()
    assert not h.logger.is_pending(row.id)


def test_waiting_for_a_row_writes_it_now_rather_than_at_the_next_flush(
    harness: Callable[..., Harness],
) -> None:
    # POST /feedback waits (5 s at most) for a queued prediction; a writer left to its flush interval let
    # that wait run out whenever the interval was longer, and the label came back "unknown", not stored.
    h = harness(flush_interval_s=600, batch_size=10_000)
    h.logger.start()
    row = make_row()
    h.logger.submit(row)
    assert h.logger.wait_written([row.id], timeout=10) == set()
    assert stored(h.engine) == [row.id]


def test_a_full_batch_is_written_without_waiting_for_the_flush_interval(
    harness: Callable[..., Harness],
) -> None:
    h = harness(flush_interval_s=600, batch_size=10)
    h.logger.start()
    rows = [make_row(i) for i in range(10)]
    for row in rows:
        h.logger.submit(row)
    assert h.logger.flush(timeout=10)
    assert sorted(stored(h.engine)) == sorted(r.id for r in rows)


def test_a_row_submitted_after_stop_goes_to_the_spool(
    harness: Callable[..., Harness], engine: Engine
) -> None:
    """A request answered while the service shuts down: no writer is left to take it from the queue."""
    h = harness()
    h.logger.start()
    h.logger.stop()
    row = make_row()
    h.logger.submit(row)
    assert h.counts() == {"logged": 0, "spooled": 1, "replayed": 0, "dropped": 0}
    assert h.gauges() == (0, 1)


def test_a_row_that_is_not_json_is_kept_aside_and_the_rest_of_its_batch_spooled(
    harness: Callable[..., Harness], engine: Engine, outage: Outage
) -> None:
    h = harness()
    good = [make_row(1), make_row(2)]
    bad = LogRow(str(uuid4()), utcnow(), 1, {"district": {"not", "json"}}, 1.0, 1.0)
    with outage():
        for row in (good[0], bad, good[1]):
            h.logger.submit(row)
        h.logger.stop()  # never started: the caller drains one batch, which the database cannot take
    assert h.counts() == {"logged": 0, "spooled": 2, "replayed": 0, "dropped": 1}
    assert h.spool.pending_rows() == 2
    (kept,) = (h.spool.directory / "rejected").iterdir()
    assert bad.id in kept.read_text()


def test_a_spooled_row_the_database_refuses_is_not_counted_replayed(
    harness: Callable[..., Harness], engine: Engine, tmp_path_factory: pytest.TempPathFactory
) -> None:
    spool_dir = tmp_path_factory.mktemp("spool")
    rows = [make_row(i) for i in range(2)]
    Spool(spool_dir).append([_doc(rows[0]), {"id": "no-other-field"}, _doc(rows[1])])

    h = harness(spool_dir)
    h.logger.start()
    until(lambda: h.logger.spooled_pending == 0, "replay")
    h.logger.stop()
    assert sorted(stored(engine)) == sorted(r.id for r in rows)
    assert h.counts() == {"logged": 0, "spooled": 0, "replayed": 2, "dropped": 1}


def test_rows_the_database_refuses_are_kept_aside_and_counted(
    harness: Callable[..., Harness], engine: Engine
) -> None:
    h = harness()
    good = [make_row(1), make_row(2)]
    bad = LogRow(str(uuid4()), utcnow(), 1, {"district": {"not", "json"}}, 1.0, 1.0)
    for row in (good[0], bad, good[1]):
        h.logger.submit(row)
    h.logger.start()
    assert h.logger.wait_written([r.id for r in (*good, bad)], timeout=60) == set()
    h.logger.stop()

    assert sorted(stored(engine)) == sorted(r.id for r in good)
    assert h.counts() == {"logged": 2, "spooled": 0, "replayed": 0, "dropped": 1}
    (kept,) = (h.spool.directory / "rejected").iterdir()
    assert bad.id in kept.read_text()


# --- the spool ------------------------------------------------------------------------------------


def test_spool_segments_are_oldest_first_and_counted_on_reopen(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    assert spool.segments() == []
    assert spool.pending_rows() == 0
    spool.append([{"id": "a"}, {"id": "b"}])
    spool.append([{"id": "c"}])
    spool.append([])
    assert spool.pending_rows() == 3

    reopened = Spool(tmp_path / "spool")
    assert reopened.pending_rows() == 3
    first, second = reopened.segments()
    assert reopened.read(first) == [{"id": "a"}, {"id": "b"}]
    assert reopened.read(second) == [{"id": "c"}]
    reopened.remove(first)
    assert reopened.pending_rows() == 1
    assert reopened.segments() == [second]


def test_spool_ignores_and_clears_unfinished_segments(tmp_path: Path) -> None:
    folder = tmp_path / "spool"
    Spool(folder).append([{"id": "a"}])
    (folder / ".tmp-00000000000000000001-000000001-5.jsonl").write_text('{"id": "x"}\n{"id"')

    spool = Spool(folder)
    assert spool.pending_rows() == 1
    assert [spool.read(s) for s in spool.segments()] == [[{"id": "a"}]]
    assert sorted(p.name.startswith(".tmp-") for p in folder.iterdir()) == [False]


def test_spool_reads_a_torn_last_line_as_missing(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append([{"id": "a"}, {"id": "b"}])
    (segment,) = spool.segments()
    segment.write_bytes(segment.read_bytes()[:-4])
    assert spool.rows(segment) == 2
    assert spool.read(segment) == [{"id": "a"}]


def test_spool_refuses_rows_that_are_not_json(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    with pytest.raises(TypeError):
        spool.append([{"id": "a", "features": {1, 2}}])
    assert spool.segments() == []
    assert spool.pending_rows() == 0


def _doc(row: LogRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "created_at": row.created_at.isoformat(),
        "model_version": row.model_version,
        "features": row.features,
        "prediction": row.prediction,
        "latency_ms": row.latency_ms,
    }


def test_rows_queued_while_a_database_write_hangs_go_to_the_spool(
    harness: Callable[..., Harness], engine: Engine
) -> None:
    """A database that does not reply gives the writer no error to spool on: without the watchdog every row
    answered meanwhile stayed in memory, lost to a SIGKILL or an OOM kill (5,320 in a live run's 20 s)."""
    h = harness(batch_size=10, stall_s=0.2)
    with write_lock(engine) as blocker:
        h.logger.start()
        rows = [make_row(i) for i in range(30)]
        h.logger.submit(rows[0])
        until(lambda: h.logger.queue_depth == 0, "the writer to take the first row")
        for row in rows[1:]:
            h.logger.submit(row)
        until(lambda: h.spool.pending_rows() == 29, "the queue to reach the spool while the write hangs")
        assert h.logger.queue_depth == 0
        assert h.counts()["spooled"] == 29
        blocker.rollback()
    until(lambda: h.spool.pending_rows() == 0, "the spool to be replayed once the write returns")
    assert h.logger.flush(timeout=30)
    assert sorted(stored(engine)) == sorted(r.id for r in rows)
    assert h.counts() == {"logged": 1, "spooled": 29, "replayed": 29, "dropped": 0}


def test_stop_does_not_wait_out_its_timeout_for_a_hung_database_write(
    harness: Callable[..., Harness], engine: Engine
) -> None:
    """SIGTERM with PostgreSQL frozen took 40 s live: 30 of them the drain waiting on a write that could not
    return, of a 45 s grace period. Once the write counts as hung, stop spools what the writer holds."""
    h = harness(batch_size=10, stall_s=0.2)
    rows = [make_row(i) for i in range(30)]
    with write_lock(engine) as blocker:
        for row in rows:
            h.logger.submit(row)
        h.logger.start()
        until(lambda: len(h.logger) == 20, "the writer to take its first batch")
        stopping = threading.Thread(target=h.logger.stop, kwargs={"timeout": 600}, daemon=True)
        stopping.start()
        until(lambda: not stopping.is_alive(), "stop to give up on the hung write", timeout=60)
        assert h.spool.pending_rows() == 30
        blocker.rollback()
    until(lambda: len(stored(engine)) == 10, "the hung batch, written once the lock is gone")
