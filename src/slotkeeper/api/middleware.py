"""ASGI middleware: optional basic auth, and a cap on request body size.

Both are plain ASGI (no per-request task or body copy) because they sit in front of every call.
"""

from __future__ import annotations

import base64
import hmac
from urllib.parse import urlsplit

import orjson
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from slotkeeper.api.dashboard import is_page

#: GET on these paths needs no auth, so orchestrators can probe health (as Prefect).
OPEN_PATHS = frozenset({"/api/health", "/api/ready"})


#: Asks a browser to sign in (the dashboard's pages only: the API's 401 stays Prefect's).
CHALLENGE = (b"www-authenticate", b'Basic realm="slotkeeper", charset="UTF-8"')


async def _send_json(
    send: Send, status: int, body: object, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    data = orjson.dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


def _too_large(max_bytes: int) -> dict[str, str]:
    return {"detail": f"Request body is larger than {max_bytes} bytes.", "code": "body_too_large"}


def basic_credentials(auth_string: str) -> bytes:
    """What ``Authorization: Basic <credentials>`` must carry for ``auth_string``."""
    return base64.b64encode(auth_string.encode())


def authorized(header: bytes, credentials: bytes) -> bool:
    """Whether an ``Authorization`` header value is basic auth with ``credentials``.

    The scheme is case-insensitive (RFC 9110: ``basic`` and ``BASIC`` are ``Basic``), and any
    run of spaces may follow it; the credentials are compared in constant time.
    """
    scheme, _, given = header.partition(b" ")
    return scheme.lower() == b"basic" and hmac.compare_digest(given.lstrip(b" "), credentials)


class BasicAuth:
    """Every HTTP request but GET health needs ``Authorization: Basic base64(auth_string)``.

    ``open_paths``: more paths that GET may read without it (``/metrics`` when opened). A refused
    request to the dashboard's pages also gets ``WWW-Authenticate``, so that a browser asks its
    user to sign in; the API's 401 is Prefect's, without it.
    """

    def __init__(self, app: ASGIApp, auth_string: str, open_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.credentials = basic_credentials(auth_string)
        self.open_paths = OPEN_PATHS | open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"] == "GET" and scope["path"] in self.open_paths):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not authorized(given, self.credentials):
            challenge = (CHALLENGE,) if is_page(scope["path"]) else ()
            await _send_json(
                send, 401, {"exception_message": "Unauthorized", "code": "unauthorized"}, challenge
            )
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse bodies over ``max_bytes`` with 413, whether announced or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _send_json(send, 413, _too_large(self.max_bytes))
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _send_json(send, 413, _too_large(self.max_bytes))


class _TooLarge(HTTPException):
    """Raised from ``receive`` when a streamed body passes the cap.

    An ``HTTPException`` because FastAPI's body parser re-raises those (rendered 413 by the app's
    handler) but turns any other exception into a 400 "error parsing the body".
    """

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"Request body is larger than {max_bytes} bytes.")


def cross_origin(origin: str | None, host: str | None) -> bool:
    """Whether a websocket upgrade comes from a page of another site.

    Browsers send ``Origin`` with every websocket upgrade and cannot be stopped by CORS there, so
    without auth any page a user opens could take slots over a websocket (cross-site websocket
    hijacking). Python clients (the SDK, Prefect's client) send no ``Origin``: an upgrade without
    one, or from a page served by this server itself (the dashboard), is not cross-origin.
    """
    if not origin:
        return False
    try:
        where = urlsplit(origin).netloc
    except ValueError:
        return True
    return not where or where.lower() != (host or "").lower()
