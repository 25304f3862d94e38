"""EventFilter semantics: the Python evaluator and the compiled SQL must select the same events.

Every semantic test runs both evaluators, on SQLite and on PostgreSQL: events are written with
the store's own ``write_events`` inside a transaction that is rolled back, so nothing persists
and tests sharing the PostgreSQL database do not see each other. A hypothesis test then checks
that the two agree on random events and random filters.
"""

from __future__ import annotations

import importlib.util
import sqlite3
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slotkeeper.events import filters
from slotkeeper.events.filters import glob_matches, matches, parse_text_query, search_text
from slotkeeper.events.models import EventFilter, EventRecord
from slotkeeper.storage import migrate, rows
from slotkeeper.storage.dialect import POSTGRES, SQLITE
from slotkeeper.storage.tx import Tx

T0 = 1_750_000_000.0  # 2025-06-15T15:06:40Z


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def rec(
    name: str = "a.b",
    rid: str = "r.1",
    labels: dict[str, str] | None = None,
    related: Sequence[dict[str, str]] = (),
    payload: dict[str, Any] | None = None,
    occurred: float = T0,
    ident: str | None = None,
) -> EventRecord:
    return EventRecord(
        id=ident or str(uuid.uuid4()),
        occurred=occurred,
        event=name,
        resource={"prefect.resource.id": rid, **(labels or {})},
        related=list(related),
        payload=payload or {},
        received=occurred,
    )


def rel(rid: str, role: str, **labels: str) -> dict[str, str]:
    return {"prefect.resource.id": rid, "prefect.resource.role": role, **labels}


# --- a database per backend, used inside rolled-back transactions -----------------------------------


class Selector:
    """Runs a compiled condition over some events in a transaction it rolls back."""

    def __init__(self, dialect: str, run: Callable[[Callable[[Tx], list[set[str]]]], list[set[str]]]) -> None:
        self.dialect = dialect
        self._run = run

    def select(self, event_filter: EventFilter, records: Sequence[EventRecord]) -> set[str]:
        return self.select_each([event_filter], records)[0]

    def select_each(
        self, event_filters: Sequence[EventFilter], records: Sequence[EventRecord]
    ) -> list[set[str]]:
        """The ids each filter selects among ``records``, written once for all of them."""
        compiled = [filters.compile(f, self.dialect) for f in event_filters]
        written = {r.id for r in records}

        def op(tx: Tx) -> list[set[str]]:
            rows.write_events(tx, records)
            return [
                {r[0] for r in tx.all(f"SELECT e.id FROM events e WHERE {where}", params)} & written
                for where, params in compiled
            ]

        return self._run(op)


@pytest.fixture(scope="module")
def sqlite_selector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Selector]:
    path = tmp_path_factory.mktemp("filters") / "events.db"
    migrate(f"sqlite:///{path}")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")  # every transaction is rolled back anyway
    conn.execute("PRAGMA journal_mode=MEMORY")

    def run(op: Callable[[Tx], list[set[str]]]) -> list[set[str]]:
        cursor = conn.cursor()
        cursor.execute("BEGIN")
        try:
            return op(Tx(cursor, SQLITE, sqlite3.IntegrityError))
        finally:
            cursor.execute("ROLLBACK")

    yield Selector("sqlite", run)
    conn.close()


@pytest.fixture(scope="module")
def postgres_selector(postgres_url: str) -> Iterator[Selector]:
    pg = psycopg.connect(postgres_url)

    def run(op: Callable[[Tx], list[set[str]]]) -> list[set[str]]:
        try:
            with pg.cursor() as cursor:
                return op(Tx(cursor, POSTGRES, psycopg.IntegrityError))
        finally:
            pg.rollback()  # nothing persists; other tests never see these events

    yield Selector("postgresql", run)
    pg.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def selector(request: pytest.FixtureRequest) -> Selector:
    """The selector of each backend."""
    chosen: Selector = request.getfixturevalue(f"{request.param}_selector")
    return chosen


WIDE = {"since": iso(T0 - 10**6), "until": iso(T0 + 10**6)}


def make_filter(spec: dict[str, Any]) -> EventFilter:
    return EventFilter.model_validate({"occurred": WIDE, **spec})


def check(selector: Selector, spec: dict[str, Any], records: Sequence[EventRecord]) -> set[str]:
    """The ids both evaluators select (asserting that they agree)."""
    event_filter = make_filter(spec)
    in_python = {r.id for r in records if matches(event_filter, r)}
    assert selector.select(event_filter, records) == in_python
    return in_python


def ids(*records: EventRecord) -> set[str]:
    return {r.id for r in records}


# --- pure pieces ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        ("abc", "abc", True),
        ("abc", "ABC", False),  # case-sensitive
        ("a*", "abc", True),
        ("a*", "a", True),
        ("*c", "abc", True),
        ("a?c", "abc", True),
        ("a?c", "ac", False),
        ("*", "", True),
        ("?", "", False),
        ("a*b*c", "aXbYbZc", True),
        ("a*b*c", "aXbYbZ", False),
        ("a%c", "abc", False),  # % and _ are literal
        ("a_c", "abc", False),
        ("[ab]", "a", False),  # brackets are literal, unlike fnmatch
        ("[ab]", "[ab]", True),
        ("!abc", "abd", True),
        ("!abc", "abc", False),
        ("!a*", "abc", False),
        ("!", "x", True),
        ("!", "", False),
        ("abc", None, False),
        ("!abc", None, False),  # a missing label never matches, negated or not
    ],
)
def test_glob_matches(pattern: str, value: str | None, expected: bool) -> None:
    assert glob_matches(pattern, value) is expected


def test_glob_is_linear_on_pathological_patterns() -> None:
    assert not glob_matches("*a" * 30 + "b", "a" * 5000)


@pytest.mark.parametrize(
    ("query", "include", "exclude", "required"),
    [
        ("error", ["error"], [], []),
        ("error warning", ["error", "warning"], [], []),
        ("error -debug", ["error"], ["debug"], []),
        ("error !debug", ["error"], ["debug"], []),
        ("+must +also", [], [], ["must", "also"]),
        ('"connection timeout" x', ["connection timeout", "x"], [], []),
        ('-"two words"', [], ["two words"], []),
        ('"say \\"hi\\""', ['say "hi"'], [], []),
        ('"unclosed phrase', ["unclosed phrase"], [], []),
        ('"   "', [], [], []),
        ("- lonely + signs !", ["lonely", "signs"], [], []),
        ("--double", [], ["-double"], []),
        ('a"b"', ["a", "b"], [], []),
        ("   ", [], [], []),
    ],
)
def test_parse_text_query(query: str, include: list[str], exclude: list[str], required: list[str]) -> None:
    parsed = parse_text_query(query)
    assert (list(parsed.include), list(parsed.exclude), list(parsed.required)) == (include, exclude, required)


def _prefect_parser() -> Any:
    path = (
        Path(__file__).parents[1]
        / ".venv-prefect/lib/python3.11/site-packages/prefect/server/utilities/text_search_parser.py"
    )
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("prefect_text_search_parser", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_text_search_query


PREFECT_PARSER = _prefect_parser()


@pytest.mark.skipif(PREFECT_PARSER is None, reason="Prefect's source is not installed beside slotkeeper")
@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=' ab"\\-!+\t', max_size=24))
def test_parse_text_query_agrees_with_prefect(query: str) -> None:
    ours = parse_text_query(query)
    theirs = PREFECT_PARSER(query)
    assert (list(ours.include), list(ours.exclude), list(ours.required)) == (
        theirs.include,
        theirs.exclude,
        theirs.required,
    )


def test_the_store_writes_the_search_text_of_the_filters() -> None:
    # One function builds the text for both evaluators: the column the SQL reads and the live matcher.
    assert rows.search_text is search_text


def test_with_defaults_uses_the_server_clock_and_keeps_given_bounds() -> None:
    now = 1_800_000_000.0  # 2027-01-15T08:00:00Z
    resolved = filters.with_defaults(EventFilter(), now)
    assert resolved.occurred.until == datetime.fromtimestamp(now, UTC)
    assert resolved.occurred.since == datetime(2026, 7, 19, tzinfo=UTC)  # start of day - 180 days
    given_since = EventFilter.model_validate({"occurred": {"since": "2020-01-01T00:00:00Z"}})
    resolved = filters.with_defaults(given_since, now)
    assert resolved.occurred.since == datetime(2020, 1, 1, tzinfo=UTC)
    assert resolved.occurred.until == datetime.fromtimestamp(now, UTC)


def test_compile_keeps_postgres_casts_intact() -> None:
    event_filter = make_filter({"resource": {"labels": {"x.y": "1"}}})
    where, params = filters.compile(event_filter, "postgresql")
    assert "e.resource::jsonb ->> CAST(:f2 AS text)" in where
    assert "::jsonb" in POSTGRES.sql(where) and "%(f2)s" in POSTGRES.sql(where)
    assert params["f2"] == "x.y"
    with pytest.raises(ValueError, match="Unsupported"):
        filters.compile(event_filter, "mysql")


def test_one_filter_shape_compiles_to_one_text() -> None:
    first = filters.compile(make_filter({"event": {"name": ["a", "b", "c"]}}), "sqlite")[0]
    second = filters.compile(make_filter({"event": {"name": ["x"]}}), "sqlite")[0]
    assert first == second


def test_distinct_is_ignored_by_matches() -> None:
    event_filter = make_filter({"resource": {"distinct": True}})
    assert matches(event_filter, rec()) and matches(event_filter, rec())


# --- semantics, on both evaluators ------------------------------------------------------------------


def test_occurred_bounds_are_inclusive(selector: Selector) -> None:
    before, at_since, inside, at_until, after = (rec(occurred=T0 + d) for d in (-1, 0, 5, 10, 11))
    records = [before, at_since, inside, at_until, after]
    spec = {"occurred": {"since": iso(T0), "until": iso(T0 + 10)}}
    assert check(selector, spec, records) == ids(at_since, inside, at_until)


def test_event_names(selector: Selector) -> None:
    ab, abc, ac, b, pct = rec("a.b"), rec("a.b.c"), rec("a.c"), rec("b"), rec("a%b")
    records = [ab, abc, ac, b, pct]
    assert check(selector, {"event": {"prefix": ["a.b"]}}, records) == ids(ab, abc)
    assert check(selector, {"event": {"prefix": ["a.b", "b"]}}, records) == ids(ab, abc, b)
    assert check(selector, {"event": {"prefix": ["a%"]}}, records) == ids(pct)  # literal %
    assert check(selector, {"event": {"prefix": ["A"]}}, records) == set()  # case-sensitive
    assert check(selector, {"event": {"exclude_prefix": ["a."]}}, records) == ids(b, pct)
    assert check(selector, {"event": {"name": ["a.b", "b"]}}, records) == ids(ab, b)
    assert check(selector, {"event": {"exclude_name": ["a.b", "b"]}}, records) == ids(abc, ac, pct)
    both = {"prefix": ["a"], "exclude_name": ["a.c"], "exclude_prefix": ["a.b."]}
    assert check(selector, {"event": both}, records) == ids(ab, pct)
    # Empty lists constrain nothing (Prefect).
    assert check(selector, {"event": {"prefix": [], "name": []}}, records) == ids(*records)


def test_resource_id_and_prefix(selector: Selector) -> None:
    r1, r10, s1 = rec(rid="r.1"), rec(rid="r.10"), rec(rid="s.1")
    records = [r1, r10, s1]
    assert check(selector, {"resource": {"id": ["r.1", "s.1"]}}, records) == ids(r1, s1)
    assert check(selector, {"resource": {"id_prefix": ["r.1"]}}, records) == ids(r1, r10)
    assert check(selector, {"resource": {"id": ["r.10"], "id_prefix": ["r."]}}, records) == ids(r10)
    assert check(selector, {"resource": {"id": []}}, records) == ids(*records)


def test_resource_labels(selector: Selector) -> None:
    a = rec(rid="prefect.flow-run.1", labels={"prefect.resource.name": "alpha", "team.name": "x"})
    b = rec(rid="prefect.task-run.2", labels={"prefect.resource.name": "beta", "team.name": "y"})
    c = rec(rid="prefect.flow-run.3", labels={"prefect.resource.name": "[gamma]_%"})
    records = [a, b, c]

    def labels(spec: dict[str, Any]) -> set[str]:
        return check(selector, {"resource": {"labels": spec}}, records)

    assert labels({"prefect.resource.name": "alpha"}) == ids(a)
    assert labels({"prefect.resource.name": ["alpha", "beta"]}) == ids(a, b)  # values ORed
    assert labels({"prefect.resource.name": "*a"}) == ids(a, b)
    assert labels({"prefect.resource.name": "?eta"}) == ids(b)
    assert labels({"prefect.resource.name": "!alpha"}) == ids(b, c)
    assert labels({"prefect.resource.name": ["!alpha", "alpha"]}) == ids(a, b, c)
    assert labels({"prefect.resource.name": "[gamma]_%"}) == ids(c)  # [ ] _ % are literal
    assert labels({"prefect.resource.name": "[g*"}) == ids(c)
    assert labels({"prefect.resource.name": "ALPHA"}) == set()
    assert labels({"prefect.resource.id": "prefect.flow-run.*"}) == ids(a, c)
    assert labels({"prefect.resource.id": "prefect.flow-run.*", "team.name": "x"}) == ids(a)  # ANDed
    assert labels({"team.name": "!x"}) == ids(b)  # c has no team.name: never matches
    assert labels({"team.name": []}) == set()  # an empty value list matches nothing
    assert labels({}) == ids(a, b, c)


def test_related(selector: Selector) -> None:
    flow = rel("prefect.flow-run.1", "flow-run", **{"prefect.resource.name": "nightly"})
    tag = rel("prefect.tag.db", "tag")
    task = rel("prefect.task-run.9", "task-run")
    a = rec(related=[flow, tag])
    b = rec(related=[tag, task])
    c = rec(rid="prefect.flow-run.1")  # the primary is never a related resource
    records = [a, b, c]

    def related(spec: Any) -> set[str]:
        return check(selector, {"related": spec}, records)

    assert related({"id": ["prefect.flow-run.1"]}) == ids(a)
    assert related({"role": ["tag"]}) == ids(a, b)
    assert related({"id": ["prefect.tag.db"], "role": ["flow-run"]}) == set()  # same resource
    assert related({"resources_in_roles": [["prefect.tag.db", "tag"]]}) == ids(a, b)
    assert related({"resources_in_roles": [["prefect.tag.db", "flow-run"]]}) == set()
    assert related({"labels": {"prefect.resource.name": "night*"}}) == ids(a)
    assert related({"labels": {"prefect.resource.role": "task-*"}}) == ids(b)
    assert related({"labels": {"prefect.resource.id": "prefect.flow-run.*"}}) == ids(a)
    assert related({"role": [""]}) == set()
    assert related([{"role": ["tag"]}, {"role": ["task-run"]}]) == ids(b)  # a list is ANDed
    assert related({}) == ids(a, b, c)  # no criteria: everything


def test_any_resource(selector: Selector) -> None:
    a = rec(rid="prefect.flow-run.1")
    b = rec(rid="x", related=[rel("prefect.flow-run.1", "flow-run")])
    c = rec(rid="y", related=[rel("prefect.task-run.1", "task-run", team="t")])
    records = [a, b, c]

    def any_resource(spec: Any) -> set[str]:
        return check(selector, {"any_resource": spec}, records)

    assert any_resource({"id": ["prefect.flow-run.1"]}) == ids(a, b)
    assert any_resource({"id_prefix": ["prefect."]}) == ids(a, b, c)
    assert any_resource({"labels": {"team": "t"}}) == ids(c)
    assert any_resource({"labels": {"prefect.resource.role": "flow-run"}}) == ids(b)
    # One resource must satisfy every criterion of one filter...
    assert any_resource({"id": ["y"], "labels": {"team": "t"}}) == set()
    # ...but each filter of a list may be satisfied by a different one.
    assert any_resource([{"id": ["y"]}, {"labels": {"team": "t"}}]) == ids(c)
    assert any_resource({}) == ids(a, b, c)


def test_ids(selector: Selector) -> None:
    a, b, c = rec(), rec(), rec()
    assert check(selector, {"id": {"id": [a.id, c.id, str(uuid.uuid4())]}}, [a, b, c]) == ids(a, c)
    assert check(selector, {"id": {"id": []}}, [a, b, c]) == ids(a, b, c)


def test_text(selector: Selector) -> None:
    a = rec("deploy.failed", payload={"error": "Connection Timeout"})
    b = rec("deploy.ok", labels={"prefect.resource.name": "Debug run"})
    c = rec("cleanup", related=[rel("prefect.tag.ERROR", "tag")])
    records = [a, b, c]

    def text(query: str) -> set[str]:
        return check(selector, {"text": {"query": query}}, records)

    assert text("deploy") == ids(a, b)
    assert text("DEPLOY") == ids(a, b)  # case-insensitive
    assert text("error") == ids(a, c)  # payload keys and label values are searched
    assert text("deploy -debug") == ids(a)
    assert text("!debug") == ids(a, c)
    assert text('"connection timeout"') == ids(a)
    assert text("+deploy +run") == ids(b)
    assert text("cleanup failed") == ids(a, c)
    assert text("%") == set() and text("_") == set()  # literal, not wildcards
    assert text("   ") == ids(a, b, c)


def test_criteria_combine_with_and(selector: Selector) -> None:
    a = rec("a.b", rid="r.1", related=[rel("t.1", "tag")], occurred=T0)
    b = rec("a.b", rid="r.2", related=[rel("t.1", "tag")], occurred=T0)
    c = rec("a.c", rid="r.1", related=[rel("t.1", "tag")], occurred=T0)
    spec = {
        "event": {"prefix": ["a.b"]},
        "resource": {"id": ["r.1"]},
        "related": {"role": ["tag"]},
        "text": {"query": "t.1"},
    }
    assert check(selector, spec, [a, b, c]) == ids(a)


# --- property: both evaluators agree ----------------------------------------------------------------

POOL = [str(uuid.UUID(int=i + 1)) for i in range(8)]
NAMES = ["a", "a.b", "a.b.c", "ab", "A.b", "a_b", "a%b", "a*b", "b.c", "x[1]", "é.b"]
RESOURCE_IDS = ["r.1", "r.2", "r.10", "s.1", "r_1", "R.1", "r%1"]
ROLES = ["flow-run", "task-run", "tag", "t*g"]
KEYS = ["k.sub", "prefect.resource.name"]  # dotted: ->> would read them as paths
VALUES = ["x", "X", "x_y", "x%y", "x*y", "[x]", "é", "", "\\"]
PATTERNS = [*VALUES, "*", "x*", "?", "!x", "!*", "!", "[x]", "[*", "x?y", "x_*", "r.*", "!r.1", "t*g", "R*"]
WORDS = ["a", "x", "r.1", "tag", '"x y"', "é", "k", "{", "X", "1", "b.c", '"', "%", "_"]

labels_st = st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=len(KEYS))
related_st = st.builds(
    lambda rid, role, extra: {**extra, "prefect.resource.id": rid, "prefect.resource.role": role},
    st.sampled_from(RESOURCE_IDS),
    st.sampled_from(ROLES),
    labels_st,
)
record_st = st.builds(
    lambda second, fraction, name, rid, labels, related, payload: (
        T0 + second + fraction,
        name,
        {**labels, "prefect.resource.id": rid},
        related,
        payload,
    ),
    st.integers(0, 6),
    st.sampled_from([0.0, 0.25, 0.999999]),
    st.sampled_from(NAMES),
    st.sampled_from(RESOURCE_IDS),
    labels_st,
    st.lists(related_st, max_size=3),
    st.dictionaries(st.sampled_from(["k", "X", "n"]), st.sampled_from(WORDS), max_size=2),
)
records_st = st.lists(record_st, min_size=2, max_size=len(POOL)).map(
    lambda drawn: [
        EventRecord(
            id=ident,
            occurred=occurred,
            event=name,
            resource=resource,
            related=related,
            payload=payload,
            received=T0,
        )
        for ident, (occurred, name, resource, related, payload) in zip(POOL, drawn, strict=False)
    ]
)


spec_labels = st.dictionaries(
    st.sampled_from([*KEYS, "prefect.resource.id", "prefect.resource.role"]),
    st.one_of(st.sampled_from(PATTERNS), st.lists(st.sampled_from(PATTERNS), max_size=3)),
    min_size=1,
    max_size=2,
)
prefixes = st.lists(
    st.sampled_from(["", "a", "a.", "a.b", "A", "a_", "a%", "r.", "r.1", "R", "s"]), max_size=2
)
resource_ids = st.lists(st.sampled_from(RESOURCE_IDS), max_size=2)


def optional(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=fields)


def one_of_keys(key: str, **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """``{key: {...}}`` with one or two of ``fields`` set: focused criteria select something."""
    singles = [st.fixed_dictionaries({name: value}) for name, value in fields.items()]
    return st.builds(
        lambda first, second: {key: {**first, **second}},
        st.one_of(singles),
        st.one_of([st.just({}), *singles]),
    )


one_related = one_of_keys(
    "related",
    id=resource_ids,
    role=st.lists(st.sampled_from([*ROLES, ""]), max_size=2),
    resources_in_roles=st.lists(st.tuples(st.sampled_from(RESOURCE_IDS), st.sampled_from(ROLES)), max_size=2),
    labels=spec_labels,
).map(lambda spec: spec["related"])
one_any = one_of_keys("any_resource", id=resource_ids, id_prefix=prefixes, labels=spec_labels).map(
    lambda spec: spec["any_resource"]
)
text_query = st.lists(
    st.builds(lambda p, w: p + w, st.sampled_from(["", "", "-", "!", "+"]), st.sampled_from(WORDS)),
    max_size=4,
).map(" ".join)

criterion = st.one_of(
    one_of_keys(
        "event",
        prefix=prefixes,
        exclude_prefix=prefixes,
        name=st.lists(st.sampled_from(NAMES), max_size=2),
        exclude_name=st.lists(st.sampled_from(NAMES), max_size=2),
    ),
    one_of_keys("resource", id=resource_ids, id_prefix=prefixes, labels=spec_labels),
    st.builds(lambda r: {"related": r}, st.one_of(one_related, st.lists(one_related, max_size=3))),
    st.builds(lambda a: {"any_resource": a}, st.one_of(one_any, st.lists(one_any, max_size=2))),
    st.builds(lambda i: {"id": {"id": i}}, st.lists(st.sampled_from(POOL), max_size=3)),
    st.builds(lambda q: {"text": {"query": q}}, text_query),
)

filter_st = st.builds(
    lambda criteria, since, span: {
        **{k: v for c in criteria for k, v in c.items()},
        "occurred": {"since": iso(T0 + since), "until": iso(T0 + since + span)},
    },
    st.lists(criterion, min_size=1, max_size=2),
    st.sampled_from([-1.0, -1.0, 0.0, 0.25, 1.0, 2.999999]),
    st.sampled_from([10.0, 10.0, 0.0, 1.0, 3.5]),
)


def _agree(selector: Selector, records: list[EventRecord], specs: list[dict[str, Any]]) -> None:
    event_filters = [EventFilter.model_validate(spec) for spec in specs]
    selected = selector.select_each(event_filters, records)
    for spec, event_filter, in_sql in zip(specs, event_filters, selected, strict=True):
        assert in_sql == {r.id for r in records if matches(event_filter, r)}, spec


PROPERTY = settings(
    deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


@settings(PROPERTY, max_examples=200)
@given(records=records_st, specs=st.lists(filter_st, min_size=1, max_size=6))
def test_python_and_sql_agree_on_sqlite(
    sqlite_selector: Selector, records: list[EventRecord], specs: list[dict[str, Any]]
) -> None:
    _agree(sqlite_selector, records, specs)


@pytest.mark.postgres
@settings(PROPERTY, max_examples=80)
@given(records=records_st, specs=st.lists(filter_st, min_size=1, max_size=6))
def test_python_and_sql_agree_on_postgres(
    postgres_selector: Selector, records: list[EventRecord], specs: list[dict[str, Any]]
) -> None:
    _agree(postgres_selector, records, specs)
