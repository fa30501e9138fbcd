"""Fixtures: a fresh database (SQLite file, and a real PostgreSQL cluster) and registry per test."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session, sessionmaker

from core.db import make_engine, make_sessions, migrate
from core.metrics import Metrics, build_metrics
from core.registry import ArtifactStore, NewVersion, Registry
from core.schema import ModelVersion
from core.settings import Settings
from core.spec import FeatureSpec, load_spec
from retrain.bootstrap import bootstrap
from retrain.train import TrainParams

TINY = TrainParams(iterations=60, depth=4, learning_rate=0.2, thread_count=2)


@pytest.fixture(scope="session")
def pg_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.pgcluster import PgCluster, find_pg_bin

    if find_pg_bin() is None:
        pytest.skip("PostgreSQL server binaries not found (.ci/run installs the 'postgresql' package)")
    cluster = PgCluster()
    cluster.start()
    yield cluster
    cluster.cleanup()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database: a SQLite file, or a fresh database on the test PostgreSQL cluster."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'driftloop.db'}"
    else:
        cluster = request.getfixturevalue("pg_cluster")
        url = cluster.create_database(f"t_{uuid4().hex[:12]}")
    migrate(url)
    return url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """SQLite only, for tests whose subject is not the database."""
    url = f"sqlite:///{tmp_path / 'driftloop.db'}"
    migrate(url)
    return url


@pytest.fixture
def spec() -> FeatureSpec:
    return load_spec()


@pytest.fixture
def sessions(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(db_url)
    yield make_sessions(engine)
    settle_run_threads()
    engine.dispose()


def settle_run_threads(timeout_s: float = 120) -> None:
    """Wait for the threads that watch and announce retrain runs (retrain.process, monitor.jobs).

    A test may see its run finished in the database while the watcher still records the exit with one of
    the test's pooled connections; disposing of the engine under it strands that connection, which the
    garbage collector later reports (ResourceWarning, an error here) in whichever test runs then.
    """
    deadline = time.monotonic() + timeout_s
    for thread in threading.enumerate():
        if thread.name.startswith(("retrain-watch-", "retrain-announce-")):
            thread.join(max(0.0, deadline - time.monotonic()))


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def registry(sessions: sessionmaker[Session], store: ArtifactStore) -> Registry:
    return Registry(sessions, store)


@pytest.fixture
def metrics() -> Metrics:
    return build_metrics(CollectorRegistry())


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    return make_settings(db_url, tmp_path)


def make_settings(db_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for a test: state in tmp_path, tiny models, short intervals."""
    values: dict[str, Any] = {
        "database_url": db_url,
        "artifact_dir": tmp_path / "artifacts",
        "spool_dir": tmp_path / "spool",
        "report_dir": tmp_path / "reports",
        "admin_token": "test-admin-token",
        "champion_poll_s": 0.2,
        "log_flush_interval_s": 0.05,
        "spool_replay_interval_s": 0.2,
        "train_iterations": TINY.iterations,
        "train_depth": TINY.depth,
        "train_learning_rate": TINY.learning_rate,
        "train_thread_count": TINY.thread_count,
        "min_window_rows": 200,
        "min_labelled_rows": 100,
        **overrides,
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def champion(registry: Registry, spec: FeatureSpec) -> ModelVersion:
    """v1: a tiny real CatBoost model on 3,000 generated 2019–2021 transactions, promoted."""
    return bootstrap(registry=registry, spec=spec, params=TINY, rows=3000, seed=1).version


def register_copy(registry: Registry, champion: ModelVersion) -> ModelVersion:
    """A candidate: the champion's model under a new version, as a retrain elsewhere would register it."""
    return registry.register(
        NewVersion(
            model=registry.load(champion), reference=registry.reference(champion), trigger="manual",
            metrics=champion.metrics, params={}, train_rows=champion.train_rows,
        )
    )  # fmt: skip


@pytest.fixture
def make_features() -> Callable[..., dict[str, Any]]:
    def _make(**overrides: Any) -> dict[str, Any]:
        features: dict[str, Any] = {
            "district": "Mapo-gu",
            "area_m2": 84.5,
            "floor": 12,
            "build_year": 2008,
            "households": 950,
            "subway_distance_m": 420.0,
        }
        features.update(overrides)
        return {k: v for k, v in features.items() if v is not _DROP}

    return _make


_DROP = object()


@pytest.fixture
def DROP() -> object:
    return _DROP
