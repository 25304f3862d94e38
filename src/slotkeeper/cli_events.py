"""``slotkeeper events ls | tail`` and ``slotkeeper limit top``: watching a server from a terminal.

    slotkeeper events ls [--limit NAME] [--event NAME] [--since T] [--until T] [-n N] [-o json]
    slotkeeper events tail [--limit NAME] [--event NAME] [-o json]     (Ctrl-C stops)
    slotkeeper limit top [-n N] [--interval S] [--once]                (Ctrl-C stops)

``events ls`` pages through ``POST /api/events/filter``; ``events tail`` subscribes to the
websocket ``/api/events/out`` (Prefect's handshake, the auth string as its token) and prints each
event as it is committed; ``limit top`` redraws (rich ``Live``) the busiest limits from
``POST /api/v2/concurrency_limits/stats`` and their grants per second from the acquired events
of the last interval (``/api/events/count-by/resource``): every process of the database counted.

Registered on the command groups of :mod:`slotkeeper.cli`, whose helpers they share.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import time
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp
import orjson
import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from slotkeeper.cli import (
    OutputOption,
    _call,
    _cell,
    _check_output,
    _print_json,
    _print_table,
    app,
    limit_app,
)
from slotkeeper.client import SlotkeeperClient
from slotkeeper.errors import ServerUnreachable

events_app = typer.Typer(help="Read the event log, or follow it live.", no_args_is_help=True)
app.add_typer(events_app, name="events")

#: Event names without a dot are these (``acquired`` is ``prefect.concurrency-limit.acquired``).
EVENT_PREFIX = "prefect.concurrency-limit."
_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d)")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_ACQUIRED = [f"{EVENT_PREFIX}acquired", f"{EVENT_PREFIX}v1.acquired"]

LimitOption = Annotated[
    list[str] | None,
    typer.Option("--limit", "-l", help="Only events of this limit (repeatable). A tag limit: tag:NAME."),
]
EventOption = Annotated[
    list[str] | None,
    typer.Option(
        "--event",
        "-e",
        help="Only events whose name starts with this (repeatable); 'acquired' means "
        f"'{EVENT_PREFIX}acquired'.",
    ),
]


def parse_time(value: str, now: datetime | None = None) -> datetime:
    """An ISO-8601 time (UTC unless it says), or a time ago: ``90s``, ``15m``, ``2h``, ``1d``."""
    now = now or datetime.now(UTC)
    found = _RELATIVE.fullmatch(value.strip())
    if found:
        try:
            return now - timedelta(seconds=float(found.group(1)) * _UNITS[found.group(2)])
        except OverflowError:  # further back than a date goes (year 1)
            raise typer.BadParameter(f"{value!r} is further back than any date") from None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is neither an ISO-8601 time nor a time ago (15m, 2h, 1d)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def event_filter(
    limits: list[str] | None, events: list[str] | None, since: datetime | None, until: datetime | None
) -> dict[str, Any]:
    """Prefect's EventFilter JSON for these options."""
    found: dict[str, Any] = {}
    occurred: dict[str, str] = {}
    if since is not None:
        occurred["since"] = since.isoformat()
    if until is not None:
        occurred["until"] = until.isoformat()
    if occurred:
        found["occurred"] = occurred
    if events:
        found["event"] = {"prefix": [e if "." in e else EVENT_PREFIX + e for e in events]}
    if limits:
        # A tag limit's v1 events name the tag alone.
        names = sorted({n for name in limits for n in (name, name.removeprefix("tag:"))})
        found["resource"] = {"labels": {"prefect.resource.name": names}}
    return found


def _short(name: str) -> str:
    return name.removeprefix(EVENT_PREFIX)


def _holder(event: dict[str, Any]) -> str | None:
    for related in event.get("related") or ():
        if related.get("prefect.resource.role") != "concurrency-limit":
            return str(related.get("prefect.resource.id"))
    task_run = (event.get("resource") or {}).get("task_run_id")
    return f"prefect.task-run.{task_run}" if task_run else None


def event_row(event: dict[str, Any]) -> list[Text]:
    """One event as a table row: occurred, event, limit, slots, holder, id."""
    resource = event.get("resource") or {}
    return [
        _cell(event.get("occurred")),
        _cell(_short(str(event.get("event")))),
        _cell(resource.get("prefect.resource.name")),
        _cell(resource.get("slots-acquired")),
        _cell(_holder(event)),
        _cell(event.get("id")),
    ]


def _events_table(events: list[dict[str, Any]]) -> Table:
    table = Table(title="Events")
    for column in ("Occurred", "Event", "Limit", "Slots", "Holder", "ID"):
        table.add_column(column)
    for event in events:
        table.add_row(*event_row(event))
    return table


@events_app.command("ls")
def events_ls(
    ctx: typer.Context,
    limit: LimitOption = None,
    event: EventOption = None,
    since: Annotated[
        str | None,
        typer.Option("--since", help="From this time: ISO-8601, or ago (15m, 2h, 1d). Default: 1h."),
    ] = None,
    until: Annotated[str | None, typer.Option("--until", help="Up to this time (default: now).")] = None,
    count: Annotated[
        int, typer.Option("--count", "-n", min=1, max=100_000, help="The newest N events.")
    ] = 50,
    output: OutputOption = None,
) -> None:
    """List the newest events (oldest first), filtered by limit, event name and time."""
    as_json = _check_output(output)
    start = parse_time(since or "1h")
    end = parse_time(until) if until else None
    body = {"filter": {**event_filter(limit, event, start, end), "order": "DESC"}, "limit": min(count, 50)}

    async def work(client: SlotkeeperClient) -> list[dict[str, Any]]:
        page = await client.request("POST", "/events/filter", body)
        found: list[dict[str, Any]] = list(page["events"])
        while len(found) < count and page.get("next_page"):
            token = parse_qs(urlsplit(page["next_page"]).query).get("page-token", [""])[0]
            page = await client.request("GET", f"/events/filter/next?page-token={quote(token)}")
            found.extend(page["events"])
        return found[:count]

    found = list(reversed(_call(ctx, work)))
    if as_json:
        _print_json(found)
    else:
        _print_table(_events_table(found))


@events_app.command("tail")
def events_tail(
    ctx: typer.Context,
    limit: LimitOption = None,
    event: EventOption = None,
    backfill: Annotated[
        bool, typer.Option("--backfill/--no-backfill", help="Start with the events of the last minutes.")
    ] = False,
    output: OutputOption = None,
) -> None:
    """Print events as they are committed (the live websocket) until Ctrl-C."""
    as_json = _check_output(output)
    console = Console()
    since = datetime.now(UTC) - timedelta(minutes=15)
    subscription = {
        "type": "filter",
        "filter": event_filter(limit, event, since, None),
        "backfill": backfill,
    }

    async def work(client: SlotkeeperClient) -> None:
        parts = urlsplit(client.base_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        url = f"{scheme}://{parts.netloc}{parts.path}/events/out"
        token = ctx.obj.auth_string if ctx.obj is not None else None
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.ws_connect(url, protocols=("prefect",), heartbeat=30) as ws,
            ):
                await ws.send_json({"type": "auth", "token": token})
                answer = await ws.receive_json()
                if answer.get("type") != "auth_success":
                    raise ServerUnreachable(f"{url} refused the subscription: {answer}")
                await ws.send_json(subscription)
                reason = ""
                async for message in ws:
                    if message.type != aiohttp.WSMsgType.TEXT:
                        reason = str(message.extra or "")
                        break
                    data = orjson.loads(message.data)
                    if data.get("type") != "event":
                        continue
                    if as_json:
                        typer.echo(orjson.dumps(data["event"]).decode())
                    else:
                        console.print(*_line(data["event"]))
                close = ws.close_code
                if close not in (None, 1000):
                    raise ServerUnreachable(f"{url} closed the subscription ({close}: {reason})")
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 401:
                raise ServerUnreachable(
                    f"{url} refused the subscription (401 Unauthorized): set SLOTKEEPER_API_AUTH_STRING"
                ) from exc
            raise ServerUnreachable(f"Could not subscribe at {url}: {exc}") from exc
        except (aiohttp.ClientError, OSError, TypeError, ValueError) as exc:
            raise ServerUnreachable(f"Could not subscribe at {url}: {exc}") from exc

    with _until_interrupted():
        _call(ctx, work)


def _line(event: dict[str, Any]) -> list[Text]:
    occurred, name, limit, slots, holder, _ = event_row(event)
    text = Text.assemble(occurred, " ", (name.plain, "bold"), " ", limit)
    if slots.plain != "-":
        text.append(f" slots={slots.plain}")
    if holder.plain != "-":
        text.append(f" holder={holder.plain}")
    return [text]


@contextlib.contextmanager
def _until_interrupted() -> Any:
    """Ctrl-C (or SIGTERM) ends a live command quietly, with exit code 0."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- limit top -------------------------------------------------------------------------------------


def top_table(stats: dict[str, Any], rates: dict[str, float], interval: float) -> Table:
    """The busiest limits: in use (leases + pool) of the limit, waiters, grants per second."""
    shown = len(stats["limits"])
    table = Table(
        title=f"The {shown} busiest of {stats['total']} limits", caption=f"every {interval:g} s; Ctrl-C stops"
    )
    for column, justify in (
        ("Limit", "left"),
        ("In use", "right"),
        ("Leased", "right"),
        ("Pool", "right"),
        ("Waiters", "right"),
        ("Grants/s", "right"),
        ("Active", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for lim in stats["limits"]:
        used = lim["leased_slots"] + lim["pool_slots"]
        style = "red" if lim["active"] and used >= lim["limit"] else None
        table.add_row(
            _cell(lim["name"]),
            Text(f"{used}/{lim['limit']}", style=style or ""),
            _cell(lim["leased_slots"]),
            _cell(lim["pool_slots"]),
            _cell(lim["waiters"]),
            _cell(f"{rates.get(lim['id'], 0.0):.1f}"),
            _cell("yes" if lim["active"] else "no"),
        )
    return table


async def read_top(
    client: SlotkeeperClient, count: int, since: datetime
) -> tuple[dict[str, Any], dict[str, int]]:
    """The busiest ``count`` limits now, and the grants of each (by limit id) since ``since``."""
    stats = await client.request("POST", "/v2/concurrency_limits/stats", {"limit": count})
    body = {
        "filter": {
            "occurred": {"since": since.isoformat(), "until": datetime.now(UTC).isoformat()},
            "event": {"name": _ACQUIRED},
        },
    }
    counts = await client.request("POST", "/events/count-by/resource", body)
    grants = {str(c["value"]).rsplit(".", 1)[-1]: int(c["count"]) for c in counts}
    return stats, grants


@limit_app.command("top")
def top(
    ctx: typer.Context,
    count: Annotated[
        int, typer.Option("--count", "-n", min=1, max=200, help="How many limits to show.")
    ] = 20,
    interval: Annotated[
        float, typer.Option("--interval", min=0.2, max=3600, help="Seconds between updates.")
    ] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="Print one view and exit (no live view).")] = False,
) -> None:
    """A live view of the busiest limits (slots in use, waiters, grants/s), until Ctrl-C."""

    async def work(client: SlotkeeperClient) -> None:
        since = datetime.now(UTC) - timedelta(seconds=interval)
        stats, grants = await read_top(client, count, since)
        if once:
            _print_table(top_table(stats, {k: v / interval for k, v in grants.items()}, interval))
            return
        with Live(Group(top_table(stats, {}, interval)), auto_refresh=False) as live:
            while True:
                started = time.monotonic()
                stats, grants = await read_top(client, count, since)
                seconds = max((datetime.now(UTC) - since).total_seconds(), 1e-3)
                since = datetime.now(UTC)
                live.update(
                    top_table(stats, {k: v / seconds for k, v in grants.items()}, interval), refresh=True
                )
                await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    with _until_interrupted():
        _call(ctx, work)
