"""The drift policy: one pure function from a monitor observation and recent history to a decision.

`decide` is pure; `load_history` is the one function here that reads the database (for `History`).

Rules, in order:

1. A drift window with fewer than `min_window_rows` rows gets no drift verdict. Its report is
   "insufficient" unless the accuracy rule below breaches: labels arrive on their own window, so a new
   champion (whose drift window starts empty at its promotion) or a quiet service is still judged on them.
   When the labels are judged and within policy the report stays "insufficient" (drift was not judged)
   but says so (`labels_within_policy`): it ends a run of accuracy breaches, not one of drift breaches.
2. A window breaches when any of these holds (each adds one reason sentence with the figures):
   drift share ≥ `drift_share_threshold`; weighted drift score ≥ `weighted_drift_threshold`;
   at least `min_labelled_rows` labelled rows and MAE > champion MAE × `mae_degradation_ratio`;
   or, with `lineage_baseline`, MAE > baseline MAE × `mae_degradation_ratio`, where the baseline is the
   best validation MAE of the champion's line of models (it and the champions it was trained from).
   The second yardstick catches a champion promoted in the middle of a change: its own validation MAE
   was measured on the change and is lax, while its line has shown what this data allows.
   When accuracy and drift both breach the trigger is "accuracy": a measured loss of accuracy is
   stronger evidence than a shift in the inputs, which a model may well tolerate.
3. A breach launches retraining only when every gate is open, checked in this order (the first
   closed gate is reported in `held_by`):
   - `auto_retrain` ("alert-only mode");
   - hysteresis: at least `consecutive_breaches` breaches in a row ("hysteresis 1/2"); for an accuracy
     breach the row starts after the newest report whose labels were within policy;
   - cooldown since the last run started ("cooldown: 1234 s left");
   - daily budget ("daily budget 4/4");
   - backoff, for a soft breach (drift only, or the baseline alone: MAE within the champion's own
     yardstick): after n runs in a row launched by soft breaches since the monitor last found the traffic
     within policy (an "ok" verdict), the next one waits `retrain_cooldown_s` × 2ⁿ since the last run
     ("backoff after 2 soft-breach runs in a row …"; no backoff with a cooldown of 0). A soft breach
     that outlives its retrains is one that retraining does not quickly cure (inputs that moved without
     costing accuracy, a baseline this data no longer allows), so it keeps alerting but spends compute
     ever more rarely. Any other run (one a hard breach launched, an operator's, a scheduled one) and
     any "ok" report start the count afresh;
   - no new labels: when the latest run that did not fail was for this champion and the gate rejected it,
     and no label has arrived since it started, a run would train on the same rows and be rejected again
     ("no new labels since retrain run 12 was rejected …"), so it waits for one;
   - last, a drift-only breach waits for `min_labelled_rows` labelled rows from the drifted traffic,
     counted from the first breach of the streak ("waiting for labels: 37/200 …"): a candidate trained
     before the moved inputs have labels has nothing new to learn from.
   A hard breach retrains once the first four and the no-new-labels gate are open.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.figures import figure
from core.schema import (
    DriftReport,
    GroundTruth,
    LabelledRow,
    PredictionLog,
    RetrainRun,
    RunStatus,
    Trigger,
)

Verdict = Literal["insufficient", "ok", "breach"]
PolicyTrigger = Literal["drift", "accuracy"]


class _PolicySettings(Protocol):
    drift_share_threshold: float
    weighted_drift_threshold: float
    mae_degradation_ratio: float
    min_labelled_rows: int
    min_window_rows: int
    consecutive_breaches: int
    retrain_cooldown_s: int
    max_retrains_per_day: int
    auto_retrain: bool
    lineage_baseline: bool


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    drift_share_threshold: float = 0.5
    weighted_drift_threshold: float = 0.3
    mae_degradation_ratio: float = 1.25
    min_labelled_rows: int = 200
    min_window_rows: int = 500
    consecutive_breaches: int = 2
    retrain_cooldown_s: int = 3600
    max_retrains_per_day: int = 4
    auto_retrain: bool = True
    lineage_baseline: bool = True

    @classmethod
    def from_settings(cls, settings: _PolicySettings) -> PolicyConfig:
        return cls(
            drift_share_threshold=settings.drift_share_threshold,
            weighted_drift_threshold=settings.weighted_drift_threshold,
            mae_degradation_ratio=settings.mae_degradation_ratio,
            min_labelled_rows=settings.min_labelled_rows,
            min_window_rows=settings.min_window_rows,
            consecutive_breaches=settings.consecutive_breaches,
            retrain_cooldown_s=settings.retrain_cooldown_s,
            max_retrains_per_day=settings.max_retrains_per_day,
            auto_retrain=settings.auto_retrain,
            lineage_baseline=settings.lineage_baseline,
        )


@dataclass(frozen=True, slots=True)
class Observation:
    """What one monitor run measured over its window. None: not measured (e.g. no labels yet)."""

    at: datetime
    rows: int
    labelled_rows: int
    drift_share: float | None
    weighted_score: float | None
    mae: float | None
    champion_mae: float | None
    drifted_features: tuple[str, ...] = ()
    baseline_mae: float | None = None  # best validation MAE of the champion's line; None: its own


@dataclass(frozen=True, slots=True)
class History:
    """What happened before this observation: the breach streak is the champion's, the runs any champion's."""

    previous_breaches: int  # breaching reports in a row immediately before this one
    last_retrain_at: datetime | None  # start of the most recent retrain run, any trigger or outcome
    retrains_last_24h: int
    streak_start_report_id: int | None = None  # first report of that run of breaches; None if there is none
    # Labelled rows (predictions with their actual, and ingested rows) dated at or after the streak's first
    # breach: what a drift retrain would have to learn the moved inputs from.
    labelled_since_streak: int = 0
    # Retrain runs in a row, newest first, that soft breaches launched (see the module docstring).
    soft_runs: int = 0
    # The latest run, when the gate rejected it for this champion and no label has arrived since it began.
    rejected_run_without_new_labels: int | None = None
    # Breaches of that run newer than its newest "insufficient" report whose labels were within policy;
    # None when it holds no such report. An accuracy breach counts only these (see the module docstring).
    breaches_since_labels_ok: int | None = None


NO_HISTORY = History(previous_breaches=0, last_retrain_at=None, retrains_last_24h=0)


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    breach: bool
    retrain: bool
    trigger: PolicyTrigger | None
    reasons: tuple[str, ...]
    held_by: str | None  # why a breach did not retrain; None when it did, or when there was no breach
    consecutive: int  # breaches in a row including this one; 0 when this is not a breach
    soft: bool = False  # a breach of drift alone or of the baseline alone (see the module docstring)
    # "insufficient" only: the drift window was too short, but the labels were judged and within policy.
    labels_within_policy: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, for drift_report.decision."""
        out = asdict(self)
        out["reasons"] = list(self.reasons)
        return out


def decide(obs: Observation, history: History, config: PolicyConfig) -> Decision:
    short = obs.rows < config.min_window_rows
    drift = [] if short else _drift_reasons(obs, config)
    accuracy, baseline_only = _accuracy_reason(obs, config)
    if short and not accuracy:
        reason = f"window has {obs.rows} rows, fewer than the {config.min_window_rows} needed for a verdict"
        judged = _judged_maes(obs, config)  # and within policy, since the accuracy rule gave no reason
        within = () if judged is None else (f"{_labels_lead(obs, judged[0])} is within policy",)
        return Decision(
            verdict="insufficient",
            breach=False,
            retrain=False,
            trigger=None,
            reasons=(reason, *within),
            held_by=None,
            consecutive=0,
            labels_within_policy=judged is not None,
        )
    reasons = (*drift, *((accuracy,) if accuracy else ()))
    if not reasons:
        return Decision(
            verdict="ok", breach=False, retrain=False, trigger=None, reasons=(), held_by=None, consecutive=0
        )
    trigger: PolicyTrigger = "accuracy" if accuracy else "drift"
    previous = history.previous_breaches
    if trigger == "accuracy" and history.breaches_since_labels_ok is not None:
        previous = history.breaches_since_labels_ok
    consecutive = previous + 1
    soft = trigger == "drift" or baseline_only
    held_by = _held_by(obs.at, consecutive, history, config, drift_only=trigger == "drift", soft=soft)
    return Decision(
        verdict="breach",
        breach=True,
        retrain=held_by is None,
        trigger=trigger,
        reasons=reasons,
        held_by=held_by,
        consecutive=consecutive,
        soft=soft,
    )


def _drift_reasons(obs: Observation, config: PolicyConfig) -> list[str]:
    reasons = []
    if obs.drift_share is not None and obs.drift_share >= config.drift_share_threshold:
        drifted = f" (drifted: {', '.join(obs.drifted_features)})" if obs.drifted_features else ""
        reasons.append(
            f"drift share {obs.drift_share:.3f} ≥ threshold {config.drift_share_threshold:.3f}{drifted}"
        )
    if obs.weighted_score is not None and obs.weighted_score >= config.weighted_drift_threshold:
        reasons.append(
            f"weighted drift score {obs.weighted_score:.3f} ≥ threshold {config.weighted_drift_threshold:.3f}"
        )
    return reasons


def _judged_maes(obs: Observation, config: PolicyConfig) -> tuple[float, float] | None:
    """(MAE, champion MAE) when the accuracy rule can judge this observation (enough labelled rows and
    both MAEs); None when it cannot."""
    if obs.mae is None or obs.champion_mae is None or obs.labelled_rows < config.min_labelled_rows:
        return None
    return obs.mae, obs.champion_mae


def _labels_lead(obs: Observation, mae: float) -> str:
    return f"MAE {figure(mae)} on {obs.labelled_rows} labelled rows"


def _accuracy_reason(obs: Observation, config: PolicyConfig) -> tuple[str | None, bool]:
    """(reason, baseline_only): the reason names the tightest yardstick the MAE is over; baseline_only
    when it is within the champion's own."""
    if (judged := _judged_maes(obs, config)) is None:
        return None, False
    mae, champion_mae = judged
    ratio = config.mae_degradation_ratio
    own = champion_mae * ratio
    lead = _labels_lead(obs, mae)
    baseline = obs.baseline_mae if config.lineage_baseline else None
    if baseline is not None and baseline < champion_mae and mae > baseline * ratio:
        return (
            f"{lead} > {figure(baseline * ratio)} (baseline MAE {figure(baseline)}, the best validation MAE "
            f"of this model line, × {ratio:g}; champion's own validation MAE {figure(champion_mae)})"
        ), mae <= own
    if mae <= own:
        return None, False
    return f"{lead} > {figure(own)} (champion MAE {figure(champion_mae)} × {ratio:g})", False


def _held_by(
    at: datetime,
    consecutive: int,
    history: History,
    config: PolicyConfig,
    *,
    drift_only: bool,
    soft: bool,
) -> str | None:
    if not config.auto_retrain:
        return "alert-only mode"
    if consecutive < config.consecutive_breaches:
        return f"hysteresis {consecutive}/{config.consecutive_breaches}"
    if history.last_retrain_at is not None:
        left = config.retrain_cooldown_s - (at - history.last_retrain_at).total_seconds()
        if left > 0:
            return f"cooldown: {math.ceil(left)} s left"
    if history.retrains_last_24h >= config.max_retrains_per_day:
        return f"daily budget {history.retrains_last_24h}/{config.max_retrains_per_day}"
    if soft and history.soft_runs and history.last_retrain_at is not None:
        n = min(history.soft_runs, MAX_BACKOFF_DOUBLINGS)
        wait = config.retrain_cooldown_s * 2**n
        left = wait - (at - history.last_retrain_at).total_seconds()
        if left > 0:
            runs = "run" if history.soft_runs == 1 else "runs"
            return (
                f"backoff after {history.soft_runs} soft-breach {runs} in a row: the next waits "
                f"{_span(wait)} (cooldown × 2^{n}), {_span(left)} left"
            )
    if history.rejected_run_without_new_labels is not None:
        return (
            f"no new labels since retrain run {history.rejected_run_without_new_labels} was rejected: a run "
            "now would train on the same rows"
        )
    if drift_only and history.labelled_since_streak < config.min_labelled_rows:
        return (
            f"waiting for labels: {history.labelled_since_streak}/{config.min_labelled_rows} labelled rows "
            "since the drift was first seen, for a candidate to learn the moved inputs from"
        )
    return None


def _span(seconds: float) -> str:
    """A duration for a person: '56 d', '2 h', '20.6 min', '45 s' (the largest unit it fills, one decimal)."""
    seconds = math.ceil(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}".removesuffix(".0") + f" {unit}"
    return f"{seconds} s"


# --- history (the one function here that does I/O) ---------------------------------------------

DAY = timedelta(hours=24)
# The backoff stops doubling here (with a 1 h cooldown, 2¹¹ h ≈ 85 d).
MAX_BACKOFF_DOUBLINGS = 11
SOFT_RUNS_COUNTED = 100  # soft runs in a row are counted up to this many


def load_history(session: Session, *, champion_version: int | None, now: datetime) -> History:
    """History as of `now`: only reports created and runs started strictly before `now` count.

    Breaches in a row: walking back from `now`, breaching reports of this champion are counted until a
    report that did not breach or was made for another champion. Reports whose stored decision has
    verdict "insufficient" (too few rows to judge) neither count nor end the run; the newest such report
    whose labels were within policy sets `breaches_since_labels_ok` to the count above it. Retrain runs count
    whatever their trigger and outcome: a rejected or failed run still spent the cooldown and budget.
    `soft_runs`: walking back from `now` over runs of any champion started after the newest report with
    an "ok" verdict, those launched by a soft breach (drift triggered, or accuracy triggered by a report
    whose decision says soft) until one that was not, counted up to SOFT_RUNS_COUNTED. An accuracy run
    whose report is gone or predates the `soft` field counts as hard.
    `labelled_since_streak`: labelled rows dated from the streak's first report up to `now`.
    """
    streak = _breach_streak(session, champion_version=champion_version, now=now)
    previous, streak_start, since, since_labels_ok = streak
    labelled_since = _labelled_since(session, since=since, now=now) if since else 0
    last_retrain_at, recent = session.execute(
        select(
            func.max(RetrainRun.started_at),
            func.count(RetrainRun.id).filter(RetrainRun.started_at > now - DAY),
        ).where(RetrainRun.started_at < now)
    ).one()
    return History(
        previous_breaches=previous,
        last_retrain_at=last_retrain_at,
        retrains_last_24h=recent,
        streak_start_report_id=streak_start,
        labelled_since_streak=labelled_since,
        soft_runs=_soft_runs(session, now=now),
        rejected_run_without_new_labels=_rejected_without_new_labels(
            session, champion_version=champion_version, now=now
        ),
        breaches_since_labels_ok=since_labels_ok,
    )


def _rejected_without_new_labels(
    session: Session, *, champion_version: int | None, now: datetime
) -> int | None:
    """The latest run before `now` that was not failed, if the gate rejected it for this champion and no
    label (feedback or ingest) has been received between its start and `now`; else None. A failed run
    judged nothing, so it does not lift the hold: a run on the same rows would be rejected again."""
    last = session.execute(
        select(RetrainRun.id, RetrainRun.status, RetrainRun.champion_version, RetrainRun.started_at)
        .where(RetrainRun.started_at < now, RetrainRun.status != RunStatus.failed)
        .order_by(RetrainRun.started_at.desc(), RetrainRun.id.desc())
        .limit(1)
    ).first()
    if last is None or last.status != RunStatus.rejected or last.champion_version != champion_version:
        return None
    feedback = session.scalar(
        select(func.count())
        .select_from(GroundTruth)
        .where(GroundTruth.received_at > last.started_at, GroundTruth.received_at <= now)
    )
    ingested = session.scalar(
        select(func.count())
        .select_from(LabelledRow)
        .where(LabelledRow.ingested_at > last.started_at, LabelledRow.ingested_at <= now)
    )
    return None if (feedback or ingested) else int(last.id)


def _soft_runs(session: Session, *, now: datetime) -> int:
    settled = session.scalar(
        select(func.max(DriftReport.created_at)).where(
            DriftReport.created_at < now, DriftReport.decision["verdict"].as_string() == "ok"
        )
    )
    query = (
        select(RetrainRun.trigger, DriftReport.decision)
        .outerjoin(DriftReport, DriftReport.id == RetrainRun.report_id)
        .where(RetrainRun.started_at < now)
        .order_by(RetrainRun.started_at.desc(), RetrainRun.id.desc())
        .limit(SOFT_RUNS_COUNTED)
    )
    if settled is not None:
        query = query.where(RetrainRun.started_at > settled)
    runs = session.execute(query).all()
    count = 0
    for trigger, decision in runs:
        soft = trigger == Trigger.drift or (
            trigger == Trigger.accuracy and (decision or {}).get("soft") is True
        )
        if not soft:
            break
        count += 1
    return count


def _labelled_since(session: Session, *, since: datetime, now: datetime) -> int:
    predictions = session.scalar(
        select(func.count())
        .select_from(GroundTruth)
        .join(PredictionLog, PredictionLog.id == GroundTruth.prediction_id)
        .where(PredictionLog.created_at >= since, GroundTruth.received_at <= now)
    )
    ingested = session.scalar(
        select(func.count())
        .select_from(LabelledRow)
        .where(LabelledRow.event_time >= since, LabelledRow.ingested_at <= now)
    )
    return int(predictions or 0) + int(ingested or 0)


def _breach_streak(
    session: Session, *, champion_version: int | None, now: datetime
) -> tuple[int, int | None, datetime | None, int | None]:
    """Breaches in a row before `now`, the id and time of the streak's first report (None: no streak), and
    how many of them are newer than its newest short-window report with labels within policy (None: none)."""
    rows = session.execute(
        select(
            DriftReport.id,
            DriftReport.created_at,
            DriftReport.champion_version,
            DriftReport.breach,
            DriftReport.decision,
        )
        .where(DriftReport.created_at < now)
        .order_by(DriftReport.created_at.desc(), DriftReport.id.desc())
        .execution_options(yield_per=50)
    )
    count, start, since, since_labels_ok = 0, None, None, None
    try:
        for report_id, created_at, version, breach, decision in rows:
            if version != champion_version:
                break
            decided = decision or {}
            if decided.get("verdict") == "insufficient":
                if since_labels_ok is None and decided.get("labels_within_policy") is True:
                    since_labels_ok = count
                continue
            if not breach:
                break
            count, start, since = count + 1, report_id, created_at
    finally:
        rows.close()
    return count, start, since, since_labels_ok
