"""Wire models: request bodies as Prefect's server validates them, and response shapes.

Field names, defaults and ranges follow Prefect 3.8.8's server (``prefect/server/schemas/actions.py``
and ``prefect/server/api/concurrency_limits_v2.py``);
the bounds that are settings here (lease durations) are built per app by
:func:`lease_models`. Responses are plain dicts built by the ``*_json`` functions, serialised
with orjson: FastAPI's response-model path costs more than the whole storage round trip.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal, TypeVar
from uuid import UUID

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    create_model,
    field_validator,
)
from pydantic_core import PydanticCustomError

from slotkeeper import domain
from slotkeeper.domain import Limit, Mode
from slotkeeper.errors import InvalidRequest
from slotkeeper.events.models import iso as iso  # the one way times are written
from slotkeeper.models import LeaseInfo, LimitView

#: Integers are stored as 32-bit on PostgreSQL; larger values are refused at the edge.
MAX_INT = 2**31 - 1


class Strict(BaseModel):
    """Unknown keys and non-finite floats are errors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _storable(value: str) -> str:
    # PostgreSQL text cannot hold NUL nor a lone surrogate (not UTF-8): refused here as 422 on
    # both backends, instead of a 500 from the driver.
    if "\x00" in value:
        raise ValueError("a limit name must not contain the NUL character")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError("a limit name must be valid Unicode (no lone surrogates)") from None
    return value


#: A limit name or id as a request refers to it (path, ``names`` lists).
NameRef = Annotated[str, AfterValidator(_storable)]


def not_blank(value: str) -> str:
    """Refuse a name (or tag) that is only whitespace: it cannot be told apart when listed."""
    if not value.strip():
        raise ValueError("a name must not be blank (only whitespace)")
    return value


def _name(value: str) -> str:
    _storable(value)
    not_blank(value)
    if domain.looks_like_uuid(value):
        raise ValueError("a limit name must not be a UUID: it could not be told from an id")
    return value


class LimitCreate(Strict):
    """Body of ``POST /api/v2/concurrency_limits/``."""

    name: str = Field(pattern=domain.NAME_PATTERN, max_length=1024)
    limit: int = Field(ge=0, le=MAX_INT)
    active: bool = True
    active_slots: int = Field(default=0, ge=0, le=MAX_INT)
    denied_slots: int = Field(default=0, ge=0, le=MAX_INT)
    slot_decay_per_second: float = Field(default=0.0, ge=0, le=1e9)

    _check_name = field_validator("name")(_name)


class LimitUpdate(Strict):
    """Body of ``PATCH /api/v2/concurrency_limits/{id_or_name}``: only the keys sent change."""

    name: str | None = Field(default=None, pattern=domain.NAME_PATTERN, max_length=1024)
    limit: int | None = Field(default=None, ge=0, le=MAX_INT)
    active: bool | None = None
    active_slots: int | None = Field(default=None, ge=0, le=MAX_INT)
    denied_slots: int | None = Field(default=None, ge=0, le=MAX_INT)
    slot_decay_per_second: float | None = Field(default=None, ge=0, le=1e9)

    @field_validator("*", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        # A key left out keeps its value; an explicit null would change nothing, silently
        # (Prefect: a 409 from the column's NOT NULL). Say so instead.
        if value is None:
            raise PydanticCustomError(
                "null_not_allowed", "Input should not be null: leave the field out to keep its value"
            )
        return value

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        return None if value is None else _name(value)


class LimitFilter(Strict):
    """Body of ``POST /api/v2/concurrency_limits/filter`` (page bounds: :func:`page_size`)."""

    limit: int | None = None
    offset: int = Field(default=0, ge=0, le=MAX_INT)


def page_size(body: LimitFilter, page_max: int) -> int:
    """The page size a filter asks for: the server's maximum by default, refused (422, Prefect's
    messages) above it or below 0."""
    limit = page_max if body.limit is None else body.limit
    if limit > page_max:
        raise InvalidRequest(f"Invalid limit: must be less than or equal to {page_max}.")
    if limit < 0:
        raise InvalidRequest("Invalid limit: must be greater than or equal to 0.")
    return limit


class HolderModel(Strict):
    """Who holds a lease (Prefect's ``ConcurrencyLeaseHolder``)."""

    type: Literal["flow_run", "task_run", "deployment"]
    id: UUID


class Increment(Strict):
    """Body of ``POST /api/v2/concurrency_limits/increment``."""

    names: list[NameRef]
    slots: int = Field(gt=0, le=MAX_INT)
    mode: Mode = Mode.CONCURRENCY
    create_if_missing: bool | None = Field(default=None, description="Deprecated and ignored.")


class Decrement(Strict):
    """Body of ``POST /api/v2/concurrency_limits/decrement``."""

    names: list[NameRef]
    slots: int = Field(gt=0, le=MAX_INT)
    occupancy_seconds: float | None = Field(default=None, gt=0, le=domain.MAX_OCCUPANCY_SECONDS)
    create_if_missing: bool | None = Field(default=None, description="Deprecated and ignored.")


class DecrementWithLease(Strict):
    """Body of ``POST /api/v2/concurrency_limits/decrement-with-lease``."""

    lease_id: UUID


#: Priority bounds of a waiting acquisition (higher is served first).
MIN_PRIORITY, MAX_PRIORITY = -1000, 1000


M = TypeVar("M", bound=BaseModel)


def _few(max_names: int, value: Any) -> Any:
    if isinstance(value, list) and len(value) > max_names:
        raise PydanticCustomError(
            "too_long",
            "List should have at most {max_length} items, not {actual_length} (SLOTKEEPER_MAX_NAMES)",
            {"field_type": "List", "max_length": max_names, "actual_length": len(value)},
        )
    return value


def names_capped(model: type[M], max_names: int) -> type[M]:
    """``model`` with at most ``max_names`` in its ``names`` list (``SLOTKEEPER_MAX_NAMES``).

    The length is checked before the names are validated one by one, so a list of millions costs
    only its parsing, and never reaches storage (it froze SQLite for seconds).
    """
    names: Any = Annotated[
        list[NameRef], BeforeValidator(functools.partial(_few, max_names)), Field(max_length=max_names)
    ]
    capped: type[M] = create_model(
        model.__name__, __base__=model, __doc__=model.__doc__, __module__=model.__module__, names=(names, ...)
    )
    return capped


def lease_models(
    min_seconds: float, max_seconds: float, max_wait: float
) -> tuple[type[Strict], type[Strict]]:
    """The increment-with-lease and renew bodies, with this server's lease and wait bounds.

    ``wait_seconds`` and ``priority`` are slotkeeper's additions (absent, the endpoint behaves as
    Prefect's): wait up to that long in the limits' queue instead of answering 423 at once.
    ``waiter_id`` (with ``wait_seconds``): the place of a waiter answered 503 at a shutdown.
    """
    duration: Any = (float, Field(default=300.0, ge=min_seconds, le=max_seconds))
    with_lease = create_model(
        "IncrementWithLease",
        __base__=Strict,
        names=(list[NameRef], ...),
        slots=(int, Field(gt=0, le=MAX_INT)),
        mode=(Mode, Mode.CONCURRENCY),
        lease_duration=duration,
        holder=(HolderModel | None, None),
        wait_seconds=(float | None, Field(default=None, gt=0, le=max_wait)),
        priority=(int, Field(default=0, ge=MIN_PRIORITY, le=MAX_PRIORITY)),
        # A waiter answered 503 at a server's shutdown: the retry takes its place back.
        waiter_id=(UUID | None, None),
    )
    renew = create_model("RenewLease", __base__=Strict, lease_duration=duration)
    return with_lease, renew


def limit_json(view: LimitView) -> dict[str, Any]:
    """``GlobalConcurrencyLimitResponse``: GET and filter."""
    lim = view.limit
    return {
        "id": lim.id,
        "created": iso(lim.created),
        "updated": iso(lim.updated),
        "active": lim.active,
        "name": lim.name,
        "limit": lim.limit,
        "active_slots": view.active_slots,
        "slot_decay_per_second": lim.slot_decay_per_second,
    }


def full_limit_json(view: LimitView) -> dict[str, Any]:
    """The full model that create answers with (201)."""
    lim = view.limit
    return {
        **limit_json(view),
        "denied_slots": lim.denied_slots,
        "avg_slot_occupancy_seconds": lim.avg_slot_occupancy_seconds,
    }


def minimal_json(lim: Limit, *, fencing: bool = False) -> dict[str, Any]:
    """``MinimalConcurrencyLimitResponse``; with ``fencing``, the grant's fencing token too."""
    out: dict[str, Any] = {"id": lim.id, "name": lim.name, "limit": lim.limit}
    if fencing:
        out["fencing_token"] = lim.fencing_token
    return out


def lease_json(info: LeaseInfo) -> dict[str, Any]:
    """One live lease, for ``GET /api/v2/concurrency_limits/{id_or_name}/leases``."""
    return {
        "lease_id": info.lease_id,
        "holder": {"type": info.holder.type, "id": info.holder.id} if info.holder else None,
        "slots": info.slots,
        "created": iso(info.created),
        "expires": iso(info.expires),
        "fencing_token": info.fencing_token,
    }
