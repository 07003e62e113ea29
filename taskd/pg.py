"""Transactional enqueue: insert a job inside an application's own PostgreSQL transaction.

    async with pool.acquire() as conn, conn.transaction():
        order_id = await conn.fetchval("INSERT INTO orders ... RETURNING id")
        await taskd.pg.enqueue(conn, "emails:receipt", {"order": order_id})

The job exists if and only if the transaction commits (the outbox pattern); the daemons
sharing the database hear of it at the commit, through the same notification as any
enqueue. It works on an asyncpg connection, a psycopg 3 `AsyncConnection` (`await
enqueue(...)`) and a psycopg 3 `Connection` (`enqueue_sync(...)`); the schema must have
been created by a taskd daemon (the first start does it).

What it cannot check: the task's payload schema and its settings live in the daemons, not
in the database. A payload the task rejects, or a task no daemon knows, fails the job when
a daemon claims it ("payload no longer matches the task's schema", "task ... is not
loaded"), with no retries, where `taskctl job ID` shows why. The task's own
`max_attempts` is not known either: pass it, or the job gets 3 attempts.
"""

from __future__ import annotations

from typing import Any

import msgspec

from taskd.config import SCHEMA_NAME
from taskd.limits import enqueue_problem, max_payload_size
from taskd.policy import DEFAULT_QUEUE_ATTEMPTS
from taskd.protocol import DEFAULT_MAX_FRAME, EnqueueResult
from taskd.store.postgres.schema import channel

__all__ = ["EnqueueResult", "enqueue", "enqueue_sync"]

# As a daemon with the default max_frame_size accepts.
MAX_PAYLOAD = max_payload_size(DEFAULT_MAX_FRAME)
ROUNDS = 3  # a key taken by a job that ends meanwhile is tried again

# One statement: the insert, the notice to the daemons (sent at commit), and, if the key is
# taken, the active job that holds it.
ENQUEUE_SQL = """
WITH new AS (
    INSERT INTO {s}.jobs (task, status, origin, payload, priority, run_at, max_attempts, key,
                          created_at)
    VALUES ({task}, 'pending', 'enqueue', {payload}, {priority},
            coalesce({run_at}, {s}.now() + {delay}), {max_attempts}, {key}, {s}.now())
    ON CONFLICT DO NOTHING
    RETURNING id, run_at - {s}.now() AS due_in
), notice AS (
    SELECT pg_notify('{channel}', json_build_object('sender', 'app', 'due', due_in)::text)
    FROM new
)
SELECT id, false AS duplicate, (SELECT count(*) FROM notice) AS told FROM new
UNION ALL
SELECT id, true, 0 FROM {s}.jobs
WHERE NOT EXISTS (SELECT 1 FROM new) AND task = {task} AND key = {key}
  AND status IN ('pending', 'running')
"""

_NAMES = ("task", "payload", "priority", "run_at", "delay", "max_attempts", "key")
_TYPES = {
    "task": "text", "payload": "bytea", "priority": "integer", "run_at": "double precision",
    "delay": "double precision", "max_attempts": "integer", "key": "text",
}  # fmt: skip


def _sql(schema: str, driver: str) -> str:
    if not SCHEMA_NAME.fullmatch(schema):
        raise ValueError(f"schema {schema!r} is not a schema name taskd uses")
    if driver == "asyncpg":
        marks = {name: f"${n}::{_TYPES[name]}" for n, name in enumerate(_NAMES, 1)}
    else:
        marks = {name: f"%({name})s::{_TYPES[name]}" for name in _NAMES}
    return ENQUEUE_SQL.format(s=schema, channel=channel(schema), **marks)


def _params(
    task: str,
    payload: Any,
    delay: float | None,
    run_at: float | None,
    priority: int,
    max_attempts: int | None,
    key: str | None,
) -> dict[str, Any]:
    """The row's values, checked as far as they can be without the daemons."""
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
    }
    if (problem := enqueue_problem(options)) is not None:
        raise ValueError(problem)
    return {
        "task": task,
        "payload": encoded,
        "priority": priority,
        "run_at": run_at,
        "delay": delay or 0.0,
        "max_attempts": max_attempts or DEFAULT_QUEUE_ATTEMPTS,
        "key": key,
    }


def _result(row: Any) -> EnqueueResult | None:
    return None if row is None else EnqueueResult(job_id=row[0], duplicate=row[1])


def _gave_up(key: str | None) -> RuntimeError:
    return RuntimeError(f"the active job with the key {key!r} kept changing; try again")


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
) -> EnqueueResult:
    """Insert a job in the connection's transaction (asyncpg, or psycopg's AsyncConnection);
    with `key`, an active job of the task with that key is returned instead (`duplicate`)."""
    params = _params(task, payload, delay, run_at, priority, max_attempts, key)
    asyncpg = type(conn).__module__.startswith("asyncpg")
    sql = _sql(schema, "asyncpg" if asyncpg else "psycopg")
    for _ in range(ROUNDS):
        if asyncpg:
            row = await conn.fetchrow(sql, *(params[name] for name in _NAMES))
        else:
            row = await (await conn.execute(sql, params)).fetchone()
        if (result := _result(row)) is not None:
            return result
    raise _gave_up(key)


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
) -> EnqueueResult:
    """`enqueue` on a psycopg 3 (synchronous) `Connection`."""
    params = _params(task, payload, delay, run_at, priority, max_attempts, key)
    sql = _sql(schema, "psycopg")
    for _ in range(ROUNDS):
        if (result := _result(conn.execute(sql, params).fetchone())) is not None:
            return result
    raise _gave_up(key)
