"""`driftloop worker`: the scheduler and retrain runner, with /health and /metrics for Prometheus."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from core.db import make_engine, make_sessions
from core.metrics import build_metrics, prediction_buckets
from core.registry import ArtifactStore, Registry
from core.settings import Settings
from core.spec import load_spec
from monitor.jobs import Loop
from service import errors
from service.middleware import Faults


def create_worker_app(settings: Settings, *, prom_registry: CollectorRegistry | None = None) -> FastAPI:
    engine = make_engine(settings.database_url)
    sessions = make_sessions(engine)
    prom = prom_registry or CollectorRegistry()
    spec = load_spec(settings.spec_path)
    loop = Loop(
        settings=settings,
        spec=spec,
        sessions=sessions,
        registry=Registry(sessions, ArtifactStore(settings.artifact_dir)),
        metrics=build_metrics(prom, buckets=prediction_buckets(settings, spec)),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop.start()
        try:
            yield
        finally:
            loop.stop()
            engine.dispose()

    app = FastAPI(title="driftloop worker", lifespan=lifespan)
    app.state.loop = loop
    # As the API's: errors in its JSON shape, and HEAD answered as GET (`curl -I :9100/health` was 405).
    errors.install(app)
    app.add_middleware(Faults)

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        """Live; `leader` says whether this worker holds the scheduler lease (a standby idles)."""
        return {"status": "ok", "leader": request.app.state.loop.leader}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(prom), media_type=CONTENT_TYPE_LATEST)

    return app
