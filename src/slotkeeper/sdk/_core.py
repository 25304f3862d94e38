"""The SDK's async core: acquire, renew and release. Every coroutine here runs on the runtime loop.

Acquisition (``increment-with-lease``), as a loop of requests:

1. The first request does not wait (Prefect's request, unchanged): uncontended, it is the only
   one, and it answers Prefect's way for names that do not exist (``limits: []``) or inactive
   limits, on which the server would refuse to wait.
2. On 423 the next requests wait on the server (``wait_seconds`` = what is left of
   ``timeout_seconds``, or :data:`WAIT_CHUNK_SECONDS` at a time without a timeout), in the fair
   queue, with ``priority``. Each 423 counts against ``max_retries``, as in Prefect.
3. If the server refuses to wait (422): a server without the queue (Prefect's) or with a lower
   maximum is remembered per server; a request naming a limit that does not exist or is inactive
   is polled, Prefect's way (``Retry-After``), since the server only queues on active limits.

Requests that were sent are never abandoned half way: when the caller is cancelled, a quick
request is finished and a waiting one is withdrawn by a half-close (see :mod:`._wire`), and a
grant either brought is returned all the same, so the abandoned call releases it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from slotkeeper.errors import ApiError, ServerUnreachable
from slotkeeper.sdk import _wire
from slotkeeper.sdk._runtime import Endpoint, Runtime
from slotkeeper.sdk.errors import AcquireConcurrencySlotTimeoutError, ConcurrencySlotAcquisitionError

log = logging.getLogger("slotkeeper.sdk")

#: Longest single wait on the server when ``timeout_seconds`` is None: below the 60 s idle
#: timeout of common proxies and load balancers.
WAIT_CHUNK_SECONDS = 55.0
#: Added to a waiting request's ``wait_seconds`` for the local bound on its answer.
REQUEST_GRACE_SECONDS = 10.0
#: Bound on a request that does not wait.
QUICK_TIMEOUT_SECONDS = 30.0
#: A lease is renewed after this share of its duration (then again after each renewal).
RENEW_FRACTION = 0.5
#: Bound on one renewal request.
RENEW_ATTEMPT_SECONDS = 10.0
#: Cap of the pause between failed attempts (acquire, renew, release).
BACKOFF_CAP_SECONDS = 10.0
#: Failed attempts in a row (unreachable server, 429/502/503/504) before an acquisition fails.
TRANSIENT_ATTEMPTS = 5
#: Attempts at releasing a lease.
RELEASE_ATTEMPTS = 3
#: Statuses that say "not now" rather than "no".
TRANSIENT_STATUSES = frozenset({408, 429, 502, 503, 504})

V2 = "/v2/concurrency_limits"
V1 = "/concurrency_limits"

_MAX_WAIT = re.compile(r"wait_seconds: Input should be less than or equal to ([0-9.eE+]+)")


def backoff(attempt: int) -> float:
    """About 0.5, 1, 2, 4 ... s (capped), jittered into [0.75, 1.25] of that."""
    return float(min(BACKOFF_CAP_SECONDS, 0.25 * 2 ** min(attempt, 16)) * random.uniform(0.75, 1.25))


@dataclass(frozen=True, slots=True)
class GrantedLimit:
    """One limit of an acquisition: ``fencing_token`` orders the grants of that limit."""

    id: str
    name: str
    limit: int
    fencing_token: int | None = None


class Lease:
    """What a ``concurrency`` block holds (what ``with ... as lease`` gives).

    ``lease_id`` is None when nothing is held (no names, or none of the limits exists).
    ``lost`` becomes True if the lease was lost while the block ran.
    """

    __slots__ = ("_renewal", "lease_id", "limits")

    def __init__(
        self, lease_id: str | None, limits: tuple[GrantedLimit, ...], renewal: Renewal | None = None
    ) -> None:
        self.lease_id = lease_id
        self.limits = limits
        self._renewal = renewal

    @property
    def lost(self) -> bool:
        """True once the lease is known to be lost (410, or not renewed before it expired)."""
        return self._renewal is not None and self._renewal.lost is not None

    @property
    def fencing_tokens(self) -> dict[str, int]:
        """The fencing token of each limit (by name): hand it to systems that can refuse writes
        from a holder whose lease was lost."""
        return {lim.name: lim.fencing_token for lim in self.limits if lim.fencing_token is not None}

    def __repr__(self) -> str:
        names = [lim.name for lim in self.limits]
        return f"Lease(lease_id={self.lease_id!r}, limits={names!r}, lost={self.lost})"


NOTHING_HELD = Lease(None, ())


@dataclass(frozen=True, slots=True)
class Spec:
    """One ``concurrency`` request, as the caller made it."""

    names: list[str]
    slots: int
    timeout_seconds: float | None
    max_retries: int | None
    lease_duration: float
    holder: dict[str, str] | None
    priority: int
    raises: bool
    key: tuple[str, str | None]


# --- answers ----------------------------------------------------------------------------------------


def error_detail(payload: bytes, fallback: str) -> str:
    """The message of an error answer, read as the CLI reads it (:func:`slotkeeper.client.error_detail`).

    Imported on first use: ``slotkeeper.client`` imports aiohttp (about 0.3 s), which the SDK
    does not otherwise need; error answers are off the hot path.
    """
    from slotkeeper.client import error_detail as read

    return read(payload, fallback)


def failure(status: int, reason: str, payload: bytes) -> str:
    """Prefect's rendering of an error answer: ``423 Locked: <detail>``."""
    detail = error_detail(payload, "")
    head = f"{status} {reason}".strip()
    return f"{head}: {detail}" if detail else head


def retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("retry-after")
    try:
        return None if value is None else max(float(value), 0.0)
    except ValueError:
        return None


def timed_out(seconds: float | None, what: str = "slots") -> AcquireConcurrencySlotTimeoutError:
    return AcquireConcurrencySlotTimeoutError(
        f"Attempt to acquire concurrency {what} timed out after {seconds} second(s)"
    )


class Clock:
    """``timeout_seconds`` as a deadline on the runtime loop's clock."""

    def __init__(self, timeout: float | None, what: str = "slots") -> None:
        self.loop = asyncio.get_running_loop()
        self.timeout = timeout
        self.what = what
        self.deadline = None if timeout is None else self.loop.time() + timeout

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - self.loop.time()

    def expired(self) -> bool:
        remaining = self.remaining()
        return remaining is not None and remaining <= 0

    async def pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or until the deadline and then raise the timeout."""
        remaining = self.remaining()
        if remaining is not None and remaining <= seconds:
            await asyncio.sleep(max(remaining, 0.0))
            raise timed_out(self.timeout, self.what)
        await asyncio.sleep(seconds)


async def exchange(
    ep: Endpoint, path: str, body: dict[str, Any], wait: float | None, remaining: float | None
) -> tuple[_wire.Answer, bool]:
    """One POST, and whether the calling task was cancelled while it was out.

    A cancelled caller still gets the answer (a quick request is finished; a waiting one is
    withdrawn and its answer read, if the server sent one), so that a grant can be released.
    """
    if wait is None:
        bound = QUICK_TIMEOUT_SECONDS if remaining is None else max(remaining, 0.0) + REQUEST_GRACE_SECONDS
        timeout = min(bound, QUICK_TIMEOUT_SECONDS)
    else:
        timeout = wait + REQUEST_GRACE_SECONDS
    answer = await ep.pool.request("POST", path, orjson.dumps(body), timeout, withdraw=wait is not None)
    task = asyncio.current_task()
    return answer, task is not None and task.cancelling() > 0


async def post(ep: Endpoint, path: str, body: dict[str, Any], timeout: float = QUICK_TIMEOUT_SECONDS) -> None:
    """A POST whose answer only matters by its status: :class:`ApiError` if 400 or more."""
    status, reason, _, payload = await ep.pool.request("POST", path, orjson.dumps(body), timeout)
    if status >= 400:
        raise ApiError(status, error_detail(payload, reason or str(status)))


async def post_retried(ep: Endpoint, path: str, body: dict[str, Any], retry: bool = True) -> None:
    """:func:`post`, tried up to :data:`RELEASE_ATTEMPTS` times (once unless ``retry``) while it
    fails transiently (an unreachable server, :data:`TRANSIENT_STATUSES`); raises the last error."""
    attempts = RELEASE_ATTEMPTS if retry else 1
    for attempt in range(1, attempts + 1):
        try:
            await post(ep, path, body)
            return
        except (ApiError, ServerUnreachable) as exc:
            transient = isinstance(exc, ServerUnreachable) or exc.status in TRANSIENT_STATUSES
            if not transient or attempt == attempts:
                raise
        await asyncio.sleep(backoff(attempt - 1))


# --- acquisitions: what every kind shares ----------------------------------------------------------


class Attempts:
    """The request loop of one acquisition (``concurrency``, ``rate_limit`` or v1), the same for
    every kind: ``timeout_seconds`` (:attr:`clock`), refusals (423) against ``max_retries``, and
    the failures in a row that are not answers (an unreachable server, :data:`TRANSIENT_STATUSES`),
    retried with backoff :data:`TRANSIENT_ATTEMPTS` times at most; a refusal starts that count
    again. Errors read as Prefect's: ``Unable to acquire concurrency slots on ['db']: ...`` (v1:
    ``Unable to acquire concurrency limits ['db']: ...``).
    """

    def __init__(
        self, names: list[str], timeout: float | None, max_retries: int | None = None, v1: bool = False
    ) -> None:
        self.clock = Clock(timeout, "limits" if v1 else "slots")
        self.names = names
        self.retries = max_retries
        self.failed = f"Unable to acquire concurrency {'limits' if v1 else 'slots on'} {names!r}"
        self.in_a_row = 0

    def error(self, detail: str) -> ConcurrencySlotAcquisitionError:
        return ConcurrencySlotAcquisitionError(f"{self.failed}: {detail}")

    def rejection(self, answer: _wire.Answer) -> ConcurrencySlotAcquisitionError:
        status, reason, _, payload = answer
        return self.error(failure(status, reason, payload))

    async def send(
        self, ep: Endpoint, path: str, body: dict[str, Any], wait: float | None = None
    ) -> tuple[_wire.Answer, bool] | None:
        """:func:`exchange`, or None when the server could not be reached: then the pause before
        the next attempt is over (send again), unless that was one attempt too many (raised)."""
        try:
            return await exchange(ep, path, body, wait, self.clock.remaining())
        except ServerUnreachable as exc:
            self.in_a_row += 1
            if self.in_a_row >= TRANSIENT_ATTEMPTS:
                raise self.error(str(exc)) from exc
            log.warning("Could not reach the server to acquire %r (%s); retrying", self.names, exc)
            await self.clock.pause(backoff(self.in_a_row))
            return None

    def refused(self, answer: _wire.Answer) -> None:
        """A 423: one refusal more (raised if ``max_retries`` were already used up)."""
        self.in_a_row = 0
        if self.retries is not None:
            if self.retries <= 0:
                raise self.rejection(answer)
            self.retries -= 1

    async def retry_or_raise(self, answer: _wire.Answer) -> None:
        """Any other error answer: pause before the next attempt if it only says "not now" (and
        attempts remain), else raise it."""
        if answer[0] in TRANSIENT_STATUSES:
            self.in_a_row += 1
            if self.in_a_row < TRANSIENT_ATTEMPTS:
                await self.clock.pause(retry_after(answer[2]) or backoff(self.in_a_row))
                return
        raise self.rejection(answer)


async def poll(ep: Endpoint, path: str, body: dict[str, Any], attempts: Attempts) -> tuple[bytes, bool]:
    """Prefect's way to wait: POST until 200, sleeping the server's ``Retry-After`` after each
    423 (a 423 without it, for a limit of 0 that would never grant, fails at once).

    Gives the payload of the 200, and whether the caller was cancelled while it was out; any other
    answer to a cancelled caller raises :class:`asyncio.CancelledError`.
    """
    while True:
        answered = await attempts.send(ep, path, body)
        if answered is None:
            continue
        answer, cancelled = answered
        status, _, headers, payload = answer
        if status == 200:
            return payload, cancelled
        if cancelled:
            raise asyncio.CancelledError
        pause = retry_after(headers)
        if status == 423 and pause is not None:
            attempts.refused(answer)
            await attempts.clock.pause(pause)
            continue
        await attempts.retry_or_raise(answer)


# --- concurrency: acquire -----------------------------------------------------------------------------


async def acquire(rt: Runtime, spec: Spec) -> Lease:
    """Acquire ``spec`` (see the module's docstring); start renewing what was granted."""
    ep = rt.endpoint(spec.key)
    attempts = Attempts(spec.names, spec.timeout_seconds, spec.max_retries)
    clock = attempts.clock
    body: dict[str, Any] = {
        "names": sorted(set(spec.names)),
        "slots": spec.slots,
        "mode": "concurrency",
        "lease_duration": spec.lease_duration,
    }
    if spec.holder is not None:
        body["holder"] = spec.holder
    contended = False  # a 423 was seen: wait on the server from now on
    polling = False  # the server will not queue this request: poll with Retry-After
    place: str | None = None  # the waiter a server answered 503 at its shutdown: take it back
    while True:
        wait: float | None = None
        sent_body = body
        if contended and ep.waits and not polling:
            remaining = clock.remaining()
            if remaining is not None and remaining <= 0:
                raise timed_out(spec.timeout_seconds)
            wait = ep.wait_chunk or WAIT_CHUNK_SECONDS
            if remaining is not None:
                wait = min(wait, remaining)
            sent_body = {**body, "wait_seconds": wait, "priority": spec.priority}
            if place is not None:
                sent_body["waiter_id"] = place
        sent = clock.loop.time()
        answered = await attempts.send(ep, f"{V2}/increment-with-lease", sent_body, wait)
        if answered is None:
            continue
        answer, cancelled = answered
        status, _, headers, payload = answer
        # Kept until another answer (a refused connection is none): retries while a server restarts.
        place = shutdown_place(payload) or place if status == 503 and wait is not None else None
        if status == 200:
            return granted(rt, ep, spec, payload, sent, wait is not None)
        if cancelled:
            raise asyncio.CancelledError
        if status == 423:
            attempts.refused(answer)
            if clock.expired():
                raise timed_out(spec.timeout_seconds)
            contended = True
            if ep.waits and not polling:
                continue  # the next request waits on the server
            pause = retry_after(headers)
            if pause is None:
                raise attempts.error("423 without Retry-After")
            await clock.pause(pause)
            continue
        if status == 422 and wait is not None:
            action = refused(ep, spec, wait, error_detail(payload, ""))
            if action == "poll":
                # The server does not queue requests naming a limit that does not exist or is
                # inactive (Prefect answers those at once): this one polls, Prefect's way.
                polling = True
                continue
            if action == "again":
                continue
        await attempts.retry_or_raise(answer)


def shutdown_place(payload: bytes) -> str | None:
    """The waiter id of a 503 ``shutting_down`` answer: the place in the queue the server kept
    for this request, which the next request names (``waiter_id``) to take it back."""
    try:
        answer = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if isinstance(answer, dict) and answer.get("code") == "shutting_down":
        place = answer.get("waiter_id")
        return place if isinstance(place, str) else None
    return None


def refused(ep: Endpoint, spec: Spec, wait: float, detail: str) -> str:
    """The server answered 422 to a waiting request: learn why.

    ``"again"``: it is the wait itself (the endpoint learnt the server's maximum wait, or that
    it does not wait at all: a Prefect server); ``"poll"``: it is this request's limits (one does
    not exist or is inactive); ``"fail"``: the request is wrong (``priority`` out of range).
    """
    if "wait_seconds" in detail:
        found = _MAX_WAIT.search(detail)
        if found and 0 < float(found.group(1)) < wait:
            ep.wait_chunk = float(found.group(1))
            log.debug("%s waits at most %s s at a time", ep.base_url, ep.wait_chunk)
        else:
            ep.waits = False
            log.info("%s does not wait on the server (%s): polling with Retry-After", ep.base_url, detail)
        return "again"
    if "priority" in detail:
        return "fail"
    log.debug("The server will not queue %r (%s): polling instead", spec.names, detail)
    return "poll"


def granted(rt: Runtime, ep: Endpoint, spec: Spec, payload: bytes, sent: float, waited: bool) -> Lease:
    try:
        answer = orjson.loads(payload)
        limits = tuple(
            GrantedLimit(str(lim["id"]), str(lim["name"]), int(lim["limit"]), lim.get("fencing_token"))
            for lim in answer.get("limits") or ()
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConcurrencySlotAcquisitionError(
            f"Unable to acquire concurrency slots on {spec.names!r}: not a grant: {payload[:200]!r}"
        ) from exc
    if not limits and not waited:
        # Nothing exists to hold: Prefect's server still made up a lease id; nothing to renew.
        return Lease(None, ())
    # A waiting request is only queued on limits that exist, so its grant always holds slots,
    # even if the answer lists no limits (a server bug: the grant after a wait came back with
    # ``limits: []``); the lease is renewed and released all the same.
    lease_id = str(answer["lease_id"])
    # The server started the lease between ``sent`` and now; a waiting request's grant is
    # answered at once, so it started at most a round trip ago (1 s is a generous bound).
    start = max(sent, rt.loop.time() - 1.0)
    renewal = Renewal(rt, ep, lease_id, spec.lease_duration, start, spec.names, spec.raises)
    return Lease(lease_id, limits, renewal)


# --- concurrency: renew and release ---------------------------------------------------------------


class Renewal:
    """Keeps one lease alive from the runtime loop, until it is released or lost.

    Renewals run every ``RENEW_FRACTION`` of the duration. A failed renewal is retried with
    backoff until the lease would have expired (measured from when the last successful renewal
    was sent, so never later than the server's expiry): an outage shorter than what is left of
    the lease costs nothing. The lease is *lost* when the server answers 410, or when it could
    not be renewed before it expired; then the loss is logged at once and the block's listener
    is told (it interrupts the body when ``raises``).
    """

    def __init__(
        self,
        rt: Runtime,
        ep: Endpoint,
        lease_id: str,
        duration: float,
        sent: float,
        names: list[str],
        raises: bool,
    ) -> None:
        self.rt = rt
        self.ep = ep
        self.lease_id = lease_id
        self.duration = duration
        self.names = names
        self.raises = raises
        self.expires = sent + duration
        self.lost: str | None = None
        self.gone = False  # the server said 410: there is nothing left to release
        self.stopped = False
        self._lock = threading.Lock()
        self._listener: Callable[[str], None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._handle: asyncio.TimerHandle | None = rt.loop.call_at(
            sent + duration * RENEW_FRACTION, self._due
        )
        rt.held.add(self)

    # --- from the block's thread ---------------------------------------------------------------------

    def listen(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(reason)`` when the lease is lost (at once if it already is)."""
        with self._lock:
            lost = self.lost
            if lost is None:
                self._listener = listener
        if lost is not None:
            listener(lost)

    # --- on the runtime loop -------------------------------------------------------------------------

    def _due(self) -> None:
        self._handle = None
        self._task = self.rt.loop.create_task(self._renew())

    async def _renew(self) -> None:
        loop = self.rt.loop
        attempt = 0
        error = ""
        while not self.stopped:
            sent = loop.time()
            left = self.expires - sent
            if left <= 0:
                self._lose(f"it could not be renewed before it expired ({error})")
                return
            try:
                await post(
                    self.ep,
                    f"{V2}/leases/{self.lease_id}/renew",
                    {"lease_duration": self.duration},
                    timeout=max(min(RENEW_ATTEMPT_SECONDS, left), 0.5),
                )
            except ApiError as exc:
                if exc.status == 410:
                    self.gone = True
                    self._lose("the server no longer has it (410: it expired or was revoked)")
                    return
                error = f"{exc.status}: {exc.detail}"
            except ServerUnreachable as exc:
                error = str(exc)
            except Exception as exc:  # never let the renewal die silently
                log.exception("Unexpected error renewing concurrency lease %s", self.lease_id)
                error = repr(exc)
            else:
                if self.stopped:  # released meanwhile: the renewal was finished, not wanted
                    return
                if attempt:
                    log.info(
                        "Concurrency lease %s renewed after %d failed attempt(s)", self.lease_id, attempt
                    )
                self.expires = sent + self.duration
                self._task = None
                self._handle = loop.call_at(sent + self.duration * RENEW_FRACTION, self._due)
                return
            attempt += 1
            left = self.expires - loop.time()
            delay = max(min(backoff(attempt), left), 0.0)  # the last pause ends at the expiry
            log.warning(
                "Could not renew concurrency lease %s on %r (%s); retrying in %.1f s, %.1f s before it expires",
                self.lease_id,
                self.names,
                error,
                delay,
                max(left, 0.0),
            )
            await asyncio.sleep(delay)

    def _lose(self, reason: str) -> None:
        if self.stopped or self.lost is not None:
            return
        self.rt.held.discard(self)
        if self.raises:
            log.error(
                "Concurrency lease renewal failed - slots are no longer reserved. Terminating "
                "execution to prevent over-allocation. Lease ID: %s, limits: %r: %s",
                self.lease_id,
                self.names,
                reason,
            )
        else:
            log.warning(
                "Concurrency lease renewal failed - slots are no longer reserved. Execution will "
                "continue, but concurrency limits may be exceeded. Lease ID: %s, limits: %r: %s",
                self.lease_id,
                self.names,
                reason,
            )
        with self._lock:
            self.lost = reason
            listener, self._listener = self._listener, None
        if listener is not None:
            listener(reason)

    def stop(self) -> None:
        """No more renewals (the lease is being released)."""
        self.stopped = True
        self.rt.held.discard(self)
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._task is not None:
            self._task.cancel()
            self._task = None
        with self._lock:
            self._listener = None

    async def release(self) -> None:
        """Stop renewing and release the lease; retried on transient failures.

        Raises :class:`ApiError` or :class:`ServerUnreachable` if it could not be released (a
        lost lease's release is only attempted: failures are not raised).
        """
        self.stop()
        if self.gone:
            return
        lost = self.lost is not None  # final: a stopped renewal is never lost
        try:
            await post_retried(
                self.ep,
                f"{V2}/decrement-with-lease",
                {"lease_id": self.lease_id},
                retry=not lost,
            )
        except (ApiError, ServerUnreachable) as exc:
            if not lost:
                raise
            log.debug("Could not release lost lease %s: %s", self.lease_id, exc)

    async def release_at_exit(self) -> None:
        try:
            await self.release()
        except (ApiError, ServerUnreachable) as exc:
            log.warning("Could not release concurrency lease %s at exit: %s", self.lease_id, exc)


async def release(lease: Lease) -> None:
    """Release what a block holds (nothing if it holds nothing)."""
    if lease._renewal is not None:
        await lease._renewal.release()


async def release_orphan(lease: Lease) -> None:
    """Release a grant whose caller is gone (cancelled while it was being acquired)."""
    if lease._renewal is not None:
        try:
            await lease._renewal.release()
        except (ApiError, ServerUnreachable) as exc:
            log.warning("Could not release abandoned concurrency lease %s: %s", lease.lease_id, exc)


# --- rate_limit -----------------------------------------------------------------------------------------


async def take_rate(
    rt: Runtime,
    key: tuple[str, str | None],
    names: list[str],
    slots: int,
    timeout_seconds: float | None,
) -> list[GrantedLimit]:
    """``rate_limit``: ``/increment`` in ``rate_limit`` mode, sleeping the (exact) Retry-After."""
    ep = rt.endpoint(key)
    body = {"names": sorted(set(names)), "slots": slots, "mode": "rate_limit"}
    payload, cancelled = await poll(ep, f"{V2}/increment", body, Attempts(names, timeout_seconds))
    if cancelled:  # rate-limit slots are never released: they decay
        raise asyncio.CancelledError
    return [
        GrantedLimit(str(lim["id"]), str(lim["name"]), int(lim["limit"]), lim.get("fencing_token"))
        for lim in orjson.loads(payload)
    ]


# --- v1 (tags) ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class V1Grant:
    """What a v1 block holds: the limits found, and what is needed to release them."""

    names: list[str]
    task_run_id: str
    limits: tuple[GrantedLimit, ...]
    key: tuple[str, str | None]
    started: float


async def acquire_v1(
    rt: Runtime,
    key: tuple[str, str | None],
    names: list[str],
    task_run_id: str,
    timeout_seconds: float | None,
) -> V1Grant:
    """Prefect's v1 client: ``/concurrency_limits/increment``, Retry-After polling.

    A 423 without Retry-After (a limit of 0: it would never be granted) fails at once.
    """
    ep = rt.endpoint(key)
    attempts = Attempts(names, timeout_seconds, v1=True)
    body = {"names": sorted(set(names)), "task_run_id": task_run_id}
    payload, _ = await poll(ep, f"{V1}/increment", body, attempts)  # a cancelled caller's grant is released
    limits = tuple(
        GrantedLimit(str(lim["id"]), str(lim["name"]), int(lim["limit"])) for lim in orjson.loads(payload)
    )
    return V1Grant(names, task_run_id, limits, key, attempts.clock.loop.time())


async def release_v1(rt: Runtime, grant: V1Grant) -> None:
    """``/concurrency_limits/decrement`` for the task run (releases whatever it holds there)."""
    ep = rt.endpoint(grant.key)
    body = {
        "names": sorted(set(grant.names)),
        "task_run_id": grant.task_run_id,
        "occupancy_seconds": max(rt.loop.time() - grant.started, 0.0),
    }
    await post_retried(ep, f"{V1}/decrement", body)
