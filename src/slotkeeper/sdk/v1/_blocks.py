"""Tag (v1) limits: ``concurrency(names, task_run_id)``, as ``prefect.concurrency.v1``.

Slots are taken with ``POST /api/concurrency_limits/increment {names, task_run_id}`` (the server
holds them under the task run) and given back with ``/decrement`` when the block exits; there is
no lease to renew. Waiting polls ``Retry-After``; a 423 without it (a limit of 0, which would
never grant) fails at once. A caller cancelled while its increment is out still has the answer
read, and a grant released (by task run id), so nothing stays held.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import TYPE_CHECKING, Any
from uuid import UUID

from slotkeeper.errors import ApiError, ServerUnreachable
from slotkeeper.sdk import _core
from slotkeeper.sdk._blocks import Names, as_names, release_failed, target
from slotkeeper.sdk._core import GrantedLimit, V1Grant
from slotkeeper.sdk._runtime import Runtime, runtime

if TYPE_CHECKING:
    from slotkeeper.client import SlotkeeperClient

log = logging.getLogger("slotkeeper.sdk")


class _V1:
    def __init__(
        self,
        names: Names,
        task_run_id: UUID | str,
        timeout_seconds: float | None,
        client: SlotkeeperClient | None,
        api_url: str | None,
    ) -> None:
        self.names = as_names(names)
        self.task_run_id = str(task_run_id)
        self.timeout_seconds = timeout_seconds
        self.key = target(client, api_url)
        self.grant: V1Grant | None = None

    def _acquire(self, rt: Runtime) -> Any:
        return _core.acquire_v1(rt, self.key, self.names, self.task_run_id, self.timeout_seconds)

    def _orphan(self, rt: Runtime) -> Any:
        async def release(grant: V1Grant) -> None:
            try:
                await _core.release_v1(rt, grant)
            except (ApiError, ServerUnreachable) as exc:
                log.warning("Could not release abandoned v1 slots on %r: %s", self.names, exc)

        return release

    def _release_failed(self, exc: BaseException, body_failed: bool) -> None:
        release_failed(f"Unable to release concurrency limits {self.names!r}: {exc}", exc, body_failed)


class AsyncV1Concurrency(_V1):
    async def __aenter__(self) -> tuple[GrantedLimit, ...]:
        if not self.names:
            return ()
        rt = runtime()
        self.grant = await rt.call(self._acquire(rt), orphan=self._orphan(rt)).aresult()
        return self.grant.limits

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.grant is None:
            return
        rt = runtime()
        try:
            await rt.call(_core.release_v1(rt, self.grant)).aresult(abandon=False)
        except (ApiError, ServerUnreachable) as failure:
            self._release_failed(failure, exc_type is not None)


class SyncV1Concurrency(_V1):
    def __enter__(self) -> tuple[GrantedLimit, ...]:
        if not self.names:
            return ()
        rt = runtime()
        self.grant = rt.call(self._acquire(rt), orphan=self._orphan(rt)).result()
        return self.grant.limits

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.grant is None:
            return
        rt = runtime()
        try:
            rt.call(_core.release_v1(rt, self.grant)).result(abandon=False)
        except (ApiError, ServerUnreachable) as failure:
            self._release_failed(failure, exc_type is not None)
