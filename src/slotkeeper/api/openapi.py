"""The OpenAPI document as the server really answers: every error status of each operation, each
with the body the server sends (Prefect's shapes plus ``code``, see :mod:`slotkeeper.api.errors`).

FastAPI documents only the success and its own 422 (``HTTPValidationError``, ``{"detail": [...]}``),
which is not what slotkeeper sends. :func:`document_errors` rewrites the generated document once:
the error schemas, the statuses every operation shares (auth, the body cap, validation, an
unavailable database), and those its route raises (:data:`STATUSES`). The fuzzer
(``tests/test_fuzz.py``) checks every answer against it.
"""

from __future__ import annotations

from typing import Any

#: ``{"detail", "code"}`` (``waiter_id`` on a 503 to a waiting request at shutdown).
ERROR = {
    "title": "Error",
    "type": "object",
    "properties": {
        "detail": {"title": "Detail", "description": "What went wrong, for a person."},
        "code": {"title": "Code", "type": "string", "description": "Stable name (docs/api.md)."},
        "waiter_id": {"title": "Waiter Id", "type": "string"},
    },
    "required": ["detail", "code"],
}
#: Prefect's invalid request: pydantic's errors, and the body as received.
INVALID_REQUEST = {
    "title": "InvalidRequest",
    "type": "object",
    "properties": {
        "exception_message": {"title": "Exception Message", "type": "string"},
        "exception_detail": {
            "title": "Exception Detail",
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                    "msg": {"type": "string"},
                    "type": {"type": "string"},
                },
                "required": ["loc", "msg", "type"],
            },
        },
        "request_body": {"title": "Request Body"},
        "code": {"title": "Code", "type": "string"},
    },
    "required": ["exception_message", "exception_detail", "request_body", "code"],
}
#: Prefect's 401 (and a 500's shape).
UNAUTHORIZED = {
    "title": "Unauthorized",
    "type": "object",
    "properties": {
        "exception_message": {"title": "Exception Message", "type": "string"},
        "code": {"title": "Code", "type": "string"},
    },
    "required": ["exception_message", "code"],
}

_RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before trying again.", "schema": {"type": "string"}}
}


def _answer(description: str, schema: str | list[str], headers: bool = False) -> dict[str, Any]:
    refs = [
        {"$ref": f"#/components/schemas/{name}"} for name in ([schema] if isinstance(schema, str) else schema)
    ]
    answer: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": refs[0] if len(refs) == 1 else {"anyOf": refs}}},
    }
    if headers:
        answer["headers"] = _RETRY_AFTER
    return answer


#: The answer of each error status.
ANSWERS: dict[str, dict[str, Any]] = {
    "401": _answer("Missing or wrong basic auth (`SLOTKEEPER_API_AUTH_STRING`)", "Unauthorized"),
    "403": _answer("A page token this server did not issue", "Error"),
    "404": _answer("No such limit (or tag limit)", "Error"),
    "409": _answer("The change clashes with existing state", "Error"),
    "410": _answer("The lease expired, was released, or never existed", "Error"),
    "413": _answer("The body is larger than `SLOTKEEPER_MAX_BODY_BYTES`", "Error"),
    "422": _answer("The request is invalid: Prefect's shape, or a `detail`", ["InvalidRequest", "Error"]),
    "423": _answer("The slots are taken now", "Error", headers=True),
    "503": _answer("The database is unavailable, or the server is stopping", "Error", headers=True),
}

#: Every operation can be refused by auth, the body cap and validation, and the database.
COMMON = ("401", "413", "422", "503")

_V2 = "/api/v2/concurrency_limits"
_V1 = "/api/concurrency_limits"
#: The statuses an operation's route raises, beyond :data:`COMMON`.
STATUSES: dict[tuple[str, str], tuple[str, ...]] = {
    ("post", f"{_V2}/"): ("409",),
    ("get", f"{_V2}/{{id_or_name}}"): ("404",),
    ("patch", f"{_V2}/{{id_or_name}}"): ("404", "409"),
    ("delete", f"{_V2}/{{id_or_name}}"): ("404",),
    ("get", f"{_V2}/{{id_or_name}}/leases"): ("404",),
    ("get", f"{_V2}/{{id_or_name}}/queue"): ("404",),
    ("get", f"{_V2}/{{id_or_name}}/stats"): ("404",),
    ("post", f"{_V2}/increment"): ("423",),
    ("post", f"{_V2}/increment-with-lease"): ("423",),
    ("post", f"{_V2}/decrement-with-lease"): ("410",),
    ("post", f"{_V2}/leases/{{lease_id}}/renew"): ("410",),
    ("delete", f"{_V2}/leases/{{lease_id}}"): ("410",),
    ("get", f"{_V1}/{{limit_id}}"): ("404",),
    ("delete", f"{_V1}/{{limit_id}}"): ("404",),
    ("get", f"{_V1}/tag/{{tag}}"): ("404",),
    ("delete", f"{_V1}/tag/{{tag}}"): ("404",),
    ("post", f"{_V1}/tag/{{tag}}/reset"): ("404",),
    ("post", f"{_V1}/increment"): ("423",),
    ("get", "/api/live/limits/{id_or_name}"): ("404",),
    ("get", "/api/events/filter/next"): ("403",),
}
#: Successes FastAPI cannot see (a route that answers one of two statuses).
SUCCESSES: dict[tuple[str, str], tuple[str, str]] = {
    ("post", f"{_V1}/"): ("201", "Created (200: an existing tag limit was updated)"),
}
#: Operations whose success is not JSON.
STREAMS = {("get", "/api/live/limits"), ("get", "/api/live/limits/{id_or_name}")}
#: Operations that take no input at all: nothing to refuse but auth.
_OPEN = {("get", "/api/health"), ("get", "/api/ready"), ("get", "/api/admin/version")}


def document_errors(document: dict[str, Any]) -> dict[str, Any]:
    """Rewrite FastAPI's generated ``document`` in place to what the server answers; return it."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas.update(Error=ERROR, InvalidRequest=INVALID_REQUEST, Unauthorized=UNAUTHORIZED)
    for path, item in document.get("paths", {}).items():
        for method, operation in item.items():
            key = (method, path)
            responses: dict[str, Any] = operation.setdefault("responses", {})
            statuses = ("401", "503") if key in _OPEN else COMMON
            for status in (*statuses, *STATUSES.get(key, ())):
                responses[status] = ANSWERS[status]
            if key in SUCCESSES:
                status, description = SUCCESSES[key]
                responses[status] = {**responses.get("200", {}), "description": description}
            if key in STREAMS:
                responses["200"]["content"] = {"text/event-stream": {"schema": {"type": "string"}}}
    return document
