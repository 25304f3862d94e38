"""HTTP forwarding to the upstream Prefect server, through one shared connection pool.

:class:`Upstream` owns the one :class:`aiohttp.ClientSession` of the process (a pool of at most
``SLOTKEEPER_UPSTREAM_MAX_CONNECTIONS`` keep-alive connections) and the timeouts;
:func:`forward` sends one ASGI request there and streams the answer back.

What goes through unchanged: the method, the path below ``/api`` (as the client encoded it), the
query string, every end-to-end header (auth, cookies, content type and encoding, CSRF headers),
the body (streamed, or read at once when it is small), and the status, headers and body of the
answer (streamed, never decompressed). What does not: hop-by-hop headers (RFC 9110 7.6.1:
``Connection`` and the headers it names, ``Keep-Alive``, ``Transfer-Encoding``, ``TE``,
``Upgrade``, ...), which belong to each connection. ``Host`` stays the client's, and
``X-Forwarded-For``/``-Proto``/``-Host`` are set: Prefect builds the links it hands out
(``next_page`` of an events page) from the request's host and scheme, so they point at the
gateway, not around it.

When the upstream fails before it answers, the client gets slotkeeper's own error answer, in
Prefect's shape with a ``code``, and the server logs one line: 502 ``upstream_unavailable`` (the
connection was refused or broke off), 504 ``upstream_timeout`` (connecting or the answer took
longer than the settings allow). A failure in the middle of a streamed answer cannot change its
status any more: the connection to the client is dropped, so the client sees a truncated answer
instead of a complete-looking one.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from multidict import CIMultiDict
from starlette.types import Receive, Scope, Send
from yarl import URL

from slotkeeper.gateway.routes import upstream_path
from slotkeeper.settings import Settings

log = logging.getLogger("slotkeeper.gateway")

#: Hop-by-hop headers (RFC 9110 7.6.1, plus ``Proxy-Connection``), never forwarded either way.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
#: Request headers the gateway sets itself: the forwarding headers, and ``Expect`` (the gateway's
#: own server answered a ``100-continue`` already).
_REQUEST_OWN = frozenset({"expect", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"})
#: Response headers the gateway's server writes itself (uvicorn adds ``date`` and ``server``).
_RESPONSE_OWN = frozenset({"date", "server"})
#: Headers aiohttp would add on its own when absent: a proxy adds none.
_NO_AUTO_HEADERS = ("Accept-Encoding", "User-Agent", "Content-Type")
#: A body announced at most this long is read at once and sent with its length (cheaper than a
#: stream for the small JSON bodies of Prefect's API); a longer or unannounced one is streamed.
BUFFERED_BODY_BYTES = 256 * 1024
#: The route label of forwarded requests in the access log and metrics (never the raw path).
ROUTE_LABEL = "/api/{forwarded}"


class ClientGone(Exception):
    """The client disconnected while its body was being forwarded."""


class Upstream:
    """The upstream Prefect server: its API URL, the shared client session and the timeouts.

    :meth:`open` and :meth:`close` run in the app's lifespan (the session belongs to the loop).
    """

    def __init__(self, settings: Settings) -> None:
        if not settings.upstream_url:
            raise ValueError("Upstream needs settings.upstream_url")
        self.url = URL(settings.upstream_url)
        #: The upstream API's path (``/api``), which replaces the gateway's ``/api``.
        self.base_path = self.url.path
        self.origin = self.url.origin()
        self.timeout_seconds = settings.upstream_timeout_seconds
        self.connect_timeout_seconds = settings.upstream_connect_timeout_seconds
        self.max_connections = settings.upstream_max_connections
        self.timeout = aiohttp.ClientTimeout(
            total=None,
            # Waiting for a free connection of the pool and connecting, together.
            connect=self.connect_timeout_seconds,
            sock_connect=self.connect_timeout_seconds,
            # The answer's headers, then each read of its body.
            sock_read=self.timeout_seconds,
        )
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        """Create the session (once, in the running loop)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0),
                timeout=self.timeout,
                auto_decompress=False,  # bytes pass through; Content-Encoding stays true
                cookie_jar=aiohttp.DummyCookieJar(),  # cookies are the clients', not the gateway's
                skip_auto_headers=_NO_AUTO_HEADERS,
            )

    async def close(self) -> None:
        """Close the session and its connections."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the upstream's session is not open (the app's lifespan opens it)")
        return self._session

    def url_for(self, scope: Scope) -> URL:
        """The upstream URL of a request to the gateway: path (as the client encoded it) and query."""
        raw: bytes | None = scope.get("raw_path")
        path = raw.decode("latin-1") if raw else quote(scope["path"])
        if not path.startswith("/api"):  # an encoded "/api" (rare): use the decoded path
            path = quote(scope["path"])
        return self.url_of(upstream_path(path, self.base_path), scope.get("query_string") or b"")

    def url_of(self, path: str, query: bytes = b"") -> URL:
        """The upstream URL of an encoded ``path`` (the upstream's own) and raw ``query``."""
        target = path + ("?" + query.decode("latin-1") if query else "")
        return self.origin.join(URL(target, encoded=True))


def forwarding_headers(scope: Scope) -> CIMultiDict[str]:
    """The headers to send upstream for a request to the gateway (see the module's doc)."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    named_by_connection: set[str] = set()
    for raw_name, raw_value in headers:
        if raw_name.lower() == b"connection":
            named_by_connection.update(
                token.strip().lower() for token in raw_value.decode("latin-1").split(",") if token.strip()
            )
    out: CIMultiDict[str] = CIMultiDict()
    forwarded_for: list[str] = []
    host = ""
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        if name == "x-forwarded-for":
            forwarded_for.append(value)
            continue
        if name in HOP_BY_HOP or name in named_by_connection or name in _REQUEST_OWN:
            continue
        if name == "host":
            host = value
        out.add(name, value)
    client = scope.get("client")
    # uvicorn already took the client's address from X-Forwarded-For when the peer is a trusted
    # proxy (its forwarded_allow_ips): then it is that header's last entry, not to be repeated.
    if client and (not forwarded_for or forwarded_for[-1].rsplit(",", 1)[-1].strip() != str(client[0])):
        forwarded_for.append(str(client[0]))
    if forwarded_for:
        out["x-forwarded-for"] = ", ".join(forwarded_for)
    scheme: str = scope.get("scheme", "http")
    out["x-forwarded-proto"] = {"ws": "http", "wss": "https"}.get(scheme, scheme)
    if host:
        out["x-forwarded-host"] = host
    return out


def answer_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The upstream answer's headers that go on to the client (raw, in order)."""
    named_by_connection: set[bytes] = set()
    kept = []
    for name, value in headers:
        lower = name.lower()
        if lower == b"connection":
            named_by_connection.update(t.strip().lower() for t in value.split(b",") if t.strip())
        kept.append((lower, value))
    return [
        (name, value)
        for name, value in kept
        if name.decode("latin-1") not in HOP_BY_HOP
        and name.decode("latin-1") not in _RESPONSE_OWN
        and name not in named_by_connection
    ]


def error_body(code: str, detail: str) -> bytes:
    """slotkeeper's error answer for a failed forward: Prefect's shape with the ``code``."""
    return orjson.dumps({"detail": detail, "code": code})


async def send_error(send: Send, status: int, code: str, detail: str) -> None:
    body = error_body(code, detail)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _stream_body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def _body(scope: Scope, receive: Receive, headers: CIMultiDict[str]) -> Any:
    """What aiohttp sends as the body: nothing, bytes read at once, or a stream (sent chunked)."""
    length = headers.get("content-length")
    if length is not None and length.isdigit() and int(length) <= BUFFERED_BODY_BYTES:
        return await read_body(receive) if int(length) else b""
    chunked = any(name.lower() == b"transfer-encoding" for name, _ in scope["headers"])
    if length is None and not chunked:
        return None  # no body announced (a GET, a DELETE)
    headers.popall("content-length", None)  # aiohttp frames the stream itself (chunked)
    return _stream_body(receive)


async def forward(upstream: Upstream, scope: Scope, receive: Receive, send: Send) -> None:
    """Forward one HTTP request to the upstream and its answer back (see the module's doc)."""
    url = upstream.url_for(scope)
    headers = forwarding_headers(scope)
    method: str = scope["method"]
    started = False
    try:
        body = await _body(scope, receive, headers)
        async with upstream.session.request(
            method,
            url,
            headers=headers,
            data=body,
            allow_redirects=False,
            skip_auto_headers=_NO_AUTO_HEADERS,
        ) as answer:
            await send(
                {
                    "type": "http.response.start",
                    "status": answer.status,
                    "headers": answer_headers(answer.raw_headers),
                }
            )
            started = True
            async for chunk in answer.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
    except ClientGone:
        return  # nobody to answer; the upstream request (if any) was abandoned with it
    except (TimeoutError, aiohttp.ClientError) as exc:
        failed = failure(exc, upstream)
        log.warning(
            "forwarding %s %s to the upstream failed: %s (%s)",
            method,
            scope["path"],
            failed.detail,
            type(exc).__name__,
            extra={"code": failed.code, "upstream": str(upstream.origin)},
        )
        if started:
            # Too late for an error answer: drop the connection rather than end the body as if
            # it were complete.
            raise UpstreamBrokeOff(failed.detail) from exc
        await send_error(send, failed.status, failed.code, failed.detail)


class UpstreamBrokeOff(Exception):
    """The upstream failed in the middle of an answer already started: the connection is dropped."""


@dataclass(frozen=True)
class Failure:
    """How a failed forward is answered: the error ``code``, the HTTP status, the detail."""

    code: str
    status: int
    detail: str


def _timed_out(detail: str) -> Failure:
    return Failure(code="upstream_timeout", status=504, detail=detail)


def _unavailable(detail: str) -> Failure:
    return Failure(code="upstream_unavailable", status=502, detail=detail)


def failure(exc: BaseException, upstream: Upstream) -> Failure:
    """The answer to a forward that failed with ``exc`` before the upstream answered."""
    where = f"The upstream Prefect server at {upstream.origin}"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return _timed_out(f"{where} could not be connected to within {upstream.connect_timeout_seconds:g} s.")
    if isinstance(exc, TimeoutError):  # aiohttp's read timeouts are TimeoutErrors too
        return _timed_out(f"{where} did not answer within {upstream.timeout_seconds:g} s.")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return _unavailable(f"{where} cannot be reached: {exc.os_error.strerror or exc}.")
    return _unavailable(f"{where} broke off the request: {exc or type(exc).__name__}.")
