"""The SDK's HTTP client (:mod:`slotkeeper.sdk._wire`) against scripted servers: every way an
answer can be framed (length, chunked, HTTP/1.0, until the close, split anywhere), keep-alive and
its stale connections, every transport failure, TLS, and proxies from the environment (plain and
``CONNECT`` tunnels, with auth, ``NO_PROXY``).

The servers are asyncio servers in this process that write raw bytes, so each test states exactly
what is on the wire. Nothing here times anything: bounds only keep a broken client from hanging.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trustme
import uvloop

from slotkeeper.errors import ServerUnreachable
from slotkeeper.sdk._wire import Connection, Origin, Pool, Proxy
from tests.conftest import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
PATIENCE = 10.0
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts without proxy settings (in either case), and sets its own."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


async def read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    """One request: its request line, headers (lower-case names) and body."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {}
    for line in head[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return head[0], headers, body


@contextlib.asynccontextmanager
async def serving(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    """A server on a free local port running ``handler`` per connection; yields the port."""
    writers: set[asyncio.StreamWriter] = set()
    handlers: set[asyncio.Task[None]] = set()

    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        writers.add(writer)
        try:
            await handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()
            writers.discard(writer)

    server = await asyncio.start_server(connected, "127.0.0.1", 0, ssl=tls)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in list(writers):  # the handlers see their connection end, and return
            writer.close()
        await asyncio.wait_for(asyncio.gather(*handlers, return_exceptions=True), PATIENCE)
        await server.wait_closed()


def answering(*answers: bytes, chunk: int | None = None, close: bool = False) -> Handler:
    """A handler that answers the requests of a connection with ``answers`` in turn, each
    written ``chunk`` bytes at a time (all at once by default), then waits for the client to
    close (or, with ``close``, closes: what ends an answer without a length)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for answer in answers:
            await read_request(reader)
            step = chunk or len(answer)
            for at in range(0, len(answer), step):
                writer.write(answer[at : at + step])
                await writer.drain()
        if not close:
            await reader.read()

    return handle


async def request(
    pool: Pool, path: str = "/x", timeout: float = PATIENCE
) -> tuple[int, str, dict[str, str], bytes]:
    status, reason, headers, body = await pool.request("POST", path, b"{}", timeout)
    return status, reason, dict(headers), body


def pool_of(port: int, scheme: str = "http", host: str = "127.0.0.1") -> Pool:
    return Pool(Origin(f"{scheme}://{host}:{port}/api", None))


# --- framing ----------------------------------------------------------------------------------------

BODY = b'{"lease_id": "x"}'
LENGTH = b"HTTP/1.1 200 OK\r\nContent-Length: 17\r\nContent-Type: application/json\r\n\r\n" + BODY
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b'5;ext=1\r\n{"lea\r\nc\r\nse_id": "x"}\r\n0\r\nTrailer: t\r\n\r\n'
)
HTTP_10 = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + BODY
UNTIL_CLOSE = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + BODY
NO_CONTENT = b"HTTP/1.1 204 No Content\r\nServer: x\r\n\r\n"


@pytest.mark.parametrize(
    ("answer", "body", "kept"),
    [
        (LENGTH, BODY, True),
        (CHUNKED, BODY, True),
        (HTTP_10, BODY, False),  # its body ends with the connection
        (UNTIL_CLOSE, BODY, False),
        (NO_CONTENT, b"", True),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 17\r\n\r\n" + BODY, BODY, True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 17\r\nConnection: close\r\n\r\n" + BODY, BODY, False),
    ],
    ids=["length", "chunked", "http-1.0", "until-close", "no-content", "1.0-keep-alive", "close"],
)
@pytest.mark.parametrize("chunk", [None, 1, 7], ids=["whole", "bytewise", "sevens"])
async def test_every_framing_of_an_answer(answer: bytes, body: bytes, kept: bool, chunk: int | None) -> None:
    async with serving(answering(answer, chunk=chunk, close=not kept)) as port:
        pool = pool_of(port)
        status, reason, headers, got = await request(pool)
        assert (status, got) == (200 if answer is not NO_CONTENT else 204, body)
        assert reason in ("OK", "No Content")
        assert all(name == name.lower() for name in headers)
        assert (len(pool._idle) == 1) is kept
        pool.close()


async def test_a_kept_connection_carries_the_next_request() -> None:
    opened = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal opened
        opened += 1
        await answering(LENGTH, CHUNKED, LENGTH)(reader, writer)

    async with serving(handle) as port:
        pool = pool_of(port)
        for _ in range(3):
            assert (await request(pool))[3] == BODY
        assert opened == 1
        pool.close()


async def test_a_request_written_into_a_closing_connection_is_sent_again() -> None:
    # The server closes a kept connection without a word (as uvicorn does when idle): the next
    # request, written into it, gets nothing back; it is sent again on a new connection.
    opened = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal opened
        opened += 1
        await read_request(reader)
        writer.write(LENGTH)
        await writer.drain()
        if opened == 1:
            await read_request(reader)  # the second request: closed unanswered
            return
        await reader.read()

    async with serving(handle) as port:
        pool = pool_of(port)
        assert (await request(pool))[3] == BODY
        assert (await request(pool))[3] == BODY
        assert opened == 2
        pool.close()


# --- failures ---------------------------------------------------------------------------------------


async def test_what_is_not_http_is_a_lost_connection() -> None:
    async with serving(answering(b"SSH-2.0-OpenSSH\r\n\r\n")) as port:
        with pytest.raises(ServerUnreachable, match=r"^Lost the connection to .*: not an HTTP answer"):
            await request(pool_of(port))


async def test_a_connection_closed_mid_answer_is_lost() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(LENGTH[:-5])

    async with serving(handle) as port:
        with pytest.raises(ServerUnreachable, match=r"^Lost the connection to "):
            await request(pool_of(port))


async def test_a_fresh_connection_closed_without_an_answer() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with serving(handle) as port:
        with pytest.raises(ServerUnreachable, match=r"closed the connection without answering$"):
            await request(pool_of(port))


async def test_no_answer_in_time() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with serving(handle) as port:
        with pytest.raises(
            ServerUnreachable, match=r"^No answer from http://127\.0\.0\.1:\d+/api within 0\.05 s$"
        ):
            await request(pool_of(port), timeout=0.05)


async def test_nobody_listening() -> None:
    with pytest.raises(ServerUnreachable, match=r"^Could not reach http://127\.0\.0\.1:\d+/api: "):
        await request(pool_of(free_port()))


@pytest.mark.parametrize("url", ["127.0.0.1:4200/api", "ftp://h/api", "http://", "http://h:99999/api"])
def test_urls_that_are_not_api_urls(url: str) -> None:
    with pytest.raises(ValueError, match=r"API URL|Port"):
        Origin(url, None)


# --- TLS --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls(authority: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    """A server context for 127.0.0.1 and localhost, whose CA the client trusts through
    ``SSL_CERT_FILE`` (as a user with a private CA does)."""
    ca = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(ca))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


async def test_tls(tls: ssl.SSLContext) -> None:
    async with serving(answering(LENGTH, CHUNKED), tls=tls) as port:
        pool = pool_of(port, "https", "localhost")
        assert (await request(pool))[3] == BODY
        assert (await request(pool))[3] == BODY
        pool.close()


async def test_tls_with_a_certificate_nobody_trusts(
    tls: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE")
    async with serving(answering(LENGTH), tls=tls) as port:
        with pytest.raises(ServerUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
            await request(pool_of(port, "https", "localhost"))


async def test_a_withdrawal_over_tls_closes_the_connection(tls: ssl.SSLContext) -> None:
    # TLS has no half-close: giving up on a waiting request closes its connection, and the
    # server sees it go.
    asked, gone = asyncio.Event(), asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        asked.set()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await reader.read()
        gone.set()

    async with serving(handle, tls=tls) as port:
        pool = pool_of(port, "https", "localhost")
        waiting = asyncio.create_task(pool.request("POST", "/wait", b"{}", PATIENCE, withdraw=True))
        await asyncio.wait_for(asked.wait(), PATIENCE)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await asyncio.wait_for(gone.wait(), PATIENCE)


# --- proxies ----------------------------------------------------------------------------------------


class FakeProxy:
    """An HTTP proxy: answers absolute-form requests itself (and records them), and tunnels
    ``CONNECT`` to 127.0.0.1 at the port asked (or refuses with ``refuse``)."""

    def __init__(self, refuse: bytes | None = None) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.refuse = refuse

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            line, headers, _ = await read_request(reader)
            self.requests.append((line, headers))
            if not line.startswith("CONNECT "):
                writer.write(LENGTH)
                await writer.drain()
                continue
            if self.refuse is not None:
                writer.write(self.refuse)
                await writer.drain()
                return
            port = int(line.split(" ")[1].rsplit(":", 1)[1])
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            return


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    sink.close()


async def test_an_http_url_through_a_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = FakeProxy()
    async with serving(proxy.handle) as proxy_port:
        # The origin's name does not resolve: only the proxy can answer for it.
        monkeypatch.setenv("HTTP_PROXY", f"http://me:p%40ss@127.0.0.1:{proxy_port}")
        pool = Pool(Origin("http://slotkeeper.invalid:4200/api", "Basic c2VjcmV0"))
        assert (await request(pool, "/v2/concurrency_limits/increment"))[3] == BODY
        ((line, headers),) = proxy.requests
        assert line == "POST http://slotkeeper.invalid:4200/api/v2/concurrency_limits/increment HTTP/1.1"
        assert headers["host"] == "slotkeeper.invalid:4200"
        assert headers["proxy-authorization"] == "Basic " + base64.b64encode(b"me:p@ss").decode()
        assert headers["authorization"] == "Basic c2VjcmV0"
        pool.close()


async def test_no_proxy_goes_direct(monkeypatch: pytest.MonkeyPatch) -> None:
    dead = free_port()  # nothing listens there
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{dead}")
    monkeypatch.setenv("no_proxy", "localhost,127.0.0.1")
    async with serving(answering(LENGTH)) as port:
        assert Origin(f"http://127.0.0.1:{port}/api", None).proxy is None
        assert (await request(pool_of(port)))[3] == BODY
    monkeypatch.setenv("no_proxy", "example.org")
    assert Origin("http://127.0.0.1:1/api", None).proxy == Proxy("127.0.0.1", dead, None)


async def through_a_tunnel(tls: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = FakeProxy()
    async with serving(answering(LENGTH, CHUNKED), tls=tls) as port, serving(proxy.handle) as proxy_port:
        monkeypatch.setenv("HTTPS_PROXY", f"127.0.0.1:{proxy_port}")  # no scheme: http:// is meant
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:1")  # not for https URLs
        pool = pool_of(port, "https", "localhost")
        assert (await request(pool))[3] == BODY
        assert (await request(pool))[3] == BODY  # the tunnel is kept alive
        ((line, headers),) = proxy.requests
        assert line == f"CONNECT localhost:{port} HTTP/1.1"
        assert headers["host"] == f"localhost:{port}"
        assert "proxy-authorization" not in headers
        pool.close()


async def test_an_https_url_through_a_tunnel(tls: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch) -> None:
    await through_a_tunnel(tls, monkeypatch)


def test_tls_and_tunnels_on_uvloop(tls: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch) -> None:
    # The SDK's loop is uvloop's, whose TLS (start_tls included) is its own.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(through_a_tunnel(tls, monkeypatch))


async def test_a_proxy_that_refuses_the_tunnel(tls: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = FakeProxy(refuse=b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
    async with serving(proxy.handle) as proxy_port:
        monkeypatch.setenv("ALL_PROXY", f"http://127.0.0.1:{proxy_port}")
        with pytest.raises(ServerUnreachable, match=r"through the proxy 127\.0\.0\.1:\d+: .*407 Proxy Auth"):
            await request(pool_of(free_port(), "https", "localhost"))


def test_only_http_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "socks5://127.0.0.1:1080")
    with pytest.raises(ValueError, match=r"^Unsupported proxy 'socks5://127\.0\.0\.1:1080' for https URLs"):
        Origin("https://example.org/api", None)


def test_a_connection_reads_an_answer_fed_before_anyone_asks() -> None:
    conn = Connection()
    conn.data_received(LENGTH)
    assert conn.ready == (200, "OK", {"content-length": "17", "content-type": "application/json"}, BODY)


class Feeding(asyncio.Transport):
    """A transport that answers every write at once, before the request awaits its answer."""

    def __init__(self, conn: Connection, answer: bytes) -> None:
        super().__init__()
        self.conn, self.answer = conn, answer

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.conn.data_received(self.answer)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("withdraw", [False, True])
async def test_an_answer_that_arrives_with_the_request(withdraw: bool) -> None:
    conn = Connection()
    conn.connection_made(Feeding(conn, LENGTH))
    assert (await conn.exchange(b"POST / HTTP/1.1\r\n\r\n", PATIENCE, withdraw))[3] == BODY
    broken = Connection()
    broken.connection_made(Feeding(broken, b"nonsense\r\n\r\n"))
    with pytest.raises(ValueError, match="not an HTTP answer"):
        await broken.exchange(b"POST / HTTP/1.1\r\n\r\n", PATIENCE, withdraw)


async def test_a_cancelled_request_whose_connection_breaks_is_cancelled() -> None:
    # A quick request is finished when its caller is cancelled; if its connection then breaks,
    # the cancellation goes on (there is no answer to hand back).
    asked, cancelled = asyncio.Event(), asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        asked.set()
        await cancelled.wait()
        writer.transport.abort()

    async with serving(handle) as port:
        pool = pool_of(port)
        sent = asyncio.create_task(request(pool))
        await asyncio.wait_for(asked.wait(), PATIENCE)
        sent.cancel()
        await asyncio.sleep(0)  # the request sees its cancellation, and goes on reading
        cancelled.set()
        with pytest.raises(asyncio.CancelledError):
            await sent


async def test_a_proxy_that_hangs_up_on_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with serving(handle) as proxy_port:
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{proxy_port}")
        with pytest.raises(ServerUnreachable, match="the proxy closed the connection"):
            await request(pool_of(free_port(), "https", "localhost"))
