"""From exceptions to answers: the one place where errors get their HTTP shape.

Shapes are Prefect's: ``{"detail": ...}`` for explicit errors, ``{"exception_message",
"exception_detail", "request_body"}`` for invalid requests, ``{"exception_message": "Internal
Server Error"}`` for bugs. A database that cannot be reached answers 503, never 500. Every body
also carries the error's stable ``code`` (:data:`slotkeeper.errors.CODES`), which Prefect's
client ignores and slotkeeper's clients read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from slotkeeper.api.responses import json_response
from slotkeeper.errors import (
    DatabaseUnavailable,
    DomainError,
    ShuttingDown,
    SlotkeeperError,
    SlotsUnavailable,
    StorageClosed,
    http_status,
)

log = logging.getLogger("slotkeeper.api")

#: The code of an HTTP-level refusal (Starlette's ``HTTPException``), by status.
HTTP_CODES = {
    400: "bad_request",
    404: "route_not_found",
    405: "method_not_allowed",
    413: "body_too_large",
}


def _readable(value: Any) -> Any:
    """``value`` with every ``bytes`` in it decoded, undecodable bytes replaced: a body that is
    not UTF-8 is echoed (as FastAPI would fail to encode it) instead of crashing its 422."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {k: _readable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_readable(v) for v in value]
    return value


async def _domain(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DomainError)
    headers = None
    if isinstance(exc, SlotsUnavailable) and exc.retry_after is not None:
        headers = {"Retry-After": str(exc.retry_after)}
    return json_response({"detail": exc.detail, "code": exc.code}, http_status(exc), headers)


def _jsonable(value: Any) -> Any:
    """What orjson cannot write itself, as FastAPI's encoder writes it (bytes decoded)."""
    return jsonable_encoder(_readable(value))


async def _invalid(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    content = {
        "exception_message": "Invalid request received.",
        "exception_detail": exc.errors(),
        "request_body": exc.body,
        "code": "invalid_request",
    }
    try:
        # orjson first: FastAPI's encoder walks the echoed input in Python (seconds for a list
        # of a million names, on the event loop), orjson in native code.
        data = orjson.dumps(content, default=_jsonable)
    except TypeError:
        # The echoed input holds what orjson refuses (an int beyond 64 bits, a lone surrogate);
        # the stdlib writes both (the surrogate as a \u escape), so the caller still gets a 422.
        data = json.dumps(_jsonable(content)).encode()
    return Response(data, 422, media_type="application/json")


async def _http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = HTTP_CODES.get(exc.status_code, "http_error")
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = _allowed(request)
    return json_response({"detail": exc.detail, "code": code}, exc.status_code, headers)


def _allowed(request: Request) -> str:
    """The methods of the path's own routes. Starlette's ``Allow`` names those of the first route
    whose pattern matches: ``PUT .../concurrency_limits/increment`` got ``Allow: GET``, from the
    route reading a limit by name, not ``POST``. A route that names the path literally is the
    path's own; a path no route names literally is served by every pattern that matches it."""
    path = request.scope["path"]
    literal: set[str] = set()
    patterned: set[str] = set()
    for pattern, served, has_params in getattr(request.app, "route_methods", ()):
        if pattern.match(path):
            (patterned if has_params else literal).update(served)
    return ", ".join(sorted(literal or patterned))


async def _database(request: Request, exc: Exception) -> Response:
    log.error("database unavailable: %s", exc)
    code = exc.code if isinstance(exc, SlotkeeperError) else "database_unavailable"
    body = {"detail": "The database is unavailable; try again.", "code": code}
    return json_response(body, 503, {"Retry-After": "1"})


async def _shutting_down(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ShuttingDown)
    body: dict[str, Any] = {"detail": exc.detail, "code": exc.code}
    if exc.waiter_id is not None:
        body["waiter_id"] = exc.waiter_id
    return json_response(body, 503, {"Retry-After": str(exc.retry_after)})


async def _disconnected(request: Request, exc: Exception) -> Response:
    # The client left before its body arrived: nothing went wrong here, and nobody reads the
    # answer (499, nginx's "client closed request", is what the access log shows).
    log.info("client disconnected before sending its whole body: %s %s", request.method, request.url.path)
    return Response(status_code=499)


async def _bug(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return json_response({"exception_message": "Internal Server Error", "code": "internal_error"}, 500)


Handler = Callable[[Request, Exception], Awaitable[Response]]


def _table() -> dict[type[Exception], Handler]:
    table: dict[type[Exception], Handler] = {
        DomainError: _domain,
        RequestValidationError: _invalid,
        HTTPException: _http,
        ShuttingDown: _shutting_down,
        # Storage raises these for "the database cannot serve this now" (it translates the
        # drivers' errors), and while it closes.
        DatabaseUnavailable: _database,
        StorageClosed: _database,
        ClientDisconnect: _disconnected,
    }
    table[Exception] = _bug
    return table


#: Exception class → handler. Starlette picks the handler of the nearest class in the MRO.
HANDLERS = _table()


def install(app: FastAPI) -> None:
    """Register every handler on ``app``."""
    for error, handler in HANDLERS.items():
        app.add_exception_handler(error, handler)


async def render(request: Request, exc: Exception) -> Response:
    """The answer to ``exc``, chosen as Starlette chooses (nearest class in the MRO).

    For routes served ahead of FastAPI's stack (:mod:`slotkeeper.api.hotpath`).
    """
    for cls in type(exc).__mro__:
        handler = HANDLERS.get(cls)
        if handler is not None:
            return await handler(request, exc)
    raise exc  # pragma: no cover - Exception is in the table
