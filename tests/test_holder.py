"""The model holder: one poll after another process promotes swaps the served model; a champion that cannot
be loaded, or a registry that cannot be reached, leaves the current one serving."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from core.db import make_engine, make_sessions
from core.metrics import build_metrics
from core.registry import ArtifactStore, Registry
from core.schema import ModelVersion
from service.holder import LoadFailure, ModelHolder
from tests.conftest import register_copy
from tests.live import wait_until


def holder_for(registry: Registry, prom: CollectorRegistry, poll_s: float = 60) -> ModelHolder:
    return ModelHolder(registry, build_metrics(prom), poll_s=poll_s)


def test_one_refresh_after_a_promotion_elsewhere_swaps_the_model(
    registry: Registry, champion: ModelVersion
) -> None:
    prom = CollectorRegistry()
    holder = holder_for(registry, prom)
    assert holder.refresh() is True and holder.current is not None and holder.current.version == 1
    first = holder.current
    v2 = register_copy(registry, champion)
    assert holder.refresh() is False  # a candidate is not served
    registry.promote(version=v2.version, reason="another process promoted it")

    assert holder.refresh() is True  # what one poll does
    assert holder.current is not None and holder.current.version == 2
    assert first.version == 1  # a request holding the old reference finishes on the old model
    sample = prom.get_sample_value
    assert sample("driftloop_model_info", {"version": "2"}) == 1
    assert sample("driftloop_model_info", {"version": "1"}) == 0
    assert sample("driftloop_model_swaps_total") == 1
    assert holder.refresh() is False  # nothing new


def test_the_polling_thread_picks_up_a_new_champion(registry: Registry, champion: ModelVersion) -> None:
    holder = holder_for(registry, CollectorRegistry(), poll_s=0.05)
    holder.start()
    try:
        v2 = register_copy(registry, champion)
        registry.promote(version=v2.version, reason="test")
        wait_until(lambda: holder.current and holder.current.version == 2, timeout=30, what="the swap to v2")
    finally:
        holder.stop()


def test_a_champion_that_fails_to_load_leaves_the_old_one_serving(
    registry: Registry, champion: ModelVersion, caplog: pytest.LogCaptureFixture
) -> None:
    holder = holder_for(registry, CollectorRegistry())
    holder.refresh()
    v2 = register_copy(registry, champion)
    registry.promote(version=v2.version, reason="test")
    Path(v2.artifact_path).write_bytes(b"not a CatBoost model")  # damaged on the shared volume since

    with caplog.at_level(logging.ERROR, logger="driftloop.holder"):
        assert [holder.refresh() for _ in range(3)] == [False, False, False]  # three polls
    assert [r.getMessage()[:40] for r in caplog.records] == ["champion v2 failed to load; still servin"]
    assert holder.current is not None and holder.current.version == 1
    assert holder.last_error is not None
    assert holder.last_error.startswith("could not load v2: ")
    assert "does not match the registry's" in holder.last_error  # the sha256 check caught it
    assert holder.load_failure == LoadFailure(
        version=2, error=holder.last_error.removeprefix("could not load v2: ")
    )
    registry.rollback(reason="v2 cannot be loaded")
    assert holder.refresh() is False  # v1 is the registry's champion again, and it serves
    assert (holder.last_error, holder.load_failure) == (None, None)


def test_an_unreachable_registry_leaves_the_model_serving(
    registry: Registry, champion: ModelVersion, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="driftloop.holder")
    holder = holder_for(registry, CollectorRegistry())
    holder.refresh()
    reachable = holder.registry
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")  # no tables: every query fails
    holder.registry = Registry(make_sessions(engine), ArtifactStore(tmp_path / "artifacts"))
    try:
        assert holder.refresh() is False
        assert holder.refresh() is False
    finally:
        engine.dispose()
    assert holder.current is not None and holder.current.version == 1
    assert holder.last_error == "registry unreachable: OperationalError"
    # Said once when the polls start failing (a replica started during an outage said nothing at all),
    # and once when they succeed again.
    unreachable = [m for m in caplog.messages if m.startswith("registry unreachable")]
    assert len(unreachable) == 1 and "; serving v1, polling every " in unreachable[0], caplog.messages
    holder.registry = reachable
    assert holder.refresh() is False
    assert holder.last_error is None
    assert caplog.messages[-1] == "registry reachable again"
