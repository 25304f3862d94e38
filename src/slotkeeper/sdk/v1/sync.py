"""Tag limits, blocking: ``with concurrency(names, task_run_id)`` (``prefect.concurrency.v1.sync``)."""

from __future__ import annotations

from typing import TYPE_CHECKING
from uuid import UUID

from slotkeeper.sdk._blocks import Names
from slotkeeper.sdk.errors import AcquireConcurrencySlotTimeoutError, ConcurrencySlotAcquisitionError
from slotkeeper.sdk.v1._blocks import SyncV1Concurrency

if TYPE_CHECKING:
    from slotkeeper.client import SlotkeeperClient

__all__ = ["AcquireConcurrencySlotTimeoutError", "ConcurrencySlotAcquisitionError", "concurrency"]


def concurrency(
    names: Names,
    task_run_id: UUID | str,
    timeout_seconds: float | None = None,
    *,
    client: SlotkeeperClient | None = None,
    api_url: str | None = None,
) -> SyncV1Concurrency:
    """Hold one slot of each tag limit in ``names`` for task run ``task_run_id`` during the body
    (see :func:`slotkeeper.sdk.v1.asyncio.concurrency`)."""
    return SyncV1Concurrency(names, task_run_id, timeout_seconds, client, api_url)
