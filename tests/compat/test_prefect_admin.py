"""Prefect's ``get_client()`` administers global concurrency limits on slotkeeper unchanged.

One script runs every call (async client, then a few through the sync client) on a fresh
server; each test asserts one part of what it recorded.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import pytest

from tests.compat.conftest import RunPrefect, Server, error, results, value

pytestmark = pytest.mark.slow

SCRIPT = """
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound


def view(lim):
    return {
        "type": type(lim).__name__,
        "id": str(lim.id),
        "name": lim.name,
        "limit": lim.limit,
        "active": lim.active,
        "active_slots": lim.active_slots,
        "slot_decay_per_second": lim.slot_decay_per_second,
        "created": lim.created.isoformat() if lim.created else None,
        "updated": lim.updated.isoformat() if lim.updated else None,
    }


async def main():
    async with get_client() as client:
        create, update = GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
        created = {}

        async def make(name, **fields):
            created[name] = await client.create_global_concurrency_limit(create(name=name, **fields))
            return str(created[name])

        async def read(name):
            return view(await client.read_global_concurrency_limit_by_name(name))

        async def status(call):
            return (await call).status_code

        await acheck("create", lambda: make("db", limit=3))
        await acheck("create_full", lambda: make("api", limit=10, active=False, active_slots=2,
                                                 slot_decay_per_second=0.5))
        await acheck("read", lambda: read("db"))
        await acheck("read_by_id", lambda: read(str(created["db"])))
        await acheck("read_full", lambda: read("api"))
        await acheck("duplicate", lambda: make("db", limit=1))
        await acheck("read_missing", lambda: read("nope"))
        await acheck("update", lambda: status(client.update_global_concurrency_limit(
            "db", update(limit=5, slot_decay_per_second=1.5))))
        await acheck("read_updated", lambda: read("db"))
        await acheck("deactivate", lambda: status(client.update_global_concurrency_limit(
            "db", update(active=False))))
        await acheck("read_deactivated", lambda: read("db"))
        await acheck("reactivate", lambda: status(client.update_global_concurrency_limit(
            "db", update(active=True))))
        await acheck("update_missing", lambda: client.update_global_concurrency_limit(
            "nope", update(limit=1)))
        await acheck("rename", lambda: status(client.update_global_concurrency_limit(
            "api", update(name="api-v2"))))
        await acheck("read_renamed", lambda: read("api-v2"))
        await acheck("read_old_name", lambda: read("api"))
        await acheck("upsert_create", lambda: client.upsert_global_concurrency_limit_by_name("cache", 4))
        await acheck("read_upsert_created", lambda: read("cache"))
        await acheck("upsert_update", lambda: client.upsert_global_concurrency_limit_by_name(
            "cache", 6, slot_decay_per_second=0.25))
        await acheck("read_upsert_updated", lambda: read("cache"))
        await acheck("list", lambda: _names(client.read_global_concurrency_limits()))
        await acheck("list_page", lambda: _names(client.read_global_concurrency_limits(limit=1, offset=1)))
        await acheck("list_types", lambda: _types(client.read_global_concurrency_limits()))
        await acheck("delete", lambda: status(client.delete_global_concurrency_limit_by_name("db")))
        await acheck("read_deleted", lambda: read("db"))
        await acheck("delete_missing", lambda: client.delete_global_concurrency_limit_by_name("db"))
        await acheck("list_after_delete", lambda: _names(client.read_global_concurrency_limits()))


async def _names(call):
    return [lim.name for lim in await call]


async def _types(call):
    return sorted({type(lim).__name__ for lim in await call})


async def wire():
    # The client's low-level slot methods, as the concurrency helpers call them.
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.client.schemas.responses import (
        ConcurrencyLimitWithLeaseResponse,
        MinimalConcurrencyLimitResponse,
    )

    async with get_client() as client:
        await client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="wire", limit=4))

        async def with_lease():
            holder = ConcurrencyLeaseHolder(type="deployment", id=uuid.uuid4())
            response = await client.increment_concurrency_slots_with_lease(
                names=["wire", "absent"], slots=3, mode="concurrency", lease_duration=120, holder=holder
            )
            parsed = ConcurrencyLimitWithLeaseResponse.model_validate(response.json())
            RESULTS["lease_id"] = {"value": str(parsed.lease_id)}
            return {
                "status": response.status_code,
                "limits": [(lim.name, lim.limit) for lim in parsed.limits],
                "slots": slots("wire"),
            }

        async def renew():
            response = await client.renew_concurrency_lease(uuid.UUID(RESULTS["lease_id"]["value"]), 300)
            return response.status_code

        async def release():
            response = await client.release_concurrency_slots_with_lease(uuid.UUID(RESULTS["lease_id"]["value"]))
            return {"status": response.status_code, "slots": slots("wire")}

        async def renew_released():
            await client.renew_concurrency_lease(uuid.UUID(RESULTS["lease_id"]["value"]), 300)

        async def without_lease():
            taken = await client.increment_concurrency_slots(names=["wire"], slots=2, mode="concurrency")
            limits = [MinimalConcurrencyLimitResponse.model_validate(o) for o in taken.json()]
            held = slots("wire")
            freed = await client.release_concurrency_slots(names=["wire"], slots=2, occupancy_seconds=1.5)
            return {
                "taken": [(lim.name, lim.limit) for lim in limits],
                "held": held,
                "freed": [o["name"] for o in freed.json()],
                "after": slots("wire"),
            }

        await acheck("wire_with_lease", with_lease)
        await acheck("wire_renew", renew)
        await acheck("wire_release", release)
        await acheck("wire_renew_released", renew_released)
        await acheck("wire_without_lease", without_lease)


asyncio.run(main())
asyncio.run(wire())

with get_client(sync_client=True) as client:
    check("sync_create", lambda: str(client.create_global_concurrency_limit(
        GlobalConcurrencyLimitCreate(name="sync", limit=2))))
    check("sync_read", lambda: view(client.read_global_concurrency_limit_by_name("sync")))
    check("sync_duplicate", lambda: client.create_global_concurrency_limit(
        GlobalConcurrencyLimitCreate(name="sync", limit=2)))
    check("sync_upsert", lambda: client.upsert_global_concurrency_limit_by_name("sync", 7))
    check("sync_read_upserted", lambda: client.read_global_concurrency_limit_by_name("sync").limit)
    check("sync_list", lambda: [lim.name for lim in client.read_global_concurrency_limits(limit=200)])
    check("sync_delete", lambda: client.delete_global_concurrency_limit_by_name("sync").status_code)
    check("sync_read_missing", lambda: client.read_global_concurrency_limit_by_name("sync"))
    check("ids", lambda: {lim.name: str(lim.id) for lim in client.read_global_concurrency_limits(limit=200)})

# Prefect's CLI (`prefect gcl ...`), run in this process to import Prefect once.
import contextlib
import io

from prefect.cli._app import app as prefect_cli


def cli(*args):
    out = io.StringIO()
    sys.argv = ["prefect", *args]
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            prefect_cli()
        except SystemExit as exc:
            code = exc.code
    return {"code": code, "output": out.getvalue()}


check("cli_create", lambda: cli("gcl", "create", "cli-a", "--limit", "3", "--slot-decay-per-second", "0.5"))
check("cli_create_again", lambda: cli("gcl", "create", "cli-a", "--limit", "3"))
check("cli_update", lambda: cli("gcl", "update", "cli-a", "--limit", "5", "--disable"))
check("cli_inspect", lambda: cli("gcl", "inspect", "cli-a", "--output", "json"))
check("cli_ls", lambda: cli("gcl", "ls", "--output", "json"))
check("cli_delete", lambda: cli("gcl", "delete", "cli-a"))
check("cli_inspect_missing", lambda: cli("gcl", "inspect", "cli-a"))
finish()
"""


@pytest.fixture(scope="module")
def found(run_prefect: RunPrefect) -> dict[str, dict[str, Any]]:
    return results(run_prefect(SCRIPT, {"PREFECT_CLI_PROMPT": "false", "COLUMNS": "200"}))


def test_create_returns_the_id_and_read_shows_the_limit(found: dict[str, dict[str, Any]]) -> None:
    limit_id = value(found, "create")
    assert uuid.UUID(limit_id)
    read = value(found, "read")
    assert read["type"] == "GlobalConcurrencyLimitResponse"
    assert read["id"] == limit_id
    assert (read["name"], read["limit"], read["active"], read["active_slots"]) == ("db", 3, True, 0)
    assert read["slot_decay_per_second"] == 0.0
    assert read["created"] and read["updated"]
    assert value(found, "read_by_id") == read


def test_create_sends_every_field(found: dict[str, dict[str, Any]]) -> None:
    read = value(found, "read_full")
    assert read["id"] == value(found, "create_full")
    assert (read["name"], read["limit"], read["active"], read["active_slots"]) == ("api", 10, False, 2)
    assert read["slot_decay_per_second"] == 0.5


def test_duplicate_name_raises_object_already_exists(found: dict[str, dict[str, Any]]) -> None:
    assert error(found, "duplicate")["error"] == "ObjectAlreadyExists"
    assert error(found, "sync_duplicate")["error"] == "ObjectAlreadyExists"


def test_missing_limit_raises_object_not_found(found: dict[str, dict[str, Any]]) -> None:
    for key in ("read_missing", "update_missing", "read_old_name", "read_deleted", "delete_missing"):
        assert error(found, key)["error"] == "ObjectNotFound", key
    assert error(found, "sync_read_missing")["error"] == "ObjectNotFound"


def test_update_changes_only_what_is_sent(found: dict[str, dict[str, Any]]) -> None:
    assert value(found, "update") == 204
    before, after = value(found, "read"), value(found, "read_updated")
    assert (after["limit"], after["slot_decay_per_second"]) == (5, 1.5)
    assert (after["id"], after["name"], after["active"], after["created"]) == (
        before["id"],
        "db",
        True,
        before["created"],
    )
    assert after["updated"] >= before["updated"]
    assert value(found, "deactivate") == 204
    assert value(found, "read_deactivated")["active"] is False
    assert value(found, "reactivate") == 204


def test_rename(found: dict[str, dict[str, Any]]) -> None:
    assert value(found, "rename") == 204
    renamed = value(found, "read_renamed")
    assert renamed["id"] == value(found, "create_full")
    assert renamed["name"] == "api-v2"


def test_upsert_creates_then_updates(found: dict[str, dict[str, Any]]) -> None:
    assert value(found, "upsert_create") is None
    made = value(found, "read_upsert_created")
    assert (made["name"], made["limit"], made["slot_decay_per_second"]) == ("cache", 4, 0.0)
    assert value(found, "upsert_update") is None
    updated = value(found, "read_upsert_updated")
    assert (updated["id"], updated["limit"], updated["slot_decay_per_second"]) == (made["id"], 6, 0.25)
    assert value(found, "sync_upsert") is None
    assert value(found, "sync_read_upserted") == 7


def test_list_is_ordered_by_name_and_paged(found: dict[str, dict[str, Any]]) -> None:
    assert value(found, "list") == ["api-v2", "cache", "db"]
    assert value(found, "list_page") == ["cache"]
    assert value(found, "list_types") == ["GlobalConcurrencyLimitResponse"]
    assert value(found, "list_after_delete") == ["api-v2", "cache"]
    assert value(found, "sync_list") == ["api-v2", "cache", "sync", "wire"]


def test_delete(found: dict[str, dict[str, Any]]) -> None:
    assert value(found, "delete") == 204
    assert value(found, "sync_delete") == 204


def test_sync_client_create_and_read(found: dict[str, dict[str, Any]]) -> None:
    read = value(found, "sync_read")
    assert read["id"] == value(found, "sync_create")
    assert (read["name"], read["limit"], read["active_slots"]) == ("sync", 2, 0)


def test_low_level_slot_methods(found: dict[str, dict[str, Any]]) -> None:
    # Unknown names are ignored, as Prefect's server does.
    assert value(found, "wire_with_lease") == {"status": 200, "limits": [["wire", 4]], "slots": 3}
    assert value(found, "wire_renew") == 204
    assert value(found, "wire_release") == {"status": 204, "slots": 0}
    gone = error(found, "wire_renew_released")
    assert "HTTPStatusError" in gone["mro"]
    assert gone["message"].startswith("Client error '410 Gone'"), gone["message"]
    assert value(found, "wire_without_lease") == {
        "taken": [["wire", 4]],
        "held": 2,
        "freed": ["wire"],
        "after": 0,
    }


def test_changes_made_through_the_client_have_lifecycle_events(
    server: Server, found: dict[str, dict[str, Any]]
) -> None:
    db_id = value(found, "create")
    events = server.events({"resource": {"id": [f"prefect.concurrency-limit.{db_id}"]}})
    names = [e["event"].removeprefix("prefect.concurrency-limit.") for e in events]
    # create; update, deactivate, reactivate; delete
    assert names == ["created", "updated", "updated", "updated", "deleted"]
    created, updated = events[0], events[1]
    assert created["resource"] == {
        "prefect.resource.id": f"prefect.concurrency-limit.{db_id}",
        "prefect.resource.name": "db",
    }
    assert created["related"] == []
    assert created["payload"] == {"name": "db", "limit": 3, "active": True, "slot_decay_per_second": 0.0}
    assert updated["payload"] == {"name": "db", "limit": 5, "active": True, "slot_decay_per_second": 1.5}
    assert events[2]["payload"]["active"] is False


def test_prefect_gcl_cli(found: dict[str, dict[str, Any]]) -> None:
    created = value(found, "cli_create")
    assert created["code"] == 0, created
    match = re.match(
        r"Created global concurrency limit with name 'cli-a' and ID '([0-9a-f-]{36})'", created["output"]
    )
    assert match, created["output"]
    again = value(found, "cli_create_again")
    assert again == {
        "code": 1,
        "output": "Global concurrency limit 'cli-a' already exists. Please try creating with a different name.\n",
    }
    assert value(found, "cli_update") == {
        "code": 0,
        "output": "Updated global concurrency limit with name 'cli-a'.\n",
    }
    inspected = value(found, "cli_inspect")
    assert inspected["code"] == 0, inspected
    shown = json.loads(inspected["output"])
    assert shown["id"] == match.group(1)
    assert (shown["name"], shown["limit"], shown["active"], shown["active_slots"]) == ("cli-a", 5, False, 0)
    assert shown["slot_decay_per_second"] == 0.5
    listed = value(found, "cli_ls")
    assert listed["code"] == 0, listed
    assert "cli-a" in [lim["name"] for lim in json.loads(listed["output"])]
    assert value(found, "cli_delete") == {
        "code": 0,
        "output": "Deleted global concurrency limit with name 'cli-a'.\n",
    }
    assert value(found, "cli_inspect_missing") == {
        "code": 1,
        "output": "Global concurrency limit 'cli-a' not found.\n",
    }
