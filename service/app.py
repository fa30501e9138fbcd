"""The app factory: builds every collaborator from settings; starts and stops them in the lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from core.db import make_engine, make_sessions
from core.metrics import Metrics, build_metrics, prediction_buckets
from core.registry import ArtifactStore, Registry
from core.settings import Settings, load_settings
from core.spec import FeatureSpec, load_spec
from monitor.jobs import Loop
from service import errors
from service.holder import ModelHolder
from service.logger import PredictionLogger
from service.middleware import BodyLimit, Faults, RequestMetrics
from service.probe import DatabaseProbe
from service.routes import feedback, loop, models, ops, predict
from service.spool import Spool

log = logging.getLogger("driftloop.service")


@dataclass(slots=True)
class ServiceContext:
    settings: Settings
    spec: FeatureSpec
    engine: Engine
    sessions: sessionmaker[Session]
    registry: Registry
    prom_registry: CollectorRegistry
    metrics: Metrics
    holder: ModelHolder
    logger: PredictionLogger
    loop: Loop
    db_probe: DatabaseProbe


def build_context(settings: Settings, *, prom_registry: CollectorRegistry | None = None) -> ServiceContext:
    spec = load_spec(settings.spec_path)
    engine = make_engine(settings.database_url)
    sessions = make_sessions(engine)
    registry = Registry(sessions, ArtifactStore(settings.artifact_dir))
    prom = prom_registry or CollectorRegistry()
    metrics = build_metrics(prom, buckets=prediction_buckets(settings, spec))
    logger = PredictionLogger(
        sessions,
        Spool(settings.spool_dir),
        metrics,
        queue_size=settings.log_queue_size,
        batch_size=settings.log_batch_size,
        flush_interval_s=settings.log_flush_interval_s,
        replay_interval_s=settings.spool_replay_interval_s,
    )
    return ServiceContext(
        settings=settings,
        spec=spec,
        engine=engine,
        sessions=sessions,
        registry=registry,
        prom_registry=prom,
        metrics=metrics,
        holder=ModelHolder(registry, metrics, poll_s=settings.champion_poll_s, spec=spec),
        logger=logger,
        loop=Loop(settings=settings, spec=spec, sessions=sessions, registry=registry, metrics=metrics),
        db_probe=DatabaseProbe(engine),
    )


def create_app(
    settings: Settings | None = None,
    *,
    scheduler: bool | None = None,
    prom_registry: CollectorRegistry | None = None,
) -> FastAPI:
    """`scheduler` overrides settings.scheduler: False for API replicas in scale-out mode."""
    settings = settings or load_settings()
    ctx = build_context(settings, prom_registry=prom_registry)
    run_scheduler = settings.scheduler if scheduler is None else scheduler

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.feedback_token is None:  # documented, but a default that lets anyone steer retraining
            log.warning(
                "DRIFTLOOP_FEEDBACK_TOKEN is not set: POST /feedback stores labels, which decide what a "
                "retrain learns and what its gate judges by, from any client that can reach this API"
            )
        ctx.logger.start()
        ctx.holder.start()
        if run_scheduler:
            ctx.loop.start()
        try:
            yield
        finally:
            # Drain first: every answered prediction reaches the DB or the spool before the loop's stop,
            # which may wait for a monitor run or an announcer, eats into the orchestrator's grace period.
            ctx.logger.stop()
            ctx.loop.stop()  # also lets a manual run's announcer finish on a replica without the scheduler
            ctx.holder.stop()
            ctx.engine.dispose()

    app = FastAPI(
        title="driftloop",
        version="0.1.0",
        summary=f"Predictions for {ctx.spec.dataset}, with drift monitoring and gated retraining.",
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    errors.install(app)
    predict.add_routes(
        app.router, ctx.spec, max_batch=settings.max_batch_size, threads=settings.predict_threads
    )
    app.include_router(feedback.build_router(ctx.spec, max_batch=settings.max_batch_size))
    app.include_router(ops.router)
    app.include_router(models.router)
    app.include_router(loop.router)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=ctx.metrics)
    app.add_middleware(Faults)  # added last: outermost of ours
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = errors.document_errors(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
