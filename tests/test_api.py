"""The HTTP contract in-process (httpx over ASGI): bad input names the field, nothing is logged."""

import asyncio
import dataclasses
import gzip
import json
import logging
import math
import re
import threading
import unicodedata
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import yaml
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import ValidationError
from sqlalchemy import func, select, text
from starlette.requests import ClientDisconnect

from core.db import utcnow
from core.metrics import VALUE_BUCKETS, build_metrics, prediction_buckets
from core.registry import sha256_file
from core.schema import DriftReport, GroundTruth, ModelVersion, PredictionLog, RetrainRun
from core.settings import Settings
from core.spec import FeatureSpec, parse_spec
from monitor.jobs import Loop
from retrain.train import predict
from service.app import create_app
from service.errors import describe
from service.lean import LeanRoute, StrictJsonRoute
from service.middleware import Faults
from service.process import free_port
from service.responses import (
    Lineage,
    ModelDetail,
    ModelSummary,
    MonitorRun,
    ReportDetail,
    ReportSummary,
    RetrainRunView,
    TrainingWindow,
)
from service.routes.feedback import FeedbackResult
from service.views import model_lineage, model_summary, report_detail, report_summary, row_dict
from tests.conftest import make_settings, register_copy

ADMIN = {"Authorization": "Bearer test-admin-token"}
NO_BEARER = "no bearer token in the Authorization header"


@pytest.fixture
def client(champion, db_url: str, tmp_path: Path) -> Iterator[TestClient]:
    settings = make_settings(db_url, tmp_path, max_batch_size=5, max_body_bytes=4096)
    with TestClient(create_app(settings, scheduler=False)) as client:
        yield client


def logged_rows(client: TestClient) -> int:
    ctx = client.app.state.ctx
    assert ctx.logger.flush(timeout=30)
    with ctx.sessions() as session:
        return session.scalar(select(func.count()).select_from(PredictionLog))


def post_raw(client: TestClient, path: str, body: str):
    return client.post(path, content=body, headers={"content-type": "application/json"})


def test_predict_answers_with_id_and_version_and_logs_the_row(client, make_features) -> None:
    response = client.post("/predict", json=make_features())
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"prediction", "prediction_id", "model_version"}
    assert body["model_version"] == 1
    assert body["prediction"] > 0
    assert logged_rows(client) == 1
    with client.app.state.ctx.sessions() as session:
        row = session.get(PredictionLog, body["prediction_id"])
    assert row.features == make_features()
    assert row.prediction == body["prediction"]
    assert row.model_version == 1


def test_batch_predicts_each_instance_in_order(client, make_features) -> None:
    instances = [make_features(area_m2=a) for a in (40.0, 84.0, 135.0)]
    response = client.post("/predict/batch", json={"instances": instances})
    assert response.status_code == 200
    body = response.json()
    values = [p["prediction"] for p in body["predictions"]]
    single = [client.post("/predict", json=i).json()["prediction"] for i in instances]
    assert values == pytest.approx(single)
    assert len({p["prediction_id"] for p in body["predictions"]}) == 3
    assert logged_rows(client) == 6


BAD_PREDICT = [
    ("missing field", {"floor": None}, "floor: required"),
    ("extra field", {"colour": "red"}, "colour: unknown field"),
    ("wrong type", {"households": "many"}, "households: Input should be a valid integer"),
    ("fractional integer", {"floor": 3.5}, "floor: Input should be a valid integer"),
    ("out of bounds", {"area_m2": 351}, "area_m2: Input should be less than or equal to 350"),
    ("below bounds", {"build_year": 1900}, "build_year: Input should be greater than or equal to 1960"),
    (
        "unknown category",
        {"district": "Atlantis-gu"},
        "district: unknown category 'Atlantis-gu'; expected 'Gangnam-gu'",
    ),
    ("boolean for a number", {"area_m2": True}, "area_m2: Input should be a valid number"),
]


@pytest.mark.parametrize(("case", "change", "message"), BAD_PREDICT, ids=[c[0] for c in BAD_PREDICT])
def test_bad_instance_is_rejected_naming_the_field(
    client, make_features, DROP, case, change, message
) -> None:
    payload = make_features(**{k: (DROP if v is None else v) for k, v in change.items()})
    response = client.post("/predict", json=payload)
    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "invalid_request"
    assert body["message"].startswith(message)
    assert body["errors"][0]["field"] == next(iter(change))
    assert logged_rows(client) == 0
    assert client.post("/predict", json=make_features()).status_code == 200


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_rejected(client, make_features, literal) -> None:
    body = json.dumps(make_features()).replace('"area_m2": 84.5', f'"area_m2": {literal}')
    response = post_raw(client, "/predict", body)
    assert response.status_code == 422
    assert response.json()["message"] == "area_m2: must be a finite number (NaN/Infinity are not allowed)"
    assert logged_rows(client) == 0


def test_malformed_json_and_wrong_shapes(client, make_features) -> None:
    response = post_raw(client, "/predict", '{"district": "Mapo-gu", ')
    assert response.status_code == 422
    assert response.json()["message"].startswith("body: malformed JSON")
    response = client.post("/predict", json=[make_features()])
    assert response.status_code == 422
    assert response.json()["message"] == "body: must be a JSON object"
    response = client.post("/predict/batch", json={"instances": [make_features(), 7]})
    assert response.status_code == 422
    assert response.json()["message"] == "instances[1]: must be a JSON object"
    response = client.post("/predict", content=b"")
    assert response.status_code == 422
    assert response.json()["message"] == "body: required"
    assert logged_rows(client) == 0


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_predict_body_must_be_declared_json(client, make_features, content_type) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/predict", content=json.dumps(make_features()), headers=headers)
    # 415 (RFC 9110: content in a format the route does not take), as for a compressed body; it was 422
    assert response.json() == {
        "error": "unsupported_media_type",
        "message": f"Content-Type must be application/json, got {content_type or 'none'}",
    }
    assert response.status_code == 415
    assert logged_rows(client) == 0
    response = post_raw(client, "/predict", json.dumps(make_features()))
    assert response.status_code == 200
    # The routes FastAPI parses say the same, not "must be a JSON object" or "a valid list".
    for path, body in (("/predict/batch", {"instances": [make_features()]}), ("/feedback", [])):
        response = client.post(path, content=json.dumps(body), headers=headers)
        assert (response.status_code, response.json()["message"]) == (
            415,
            f"Content-Type must be application/json, got {content_type or 'none'}",
        )
    vendor = client.post(
        "/predict",
        content=json.dumps(make_features()),
        headers={"content-type": "application/vnd.api+json; charset=utf-8"},
    )
    assert vendor.status_code == 200


def test_openapi_documents_the_predict_body_from_the_spec(client, spec) -> None:
    operation = client.get("/openapi.json").json()["paths"]["/predict"]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert operation["requestBody"]["required"] is True
    assert list(schema["properties"]) == spec.feature_names
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {f.name for f in spec.features if not f.nullable}
    assert "200" in operation["responses"]


def test_openapi_describes_the_422_bodies_the_routes_send(client, make_features) -> None:
    """FastAPI documented its own `{"detail": [{"loc", "msg", "type"}]}` for every 422, which no route sends,
    and /predict's 422 not at all: a client generated from the document could not read one error."""
    document = client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    bad = make_features(area_m2=-1)
    sent = {
        ("/predict", "post"): client.post("/predict", json=bad),
        ("/predict/batch", "post"): client.post("/predict/batch", json={"instances": [bad]}),
        ("/feedback", "post"): client.post("/feedback", json=[{"prediction_id": "x", "actual": "y"}]),
        ("/models/{version}", "get"): client.get("/models/0"),
        ("/retrain/runs", "get"): client.get("/retrain/runs?limit=0"),
    }
    for (path, method), answer in sent.items():
        assert answer.status_code == 422, path
        documented = document["paths"][path][method]["responses"]["422"]["content"]["application/json"]
        jsonschema.validate(answer.json(), {**documented["schema"], "components": document["components"]})
    assert set(schemas["InvalidRequest"]["required"]) == {"error", "message", "errors"}
    page = document["paths"]["/reports/{report_id}/html"]["get"]["responses"]["200"]["content"]
    assert list(page) == ["text/html"]
    # Every other error is {"error", "message"}, documented as every operation's default answer.
    others = {
        ("/models/rollback", "post"): client.post("/models/rollback"),  # 401
        ("/models/{version}", "get"): client.get("/models/9"),  # 404
        ("/health", "get"): client.post("/health"),  # 405
        ("/predict", "post"): client.post("/predict", content=b"{}", headers={"content-encoding": "gzip"}),
    }
    assert all(
        operation["responses"]["default"]
        for path in document["paths"].values()
        for operation in path.values()
    )
    for (path, method), answer in others.items():
        assert answer.status_code in (401, 404, 405, 415), path
        documented = document["paths"][path][method]["responses"]["default"]["content"]["application/json"]
        schema = {**documented["schema"], "components": document["components"]}
        jsonschema.validate(answer.json(), schema)
        assert set(answer.json()) == set(schemas["ErrorBody"]["required"])


def test_openapi_documents_which_routes_take_which_bearer_token(client) -> None:
    """The tokens were read from the header by hand, so the document named no security scheme: /docs had
    no Authorize button, and "Try it out" on an admin route could only ever get a 401."""
    document = client.get("/openapi.json").json()
    assert {name: scheme["scheme"] for name, scheme in document["components"]["securitySchemes"].items()} == {
        "admin": "bearer",
        "feedback": "bearer",
    }
    secured = {
        (method.upper(), path): operation["security"]
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
        if "security" in operation
    }
    admin = [{"admin": []}]
    assert secured == {
        ("POST", "/feedback"): [{"feedback": []}],
        ("POST", "/models/{version}/promote"): admin,
        ("POST", "/models/rollback"): admin,
        ("POST", "/retrain"): admin,
        ("POST", "/monitor/run"): admin,
    }


def test_batch_errors_name_the_instance_and_field(client, make_features) -> None:
    response = client.post("/predict/batch", json={"instances": [make_features(), make_features(area_m2=-1)]})
    assert response.status_code == 422
    assert response.json()["message"] == "instances[1].area_m2: Input should be greater than or equal to 5"
    response = client.post("/predict/batch", json={"instances": []})
    assert response.json()["message"] == "instances: List should have at least 1 item after validation, not 0"
    response = client.post("/predict/batch", json={"instances": [make_features()] * 6})
    assert response.status_code == 422
    assert response.json()["message"].startswith("instances: List should have at most 5 items")
    assert logged_rows(client) == 0


@pytest.mark.parametrize(
    ("path", "at", "long_field"),
    [
        ("/predict", "", "x" * 100 + "… (3,000 characters)"),
        ("/predict/batch", "instances[0].", "instances[0]." + "x" * 87 + "… (3,013 characters)"),
    ],
)
def test_a_body_of_many_problems_or_long_names_gets_a_short_answer(
    client, make_features, path, at, long_field
) -> None:
    def post(instance: dict[str, Any]):
        return client.post(path, json=instance if path == "/predict" else {"instances": [instance]})

    response = post({**make_features(), **{f"k{i}": 1 for i in range(10)}})
    body = response.json()
    assert (response.status_code, len(body["errors"]), body["errors"][-1]) == (
        422, 10, {"field": f"{at}k9", "message": "unknown field"}
    )  # fmt: skip
    # More are one problem, not one each: naming 240,000 short keys of a 2 MB body held the event loop 2 s.
    response = post({**make_features(), **{f"k{i}": 1 for i in range(300)}})  # within the 4,096 bytes
    many = "300 unknown fields: more than 10 are refused without naming each"
    assert (response.status_code, response.json()["errors"]) == (
        422, [{"field": at.removesuffix(".") or "body", "message": many}]
    )  # fmt: skip
    response = post({**make_features(), "x" * 3000: 1})
    assert response.json()["errors"] == [{"field": long_field, "message": "unknown field"}]
    response = post(make_features(district="y" * 3000))
    assert response.json()["message"].startswith(
        f"{at}district: unknown category '{'y' * 99}… (3,002 characters); expected 'Gangnam-gu'"
    )
    assert len(response.content) < 2000
    assert logged_rows(client) == 0


def test_many_unknown_keys_in_a_label_or_a_batch_are_one_problem(client, make_features) -> None:
    many = "11 unknown fields: more than 10 are refused without naming each"
    label = {"prediction_id": "x", "actual": 1, **{f"k{i}": 1 for i in range(11)}}
    refused = client.post("/feedback", json=[label])
    assert (refused.status_code, refused.json()["errors"]) == (422, [{"field": "[0]", "message": many}])
    batch = {"instances": [make_features()], **{f"k{i}": 1 for i in range(11)}}
    refused = client.post("/predict/batch", json=batch)
    assert (refused.status_code, refused.json()["errors"]) == (422, [{"field": "body", "message": many}])
    assert logged_rows(client) == 0


def test_body_over_the_limit_is_refused_before_parsing(client, make_features) -> None:
    big = json.dumps({"instances": [make_features()] * 40})
    assert len(big) > 4096
    response = post_raw(client, "/predict/batch", big)
    assert response.status_code == 413
    assert response.json() == {
        "error": "body_too_large",
        "message": f"body: {len(big)} bytes is over the limit of 4096 bytes (DRIFTLOOP_MAX_BODY_BYTES)",
    }
    assert logged_rows(client) == 0
    assert client.post("/predict", json=make_features()).status_code == 200


@pytest.mark.parametrize("path", ["/predict", "/predict/batch", "/feedback"])
def test_a_compressed_body_is_refused_naming_its_content_encoding(client, make_features, path) -> None:
    body = {"/predict": make_features(), "/predict/batch": {"instances": [make_features()]}}.get(path, [])
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    response = client.post(path, content=gzip.compress(json.dumps(body).encode()), headers=headers)
    assert (response.status_code, response.json()) == (
        415,
        {
            "error": "unsupported_media_type",
            "message": "Content-Encoding 'gzip' is not supported: send the body uncompressed",
        },
    )
    assert response.headers["accept-encoding"] == "identity"
    assert logged_rows(client) == 0
    identity = client.post("/predict", json=make_features(), headers={"content-encoding": "identity"})
    assert identity.status_code == 200


def test_feedback_is_idempotent_and_lists_unknown_ids(client, make_features) -> None:
    ids = [client.post("/predict", json=make_features(floor=f)).json()["prediction_id"] for f in (1, 2, 3)]
    first = client.post("/feedback", json=[{"prediction_id": i, "actual": 90000.0} for i in ids[:2]])
    assert first.json() == {"accepted": 2, "updated": 0, "duplicate": 0, "unknown": []}
    again = client.post(
        "/feedback",
        json=[
            {"prediction_id": ids[0], "actual": 90000.0},
            {"prediction_id": ids[1], "actual": 95000.0},
            {"prediction_id": ids[2], "actual": 70000.0},
            {"prediction_id": ids[2], "actual": 70000.0},
            {"prediction_id": "no-such-id", "actual": 1.0},
        ],
    )
    assert again.json() == {"accepted": 1, "updated": 1, "duplicate": 2, "unknown": ["no-such-id"]}
    with client.app.state.ctx.sessions() as session:
        stored = {g.prediction_id: g.actual for g in session.scalars(select(GroundTruth))}
    assert stored == {ids[0]: 90000.0, ids[1]: 95000.0, ids[2]: 70000.0}
    shouted = client.post("/feedback", json=[{"prediction_id": ids[0].upper(), "actual": 90000.0}])
    assert shouted.json() == {"accepted": 0, "updated": 0, "duplicate": 1, "unknown": []}  # the same UUID


def test_unknown_ids_are_named_as_they_were_sent(client) -> None:
    """An id is matched whatever its case, but `unknown` named it in lower case: a client that takes its
    sent ids less the unknown ones as stored counted "No-Such-ID" as stored."""
    sent = [{"prediction_id": "No-Such-ID", "actual": 1.0}, {"prediction_id": "no-such-id", "actual": 1.0}]
    answer = client.post("/feedback", json=sent)
    assert answer.json() == {"accepted": 0, "updated": 0, "duplicate": 1, "unknown": ["No-Such-ID"]}


def test_a_label_changed_as_prune_deletes_its_prediction_is_answered_unknown(client, make_features) -> None:
    """`driftloop prune --labelled` deletes a labelled prediction, and its label, between /feedback's read of
    the label and its update: the update matches no row. It was a 500; it is tried again, as a label stored
    by a concurrent request is, and the id is answered unknown, as for any deleted prediction."""
    from sqlalchemy import event

    pid = client.post("/predict", json=make_features(floor=2)).json()["prediction_id"]
    logged_rows(client)
    assert client.post("/feedback", json=[{"prediction_id": pid, "actual": 90000.0}]).json()["accepted"] == 1
    engine = client.app.state.ctx.sessions.kw["bind"]
    pruned: list[str] = []

    def prune_after_the_label_is_read(conn, cursor, statement: str, *args: object) -> None:
        if not pruned and statement.lstrip().upper().startswith("SELECT") and "ground_truth" in statement:
            pruned.append(pid)
            with engine.begin() as other:  # another connection: prune's, its labels going by the cascade
                other.execute(PredictionLog.__table__.delete().where(PredictionLog.id == pid))

    event.listen(engine, "after_cursor_execute", prune_after_the_label_is_read)
    try:
        answer = client.post("/feedback", json=[{"prediction_id": pid, "actual": 95000.0}])
    finally:
        event.remove(engine, "after_cursor_execute", prune_after_the_label_is_read)
    assert pruned == [pid]
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"accepted": 0, "updated": 0, "duplicate": 0, "unknown": [pid]}
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "body: List should have at least 1 item after validation, not 0"),
        ([{"prediction_id": "x", "actual": -5}], "[0].actual: Input should be greater than or equal to 0"),
        ([{"prediction_id": "x"}], "[0].actual: required"),
        ([{"prediction_id": "x", "actual": 1, "note": "y"}], "[0].note: unknown field"),
        ({"prediction_id": "x", "actual": 1}, "body: Input should be a valid list"),
        # A label is a JSON number, as /predict's numbers are: no "123" or true read as 123.0 or 1.0.
        ([{"prediction_id": "x", "actual": "123"}], "[0].actual: Input should be a valid number"),
        ([{"prediction_id": "x", "actual": True}], "[0].actual: Input should be a valid number"),
        # Finite but absurd: its square overflows the monitor's statistics (and no price is 10^300 won).
        (
            [{"prediction_id": "x", "actual": 1e300}],
            "[0].actual: Input should be less than or equal to 1000000000000000",
        ),
    ],
)
def test_bad_feedback_names_the_field(client, body, message) -> None:
    response = client.post("/feedback", json=body)
    assert response.status_code == 422
    assert response.json()["message"] == message


def test_a_feedback_token_guards_the_labels_and_the_admin_token_opens_it_too(
    champion, db_url, tmp_path, make_features
) -> None:
    """Labels decide what a retrain learns and what the gate judges by. With DRIFTLOOP_FEEDBACK_TOKEN set,
    /feedback needs it (or the admin token); without one, nothing is stored. /predict stays open."""
    settings = make_settings(db_url, tmp_path, feedback_token=" label-writer\n")  # as a Secret file holds it
    with TestClient(create_app(settings, scheduler=False)) as client:
        pid = client.post("/predict", json=make_features()).json()["prediction_id"]
        label = [{"prediction_id": pid, "actual": 90000.0}]
        missing = "missing bearer token: send 'Authorization: Bearer <DRIFTLOOP_FEEDBACK_TOKEN>'"
        for headers, message in [
            ({}, missing),
            ({"Authorization": "Bearer label-reader"}, "invalid bearer token"),
            ({"Authorization": "Basic label-writer"}, missing.replace("missing bearer token", NO_BEARER)),
        ]:
            refused = client.post("/feedback", json=label, headers=headers)
            assert (refused.status_code, refused.json()["message"]) == (401, message)
            assert refused.headers["www-authenticate"] == "Bearer"
        with client.app.state.ctx.sessions() as session:
            assert session.scalar(select(func.count()).select_from(GroundTruth)) == 0
        writer = client.post("/feedback", json=label, headers={"Authorization": "Bearer label-writer"})
        assert writer.json() == {"accepted": 1, "updated": 0, "duplicate": 0, "unknown": []}
        admin = client.post("/feedback", json=label, headers=ADMIN)
        assert admin.json() == {"accepted": 0, "updated": 0, "duplicate": 1, "unknown": []}
        assert "label-writer" not in client.get("/metrics").text


@pytest.mark.parametrize(("token", "warned"), [(None, True), ("", True), ("label-writer", False)])
def test_open_labels_are_warned_of_at_start(champion, db_url, tmp_path, caplog, token, warned) -> None:
    """/feedback is open without DRIFTLOOP_FEEDBACK_TOKEN: said in the service log, not only the README."""
    app = create_app(make_settings(db_url, tmp_path, feedback_token=token), scheduler=False)
    with caplog.at_level(logging.WARNING, logger="driftloop.service"), TestClient(app):
        pass
    open_labels = [m for m in caplog.messages if m.startswith("DRIFTLOOP_FEEDBACK_TOKEN is not set: ")]
    assert len(open_labels) == warned


def test_feedback_with_two_labels_for_one_prediction_stores_nothing(client, make_features) -> None:
    pid = client.post("/predict", json=make_features()).json()["prediction_id"]
    same = [{"prediction_id": pid, "actual": 90000.0}] * 2
    assert client.post("/feedback", json=same).json()["duplicate"] == 1  # a plain repeat is harmless
    conflicting = [
        {"prediction_id": "other", "actual": 1.0},
        {"prediction_id": pid, "actual": 90000.0},
        {"prediction_id": pid, "actual": 91000.0},
    ]
    response = client.post("/feedback", json=conflicting)
    assert (response.status_code, response.json()["message"]) == (
        422,
        f"[2].actual: 91000.0 for '{pid}', which [1] labels 90000.0; nothing was stored: send one label per "
        "prediction",
    )
    with client.app.state.ctx.sessions() as session:
        assert session.scalars(select(GroundTruth.actual)).all() == [90000.0]


def test_a_key_given_twice_in_one_object_is_refused_and_nothing_is_stored(client, make_features) -> None:
    """JSON parsers keep the last of a repeated key, silently: `"actual": 1, "actual": 7` stored 7."""
    pid = client.post("/predict", json=make_features()).json()["prediction_id"]
    features = json.dumps(make_features())
    twice = features[:-1] + ', "area_m2": 99.0}'
    label = f'{{"prediction_id": "{pid}", "actual": 90000.0, "actual": 7.0}}'
    for path, body, key in [
        ("/feedback", f"[{label}]", "actual"),
        (
            "/feedback",
            f'[{{"prediction_id": "{pid}", "prediction_id": "other", "actual": 1.0}}]',
            "prediction_id",
        ),
        ("/predict", twice, "area_m2"),
        ("/predict/batch", f'{{"instances": [{features}, {twice}]}}', "area_m2"),
        ("/predict/batch", f'{{"instances": [], "instances": [{features}]}}', "instances"),
        ("/models/1/promote", '{"reason": "a", "reason": "b"}', "reason"),
        ("/retrain", '{"reason": "a", "reason": "b"}', "reason"),
    ]:
        response = client.post(path, content=body, headers={"content-type": "application/json", **ADMIN})
        message = f"body: the key '{key}' is given twice in one object: which value is meant? send it once"
        assert (response.status_code, response.json()["message"]) == (422, message), path
    assert logged_rows(client) == 1
    with client.app.state.ctx.sessions() as session:
        assert session.scalar(select(func.count()).select_from(GroundTruth)) == 0
    assert client.get("/retrain/runs").json() == []
    # A colon inside a value is no second key; a key in each of two objects is none either.
    assert client.post("/predict", json=make_features(district="Mapo-gu")).status_code == 200
    assert post_raw(client, "/predict", features[:-1] + ', "floor": 12}').status_code == 422
    with_colon = post_raw(client, "/predict", json.dumps(make_features(district="Mapo:gu")))
    assert with_colon.json()["message"].startswith("district: unknown category 'Mapo:gu'")
    labels = [{"prediction_id": pid, "actual": 90000.0}, {"prediction_id": "other", "actual": 1.0}]
    assert client.post("/feedback", json=labels).json()["accepted"] == 1


def test_every_route_with_a_body_refuses_a_key_given_twice(client) -> None:
    """The routes above are sampled; a new router must read its body the same way (service/lean.py)."""
    routes = list(client.app.routes)
    for included in [r.original_router for r in routes if hasattr(r, "original_router")]:  # FastAPI 0.165
        routes += included.routes
    with_body = [r for r in routes if isinstance(r, APIRoute) and r.body_field is not None]
    assert {r.path for r in with_body} >= {"/feedback", "/predict/batch", "/models/{version}/promote"}
    assert [r.path for r in with_body if not isinstance(r, StrictJsonRoute | LeanRoute)] == []


def test_feedback_nan_actual_is_rejected(client) -> None:
    response = post_raw(client, "/feedback", '[{"prediction_id": "x", "actual": NaN}]')
    assert response.status_code == 422
    assert response.json()["message"] == "[0].actual: must be a finite number (NaN/Infinity are not allowed)"


def test_health_ready_and_metrics(client, make_features) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["model_version"] == 1
    client.post("/predict", json=make_features())
    client.post("/predict", json=make_features(area_m2=-1))
    text = client.get("/metrics").text
    assert 'driftloop_predictions_total{model_version="1"} 1.0' in text
    assert 'driftloop_http_requests_total{endpoint="/predict",status="200"} 1.0' in text
    assert 'driftloop_http_errors_total{endpoint="/predict",status="422"} 1.0' in text
    assert 'driftloop_model_info{version="1"} 1.0' in text
    assert "driftloop_predict_seconds_count 1.0" in text
    assert 'driftloop_logger_rows_total{outcome="dropped"} 0.0' in text


def test_requests_answered_before_routing_are_counted_under_their_route(client, make_features) -> None:
    """BodyLimit answers 413 and 415 before any route is matched, and FastAPI does not record its /docs and
    /openapi.json in the scope: all were endpoint="unmatched", a 413 on /predict counted as no route's."""
    gzipped = {"content-type": "application/json", "content-encoding": "gzip"}
    assert client.post("/predict", content=gzip.compress(b"{}"), headers=gzipped).status_code == 415
    assert post_raw(client, "/feedback", "[" + " " * 5000 + "]").status_code == 413
    assert client.get("/openapi.json").status_code == client.get("/docs").status_code == 200
    assert client.get("/models/1/nothing").status_code == 404
    text = client.get("/metrics").text
    for endpoint, status in [
        ("/predict", 415), ("/feedback", 413), ("/openapi.json", 200), ("/docs", 200), ("unmatched", 404)
    ]:  # fmt: skip
        assert f'driftloop_http_requests_total{{endpoint="{endpoint}",status="{status}"}} 1.0' in text
    assert 'endpoint="unmatched",status="4' not in text.replace('status="404"', "")


def test_head_is_answered_as_get_without_the_body(client) -> None:
    """A HEAD probe (`curl -I /health`, an uptime monitor's) was 405 on every route."""
    for path, status in [("/health", 200), ("/ready", 200), ("/models/1", 200), ("/reports/9", 404)]:
        got = client.get(path)
        head = client.head(path)
        assert (head.status_code, head.content) == (status, b""), path
        assert head.headers["content-type"] == got.headers["content-type"]
        assert head.headers["content-length"] == got.headers["content-length"]
    refused = client.head("/predict")
    assert (refused.status_code, refused.headers["allow"], refused.content) == (405, "POST", b"")
    assert logged_rows(client) == 0


def test_a_405_s_allow_header_names_head_where_get_is_allowed(client) -> None:
    """RFC 9110: Allow lists the methods the resource supports; HEAD is answered wherever GET is, but a
    405 on /health said `Allow: GET`."""
    for method, path, allow in [
        ("POST", "/health", "GET, HEAD"),
        ("PUT", "/models/1", "GET, HEAD"),
        ("DELETE", "/reports/latest", "GET, HEAD"),
        ("GET", "/predict", "POST"),
        ("GET", "/models/rollback", "POST"),
    ]:
        answer = client.request(method, path)
        assert (answer.status_code, answer.headers["allow"]) == (405, allow), path
        assert answer.json()["message"] == f"{method} is not allowed on {path}; it takes {allow}"


@pytest.mark.parametrize(
    ("fault", "line"),
    [
        (ClientDisconnect(), "client closed the connection before its body was in: POST"),
        (RuntimeError(), "internal error on POST"),
    ],
)
def test_a_newline_in_the_path_cannot_write_a_log_line(fault, line, caplog) -> None:
    """Logged decoded, `/models/1%0A<a line of one's own>/promote` wrote that line into the service log,
    from any client that hung up mid-body (the route matches before the version is checked)."""

    async def app(scope, receive, send) -> None:
        raise fault

    async def send(message) -> None:
        pass

    forged = "2026-01-01 00:00:00,000 CRITICAL driftloop.service: forged"
    scope = {
        "type": "http", "method": "POST", "headers": [], "path": f"/models/1\n{forged}/promote",
        "raw_path": f"/models/1%0A{forged.replace(' ', '%20')}/promote".encode(),
    }  # fmt: skip
    with caplog.at_level(logging.INFO, logger="driftloop.service"):
        asyncio.run(Faults(app)(scope, None, send))
    logged = f"{line} /models/1%0A{forged.replace(' ', '%20')}/promote"
    assert [re.sub(r" \(request [0-9a-f]{32}\)$", "", m) for m in caplog.messages] == [logged]


def test_every_answer_carries_a_request_id_and_a_sane_one_sent_is_kept(client, make_features) -> None:
    """A load balancer's or client's X-Request-ID comes back as sent, so its logs and ours name the same
    request; without one, or with one that could write into a log (a space, a newline, 129 characters, a
    non-ASCII byte), each answer gets an id of its own. Errors answered before routing carry it too."""
    fresh = re.compile(r"[0-9a-f]{32}")
    refused = ["a b", "x" * 129, "", "café".encode()]
    for sent in [
        "3f9c2a1e-6b7d-4e0f-9a8b-1c2d3e4f5a6b",
        "00-4bf92f3577b34da6-00f067aa0ba902b7-01",
        "x" * 128,
    ]:
        assert client.get("/health", headers={"X-Request-ID": sent}).headers["x-request-id"] == sent
    answers = [
        client.get("/health"), client.head("/health"), client.get("/models/7"), client.get("/nope"),
        client.post("/predict", json={}), client.post("/predict", json=make_features()),
        post_raw(client, "/feedback", "x" * 5000),  # 413 from BodyLimit, before any route
        *(client.get("/health", headers={"X-Request-ID": bad}) for bad in refused),
    ]  # fmt: skip
    assert [a.status_code for a in answers] == [200, 200, 404, 404, 422, 200, 413, 200, 200, 200, 200]
    ids = [a.headers["x-request-id"] for a in answers]
    assert all(fresh.fullmatch(i) for i in ids), ids
    assert len(set(ids)) == len(ids)
    assert all(len(a.headers.get_list("x-request-id")) == 1 for a in answers)


def test_every_feedback_outcome_is_exported_before_the_first_label(client) -> None:
    """The outcomes a /feedback answer counts are all series from the start, `updated` too (rate() of a
    series born at its first label would lose that label, and the worker would never export it)."""
    text = client.get("/metrics").text
    exported = set(re.findall(r'^driftloop_feedback_total\{outcome="(\w+)"\} 0\.0$', text, re.MULTILINE))
    assert exported == set(FeedbackResult.model_fields) == {"accepted", "updated", "duplicate", "unknown"}


def test_admin_endpoints_need_the_token(client) -> None:
    assert client.post("/models/rollback").status_code == 401
    wrong = client.post("/models/rollback", headers={"Authorization": "Bearer nope"})
    assert (wrong.status_code, wrong.json()["message"]) == (401, "invalid bearer token")
    conflict = client.post("/models/rollback", headers=ADMIN)
    assert (conflict.status_code, conflict.json()["message"]) == (409, "no previous champion to roll back to")


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "test-admin-token", "Bearer", "Bearer   "])
def test_an_authorization_header_without_a_bearer_token_is_named_so(client, header) -> None:
    """A client that sent a header was told "missing bearer token"; its words are not echoed back."""
    answer = client.post("/models/rollback", headers={"Authorization": header})
    assert (answer.status_code, answer.headers["www-authenticate"]) == (401, "Bearer")
    expected = (
        "no bearer token in the Authorization header: send 'Authorization: Bearer <DRIFTLOOP_ADMIN_TOKEN>'"
    )
    assert answer.json()["message"] == expected


@pytest.mark.parametrize(
    ("body", "content_type"),
    [(b'{"reason": ', "application/json"), (b'{"reason": "a", "reason": "b"}', "application/json"),
     (b'{"reason": "a"}', "text/plain"), (b"x" * 3000, "application/json")],
)  # fmt: skip
def test_a_token_is_checked_before_the_body_is_read(champion, db_url, tmp_path, body, content_type) -> None:
    """FastAPI parses a body before it resolves a dependency: a client without the token was told what was
    wrong with its JSON (422, 415), not 401, and the body was read for nothing."""
    settings = make_settings(db_url, tmp_path, feedback_token="label-writer", max_body_bytes=4096)
    with TestClient(create_app(settings, scheduler=False)) as client:
        for path in ("/models/1/promote", "/retrain", "/feedback"):
            refused = client.post(path, content=body, headers={"content-type": content_type})
            assert (refused.status_code, refused.headers["www-authenticate"]) == (401, "Bearer"), path
        # With the token, the body is judged as before.
        judged = client.post(
            "/models/1/promote", content=body, headers={"content-type": content_type, **ADMIN}
        )
        assert judged.status_code in (415, 422)


@pytest.mark.parametrize("token", [None, "", "  "])  # empty: an unset compose variable
def test_admin_endpoints_are_off_without_a_token(champion, db_url, tmp_path, token) -> None:
    settings = make_settings(db_url, tmp_path, admin_token=token)
    with TestClient(create_app(settings, scheduler=False)) as client:
        for headers in (ADMIN, {"Authorization": "Bearer "}):
            response = client.post("/models/1/promote", headers=headers)
            assert response.status_code == 403
            assert "set DRIFTLOOP_ADMIN_TOKEN" in response.json()["message"]


# A Secret's file ending in a newline, a quoted .env value: no Authorization header can carry the whitespace
# (HTTP trims a field value), so it made every admin call a 401.
@pytest.mark.parametrize("token", ["test-admin-token\n", " test-admin-token "])
def test_whitespace_around_the_configured_token_is_not_part_of_it(champion, db_url, tmp_path, token) -> None:
    settings = make_settings(db_url, tmp_path, admin_token=token)
    with TestClient(create_app(settings, scheduler=False)) as client:
        response = client.post("/models/rollback", headers=ADMIN)
        assert (response.status_code, response.json()["message"]) == (
            409,
            "no previous champion to roll back to",
        )


def test_a_started_retrain_run_is_located_by_a_header_too(client, monkeypatch) -> None:
    """A 202's status monitor in the Location header, where HTTP clients look for it, not only in the body."""
    launched = type("Handle", (), {"run_id": 7})()
    monkeypatch.setattr(Loop, "launch_retrain", lambda self, **_: launched)
    answer = client.post("/retrain", headers=ADMIN, json={"reason": "located"})
    assert answer.status_code == 202
    assert answer.headers["location"] == answer.json()["url"] == "/retrain/runs/7"


def test_models_list_and_lineage(client, champion) -> None:
    assert [m["version"] for m in client.get("/models").json()] == [1]
    v1 = client.get("/models/1").json()
    assert v1["status"] == "champion"
    assert v1["lineage"]["trigger"] == "bootstrap"
    assert v1["lineage"]["training_window"]["rows"] == 2400
    assert v1["lineage"]["replaced_version"] is None
    # an open route: the server's file system is not the API's business, as for a report's page
    assert "artifact_path" not in v1 and "reference_path" not in v1
    assert (v1["sha256"], v1["reference_sha256"]) == (champion.sha256, champion.reference_sha256)
    missing = client.get("/models/7")
    assert (missing.status_code, missing.json()["message"]) == (404, "model version 7 does not exist")


def documented_fields(document: dict[str, Any], schema: dict[str, Any]) -> set[str]:
    """The property names an OpenAPI response schema gives, following a $ref and a list's items."""
    while "$ref" in schema or "items" in schema:
        schema = schema["items"] if "items" in schema else _component(document, schema["$ref"])
    return set(schema["properties"])


def _component(document: dict[str, Any], ref: str) -> dict[str, Any]:
    return document["components"]["schemas"][ref.rsplit("/", 1)[-1]]


def test_every_read_body_is_what_openapi_documents(client, champion) -> None:
    """The views build dicts and FastAPI keeps only what a response model declares: a column added to a
    view but not to its model would be dropped without a word, so the views' keys are held to the models,
    and each route's body to what /openapi.json says of it."""
    ctx = client.app.state.ctx
    outcome = ctx.loop.run_monitor()  # a real report: an empty window is judged insufficient
    assert set(outcome.to_json()) == set(MonitorRun.model_fields)
    with ctx.sessions.begin() as session:
        run = RetrainRun(
            trigger="manual", status="rejected", reason="why", report_id=outcome.report_id,
            champion_version=1, candidate_version=2, metrics={"candidate_mae": 9.0}, steps={},
            error=None, pid=1, started_at=utcnow(), finished_at=utcnow(), heartbeat_at=utcnow(),
        )  # fmt: skip
        session.add(run)
    v2 = register_copy(ctx.registry, champion)
    with ctx.sessions.begin() as session:
        row = session.get(ModelVersion, v2.version)
        row.report_id, row.retrain_run_id = outcome.report_id, run.id
    with ctx.sessions() as session:
        report = session.get(DriftReport, outcome.report_id)
        run = session.get(RetrainRun, run.id)
        v2 = session.get(ModelVersion, v2.version)
    detail = model_lineage(v2, report=report, run=run)
    lineage = detail["lineage"]
    for view, model in [
        (model_summary(v2), ModelSummary), (detail, ModelDetail), (lineage, Lineage),
        (lineage["training_window"], TrainingWindow), (lineage["report"], ReportSummary),
        (lineage["retrain_run"], RetrainRunView), (report_detail(report), ReportDetail),
        (report_summary(report), ReportSummary), (row_dict(run), RetrainRunView),
    ]:  # fmt: skip
        assert set(view) == set(model.model_fields), model.__name__

    document = client.get("/openapi.json").json()
    paths = {"/models": "/models", "/models/2": "/models/{version}", "/reports": "/reports",
             f"/reports/{report.id}": "/reports/{report_id}", "/reports/latest": "/reports/latest",
             "/retrain/runs": "/retrain/runs", f"/retrain/runs/{run.id}": "/retrain/runs/{run_id}",
             "/health": "/health", "/ready": "/ready"}  # fmt: skip
    for path, template in paths.items():
        answer = client.get(path)
        assert answer.status_code == 200, path
        body = answer.json()
        body = body[0] if isinstance(body, list) else body
        schema = document["paths"][template]["get"]["responses"]["200"]["content"]["application/json"]
        assert set(body) == documented_fields(document, schema["schema"]), path
    lineage_schema = _component(document, "ModelDetail")["properties"]["lineage"]
    assert set(client.get("/models/2").json()["lineage"]) == documented_fields(document, lineage_schema)


def test_a_rejected_version_is_promoted_only_with_a_reason(client, champion) -> None:
    registry = client.app.state.ctx.registry
    v2 = register_copy(registry, champion)
    registry.reject(version=v2.version, reason="mae: candidate MAE 9 is not <= champion MAE 8")
    refusal = (
        "model version 2 was rejected by the gate (mae: candidate MAE 9 is not <= champion MAE 8); "
        'a reason is needed to promote it anyway: send {"reason": "..."}'
    )
    for body in ({}, {"json": {}}, {"json": {"reason": ""}}):
        refused = client.post("/models/2/promote", headers=ADMIN, **body)
        assert (refused.status_code, refused.json()) == (409, {"error": "conflict", "message": refusal})
    assert registry.champion().version == 1
    forced = client.post("/models/2/promote", headers=ADMIN, json={"reason": "holdout was a holiday week"})
    assert (forced.status_code, forced.json()["status"]) == (200, "champion")
    assert registry.get(2).note.endswith("\npromoted: holdout was a holiday week")


def test_promote_without_a_body_records_a_default_reason(client, champion) -> None:
    registry = client.app.state.ctx.registry
    register_copy(registry, champion)
    promoted = client.post("/models/2/promote", headers=ADMIN)
    assert (promoted.status_code, promoted.json()["status"]) == (200, "champion")
    assert registry.get(2).note == "promoted: manual promote via API"
    missing = client.post("/models/9/promote", headers=ADMIN)
    assert (missing.status_code, missing.json()["message"]) == (404, "model version 9 does not exist")


def test_a_damaged_model_file_is_not_promoted_and_v1_keeps_serving(client, champion) -> None:
    registry = client.app.state.ctx.registry
    v2 = register_copy(registry, champion)
    Path(v2.artifact_path).unlink()
    refused = client.post("/models/2/promote", headers=ADMIN, json={"reason": "better"})
    assert (refused.status_code, refused.json()) == (
        409,
        {
            "error": "conflict",
            "message": f"model version 2 not promoted: {v2.artifact_path}: the model file is missing",
        },
    )
    assert (registry.champion().version, registry.get(2).status) == (1, "candidate")
    assert client.get("/ready").json()["model_version"] == 1


def test_ready_names_a_champion_that_failed_to_load_while_an_older_one_serves(client, champion) -> None:
    ctx = client.app.state.ctx
    ctx.holder.stop()  # this test refreshes by hand, as one poll would
    v2 = register_copy(ctx.registry, champion)
    ctx.registry.promote(version=v2.version, reason="better")
    path = Path(v2.artifact_path)
    path.write_bytes(b"truncated")  # damaged on the shared volume after the promotion
    assert ctx.holder.refresh() is False
    ready = client.get("/ready")
    assert (ready.status_code, ready.json()["ready"], ready.json()["model_version"]) == (200, True, 1)
    assert ready.json()["problems"] == [
        f"the registry's champion v2 failed to load; still serving v1: {path}: sha256 {sha256_file(path)} "
        f"does not match the registry's {v2.sha256}"
    ]
    ctx.registry.rollback(reason="v2 cannot be loaded")
    ctx.holder.refresh()
    assert client.get("/ready").json()["problems"] == []


ID_ROUTES = [
    ("GET", "/models/{}", "version", "model version {} does not exist"),
    ("POST", "/models/{}/promote", "version", "model version {} does not exist"),
    ("GET", "/retrain/runs/{}", "run_id", "retrain run {} does not exist"),
    ("GET", "/reports/{}", "report_id", "drift report {} does not exist"),
    ("GET", "/reports/{}/html", "report_id", "drift report {} does not exist"),
]


@pytest.mark.parametrize(("method", "path", "name", "missing"), ID_ROUTES, ids=[r[1] for r in ID_ROUTES])
def test_ids_out_of_the_databases_range_are_refused_naming_the_parameter(
    client, method, path, name, missing
) -> None:
    largest = 2**31 - 1  # the id columns are INTEGER: 32-bit on PostgreSQL
    for value, message in (
        (largest + 1, f"Input should be less than or equal to {largest}"),
        (2**63, f"Input should be less than or equal to {largest}"),  # SQLite's OverflowError, a 500 before
        (99999999999999999999, f"Input should be less than or equal to {largest}"),
        (0, "Input should be greater than or equal to 1"),
        (-3, "Input should be greater than or equal to 1"),
    ):
        response = client.request(method, path.format(value), headers=ADMIN)
        assert (response.status_code, response.json()) == (
            422,
            {
                "error": "invalid_request",
                "message": f"path.{name}: {message}",
                "errors": [{"field": f"path.{name}", "message": message}],
            },
        )
    response = client.request(method, path.format(largest), headers=ADMIN)
    assert (response.status_code, response.json()["message"]) == (404, missing.format(largest))


@pytest.mark.parametrize("path", ["/reports", "/retrain/runs"])
def test_a_list_limit_below_1_is_refused_naming_it(client, path) -> None:
    message = "Input should be greater than or equal to 1"
    for limit in (0, -5):
        response = client.get(path, params={"limit": limit})
        assert (response.status_code, response.json()) == (
            422,
            {
                "error": "invalid_request",
                "message": f"query.limit: {message}",
                "errors": [{"field": "query.limit", "message": message}],
            },
        )
    assert client.get(path, params={"limit": 10**30}).json() == []  # over 500: 500 at most, no overflow


def test_no_champion_means_503_not_a_crash(db_url, tmp_path, make_features) -> None:
    with TestClient(create_app(make_settings(db_url, tmp_path), scheduler=False)) as client:
        response = client.post("/predict", json=make_features())
        assert response.status_code == 503
        assert "driftloop bootstrap" in response.json()["message"]
        assert client.get("/ready").status_code == 503


def test_predict_without_a_model_says_why_when_bootstrap_would_not_help(tmp_path, make_features) -> None:
    """A replica started while PostgreSQL is down has a champion it cannot reach: "run driftloop bootstrap"
    would send the operator the wrong way (bootstrap would find the champion, once the database answers)."""
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/driftloop"  # nothing listens there
    with TestClient(create_app(make_settings(url, tmp_path), scheduler=False)) as client:
        for path, body in (
            ("/predict", make_features()),
            ("/predict/batch", {"instances": [make_features()]}),
        ):
            response = client.post(path, json=body)
            assert response.status_code == 503
            assert response.json()["message"] == (
                "no model is loaded: registry unreachable: OperationalError (checked again every 0.2 s)"
            )


def test_a_champion_trained_on_other_features_is_not_served(
    champion, db_url: str, tmp_path: Path, spec: FeatureSpec
) -> None:
    """The spec lists the same features in another order: serving v1 by position would be silently wrong."""
    raw = yaml.safe_load(
        resources.files("core.specs").joinpath("apartments.yaml").read_text(encoding="utf-8")
    )
    raw["features"][0], raw["features"][1] = raw["features"][1], raw["features"][0]
    swapped = tmp_path / "swapped.yaml"
    swapped.write_text(yaml.safe_dump(raw))
    features = {"area_m2": 84.0, "district": "Mapo-gu"} | {
        f.name: f.min for f in spec.features if f.name not in ("area_m2", "district")
    }
    with TestClient(
        create_app(make_settings(db_url, tmp_path, spec_path=swapped), scheduler=False)
    ) as client:
        response = client.post("/predict", json=features)
        assert response.status_code == 503
        assert response.json()["message"].startswith("no model is loaded: could not load v1: v1 does not fit")
        ready = client.get("/ready")
        assert ready.status_code == 503
        problem = (
            "could not load v1: v1 does not fit the spec (same features in another order: trained on "
            f"{', '.join(spec.feature_names)}); restore the spec it was trained with, or start a new model "
            "line for this spec (a fresh database and artifact directory, then driftloop bootstrap)"
        )
        assert ready.json()["problems"] == [problem]
        # Why, not "run driftloop bootstrap", which would only say the same
        why = f"no model is loaded: {problem} (checked again every 0.2 s)"
        assert response.json()["message"] == why
        batch = client.post("/predict/batch", json={"instances": [features]})
        assert (batch.status_code, batch.json()["message"]) == (503, why)


def test_no_champion_means_no_retrain_run(db_url, tmp_path) -> None:
    with TestClient(create_app(make_settings(db_url, tmp_path), scheduler=False)) as client:
        response = client.post("/retrain", headers=ADMIN)
        assert (response.status_code, response.json()) == (
            409,
            {
                "error": "conflict",
                "message": "no champion to retrain against: run `driftloop bootstrap` (or promote a version)",
            },
        )
        assert client.get("/retrain/runs").json() == []


def test_predict_threads_change_speed_not_answers(
    champion, db_url: str, tmp_path: Path, make_features
) -> None:
    answers = []
    for threads in (1, -1, 3):
        settings = make_settings(db_url, tmp_path, predict_threads=threads)
        with TestClient(create_app(settings, scheduler=False)) as client:
            single = client.post("/predict", json=make_features()).json()["prediction"]
            batch = client.post("/predict/batch", json={"instances": [make_features()] * 3}).json()
            answers.append((single, [p["prediction"] for p in batch["predictions"]]))
    assert answers[0] == answers[1] == answers[2]
    assert answers[0][1] == [answers[0][0]] * 3
    with pytest.raises(ValueError, match="must be -1 \\(all cores\\) or a thread count of at least 1"):
        make_settings(db_url, tmp_path, predict_threads=0)


def test_a_fault_of_ours_is_a_json_500_and_the_service_goes_on(
    champion, db_url, tmp_path, make_features
) -> None:
    app = create_app(make_settings(db_url, tmp_path), scheduler=False)

    @app.get("/fault")
    def fault() -> None:  # a bug or a library failure the routes did not foresee
        raise RuntimeError("boom")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/fault")
        logged_as = response.headers["x-request-id"]
        assert (response.status_code, response.json()) == (
            500,
            {
                "error": "internal",
                "message": "internal error (RuntimeError); the service log has the details, "
                f"under request {logged_as}",
            },
        )
        assert client.post("/predict", json=make_features()).status_code == 200
        assert (
            'driftloop_http_errors_total{endpoint="/fault",status="500"} 1.0' in client.get("/metrics").text
        )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "district: required (null is not allowed: the feature is not nullable)"),
        (1, "district: must be a string, one of the categories, not 1"),
    ],
)
def test_a_category_sent_as_null_or_a_number_is_named_as_such(client, make_features, value, message) -> None:
    response = client.post("/predict", json=make_features(district=value))
    assert (response.status_code, response.json()["message"]) == (422, message)


def test_a_number_sent_as_null_is_named_as_such_as_a_category_is(client, make_features) -> None:
    """It was "Input should be a valid number", which null, JSON's "no value", does not tell apart."""
    null = "required (null is not allowed: the feature is not nullable)"
    for field in ("area_m2", "floor"):
        response = client.post("/predict", json=make_features(**{field: None}))
        assert (response.status_code, response.json()["message"]) == (422, f"{field}: {null}")
        batch = client.post(
            "/predict/batch", json={"instances": [make_features(), make_features(**{field: None})]}
        )
        assert (batch.status_code, batch.json()["message"]) == (422, f"instances[1].{field}: {null}")
    # a label is no feature: its message says what it is
    label = client.post(
        "/feedback", json=[{"prediction_id": "x", "actual": 1}, {"prediction_id": "y", "actual": None}]
    )
    assert (label.status_code, label.json()["message"]) == (
        422, "[1].actual: required (null is not allowed: a label is the value that came true, a number)"
    )  # fmt: skip
    assert logged_rows(client) == 0


def test_predictions_are_served_inside_the_spec_s_target_bounds(
    champion, registry, db_url: str, tmp_path: Path, spec: FeatureSpec, make_features
) -> None:
    """A regression model can answer outside the target's range (a count of −1.5); the service answers
    and logs the nearer bound instead, in /predict and /predict/batch alike."""
    instances = [make_features(area_m2=a) for a in (30.0, 84.0, 200.0)]
    low, mid, high = predict(registry.load(champion), spec.frame(instances), spec, raw=True)
    assert low < mid < high
    raw = yaml.safe_load(
        resources.files("core.specs").joinpath("apartments.yaml").read_text(encoding="utf-8")
    )
    bounds = {"target_min": float((low + mid) / 2), "target_max": float((mid + high) / 2)}
    bounded = tmp_path / "bounded.yaml"
    bounded.write_text(yaml.safe_dump(raw | bounds))
    expected = [bounds["target_min"], pytest.approx(mid), bounds["target_max"]]
    settings = make_settings(db_url, tmp_path, spec_path=bounded, max_batch_size=5)
    with TestClient(create_app(settings, scheduler=False)) as client:
        batch = client.post("/predict/batch", json={"instances": instances})
        assert batch.status_code == 200, batch.text
        assert [p["prediction"] for p in batch.json()["predictions"]] == expected
        singles = [client.post("/predict", json=instance).json() for instance in instances]
        assert [s["prediction"] for s in singles] == expected
        assert logged_rows(client) == 6
        with client.app.state.ctx.sessions() as session:
            stored = {row.id: row.prediction for row in session.scalars(select(PredictionLog))}
        assert [stored[s["prediction_id"]] for s in singles] == expected
        # The prediction histogram spans the spec's target range: 20 equal buckets, each value in its own.
        text = client.get("/metrics").text
        counts = {
            float(le): float(n)
            for le, n in re.findall(r'driftloop_prediction_value_bucket\{le="([^"]+)"\} (\S+)', text)
        }
        width = (bounds["target_max"] - bounds["target_min"]) / 20
        assert list(counts)[:-1] == pytest.approx([bounds["target_min"] + width * k for k in range(1, 21)])
        cumulative = list(counts.values())
        assert cumulative[0] >= 2 and cumulative[19] == cumulative[20] == 6  # the clipped values count too


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1,x,3", "'x' is not a number; give increasing numbers such as 0.1,0.5,1,5"),
        ("1,5,5", "bucket bounds must increase: 1,5,5"),
        ("1,inf", "bucket bounds must be finite (+Inf is always added)"),
        (" , ", "give increasing numbers separated by commas"),
    ],
)
def test_bad_prediction_buckets_are_refused_naming_the_setting(value: str, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(_env_file=None, prediction_buckets=value)
    assert "prediction_buckets" in str(info.value) and message in str(info.value)


def test_configured_prediction_buckets_win_over_the_spec_s(spec: FeatureSpec) -> None:
    assert prediction_buckets(Settings(_env_file=None, prediction_buckets="0.5, 1,2"), spec) == (
        0.5,
        1.0,
        2.0,
    )
    assert prediction_buckets(Settings(_env_file=None, prediction_buckets=""), spec) == VALUE_BUCKETS


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [
        (-0.7, 0.1, 20),  # low + (high - low) * 20 / 20 is 0.09999999999999998: target_max fell in +Inf only
        (5.0, 5.0, 1),  # a constant target: twenty buckets all le="5.0"
        (1e15 - 1, 1e15, 8),  # a range float64 resolves into fewer than 20 steps: repeated bounds
    ],
)
def test_bounded_prediction_buckets_increase_and_end_at_target_max(
    spec: FeatureSpec, low: float, high: float, expected: int
) -> None:
    bounded = dataclasses.replace(spec, target_min=low, target_max=high, _by_name={})
    buckets = prediction_buckets(Settings(_env_file=None), bounded)
    assert (len(buckets), buckets[-1]) == (expected, high)
    assert list(buckets) == sorted(set(buckets))
    registry = CollectorRegistry()
    build_metrics(registry, buckets=buckets).prediction_value.observe(high)  # a value clipped to the bound
    les = re.findall(
        r'driftloop_prediction_value_bucket\{le="([^"]+)"\} (\S+)', generate_latest(registry).decode()
    )
    assert len({le for le, _ in les}) == len(les) == expected + 1  # one series per bound, then +Inf
    assert (float(les[-2][0]), les[-2][1]) == (high, "1.0")


def test_spec_clip_keeps_nan_and_leaves_an_unbounded_target_alone(spec: FeatureSpec) -> None:
    values = np.array([-3.0, 5.0, np.nan, 1e9])
    assert spec.clip(values).tolist()[:2] == [0.0, 5.0] and np.isnan(spec.clip(values)[2])
    assert spec.clip(values)[3] == 1e9  # the shipped spec sets no target_max
    both = dataclasses.replace(spec, target_min=1.0, target_max=10.0, _by_name={})
    assert both.clip(values)[[0, 1, 3]].tolist() == [1.0, 5.0, 10.0]
    free = dataclasses.replace(spec, target_min=None, _by_name={})
    assert free.clip(values) is values


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/feedback", [{"prediction_id": "a\x00b", "actual": 100_000}], "[0].prediction_id"),
        ("/models/2/promote", {"reason": "holiday\x00week"}, "reason"),
        ("/retrain", {"reason": "manual\x00"}, "reason"),
    ],
)
def test_text_holding_a_nul_character_is_refused_naming_the_field(
    client, champion, path, body, field
) -> None:
    # PostgreSQL cannot store NUL in text: the insert failed and the client got a 500, on that backend only.
    register_copy(client.app.state.ctx.registry, champion)
    response = client.post(path, json=body, headers=ADMIN)
    assert (response.status_code, response.json()["errors"]) == (
        422,
        [{"field": field, "message": "must not contain the NUL character (\\u0000)"}],
    )
    assert client.app.state.ctx.registry.champion().version == 1
    assert client.get("/retrain/runs").json() == []


@pytest.mark.parametrize("batch", [False, True])
def test_a_body_after_a_utf8_bom_is_read_on_the_lean_route_as_on_the_others(
    client, make_features, batch
) -> None:
    body = json.dumps({"instances": [make_features()]} if batch else make_features())
    response = post_raw(client, "/predict/batch" if batch else "/predict", "\ufeff" + body)
    assert response.status_code == 200
    assert logged_rows(client) == 1


def test_a_predict_body_that_is_not_utf8_is_named_so(client, make_features) -> None:
    """pydantic-core said "expected value at line 1 column 1" of a UTF-16 body, naming nothing."""
    features = json.dumps(make_features())
    latin1 = features.replace("Mapo-gu", "Map\xe9-gu").encode("latin-1")
    for body, at in [
        (features.encode("utf-16"), "invalid start byte at byte 0"),
        (latin1, "invalid continuation byte at byte 17"),
    ]:
        response = client.post("/predict", content=body, headers={"content-type": "application/json"})
        assert (response.status_code, response.json()["message"]) == (
            422,
            f"body: malformed JSON: not UTF-8 ({at})",
        )
    assert logged_rows(client) == 0


# json.loads reads 995 levels on Python 3.11.7, 1,497 on 3.12.1 and 9,998 on 3.13.0 before a RecursionError;
# 100,000 is past all three (1,500, the depth this used, parses on 3.13).
TOO_DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize("path", ["/predict/batch", "/feedback", "/models/1/promote", "/retrain"])
@pytest.mark.parametrize(
    ("body", "message"),
    [
        (TOO_DEEP, "body: malformed JSON: nested too deeply"),
        (b'{"reason": "\xff"}', "body: malformed JSON: not UTF-8 (invalid start byte at byte 12)"),
        (b"[" + b"9" * 5000 + b"]", "body: malformed JSON: number out of range (more than 4,300 digits)"),
    ],
)
def test_a_body_json_cannot_read_is_named_on_every_route(
    champion, db_url, tmp_path, make_features, path, body, message
) -> None:
    # json.loads raised other than JSONDecodeError: FastAPI answered a bare 400 "There was an error parsing
    # the body", {"error": "error"}, naming nothing.
    settings = make_settings(db_url, tmp_path, max_body_bytes=len(TOO_DEEP))  # the client's 4096 is too few
    with TestClient(create_app(settings, scheduler=False)) as client:
        response = client.post(path, content=body, headers={"content-type": "application/json", **ADMIN})
        assert (response.status_code, response.json()["error"], response.json()["message"]) == (
            422,
            "invalid_request",
            message,
        )
        assert client.post("/predict/batch", json={"instances": [make_features()]}).status_code == 200


def test_shutdown_drains_the_log_before_the_loop_stops(
    champion, db_url: str, tmp_path: Path, make_features, monkeypatch
) -> None:
    """Stopping the loop can wait for a monitor run or an announcer; by then every answered prediction is
    already stored, so a kill at the end of the grace period loses none."""
    settings = make_settings(db_url, tmp_path, log_flush_interval_s=3600, log_batch_size=10_000)
    app = create_app(settings, scheduler=False)
    ctx = app.state.ctx
    stored_when_loop_stopped: list[int] = []
    loop_stop = Loop.stop

    def stop(loop: Loop) -> None:
        with ctx.sessions() as session:
            stored_when_loop_stopped.append(session.scalar(select(func.count()).select_from(PredictionLog)))
        loop_stop(loop)

    monkeypatch.setattr(Loop, "stop", stop)
    with TestClient(app) as client:
        for _ in range(7):
            assert client.post("/predict", json=make_features()).status_code == 200
    assert stored_when_loop_stopped == [7]


@contextmanager
def writer_not_running(db_url: str, tmp_path: Path) -> Iterator[tuple[TestClient, Any]]:
    """A client of an app that serves, but whose log writer is not running: every answered row waits in its
    queue (a test may start the writer). Stopped and disposed of at the end."""
    app = create_app(make_settings(db_url, tmp_path), scheduler=False)
    ctx = app.state.ctx
    ctx.holder.start()
    try:
        yield TestClient(app), ctx
    finally:
        ctx.logger.stop()
        ctx.holder.stop()
        ctx.engine.dispose()


def test_feedback_for_a_prediction_not_yet_stored_is_retried_not_unknown(
    champion, db_url: str, tmp_path: Path, make_features, monkeypatch
) -> None:
    """A label for a prediction this process answered but could not store yet is a 503 to retry; answering
    'unknown' would tell the client to drop it."""
    monkeypatch.setattr("service.routes.feedback.IN_FLIGHT_WAIT_S", 0.2)
    with writer_not_running(db_url, tmp_path) as (client, ctx):
        pid = client.post("/predict", json=make_features()).json()["prediction_id"]
        label = [{"prediction_id": pid, "actual": 50_000}]
        behind = client.post("/feedback", json=label)
        assert (behind.status_code, behind.headers["retry-after"]) == (503, "1")
        assert behind.json()["message"].startswith(
            "1 of these predictions were answered but are not stored yet"
        )
        with ctx.sessions() as session:
            assert session.scalar(select(func.count()).select_from(GroundTruth)) == 0
        ctx.logger.start()
        assert client.post("/feedback", json=label).json() == {
            "accepted": 1,
            "updated": 0,
            "duplicate": 0,
            "unknown": [],
        }


def test_labels_for_unstored_predictions_wait_a_few_at_a_time(
    champion, db_url: str, tmp_path: Path, make_features, monkeypatch
) -> None:
    """Each waiting request holds one of the threads sync routes share (60 held /ready for 4 s on a live
    serve): past MAX_WAITING, a label for a prediction not stored yet is told to retry at once."""
    monkeypatch.setattr("service.routes.feedback.IN_FLIGHT_WAIT_S", 3)
    with writer_not_running(db_url, tmp_path) as (client, ctx):
        pid = client.post("/predict", json=make_features()).json()["prediction_id"]
        label = [{"prediction_id": pid, "actual": 1}]
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda _: client.post("/feedback", json=label), range(20)))
        assert {a.status_code for a in answers} == {503}
        # 12 of the 20, unless some came only after the first 8 had waited their 3 s
        told_at_once = [a for a in answers if "and 8 requests already wait for it" in a.json()["message"]]
        assert 1 <= len(told_at_once) <= 12
        assert told_at_once[0].headers["retry-after"] == "3"
        with ctx.sessions() as session:
            assert session.scalar(select(func.count()).select_from(GroundTruth)) == 0


def test_a_path_no_route_takes_is_named(client) -> None:
    """Starlette's 404 said "Not Found", naming neither the path nor where the routes are listed."""
    for path, named in [("/v1/predict", "/v1/predict"), ("/x" * 100, "/x" * 50 + "… (200 characters)")]:
        response = client.get(path)
        assert response.status_code == 404
        assert response.json() == {
            "error": "not_found",
            "message": f"no route takes the path {named!r}: GET /docs lists them",
        }
    assert client.get("/models/9").json()["message"] == "model version 9 does not exist"  # a route's own


def test_a_method_a_route_does_not_take_is_named_with_the_ones_it_does(client) -> None:
    response = client.get("/predict")
    assert response.status_code == 405
    assert response.json() == {
        "error": "method_not_allowed",
        "message": "GET is not allowed on /predict; it takes POST",
    }
    assert response.headers["allow"] == "POST"
    # The path is echoed cut, as a 404's is: a 20,000-character one came back whole.
    long = "/models/" + "9" * 20_000
    response = client.delete(long)
    assert (response.status_code, response.headers["allow"]) == (405, "GET, HEAD")
    assert response.json()["message"] == (
        f"DELETE is not allowed on {long[:100]}… (20,008 characters); it takes GET, HEAD"
    )


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE", "OPTIONS"])
def test_rollback_by_another_method_is_405_not_a_bad_version(client, method: str) -> None:
    """/models/rollback is POST only; /models/{version} must not read 'rollback' as a malformed version."""
    response = client.request(method, "/models/rollback")
    assert (response.status_code, response.headers["allow"]) == (405, "POST")
    if method != "HEAD":
        assert response.json() == {
            "error": "method_not_allowed",
            "message": f"{method} is not allowed on /models/rollback; it takes POST",
        }
    assert client.get("/models/1").status_code == 200


class _NanModel:
    def predict(self, row: object, thread_count: int = 1) -> float:
        return math.nan


def test_every_fault_of_ours_is_named_internal(client, make_features) -> None:
    # The non-finite-prediction 500 is an HTTPException: named by HTTP's phrase it was
    # "internal_server_error", beside "internal" for every other 500 (and phrases vary by Python release).
    ctx = client.app.state.ctx
    ctx.holder.current = dataclasses.replace(ctx.holder.current, model=_NanModel())
    response = client.post("/predict", json=make_features())
    assert (response.status_code, response.json()) == (
        500,
        {"error": "internal", "message": "the model produced a non-finite prediction; nothing was logged"},
    )
    assert logged_rows(client) == 0


def test_feedback_on_a_table_that_is_gone_is_a_fault_not_an_outage(client) -> None:
    """A missing table is SQL the database cannot run, not an outage to wait out (core.db.unreachable):
    a 500 with the traceback in the service log, as on every other route, not a 503 telling the client
    to retry a request that cannot succeed (SQLite raises OperationalError, PostgreSQL ProgrammingError)."""
    with client.app.state.ctx.sessions.begin() as session:
        session.execute(text("DROP TABLE ground_truth"))
    response = client.post("/feedback", json=[{"prediction_id": "no-such-id", "actual": 1.0}])
    assert (response.status_code, response.json()["error"]) == (500, "internal")
    assert "retry-after" not in response.headers


def test_a_category_or_field_written_otherwise_says_which_it_resembles(client, make_features) -> None:
    """/predict names a known category sent with blanks around it or in other letter case, or a category or
    feature name in another Unicode form (macOS writes Korean decomposed, NFD), as ingest and bootstrap do:
    the quotes alone hide the difference, so "unknown category '아파트'; expected '아파트', …" told the
    client nothing."""
    response = client.post("/predict", json=make_features(district=" Mapo-gu"))
    assert response.json()["message"].startswith(
        "district: unknown category ' Mapo-gu' (the category 'Mapo-gu' with blanks around it); expected"
    )
    for sent in ("mapo-gu", "MAPO-GU ", "Mapo-Gu"):  # 25 districts follow: the case hid among them
        response = client.post("/predict", json=make_features(district=sent))
        assert response.json()["message"].startswith(
            f"district: unknown category {sent!r} (the category is written 'Mapo-gu'); expected"
        )
    spec = parse_spec({
        "dataset": "homes", "target": "가격",
        "features": [{"name": "주택 유형", "type": "categorical", "categories": ["아파트", "빌라"]}],
    })  # fmt: skip
    nfd = unicodedata.normalize("NFD", "아파트"), unicodedata.normalize("NFD", "주택 유형")
    form = "in another Unicode form: NFD and NFC look alike but differ; write both in one"
    with pytest.raises(ValidationError) as caught:
        spec.request_model().model_validate({"주택 유형": nfd[0]})
    assert describe(caught.value.errors()[0], spec)["message"].startswith(
        f"unknown category '{nfd[0]}' (the category '아파트' {form}); expected"
    )
    with pytest.raises(ValidationError) as caught:
        spec.request_model().model_validate({nfd[1]: "빌라"})
    messages = [describe(e, spec) for e in caught.value.errors()]
    assert {"field": nfd[1], "message": f"unknown field (the feature '주택 유형' {form})"} in messages


def test_an_unknown_category_of_many_levels_lists_ten_and_counts_the_rest(client, make_features) -> None:
    """A categorical of many levels (a car model, a store) listed every one of them in each refusal: 300
    levels made one unknown category a 2.6 kB message, 5,000 levels 45 kB, and a batch's 100 listed
    errors 4.5 MB, where the backtest names ten. The OpenAPI document lists them all."""
    response = client.post("/predict", json=make_features(district="Atlantis-gu"))
    first = ", ".join(repr(c) for c in client.app.state.ctx.spec.feature("district").categories[:10])
    assert (response.status_code, response.json()["message"]) == (
        422,
        f"district: unknown category 'Atlantis-gu'; expected {first} or one of 15 more "
        "(/openapi.json lists all)",
    )
    stores = [f"s{i:04d}" for i in range(5000)]
    spec = parse_spec({
        "dataset": "shops", "target": "sales",
        "features": [{"name": "store", "type": "categorical", "categories": stores}],
    })  # fmt: skip
    with pytest.raises(ValidationError) as caught:
        spec.request_model().model_validate({"store": "S0001 "})
    assert describe(caught.value.errors()[0], spec)["message"] == (
        "unknown category 'S0001 ' (the category is written 's0001'); expected 's0000', 's0001', 's0002', "
        "'s0003', 's0004', 's0005', 's0006', 's0007', 's0008', 's0009' or one of 4,990 more (/openapi.json "
        "lists all)"
    )
    few = parse_spec({
        "dataset": "shops", "target": "sales",
        "features": [{"name": "region", "type": "categorical", "categories": ["NA", "01", "02"]}],
    })  # fmt: skip
    with pytest.raises(ValidationError) as caught:
        few.request_model().model_validate({"region": "1"})
    message = describe(caught.value.errors()[0], few)["message"]
    assert message == "unknown category '1'; expected 'NA', '01' or '02'"


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_ready_answers_and_names_a_database_that_does_not_reply(client, pg_cluster) -> None:
    """A frozen server (its connections open, no reply) held /ready until TCP gave up: every replica failed
    its readiness probe at once, and predictions, which the spool keeps going, stopped with it."""
    answers: list[Any] = []
    with pg_cluster.frozen():
        probe = threading.Thread(target=lambda: answers.append(client.get("/ready")), daemon=True)
        probe.start()
        probe.join(30)  # the bound of a hang, not a speed check: the probe's own wait is 1 s
        assert answers, "/ready did not answer while the database hung"
    ready = answers[0]
    assert (ready.status_code, ready.json()["ready"]) == (200, True)
    [problem] = ready.json()["problems"]
    assert problem.startswith("database not answering: SELECT 1 has waited ")
    assert client.get("/ready").json()["problems"] == []  # the hung check ends with the freeze
