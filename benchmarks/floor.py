"""The machine's floor for the contended hand-off: a minimal in-memory lock server over raw TCP.

What it is: one lock (a limit of 1) kept in the memory of one asyncio process (uvloop when it
is installed, as slotkeeper's server uses), speaking a one-byte protocol over TCP:

- ``a`` (acquire): answered ``g`` at once when the lock is free; otherwise the connection joins
  a FIFO queue and gets its ``g`` when the lock is handed to it.
- ``r`` (release, by the holder): the lock goes to the head of the queue (``g`` written on that
  connection first), then the releaser gets ``k``.
- Anything else, an ``a`` from a connection that holds or waits already, or an ``r`` from one
  that does not hold the lock, is answered ``e``. A connection that closes gives back the lock
  it holds and leaves the queue.

What it is not: a concurrency-limit server. No durability (nothing is written anywhere; a
restart forgets everything), no HTTP, no JSON, no database, no leases or their expiry, no
names (one lock), no events, no authentication. Each of those costs time that slotkeeper, or
any real server, spends on every hand-off; this spends none of it. The hand-off scenario
drives it with the same load generator (8 workers in one process, acquire, hold 10 ms with
``asyncio.sleep``, release) and analyses it the same way, so its figures are a **lower bound
for any server on this machine**: what loopback TCP, the scheduler of a small machine and
asyncio's timers allow (``asyncio.sleep`` overshoots its delay, so even this falls short of
the nominal ideal). It is a reference line in the report, never a target.

With ``--fsync FILE`` it is the *durable floor*: every change of the lock's holder (a grant,
and the release it comes with) is appended to ``FILE`` and made durable with ``fdatasync`` before
anyone is answered, as a database commit is before a durable server answers. One ``fdatasync``
per hand-off, nothing else: what this machine's disk adds to the floor, the bound for any server
that makes every grant durable before announcing it (slotkeeper on PostgreSQL with its default
``synchronous_commit=on``; slotkeeper on SQLite is crash-safe with ``synchronous=NORMAL``, which
does not sync each commit).

Run it on its own::

    python benchmarks/floor.py serve [--host 127.0.0.1] --port N [--fsync FILE]

It prints one line once it listens and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections import deque
from typing import cast

ACQUIRE, RELEASE = ord("a"), ord("r")
GRANTED, RELEASED, ERROR = b"g", b"k", b"e"


class Lock:
    """The one lock: its holder and the FIFO queue of connections waiting for it."""

    def __init__(self, log_fd: int | None = None) -> None:
        self.holder: Connection | None = None
        self.queue: deque[Connection] = deque()
        self.grants = 0
        #: ``--fsync``: the log every grant is made durable in before it is answered.
        self.log_fd = log_fd

    def acquire(self, conn: Connection) -> None:
        if conn is self.holder or conn in self.queue:
            conn.send(ERROR)
        elif self.holder is None:
            self._grant(conn)
        else:
            self.queue.append(conn)

    def release(self, conn: Connection) -> None:
        if conn is not self.holder:
            conn.send(ERROR)
            return
        self._hand_on()
        conn.send(RELEASED)

    def drop(self, conn: Connection) -> None:
        """A connection closed: give back what it held, forget its place in the queue."""
        if conn is self.holder:
            self._hand_on()
        else:
            with contextlib.suppress(ValueError):
                self.queue.remove(conn)

    def _hand_on(self) -> None:
        self.holder = None
        if self.queue:
            self._grant(self.queue.popleft())

    def _grant(self, conn: Connection) -> None:
        self.holder = conn
        self.grants += 1
        if self.log_fd is not None:  # durable before anyone is told (the release rides along)
            os.write(self.log_fd, GRANTED)
            os.fdatasync(self.log_fd)
        conn.send(GRANTED)


class Connection(asyncio.Protocol):
    """One client connection; every byte received is one request."""

    def __init__(self, lock: Lock) -> None:
        self.lock = lock
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without deriving from it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        for byte in data:
            if byte == ACQUIRE:
                self.lock.acquire(self)
            elif byte == RELEASE:
                self.lock.release(self)
            else:
                self.send(ERROR)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.lock.drop(self)

    def send(self, answer: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(answer)


async def serve(host: str, port: int, fsync: str | None = None) -> None:
    """Serve the lock on ``host:port`` until SIGTERM or SIGINT (``fsync``: the durable floor's log)."""
    loop = asyncio.get_running_loop()
    log_fd = None if fsync is None else os.open(fsync, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    lock = Lock(log_fd)
    server = await loop.create_server(lambda: Connection(lock), host, port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    durable = f", every grant made durable in {fsync}" if fsync else ""
    print(f"floor: in-memory lock listening on {host}:{port}{durable}", flush=True)
    async with server:
        await stop.wait()
    if log_fd is not None:
        os.close(log_fd)
    print(f"floor: stopped after {lock.grants} grants", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``serve --port N``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the lock until SIGTERM or SIGINT")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--fsync", metavar="FILE", help="the durable floor: fdatasync every grant to FILE first")
    args = p.parse_args(argv)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        asyncio.run(serve(args.host, args.port, args.fsync))
    else:
        uvloop.run(serve(args.host, args.port, args.fsync))
    return 0


if __name__ == "__main__":
    sys.exit(main())
