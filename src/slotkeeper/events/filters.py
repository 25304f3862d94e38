"""One :class:`~slotkeeper.events.models.EventFilter`, two evaluators that agree.

* :func:`matches` decides in Python whether one event passes: the live websocket stream uses it.
  Unlike Prefect, whose live stream ignores ``related``, every criterion applies.
* :func:`compile` turns the filter into a SQL condition over ``events e`` (with subqueries on
  ``event_resources r``) for SQLite or PostgreSQL: the store uses it.

A hypothesis test (``tests/test_event_filters.py``) checks that both select the same events.
The semantics are Prefect's (reference §6.7), restated:

* ``occurred``: ``since <= occurred <= until``, both inclusive.
* ``event``: ``prefix`` (any of), ``exclude_prefix`` (none of), ``name`` (any of),
  ``exclude_name`` (none of). Prefixes are literal: ``%`` and ``_`` are not wildcards.
* ``resource``: the primary resource's ``id`` (any of), ``id_prefix`` (any of) and ``labels``.
  ``distinct`` (only the first event per resource id in the requested order) is applied by the
  store's SQL only: :func:`matches` judges one event at a time and ignores it.
* ``related`` (one filter or a list, each must hold): some *related* resource satisfies every
  criterion of the filter at once: ``id``, ``role``, ``resources_in_roles`` (``[id, role]`` pairs,
  any of) and ``labels``. The primary resource never counts (in Prefect it would count for
  ``role: [""]``, an artifact of its storage layout). A filter without criteria passes everything.
* ``any_resource`` (one or a list, each must hold): the primary resource *or* some related one
  satisfies ``id``, ``id_prefix`` and ``labels`` at once.
* ``id``: the event id is one of these.
* ``text``: Prefect's query syntax (:func:`parse_text_query`), case-insensitive substring search
  over :func:`search_text`: the name, every label value and the payload as JSON.

Empty lists of ids, prefixes, names or roles are ignored, as Prefect does. Labels
(:data:`~slotkeeper.events.models.LabelSpec`) are stricter: every label listed must match; one
label's values are alternatives; ``*`` matches any run of characters and ``?`` exactly one (no
other character is special); a leading ``!`` negates one value; an empty value list matches
nothing; a label the resource lacks never matches, negated or not. Matching is case-sensitive
on both backends (SQLite ``GLOB``, PostgreSQL ``LIKE``), as in Python.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import orjson

from slotkeeper.events.models import (
    EventAnyResourceFilter,
    EventFilter,
    EventNameFilter,
    EventOccurredFilter,
    EventRecord,
    EventRelatedFilter,
    EventResourceFilter,
    LabelSpec,
)

__all__ = [
    "TextQuery",
    "compile",
    "glob_matches",
    "matches",
    "parse_text_query",
    "search_text",
    "with_defaults",
]

SQLITE = "sqlite"
POSTGRESQL = "postgresql"

RESOURCE_ID = "prefect.resource.id"
RESOURCE_ROLE = "prefect.resource.role"

#: How far back the default ``occurred.since`` reaches, from the start of today (UTC).
DEFAULT_LOOKBACK = timedelta(days=180)

T = TypeVar("T")


# --- shared pieces --------------------------------------------------------------------------------


def with_defaults(event_filter: EventFilter, now: float) -> EventFilter:
    """A copy whose unset ``occurred`` bounds are Prefect's defaults, computed at ``now``.

    The wire model fills defaults from the wall clock at parse time; the server's clock (a fake
    one in tests) is the one that counts. Bounds the client gave are kept as they are.
    """
    given = event_filter.occurred.model_fields_set
    moment = datetime.fromtimestamp(now, UTC)
    start_of_day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    occurred = EventOccurredFilter(
        since=event_filter.occurred.since if "since" in given else start_of_day - DEFAULT_LOOKBACK,
        until=event_filter.occurred.until if "until" in given else moment,
    )
    return event_filter.model_copy(update={"occurred": occurred})


def search_text(record: EventRecord) -> str:
    """What the text filter searches: name, label values and payload JSON, lower-cased.

    Identical to the ``search`` column the store writes, so both evaluators see the same text.
    """
    parts = [record.event, *record.resource.values()]
    for related in record.related:
        parts.extend(related.values())
    parts.append(orjson.dumps(record.payload).decode())
    return " ".join(parts).lower()


@dataclass(frozen=True, slots=True)
class TextQuery:
    """A parsed text query: any ``include`` term, no ``exclude`` term, every ``required`` term."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    required: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        """True when the query constrains nothing."""
        return not (self.include or self.exclude or self.required)


def _unescape(phrase: str) -> str:
    r"""Inside quotes ``\"`` is a quote and ``\\`` a backslash; any other backslash stays."""
    out: list[str] = []
    i = 0
    while i < len(phrase):
        char = phrase[i]
        if char == "\\" and i + 1 < len(phrase) and phrase[i + 1] in '"\\':
            out.append(phrase[i + 1])
            i += 2
        else:
            out.append(char)
            i += 1
    return "".join(out)


@functools.lru_cache(maxsize=1024)
def parse_text_query(query: str) -> TextQuery:
    """Parse Prefect's text query syntax (``prefect.server.utilities.text_search_parser``).

    Terms are separated by whitespace and ORed. A ``-`` or ``!`` glued to a term excludes it, a
    ``+`` requires it; a prefix followed by whitespace is dropped. ``"quoted phrases"`` keep their
    spaces (``\\"`` escapes a quote; an unclosed quote runs to the end); a phrase of only spaces
    is ignored. A quote also ends an unquoted term.
    """
    include: list[str] = []
    exclude: list[str] = []
    required: list[str] = []
    buckets = {None: include, "-": exclude, "!": exclude, "+": required}
    i, n = 0, len(query)
    while i < n:
        if query[i].isspace():
            i += 1
            continue
        prefix: str | None = None
        if query[i] in "-!+":
            if i + 1 >= n or query[i + 1].isspace():
                i += 1  # a lone prefix is not a term
                continue
            prefix = query[i]
            i += 1
        if query[i] == '"':
            start = i = i + 1
            while i < n and query[i] != '"':
                i += 2 if query[i] == "\\" and i + 1 < n else 1
            phrase = _unescape(query[start:i])
            i += 1  # past the closing quote, if any
            if phrase.strip():
                buckets[prefix].append(phrase)
            continue
        start = i
        while i < n and not query[i].isspace() and query[i] != '"':
            i += 1
        buckets[prefix].append(query[start:i])
    return TextQuery(tuple(include), tuple(exclude), tuple(required))


def _text_matches(query: TextQuery, text: str) -> bool:
    if query.include and not any(term.lower() in text for term in query.include):
        return False
    if any(term.lower() in text for term in query.exclude):
        return False
    return all(term.lower() in text for term in query.required)


def _wildcard(pattern: str, value: str) -> bool:
    """``*``/``?`` matching in O(len(pattern) x len(value)) at worst: no regex backtracking."""
    if "*" not in pattern and "?" not in pattern:
        return pattern == value
    p = v = 0
    star, mark = -1, 0
    while v < len(value):
        if p < len(pattern) and (pattern[p] == "?" or (pattern[p] != "*" and pattern[p] == value[v])):
            p += 1
            v += 1
        elif p < len(pattern) and pattern[p] == "*":
            star, mark = p, v
            p += 1
        elif star >= 0:
            p = star + 1
            mark += 1
            v = mark
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


def glob_matches(pattern: str, value: str | None) -> bool:
    """Does ``value`` match one label pattern? ``!`` negates; a missing value never matches."""
    if value is None:
        return False
    if pattern.startswith("!"):
        return not _wildcard(pattern[1:], value)
    return _wildcard(pattern, value)


def _values(spec: str | list[str]) -> list[str]:
    return [spec] if isinstance(spec, str) else spec


def _listed(value: T | list[T] | None) -> list[T]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


# --- Python evaluator -----------------------------------------------------------------------------


def _labels_match(labels: LabelSpec, resource: Mapping[str, str]) -> bool:
    return all(
        any(glob_matches(pattern, resource.get(label)) for pattern in _values(spec))
        for label, spec in labels.items()
    )


def _name_matches(criteria: EventNameFilter, name: str) -> bool:
    if criteria.prefix and not any(name.startswith(p) for p in criteria.prefix):
        return False
    if criteria.exclude_prefix and any(name.startswith(p) for p in criteria.exclude_prefix):
        return False
    if criteria.name and name not in criteria.name:
        return False
    return not (criteria.exclude_name and name in criteria.exclude_name)


def _resource_matches(
    criteria: EventResourceFilter | EventAnyResourceFilter, resource: Mapping[str, str]
) -> bool:
    resource_id = resource.get(RESOURCE_ID, "")
    if criteria.id and resource_id not in criteria.id:
        return False
    if criteria.id_prefix and not any(resource_id.startswith(p) for p in criteria.id_prefix):
        return False
    return not (criteria.labels and not _labels_match(criteria.labels, resource))


def _related_matches(criteria: EventRelatedFilter, resource: Mapping[str, str]) -> bool:
    resource_id = resource.get(RESOURCE_ID)
    role = resource.get(RESOURCE_ROLE)
    if criteria.id and resource_id not in criteria.id:
        return False
    if criteria.role and role not in criteria.role:
        return False
    if criteria.resources_in_roles and (resource_id, role) not in criteria.resources_in_roles:
        return False
    return not (criteria.labels and not _labels_match(criteria.labels, resource))


def _related_constrains(criteria: EventRelatedFilter) -> bool:
    return bool(criteria.id or criteria.role or criteria.resources_in_roles or criteria.labels)


def _any_constrains(criteria: EventAnyResourceFilter) -> bool:
    return bool(criteria.id or criteria.id_prefix or criteria.labels)


def matches(event_filter: EventFilter, record: EventRecord) -> bool:
    """Does ``record`` pass ``event_filter``? Every criterion but ``resource.distinct`` applies."""
    occurred = event_filter.occurred
    if not occurred.since.timestamp() <= record.occurred <= occurred.until.timestamp():
        return False
    if event_filter.event is not None and not _name_matches(event_filter.event, record.event):
        return False
    if event_filter.resource is not None and not _resource_matches(event_filter.resource, record.resource):
        return False
    for related in _listed(event_filter.related):
        if _related_constrains(related) and not any(_related_matches(related, r) for r in record.related):
            return False
    for anyone in _listed(event_filter.any_resource):
        if _any_constrains(anyone) and not any(
            _resource_matches(anyone, r) for r in (record.resource, *record.related)
        ):
            return False
    if event_filter.id.id and record.id not in {str(i) for i in event_filter.id.id}:
        return False
    if event_filter.text is not None:
        query = parse_text_query(event_filter.text.query)
        if not query.empty and not _text_matches(query, search_text(record)):
            return False
    return True


# --- SQL compiler ---------------------------------------------------------------------------------


def _sqlite_glob(pattern: str) -> str:
    """Our glob as a SQLite GLOB pattern: only ``[`` is special there and not here."""
    return pattern.replace("[", "[[]")


def _like(pattern: str) -> str:
    """Our glob as a PostgreSQL LIKE pattern (default escape character: backslash)."""
    table = {"\\": "\\\\", "%": "\\%", "_": "\\_", "*": "%", "?": "_"}
    return "".join(table.get(char, char) for char in pattern)


class _Compiler:
    """Builds one condition; parameters are numbered in order, so one filter shape always
    compiles to the same text (the dialect caches statement texts)."""

    def __init__(self, dialect: str) -> None:
        if dialect not in (SQLITE, POSTGRESQL):
            raise ValueError(f"Unsupported SQL dialect {dialect!r}")
        self.sqlite = dialect == SQLITE
        self.params: dict[str, Any] = {}

    def param(self, value: Any) -> str:
        name = f"f{len(self.params)}"
        self.params[name] = value
        return f":{name}"

    def _each(self, values: Sequence[str], condition: str, *, negate_exists: bool = False) -> str:
        """``[NOT] EXISTS`` over a list parameter; ``{v}`` in ``condition`` is one element."""
        p = self.param(list(values))
        if self.sqlite:
            source, item = f"json_each({p}) AS x", "x.value"
        else:
            source, item = f"unnest(CAST({p} AS text[])) AS x(v)", "x.v"
        exists = f"EXISTS (SELECT 1 FROM {source} WHERE {condition.format(v=item)})"
        return f"NOT {exists}" if negate_exists else exists

    def in_list(self, column: str, values: Sequence[str]) -> str:
        p = self.param(list(values))
        if self.sqlite:
            return f"{column} IN (SELECT value FROM json_each({p}))"
        return f"{column} = ANY(CAST({p} AS text[]))"

    def any_prefix(self, column: str, prefixes: Sequence[str]) -> str:
        if self.sqlite:
            return self._each(prefixes, f"substr({column}, 1, length({{v}})) = {{v}}")
        return self._each(prefixes, f"starts_with({column}, {{v}})")

    def pairs(self, id_column: str, role_column: str, pairs: Sequence[tuple[str, str]]) -> str:
        ids = self.param([pair[0] for pair in pairs])
        roles = self.param([pair[1] for pair in pairs])
        if self.sqlite:
            return (
                f"EXISTS (SELECT 1 FROM json_each({ids}) AS a JOIN json_each({roles}) AS b "
                f"ON a.key = b.key WHERE a.value = {id_column} AND b.value = {role_column})"
            )
        return (
            f"EXISTS (SELECT 1 FROM unnest(CAST({ids} AS text[]), CAST({roles} AS text[])) "
            f"AS x(i, r) WHERE x.i = {id_column} AND x.r = {role_column})"
        )

    def globs(self, column: str, patterns: Sequence[str]) -> str:
        """Any pattern matches (a negated one: does not match); never true for NULL."""
        if not patterns:
            return "1 = 0"
        positive = [p for p in patterns if not p.startswith("!")]
        negative = [p[1:] for p in patterns if p.startswith("!")]
        parts = []
        for group, negated in ((positive, False), (negative, True)):
            if not group:
                continue
            if self.sqlite:
                test = f"{column} GLOB {{v}}"
                translated = [_sqlite_glob(p) for p in group]
            else:
                test = f"{column} LIKE {{v}}"
                translated = [_like(p) for p in group]
            # NOT (NULL ...) is NULL, so a missing label never satisfies a negated pattern.
            parts.append(self._each(translated, f"NOT ({test})" if negated else test))
        return parts[0] if len(parts) == 1 else f"({' OR '.join(parts)})"

    def json_label(self, column: str, label: str) -> str:
        key = self.param(label)
        if self.sqlite:
            # json_each, not ->>: label names contain dots, which ->> reads as a path.
            return f"(SELECT j.value FROM json_each({column}) AS j WHERE j.key = {key})"
        return f"({column}::jsonb ->> CAST({key} AS text))"

    def labels(self, labels: LabelSpec, lookup: Mapping[str, str], json_column: str) -> list[str]:
        return [
            self.globs(lookup.get(label) or self.json_label(json_column, label), _values(spec))
            for label, spec in labels.items()
        ]

    def contains(self, terms: Sequence[str], *, every: bool = False) -> str:
        lowered = [t.lower() for t in terms]
        find = "instr" if self.sqlite else "strpos"
        if every:
            return self._each(lowered, f"{find}(e.search, {{v}}) = 0", negate_exists=True)
        return self._each(lowered, f"{find}(e.search, {{v}}) > 0")


_PRIMARY_COLUMNS = {RESOURCE_ID: "e.resource_id"}
_RELATED_COLUMNS = {RESOURCE_ID: "r.resource_id", RESOURCE_ROLE: "r.role"}


def _resource_conditions(
    c: _Compiler, criteria: EventResourceFilter | EventAnyResourceFilter, *, related: bool
) -> list[str]:
    id_column = "r.resource_id" if related else "e.resource_id"
    conditions = []
    if criteria.id:
        conditions.append(c.in_list(id_column, criteria.id))
    if criteria.id_prefix:
        conditions.append(c.any_prefix(id_column, criteria.id_prefix))
    if criteria.labels:
        if related:
            conditions.extend(c.labels(criteria.labels, _RELATED_COLUMNS, "r.labels"))
        else:
            conditions.extend(c.labels(criteria.labels, _PRIMARY_COLUMNS, "e.resource"))
    return conditions


def compile(event_filter: EventFilter, dialect: str) -> tuple[str, dict[str, Any]]:
    """The filter as ``(condition, params)`` for ``SELECT ... FROM events e WHERE <condition>``.

    ``dialect`` is the backend's name (``"sqlite"`` or ``"postgresql"``). Parameters use the
    ``:name`` style of ``storage/queries.py``; list parameters are plain Python lists, which the
    dialect passes as JSON text (SQLite) or arrays (PostgreSQL). ``resource.distinct`` and
    ``order`` are not part of the condition: the store's query applies them.
    """
    c = _Compiler(dialect)
    since = c.param(event_filter.occurred.since.timestamp())
    until = c.param(event_filter.occurred.until.timestamp())
    conditions = [f"e.occurred >= {since}", f"e.occurred <= {until}"]

    def related_rows(inner: list[str]) -> str:
        # Related rows carry the event's occurred: the range narrows the subquery (indexed).
        return (
            "e.id IN (SELECT r.event_id FROM event_resources r "
            f"WHERE r.occurred >= {since} AND r.occurred <= {until} AND {' AND '.join(inner)})"
        )

    name = event_filter.event
    if name is not None:
        if name.prefix:
            conditions.append(c.any_prefix("e.event", name.prefix))
        if name.exclude_prefix:
            conditions.append(f"NOT {c.any_prefix('e.event', name.exclude_prefix)}")
        if name.name:
            conditions.append(c.in_list("e.event", name.name))
        if name.exclude_name:
            conditions.append(f"NOT ({c.in_list('e.event', name.exclude_name)})")

    if event_filter.resource is not None:
        conditions.extend(_resource_conditions(c, event_filter.resource, related=False))

    for related in _listed(event_filter.related):
        inner = []
        if related.id:
            inner.append(c.in_list("r.resource_id", related.id))
        if related.role:
            inner.append(c.in_list("r.role", related.role))
        if related.resources_in_roles:
            inner.append(c.pairs("r.resource_id", "r.role", related.resources_in_roles))
        if related.labels:
            inner.extend(c.labels(related.labels, _RELATED_COLUMNS, "r.labels"))
        if inner:
            conditions.append(related_rows(inner))

    for anyone in _listed(event_filter.any_resource):
        primary = _resource_conditions(c, anyone, related=False)
        if not primary:
            continue
        secondary = _resource_conditions(c, anyone, related=True)
        conditions.append(f"(({' AND '.join(primary)}) OR {related_rows(secondary)})")

    if event_filter.id.id:
        conditions.append(c.in_list("e.id", [str(i) for i in event_filter.id.id]))

    if event_filter.text is not None:
        query = parse_text_query(event_filter.text.query)
        if query.include:
            conditions.append(c.contains(query.include))
        if query.exclude:
            conditions.append(f"NOT {c.contains(query.exclude)}")
        if query.required:
            conditions.append(c.contains(query.required, every=True))

    return " AND ".join(conditions), c.params
