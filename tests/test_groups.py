"""Group commit on PostgreSQL (``storage/groups.py``, ``PostgresBackend._run_group``).

The queue alone (no database): groups leave in arrival order, at most ``lanes`` at once and
``max_size`` operations each, and a cancelled caller's operation still runs. Then the group's
transaction on PostgreSQL: an operation that fails does not affect the others of its group,
whether it raises, catches a database error itself, or lets one escape; a group whose connection
is lost half-way leaves nothing; a group that waits too long for a lock held elsewhere runs its
operations one by one instead; hand-offs run only for operations that committed.

Groups are made deterministic by holding the one lane with an operation that waits for an event:
whatever is queued meanwhile leaves as the next group.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest

from slotkeeper.errors import NotFound, SlotsUnavailable
from slotkeeper.models import AcquireRequest, LeaseSpec, LimitSpec
from slotkeeper.storage import open_storage
from slotkeeper.storage import queries as q
from slotkeeper.storage.core import Storage
from slotkeeper.storage.dialect import POSTGRES
from slotkeeper.storage.groups import GroupQueue, Op, Outcome, TwoHalves
from slotkeeper.storage.postgres import PgTx, PostgresBackend, _merged_insert
from slotkeeper.storage.tx import Tx
from tests.conftest import truncate_postgres

# --- the queue ----------------------------------------------------------------------------------


class Recorder:
    """A group runner that records each group and can hold the first one until released."""

    def __init__(self) -> None:
        self.groups: list[list[Any]] = []
        self.hold = threading.Event()
        self.held = threading.Event()

    def __call__(self, ops: list[Op]) -> list[Outcome]:
        self.groups.append([op(None) for op in ops])  # type: ignore[arg-type]
        if len(self.groups) == 1:
            self.held.set()
            self.hold.wait(10)
        return [(True, label) for label in self.groups[-1]]


def _label(name: str) -> Op:
    return lambda tx: name


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(4)
    yield pool
    pool.shutdown()


async def _queued(queue: GroupQueue, count: int) -> None:
    while queue.queued < count:
        await asyncio.sleep(0.001)


async def test_groups_leave_in_arrival_order_bounded_in_size(executor: ThreadPoolExecutor) -> None:
    runner = Recorder()
    queue = GroupQueue(runner, executor, lanes=1, max_size=3)
    first = asyncio.ensure_future(queue.run(_label("first")))
    await asyncio.to_thread(runner.held.wait, 10)
    rest = [asyncio.ensure_future(queue.run(_label(f"op{i}"))) for i in range(7)]
    await _queued(queue, 7)
    runner.hold.set()
    assert await first == "first"
    assert [await r for r in rest] == [f"op{i}" for i in range(7)]
    assert runner.groups == [["first"], ["op0", "op1", "op2"], ["op3", "op4", "op5"], ["op6"]]


async def test_operations_of_one_turn_of_the_loop_are_spread_over_the_free_lanes(
    executor: ThreadPoolExecutor,
) -> None:
    """What arrives in one turn of the loop leaves at once, shared out among the free lanes in
    arrival order (a group's operations take their round trips one after the other)."""
    runner = Recorder()
    runner.hold.set()
    queue = GroupQueue(runner, executor, lanes=2, max_size=10)
    assert await asyncio.gather(*(queue.run(_label(f"op{i}")) for i in range(5))) == [
        f"op{i}" for i in range(5)
    ]
    assert runner.groups == [["op0", "op1", "op2"], ["op3", "op4"]]


async def test_at_most_lanes_groups_are_out(executor: ThreadPoolExecutor) -> None:
    out = 0
    most = 0
    lock = threading.Lock()
    gate = threading.Event()

    def runner(ops: list[Op]) -> list[Outcome]:
        nonlocal out, most
        with lock:
            out += 1
            most = max(most, out)
        gate.wait(10)
        with lock:
            out -= 1
        return [(True, None)] * len(ops)

    queue = GroupQueue(runner, executor, lanes=2, max_size=1)
    calls = [asyncio.ensure_future(queue.run(_label("x"))) for _ in range(6)]
    await _queued(queue, 4)  # two groups out, four waiting for a lane
    assert queue.busy == 2
    gate.set()
    await asyncio.gather(*calls)
    assert most == 2


async def test_a_cancelled_caller_s_operation_still_runs(executor: ThreadPoolExecutor) -> None:
    runner = Recorder()
    queue = GroupQueue(runner, executor, lanes=1, max_size=10)
    first = asyncio.ensure_future(queue.run(_label("first")))
    await asyncio.to_thread(runner.held.wait, 10)
    cancelled = asyncio.ensure_future(queue.run(_label("cancelled")))
    kept = asyncio.ensure_future(queue.run(_label("kept")))
    await _queued(queue, 2)
    cancelled.cancel()
    runner.hold.set()
    assert (await first, await kept) == ("first", "kept")
    assert cancelled.cancelled()
    assert runner.groups[1] == ["cancelled", "kept"]  # handed over for good: it ran


async def test_a_failed_runner_fails_its_group_only(executor: ThreadPoolExecutor) -> None:
    calls = 0

    def runner(ops: list[Op]) -> list[Outcome]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("runner broke")
        return [(True, "ok")] * len(ops)

    queue = GroupQueue(runner, executor, lanes=1, max_size=1)
    with pytest.raises(RuntimeError, match="runner broke"):
        await queue.run(_label("a"))
    assert await queue.run(_label("b")) == "ok"


# --- the group's transaction on PostgreSQL ------------------------------------------------------


@pytest.fixture
async def backend(postgres_url: str) -> AsyncIterator[PostgresBackend]:
    pg = PostgresBackend(postgres_url, pool_size=2, lanes=1)
    try:
        yield pg
    finally:
        await pg.close()


@pytest.fixture
def table(postgres_url: str) -> Iterator[str]:
    """A scratch table of this test: ``(x int primary key)``."""
    name = f"group_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (x int PRIMARY KEY)")
    yield name
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")


def _rows(url: str, table: str) -> list[int]:
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute(f"SELECT x FROM {table} ORDER BY x")]


async def _one_group(backend: PostgresBackend, ops: list[Callable[[Tx], Any]]) -> list[Any]:
    """Run ``ops`` as one group (behind an operation that holds the lane): their outcomes,
    exceptions included."""
    hold = threading.Event()
    held = threading.Event()

    def holder(tx: Tx) -> None:
        held.set()
        hold.wait(10)

    first = asyncio.ensure_future(backend.run(holder))
    await asyncio.to_thread(held.wait, 10)
    calls = [asyncio.ensure_future(backend.run(op)) for op in ops]
    await _queued(backend.groups, len(ops))
    sizes: list[int] = []
    backend.groups.on_group = sizes.append
    hold.set()
    await first
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    backend.groups.on_group = None
    assert sizes == [len(ops)]
    return outcomes


def _insert(table: str, x: int) -> Callable[[Tx], int]:
    def op(tx: Tx) -> int:
        tx.write(f"INSERT INTO {table} VALUES (:x)", {"x": x})
        return x

    return op


class Counted:
    """An operation that counts how often it ran (a group that falls back runs it again)."""

    def __init__(self, op: Callable[[Tx], Any]) -> None:
        self.op = op
        self.runs = 0

    def __call__(self, tx: Tx) -> Any:
        self.runs += 1
        return self.op(tx)


@pytest.mark.postgres
async def test_an_operation_that_raises_before_writing_fails_alone_in_its_group(
    backend: PostgresBackend, table: str, postgres_url: str
) -> None:
    """The common failure (a refused acquisition: locks and reads, then a refusal) leaves
    nothing to undo: it fails alone and the group commits the others, each run once."""

    def refuses(tx: Tx) -> None:
        tx.one(f"SELECT count(*) FROM {table}")
        tx.events.append(None)  # type: ignore[arg-type]  # what it published goes with it
        raise NotFound("no slots")

    ops = [Counted(_insert(table, 1)), Counted(refuses), Counted(_insert(table, 3))]
    outcomes = await _one_group(backend, list(ops))
    assert outcomes[0] == 1 and outcomes[2] == 3
    assert isinstance(outcomes[1], NotFound)
    assert [op.runs for op in ops] == [1, 1, 1]
    assert _rows(postgres_url, table) == [1, 3]


@pytest.mark.postgres
async def test_an_operation_that_raises_after_writing_rolls_back_alone(
    backend: PostgresBackend, table: str, postgres_url: str
) -> None:
    """What it wrote cannot be undone alone: the group rolls back and its operations run again,
    each in a transaction of its own. The outcome is the same as if they had never been grouped."""

    def fails_after_writing(tx: Tx) -> None:
        tx.write(f"INSERT INTO {table} VALUES (2)")
        raise NotFound("changed its mind")

    ops = [Counted(_insert(table, 1)), Counted(fails_after_writing), Counted(_insert(table, 3))]
    outcomes = await _one_group(backend, list(ops))
    assert outcomes[0] == 1 and outcomes[2] == 3
    assert isinstance(outcomes[1], NotFound)
    assert [op.runs for op in ops] == [2, 2, 1]  # the group stopped at the failure
    assert _rows(postgres_url, table) == [1, 3]


@pytest.mark.postgres
async def test_an_operation_that_handles_a_database_error_rolls_back_alone(
    backend: PostgresBackend, table: str, postgres_url: str
) -> None:
    await backend.run(_insert(table, 5))

    def conflict(tx: Tx) -> str:
        tx.write(f"INSERT INTO {table} VALUES (6)")
        try:
            tx.write_now(f"INSERT INTO {table} VALUES (5)")
        except tx.integrity_error:
            return "conflict"
        return "inserted"

    outcomes = await _one_group(backend, [_insert(table, 1), conflict, _insert(table, 3)])
    # Alone, its transaction would have rolled back whole at the commit: so it does here.
    assert outcomes == [1, "conflict", 3]
    assert _rows(postgres_url, table) == [1, 3, 5]


@pytest.mark.postgres
async def test_a_database_error_that_escapes_fails_that_operation_only(
    backend: PostgresBackend, table: str, postgres_url: str
) -> None:
    await backend.run(_insert(table, 5))
    outcomes = await _one_group(backend, [_insert(table, 1), _insert(table, 5), _insert(table, 3)])
    assert outcomes[0] == 1 and outcomes[2] == 3
    assert isinstance(outcomes[1], psycopg.IntegrityError)
    assert _rows(postgres_url, table) == [1, 3, 5]


@pytest.mark.postgres
async def test_hand_offs_run_after_the_commit_and_only_for_what_committed(
    backend: PostgresBackend, table: str, postgres_url: str
) -> None:
    seen: list[tuple[str, list[int]]] = []

    def handing(name: str, fail: bool) -> Callable[[Tx], None]:
        def op(tx: Tx) -> None:
            tx.handoffs.append(lambda: seen.append((name, _rows(postgres_url, table))))
            if fail:
                raise NotFound("no")
            tx.write(f"INSERT INTO {table} VALUES (:x)", {"x": len(name)})

        return op

    outcomes = await _one_group(backend, [handing("a", False), handing("bb", True), handing("ccc", False)])
    assert isinstance(outcomes[1], NotFound)
    # Run once the group committed (another connection sees its rows), the failed one never.
    assert seen == [("a", [1, 3]), ("ccc", [1, 3])]


@pytest.mark.postgres
async def test_a_group_whose_connection_is_lost_leaves_nothing(
    backend: PostgresBackend, table: str, postgres_url: str
) -> None:
    def kill_own_connection(tx: Tx) -> None:
        pid = tx.one("SELECT pg_backend_pid()")
        assert pid is not None
        with psycopg.connect(postgres_url, autocommit=True) as other:
            other.execute("SELECT pg_terminate_backend(%s)", (pid[0],))
        tx.one("SELECT 1")  # the connection is gone

    outcomes = await _one_group(backend, [_insert(table, 1), kill_own_connection, _insert(table, 3)])
    assert all(isinstance(o, psycopg.OperationalError) for o in outcomes)
    assert _rows(postgres_url, table) == []
    assert await backend.run(_insert(table, 4)) == 4  # a new connection serves the next group
    assert _rows(postgres_url, table) == [4]


@pytest.mark.postgres
async def test_a_group_that_waits_too_long_for_a_lock_runs_its_operations_one_by_one(
    backend: PostgresBackend, table: str, postgres_url: str
) -> None:
    """Groups hold their earlier operations' locks while a later one waits, so two groups can
    wait for each other: a group gives up a lock wait after ``GROUP_LOCK_TIMEOUT`` and its
    operations run again, each in a transaction of its own, which waits as long as it takes."""
    await backend.run(_insert(table, 1))
    other = psycopg.connect(postgres_url)
    other.execute(f"SELECT x FROM {table} WHERE x = 1 FOR UPDATE")  # held until released

    def bump(tx: Tx) -> int:
        tx.one(f"SELECT x FROM {table} WHERE x = 1 FOR UPDATE")
        tx.write(f"UPDATE {table} SET x = x + 10 WHERE x = 1")
        return 11

    loop = asyncio.get_running_loop()
    release = loop.call_later(0.6, other.rollback)  # well past the group's lock timeout
    try:
        outcomes = await _one_group(backend, [_insert(table, 2), bump, _insert(table, 3)])
    finally:
        release.cancel()
        other.close()
    assert outcomes == [2, 11, 3]
    assert _rows(postgres_url, table) == [2, 3, 11]


# --- the leased slots read with the locks (scripts.lock_limits_and_queue) -----------------------


class SteppingClock:
    """A clock that answers each value of ``steps`` once, in turn, then stays at the last one:
    ``now`` can move between the moment the leased read is sent and the moment ``now`` is read."""

    def __init__(self, start: float) -> None:
        self.steps = [start]

    def __call__(self) -> float:
        return self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]


@pytest.mark.postgres
@pytest.mark.parametrize("waited", [0.4, 0.6, 5.0])
async def test_a_lease_counts_until_its_expiry_at_the_now_read_after_the_locks(
    postgres_url: str, waited: float
) -> None:
    """The leased sums travel with the locks, sent before ``now`` is known: a lease that expires
    between the moment they are sent and ``now`` (read after the locks) must not count, one that
    expires after must; past the horizon (a long wait for the locks) they are read again."""
    truncate_postgres(postgres_url)
    store = open_storage(postgres_url, pool_size=1)
    clock = SteppingClock(1000.0)
    store.clock = clock
    try:
        await store.create_limit(LimitSpec(name="db", limit=1))
        await store.acquire(AcquireRequest(["db"], 1, lease=LeaseSpec(30.5)))  # expires at 1030.5
        # Sent at 1030.0; ``now`` read after the locks, ``waited`` seconds later.
        clock.steps = [1030.0, 1030.0 + waited]
        if 1030.0 + waited > 1030.5:
            granted = await store.acquire(AcquireRequest(["db"], 1, lease=LeaseSpec(30.0)))
            assert granted.lease_id is not None
        else:
            with pytest.raises(SlotsUnavailable):
                await store.acquire(AcquireRequest(["db"], 1, lease=LeaseSpec(30.0)))
    finally:
        await store.close()


# --- batched reads: the first halves of a group's operations travel together --------------------


@pytest.fixture
async def storage(postgres_url: str) -> AsyncIterator[Storage]:
    """A storage over one lane, so that ``_one_group`` makes its groups."""
    truncate_postgres(postgres_url)
    store = Storage(PostgresBackend(postgres_url, pool_size=2, lanes=1))
    try:
        yield store
    finally:
        await store.close()


class Halves(TwoHalves[Any, Any]):
    """A two-halves operation that records when each half runs (in ``log``, shared)."""

    def __init__(
        self, name: str, log: list[str], send: Callable[[Tx], Any], finish: Callable[[Tx, Any], Any]
    ):
        def sending(tx: Tx) -> Any:
            log.append(f"send {name}")
            return send(tx)

        def finishing(tx: Tx, reads: Any) -> Any:
            log.append(f"finish {name}")
            return finish(tx, reads)

        super().__init__(sending, finishing)


def _acquire(store: Storage, name: str, log: list[str], *names: str) -> Halves:
    request = AcquireRequest(list(names), 1, lease=LeaseSpec(60.0))
    scripts = store.scripts
    return Halves(
        name,
        log,
        lambda tx: scripts.send_lock_reads(tx, request.names),
        lambda tx, reads: scripts.slots.acquire(tx, request, reads=reads),
    )


def _release(store: Storage, name: str, log: list[str], lease_id: str) -> Halves:
    slots = store.scripts.slots
    return Halves(
        name,
        log,
        lambda tx: slots.send_end_lease(tx, lease_id),
        lambda tx, reads: slots.end_lease(tx, lease_id, reads=reads),
    )


async def _leases(store: Storage, name: str) -> int:
    return len(await store.list_leases(name))


@pytest.mark.postgres
async def test_a_group_sends_every_first_half_before_it_finishes_any(storage: Storage) -> None:
    await storage.create_limit(LimitSpec(name="a", limit=5))
    await storage.create_limit(LimitSpec(name="b", limit=5))
    log: list[str] = []
    ops = [
        _acquire(storage, "1", log, "a"),
        _acquire(storage, "2", log, "b"),
        _acquire(storage, "3", log, "a"),
    ]
    outcomes = await _one_group(storage.backend, list(ops))  # type: ignore[arg-type]
    assert log == ["send 1", "send 2", "send 3", "finish 1", "finish 2", "finish 3"]
    assert all(o.lease_id is not None for o in outcomes)
    assert await _leases(storage, "a") == 2 and await _leases(storage, "b") == 1


@pytest.mark.postgres
async def test_batched_acquisitions_of_one_slot_grant_it_once(storage: Storage) -> None:
    """The second acquisition's reads ran before the first one's writes: it reads its limit
    again behind them (its lock is the group's already) and is refused, as if alone."""
    await storage.create_limit(LimitSpec(name="one", limit=1))
    log: list[str] = []
    outcomes = await _one_group(
        storage.backend,  # type: ignore[arg-type]
        [_acquire(storage, "1", log, "one"), _acquire(storage, "2", log, "one")],
    )
    assert outcomes[0].lease_id is not None
    assert isinstance(outcomes[1], SlotsUnavailable)
    assert await _leases(storage, "one") == 1


@pytest.mark.postgres
@pytest.mark.parametrize("release_first", [True, False])
async def test_a_release_and_an_acquisition_of_one_limit_in_one_batch(
    storage: Storage, release_first: bool
) -> None:
    """Each decides on rows that include the other's writes when it comes second."""
    await storage.create_limit(LimitSpec(name="one", limit=1))
    held = await storage.acquire(AcquireRequest(["one"], 1, lease=LeaseSpec(60.0)))
    assert held.lease_id is not None
    log: list[str] = []
    release, acquire = _release(storage, "r", log, held.lease_id), _acquire(storage, "a", log, "one")
    ops = [release, acquire] if release_first else [acquire, release]
    outcomes = await _one_group(storage.backend, list(ops))  # type: ignore[arg-type]
    released, acquired = (outcomes[0], outcomes[1]) if release_first else (outcomes[1], outcomes[0])
    assert released is True
    if release_first:
        assert acquired.lease_id is not None
        assert await _leases(storage, "one") == 1
    else:
        assert isinstance(acquired, SlotsUnavailable)
        assert await _leases(storage, "one") == 0


@pytest.mark.postgres
async def test_a_release_that_admits_a_waiter_in_a_batch_grants_it_once(storage: Storage) -> None:
    """Admission changes limits the release did not lock first (the waiter's others): what
    follows in the batch reads again, and the waiter is granted once, on both limits."""
    await storage.create_limit(LimitSpec(name="a", limit=1))
    await storage.create_limit(LimitSpec(name="b", limit=2))
    on_a = await storage.acquire(AcquireRequest(["a"], 1, lease=LeaseSpec(60.0)))
    on_b = await storage.acquire(AcquireRequest(["b"], 1, lease=LeaseSpec(60.0)))
    assert on_a.lease_id is not None and on_b.lease_id is not None
    waiter = asyncio.ensure_future(
        storage.acquire(AcquireRequest(["a", "b"], 1, lease=LeaseSpec(60.0), wait=10))
    )
    while storage.waiting_requests < 1:
        await asyncio.sleep(0.01)
    log: list[str] = []
    outcomes = await _one_group(
        storage.backend,  # type: ignore[arg-type]
        [
            _release(storage, "a", log, on_a.lease_id),
            _release(storage, "b", log, on_b.lease_id),
            _acquire(storage, "new", log, "b"),
        ],
    )
    granted = await asyncio.wait_for(waiter, 10)
    assert outcomes[0] is True and outcomes[1] is True
    assert outcomes[2].lease_id is not None  # b: 2 slots, the waiter's and this one
    assert granted.lease_id is not None
    assert await _leases(storage, "a") == 1 and await _leases(storage, "b") == 2


class Written:
    """Sent reads for a test operation: locks nothing, admits nothing."""

    def locked_ids(self) -> set[str]:
        return set()

    def admits(self) -> bool:
        return False

    def refresh(self, tx: Tx) -> None:
        raise AssertionError("nothing to read again")


@pytest.mark.postgres
async def test_a_batched_operation_that_fails_alone_or_after_its_first_half_wrote(
    backend: PostgresBackend, table: str, postgres_url: str
) -> None:
    """One that fails having written nothing fails alone; one whose first half wrote (as a
    release's deletes its lease) cannot: the group rolls back and runs them one by one."""
    runs = {"ok": 0, "refused": 0, "wrote": 0}

    def insert(x: int) -> Callable[[Tx], Written]:
        def send(tx: Tx) -> Written:
            tx.write(f"INSERT INTO {table} VALUES (:x)", {"x": x})
            return Written()

        return send

    def read(tx: Tx) -> Written:
        tx.all_later(f"SELECT x FROM {table}")
        return Written()

    def finish(name: str, fail: bool) -> Callable[[Tx, Written], str]:
        def run(tx: Tx, reads: Written) -> str:
            runs[name] += 1
            if fail:
                raise NotFound(name)
            return name

        return run

    refused = [TwoHalves(insert(1), finish("ok", False)), TwoHalves(read, finish("refused", True))]
    outcomes = await _one_group(backend, list(refused))
    assert outcomes[0] == "ok" and isinstance(outcomes[1], NotFound)
    assert runs == {"ok": 1, "refused": 1, "wrote": 0}
    assert _rows(postgres_url, table) == [1]

    wrote = [TwoHalves(insert(2), finish("ok", False)), TwoHalves(insert(3), finish("wrote", True))]
    outcomes = await _one_group(backend, list(wrote))
    assert outcomes[0] == "ok" and isinstance(outcomes[1], NotFound)
    assert runs == {"ok": 3, "refused": 1, "wrote": 2}  # the group, then each alone
    assert _rows(postgres_url, table) == [1, 2]


class RecordingCursor:
    """A cursor that records what is sent through it."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, Any]] = []

    def execute(self, query: str, params: Any = None) -> None:
        self.sent.append(("execute", query, params))

    def executemany(self, query: str, params: Any) -> None:
        self.sent.append(("executemany", query, list(params)))

    def fetchall(self) -> list[Any]:
        return []


def test_several_rows_of_one_insert_are_one_statement() -> None:
    """A group's events (``Tx.flush``) go in one multi-row INSERT per table, not one per row."""
    cursor = RecordingCursor()
    tx = PgTx(cursor, POSTGRES, psycopg.IntegrityError)
    rows = [{"waiter_id": f"w{i}", "limit_id": "l", "position": i} for i in range(3)]
    tx.write_many(q.INSERT_WAITER_LIMIT, rows)
    assert cursor.sent == []  # held until something else is sent
    tx.send_writes()
    ((kind, sql, params),) = cursor.sent
    assert kind == "execute" and sql.count("(%s, %s, %s)") == 3
    assert params == ["w0", "l", 0, "w1", "l", 1, "w2", "l", 2]
    assert tx.writes == 1
    for query in (q.INSERT_EVENT, q.INSERT_EVENT_RESOURCE, q.INSERT_OUTBOX):
        assert _merged_insert(POSTGRES.sql(query)) is not None
    assert _merged_insert(POSTGRES.sql(q.INSERT_WAITER)) is None  # a row with more than parameters
    assert _merged_insert(POSTGRES.sql(q.INSERT_EVENT_IF_NEW)) is None  # ON CONFLICT ... RETURNING


def test_consecutive_writes_are_one_statement_unless_one_touches_what_another_writes() -> None:
    """An acquisition's limit update, lease and grant: one statement. A second write of a table
    already written, or one that names it (it may read it), starts a new statement; a read
    sends what is held first."""
    cursor = RecordingCursor()
    tx = PgTx(cursor, POSTGRES, psycopg.IntegrityError)
    slots = {"pool_slots": 0, "pool_clock": 1.0, "fencing_token": 2, "updated": 1.0, "pool_event_id": None}
    tx.write_many(q.UPDATE_LIMIT_SLOTS, [{"id": "a", **slots}])
    tx.write(
        q.INSERT_LEASE,
        {"id": "L", "created": 1.0, "expires": 2.0, "slots": 1, "holder_type": None, "holder_id": None},
    )
    tx.write_many(
        q.INSERT_GRANT,
        [{"lease_id": "L", "limit_id": "a", "slots": 1, "fencing_token": 2, "acquired_event_id": None}],
    )
    tx.write(q.UPDATE_LIMIT_AVG, {"id": "a", "avg": 1.0})  # limits again: a statement of its own
    assert cursor.sent == []
    tx.all_later(q.SELECT_LIMITS_OF_LEASE_WITH_GRANTS, {"id": "L"})
    joined, avg = cursor.sent[0], cursor.sent[1]
    assert joined[1].startswith("WITH w0 AS (") and joined[1].count("w1 AS (") == 1
    assert (
        "UPDATE limits" in joined[1]
        and "INSERT INTO leases" in joined[1]
        and "INSERT INTO grants" in joined[1]
    )
    assert joined[2][:6] == [0, 1.0, 2, 1.0, None, "a"] and joined[2][6] == "L"
    assert avg[1].lstrip().startswith("UPDATE limits SET avg") and avg[2] == [1.0, "a"]
    assert tx.writes == 4
    sent = len(cursor.sent)
    tx.write(
        q.INSERT_LEASE,
        {"id": "M", "created": 1.0, "expires": 2.0, "slots": 1, "holder_type": None, "holder_id": None},
    )
    tx.write("DELETE FROM grants WHERE lease_id IN (SELECT id FROM leases WHERE expires < 0)")  # reads leases
    tx.send_writes()
    assert [sql.lstrip().split()[0] for _, sql, _ in cursor.sent[sent:]] == ["INSERT", "DELETE"]


@pytest.mark.postgres
async def test_a_multi_row_insert_stores_every_row(
    backend: PostgresBackend, table: str, postgres_url: str
) -> None:
    def insert(tx: Tx) -> None:
        tx.write_many(f"INSERT INTO {table} (x) VALUES (:x)", [{"x": x} for x in (3, 1, 2)])

    await backend.run(insert)
    assert _rows(postgres_url, table) == [1, 2, 3]


def test_the_notification_is_the_main_statement_of_the_last_writes() -> None:
    """Before the COMMIT, the first ``pg_notify`` ends the statement of the last writes held (one
    statement less per transaction); more notifications, or nothing held, go on their own."""
    cursor = RecordingCursor()
    tx = PgTx(cursor, POSTGRES, psycopg.IntegrityError)
    rows = [{"waiter_id": f"w{i}", "limit_id": "l", "position": i} for i in range(2)]
    tx.write_many(q.INSERT_WAITER_LIMIT, rows)
    tx.send_writes([["ch", "one"], ["ch", "two"]])
    (_, joined, params), (_, alone, alone_params) = cursor.sent
    assert joined.startswith("WITH w0 AS (") and "INSERT INTO waiter_limits" in joined
    assert joined.endswith("SELECT pg_notify(%s, %s)") and params[-2:] == ["ch", "one"]
    assert alone == "SELECT pg_notify(%s, %s)" and alone_params == ["ch", "two"]
    cursor.sent.clear()
    tx.send_writes([["ch", "three"]])  # nothing held
    assert cursor.sent == [("execute", "SELECT pg_notify(%s, %s)", ["ch", "three"])]
    cursor.sent.clear()
    tx.write("DELETE FROM leases WHERE id = :id RETURNING id", {"id": "L"})  # never a WITH part
    tx.send_writes([["ch", "four"]])
    assert [sql.split()[0] for _, sql, _ in cursor.sent] == ["DELETE", "SELECT"]


@pytest.mark.postgres
async def test_a_notification_sent_with_the_writes_arrives_once_they_committed(
    backend: PostgresBackend, table: str, postgres_url: str
) -> None:
    arrived: list[list[str]] = []
    got = threading.Event()

    def on_commit(commit: Any) -> None:
        if commit is not None and commit.woken:
            arrived.append(commit.woken)
            got.set()

    backend.subscribe(on_commit)

    def wake(x: int) -> Callable[[Tx], int]:
        def op(tx: Tx) -> int:
            tx.write(f"INSERT INTO {table} VALUES (:x)", {"x": x})
            tx.woken.append(f"w{x}")
            return x

        return op

    assert await _one_group(backend, [wake(1), wake(2)]) == [1, 2]
    await asyncio.to_thread(got.wait, 10)
    assert arrived == [["w1", "w2"]]
    assert _rows(postgres_url, table) == [1, 2]


@pytest.mark.postgres
async def test_groups_bound_their_lock_waits_and_operations_alone_do_not(
    postgres_url: str, table: str
) -> None:
    """``lock_timeout`` is set on the connection when it runs a group, reset when it runs an
    operation alone, and a ``SET`` that rolled back is sent again (one connection here)."""
    backend = PostgresBackend(postgres_url, pool_size=1, lanes=1)

    def show(tx: Tx) -> str:
        row = tx.one("SHOW lock_timeout")
        assert row is not None
        return str(row[0])

    def fails_after_writing(tx: Tx) -> None:
        tx.write(f"INSERT INTO {table} VALUES (:x)", {"x": 9})
        raise ValueError("refused after writing")

    try:
        assert await backend.run(show) == "0"
        assert await _one_group(backend, [_insert(table, 1), show]) == [1, "200ms"]
        assert await backend.run(show) == "0"
        assert await _one_group(backend, [show, show]) == ["200ms", "200ms"]
        assert await backend.run(show) == "0"
        # A group that rolls back (and runs its operations alone): its SET is undone.
        outcomes = await _one_group(backend, [fails_after_writing, show])
        assert isinstance(outcomes[0], ValueError) and outcomes[1] == "0"
        assert await _one_group(backend, [show, _insert(table, 2)]) == ["200ms", 2]
    finally:
        await backend.close()
    assert _rows(postgres_url, table) == [1, 2]


@pytest.mark.postgres
async def test_reads_taken_later_reuse_the_connection_s_cursors(postgres_url: str, table: str) -> None:
    """Each read of ``all_later`` has a cursor of its own within a transaction (its rows wait
    there), and the next transactions on that connection use the same cursors again, also after
    one that failed."""
    backend = PostgresBackend(postgres_url, pool_size=1, lanes=1)
    cursors: list[list[Any]] = []

    def reads(tx: Tx) -> list[list[int]]:
        later = [tx.all_later(f"SELECT x FROM {table} WHERE x >= :x ORDER BY x", {"x": x}) for x in (1, 2)]
        cursors.append([fetch.__self__ for fetch in later])  # type: ignore[attr-defined]
        return [[row[0] for row in fetch()] for fetch in later]

    def duplicate(tx: Tx) -> None:
        tx.all_later(f"SELECT x FROM {table}")
        tx.write(f"INSERT INTO {table} VALUES (1)")

    try:
        await backend.run(_insert(table, 1))
        await backend.run(_insert(table, 2))
        assert await backend.run(reads) == [[1, 2], [2]]
        with pytest.raises(psycopg.errors.UniqueViolation):
            await backend.run(duplicate)
        await backend.run(_insert(table, 3))
        assert await backend.run(reads) == [[1, 2, 3], [2, 3]]
    finally:
        await backend.close()
    first, second = cursors
    assert first[0] is not first[1] and first == second
