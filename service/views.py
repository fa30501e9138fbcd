"""JSON views of database rows; one place decides what the API shows of each."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import inspect

from core.schema import DriftReport, ModelVersion, RetrainRun


def row_dict(row: object, *, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    mapper = inspect(row.__class__)
    out: dict[str, Any] = {}
    for column in mapper.columns:
        if column.key in exclude:
            continue
        value = getattr(row, column.key)
        out[column.key] = value.isoformat() if isinstance(value, datetime) else value
    return out


def model_summary(row: ModelVersion) -> dict[str, Any]:
    return {
        "version": row.version,
        "status": row.status,
        "trigger": row.trigger,
        "created_at": row.created_at.isoformat(),
        "promoted_at": row.promoted_at.isoformat() if row.promoted_at else None,
        "parent_version": row.parent_version,
        "val_mae": row.metrics.get("val_mae"),
        "train_rows": row.train_rows,
    }


def model_lineage(row: ModelVersion, *, report: DriftReport | None, run: RetrainRun | None) -> dict[str, Any]:
    """Which data trained it, what triggered it, which report, which metrics, which version it replaced.
    Its files are named by their sha256, not by the server's paths (an open route, as a report's page is)."""
    return {
        **row_dict(row, exclude=("artifact_path", "reference_path")),
        "lineage": {
            "replaced_version": row.parent_version,
            "trigger": row.trigger,
            "training_window": {
                "start": row.train_start.isoformat() if row.train_start else None,
                "end": row.train_end.isoformat() if row.train_end else None,
                "rows": row.train_rows,
                "sources": row.data_sources,
            },
            "report": report_summary(report) if report else None,
            "retrain_run": row_dict(run) if run else None,
            "gate_metrics": row.metrics,
        },
    }


def report_detail(row: DriftReport) -> dict[str, Any]:
    """A whole report; its Evidently page is named by the URL that serves it, not by the server's path."""
    return {
        **row_dict(row, exclude=("html_path",)),
        "html_url": f"/reports/{row.id}/html" if row.html_path else None,
    }


def report_summary(row: DriftReport) -> dict[str, Any]:
    return {
        "id": row.id,
        "created_at": row.created_at.isoformat(),
        "champion_version": row.champion_version,
        "rows": row.rows,
        "labelled_rows": row.labelled_rows,
        "drift_share": row.drift_share,
        "weighted_drift_score": row.weighted_drift_score,
        "mae": row.mae,
        "mean_error": row.mean_error,
        "breach": row.breach,
        "verdict": row.decision.get("verdict"),
        "reasons": row.reasons,
    }
