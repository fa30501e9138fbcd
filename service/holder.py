"""The model holder: one reference to the served champion, swapped atomically when the registry changes."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from catboost import CatBoostRegressor

from core.db import error_line
from core.metrics import Metrics
from core.registry import Registry
from core.spec import FeatureSpec

log = logging.getLogger("driftloop.holder")
NO_CHAMPION_IN_REGISTRY = "no champion in the registry"


@dataclass(frozen=True, slots=True)
class Served:
    """What a request reads once, at its start: the model and the version that will answer it."""

    version: int
    model: CatBoostRegressor
    created_at: datetime
    predictions: Any  # this version's child of driftloop_predictions_total, looked up once


@dataclass(frozen=True, slots=True)
class LoadFailure:
    """The registry's champion that this process could not load, and why; the served model stays."""

    version: int
    error: str


class ModelHolder:
    """Polls the registry for the champion and loads a new one off the request path.

    Requests read `current` exactly once; assigning it is a single reference swap, so a request that
    started on the old model finishes on it and the next one gets the new one.
    """

    def __init__(
        self, registry: Registry, metrics: Metrics, *, poll_s: float, spec: FeatureSpec | None = None
    ) -> None:
        self.registry = registry
        self.spec = spec  # a model trained on other features (or types, or order) is refused, not served
        self.metrics = metrics
        self.poll_s = poll_s
        self.current: Served | None = None
        self.last_error: str | None = None
        # The registry's champion when it failed to load; one reference, read with its error in one go.
        self.load_failure: LoadFailure | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._unreachable = False  # the last poll could not read the registry (logged when it began)

    def refresh(self) -> bool:
        """Load the registry's champion if it differs from the served one; True when a swap happened."""
        with self._lock:
            try:
                row = self.registry.champion()
            except Exception as exc:  # DB unreachable: keep serving what we have
                if not self._unreachable:  # once per outage, not on every poll
                    log.warning(
                        "registry unreachable (%s); serving %s, polling every %g s",
                        error_line(exc), _v(self.current), self.poll_s,
                    )  # fmt: skip
                self._unreachable = True
                self.last_error = f"registry unreachable: {exc.__class__.__name__}"
                return False
            if self._unreachable:
                self._unreachable = False
                log.info("registry reachable again")
            current = self.current
            if row is None or (current is not None and current.version == row.version):
                self.last_error = None if row is not None else NO_CHAMPION_IN_REGISTRY
                self.load_failure = None
                return False
            try:
                model = self.registry.load(row, spec=self.spec)
            except Exception as exc:
                failure = LoadFailure(version=row.version, error=str(exc))
                if failure != self.load_failure:  # once per failure, not on every poll
                    log.error(
                        "champion v%s failed to load; still serving %s: %s", row.version, _v(current), exc
                    )
                self.last_error = f"could not load v{row.version}: {exc}"
                self.load_failure = failure
                return False
            self.current = Served(
                version=row.version,
                model=model,
                created_at=row.created_at,
                predictions=self.metrics.predictions.labels(model_version=str(row.version)),
            )
            self.last_error = None
            self.load_failure = None
            self._publish(previous=current)
            log.info("now serving v%s (was %s)", row.version, _v(current))
            return True

    def _publish(self, previous: Served | None) -> None:
        served = self.current
        assert served is not None
        if previous is not None:
            self.metrics.model_info.labels(version=str(previous.version)).set(0)
            self.metrics.model_swaps.inc()
        self.metrics.model_info.labels(version=str(served.version)).set(1)
        self.metrics.model_loaded.set(1)
        self.metrics.champion_created.set(served.created_at.timestamp())

    def poke(self) -> None:
        """Check the registry now instead of at the next poll (after a promote through this process)."""
        self._wake.set()

    def start(self) -> None:
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="driftloop-holder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll_s)
            self._wake.clear()
            if not self._stop.is_set():
                self.refresh()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def _v(served: Served | None) -> str:
    return f"v{served.version}" if served else "nothing"
