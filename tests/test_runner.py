"""The single-flight runner: the database lock, stale-run recovery and the child process."""

from __future__ import annotations

import os
import signal
import threading
import time
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from core.db import utcnow
from core.generator import generate_transactions
from core.metrics import Metrics, build_metrics
from core.registry import Registry
from core.schema import ModelStatus, ModelVersion, RetrainRun
from core.spec import FeatureSpec, load_spec
from retrain.child import settings_from_env
from retrain.process import SETTINGS_ENV, child_env, launch
from retrain.runs import Heartbeat, RunInProgress, fail_run, recover_stale, start_run
from tests.conftest import make_settings
from tests.live import wait_until
from tests.test_retrain import log_predictions, run_row, versions

NOW = datetime(2023, 1, 1, tzinfo=UTC)
CHILD_TIMEOUT_S = 300  # a bound on a broken test, never an assertion


@pytest.fixture
def prometheus() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(prometheus: CollectorRegistry) -> Metrics:
    return build_metrics(prometheus)


def running_count(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).where(RetrainRun.status == "running")) or 0)


def test_two_simultaneous_starts_make_exactly_one_run(
    sessions: sessionmaker[Session], champion: ModelVersion
) -> None:
    barrier = threading.Barrier(2)
    results: list[Any] = []

    def start() -> None:
        barrier.wait()
        try:
            results.append(start_run(sessions, trigger="drift", now=NOW))
        except RunInProgress as exc:
            results.append(exc)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    started = [r for r in results if isinstance(r, int)]
    refused = [r for r in results if isinstance(r, RunInProgress)]
    assert len(started) == 1 and len(refused) == 1
    assert refused[0].run_id == started[0]
    assert str(refused[0]) == f"retrain run {started[0]} is already running"
    with sessions() as session:
        runs = session.scalars(select(RetrainRun)).all()
    assert [(r.id, r.status, r.trigger, r.champion_version) for r in runs] == [
        (started[0], "running", "drift", champion.version)
    ]


def test_the_slot_frees_when_the_run_finishes(
    sessions: sessionmaker[Session], champion: ModelVersion
) -> None:
    first = start_run(sessions, trigger="manual", now=NOW)
    with pytest.raises(RunInProgress) as refused:
        start_run(sessions, trigger="schedule", now=NOW)
    assert refused.value.run_id == first

    assert fail_run(sessions, first, error="test", now=NOW) is True
    assert fail_run(sessions, first, error="again", now=NOW) is False
    second = start_run(sessions, trigger="schedule", now=NOW)

    assert second != first
    assert run_row(sessions, first).error == "test"
    assert running_count(sessions) == 1


def test_start_run_refuses_an_unknown_trigger(sessions: sessionmaker[Session]) -> None:
    with pytest.raises(ValueError, match="'sometimes' is not a valid Trigger"):
        start_run(sessions, trigger="sometimes", now=NOW)
    assert running_count(sessions) == 0


def test_recover_stale_fails_only_runs_whose_heartbeat_stopped(sessions: sessionmaker[Session]) -> None:
    run_id = start_run(sessions, trigger="drift", now=NOW)  # the heartbeat starts at the start
    kwargs: dict[str, Any] = {"stale_after_s": 30, "max_run_s": 3600}

    assert recover_stale(sessions, now=NOW + timedelta(seconds=30), **kwargs) == []  # still alive
    later = NOW + timedelta(seconds=30.5)
    assert recover_stale(sessions, now=later, **kwargs) == [run_id]
    assert recover_stale(sessions, now=later, **kwargs) == []

    run = run_row(sessions, run_id)
    assert (run.status, run.error, run.finished_at) == (
        "failed", "no heartbeat for over 30 s: its process died", later,
    )  # fmt: skip
    assert start_run(sessions, trigger="drift", now=later) != run_id


def test_a_heartbeat_keeps_a_long_run_alive_until_it_outlives_any_timeout(
    sessions: sessionmaker[Session],
) -> None:
    run_id = start_run(sessions, trigger="manual", now=utcnow() - timedelta(minutes=10))
    with Heartbeat(sessions, run_id, interval_s=60):  # the first beat comes at once
        assert run_row(sessions, run_id).heartbeat_at > utcnow() - timedelta(seconds=5)
        assert recover_stale(sessions, now=utcnow(), stale_after_s=30, max_run_s=3600) == []
        assert run_row(sessions, run_id).status == "running"
        # Beating but running for longer than any timeout allows: hung, with nobody left to kill it.
        assert recover_stale(sessions, now=utcnow(), stale_after_s=30, max_run_s=300) == [run_id]
    run = run_row(sessions, run_id)
    assert (run.status, run.error) == (
        "failed",
        "still running after 300 s, past any timeout: its process hung",
    )


def test_the_child_gets_our_settings_without_secrets_or_stray_overrides(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DRIFTLOOP_TRAIN_ITERATIONS", "999")  # must not leak into the child
    settings = make_settings(db_url, tmp_path, train_window_days=30, spec_path=tmp_path / "spec.yaml")

    env = child_env(settings)

    assert sorted(k for k in env if k.startswith("DRIFTLOOP_")) == [SETTINGS_ENV]
    assert "test-admin-token" not in env[SETTINGS_ENV]
    assert isinstance(settings.admin_token, SecretStr)
    child = settings_from_env(env)
    assert child.admin_token is None
    assert child.model_dump(exclude={"admin_token"}) == settings.model_dump(exclude={"admin_token"})


# --- the child process ---------------------------------------------------------------------------------


@pytest.fixture
def shocked(sessions: sessionmaker[Session], spec: FeatureSpec, champion: ModelVersion) -> None:
    """A year of labelled predictions after a rate shock: a retrained candidate beats v1 on them."""
    data = generate_transactions(
        1500, start="2022-01-01", end="2022-12-31", scenario="rate_shock", change_at="2022-01-01", seed=5
    )
    log_predictions(sessions, data, spec)


def test_launch_runs_in_a_child_that_records_the_outcome(
    db_url: str,
    tmp_path: Path,
    sessions: sessionmaker[Session],
    registry: Registry,
    prometheus: CollectorRegistry,
    metrics: Metrics,
    shocked: None,
) -> None:
    handle = launch(
        settings=make_settings(db_url, tmp_path),
        trigger="manual",
        reason="operator asked",
        sessions=sessions,
        metrics=metrics,
    )

    assert handle.pid != os.getpid()
    status = handle.wait(CHILD_TIMEOUT_S)

    assert status == "promoted"
    assert handle.poll() == "promoted"
    run = run_row(sessions, handle.run_id)
    assert (run.status, run.pid, run.reason, run.candidate_version, run.error) == (
        "promoted",
        handle.pid,
        "operator asked",
        2,
        None,
    )
    assert list(run.steps) == ["assemble", "train", "validate", "refit", "register", "promote"]
    assert versions(registry) == {1: ModelStatus.archived, 2: ModelStatus.champion}
    assert run.finished_at is not None
    sample = prometheus.get_sample_value
    assert sample("driftloop_retrain_runs_total", {"trigger": "manual", "status": "promoted"}) == 1
    assert sample("driftloop_retrain_running") == 0
    assert sample("driftloop_retrain_last_finished_timestamp_seconds") == run.finished_at.timestamp()


def test_a_run_launched_under_a_spec_file_changed_since_fails_saying_so(
    db_url: str, tmp_path: Path, sessions: sessionmaker[Session], registry: Registry, champion: ModelVersion
) -> None:
    """The service validates and serves by the spec it read at start; a run must not train and gate by
    another (a bound or a feature edited in the file since)."""
    path = tmp_path / "spec.yaml"
    path.write_bytes(resources.files("core.specs").joinpath("apartments.yaml").read_bytes())
    settings = make_settings(db_url, tmp_path, spec_path=path)
    read_at_start = load_spec(path)
    path.write_text(
        path.read_text(encoding="utf-8").replace("target_min: 0", "target_min: 1"), encoding="utf-8"
    )

    handle = launch(settings=settings, trigger="manual", sessions=sessions, spec_sha256=read_at_start.sha256)
    assert handle.wait(CHILD_TIMEOUT_S) == "failed"
    error = run_row(sessions, handle.run_id).error
    assert error is not None and error.startswith(
        f"SpecError: the spec file {path} changed since the process"
    )
    assert "restart the service and the worker" in error
    assert versions(registry) == {1: ModelStatus.champion}  # nothing trained

    unchanged = launch(
        settings=settings, trigger="manual", sessions=sessions, spec_sha256=load_spec(path).sha256
    )
    unchanged.wait(CHILD_TIMEOUT_S)
    assert "SpecError" not in (run_row(sessions, unchanged.run_id).error or "")  # the same file: it runs


def _wait_for_step(sessions: sessionmaker[Session], run_id: int, step: str) -> None:
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while step not in run_row(sessions, run_id).steps:
        if time.monotonic() > deadline:
            pytest.fail(f"the child never reached the {step} step")
        time.sleep(0.05)


def test_a_child_killed_mid_training_leaves_the_champion_and_a_failed_run(
    db_url: str,
    tmp_path: Path,
    sessions: sessionmaker[Session],
    registry: Registry,
    prometheus: CollectorRegistry,
    metrics: Metrics,
    shocked: None,
) -> None:
    slow = make_settings(
        db_url, tmp_path, train_iterations=1_000_000, retrain_timeout_s=CHILD_TIMEOUT_S, lease_ttl_s=0.6
    )
    handle = launch(settings=slow, trigger="drift", sessions=sessions, metrics=metrics)
    _wait_for_step(sessions, handle.run_id, "train")
    assert handle.poll() is None
    started = run_row(sessions, handle.run_id).started_at
    wait_until(  # the child renews the run's heartbeat while CatBoost trains (it releases the GIL)
        lambda: run_row(sessions, handle.run_id).heartbeat_at > started + timedelta(seconds=0.5),
        timeout=CHILD_TIMEOUT_S, what="the child's heartbeat during training",
    )  # fmt: skip

    os.kill(handle.pid, signal.SIGKILL)
    status = handle.wait(CHILD_TIMEOUT_S)

    assert status == "failed"
    run = run_row(sessions, handle.run_id)
    assert run.error == f"child process {handle.pid} was killed by SIGKILL before finishing the run"
    assert run.candidate_version is None
    assert run.steps["train"]["seconds"] is None
    assert versions(registry) == {1: ModelStatus.champion}
    sample = prometheus.get_sample_value
    assert sample("driftloop_retrain_runs_total", {"trigger": "drift", "status": "failed"}) == 1
    assert sample("driftloop_retrain_running") == 0
    assert running_count(sessions) == 0


def test_a_child_past_the_timeout_is_killed_and_the_run_failed(
    db_url: str,
    tmp_path: Path,
    sessions: sessionmaker[Session],
    registry: Registry,
    shocked: None,
) -> None:
    slow = make_settings(db_url, tmp_path, train_iterations=1_000_000, retrain_timeout_s=1)
    handle = launch(settings=slow, trigger="schedule", sessions=sessions)

    assert handle.wait(CHILD_TIMEOUT_S) == "failed"

    run = run_row(sessions, handle.run_id)
    assert run.error == f"timed out after 1 s; child process {handle.pid} killed"
    assert versions(registry) == {1: ModelStatus.champion}


def test_launch_while_a_run_is_in_progress_is_refused_at_once(
    db_url: str, tmp_path: Path, sessions: sessionmaker[Session], champion: ModelVersion
) -> None:
    running = start_run(sessions, trigger="drift", now=NOW)

    with pytest.raises(RunInProgress) as refused:
        launch(settings=make_settings(db_url, tmp_path), trigger="manual", sessions=sessions)

    assert refused.value.run_id == running
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(RetrainRun)) == 1


class FlakySessions:
    """A sessionmaker whose database is away while `down`: begin() fails as an unreachable server does."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions, self.down, self.attempts = sessions, True, 0

    def begin(self) -> Any:
        self.attempts += 1
        if self.down:
            raise OperationalError("UPDATE retrain_run", {}, ConnectionRefusedError("connection refused"))
        return self.sessions.begin()


def test_a_heartbeat_in_a_database_outage_logs_once_when_it_fails_and_once_when_it_beats_again(
    sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    """A traceback every beat (7 in a live run's 20 s outage) buried the run's own log."""
    run_id = start_run(sessions, trigger="manual", now=utcnow() - timedelta(minutes=10))
    flaky = FlakySessions(sessions)
    with caplog.at_level("INFO", logger="driftloop.retrain"), Heartbeat(flaky, run_id, interval_s=0.01):  # type: ignore[arg-type]
        wait_until(lambda: flaky.attempts >= 5, timeout=30, what="five beats in the outage")
        flaky.down = False
        wait_until(
            lambda: run_row(sessions, run_id).heartbeat_at > utcnow() - timedelta(seconds=5),
            timeout=30,
            what="a beat once the database is back",
        )
    beats = [
        (r.levelname, r.getMessage(), r.exc_info) for r in caplog.records if "heartbeat" in r.getMessage()
    ]
    assert beats == [
        (
            "WARNING",
            f"retrain run {run_id}: heartbeat failed (OperationalError: (builtins.ConnectionRefusedError) "
            "connection refused); retrying every 0.01 s, logged again when it beats",
            None,
        ),
        ("INFO", f"retrain run {run_id}: heartbeat renewed again", None),
    ]


def test_a_child_that_dies_while_the_database_is_away_gets_its_run_failed_once_it_is_back(
    db_url: str,
    tmp_path: Path,
    sessions: sessionmaker[Session],
    registry: Registry,
    prometheus: CollectorRegistry,
    metrics: Metrics,
    shocked: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Seen live on PostgreSQL: a 12 s outage (pg_ctl stop, start) during a manual run's training made the
    child exit 1; its launcher's one attempt to mark the run failed met the database still away and gave up,
    so the run stayed `running` (holding the single-flight slot, counted by nobody) until the leader failed it
    as "no heartbeat: its process died", which is not what happened."""
    import core.db
    import retrain.process

    slow = make_settings(
        db_url, tmp_path, train_iterations=1_000_000, retrain_timeout_s=CHILD_TIMEOUT_S, lease_ttl_s=0.6
    )
    handle = launch(settings=slow, trigger="drift", sessions=sessions, metrics=metrics)
    _wait_for_step(sessions, handle.run_id, "train")
    away = [2]  # the database refuses the launcher's first two attempts

    def flaky_fail_run(*args: Any, **kwargs: Any) -> bool:
        if away[0]:
            away[0] -= 1
            raise OperationalError("UPDATE retrain_run", {}, ConnectionRefusedError("connection refused"))
        return fail_run(*args, **kwargs)

    monkeypatch.setattr(retrain.process, "fail_run", flaky_fail_run)
    monkeypatch.setattr(core.db, "OUTAGE_RETRY_S", 0.05)
    os.kill(handle.pid, signal.SIGKILL)

    assert handle.wait(CHILD_TIMEOUT_S) == "failed"
    assert away == [0]
    run = run_row(sessions, handle.run_id)
    assert run.status == "failed"
    assert run.error == f"child process {handle.pid} was killed by SIGKILL before finishing the run"
    sample = prometheus.get_sample_value
    assert sample("driftloop_retrain_runs_total", {"trigger": "drift", "status": "failed"}) == 1
    assert running_count(sessions) == 0


def test_a_child_whose_run_another_process_ended_stops_training(
    db_url: str,
    tmp_path: Path,
    sessions: sessionmaker[Session],
    registry: Registry,
    shocked: None,
) -> None:
    """Seen live: a replica killed mid-run left its child training (for as long as 1M iterations take); the
    leader failed the run once it outlived any timeout, but nothing stopped the child, whose work could no
    longer be recorded. Its heartbeat now finds the run ended, and the child exits."""
    slow = make_settings(
        db_url, tmp_path, train_iterations=1_000_000, retrain_timeout_s=2 * CHILD_TIMEOUT_S, lease_ttl_s=0.6
    )
    handle = launch(settings=slow, trigger="drift", sessions=sessions)
    _wait_for_step(sessions, handle.run_id, "train")
    # the leader's sweep, as if the launcher were gone and the run past any timeout
    assert recover_stale(sessions, now=utcnow(), stale_after_s=3600, max_run_s=0) == [handle.run_id]

    # ended by the child itself: the launcher's own timeout is twice this wait
    assert handle.wait(CHILD_TIMEOUT_S) == "failed"
    run = run_row(sessions, handle.run_id)
    assert run.error == "still running after 0 s, past any timeout: its process hung"
    assert run.candidate_version is None
    assert versions(registry) == {1: ModelStatus.champion}
