"""A retrain run's work: assemble → split → train → validate (gate) → refit → register → promote or reject.

Promotion is the last step and one transaction, so a crash or kill anywhere leaves the previous champion
serving. The run's row is claimed first (retrain/runs.py); the live loop does the work in a child process
(retrain/process.py), the backtest in its own process on a simulated clock (`run_inline`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
from catboost import CatBoostRegressor
from sqlalchemy import update

from core.db import Clock, make_engine, make_sessions, utcnow, wait_out_outage
from core.metrics import Metrics
from core.registry import ArtifactStore, ChampionChanged, NewVersion, Registry, baseline_mae
from core.schema import ModelStatus, ModelVersion, RetrainRun, RunStatus
from core.settings import Settings
from core.spec import FeatureSpec
from retrain import RETRAIN_LOGGER
from retrain.dataset import (
    EVENT_TIME,
    HoldoutBasis,
    TrainingData,
    assemble,
    candidate_reference,
    holdout,
    sample_weights,
)
from retrain.gate import GateResult, evaluate_gate, sanity_reasons
from retrain.runs import NoChampion, observe_run, start_run
from retrain.train import MIN_TRAIN_ROWS, TrainParams, feature_importance, predict, train_model

log = logging.getLogger(RETRAIN_LOGGER)


class RunAborted(RuntimeError):
    """The run's row stopped being `running` under it (timed out or recovered by another process)."""


@dataclass(frozen=True, slots=True)
class RunOutcome:
    run_id: int
    status: str
    candidate_version: int | None = None
    gate: GateResult | None = None
    error: str | None = None


def execute_run(
    run_id: int,
    *,
    settings: Settings,
    spec: FeatureSpec,
    registry: Registry | None = None,
    metrics: Metrics | None = None,
    clock: Clock = utcnow,
) -> RunOutcome:
    """Do run `run_id` in this process and record its outcome on the run row.

    A failure of the run itself is recorded (status failed, error text) and returned, not raised; LookupError
    or RunAborted mean the row is missing or not running, and it is left alone. Without `registry`, one is
    built from settings (database_url, artifact_dir) and disposed afterwards.
    """
    engine = None
    if registry is None:
        engine = make_engine(settings.database_url)
        registry = Registry(make_sessions(engine), ArtifactStore(settings.artifact_dir))
    try:
        if metrics is not None:
            metrics.retrain_running.set(1)
        outcome = _Run(run_id, settings=settings, spec=spec, registry=registry, clock=clock).execute()
        if metrics is not None:
            observe_run(metrics, registry.sessions, run_id)
        return outcome
    finally:
        if engine is not None:
            engine.dispose()


class _Run:
    def __init__(
        self, run_id: int, *, settings: Settings, spec: FeatureSpec, registry: Registry, clock: Clock
    ) -> None:
        self.run_id = run_id
        self.settings = settings
        self.spec = spec
        self.registry = registry
        self.sessions = registry.sessions
        self.clock = clock
        self.steps: dict[str, dict[str, Any]] = {}
        self.candidate_version: int | None = None

    def execute(self) -> RunOutcome:
        with self.sessions() as session:
            run = session.get(RetrainRun, self.run_id)
        if run is None:
            raise LookupError(f"retrain run {self.run_id} does not exist")
        if run.status != RunStatus.running:
            raise RunAborted(f"retrain run {self.run_id} is {run.status}, not running")
        try:
            return self._work(run)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.exception("retrain run %s failed", self.run_id)
            try:
                self._reject_undecided(error)
            except Exception:
                log.exception("retrain run %s: could not reject its candidate", self.run_id)
            self._finish(status=RunStatus.failed, error=error)
            return RunOutcome(self.run_id, RunStatus.failed.value, self.candidate_version, error=error)

    def _work(self, run: RetrainRun) -> RunOutcome:
        champion = self.registry.champion()
        if champion is None:
            raise NoChampion()
        # Before any work: a champion that does not fit the spec (a feature added to the file, say) fails the
        # run naming the difference, as /ready and bootstrap do; a damaged artifact fails it here too.
        champion_model = self.registry.load(champion, spec=self.spec)
        with self._step("assemble"):
            now = self.clock()
            data = assemble(
                sessions=self.sessions,
                registry=self.registry,
                champion=champion,
                spec=self.spec,
                window_days=self.settings.train_window_days,
                now=now,
            )
            train, held, basis = holdout(
                data,
                self.spec,
                fraction=self.settings.holdout_fraction,
                seen_until=champion.data_end,
            )
            if len(train) < MIN_TRAIN_ROWS or len(held) == 0:
                days = self.settings.train_window_days
                raise RuntimeError(_too_little(len(train), len(held), data, window_days=days, now=now))
        with self._step("train"):
            params = TrainParams.from_settings(self.settings)
            model = self._train(train, params)
        with self._step("validate"):
            gate = evaluate_gate(
                candidate=model,
                champion=champion_model,
                holdout=held,
                spec=self.spec,
                margin=self.settings.gate_margin,
            )
            metrics = jsonable(_version_metrics(gate, baseline_mae(champion)))
        fitted = train
        if gate.passed and self.settings.refit:
            with self._step("refit"):
                model, fitted, metrics["refit"] = self._refit(model, data, held, params)
        with self._step("register"):
            version = self.registry.register(
                self._new_version(run, champion, model, params, data, fitted, held, basis, metrics)
            )
            self.candidate_version = version.version
            self._save(candidate_version=version.version)
        with self._step("promote"):
            status = self._decide(version.version, champion.version, gate)
        self._finish(status=status, metrics=metrics)
        return RunOutcome(self.run_id, status.value, version.version, gate)

    def _refit(
        self, validated: CatBoostRegressor, data: TrainingData, held: pd.DataFrame, params: TrainParams
    ) -> tuple[CatBoostRegressor, pd.DataFrame, dict[str, Any]]:
        """The same training on every row, holdout included: the newest labels are the ones the holdout
        kept back, and after a change in the market they are the ones that matter most. The gate's figures
        stay those of the validated model (an honest out-of-sample estimate); the refit model must still
        pass the sanity checks on the holdout, else the validated model is the one registered.
        """
        frame = data.frame
        refit = self._train(frame, params)
        checks = sanity_reasons(
            predict(refit, held, self.spec, raw=True), held[self.spec.target], self.spec,
            champion=predict(validated, held, self.spec, raw=True),
        )  # fmt: skip
        problems = [reason for reason in checks.values() if reason]
        if problems:
            log.warning(
                "retrain run %s: refit model failed sanity checks, keeping the validated one: %s",
                self.run_id,
                "; ".join(problems),
            )
            return validated, frame.drop(index=held.index), {"used": False, "reasons": problems}
        return refit, frame, {"used": True, "rows": len(frame)}

    def _train(self, frame: pd.DataFrame, params: TrainParams) -> CatBoostRegressor:
        weights = sample_weights(
            frame,
            new_share=self.settings.new_data_weight_share,
            half_life_days=self.settings.train_half_life_days,
        )
        weighted = len(frame) if weights is None else int(np.count_nonzero(weights))
        if weighted < MIN_TRAIN_ROWS:  # only a half-life gives rows no weight: theirs underflows to 0
            raise RuntimeError(
                f"only {weighted} of {len(frame)} training rows carry any weight under "
                f"DRIFTLOOP_TRAIN_HALF_LIFE_DAYS={self.settings.train_half_life_days} (a row's weight "
                f"halves with each half-life it is older than the newest row); at least {MIN_TRAIN_ROWS} "
                "are needed"
            )
        return train_model(frame, self.spec, params, sample_weight=weights)

    def _decide(self, version: int, parent: int, gate: GateResult) -> RunStatus:
        current = self.registry.champion()
        if current is None or current.version != parent:
            now_serving = current.version if current else None
            self.registry.reject(
                version=version, reason=f"champion changed during the run (v{parent} → v{now_serving})"
            )
            return RunStatus.rejected
        if not gate.passed:
            self.registry.reject(version=version, reason="; ".join(gate.reasons))
            return RunStatus.rejected
        cand, champ = gate.candidate_metrics["mae"], gate.champion_metrics["mae"]
        try:  # the champion may change between the look above and the promotion (a rollback, say)
            self.registry.promote(
                version=version,
                reason=f"retrain run {self.run_id}: holdout MAE {cand:.6g} vs champion {champ:.6g}",
                replaces=parent,
            )
        except ChampionChanged as exc:
            self.registry.reject(version=version, reason=f"champion changed during the run: {exc}")
            return RunStatus.rejected
        return RunStatus.promoted

    def _new_version(
        self,
        run: RetrainRun,
        champion: ModelVersion,
        model: CatBoostRegressor,
        params: TrainParams,
        data: TrainingData,
        train: pd.DataFrame,
        held: pd.DataFrame,
        basis: HoldoutBasis,
        metrics: dict[str, Any],
    ) -> NewVersion:
        times = train[EVENT_TIME]
        return NewVersion(
            model=model,
            reference=candidate_reference(model, data, self.spec),
            trigger=run.trigger,
            metrics=metrics,
            params=params.as_dict(),
            train_rows=len(train),
            train_start=times.min().to_pydatetime(),
            train_end=times.max().to_pydatetime(),
            feature_importance=feature_importance(model, self.spec),
            data_sources={
                "rows": dict(data.sources),
                "reference_version": champion.version,
                "window_days": self.settings.train_window_days,
                "start": data.start.isoformat() if data.start else None,
                "end": data.end.isoformat() if data.end else None,
                "train_rows": len(train),
                "holdout_rows": len(held),
                "new_data_weight_share": self.settings.new_data_weight_share,
                "half_life_days": self.settings.train_half_life_days,
                "holdout_basis": basis,
                "refit": bool(metrics.get("refit", {}).get("used")),
            },
            parent_version=champion.version,
            report_id=run.report_id,
            retrain_run_id=self.run_id,
            note=run.reason,
        )

    @contextmanager
    def _step(self, name: str) -> Iterator[None]:
        entry: dict[str, Any] = {"started_at": self.clock().isoformat(), "seconds": None}
        self.steps[name] = entry
        self._save(steps=dict(self.steps))
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.steps[name] = {**entry, "seconds": round(time.perf_counter() - t0, 3)}
        self._save(steps=dict(self.steps))

    def _save(self, **values: Any) -> None:
        """Update our row while it is still running; if it is not, someone took the run away: stop.

        A database that is away is waited for, as long as the scheduler leader would wait for a heartbeat
        (3 lease TTLs): a short outage at a step's end must not fail a run that trained for an hour."""

        def update_row() -> int:
            with self.sessions.begin() as session:
                result = session.execute(
                    update(RetrainRun)
                    .where(RetrainRun.id == self.run_id, RetrainRun.status == RunStatus.running)
                    .values(**values)
                )
                return int(result.rowcount)  # type: ignore[attr-defined]

        patience = 3 * self.settings.lease_ttl_s
        if not wait_out_outage(update_row, patience_s=patience, log=log, what=f"retrain run {self.run_id}"):
            raise RunAborted(f"retrain run {self.run_id} is no longer running")

    def _finish(self, *, status: RunStatus, **values: Any) -> None:
        try:
            self._save(
                status=status,
                candidate_version=self.candidate_version,
                steps=dict(self.steps),
                finished_at=self.clock(),
                **values,
            )
        except RunAborted:
            log.warning(
                "retrain run %s was finished by another process; outcome %s not recorded", self.run_id, status
            )

    def _reject_undecided(self, error: str) -> None:
        """A candidate registered by a run that then failed must not stay a candidate."""
        if self.candidate_version is None:
            return
        row = self.registry.get(self.candidate_version)
        if row is not None and row.status == ModelStatus.candidate:
            self.registry.reject(
                version=self.candidate_version, reason=f"retrain run {self.run_id} failed: {error}"
            )


def run_inline(
    *,
    settings: Settings,
    spec: FeatureSpec,
    registry: Registry,
    trigger: str,
    reason: str = "",
    report_id: int | None = None,
    clock: Clock = utcnow,
) -> RunOutcome:
    """Claim the single-flight slot and do the run in this process, on `clock`'s time.

    For callers that own their process and their time (the backtest's simulated clock); the live loop
    uses `launch`, which keeps CatBoost out of the serving interpreter.
    """
    run_id = start_run(registry.sessions, trigger=trigger, reason=reason, report_id=report_id, now=clock())
    return execute_run(run_id, settings=settings, spec=spec, registry=registry, clock=clock)


def _too_little(train: int, held: int, data: TrainingData, *, window_days: int | None, now: datetime) -> str:
    """Why a run cannot train: the split, the rows each source gave, and the window that bounded them."""
    rows = ", ".join(f"{count} {name}" for name, count in data.sources.items())
    window = ""
    if window_days is not None:
        since = now - timedelta(days=window_days)
        window = f" dated since {since:%Y-%m-%d %H:%M} UTC (DRIFTLOOP_TRAIN_WINDOW_DAYS={window_days})"
    return (
        f"too little data: {train} train and {held} holdout rows (at least {MIN_TRAIN_ROWS} train rows are "
        f"needed), of {rows} row(s){window}"
    )


def _version_metrics(gate: GateResult, champion_baseline: float | None) -> dict[str, Any]:
    own = gate.candidate_metrics.get("mae")
    known = [m for m in (own, champion_baseline) if m is not None and math.isfinite(m)]
    return {
        **{f"val_{k}": v for k, v in gate.candidate_metrics.items()},
        "baseline_mae": min(known) if known else None,
        **{f"champion_val_{k}": v for k, v in gate.champion_metrics.items()},
        "gate": gate.as_dict(),
    }


def jsonable(value: Any) -> Any:
    """NaN and ±inf become None: PostgreSQL's JSON rejects them."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
