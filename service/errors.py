"""Error bodies that name the field: {"error", "message", "errors": [{"field", "message"}]}."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from core.files import FORMS, unicode_twin
from core.spec import FeatureSpec, lookalike_hint
from service.middleware import error_name, internal_error_body


def field_path(loc: Sequence[Any]) -> str:
    """('body', 'instances', 3, 'area_m2') -> 'instances[3].area_m2'; the body itself -> 'body'."""
    parts = list(loc[1:]) if loc and loc[0] == "body" else list(loc)
    path = ""
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + str(part)
    return path or "body"


# A body can hold many thousands of problems (unknown keys, say): an answer lists this many, and echoes this
# many characters of a name or value the client sent. Listing them all made a 2 MB body a 9 MB answer.
MAX_LISTED = 100
MAX_ECHO = 100
# An unknown category's refusal names this many of the feature's categories, as the backtest does, and
# counts the rest.
MAX_CATEGORIES = 10


def clip(text: str) -> str:
    """`text` as echoed back to a client: its start, and its length when that is all."""
    return text if len(text) <= MAX_ECHO else f"{text[:MAX_ECHO]}… ({len(text):,} characters)"


NOT_NULLABLE = "required (null is not allowed: the feature is not nullable)"
NULL_LABEL = "required (null is not allowed: a label is the value that came true, a number)"


def describe(error: dict[str, Any], spec: FeatureSpec | None = None) -> dict[str, str]:
    """One problem as {"field", "message"}; with the served `spec`, a category or field name that is a
    known one written otherwise (blanks, another Unicode form) says which."""
    kind = error.get("type", "")
    loc = error.get("loc", ())
    if kind == "json_invalid":
        ctx = error.get("ctx", {})
        return {"field": "body", "message": f"malformed JSON: {ctx.get('error', error.get('msg'))}"}
    field = clip(field_path(loc))
    if kind == "extra_forbidden":
        twin = unicode_twin(str(loc[-1]), spec.feature_names) if spec and loc else None
        hint = f" (the feature {twin!r} in another Unicode form{FORMS})" if twin is not None else ""
        return {"field": field, "message": "unknown field" + hint}
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return {"field": field, "message": "must be a JSON object"}
    if kind == "missing":
        return {"field": field, "message": "required"}
    if kind == "finite_number":
        return {"field": field, "message": "must be a finite number (NaN/Infinity are not allowed)"}
    if kind in ("float_type", "int_type") and "input" in error and error["input"] is None:
        # "Input should be a valid number" of a null; /feedback's items are ('body', i, 'actual'), and a
        # feature named actual is ('body', 'actual') or ('body', 'instances', i, 'actual')
        label = len(loc) == 3 and isinstance(loc[1], int) and loc[2] == "actual"
        return {"field": field, "message": NULL_LABEL if label else NOT_NULLABLE}
    if kind == "literal_error":  # a category: say what was sent, not only the (long) list of what may be
        sent = error.get("input")
        if sent is None:
            return {"field": field, "message": NOT_NULLABLE}
        if not isinstance(sent, str):
            message = f"must be a string, one of the categories, not {clip(repr(sent))}"
            return {"field": field, "message": message}
        expected = error.get("ctx", {}).get("expected", "")
        name = loc[-1] if loc else None
        known = spec.feature(name).categories if spec and name in spec.feature_names else ()
        if len(known) > MAX_CATEGORIES:  # a car model or a store can have thousands: each refusal listed all
            shown = ", ".join(clip(repr(c)) for c in known[:MAX_CATEGORIES])
            expected = f"{shown} or one of {len(known) - MAX_CATEGORIES:,} more (/openapi.json lists all)"
        hint = lookalike_hint(sent, known)
        return {"field": field, "message": f"unknown category {clip(repr(sent))}{hint}; expected {expected}"}
    return {"field": field, "message": error.get("msg", "invalid")}


def is_json_media(content_type: str | None) -> bool:
    """application/json or application/…+json, parameters aside."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = exc.errors()
    spec = getattr(getattr(request.app.state, "ctx", None), "spec", None)
    errors = [describe(e, spec) for e in problems[:MAX_LISTED]]
    declared = request.headers.get("content-type")
    if not is_json_media(declared) and any(
        e["field"] == "body" and e["message"] != "required" for e in errors
    ):
        # FastAPI does not parse a body declared as anything but JSON; "must be a JSON object" would mislead.
        # 415, as for a compressed body (RFC 9110: content in a format the route does not take), not 422.
        message = f"Content-Type must be application/json, got {clip(declared) if declared else 'none'}"
        return JSONResponse({"error": error_name(415), "message": message}, status_code=415)
    message = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:10])
    if len(problems) > 10:
        message += f"; and {len(problems) - 10:,} more" + (
            f" (the first {MAX_LISTED} are listed in errors)" if len(problems) > MAX_LISTED else ""
        )
    return JSONResponse({"error": error_name(422), "message": message, "errors": errors}, status_code=422)


class DuplicateKey(ValueError):
    """A JSON object that names one key twice. json.loads and pydantic-core keep the last value, silently:
    `{"actual": 1, "actual": 7}` stored a label of 7 for a client that may have meant 1."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads's object_pairs_hook: the object, or DuplicateKey for a key it names twice."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return obj


def duplicate_key_error(exc: DuplicateKey) -> RequestValidationError:
    message = (
        f"the key {clip(repr(exc.key))} is given twice in one object: which value is meant? send it once"
    )
    return RequestValidationError([{"type": "duplicate_key", "loc": ("body",), "msg": message}])


PARSE_FAILURE = "There was an error parsing the body"  # FastAPI's words for a body json.loads raised on


def parse_problem(cause: BaseException) -> str:
    """What FastAPI's json.loads failed on, beyond a plain syntax error (which it reports itself)."""
    if isinstance(cause, RecursionError):
        return "nested too deeply"
    if isinstance(cause, UnicodeDecodeError):
        return f"not UTF-8 ({cause.reason} at byte {cause.start})"
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        # Python's words tell the client to call sys.set_int_max_str_digits(); /predict says "out of range"
        return f"number out of range (more than {sys.get_int_max_str_digits():,} digits)"
    return f"{type(cause).__name__}: {cause}"


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if isinstance(exc.__cause__, ClientDisconnect):
        raise exc.__cause__  # no one to answer: middleware counts it as such (FastAPI made it a 400)
    if exc.status_code == 400 and exc.detail == PARSE_FAILURE and isinstance(exc.__cause__, DuplicateKey):
        return await validation_error(request, duplicate_key_error(exc.__cause__))
    if exc.status_code == 400 and exc.detail == PARSE_FAILURE and exc.__cause__ is not None:
        # Answered as every other malformed body is, naming the problem: not a bare 400 "error".
        invalid = {"type": "json_invalid", "loc": ("body",), "ctx": {"error": parse_problem(exc.__cause__)}}
        return await validation_error(request, RequestValidationError([invalid]))
    headers = getattr(exc, "headers", None)
    message = exc.detail
    if exc.status_code == 404 and request.scope.get("route") is None:  # Starlette's "Not Found": no route
        message = f"no route takes the path {clip(request.url.path)!r}: GET /docs lists them"
    if exc.status_code == 405 and headers and headers.get("Allow"):
        allowed = [method.strip() for method in headers["Allow"].split(",")]
        if "GET" in allowed and "HEAD" not in allowed:  # middleware.Faults answers HEAD wherever GET is
            headers = {**headers, "Allow": ", ".join([*allowed, "HEAD"])}
        message = f"{request.method} is not allowed on {clip(request.url.path)}; it takes {headers['Allow']}"
    return JSONResponse(
        {"error": error_name(exc.status_code), "message": message},
        status_code=exc.status_code,
        headers=headers,
    )


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """A fault of ours, in the same JSON shape as every other error; the traceback goes to the log.

    Only a fault outside middleware.Faults (which answers the others) reaches this."""
    return JSONResponse(internal_error_body(exc), status_code=500)


class ErrorBody(BaseModel):
    """Every error's body."""

    error: str = Field(description="What kind of error, as an identifier: invalid_request, not_found, …")
    message: str = Field(description="What is wrong, naming the field, header or setting at fault.")


class FieldProblem(BaseModel):
    field: str = Field(description="Where: `instances[3].area_m2`, `[0].actual`, `path.version`, `body`.")
    message: str


class InvalidRequest(ErrorBody):
    """A 422's body: the problems, each naming its field (the first 100; `message` counts the rest)."""

    errors: list[FieldProblem]


INVALID_REQUEST = "Invalid request: every problem names its field"
ANY_OTHER_ERROR = "Any other error (401, 403, 404, 405, 409, 413, 415, 500, 503): what is wrong, in `message`"


def document_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema`, an OpenAPI document FastAPI generated, with its error answers described as they are sent:
    FastAPI documents its own `{"detail": [{"loc", "msg", "type"}]}` for a 422, which no route of ours
    answers, and no other error at all."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    invalid = InvalidRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(invalid.pop("$defs", {}))
    components["InvalidRequest"] = invalid
    components["ErrorBody"] = ErrorBody.model_json_schema()
    answer = {"schema": {"$ref": "#/components/schemas/InvalidRequest"}}
    other = {"schema": {"$ref": "#/components/schemas/ErrorBody"}}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            if "422" in responses:
                responses["422"] = {"description": INVALID_REQUEST, "content": {"application/json": answer}}
            responses.setdefault(
                "default", {"description": ANY_OTHER_ERROR, "content": {"application/json": other}}
            )
    return schema


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
