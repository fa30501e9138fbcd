"""Pure-ASGI middleware: faults answered without dropping the connection, each answer's X-Request-ID,
request metrics by route template, and a request-body size limit."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from contextvars import ContextVar
from http import HTTPStatus
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.db import error_line, unreachable
from core.metrics import Metrics

log = logging.getLogger("driftloop.service")
# nginx's "client closed request": counted for a client that hung up before its body was in. No answer
# reaches it, and it is not ours to alert on as a 5xx.
CLIENT_CLOSED = 499
DATABASE_RETRY_AFTER_S = 5  # Retry-After of a 503 for a database outage
REQUEST_ID = b"x-request-id"
# A caller's id is kept when it could be nobody's trick: a load balancer's or a client's UUID, a trace id.
# Anything else (too long, a space, a quote, a control character) is replaced, never refused.
_CALLERS_ID = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}")
# The id of the request being answered, for log lines that do not name it themselves (uvicorn's access log)
_current_id: ContextVar[str] = ContextVar("request_id", default="-")


class Faults:
    """A fault of ours answers the JSON 500 and the connection stays open.

    Starlette's ServerErrorMiddleware re-raises after answering, and uvicorn then drops the keep-alive
    connection: a client's next request on it, however good, fails with a reset. Outermost of ours, so
    RequestMetrics still counts the 500. A client that hung up mid-body is logged as that, not answered.

    HEAD is answered as GET, without the body (RFC 9110: a server supports HEAD wherever it supports GET):
    FastAPI's routes answered `curl -I /health`, or a monitor's HEAD probe, with 405.

    Every answer carries `X-Request-ID`: the caller's, when it sent a sane one, else a new one. The log
    lines written here name it, so a client's report of a 500 or a 503 finds its traceback.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        head = scope["method"] == "HEAD"
        if head:
            scope = {**scope, "method": "GET"}
        rid = request_id(scope)
        tag = (REQUEST_ID, rid.encode("ascii"))
        # uvicorn writes its access-log line as the answer starts, in this task: RequestIdFilter reads it
        current = _current_id.set(rid)

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", ()), tag]}
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except ClientDisconnect:
            method, path = scope.get("method"), loggable_path(scope)
            log.info(
                "client closed the connection before its body was in: %s %s (request %s)", method, path, rid
            )
        except Exception as exc:
            if started:  # half an answer is out: only closing the connection tells the client
                raise
            method, path = scope.get("method"), loggable_path(scope)
            if unreachable(exc):  # an outage to wait out, not a fault: 503, and no traceback per request
                log.warning(
                    "%s %s: database unavailable (%s) (request %s)", method, path, error_line(exc), rid
                )
                message = f"database unavailable ({type(exc).__name__}): retry shortly"
                body = {"error": error_name(503), "message": message}
                retry = [(b"retry-after", str(DATABASE_RETRY_AFTER_S).encode()), tag]
                await _send_json(send, 503, body, headers=retry)
                return
            log.exception("internal error on %s %s (request %s)", method, path, rid)
            await _send_json(send, 500, internal_error_body(exc, request_id=rid), headers=[tag])
        finally:
            _current_id.reset(current)


class RequestIdFilter(logging.Filter):
    """Gives a log record `request_id`: the X-Request-ID of the answer it is written for, "-" outside one.
    `driftloop serve --access-log` and `worker --access-log` put it on uvicorn's access-log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _current_id.get()
        return True


def request_id(scope: Scope) -> str:
    """The caller's X-Request-ID when it is a sane one, else a new id: 32 hex digits, a random half per
    process and a count (uuid4 took 2 µs a request, half of what this middleware costs on /predict)."""
    sent = header(scope, REQUEST_ID)
    if sent is not None and _CALLERS_ID.fullmatch(sent):
        return sent.decode("ascii")
    return f"{_id_prefix}{next(_id_count):016x}"


def _new_id_prefix() -> None:
    global _id_prefix
    _id_prefix = os.urandom(8).hex()


_id_prefix = ""
_id_count = itertools.count()
_new_id_prefix()
os.register_at_fork(after_in_child=_new_id_prefix)  # a forked worker counts under a prefix of its own


# One name per status for every error body (middleware, validation, Faults, an HTTPException): not HTTP's
# phrase for these (500 was "internal_server_error"; Python 3.13 renamed 413's and 422's).
_NAMES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 409: "conflict",
    413: "body_too_large", 422: "invalid_request", 500: "internal", 503: "unavailable",
}  # fmt: skip


def error_name(status: int) -> str:
    """The body's "error" for a status: 405 → method_not_allowed (HTTP's own phrase, as an identifier)."""
    if status in _NAMES:
        return _NAMES[status]
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


def internal_error_body(exc: BaseException, *, request_id: str | None = None) -> dict[str, str]:
    logged = (
        f"the service log has the details, under request {request_id}"
        if request_id
        else "the service log has the details"
    )
    return {"error": error_name(500), "message": f"internal error ({type(exc).__name__}); {logged}"}


class BodyLimit:
    """Answer 413 before the app sees a body larger than `max_bytes` (declared or streamed), and 415 for a
    compressed one: no route decompresses, so a gzip body read as JSON was "expected value at line 1 column
    1" on /predict and "not UTF-8" on the others, naming neither the header nor the cure."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        encoding = header(scope, b"content-encoding")
        if encoding is not None and encoding.strip().lower() not in (b"", b"identity"):
            named = encoding.decode("latin-1")
            named = named if len(named) <= 100 else f"{named[:100]}…"
            problem = f"Content-Encoding {named!r} is not supported: send the body uncompressed"
            await _error(send, 415, problem, headers=[(b"accept-encoding", b"identity")])
            return
        declared = header(scope, b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await _error(send, 400, "content-length: not a number")
                return
            if size > self.max_bytes:
                await _error(send, 413, self._too_large(size))
                return
            await self.app(scope, receive, send)
            return
        # Chunked upload: read it whole (bounded), then hand the app one message.
        chunks: list[bytes] = []
        total = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await _error(send, 413, self._too_large(total))
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _too_large(self, size: int) -> str:
        return f"body: {size} bytes is over the limit of {self.max_bytes} bytes (DRIFTLOOP_MAX_BODY_BYTES)"


class RequestMetrics:
    """Counts and times every request under its route template (`/models/{version}`), never the raw path."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        # Label lookups take a lock and hash the labels; routes and statuses are few, so keep the children.
        self._children: dict[tuple[str, int], tuple[Any, Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except ClientDisconnect:
            status = CLIENT_CLOSED
            raise
        finally:
            endpoint = route_template(scope)
            children = self._children.get((endpoint, status)) or self._child(endpoint, status)
            requests, errors, seconds = children
            requests.inc()
            if errors is not None:
                errors.inc()
            seconds.observe(time.perf_counter() - start)

    def _child(self, endpoint: str, status: int) -> tuple[Any, Any, Any]:
        m, code = self.metrics, str(status)
        children = (
            m.http_requests.labels(endpoint=endpoint, status=code),
            m.http_errors.labels(endpoint=endpoint, status=code) if status >= 400 else None,
            m.http_seconds.labels(endpoint=endpoint),
        )
        self._children[(endpoint, status)] = children
        return children


def route_template(scope: Scope) -> str:
    """The template of the route a request is for (`/models/{version}`), else "unmatched": never the raw
    path, which any client can make a new series of. A route that handled the request is in the scope; one
    that did not is matched here: a 413, 415 or 499 of BodyLimit's, answered before routing (they were
    all "unmatched", so /predict's 413s were counted as no route's), and FastAPI's own /docs and
    /openapi.json, which it does not record in the scope."""
    route = scope.get("route")
    if route is None:
        router = getattr(scope.get("app"), "router", None)
        route = _matching(getattr(router, "routes", ()), scope)
    return getattr(route, "path", None) or "unmatched"


def _matching(routes: Sequence[Any], scope: Scope) -> Any:
    """The first of `routes` that matches `scope` (a method it does not take too: a 405's), descending
    into a router FastAPI's include_router wrapped; None for none."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            if (found := _matching(included.routes, scope)) is not None:
                return found
        elif getattr(route, "path", None) and route.matches(scope)[0] is not Match.NONE:
            return route
    return None


def loggable_path(scope: Scope) -> str:
    """The request's path for a log line, as the client sent it (percent-encoded): the decoded path of
    `/models/1%0A…` holds a newline, and any client could write a log line of its own with it."""
    raw = scope.get("raw_path") or str(scope.get("path", "")).encode("utf-8", "backslashreplace")
    return raw.decode("ascii", "backslashreplace").translate(_CONTROL)


# What is left of control characters after percent-encoding (a server that let one through): escaped.
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of a (lower-case) header in an ASGI scope, without building a dict of them all."""
    return next((value for key, value in scope["headers"] if key == name), None)


async def _error(
    send: Send, status: int, message: str, *, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await _send_json(send, status, {"error": error_name(status), "message": message}, headers=headers)


async def _send_json(
    send: Send, status: int, content: dict[str, str], *, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(content).encode()
    start: list[tuple[bytes, bytes]] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *(headers or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": body})
