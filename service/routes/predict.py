"""POST /predict and /predict/batch; request schemas come from the feature spec."""

import json
import math
import time
from typing import Any
from uuid import uuid4

import numpy as np
from catboost import Pool
from fastapi import APIRouter, Body, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict, Field, create_model

from core.db import utcnow
from core.spec import FeatureSpec, FeatureType, few_unknown_keys
from service.errors import INVALID_REQUEST
from service.holder import NO_CHAMPION_IN_REGISTRY, ModelHolder
from service.lean import LeanRoute, StrictJsonRoute, json_body, read_json
from service.logtable import LogRow

NO_CHAMPION = "no champion model is loaded yet: run `driftloop bootstrap` (or promote a version)"


def not_serving(holder: ModelHolder) -> HTTPException:
    """The 503 for a process that serves no model, naming why: there is no champion yet (bootstrap one), or
    the holder could not reach the registry or load its champion (bootstrap would not help)."""
    problem = holder.last_error
    if problem is None or problem == NO_CHAMPION_IN_REGISTRY:
        return HTTPException(503, NO_CHAMPION)
    return HTTPException(503, f"no model is loaded: {problem} (checked again every {holder.poll_s:g} s)")


class Prediction(BaseModel):
    prediction: float
    prediction_id: str
    model_version: int


class BatchPrediction(BaseModel):
    predictions: list[Prediction]
    model_version: int


def add_routes(router: APIRouter, spec: FeatureSpec, *, max_batch: int, threads: int = 1) -> None:
    """Add the predict routes to `router`; `threads`: CatBoost's thread_count per predict call (-1: all).

    Added to the app's own router rather than included: an included router costs a dispatch layer
    per request, about 5 % of the time POST /predict spends in Python.
    """
    instance_model = spec.request_model()
    batch_model = create_model(
        "PredictBatch",
        __config__=ConfigDict(extra="forbid"),
        __validators__=few_unknown_keys(["instances"]),
        instances=(list[instance_model], Field(min_length=1, max_length=max_batch)),  # type: ignore[valid-type]
    )
    to_row = _row_encoder(spec)
    # Served values stay inside the spec's target bounds (FeatureSpec.clip); plain floats on the hot path.
    low = -math.inf if spec.target_min is None else spec.target_min
    high = math.inf if spec.target_max is None else spec.target_max

    async def predict(request: Request) -> Response:
        instance = await read_json(request, instance_model)
        ctx = request.app.state.ctx
        served = ctx.holder.current
        if served is None:
            raise not_serving(ctx.holder)
        features = instance.model_dump(by_alias=True)
        start = time.perf_counter()
        value = float(served.model.predict(to_row(features), thread_count=threads))
        seconds = time.perf_counter() - start
        _check_finite([value])
        value = min(max(value, low), high)
        pid = str(uuid4())
        ctx.logger.submit(LogRow(pid, utcnow(), served.version, features, value, seconds * 1000))
        ctx.metrics.predict_seconds.observe(seconds)
        ctx.metrics.prediction_value.observe(value)
        served.predictions.inc()
        # Formatted, not json.dumps'd (a tenth of the cost): a finite float's repr is valid JSON.
        body = f'{{"prediction": {value!r}, "prediction_id": "{pid}", "model_version": {served.version}}}'
        return Response(body, media_type="application/json")

    router.add_api_route(
        "/predict",
        predict,
        methods=["POST"],
        response_model=Prediction,
        summary="Predict one instance",
        tags=["predict"],
        openapi_extra=json_body(instance_model),
        responses={422: {"description": INVALID_REQUEST}},  # FastAPI adds none: the route reads its own body
        route_class_override=LeanRoute,  # the hot path: see service/lean.py
    )

    async def predict_batch(request: Request, batch: batch_model = Body()) -> Response:  # type: ignore[valid-type]
        ctx = request.app.state.ctx
        served = ctx.holder.current
        if served is None:
            raise not_serving(ctx.holder)
        rows = [i.model_dump(by_alias=True) for i in batch.instances]  # type: ignore[attr-defined]
        start = time.perf_counter()
        pool = Pool([to_row(r) for r in rows], cat_features=cat_idx)
        values = [float(v) for v in np.asarray(served.model.predict(pool, thread_count=threads), dtype=float)]
        seconds = time.perf_counter() - start
        _check_finite(values)
        values = [min(max(v, low), high) for v in values]
        now = utcnow()
        out = []
        per_row_ms = seconds * 1000 / len(rows)
        for features, value in zip(rows, values, strict=True):
            pid = str(uuid4())
            ctx.logger.submit(LogRow(pid, now, served.version, features, value, per_row_ms))
            ctx.metrics.prediction_value.observe(value)
            out.append({"prediction": value, "prediction_id": pid})
        ctx.metrics.predict_seconds.observe(seconds)
        served.predictions.inc(len(rows))
        body = {
            "predictions": [{**p, "model_version": served.version} for p in out],
            "model_version": served.version,
        }
        return Response(json.dumps(body), media_type="application/json")

    router.add_api_route(
        "/predict/batch",
        predict_batch,
        methods=["POST"],
        response_model=BatchPrediction,
        summary=f"Predict 1..{max_batch} instances",
        tags=["predict"],
        route_class_override=StrictJsonRoute,
    )

    cat_idx = [i for i, f in enumerate(spec.features) if f.type is FeatureType.categorical]


def _row_encoder(spec: FeatureSpec) -> Any:
    """Features dict -> list in spec order; missing numerics as NaN, missing categories as ''."""
    layout = [(f.name, f.type is FeatureType.categorical) for f in spec.features]

    def encode(features: dict[str, Any]) -> list[Any]:
        return [
            (features[name] if features[name] is not None else "")
            if categorical
            else (float(features[name]) if features[name] is not None else math.nan)
            for name, categorical in layout
        ]

    return encode


def _check_finite(values: list[float]) -> None:
    if not all(math.isfinite(v) for v in values):
        # Never log or return a non-finite prediction; the model, not the client, is at fault.
        raise HTTPException(500, "the model produced a non-finite prediction; nothing was logged")
