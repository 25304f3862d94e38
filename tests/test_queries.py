"""The row types of ``storage/queries.py`` name the columns their statements return, in order.

Each statement runs, on an empty migrated database of each backend, inside a transaction that is
rolled back; the driver's column names must be the row type's field names.
"""

from __future__ import annotations

import collections
from typing import Any, NamedTuple, cast

import pytest

from slotkeeper.storage import Storage
from slotkeeper.storage import queries as q
from slotkeeper.storage.tx import Tx

ID = "00000000-0000-0000-0000-000000000000"


def after_a_limit(row: type[NamedTuple]) -> type[NamedTuple]:
    """The row type of a statement that reads a limit's columns (as ``q.LimitRow``, the first
    ``q.LIMIT_WIDTH``), then those of ``row``."""
    fields = [*q.LimitRow._fields, *row._fields]
    return cast(type[NamedTuple], collections.namedtuple(row.__name__, fields))


#: Every statement whose rows scripts read by column name, with that row type and parameters.
TYPED: list[tuple[str, type[NamedTuple], dict[str, Any]]] = [
    ("SELECT_LIMIT_BY_ID", q.LimitRow, {"key": ID}),
    ("SELECT_LIMIT_BY_NAME", q.LimitRow, {"key": "x"}),
    ("SELECT_LIMITS_BY_NAMES", q.LimitRow, {"names": ["x"]}),
    ("SELECT_LIMITS_BY_IDS", q.LimitRow, {"ids": [ID]}),
    ("SELECT_LIMITS_OF_LEASE", q.LimitRow, {"id": ID}),
    ("SELECT_LIMIT_STATES_BY_NAMES", after_a_limit(q.LimitState), {"names": ["x"], "now": 0.0}),
    ("SELECT_LEASE_LIMITS", after_a_limit(q.LeaseLimit), {"id": ID}),
    ("SELECT_LIMITS_PAGE", q.LimitRow, {"limit": 1, "offset": 0}),
    ("SELECT_LIMITS_PAGE_WITH_PREFIX", q.LimitRow, {"prefix": "tag:", "limit": 1, "offset": 0}),
    ("PEEK_LIMIT_BY_ID", q.LimitRow, {"key": ID}),
    ("PEEK_LIMIT_BY_NAME", q.LimitRow, {"key": "x"}),
    ("DELETE_LEASE", q.EndedLeaseRow, {"id": ID}),
    ("DELETE_LEASE_IF_EXPIRED", q.EndedLeaseRow, {"id": ID, "now": 0.0}),
    ("SELECT_LIMIT_GRANTS", q.LimitGrantRow, {"id": ID}),
    ("SELECT_LIMIT_LEASES", q.LimitLeaseRow, {"id": ID, "now": 0.0}),
    ("SELECT_WAITERS_ON", q.QueuedWaiterRow, {"ids": [ID]}),
    ("SELECT_WAITERS_ON_LEASE", q.QueuedWaiterRow, {"id": ID}),
    ("SELECT_WAITER_LEASE", q.WaiterOutcomeRow, {"id": ID}),
    ("SELECT_WAITER_STATE", q.WaiterStateRow, {"id": ID}),
    ("SELECT_OUTBOX", q.OutboxRow, {"batch": 1}),
]


class _Rollback(Exception):
    pass


@pytest.mark.parametrize(("statement", "row", "params"), TYPED, ids=[t[0] for t in TYPED])
async def test_a_row_type_names_its_statements_columns(
    storage: Storage, statement: str, row: type[NamedTuple], params: dict[str, Any]
) -> None:
    seen: list[list[str]] = []

    def columns(tx: Tx) -> None:
        tx.all(getattr(q, statement), params)
        seen.append([d[0] for d in tx._cursor.description])
        raise _Rollback

    with pytest.raises(_Rollback):
        await storage.backend.run(columns)
    assert seen == [list(row._fields)]
