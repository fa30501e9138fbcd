"""Baseline for bench/serve.py: plain FastAPI + CatBoost, same model and request schema, no logging."""

import os
from typing import Any

from catboost import CatBoostRegressor
from fastapi import Body, FastAPI

from core.spec import FeatureType, load_spec


def build(model_path: str, spec_path: str | None = None, threads: int = 1) -> FastAPI:
    """`threads`: CatBoost's thread_count per predict, set to driftloop's so only the overheads differ."""
    spec = load_spec(spec_path)
    model = CatBoostRegressor()
    model.load_model(model_path)
    instance_model = spec.request_model()
    layout = [(f.name, f.type is FeatureType.categorical) for f in spec.features]
    app = FastAPI()

    @app.post("/predict")
    async def predict(instance: instance_model = Body()) -> dict[str, Any]:  # type: ignore[valid-type]
        features = instance.model_dump(by_alias=True)  # type: ignore[attr-defined]
        row = [features[n] if cat else float(features[n]) for n, cat in layout]
        return {"prediction": float(model.predict(row, thread_count=threads))}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def app() -> FastAPI:  # uvicorn --factory bench.plain_app:app
    return build(
        os.environ["BENCH_MODEL_PATH"],
        os.environ.get("DRIFTLOOP_SPEC_PATH"),
        int(os.environ.get("DRIFTLOOP_PREDICT_THREADS", "1")),
    )
