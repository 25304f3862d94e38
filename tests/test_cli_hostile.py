"""Every ``slotkeeper`` command, run with hostile values: none may show a traceback.

Each command starts from a valid command line (:data:`BASELINE`); then every argument and option
it takes is given, one at a time, each hostile value of its type (huge integers, NaN and
infinities, negative numbers, empty, blank and malformed names, unwritable paths), and every
command that talks to the API is run against bad API URLs, a server that does not answer and
wrong credentials, and the database commands against database URLs, homes and settings that
cannot work. Every run must end with
exit 0, 1 (a message on stderr) or 2 (a usage error), never with an exception: the CLI runs in
this process, so an exception that would print a traceback is seen as such.

The commands are listed by hand, not discovered, so that a test fails when a command exists that
the list does not name: every new command gets its hostile run. A command that streams until
Ctrl-C (``events tail``) is given one, as a signal would: after :data:`STREAMING_SECONDS`.
"""

from __future__ import annotations

import contextlib
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.testing
from click.testing import Result
from typer.testing import CliRunner

from slotkeeper.api import server as server_module
from slotkeeper.cli import app
from tests.conftest import ServerProcess, free_port

pytestmark = pytest.mark.slow

AUTH = "admin:s3cret"
NAME = "hostile"
TAG = "hostile-tag"

#: A valid command line of every command (the gcl group is the limit group under Prefect's name:
#: the same commands, run once).
BASELINE: dict[str, list[str]] = {
    "server start": [],
    "db upgrade": [],
    "limit ls": [],
    "limit inspect": [NAME],
    "limit create": [NAME, "--limit", "1"],
    "limit update": [NAME, "--limit", "2"],
    "limit delete": [NAME, "--yes"],
    "limit enable": [NAME],
    "limit disable": [NAME],
    "limit leases": [NAME],
    "tag-limit create": [TAG, "--limit", "1"],
    "tag-limit inspect": [TAG],
    "tag-limit ls": [],
    "tag-limit reset": [TAG],
    "tag-limit delete": [TAG, "--yes"],
    "tag-limit holders": [TAG],
    "limit top": ["--once"],
    "events ls": [],
    "events tail": [],
}
#: Commands that run until Ctrl-C, and how long they are given.
STREAMING = {"events tail"}
STREAMING_SECONDS = 0.3

HOSTILE_INTS = ["99999999999999999999", "-99999999999999999999", "-1", "2147483648", "nan", "inf", "1.5", ""]
HOSTILE_FLOATS = ["nan", "inf", "-inf", "-1", "1e309", "99999999999999999999", "", "x"]
HOSTILE_TEXT = ["", " ", "\t", "yaml", "x" * 5000, "\x00", "\udcff", "💥"]
HOSTILE_NAMES = [
    *HOSTILE_TEXT,
    "a/b",
    "%2F",
    ".",
    "..",
    "-1",
    "a\nb",
    "[bold]x",
    str(uuid.uuid4()),
    "tag:",
]
HOSTILE_PATHS = ["/nonexistent/dir/out.json", "/", "", "/dev/full"]
HOSTILE_TIMES = [
    "",
    "soon",
    "-1h",
    "99999999999999999999d",
    "1e308s",
    "nan",
    "9999-99-99",
    "2026-01-01T25:00",
]
HOSTILE_AUTH = ["admin:wrong", "", ":", "ü:ß", "a\nb"]
HOSTILE_URLS = [
    *HOSTILE_TEXT,
    "prefect:4200/api",
    "ftp://prefect/api",
    "http://",
    "http://[::1/api",
    "http://prefect:99999/api",
    "http://pre fect/api",
    "http://prefect/api?x=1",
    "http://127.0.0.1:1/api",  # valid, nothing listens: the server starts all the same
]


def _commands() -> Iterator[tuple[str, Any]]:
    def walk(command: Any, path: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
        if hasattr(command, "commands"):
            for name, sub in command.commands.items():
                yield from walk(sub, (*path, name))
        else:
            yield " ".join(path), command

    yield from walk(typer.main.get_command(app), ())


COMMANDS = dict(_commands())


def test_every_command_is_listed() -> None:
    unique = {name for name, command in COMMANDS.items() if not name.startswith("gcl ")}
    assert unique == set(BASELINE), "give each new command a valid command line in BASELINE"
    for name in BASELINE:  # gcl X is limit X
        if name.startswith("limit "):
            alias, command = COMMANDS["gcl " + name.removeprefix("limit ")], COMMANDS[name]
            assert (alias.callback.__qualname__, alias.help) == (command.callback.__qualname__, command.help)


#: The hostile values of each parameter, by its first option name (an argument: by its name).
KINDS: dict[str, list[str]] = {
    "name": HOSTILE_NAMES,
    "tag": HOSTILE_NAMES,
    "concurrency_limit": HOSTILE_INTS,
    "--limit": HOSTILE_INTS,
    "--active-slots": HOSTILE_INTS,
    "--offset": HOSTILE_INTS,
    "--port": HOSTILE_INTS,
    "--slot-decay-per-second": HOSTILE_FLOATS,
    "--file": HOSTILE_PATHS,
    "--output": HOSTILE_TEXT,
    "--host": HOSTILE_TEXT,
    "--log-level": HOSTILE_TEXT,
    "--count": HOSTILE_INTS,
    "--interval": HOSTILE_FLOATS,
    "--event": HOSTILE_TEXT,
    "--since": HOSTILE_TIMES,
    "--until": HOSTILE_TIMES,
    "--upstream": HOSTILE_URLS,
}
#: Where a parameter of that name takes other values in one command.
OVERRIDES: dict[tuple[str, str], list[str]] = {
    ("events ls", "--limit"): HOSTILE_NAMES,
    ("events tail", "--limit"): HOSTILE_TEXT,  # a valid one streams: fewer of them
}


def _key(param: Any) -> str:
    return str(param.name) if param.param_type_name == "argument" else str(param.opts[0])


def _hostile_params(name: str) -> list[Any]:
    """The parameters of a command that take a value (flags take none)."""
    return [p for p in COMMANDS[name].params if not getattr(p, "is_flag", False)]


def test_every_parameter_has_its_hostile_values() -> None:
    for name in BASELINE:
        for param in _hostile_params(name):
            assert _key(param) in KINDS, (name, _key(param))


def _variants(name: str) -> Iterator[list[str]]:
    """The baseline of ``name`` with one parameter at a time given each hostile value."""
    baseline = BASELINE[name]
    for param in _hostile_params(name):
        key = _key(param)
        values = OVERRIDES.get((name, key), KINDS[key])
        if key in ("name", "tag"):  # always the first argument
            yield from ([value, *baseline[1:]] for value in values)
        elif param.param_type_name == "argument":  # a second one: a tag limit's deprecated size
            yield from ([baseline[0], value] for value in values)
        elif key in baseline:
            at = baseline.index(key)
            yield from ([*baseline[: at + 1], value, *baseline[at + 2 :]] for value in values)
        else:
            extra = ["--output", "json"] if key == "--file" else []
            yield from ([*baseline, *extra, key, value] for value in values)


class Runner:
    """Runs the CLI in this process against the module's server, with a private home."""

    def __init__(self, server: ServerProcess, home: Path) -> None:
        self.server = server
        self.home = home

    def run(self, argv: list[str], api_url: str | None = None, auth: str | None = AUTH, **env: str) -> Result:
        streaming = " ".join(argv[:2]) in STREAMING or " ".join(argv[2:4]) in STREAMING
        environment: dict[str, str | None] = {
            "SLOTKEEPER_API_URL": api_url or self.server.url,
            "SLOTKEEPER_API_AUTH_STRING": auth,
            "SLOTKEEPER_HOME": str(self.home),
            "SLOTKEEPER_DATABASE_URL": None,
            "FORCE_COLOR": None,
            **env,
        }
        if not streaming:
            return CliRunner().invoke(app, argv, env=environment)
        with interrupted_after(STREAMING_SECONDS):
            return CliRunner().invoke(app, argv, env=environment)


@contextlib.contextmanager
def interrupted_after(seconds: float) -> Iterator[None]:
    """A KeyboardInterrupt (what Ctrl-C raises) after ``seconds``, unless done by then. Raised by
    a timer signal, so it works where SIGINT is ignored (a suite started in the background)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def calm(result: Result, argv: list[str], **context: Any) -> None:
    """Exit 0, 1 with a message, or 2; no exception (a traceback) whatever happened."""
    where = (argv, context, result.output[-2000:])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"an exception reached the user: {where}") from result.exception
    # 130: Ctrl-C (only the streaming runs get one) that came before the command was streaming,
    # typer's own answer to an interrupt, without a traceback (a loaded machine makes it likely).
    assert result.exit_code in (0, 1, 2, 130), where
    assert "Traceback" not in result.output, where
    if result.exit_code == 1:
        assert result.stderr.strip(), where


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    home = tmp_path_factory.mktemp("hostile")
    with ServerProcess(home / "server", SLOTKEEPER_API_AUTH_STRING=AUTH) as server:
        yield Runner(server, home / "cli")


@pytest.fixture(autouse=True)
def no_server_starts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``server start`` gets as far as uvicorn, which is not started; what a command writes
    where it runs (a blank SLOTKEEPER_HOME is the current directory) lands in ``tmp_path``."""
    monkeypatch.setattr(server_module.Server, "run", lambda self: None)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def built_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner builds the click command of the app from its annotations at every run (about
    0.2 s, most of this module's time): build it once."""
    command = typer.main.get_command(app)
    monkeypatch.setattr(typer.testing, "_get_command", lambda _: command)


@pytest.mark.parametrize("name", list(BASELINE))
def test_hostile_arguments_and_options(runner: Runner, name: str) -> None:
    assert runner.server.call("POST", "/v2/concurrency_limits/", {"name": NAME, "limit": 1})[0] in (201, 409)
    for variant in _variants(name):
        argv = [*name.split(), *variant]
        calm(runner.run(argv), argv)


#: The commands that talk to the API (the others are run against databases instead, below).
API_COMMANDS = [name for name in BASELINE if name not in ("server start", "db upgrade")]


@pytest.mark.parametrize("name", API_COMMANDS)
def test_bad_urls_an_unreachable_server_and_wrong_auth(runner: Runner, name: str) -> None:
    argv = [*name.split(), *BASELINE[name]]
    root = runner.server.url.removesuffix("/api")
    urls = [
        "",
        " ",
        "localhost:4200",
        "http://",
        "http://[::1",
        "ftp://127.0.0.1/api",
        "http://127.0.0.1:99999/api",
        f"http://127.0.0.1:{free_port()}/api",  # nothing listens there
        root,  # without /api
        f"{root}/api/v2",
        f"http://user:pw@{root.removeprefix('http://')}/api",
    ]
    for url in urls:
        calm(runner.run(argv, api_url=url), argv, url=url)
        calm(runner.run(["--api-url", url, *argv]), argv, url=url)
    for auth in [None, *HOSTILE_AUTH]:
        calm(runner.run(argv, auth=auth), argv, auth=auth)


@pytest.mark.parametrize("name", ["db upgrade", "server start"])
def test_databases_and_homes_that_cannot_work(runner: Runner, name: str, tmp_path: Path) -> None:
    argv = name.split()
    urls = [
        "",
        "nonsense",
        "mysql://u@h/d",
        "sqlite:////nonexistent/dir/x.db",
        f"sqlite:///{tmp_path}",  # a directory
        "sqlite:////dev/full",
        f"postgresql://u:pw@127.0.0.1:{free_port()}/x?connect_timeout=2",
        "postgresql://[::1/x",
    ]
    for url in urls:
        calm(runner.run(argv, SLOTKEEPER_DATABASE_URL=url), argv, url=url)
    for home in ["/nonexistent/dir", "/dev/null", ""]:
        calm(runner.run(argv, SLOTKEEPER_HOME=home), argv, home=home)
    for setting, value in [("SLOTKEEPER_PORT", "99999999999999999999"), ("SLOTKEEPER_LOG_LEVEL", "loud")]:
        calm(runner.run(argv, **{setting: value}), argv, setting=setting)
