"""Liveness, readiness and the Prometheus endpoint."""

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.responses import Health, Readiness

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=Health, summary="Liveness: the process answers")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/ready",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready: `problems` says why"}},
    summary="Readiness: a champion is loaded and every answer is logged or spooled",
)
async def ready(request: Request) -> JSONResponse:
    """503 only when this replica cannot answer, or would lose what it answers. A database outage alone is
    a problem to name, not a reason to leave the load balancer: answers go to the spool and are replayed,
    and every replica shares the database, so taking them all out would only turn an outage of labels and
    history into an outage of predictions."""
    ctx = request.app.state.ctx
    problems = []
    served = ctx.holder.current
    failure = ctx.holder.load_failure
    if served is None:
        problems.append(ctx.holder.last_error or "no champion loaded")
    if ctx.logger.losing_rows:
        problems.append("database unreachable and the spool write failing: answered predictions are dropped")
    ready = not problems
    if database := await ctx.db_probe.problem():
        problems.append(database)
    # A champion that failed to load while an older one answers is worth an operator's look, not a reason
    # to take the replica out of the load balancer.
    if served is not None and failure is not None:
        problems.append(
            f"the registry's champion v{failure.version} failed to load; still serving v{served.version}: "
            f"{failure.error}"
        )
    body = {
        "ready": ready,
        "model_version": served.version if served else None,
        "problems": problems,
        "logger": {"queue_depth": ctx.logger.queue_depth, "spooled_pending": ctx.logger.spooled_pending},
    }
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.ctx.prom_registry), media_type=CONTENT_TYPE_LATEST)
