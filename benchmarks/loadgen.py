"""The load generator: aiohttp clients in separate worker processes.

One :class:`WorkerPool` keeps ``procs`` worker processes alive for the whole run. For each
measurement the parent hands every worker a :class:`Job` (its share of the clients); a worker
opens one aiohttp session with exactly one keep-alive connection per client, primes every
connection with one ``GET /api/health``, reports ready, and waits for the common start time.
Then every client loops over its operation until the window ends and the worker sends back raw
numbers (:class:`WorkerResult`); the parent merges them (:func:`merge`). One kind speaks no HTTP:
``handoff-floor`` opens one plain TCP connection per client to ``benchmarks/floor.py`` instead
(the hand-off's machine floor), and ``redis-pairs`` one redis-py connection per client to the
Redis reference server (its counting semaphore, see ``servers.REDIS_ACQUIRE_LUA``).

Timeline of one measurement (times are wall-clock, shared by all processes)::

    start ── warm-up ──> window_start ── measured window ──> window_end ─ grace ─> stop

Only what happens inside the window counts: a pair (or a health request) counts when its last
response arrives inside the window; an acquire latency counts when the acquire was sent inside
the window and succeeded; an error counts when its response (or failure) arrives inside it.
Requests still in flight ``grace`` seconds after the window are cancelled and counted as
``unfinished``. Every client loop is bounded in time (the window) and in count (``max_ops``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
import urllib.parse
from array import array
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

Kind = Literal[
    "pairs",
    "redis-pairs",
    "health",
    "handoff",
    "handoff-sdk",
    "handoff-floor",
    "rate",
    "random-pairs",
    "events",
]

ACQUIRE = "/api/v2/concurrency_limits/increment-with-lease"
RELEASE = "/api/v2/concurrency_limits/decrement-with-lease"
HEALTH = "/api/health"
INCREMENT = "/api/v2/concurrency_limits/increment"
EVENTS_IN = "/api/events/in"
JSON_HEADERS = {"Content-Type": "application/json"}
#: Lease length asked for by every acquire: long enough that no lease expires during a run.
LEASE_SECONDS = 300


@dataclass(frozen=True)
class Job:
    """One worker's share of one measurement."""

    kind: Kind
    base_url: str
    #: Client numbers; in ``pairs`` client ``i`` uses the limit ``bench-i``.
    clients: tuple[int, ...]
    warmup: float
    duration: float
    #: Seconds past the window's end before in-flight requests are cancelled.
    grace: float
    #: Per-request timeout (connect + response) in seconds.
    request_timeout: float
    #: Upper bound on operations per client (the time bound normally ends the loop first).
    max_ops: int
    #: What the other kinds need (limit names, hold time, pacing...): plain JSON-like values.
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class WorkerResult:
    """Raw numbers from one worker for one measurement."""

    #: Pairs (``pairs``) or requests (``health``) completed inside the window.
    completed: int = 0
    #: Acquire (or health request) latencies in seconds, packed ``array('d')`` bytes.
    latencies: bytes = b""
    #: Release latencies in seconds (``pairs`` only), packed ``array('d')`` bytes.
    release_latencies: bytes = b""
    #: Errors inside the window by ``"<acquire|release|health>:<status or kind>"``.
    errors: dict[str, int] = field(default_factory=dict)
    #: Clients whose request was still in flight when the worker stopped.
    unfinished: int = 0
    #: Problems outside the window (priming), for the log only.
    notes: list[str] = field(default_factory=list)
    #: Per-operation records of the other kinds (tuples of numbers and strings, see each client).
    records: list[tuple[Any, ...]] = field(default_factory=list)
    #: ``Retry-After`` values received (seconds), packed ``array('d')`` bytes.
    retry_afters: bytes = b""


@dataclass
class Merged:
    """The results of all workers of one measurement, merged."""

    completed: int
    latencies: list[float]
    release_latencies: list[float]
    errors: dict[str, int]
    unfinished: int
    notes: list[str]
    records: list[tuple[Any, ...]] = field(default_factory=list)
    retry_afters: list[float] = field(default_factory=list)


def merge(results: list[WorkerResult]) -> Merged:
    """Merge worker results: sum the counts, concatenate the latencies and records."""
    latencies: array[float] = array("d")
    releases: array[float] = array("d")
    retry_afters: array[float] = array("d")
    errors: Counter[str] = Counter()
    for r in results:
        latencies.frombytes(r.latencies)
        releases.frombytes(r.release_latencies)
        retry_afters.frombytes(r.retry_afters)
        errors.update(r.errors)
    return Merged(
        completed=sum(r.completed for r in results),
        latencies=latencies.tolist(),
        release_latencies=releases.tolist(),
        errors=dict(sorted(errors.items())),
        unfinished=sum(r.unfinished for r in results),
        notes=[n for r in results for n in r.notes],
        records=[rec for r in results for rec in r.records],
        retry_afters=retry_afters.tolist(),
    )


# --- the worker side ----------------------------------------------------------------------------


@dataclass
class _Window:
    """The measured window, in this process's ``perf_counter`` time."""

    start: float
    end: float

    def __contains__(self, t: float) -> bool:
        return self.start <= t < self.end


class _Tally:
    """What the clients of one worker count."""

    def __init__(self) -> None:
        self.completed = 0
        self.latencies: array[float] = array("d")
        self.release_latencies: array[float] = array("d")
        self.errors: Counter[str] = Counter()
        self.records: list[tuple[Any, ...]] = []
        self.retry_afters: array[float] = array("d")
        #: Per-worker shared state of a kind (the events emitter's websocket).
        self.shared: dict[str, Any] = {}


def _failure_kind(exc: BaseException) -> str:
    """``timeout``, or ``connection(<exception class>)``: e.g. a server that closes the
    connection after answering (Prefect does after each 503) shows as ServerDisconnectedError."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    return f"connection({type(exc).__name__})"


async def _pairs_client(
    session: aiohttp.ClientSession, base: str, client: int, job: Job, window: _Window, tally: _Tally
) -> None:
    """Acquire-with-lease then release, on this client's own limit, until the window ends."""
    acquire_url, release_url = base + ACQUIRE, base + RELEASE
    body = json.dumps({"names": [f"bench-{client}"], "slots": 1, "lease_duration": LEASE_SECONDS}).encode()
    clock = time.perf_counter
    for _ in range(job.max_ops):
        t0 = clock()
        if t0 >= window.end:
            return
        lease_id: str | None = None
        try:
            async with session.post(acquire_url, data=body, headers=JSON_HEADERS) as resp:
                status = resp.status
                payload = await resp.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            t1 = clock()
            if t1 in window:
                tally.errors[f"acquire:{_failure_kind(exc)}"] += 1
            await asyncio.sleep(0.01)  # a refused connection must not become a busy loop
            continue
        t1 = clock()
        if status == 200:
            lease_id = json.loads(payload)["lease_id"]
            if t0 in window:
                tally.latencies.append(t1 - t0)
        else:
            if t1 in window:
                tally.errors[f"acquire:{status}"] += 1
            continue
        try:
            async with session.post(
                release_url, data=json.dumps({"lease_id": lease_id}).encode(), headers=JSON_HEADERS
            ) as resp:
                status = resp.status
                await resp.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            t2 = clock()
            if t2 in window:
                tally.errors[f"release:{_failure_kind(exc)}"] += 1
            await asyncio.sleep(0.01)
            continue
        t2 = clock()
        if t2 in window:
            if status == 204:
                tally.completed += 1
                tally.release_latencies.append(t2 - t1)
            else:
                tally.errors[f"release:{status}"] += 1


async def _redis_pairs_client(
    redis: Any, base: str, client: int, job: Job, window: _Window, tally: _Tally
) -> None:
    """The pairs of :func:`_pairs_client` against the Redis reference: the semaphore's acquire
    script on this client's own key ``bench-<client>`` (limit 1000, a lease of ``LEASE_SECONDS``),
    then ``ZREM``; through redis-py's asyncio client on one connection of this client's own."""
    from redis.exceptions import RedisError
    from servers import REDIS_ACQUIRE_LUA

    failures = (RedisError, OSError)
    acquire = redis.register_script(REDIS_ACQUIRE_LUA)
    key = f"bench-{client}"
    clock = time.perf_counter
    for n in range(job.max_ops):
        t0 = clock()
        if t0 >= window.end:
            return
        token = f"{os.getpid()}-{client}-{n}"
        try:
            granted = await acquire(keys=[key], args=[1000, LEASE_SECONDS, token])
        except failures as exc:
            if clock() in window:
                tally.errors[f"acquire:{_failure_kind(exc)}"] += 1
            await asyncio.sleep(0.01)
            continue
        t1 = clock()
        if granted != 1:
            if t1 in window:
                tally.errors["acquire:not granted"] += 1
            continue
        if t0 in window:
            tally.latencies.append(t1 - t0)
        try:
            await redis.zrem(key, token)
        except failures as exc:
            if clock() in window:
                tally.errors[f"release:{_failure_kind(exc)}"] += 1
            await asyncio.sleep(0.01)
            continue
        t2 = clock()
        if t2 in window:
            tally.completed += 1
            tally.release_latencies.append(t2 - t1)


async def _health_client(
    session: aiohttp.ClientSession, base: str, client: int, job: Job, window: _Window, tally: _Tally
) -> None:
    """``GET /api/health`` in a loop until the window ends: the generator's no-op ceiling."""
    url = base + HEALTH
    clock = time.perf_counter
    for _ in range(job.max_ops):
        t0 = clock()
        if t0 >= window.end:
            return
        try:
            async with session.get(url) as resp:
                status = resp.status
                await resp.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            if clock() in window:
                tally.errors[f"health:{_failure_kind(exc)}"] += 1
            await asyncio.sleep(0.01)
            continue
        t1 = clock()
        if t1 in window:
            if status == 200:
                tally.completed += 1
            else:
                tally.errors[f"health:{status}"] += 1
        if status == 200 and t0 in window:
            tally.latencies.append(t1 - t0)


# --- the scenarios beyond pairs -----------------------------------------------------------------
#
# Their clients keep raw records (``tally.records``) that the parent analyses; times in records
# are ``time.time()`` (the same clock in every process of the machine), so records of several
# workers, and of the parent's event subscriber, can be put on one timeline.

_IO_ERRORS = (TimeoutError, aiohttp.ClientError, OSError)


async def _post(session: aiohttp.ClientSession, url: str, data: bytes) -> tuple[int, bytes, str | None]:
    async with session.post(url, data=data, headers=JSON_HEADERS) as resp:
        return resp.status, await resp.read(), resp.headers.get("Retry-After")


async def _release(
    session: aiohttp.ClientSession, base: str, lease_id: str, window: _Window, tally: _Tally
) -> bool:
    """Release a lease (always, also after the window: the next measurement needs the slot)."""
    try:
        async with session.post(
            base + RELEASE, data=json.dumps({"lease_id": lease_id}).encode(), headers=JSON_HEADERS
        ) as resp:
            status = resp.status
            await resp.read()
    except _IO_ERRORS as exc:
        if time.perf_counter() in window:
            tally.errors[f"release:{_failure_kind(exc)}"] += 1
        return False
    if status != 204 and time.perf_counter() in window:
        tally.errors[f"release:{status}"] += 1
    return status == 204


async def _handoff_client(
    session: aiohttp.ClientSession, base: str, client: int, job: Job, window: _Window, tally: _Tally
) -> None:
    """Contended hand-off: acquire the one shared limit, hold it ``hold`` s, release; repeat.

    ``params``: ``limit`` (name), ``hold`` (s), ``wait_seconds`` (None: poll as Prefect's client
    does, sleeping exactly ``Retry-After`` after each 423). No new acquisition starts after the
    window; a poll that would retry after the window gives up. Record per acquisition:
    ``(client, requested, granted or None, released or None, attempts, release answered or None)``
    (wall-clock seconds; "released" is when the release request was sent).
    """
    p = job.params
    body: dict[str, Any] = {"names": [p["limit"]], "slots": 1, "lease_duration": LEASE_SECONDS}
    if p.get("wait_seconds"):
        body["wait_seconds"] = p["wait_seconds"]
    data, url, hold = json.dumps(body).encode(), base + ACQUIRE, float(p["hold"])
    clock, wall = time.perf_counter, time.time
    for _ in range(job.max_ops):
        if clock() >= window.end:
            return
        requested, attempts, lease_id, granted = wall(), 0, None, 0.0
        while clock() < window.end + job.grace:
            attempts += 1
            try:
                status, payload, retry = await _post(session, url, data)
            except _IO_ERRORS as exc:
                if clock() in window:
                    tally.errors[f"acquire:{_failure_kind(exc)}"] += 1
                if clock() >= window.end:
                    break
                await asyncio.sleep(0.01)
                continue
            if status == 200:
                lease_id, granted = json.loads(payload)["lease_id"], wall()
                break
            if status == 423 and retry is not None:
                delay = float(retry)
                if p.get("wait_seconds"):  # a server-side wait that timed out: queue again
                    tally.errors["acquire:423 (wait timed out)"] += 1
                    continue
                tally.retry_afters.append(delay)
                if clock() + delay >= window.end:
                    break  # the next poll would come after the window: give up
                await asyncio.sleep(delay)
                continue
            if clock() in window:
                tally.errors[f"acquire:{status}"] += 1
            if clock() >= window.end:
                break
            await asyncio.sleep(0.01)
        if lease_id is None:
            tally.records.append((client, requested, None, None, attempts, None))
            return
        await asyncio.sleep(hold)
        released = wall()
        await _release(session, base, lease_id, window, tally)
        tally.records.append((client, requested, granted, released, attempts, wall()))


async def _handoff_sdk_client(
    session: aiohttp.ClientSession, base: str, client: int, job: Job, window: _Window, tally: _Tally
) -> None:
    """The hand-off of :func:`_handoff_client` through slotkeeper's SDK: ``async with
    concurrency(limit)``, hold ``hold`` s, leave the block; repeat (``session`` is not used: the
    SDK has its own connections, on its own thread, shared by the workers of this process).

    Same records, except ``attempts``: None (the SDK does not tell how many requests an
    acquisition took). "released" is when the body ended, "release answered" when the block
    was left. An error of the SDK is counted as ``acquire:<its class>`` and ends the worker.
    """
    from slotkeeper.sdk.asyncio import concurrency

    p = job.params
    api_url, hold = base + "/api", float(p["hold"])
    clock, wall = time.perf_counter, time.time
    for _ in range(job.max_ops):
        if clock() >= window.end:
            return
        requested, granted, released = wall(), None, None
        try:
            async with concurrency(p["limit"], strict=True, api_url=api_url):
                granted = wall()
                await asyncio.sleep(hold)
                released = wall()
        except Exception as exc:
            tally.errors[f"acquire:{type(exc).__name__}"] += 1
            tally.records.append((client, requested, granted, released, None, None))
            return
        tally.records.append((client, requested, granted, released, None, wall()))


@dataclass
class _Stream:
    """A client's plain TCP connection (``handoff-floor``); both None when it could not connect."""

    reader: asyncio.StreamReader | None
    writer: asyncio.StreamWriter | None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()


async def _handoff_floor_client(
    stream: _Stream, base: str, client: int, job: Job, window: _Window, tally: _Tally
) -> None:
    """The hand-off of :func:`_handoff_client` against ``benchmarks/floor.py``, the machine's
    floor: one byte ``a`` to acquire (answered ``g`` when granted: at once, or when the lock is
    handed on), hold ``hold`` s, one byte ``r`` to release (answered ``k``); repeat.

    Same records, same times: ``(client, requested, granted or None, released or None, 1,
    release answered or None)``; an acquisition is one request. No new acquisition starts after
    the window; one not granted ``grace`` s after it gives up.
    """
    hold = float(job.params["hold"])
    clock, wall = time.perf_counter, time.time
    reader, writer = stream.reader, stream.writer
    if reader is None or writer is None:
        tally.errors["acquire:connection(not connected)"] += 1
        return
    for _ in range(job.max_ops):
        if clock() >= window.end:
            return
        requested, granted = wall(), None
        try:
            writer.write(b"a")
            async with asyncio.timeout(max(0.0, window.end + job.grace - clock())):
                answer = await reader.readexactly(1)
            if answer == b"g":
                granted = wall()
            else:
                tally.errors[f"acquire:{answer.decode(errors='replace')}"] += 1
        except TimeoutError:
            pass
        except (asyncio.IncompleteReadError, OSError) as exc:
            tally.errors[f"acquire:{_failure_kind(exc)}"] += 1
        if granted is None:
            tally.records.append((client, requested, None, None, 1, None))
            return
        await asyncio.sleep(hold)
        released = wall()
        try:
            writer.write(b"r")
            answer = await reader.readexactly(1)
        except (asyncio.IncompleteReadError, OSError) as exc:
            tally.errors[f"release:{_failure_kind(exc)}"] += 1
            tally.records.append((client, requested, granted, released, 1, None))
            return
        if answer != b"k":
            tally.errors[f"release:{answer.decode(errors='replace')}"] += 1
        tally.records.append((client, requested, granted, released, 1, wall()))


async def _rate_client(
    session: aiohttp.ClientSession, base: str, client: int, job: Job, window: _Window, tally: _Tally
) -> None:
    """Rate limit: ``POST /increment`` in ``rate_limit`` mode as fast as ``Retry-After`` allows.

    Record per grant: ``(client, granted)`` (wall clock). A 423 sleeps its ``Retry-After``
    exactly (Prefect's client does the same).
    """
    data = json.dumps({"names": [job.params["limit"]], "slots": 1, "mode": "rate_limit"}).encode()
    url, clock, wall = base + INCREMENT, time.perf_counter, time.time
    for _ in range(job.max_ops):
        if clock() >= window.end:
            return
        try:
            status, _, retry = await _post(session, url, data)
        except _IO_ERRORS as exc:
            if clock() in window:
                tally.errors[f"increment:{_failure_kind(exc)}"] += 1
            await asyncio.sleep(0.01)
            continue
        if status == 200:
            if clock() in window:
                tally.records.append((client, wall()))
            continue
        if status == 423 and retry is not None:
            delay = float(retry)
            tally.retry_afters.append(delay)
            await asyncio.sleep(min(delay, max(0.0, window.end - clock())))
            continue
        if clock() in window:
            tally.errors[f"increment:{status}"] += 1
        await asyncio.sleep(0.01)


async def _random_pairs_client(
    session: aiohttp.ClientSession, base: str, client: int, job: Job, window: _Window, tally: _Tally
) -> None:
    """Pairs on random limits ``{prefix}0`` .. ``{prefix}{count-1}`` (the scale scenario)."""
    import random

    rng = random.Random(job.params.get("seed", 0) * 1000 + client)
    prefix, count = job.params["prefix"], int(job.params["count"])
    clock = time.perf_counter
    for _ in range(job.max_ops):
        t0 = clock()
        if t0 >= window.end:
            return
        body = {"names": [f"{prefix}{rng.randrange(count)}"], "slots": 1, "lease_duration": LEASE_SECONDS}
        try:
            status, payload, _ = await _post(session, base + ACQUIRE, json.dumps(body).encode())
        except _IO_ERRORS as exc:
            if clock() in window:
                tally.errors[f"acquire:{_failure_kind(exc)}"] += 1
            await asyncio.sleep(0.01)
            continue
        t1 = clock()
        if status != 200:
            if t1 in window:
                tally.errors[f"acquire:{status}"] += 1
            continue
        if t0 in window:
            tally.latencies.append(t1 - t0)
        if await _release(session, base, json.loads(payload)["lease_id"], window, tally):
            t2 = clock()
            if t2 in window:
                tally.completed += 1
                tally.release_latencies.append(t2 - t1)


def client_event(name: str, limit: dict[str, Any], holder: str) -> str:
    """A slot event as Prefect's client emits it around a ``concurrency()`` block."""
    import datetime as dt
    import uuid

    return json.dumps(
        {
            "id": str(uuid.uuid4()),
            "occurred": dt.datetime.now(dt.UTC).isoformat(),
            "event": name,
            "resource": {
                "prefect.resource.id": f"prefect.concurrency-limit.{limit['id']}",
                "prefect.resource.name": limit["name"],
                "slots-acquired": "1",
                "limit": str(limit["limit"]),
            },
            "related": [
                {"prefect.resource.id": f"prefect.task-run.{holder}", "prefect.resource.role": "task-run"}
            ],
            "payload": {},
        }
    )


async def _emit(tally: _Tally, frame: str) -> None:
    ws: aiohttp.ClientWebSocketResponse[bool] | None = tally.shared.get("emitter")
    if ws is None or ws.closed:
        tally.errors["emit:closed"] += 1
        return
    async with tally.shared["emit_lock"]:
        await ws.send_str(frame)


async def _events_client(
    session: aiohttp.ClientSession, base: str, client: int, job: Job, window: _Window, tally: _Tally
) -> None:
    """Paced pairs on ``bench-<client>``, each acquisition with its own holder id.

    ``params``: ``interval`` (s between this client's pair starts), ``emit`` (also send the
    acquired and released events over ``/api/events/in``, as Prefect's client does: for a
    server that does not write slot events itself). Record per acquisition answered inside the
    window: ``(holder id, answered)`` (wall clock).
    """
    import uuid

    interval, emit = float(job.params["interval"]), bool(job.params.get("emit"))
    clock, wall = time.perf_counter, time.time
    next_start = clock()
    for _ in range(job.max_ops):
        now = clock()
        if now >= window.end:
            return
        if next_start > now:
            await asyncio.sleep(next_start - now)
        # Paced, without bursts to catch up: at most one start per interval.
        next_start = max(next_start + interval, clock())
        holder = str(uuid.uuid4())
        body = {
            "names": [f"bench-{client}"],
            "slots": 1,
            "lease_duration": LEASE_SECONDS,
            "holder": {"type": "task_run", "id": holder},
        }
        t0 = clock()
        try:
            status, payload, _ = await _post(session, base + ACQUIRE, json.dumps(body).encode())
        except _IO_ERRORS as exc:
            if clock() in window:
                tally.errors[f"acquire:{_failure_kind(exc)}"] += 1
            await asyncio.sleep(0.01)
            continue
        answered, t1 = wall(), clock()
        if status != 200:
            if t1 in window:
                tally.errors[f"acquire:{status}"] += 1
            continue
        granted = json.loads(payload)
        if t0 in window:
            tally.records.append((holder, answered))
            tally.latencies.append(t1 - t0)
        if emit and granted["limits"]:
            await _emit(
                tally, client_event("prefect.concurrency-limit.acquired", granted["limits"][0], holder)
            )
        if await _release(session, base, granted["lease_id"], window, tally):
            if clock() in window:
                tally.completed += 1
            if emit and granted["limits"]:
                await _emit(
                    tally, client_event("prefect.concurrency-limit.released", granted["limits"][0], holder)
                )


async def _open_emitter(job: Job, tally: _Tally) -> aiohttp.ClientSession | None:
    """The ``/api/events/in`` websocket of an emitting events job (Prefect's handshake)."""
    if job.kind != "events" or not job.params.get("emit") or not job.clients:
        return None
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
    ws = await session.ws_connect(
        job.base_url.replace("http://", "ws://", 1) + EVENTS_IN,
        protocols=("prefect",),
        timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10.0),
    )
    await ws.send_json({"type": "auth", "token": None})
    answer = await ws.receive_json(timeout=10)
    if answer.get("type") != "auth_success":
        raise RuntimeError(f"events/in handshake answered {answer!r}")
    tally.shared["emitter"] = ws
    tally.shared["emit_lock"] = asyncio.Lock()
    return session


_CLIENTS: dict[Kind, Callable[..., Coroutine[Any, Any, None]]] = {
    "pairs": _pairs_client,
    "redis-pairs": _redis_pairs_client,
    "health": _health_client,
    "handoff": _handoff_client,
    "handoff-sdk": _handoff_sdk_client,
    "handoff-floor": _handoff_floor_client,
    "rate": _rate_client,
    "random-pairs": _random_pairs_client,
    "events": _events_client,
}


async def _open_sessions(job: Job) -> tuple[list[aiohttp.ClientSession], list[str]]:
    """One session per client, each with a single keep-alive connection, primed by a request."""
    timeout = aiohttp.ClientTimeout(total=job.request_timeout)
    sessions = [
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1, force_close=False, ttl_dns_cache=None),
            timeout=timeout,
        )
        for _ in job.clients
    ]

    async def prime(session: aiohttp.ClientSession) -> str | None:
        try:
            async with session.get(job.base_url + HEALTH) as resp:
                await resp.read()
                return None if resp.status == 200 else f"priming answered {resp.status}"
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return f"priming failed: {exc!r}"

    notes = [n for n in await asyncio.gather(*(prime(s) for s in sessions)) if n]
    return sessions, sorted(set(notes))


async def _open_streams(job: Job) -> tuple[list[_Stream], list[str]]:
    """One plain TCP connection per client (``handoff-floor``: no HTTP, nothing to prime)."""
    url = urllib.parse.urlsplit(job.base_url)

    async def connect() -> _Stream | str:
        try:
            async with asyncio.timeout(job.request_timeout):
                return _Stream(*await asyncio.open_connection(url.hostname, url.port))
        except (TimeoutError, OSError) as exc:
            return f"connecting failed: {exc!r}"

    opened = await asyncio.gather(*(connect() for _ in job.clients))
    streams = [o if isinstance(o, _Stream) else _Stream(None, None) for o in opened]
    return streams, sorted({o for o in opened if isinstance(o, str)})


async def _open_redis(job: Job) -> tuple[list[Any], list[str]]:
    """One redis-py client per client, each on one connection of its own, primed by ``PING``
    (``redis-pairs``)."""
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    url = urllib.parse.urlsplit(job.base_url)
    clients = [
        aioredis.Redis(
            host=url.hostname or "127.0.0.1",
            port=url.port or 6379,
            single_connection_client=True,
            socket_timeout=job.request_timeout,
        )
        for _ in job.clients
    ]

    async def prime(client: Any) -> str | None:
        try:
            await client.ping()
        except (RedisError, OSError) as exc:
            return f"priming failed: {exc!r}"
        return None

    notes = [n for n in await asyncio.gather(*(prime(c) for c in clients)) if n]
    return clients, sorted(set(notes))


async def _run(job: Job, conn: multiprocessing.connection.Connection) -> WorkerResult:
    """Run one job: open and prime, report ready, wait for the start time, load, collect."""
    sessions: list[aiohttp.ClientSession] | list[_Stream] | list[Any]
    if job.kind == "handoff-floor":
        sessions, notes = await _open_streams(job)
    elif job.kind == "redis-pairs":
        sessions, notes = await _open_redis(job)
    else:
        sessions, notes = await _open_sessions(job)
    tally = _Tally()
    emitter: aiohttp.ClientSession | None = None
    try:
        emitter = await _open_emitter(job, tally)
        conn.send(("ready", None))
        loop = asyncio.get_running_loop()
        # The parent answers with the common start time (wall clock), or None to abort.
        start_wall = await loop.run_in_executor(None, conn.recv)
        if start_wall is None:
            return WorkerResult(notes=notes)
        delay = start_wall - time.time()
        start = time.perf_counter() + delay
        window = _Window(start + job.warmup, start + job.warmup + job.duration)
        if delay > 0:
            await asyncio.sleep(delay)
        client = _CLIENTS[job.kind]
        tasks = [
            asyncio.create_task(client(s, job.base_url, c, job, window, tally))
            for s, c in zip(sessions, job.clients, strict=True)
        ]
        stop_in = max(0.0, window.end + job.grace - time.perf_counter())
        _, pending = await asyncio.wait(tasks, timeout=stop_in) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                notes.append(f"client crashed: {task.exception()!r}")
        return WorkerResult(
            completed=tally.completed,
            latencies=tally.latencies.tobytes(),
            release_latencies=tally.release_latencies.tobytes(),
            errors=dict(tally.errors),
            unfinished=len(pending),
            notes=notes,
            records=tally.records,
            retry_afters=tally.retry_afters.tobytes(),
        )
    finally:
        closing = [s.aclose() if hasattr(s, "aclose") else s.close() for s in sessions]
        if emitter is not None:
            closing.append(emitter.close())
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*closing), timeout=5)


def _worker_main(conn: multiprocessing.connection.Connection) -> None:
    """Entry point of a worker process: run jobs until told to stop (``None``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    while True:
        try:
            job = conn.recv()
        except EOFError:
            break
        if job is None:
            break
        try:
            result = loop.run_until_complete(_run(job, conn))
        except Exception as exc:  # reported to the parent, which fails the run
            conn.send(("error", repr(exc)))
        else:
            conn.send(("result", result))
    loop.close()


# --- the parent side ----------------------------------------------------------------------------


class WorkerError(RuntimeError):
    """A worker failed or did not answer in time."""


class WorkerPool:
    """``procs`` load-generator processes, reused for every measurement."""

    def __init__(self, procs: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conns: list[multiprocessing.connection.Connection] = []
        self.processes: list[multiprocessing.process.BaseProcess] = []
        for i in range(procs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child,), name=f"loadgen-{i}", daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self.processes.append(proc)

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers (for CPU accounting)."""
        return [p.pid for p in self.processes if p.pid is not None]

    def _recv(self, conn: multiprocessing.connection.Connection, deadline: float, want: str) -> object:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not conn.poll(remaining):
            raise WorkerError(f"a load-generator worker did not send {want!r} in time")
        tag, value = conn.recv()
        if tag == "error":
            raise WorkerError(f"a load-generator worker failed: {value}")
        if tag != want:
            raise WorkerError(f"a load-generator worker sent {tag!r}, expected {want!r}")
        return value

    def prepare(self, jobs: list[Job], timeout: float) -> None:
        """Send each worker its job and wait until all have primed their connections."""
        if len(jobs) != len(self._conns):
            raise ValueError("one job per worker")
        for conn, job in zip(self._conns, jobs, strict=True):
            conn.send(job)
        deadline = time.monotonic() + timeout
        for conn in self._conns:
            self._recv(conn, deadline, "ready")

    def start(self, start_wall: float) -> None:
        """Tell every prepared worker the common start time (``time.time()`` based)."""
        for conn in self._conns:
            conn.send(start_wall)

    def collect(self, timeout: float) -> list[WorkerResult]:
        """The results of the running measurement, waiting at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        results = []
        for conn in self._conns:
            value = self._recv(conn, deadline, "result")
            assert isinstance(value, WorkerResult)
            results.append(value)
        return results

    def close(self) -> None:
        """Stop the workers (politely, then by force)."""
        for conn in self._conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send(None)
        for proc in self.processes:
            proc.join(timeout=3)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=2)
            if proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
        for conn in self._conns:
            conn.close()


def split_clients(clients: int, procs: int) -> list[tuple[int, ...]]:
    """Deal ``clients`` client numbers round-robin over ``procs`` workers (1 client: one worker)."""
    shares: list[list[int]] = [[] for _ in range(procs)]
    for c in range(clients):
        shares[c % procs].append(c)
    return [tuple(s) for s in shares]
