"""A FastAPI route class for the hot endpoints: same OpenAPI, same validation, a tenth of the cost.

FastAPI resolves dependencies for every request; on the acquire/release path that costs more than
the database work itself (about 175 µs against 35 µs for the same validation done directly, on
this hardware). ``FastRoute`` keeps everything FastAPI derives from the endpoint's signature
(OpenAPI, the error shape) but handles a request itself: it validates path parameters and the JSON
body with pydantic ``TypeAdapter``s built once from the type hints, then calls the endpoint.

Endpoints using it take only ``request: Request`` (optional), path parameters, and at most one body
parameter (a pydantic model, optionally ``| None`` when the body may be omitted). Anything else
(a query, header or cookie parameter, a ``Depends``, a second body, a body that is not a model)
would be silently wrong here, so building such a route raises :class:`TypeError`. Validation
errors become FastAPI's ``RequestValidationError`` with FastAPI's ``loc`` (``["body", ...]``,
``["path", name]``), so the app's handler renders them as for any other route.

``SLOTKEEPER_HOT_PATH=false`` (:func:`hot_route_class`) builds the hot routes as FastAPI's own
``APIRoute`` instead, to measure what this saves (docs/benchmarks.md).
"""

from __future__ import annotations

import email.message
import functools
import inspect
import types
import typing
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter, ValidationError

from slotkeeper.settings import Settings


def hot_route_class(settings: Settings) -> type[APIRoute]:
    """The route class of the hot routes: :class:`FastRoute`, or with ``hot_path`` off FastAPI's
    own ``APIRoute`` (dependency solving, served through FastAPI's middleware stack)."""
    return FastRoute if settings.hot_path else APIRoute


def _optional(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(
        annotation
    )


def _model(annotation: Any) -> bool:
    """A pydantic model, or an optional one."""
    candidates = typing.get_args(annotation) if _optional(annotation) else (annotation,)
    return any(isinstance(c, type) and issubclass(c, BaseModel) for c in candidates if c is not type(None))


def _errors(exc: ValidationError, prefix: tuple[str | int, ...]) -> list[dict[str, Any]]:
    errors: list[dict[str, Any]] = []
    for error in exc.errors(include_url=False):
        errors.append({**error, "loc": (*prefix, *error["loc"])})
    return errors


class FastRoute(APIRoute):
    """An ``APIRoute`` whose requests skip FastAPI's dependency solving (see the module doc).

    ``handler`` takes the request and returns the response; :mod:`slotkeeper.api.hotpath` calls it
    directly, ahead of FastAPI's middleware stack.
    """

    handler: Callable[[Request], Coroutine[Any, Any, Response]]

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        self.handler = self._build_handler()
        return self.handler

    def _check(self) -> None:
        """Refuse (:class:`TypeError`) an endpoint this class would serve wrongly."""
        dependant = self.dependant
        where = f"FastRoute {self.path!r} ({getattr(self.endpoint, '__qualname__', self.endpoint)})"
        unsupported = [
            *(f"query parameter {p.name!r}" for p in dependant.query_params),
            *(f"header parameter {p.name!r}" for p in dependant.header_params),
            *(f"cookie parameter {p.name!r}" for p in dependant.cookie_params),
            *(f"dependency {d.call!r} (Depends)" for d in dependant.dependencies),
            *(
                f"parameter {name!r}"
                for name in (
                    dependant.websocket_param_name,
                    dependant.http_connection_param_name,
                    dependant.response_param_name,
                    dependant.background_tasks_param_name,
                    dependant.security_scopes_param_name,
                )
                if name is not None
            ),
        ]
        if len(dependant.body_params) > 1:
            unsupported.append(f"several body parameters {[p.name for p in dependant.body_params]}")
        unsupported.extend(
            f"body parameter {p.name!r} that is not a pydantic model"
            for p in dependant.body_params
            if not _model(p.field_info.annotation)
        )
        if unsupported:
            raise TypeError(
                f"{where} takes only the Request, path parameters and one pydantic model body; it "
                f"would not apply: {', '.join(unsupported)}. Use an ordinary route (APIRoute)."
            )

    def _build_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        self._check()
        endpoint = self.endpoint
        hints = typing.get_type_hints(endpoint)
        path: dict[str, TypeAdapter[Any]] = {}
        body_name: str | None = None
        body_adapter: TypeAdapter[Any] | None = None
        body_optional = False
        wants_request = False
        for name in inspect.signature(endpoint).parameters:
            annotation = hints[name]
            if annotation is Request:
                wants_request = True
                continue
            if name in self.param_convertors:
                path[name] = TypeAdapter(annotation)
            else:
                body_name, body_adapter, body_optional = name, TypeAdapter(annotation), _optional(annotation)

        async def handler(request: Request) -> Response:
            kwargs: dict[str, Any] = {"request": request} if wants_request else {}
            errors: list[dict[str, Any]] = []
            for name, adapter in path.items():
                try:
                    kwargs[name] = adapter.validate_python(request.path_params[name])
                except ValidationError as exc:
                    errors.extend(_errors(exc, ("path", name)))
            raw = b""
            if body_adapter is not None and body_name is not None:
                raw = await request.body()
                if not raw.strip() and body_optional:
                    kwargs[body_name] = None
                elif raw and not declares_json(request.scope["headers"]):
                    # FastAPI's rule (so Prefect's server's, and every other route's here): a body
                    # not declared JSON is not read as JSON, so it is no object (422). A web page
                    # can send a form or text/plain cross-site without asking; it cannot send
                    # application/json so: this is what refuses cross-site request forgery.
                    try:
                        body_adapter.validate_python(raw, from_attributes=True)
                    except ValidationError as exc:
                        errors.extend(_errors(exc, ("body",)))
                else:
                    try:
                        kwargs[body_name] = body_adapter.validate_json(raw or b"null")
                    except ValidationError as exc:
                        errors.extend(_errors(exc, ("body",)))
            if errors:
                raise RequestValidationError(errors, body=_echo(raw))
            response: Response = await endpoint(**kwargs)
            return response

        return handler


#: The Content-Type every client of the hot routes sends; anything else takes the slow test.
_JSON = b"application/json"


def declares_json(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the request's ``Content-Type`` is JSON as FastAPI reads it: ``application/json``
    or ``application/*+json``, parameters allowed (``; charset=utf-8``)."""
    for key, value in headers:
        if key == b"content-type":
            return value == _JSON or _json_type(value)
    return False


@functools.lru_cache(maxsize=64)
def _json_type(value: bytes) -> bool:
    message = email.message.Message()
    message["content-type"] = value.decode("latin-1")
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


def _echo(raw: bytes) -> Any:
    try:
        return orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace")
