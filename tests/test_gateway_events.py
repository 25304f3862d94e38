"""The run context of slot events in gateway mode: what a client's copy tells (context.py), how
slotkeeper's own event gets it, and the /api/events/in frame filter that drops the copies
(events_in.py)."""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

import orjson

from slotkeeper.domain import Limit
from slotkeeper.events import builders
from slotkeeper.events.models import EventRecord
from slotkeeper.gateway.context import RunContexts, client_copy, common, enrich
from slotkeeper.gateway.events_in import SlotCopyFilter
from slotkeeper.models import Holder

T0 = 1_800_000_000.0
LIMIT = Limit(
    id=str(uuid.uuid4()),
    name="tag:db",
    limit=2,
    active=True,
    pool_slots=0,
    pool_clock=T0,
    denied_slots=0,
    slot_decay_per_second=0.0,
    avg_slot_occupancy_seconds=0.0,
    fencing_token=1,
    created=T0,
    updated=T0,
    pool_event_id=None,
    leased_slots=0,
)


def run_context(flow_run: str, task_run: str | None = None) -> list[dict[str, str]]:
    """The related resources Prefect's events worker adds (prefect/events/related.py)."""
    related = [
        {
            "prefect.resource.id": f"prefect.flow-run.{flow_run}",
            "prefect.resource.role": "flow-run",
            "prefect.resource.name": "clever-fox",
        },
    ]
    if task_run:
        related.append(
            {
                "prefect.resource.id": f"prefect.task-run.{task_run}",
                "prefect.resource.role": "task-run",
                "prefect.resource.name": "work-0",
            }
        )
    related += [
        {
            "prefect.resource.id": "prefect.flow.f1",
            "prefect.resource.role": "flow",
            "prefect.resource.name": "etl",
        },
        {"prefect.resource.id": "prefect.tag.db", "prefect.resource.role": "tag"},
    ]
    return related


def copy_of(
    name: str,
    limit: Limit,
    context: list[dict[str, str]],
    *,
    slots: int = 1,
    other_limits: tuple[str, ...] = (),
    task_run: str | None = None,
) -> dict[str, Any]:
    """A client's copy as Prefect 3.8.8 emits it (prefect/concurrency/_events.py, v1/_events.py)."""
    v1 = name in (builders.V1_ACQUIRED, builders.V1_RELEASED)
    prefix = "prefect.concurrency-limit.v1." if v1 else "prefect.concurrency-limit."
    resource = {"prefect.resource.id": prefix + limit.id, "prefect.resource.name": limit.name, "limit": "2"}
    if v1:
        resource["task_run_id"] = task_run or ""
    else:
        resource["slots-acquired"] = str(slots)
    related = [
        {"prefect.resource.id": prefix + o, "prefect.resource.role": "concurrency-limit"}
        for o in other_limits
    ]
    return {
        "occurred": "2027-01-15T08:00:00.000000Z",
        "event": name,
        "resource": resource,
        "related": related + context,
        "payload": {},
        "id": str(uuid.uuid4()),
        "follows": None,
    }


def acquired(at: float = T0, holder: Holder | None = None, slots: int = 1) -> EventRecord:
    return builders.slot_event(
        builders.ACQUIRED, LIMIT, slots=slots, batch=[LIMIT.id], occurred=at, holder=holder
    )


def released(of: EventRecord, at: float) -> EventRecord:
    return builders.slot_event(
        builders.RELEASED, LIMIT, slots=1, batch=[LIMIT.id], occurred=at, follows=of.id
    )


def seen(contexts: RunContexts, data: dict[str, Any], at: float) -> None:
    copy = client_copy(data, at)
    assert copy is not None
    contexts.add(copy)


def roles(record: EventRecord | None) -> list[str]:
    assert record is not None
    return [r["prefect.resource.id"] for r in record.related]


# --- context.py -----------------------------------------------------------------------------------


def test_a_client_copy_names_its_limit_slots_task_run_and_run_context() -> None:
    data = copy_of(builders.ACQUIRED, LIMIT, run_context("fr", "tr"), slots=3, other_limits=("other",))
    copy = client_copy(data, 5.0)
    assert copy is not None
    assert (copy.event, copy.limit_id, copy.slots, copy.task_run, copy.seen) == (
        builders.ACQUIRED,
        LIMIT.id,
        "3",
        "tr",
        5.0,
    )
    assert [r["prefect.resource.role"] for r in copy.context] == ["flow-run", "task-run", "flow", "tag"]


def test_a_v1_copy_names_its_task_run_in_the_resource() -> None:
    copy = client_copy(copy_of(builders.V1_ACQUIRED, LIMIT, run_context("fr"), task_run="tr1"), 1.0)
    assert copy is not None
    assert (copy.limit_id, copy.task_run, copy.slots) == (LIMIT.id, "tr1", None)


def test_what_is_not_a_slot_event_is_no_copy() -> None:
    assert (
        client_copy({"event": "prefect.flow-run.Running", "resource": {"prefect.resource.id": "x"}}, 1)
        is None
    )
    assert client_copy({"event": builders.ACQUIRED, "resource": "nope"}, 1) is None
    assert (
        client_copy({"event": builders.ACQUIRED, "resource": {"prefect.resource.id": "prefect.flow.x"}}, 1)
        is None
    )
    assert (
        client_copy(
            {"event": builders.CREATED, "resource": {"prefect.resource.id": "prefect.concurrency-limit.x"}}, 1
        )
        is None
    )


def test_enrich_appends_the_context_and_prefers_the_clients_labels_for_a_shared_resource() -> None:
    mine = acquired(holder=Holder("task_run", "tr"))
    context = tuple(run_context("fr", "tr"))
    merged = enrich(mine.related, context)
    assert [r["prefect.resource.id"] for r in merged] == [r["prefect.resource.id"] for r in context]
    assert merged[1]["prefect.resource.name"] == "work-0"  # the client's task run, with its name


def test_common_keeps_what_every_context_names() -> None:
    a, b = tuple(run_context("fr", "t1")), tuple(run_context("fr", "t2"))
    assert [r["prefect.resource.role"] for r in common([a, b])] == ["flow-run", "flow", "tag"]
    assert common([]) == ()


def test_a_holders_event_gets_the_context_of_its_task_runs_copy_exactly() -> None:
    contexts = RunContexts(clock=lambda: T0)
    seen(contexts, copy_of(builders.ACQUIRED, LIMIT, run_context("fr1", "t1")), T0 + 0.01)
    seen(contexts, copy_of(builders.ACQUIRED, LIMIT, run_context("fr2", "t2")), T0 + 0.02)
    mine = contexts.resolve(acquired(holder=Holder("task_run", "t2")), T0 + 0.03)
    assert "prefect.flow-run.fr2" in roles(mine)
    assert "prefect.flow-run.fr1" not in roles(mine)
    assert len(contexts) == 1


def test_a_released_event_takes_the_context_of_the_acquired_event_it_follows() -> None:
    contexts = RunContexts()
    seen(contexts, copy_of(builders.ACQUIRED, LIMIT, run_context("fr", "t")), T0)
    first = acquired(holder=None)
    assert "prefect.flow-run.fr" in roles(contexts.resolve(first, T0 + 0.1))
    later = released(first, T0 + 500)  # long after: no copy needed, none waited for
    assert "prefect.task-run.t" in roles(contexts.resolve(later, T0 + 500))


def test_an_event_waits_for_its_copy_then_goes_without_it() -> None:
    contexts = RunContexts(wait=1.5)
    mine = acquired()
    assert contexts.resolve(mine, T0 + 0.5) is None  # its copy may still come
    assert contexts.resolve(mine, T0 + 1.5) == mine  # no more waiting: as it is


def test_a_late_copy_still_reaches_an_event_that_waits() -> None:
    contexts = RunContexts(wait=1.5)
    mine = acquired()
    assert contexts.resolve(mine, T0 + 0.2) is None
    seen(contexts, copy_of(builders.ACQUIRED, LIMIT, run_context("fr", "t")), T0 + 0.3)
    assert "prefect.flow-run.fr" in roles(contexts.resolve(mine, T0 + 0.3))


def test_resolving_again_gives_the_same_context() -> None:
    contexts = RunContexts()
    seen(contexts, copy_of(builders.ACQUIRED, LIMIT, run_context("fr", "t")), T0)
    mine = acquired()
    once = contexts.resolve(mine, T0 + 0.1)
    assert contexts.resolve(mine, T0 + 0.2) == once  # a retried delivery: the copy was used


def test_two_clients_at_once_without_holders_share_only_their_common_context() -> None:
    contexts = RunContexts()
    seen(contexts, copy_of(builders.ACQUIRED, LIMIT, run_context("fr", "t1")), T0 + 0.01)
    seen(contexts, copy_of(builders.ACQUIRED, LIMIT, run_context("fr", "t2")), T0 + 0.02)
    first = contexts.resolve(acquired(T0), T0 + 0.1)
    assert roles(first) == ["prefect.flow-run.fr", "prefect.flow.f1", "prefect.tag.db"]


def test_copies_are_matched_by_slots_and_limit() -> None:
    contexts = RunContexts()
    seen(contexts, copy_of(builders.ACQUIRED, LIMIT, run_context("fr", "t"), slots=2), T0)
    other = replace(LIMIT, id=str(uuid.uuid4()))
    seen(contexts, copy_of(builders.ACQUIRED, other, run_context("fr9", "t9")), T0)
    mine = acquired(slots=1)
    assert contexts.resolve(mine, T0 + 5) == mine  # neither copy is of this event


def test_copies_far_from_the_grant_are_not_matched() -> None:
    contexts = RunContexts(wait=1.5, early=1.0)
    seen(contexts, copy_of(builders.ACQUIRED, LIMIT, run_context("fr", "t")), T0 - 30)
    mine = acquired()
    assert contexts.resolve(mine, T0 + 2) == mine


def test_lifecycle_events_never_wait() -> None:
    contexts = RunContexts()
    event = builders.lifecycle_event(builders.CREATED, LIMIT, T0)
    assert contexts.resolve(event, T0) == event


def test_the_copies_kept_are_bounded_oldest_out_first() -> None:
    contexts = RunContexts(size=3)
    limits = [replace(LIMIT, id=str(i)) for i in range(5)]
    for i, lim in enumerate(limits):
        seen(contexts, copy_of(builders.ACQUIRED, lim, run_context(f"fr{i}")), T0 + i)
    assert len(contexts) == 3
    assert contexts.expired == 2


def test_old_copies_are_forgotten() -> None:
    contexts = RunContexts(keep=60)
    seen(contexts, copy_of(builders.ACQUIRED, LIMIT, run_context("fr")), T0)
    contexts.resolve(acquired(T0 + 120), T0 + 125)
    assert len(contexts) == 0


# --- events_in.py ---------------------------------------------------------------------------------


async def test_the_filter_passes_every_other_frame_unchanged() -> None:
    flt = SlotCopyFilter(RunContexts(), clock=lambda: T0)
    frames = [
        orjson.dumps({"type": "auth", "token": None}).decode(),
        orjson.dumps(
            {
                "event": "prefect.task-run.Running",
                "resource": {"prefect.resource.id": "prefect.task-run.x"},
                "related": [
                    {"prefect.resource.id": "prefect.concurrency-limit.y", "prefect.resource.role": "x"}
                ],
                "id": str(uuid.uuid4()),
                "occurred": "2027-01-15T08:00:00Z",
            }
        ).decode(),
        "not json prefect.concurrency-limit.",
        orjson.dumps(["prefect.concurrency-limit.acquired"]).decode(),
        orjson.dumps(
            {"event": builders.CREATED, "resource": {"prefect.resource.id": "prefect.concurrency-limit.z"}}
        ).decode(),
    ]
    for frame in frames:
        assert await flt(frame) is frame
    assert flt.dropped == 0


async def test_the_filter_drops_client_copies_after_keeping_their_context() -> None:
    contexts = RunContexts()
    flt = SlotCopyFilter(contexts, clock=lambda: T0 + 0.01)
    for name in sorted(builders.SLOT_EVENTS):
        assert (
            await flt(orjson.dumps(copy_of(name, LIMIT, run_context("fr", "t"), task_run="t")).decode())
            is None
        )
    assert flt.dropped == 4
    assert len(contexts) == 4
    assert "prefect.flow-run.fr" in roles(
        contexts.resolve(acquired(holder=Holder("task_run", "t")), T0 + 0.02)
    )


async def test_a_malformed_slot_copy_is_dropped_without_context() -> None:
    contexts = RunContexts()
    flt = SlotCopyFilter(contexts)
    frame = orjson.dumps(
        {"event": builders.ACQUIRED, "resource": {"prefect.resource.id": 5}, "related": "x"}
    ).decode()
    assert await flt(frame) is None
    assert len(contexts) == 0
