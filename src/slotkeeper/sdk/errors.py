"""The SDK's exceptions: Prefect's names, under :class:`slotkeeper.errors.ClientError`.

    ClientError                                  (slotkeeper.errors)
    ├── ConcurrencySlotAcquisitionError          the slots could not be acquired (or released)
    │   └── ConcurrencyLeaseLostError            a held lease was lost while the block ran
    └── AcquireConcurrencySlotTimeoutError       also a TimeoutError: ``timeout_seconds`` ran out

Code written for ``prefect.concurrency`` catches these by the same names. They live here, not in
:mod:`slotkeeper.errors`, because only the SDK raises them.
"""

from __future__ import annotations

from slotkeeper.errors import ClientError

__all__ = [
    "AcquireConcurrencySlotTimeoutError",
    "ConcurrencyLeaseLostError",
    "ConcurrencySlotAcquisitionError",
]


class ConcurrencySlotAcquisitionError(ClientError):
    """The slots could not be acquired: an error answer, 423 after ``max_retries``, an
    unreachable server, or (``strict``) limits that do not exist. As Prefect's."""


class AcquireConcurrencySlotTimeoutError(ClientError, TimeoutError):
    """``timeout_seconds`` passed before the slots were granted. A :class:`TimeoutError`, as
    Prefect's."""


class ConcurrencyLeaseLostError(ConcurrencySlotAcquisitionError):
    """The lease of a running block was lost: the server answered 410 (it expired or was
    revoked), or it could not be renewed before it expired. Raised when
    ``raise_on_lease_renewal_failure`` (or ``strict``) holds; the body is interrupted."""

    def __init__(
        self, message: str = "The concurrency lease was lost: its slots are no longer reserved"
    ) -> None:
        super().__init__(message)
