"""Prometheus metrics: what one server process reports at ``GET /metrics``.

Every number comes from the place that already holds it, so none can drift from the truth:

* **Counters of what happened** (grants, releases by how they ended, reaper lateness) are
  counted from the events this process *committed* (``Backend.observe``: a released event
  carries its cause, ``EventRecord.cause``), never from another process's: on PostgreSQL each
  process counts its own transactions, and the sum over processes counts each grant once.
* **Gauges of state** (slots leased, in the pool, waiters) are read from the database at
  scrape time (:func:`slotkeeper.storage.stats.read_limit_stats`): every process reports the
  same, database-wide values.
* What no event says (423 refusals, how long a waiting request waited, the hand-off from the
  transaction that admitted it to its answer) comes from the storage's
  :class:`~slotkeeper.storage.core.Observer` hook; per process as well.

**Series per limit are bounded** by ``SLOTKEEPER_METRICS_MAX_LIMITS`` (N, default 100): the
gauges name the N busiest limits at each scrape (slots in use plus waiters) and sum all others
under ``limit="_other"``; counters and histograms name the first N limits this process saw a
grant or release on, for as long as they exist, and count the others under ``"_other"`` (so no
counter ever goes down: a limit never moves out of ``_other``); a deleted limit's series go
after the first scrape that follows its deletion. With N = 0 every series is ``_other``. docs/metrics.md lists every metric.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from slotkeeper.events import builders
from slotkeeper.events.models import EventRecord
from slotkeeper.models import Granted

if TYPE_CHECKING:
    from slotkeeper.events.broker import Broker
    from slotkeeper.gateway.events_in import SlotCopyFilter
    from slotkeeper.gateway.outbox import Deliverer
    from slotkeeper.storage.core import Storage
    from slotkeeper.storage.stats import LimitStats
    from slotkeeper.storage.tx import Commit

#: The ``limit`` label of everything summed outside the limits that have series of their own.
OTHER = "_other"
#: Prometheus' text format (0.0.4), what ``generate_latest`` writes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_WAIT_SECONDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)
_GROUP = (1, 2, 4, 8, 16, 32, 64, 128, 256)

_ACQUIRED = frozenset({builders.ACQUIRED, builders.V1_ACQUIRED})
_RELEASED = frozenset({builders.RELEASED, builders.V1_RELEASED})
_V1 = frozenset({builders.V1_ACQUIRED, builders.V1_RELEASED})


def limit_of(event: EventRecord) -> tuple[str, str]:
    """(limit id, limit name) of a slot or lifecycle event (a v1 event names its tag)."""
    limit_id = event.resource_id.rsplit(".", 1)[1]
    name = event.resource.get("prefect.resource.name", limit_id)
    if event.event in _V1:
        name = builders.TAG_PREFIX + name
    return limit_id, name


def _lease_key(event: EventRecord) -> tuple[Any, ...]:
    """What the released events of one lease share (one per limit): its end, when it was
    recorded, its limits, its holder."""
    ids = frozenset({event.resource_id, *(r["prefect.resource.id"] for r in event.related)})
    return event.occurred, event.received, ids


class LimitLabels:
    """Which limits have series of their own: the first ``size`` seen, until deleted."""

    def __init__(self, size: int, forget: Callable[[str], None]) -> None:
        self.size = size
        self._forget = forget  # removes every series of a label
        self._by_id: dict[str, str] = {}
        self._ids: dict[str, str] = {}  # label -> limit id
        self._gone: set[str] = set()
        self._lock = threading.Lock()  # PostgreSQL commits are observed on pool threads

    def of(self, limit_id: str, name: str) -> str:
        """The label of this limit, given one if there is room (its name; a renamed limit's
        series start again under the new name)."""
        label = self._by_id.get(limit_id)
        if label == name:
            return label
        with self._lock:
            label = self._by_id.get(limit_id)
            if label is not None and label != name:
                self._drop(limit_id)
                label = None
            if label is None:
                if len(self._by_id) >= self.size or name == OTHER or name in self._ids:
                    return OTHER
                self._by_id[limit_id] = name
                self._ids[name] = limit_id
                label = name
            return label

    def named(self, name: str) -> str:
        """The label of the limit with this name if it has one, else ``_other`` (no new label:
        a name sent by a client may not exist)."""
        return name if name in self._ids else OTHER

    def deleted(self, limit_id: str) -> None:
        """The limit is gone: its series go after the next scrape (which shows what its deletion
        released), and its room goes to the next limit then."""
        with self._lock:
            self._gone.add(limit_id)

    def sweep(self) -> None:
        """Drop the series of the limits deleted before the scrape that just ended."""
        with self._lock:
            for limit_id in self._gone:
                self._drop(limit_id)
            self._gone.clear()

    def _drop(self, limit_id: str) -> None:
        label = self._by_id.pop(limit_id, None)
        if label is not None:
            self._ids.pop(label, None)
            self._forget(label)


class _Snapshot:
    """The metric families read at a scrape (the database gauges), handed to the registry."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterable[Metric]:
        return self.families


class Metrics:
    """The metrics of one server process, in a registry of its own (see the module's doc)."""

    def __init__(self, max_limits: int = 100) -> None:
        # No ``*_created`` series: a sample more per series, which nothing here needs.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)
        r = self.registry
        limit = ["limit"]
        self.grants = Counter(
            "slotkeeper_limit_grants",
            "Grants of slots on a limit committed by this process.",
            limit,
            registry=r,
        )
        self.releases = Counter(
            "slotkeeper_limit_releases",
            "Grants that ended, committed by this process, by how: release, expiry, deletion, reset, operator.",
            [*limit, "reason"],
            registry=r,
        )
        self.unavailable = Counter(
            "slotkeeper_limit_unavailable",
            "Acquisitions naming a limit answered 423 (no slots now) by this process.",
            limit,
            registry=r,
        )
        self.wait = Histogram(
            "slotkeeper_limit_wait_seconds",
            "Time a waiting request (wait_seconds) took to get its slots, from its arrival.",
            limit,
            buckets=_WAIT_SECONDS,
            registry=r,
        )
        self.handoff = Histogram(
            "slotkeeper_limit_handoff_seconds",
            "From the transaction that admitted a queued request to the request holding its grant.",
            limit,
            buckets=_SECONDS,
            registry=r,
        )
        self.requests = Histogram(
            "slotkeeper_http_request_duration_seconds",
            "HTTP requests by method, route (its path template) and status code.",
            ["method", "route", "status"],
            buckets=_SECONDS,
            registry=r,
        )
        self.delivery_lag = Histogram(
            "slotkeeper_event_delivery_lag_seconds",
            "From an event's commit (its received time) to its fan-out to live subscribers.",
            buckets=_SECONDS,
            registry=r,
        )
        self.reaper_lateness = Histogram(
            "slotkeeper_reaper_lateness_seconds",
            "From a lease's expiry to the reaper's release of it, per lease, in this process.",
            buckets=_SECONDS,
            registry=r,
        )
        self.group_size = Histogram(
            "slotkeeper_sqlite_group_operations",
            "Operations committed together by one SQLite group commit.",
            buckets=_GROUP,
            registry=r,
        )
        self.labels = LimitLabels(max_limits, self._forget)
        # The labelled children used per request and per event, looked up once: the client's
        # ``labels()`` validates and locks on every call (about as costly as the update itself).
        self._request_children: dict[tuple[str, str, int], Any] = {}
        self._grant_children: dict[str, Any] = {}
        self._release_children: dict[tuple[str, str], Any] = {}
        self.max_limits = max_limits
        self._snapshot = _Snapshot()
        self.registry.register(self._snapshot)
        self._storage: Storage | None = None
        self._broker: Broker | None = None
        #: Gateway mode: the outbox's deliverer and the /api/events/in filter of this process.
        self._outbox: tuple[Deliverer, SlotCopyFilter] | None = None
        self._scrape_lock = threading.Lock()

    # --- wiring -----------------------------------------------------------------------------------

    def attach(self, storage: Storage, broker: Broker) -> Callable[[], None]:
        """Observe this storage and broker; returns what undoes it."""
        self._storage, self._broker = storage, broker
        storage.observer = self
        backend: Any = storage.backend
        stop = backend.observe(self.committed)
        if hasattr(backend, "on_group"):
            backend.on_group = self.group_size.observe

        def detach() -> None:
            stop()
            storage.observer = None
            if hasattr(backend, "on_group"):
                backend.on_group = None

        return detach

    def _forget(self, label: str) -> None:
        self._grant_children.pop(label, None)
        for reason in builders.ENDED_BY:
            self._release_children.pop((label, reason), None)
        for metric in (self.grants, self.unavailable, self.wait, self.handoff):
            with suppress(KeyError):
                metric.remove(label)
        for reason in builders.ENDED_BY:
            with suppress(KeyError):
                self.releases.remove(label, reason)

    # --- what happened (any thread) -----------------------------------------------------------------

    def committed(self, commit: Commit) -> None:
        """Count the slot events of one commit of this process."""
        expired: dict[tuple[Any, ...], float] = {}
        for event in commit.events:
            name = event.event
            if name in _ACQUIRED:
                label = self.labels.of(*limit_of(event))
                child = self._grant_children.get(label)
                if child is None:
                    child = self._grant_children[label] = self.grants.labels(label)
                child.inc()
            elif name in _RELEASED:
                cause = event.cause or builders.RELEASE
                key = (self.labels.of(*limit_of(event)), cause)
                child = self._release_children.get(key)
                if child is None:
                    child = self._release_children[key] = self.releases.labels(*key)
                child.inc()
                if cause == builders.EXPIRY:
                    expired[_lease_key(event)] = event.received - event.occurred
            elif name == builders.DELETED:
                self.labels.deleted(limit_of(event)[0])
            elif name == builders.UPDATED:
                self.labels.of(*limit_of(event))  # a rename moves the label
        for late in expired.values():
            self.reaper_lateness.observe(max(0.0, late))

    def refused(self, names: Sequence[str]) -> None:
        """An acquisition naming these limits got 423."""
        for name in dict.fromkeys(names):
            self.unavailable.labels(self.labels.named(name)).inc()

    def waited(self, granted: Granted, seconds: float, handoff: float | None) -> None:
        """A waiting request got its grant."""
        for lim in granted.limits:
            label = self.labels.of(lim.id, lim.name)
            self.wait.labels(label).observe(seconds)
            if handoff is not None:
                self.handoff.labels(label).observe(handoff)

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        """One HTTP request answered (see :class:`slotkeeper.api.access.RequestLog`)."""
        key = (method, route, status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(method, route, str(status))
        child.observe(seconds)

    def published(self, events: list[EventRecord]) -> None:
        """A committed batch is about to be fanned out to live subscribers (on the loop)."""
        if events and self._broker is not None and self._broker.subscribers:
            self.delivery_lag.observe(max(0.0, time.time() - min(e.received for e in events)))

    # --- a scrape -------------------------------------------------------------------------------------

    async def scrape(self) -> bytes:
        """Prometheus' text: the database gauges read now, then everything else."""
        from slotkeeper.storage.stats import read_limit_stats

        families: list[Metric] = []
        if self._storage is not None:
            families = self.limit_families(await read_limit_stats(self._storage))
            families.extend(self._process_families())
            if self._outbox is not None:
                families.extend(await self._outbox_families(*self._outbox))
        with self._scrape_lock:  # one snapshot in the registry at a time
            self._snapshot.families = families
            try:
                return generate_latest(self.registry)
            finally:
                self._snapshot.families = []
                self.labels.sweep()

    def limit_families(self, stats: list[LimitStats]) -> list[Metric]:
        """The gauges of every limit: the busiest ``max_limits`` named, the rest summed."""
        names = ("slots", "leased_slots", "pool_slots", "waiters")
        helps = (
            "Slots a limit allows (its limit).",
            "Slots of a limit held by live leases.",
            "Slots of a limit taken without a lease (its pool, after decay).",
            "Requests queued for a limit (server-side waits).",
        )
        families = [
            GaugeMetricFamily(f"slotkeeper_limit_{n}", h, labels=["limit"])
            for n, h in zip(names, helps, strict=True)
        ]
        count = GaugeMetricFamily("slotkeeper_limits", "Limits in the database, by state.", labels=["state"])
        active = sum(1 for s in stats if s.active)
        count.add_metric(["active"], active)
        count.add_metric(["inactive"], len(stats) - active)
        named = stats
        if len(stats) > self.max_limits:
            named = heapq.nlargest(self.max_limits, stats, key=attrgetter("busy", "name"))
        for s in named:
            for family, value in zip(
                families, (s.limit, s.leased_slots, s.pool_slots, s.waiters), strict=True
            ):
                family.add_metric([s.name], value)
        if len(named) < len(stats):
            totals = [0, 0, 0, 0]
            for s in stats:
                totals[0] += s.limit
                totals[1] += s.leased_slots
                totals[2] += s.pool_slots
                totals[3] += s.waiters
            for s in named:
                totals[0] -= s.limit
                totals[1] -= s.leased_slots
                totals[2] -= s.pool_slots
                totals[3] -= s.waiters
            for family, value in zip(families, totals, strict=True):
                family.add_metric([OTHER], value)
        return [*families, count]

    def _process_families(self) -> list[Metric]:
        families: list[Metric] = []
        storage, broker = self._storage, self._broker
        if storage is not None:
            families.append(
                _gauge(
                    "slotkeeper_waiting_requests",
                    "Requests of this process waiting in the queue.",
                    storage.waiting_requests,
                )
            )
            pool = getattr(storage.backend, "pool_stats", None)
            if pool is not None:
                stats = pool()
                gauge = GaugeMetricFamily(
                    "slotkeeper_postgres_pool_connections",
                    "PostgreSQL connections of this process's pool, by state (busy: running an operation).",
                    labels=["state"],
                )
                gauge.add_metric(["busy"], stats.busy)
                gauge.add_metric(["idle"], max(0, stats.connections - stats.busy))
                families += [
                    gauge,
                    _gauge(
                        "slotkeeper_postgres_pool_size",
                        "Threads and connections the pool may open.",
                        stats.size,
                    ),
                    _gauge(
                        "slotkeeper_postgres_pool_waiting_operations",
                        "Operations waiting for a pool thread.",
                        stats.waiting,
                    ),
                ]
        if broker is not None:
            dropped = CounterMetricFamily(
                "slotkeeper_event_subscribers_dropped", "Live subscribers cut off for lagging too far behind."
            )
            dropped.add_metric([], broker.overflows)
            families += [
                _gauge(
                    "slotkeeper_event_subscribers",
                    "Live event subscribers of this process.",
                    broker.subscribers,
                ),
                dropped,
            ]
        return families

    def attach_outbox(self, deliverer: Deliverer, copies: SlotCopyFilter) -> Callable[[], None]:
        """Gateway mode: report the outbox and the client copies dropped; returns what undoes it."""
        self._outbox = (deliverer, copies)

        def detach() -> None:
            self._outbox = None

        return detach

    @staticmethod
    async def _outbox_families(deliverer: Deliverer, copies: SlotCopyFilter) -> list[Metric]:
        backlog = await deliverer.store.backlog()
        stats = deliverer.stats
        age = max(time.time() - backlog.oldest, 0.0) if backlog.oldest is not None else 0.0
        counters = (
            (
                "slotkeeper_outbox_delivered_events",
                "Events this process delivered to the upstream.",
                stats.delivered,
            ),
            (
                "slotkeeper_outbox_delivery_failures",
                "Deliveries to the upstream that failed (retried).",
                stats.failures,
            ),
            (
                "slotkeeper_outbox_delivery_restarts",
                "Restarts of this process's delivery task after a bug.",
                stats.restarts,
            ),
            (
                "slotkeeper_outbox_refused_events",
                "Events the upstream refused for good (alone: 400, 413, 422), dropped from the outbox.",
                stats.refused,
            ),
            (
                "slotkeeper_gateway_slot_copies_dropped",
                "Client copies of slot events dropped on /api/events/in by this process.",
                copies.dropped,
            ),
        )
        families: list[Metric] = [
            _gauge(
                "slotkeeper_outbox_events",
                "Events waiting for delivery to the upstream (database-wide).",
                backlog.events,
            ),
            _gauge(
                "slotkeeper_outbox_oldest_event_age_seconds",
                "Age of the oldest event waiting (0: none).",
                age,
            ),
            _gauge(
                "slotkeeper_outbox_delivering",
                "1 while this process delivers the outbox (holds its lease).",
                int(stats.delivering),
            ),
            _gauge(
                "slotkeeper_outbox_delivery_lag_seconds",
                "From the commit of the last event this process delivered to the upstream's answer.",
                stats.lag,
            ),
        ]
        for name, documentation, value in counters:
            counter = CounterMetricFamily(name, documentation)
            counter.add_metric([], value)
            families.append(counter)
        return families


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    """A gauge without labels, read now."""
    family = GaugeMetricFamily(name, documentation)
    family.add_metric([], value)
    return family
