"""What the read and operator routes answer, as OpenAPI documents it; service/views.py builds the bodies.

Times are ISO 8601 strings in UTC, with their offset. A JSON column the loop writes (a report's decision,
a version's metrics, a run's steps) is an object whose keys have grown over releases, so it is documented
by its description rather than by a schema that an older row would fail.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field

Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]


class ModelSummary(BaseModel):
    version: int
    status: str = Field(description="champion, candidate, rejected or archived")
    trigger: str = Field(description="bootstrap, drift, accuracy, schedule or manual")
    created_at: Timestamp
    promoted_at: Timestamp | None = Field(description="When it last became the champion; null if never.")
    parent_version: int | None = Field(description="The champion it was trained to replace.")
    val_mae: float | None = Field(description="MAE on the gate's holdout.")
    train_rows: int


class TrainingWindow(BaseModel):
    start: Timestamp | None
    end: Timestamp | None
    rows: int
    sources: dict[str, Any] = Field(description="Rows per source: the prediction log, each imported file.")


class ReportSummary(BaseModel):
    id: int
    created_at: Timestamp
    champion_version: int | None
    rows: int = Field(description="Rows in the drift window.")
    labelled_rows: int = Field(description="Labelled rows the accuracy figures were measured on.")
    drift_share: float | None = Field(description="Share of features drifted; null without a drift verdict.")
    weighted_drift_score: float | None = Field(description="Drift share weighted by feature importance.")
    mae: float | None
    mean_error: float | None = Field(description="Prediction − actual, averaged: > 0 over-predicts.")
    breach: bool
    verdict: str | None = Field(description="ok, breach or insufficient")
    reasons: list[Any]


class RetrainRunView(BaseModel):
    id: int
    trigger: str
    status: str = Field(description="running, promoted, rejected or failed")
    reason: str
    report_id: int | None
    champion_version: int | None = Field(description="The champion the candidate was validated against.")
    candidate_version: int | None
    metrics: dict[str, Any] = Field(
        description="The gate's figures: candidate and champion MAE, holdout rows."
    )
    steps: dict[str, Any] = Field(
        description="Per step (assemble, train, validate, refit, register, promote): started_at, seconds."
    )
    error: str | None
    pid: int | None = Field(description="The process running it.")
    started_at: Timestamp
    finished_at: Timestamp | None
    heartbeat_at: Timestamp | None = Field(description="Renewed while the run's process is alive.")


class Lineage(BaseModel):
    replaced_version: int | None
    trigger: str
    training_window: TrainingWindow
    report: ReportSummary | None = Field(description="The drift report that triggered it.")
    retrain_run: RetrainRunView | None
    gate_metrics: dict[str, Any]


class ModelDetail(BaseModel):
    """One version; its files are named by sha256, not by the server's paths."""

    version: int
    created_at: Timestamp
    status: str
    trigger: str
    sha256: str = Field(description="Of the model file.")
    reference_sha256: str | None = Field(description="Of the drift reference snapshot.")
    train_start: Timestamp | None
    train_end: Timestamp | None
    train_rows: int
    metrics: dict[str, Any]
    params: dict[str, Any] = Field(description="CatBoost parameters it was trained with.")
    feature_importance: dict[str, Any]
    data_sources: dict[str, Any]
    parent_version: int | None
    report_id: int | None
    retrain_run_id: int | None
    promoted_at: Timestamp | None
    note: str = Field(description="Promotions, rollbacks and the gate's reasons, one per line.")
    lineage: Lineage


class ReportDetail(BaseModel):
    id: int
    created_at: Timestamp
    champion_version: int | None
    window_start: Timestamp | None
    window_end: Timestamp | None
    rows: int
    labelled_rows: int
    sampled_rows: int = Field(description="Rows Evidently compared, after sampling a large window.")
    features: dict[str, Any] = Field(
        description="Per feature: method, score, threshold, detected, importance."
    )
    drift_share: float | None
    weighted_drift_score: float | None
    prediction_drift: dict[str, Any] = Field(description="The prediction column's drift test; {} if none.")
    mae: float | None
    rmse: float | None
    mape: float | None = Field(description="Percent; null when no actual is non-zero.")
    mean_error: float | None
    champion_mae: float | None = Field(description="The champion's validation MAE, the accuracy yardstick.")
    breach: bool
    reasons: list[Any]
    decision: dict[str, Any] = Field(
        description="The policy's decision: verdict, retrain, trigger, held_by, …"
    )
    duration_s: float
    html_url: str | None = Field(description="Its Evidently page; null when it has none.")


class RetrainStarted(BaseModel):
    run_id: int
    status: str
    url: str = Field(description="Where to poll the run; also in the Location header.")


class MonitorRun(BaseModel):
    verdict: str = Field(description="ok, breach or insufficient")
    report_id: int | None
    breach: bool
    retrain: bool = Field(description="Whether this run launched a retrain.")
    reasons: list[str]
    held_by: str | None = Field(description="Why a breach did not retrain (cooldown, daily cap, …).")
    soft: bool = Field(description="A breach of drift alone or of the baseline alone.")
    retrain_run_id: int | None
    drift: dict[str, Any] | None = Field(description="Per-feature results, drift share, accuracy figures.")
    accuracy: dict[str, Any] | None
    notes: list[str]


class Health(BaseModel):
    status: str


class LoggerState(BaseModel):
    queue_depth: int = Field(description="Answers waiting for the batched writer.")
    spooled_pending: int = Field(description="Answers in the local spool, waiting for the database.")


class Readiness(BaseModel):
    ready: bool
    model_version: int | None
    problems: list[str]
    logger: LoggerState
