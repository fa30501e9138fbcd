"""Registry endpoints: list, lineage, promote and roll back (admin)."""

from typing import Any

from fastapi import APIRouter, Body, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field

from core.registry import ReasonRequired, RegistryError, UnknownVersion
from core.schema import DriftReport, RetrainRun
from service.auth import Admin
from service.lean import StrictJsonRoute
from service.responses import ModelDetail, ModelSummary
from service.routes.params import RowId, Text
from service.views import model_lineage, model_summary

router = APIRouter(tags=["models"], route_class=StrictJsonRoute)


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: Text = Field(
        default="", max_length=500, description="Why; required to promote a version the gate rejected."
    )


@router.get("/models", response_model=list[ModelSummary], summary="All model versions, newest first")
def list_models(request: Request) -> list[dict[str, Any]]:
    return [model_summary(row) for row in request.app.state.ctx.registry.list()]


@router.api_route(
    "/models/rollback", methods=["GET", "PUT", "PATCH", "DELETE", "OPTIONS"], include_in_schema=False
)
def rollback_takes_post() -> None:
    """405 naming POST: matched before /models/{version}, which would refuse 'rollback' as a version (422)."""
    raise HTTPException(405, headers={"Allow": "POST"})


@router.get("/models/{version}", response_model=ModelDetail, summary="One version with its lineage")
def get_model(request: Request, version: RowId) -> dict[str, Any]:
    ctx = request.app.state.ctx
    row = ctx.registry.get(version)
    if row is None:
        raise HTTPException(404, f"model version {version} does not exist")
    with ctx.sessions() as session:
        report = session.get(DriftReport, row.report_id) if row.report_id else None
        run = session.get(RetrainRun, row.retrain_run_id) if row.retrain_run_id else None
    return model_lineage(row, report=report, run=run)


@router.post(
    "/models/{version}/promote", response_model=ModelSummary, summary="Make a version the champion (admin)"
)
def promote(
    request: Request, version: RowId, _: Admin, body: PromoteRequest | None = Body(default=None)
) -> dict[str, Any]:
    ctx = request.app.state.ctx
    reason = (body or PromoteRequest()).reason
    try:
        row = ctx.registry.promote(version=version, reason=reason, default_reason="manual promote via API")
    except UnknownVersion as exc:
        raise HTTPException(404, str(exc)) from exc
    except ReasonRequired as exc:
        raise HTTPException(409, f'{exc}: send {{"reason": "..."}}') from exc
    except RegistryError as exc:
        raise HTTPException(409, str(exc)) from exc
    ctx.holder.poke()
    return model_summary(row)


@router.post(
    "/models/rollback", response_model=ModelSummary, summary="Re-promote the previous champion (admin)"
)
def rollback(request: Request, _: Admin) -> dict[str, Any]:
    ctx = request.app.state.ctx
    try:
        row = ctx.registry.rollback(reason="rollback via API")
    except RegistryError as exc:
        raise HTTPException(409, str(exc)) from exc
    ctx.holder.poke()
    return model_summary(row)
