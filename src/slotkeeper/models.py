"""Plain records that cross layers: what routes hand to storage and what storage hands back."""

from __future__ import annotations

from dataclasses import dataclass

from slotkeeper.domain import TAG_PREFIX, Limit, Mode


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """A new limit, as validated at the edge."""

    name: str
    limit: int
    active: bool = True
    active_slots: int = 0
    denied_slots: int = 0
    slot_decay_per_second: float = 0.0


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds a lease (Prefect's ``{type, id}``)."""

    type: str
    id: str


@dataclass(frozen=True, slots=True)
class LeaseSpec:
    """The lease an acquisition asks for."""

    duration: float
    holder: Holder | None = None


@dataclass(frozen=True, slots=True)
class AcquireRequest:
    """Slots on one or several limits, all or nothing.

    With ``wait`` (seconds), a request that cannot be granted now queues on the server, in
    ``priority`` order (higher first) then arrival order, instead of failing at once.
    """

    names: list[str]
    slots: int
    mode: Mode = Mode.CONCURRENCY
    lease: LeaseSpec | None = None
    wait: float | None = None
    priority: int = 0
    #: A waiter answered 503 at a server's shutdown, whose place this request takes back.
    rejoin: str | None = None


@dataclass(frozen=True, slots=True)
class Granted:
    """A committed acquisition: the limits found (request order) and, with a lease, its id.

    ``limits`` carry their new ``fencing_token``. ``admitted``: for a grant to a queued waiter,
    when the queue admitted it (the granting transaction's time), for the hand-off metric.
    """

    limits: list[Limit]
    lease_id: str | None
    admitted: float | None = None


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """One live lease on one limit, for the holders listing."""

    lease_id: str
    holder: Holder | None
    slots: int
    created: float
    expires: float
    fencing_token: int


@dataclass(frozen=True, slots=True)
class LimitView:
    """A limit as read: the stored row and its occupancy at the time of the read."""

    limit: Limit
    active_slots: int


@dataclass(frozen=True, slots=True)
class TagLimitView:
    """A tag (v1) limit as read: the limit named ``tag:<tag>`` and the task runs holding it now
    (through v1 holds or v2 leases), in acquisition order, each once."""

    limit: Limit
    holders: list[str]

    @property
    def tag(self) -> str:
        """The tag: the limit's name without its ``tag:`` prefix."""
        return self.limit.name.removeprefix(TAG_PREFIX)


@dataclass(frozen=True, slots=True)
class LimitSummary:
    """A limit as an operator's overview shows it: the limit as read (its ``leased_slots`` summed,
    its pool as stored, to be settled at ``now``) and its queue: how many requests wait on the
    server and for how many slots in all."""

    limit: Limit
    waiters: int
    waiting_slots: int


@dataclass(frozen=True, slots=True)
class QueuedRequest:
    """A request waiting in one limit's queue; ``position`` 1 is served next. ``limits`` is how
    many limits it waits for (it is granted all of them at once)."""

    position: int
    waiter_id: str
    priority: int
    slots: int
    enqueued: float
    deadline: float
    holder: Holder | None
    limits: int


@dataclass(frozen=True, slots=True)
class LimitState:
    """One limit as its page shows it, read at ``now``: the summary, its live leases (oldest
    first) and the head of its queue (in order; ``summary.waiters`` counts all of it)."""

    summary: LimitSummary
    holders: list[LeaseInfo]
    queue: list[QueuedRequest]
    now: float


@dataclass(frozen=True, slots=True)
class GrantBucket:
    """The grants of one limit in one time bucket ``[start, start + width)``: how many, and the
    nearest-rank percentiles and maximum of how long they waited in the queue (a grant made at
    once waited 0 s); None without grants. ``seconds`` is the part of the bucket already past."""

    start: float
    seconds: float
    grants: int
    wait_p50: float | None
    wait_p90: float | None
    wait_p99: float | None
    wait_max: float | None
