"""The storage conformance suite: every test runs on SQLite and on PostgreSQL.

Each test drives :class:`slotkeeper.storage.Storage` through its public coroutines only, with the
fake clock, so the same behaviour is asserted on both backends.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from slotkeeper.domain import DEFAULT_AVG_SLOT_OCCUPANCY_SECONDS, Mode, next_avg_occupancy
from slotkeeper.errors import Conflict, InvalidRequest, NotFound, SlotsUnavailable
from slotkeeper.models import Granted, Holder, LimitSpec, LimitView
from slotkeeper.storage import Storage, migrate, open_storage
from tests.conftest import FakeClock, take

FLOW = Holder("flow_run", "0d9a5c1e-2f4b-4c1a-9e59-9e8a4b7c6d01")
TASK = Holder("task_run", "7b1e3c55-8a2d-4f0e-b6a1-3c9d2e4f5a60")


async def make(storage: Storage, name: str = "db", limit: int = 2, **fields: object) -> LimitView:
    return await storage.create_limit(LimitSpec(name=name, limit=limit, **fields))  # type: ignore[arg-type]


async def occupied(storage: Storage, key: str = "db") -> int:
    return (await storage.read_limit(key)).active_slots


async def lease_ids(storage: Storage, key: str = "db") -> list[str]:
    return [info.lease_id for info in await storage.list_leases(key)]


# --- limits: create, read, list, update, delete ---------------------------------------------------


async def test_create_returns_the_new_limit(storage: Storage, clock: FakeClock) -> None:
    view = await make(
        storage, "db", 5, active=False, active_slots=2, denied_slots=3, slot_decay_per_second=0.5
    )
    lim = view.limit
    assert uuid.UUID(lim.id)
    assert (lim.name, lim.limit, lim.active) == ("db", 5, False)
    assert (lim.denied_slots, lim.slot_decay_per_second) == (3, 0.5)
    assert lim.avg_slot_occupancy_seconds == DEFAULT_AVG_SLOT_OCCUPANCY_SECONDS
    assert lim.created == lim.updated == clock.now
    assert lim.fencing_token == 0
    assert view.active_slots == 2


async def test_created_active_slots_count_and_may_not_exceed_the_limit(storage: Storage) -> None:
    with pytest.raises(InvalidRequest, match="active_slots cannot be set to 5: the limit is 2"):
        await make(storage, "db", 2, active_slots=5)
    await make(storage, "db", 2, active_slots=2)
    assert await occupied(storage) == 2
    with pytest.raises(SlotsUnavailable):
        await take(storage)


async def test_duplicate_name_is_a_conflict(storage: Storage) -> None:
    first = await make(storage, "db", 2)
    with pytest.raises(Conflict, match="already exists"):
        await make(storage, "db", 9)
    again = await storage.read_limit("db")
    assert (again.limit.id, again.limit.limit) == (first.limit.id, 2)
    assert [v.limit.name for v in await storage.list_limits(10, 0)] == ["db"]


async def test_read_by_id_and_by_name(storage: Storage) -> None:
    created = await make(storage, "db", 3)
    by_id = await storage.read_limit(created.limit.id)
    by_name = await storage.read_limit("db")
    assert by_id.limit == by_name.limit == created.limit


@pytest.mark.parametrize("key", ["nope", "5f0c3c6e-8b0e-4bb4-9d8e-2a7f1d0c9b11"])
async def test_read_unknown_is_not_found(storage: Storage, key: str) -> None:
    await make(storage)
    with pytest.raises(NotFound) as info:
        await storage.read_limit(key)
    assert info.value.detail == "Concurrency Limit not found"


async def test_names_are_case_sensitive(storage: Storage) -> None:
    await make(storage, "db", 1)
    await make(storage, "DB", 7)
    assert (await storage.read_limit("DB")).limit.limit == 7
    with pytest.raises(NotFound):
        await storage.read_limit("Db")


async def test_list_is_ordered_by_name_and_paged(storage: Storage) -> None:
    for name in ["m", "b", "z", "a:1", "a", "B"]:
        await make(storage, name)
    everything = ["B", "a", "a:1", "b", "m", "z"]  # byte order, on both backends
    assert [v.limit.name for v in await storage.list_limits(100, 0)] == everything
    assert [v.limit.name for v in await storage.list_limits(2, 1)] == ["a", "a:1"]
    assert [v.limit.name for v in await storage.list_limits(10, 4)] == ["m", "z"]
    assert await storage.list_limits(10, 6) == []
    assert await storage.list_limits(0, 0) == []


@contextlib.asynccontextmanager
async def _opened(url: str, clock: FakeClock) -> AsyncIterator[Storage]:
    """A migrated storage on ``url``, driven by ``clock``."""
    migrate(url)
    store = open_storage(url)
    store.clock = clock
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def storage_with_a_locale(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[Storage]:
    """A storage whose PostgreSQL database sorts text by a language's rules (ICU ``en-US``), as a
    database created under a locale such as ``en_US.UTF-8`` does; SQLite has no such setting."""
    if request.param == "sqlite":
        async with _opened(f"sqlite:///{tmp_path / 'slotkeeper.db'}", clock) as store:
            yield store
        return
    postgres_url: str = request.getfixturevalue("postgres_url")
    name = f"slotkeeper_locale_{secrets.token_hex(6)}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        try:
            admin.execute(
                f"CREATE DATABASE \"{name}\" TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
            )
        except psycopg.Error as exc:
            if os.environ.get("CI"):  # PostgreSQL tests run in CI, never skip
                raise
            pytest.skip(f"no ICU collation on this PostgreSQL server: {exc}")
    try:
        async with _opened(urlsplit(postgres_url)._replace(path=f"/{name}").geturl(), clock) as store:
            yield store
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_list_orders_names_by_their_bytes_whatever_the_databases_locale(
    storage_with_a_locale: Storage,
) -> None:
    """Both backends list limits in the same order: byte order, not the database's collation
    (PostgreSQL under en-US would list ``_x, a, A-1, B``: case and punctuation ignored)."""
    names = ["B", "a", "_x", "A-1", "a:1", "Z", "-"]
    for name in names:
        await make(storage_with_a_locale, name)
    everything = sorted(names, key=str.encode)
    assert everything == ["-", "A-1", "B", "Z", "_x", "a", "a:1"]
    assert [v.limit.name for v in await storage_with_a_locale.list_limits(100, 0)] == everything
    assert [v.limit.name for v in await storage_with_a_locale.list_limits(2, 3)] == ["Z", "_x"]
    assert [v.limit.name for v in await storage_with_a_locale.list_limits(10, 0, "a")] == ["a", "a:1"]


async def test_list_by_prefix_takes_the_prefix_literally(storage: Storage) -> None:
    for name in ["tag:a", "tag:b", "tagx", "TAG:c", "t%g:d", "t_g:e", "other"]:
        await make(storage, name)
    assert [v.limit.name for v in await storage.list_limits(10, 0, "tag:")] == ["tag:a", "tag:b"]
    assert [v.limit.name for v in await storage.list_limits(10, 0, "t%")] == ["t%g:d"]
    assert [v.limit.name for v in await storage.list_limits(10, 0, "t_")] == ["t_g:e"]
    assert [v.limit.name for v in await storage.list_limits(1, 1, "tag:")] == ["tag:b"]


async def test_list_reports_occupancy_now(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "a", 5, active_slots=4, slot_decay_per_second=1.0)
    await make(storage, "b", 5)
    await take(storage, "b", slots=2)
    clock.advance(3)
    assert [(v.limit.name, v.active_slots) for v in await storage.list_limits(10, 0)] == [("a", 1), ("b", 2)]


async def test_update_each_field(storage: Storage, clock: FakeClock) -> None:
    created = (await make(storage, "db", 2)).limit
    clock.advance(5)
    await storage.update_limit("db", {"limit": 7})
    await storage.update_limit("db", {"active": False})
    await storage.update_limit("db", {"denied_slots": 4})
    await storage.update_limit("db", {"slot_decay_per_second": 0.25})
    await storage.update_limit("db", {"active_slots": 3})
    view = await storage.update_limit(created.id, {"name": "renamed"})
    lim = view.limit
    assert (lim.id, lim.name, lim.limit, lim.active) == (created.id, "renamed", 7, False)
    assert (lim.denied_slots, lim.slot_decay_per_second) == (4, 0.25)
    assert view.active_slots == 3
    assert lim.created == created.created
    assert lim.updated == clock.now
    assert (await storage.read_limit("renamed")).limit == lim
    with pytest.raises(NotFound):
        await storage.read_limit("db")


async def test_update_with_nothing_changes_nothing_but_updated(storage: Storage, clock: FakeClock) -> None:
    before = (await make(storage, "db", 2, active_slots=1)).limit
    clock.advance(1)
    after = (await storage.update_limit("db", {})).limit
    assert after.updated == clock.now
    assert (after.name, after.limit, after.pool_slots) == (before.name, before.limit, before.pool_slots)


async def test_update_keeps_the_decay_up_to_now(storage: Storage, clock: FakeClock) -> None:
    # Prefect discards the decay on PATCH (10 slots again); here 7.5 s at 0.4/s leave 7,
    # and the half slot already under way is kept too.
    await make(storage, "db", 20, active_slots=10, slot_decay_per_second=0.4)
    clock.advance(7.5)
    assert await occupied(storage) == 7
    await storage.update_limit("db", {"name": "db2"})
    assert await occupied(storage, "db2") == 7
    clock.advance(2.5)  # 10 s in all: exactly 4 slots gone
    assert await occupied(storage, "db2") == 6


async def test_enabling_decay_later_does_not_decay_the_past(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "db", 20, active_slots=10)
    clock.advance(1000)
    assert await occupied(storage) == 10
    await storage.update_limit("db", {"slot_decay_per_second": 1.0})
    assert await occupied(storage) == 10
    clock.advance(3)
    assert await occupied(storage) == 7


async def test_update_unknown_is_not_found(storage: Storage) -> None:
    with pytest.raises(NotFound):
        await storage.update_limit("nope", {"limit": 3})


async def test_rename_onto_an_existing_name_is_a_conflict(storage: Storage) -> None:
    await make(storage, "a", 1)
    await make(storage, "b", 2)
    with pytest.raises(Conflict, match="already exists"):
        await storage.update_limit("b", {"name": "a", "limit": 9})
    assert (await storage.read_limit("a")).limit.limit == 1
    assert (await storage.read_limit("b")).limit.limit == 2


async def test_active_slots_below_live_leases_is_a_conflict(storage: Storage) -> None:
    await make(storage, "db", 5)
    granted = await take(storage, slots=2)
    with pytest.raises(Conflict, match="live leases hold 2"):
        await storage.update_limit("db", {"active_slots": 1})
    assert await occupied(storage) == 2
    assert (await storage.update_limit("db", {"active_slots": 2})).active_slots == 2
    assert (await storage.update_limit("db", {"active_slots": 4})).active_slots == 4
    with pytest.raises(InvalidRequest, match="active_slots cannot be set to 6: the limit is 5"):
        await storage.update_limit("db", {"active_slots": 6})
    assert await storage.release_lease(granted.lease_id or "")
    assert await occupied(storage) == 2  # the 2 unleased slots stay until decremented


async def test_active_slots_of_an_expired_lease_are_not_held(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "db", 5)
    await take(storage, slots=3, lease=60)
    clock.advance(60)
    assert (await storage.update_limit("db", {"active_slots": 1})).active_slots == 1


async def test_delete_removes_the_limit_and_its_grants(storage: Storage) -> None:
    await make(storage, "a", 2)
    await make(storage, "b", 2)
    granted = await take(storage, "a", "b")
    deleted = await storage.delete_limit("a")
    assert (deleted.limit.name, deleted.active_slots) == ("a", 1)
    with pytest.raises(NotFound):
        await storage.read_limit("a")
    with pytest.raises(NotFound):
        await storage.delete_limit("a")
    # The lease lives on for its other limit; a new limit of the same name starts empty.
    assert await lease_ids(storage, "b") == [granted.lease_id]
    await make(storage, "a", 2)
    assert await occupied(storage, "a") == 0
    assert await lease_ids(storage, "a") == []
    assert await storage.release_lease(granted.lease_id or "")
    assert await occupied(storage, "b") == 0
    assert await occupied(storage, "a") == 0


async def test_delete_by_id(storage: Storage) -> None:
    created = await make(storage, "db")
    await storage.delete_limit(created.limit.id)
    assert await storage.list_limits(10, 0) == []


async def test_delete_of_a_held_limit_then_release_is_harmless(storage: Storage) -> None:
    await make(storage, "db", 1)
    granted = await take(storage, holder=FLOW)
    await storage.delete_limit("db")
    assert await storage.release_lease(granted.lease_id or "")
    assert not await storage.release_lease(granted.lease_id or "")
    await make(storage, "db", 1)
    await take(storage)
    assert await occupied(storage) == 1


# --- acquire and release --------------------------------------------------------------------------


async def test_acquire_without_lease_then_plain_release(storage: Storage) -> None:
    await make(storage, "db", 3)
    granted = await take(storage, slots=2, lease=None)
    assert granted.lease_id is None
    assert [lim.name for lim in granted.limits] == ["db"]
    assert await occupied(storage) == 2
    assert await lease_ids(storage) == []
    found = await storage.release_slots(["db"], 2, None)
    assert [lim.name for lim in found] == ["db"]
    assert await occupied(storage) == 0


async def test_acquire_with_lease_then_release_lease(storage: Storage) -> None:
    await make(storage, "db", 3)
    granted = await take(storage, slots=2)
    assert granted.lease_id is not None
    assert await occupied(storage) == 2
    assert await storage.release_lease(granted.lease_id)
    assert await occupied(storage) == 0
    assert not await storage.release_lease(granted.lease_id)


async def test_plain_release_does_not_free_leased_slots(storage: Storage) -> None:
    await make(storage, "db", 3)
    await take(storage, slots=2)
    await take(storage, slots=1, lease=None)
    await storage.release_slots(["db"], 3, None)
    assert await occupied(storage) == 2


async def test_plain_release_clamps_at_zero(storage: Storage) -> None:
    await make(storage, "db", 5, active_slots=2)
    await storage.release_slots(["db"], 5, None)
    assert await occupied(storage) == 0
    await take(storage, slots=5, lease=None)
    assert await occupied(storage) == 5


async def test_plain_release_of_unknown_names_finds_nothing(storage: Storage) -> None:
    await make(storage, "db", 5, active_slots=2)
    assert await storage.release_slots(["nope"], 1, 3.0) == []
    assert await storage.release_slots([], 1, None) == []
    assert await occupied(storage) == 2


async def test_plain_release_updates_the_occupancy_average(storage: Storage) -> None:
    await make(storage, "db", 1, active_slots=1)
    await storage.release_slots(["db"], 1, 10.0)
    avg = (await storage.read_limit("db")).limit.avg_slot_occupancy_seconds
    assert avg == pytest.approx(6.0)  # Prefect's observed value


async def test_release_of_unknown_lease_is_false(storage: Storage) -> None:
    await make(storage, "db", 1)
    await take(storage)
    assert not await storage.release_lease(str(uuid.uuid4()))
    assert await occupied(storage) == 1


async def test_full_limit_is_unavailable_with_a_retry_hint(storage: Storage) -> None:
    await make(storage, "db", 2)
    await take(storage, slots=2)
    with pytest.raises(SlotsUnavailable) as info:
        await take(storage)
    assert info.value.retry_after is not None and info.value.retry_after > 0
    with pytest.raises(SlotsUnavailable):
        await take(storage, lease=None)
    assert await occupied(storage) == 2


async def test_more_slots_than_the_limit_is_invalid(storage: Storage) -> None:
    await make(storage, "db", 2)
    with pytest.raises(InvalidRequest) as info:
        await take(storage, slots=3)
    assert info.value.detail == "Slots requested is greater than the limit"
    assert await occupied(storage) == 0


async def test_acquire_of_several_limits_is_all_or_nothing(storage: Storage) -> None:
    first = (await make(storage, "first", 5)).limit
    await make(storage, "second", 1)
    await take(storage, "second")
    with pytest.raises(SlotsUnavailable):
        await take(storage, "first", "second")
    with pytest.raises(SlotsUnavailable):
        await take(storage, "first", "second", lease=None)
    after = await storage.read_limit("first")
    assert after.active_slots == 0
    assert after.limit.fencing_token == first.fencing_token
    assert await lease_ids(storage, "first") == []


async def test_acquire_of_several_limits_holds_and_releases_each(storage: Storage) -> None:
    await make(storage, "a", 3)
    await make(storage, "b", 3)
    granted = await take(storage, "a", "b", slots=2)
    assert await occupied(storage, "a") == await occupied(storage, "b") == 2
    assert await lease_ids(storage, "a") == await lease_ids(storage, "b") == [granted.lease_id]
    assert await storage.release_lease(granted.lease_id or "")
    assert await occupied(storage, "a") == await occupied(storage, "b") == 0
    # The lease's grants went with it (ON DELETE CASCADE): no row is left behind.
    assert await storage.backend.run(lambda tx: tx.all("SELECT lease_id FROM grants")) == []


async def test_acquired_limits_come_back_in_request_order(storage: Storage) -> None:
    for name in ["a", "b", "c"]:
        await make(storage, name, 5)
    granted = await take(storage, "c", "a", "b")
    assert [lim.name for lim in granted.limits] == ["c", "a", "b"]


async def test_duplicate_names_collapse(storage: Storage) -> None:
    await make(storage, "db", 2)
    granted = await take(storage, "db", "db", slots=2)
    assert [lim.name for lim in granted.limits] == ["db"]
    assert await occupied(storage) == 2
    await storage.release_slots(["db", "db"], 1, None)
    assert await occupied(storage) == 2  # leased slots untouched by the plain release


async def test_duplicate_names_collapse_without_lease(storage: Storage) -> None:
    await make(storage, "db", 3)
    await take(storage, "db", "db", "db", lease=None)
    assert await occupied(storage) == 1
    await storage.release_slots(["db", "db"], 1, None)
    assert await occupied(storage) == 0


async def test_unknown_names_are_ignored(storage: Storage) -> None:
    await make(storage, "db", 2)
    granted = await take(storage, "nope", "db", "other")
    assert [lim.name for lim in granted.limits] == ["db"]
    assert await occupied(storage) == 1


async def test_acquire_of_only_unknown_names_holds_nothing(storage: Storage) -> None:
    granted = await take(storage, "nope", "other")
    assert granted.limits == []
    assert granted.lease_id is not None and uuid.UUID(granted.lease_id)
    assert not await storage.renew_lease(granted.lease_id, 60)
    assert not await storage.release_lease(granted.lease_id)
    assert (await take(storage, "nope", lease=None)) == Granted([], None)


async def test_inactive_limits_are_listed_but_not_counted(storage: Storage) -> None:
    await make(storage, "asleep", 1, active=False)
    await make(storage, "awake", 5)
    granted = await take(storage, "asleep", "awake", slots=3)
    assert [lim.name for lim in granted.limits] == ["asleep", "awake"]
    assert await occupied(storage, "asleep") == 0
    assert await occupied(storage, "awake") == 3
    await take(storage, "asleep", slots=4, lease=None)
    assert await occupied(storage, "asleep") == 0
    # Woken up, it does not start counting what it never granted.
    await storage.update_limit("asleep", {"active": True})
    assert await occupied(storage, "asleep") == 0
    assert await storage.release_lease(granted.lease_id or "")
    assert await occupied(storage, "awake") == 0


async def test_plain_release_leaves_inactive_limits_alone(storage: Storage) -> None:
    await make(storage, "db", 5, active_slots=3, active=False)
    found = await storage.release_slots(["db"], 2, None)
    assert [lim.name for lim in found] == ["db"]
    assert await occupied(storage) == 3


async def test_deactivating_keeps_the_slots(storage: Storage) -> None:
    await make(storage, "db", 5, active_slots=2)
    await storage.update_limit("db", {"active": False})
    await storage.update_limit("db", {"active": True})
    assert await occupied(storage) == 2


# --- rate limits and decay ------------------------------------------------------------------------


async def test_rate_limit_slots_go_to_the_pool_and_decay(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "db", 2, slot_decay_per_second=1.0)
    await take(storage, slots=2, lease=None, mode=Mode.RATE_LIMIT)
    assert await occupied(storage) == 2
    with pytest.raises(SlotsUnavailable) as info:
        await take(storage, lease=None, mode=Mode.RATE_LIMIT)
    # The exact decay wait (1 s), jittered within Prefect's bounds.
    assert info.value.retry_after is not None and 0.75 <= info.value.retry_after <= 1.3
    clock.advance(0.999)
    assert await occupied(storage) == 2
    clock.advance(0.001)
    assert await occupied(storage) == 1
    await take(storage, lease=None, mode=Mode.RATE_LIMIT)
    clock.advance(10)
    assert await occupied(storage) == 0


async def test_rate_limit_with_a_lease_still_decays(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "db", 2, slot_decay_per_second=0.5)
    granted = await take(storage, slots=2, mode=Mode.RATE_LIMIT)
    assert await occupied(storage) == 2
    assert await storage.release_lease(granted.lease_id or "")
    assert await occupied(storage) == 2  # rate-limit slots come back by decay, not by release
    clock.advance(4)
    assert await occupied(storage) == 0


async def test_rate_limit_without_decay_is_invalid(storage: Storage) -> None:
    await make(storage, "a", 2)
    await make(storage, "b", 2, slot_decay_per_second=1.0)
    await make(storage, "c", 2)
    with pytest.raises(InvalidRequest) as info:
        await take(storage, "a", "b", "c", mode=Mode.RATE_LIMIT)
    assert info.value.detail.endswith("The following limits do not have a decay configured: 'a,c'")
    assert await occupied(storage, "b") == 0


async def test_decay_keeps_fractional_progress_across_writes(storage: Storage, clock: FakeClock) -> None:
    # One slot per 2 s. A write 1.5 s in must not throw away those 1.5 s.
    await make(storage, "db", 10, slot_decay_per_second=0.5)
    await take(storage, slots=4, lease=None)
    clock.advance(1.5)
    await take(storage, slots=1, lease=None)
    assert await occupied(storage) == 5
    clock.advance(0.5)
    assert await occupied(storage) == 4
    await storage.release_slots(["db"], 1, None)
    clock.advance(1.0)
    await storage.release_slots(["db"], 1, None)
    clock.advance(1.0)
    assert await occupied(storage) == 1


async def test_empty_pool_does_not_bank_decay(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "db", 10, slot_decay_per_second=1.0)
    clock.advance(100)
    await take(storage, slots=5, lease=None)
    clock.advance(0.5)
    assert await occupied(storage) == 5
    clock.advance(0.5)
    assert await occupied(storage) == 4


async def test_leased_slots_never_decay(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "db", 5, slot_decay_per_second=10.0)
    await take(storage, slots=2, lease=600)
    await take(storage, slots=2, lease=None)
    clock.advance(100)
    assert await occupied(storage) == 2


# --- leases: expiry, renewal, reaping -------------------------------------------------------------


async def test_lease_stops_counting_at_its_expiry_instant(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "db", 1)
    granted = await take(storage, lease=10)
    clock.advance(9.5)
    assert await occupied(storage) == 1
    assert await lease_ids(storage) == [granted.lease_id]
    with pytest.raises(SlotsUnavailable):
        await take(storage)
    clock.advance(0.5)  # exactly at the expiry
    assert await occupied(storage) == 0
    assert await lease_ids(storage) == []
    second = await take(storage)
    assert await lease_ids(storage) == [second.lease_id]


async def test_renew_in_time_extends_from_now(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "db", 1)
    granted = await take(storage, lease=10)
    lease_id = granted.lease_id or ""
    clock.advance(9.75)
    assert await storage.renew_lease(lease_id, 10)
    [info] = await storage.list_leases("db")
    assert info.expires == clock.now + 10
    clock.advance(9.5)
    assert await occupied(storage) == 1
    clock.advance(0.5)
    assert await occupied(storage) == 0


async def test_renew_may_shorten_a_lease(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "db", 1)
    granted = await take(storage, lease=600)
    assert await storage.renew_lease(granted.lease_id or "", 5)
    clock.advance(5)
    assert await occupied(storage) == 0


async def test_renew_after_expiry_fails(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "db", 1)
    granted = await take(storage, lease=10)
    clock.advance(10)  # at the expiry instant the lease is already gone
    assert not await storage.renew_lease(granted.lease_id or "", 60)
    assert await occupied(storage) == 0
    clock.advance(5)
    assert not await storage.renew_lease(granted.lease_id or "", 60)
    assert await occupied(storage) == 0


async def test_renew_unknown_or_released_fails(storage: Storage) -> None:
    await make(storage, "db", 1)
    assert not await storage.renew_lease(str(uuid.uuid4()), 60)
    granted = await take(storage)
    assert await storage.release_lease(granted.lease_id or "")
    assert not await storage.renew_lease(granted.lease_id or "", 60)


async def test_renew_after_an_expired_lease_was_replaced(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "db", 1)
    old = await take(storage, lease=10)
    clock.advance(11)
    new = await take(storage, lease=10)
    assert not await storage.renew_lease(old.lease_id or "", 60)
    assert await lease_ids(storage) == [new.lease_id]
    assert await occupied(storage) == 1


async def test_reaper_ends_each_expired_lease_exactly_once(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "db", 5)
    early = await take(storage, lease=5)
    late = await take(storage, lease=10)
    renewed = await take(storage, lease=10)
    assert await storage.reap_expired() == 0
    clock.advance(9)
    assert await storage.renew_lease(renewed.lease_id or "", 11)  # now until t=20
    clock.advance(3)
    assert await storage.reap_expired() == 2
    assert await storage.reap_expired() == 0
    assert not await storage.release_lease(early.lease_id or "")
    assert not await storage.release_lease(late.lease_id or "")
    assert await lease_ids(storage) == [renewed.lease_id]
    assert await occupied(storage) == 1
    clock.advance(8)
    assert await storage.reap_expired() == 1
    assert await storage.reap_expired() == 0
    assert await occupied(storage) == 0


async def test_reaper_skips_a_released_lease(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "db", 5)
    released = await take(storage, lease=5)
    await take(storage, lease=5)
    clock.advance(6)
    assert await storage.release_lease(released.lease_id or "")
    assert await storage.reap_expired() == 1
    assert await storage.reap_expired() == 0


async def test_reaper_works_in_batches(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "db", 10)
    for _ in range(5):
        await take(storage, lease=5)
    clock.advance(5)
    assert [await storage.reap_expired(batch=2) for _ in range(4)] == [2, 2, 1, 0]


async def test_reaper_counts_the_hold_time_until_expiry(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "db", 1)
    await take(storage, lease=10)
    clock.advance(1000)
    assert await storage.reap_expired() == 1
    avg = (await storage.read_limit("db")).limit.avg_slot_occupancy_seconds
    assert avg == pytest.approx(next_avg_occupancy(DEFAULT_AVG_SLOT_OCCUPANCY_SECONDS, 10.0, 1, 1))


async def test_release_counts_the_hold_time(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "db", 1)
    granted = await take(storage, lease=60)
    clock.advance(10)
    assert await storage.release_lease(granted.lease_id or "")
    assert (await storage.read_limit("db")).limit.avg_slot_occupancy_seconds == pytest.approx(6.0)


async def test_release_of_an_expired_unreaped_lease(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "db", 1)
    granted = await take(storage, lease=10)
    clock.advance(20)
    assert await storage.release_lease(granted.lease_id or "")
    assert await storage.reap_expired() == 0
    assert await occupied(storage) == 0


# --- limits changed while held --------------------------------------------------------------------


async def test_limit_lowered_below_held_slots_then_released(storage: Storage) -> None:
    await make(storage, "db", 3)
    granted = await take(storage, slots=3)
    await storage.update_limit("db", {"limit": 1})
    view = await storage.read_limit("db")
    assert (view.limit.limit, view.active_slots) == (1, 3)
    with pytest.raises(SlotsUnavailable):
        await take(storage)
    assert await storage.release_lease(granted.lease_id or "")
    assert await occupied(storage) == 0
    await take(storage)
    with pytest.raises(SlotsUnavailable):
        await take(storage)


async def test_limit_set_to_zero_while_held_then_released(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "db", 2)
    granted = await take(storage, slots=2)
    await storage.update_limit("db", {"limit": 0})
    clock.advance(4)
    assert await storage.release_lease(granted.lease_id or "")
    view = await storage.read_limit("db")
    assert view.active_slots == 0
    assert view.limit.avg_slot_occupancy_seconds == pytest.approx(next_avg_occupancy(2.0, 4.0, 2, 0))


async def test_plain_release_on_a_zero_limit_succeeds(storage: Storage) -> None:
    await make(storage, "db", 2, active_slots=2)
    await storage.update_limit("db", {"limit": 0})
    await storage.release_slots(["db"], 2, 3.0)
    view = await storage.read_limit("db")
    assert view.active_slots == 0
    assert view.limit.avg_slot_occupancy_seconds == pytest.approx(1.5)  # 3 s over 2 slots


# --- holders and fencing tokens -------------------------------------------------------------------


async def test_list_leases_shows_live_holders_oldest_first(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "db", 10)
    await make(storage, "other", 10)
    first = await take(storage, slots=2, lease=100, holder=FLOW)
    clock.advance(1)
    second = await take(storage, "db", "other", slots=3, lease=50, holder=TASK)
    clock.advance(1)
    third = await take(storage, slots=1, lease=5)
    fourth = await take(storage, "other", lease=100)
    infos = await storage.list_leases("db")
    assert [i.lease_id for i in infos] == [first.lease_id, second.lease_id, third.lease_id]
    assert [i.holder for i in infos] == [FLOW, TASK, None]
    assert [i.slots for i in infos] == [2, 3, 1]
    start = clock.now - 2
    assert [(i.created, i.expires) for i in infos] == [
        (start, start + 100),
        (start + 1, start + 51),
        (start + 2, start + 7),
    ]
    assert await lease_ids(storage, "other") == [second.lease_id, fourth.lease_id]
    clock.advance(5)  # the third expires
    assert [i.lease_id for i in await storage.list_leases("db")] == [first.lease_id, second.lease_id]


async def test_list_leases_by_id_and_unknown(storage: Storage) -> None:
    created = await make(storage, "db", 2)
    granted = await take(storage)
    assert await lease_ids(storage, created.limit.id) == [granted.lease_id]
    with pytest.raises(NotFound):
        await storage.list_leases("nope")


async def test_fencing_tokens_strictly_increase_per_limit(storage: Storage, clock: FakeClock) -> None:
    await make(storage, "a", 3)
    await make(storage, "b", 3)
    tokens: dict[str, list[int]] = {"a": [], "b": []}

    def record(granted: Granted) -> None:
        for lim in granted.limits:
            tokens[lim.name].append(lim.fencing_token)

    record(await take(storage, "a"))
    record(await take(storage, "a", "b", lease=None))
    with pytest.raises(SlotsUnavailable):
        await take(storage, "a", "b", slots=2)
    await storage.release_slots(["a", "b"], 1, None)
    record(await take(storage, "b", "a", lease=5))
    clock.advance(6)
    await storage.reap_expired()
    await storage.update_limit("a", {"limit": 4})
    record(await take(storage, "a", "b", slots=2))
    for name, seen in tokens.items():
        assert seen == sorted(set(seen)), name
        assert (await storage.read_limit(name)).limit.fencing_token == seen[-1]
    assert tokens["a"] == [1, 2, 3, 4]
    # Each grant carries the token its acquisition produced.
    infos = await storage.list_leases("a")
    assert [i.fencing_token for i in infos] == [1, 4]
