"""What one message costs on each side: websocket (uvicorn's server, two clients) or raw TCP.

The measurement behind the choice of the session's transport (``ARCHITECTURE.md``, "Sessions"):
an echo server and a client that sends ``--size`` bytes and waits for them back, ``--window``
messages in flight, for ``--seconds``. It prints messages per second and the CPU per message of
the client process and of the server process (each measured alone, from ``/proc``).

Pairs (server / client):

* ``ws-sansio / websockets``: uvicorn's default websocket implementation (websockets' sans-I/O
  protocol), and websockets' sans-I/O client under a bare asyncio protocol (what the SDK uses);
* ``ws-sansio / aiohttp``: the same server, aiohttp's websocket client;
* ``wsproto / websockets``: uvicorn's wsproto implementation;
* ``raw / raw``: a length-prefixed protocol on bare asyncio transports, the floor.

Run::

    python benchmarks/ws_frames.py [--rounds 2] [--seconds 4] [--size 150] [--windows 1,16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import subprocess
import sys
import time
from typing import Any

import servers

PAIRS = (("ws-sansio", "websockets"), ("ws-sansio", "aiohttp"), ("wsproto", "websockets"), ("raw", "raw"))
UVICORN_WS = {"ws-sansio": "websockets-sansio", "wsproto": "wsproto"}


# --- the servers ------------------------------------------------------------------------------


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A bare ASGI websocket echo (and the lifespan uvicorn asks for)."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await receive()  # the connect
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        await send({"type": "websocket.send", "bytes": message.get("bytes") or message["text"].encode()})


class RawEcho(asyncio.Protocol):
    """Length-prefixed messages (4 bytes, big-endian), echoed as they are complete."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        out = []
        while len(self.buffer) >= 4:
            size = int.from_bytes(self.buffer[:4], "big")
            if len(self.buffer) < 4 + size:
                break
            out.append(bytes(self.buffer[: 4 + size]))
            del self.buffer[: 4 + size]
        if out:
            self.transport.write(b"".join(out))


def serve(kind: str, port: int) -> None:
    import uvloop

    if kind == "raw":

        async def main() -> None:
            await asyncio.get_running_loop().create_server(RawEcho, servers.LOOPBACK, port)
            await asyncio.Event().wait()

        uvloop.run(main())
        return
    import uvicorn

    uvicorn.run(
        echo_app,
        host=servers.LOOPBACK,
        port=port,
        loop="uvloop",
        ws=UVICORN_WS[kind],  # type: ignore[arg-type]
        ws_per_message_deflate=False,
        log_level="warning",
        lifespan="on",
    )


# --- the clients ------------------------------------------------------------------------------


class RawClient(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.waiters: list[asyncio.Future[bytes]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 4:
            size = int.from_bytes(self.buffer[:4], "big")
            if len(self.buffer) < 4 + size:
                break
            message = bytes(self.buffer[4 : 4 + size])
            del self.buffer[: 4 + size]
            self.waiters.pop(0).set_result(message)

    async def round_trip(self, data: bytes) -> bytes:
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        self.transport.write(len(data).to_bytes(4, "big") + data)
        return await waiter


class SansIOClient(asyncio.Protocol):
    """websockets' sans-I/O client under a bare asyncio protocol (the SDK's arrangement)."""

    def __init__(self, uri: str) -> None:
        from websockets.client import ClientProtocol
        from websockets.uri import parse_uri

        self.ws = ClientProtocol(parse_uri(uri), max_size=2**24)
        self.waiters: list[asyncio.Future[bytes]] = []
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.ws.send_request(self.ws.connect())
        self._flush()

    def _flush(self) -> None:
        for chunk in self.ws.data_to_send():
            if chunk:
                self.transport.write(chunk)

    def data_received(self, data: bytes) -> None:
        self.ws.receive_data(data)
        for event in self.ws.events_received():
            if not self.opened.done():
                self.opened.set_result(None)
            elif getattr(event, "opcode", None) is not None and event.opcode.value in (1, 2):  # type: ignore[union-attr]
                self.waiters.pop(0).set_result(bytes(event.data))  # type: ignore[union-attr]
        self._flush()

    async def round_trip(self, data: bytes) -> bytes:
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        self.ws.send_binary(data)
        self._flush()
        return await waiter


async def _client(
    kind: str, port: int, window: int, seconds: float, size: int, server_pids: list[int]
) -> str:
    loop = asyncio.get_running_loop()
    payload = b"x" * size
    url = f"ws://{servers.LOOPBACK}:{port}/"
    if kind == "raw":
        _, raw = await loop.create_connection(RawClient, servers.LOOPBACK, port)
        round_trip = raw.round_trip
    elif kind == "websockets":
        _, sansio = await loop.create_connection(lambda: SansIOClient(url), servers.LOOPBACK, port)
        await sansio.opened
        round_trip = sansio.round_trip
    else:
        import aiohttp

        session = aiohttp.ClientSession()
        ws = await session.ws_connect(url, compress=0)
        pending: list[asyncio.Future[bytes]] = []

        async def reader() -> None:
            async for message in ws:
                pending.pop(0).set_result(message.data)

        reading = asyncio.create_task(reader())

        async def round_trip(data: bytes) -> bytes:
            waiter = loop.create_future()
            pending.append(waiter)
            await ws.send_bytes(data)
            return await waiter

    count = 0
    stop = False

    async def worker() -> None:
        nonlocal count
        while not stop:
            await round_trip(payload)
            count += 1

    workers = [asyncio.create_task(worker()) for _ in range(window)]
    await asyncio.sleep(0.5)
    c0, t0, p0, s0 = count, time.perf_counter(), time.process_time(), servers.cpu_seconds(server_pids)
    await asyncio.sleep(seconds)
    c1, t1, p1, s1 = count, time.perf_counter(), time.process_time(), servers.cpu_seconds(server_pids)
    stop = True
    del workers
    if kind == "aiohttp":
        reading.cancel()
    n = max(c1 - c0, 1)
    return f"{n / (t1 - t0):9,.0f} msgs/s  client {(p1 - p0) / n * 1e6:5.1f} µs/msg  server {(s1 - s0) / n * 1e6:5.1f} µs/msg"


def client(kind: str, port: int, window: int, seconds: float, size: int, server_pids: list[int]) -> None:
    import uvloop

    print(uvloop.run(_client(kind, port, window, seconds, size, server_pids)), flush=True)
    os._exit(0)  # the connections need no goodbye


# --- the run ----------------------------------------------------------------------------------


def _missing(server_kind: str) -> str | None:
    import importlib.util

    if server_kind == "wsproto" and importlib.util.find_spec("wsproto") is None:
        return "wsproto is not installed"
    return None


def _wait_listening(port: int, timeout: float = 20.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((servers.LOOPBACK, port), 1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--size", type=int, default=150)
    parser.add_argument("--windows", default="1,16")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--window", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--server-pid", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    if args.client:
        client(args.client, args.port, args.window, args.seconds, args.size, [args.server_pid])
        return
    print(f"[ws-frames] python benchmarks/ws_frames.py {shlex.join(sys.argv[1:])}", flush=True)
    for rnd in range(1, args.rounds + 1):
        for window in (int(w) for w in args.windows.split(",")):
            for server_kind, client_kind in PAIRS:
                missing = _missing(server_kind)
                if missing:
                    print(
                        f"round {rnd} window {window:3d} {server_kind:>9s}: skipped ({missing})", flush=True
                    )
                    continue
                port = servers.free_port()
                me = [sys.executable, __file__]
                server = subprocess.Popen([*me, "--serve", server_kind, "--port", str(port)])
                try:
                    _wait_listening(port)
                    done = subprocess.run(
                        [
                            *me,
                            "--client",
                            client_kind,
                            "--port",
                            str(port),
                            "--window",
                            str(window),
                            "--seconds",
                            str(args.seconds),
                            "--size",
                            str(args.size),
                            "--server-pid",
                            str(server.pid),
                        ],
                        capture_output=True,
                        text=True,
                        check=False,
                    )
                    line = done.stdout.strip() or f"failed: {done.stderr.strip().splitlines()[-1:]}"
                    print(
                        f"round {rnd} window {window:3d} {server_kind:>9s} / {client_kind:10s} {line}",
                        flush=True,
                    )
                finally:
                    server.terminate()
                    server.wait(timeout=10)


if __name__ == "__main__":
    main()
