"""One monitor run's verdict: the windows, Evidently's measures, the policy's decision, the stored report and
the gauges. What follows a verdict (the breach alert, a retrain) is the loop's (`monitor.jobs`)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import uuid4

import pandas as pd
from catboost import CatBoostRegressor
from sqlalchemy.orm import Session, sessionmaker

from core.figures import figure
from core.metrics import Metrics
from core.registry import Registry, baseline_mae
from core.schema import DriftReport, ModelVersion
from core.settings import Settings
from core.spec import FeatureSpec
from monitor import LOOP_LOGGER
from monitor.pages import prune_pages
from monitor.policy import Decision, History, Observation, PolicyConfig, decide, load_history
from monitor.window import Window, load_unseen_labelled, load_window
from monitor.workspace import EvidentlyWorkspace
from retrain.train import PREDICTION, predict

if TYPE_CHECKING:
    from monitor.report import Accuracy, DriftResult

log = logging.getLogger(LOOP_LOGGER)


@dataclass(frozen=True, slots=True)
class MonitorOutcome:
    verdict: str  # insufficient | ok | breach
    report_id: int | None
    decision: Decision | None
    result: DriftResult | None  # None when the drift window was too short to judge
    retrain_run_id: int | None = None
    notes: tuple[str, ...] = ()
    accuracy: Accuracy | None = None  # the accuracy window's, judged even when the drift window is short

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "report_id": self.report_id,
            "breach": bool(self.decision and self.decision.breach),
            "retrain": bool(self.decision and self.decision.retrain),
            "reasons": list(self.decision.reasons) if self.decision else list(self.notes),
            "held_by": self.decision.held_by if self.decision else None,
            "soft": bool(self.decision and self.decision.soft),
            "retrain_run_id": self.retrain_run_id,
            "drift": self.result.to_json() if self.result else None,
            "accuracy": self.accuracy.to_json() if self.accuracy else None,
            "notes": list(self.notes),
        }


def log_outcome(outcome: MonitorOutcome) -> None:
    """One log line a monitor run, so an operator reading the service's log sees verdicts and actions."""
    decision = outcome.decision
    if decision is None or outcome.verdict == "insufficient":
        reasons = decision.reasons if decision else outcome.notes
        log.info("monitor run: report #%s, no verdict: %s", outcome.report_id, "; ".join(reasons))
        return
    figures = []
    if outcome.result is not None:
        figures.append(f"drift share {outcome.result.drift_share:.2f}")
    if outcome.accuracy is not None:
        figures.append(f"MAE {figure(outcome.accuracy.mae)}")
    measured = f" ({', '.join(figures)})" if figures else ""
    if not decision.breach:
        log.info("monitor run: report #%s, ok%s", outcome.report_id, measured)
        return
    if outcome.retrain_run_id is not None:
        action = f"retrain run {outcome.retrain_run_id} launched (trigger: {decision.trigger})"
    else:
        action = f"no retraining: {decision.held_by or '; '.join(outcome.notes)}"
    log.warning(
        "monitor run: report #%s, BREACH (%d in a row)%s: %s; %s",
        outcome.report_id, decision.consecutive, measured, "; ".join(decision.reasons), action,
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one run measured and decided for `champion`, stored as report `report_id`."""

    champion: ModelVersion
    report_id: int
    observation: Observation
    decision: Decision
    history: History
    result: DriftResult | None
    accuracy: Accuracy | None


@dataclass(frozen=True, slots=True)
class _Measures:
    window: Window
    labelled_rows: int
    history: History
    result: DriftResult | None
    accuracy: Accuracy | None
    html_path: Path | None


@dataclass(slots=True)
class Monitor:
    """Judges the champion's traffic; `judge` stores the report and sets the gauges."""

    settings: Settings
    spec: FeatureSpec
    sessions: sessionmaker[Session]
    registry: Registry
    metrics: Metrics
    # The Evidently page of each report, pruning old ones (DRIFTLOOP_REPORT_HTML_KEEP), and the Evidently
    # workspace (DRIFTLOOP_EVIDENTLY_WORKSPACE); the backtest, whose time is simulated, skips all three.
    write_html: bool = True
    _artifacts: tuple[int, CatBoostRegressor, pd.DataFrame] | None = field(default=None, init=False)
    _workspace: EvidentlyWorkspace | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        s = self.settings
        if self.write_html and s.evidently_workspace is not None:
            self._workspace = EvidentlyWorkspace(
                s.evidently_workspace, self.spec, keep=s.evidently_workspace_keep
            )

    def judge(self, champion: ModelVersion, now: datetime) -> Verdict:
        started = time.perf_counter()
        config = PolicyConfig.from_settings(self.settings)
        measures = self._measure(champion, now, config)
        result, accuracy = measures.result, measures.accuracy
        observation = Observation(
            at=now,
            rows=measures.window.rows,
            labelled_rows=measures.labelled_rows,
            drift_share=result.drift_share if result else None,
            weighted_score=result.weighted_score if result else None,
            mae=accuracy.mae if accuracy else None,
            champion_mae=champion.metrics.get("val_mae"),
            drifted_features=tuple(result.drifted()) if result else (),
            baseline_mae=baseline_mae(champion),
        )
        decision = decide(observation, measures.history, config)
        self.metrics.drift_breach.set(int(decision.breach))
        report_id = self._store_report(
            champion, measures, observation, decision, now, seconds=time.perf_counter() - started
        )
        self._prune_pages()
        if self._workspace is not None and result is not None:
            self._workspace.add(
                result.snapshots,
                report_id=report_id,
                champion_version=champion.version,
                verdict=decision.verdict,
            )
        self._publish(result, accuracy, observation)
        return Verdict(champion, report_id, observation, decision, measures.history, result, accuracy)

    def _measure(self, champion: ModelVersion, now: datetime, config: PolicyConfig) -> _Measures:
        s = self.settings
        # Read and checked whatever the window holds: a champion that does not fit the spec, or whose files
        # are damaged, is refused by name even with no answers to judge. Replicas under a changed spec are
        # not ready and answer nothing, so "window has 0 rows" would hide the reason run after run.
        model, reference = self._artifacts_for(champion)
        with self.sessions() as session:
            window = load_window(
                session, self.spec, max_rows=s.window_rows, seconds=s.window_seconds, now=now,
                model_version=champion.version,
            )  # fmt: skip
            # Labels arrive late, so the newest labelled rows are older than the drift window's: accuracy is
            # measured on its own window, the newest `accuracy_window_rows` labelled rows the champion has
            # not trained on, as it answers them (see load_unseen_labelled).
            labelled = load_unseen_labelled(
                session, self.spec, max_rows=s.accuracy_window_rows, after=champion.data_end, now=now
            )
            history = load_history(session, champion_version=champion.version, now=now)
        result: DriftResult | None = None
        accuracy: Accuracy | None = None
        html_path: Path | None = None
        judged = window.rows >= config.min_window_rows
        if judged or labelled.rows >= config.min_labelled_rows:
            # Imported here, not at the top: Evidently takes seconds to import, and API replicas
            # (--no-scheduler) never monitor, so they should not pay for it at start-up.
            from monitor.report import compute_accuracy, compute_drift

            if labelled.rows:  # scored as the champion answers them, whichever model answered them then
                labelled.frame[PREDICTION] = predict(model, labelled.frame, self.spec)
            if judged:
                if self.write_html and s.report_html_keep > 0:
                    name = f"report-{now:%Y%m%dT%H%M%S}-{uuid4().hex[:6]}-v{champion.version}.html"
                    html_path = s.report_dir / name
                result = compute_drift(
                    reference, window.frame, self.spec,
                    importance=champion.feature_importance, max_rows=s.evidently_max_rows,
                    seed=s.sample_seed, stattest_threshold=s.drift_stattest_threshold, html_path=html_path,
                    labelled=labelled.frame,
                )  # fmt: skip
                accuracy = result.accuracy
            else:  # too few of the champion's answers to judge drift; its labels are judged all the same
                accuracy = compute_accuracy(
                    reference, labelled.frame, self.spec, max_rows=s.evidently_max_rows, seed=s.sample_seed
                )
        return _Measures(window, labelled.rows, history, result, accuracy, html_path)

    def _artifacts_for(self, champion: ModelVersion) -> tuple[CatBoostRegressor, pd.DataFrame]:
        """The champion's model and reference snapshot, read once per version. A champion that does not fit
        the spec (a feature added to the file since it was trained) is refused first, by name
        (FeatureMismatchError), as /ready, bootstrap and a retrain run refuse it, rather than as a column
        missing from the report."""
        if self._artifacts is None or self._artifacts[0] != champion.version:
            model = self.registry.load(champion, spec=self.spec)
            self._artifacts = (champion.version, model, self.registry.reference(champion, spec=self.spec))
        return self._artifacts[1], self._artifacts[2]

    def _store_report(
        self,
        champion: ModelVersion,
        measures: _Measures,
        obs: Observation,
        decision: Decision,
        now: datetime,
        *,
        seconds: float,
    ) -> int:
        """The drift_report row; `seconds`: window query, Evidently and the decision, until now."""
        result, accuracy, window, html_path = (
            measures.result, measures.accuracy, measures.window, measures.html_path
        )  # fmt: skip
        payload = result.to_json() if result else {}
        figures = accuracy.to_json() if accuracy else {}
        row = DriftReport(
            created_at=now,
            champion_version=champion.version,
            window_start=window.start,
            window_end=window.end,
            rows=window.rows,
            labelled_rows=obs.labelled_rows,
            sampled_rows=result.sampled_rows if result else 0,
            features=payload.get("features", {}),
            drift_share=result.drift_share if result else None,
            weighted_drift_score=result.weighted_score if result else None,
            prediction_drift=payload.get("prediction") or {},
            # NaN (a MAPE with no non-zero actual) is stored as null: PostgreSQL keeps a NaN, and the report's
            # JSON could not carry it
            mae=figures.get("mae"),
            rmse=figures.get("rmse"),
            mape=figures.get("mape"),
            mean_error=figures.get("mean_error"),
            champion_mae=obs.champion_mae,
            breach=decision.breach,
            reasons=list(decision.reasons),
            decision=decision.as_dict(),
            html_path=str(html_path) if html_path and html_path.exists() else None,
            duration_s=round(seconds, 3),
        )
        with self.sessions.begin() as session:
            session.add(row)
            session.flush()
            return row.id

    def _prune_pages(self) -> None:
        """Keep the newest DRIFTLOOP_REPORT_HTML_KEEP pages; a failure is logged, the run goes on."""
        if not self.write_html:
            return
        s = self.settings
        try:
            pruned = prune_pages(self.sessions, report_dir=s.report_dir, keep=s.report_html_keep)
        except Exception:
            log.exception("could not prune the report pages")
            return
        if pruned:
            log.info(
                "pruned the pages of reports %s (DRIFTLOOP_REPORT_HTML_KEEP=%d)", pruned, s.report_html_keep
            )

    def _publish(self, result: DriftResult | None, accuracy: Accuracy | None, obs: Observation) -> None:
        m = self.metrics
        nan = float("nan")
        m.window_rows.set(obs.rows)
        m.window_labelled_rows.set(obs.labelled_rows)
        # The accuracy gauges below are set from as few as one labelled row; WindowMaeHigh compares the rows
        # with this, so it does not alert on an MAE the policy would not judge.
        m.min_labelled_rows.set(self.settings.min_labelled_rows)
        m.mae_degradation_ratio.set(self.settings.mae_degradation_ratio)  # WindowMaeHigh's, as the policy's
        m.champion_validation_mae.set(nan if obs.champion_mae is None else obs.champion_mae)
        m.champion_baseline_mae.set(nan if obs.baseline_mae is None else obs.baseline_mae)
        # A run without a drift verdict (too few rows, as after every swap) sets the drift gauges to NaN, and
        # one without labels to judge the accuracy ones: the last window's figures, another champion's
        # perhaps, must not stand for this run's (WindowMaeHigh would compare them with this champion).
        if result is not None:
            m.drift_share.set(result.drift_share)
            m.drift_weighted_score.set(result.weighted_score)
            for f in result.features:
                m.feature_drift_score.labels(feature=f.feature).set(f.score)
                m.feature_drift_detected.labels(feature=f.feature).set(int(f.detected))
            m.prediction_drift_score.set(result.prediction.score if result.prediction else nan)
        else:
            for gauge in (m.drift_share, m.drift_weighted_score, m.prediction_drift_score):
                gauge.set(nan)
            for feature in self.spec.feature_names:
                m.feature_drift_score.labels(feature=feature).set(nan)
                m.feature_drift_detected.labels(feature=feature).set(nan)
        m.window_mae.set(accuracy.mae if accuracy else nan)
        m.window_rmse.set(accuracy.rmse if accuracy else nan)
        m.window_mape.set(accuracy.mape if accuracy else nan)
        m.window_mean_error.set(accuracy.mean_error if accuracy else nan)
