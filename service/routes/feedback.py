"""POST /feedback: ground truth for earlier predictions, upserted idempotently."""

import math
import threading
from typing import Annotated, Any, cast

from fastapi import APIRouter, Body, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, create_model
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm.exc import StaleDataError

from core.db import unreachable, utcnow
from core.schema import GroundTruth, PredictionLog
from core.spec import FeatureSpec, few_unknown_keys, spec_field
from service.auth import Feedback
from service.lean import StrictJsonRoute
from service.logger import PredictionLogger
from service.middleware import DATABASE_RETRY_AFTER_S
from service.routes.params import Text

IN_FLIGHT_WAIT_S = 5.0
# Requests that wait for the log writer at once: each holds one of the threads every sync route shares,
# /ready among them (60 waiting, the log writer stuck, held /ready for 4 s). The rest are told to retry now.
MAX_WAITING = 8
CHUNK = 500
RACE_ATTEMPTS = 3  # a label stored, or a prediction pruned, by another between our read and our write


class FeedbackResult(BaseModel):
    accepted: int = Field(description="New labels stored.")
    updated: int = Field(description="Labels that replaced a different earlier value.")
    duplicate: int = Field(
        description="Labels already stored with the same value (or repeated in this request)."
    )
    unknown: list[str] = Field(description="prediction_ids this service has no record of, as sent.")


def build_router(spec: FeatureSpec, *, max_batch: int) -> APIRouter:
    FeedbackItem = create_model(
        "FeedbackItem",
        __config__=ConfigDict(extra="forbid", allow_inf_nan=False),
        __validators__=few_unknown_keys(["prediction_id", "actual"]),
        prediction_id=(Text, Field(min_length=1, max_length=36)),
        actual=spec_field(spec.target_feature),  # a JSON number within the spec's target bounds
    )

    router = APIRouter(tags=["feedback"], route_class=StrictJsonRoute)
    waiting = threading.BoundedSemaphore(MAX_WAITING)

    @router.post("/feedback", response_model=FeedbackResult, summary="Ground truth for earlier predictions")
    def feedback(
        request: Request,
        _: Feedback,
        items: Annotated[list[FeedbackItem], Body(min_length=1, max_length=max_batch)],  # type: ignore[valid-type]
    ) -> FeedbackResult:
        ctx = request.app.state.ctx
        labels: dict[str, float] = {}
        first: dict[str, int] = {}
        spelt: dict[str, str] = {}  # an id as the client first sent it: `unknown` names it so
        repeated = 0
        for i, item in enumerate(cast(list[Any], items)):
            pid, actual = item.prediction_id.lower(), item.actual  # a UUID in capitals is the same id
            if pid in labels and labels[pid] != actual:  # which one is true? not ours to guess
                raise RequestValidationError([{
                    "type": "value_error", "loc": ("body", i, "actual"),
                    "msg": f"{actual!r} for {pid!r}, which [{first[pid]}] labels {labels[pid]!r}; "
                    "nothing was stored: send one label per prediction",
                }])  # fmt: skip
            repeated += pid in labels
            labels[pid] = actual
            first.setdefault(pid, i)
            spelt.setdefault(pid, item.prediction_id)
        in_flight = [pid for pid in labels if ctx.logger.is_pending(pid)]
        behind, queue = _still_pending(ctx.logger, in_flight, waiting) if in_flight else (set(), "")
        if behind:  # answered here but not yet stored: "unknown" would tell the client to drop a good label
            raise HTTPException(
                503,
                f"{len(behind)} of these predictions were answered but are not stored yet (the prediction "
                f"log is behind, or the database is down and they wait on the spool{queue}); nothing was "
                "stored: retry the same request",
                headers={"Retry-After": str(math.ceil(IN_FLIGHT_WAIT_S))},
            )
        try:
            result = _upsert_retrying(ctx.sessions, labels)
        except (OperationalError, PoolTimeout) as exc:
            if not unreachable(exc):  # SQL the database cannot run (no such table): a fault, a 500
                raise
            raise HTTPException(
                503,
                "database unavailable: nothing was stored; retry the same request",
                headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},  # as the middleware's 503 for an outage
            ) from exc
        result.duplicate += repeated
        result.unknown = [spelt[pid] for pid in result.unknown]
        for outcome in ("accepted", "updated", "duplicate"):
            ctx.metrics.feedback.labels(outcome=outcome).inc(getattr(result, outcome))
        ctx.metrics.feedback.labels(outcome="unknown").inc(len(result.unknown))
        return result

    return router


def _still_pending(
    logger: PredictionLogger, ids: list[str], waiting: threading.BoundedSemaphore
) -> tuple[set[str], str]:
    """The `ids` not stored after waiting for the log writer, and what the 503 should add; at once, without
    waiting, while MAX_WAITING requests already wait."""
    if not waiting.acquire(blocking=False):
        return set(ids), f", and {MAX_WAITING} requests already wait for it"
    try:
        return logger.wait_written(ids, timeout=IN_FLIGHT_WAIT_S), ""
    finally:
        waiting.release()


def _upsert_retrying(sessions: object, labels: dict[str, float]) -> FeedbackResult:
    """`_upsert`, again when a concurrent request stored a label for one of these ids first (the same id
    sent twice at once), or `driftloop prune` deleted one of their predictions after it was read (a label's
    insert then breaks the foreign key, its update matches no row): the rolled-back attempt stored nothing,
    the next one sees that label, or the id unknown."""
    for attempt in range(1, RACE_ATTEMPTS + 1):
        try:
            return _upsert(sessions, labels)
        except (IntegrityError, StaleDataError):
            if attempt == RACE_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def _upsert(sessions: object, labels: dict[str, float]) -> FeedbackResult:
    result = FeedbackResult(accepted=0, updated=0, duplicate=0, unknown=[])
    ids = list(labels)
    now = utcnow()
    with sessions.begin() as session:  # type: ignore[attr-defined]
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start : start + CHUNK]
            known = set(session.scalars(select(PredictionLog.id).where(PredictionLog.id.in_(chunk))))
            existing = {
                gt.prediction_id: gt
                for gt in session.scalars(select(GroundTruth).where(GroundTruth.prediction_id.in_(known)))
            }
            for pid in chunk:
                if pid not in known:
                    result.unknown.append(pid)
                elif pid not in existing:
                    session.add(GroundTruth(prediction_id=pid, actual=labels[pid], received_at=now))
                    result.accepted += 1
                elif existing[pid].actual == labels[pid]:
                    result.duplicate += 1
                else:
                    existing[pid].actual = labels[pid]
                    existing[pid].received_at = now
                    result.updated += 1
    return result
