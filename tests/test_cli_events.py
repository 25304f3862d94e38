"""``slotkeeper --version``, ``events ls``, ``events tail`` and ``limit top`` against a real server.

One server process (basic auth on, so the websocket's token is exercised) for the module.
``events tail`` runs as a process of its own, stopped as a person stops it: SIGINT (Ctrl-C),
restored in the child so that it works when this suite itself runs with SIGINT ignored.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import Result

from slotkeeper import __version__
from slotkeeper.cli_events import event_filter, parse_time
from tests.conftest import SLOTKEEPER, ServerProcess, clean_env
from tests.test_cli import AUTH, run

pytestmark = pytest.mark.slow

V2 = "/v2/concurrency_limits"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("home"), SLOTKEEPER_API_AUTH_STRING=AUTH) as running:
        yield running


def cli(server: ServerProcess, *args: str) -> Result:
    result = run("--api-url", server.url, *args)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result


def grant(server: ServerProcess, name: str) -> str:
    status, body = server.call("POST", f"{V2}/increment-with-lease", {"names": [name], "slots": 1})
    assert status == 200, body
    lease_id: str = body["lease_id"]
    return lease_id


def release(server: ServerProcess, lease_id: str) -> None:
    assert server.call("POST", f"{V2}/decrement-with-lease", {"lease_id": lease_id})[0] == 204


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0
    assert result.stdout == f"slotkeeper {__version__}\n"


def test_events_ls_filters_by_limit_name_and_time(server: ServerProcess) -> None:
    assert server.call("POST", f"{V2}/", {"name": "ls-db", "limit": 2})[0] == 201
    assert server.call("POST", f"{V2}/", {"name": "ls-other", "limit": 2})[0] == 201
    release(server, grant(server, "ls-db"))
    grant(server, "ls-other")

    events = json.loads(cli(server, "events", "ls", "--limit", "ls-db", "-o", "json").stdout)
    assert [e["event"].rsplit(".", 1)[-1] for e in events] == ["created", "acquired", "released"]
    assert {e["resource"]["prefect.resource.name"] for e in events} == {"ls-db"}

    released = json.loads(cli(server, "events", "ls", "-l", "ls-db", "-e", "released", "-o", "json").stdout)
    assert [e["event"] for e in released] == ["prefect.concurrency-limit.released"]
    newest = json.loads(cli(server, "events", "ls", "-e", "acquired", "-n", "1", "-o", "json").stdout)
    assert [e["resource"]["prefect.resource.name"] for e in newest] == ["ls-other"]
    assert json.loads(cli(server, "events", "ls", "--until", "1d", "-o", "json").stdout) == []

    table = cli(server, "events", "ls", "--limit", "ls-db").stdout
    assert "acquired" in table and "released" in table and "ls-db" in table
    bad = run("--api-url", server.url, "events", "ls", "--since", "yesterday-ish")
    assert bad.exit_code == 2 and "neither an ISO-8601 time" in bad.stderr


def test_events_tail_prints_each_event_live_until_ctrl_c(server: ServerProcess) -> None:
    assert server.call("POST", f"{V2}/", {"name": "tail-db", "limit": 1})[0] == 201
    env = clean_env(SLOTKEEPER_API_URL=server.url, SLOTKEEPER_API_AUTH_STRING=AUTH, PYTHONUNBUFFERED="1")
    tail = subprocess.Popen(
        [*SLOTKEEPER, "events", "tail", "--limit", "tail-db", "--backfill", "-o", "json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # Ctrl-C as in a terminal
    )
    try:
        assert tail.stdout is not None
        first = json.loads(tail.stdout.readline())  # the backfill: the subscription is live now
        assert first["event"] == "prefect.concurrency-limit.created"
        release(server, grant(server, "tail-db"))
        names = [json.loads(tail.stdout.readline())["event"].rsplit(".", 1)[-1] for _ in range(2)]
        assert names == ["acquired", "released"]
        tail.send_signal(signal.SIGINT)
        assert tail.wait(timeout=30) == 0
        assert b"Traceback" not in tail.stderr.read()  # type: ignore[union-attr]
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait()
        for stream in (tail.stdout, tail.stderr):
            if stream is not None:
                stream.close()


def test_limit_top_shows_the_busiest_limits(server: ServerProcess) -> None:
    for name, limit in (("top-busy", 3), ("top-idle", 3)):
        assert server.call("POST", f"{V2}/", {"name": name, "limit": limit})[0] == 201
    grant(server, "top-busy")
    grant(server, "top-busy")
    output = cli(server, "limit", "top", "--once", "-n", "50").stdout
    lines = output.splitlines()
    busy = next(i for i, line in enumerate(lines) if "top-busy" in line)
    idle = next(i for i, line in enumerate(lines) if "top-idle" in line)
    assert busy < idle
    assert "2/3" in lines[busy] and "0/3" in lines[idle]
    assert "top-idle" not in cli(server, "limit", "top", "--once", "-n", "1").stdout


def test_parse_time_and_the_filter() -> None:
    from datetime import UTC, datetime, timedelta

    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert parse_time("90s", now) == now - timedelta(seconds=90)
    assert parse_time("2h", now) == now - timedelta(hours=2)
    assert parse_time("2026-01-01T00:00:00", now) == datetime(2026, 1, 1, tzinfo=UTC)
    found: dict[str, Any] = event_filter(["tag:x"], ["acquired", "prefect.flow-run."], None, None)
    assert found == {
        "event": {"prefix": ["prefect.concurrency-limit.acquired", "prefect.flow-run."]},
        "resource": {"labels": {"prefect.resource.name": ["tag:x", "x"]}},
    }
    assert event_filter(None, None, None, None) == {}
