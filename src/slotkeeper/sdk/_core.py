"""The SDK's async core: acquire, renew and release. Renewals run on the runtime loop; the
coroutines that acquire and release run there too, or on the loop of an ``async with`` block
(see :mod:`._runtime`), whichever endpoint they are given.

Acquisition (``increment-with-lease``), as a loop of requests:

1. The first request waits on the server (``wait_seconds`` = what is left of
   ``timeout_seconds``, or :data:`WAIT_CHUNK_SECONDS` at a time without a timeout), in the fair
   queue, with ``priority``, unless ``max_retries`` is given or ``timeout_seconds`` is 0: then it
   is Prefect's request, unchanged (a refusal at once, counted). A first request that did not
   wait would leave a window, between its 423 and its waiting request, in which a newcomer that
   finds the slot free and the queue empty is served first.
2. On 423 the next requests wait on the server, as above. Each 423 counts against
   ``max_retries``, as in Prefect. A wait that ends without slots answers 423 and is asked again.
3. If the server refuses to wait (422): a server without the queue (Prefect's) or with a lower
   maximum is remembered per server; a request naming a limit that does not exist or is inactive
   (code ``cannot_wait``) is polled, Prefect's way (``Retry-After``), since the server only queues
   on active limits: its next request does not wait, and is answered Prefect's way (``limits:
   []`` for names that do not exist, an uncounted grant for inactive limits).

Failures that say "not now" (an unreachable server, 503 ...) are retried by the one policy of
:mod:`._retry`, within the caller's timeout.

Requests that were sent are never abandoned half way: when the caller is cancelled, a quick
request is finished and a waiting one is withdrawn by a half-close (see :mod:`._wire`), and a
grant either brought is returned all the same, so the abandoned call releases it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from slotkeeper.error_answers import api_error, error_detail, retry_after
from slotkeeper.errors import ApiError, ServerUnreachable
from slotkeeper.sdk import _retry, _wire
from slotkeeper.sdk._runtime import SESSION_LOST, Endpoint, Runtime
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

V2 = "/v2/concurrency_limits"
V1 = "/concurrency_limits"


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


def answer_error(answer: _wire.Answer) -> ApiError:
    """The error an answer stands for (its code, detail, validation errors, Retry-After)."""
    status, reason, headers, payload = answer
    return api_error(status, reason, headers, payload)


def failure(status: int, reason: str, payload: bytes) -> str:
    """Prefect's rendering of an error answer: ``423 Locked: <detail>``."""
    detail = error_detail(payload, "")
    head = f"{status} {reason}".strip()
    return f"{head}: {detail}" if detail else head


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
    answer = await ep.request("POST", path, orjson.dumps(body), timeout, withdraw=wait is not None)
    task = asyncio.current_task()
    return answer, task is not None and task.cancelling() > 0


async def post(ep: Endpoint, path: str, body: dict[str, Any], timeout: float = QUICK_TIMEOUT_SECONDS) -> None:
    """A POST whose answer only matters by its status: :class:`ApiError` if 400 or more."""
    answer = await ep.request("POST", path, orjson.dumps(body), timeout)
    if answer[0] >= 400:
        raise answer_error(answer)


async def post_retried(ep: Endpoint, path: str, body: dict[str, Any], retry: bool = True) -> None:
    """:func:`post`, retried by the SDK's retry policy (:mod:`._retry`) while it fails
    transiently (only tried once unless ``retry``); raises the last error."""
    policy = _retry.Retry(attempts=_retry.ATTEMPTS if retry else 1)
    while True:
        try:
            await post(ep, path, body)
            return
        except (ApiError, ServerUnreachable) as exc:
            pause = policy.delay(exc)
            if pause is None:
                raise
        await asyncio.sleep(pause)


# --- acquisitions: what every kind shares ----------------------------------------------------------


class Attempts:
    """The request loop of one acquisition (``concurrency``, ``rate_limit`` or v1), the same for
    every kind: ``timeout_seconds`` (:attr:`clock`), refusals (423) against ``max_retries``, and
    the failures that say "not now" (an unreachable server, a 503 ...), retried by the SDK's retry
    policy (:mod:`._retry`), never past the timeout; a refusal ends a run of failures. Errors
    read as Prefect's: ``Unable to acquire concurrency slots on ['db']: ...`` (v1: ``Unable to
    acquire concurrency limits ['db']: ...``).
    """

    def __init__(
        self, names: list[str], timeout: float | None, max_retries: int | None = None, v1: bool = False
    ) -> None:
        self.clock = Clock(timeout, "limits" if v1 else "slots")
        self.names = names
        self.retries = max_retries
        self.failed = f"Unable to acquire concurrency {'limits' if v1 else 'slots on'} {names!r}"
        self.retry = _retry.Retry()

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
            pause = self.retry.delay(exc)
            if pause is None:
                raise self.error(str(exc)) from exc
            log.warning("Could not reach the server to acquire %r (%s); retrying", self.names, exc)
            await self.clock.pause(pause)
            return None

    def refused(self, answer: _wire.Answer) -> None:
        """A 423: one refusal more (raised if ``max_retries`` were already used up)."""
        self.retry.answered()
        if self.retries is not None:
            if self.retries <= 0:
                raise self.rejection(answer)
            self.retries -= 1

    async def retry_or_raise(self, answer: _wire.Answer) -> None:
        """Any other error answer: pause before the next attempt if it only says "not now" (and
        attempts remain), else raise it."""
        pause = self.retry.delay(answer_error(answer))
        if pause is None:
            raise self.rejection(answer)
        await self.clock.pause(pause)


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


async def acquire(rt: Runtime, spec: Spec, ep: Endpoint | None = None) -> Lease:
    """Acquire ``spec`` (see the module's docstring) through ``ep`` (the runtime's endpoint by
    default; an ``async with`` block's is its own loop's); start renewing what was granted (on
    the runtime's loop, whichever loop acquired it)."""
    if ep is None:
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
    # Wait on the server from the first request when refusals are not counted: a first request
    # that did not wait would leave a window (between its 423 and the waiting request) in which
    # a newcomer finding the slot free and the queue empty is served first. With ``max_retries``
    # the first request stays Prefect's (a refusal at once, counted), and so with a timeout of 0.
    wait_on_server = spec.max_retries is None and (spec.timeout_seconds is None or spec.timeout_seconds > 0)
    polling = False  # the server will not queue this request: poll with Retry-After
    place: str | None = None  # the waiter a server answered 503 at its shutdown: take it back
    while True:
        wait: float | None = None
        sent_body = body
        if wait_on_server and ep.waits and not polling:
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
            wait_on_server = True
            if ep.waits and not polling:
                continue  # the next request waits on the server
            pause = retry_after(headers)
            if pause is None:
                raise attempts.error("423 without Retry-After")
            await clock.pause(pause)
            continue
        if status == 422 and wait is not None:
            action = refused(ep, spec, wait, answer_error(answer))
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
    error = api_error(503, "", {}, payload)
    place = error.body.get("waiter_id") if error.code == "shutting_down" else None
    return place if isinstance(place, str) else None


def refused(ep: Endpoint, spec: Spec, wait: float, error: ApiError) -> str:
    """The server answered 422 to a waiting request: learn why, from the answer's code and its
    validation errors (a Prefect server sends no code, but the same validation errors).

    ``"again"``: it is the wait itself (the endpoint learnt the server's maximum wait, or that
    it does not wait at all: a Prefect server); ``"poll"``: it is this request's limits (code
    ``cannot_wait``: one does not exist or is inactive); ``"fail"``: the request is wrong
    (``priority`` out of range, more slots than a limit has).
    """
    refusal = error.field_error("wait_seconds")
    if refusal is not None:
        ctx = refusal.get("ctx")
        bound = ctx.get("le") if refusal.get("type") == "less_than_equal" and isinstance(ctx, dict) else None
        if isinstance(bound, int | float) and 0 < bound < wait:
            ep.wait_chunk = float(bound)
            log.debug("%s waits at most %s s at a time", ep.base_url, ep.wait_chunk)
        else:
            ep.waits = False
            log.info(
                "%s does not wait on the server (%s): polling with Retry-After", ep.base_url, error.detail
            )
        return "again"
    if error.code == "cannot_wait":
        log.debug("The server will not queue %r (%s): polling instead", spec.names, error.detail)
        return "poll"
    return "fail"


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
    # answered at once, so it started at most a round trip ago (1 s is a generous bound). Every
    # loop's clock here is the monotonic clock (asyncio's and uvloop's alike).
    start = max(sent, asyncio.get_running_loop().time() - 1.0)
    renewal = Renewal(
        rt, rt.endpoint(spec.key), lease_id, spec.lease_duration, start, spec.names, spec.raises, ep
    )
    if ep.released(lease_id):  # its session was lost meanwhile: see _session
        renewal.drop(SESSION_LOST)
    return Lease(lease_id, limits, renewal)


# --- concurrency: renew and release ---------------------------------------------------------------


class Renewal:
    """Keeps one lease alive from the runtime loop, until it is released or lost.

    Made and stopped from any loop (an ``async with`` block acquires and releases on its own):
    its timer and its renewals live on the runtime's loop, and what touches them is posted
    there (:meth:`Runtime.post`). ``ep`` renews (the runtime's endpoint); ``via`` carried the
    grant (its session's loss puts the lease at risk, see :mod:`._session`).

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
        via: Endpoint | None = None,
    ) -> None:
        self.rt = rt
        self.ep = ep
        self.via = ep if via is None else via
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
        self._handle: asyncio.TimerHandle | None = None
        rt.held.add(self)
        rt.renew_at(self, sent + duration * RENEW_FRACTION)

    def _schedule(self, when: float) -> None:  # the runtime loop
        # Not if a renewal already ran meanwhile (a lost session's ``renew_now``): it set its own.
        if not self.stopped and self._handle is None and self._task is None:
            self._handle = self.rt.loop.call_at(when, self._due)

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
        if self.stopped:
            return
        self._task = self.rt.loop.create_task(self._renew())

    def drop(self, reason: str) -> None:
        """The lease is known to be lost (the server released it): report it as such."""
        self._lose(reason)

    def renew_now(self) -> None:
        """Renew at once instead of when due (the session that carried the lease was lost: the
        server may have released it, see :mod:`._session`); nothing if a renewal is running."""
        if self.stopped or self.lost is not None or self._task is not None:
            return
        if self._handle is not None:
            self._handle.cancel()
        self._due()

    async def _renew(self) -> None:
        loop = self.rt.loop
        retry = _retry.Retry(attempts=None, statuses=None)  # any failure but 410, until the expiry
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
                error, pause = f"{exc.status}: {exc.detail}", retry.delay(exc)
            except ServerUnreachable as exc:
                error, pause = str(exc), retry.delay(exc)
            except Exception as exc:  # never let the renewal die silently
                log.exception("Unexpected error renewing concurrency lease %s", self.lease_id)
                error, pause = repr(exc), retry.delay(exc)
            else:
                if self.stopped:  # released meanwhile: the renewal was finished, not wanted
                    return
                if retry.failures:
                    log.info(
                        "Concurrency lease %s renewed after %d failed attempt(s)",
                        self.lease_id,
                        retry.failures,
                    )
                self.expires = sent + self.duration
                self._task = None
                self._handle = loop.call_at(sent + self.duration * RENEW_FRACTION, self._due)
                return
            left = self.expires - loop.time()
            delay = max(min(pause or 0.0, left), 0.0)  # the last pause ends at the expiry
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
        """No more renewals (the lease is being released); from any loop."""
        self.stopped = True
        self.rt.held.discard(self)
        with self._lock:
            self._listener = None
        if self._handle is not None or self._task is not None:
            # Its timer runs (a block that outlived its first renewal's due time): cancel it
            # there. A short block's renewal was never scheduled (see Runtime.renew_at): no
            # wake-up of the runtime's loop. (Should its timer be set in the meantime, its
            # ``_due`` finds it stopped.)
            self.rt.post(self._stopped)

    def _stopped(self) -> None:  # the runtime loop
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def release(self, ep: Endpoint | None = None) -> None:
        """Stop renewing and release the lease, through ``ep`` (by default the endpoint that
        renews it); retried on transient failures.

        Raises :class:`ApiError` or :class:`ServerUnreachable` if it could not be released (a
        lost lease's release is only attempted: failures are not raised).
        """
        self.stop()
        if self.gone:
            return
        lost = self.lost is not None  # final: a stopped renewal is never lost
        try:
            await post_retried(
                self.ep if ep is None else ep,
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


async def release(lease: Lease, ep: Endpoint | None = None) -> None:
    """Release what a block holds (nothing if it holds nothing), through ``ep`` if given."""
    if lease._renewal is not None:
        await lease._renewal.release(ep)


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
