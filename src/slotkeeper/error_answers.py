"""Reading an error answer of the server into an :class:`~slotkeeper.errors.ApiError`.

The one place where clients read error bodies: the CLI's client (:mod:`slotkeeper.client`) and
the SDK's (:mod:`slotkeeper.sdk._core`) both call :func:`api_error`. It imports nothing but
orjson, so the SDK does not pay for aiohttp.

What is read, from any server that speaks Prefect's API:

* ``code``: slotkeeper's stable name of the error (:data:`slotkeeper.errors.CODES`), which
  programs compare. A Prefect server (or a proxy) sends none: the error's code is then
  ``"api_error"``, and its status and validation errors are all there is to go by;
* ``detail`` as a person reads it: the body's ``detail``, or for Prefect's 422 shape the
  validation errors as ``field: msg`` (``loc`` without its leading ``body``) joined with
  ``"; "``, as Prefect's client shows them; failing both, the text of the body or the reason;
* the validation errors themselves (pydantic's objects: ``loc``, ``type``, ``msg``, ``ctx``), so
  that a client asks which field was refused and why without parsing prose;
* ``Retry-After``, in seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from slotkeeper.errors import ApiError

__all__ = ["api_error", "error_detail", "retry_after"]


def api_error(status: int, reason: str, headers: Mapping[str, str], payload: bytes) -> ApiError:
    """The error that an answer with this status, reason, headers and body stands for.

    ``headers`` is looked up with lower-case names (``"retry-after"``).
    """
    body = _json(payload)
    code = body.get("code") if isinstance(body, dict) else None
    errors: tuple[dict[str, Any], ...] = ()
    if isinstance(body, dict):
        listed = body.get("exception_detail", body.get("detail"))
        if isinstance(listed, list):
            errors = tuple(e for e in listed if isinstance(e, dict))
    return ApiError(
        status,
        error_detail(payload, reason or str(status)),
        code if isinstance(code, str) and code else None,
        errors,
        retry_after(headers),
        body if isinstance(body, dict) else None,
    )


def retry_after(headers: Mapping[str, str]) -> float | None:
    """The ``Retry-After`` header in seconds (never negative); None if absent or not a number."""
    value = headers.get("retry-after")
    try:
        seconds = None if value is None else float(value)
    except ValueError:
        return None
    if seconds is None or seconds != seconds:  # absent, or NaN
        return None
    return max(seconds, 0.0)


def error_detail(payload: bytes, fallback: str) -> str:
    """The message of an error body: ``detail``, Prefect's 422 ``exception_detail``, or text."""
    body = _json(payload)
    if body is _NOT_JSON:
        text = payload.decode("utf-8", "replace").strip()
        return text[:500] or fallback
    if not isinstance(body, dict):
        return fallback if body is None else str(body)
    for key in ("exception_detail", "detail"):
        value = body.get(key)
        if isinstance(value, list) and value:
            return "; ".join(_validation_error(e) for e in value)
        if isinstance(value, str) and value:
            return value
    message = body.get("exception_message")
    return message if isinstance(message, str) and message else fallback


_NOT_JSON = object()


def _json(payload: bytes) -> Any:
    try:
        return orjson.loads(payload) if payload else None
    except orjson.JSONDecodeError:
        return _NOT_JSON


def _validation_error(error: Any) -> str:
    if not isinstance(error, dict):
        return str(error)
    loc = list(error.get("loc") or [])
    if loc and loc[0] == "body":
        loc = loc[1:]
    msg = str(error.get("msg", "invalid"))
    return f"{'.'.join(str(part) for part in loc)}: {msg}" if loc else msg
