"""The SDK's HTTP/1.1 client: a pool of keep-alive connections per server, and withdrawable waits.

Why not aiohttp (which the CLI uses): the SDK sends two requests around every block of user
code, and on the reference machine aiohttp's request machinery costs about five times the CPU
of this one (about 0.6 ms against 0.12 ms per request, see ``docs/sdk.md``). The SDK needs
little of HTTP: JSON POSTs to one server it knows, answers with ``Content-Length`` (or chunked),
keep-alive. This module does exactly that on asyncio's protocol API.

It also does what aiohttp cannot: **withdraw a waiting request without losing its answer.** A
waiting acquisition (``wait_seconds``) stays open until the server grants the slots. To give up
(the caller was cancelled), the client must go away: the server then withdraws the wait, and
releases a grant that raced the departure. But a grant can also be *on the wire* at that instant;
closing the socket would throw it away, and its lease would hold the slots until it expires. So a
withdrawal here is a half-close: the connection sends FIN (``write_eof``) and keeps reading. The
server sees the end of the stream as a disconnect and withdraws the wait (answering nothing), or
its grant was already sent and is read here, so the caller can release it. Over TLS (no
half-close) the connection is closed instead.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import Mapping
from urllib.parse import urlsplit

from slotkeeper.errors import ServerUnreachable

#: How long the server has to answer a withdrawal (it answers at once: it closes).
WITHDRAW_SECONDS = 10.0
#: Bound on opening a connection.
CONNECT_SECONDS = 10.0
#: An idle connection older than this is not reused: servers close idle keep-alive connections
#: (uvicorn after 5 s), and a request written into one being closed would be lost.
IDLE_SECONDS = 3.0
#: Idle connections kept per server.
MAX_IDLE = 32

Answer = tuple[int, str, Mapping[str, str], bytes]


def authorization(auth_string: str | None) -> str | None:
    """The basic-auth header value of ``"user:password"`` (as the server's auth string)."""
    if not auth_string:
        return None
    return "Basic " + base64.b64encode(auth_string.encode()).decode("ascii")


class Origin:
    """Where the requests of one API URL go: host, port, path prefix, TLS, auth."""

    def __init__(self, base_url: str, authorization: str | None) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"Not an API URL: {base_url!r} (expected http://HOST:PORT/api)")
        self.base_url = base_url.rstrip("/")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.prefix = parts.path.rstrip("/").encode("latin-1")
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls else 80
        authority = host if self.port == default else f"{host}:{self.port}"
        lines = [f"Host: {authority}", "Accept: application/json", "Content-Type: application/json"]
        if authorization:
            lines.append(f"Authorization: {authorization}")
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


class _Stale(Exception):
    """A reused connection closed before any byte of the answer: the server had closed it."""


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection, one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[Answer] | None = None
        self.closed = False
        self.eof = False
        self.keep_alive = True
        self.received = 0
        self.idle_since = 0.0
        #: An answer that arrived as the request was cancelled (see ``_answer``).
        self.answered: Answer | None = None

    # --- protocol callbacks -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.received += len(data)
        self._complete()

    def eof_received(self) -> bool:
        self.eof = True
        self._complete()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.eof = True
        self._complete()
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            if self.received == 0:
                waiter.set_exception(_Stale())
            else:
                waiter.set_exception(ConnectionError(str(exc) if exc else "connection closed mid-answer"))

    def _complete(self) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        try:
            answer = self._parse()
        except ValueError as exc:
            waiter.set_exception(exc)
            return
        if answer is not None:
            self.waiter = None
            waiter.set_result(answer)

    def _parse(self) -> Answer | None:
        """The answer at the head of the buffer, if it is complete (and consume it)."""
        buf = self.buffer
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/") or not code.isdigit():
            raise ValueError(f"not an HTTP answer: {lines[0][:100]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        status = int(code)
        start = end + 4
        if headers.get("connection", "").lower() == "close" or version == "HTTP/1.0":
            self.keep_alive = False
        if status in (204, 304) or 100 <= status < 200:
            length = 0
        elif "content-length" in headers:
            length = int(headers["content-length"])
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            chunked = _dechunk(buf, start)
            if chunked is None:
                return None
            body, stop = chunked
            del buf[:stop]
            return status, reason, headers, body
        else:  # delimited by the end of the connection
            if not self.eof:
                return None
            self.keep_alive = False
            length = len(buf) - start
        if len(buf) < start + length:
            return None
        body = bytes(buf[start : start + length])
        del buf[: start + length]
        return status, reason, headers, body

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
        self.transport.write(message)
        deadline = loop.time() + timeout
        try:
            return await self._answer(deadline)
        except asyncio.CancelledError:
            if self.answered is not None:  # the answer came with the cancellation: keep it
                answer, self.answered = self.answered, None
                return answer
            if withdraw:
                if self.closed or not self.transport.can_write_eof():
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
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Answer] = loop.create_future()
        self.waiter = waiter
        self._complete()  # it may be here already
        if self.closed and not waiter.done():
            waiter.set_exception(_Stale() if self.received == 0 else ConnectionError("connection closed"))
        timer = loop.call_at(deadline, _expire, waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            # Cancelled in the very loop step the answer completed: the task drops the result it
            # was about to get, and the answer is already out of the buffer. Keep it for
            # ``exchange`` (it may be a grant to release).
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.answered = waiter.result()
            raise
        finally:
            timer.cancel()

    def close(self) -> None:
        self.keep_alive = False
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True


def _expire(waiter: asyncio.Future[Answer]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def _dechunk(buf: bytearray, start: int) -> tuple[bytes, int] | None:
    parts: list[bytes] = []
    pos = start
    while True:
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return None
        size = int(bytes(buf[pos:line_end]).split(b";", 1)[0].strip() or b"0", 16)
        pos = line_end + 2
        if size == 0:
            trailer_end = buf.find(b"\r\n\r\n", pos - 2)
            if trailer_end < 0:
                return None
            return b"".join(parts), trailer_end + 4
        if len(buf) < pos + size + 2:
            return None
        parts.append(bytes(buf[pos : pos + size]))
        pos += size + 2


class Pool:
    """Keep-alive connections to one server, used one request at a time each."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self._idle: list[Connection] = []

    async def _open(self) -> Connection:
        loop = asyncio.get_running_loop()
        origin = self.origin
        try:
            transport, conn = await asyncio.wait_for(
                loop.create_connection(
                    Connection,
                    origin.host,
                    origin.port,
                    ssl=origin.ssl_context(),
                    server_hostname=origin.host if origin.tls else None,
                ),
                CONNECT_SECONDS,
            )
        except (OSError, TimeoutError) as exc:
            raise ServerUnreachable(
                f"Could not reach {origin.base_url}: {exc or type(exc).__name__}"
            ) from exc
        conn.transport = transport  # uvloop may call connection_made after this returns
        return conn

    def _reusable(self, now: float) -> Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_SECONDS:
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
