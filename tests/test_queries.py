"""The row types of ``storage/queries.py`` name the columns their statements return, in order.

Each statement runs, on an empty migrated database of each backend, inside a transaction that is
rolled back; the driver's column names must be the row type's field names.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest

from slotkeeper.storage import Storage
from slotkeeper.storage import queries as q
from slotkeeper.storage.tx import Tx

ID = "00000000-0000-0000-0000-000000000000"
#: Every statement whose rows scripts read by column name, with that row type and parameters.
TYPED: list[tuple[str, type[NamedTuple], dict[str, Any]]] = [
    ("SELECT_LIMIT_BY_ID", q.LimitRow, {"key": ID}),
    ("SELECT_LIMIT_BY_NAME", q.LimitRow, {"key": "x"}),
    ("SELECT_LIMITS_BY_NAMES", q.LimitRow, {"names": ["x"]}),
    ("SELECT_LIMITS_BY_IDS", q.LimitRow, {"ids": [ID]}),
    ("SELECT_LIMITS_OF_LEASE", q.LimitRow, {"id": ID}),
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


#: Statements whose rows are a limit's columns (``q.LimitRow``, ``q.LIMIT_WIDTH`` of them), then
#: those of another row type.
AFTER_A_LIMIT: list[tuple[str, type[NamedTuple], dict[str, Any]]] = [
    ("SELECT_LIMIT_STATES_BY_NAMES", q.LimitState, {"names": ["x"], "now": 0.0}),
    ("SELECT_LEASE_LIMITS", q.LeaseLimit, {"id": ID}),
]


class _Rollback(Exception):
    pass


async def _columns(storage: Storage, statement: str, params: dict[str, Any]) -> list[str]:
    seen: list[list[str]] = []

    def columns(tx: Tx) -> None:
        tx.all(getattr(q, statement), params)
        seen.append([d[0] for d in tx._cursor.description])
        raise _Rollback

    with pytest.raises(_Rollback):
        await storage.backend.run(columns)
    return seen[0]


@pytest.mark.parametrize(("statement", "row", "params"), TYPED, ids=[t[0] for t in TYPED])
async def test_a_row_type_names_its_statements_columns(
    storage: Storage, statement: str, row: type[NamedTuple], params: dict[str, Any]
) -> None:
    assert await _columns(storage, statement, params) == list(row._fields)


@pytest.mark.parametrize(("statement", "row", "params"), AFTER_A_LIMIT, ids=[t[0] for t in AFTER_A_LIMIT])
async def test_a_limit_then_a_row_type_name_the_columns(
    storage: Storage, statement: str, row: type[NamedTuple], params: dict[str, Any]
) -> None:
    columns = await _columns(storage, statement, params)
    assert columns[: q.LIMIT_WIDTH] == list(q.LimitRow._fields)
    assert columns[q.LIMIT_WIDTH :] == list(row._fields)
