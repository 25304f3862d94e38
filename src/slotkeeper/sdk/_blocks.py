"""The context managers: thin sync and async layers over :mod:`._core`, run by :mod:`._runtime`.

Each layer only waits for the runtime's calls and reacts to a lost lease in its own way:

* async (``async with``): the task that entered the block is cancelled, and the block raises
  :class:`ConcurrencyLeaseLostError` instead of the cancellation (as ``asyncio.timeout`` turns its
  own cancellation into ``TimeoutError``);
* sync (``with``): :class:`ConcurrencyLeaseLostError` is raised in the block's thread at its next
  Python instruction (Prefect's watcher-thread cancel scope does the same). A thread blocked in
  a system call (``time.sleep``, a socket read) sees it when the call returns. A block entered
  on a thread that runs an event loop is not interrupted (it would land inside the loop); the
  error is raised when the block exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import threading
from collections.abc import Coroutine, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from slotkeeper.errors import ApiError, ServerUnreachable
from slotkeeper.sdk import _core, _wire
from slotkeeper.sdk._core import NOTHING_HELD, GrantedLimit, Lease, Spec
from slotkeeper.sdk._runtime import Call, Endpoint, Runtime, runtime
from slotkeeper.sdk.errors import ConcurrencyLeaseLostError, ConcurrencySlotAcquisitionError

if TYPE_CHECKING:
    from slotkeeper.client import SlotkeeperClient

log = logging.getLogger("slotkeeper.sdk")

#: Where ``slotkeeper server start`` listens unless told otherwise (as
#: ``slotkeeper.client.DEFAULT_API_URL``; not imported from there, which would import aiohttp).
DEFAULT_API_URL = "http://127.0.0.1:4200/api"

Names = str | list[str] | None
#: A lease holder: a mapping or an object with ``type`` and ``id`` (Prefect's
#: ``ConcurrencyLeaseHolder`` is one), e.g. ``{"type": "task_run", "id": uuid}``.
Holder = Mapping[str, Any] | Any


def target(client: SlotkeeperClient | None, api_url: str | None) -> tuple[str, str | None]:
    """The server to talk to, as (API URL, ``Authorization`` header): ``client``'s, else
    ``api_url``, else ``SLOTKEEPER_API_URL``; auth from the client, else
    ``SLOTKEEPER_API_AUTH_STRING``. Raises ValueError for a URL that is not one."""
    if client is not None:
        key = (client.base_url, client.authorization())
        _checked(key[0])
        return key
    url = api_url or os.environ.get("SLOTKEEPER_API_URL") or DEFAULT_API_URL
    return _target(url, os.environ.get("SLOTKEEPER_API_AUTH_STRING"))


# Every block asks for its target: parsed and checked once per URL (15 us a block otherwise, a
# fifth of the SDK's CPU per block). A URL that is not one raises each time (nothing is cached).
@functools.lru_cache(maxsize=64)
def _target(url: str, auth_string: str | None) -> tuple[str, str | None]:
    _checked(url)
    return url, _wire.authorization(auth_string)


@functools.lru_cache(maxsize=64)
def _checked(url: str) -> None:
    """Check the URL here, in the caller's thread (ValueError if it is not one)."""
    _wire.api_url_parts(url)


def as_names(names: Names) -> list[str]:
    if not names:
        return []
    return [names] if isinstance(names, str) else list(names)


def as_holder(holder: Holder | None) -> dict[str, str] | None:
    if holder is None:
        return None
    if isinstance(holder, Mapping):
        kind, ident = holder["type"], holder["id"]
    else:
        kind, ident = holder.type, holder.id
    return {"type": str(kind), "id": str(ident)}


def none_exist(names: list[str], strict: bool) -> None:
    """None of the limits exists: raise (strict) or warn, as Prefect."""
    if strict:
        raise ConcurrencySlotAcquisitionError(
            f"Concurrency limits {names!r} must be created before acquiring slots"
        )
    log.warning("Concurrency limits %r do not exist - skipping acquisition.", names)


def release_failed(message: str, exc: BaseException, body_failed: bool) -> None:
    """A block could not give back what it held: log it if the body raised (its exception goes
    on), else raise it."""
    if body_failed:
        log.error("%s", message)
        return
    raise ConcurrencySlotAcquisitionError(message) from exc


class RateLimit:
    """One ``rate_limit(...)``, what both forms share: the call on the runtime (None without
    names: nothing is sent), and the check of its outcome."""

    def __init__(
        self,
        names: Names,
        occupy: int,
        timeout_seconds: float | None,
        strict: bool,
        client: SlotkeeperClient | None,
        api_url: str | None,
    ) -> None:
        self.names = as_names(names)
        self.strict = strict
        self.call: Call[list[GrantedLimit]] | None = None
        if self.names:
            key = target(client, api_url)
            rt = runtime()
            self.call = rt.call(_core.take_rate(rt, key, self.names, occupy, timeout_seconds))

    def check(self, limits: list[GrantedLimit]) -> None:
        if not limits:
            none_exist(self.names, self.strict)


class _Concurrency:
    """What both forms share: the request, and what to do with its outcome."""

    def __init__(
        self,
        names: Names,
        occupy: int,
        timeout_seconds: float | None,
        max_retries: int | None,
        lease_duration: float,
        strict: bool,
        holder: Holder | None,
        raise_on_lease_renewal_failure: bool | None,
        priority: int,
        client: SlotkeeperClient | None,
        api_url: str | None,
    ) -> None:
        key = target(client, api_url)
        self.strict = strict
        raises = strict if raise_on_lease_renewal_failure is None else raise_on_lease_renewal_failure
        self.spec = Spec(
            names=as_names(names),
            slots=occupy,
            timeout_seconds=timeout_seconds,
            max_retries=max_retries,
            lease_duration=lease_duration,
            holder=as_holder(holder),
            priority=priority,
            raises=raises,
            key=key,
        )
        self.lease: Lease = NOTHING_HELD
        self.lost: str | None = None
        self._entered = False

    def _enter(self) -> None:
        if self._entered:
            raise RuntimeError("a concurrency block cannot be entered twice; call concurrency() again")
        self._entered = True

    def _acquisition(self, rt: Runtime) -> Call[Lease]:
        """The acquisition's call, not started yet (:meth:`Call.start`)."""
        return rt.call(_core.acquire(rt, self.spec), orphan=_core.release_orphan, start=False)

    def _accept(self, rt: Runtime, lease: Lease) -> None:
        """Hold ``lease``; a grant of nothing raises (strict, and then nothing stays held) or warns."""
        try:
            if lease.lease_id is None:
                none_exist(self.spec.names, self.strict)
        except BaseException:
            rt.spawn(_core.release(lease))
            raise
        self.lease = lease

    def _on_lost(self, reason: str) -> None:
        self.lost = reason

    def _lost_error(self) -> ConcurrencyLeaseLostError:
        return ConcurrencyLeaseLostError(
            f"The concurrency lease {self.lease.lease_id} on {self.spec.names!r} was lost: {self.lost}. "
            "Its slots are no longer reserved."
        )

    def _release_failed(self, exc: BaseException, body_failed: bool) -> None:
        release_failed(f"Unable to release concurrency slots on {self.spec.names!r}: {exc}", exc, body_failed)


class AsyncConcurrency(_Concurrency):
    """``async with concurrency(...) as lease:`` (see :func:`slotkeeper.sdk.asyncio.concurrency`)."""

    _task: asyncio.Task[Any] | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _ep: Endpoint | None = None
    _interrupted = False
    _exited = False
    _cancelling = 0

    async def __aenter__(self) -> Lease:
        self._enter()
        if not self.spec.names:
            return self.lease
        rt = runtime()
        if asyncio.get_running_loop() is rt.loop:
            raise RuntimeError("slotkeeper's SDK cannot be called from its own background thread")
        # Acquired and released on this loop, over its own endpoint: no thread hop on the way
        # of the grant to this task, nor of the release to the server. Renewals stay on the
        # runtime's loop, which a blocked caller's loop cannot starve.
        self._ep = rt.here(self.spec.key)
        lease = await _here(rt, _core.acquire(rt, self.spec, self._ep))
        self._accept(rt, lease)
        if lease._renewal is not None:
            self._task = asyncio.current_task()
            self._loop = asyncio.get_running_loop()
            self._cancelling = self._task.cancelling() if self._task is not None else 0
            lease._renewal.listen(self._on_lost)
        return lease

    def _on_lost(self, reason: str) -> None:  # the runtime thread
        super()._on_lost(reason)
        if self.spec.raises and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed
                self._loop.call_soon_threadsafe(self._interrupt)

    def _interrupt(self) -> None:  # the caller's loop
        if not self._exited and self._task is not None:
            self._interrupted = True
            self._task.cancel(msg="slotkeeper: the concurrency lease was lost")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lease = self.lease
        if lease._renewal is None:
            return
        self._exited = True  # no interruption from now on
        rt = runtime()
        # A task of its own, shielded: if this task is cancelled meanwhile, it goes on regardless.
        releasing = asyncio.ensure_future(_core.release(lease, self._ep))
        releasing.add_done_callback(functools.partial(_release_elsewhere, rt, lease))
        try:
            try:
                await asyncio.shield(releasing)
            except asyncio.CancelledError:
                if not self._own_cancellation():  # someone else's: propagate it
                    raise
                # The interruption came after the body ended: finish, then report the loss.
                await asyncio.shield(releasing)
                raise self._lost_error() from None
        except (ApiError, ServerUnreachable) as failure:
            self._release_failed(failure, exc_type is not None)
        if self._own_cancellation() and exc_type is asyncio.CancelledError:
            raise self._lost_error() from exc
        if self.lost is not None and self.spec.raises and exc_type is None:
            raise self._lost_error()

    def _own_cancellation(self) -> bool:
        """Take back this block's interruption, if it made one. True when the cancellation in
        flight was this block's alone (as ``asyncio.timeout`` decides)."""
        if not self._interrupted or self._task is None:
            return False
        self._interrupted = False
        return self._task.uncancel() <= self._cancelling


async def _here(rt: Runtime, acquiring: Coroutine[Any, Any, Lease]) -> Lease:
    """Run an acquisition on this loop, in a task of its own (its requests tell a cancellation
    by ``Task.cancelling()``, counted from 0): what :class:`Call` does across threads. If the
    caller is cancelled, the acquisition is cancelled (a request that was sent is finished, or
    withdrawn, and its answer read), and a grant that comes all the same is released."""
    me = asyncio.current_task()
    before = me.cancelling() if me is not None else 0
    task = asyncio.ensure_future(acquiring)
    try:
        lease = await task
    except asyncio.CancelledError:
        # Cancelled in the step the acquisition completed: its outcome is nobody's.
        if task.done():
            _orphan(rt, task)
        else:
            task.cancel()
            task.add_done_callback(functools.partial(_orphan, rt))
        raise
    except BaseException as exc:
        if me is not None and me.cancelling() > before:  # the failure came with a cancellation
            raise asyncio.CancelledError from exc
        raise
    if me is not None and me.cancelling() > before:
        # Cancelled while the acquisition finished its request: the grant is nobody's.
        rt.spawn(_core.release_orphan(lease))
        raise asyncio.CancelledError
    return lease


def _orphan(rt: Runtime, task: asyncio.Future[Lease]) -> None:
    if not task.cancelled() and task.exception() is None:
        rt.spawn(_core.release_orphan(task.result()))


def _release_elsewhere(rt: Runtime, lease: Lease, task: asyncio.Future[None]) -> None:
    """A block's release was cancelled after all (its loop is shutting down and cancels every
    task): release on the runtime's loop instead, so the lease does not wait to expire."""
    if task.cancelled():
        rt.spawn(_core.release_orphan(lease))
    else:
        task.exception()  # retrieved: the block reports it


class SyncConcurrency(_Concurrency):
    """``with concurrency(...) as lease:`` (see :func:`slotkeeper.sdk.sync.concurrency`)."""

    _thread_id: int = 0

    def __enter__(self) -> Lease:
        self._enter()
        if not self.spec.names:
            return self.lease
        rt = runtime()
        # An interrupt (KeyboardInterrupt) may land at any instruction until this returns (the
        # block's __exit__ runs only after): the call is held before it starts, and abandoned on
        # any exception, so that whatever it gets and the block did not keep is released, once
        # (a call not started yet is only closed; abandoning twice is a no-op).
        call: Call[Lease] | None = None
        try:
            call = self._acquisition(rt)
            call.start()
            lease = call.result()
            self._accept(rt, lease)
            if lease._renewal is not None:
                self._thread_id = threading.get_ident()
                self._exit_lock = threading.Lock()
                self._exited = False
                # Interrupting a thread that runs an event loop would break the loop.
                self._may_interrupt = not _runs_a_loop()
                lease._renewal.listen(self._on_lost)
            return lease
        except BaseException:
            if call is not None:
                call.abandon()
            raise

    def _on_lost(self, reason: str) -> None:  # the runtime thread (or this one)
        super()._on_lost(reason)
        if not self.spec.raises or not self._may_interrupt:
            return
        with self._exit_lock:  # never into a thread that has left the block
            if not self._exited:
                _raise_in_thread(self._thread_id, ConcurrencyLeaseLostError)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lease = self.lease
        if lease._renewal is None:
            return
        with self._exit_lock:
            self._exited = True
        rt = runtime()
        try:
            # An interrupt (KeyboardInterrupt) while waiting does not stop the release.
            rt.call(_core.release(lease)).result(abandon=False)
        except (ApiError, ServerUnreachable) as failure:
            self._release_failed(failure, exc_type is not None)
        lost = self.lost is not None and self.spec.raises
        if lost and (exc_type is None or issubclass(exc_type, ConcurrencyLeaseLostError)):
            raise self._lost_error() from exc


def _runs_a_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _raise_in_thread(thread_id: int, error: type[BaseException]) -> None:
    """Raise ``error`` in another thread at its next Python instruction (CPython)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(error))
