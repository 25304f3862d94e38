"""Request ids, the access log, the log formats, and the reaper's log of the leases it ends."""

from __future__ import annotations

import asyncio
import json
import logging
import logging.config
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from slotkeeper.api.access import new_request_id
from slotkeeper.api.app import create_app
from slotkeeper.logs import REQUEST_ID, JsonFormatter, TextFormatter, log_config
from slotkeeper.settings import Settings
from slotkeeper.storage import Storage
from tests.conftest import FakeClock

V2 = "/v2/concurrency_limits"


@pytest.fixture
async def logged(storage: Storage, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(home=tmp_path, access_log=True, reaper_interval_seconds=0.05), storage=storage)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("10.0.0.7", 5555))
        async with httpx.AsyncClient(transport=transport, base_url="http://test/api") as http:
            yield http


async def test_a_request_id_is_echoed_or_made(logged: httpx.AsyncClient) -> None:
    given = await logged.get("/health", headers={"X-Request-ID": "trace-42"})
    assert given.headers["X-Request-ID"] == "trace-42"
    made = [(await logged.get("/health")).headers["X-Request-ID"] for _ in range(2)]
    assert made[0] != made[1] and all(made)
    for unusable in ("", "has space", "x" * 129):
        answer = await logged.get("/health", headers={"X-Request-ID": unusable})
        assert answer.headers["X-Request-ID"] not in ("", unusable)
    # On the hot path and on a refusal too.
    answer = await logged.post(f"{V2}/increment-with-lease", json={}, headers={"X-Request-ID": "hot-1"})
    assert answer.status_code == 422 and answer.headers["X-Request-ID"] == "hot-1"


async def test_the_access_log_has_one_line_per_request_with_its_id(
    logged: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="slotkeeper.access"):
        await logged.post(f"{V2}/", json={"name": "db", "limit": 1}, headers={"X-Request-ID": "create-1"})
        await logged.get(f"{V2}/nope?x=1", headers={"X-Request-ID": "read-2"})
    lines = [r for r in caplog.records if r.name == "slotkeeper.access"]
    assert [(r.method, r.path, r.status) for r in lines] == [  # type: ignore[attr-defined]
        ("POST", "/api/v2/concurrency_limits/", 201),
        ("GET", "/api/v2/concurrency_limits/nope?x=1", 404),
    ]
    assert '10.0.0.7:5555 "POST /api/v2/concurrency_limits/ HTTP/1.1" 201' in lines[0].getMessage()
    formatted = [json.loads(JsonFormatter().format(r)) for r in lines]
    assert formatted[0]["logger"] == "slotkeeper.access"
    assert formatted[0]["status"] == 201 and formatted[0]["duration_ms"] >= 0


async def test_lines_logged_while_handling_a_request_carry_its_id(
    logged: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str | None] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(REQUEST_ID.get())

    handler = Capture()
    logging.getLogger("slotkeeper.access").addHandler(handler)
    try:
        with caplog.at_level(logging.INFO, logger="slotkeeper.access"):
            await logged.get("/health", headers={"X-Request-ID": "ctx-7"})
    finally:
        logging.getLogger("slotkeeper.access").removeHandler(handler)
    assert seen == ["ctx-7"]
    assert REQUEST_ID.get() is None


def test_the_formats() -> None:
    record = logging.LogRecord("slotkeeper.x", logging.WARNING, __file__, 1, "hello %s", ("you",), None)
    record.limit = "db"
    token = REQUEST_ID.set("abc")
    try:
        line = json.loads(JsonFormatter().format(record))
        text = TextFormatter("%(levelprefix)s %(message)s", use_colors=False).format(record)
    finally:
        REQUEST_ID.reset(token)
    assert line["message"] == "hello you" and line["level"] == "warning" and line["limit"] == "db"
    assert line["request_id"] == "abc" and line["logger"] == "slotkeeper.x" and "time" in line
    assert text.endswith("hello you [abc]")
    without = TextFormatter("%(levelprefix)s %(message)s", use_colors=False).format(record)
    assert not without.endswith("]")
    for fmt in ("text", "json"):
        logging.config.dictConfig(log_config("info", fmt))  # valid configurations
    logging.config.dictConfig(log_config("warning", "text"))


def test_request_ids_are_unique() -> None:
    assert len({new_request_id() for _ in range(1000)}) == 1000


async def test_the_reaper_logs_each_lease_it_ends_with_its_limit_and_holder(
    logged: httpx.AsyncClient, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    await logged.post(f"{V2}/", json={"name": "db", "limit": 1})
    holder = {"type": "task_run", "id": "3f0c9a52-6d7e-4f3b-8a51-0d3c1c2b9e11"}
    body = {"names": ["db"], "slots": 1, "lease_duration": 60, "holder": holder}
    assert (await logged.post(f"{V2}/increment-with-lease", json=body)).status_code == 200
    with caplog.at_level(logging.INFO, logger="slotkeeper.reaper"):
        clock.advance(61)
        for _ in range(6000):  # bounded: a broken reaper fails instead of hanging
            if any(r.name == "slotkeeper.reaper" for r in caplog.records):
                break
            await asyncio.sleep(0.005)
    (line,) = [r for r in caplog.records if r.name == "slotkeeper.reaper"]
    assert line.limit == "db"  # type: ignore[attr-defined]
    assert line.holder == f"prefect.task-run.{holder['id']}"  # type: ignore[attr-defined]
    assert "lease expired: limit 'db'" in line.getMessage()
