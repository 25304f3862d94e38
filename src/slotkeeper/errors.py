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
    └── ClientError                 raised by clients of the API (CLI, SDK)
        ├── ServerUnreachable       the server could not be reached at all
        └── ApiError                the server answered with an error status

``HTTP_STATUS`` maps every domain error to its HTTP status; the server and the clients both use
it, so a status always means the same thing on both ends.
"""

from __future__ import annotations


class SlotkeeperError(Exception):
    """Root of every error slotkeeper raises on purpose."""


class DomainError(SlotkeeperError):
    """A request that the domain rules refuse. ``detail`` is the message shown to the caller."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(DomainError):
    """The named or numbered limit does not exist."""


class LeaseGone(DomainError):
    """The lease does not exist any more: it expired, or it was released or revoked."""


class Conflict(DomainError):
    """The change clashes with existing state (a taken name, slots held by live leases)."""


class InvalidRequest(DomainError):
    """The request can never succeed as sent (for example more slots than the limit)."""


class SlotsUnavailable(DomainError):
    """The slots are taken right now. ``retry_after`` is a hint in seconds, already jittered."""

    def __init__(self, retry_after: float | None, detail: str = "Locked") -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class StorageClosed(SlotkeeperError):
    """The storage was closed (the server is stopping); the request was not carried out."""


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


class ClientError(SlotkeeperError):
    """Raised by slotkeeper's own clients (the CLI and the SDK)."""


class ServerUnreachable(ClientError):
    """No answer from the server: connection refused, reset or timed out."""


class ApiError(ClientError):
    """The server answered with an error status. ``detail`` is its message."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


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
