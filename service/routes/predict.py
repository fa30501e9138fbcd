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
from core.spec import FeatureSpec, FeatureType
from service.logger import LogRow

NO_CHAMPION = "no champion model is loaded yet: run `driftloop bootstrap` (or promote a version)"


class Prediction(BaseModel):
    prediction: float
    prediction_id: str
    model_version: int


class BatchPrediction(BaseModel):
    predictions: list[Prediction]
    model_version: int


def build_router(spec: FeatureSpec, *, max_batch: int) -> APIRouter:
    instance_model = spec.request_model()
    batch_model = create_model(
        "PredictBatch",
        __config__=ConfigDict(extra="forbid"),
        instances=(list[instance_model], Field(min_length=1, max_length=max_batch)),  # type: ignore[valid-type]
    )
    to_row = _row_encoder(spec)
    router = APIRouter(tags=["predict"])

    @router.post("/predict", response_model=Prediction, summary="Predict one instance")
    async def predict(request: Request, instance: instance_model = Body()) -> Response:  # type: ignore[valid-type]
        ctx = request.app.state.ctx
        served = ctx.holder.current
        if served is None:
            raise HTTPException(503, NO_CHAMPION)
        features = instance.model_dump()  # type: ignore[attr-defined]
        start = time.perf_counter()
        value = float(served.model.predict(to_row(features)))
        seconds = time.perf_counter() - start
        _check_finite([value])
        pid = str(uuid4())
        ctx.logger.submit(LogRow(pid, utcnow(), served.version, features, value, seconds * 1000))
        ctx.metrics.predict_seconds.observe(seconds)
        ctx.metrics.prediction_value.observe(value)
        ctx.metrics.predictions.labels(model_version=str(served.version)).inc()
        body = {"prediction": value, "prediction_id": pid, "model_version": served.version}
        return Response(json.dumps(body), media_type="application/json")

    @router.post(
        "/predict/batch", response_model=BatchPrediction, summary=f"Predict 1..{max_batch} instances"
    )
    async def predict_batch(request: Request, batch: batch_model = Body()) -> Response:  # type: ignore[valid-type]
        ctx = request.app.state.ctx
        served = ctx.holder.current
        if served is None:
            raise HTTPException(503, NO_CHAMPION)
        rows = [i.model_dump() for i in batch.instances]  # type: ignore[attr-defined]
        start = time.perf_counter()
        pool = Pool([to_row(r) for r in rows], cat_features=cat_idx)
        values = [float(v) for v in np.asarray(served.model.predict(pool), dtype=float)]
        seconds = time.perf_counter() - start
        _check_finite(values)
        now = utcnow()
        out = []
        per_row_ms = seconds * 1000 / len(rows)
        for features, value in zip(rows, values, strict=True):
            pid = str(uuid4())
            ctx.logger.submit(LogRow(pid, now, served.version, features, value, per_row_ms))
            ctx.metrics.prediction_value.observe(value)
            out.append({"prediction": value, "prediction_id": pid})
        ctx.metrics.predict_seconds.observe(seconds)
        ctx.metrics.predictions.labels(model_version=str(served.version)).inc(len(rows))
        body = {
            "predictions": [{**p, "model_version": served.version} for p in out],
            "model_version": served.version,
        }
        return Response(json.dumps(body), media_type="application/json")

    cat_idx = [i for i, f in enumerate(spec.features) if f.type is FeatureType.categorical]
    return router


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
