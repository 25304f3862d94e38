"""The one exception tree of slotkeeper, and how each error travels on the wire.

    SlotkeeperError
    ├── DomainError                 a request the rules refuse (server side, never a bug)
    │   ├── NotFound                404: no such limit
    │   ├── LeaseGone               410: the lease expired or was released
    │   ├── Conflict                409: a name is taken, or a change would break an invariant
    │   ├── InvalidRequest          422: a request that can never succeed as sent
    │   └── SlotsUnavailable        423: not now; try again after ``retry_after`` seconds
    ├── StorageClosed               the server is shutting down (503)
    ├── ShuttingDown                503 to a waiting request at shutdown: retry (its place is kept)
    ├── DatabaseUnavailable         the database cannot serve the request now (503)
    ├── QueryTimeout                an events query ran past its time and was stopped (504)
    └── ClientError                 raised by clients of the API (CLI, SDK)
        ├── ServerUnreachable       the server could not be reached at all
        └── ApiError                the server answered with an error status

Every error has a ``code``: a stable snake_case name that programs compare instead of statuses
and messages. A class gives its default; a domain error raised for a reason a client must tell
apart from the others of its class names its own (``InvalidRequest(..., code="cannot_wait")``).
The server writes the code beside Prefect's ``detail`` in every error answer
(``{"detail": "Concurrency Limit not found", "code": "limit_not_found"}``, see
:mod:`slotkeeper.api.errors`); the clients read it back into :attr:`ApiError.code` (see
:mod:`slotkeeper.error_answers`). :data:`CODES` lists every code with its status and meaning (the
table in ``docs/api.md``). ``HTTP_STATUS`` maps every domain error to its HTTP status.
"""

from __future__ import annotations

from typing import Any

#: Every code an error answer of slotkeeper's server can carry: its HTTP status and meaning.
CODES: dict[str, tuple[int, str]] = {
    "invalid_request": (422, "the body, path or query is invalid (Prefect's 422 shape, or a `detail`)"),
    "slots_exceed_limit": (422, "more slots asked than an active limit has"),
    "rate_limit_without_decay": (422, "`mode: rate_limit` on an active limit without decay"),
    "active_slots_above_limit": (422, "`active_slots` set above the limit, at create or update"),
    "cannot_wait": (
        422,
        "`wait_seconds` on limits that do not exist or are inactive, in `rate_limit` mode, "
        "or a limit deleted while the request waited",
    ),
    "csrf_disabled": (422, "`GET /api/csrf-token`: CSRF protection is off (as a default Prefect server)"),
    "filter_too_large": (
        422,
        "an events filter beyond `SLOTKEEPER_EVENTS_FILTER_*` (too many values or entries, or too "
        "long a value); `detail` names the field",
    ),
    "limit_not_found": (404, "no limit (or tag limit) with this id, name or tag"),
    "route_not_found": (404, "no such path: is the API URL's `/api` prefix there?"),
    "method_not_allowed": (405, "the path exists, not with this method"),
    "lease_gone": (410, "the lease expired, was released, or never existed"),
    "conflict": (409, "the change clashes with existing state"),
    "name_taken": (409, "a limit with this name exists already"),
    "active_slots_below_leased": (409, "`active_slots` set below the slots live leases hold"),
    "slots_unavailable": (423, "the slots are taken now; `Retry-After` says when to try again"),
    "limit_is_zero": (423, "a tag limit of 0: it would never grant, so no `Retry-After`"),
    "unauthorized": (401, "missing or wrong basic auth (`SLOTKEEPER_API_AUTH_STRING`)"),
    "invalid_page_token": (403, "an events page token that this server did not issue"),
    "body_too_large": (413, "the body is larger than `SLOTKEEPER_MAX_BODY_BYTES`"),
    "bad_request": (400, "the body could not be read (not JSON)"),
    "http_error": (400, "another refusal of the HTTP layer (its status varies); `detail` says which"),
    "unsupported_protocol": (400, "a session's upgrade without the subprotocol `slotkeeper.session.v1`"),
    "cross_origin": (
        403,
        "a session's upgrade from a web page of another site (its `Origin` is not this server)",
    ),
    "not_on_session": (404, "a route that sessions do not carry: send it over HTTP"),
    "session_busy": (429, "a session runs 4096 requests already; `Retry-After` says when to try again"),
    "database_unavailable": (503, "the database cannot be reached now; `Retry-After` says when to try again"),
    "shutting_down": (503, "the server is stopping; `Retry-After` says when to try again (elsewhere)"),
    "not_ready": (
        503,
        "`GET /api/ready`: a background loop keeps failing (`failing` names them); see the log",
    ),
    "query_timeout": (
        504,
        "an events query ran longer than `SLOTKEEPER_EVENTS_QUERY_TIMEOUT_SECONDS` and was stopped: "
        "narrow the filter (its `occurred` range first)",
    ),
    "upstream_unavailable": (502, "gateway: the upstream Prefect server could not be reached or broke off"),
    "upstream_timeout": (504, "gateway: the upstream Prefect server did not answer in time"),
    "internal_error": (500, "a bug in the server; its log has the traceback"),
}


class SlotkeeperError(Exception):
    """Root of every error slotkeeper raises on purpose."""

    #: The stable name of this kind of error (see :data:`CODES`).
    code: str = "error"


class DomainError(SlotkeeperError):
    """A request that the domain rules refuse. ``detail`` is the message shown to the caller;
    ``code``, when given, overrides the class's own (see :data:`CODES`)."""

    code = "invalid_request"

    def __init__(self, detail: str, *, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code


class NotFound(DomainError):
    """The named or numbered limit does not exist."""

    code = "limit_not_found"


class LeaseGone(DomainError):
    """The lease does not exist any more: it expired, or it was released or revoked."""

    code = "lease_gone"


class Conflict(DomainError):
    """The change clashes with existing state (a taken name, slots held by live leases)."""

    code = "conflict"


class InvalidRequest(DomainError):
    """The request can never succeed as sent (for example more slots than the limit)."""

    code = "invalid_request"


class SlotsUnavailable(DomainError):
    """The slots are taken right now. ``retry_after`` is a hint in seconds, already jittered."""

    code = "slots_unavailable"

    def __init__(self, retry_after: float | None, detail: str = "Locked", *, code: str | None = None) -> None:
        super().__init__(detail, code=code)
        self.retry_after = retry_after


class StorageClosed(SlotkeeperError):
    """The storage was closed (the server is stopping); the request was not carried out."""

    code = "shutting_down"


class ShuttingDown(SlotkeeperError):
    """The server is stopping: a waiting request is answered 503 with ``Retry-After``.

    ``waiter_id`` names its place in the queue, which is kept (detached) for a while: a retry
    that sends it back (``"waiter_id"`` in the body), to this server restarted or to any other
    process of the same database, takes that place again (see ``docs/queue.md``).
    """

    code = "shutting_down"

    def __init__(self, retry_after: float, waiter_id: str | None = None) -> None:
        super().__init__("The server is shutting down; retry (a waiting request keeps its place).")
        self.detail = str(self)
        self.retry_after = retry_after
        self.waiter_id = waiter_id


class DatabaseUnavailable(SlotkeeperError):
    """The database could not serve the request (unreachable, locked, damaged). Storage raises it
    from the driver's error (``raise ... from``), so nothing above storage knows the drivers."""

    code = "database_unavailable"


class QueryTimeout(SlotkeeperError):
    """An events query ran longer than ``SLOTKEEPER_EVENTS_QUERY_TIMEOUT_SECONDS`` and the
    database stopped it (504): retrying the same query would only fail the same way."""

    code = "query_timeout"

    def __init__(self, seconds: float) -> None:
        super().__init__(
            f"The events query ran longer than {seconds:g} s and was stopped; "
            "narrow the filter (its occurred range first)"
        )


class ClientError(SlotkeeperError):
    """Raised by slotkeeper's own clients (the CLI and the SDK)."""

    code = "client_error"


class ServerUnreachable(ClientError):
    """No answer from the server: connection refused, reset or timed out."""

    code = "server_unreachable"


class ApiError(ClientError):
    """The server answered with an error status.

    ``detail`` is its message as a person reads it (validation errors as ``field: msg``);
    ``code`` the answer's code (see :data:`CODES`), or ``"api_error"`` when it carried none (a
    Prefect server, a proxy); ``errors`` the validation errors of a 422 (pydantic's objects,
    ``loc``, ``type``, ``msg``, ``ctx``), empty otherwise; ``retry_after`` the ``Retry-After``
    header in seconds, if any; ``body`` the answer's JSON object (empty if it was none), for the
    fields of a particular answer (the ``waiter_id`` of ``shutting_down``).
    """

    def __init__(
        self,
        status: int,
        detail: str,
        code: str | None = None,
        errors: tuple[dict[str, Any], ...] = (),
        retry_after: float | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail
        self.code = code or "api_error"
        self.errors = errors
        self.retry_after = retry_after
        self.body = body or {}

    def field_error(self, field: str) -> dict[str, Any] | None:
        """The first validation error about the body field ``field``, if there is one."""
        for error in self.errors:
            loc = error.get("loc")
            if isinstance(loc, list | tuple) and loc and loc[-1] == field:
                return error
        return None


HTTP_STATUS: dict[type[DomainError], int] = {
    NotFound: 404,
    Conflict: 409,
    LeaseGone: 410,
    InvalidRequest: 422,
    SlotsUnavailable: 423,
}


def http_status(error: DomainError) -> int:
    """The HTTP status of a domain error (its nearest mapped class)."""
    for cls in type(error).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 400
