"""The ``slotkeeper`` command line: run the server, migrate its database, manage limits.

    slotkeeper server start [--host H] [--port P] [--log-level L]
    slotkeeper db upgrade
    slotkeeper limit ls | inspect | create | update | delete | enable | disable | leases | top
    slotkeeper events ls | tail
    slotkeeper gcl ...            (the same commands, under Prefect's name)
    slotkeeper tag-limit create | inspect | ls | reset | delete | holders   (tag-based, v1)

The limit commands mirror ``prefect global-concurrency-limit`` (messages included) and talk to
the server over HTTP through :class:`slotkeeper.client.SlotkeeperClient`; ``--api-url`` (env
``SLOTKEEPER_API_URL``) says where, ``SLOTKEEPER_API_AUTH_STRING`` gives the basic-auth string.
Both groups take a limit's size as ``--limit N``. Exit codes: 0 on success, 1 on any error (its
message in red on stderr), 2 for bad usage. No command shows a traceback: every failure is
caught where it crosses a command (``_call``, the database commands) and told in one line;
``tests/test_cli_hostile.py`` runs every command with hostile values to keep it so.

The server, database and settings modules (uvicorn, SQLAlchemy, pydantic-settings) are imported
inside the commands that use them, so a limit command starts without paying for them.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shlex
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from slotkeeper import __version__
from slotkeeper.client import DEFAULT_API_URL, SlotkeeperClient
from slotkeeper.errors import CODES, ApiError, ServerUnreachable

if TYPE_CHECKING:
    from slotkeeper.settings import Settings

T = TypeVar("T")

app = typer.Typer(
    name="slotkeeper",
    help="slotkeeper: named concurrency limits with durable leases; speaks Prefect's API.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals may hold the auth string
)
server_app = typer.Typer(help="Run the slotkeeper server.", no_args_is_help=True)
db_app = typer.Typer(help="Manage the server's database.", no_args_is_help=True)
limit_app = typer.Typer(
    help="Manage global concurrency limits (as `prefect global-concurrency-limit`).",
    no_args_is_help=True,
)
app.add_typer(server_app, name="server")
app.add_typer(db_app, name="db")
app.add_typer(limit_app, name="limit")
app.add_typer(limit_app, name="gcl", help="Alias of `slotkeeper limit` (Prefect's name).")
tag_app = typer.Typer(
    help="Manage tag-based (v1) concurrency limits (as `prefect concurrency-limit`).",
    no_args_is_help=True,
)
app.add_typer(tag_app, name="tag-limit")

#: How the hints printed by the commands name the limit group.
LIMIT_COMMAND = "slotkeeper limit"
#: How the hints printed by the tag-limit commands name their group.
TAG_COMMAND = "slotkeeper tag-limit"


# --- output ---------------------------------------------------------------------------------------


def printable(text: str) -> str:
    """``text`` as a terminal can take it: bytes that were not UTF-8 in the command line (kept
    as lone surrogates by Python) come back as themselves, or as U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _print(message: str, style: str | None = None, *, stderr: bool = False) -> None:
    # markup=False: a limit name such as "a[b]" must print as typed, not as rich markup.
    Console(stderr=stderr).print(
        printable(message), style=style, markup=False, highlight=False, soft_wrap=True
    )


def _ok(message: str) -> None:
    _print(message, "green")


def _fail(message: str) -> NoReturn:
    _print(message, "red", stderr=True)
    raise typer.Exit(1)


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _print_table(table: Table) -> None:
    console = Console()
    if not console.is_terminal:
        # Piped or captured: nobody's window to fit, so print whole rows instead of folded cells.
        natural = console.measure(table, options=console.options.update_width(1000)).maximum
        console = Console(width=max(console.width, natural))
    console.print(table)


def _check_output(output: str | None) -> bool:
    """True for ``-o json``; exits with Prefect's message for any other format."""
    if output is None:
        return False
    if output.lower() != "json":
        _fail("Only 'json' output format is supported.")
    return True


def relative_time(value: str, now: datetime | None = None) -> str:
    """An ISO-8601 time as a human reads it: ``"3 minutes ago"``, ``"in 5 minutes"``."""
    try:
        moment = datetime.fromisoformat(value)
        seconds = ((now or datetime.now(UTC)) - moment).total_seconds()
    except (TypeError, ValueError):  # not a time (or a naive one): shown as it is
        return str(value)
    past = seconds >= 0
    span = abs(seconds)
    if span < 1:
        return "just now"
    for size, unit in ((86400, "day"), (3600, "hour"), (60, "minute"), (1, "second")):
        if span >= size:
            count = int(span // size)
            text = f"{count} {unit}{'s' if count != 1 else ''}"
            return f"{text} ago" if past else f"in {text}"
    return "just now"  # pragma: no cover - span >= 1 always matches "second"


#: An expiry further away than this reads "never": a tag-based (v1) hold lasts 100 years unless
#: SLOTKEEPER_V1_HOLD_TTL_SECONDS says otherwise (Prefect's v1 holds never expire).
NEVER_SECONDS = 10 * 365 * 86400.0


def expires(value: str, now: datetime | None = None) -> str:
    """When a lease or hold expires, as a human reads it: ``"in 5 minutes"``, or ``"never"``."""
    try:
        ahead = (datetime.fromisoformat(value) - (now or datetime.now(UTC))).total_seconds()
    except (TypeError, ValueError):
        return str(value)
    if ahead > NEVER_SECONDS:
        return "never"
    return relative_time(value, now)


def _cell(value: Any) -> Text:
    # Text, not str: rich would read "[...]" in a name as markup.
    if value is None:
        return Text("-")
    return Text(str(value))


# --- talking to the server ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """Where the limit commands send their requests (set by the root options)."""

    api_url: str
    auth_string: str | None


class _Abort(Exception):
    """A command-level failure found while talking to the server: print it and exit 1."""


#: The message printed for an error answer, by the answer's code (see ``errors.CODES``).
ErrorMessages = Mapping[str, Callable[[ApiError], str]]


def codes_of(*statuses: int) -> list[str]:
    """Every code answered with one of these statuses."""
    return [code for code, (status, _) in CODES.items() if status in statuses]


def has_api_prefix(api_url: str) -> bool:
    """Whether the URL's path ends with ``/api``, where the server's API is."""
    return urlsplit(api_url).path.rstrip("/").endswith("/api")


def answer_code(exc: ApiError, api_url: str) -> str:
    """The code of an error answer. A server that sends none (Prefect's) is read by its status."""
    if exc.code != "api_error":
        return exc.code
    if exc.status == 401:
        return "unauthorized"
    if exc.status == 404:
        return "limit_not_found" if has_api_prefix(api_url) else "route_not_found"
    return exc.code


def no_route(exc: ApiError, api_url: str) -> str:
    """What to say when the server has no such path: most often, ``/api`` is missing."""
    if not has_api_prefix(api_url):
        return (
            f"The server at {api_url} has no such path (HTTP {exc.status}): its API is under /api. "
            f"Did you mean --api-url {api_url.rstrip('/')}/api ?"
        )
    return f"Error: {exc.detail} (HTTP {exc.status}): is {api_url} a slotkeeper server?"


def not_found(name: str) -> str:
    """Prefect's message for a limit that does not exist."""
    return f"Global concurrency limit '{name}' not found."


#: The keys the commands read in a limit, a lease, a tag limit.
LIMIT_KEYS = ("id", "name", "active", "limit", "active_slots", "slot_decay_per_second", "created", "updated")
LEASE_KEYS = ("lease_id", "holder", "slots", "created", "expires", "fencing_token")
TAG_LIMIT_KEYS = ("id", "tag", "concurrency_limit", "active_slots", "created", "updated")


def _shaped(answer: Any, keys: tuple[str, ...]) -> bool:
    """Whether ``answer`` is an object with ``keys``, or a list of such objects."""
    items = answer if isinstance(answer, list) else [answer]
    return all(isinstance(item, dict) and all(key in item for key in keys) for item in items)


def _call(
    ctx: typer.Context,
    work: Callable[[SlotkeeperClient], Awaitable[T]],
    *,
    name: str | None = None,
    errors: ErrorMessages | None = None,
    keys: tuple[str, ...] = (),
) -> T:
    """Run ``work`` with a client of the target server; turn every failure into exit 1.

    ``errors`` maps an answer's code to the message printed for it; ``limit_not_found`` on a
    command about ``name`` prints Prefect's not-found message. ``keys``: what the command reads
    in the answer (an object, or each object of a list); an answer without them (another
    server, another path) is refused here rather than half read.
    """
    target = ctx.find_object(Target) or Target(DEFAULT_API_URL, None)

    async def run() -> T:
        async with SlotkeeperClient(target.api_url, target.auth_string) as client:
            return await work(client)

    try:
        answer = asyncio.run(run())
        if keys and not _shaped(answer, keys):
            raise _Abort(
                f"The server at {target.api_url} answered in a shape this command does not know "
                f"(it reads {', '.join(keys)}): is --api-url the /api of a slotkeeper server?"
            )
        return answer
    except _Abort as exc:
        _fail(str(exc))
    except ServerUnreachable as exc:
        _fail(
            f"{exc}. Is the slotkeeper server running? Start it with `slotkeeper server start`, "
            "or point --api-url (SLOTKEEPER_API_URL) at it."
        )
    except ApiError as exc:
        code = answer_code(exc, target.api_url)
        if errors and code in errors:
            _fail(errors[code](exc))
        if code == "limit_not_found" and name is not None:
            _fail(not_found(name))
        if code == "route_not_found":
            _fail(no_route(exc, target.api_url))
        if code == "unauthorized":
            _fail(
                f"The server at {target.api_url} refused the request (401 Unauthorized): set "
                "SLOTKEEPER_API_AUTH_STRING to its auth string ('user:password')."
            )
        _fail(f"Error: {exc.detail} (HTTP {exc.status})")
    except ValueError as exc:  # a malformed --api-url, a name that cannot be sent
        _fail(str(exc))


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"slotkeeper {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    api_url: Annotated[
        str,
        typer.Option(
            "--api-url",
            envvar="SLOTKEEPER_API_URL",
            help="The server's API, with its /api prefix. Auth: set SLOTKEEPER_API_AUTH_STRING.",
        ),
    ] = DEFAULT_API_URL,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    ctx.obj = Target(api_url, os.environ.get("SLOTKEEPER_API_AUTH_STRING") or None)


OutputOption = Annotated[
    str | None, typer.Option("--output", "-o", help="Output format; only 'json' is supported.")
]
NameArgument = Annotated[
    str, typer.Argument(metavar="NAME", help="The name of the limit.", show_default=False)
]


def finite(value: float | None) -> float | None:
    """A float option's check: JSON (and a limit) has no NaN or infinity."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number.")
    return value


# --- limit commands -------------------------------------------------------------------------------


async def _all_limits(client: SlotkeeperClient) -> list[dict[str, Any]]:
    limits: list[dict[str, Any]] = []
    while True:
        # limit=None: the server's own page size, whatever its SLOTKEEPER_API_DEFAULT_LIMIT.
        page = await client.list_limits(limit=None, offset=len(limits))
        if not page:
            return limits
        limits.extend(page)


@limit_app.command("ls")
def ls(ctx: typer.Context, output: OutputOption = None) -> None:
    """List every limit, ordered by name."""
    as_json = _check_output(output)
    limits = _call(ctx, _all_limits, keys=LIMIT_KEYS)
    if as_json:
        _print_json(limits)
        return
    if not limits:
        _print("No global concurrency limits found.")
        return
    table = Table(
        title="Global Concurrency Limits",
        caption=f"List Global Concurrency Limits using `{LIMIT_COMMAND} ls`",
    )
    table.add_column("ID", style="cyan", no_wrap=True)
    table.add_column("Name", style="green")
    table.add_column("Active")
    table.add_column("Limit", justify="right")
    table.add_column("Active Slots", justify="right")
    table.add_column("Slot Decay Per Second", justify="right")
    table.add_column("Created")
    table.add_column("Updated")
    for lim in limits:
        table.add_row(
            _cell(lim["id"]),
            _cell(lim["name"]),
            _cell(lim["active"]),
            _cell(lim["limit"]),
            _cell(lim["active_slots"]),
            _cell(lim["slot_decay_per_second"]),
            _cell(lim["created"]),
            _cell(relative_time(lim["updated"])),
        )
    _print_table(table)


@limit_app.command("inspect")
def inspect(
    ctx: typer.Context,
    name: NameArgument,
    output: OutputOption = None,
    file: Annotated[
        Path | None,
        typer.Option("--file", "-f", help="Write the JSON to this file (needs --output json)."),
    ] = None,
) -> None:
    """Show one limit: its settings and how many slots are in use now."""
    as_json = _check_output(output)
    if file is not None and not as_json:
        _fail("The --file/-f option requires the --output option to be set.")
    lim = _call(ctx, lambda client: client.read_limit(name), name=name, keys=LIMIT_KEYS)
    if file is not None:
        try:
            file.write_text(json.dumps(lim, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as exc:
            _fail(f"Could not write {file}: {exc.strerror or exc}")
        _ok(f"Global concurrency limit '{name}' written to {file}")
        return
    if as_json:
        _print_json(lim)
        return
    table = Table(title=Text(f"Global concurrency limit '{name}'"), show_header=False)
    table.add_column("Field", style="bold")
    table.add_column("Value")
    for key, value in lim.items():
        shown = f"{value} ({relative_time(value)})" if key in ("created", "updated") else value
        table.add_row(_cell(key), _cell(shown))
    _print_table(table)


@limit_app.command("create")
def create(
    ctx: typer.Context,
    name: NameArgument,
    limit: Annotated[
        int, typer.Option("--limit", "-l", help="How many slots may be held at once.", show_default=False)
    ],
    disable: Annotated[bool, typer.Option("--disable", help="Create the limit inactive.")] = False,
    active_slots: Annotated[int, typer.Option("--active-slots", help="Slots taken from the start.")] = 0,
    slot_decay_per_second: Annotated[
        float,
        typer.Option(
            "--slot-decay-per-second", help="Slots freed per second (makes a rate limit).", callback=finite
        ),
    ] = 0.0,
) -> None:
    """Create a limit."""
    created = _call(
        ctx,
        lambda client: client.create_limit(
            name,
            limit,
            active=not disable,
            active_slots=active_slots,
            slot_decay_per_second=slot_decay_per_second,
        ),
        errors={
            "name_taken": lambda _: (
                f"Global concurrency limit '{name}' already exists. "
                "Please try creating with a different name."
            ),
            **dict.fromkeys(codes_of(422), lambda exc: f"Invalid arguments provided: {exc.detail}"),
        },
        keys=("id",),
    )
    _ok(
        f"Created global concurrency limit with name '{name}' and ID '{created['id']}'. "
        f"Run `{LIMIT_COMMAND} inspect {shlex.quote(name)}` to view details."
    )


@limit_app.command("update")
def update(
    ctx: typer.Context,
    name: NameArgument,
    enable: Annotated[bool, typer.Option("--enable", help="Make the limit active.")] = False,
    disable: Annotated[bool, typer.Option("--disable", help="Make the limit inactive.")] = False,
    limit: Annotated[int | None, typer.Option("--limit", "-l", help="New number of slots.")] = None,
    active_slots: Annotated[
        int | None, typer.Option("--active-slots", help="Set the slots taken without a lease.")
    ] = None,
    slot_decay_per_second: Annotated[
        float | None, typer.Option("--slot-decay-per-second", help="New decay rate.", callback=finite)
    ] = None,
) -> None:
    """Change some settings of a limit; the others stay as they are."""
    if enable and disable:
        _fail("Cannot enable and disable a global concurrency limit at the same time.")
    fields: dict[str, Any] = {
        key: value
        for key, value in {
            "active": True if enable else False if disable else None,
            "limit": limit,
            "active_slots": active_slots,
            "slot_decay_per_second": slot_decay_per_second,
        }.items()
        if value is not None
    }
    if not fields:
        _fail("No update arguments provided.")
    updating = dict.fromkeys(
        codes_of(409, 422), lambda exc: f"Error updating global concurrency limit: {exc.detail}"
    )
    _call(ctx, lambda client: client.update_limit(name, **fields), name=name, errors=updating)
    _ok(f"Updated global concurrency limit with name '{name}'.")


def _interactive() -> bool:
    """True when a person can answer a question (stdin is a terminal)."""
    return sys.stdin.isatty()


@limit_app.command("delete")
def delete(
    ctx: typer.Context,
    name: NameArgument,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a limit (asks first on a terminal); the slots its leases hold are freed."""
    if not yes and _interactive():
        _call(ctx, lambda client: client.read_limit(name), name=name)
        if not typer.confirm(
            f"Are you sure you want to delete global concurrency limit with name '{name}'?", default=False
        ):
            _fail("Deletion aborted.")
    _call(ctx, lambda client: client.delete_limit(name), name=name)
    _ok(f"Deleted global concurrency limit with name '{name}'.")


def _set_active(ctx: typer.Context, name: str, active: bool) -> None:
    state = "enabled" if active else "disabled"

    async def work(client: SlotkeeperClient) -> None:
        lim = await client.read_limit(name)
        if lim.get("active") == active:
            raise _Abort(f"Global concurrency limit with name '{name}' is already {state}.")
        await client.update_limit(name, active=active)

    _call(ctx, work, name=name)
    _ok(f"{state.capitalize()} global concurrency limit with name '{name}'.")


@limit_app.command("enable")
def enable(ctx: typer.Context, name: NameArgument) -> None:
    """Make a limit active: acquisitions count against it again."""
    _set_active(ctx, name, True)


@limit_app.command("disable")
def disable(ctx: typer.Context, name: NameArgument) -> None:
    """Make a limit inactive: acquisitions pass it without taking its slots."""
    _set_active(ctx, name, False)


@limit_app.command("leases")
def leases(ctx: typer.Context, name: NameArgument, output: OutputOption = None) -> None:
    """List the live leases on a limit: who holds how many slots, until when."""
    as_json = _check_output(output)
    found = _call(ctx, lambda client: client.list_leases(name), name=name, keys=LEASE_KEYS)
    if as_json:
        _print_json(found)
        return
    if not found:
        _print(f"No live leases on global concurrency limit '{name}'.")
        return
    table = Table(title=Text(f"Leases on global concurrency limit '{name}'"))
    table.add_column("Lease ID", style="cyan", no_wrap=True)
    table.add_column("Holder")
    table.add_column("Slots", justify="right")
    table.add_column("Created")
    table.add_column("Expires")
    table.add_column("Fencing Token", justify="right")
    for lease in found:
        holder = lease.get("holder")
        table.add_row(
            _cell(lease["lease_id"]),
            _cell(f"{holder['type']} {holder['id']}" if holder else None),
            _cell(lease["slots"]),
            _cell(relative_time(lease["created"])),
            _cell(expires(lease["expires"])),
            _cell(lease["fencing_token"]),
        )
    _print_table(table)


# --- tag-limit commands (tag-based, v1) -----------------------------------------------------------


def no_tag_limit(tag: str) -> str:
    """Prefect's message for a tag without a limit."""
    return f"No concurrency limit found for the tag: {tag}"


TagArgument = Annotated[str, typer.Argument(metavar="TAG", help="The tag.", show_default=False)]


def _tag_errors(tag: str) -> ErrorMessages:
    return {"limit_not_found": lambda _: no_tag_limit(tag)}


#: Printed when the size of a tag limit is given as a second argument (Prefect's form).
POSITIONAL_LIMIT_DEPRECATED = (
    f"Note: `{TAG_COMMAND} create TAG N` is deprecated and will be removed; "
    f"give the size as --limit N (`{TAG_COMMAND} create TAG --limit N`, as `{LIMIT_COMMAND} create`)."
)


# ignore_unknown_options: the deprecated positional size may be negative ("-1" is not an option),
# so that it is refused for its value, not as "No such option".
@tag_app.command("create", context_settings={"ignore_unknown_options": True})
def tag_create(
    ctx: typer.Context,
    tag: TagArgument,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit", "-l", help="How many task runs may hold the tag at once.", min=0, show_default=False
        ),
    ] = None,
    concurrency_limit: Annotated[
        int | None,
        typer.Argument(
            metavar="CONCURRENCY_LIMIT", help="Deprecated: the size, as --limit.", min=0, show_default=False
        ),
    ] = None,
) -> None:
    """Create the limit of a tag, or change its size (an upsert, as Prefect's)."""
    if limit is not None and concurrency_limit is not None:
        raise typer.BadParameter("give the size once, as --limit N.", param_hint="'--limit'")
    if concurrency_limit is not None:
        _print(POSITIONAL_LIMIT_DEPRECATED, "yellow", stderr=True)
        limit = concurrency_limit
    if limit is None:
        raise typer.BadParameter("the size of the tag's limit is required.", param_hint="'--limit' / '-l'")
    size = limit

    async def work(client: SlotkeeperClient) -> bool:
        try:
            await client.read_tag_limit(tag)
        except ApiError as exc:
            # route_not_found: a tag such as "a/b" is no path; the upsert says what is wrong.
            if answer_code(exc, client.base_url) not in ("limit_not_found", "route_not_found"):
                raise
            existed = False
        else:
            existed = True
        await client.upsert_tag_limit(tag, size)
        return existed

    invalid = dict.fromkeys(codes_of(422), lambda exc: f"Invalid arguments provided: {exc.detail}")
    existed = _call(ctx, work, errors=invalid)
    quoted = shlex.quote(tag)
    _ok(
        f"{'Updated' if existed else 'Created'} concurrency limit with properties:\n"
        f"    tag - {tag!r}\n"
        f"    concurrency_limit - {size}\n\n"
        f"Delete the concurrency limit:\n    {TAG_COMMAND} delete {quoted}\n\n"
        f"Inspect the concurrency limit:\n    {TAG_COMMAND} inspect {quoted}"
    )


@tag_app.command("inspect")
def tag_inspect(ctx: typer.Context, tag: TagArgument, output: OutputOption = None) -> None:
    """Show the limit of a tag and the task runs holding it."""
    as_json = _check_output(output)
    lim = _call(ctx, lambda client: client.read_tag_limit(tag), errors=_tag_errors(tag), keys=TAG_LIMIT_KEYS)
    if as_json:
        _print_json(lim)
        return
    title = f"Concurrency Limit ID: {lim['id']}"
    table = Table(title=Text(title), min_width=len(title))  # the id in the title, whole
    table.add_column("Tag", style="green")
    table.add_column("Concurrency Limit", justify="right")
    table.add_column("Created")
    table.add_column("Updated")
    table.add_row(
        _cell(lim["tag"]),
        _cell(lim["concurrency_limit"]),
        _cell(relative_time(lim["created"])),
        _cell(relative_time(lim["updated"])),
    )
    _print_table(table)
    runs = Table(title="Active Task Run IDs")
    runs.add_column("Task Run ID", style="cyan", no_wrap=True)
    for task_run_id in sorted(lim["active_slots"]):
        runs.add_row(_cell(task_run_id))
    _print_table(runs)


@tag_app.command("ls")
def tag_ls(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option("--limit", help="How many tag limits to read.", min=0)] = 15,
    offset: Annotated[int, typer.Option("--offset", help="How many to skip (ordered by tag).", min=0)] = 0,
    output: OutputOption = None,
) -> None:
    """List tag limits (one page, ordered by tag), most recently updated first."""
    as_json = _check_output(output)
    page = _call(ctx, lambda client: client.list_tag_limits(limit, offset), keys=TAG_LIMIT_KEYS)
    page.sort(key=lambda lim: lim.get("updated") or lim.get("created") or "", reverse=True)
    if as_json:
        _print_json(page)
        return
    if not page:
        _print("No concurrency limits found.")
        return
    table = Table(
        title="Concurrency Limits", caption="inspect a concurrency limit to show active task run IDs"
    )
    table.add_column("Tag", style="green")
    table.add_column("ID", style="cyan", no_wrap=True)
    table.add_column("Concurrency Limit", justify="right")
    table.add_column("Active Task Runs", justify="right")
    for lim in page:
        table.add_row(
            _cell(lim["tag"]),
            _cell(lim["id"]),
            _cell(lim["concurrency_limit"]),
            _cell(len(lim["active_slots"])),
        )
    _print_table(table)


@tag_app.command("reset")
def tag_reset(ctx: typer.Context, tag: TagArgument) -> None:
    """Free every slot of a tag: every holder loses it (each release is recorded)."""
    _call(ctx, lambda client: client.reset_tag_limit(tag), errors=_tag_errors(tag))
    _ok(f"Reset concurrency limit set on the tag: {tag}")


@tag_app.command("delete")
def tag_delete(
    ctx: typer.Context,
    tag: TagArgument,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete the limit of a tag (asks first on a terminal); its holders lose it."""
    if not yes and _interactive():
        _call(ctx, lambda client: client.read_tag_limit(tag), errors=_tag_errors(tag))
        if not typer.confirm(
            f"Are you sure you want to delete concurrency limit with tag '{tag}'?", default=False
        ):
            _fail("Deletion aborted.")
    _call(ctx, lambda client: client.delete_tag_limit(tag), errors=_tag_errors(tag))
    _ok(f"Deleted concurrency limit set on the tag: {tag}")


@tag_app.command("holders")
def tag_holders(ctx: typer.Context, tag: TagArgument, output: OutputOption = None) -> None:
    """List who holds a tag now (v1 holds and v2 leases), oldest first, and for how long."""
    as_json = _check_output(output)
    found = _call(
        ctx, lambda client: client.list_leases(f"tag:{tag}"), errors=_tag_errors(tag), keys=LEASE_KEYS
    )
    if as_json:
        _print_json(found)
        return
    if not found:
        _print(f"Nobody holds the tag: {tag}")
        return
    now = datetime.now(UTC)
    table = Table(title=Text(f"Holders of the tag '{tag}'"))
    table.add_column("Holder")
    table.add_column("Held For", justify="right")
    table.add_column("Slots", justify="right")
    table.add_column("Expires")
    table.add_column("Lease ID", style="cyan", no_wrap=True)
    for lease in found:
        holder = lease.get("holder")
        table.add_row(
            _cell(f"{holder['type']} {holder['id']}" if holder else None),
            _cell(held_for(lease["created"], now)),
            _cell(lease["slots"]),
            _cell(expires(lease["expires"], now)),
            _cell(lease["lease_id"]),
        )
    _print_table(table)


def held_for(since: str, now: datetime | None = None) -> str:
    """How long ago ``since`` (ISO-8601) was, as a duration: ``"3 minutes"``, ``"just now"``."""
    ago = relative_time(since, now)
    return ago.removesuffix(" ago") if ago.endswith(" ago") else ago


# --- server and database --------------------------------------------------------------------------


class LogLevel(StrEnum):
    """Log levels uvicorn knows."""

    CRITICAL = "critical"
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"
    DEBUG = "debug"
    TRACE = "trace"


def redact_url(url: str) -> str:
    """``url`` with its password shown as ``***`` (in the user info or a ``password=`` query)."""
    url = re.sub(r"^([^:/?#]+://[^:@/?#]*:)[^@/?#]*@", r"\1***@", url)
    return re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", url)


def _settings(**overrides: Any) -> Settings:
    import pydantic

    from slotkeeper.settings import Settings

    try:
        return Settings(**overrides)
    except pydantic.ValidationError as exc:
        _fail(f"Invalid settings (SLOTKEEPER_* environment variables or options):\n{exc}")


@server_app.command("start")
def start(
    host: Annotated[
        str | None, typer.Option("--host", help="Address to bind (default: SLOTKEEPER_HOST or 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None,
        typer.Option("--port", min=0, max=65535, help="Port (default: SLOTKEEPER_PORT or 4200)."),
    ] = None,
    log_level: Annotated[
        LogLevel | None,
        typer.Option("--log-level", case_sensitive=False, help="Default: SLOTKEEPER_LOG_LEVEL or info."),
    ] = None,
    upstream: Annotated[
        str | None,
        typer.Option(
            "--upstream",
            help="Gateway mode: the API URL of your Prefect server (http://prefect-host:4200/api); "
            "every /api request slotkeeper does not answer goes there. Default: SLOTKEEPER_UPSTREAM_URL.",
        ),
    ] = None,
) -> None:
    """Start the server (settings from SLOTKEEPER_* variables; options override them)."""
    from slotkeeper.api.app import create_app
    from slotkeeper.api.server import serve

    overrides = {
        "host": host,
        "port": port,
        "log_level": log_level.value if log_level else None,
        "upstream_url": upstream,
    }
    settings = _settings(**{k: v for k, v in overrides.items() if v is not None})
    level = settings.log_level.lower()
    if level not in set(LogLevel):
        _fail(f"Invalid log level {settings.log_level!r}: use one of {', '.join(LogLevel)}.")
    try:
        settings.host.encode("idna")  # what resolving it needs (uvicorn would raise, not say)
    except UnicodeError as exc:
        _fail(f"Cannot listen on {settings.host!r}: not a host name or address ({exc}).")
    # The app migrates as it starts, too; a failure there would be a traceback from uvicorn's
    # lifespan, so a database that cannot be opened is told here, in one line.
    _migrate(settings.resolved_database_url, "open")
    shown_host = f"[{settings.host}]" if ":" in settings.host else settings.host
    _print(f"Starting slotkeeper {__version__}, listening on http://{shown_host}:{settings.port}/api")
    _print(f"Database: {redact_url(settings.resolved_database_url)}")
    if settings.api_auth_string:
        _print("API auth: HTTP basic (SLOTKEEPER_API_AUTH_STRING)")
    if settings.upstream_url:
        _print(f"Gateway: forwarding what slotkeeper does not answer to {redact_url(settings.upstream_url)}")
    serve(create_app(settings), settings, level)


def _migrate(url: str, doing: str) -> tuple[str | None, str | None]:
    """Migrate the database at ``url`` (see :func:`slotkeeper.storage.migrate`), or exit 1 saying
    why it could not be done (``doing``: "upgrade", "open")."""
    import alembic.util.exc
    import sqlalchemy.exc

    from slotkeeper import storage

    try:
        return storage.migrate(url)
    except (sqlalchemy.exc.SQLAlchemyError, alembic.util.exc.CommandError, ValueError, OSError) as exc:
        reason = getattr(exc, "orig", None) or exc
        _fail(f"Could not {doing} the database at {redact_url(url)}: {reason}")


@db_app.command("upgrade")
def upgrade() -> None:
    """Create or migrate the database of SLOTKEEPER_DATABASE_URL (default: SQLite under home)."""
    url = _settings().resolved_database_url
    before, after = _migrate(url, "upgrade")
    shown = redact_url(url)
    if before is None:
        _ok(f"Created the schema of {shown} (revision {after}).")
    elif before != after:
        _ok(f"Upgraded {shown} from revision {before} to {after}.")
    else:
        _ok(f"Database {shown} is already up to date (revision {after}).")


# The events group and `limit top` (their own module; registered on the groups above).
from slotkeeper import cli_events  # noqa: E402, F401


def main() -> None:
    """Entry point of the ``slotkeeper`` console script.

    Every failure a command expects is told in one line where it happens; anything else is a bug,
    told in one line too (``tests/test_cli_hostile.py`` runs the commands in-process, where such an
    exception fails the test instead).
    """
    try:
        app(prog_name="slotkeeper")
    except Exception as exc:
        _print(
            f"slotkeeper: unexpected error: {exc!r}. This is a bug in slotkeeper; please report it.",
            "red",
            stderr=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
