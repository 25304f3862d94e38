"""The little that differs between SQLite and PostgreSQL: how statements and parameters are spelled.

The transaction handle scripts use is :class:`slotkeeper.storage.tx.Tx`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

_PARAM = re.compile(r"(?<![:\w]):(\w+)")
_IN_LIST = re.compile(r"IN_LIST\((\w+)\)")

#: A row as the drivers return it; ``queries.py`` names the columns of each statement's rows.
Row = tuple[Any, ...]
#: The fixed statements of queries.py fit many times over; filters compile to open-ended shapes.
_CACHE_SIZE = 1024
#: The parameter values that travel as JSON lists to SQLite.
_SEQUENCES = (list, tuple)
Params = Mapping[str, Any]


@dataclass
class Dialect:
    """How one backend spells the macros of ``queries.py`` and passes list parameters."""

    name: str
    for_update: str
    #: The next place in the waiters' arrival order (see ``schema.waiters``).
    next_waiter_sequence: str
    _cache: dict[str, tuple[str, bool, bool]] = field(default_factory=dict)

    def prepared(self, query: str) -> tuple[str, bool, bool]:
        """What every statement needs, cached per statement (one lookup): its text as this
        backend's driver takes it, whether it only :meth:`reads`, and whether its parameters
        go through :meth:`params` (on SQLite, only a statement that reads a list parameter
        with ``json_each`` takes one: ``IN_LIST``, the event filters)."""
        known = self._cache.get(query)
        if known is None:
            text = self._expand(query)
            lists = self.name != "sqlite" or "json_each(:" in text
            known = (text, query.lstrip()[:6].upper() == "SELECT", lists)
            if len(self._cache) < _CACHE_SIZE:  # statements built per filter shape are not kept
                self._cache[query] = known
        return known

    def sql(self, query: str) -> str:
        """The statement as this backend's driver takes it (cached per statement)."""
        return self.prepared(query)[0]

    def reads(self, query: str) -> bool:
        """Whether the statement only reads (a SELECT, row locks included): it changes nothing
        a rollback would have to undo."""
        return self.prepared(query)[1]

    def _expand(self, query: str) -> str:
        text = query.replace("FOR_UPDATE", self.for_update)
        text = text.replace("NEXT_WAITER_SEQUENCE", self.next_waiter_sequence)
        if self.name == "sqlite":
            return _IN_LIST.sub(r"IN (SELECT value FROM json_each(:\1))", text)
        text = _IN_LIST.sub(r"= ANY(:\1)", text)
        text = text.replace("%", "%%")
        return _PARAM.sub(r"%(\1)s", text)

    def params(self, params: Params) -> Params:
        """List parameters travel as JSON text to SQLite and as arrays to PostgreSQL."""
        if self.name != "sqlite":
            return params
        # Every statement passes here: a loop over a tuple of types costs a third of ``any()``
        # over a generator with ``list | tuple`` (about 2 µs per statement on the reference machine).
        for value in params.values():
            if isinstance(value, _SEQUENCES):
                return {k: json.dumps(v) if isinstance(v, _SEQUENCES) else v for k, v in params.items()}
        return params


#: SQLite's one writer inserts waiters one at a time: the largest plus one. PostgreSQL draws from
#: one sequence, which every server process shares.
SQLITE = Dialect(
    "sqlite", for_update="", next_waiter_sequence="(SELECT COALESCE(MAX(sequence), 0) + 1 FROM waiters)"
)
POSTGRES = Dialect(
    "postgresql", for_update=" FOR UPDATE", next_waiter_sequence="nextval('waiters_sequence_seq')"
)
