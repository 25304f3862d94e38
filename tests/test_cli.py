"""The ``slotkeeper`` command line.

Acceptance tier (``slow``): one real server process, started with ``slotkeeper server start``
(with basic auth on), shared by the module and driven by the CLI. The other tests need no server:
argument checks that fail before any request, an unreachable server, ``server start`` with
its uvicorn server replaced, ``db upgrade`` on a temporary SQLite file.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from typer.testing import CliRunner

from slotkeeper import cli, storage
from slotkeeper.api import server as server_module
from slotkeeper.api.protocol import HttpToolsProtocol
from slotkeeper.cli import app, expires, redact_url, relative_time
from slotkeeper.storage import migrate
from tests.conftest import SLOTKEEPER, ServerProcess, clean_env, free_port

AUTH = "admin:s3cret"


def run(*args: str, auth: str | None = AUTH, input: str | None = None) -> Result:
    """Run the CLI in this process, with only the given auth from the environment."""
    env: dict[str, str | None] = {
        "SLOTKEEPER_API_URL": None,
        "SLOTKEEPER_API_AUTH_STRING": auth,
        "FORCE_COLOR": None,
        "TTY_COMPATIBLE": None,
    }
    return CliRunner().invoke(app, list(args), env=env, input=input)


# --- the server process ---------------------------------------------------------------------------


class Server(ServerProcess):
    """The module's server (basic auth on), driven by the CLI."""

    def cli(self, *args: str, auth: str | None = AUTH, input: str | None = None) -> Result:
        """Run the CLI against this server."""
        return run("--api-url", self.url, *args, auth=auth, input=input)

    def post(self, path: str, body: Any) -> Any:
        """A direct JSON POST to the API (with auth), for what the CLI does not do."""
        status, answer = self.call("POST", path, body)
        assert status in (200, 201), answer
        return answer


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One real server on SQLite under a temporary SLOTKEEPER_HOME, for the whole module."""
    with Server(tmp_path_factory.mktemp("home"), SLOTKEEPER_API_AUTH_STRING=AUTH) as running:
        yield running


def _created_id(result: Result, name: str) -> str:
    match = re.fullmatch(
        rf"Created global concurrency limit with name '{re.escape(name)}' and ID '([0-9a-f-]{{36}})'\. "
        rf"Run `slotkeeper limit inspect {re.escape(name)}` to view details\.\n",
        result.stdout,
    )
    assert match, result.stdout
    return match.group(1)


def _ok(result: Result, stdout: str | None = None) -> Result:
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert result.stderr == ""
    if stdout is not None:
        assert result.stdout == stdout + "\n"
    return result


def _error(result: Result, message: str) -> None:
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert result.stderr == message + "\n"
    assert result.stdout == ""


@pytest.mark.slow
def test_server_prints_where_it_listens(server: Server) -> None:
    banner = server.log.read_text()
    assert f"listening on {server.url}" in banner
    assert f"Database: sqlite:///{server.home / 'slotkeeper.db'}" in banner
    assert (server.home / "slotkeeper.db").exists()


@pytest.mark.slow
def test_limit_lifecycle(server: Server) -> None:
    name = "flow-db"
    limit_id = _created_id(_ok(server.cli("limit", "create", name, "--limit", "2")), name)

    _error(
        server.cli("limit", "create", name, "-l", "5"),
        f"Global concurrency limit '{name}' already exists. Please try creating with a different name.",
    )

    table = _ok(server.cli("limit", "ls")).stdout
    assert "Global Concurrency Limits" in table
    row = next(line for line in table.splitlines() if limit_id in line)
    assert re.search(rf"{limit_id} │ {name} +│ True +│ +2 │ +0 │ +0\.0 │", row), row
    assert "List Global Concurrency Limits using `slotkeeper limit ls`" in table
    listed = json.loads(_ok(server.cli("limit", "ls", "-o", "json")).stdout)
    (mine,) = [lim for lim in listed if lim["name"] == name]
    assert mine["id"] == limit_id
    assert (mine["limit"], mine["active"], mine["active_slots"], mine["slot_decay_per_second"]) == (
        2,
        True,
        0,
        0.0,
    )

    shown = _ok(server.cli("limit", "inspect", name)).stdout
    assert f"Global concurrency limit '{name}'" in shown
    assert re.search(rf"│ id +│ {limit_id} +│", shown), shown
    inspected = json.loads(_ok(server.cli("gcl", "inspect", name, "--output", "json")).stdout)
    assert inspected == mine

    _ok(
        server.cli("limit", "update", name, "--limit", "3", "--slot-decay-per-second", "0.5"),
        f"Updated global concurrency limit with name '{name}'.",
    )
    updated = json.loads(_ok(server.cli("limit", "inspect", name, "-o", "json")).stdout)
    assert (updated["limit"], updated["slot_decay_per_second"]) == (3, 0.5)

    _ok(server.cli("limit", "disable", name), f"Disabled global concurrency limit with name '{name}'.")
    _error(
        server.cli("limit", "disable", name),
        f"Global concurrency limit with name '{name}' is already disabled.",
    )
    assert json.loads(server.cli("limit", "inspect", name, "-o", "json").stdout)["active"] is False
    _ok(server.cli("gcl", "enable", name), f"Enabled global concurrency limit with name '{name}'.")
    _error(
        server.cli("limit", "enable", name),
        f"Global concurrency limit with name '{name}' is already enabled.",
    )
    _ok(server.cli("limit", "update", name, "--disable"))
    _ok(server.cli("limit", "update", name, "--enable"))
    assert json.loads(server.cli("limit", "inspect", name, "-o", "json").stdout)["active"] is True

    _ok(server.cli("limit", "leases", name), f"No live leases on global concurrency limit '{name}'.")
    assert json.loads(_ok(server.cli("limit", "leases", name, "-o", "json")).stdout) == []
    holder = {"type": "task_run", "id": str(uuid.uuid4())}
    granted = server.post(
        "/v2/concurrency_limits/increment-with-lease",
        {"names": [name], "slots": 2, "lease_duration": 600, "holder": holder},
    )
    leases = json.loads(_ok(server.cli("limit", "leases", name, "-o", "json")).stdout)
    assert [(lease["lease_id"], lease["holder"], lease["slots"]) for lease in leases] == [
        (granted["lease_id"], holder, 2)
    ]
    assert leases[0]["fencing_token"] == granted["limits"][0]["fencing_token"]
    assert datetime.fromisoformat(leases[0]["expires"]) > datetime.fromisoformat(leases[0]["created"])
    lease_table = _ok(server.cli("limit", "leases", name)).stdout
    assert f"Leases on global concurrency limit '{name}'" in lease_table
    row = next(line for line in lease_table.splitlines() if granted["lease_id"] in line)
    assert f"task_run {holder['id']}" in row
    assert re.search(r"│ in \d+ minutes +│", row), row  # expiry, read as a human would
    assert json.loads(server.cli("limit", "inspect", name, "-o", "json").stdout)["active_slots"] == 2

    # The server refuses to forget live holders; the CLI shows why.
    result = server.cli("limit", "update", name, "--active-slots", "0")
    assert result.exit_code == 1
    assert result.stderr.startswith(
        "Error updating global concurrency limit: active_slots cannot be set to 0: live leases hold 2"
    )

    _ok(server.cli("limit", "delete", name), f"Deleted global concurrency limit with name '{name}'.")
    _error(server.cli("limit", "inspect", name), f"Global concurrency limit '{name}' not found.")
    assert name not in [lim["name"] for lim in json.loads(server.cli("limit", "ls", "-o", "json").stdout)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [
        ["inspect", "missing"],
        ["inspect", "missing", "-o", "json"],
        ["update", "missing", "--limit", "1"],
        ["delete", "missing", "--yes"],
        ["enable", "missing"],
        ["disable", "missing"],
        ["leases", "missing"],
    ],
)
def test_missing_limit(server: Server, command: list[str]) -> None:
    _error(server.cli("limit", *command), "Global concurrency limit 'missing' not found.")


@pytest.mark.slow
def test_invalid_arguments_show_the_server_reason(server: Server) -> None:
    _error(
        server.cli("limit", "create", "a/b", "-l", "-1"),
        "Invalid arguments provided: name: String should match pattern '^[^/%&><]+$'; "
        "limit: Input should be greater than or equal to 0",
    )
    _ok(server.cli("limit", "create", "bounded", "-l", "1"))
    _error(
        server.cli("limit", "update", "bounded", "--slot-decay-per-second", "-2"),
        "Error updating global concurrency limit: "
        "slot_decay_per_second: Input should be greater than or equal to 0",
    )
    _ok(server.cli("limit", "delete", "bounded"))


@pytest.mark.slow
def test_what_a_new_user_tried_is_told_plainly(server: Server) -> None:
    # Each of these printed a traceback, or answered "done" having done nothing (issue 12).
    too_big = "99999999999999999999"
    _error(
        server.cli("limit", "create", "huge", "-l", too_big),
        "Invalid arguments provided: limit: Input should be less than or equal to 2147483647",
    )
    _error(
        server.cli("tag-limit", "create", "t", "--limit", too_big),
        "Invalid arguments provided: concurrency_limit: Input should be less than or equal to 2147483647",
    )
    _ok(server.cli("limit", "create", "plain", "-l", "5"))
    for value in ("nan", "inf", "-inf"):
        for argv in (["update", "plain"], ["create", "rate", "-l", "1"]):
            result = server.cli("limit", *argv, "--slot-decay-per-second", value)
            assert result.exit_code == 2, (argv, value)
            assert f"Invalid value for '--slot-decay-per-second': {value} is not a finite number." in (
                result.stderr
            )
    assert (
        json.loads(server.cli("limit", "inspect", "plain", "-o", "json").stdout)["slot_decay_per_second"] == 0
    )
    _error(
        server.cli("limit", "create", " ", "-l", "1"),
        "Invalid arguments provided: name: Value error, a name must not be blank (only whitespace)",
    )
    _error(
        server.cli("limit", "create", "over", "-l", "5", "--active-slots", "99"),
        "Invalid arguments provided: active_slots cannot be set to 99: the limit is 5",
    )
    _error(
        server.cli("limit", "update", "plain", "--active-slots", "99"),
        "Error updating global concurrency limit: active_slots cannot be set to 99: the limit is 5",
    )
    deprecated = server.cli("tag-limit", "create", "old-form", "2")
    assert deprecated.exit_code == 0
    assert deprecated.stderr == cli.POSITIONAL_LIMIT_DEPRECATED + "\n"
    assert deprecated.stdout.startswith("Created concurrency limit with properties:\n    tag - 'old-form'\n")
    root = server.url.removesuffix("/api")
    for argv in (["limit", "ls"], ["limit", "inspect", "plain"], ["tag-limit", "inspect", "old-form"]):
        _error(
            run("--api-url", root, *argv),
            f"The server at {root} has no such path (HTTP 404): its API is under /api. "
            f"Did you mean --api-url {root}/api ?",
        )
    _error(
        run("--api-url", server.url + "/v2", "tag-limit", "ls"),
        f"The server at {server.url}/v2 answered in a shape this command does not know (it reads id, "
        "tag, concurrency_limit, active_slots, created, updated): is --api-url the /api of a slotkeeper "
        "server?",
    )
    _ok(server.cli("limit", "delete", "plain"))
    _ok(server.cli("tag-limit", "delete", "old-form"))


@pytest.mark.slow
def test_names_print_as_typed(server: Server) -> None:
    name = "[bold]odd name? #1"
    result = _ok(server.cli("limit", "create", name, "-l", "1", "--disable"))
    assert result.stdout.startswith(f"Created global concurrency limit with name '{name}' and ID '")
    assert result.stdout.endswith("Run `slotkeeper limit inspect '[bold]odd name? #1'` to view details.\n")
    assert f"│ name                  │ {name} " in _ok(server.cli("limit", "inspect", name)).stdout
    assert json.loads(server.cli("limit", "inspect", name, "-o", "json").stdout)["active"] is False
    _ok(server.cli("limit", "delete", name, "-y"))


@pytest.mark.slow
def test_delete_asks_on_a_terminal(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    _ok(server.cli("limit", "create", "precious", "-l", "1"))
    monkeypatch.setattr(cli, "_interactive", lambda: True)
    question = "Are you sure you want to delete global concurrency limit with name 'precious'? [y/N]: "
    kept = server.cli("limit", "delete", "precious", input="n\n")
    assert kept.exit_code == 1
    assert kept.stdout == question + "n\n"  # CliRunner echoes the answer
    assert kept.stderr == "Deletion aborted.\n"
    assert server.cli("limit", "inspect", "precious").exit_code == 0

    gone = server.cli("limit", "delete", "precious", input="y\n")
    assert gone.exit_code == 0
    assert gone.stdout == question + "y\nDeleted global concurrency limit with name 'precious'.\n"
    _error(
        server.cli("limit", "delete", "precious", input="y\n"),
        "Global concurrency limit 'precious' not found.",
    )


@pytest.mark.slow
def test_inspect_writes_a_file(server: Server, tmp_path: Path) -> None:
    _ok(server.cli("limit", "create", "exported", "-l", "4"))
    target = tmp_path / "exported.json"
    _ok(
        server.cli("limit", "inspect", "exported", "-o", "json", "-f", str(target)),
        f"Global concurrency limit 'exported' written to {target}",
    )
    assert json.loads(target.read_text())["limit"] == 4
    _ok(server.cli("limit", "delete", "exported"))


@pytest.mark.slow
def test_auth_is_required(server: Server) -> None:
    _error(
        server.cli("limit", "ls", auth=None),
        f"The server at {server.url} refused the request (401 Unauthorized): set "
        "SLOTKEEPER_API_AUTH_STRING to its auth string ('user:password').",
    )
    assert server.cli("limit", "ls", auth="admin:wrong").exit_code == 1


@pytest.mark.slow
def test_console_script_streams_and_exit_codes(server: Server) -> None:
    _ok(server.cli("gcl", "create", "scripted", "-l", "7"))
    env = clean_env(SLOTKEEPER_API_URL=server.url, SLOTKEEPER_API_AUTH_STRING=AUTH)
    listed = subprocess.run(
        [*SLOTKEEPER, "limit", "ls", "-o", "json"], env=env, capture_output=True, text=True
    )
    assert listed.returncode == 0, listed.stderr
    assert listed.stderr == ""
    assert "\x1b" not in listed.stdout  # plain JSON, no colour codes
    assert {lim["name"]: lim["limit"] for lim in json.loads(listed.stdout)}["scripted"] == 7
    missing = subprocess.run(
        [*SLOTKEEPER, "limit", "inspect", "nope"], env=env, capture_output=True, text=True
    )
    assert (missing.returncode, missing.stdout) == (1, "")
    assert missing.stderr == "Global concurrency limit 'nope' not found.\n"
    _ok(server.cli("limit", "delete", "scripted"))


# --- without a server -----------------------------------------------------------------------------


def test_unreachable_server_names_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}/api"
    for command in (["limit", "ls"], ["gcl", "inspect", "db"], ["limit", "create", "db", "-l", "1"]):
        result = run("--api-url", url, *command)
        assert result.exit_code == 1
        assert result.stdout == ""
        assert result.stderr.startswith(f"Could not reach {url}: ")
        assert "Is the slotkeeper server running? Start it with `slotkeeper server start`" in result.stderr


def test_api_url_from_the_environment() -> None:
    url = f"http://127.0.0.1:{free_port()}/api"
    result = CliRunner().invoke(app, ["limit", "ls"], env={"SLOTKEEPER_API_URL": url})
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Could not reach {url}: ")


def test_malformed_api_url() -> None:
    _error(
        run("--api-url", "localhost:4200", "limit", "ls"),
        "Not an API URL: 'localhost:4200' (expected http://HOST:PORT/api)",
    )


@pytest.mark.parametrize("command", [["ls"], ["inspect", "db"], ["leases", "db"]])
def test_only_json_output(command: list[str]) -> None:
    _error(run("limit", *command, "-o", "yaml"), "Only 'json' output format is supported.")


def test_argument_checks_before_any_request() -> None:
    _error(
        run("limit", "update", "db", "--enable", "--disable"),
        "Cannot enable and disable a global concurrency limit at the same time.",
    )
    _error(run("limit", "update", "db"), "No update arguments provided.")
    _error(
        run("limit", "inspect", "db", "-f", "out.json"),
        "The --file/-f option requires the --output option to be set.",
    )


def test_usage_errors_exit_2() -> None:
    assert run("limit", "create", "db").exit_code == 2  # --limit is required
    assert run("limit", "create", "db", "-l", "many").exit_code == 2


def test_server_start_runs_uvicorn_as_configured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(server_module.Server, "run", lambda self: calls.append(self))
    migrated: list[str] = []
    monkeypatch.setattr(storage, "migrate", lambda url: migrated.append(url) or ("0001", "0001"))
    env = {
        "SLOTKEEPER_HOME": str(tmp_path),
        "SLOTKEEPER_DATABASE_URL": "postgresql://slot:hunter2@db.internal:5432/slots",
        "SLOTKEEPER_PORT": "4999",
        "SLOTKEEPER_SHUTDOWN_GRACE_SECONDS": "7.5",
    }
    result = CliRunner().invoke(
        app, ["server", "start", "--host", "0.0.0.0", "--log-level", "DEBUG"], env=env
    )
    assert result.exit_code == 0, result.output
    assert "hunter2" not in result.output
    assert result.stdout.splitlines()[:2] == [
        f"Starting slotkeeper {cli.__version__}, listening on http://0.0.0.0:4999/api",
        "Database: postgresql://slot:***@db.internal:5432/slots",
    ]
    (started,) = calls
    assert migrated == ["postgresql://slot:hunter2@db.internal:5432/slots"]  # before uvicorn starts
    config = started.config
    assert started.app.state.settings.port == 4999
    assert (config.host, config.port, config.loop, config.http, config.access_log, config.lifespan) == (
        "0.0.0.0",
        4999,
        "uvloop",
        HttpToolsProtocol,  # httptools, with a lost connection seen at once (api/protocol.py)
        False,
        "on",
    )
    assert config.log_level == "debug"
    assert config.timeout_graceful_shutdown == 7.5
    assert config.log_config["loggers"]["slotkeeper"]["level"] == "DEBUG"


def test_server_start_refuses_bad_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module.Server, "run", lambda self: pytest.fail("must not start"))
    result = CliRunner().invoke(app, ["server", "start"], env={"SLOTKEEPER_LEASE_MIN_SECONDS": "-1"})
    assert result.exit_code == 1
    assert result.stderr.startswith("Invalid settings")
    assert CliRunner().invoke(app, ["server", "start", "--port", "70000"]).exit_code == 2


def test_server_start_refuses_what_uvicorn_would_fail_on(monkeypatch: pytest.MonkeyPatch) -> None:
    # Told in one line, before uvicorn starts (whose lifespan would print a traceback).
    monkeypatch.setattr(server_module.Server, "run", lambda self: pytest.fail("must not start"))
    url = f"postgresql://slot:hunter2@127.0.0.1:{free_port()}/slots?connect_timeout=2"
    result = CliRunner().invoke(app, ["server", "start"], env={"SLOTKEEPER_DATABASE_URL": url})
    assert result.exit_code == 1
    assert result.stderr.startswith("Could not open the database at postgresql://slot:***@127.0.0.1:")
    for host in ["a..b", "\udcff"]:
        result = CliRunner().invoke(app, ["server", "start", "--host", host])
        assert result.exit_code == 1
        assert result.stderr.startswith(f"Cannot listen on {cli.printable(repr(host))}: not a host name")


def test_an_unexpected_error_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(**kwargs: Any) -> None:
        raise KeyError("tag")

    monkeypatch.setattr(cli, "app", broken)
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert (
        err
        == "slotkeeper: unexpected error: KeyError('tag'). This is a bug in slotkeeper; please report it.\n"
    )


def test_db_upgrade_says_what_it_did(tmp_path: Path) -> None:
    env = {"SLOTKEEPER_HOME": str(tmp_path / "home"), "SLOTKEEPER_DATABASE_URL": None}
    db = tmp_path / "home" / "slotkeeper.db"
    created = CliRunner().invoke(app, ["db", "upgrade"], env=env)
    assert created.exit_code == 0, created.output
    head = re.fullmatch(
        rf"Created the schema of sqlite:///{re.escape(str(db))} \(revision (\w+)\)\.\n", created.stdout
    )
    assert head, created.stdout
    assert db.exists()
    again = CliRunner().invoke(app, ["db", "upgrade"], env=env)
    assert again.exit_code == 0
    assert again.stdout == f"Database sqlite:///{db} is already up to date (revision {head.group(1)}).\n"

    older = tmp_path / "older.db"
    assert migrate(f"sqlite:///{older}", "0001") == (None, "0001")
    upgraded = CliRunner().invoke(
        app, ["db", "upgrade"], env={**env, "SLOTKEEPER_DATABASE_URL": f"sqlite:///{older}"}
    )
    assert upgraded.stdout == f"Upgraded sqlite:///{older} from revision 0001 to {head.group(1)}.\n"


def test_db_upgrade_failure_hides_the_password() -> None:
    url = f"postgresql://slot:hunter2@127.0.0.1:{free_port()}/slots?connect_timeout=2"
    result = CliRunner().invoke(app, ["db", "upgrade"], env={"SLOTKEEPER_DATABASE_URL": url})
    assert result.exit_code == 1
    assert result.stderr.startswith("Could not upgrade the database at postgresql://slot:***@127.0.0.1:")
    assert "hunter2" not in result.output


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:p%40ss@h:5432/d", "postgresql://u:***@h:5432/d"),
        ("postgresql+psycopg://u@h/d", "postgresql+psycopg://u@h/d"),
        (
            "postgresql://h/d?user=u&password=x&sslmode=require",
            "postgresql://h/d?user=u&password=***&sslmode=require",
        ),
        ("sqlite:////var/lib/slotkeeper/a@b.db", "sqlite:////var/lib/slotkeeper/a@b.db"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_expires() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert expires("2026-01-01T12:05:00.000000Z", now) == "in 5 minutes"
    assert expires("2126-01-01T12:00:00.000000Z", now) == "never"  # a v1 hold: 100 years
    assert expires("2030-01-01T12:00:00.000000Z", now) == "in 1461 days"
    assert expires("not a time", now) == "not a time"


def test_relative_time() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert relative_time("2026-01-01T12:00:00.000000Z", now) == "just now"
    assert relative_time("2026-01-01T11:59:59.000000Z", now) == "1 second ago"
    assert relative_time("2026-01-01T11:57:00.000000Z", now) == "3 minutes ago"
    assert relative_time("2026-01-01T14:00:00.000000Z", now) == "in 2 hours"
    assert relative_time("2025-12-30T12:00:00.000000Z", now) == "2 days ago"
    assert relative_time("not a time", now) == "not a time"


# --- tag-limit (tag-based, v1) ----------------------------------------------------------------------


def _no_tag(tag: str) -> str:
    return f"No concurrency limit found for the tag: {tag}"


@pytest.mark.slow
def test_tag_limit_lifecycle(server: Server) -> None:
    tag = "etl db"
    created = _ok(server.cli("tag-limit", "create", tag, "--limit", "2")).stdout
    assert created == (
        "Created concurrency limit with properties:\n"
        "    tag - 'etl db'\n"
        "    concurrency_limit - 2\n\n"
        "Delete the concurrency limit:\n"
        "    slotkeeper tag-limit delete 'etl db'\n\n"
        "Inspect the concurrency limit:\n"
        "    slotkeeper tag-limit inspect 'etl db'\n"
    )
    assert _ok(server.cli("tag-limit", "create", tag, "-l", "3")).stdout.startswith(
        "Updated concurrency limit with properties:\n    tag - 'etl db'\n    concurrency_limit - 3\n"
    )
    inspected = json.loads(_ok(server.cli("tag-limit", "inspect", tag, "-o", "json")).stdout)
    assert (inspected["tag"], inspected["concurrency_limit"], inspected["active_slots"]) == (tag, 3, [])
    # It is the global limit "tag:<tag>".
    assert (
        json.loads(server.cli("limit", "inspect", f"tag:{tag}", "-o", "json").stdout)["id"] == inspected["id"]
    )

    runs = sorted(str(uuid.uuid4()) for _ in range(2))
    for run in reversed(runs):
        held = server.post("/concurrency_limits/increment", {"names": [tag], "task_run_id": run})
        assert held == [{"id": inspected["id"], "name": tag, "limit": 3}]
    shown = _ok(server.cli("tag-limit", "inspect", tag)).stdout
    assert f"Concurrency Limit ID: {inspected['id']}" in shown
    assert re.search(rf"│ {tag} +│ +3 │ .* │ .* │", shown), shown
    assert "Active Task Run IDs" in shown
    assert shown.index(runs[0]) < shown.index(runs[1])  # sorted

    listed = json.loads(_ok(server.cli("tag-limit", "ls", "-o", "json")).stdout)
    (mine,) = [lim for lim in listed if lim["tag"] == tag]
    assert sorted(mine["active_slots"]) == runs
    table = _ok(server.cli("tag-limit", "ls")).stdout
    assert "Concurrency Limits" in table
    assert "inspect a concurrency limit to show active task run IDs" in table
    row = next(line for line in table.splitlines() if inspected["id"] in line)
    assert re.search(rf"│ {tag} +│ {inspected['id']} │ +3 │ +2 │", row), row

    holders = json.loads(_ok(server.cli("tag-limit", "holders", tag, "-o", "json")).stdout)
    assert sorted(h["holder"]["id"] for h in holders) == runs
    assert {h["holder"]["type"] for h in holders} == {"task_run"}
    holder_table = _ok(server.cli("tag-limit", "holders", tag)).stdout
    assert f"Holders of the tag '{tag}'" in holder_table
    row = next(line for line in holder_table.splitlines() if runs[0] in line)
    assert re.search(r"│ +(just now|\d+ seconds?) │ +1 │ never +│", row), row  # a v1 hold

    _ok(server.cli("tag-limit", "reset", tag), f"Reset concurrency limit set on the tag: {tag}")
    assert json.loads(server.cli("tag-limit", "inspect", tag, "-o", "json").stdout)["active_slots"] == []
    _ok(server.cli("tag-limit", "holders", tag), f"Nobody holds the tag: {tag}")
    assert json.loads(_ok(server.cli("tag-limit", "holders", tag, "-o", "json")).stdout) == []

    _ok(server.cli("tag-limit", "delete", tag), f"Deleted concurrency limit set on the tag: {tag}")
    _error(server.cli("tag-limit", "inspect", tag), _no_tag(tag))
    assert tag not in [lim["tag"] for lim in json.loads(server.cli("tag-limit", "ls", "-o", "json").stdout)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [
        ["inspect", "missing"],
        ["inspect", "missing", "-o", "json"],
        ["reset", "missing"],
        ["delete", "missing", "--yes"],
        ["holders", "missing"],
    ],
)
def test_missing_tag_limit(server: Server, command: list[str]) -> None:
    _error(server.cli("tag-limit", *command), _no_tag("missing"))


@pytest.mark.slow
def test_tag_limit_ls_pages_and_orders_by_update(server: Server) -> None:
    tags = ["page-a", "page-b", "page-c"]
    for tag in tags:
        _ok(server.cli("tag-limit", "create", tag, "--limit", "1"))
    _ok(server.cli("tag-limit", "create", "page-a", "--limit", "4"))  # now the most recently updated
    page = json.loads(_ok(server.cli("tag-limit", "ls", "--limit", "200", "-o", "json")).stdout)
    mine = [lim["tag"] for lim in page if lim["tag"].startswith("page-")]
    assert mine == ["page-a", "page-c", "page-b"]
    # --limit/--offset page over tag limits ordered by tag, plain limits never in the way.
    everything = json.loads(server.cli("tag-limit", "ls", "--limit", "200", "-o", "json").stdout)
    by_tag = sorted(lim["tag"] for lim in everything)
    index = by_tag.index("page-b")
    window = json.loads(
        _ok(server.cli("tag-limit", "ls", "--limit", "1", "--offset", str(index), "-o", "json")).stdout
    )
    assert [lim["tag"] for lim in window] == ["page-b"]
    _error(
        server.cli("tag-limit", "create", "a/b", "--limit", "1"),
        "Invalid arguments provided: tag: String should match pattern '^[^/%&><]+$'",
    )
    for tag in tags:
        _ok(server.cli("tag-limit", "delete", tag, "-y"))


@pytest.mark.slow
def test_tag_limit_delete_asks_on_a_terminal(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    _ok(server.cli("tag-limit", "create", "kept", "--limit", "1"))
    monkeypatch.setattr(cli, "_interactive", lambda: True)
    question = "Are you sure you want to delete concurrency limit with tag 'kept'? [y/N]: "
    kept = server.cli("tag-limit", "delete", "kept", input="n\n")
    assert (kept.exit_code, kept.stdout, kept.stderr) == (1, question + "n\n", "Deletion aborted.\n")
    gone = server.cli("tag-limit", "delete", "kept", input="y\n")
    assert gone.exit_code == 0
    assert gone.stdout == question + "y\nDeleted concurrency limit set on the tag: kept\n"
    _error(server.cli("tag-limit", "delete", "kept", input="y\n"), _no_tag("kept"))


@pytest.mark.parametrize("command", [["ls"], ["inspect", "db"], ["holders", "db"]])
def test_tag_limit_only_json_output(command: list[str]) -> None:
    _error(run("tag-limit", *command, "-o", "yaml"), "Only 'json' output format is supported.")


def test_tag_limit_usage_errors_exit_2() -> None:
    assert run("tag-limit", "create", "db").exit_code == 2  # --limit is required
    assert run("tag-limit", "create", "db", "--limit", "many").exit_code == 2
    assert run("tag-limit", "create", "db", "many").exit_code == 2
    given_twice = run("tag-limit", "create", "db", "2", "--limit", "2")
    assert given_twice.exit_code == 2
    assert "give the size once, as --limit N" in given_twice.stderr
    # Negative sizes are refused for their value, in either form (not "No such option: -1").
    for argv in (["db", "-1"], ["db", "--limit", "-1"], ["db", "-l", "-1"]):
        refused = run("tag-limit", "create", *argv)
        assert refused.exit_code == 2, argv
        assert "No such option" not in refused.stderr
        said = " ".join(refused.stderr.replace("│", " ").split())  # unwrapped from its panel
        assert "greater than or equal to 0" in said, said
    assert run("tag-limit", "ls", "--limit", "-1").exit_code == 2


def test_held_for() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert cli.held_for("2026-01-01T11:57:00.000000Z", now) == "3 minutes"
    assert cli.held_for("2026-01-01T12:00:00.000000Z", now) == "just now"
