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

from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from slotkeeper.api.responses import json_response
from slotkeeper.errors import (
    DatabaseUnavailable,
    DomainError,
    QueryTimeout,
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


def _body_echo(body: Any) -> Any:
    if isinstance(body, bytes):
        return body.decode("utf-8", "replace")
    return body


async def _domain(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DomainError)
    headers = None
    if isinstance(exc, SlotsUnavailable) and exc.retry_after is not None:
        headers = {"Retry-After": str(exc.retry_after)}
    return json_response({"detail": exc.detail, "code": exc.code}, http_status(exc), headers)


async def _invalid(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    content = {
        "exception_message": "Invalid request received.",
        "exception_detail": jsonable_encoder(exc.errors()),
        "request_body": jsonable_encoder(_body_echo(exc.body)),
        "code": "invalid_request",
    }
    try:
        return json_response(content, 422)
    except TypeError:
        # The echoed input holds what orjson refuses (an int beyond 64 bits, a lone surrogate);
        # the stdlib writes both (the surrogate as a \u escape), so the caller still gets a 422.
        return Response(json.dumps(content).encode(), 422, media_type="application/json")


async def _http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = HTTP_CODES.get(exc.status_code, "http_error")
    return json_response({"detail": exc.detail, "code": code}, exc.status_code, dict(exc.headers or {}))


async def _database(request: Request, exc: Exception) -> Response:
    log.error("database unavailable: %s", exc)
    code = exc.code if isinstance(exc, SlotkeeperError) else "database_unavailable"
    body = {"detail": "The database is unavailable; try again.", "code": code}
    return json_response(body, 503, {"Retry-After": "1"})


async def _query_timeout(request: Request, exc: Exception) -> Response:
    log.warning("events query stopped on %s %s: %s", request.method, request.url.path, exc)
    return json_response({"detail": str(exc), "code": "query_timeout"}, 504)


async def _shutting_down(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ShuttingDown)
    body: dict[str, Any] = {"detail": exc.detail, "code": exc.code}
    if exc.waiter_id is not None:
        body["waiter_id"] = exc.waiter_id
    return json_response(body, 503, {"Retry-After": str(exc.retry_after)})


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
        QueryTimeout: _query_timeout,
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
