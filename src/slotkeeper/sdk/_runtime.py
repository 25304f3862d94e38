"""The SDK's one background thread: a private event loop that renews every lease, and runs the
requests of the blocking form (``with``), rate limits and tag limits.

Renewals run here whatever the caller's thread or loop is doing (a blocked event loop cannot
starve them), and one pool of keep-alive connections and one session per server (see
:mod:`._wire`, :mod:`._session`) is reused by every block of the process: no thread or
connection is created per block.

:class:`Call` is the bridge for the blocking form: a coroutine running here whose result a caller
(a thread, or a task on another loop) waits for, and may abandon when it is cancelled. An
abandoned call that still produced a result (a granted lease) hands it to its ``orphan``
coroutine, which releases it: the caller's cancellation and the grant can race in any order
without leaving slots held.

``async with`` blocks acquire and release on their own loop instead (:meth:`Runtime.here`: that
loop's endpoints, closed with it), with no thread hop on the way of a grant or a release; their
leases are renewed here all the same, and what starts or stops a renewal from another loop is
posted here (:meth:`Runtime.post`).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import threading
import weakref
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import Any, Generic, TypeVar

from slotkeeper.sdk._session import Session, SessionUnavailable
from slotkeeper.sdk._wire import Answer, Origin, Pool

T = TypeVar("T")
log = logging.getLogger("slotkeeper.sdk")

#: How long the process's exit waits for the release of leases still held (best effort).
EXIT_RELEASE_SECONDS = 2.0
#: Why a lease is lost with its session (see :mod:`._session`).
SESSION_LOST = (
    "the session that carried its grant was lost before the server knew the grant had arrived, "
    "so the server released it"
)
#: Leases released by a lost session that the endpoint remembers for holders yet to come.
MAX_RELEASED = 1024
#: Renewals waiting to be scheduled (:meth:`Runtime.renew_at`) past which the stopped ones are
#: dropped from the list (then at twice what is left): it holds at most about twice the leases
#: held, however many short blocks come and go.
PRUNE_WAITING = 1024
#: The longest the main thread blocks at once while it waits for a call (:meth:`Call.result`).
#: A signal (Ctrl-C) that lands just before a blocking wait begins is only handled when the
#: wait returns (CPython runs handlers between instructions): the main thread waits in slices
#: so that such a ``KeyboardInterrupt`` comes at the end of the slice, not never.
SIGNAL_CHECK_SECONDS = 0.5
#: ``SLOTKEEPER_SDK_PROTOCOL``: "session" (the default: lease requests over a session when the
#: server offers one, else HTTP) or "http" (HTTP only).
PROTOCOLS = ("session", "http")


def protocol_from_env() -> str:
    """The protocol ``SLOTKEEPER_SDK_PROTOCOL`` asks for (ValueError if it names none)."""
    chosen = os.environ.get("SLOTKEEPER_SDK_PROTOCOL", "").strip().lower() or "session"
    if chosen not in PROTOCOLS:
        raise ValueError(f"SLOTKEEPER_SDK_PROTOCOL={chosen!r}: use one of {', '.join(PROTOCOLS)}")
    return chosen


class Endpoint:
    """One server as the SDK reaches it: its session and connection pool, and what was learnt of it.

    Lease requests (acquire, release, renew) go over the session (see :mod:`._session`) unless
    the server offers none; everything else, and everything when ``protocol`` is "http" or a
    proxy applies to the server (the proxy is spoken to over HTTP), over the HTTP pool. ``held`` is the runtime's set of held leases: when a session is lost, those
    of this endpoint are renewed at once.
    """

    def __init__(
        self,
        base_url: str,
        authorization: str | None,
        held: set[Any] | None = None,
        protocol: str = "session",
        on_runtime: Callable[..., None] | None = None,
    ) -> None:
        origin = Origin(base_url, authorization)
        #: Runs a callable on the runtime's loop, where renewals live: at once for the runtime's
        #: own endpoints, posted there for the endpoints of a caller's loop (:meth:`Runtime.here`).
        self.on_runtime: Callable[..., None] = on_runtime or _now
        self.pool = Pool(origin)
        self.base_url = origin.base_url
        self.held: set[Any] = set() if held is None else held
        self.session = (
            Session(origin, authorization, self._session_lost, ack_at_once=on_runtime is not None)
            if protocol == "session" and origin.proxy is None
            else None
        )
        self._released: dict[str, None] = {}
        #: False once the server refused ``wait_seconds`` (a Prefect server): poll instead.
        self.waits = True
        #: The longest wait asked of this server at once (lowered if the server's maximum is).
        self.wait_chunk: float | None = None

    async def request(
        self, method: str, path: str, body: bytes, timeout: float, *, withdraw: bool = False
    ) -> Answer:
        """One request; its answer whatever the status (the contract of :meth:`Pool.request`)."""
        session = self.session
        if session is not None and session.carries(method, path, body):
            try:
                return await session.request(method, path, body, timeout, withdraw=withdraw)
            except SessionUnavailable:
                pass  # nothing was sent: over HTTP
        return await self.pool.request(method, path, body, timeout, withdraw=withdraw)

    def _session_lost(self, at_risk: set[str]) -> None:
        """The session was lost: the leases in ``at_risk`` were released by the server (see
        :mod:`._session`), the others are renewed at once (on the runtime's loop)."""
        dropped, renewed = [], []
        for renewal in list(self.held):
            if renewal.via is not self:
                continue
            if renewal.lease_id in at_risk:
                at_risk.discard(renewal.lease_id)
                dropped.append(renewal)
            else:
                renewed.append(renewal)
        if dropped or renewed:
            self.on_runtime(_lost, dropped, renewed)
        # Granted, but not held yet (the acquisition has not resumed): see :meth:`released`.
        # Kept on this endpoint's loop, where its acquisitions read it.
        for lease_id in at_risk:
            self._released[lease_id] = None
        while len(self._released) > MAX_RELEASED:
            del self._released[next(iter(self._released))]

    def released(self, lease_id: str) -> bool:
        """Whether the loss of a session released this lease before its holder held it."""
        return self._released.pop(lease_id, False) is None

    def close(self, *, now: bool = False) -> None:
        """Close the session and the connections (``now``: the loop is closing, do not wait)."""
        if self.session is not None:
            self.session.close(now=now)
        self.pool.close()


def _now(fn: Callable[..., None], *args: Any) -> None:
    fn(*args)


def _lost(dropped: list[Any], renewed: list[Any]) -> None:
    for renewal in dropped:
        renewal.drop(SESSION_LOST)
    for renewal in renewed:
        renewal.renew_now()


class Runtime:
    """The background loop. Created on first use, once per process (again in a forked child)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = _new_loop()
        self.endpoints: dict[tuple[str, str | None], Endpoint] = {}
        #: Leases held by this process (their renewals), for the release at exit.
        self.held: set[Any] = set()
        self._background: set[asyncio.Task[Any]] = set()
        #: Calls done in this turn of the loop, by the loop of the task that awaits each.
        self._settling: dict[asyncio.AbstractEventLoop, list[Call[Any]]] = {}
        #: The endpoints of callers' loops (:meth:`here`), and what closes them with their loop.
        self._local: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Local] = (
            weakref.WeakKeyDictionary()
        )
        self._endpoints_lock = threading.Lock()
        #: Work posted from other threads (:meth:`post`), run in one turn of this loop.
        self._posted: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self._posted_lock = threading.Lock()
        #: Renewals started from other loops, not scheduled yet (:meth:`renew_at`), and when
        #: this loop takes them in.
        self._waiting: list[tuple[float, Any]] = []
        self._prune_at = PRUNE_WAITING
        self._take_at: float | None = None
        self._take_timer: asyncio.TimerHandle | None = None
        ready = threading.Event()
        self.thread = threading.Thread(target=self._main, args=(ready,), name="slotkeeper-sdk", daemon=True)
        self.thread.start()
        ready.wait()

    def _main(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(ready.set)
        self.loop.run_forever()

    # --- from any thread --------------------------------------------------------------------------

    def call(
        self,
        coro: Coroutine[Any, Any, T],
        orphan: Callable[[T], Coroutine[Any, Any, None]] | None = None,
        *,
        start: bool = True,
    ) -> Call[T]:
        """Run ``coro`` here; the caller waits with :meth:`Call.result` or :meth:`Call.aresult`.
        With ``start`` False nothing runs until :meth:`Call.start`: a caller that must abandon
        the call on an interrupt holds it before anything can need abandoning."""
        if threading.get_ident() == self.thread.ident:
            coro.close()
            raise RuntimeError("slotkeeper's SDK cannot be called from its own background thread")
        call = Call(self, coro, orphan)
        if start:
            call.start()
        return call

    def post(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on this loop: at once from its own thread, else soon, in order, with
        whatever else other threads posted meanwhile (one wake-up of the loop for them all)."""
        if threading.get_ident() == self.thread.ident:
            fn(*args)
            return
        with self._posted_lock:
            first = not self._posted
            self._posted.append((fn, args))
        if first:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the process is exiting
                self.loop.call_soon_threadsafe(self._run_posted)

    def renew_at(self, renewal: Any, when: float) -> None:
        """Set ``renewal``'s timer for ``when`` (on this loop's clock), from any thread.

        From another loop, without waking this one when it can be helped: the renewal waits in a
        list that this loop takes in (its timers set, those already stopped dropped) when the
        earliest of them falls due; only a renewal due before that wakes this loop, to take the
        list in earlier. A block shorter than half its lease (most) thus costs this loop nothing.
        """
        if threading.get_ident() == self.thread.ident:
            renewal._schedule(when)
            return
        with self._posted_lock:
            waiting = self._waiting
            if len(waiting) >= self._prune_at:  # many blocks, short ones: drop the stopped
                waiting = self._waiting = [(w, r) for w, r in waiting if not r.stopped]
                self._prune_at = max(PRUNE_WAITING, 2 * len(waiting))
            waiting.append((when, renewal))
            sooner = self._take_at is None or when < self._take_at
            if sooner:
                self._take_at = when
        if sooner:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the process is exiting
                self.loop.call_soon_threadsafe(self._arm)

    def _arm(self) -> None:
        with self._posted_lock:
            when = self._take_at
        if self._take_timer is not None:
            self._take_timer.cancel()
        self._take_timer = None if when is None else self.loop.call_at(when, self._take_in)

    def _take_in(self) -> None:
        self._take_timer = None
        with self._posted_lock:
            waiting, self._waiting = self._waiting, []
            self._take_at = None
        for when, renewal in waiting:
            if not renewal.stopped:
                renewal._schedule(when)

    def _run_posted(self) -> None:
        with self._posted_lock:
            posted, self._posted = self._posted, []
        for fn, args in posted:
            try:
                fn(*args)
            except Exception:  # one failure must not lose the others
                log.exception("slotkeeper SDK: posted work failed")

    def here(self, key: tuple[str, str | None]) -> Endpoint:
        """The endpoint of ``key`` for the running loop: the runtime's own on its loop; on a
        caller's loop, one of that loop's (its own session and connections, closed with the
        loop), so that an ``async with`` block acquires and releases without leaving its loop."""
        loop = asyncio.get_running_loop()
        if loop is self.loop:
            return self.endpoint(key)
        local = self._local.get(loop)
        if local is None or local.closed:
            with self._endpoints_lock:  # callers' loops may run in several threads
                local = self._local[loop] = _Local()
        found = local.endpoints.get(key)
        if found is None:  # only this loop's thread makes its endpoints
            found = local.endpoints[key] = Endpoint(*key, self.held, protocol_from_env(), self.post)
        return found

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` here in the background (a release nobody waits for)."""
        try:
            self.loop.call_soon_threadsafe(self.background, coro)
        except RuntimeError:  # the loop is closed: the process is exiting
            coro.close()

    # --- on the loop ------------------------------------------------------------------------------

    def background(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = self.loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("slotkeeper SDK background work failed: %s", task.exception())

    def settle_later(self, loop: asyncio.AbstractEventLoop, call: Call[Any]) -> None:
        """Tell ``loop`` that ``call`` is done, with the other calls of ``loop`` done in this turn
        of the runtime's loop: one wake-up of the caller's loop for them all (a stdlib loop
        writes to its self-pipe on every ``call_soon_threadsafe``)."""
        batch = self._settling.get(loop)
        if batch is None:
            if not self._settling:
                self.loop.call_soon(self._settle_batches)
            batch = self._settling[loop] = []
        batch.append(call)

    def _settle_batches(self) -> None:
        batches, self._settling = self._settling, {}
        for loop, calls in batches.items():
            try:
                loop.call_soon_threadsafe(_settle, calls)
            except RuntimeError:  # the caller's loop is closed
                for call in calls:
                    call._unread()

    def endpoint(self, key: tuple[str, str | None]) -> Endpoint:
        """The endpoint of one (API URL, ``Authorization`` header) pair, made on first use."""
        found = self.endpoints.get(key)
        if found is None:
            with self._endpoints_lock:  # asked from callers' loops too (renewals live here)
                found = self.endpoints.get(key)
                if found is None:
                    found = self.endpoints[key] = Endpoint(*key, self.held, protocol_from_env())
        return found

    async def _shutdown(self) -> None:
        # Leases still held now belong to blocks that will never exit (daemon threads, a loop
        # that was abandoned): release them, so the slots do not wait for the lease to expire.
        for renewal in list(self.held):
            renewal.stop()
            self.background(renewal.release_at_exit())
        if self._background:
            await asyncio.wait(set(self._background), timeout=EXIT_RELEASE_SECONDS)
        for endpoint in self.endpoints.values():
            endpoint.close()

    def shutdown(self) -> None:
        """Release what is still held, close the connections, stop the loop (at interpreter exit)."""
        if not self.thread.is_alive():
            return
        done = threading.Event()

        def stop(_: Any) -> None:
            self.loop.stop()
            done.set()

        try:
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop)
        except RuntimeError:
            return
        future.add_done_callback(lambda f: self.loop.call_soon_threadsafe(stop, f))
        done.wait(EXIT_RELEASE_SECONDS + 1.0)


class _Local:
    """The endpoints of one caller's loop, closed when the loop shuts its asynchronous
    generators down (``asyncio.run`` and ``asyncio.Runner`` do, before closing the loop): one
    generator of this object's is registered with the loop for that."""

    def __init__(self) -> None:
        self.endpoints: dict[tuple[str, str | None], Endpoint] = {}
        self.closed = False
        self._closer = self._close_at_shutdown()
        # Its first step registers it with the running loop (the loop's asyncgen hooks).
        with contextlib.suppress(StopIteration):
            self._closer.asend(None).send(None)

    async def _close_at_shutdown(self) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            self.close()

    def close(self) -> None:
        self.closed = True
        endpoints = list(self.endpoints.values())
        self.endpoints.clear()
        for endpoint in endpoints:
            endpoint.close(now=True)


_PENDING, _DONE, _ABANDONED = 0, 1, 2


class Call(Generic[T]):
    """A coroutine on the runtime loop, and the one caller waiting for its outcome.

    The state (pending, done, abandoned) changes under a lock, so "the caller gave up" and "the
    coroutine finished" are ordered: whichever comes second sees the first. A result that
    nobody will read goes to ``orphan``.
    """

    __slots__ = (
        "_afuture",
        "_aloop",
        "_coro",
        "_error",
        "_event",
        "_lock",
        "_orphan",
        "_result",
        "_rt",
        "_state",
        "_task",
    )

    def __init__(
        self,
        rt: Runtime,
        coro: Coroutine[Any, Any, T],
        orphan: Callable[[T], Coroutine[Any, Any, None]] | None,
    ) -> None:
        self._rt = rt
        self._orphan = orphan
        self._lock = threading.Lock()
        self._state = _PENDING
        self._result: T | None = None
        self._error: BaseException | None = None
        self._task: asyncio.Task[None] | None = None
        self._event: threading.Lock | None = None  # held until the outcome is in
        self._afuture: asyncio.Future[None] | None = None
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._coro: Coroutine[Any, Any, T] | None = coro  # until started (the caller's side)

    def start(self) -> None:
        """Post the coroutine to the runtime's loop (once)."""
        coro, self._coro = self._coro, None
        if coro is not None:
            self._rt.loop.call_soon_threadsafe(self._start, coro)

    # --- the runtime side -------------------------------------------------------------------------

    def _start(self, coro: Coroutine[Any, Any, T]) -> None:
        if self._state == _ABANDONED:
            coro.close()
            return
        self._task = self._rt.loop.create_task(self._run(coro))

    async def _run(self, coro: Coroutine[Any, Any, T]) -> None:
        """Run ``coro`` and hand its outcome over in the same step as it ends (a done callback
        would run one turn of the loop later, on the path of every grant to its caller)."""
        try:
            result = await coro
        except (Exception, asyncio.CancelledError) as exc:
            self._finished(None, exc)
        else:
            self._finished(result, None)

    def _finished(self, result: T | None, error: BaseException | None) -> None:
        with self._lock:
            abandoned = self._state == _ABANDONED
            if not abandoned:
                self._state = _DONE
                self._error = error
                self._result = result
            event, afuture, aloop = self._event, self._afuture, self._aloop
        if abandoned:
            if error is None:
                self._adopt(result)  # type: ignore[arg-type]
            return
        if event is not None:
            event.release()
        if afuture is not None and aloop is not None:
            self._rt.settle_later(aloop, self)

    def _unread(self) -> None:
        """The caller's loop closed before it could be told: nobody will read the result."""
        if self._error is None:
            self._adopt(self._result)  # type: ignore[arg-type]

    def _adopt(self, result: T) -> None:
        if self._orphan is not None:
            self._rt.background(self._orphan(result))

    def _cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    # --- the caller side --------------------------------------------------------------------------

    def _outcome(self) -> T:
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]

    def abandon(self) -> None:
        """The caller gives up: cancel the coroutine, and let ``orphan`` have any result."""
        with self._lock:
            state = self._state
            if state == _PENDING:
                self._state = _ABANDONED
        coro, self._coro = self._coro, None
        if coro is not None:  # never started: nothing was sent
            coro.close()
        elif state == _PENDING:
            self._rt.loop.call_soon_threadsafe(self._cancel)
        elif state == _DONE and self._error is None and self._orphan is not None:
            self._rt.spawn(self._orphan(self._result))  # type: ignore[arg-type]

    def result(self, *, abandon: bool = True) -> T:
        """Block this thread until the outcome. An exception while waiting (KeyboardInterrupt)
        abandons the call unless ``abandon`` is False (a release must go on regardless)."""
        with self._lock:
            if self._state == _PENDING:
                self._event = event = threading.Lock()
                event.acquire()
            else:
                return self._outcome()
        try:
            if threading.current_thread() is threading.main_thread():
                # The thread that runs signal handlers: see SIGNAL_CHECK_SECONDS.
                while not event.acquire(timeout=SIGNAL_CHECK_SECONDS):
                    pass
            else:
                event.acquire()  # until the runtime releases it
        except BaseException:
            if abandon:
                self.abandon()
            raise
        return self._outcome()

    async def aresult(self, *, abandon: bool = True) -> T:
        """Await the outcome from any event loop. Cancelling the awaiting task abandons the call
        unless ``abandon`` is False."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._state == _PENDING:
                self._afuture = future = loop.create_future()
                self._aloop = loop
            else:
                return self._outcome()
        try:
            await future
        except asyncio.CancelledError:
            if abandon:
                self.abandon()
            raise
        return self._outcome()


def _settle(calls: list[Call[Any]]) -> None:
    for call in calls:
        future = call._afuture
        if future is not None and not future.done():
            future.set_result(None)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard] on Linux and macOS
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


_lock = threading.Lock()
_runtime: Runtime | None = None


def runtime() -> Runtime:
    """The process's runtime, started on first use (and again in a forked child)."""
    global _runtime
    rt = _runtime
    if rt is not None and rt.pid == os.getpid():
        return rt
    with _lock:
        if _runtime is None or _runtime.pid != os.getpid():
            _runtime = Runtime()
        return _runtime


def _forget_after_fork() -> None:
    # The child has no runtime thread: it starts its own on first use. The parent's leases are
    # the parent's: the child neither renews nor releases them.
    global _runtime, _lock
    _runtime = None
    _lock = threading.Lock()


def _at_exit() -> None:
    rt = _runtime
    if rt is not None and rt.pid == os.getpid():
        rt.shutdown()


os.register_at_fork(after_in_child=_forget_after_fork)
atexit.register(_at_exit)
