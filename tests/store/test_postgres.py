"""What only the PostgreSQL store does: its connections, notices between stores, and
`taskd.outbox`'s enqueue inside an application's transaction."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import msgspec
import pytest

import taskd.outbox
import taskd.pg
from taskd.models import TaskCounts
from taskd.store import ClaimRequest, NewJob, Outcome, StoreError
from taskd.store.base import Failure, Inserted
from taskd.store.core import keys
from taskd.store.postgres import store as postgres_store
from taskd.store.postgres.connections import Connections
from taskd.store.postgres.dialect import (
    CLAIM_SQL,
    FOLD_COUNTS_SQL,
    NEXT_DUE_SQL,
    RECOVER_SQL,
    PostgresSql,
    render,
)
from taskd.store.postgres.schema import MIGRATIONS, channel
from taskd.store.postgres.store import PostgresStore
from tests.backends import ThrowawayPostgresStore, drop_schema, postgres_url, unique_schema
from tests.support import Clock
from tests.unit.test_imports import loaded_modules


@pytest.fixture
def clock() -> Clock:
    return Clock(1_000_000.0)


@pytest.fixture
async def store(clock: Clock) -> AsyncIterator[PostgresStore]:
    opened = ThrowawayPostgresStore(postgres_url(), clock)
    await opened.open()
    yield opened
    await opened.close()


def new(task: str = "t") -> NewJob:
    return NewJob(task, msgspec.msgpack.encode(None), "enqueue", 3)


async def test_an_unreachable_database_is_a_clear_store_error() -> None:
    store = PostgresStore("postgresql://nobody@127.0.0.1:1/none", connect_timeout=5)
    with pytest.raises(StoreError, match=r"cannot connect to job store postgresql://nobody@"):
        await store.open()


async def test_a_password_never_shows() -> None:
    store = PostgresStore("postgresql://ada:secret@db.example:5433/app", schema="jobs")
    assert store.description == "postgresql://ada:***@db.example:5433/app (schema jobs)"


async def test_stores_on_one_schema_hear_each_other(store: PostgresStore, clock: Clock) -> None:
    other = PostgresStore(postgres_url(), schema=store.schema, clock=clock)
    await other.open()  # the schema exists: nothing to migrate
    try:
        await store.register_node("a", 60)
        await other.register_node("b", 60)  # a node alive to hear the first one's notices
        due, finished = asyncio.Event(), []
        other.events.on_due(lambda _: due.set())
        (inserted,) = await store.insert([new()])
        await asyncio.wait_for(due.wait(), 10)  # a job due, inserted by the other store
        waiter = other.events.watch(inserted.job_id)
        other.events.on_cancel(finished.append)
        await store.cancel(inserted.job_id)
        job = await asyncio.wait_for(waiter, 10)  # read by the other store for its waiter
        assert job is not None and job.status == "cancelled"
        assert finished == [inserted.job_id]
    finally:
        await other.close()


async def test_a_store_knows_its_own_notices_without_decoding_them(
    store: PostgresStore, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store hears its own notices back (it listens on the channel its writes notify):
    those of its inserts and of its transactions are dropped before they are decoded; the
    other stores' are read (each notice here decoded once: by the store that did not send
    it)."""
    decoded: list[str] = []
    decode = postgres_store.decode_notice

    def recording(payload: str) -> Any:
        decoded.append(payload)
        return decode(payload)

    monkeypatch.setattr(postgres_store, "decode_notice", recording)
    other = PostgresStore(postgres_url(), schema=store.schema, clock=clock)
    await other.open()
    try:
        await store.register_node("a", 60)  # two nodes alive: each notifies the other
        await other.register_node("b", 60)
        heard, told, cancelled = asyncio.Event(), asyncio.Event(), []
        store.events.on_cancel(lambda job_id: job_id in cancelled and heard.set())
        other.events.on_cancel(lambda _: told.set())
        (mine,) = await store.insert([new()])
        await store.cancel(mine.job_id)  # a transaction's notice
        await asyncio.wait_for(told.wait(), 10)  # the other heard both
        (theirs,) = await other.insert([new()])
        cancelled.append(theirs.job_id)
        await other.cancel(theirs.job_id)
        await asyncio.wait_for(heard.wait(), 10)  # after ours: one listener, in commit order
        assert len(decoded) == len(set(decoded)) == 4, decoded
    finally:
        await other.close()


MARKER = '{"sender": "test"}'  # a notice of nothing, from no store


async def _notices_until_now(
    connection: asyncpg.Connection, schema: str, heard: asyncio.Queue[str]
) -> list[str]:
    """The notices `connection` heard since the last call, up to a marker it sends now: a
    listener hears the notices in the order their transactions committed."""
    await connection.execute("SELECT pg_notify($1, $2)", channel(schema), MARKER)
    notices = []
    while (notice := await asyncio.wait_for(heard.get(), 10)) != MARKER:
        notices.append(notice)
    return notices


async def test_a_lone_daemons_writes_notify_only_once_another_node_is_alive(
    store: PostgresStore, clock: Clock
) -> None:
    """Nobody else hears a lone daemon's notices: its writes send none (its own listeners
    hear of them from the writes). Once another node is alive, every kind of write notifies
    it; when that node has left, or its heartbeat has expired, none does again."""
    heard: asyncio.Queue[str] = asyncio.Queue()
    listening = await asyncpg.connect(postgres_url())
    await listening.add_listener(channel(store.schema), lambda *args: heard.put_nowait(args[3]))
    other = PostgresStore(postgres_url(), schema=store.schema, clock=clock)
    await other.open()
    due = asyncio.Event()
    store.events.on_due(lambda _: due.set())

    async def writes() -> int:
        """An insert alone, a batch's, a transaction's (a cancel); the notices they sent."""
        due.clear()
        (alone,) = await store.insert([new()])
        assert due.is_set()  # the writer's own listeners hear of its writes all the same
        await store.insert([new(), new()])
        await store.cancel(alone.job_id)
        return len(await _notices_until_now(listening, store.schema, heard))

    try:
        assert await writes() == 0  # no node alive
        worker = await store.register_node("a", 60)
        assert await writes() == 0  # alone
        other_worker = await other.register_node("b", 60)
        assert await writes() == 3  # b hears each
        assert (await other.claim(ClaimRequest(other_worker, 10, 60))).jobs  # b heard of them
        await store.renew(worker, [], 60)
        clock.now += 61  # b's heartbeat expired (a's renewed)
        assert await writes() == 0
        await other.renew(other_worker, [], 60)  # b is back
        assert await writes() == 3
        await other.leave(other_worker)
        assert await writes() == 0
    finally:
        await other.close()
        await listening.close()


async def test_a_node_registering_waits_for_the_writes_that_did_not_see_it(
    store: PostgresStore, clock: Clock
) -> None:
    """A write decides whether to notify from the nodes alive; a node that registers while
    it is in flight waits for it to commit before it reads anything, so that it sees the
    write's jobs without its notice. Writes after the registration notify the new node."""
    await store.register_node("a", 60)
    application = await asyncpg.connect(postgres_url())  # a's write, held open
    await application.execute(f"SET taskd.now = '{clock.now}'")
    other = PostgresStore(postgres_url(), schema=store.schema, clock=clock)
    await other.open()
    try:
        async with application.transaction():
            told = await application.fetchval(
                f"SELECT {store.schema}.notify($1, 'a', '{{}}')", channel(store.schema)
            )
            assert told is False  # a alone: no notice
            await taskd.outbox.enqueue(application, "t", schema=store.schema)
            registering = asyncio.ensure_future(other.register_node("b", 60))
            await _until_waiting(application, store.schema, registering)
        worker = await registering  # once the write has committed
        assert len((await other.claim(ClaimRequest(worker, 10, 60))).jobs) == 1
        assert await application.fetchval(
            f"SELECT {store.schema}.notify($1, 'a', '{{}}')", channel(store.schema)
        )  # b is alive now: a notifies
    finally:
        await other.close()
        await application.close()


async def test_lost_connections_come_back_and_everyone_reads_again(store: PostgresStore) -> None:
    resynced = asyncio.Event()
    store.events.on_resync(resynced.set)
    await store.insert([new()])
    connection = await asyncpg.connect(postgres_url())
    try:
        await connection.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            f"taskd {store.schema}",
        )
    finally:
        await connection.close()
    await asyncio.wait_for(resynced.wait(), 30)  # the listener is back
    (inserted,) = await store.insert([new()])  # writes work again, on new connections
    assert (await store.get(inserted.job_id)) is not None
    worker = await store.register_node("n", 60)
    assert len((await store.claim(ClaimRequest(worker, 10, 60))).jobs) == 2


async def test_a_job_read_sees_one_snapshot_whatever_commits_between_its_statements(
    store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job's row and its errors are two statements of `get`: an attempt failing between
    them must not show a running job with the error of that attempt."""
    await store.insert([new()])
    worker = await store.register_node("n", 60)
    (job,) = (await store.claim(ClaimRequest(worker, 1, 60))).jobs
    failure = Outcome(
        job.id, job.epoch, worker, "retry", error=Failure("error", "boom"), retry_in=60
    )
    run_statement, failed = postgres_store.execute, False

    async def execute(db: Any, schema: str, statement: Any) -> Any:
        nonlocal failed
        rows = await run_statement(db, schema, statement)
        if not failed:  # after the read's first statement (the job's row)
            failed = True
            await store.finish([failure])
        return rows

    monkeypatch.setattr(postgres_store, "execute", execute)
    read = await store.get(job.id)
    assert read is not None and (read.status, read.errors) == ("running", [])
    monkeypatch.undo()
    again = await store.get(job.id)
    assert again is not None and again.status == "pending"
    assert [error.message for error in again.errors] == ["boom"]


# -- taskd.outbox: enqueue in the application's transaction ----------------------------------------


async def test_enqueue_in_an_asyncpg_transaction_exists_only_if_it_commits(
    store: PostgresStore, clock: Clock
) -> None:
    due = asyncio.Event()
    store.events.on_due(lambda _: due.set())
    await store.register_node("n", 60)  # a daemon alive, to hear of the application's jobs
    connection = await asyncpg.connect(postgres_url())
    try:
        await connection.execute(f"SET taskd.now = '{clock.now}'")  # the daemon's (test) clock
        async with connection.transaction():
            kept = await taskd.outbox.enqueue(connection, "t", {"n": 1}, schema=store.schema)
            assert not due.is_set()  # nobody hears of it before the commit
        await asyncio.wait_for(due.wait(), 10)
        with pytest.raises(RuntimeError, match="rolled back"):
            async with connection.transaction():
                lost = await taskd.outbox.enqueue(connection, "t", schema=store.schema)
                raise RuntimeError("rolled back")
        keyed = [
            await taskd.outbox.enqueue(connection, "t", key="k", priority=5, schema=store.schema)
            for _ in range(2)
        ]
    finally:
        await connection.close()
    job = await store.get(kept.job_id)
    assert job is not None and msgspec.msgpack.decode(job.payload) == {"n": 1}
    assert (job.status, job.origin, job.max_attempts) == ("pending", "enqueue", 3)
    assert await store.get(lost.job_id) is None
    assert keyed[1] == taskd.outbox.EnqueueResult(keyed[0].job_id, duplicate=True)


async def test_the_outbox_keys_a_job_by_the_limit_key_the_daemons_recorded(
    store: PostgresStore,
) -> None:
    """Its jobs count per value of their task's `limit_key`, as the daemons' own do: ''
    where the payload has none; the jobs of a task without one have no value (NULL)."""
    store.limit_keys = {"t": "order.customer"}
    await store.rekey("t", "order.customer")  # what a daemon's start or reload records
    connection = await asyncpg.connect(postgres_url())
    try:
        keyed = await taskd.outbox.enqueue(
            connection, "t", {"order": {"customer": "acme"}}, schema=store.schema
        )
        missing = await taskd.outbox.enqueue(connection, "t", {"order": {}}, schema=store.schema)
        other = await taskd.outbox.enqueue(connection, "u", {"order": {"customer": "acme"}},
                                           schema=store.schema)  # fmt: skip
        values = await connection.fetch(
            f"SELECT id, limit_key FROM {store.schema}.jobs WHERE id = ANY($1) ORDER BY id",
            [keyed.job_id, missing.job_id, other.job_id],
        )
    finally:
        await connection.close()
    assert [row["limit_key"] for row in values] == ["acme", "", None]


def test_jobs_without_a_key_are_inserted_without_on_conflict() -> None:
    """No unique index can refuse a job without a key: its insert is a plain one, where ON
    CONFLICT makes each row a speculative insertion (a probe of the primary key, a lock, a
    second WAL record); a statement with a keyed job keeps it (its key may be taken)."""
    sql = PostgresSql("taskd", "me")
    keyed = msgspec.structs.replace(new(), key="k")
    assert "ON CONFLICT DO NOTHING" not in next(sql.insert([new()])).sql
    assert "ON CONFLICT DO NOTHING" not in next(sql.insert([new(), new("u")])).sql
    assert "ON CONFLICT DO NOTHING" in next(sql.insert([keyed])).sql
    assert "ON CONFLICT DO NOTHING" in next(sql.insert([new(), keyed])).sql
    assert "ON CONFLICT DO NOTHING" not in sql.insert_one_unless_keyed(new()).sql
    assert "ON CONFLICT DO NOTHING" in sql.insert_one_unless_keyed(keyed).sql


def test_the_outbox_statement_writes_the_job_and_nothing_else() -> None:
    """An unkeyed job's one statement has no write to the keyed tasks' turns, nor any other
    CTE than its insert and the read of its task's path and turn (each costs the server at
    every execution, writing or not): a task with a turn takes the store's insert."""
    for job in (new(), msgspec.structs.replace(new(), key="k")):
        sql = PostgresSql("taskd", "me").insert_one_unless_keyed(job).sql
        assert "key_turns (task)" not in sql and "UPDATE" not in sql
        assert sql.count(" AS (") == 2 and "unnest" not in sql


async def test_the_outbox_stirs_the_turn_of_a_task_that_has_one(store: PostgresStore) -> None:
    """A task with a turn among its keys but no `limit_key` path (its configuration took it
    away): its job walks the turn again, as the daemons' own insert does."""
    connection = await asyncpg.connect(postgres_url())
    try:
        await connection.execute(
            f"INSERT INTO {store.schema}.key_turns (task, rested_at) VALUES ('w', 1)"
        )
        turned = await taskd.outbox.enqueue(connection, "w", {"n": 1}, schema=store.schema)
        plain = await taskd.outbox.enqueue(connection, "u", {"n": 2}, schema=store.schema)
        rested = await connection.fetch(
            f"SELECT task, rested_at FROM {store.schema}.key_turns ORDER BY task"
        )
    finally:
        await connection.close()
    assert [(row["task"], row["rested_at"]) for row in rested] == [("w", None)]
    jobs = [await store.get(turned.job_id), await store.get(plain.job_id)]
    assert [job and (job.task, job.status) for job in jobs] == [("w", "pending"), ("u", "pending")]


async def test_the_outbox_enqueues_in_one_statement_when_its_task_has_no_limit_key(
    store: PostgresStore, clock: Clock
) -> None:
    """One round trip, as pgqueuer's enqueue: no read of the task's `limit_key` before it;
    outside a transaction it commits on its own, and the daemons hear of it."""
    store.limit_keys = {"t": "order.customer"}
    await store.rekey("t", "order.customer")
    due = asyncio.Event()
    store.events.on_due(lambda _: due.set())
    statements: list[tuple[Any, ...]] = []  # the store's (not asyncpg's reads of its types)
    await store.register_node("n", 60)  # a daemon alive, to hear of the application's jobs
    connection = await asyncpg.connect(postgres_url())
    await connection.execute(f"SET taskd.now = '{clock.now}'")  # the daemon's (test) clock
    connection.add_query_logger(
        lambda record: store.schema in record.query and statements.append(record.args)
    )
    try:
        single = await taskd.outbox.enqueue(connection, "u", {"n": 1}, schema=store.schema)
        keyed = await taskd.outbox.enqueue(
            connection, "t", {"order": {"customer": "acme"}}, schema=store.schema
        )
    finally:
        await connection.close()  # after the loggers, which the loop calls soon after each
    await asyncio.wait_for(due.wait(), 10)  # committed: the store heard of it
    assert [args for args in statements if "u" in args] == statements[:1], statements
    # The task's limit_key: inserted again with it.
    assert [("t" in args, "acme" in args) for args in statements[1:]] == [
        (True, False),
        (True, True),
    ]
    jobs = [await store.get(single.job_id), await store.get(keyed.job_id)]
    assert [job and (job.task, job.status) for job in jobs] == [("u", "pending"), ("t", "pending")]


async def test_a_lone_unkeyed_insert_is_one_statement_that_writes_only_the_job(
    store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's insert of one job (an enqueue), of a task with no `limit_key` nor a turn,
    is the outbox's one-job statement: no arrays, no write to the keyed tasks' turns. A job
    of a task that has a turn still walks it, one of a keyed task takes the full insert
    (with its value), and jobs written together one statement of arrays, as before."""
    statements: list[str] = []

    run_statement = PostgresStore._execute

    def recording(self: PostgresStore, db: Any, statement: Any) -> Any:
        statements.append(statement.sql)
        return run_statement(self, db, statement)

    monkeypatch.setattr(PostgresStore, "_execute", recording)
    store.limit_keys = {"t": "order.customer"}
    due = asyncio.Event()
    store.events.on_due(lambda _: due.set())
    connection = await asyncpg.connect(postgres_url())
    try:
        (lone,) = await store.insert([new("u")])
        await asyncio.wait_for(due.wait(), 10)  # this daemon's own listeners heard of it
        assert len(statements) == 1 and "unnest" not in statements[0], statements
        assert "key_turns (task)" not in statements[0]
        await connection.execute(
            f"INSERT INTO {store.schema}.key_turns (task, rested_at) VALUES ('w', 1)"
        )
        statements.clear()
        (turned,) = await store.insert([new("w")])
        assert len(statements) == 2 and "key_turns (task)" in statements[1], statements
        rested = await connection.fetchval(
            f"SELECT rested_at FROM {store.schema}.key_turns WHERE task = 'w'"
        )
        assert rested is None  # stirred
        statements.clear()
        payload = msgspec.msgpack.encode({"order": {"customer": "acme"}})
        (keyed,) = await store.insert([NewJob("t", payload, "enqueue", 3)])
        assert len(statements) == 1 and "unnest" in statements[0], statements
        statements.clear()
        first, again = [
            await store.insert([msgspec.structs.replace(new("u"), key="k")]) for _ in range(2)
        ]
        assert len(statements) == 3 and "stirred" not in "".join(statements), statements
        assert again == [Inserted(first[0].job_id, duplicate=True)]  # the key's active job
        statements.clear()
        together = await store.insert([new("u"), new("u")])
        assert len(statements) == 1 and "unnest" in statements[0], statements
        ids = [job.job_id for job in (lone, turned, keyed, *first, *together)]
        rows = await connection.fetch(
            f"SELECT task, status, limit_key FROM {store.schema}.jobs WHERE id = ANY($1::bigint[])"
            " ORDER BY id",
            ids,
        )
    finally:
        await connection.close()
    assert [tuple(row) for row in rows] == [
        ("u", "pending", None),
        ("w", "pending", None),
        ("t", "pending", "acme"),
        ("u", "pending", None),
        ("u", "pending", None),
        ("u", "pending", None),
    ]


async def test_a_lone_insert_prepared_before_a_schema_change_is_prepared_again(
    store: PostgresStore,
) -> None:
    """The statement of a lone insert is prepared once on each connection; one that a
    migration (a newer daemon's) made stale is prepared again, and the insert goes through."""
    (first,) = await store.insert([new("u")])
    connection = await asyncpg.connect(postgres_url())
    try:  # the statement returns `task`: its result's type changes
        await connection.execute(
            f"ALTER TABLE {store.schema}.jobs ALTER COLUMN task TYPE varchar(200)"
        )
    finally:
        await connection.close()
    (second,) = await store.insert([new("u")])
    assert second.job_id > first.job_id and not second.duplicate
    (third,) = await store.insert([new("u")])
    assert third.job_id > second.job_id


async def test_uses_beyond_the_pool_size_wait_for_a_slot_and_one_given_up_keeps_none() -> None:
    """A use waits while `size` are under way and takes the slot of the first to end; one
    that gives up while waiting takes no slot away (the next still gets one)."""
    application = f"taskd {unique_schema()}"
    connections = Connections(
        postgres_url(), "test", size=1, connect_timeout=5, application=application
    )
    held = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> int:
        async with connections.acquire() as db:
            held.set()
            await release.wait()
            return int(await db.fetchval("SELECT pg_backend_pid()"))

    async def use() -> int:
        async with connections.acquire() as db:
            return int(await db.fetchval("SELECT pg_backend_pid()"))

    try:
        holder = asyncio.create_task(hold())
        await held.wait()
        given_up, waiting = asyncio.create_task(use()), asyncio.create_task(use())
        await asyncio.sleep(0.05)
        assert not given_up.done() and not waiting.done()  # the only slot is taken
        given_up.cancel()
        release.set()
        pid = await holder
        assert await asyncio.wait_for(waiting, 10) == pid  # the same connection, handed on
        assert await asyncio.wait_for(use(), 10) == pid  # and its slot free again
        with pytest.raises(asyncio.CancelledError):
            await given_up
    finally:
        await connections.close()


async def test_enqueue_on_psycopg_connections(store: PostgresStore) -> None:
    import psycopg

    async with await psycopg.AsyncConnection.connect(postgres_url()) as connection:
        first = await taskd.outbox.enqueue(connection, "t", [1, 2], delay=30, schema=store.schema)
    with psycopg.Connection.connect(postgres_url()) as sync_connection:
        second = taskd.outbox.enqueue_sync(sync_connection, "t", "x", key="k", schema=store.schema)
        again = taskd.outbox.enqueue_sync(sync_connection, "t", "y", key="k", schema=store.schema)
    assert again == taskd.outbox.EnqueueResult(second.job_id, duplicate=True)
    delayed = await store.get(first.job_id)
    assert delayed is not None and delayed.run_at == delayed.created_at + 30
    assert msgspec.msgpack.decode(delayed.payload) == [1, 2]


TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def test_the_outbox_stores_the_traceparent_given_or_of_the_current_span(
    store: PostgresStore,
) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("app")
    connection = await asyncpg.connect(postgres_url())
    try:
        given = await taskd.outbox.enqueue(
            connection, "t", traceparent=TRACEPARENT, schema=store.schema
        )
        with tracer.start_as_current_span("checkout") as span:
            ambient = await taskd.outbox.enqueue(connection, "t", schema=store.schema)
        untraced = await taskd.outbox.enqueue(connection, "t", schema=store.schema)
    finally:
        await connection.close()
    context = span.get_span_context()
    jobs = [await store.get(result.job_id) for result in (given, ambient, untraced)]
    assert [job.traceparent for job in jobs if job is not None] == [
        TRACEPARENT,
        f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}",
        None,
    ]


def test_the_outbox_needs_neither_asyncpg_nor_the_daemon() -> None:
    modules = loaded_modules("import taskd.outbox")
    assert not {"asyncpg", "aiosqlite", "taskd.store.postgres.store", "opentelemetry"} & modules


def test_taskd_pg_is_the_outbox_by_its_first_name() -> None:
    assert (taskd.pg.enqueue, taskd.pg.enqueue_sync) == (
        taskd.outbox.enqueue,
        taskd.outbox.enqueue_sync,
    )


def rows_read(plan: dict[str, Any]) -> float:
    """The rows a plan read from the jobs table: those it kept and those it filtered out,
    over all its loops."""
    read = 0.0
    if plan.get("Relation Name") == "jobs":
        kept = plan["Actual Rows"] + plan.get("Rows Removed by Filter", 0)
        read += kept * plan["Actual Loops"]
    return read + sum(rows_read(child) for child in plan.get("Plans", []))


def literals(params: dict[str, Any], names: tuple[str, ...]) -> str:
    """The parameters as SQL literals (EXECUTE takes no bound parameters in an EXPLAIN)."""

    def literal(value: Any) -> str:
        if value is None:
            return "NULL"
        if isinstance(value, list):
            return "'{" + ",".join("NULL" if item is None else str(item) for item in value) + "}'"
        return "'" + str(value).replace("'", "''") + "'"

    return ", ".join(literal(params[name]) for name in names)


async def test_a_claim_reads_only_what_it_can_take(store: PostgresStore) -> None:
    """Delayed jobs and the backlogs of tasks held back (at their concurrency, their rate
    limit, paused) cost a claim and its next due time nothing, with or without the
    planner's statistics, and with the generic plans a claim uses (claim_start), made while
    the table was empty: they read a few rows, not the backlogs, and take the right jobs."""
    connection = await asyncpg.connect(postgres_url())
    try:
        await connection.execute(f"SET taskd.now = '{await store.clock()}'")
        await connection.execute("SET plan_cache_mode = force_generic_plan")
        empty = {"worker": "n", "limit": 16, "lease": 60.0, "tasks": [], "caps": [], "quotas": []}
        for name, statement in (("claim", CLAIM_SQL), ("next_due", NEXT_DUE_SQL)):
            sql, names = render(statement, store.schema)
            await connection.execute(f"PREPARE {name} AS {sql}")
            await connection.fetch(f"EXPLAIN EXECUTE {name}({literals(empty, names)})")  # planned
        await _a_claim_reads_only_what_it_can_take(store, connection)
    finally:
        await connection.close()


async def _a_claim_reads_only_what_it_can_take(
    store: PostgresStore, generic: asyncpg.Connection
) -> None:
    backlog = 3000
    delayed = [msgspec.structs.replace(new("later"), delay=3600.0)] * backlog
    held = [new(task) for task in ("throttled", "limited", "paused") for _ in range(backlog)]
    await store.insert([*delayed, *held, new("free"), new("free")])
    await store.set_task_paused("paused", True)
    worker = await store.register_node("n", 60)
    limits, rates = {"throttled": 1}, {"limited": 3600.0}
    first = await store.claim(ClaimRequest(worker, 16, 60, limits, rates))
    assert sorted(job.task for job in first.jobs) == ["free", "free", "limited", "throttled"]
    second = await store.claim(ClaimRequest(worker, 16, 60, limits, rates))
    assert second.jobs == [] and second.next_due_in == pytest.approx(3599, abs=1)
    tasks = ["throttled", "limited", "paused"]
    params = {"worker": worker, "limit": 16, "lease": 60.0, "tasks": tasks,
              "caps": [1, None, None], "quotas": [None, 0, 0]}  # fmt: skip
    connection = await asyncpg.connect(postgres_url())
    try:
        await connection.execute(f"SET taskd.now = '{await store.clock()}'")
        for analyzed in (None, False, True):  # None: the generic plans made on an empty table
            if analyzed:
                await connection.execute(f"ANALYZE {store.schema}.jobs")
            for name, statement in (("claim", CLAIM_SQL), ("next_due", NEXT_DUE_SQL)):
                sql, names = render(statement, store.schema)
                db = connection if analyzed is not None else generic
                if db is generic:
                    sql, names = f"EXECUTE {name}({literals(params, names)})", ()
                explained = db.transaction()
                await explained.start()
                try:
                    (plan,) = json.loads(await db.fetchval(
                        f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *[params[n] for n in names]
                    ))  # fmt: skip
                finally:
                    await explained.rollback()  # EXPLAIN ANALYZE ran the claim: undo it
                assert rows_read(plan["Plan"]) < 100, (analyzed, plan)
    finally:
        await connection.close()


async def test_a_claim_plans_generic_unless_a_keyed_turn_walks(store: PostgresStore) -> None:
    """A claim's own statements run with the plans made once per connection (generic),
    from its start on; those of a claim in which a keyed task's turn walks are planned at
    each execution (the default), also after a claim with generic plans in the same
    transaction."""
    walking = PostgresSql(store.schema, "test").claim_start(["keyed"], [])
    plain = PostgresSql(store.schema, "test").claim_start([], [])
    connection = await asyncpg.connect(postgres_url())
    try:
        default = await connection.fetchval("SELECT current_setting('plan_cache_mode')")
        async with connection.transaction():
            modes = []
            for statement in (plain, walking, plain):
                sql, names = render(statement.sql, store.schema)
                await connection.fetch(sql, *[statement.params[name] for name in names])
                modes.append(await connection.fetchval("SELECT current_setting('plan_cache_mode')"))
        after = await connection.fetchval("SELECT current_setting('plan_cache_mode')")
    finally:
        await connection.close()
    assert modes == ["force_generic_plan", default, "force_generic_plan"]
    assert after == default != "force_generic_plan"


async def test_a_keyed_walk_reads_a_few_keyed_jobs_next_to_a_backlog(store: PostgresStore) -> None:
    """A keyed task's walk of its values (a probe each), its first due jobs of each and the
    running jobs of a value read the index of the keyed jobs (partial: limit_key IS NOT
    NULL, as each statement says), not the backlog of the task's values nor that of an
    unkeyed task beside it (no value: in no such index), with or without statistics."""
    store.limit_keys = {"k": "c"}
    keyed = [NewJob("k", msgspec.msgpack.encode({"c": f"v{n % 50}"}), "enqueue", 3)
             for n in range(3000)]  # fmt: skip
    await store.insert([*keyed, *(new("kz") for _ in range(3000))])
    worker = await store.register_node("n", 60)
    claimed = await store.claim(ClaimRequest(worker, 8, 60, {"k": 1}, keyed=frozenset({"k"})))
    assert {job.task for job in claimed.jobs} == {"k", "kz"}
    values = keys.VALUES.format(s="{s}", index="", first=">=", before="", upto="")
    first_due = (
        "SELECT priority, run_at, id, limit_key FROM {s}.jobs WHERE task = :task"
        " AND limit_key = :key AND limit_key IS NOT NULL AND status = 'pending'"
        " AND run_at <= :now ORDER BY priority, run_at, id LIMIT 2"
    )
    params = {"task": "k", "kind": keys.rate_kind("k"), "most": keys.WALK, "after": "",
              "key": "v7"}  # fmt: skip
    connection = await asyncpg.connect(postgres_url())
    try:
        await connection.execute(f"SET taskd.now = '{await store.clock()}'")
        for analyzed in (False, True):
            if analyzed:
                await connection.execute(f"ANALYZE {store.schema}.jobs")
            for statement, most in ((values, 50 * 4 + 64), (first_due, 10)):
                sql, names = render(statement, store.schema)
                (plan,) = json.loads(await connection.fetchval(
                    f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *[params[n] for n in names]
                ))  # fmt: skip
                assert rows_read(plan["Plan"]) < most, (analyzed, statement, plan)
                assert "jobs_task_limit_key_claim" in json.dumps(plan), plan
    finally:
        await connection.close()


# Every index of the jobs table: each one is written by the claims and finishes that change
# what it holds, so each must be read by a statement that would scan without it.
JOBS_INDEXES = {
    "jobs_pkey", "jobs_active_key", "jobs_task_claim_order", "jobs_finished",
    "jobs_task_status", "jobs_batch", "jobs_task_key", "jobs_task_limit_key_claim",
    "jobs_task_limit_key_running", "jobs_origin",
}  # fmt: skip


async def test_the_jobs_table_has_no_index_that_nothing_needs(store: PostgresStore) -> None:
    """The indexes of all pending jobs by (priority, run_at) and by run_at, and of the
    running jobs by task, were written by every claim and finish and needed by none."""
    connection = await asyncpg.connect(postgres_url())
    try:
        names = await connection.fetch(
            "SELECT indexname FROM pg_indexes WHERE schemaname = $1 AND tablename = 'jobs'",
            store.schema,
        )
    finally:
        await connection.close()
    assert {row["indexname"] for row in names} == JOBS_INDEXES


async def test_the_reads_of_running_jobs_skip_the_pending_ones(store: PostgresStore) -> None:
    """Listing the running jobs, a recovery and a task's room read the running jobs only,
    next to a backlog of pending ones, with or without the planner's statistics."""
    await store.insert([new("backlog") for _ in range(3000)] + [new("t") for _ in range(3)])
    worker = await store.register_node("n", 60)
    await store.claim(ClaimRequest(worker, 3, 60, {}, {}, keyed=frozenset()))
    statements = [
        ("SELECT id FROM {s}.jobs WHERE status = 'running' ORDER BY id DESC LIMIT 50", []),
        (RECOVER_SQL, [3]),
        ("SELECT count(*) FROM {s}.jobs WHERE task = $1 AND status = 'running' AND NOT waiting",
         ["t"]),
    ]  # fmt: skip
    connection = await asyncpg.connect(postgres_url())
    try:
        for analyzed in (False, True):
            if analyzed:
                await connection.execute(f"ANALYZE {store.schema}.jobs")
            for statement, args in statements:
                sql = render(statement, store.schema)[0]
                explained = connection.transaction()
                await explained.start()
                try:
                    (plan,) = json.loads(
                        await connection.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args)
                    )
                finally:
                    await explained.rollback()
                assert rows_read(plan["Plan"]) < 20, (analyzed, statement, plan)
    finally:
        await connection.close()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"key": "@run"}, "keys starting with '@' are reserved"),
        ({"delay": 5, "run_at": 9.0}, "delay or run_at"),
        ({"max_attempts": 0}, "max_attempts: at least 1, got 0"),
        ({"delay": 20 * 365 * 86400}, "delay: at most 10 years, got 20 years"),
        ({"schema": "Robert'); DROP"}, "not a schema name"),
        ({"traceparent": "00-abc-01"}, "traceparent: expected a W3C traceparent"),
    ],
)
async def test_enqueue_refuses_what_it_can_check(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        await taskd.outbox.enqueue(object(), "t", **options)  # type: ignore[arg-type]


async def test_two_stores_migrating_at_once_make_one_schema() -> None:
    url, schema = postgres_url(), unique_schema()
    stores = [PostgresStore(url, schema=schema) for _ in range(3)]
    try:
        await asyncio.gather(*(s.open() for s in stores))
        ids = [await s.register_node(f"n{i}", 60) for i, s in enumerate(stores)]
        assert ids == ["n0/1", "n1/1", "n2/1"]
    finally:
        for s in stores:
            await s.close()
        await drop_schema(url, schema)


async def migrated_until(
    connection: asyncpg.Connection, schema: str, first: Callable[[list[str]], bool]
) -> None:
    """The schema as the migrations before the `first` one made it, recorded as such (a store
    of an earlier version, for a migration's test to write to)."""
    before = next(n for n, migration in enumerate(MIGRATIONS) if first(migration))
    for statement in (s for migration in MIGRATIONS[:before] for s in migration):
        await connection.execute(statement.format(s=schema))
    await connection.execute(
        f"CREATE TABLE {schema}.migrations (version integer PRIMARY KEY,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )
    await connection.executemany(
        f"INSERT INTO {schema}.migrations (version) VALUES ($1)",
        [(n,) for n in range(1, before + 1)],
    )


async def test_the_jobs_of_tasks_without_a_limit_key_have_no_value_once_migrated() -> None:
    """The migration that lets `limit_key` be NULL, on a schema of the version before it
    with jobs in it: the jobs of the tasks `limit_key_paths` records no path for have no
    value now, the others keep theirs ('' included); the keyed pending jobs' index leaves
    them out, and a claim of each kind of task still takes its jobs."""
    url, schema = postgres_url(), unique_schema()
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(f"CREATE SCHEMA {schema}")
        await migrated_until(
            connection, schema, lambda m: m[0] == "DROP INDEX {s}.jobs_task_limit_key_claim"
        )
        await connection.execute(
            f"INSERT INTO {schema}.limit_key_paths (task, path) VALUES ('k', 'customer')"
        )
        await connection.execute(
            f"INSERT INTO {schema}.jobs (task, status, origin, payload, run_at, max_attempts,"
            " created_at, limit_key) SELECT t, s, 'enqueue', '\\x80', 0, 3, 0, v"
            " FROM unnest(ARRAY['k', 'k', 'u', 'u', 'v'], ARRAY['pending', 'pending',"
            " 'pending', 'failed', 'pending'], ARRAY['acme', '', '', '', 'stale']) AS j(t, s, v)"
        )
        store = PostgresStore(url, schema=schema, pool_size=2)
        await store.open()
        try:
            rows = await connection.fetch(f"SELECT task, limit_key FROM {schema}.jobs ORDER BY id")
            assert [tuple(row) for row in rows] == [("k", "acme"), ("k", ""), ("u", None),
                                                    ("u", None), ("v", None)]  # fmt: skip
            index = await connection.fetchval(
                "SELECT indexdef FROM pg_indexes WHERE schemaname = $1"
                " AND indexname = 'jobs_task_limit_key_claim'",
                schema,
            )
            assert "(limit_key IS NOT NULL)" in index, index
            store.limit_keys = {"k": "customer"}
            worker = await store.register_node("n", 60)
            claimed = await store.claim(ClaimRequest(worker, 10, 60, keyed=frozenset({"k"})))
            assert sorted(job.task for job in claimed.jobs) == ["k", "k", "u", "v"]
        finally:
            await store.close()
    finally:
        await connection.close()
        await drop_schema(url, schema)


async def test_the_job_counters_are_filled_by_the_migration_and_kept_by_every_writer() -> None:
    """The migration counts the jobs already there; then the daemons' writes and an
    application's (the outbox, in its own transaction) each add rows to the counters,
    which a prune folds into one per task and status."""
    url, schema = postgres_url(), unique_schema()
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(f"CREATE SCHEMA {schema}")
        # The schema as it was before the counters' migration, then jobs written to it.
        await migrated_until(connection, schema, lambda m: "CREATE TABLE {s}.job_counts" in m[0])
        await connection.execute(
            f"INSERT INTO {schema}.jobs (task, status, origin, payload, run_at, max_attempts,"
            " created_at) SELECT t, s, 'enqueue', '\\x80', 0, 3, 0"
            " FROM unnest(ARRAY['a', 'a', 'a', 'b'], ARRAY['pending', 'pending', 'failed',"
            " 'pending']) AS v(t, s)"
        )
        store = PostgresStore(url, schema=schema, pool_size=2)  # the clock of the outbox
        await store.open()
        try:
            assert counted(await store.counts()) == {"a": {"pending": 2, "failed": 1},
                                                     "b": {"pending": 1}}  # fmt: skip
            async with connection.transaction():
                await taskd.outbox.enqueue(connection, "b", schema=schema)
            worker = await store.register_node("n", 60)
            claimed = await store.claim(ClaimRequest(worker, 10, 60))
            assert len(claimed.jobs) == 4
            assert counted(await store.counts()) == {"a": {"running": 2, "failed": 1},
                                                     "b": {"running": 2}}  # fmt: skip
            await store.prune({"succeeded": 3600})
            assert counted(await store.counts()) == {"a": {"running": 2, "failed": 1},
                                                     "b": {"running": 2}}  # fmt: skip
            assert await counter_rows(connection, schema) == {("a", "failed"): 1,
                                                              ("a", "running"): 1,
                                                              ("b", "running"): 1}  # fmt: skip
        finally:
            await store.close()
    finally:
        await drop_schema(url, schema)
        await connection.close()


def counted(entries: list[TaskCounts]) -> dict[str, dict[str, int]]:
    return {entry.task: entry.counts for entry in entries}


async def counter_rows(connection: asyncpg.Connection, schema: str) -> dict[tuple[str, str], int]:
    """How many rows the counters have of each task and status."""
    rows = await connection.fetch(
        f"SELECT task, status, count(*) AS rows FROM {schema}.job_counts GROUP BY task, status"
    )
    return {(row["task"], row["status"]): row["rows"] for row in rows}


async def test_the_job_counters_of_each_server_process_become_entries_of_the_ledger() -> None:
    """The migration to the counters' ledger, on a schema of the version before it whose
    counters have rows of several server processes: their sums stay; then each statement
    appends its own rows (a lone insert: one), and a recovery folds them all."""
    url, schema = postgres_url(), unique_schema()
    connection = await asyncpg.connect(url)
    other = await asyncpg.connect(url)
    try:
        await connection.execute(f"CREATE SCHEMA {schema}")
        await migrated_until(
            connection, schema, lambda m: "DROP CONSTRAINT job_counts_pkey" in m[0]
        )
        insert = (
            f"INSERT INTO {schema}.jobs (task, status, origin, payload, run_at, max_attempts,"
            " created_at) SELECT 'a', s, 'enqueue', '\\x80', 0, 3, 0 FROM unnest($1::text[]) AS s"
        )
        await connection.execute(insert, ["pending", "pending", "failed"])
        await other.execute(insert, ["pending"])
        store = PostgresStore(url, schema=schema, pool_size=2)
        await store.open()
        try:
            assert counted(await store.counts()) == {"a": {"pending": 3, "failed": 1}}
            assert await counter_rows(connection, schema) == {("a", "pending"): 2,
                                                              ("a", "failed"): 1}  # fmt: skip
            await store.insert([new("a")])
            await store.insert([new("a")])
            assert await counter_rows(connection, schema) == {("a", "pending"): 4,
                                                              ("a", "failed"): 1}  # fmt: skip
            await store.recover(3)
            assert await counter_rows(connection, schema) == {("a", "pending"): 1,
                                                              ("a", "failed"): 1}  # fmt: skip
            assert counted(await store.counts()) == {"a": {"pending": 5, "failed": 1}}
        finally:
            await store.close()
    finally:
        await other.close()
        await connection.close()
        await drop_schema(url, schema)


async def test_a_fold_of_the_job_counters_waits_for_no_other(store: PostgresStore) -> None:
    """Two folds at once: the second folds nothing and goes on (a fold may lock jobs after
    it, in the same transaction), the counts stay exact, and the next fold takes the rows
    the first could not see."""
    await store.insert([new("t"), new("t")])
    await store.insert([new("t")])
    url, schema = postgres_url(), store.schema
    fold = FOLD_COUNTS_SQL.replace("{s}", schema)
    first, second = await asyncpg.connect(url), await asyncpg.connect(url)
    try:
        async with first.transaction():
            await first.execute(fold)
            async with second.transaction():
                await asyncio.wait_for(second.execute(fold), 5)
                await second.execute(
                    f"INSERT INTO {schema}.jobs (task, status, origin, payload, run_at,"
                    " max_attempts, created_at) VALUES ('t', 'pending', 'enqueue', '\\x80', 0,"
                    " 3, 0)"
                )
        assert counted(await store.counts()) == {"t": {"pending": 4}}
        assert await counter_rows(first, schema) == {("t", "pending"): 2}
        await store.recover(3)
        assert await counter_rows(first, schema) == {("t", "pending"): 1}
        assert counted(await store.counts()) == {"t": {"pending": 4}}
    finally:
        await first.close()
        await second.close()


async def test_a_claim_waits_for_a_pause_in_flight_and_leaves_its_jobs(
    store: PostgresStore,
) -> None:
    """A claim's flow lock and its read of the paused tasks are one statement; the read
    still sees a pause that committed while the claim waited for the lock."""
    await store.insert([new("t")])
    worker = await store.register_node("n", 60)
    pause = await asyncpg.connect(postgres_url())
    try:
        await pause.execute("BEGIN")
        await pause.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"taskd:{store.schema}:flow"
        )
        await pause.execute(f"INSERT INTO {store.schema}.paused_tasks VALUES ('t', 0)")
        claim = asyncio.create_task(store.claim(ClaimRequest(worker, 16, 60)))
        waiting = (
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
            " AND wait_event = 'advisory'"
        )
        while not await pause.fetchval(waiting, f"taskd {store.schema}"):
            assert not claim.done()  # it waits for the lock (or fails the test)
            await asyncio.sleep(0.01)
        await pause.execute("COMMIT")
        claimed = await asyncio.wait_for(claim, 10)
        assert claimed.jobs == []
    finally:
        await pause.close()


async def _until_waiting(db: Any, schema: str, *writes: asyncio.Future[Any]) -> None:
    """Until as many connections of the stores on `schema` as `writes` wait for a lock."""
    query = (
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
        " AND wait_event_type = 'Lock'"
    )
    while await db.fetchval(query, f"taskd {schema}") < len(writes):
        assert not any(write.done() for write in writes)  # they wait (or fail the test)
        await asyncio.sleep(0.01)


async def test_a_parents_end_sees_the_child_linked_while_it_waited(store: PostgresStore) -> None:
    """A job's end reads whether jobs wait for it in the statement that records it; it
    still sees the link of another daemon's insert that held its row until its commit."""
    worker = await store.register_node("n", 60)
    (parent,) = await store.insert([new("p")])
    (running,) = (await store.claim(ClaimRequest(worker, 1, 60))).jobs
    other = PostgresStore(postgres_url(), schema=store.schema)  # another daemon's writer
    await other.open()
    side = await asyncpg.connect(postgres_url())
    try:
        # An uncommitted job holds the child's key: the other store's insert, which locked
        # the parent's row first, waits for it; the parent's end waits for that insert.
        await side.execute("BEGIN")
        await side.execute(
            f"INSERT INTO {store.schema}.jobs (task, status, origin, payload, max_attempts,"
            " key, run_at, created_at) VALUES ('c', 'pending', 'enqueue', '', 3, 'k', 0, 0)"
        )
        child = msgspec.structs.replace(new("c"), key="k", after=(parent.job_id,))
        inserting = asyncio.ensure_future(other.insert([child]))
        await asyncio.wait_for(_until_waiting(side, store.schema, inserting), 10)
        outcome = Outcome(running.id, running.epoch, worker, "succeeded")
        finishing = asyncio.create_task(store.finish([outcome]))
        await asyncio.wait_for(_until_waiting(side, store.schema, inserting, finishing), 10)
        await side.execute("ROLLBACK")
        (inserted,) = await asyncio.wait_for(inserting, 10)
        (ended,) = (await asyncio.wait_for(finishing, 10)).jobs
        assert ended is not None and ended.status == "succeeded"
        released = await store.get(inserted.job_id)
        assert released is not None and (released.status, released.blocked) == ("pending", 0)
    finally:
        await side.close()
        await other.close()
