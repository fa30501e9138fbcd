"""The loop's endpoints: retrain runs, monitor runs and drift reports."""

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Body, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from core.registry import ArtifactIntegrityError, FeatureMismatchError
from core.schema import DriftReport, RetrainRun, Trigger
from monitor.jobs import MonitorBusy
from monitor.verdict import MonitorOutcome
from retrain.runs import NoChampion, RunInProgress
from service.auth import Admin
from service.lean import StrictJsonRoute
from service.responses import MonitorRun, ReportDetail, ReportSummary, RetrainRunView, RetrainStarted
from service.routes.params import MAX_LIST, Limit, RowId, Text
from service.views import report_detail, report_summary, row_dict

router = APIRouter(tags=["loop"], route_class=StrictJsonRoute)


class RetrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: Text = Field(default="manual trigger", max_length=500)


@router.post(
    "/retrain", status_code=202, response_model=RetrainStarted, summary="Start a retrain run now (admin)"
)
def retrain(request: Request, _: Admin, body: RetrainRequest | None = Body(default=None)) -> JSONResponse:
    ctx = request.app.state.ctx
    try:
        handle = ctx.loop.launch_retrain(trigger=Trigger.manual, reason=(body or RetrainRequest()).reason)
    except RunInProgress as exc:
        raise HTTPException(
            409, f"retrain run {exc.run_id} is already running; at most one runs at a time"
        ) from exc
    except NoChampion as exc:
        raise HTTPException(409, str(exc)) from exc
    url = f"/retrain/runs/{handle.run_id}"
    # Location: where a client polls the run (RFC 9110's status monitor of a 202), as well as in the body.
    return JSONResponse(
        {"run_id": handle.run_id, "status": "running", "url": url}, status_code=202, headers={"Location": url}
    )


@router.get("/retrain/runs", response_model=list[RetrainRunView], summary="Retrain runs, newest first")
def list_runs(request: Request, limit: Limit = 50) -> list[dict[str, Any]]:
    with request.app.state.ctx.sessions() as session:
        rows = session.scalars(select(RetrainRun).order_by(RetrainRun.id.desc()).limit(min(limit, MAX_LIST)))
        return [row_dict(r) for r in rows]


@router.get(
    "/retrain/runs/{run_id}", response_model=RetrainRunView, summary="One retrain run with step timings"
)
def get_run(request: Request, run_id: RowId) -> dict[str, Any]:
    with request.app.state.ctx.sessions() as session:
        row = session.get(RetrainRun, run_id)
    if row is None:
        raise HTTPException(404, f"retrain run {run_id} does not exist")
    return row_dict(row)


@router.post(
    "/monitor/run", response_model=MonitorRun, summary="Run the monitor now and return its report (admin)"
)
async def run_monitor(request: Request, _: Admin) -> dict[str, Any]:
    ctx = request.app.state.ctx
    try:
        outcome: MonitorOutcome = await run_in_threadpool(ctx.loop.run_monitor)
    # A damaged artifact, or a champion trained under another spec: nothing to judge by.
    except (ArtifactIntegrityError, FeatureMismatchError) as exc:
        raise HTTPException(409, f"the monitor cannot run: {exc}") from None
    except MonitorBusy as exc:
        raise HTTPException(409, f"{exc}: try again when it has finished (GET /reports/latest)") from None
    return outcome.to_json()


@router.get("/reports", response_model=list[ReportSummary], summary="Drift reports, newest first")
def list_reports(request: Request, limit: Limit = 50) -> list[dict[str, Any]]:
    with request.app.state.ctx.sessions() as session:
        rows = session.scalars(
            select(DriftReport).order_by(DriftReport.id.desc()).limit(min(limit, MAX_LIST))
        )
        return [report_summary(r) for r in rows]


@router.get("/reports/latest", response_model=ReportDetail, summary="The newest drift report")
def latest_report(request: Request) -> dict[str, Any]:
    with request.app.state.ctx.sessions() as session:
        row = session.scalar(select(DriftReport).order_by(DriftReport.id.desc()).limit(1))
    if row is None:
        raise HTTPException(404, "no drift report yet: the monitor has not run (POST /monitor/run)")
    return report_detail(row)


@router.get("/reports/{report_id}", response_model=ReportDetail, summary="One drift report (JSON)")
def get_report(request: Request, report_id: RowId) -> dict[str, Any]:
    return report_detail(_report(request, report_id))


@router.get(
    "/reports/{report_id}/html", summary="The Evidently HTML page of a report", response_class=HTMLResponse
)
def get_report_html(request: Request, report_id: RowId) -> FileResponse:
    row = _report(request, report_id)
    # Only a report that judged drift had a page: one judged on its labels alone (too few of the champion's
    # answers) never did, whatever its verdict, so retention did not remove it.
    if row.html_path is None and row.drift_share is not None:
        raise HTTPException(404, _no_page(report_id, keep=request.app.state.ctx.settings.report_html_keep))
    if not row.html_path or not Path(row.html_path).is_file():
        raise HTTPException(
            404, f"report {report_id} has no HTML page (too few rows for a verdict, or file removed)"
        )
    page = Path(row.html_path).resolve()
    if page.parent != request.app.state.ctx.settings.report_dir.resolve():
        # Only the monitor's own pages are served: a path written into the row by hand, or a link in the
        # report directory, does not make this endpoint read any file the process can.
        raise HTTPException(
            404, f"report {report_id}'s page is not in DRIFTLOOP_REPORT_DIR, so it is not served"
        )
    return FileResponse(page, media_type="text/html", headers=PAGE_HEADERS)


# Evidently's page runs inline scripts, so no script policy; but no other site may frame it (clickjacking),
# nor a browser read it as anything but HTML.
PAGE_HEADERS = {
    "Content-Security-Policy": "frame-ancestors 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _no_page(report_id: int, *, keep: int) -> str:
    """Why a report with a verdict has no page: retention pruned it, or pages are off."""
    json_at = f"its JSON is at /reports/{report_id}"
    if keep == 0:
        return f"report {report_id} has no HTML page: DRIFTLOOP_REPORT_HTML_KEEP=0 keeps none; {json_at}"
    return f"the HTML page of report {report_id} was pruned by DRIFTLOOP_REPORT_HTML_KEEP={keep}; {json_at}"


def _report(request: Request, report_id: int) -> DriftReport:
    with request.app.state.ctx.sessions() as session:
        row: DriftReport | None = session.get(DriftReport, report_id)
    if row is None:
        raise HTTPException(404, f"drift report {report_id} does not exist")
    return row
