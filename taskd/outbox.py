"""Transactional enqueue: insert a job inside an application's own PostgreSQL transaction.

    async with pool.acquire() as conn, conn.transaction():
        order_id = await conn.fetchval("INSERT INTO orders ... RETURNING id")
        await taskd.outbox.enqueue(conn, "emails:receipt", {"order": order_id})

The job exists if and only if the transaction commits (the outbox pattern); the daemons
sharing the database hear of it at the commit, through the same notification as any
enqueue: it is the store's own insert (`taskd.store.core.jobs.insert_jobs`), run on the
application's connection, in one statement (as pgqueuer's) when the task has no `limit_key`
(nor a turn among its keys) and the job's key, if any, is free; outside a transaction, it
commits on its own. It works on an asyncpg connection, a psycopg 3 `AsyncConnection`
(`await enqueue(...)`) and a psycopg 3 `Connection` (`enqueue_sync(...)`); the schema must
have been created by a taskd daemon (the first start does it, and a daemon of this version
must have started on it once).

What it cannot check: the task's payload schema and its settings live in the daemons, not
in the database. A payload the task rejects, or a task no daemon knows, fails the job when
a daemon claims it ("payload no longer matches the task's schema", "task ... is not
loaded"), with no retries, where `taskctl job ID` shows why. The task's own
`max_attempts` is not known either: pass it, or the job gets 3 attempts.
"""

from __future__ import annotations

from functools import lru_cache, partial
from typing import Any

import msgspec

from taskd.config import SCHEMA_NAME
from taskd.limits import enqueue_problem, max_payload_size
from taskd.policy import DEFAULT_QUEUE_ATTEMPTS
from taskd.protocol import DEFAULT_MAX_FRAME, EnqueueResult
from taskd.store.base import Inserted, NewJob, StoreError
from taskd.store.core.dialect import Tx
from taskd.store.core.jobs import insert_jobs
from taskd.store.core.notes import Notes
from taskd.store.core.statements import Statement, Steps, run_steps, run_steps_async
from taskd.store.postgres.dialect import PostgresSql, execute, render
from taskd.store.rows import Row
from taskd.traceparent import traceparent_or_current

__all__ = ["EnqueueResult", "enqueue", "enqueue_sync"]

# As a daemon with the default max_frame_size accepts.
MAX_PAYLOAD = max_payload_size(DEFAULT_MAX_FRAME)
SENDER = "app"  # what the daemons' notices say wrote the job (news to each of them)


def _new_job(
    task: str,
    payload: Any,
    delay: float | None,
    run_at: float | None,
    priority: int,
    max_attempts: int | None,
    key: str | None,
    traceparent: str | None,
) -> NewJob:
    """The job, checked as far as it can be without the daemons."""
    if not isinstance(task, str) or not task:
        raise ValueError("task must be a task's name")
    try:
        encoded = b"\x80" if payload is None else msgspec.msgpack.encode(payload)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"payload cannot be encoded: {exc}") from None
    if len(encoded) > MAX_PAYLOAD:
        raise ValueError(f"the payload of {len(encoded)} bytes is over {MAX_PAYLOAD}")
    options = {
        "delay": delay,
        "run_at": run_at,
        "priority": priority,
        "max_attempts": max_attempts,
        "key": key,
        "traceparent": (traceparent := traceparent_or_current(traceparent)),
    }
    if (problem := enqueue_problem(options)) is not None:
        raise ValueError(problem)
    return NewJob(
        task,
        encoded,
        "enqueue",
        max_attempts or DEFAULT_QUEUE_ATTEMPTS,
        priority=priority,
        key=key,
        delay=delay or 0.0,
        run_at=run_at,
        traceparent=traceparent,
    )


@lru_cache(maxsize=64)
def _dialect(schema: str) -> PostgresSql:
    """The store's SQL for `schema`, as the application's `SENDER`: made once per schema
    (it holds nothing that changes), not at each enqueue."""
    if not SCHEMA_NAME.fullmatch(schema):
        raise ValueError(f"schema {schema!r} is not a schema name taskd uses")
    return PostgresSql(schema, SENDER)


def _insert(schema: str, job: NewJob) -> Steps[list[Inserted]]:
    """The store's insert of one job, with its value of its task's `limit_key` (the path the
    daemons recorded in the store)."""
    return insert_jobs(Tx(_dialect(schema), Notes()), [job])


def _result(inserted: list[Inserted]) -> EnqueueResult:
    (job,) = inserted
    return EnqueueResult(job_id=job.job_id, duplicate=job.duplicate)


def _gave_up(key: str | None) -> RuntimeError:
    return RuntimeError(f"the active job with the key {key!r} kept changing; try again")


def _by_name(cursor: Any, rows: list[Any]) -> list[Row]:
    """A psycopg cursor's rows, by column name."""
    names = [column.name for column in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in rows]


async def enqueue(
    conn: Any,
    task: str,
    payload: Any = None,
    *,
    delay: float | None = None,
    run_at: float | None = None,
    priority: int = 0,
    max_attempts: int | None = None,
    key: str | None = None,
    schema: str = "taskd",
    traceparent: str | None = None,
) -> EnqueueResult:
    """Insert a job in the connection's transaction (asyncpg, or psycopg's AsyncConnection);
    with `key`, an active job of the task with that key is returned instead (`duplicate`).

    `traceparent` (W3C) defaults to the current OpenTelemetry span's, if there is one."""
    job = _new_job(task, payload, delay, run_at, priority, max_attempts, key, traceparent)
    steps = _insert(schema, job)

    async def on_psycopg(statement: Statement) -> list[Row]:
        sql, _ = render(statement.sql, schema, "psycopg")
        cursor = await conn.execute(sql, statement.params)
        return _by_name(cursor, await cursor.fetchall())

    asyncpg = type(conn).__module__.startswith("asyncpg")
    try:
        inserted = await run_steps_async(
            steps, partial(execute, conn, schema) if asyncpg else on_psycopg
        )
    except StoreError:
        raise _gave_up(key) from None
    return _result(inserted)


def enqueue_sync(
    conn: Any,
    task: str,
    payload: Any = None,
    *,
    delay: float | None = None,
    run_at: float | None = None,
    priority: int = 0,
    max_attempts: int | None = None,
    key: str | None = None,
    schema: str = "taskd",
    traceparent: str | None = None,
) -> EnqueueResult:
    """`enqueue` on a psycopg 3 (synchronous) `Connection`."""
    job = _new_job(task, payload, delay, run_at, priority, max_attempts, key, traceparent)
    steps = _insert(schema, job)

    def on_psycopg(statement: Statement) -> list[Row]:
        cursor = conn.execute(render(statement.sql, schema, "psycopg")[0], statement.params)
        return _by_name(cursor, cursor.fetchall())

    try:
        return _result(run_steps(steps, on_psycopg))
    except StoreError:
        raise _gave_up(key) from None
