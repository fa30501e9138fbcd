"""A lean route for the hot path: FastAPI documents it, but the endpoint reads its own body. And the route
class of every other route with a body, which refuses a JSON object naming a key twice, as read_json does.

A `LeanRoute` endpoint is a plain `async (request) -> Response`: no dependency resolution, and the body
is parsed and validated in one pass by pydantic-core instead of json.loads plus field-by-field checks.
On POST /predict that framework work was a fifth of the time per request. Errors are the same
RequestValidationError FastAPI raises, so they reach the same handler and read the same.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

from service.auth import TOKEN_CHECKS
from service.errors import DuplicateKey, duplicate_key_error, is_json_media, parse_problem, unique_keys
from service.middleware import header

M = TypeVar("M", bound=BaseModel)


class LeanRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return self.endpoint


async def read_json(request: Request, model: type[M]) -> M:
    """The request's JSON body as `model`; error locations start with 'body', as FastAPI's do.

    Like FastAPI's strict default, a body must be declared application/json (or +json).
    """
    body = await request.body()
    if not body:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
    declared = header(request.scope, b"content-type") or b""
    if not is_json_media(declared.decode("latin-1")):
        got = declared.decode("latin-1") if declared else "none"
        message = f"Content-Type must be application/json, got {got}"
        raise RequestValidationError([{"type": "content_type", "loc": ("body",), "msg": message}])
    try:
        # A UTF-8 BOM (which RFC 8259 lets a parser ignore) is read past, as json.loads does on FastAPI's
        # routes: pydantic-core refused it with "expected value at line 1 column 1", naming nothing.
        instance = model.model_validate_json(body.removeprefix(codecs.BOM_UTF8))
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if errors[0]["type"] == "json_invalid":
            # "expected value at line 1 column 1" for UTF-16 names nothing: say why, as the other routes do
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as cause:
                invalid = {"type": "json_invalid", "loc": ("body",), "ctx": {"error": parse_problem(cause)}}
                raise RequestValidationError([invalid]) from None
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from None
    # pydantic-core keeps the last of a key given twice. Every key in the body is a field set (the models
    # forbid others), so a body with no more colons than fields set names none twice: a count, not a parse,
    # on the hot path; a colon inside a string only costs the parse.
    if body.count(b":") > len(instance.model_fields_set):
        try:
            json.loads(body, object_pairs_hook=unique_keys)
        except DuplicateKey as exc:
            raise duplicate_key_error(exc) from None
        except ValueError:
            pass  # read and validated above: json's own quibbles are not the client's to hear about
    return instance


class UniqueKeysRequest(Request):
    """A request whose JSON body is refused when an object in it names a key twice (see DuplicateKey)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), object_pairs_hook=unique_keys)
        return self._json


class StrictJsonRoute(APIRoute):
    """A FastAPI route that reads its JSON body through UniqueKeysRequest; every route but the lean one.

    A route that needs a token checks it first: FastAPI reads and parses the body before it resolves any
    dependency, so a client without the token was told what is wrong with its JSON (422, 415) instead of
    401, and made the service read a body up to the limit for nothing."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        guards = [d.call for d in self.dependant.dependencies if d.call in TOKEN_CHECKS]

        async def route(request: Request) -> Response:
            for guard in guards:
                guard(request, None)  # raises the 401 (or 403); FastAPI calls it again, to the same end
            return await handler(UniqueKeysRequest(request.scope, request.receive))

        return route


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI `requestBody` for a lean route: what a `Body()` parameter of type `model` would document."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }
