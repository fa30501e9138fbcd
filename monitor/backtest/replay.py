"""Replaying history through retraining policies, on simulated time, with the live loop's own code.

Each policy gets a scratch SQLite database and artifact store. Every step of simulated time, each policy's
champion predicts the step's rows, which are logged to prediction_log as the service would; labels reach
ground_truth once `label_delay` has passed; then the policy acts:

- ``never``: nothing — v1 serves to the end.
- ``periodic``: a retrain run every `period`.
- ``drift``: `monitor.jobs.Loop.run_monitor` on the monitor cadence — window, Evidently, `policy.decide`,
  alert outbox — whose retrain decisions run `retrain.runner.run_inline`.
- ``oracle``: knows the change points. A retrain run at every monitor time once labels from after a
  change can have arrived (change + label delay), trained on the labels since that change only; with
  change points unknown, at every monitor time on all labels seen so far. Near the most retraining can buy.

Every retrain, whatever the policy, is `run_inline`: the same assemble → train → gate → promote as live.
No HTTP and no sleeping; the clock is the replayed data's.
"""

from __future__ import annotations

import logging
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import pandas as pd
from catboost import CatBoostRegressor
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, insert

from core.db import make_engine, make_sessions, migrate
from core.metrics import build_metrics
from core.registry import ArtifactStore, NewVersion, Registry, baseline_mae
from core.schema import GroundTruth, ModelVersion, PredictionLog, Trigger
from core.settings import Settings
from core.spec import FeatureSpec
from core.times import ns_times
from monitor import LOOP_LOGGER
from monitor.backtest.stream import BacktestInputError, Stream, duration_text
from monitor.jobs import Loop
from retrain import RETRAIN_LOGGER
from retrain.bootstrap import bootstrap
from retrain.runner import run_inline
from retrain.train import TrainParams, predict

POLICIES = ("never", "periodic", "drift", "oracle")
SCRATCH_MARKER = ".driftloop-backtest"
MAX_STEPS = 5_000  # 13 years in daily steps; each step runs every policy's serve, labels and turn


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    step: timedelta = timedelta(days=7)  # simulated time between serving, label and policy turns
    label_delay: timedelta = timedelta(days=30)
    monitor_every: timedelta = timedelta(days=7)  # the drift monitor's (and the oracle's) cadence
    period: timedelta = timedelta(days=90)  # the periodic policy's retrain interval

    def __post_init__(self) -> None:
        for name in ("step", "monitor_every", "period"):
            if getattr(self, name) <= timedelta(0):
                raise ValueError(f"{_option(name)} ({name}) must be positive")
        if self.label_delay < timedelta(0):
            raise ValueError("--label-delay (label_delay) must not be negative")


@dataclass(frozen=True, slots=True)
class RetrainRecord:
    at: datetime
    trigger: str
    status: str  # promoted | rejected | failed
    seconds: float
    candidate_version: int | None
    candidate_mae: float | None
    champion_mae: float | None
    error: str | None


@dataclass(frozen=True, slots=True)
class MonitorRecord:
    at: datetime
    verdict: str
    breach: bool
    retrain: bool
    drift_share: float | None
    weighted_score: float | None
    mae: float | None
    champion_mae: float | None  # the serving champion's validation MAE, the accuracy rule's yardstick…
    # …or, with DRIFTLOOP_LINEAGE_BASELINE, this when lower: the best validation MAE of the champion's line
    baseline_mae: float | None
    reasons: tuple[str, ...]
    champion_version: int | None = None  # the champion the run judged: a breach streak is one champion's


@dataclass(slots=True)
class PolicyTrace:
    """What one policy served and did over the replay."""

    name: str
    predictions: np.ndarray
    versions: np.ndarray
    retrains: list[RetrainRecord] = field(default_factory=list)
    monitors: list[MonitorRecord] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Replay:
    stream: Stream
    replay: pd.DataFrame  # the replayed rows (spec features, target, time)
    until: datetime
    config: ReplayConfig
    settings: Settings
    traces: dict[str, PolicyTrace]
    v1_validation_mae: float | None
    workdir: Path


class SimClock:
    """The backtest's time: the replay sets it, the loop and retrain runs read it."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def run_replay(
    stream: Stream,
    *,
    settings: Settings,
    config: ReplayConfig,
    policies: tuple[str, ...],
    until: datetime,
    workdir: Path,
    on_step: Callable[[datetime, int, int], None] | None = None,
) -> Replay:
    """Train v1 on rows before `until`, then replay the rest through each policy; `on_step(now, k, n)`.

    `workdir` is scratch space: whatever it holds is removed first, so no earlier replay leaks in.
    """
    check_policies(policies)
    initial, replay = stream.split(until)
    check_timing(config, until=until, last=replay[stream.time_column].iloc[-1], policies=policies)
    spec = stream.spec
    with _ctrl_c_remembered() as pressed:
        _fresh_workdir(workdir)
        clock = SimClock(until)
        players = [
            _Player.create(name, settings, spec, workdir / name, clock, config, stream) for name in policies
        ]
        v1 = players[0].bootstrap(initial, settings)
        for player in players[1:]:
            player.adopt(players[0].registry, v1)
        _stop_if(pressed)

        times = ns_times(replay[stream.time_column])
        # Deterministic ids: the window breaks ties by id.
        ids = [str(UUID(int=i + 1)) for i in range(len(replay))]
        bounds = step_bounds(until, replay[stream.time_column].iloc[-1].to_pydatetime(), config.step)
        cuts = np.searchsorted(times, ns_times(pd.Series(bounds)))
        with _quiet_loop_log():
            for k in range(1, len(bounds)):
                clock.now = bounds[k]
                rows = slice(int(cuts[k - 1]), int(cuts[k]))
                monitor_due = _due(bounds[k], until, config.monitor_every, config.step)
                for player in players:
                    player.serve(replay.iloc[rows], ids[rows], rows)
                    player.release_labels(clock.now)
                    player.act(clock.now, monitor_due=monitor_due)
                    _stop_if(pressed)
                if on_step is not None:
                    on_step(clock.now, k, len(bounds) - 1)
                _stop_if(pressed)
    for player in players:
        player.close()
    return Replay(
        stream=stream,
        replay=replay,
        until=until,
        config=config,
        settings=settings,
        traces={p.trace.name: p.trace for p in players},
        v1_validation_mae=v1.metrics.get("val_mae"),
        workdir=workdir,
    )


@contextmanager
def _ctrl_c_remembered() -> Iterator[threading.Event]:
    """Ctrl-C raises KeyboardInterrupt as ever, and is also remembered in the event yielded.

    Python drops an exception raised inside a finaliser (it prints "Exception ignored in ..."), and a replay
    runs CatBoost, Evidently and SQLAlchemy, whose objects are finalised all the time: a Ctrl-C that lands in
    one would be lost and the replay would go on to its end. The replay checks the event after each policy's
    turn, so the press stops it there. A handler other than Python's default is left as it is (the event is
    then never set), and so is any thread but the main one, which cannot set handlers.
    """
    pressed = threading.Event()
    before = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or before is not signal.default_int_handler:
        yield pressed
        return

    def remember(signum: int, frame: Any) -> None:
        pressed.set()
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, remember)
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, before)


def _stop_if(pressed: threading.Event) -> None:
    if pressed.is_set():
        raise KeyboardInterrupt("Ctrl-C: the replay stops")


@contextmanager
def _quiet_loop_log() -> Iterator[None]:
    """The live loop logs a line a monitor run and retrain outcome; a replay makes hundreds, on simulated
    time, and records them in its traces, so only the loop's errors reach the log meanwhile. A failed
    retrain run is recorded in its trace with its error (summarized after the replay), so its traceback
    does not reach the log either: an oracle's run on the few labels a change has yet would print one
    through the progress bar, as if the backtest had crashed."""
    levels = {RETRAIN_LOGGER: logging.CRITICAL, LOOP_LOGGER: logging.ERROR}
    loggers = {logging.getLogger(name): level for name, level in levels.items()}
    before = {logger: logger.level for logger in loggers}
    for logger, level in loggers.items():
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, level in before.items():
            logger.setLevel(level)


def check_policies(policies: tuple[str, ...]) -> None:
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies:
        raise BacktestInputError(
            f"--policies: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(POLICIES)}"
        )
    twice = sorted({p for p in policies if policies.count(p) > 1})
    if twice:
        raise BacktestInputError(f"--policies: {', '.join(twice)} listed more than once")


def check_timing(
    config: ReplayConfig,
    *,
    until: datetime,
    last: datetime,
    policies: tuple[str, ...],
    defaulted: frozenset[str] = frozenset(),
) -> None:
    """Refuse step, delay and cadence options under which the replay could not show anything.

    `defaulted` names the options (`step`, `label_delay`, `monitor_every`, `period`) the user left at their
    default, so that a message says so rather than blame an option nobody typed.
    """
    span = last - until
    days = f"{span.total_seconds() / 86400:.4g} days"

    def option(name: str) -> str:
        value = duration_text(getattr(config, name))
        return f"{_option(name)} {value}" + (" (the default)" if name in defaulted else "")

    if config.step > span:
        raise BacktestInputError(
            f"{option('step')}: longer than the replayed {days}; every row would be served by v1 in one step"
        )
    steps = int(span / config.step) + 1  # as step_bounds makes them
    if steps > MAX_STEPS:
        raise BacktestInputError(
            f"{option('step')}: {steps:,.0f} steps over the replayed {days}, more than the {MAX_STEPS:,} a "
            "replay takes; choose a longer step"
        )
    if config.label_delay >= span:
        raise BacktestInputError(f"{option('label_delay')}: no label would arrive within the replayed {days}")
    if {"drift", "oracle"} & set(policies) and config.monitor_every > span:
        raise BacktestInputError(
            f"{option('monitor_every')}: the monitor would never run within the replayed {days}"
        )
    if "periodic" in policies and config.period > span:
        raise BacktestInputError(
            f"{option('period')}: the periodic policy would never retrain within the replayed {days}"
        )
    # A policy acts once a step, at its end: a shorter cadence would run once a step, not as often as the
    # option (and summary.json) said.
    if {"drift", "oracle"} & set(policies) and config.monitor_every < config.step:
        raise BacktestInputError(
            f"{option('monitor_every')}: shorter than {option('step')}; policies act once a step, so the "
            "monitor would run every step, not this often: shorten --step"
        )
    if "periodic" in policies and config.period < config.step:
        raise BacktestInputError(
            f"{option('period')}: shorter than {option('step')}; policies act once a step, so the periodic "
            "policy would retrain every step, not this often: shorten --step"
        )


def _option(name: str) -> str:
    """The command-line option for a ReplayConfig field: label_delay → --label-delay."""
    return f"--{name.replace('_', '-')}"


def step_bounds(start: datetime, last: datetime, step: timedelta) -> list[datetime]:
    """start, start + step, …, up to the first bound after `last` (so every row falls in a step)."""
    count = int((last - start) / step) + 1
    return [start + step * i for i in range(count + 1)]


def _due(now: datetime, start: datetime, every: timedelta, step: timedelta) -> bool:
    """True at the step ending at or first past each multiple of `every` since `start`."""
    elapsed = now - start
    return elapsed // every > (elapsed - step) // every


def check_workdir(workdir: Path) -> None:
    """Refuse a directory the backtest did not make: its scratch directory is wiped at every run."""
    for above in workdir.parents:
        if above.exists():
            if not above.is_dir():
                raise BacktestInputError(f"--out {workdir.parent}: {above} is a file, not a directory")
            break
    if workdir.exists() and (
        not workdir.is_dir() or (any(workdir.iterdir()) and not (workdir / SCRATCH_MARKER).exists())
    ):
        raise BacktestInputError(
            f"{workdir} exists and was not made by a backtest, which would wipe it: choose another --out"
        )


def _fresh_workdir(workdir: Path) -> None:
    check_workdir(workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    (workdir / SCRATCH_MARKER).write_text("scratch state of `driftloop backtest`; the next run wipes it\n")


class _Player:
    """One policy's world: its database, registry, served predictions and actions."""

    def __init__(
        self, name: str, settings: Settings, spec: FeatureSpec, registry: Registry, engine: Engine,
        clock: SimClock, config: ReplayConfig, stream: Stream, rows: int,
    ) -> None:  # fmt: skip
        self.name, self.settings, self.spec, self.registry = name, settings, spec, registry
        self._engine = engine
        self.clock, self.config, self.stream = clock, config, stream
        self.trace = PolicyTrace(name, np.full(rows, np.nan), np.zeros(rows, dtype=int))
        self._models: dict[int, CatBoostRegressor] = {}
        self._pending: list[tuple[np.ndarray, list[str], np.ndarray]] = []  # (times, ids, actuals) per step
        self._start = clock.now
        self._loop: Loop | None = None
        if name == "drift":
            self._loop = Loop(
                settings=settings, spec=spec, sessions=registry.sessions, registry=registry,
                metrics=build_metrics(CollectorRegistry()), clock=clock, launcher=self._retrain,
                write_html=False,
            )  # fmt: skip

    @classmethod
    def create(
        cls, name: str, settings: Settings, spec: FeatureSpec, root: Path, clock: SimClock,
        config: ReplayConfig, stream: Stream,
    ) -> _Player:  # fmt: skip
        root.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{root / 'backtest.db'}"
        migrate(url)
        own = settings.model_copy(
            update={
                "database_url": url, "artifact_dir": root / "artifacts", "report_dir": root / "reports",
                "spool_dir": root / "spool", "webhook_url": None,
            }
        )  # fmt: skip
        engine = make_engine(url)
        registry = Registry(make_sessions(engine), ArtifactStore(own.artifact_dir))
        rows = len(stream.frame) - int((stream.times < pd.Timestamp(clock.now)).sum())
        return cls(name, own, spec, registry, engine, clock, config, stream, rows)

    def bootstrap(self, initial: pd.DataFrame, settings: Settings) -> ModelVersion:
        return bootstrap(
            registry=self.registry, spec=self.spec, params=TrainParams.from_settings(settings),
            holdout_fraction=settings.holdout_fraction, data=initial,
            source=f"{self.stream.source}, rows before {self.clock.now:%Y-%m-%d %H:%M}",
        ).version  # fmt: skip

    def adopt(self, source: Registry, v1: ModelVersion) -> None:
        """Start from the very same v1 as the first policy (trained once, not once per policy)."""
        row = self.registry.register(
            NewVersion(
                model=source.load(v1), reference=source.reference(v1), trigger=v1.trigger, metrics=v1.metrics,
                params=v1.params, train_rows=v1.train_rows, train_start=v1.train_start,
                train_end=v1.train_end, feature_importance=v1.feature_importance,
                data_sources=v1.data_sources,
            )
        )  # fmt: skip
        self.registry.promote(version=row.version, reason="backtest: the shared v1")

    def serve(self, rows: pd.DataFrame, ids: list[str], where: slice) -> None:
        """The champion predicts the step's rows; each is logged as the service logs a prediction."""
        if rows.empty:
            return
        champion = self.registry.champion()
        assert champion is not None
        model = self._models.get(champion.version)
        if model is None:
            model = self._models[champion.version] = self.registry.load(champion, spec=self.spec)
        predictions = predict(model, rows, self.spec)
        self.trace.predictions[where] = predictions
        self.trace.versions[where] = champion.version
        times = rows[self.stream.time_column]
        features = self.spec.coerce(rows).astype(object).where(rows[self.spec.feature_names].notna(), None)
        records: list[dict[str, Any]] = [
            {"id": i, "created_at": t.to_pydatetime(), "model_version": champion.version,
             "features": f, "prediction": float(p), "latency_ms": 0.0}
            for i, t, f, p in zip(ids, times, features.to_dict("records"), predictions, strict=True)
        ]  # fmt: skip
        with self.registry.sessions.begin() as session:
            session.execute(insert(PredictionLog), records)
        self._pending.append((ns_times(times), ids, rows[self.spec.target].to_numpy(dtype=float)))

    def release_labels(self, now: datetime) -> None:
        """Ground truth for every served row whose label delay has passed by `now`."""
        visible = ns_times(pd.Series([now - self.config.label_delay]))[0]
        records: list[dict[str, Any]] = []
        keep: list[tuple[np.ndarray, list[str], np.ndarray]] = []
        for times, ids, actuals in self._pending:
            ready = int(np.searchsorted(times, visible, side="right"))
            records += [
                {"prediction_id": ids[i], "actual": float(actuals[i]),
                 "received_at": pd.Timestamp(times[i], tz="UTC").to_pydatetime() + self.config.label_delay}
                for i in range(ready)
            ]  # fmt: skip
            if ready < len(ids):
                keep.append((times[ready:], ids[ready:], actuals[ready:]))
        self._pending = keep
        if records:
            with self.registry.sessions.begin() as session:
                session.execute(insert(GroundTruth), records)

    def act(self, now: datetime, *, monitor_due: bool) -> None:
        if self.name == "periodic" and _due(now, self._start, self.config.period, self.config.step):
            self._retrain(trigger=Trigger.schedule.value, reason="backtest: periodic policy")
        elif self.name == "oracle" and monitor_due and self._oracle_turn(now):
            since = self._last_labelled_change(now)  # train on the labels since it; all of them if unknown
            days = math.ceil((now - since).total_seconds() / 86400) if since else None
            self._retrain(
                trigger=Trigger.manual.value, reason="backtest: oracle policy", train_window_days=days
            )
        elif self._loop is not None and monitor_due:
            champion = self.registry.champion()
            outcome = self._loop.run_monitor(now)
            decision, result = outcome.decision, outcome.result
            self.trace.monitors.append(
                MonitorRecord(
                    at=now, verdict=outcome.verdict, breach=bool(decision and decision.breach),
                    retrain=bool(decision and decision.retrain),
                    drift_share=result.drift_share if result else None,
                    weighted_score=result.weighted_score if result else None,
                    mae=outcome.accuracy.mae if outcome.accuracy else None,
                    champion_mae=champion.metrics.get("val_mae") if champion else None,
                    baseline_mae=baseline_mae(champion) if champion else None,
                    reasons=decision.reasons if decision else outcome.notes,
                    champion_version=champion.version if champion else None,
                )
            )  # fmt: skip

    def _oracle_turn(self, now: datetime) -> bool:
        return self.stream.change_points is None or self._last_labelled_change(now) is not None

    def _last_labelled_change(self, now: datetime) -> datetime | None:
        """The latest known change whose labels can have arrived by `now`."""
        changes = self.stream.change_points or ()
        seen = [c for c in changes if c + self.config.label_delay <= now]
        return seen[-1] if seen else None

    def _retrain(self, *, trigger: str, reason: str, report_id: int | None = None, **overrides: Any) -> int:
        """A run in this process on the simulated clock; `overrides` change settings for this run only."""
        settings = self.settings.model_copy(update=overrides) if overrides else self.settings
        started = time.perf_counter()
        outcome = run_inline(
            settings=settings, spec=self.spec, registry=self.registry, trigger=trigger, reason=reason,
            report_id=report_id, clock=self.clock,
        )  # fmt: skip
        gate = outcome.gate
        self.trace.retrains.append(
            RetrainRecord(
                at=self.clock.now, trigger=trigger, status=outcome.status,
                seconds=time.perf_counter() - started, candidate_version=outcome.candidate_version,
                candidate_mae=gate.candidate_metrics.get("mae") if gate else None,
                champion_mae=gate.champion_metrics.get("mae") if gate else None, error=outcome.error,
            )
        )  # fmt: skip
        return outcome.run_id

    def close(self) -> None:
        self._engine.dispose()
