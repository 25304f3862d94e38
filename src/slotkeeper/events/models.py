"""Events on the wire, as Prefect's server validates them (reference §6.1-6.3, §6.7).

``Event`` is what clients send; ``ReceivedEvent`` adds ``received``. ``EventFilter`` is Prefect's
filter JSON. Validation limits (name length, labels, related resources, size) are Prefect's
defaults; :func:`check_size` enforces the 1.5 MB cap on the serialised event.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any
from uuid import UUID

import orjson
from pydantic import BaseModel, ConfigDict, Field, RootModel, field_validator, model_validator

MAX_EVENT_NAME_LENGTH = 1024
MAX_LABELS_PER_RESOURCE = 500
MAX_RELATED_RESOURCES = 100
MAX_EVENT_SIZE_BYTES = 1_500_000
MAX_TEXT_QUERY_LENGTH = 200


def _check_labels(labels: dict[str, str], *, role: bool) -> dict[str, str]:
    if not labels.get("prefect.resource.id"):
        raise ValueError("Resources must include the prefect.resource.id label")
    if role and not labels.get("prefect.resource.role"):
        raise ValueError("Related resources must include the prefect.resource.role label")
    if len(labels) > MAX_LABELS_PER_RESOURCE:
        raise ValueError(f"The maximum number of labels per resource is {MAX_LABELS_PER_RESOURCE}")
    return labels


class Resource(RootModel[dict[str, str]]):
    """A resource: flat string labels, ``prefect.resource.id`` required and non-empty."""

    @model_validator(mode="after")
    def _valid(self) -> Resource:
        _check_labels(self.root, role=False)
        return self

    @property
    def id(self) -> str:
        """The resource id label."""
        return self.root["prefect.resource.id"]


class RelatedResource(RootModel[dict[str, str]]):
    """A related resource: a resource that also has a non-empty ``prefect.resource.role``."""

    @model_validator(mode="after")
    def _valid(self) -> RelatedResource:
        _check_labels(self.root, role=True)
        return self

    @property
    def id(self) -> str:
        """The resource id label."""
        return self.root["prefect.resource.id"]

    @property
    def role(self) -> str:
        """The role label."""
        return self.root["prefect.resource.role"]


def _utc(value: datetime) -> datetime:
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:59:59-14:00 is in year 10000 in UTC
        raise ValueError("the date is out of range once in UTC (years 1 to 9999)") from None


class Event(BaseModel):
    """An event as a client sends it. Unknown keys are ignored, as Prefect does."""

    model_config = ConfigDict(extra="ignore")

    occurred: datetime
    event: str = Field(max_length=MAX_EVENT_NAME_LENGTH, min_length=1)
    resource: Resource
    related: list[RelatedResource] = Field(default_factory=list, max_length=MAX_RELATED_RESOURCES)
    payload: dict[str, Any] = Field(default_factory=dict)
    id: UUID
    follows: UUID | None = None

    _utc_occurred = field_validator("occurred")(_utc)


class ReceivedEvent(Event):
    """An event as the server stored it: with the time it was received."""

    received: datetime

    _utc_received = field_validator("received")(_utc)


def check_size(event: Event) -> None:
    """Refuse an event whose JSON is over the size limit (ValueError)."""
    size = len(event.model_dump_json().encode())
    if size > MAX_EVENT_SIZE_BYTES:
        raise ValueError(f"Event is {size} bytes; the limit is {MAX_EVENT_SIZE_BYTES} bytes")


# --- filters ------------------------------------------------------------------------------------


class _Filter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _no_nul(self) -> Any:
        # PostgreSQL text cannot hold NUL: a filter string with one made its driver raise (a
        # 500, a websocket closed without a code) where SQLite answered 200. No stored string
        # holds NUL (ingest refuses it), so it is refused on both backends, as invalid.
        for name in type(self).model_fields:
            if _holds_nul(getattr(self, name)):
                raise ValueError(f"{name}: a filter string must not contain the NUL character")
        return self


def _holds_nul(value: Any) -> bool:
    """Whether a string in ``value`` (a string, or lists, tuples and dicts of them) holds NUL;
    nested filters check their own."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, list | tuple):
        return any(_holds_nul(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    return False


def _default_since() -> datetime:
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=180)


def _now() -> datetime:
    return datetime.now(UTC)


#: A label specification: every label listed must match; the values of one label are ORed;
#: ``*`` and ``?`` are globs; a leading ``!`` negates a value; an empty list matches nothing.
LabelSpec = dict[str, str | list[str]]


class EventOccurredFilter(_Filter):
    """Events that occurred in [since, until] (both inclusive)."""

    since: datetime = Field(default_factory=_default_since)
    until: datetime = Field(default_factory=_now)

    _utc_since = field_validator("since")(_utc)
    _utc_until = field_validator("until")(_utc)


class EventNameFilter(_Filter):
    """Event names: by prefix or exact name, with exclusions."""

    prefix: list[str] | None = None
    exclude_prefix: list[str] | None = None
    name: list[str] | None = None
    exclude_name: list[str] | None = None


class EventResourceFilter(_Filter):
    """The primary resource: exact ids, id prefixes, labels; ``distinct`` keeps the latest per id."""

    id: list[str] | None = None
    id_prefix: list[str] | None = None
    labels: LabelSpec | None = None
    distinct: bool = False


class EventRelatedFilter(_Filter):
    """A related resource (ANDed when a list is given)."""

    id: list[str] | None = None
    role: list[str] | None = None
    resources_in_roles: list[tuple[str, str]] | None = None
    labels: LabelSpec | None = None


class EventAnyResourceFilter(_Filter):
    """The primary resource or any related one."""

    id: list[str] | None = None
    id_prefix: list[str] | None = None
    labels: LabelSpec | None = None


class EventIDFilter(_Filter):
    """Events with these ids."""

    id: list[UUID] | None = None


class EventTextFilter(_Filter):
    """Case-insensitive text search: terms ORed, ``-term``/``!term`` excluded, ``+term`` required,
    ``"quoted phrases"`` kept whole; over the name, label values and payload."""

    query: str = Field(max_length=MAX_TEXT_QUERY_LENGTH)


class EventOrder(StrEnum):
    """Result order by ``occurred``."""

    ASC = "ASC"
    DESC = "DESC"


class EventFilter(_Filter):
    """Prefect's ``EventFilter``."""

    occurred: EventOccurredFilter = Field(default_factory=EventOccurredFilter)
    event: EventNameFilter | None = None
    resource: EventResourceFilter | None = None
    related: EventRelatedFilter | list[EventRelatedFilter] | None = None
    any_resource: EventAnyResourceFilter | list[EventAnyResourceFilter] | None = None
    id: EventIDFilter = Field(default_factory=EventIDFilter)
    text: EventTextFilter | None = None
    order: EventOrder = EventOrder.DESC


_EPOCH = datetime(1970, 1, 1)


def iso(ts: float) -> str:
    """Epoch seconds as ISO 8601 UTC with microseconds and ``Z``: the one way slotkeeper writes a
    time (events, limits, leases, counts).

    The year always has four digits (``0999-06-15T...``): ``strftime("%Y")`` writes ``999``, which
    is not ISO 8601, and which neither Prefect's client nor ``datetime.fromisoformat`` (the
    PostgreSQL listener) can read back. (Adding to the epoch is also quicker than
    ``fromtimestamp(ts, UTC)``, and rounds the same.)
    """
    return (_EPOCH + timedelta(seconds=ts)).isoformat(timespec="microseconds") + "Z"


@dataclass(frozen=True, slots=True)
class EventRecord:
    """An event inside slotkeeper: what the store holds and the live stream carries.

    Times are epoch seconds. Server-written slot events are built as records directly (no
    validation round trip on the hot path); client events become records once validated.
    """

    id: str
    occurred: float
    event: str
    resource: dict[str, str]
    related: list[dict[str, str]] = field(default_factory=list)
    payload: dict[str, Any] = field(default_factory=dict)
    follows: str | None = None
    received: float = 0.0
    #: Why a released event's slots came back (``events.builders.ENDED_BY``), set by the process
    #: that wrote it, for its own observers (metrics, logs); never stored nor sent (None there).
    cause: str | None = field(default=None, compare=False)

    @property
    def resource_id(self) -> str:
        """The primary resource's id."""
        return self.resource["prefect.resource.id"]

    def wire(self) -> dict[str, Any]:
        """The JSON object Prefect sends for a received event."""
        return {
            "occurred": iso(self.occurred),
            "event": self.event,
            "resource": self.resource,
            "related": self.related,
            "payload": self.payload,
            "id": self.id,
            "follows": self.follows,
            "received": iso(self.received),
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> EventRecord:
        """The inverse of :meth:`wire`."""
        return cls(
            id=data["id"],
            occurred=datetime.fromisoformat(data["occurred"]).timestamp(),
            event=data["event"],
            resource=data["resource"],
            related=data["related"],
            payload=data["payload"],
            follows=data["follows"],
            received=datetime.fromisoformat(data["received"]).timestamp(),
        )

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> EventRecord:
        """From ``SELECT id, occurred, received, event, resource, related, payload, follows``."""
        return cls(
            id=row[0],
            occurred=row[1],
            received=row[2],
            event=row[3],
            resource=orjson.loads(row[4]),
            related=orjson.loads(row[5]),
            payload=orjson.loads(row[6]),
            follows=row[7],
        )

    @classmethod
    def from_event(cls, event: Event, received: float) -> EventRecord:
        """A validated client event, received at ``received``."""
        return cls(
            id=str(event.id),
            occurred=event.occurred.timestamp(),
            event=event.event,
            resource=dict(event.resource.root),
            related=[dict(r.root) for r in event.related],
            payload=event.payload,
            follows=str(event.follows) if event.follows else None,
            received=received,
        )
