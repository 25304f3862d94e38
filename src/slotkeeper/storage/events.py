"""The event store: ingest client events, query and count them, and forget old ones.

:class:`EventStore` runs over the same backend as :class:`~slotkeeper.storage.Storage`, one
transaction per call. The server's own slot and lifecycle events are written by the
transaction scripts (``scripts.py``) in the transaction of their change; this store only adds what clients send, with two rules:

* an event id already stored is not stored again (Prefect de-duplicates by id too);
* a client's copy of a slot event (a name in :data:`~slotkeeper.events.builders.SLOT_EVENTS`;
  Prefect's client emits its own ``acquired``/``released``) is acknowledged and dropped: the
  server wrote the authoritative one, and two would double every count.

Filters become SQL through :func:`slotkeeper.events.filters.compile`; the statement templates
are in ``queries.py``. The count-by arithmetic (buckets aligned on Prefect's 2024-04-01 pivot,
back-filled with zeros; latest labels) is pure and sits at the top of this module.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import orjson

from slotkeeper.events import builders, filters
from slotkeeper.events.models import EventFilter, EventOrder, EventRecord, iso
from slotkeeper.storage import backend as transactions
from slotkeeper.storage import queries as q
from slotkeeper.storage.backend import Backend
from slotkeeper.storage.rows import write_events
from slotkeeper.storage.tx import Tx

log = logging.getLogger("slotkeeper.storage.events")

__all__ = [
    "Countable",
    "EventCount",
    "EventStore",
    "InvalidCountRequest",
    "TimeUnit",
    "run_retention",
    "unstorable",
]

# --- count-by: pure ---------------------------------------------------------------------------------

#: Every time bucket starts a whole number of intervals after this instant (Prefect's pivot, the
#: Monday before the earliest possible Prefect event).
PIVOT = datetime(2024, 4, 1, tzinfo=UTC)
MAX_BUCKETS = 1000
MIN_INTERVAL = 0.01


class Countable(StrEnum):
    """What ``POST /api/events/count-by/{countable}`` groups by."""

    day = "day"  # ``time`` with unit day and interval 1
    time = "time"
    event = "event"
    resource = "resource"


class TimeUnit(StrEnum):
    """The unit of a time bucket."""

    week = "week"
    day = "day"
    hour = "hour"
    minute = "minute"
    second = "second"


_UNIT_SECONDS = {
    TimeUnit.week: 7 * 86400.0,
    TimeUnit.day: 86400.0,
    TimeUnit.hour: 3600.0,
    TimeUnit.minute: 60.0,
    TimeUnit.second: 1.0,
}


class InvalidCountRequest(ValueError):
    """The interval or the range cannot be counted (422, with this message as detail)."""


def _iso(moment: datetime) -> str:
    return iso(moment.timestamp())


@dataclass(frozen=True, slots=True)
class EventCount:
    """One group of a count-by answer (Prefect's ``EventCount``)."""

    value: str
    label: str
    count: int
    start_time: datetime
    end_time: datetime

    def wire(self) -> dict[str, Any]:
        """The JSON object Prefect answers with."""
        return {
            "value": self.value,
            "label": self.label,
            "count": self.count,
            "start_time": _iso(self.start_time),
            "end_time": _iso(self.end_time),
        }


def bucket_width(unit: TimeUnit, interval: float) -> timedelta:
    """The span of one bucket; :class:`InvalidCountRequest` below the minimum or overflowing."""
    if not interval >= MIN_INTERVAL:  # also refuses NaN
        raise InvalidCountRequest(f"The minimum interval is {MIN_INTERVAL}")
    try:
        return timedelta(seconds=_UNIT_SECONDS[unit] * interval)
    except OverflowError:
        raise InvalidCountRequest("The interval is too large") from None


def check_buckets(since: datetime, until: datetime, unit: TimeUnit, interval: float) -> None:
    """Refuse a range that would need more than :data:`MAX_BUCKETS` buckets (Prefect's text)."""
    buckets = math.ceil((until - since) / bucket_width(unit, interval))
    if buckets > MAX_BUCKETS:
        raise InvalidCountRequest(
            f"The given interval would create {buckets} buckets, which is too many. Please "
            f"increase the interval or reduce the time range to produce {MAX_BUCKETS} buckets "
            "or fewer."
        )


def end_of_period(moment: datetime, unit: TimeUnit) -> datetime:
    """The last microsecond of the second, minute, hour, day or week (ending Sunday) of ``moment``."""
    last = moment.replace(microsecond=999_999)
    if unit is TimeUnit.second:
        return last
    last = last.replace(second=59)
    if unit is TimeUnit.minute:
        return last
    last = last.replace(minute=59)
    if unit is TimeUnit.hour:
        return last
    last = last.replace(hour=23)
    if unit is TimeUnit.day:
        return last
    return last + timedelta(days=6 - last.weekday())


def bucket_index(epoch: float, width: timedelta) -> int:
    """The bucket of an instant, counted from :data:`PIVOT` (the SQL computes the same)."""
    return math.floor((epoch - PIVOT.timestamp()) / width.total_seconds())


def time_counts(
    since: datetime,
    until: datetime,
    unit: TimeUnit,
    interval: float,
    now: datetime,
    counted: Mapping[int, int],
) -> list[EventCount]:
    """Every bucket from the one holding ``since`` to the end of the range, zeros included.

    ``counted`` maps absolute bucket indexes (:func:`bucket_index`) to counts. As Prefect, a
    range reaching past ``now`` ends with the current ``unit`` period; values are bucket
    positions in the answer (``"0"``, ``"1"``...), labels the bucket starts in ISO form, and
    ``end_time`` is one microsecond before the next bucket. Unlike Prefect (an IndexError),
    counted buckets past that end (events dated in the future) extend the answer.
    """
    width = bucket_width(unit, interval)
    end = end_of_period(now, unit) if until > now else until
    first = bucket_index(since.timestamp(), width)
    last = max([first, *counted]) if counted else first
    starts: list[datetime] = []
    try:
        start = PIVOT + width * first
        while start < end or first + len(starts) <= last:
            starts.append(start)
            start += width
        next_start = start
    except OverflowError:
        raise InvalidCountRequest("The time range cannot be divided into buckets") from None
    totals = [0] * len(starts)
    for index, count in counted.items():
        # An event on the very edge of ``since`` may round into the bucket before: keep it.
        totals[max(index - first, 0)] += count
    ends = [*starts[1:], next_start]
    return [
        EventCount(
            value=str(i),
            label=begin.isoformat(),
            count=totals[i],
            start_time=begin,
            end_time=stop - timedelta(microseconds=1),
        )
        for i, (begin, stop) in enumerate(zip(starts, ends, strict=True))
    ]


def labelled_counts(rows: Iterable[tuple[str, str, int, float, float]]) -> list[EventCount]:
    """Merge ``(value, label, count, oldest, latest)`` groups into one count per value.

    A value keeps the label of its latest group (a resource may have been renamed), as Prefect
    does. Ordered by count descending, then label (code-point order, on both backends).
    """
    merged: dict[str, tuple[str, int, float, float, float]] = {}
    for value, label, count, oldest, latest in rows:
        seen = merged.get(value)
        if seen is None:
            merged[value] = (label, int(count), oldest, latest, latest)
            continue
        best_label, total, first, last, label_at = seen
        if (latest, label) > (label_at, best_label):
            best_label, label_at = label, latest
        merged[value] = (best_label, total + int(count), min(first, oldest), max(last, latest), label_at)
    counts = [
        EventCount(
            value=value,
            label=label,
            count=total,
            start_time=datetime.fromtimestamp(first, UTC),
            end_time=datetime.fromtimestamp(last, UTC),
        )
        for value, (label, total, first, last, _) in merged.items()
    ]
    counts.sort(key=lambda c: (-c.count, c.label, c.value))
    return counts


# --- what may be stored: pure -----------------------------------------------------------------------


def unstorable(record: EventRecord) -> str | None:
    """Why ``record`` cannot be stored on every backend, or None.

    PostgreSQL text (and jsonb) cannot hold NUL, so names and labels must not contain it; and
    everything must serialise to JSON (integers beyond 64 bits and lone surrogates do not).
    """
    texts = [record.event]
    for resource in (record.resource, *record.related):
        texts.extend(resource)
        texts.extend(resource.values())
    if any("\x00" in text for text in texts):
        return "Event names, label names and label values must not contain NUL characters"
    try:
        orjson.dumps(record.wire())
    except orjson.JSONEncodeError as exc:
        return f"The event cannot be stored as JSON: {exc}"
    return None


def is_slot_copy(record: EventRecord) -> bool:
    """A client's copy of a slot event: the server writes those itself."""
    return record.event in builders.SLOT_EVENTS


# --- the store --------------------------------------------------------------------------------------


class EventStore:
    """Ingest, query, count and expire events, one transaction per call, on ``backend``.

    ``clock`` is the server's clock: it dates count-by's "now" (and, through the API, filter
    defaults and ``received``).
    """

    def __init__(self, backend: Backend, clock: Callable[[], float] = time.time) -> None:
        self.backend = backend
        self.clock = clock
        #: Client copies of slot events acknowledged and not stored, since start.
        self.dropped_slot_copies = 0

    async def ingest(self, records: Sequence[EventRecord]) -> list[EventRecord]:
        """Store client events; return those stored (new ids, and no slot-event copies).

        All or nothing: :class:`ValueError` if any event is :func:`unstorable`.
        """
        kept = [r for r in records if not is_slot_copy(r)]
        self.dropped_slot_copies += len(records) - len(kept)
        for record in kept:
            problem = unstorable(record)
            if problem:
                raise ValueError(problem)
        if not kept:
            return []
        return await transactions.run(self.backend, lambda tx: write_events(tx, kept, dedupe=True))

    async def query(
        self, event_filter: EventFilter, limit: int, offset: int = 0, *, with_total: bool = True
    ) -> tuple[list[EventRecord], int]:
        """One page of the events matching ``event_filter`` in its order, and how many match.

        With ``resource.distinct``, only the first event of each resource id (in that order)
        counts. Without ``with_total`` the count is skipped and ``-1`` returned.
        """
        where, params = filters.compile(event_filter, self.backend.name)
        distinct = event_filter.resource is not None and event_filter.resource.distinct
        direction = "ASC" if event_filter.order is EventOrder.ASC else "DESC"
        page = q.SELECT_DISTINCT_RESOURCE_EVENTS_PAGE if distinct else q.SELECT_EVENTS_PAGE
        page_sql = page.format(where=where, direction=direction)
        count_sql = (q.COUNT_DISTINCT_EVENT_RESOURCES if distinct else q.COUNT_EVENTS).format(where=where)
        page_params = {**params, "limit": max(limit, 0), "offset": max(offset, 0)}

        def op(tx: Tx) -> tuple[list[EventRecord], int]:
            total = -1
            if with_total:
                row = tx.one(count_sql, params)
                total = int(row[0]) if row else 0
            return [EventRecord.from_row(r) for r in tx.all(page_sql, page_params)], total

        return await transactions.read(self.backend, op)

    async def count_by(
        self,
        countable: Countable,
        event_filter: EventFilter,
        time_unit: TimeUnit = TimeUnit.day,
        time_interval: float = 1.0,
    ) -> list[EventCount]:
        """Prefect's count-by: :class:`InvalidCountRequest` for a bad interval or too many buckets.

        The bucket limit is checked for every countable, as Prefect does; ``day`` is ``time``
        with unit day and interval 1 (for the check too).
        """
        if countable is Countable.day:
            time_unit, time_interval = TimeUnit.day, 1.0
        since, until = event_filter.occurred.since, event_filter.occurred.until
        check_buckets(since, until, time_unit, time_interval)
        where, params = filters.compile(event_filter, self.backend.name)
        if countable in (Countable.event, Countable.resource):
            if countable is Countable.event:
                sql = q.COUNT_EVENTS_BY_NAME.format(where=where)
            else:
                sql = q.COUNT_EVENTS_BY_RESOURCE[self.backend.name].format(where=where)
            rows = await transactions.read(self.backend, lambda tx: tx.all(sql, params))
            return labelled_counts((r[0], r[1], r[2], r[3], r[4]) for r in rows)
        width = bucket_width(time_unit, time_interval)
        bucket_params = {**params, "pivot": PIVOT.timestamp(), "width": width.total_seconds()}
        sql = q.COUNT_EVENTS_BY_BUCKET.format(where=where)
        rows = await transactions.read(self.backend, lambda tx: tx.all(sql, bucket_params))
        now = datetime.fromtimestamp(self.clock(), UTC)
        return time_counts(since, until, time_unit, time_interval, now, {int(r[0]): int(r[1]) for r in rows})

    async def delete_older_than(self, cutoff: float, batch: int = 200) -> int:
        """Delete every event that occurred before ``cutoff``; return how many.

        ``batch`` events per transaction, so the SQLite writer is never held for long. Their
        related-resource rows go with them (``ON DELETE CASCADE``).
        """
        params = {"cutoff": cutoff, "batch": batch}
        total = 0
        while True:
            deleted = await transactions.run(
                self.backend, lambda tx: tx.write_now(q.DELETE_EVENTS_BEFORE, params)
            )
            total += deleted
            if deleted < batch:
                return total


async def run_retention(store: EventStore, retention_seconds: float, interval_seconds: float) -> None:
    """Delete events older than ``retention_seconds`` (by ``occurred``) every ``interval_seconds``."""
    while True:
        try:
            deleted = await store.delete_older_than(store.clock() - retention_seconds)
        except asyncio.CancelledError:
            raise
        except Exception:  # a database hiccup must not stop retention
            log.exception("event retention pass failed; retrying")
        else:
            if deleted:
                log.info("deleted %d event(s) past retention", deleted)
        await asyncio.sleep(interval_seconds)
