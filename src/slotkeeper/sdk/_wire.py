"""The SDK's HTTP/1.1 client: a pool of keep-alive connections per server, and withdrawable waits.

Why not aiohttp (which the CLI uses): the SDK sends two requests around every block of user
code, and the same two requests cost about twice the CPU with aiohttp as a whole block does with
this client (measured, with the command: ``docs/sdk.md``, "Cost per block"). The SDK needs little of HTTP: JSON POSTs to one
server it knows, keep-alive. This module writes those requests itself (one ``bytes`` per
request) and reads the answers with ``httptools`` (the parser uvicorn serves with: llhttp, in
C): status line, headers, ``Content-Length``, chunked bodies, HTTP/1.0 and keep-alive are its
work, not this module's. It runs on asyncio's protocol API, so a request costs one write and
one parser call per arriving segment. h11 was measured too: about 15 times the CPU per answer
(``benchmarks/sdk_cpu.py --parsers``), which would have added a fifth to the SDK's cost per block.

It also does what aiohttp cannot: **withdraw a waiting request without losing its answer.** A
waiting acquisition (``wait_seconds``) stays open until the server grants the slots. To give up
(the caller was cancelled), the client must go away: the server then withdraws the wait, and
releases a grant that raced the departure. But a grant can also be *on the wire* at that instant;
closing the socket would throw it away, and its lease would hold the slots until it expires. So a
withdrawal here is a half-close: the connection sends FIN (``write_eof``) and keeps reading. The
server sees the end of the stream as a disconnect and withdraws the wait (answering nothing), or
its grant was already sent and is read here, so the caller can release it. Over TLS, and through
a proxy (which may not pass a half-close on), the connection is closed instead.

Proxies come from the environment as for other Python clients (``urllib.request.getproxies`` and
``proxy_bypass``: ``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``, ``NO_PROXY``): an ``http://``
URL is requested from the proxy in absolute form, an ``https://`` one through a ``CONNECT`` tunnel.

This module is the SDK's transport, the one seam between the SDK's logic (:mod:`._core`, which
sees only :class:`Pool.request` and its :data:`Answer`) and the wire.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urlsplit

import httptools

from slotkeeper.errors import ServerUnreachable

#: How long the server has to answer a withdrawal (it answers at once: it closes).
WITHDRAW_SECONDS = 10.0
#: Bound on opening a connection (through a proxy: the tunnel and the TLS handshake included).
CONNECT_SECONDS = 10.0
#: An idle connection older than this is not reused: servers close idle keep-alive connections
#: (uvicorn after 5 s), and a request written into one being closed would be lost.
IDLE_SECONDS = 3.0
#: Idle connections kept per server.
MAX_IDLE = 32

#: ``(status, reason, headers, body)``; header names are lower-case.
Answer = tuple[int, str, Mapping[str, str], bytes]


def authorization(auth_string: str | None) -> str | None:
    """The basic-auth header value of ``"user:password"`` (as the server's auth string)."""
    if not auth_string:
        return None
    return "Basic " + base64.b64encode(auth_string.encode()).decode("ascii")


@dataclass(frozen=True, slots=True)
class Proxy:
    """An HTTP proxy: where it listens, and its ``Proxy-Authorization`` (from its URL), if any."""

    host: str
    port: int
    authorization: str | None

    @classmethod
    def for_url(cls, scheme: str, host: str, port: int) -> Proxy | None:
        """The proxy the environment names for this URL, as urllib (and requests) read it; None
        without one, or when ``NO_PROXY`` leaves the host out."""
        proxies = urllib.request.getproxies()
        url = proxies.get(scheme) or proxies.get("all")
        if not url or urllib.request.proxy_bypass(f"{host}:{port}"):
            return None
        if "://" not in url:
            url = "http://" + url
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"Unsupported proxy {url!r} for {scheme} URLs: use an http:// proxy URL")
        auth = None
        if parts.username is not None:
            credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            auth = "Basic " + base64.b64encode(credentials.encode()).decode("ascii")
        return cls(parts.hostname, parts.port or 80, auth)


def api_url_parts(base_url: str) -> SplitResult:
    """The parts of an API URL; ValueError if it is not an http(s) URL with a host and port."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"Not an API URL: {base_url!r} (expected http://HOST:PORT/api)")
    _ = parts.port  # ValueError for a port that is not one
    return parts


class Origin:
    """Where the requests of one API URL go: host, port, path prefix, TLS, auth, proxy.

    Made once per server and process (see :class:`slotkeeper.sdk._runtime.Endpoint`): the proxy
    is read from the environment then.
    """

    def __init__(self, base_url: str, authorization: str | None) -> None:
        parts = api_url_parts(base_url)
        self.base_url = base_url.rstrip("/")
        self.tls = parts.scheme == "https"
        self.host: str = parts.hostname or ""  # never empty (api_url_parts)
        default = 443 if self.tls else 80
        self.port = parts.port or default
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.authority = host if self.port == default else f"{host}:{self.port}"
        self.proxy = Proxy.for_url(parts.scheme, self.host, self.port)
        prefix = parts.path.rstrip("/")
        lines = [f"Host: {self.authority}", "Accept: application/json", "Content-Type: application/json"]
        if authorization:
            lines.append(f"Authorization: {authorization}")
        if self.proxy is not None and not self.tls:
            # Through an HTTP proxy the request names the whole URL; a tunnel (TLS) carries it as is.
            prefix = f"http://{self.authority}{prefix}"
            if self.proxy.authorization:
                lines.append(f"Proxy-Authorization: {self.proxy.authorization}")
        self.prefix = prefix.encode("latin-1")
        self._headers = ("\r\n".join(lines) + "\r\n").encode("latin-1")
        self._ssl: ssl.SSLContext | None = None

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def message(self, method: str, path: str, body: bytes) -> bytes:
        return (
            b"%s %s%s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n"
            % (method.encode(), self.prefix, path.encode("utf-8"), self._headers, len(body))
            + body
        )

    def tunnel(self) -> bytes:
        """The ``CONNECT`` request that opens a tunnel to this origin through its proxy."""
        assert self.proxy is not None
        auth = f"Proxy-Authorization: {self.proxy.authorization}\r\n" if self.proxy.authorization else ""
        return f"CONNECT {self.authority} HTTP/1.1\r\nHost: {self.authority}\r\n{auth}\r\n".encode("latin-1")


class _Stale(Exception):
    """A reused connection closed before any byte of the answer: the server had closed it."""


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection, one request at a time; answers are read by ``httptools``."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Answer] | None = None
        self.closed = False
        self.keep_alive = True
        #: No half-close (TLS, a proxy): a withdrawal closes the connection.
        self.half_close = True
        self.received = 0
        self.idle_since = 0.0
        #: An answer that arrived as the request was cancelled (see ``_answer``).
        self.answered: Answer | None = None
        #: A complete answer that no request has taken yet, or why the connection failed.
        self.ready: Answer | None = None
        self.failure: Exception | None = None
        # The answer being read.
        self._reading = False
        self._reason = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._until_close = False  # its body ends when the connection does (no length, not chunked)

    # --- protocol callbacks -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._fail(ValueError(f"not an HTTP answer: {exc}"))
            self.close()

    def eof_received(self) -> bool:
        self._ended()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._ended()
        if self.received == 0:
            self._fail(_Stale())
        else:
            self._fail(ConnectionError(str(exc) if exc else "connection closed mid-answer"))

    # --- httptools callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reading = True
        self._reason, self._headers, self._body = b"", {}, []

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        chunked = "chunked" in self._headers.get("transfer-encoding", "").lower()
        sized = "content-length" in self._headers or chunked
        self._until_close = not sized and status not in (204, 304) and status >= 200

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.keep_alive = self.keep_alive and self.parser.should_keep_alive()
        self._complete()

    # --- answers ----------------------------------------------------------------------------------

    def _complete(self) -> None:
        self._reading = False
        answer = (
            self.parser.get_status_code(),
            self._reason.decode("latin-1"),
            self._headers,
            b"".join(self._body),
        )
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            self.waiter = None
            waiter.set_result(answer)
        else:
            self.ready = answer

    def _ended(self) -> None:
        """The server closed: an answer delimited by the end of the connection is complete."""
        self.keep_alive = False
        if self._reading and self._until_close:
            self._complete()

    def _fail(self, error: Exception) -> None:
        if self.failure is None:
            self.failure = error
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    # --- requests ---------------------------------------------------------------------------------

    async def exchange(self, message: bytes, timeout: float, withdraw: bool) -> Answer:
        """Send one request and return its answer, even if the calling task is cancelled.

        A request that was sent is never dropped half way, since its answer may be a grant the
        caller must release: cancelled, a quick request is finished (within ``timeout``), and a
        ``withdraw`` request is half-closed and its answer read if the server still sends one.
        The caller tells a cancellation by ``Task.cancelling()``. Without an answer the
        cancellation propagates.
        """
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self.received = 0
        self.ready = None
        self.transport.write(message)
        deadline = loop.time() + timeout
        try:
            return await self._answer(deadline)
        except asyncio.CancelledError:
            if self.answered is not None:  # the answer came with the cancellation: keep it
                answer, self.answered = self.answered, None
                return answer
            if withdraw:
                if self.closed or not self.half_close or not self.transport.can_write_eof():
                    self.close()
                    raise
                self.keep_alive = False
                self.transport.write_eof()  # the server sees a disconnect: it withdraws the wait
                deadline = loop.time() + WITHDRAW_SECONDS
            try:
                return await self._answer(deadline)
            except (OSError, TimeoutError, ValueError, _Stale):
                self.close()
                raise asyncio.CancelledError from None
            except BaseException:
                self.close()
                raise
        except BaseException:
            self.close()
            raise

    async def _answer(self, deadline: float) -> Answer:
        if self.ready is not None:  # it is here already
            answer, self.ready = self.ready, None
            return answer
        if self.failure is not None:
            raise self.failure
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Answer] = loop.create_future()
        self.waiter = waiter
        timer = loop.call_at(deadline, _expire, waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            # Cancelled in the very loop step the answer completed: the task drops the result it
            # was about to get. Keep it for ``exchange`` (it may be a grant to release).
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.answered = waiter.result()
            raise
        finally:
            timer.cancel()
            if self.waiter is waiter:
                self.waiter = None

    def close(self) -> None:
        self.keep_alive = False
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True


def _expire(waiter: asyncio.Future[Answer]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Tunnel(asyncio.Protocol):
    """A connection to a proxy until it answers ``CONNECT`` (then TLS takes it over)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        #: The head of the proxy's answer (nothing follows it before TLS starts).
        self.head: asyncio.Future[bytes] = loop.create_future()
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" in self.buffer and not self.head.done():
            self.head.set_result(bytes(self.buffer))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head.done():
            self.head.set_exception(ConnectionResetError("the proxy closed the connection"))


class Pool:
    """Keep-alive connections to one server, used one request at a time each."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self._idle: list[Connection] = []

    async def _open(self) -> Connection:
        origin = self.origin
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for may swallow a cancellation that
            # arrives as the connection opens, and a withdrawn request would then go out.
            async with asyncio.timeout(CONNECT_SECONDS):
                return await self._connect()
        except (OSError, TimeoutError) as exc:
            via = (
                "" if origin.proxy is None else f" through the proxy {origin.proxy.host}:{origin.proxy.port}"
            )
            raise ServerUnreachable(
                f"Could not reach {origin.base_url}{via}: {exc or type(exc).__name__}"
            ) from exc

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        origin, proxy = self.origin, self.origin.proxy
        if proxy is not None and origin.tls:
            return await self._tunnel(proxy)
        host, port = (origin.host, origin.port) if proxy is None else (proxy.host, proxy.port)
        transport, conn = await loop.create_connection(
            Connection,
            host,
            port,
            ssl=origin.ssl_context(),
            server_hostname=origin.host if origin.tls else None,
        )
        conn.transport = transport  # uvloop may call connection_made after this returns
        conn.half_close = proxy is None and not origin.tls
        return conn

    async def _tunnel(self, proxy: Proxy) -> Connection:
        """A TLS connection to the origin through a ``CONNECT`` tunnel of ``proxy``."""
        loop = asyncio.get_running_loop()
        raw, handshake = await loop.create_connection(lambda: _Tunnel(loop), proxy.host, proxy.port)
        try:
            raw.write(self.origin.tunnel())
            status_line = (await handshake.head).split(b"\r\n", 1)[0].decode("latin-1")
            fields = status_line.split(" ", 2)
            if len(fields) < 2 or not fields[0].startswith("HTTP/") or fields[1] != "200":
                raise ConnectionRefusedError(f"the proxy answered {status_line!r} to CONNECT")
            conn = Connection()
            context = self.origin.ssl_context()
            assert context is not None
            transport = await loop.start_tls(raw, conn, context, server_hostname=self.origin.host)
        except BaseException:
            raw.close()
            raise
        if transport is None:  # pragma: no cover - only with a closing transport
            raise ConnectionResetError("the proxy closed the tunnel")
        conn.connection_made(transport)
        conn.half_close = False
        return conn

    def _reusable(self, now: float) -> Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and conn.keep_alive and now - conn.idle_since < IDLE_SECONDS:
                return conn
            conn.close()
        return None

    async def request(
        self, method: str, path: str, body: bytes, timeout: float, *, withdraw: bool = False
    ) -> Answer:
        """One request; ``(status, reason, headers, body)`` whatever the status.

        ``withdraw`` (waiting requests): a fresh connection, and cancelling withdraws the request
        while still reading its answer (see the module's docstring). Raises
        :class:`ServerUnreachable` for every transport failure.
        """
        loop = asyncio.get_running_loop()
        message = self.origin.message(method, path, body)
        for _ in range(2):
            conn = None if withdraw else self._reusable(loop.time())
            reused = conn is not None
            if conn is None:
                conn = await self._open()
            try:
                answer = await conn.exchange(message, timeout, withdraw)
            except _Stale as exc:
                if reused:
                    continue  # the server had closed it: nothing was read; a new connection
                raise ServerUnreachable(
                    f"{self.origin.base_url} closed the connection without answering"
                ) from exc
            except TimeoutError as exc:
                raise ServerUnreachable(
                    f"No answer from {self.origin.base_url} within {timeout:g} s"
                ) from exc
            except (OSError, ValueError) as exc:
                raise ServerUnreachable(
                    f"Lost the connection to {self.origin.base_url}: {exc or type(exc).__name__}"
                ) from exc
            if conn.keep_alive and not conn.closed and len(self._idle) < MAX_IDLE:
                conn.idle_since = loop.time()
                self._idle.append(conn)
            else:
                conn.close()
            return answer
        raise ServerUnreachable(f"{self.origin.base_url} keeps closing connections")  # pragma: no cover

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()
