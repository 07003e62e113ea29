"""The reads, on the reader connection: they never wait for the writer (WAL). Plain
functions, each run whole in the reader connection's thread."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from taskd.models import Job, NodeInfo, TaskCounts
from taskd.store.base import JobFilter, ScheduleState
from taskd.store.rows import error_from_row, job_from_row, schedule_from_row
from taskd.store.sqlite.schema import (
    JOB_COLUMNS,
    NODE_COLUMNS,
    SCHEDULE_COLUMNS,
    marks,
    node_from_row,
)


def fetch(db: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> list[Any]:
    return db.execute(sql, params).fetchall()


def get(db: sqlite3.Connection, job_id: int) -> Job | None:
    rows = fetch(db, f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
    if not rows:
        return None
    job = job_from_row(rows[0])
    errors = fetch(
        db,
        "SELECT attempt, kind, message, traceback, at, started_at, worker FROM job_errors"
        " WHERE job_id = ? ORDER BY rowid",
        (job_id,),
    )
    job.errors = [error_from_row(row) for row in errors]
    return job


def list_jobs(db: sqlite3.Connection, query: JobFilter) -> list[Job]:
    clauses: list[str] = []
    params: list[Any] = []
    if query.statuses:
        clauses.append(f"status IN ({marks(len(query.statuses))})")
        params += query.statuses
    if query.task is not None:
        clauses.append("task = ?")
        params.append(query.task)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = fetch(
        db,
        f"SELECT {JOB_COLUMNS} FROM jobs {where} ORDER BY id DESC LIMIT ?",
        (*params, query.limit),
    )
    return [job_from_row(row) for row in rows]


def counts(db: sqlite3.Connection, now: float) -> list[TaskCounts]:
    by_task: dict[str, dict[str, int]] = {}
    for row in fetch(db, "SELECT task, status, count(*) AS n FROM jobs GROUP BY task, status"):
        by_task.setdefault(row["task"], {})[row["status"]] = row["n"]
    waiting = {
        row["task"]: (row["oldest_due"], row["next_due"])
        for row in fetch(
            db,
            "SELECT task, min(CASE WHEN run_at <= ? THEN run_at END) AS oldest_due,"
            " min(CASE WHEN run_at > ? THEN run_at END) AS next_due"
            " FROM jobs WHERE status = 'pending' GROUP BY task",
            (now, now),
        )
    }
    result = []
    for task, task_counts in sorted(by_task.items()):
        oldest_due, next_due = waiting.get(task, (None, None))
        result.append(
            TaskCounts(
                task=task,
                counts=task_counts,
                oldest_pending_age=None if oldest_due is None else now - oldest_due,
                next_due_at=next_due,
            )
        )
    return result


def queue_depth(db: sqlite3.Connection) -> int:
    # The partial index holds only pending jobs: counting them never scans the history.
    rows = fetch(
        db,
        "SELECT count(*) AS n FROM jobs INDEXED BY jobs_task_claim_order WHERE status = 'pending'",
    )
    return int(rows[0]["n"])


def nodes(db: sqlite3.Connection, now: float) -> list[NodeInfo]:
    rows = fetch(
        db,
        f"SELECT {NODE_COLUMNS}, (SELECT count(*) FROM jobs WHERE status = 'running'"
        " AND worker = nodes.worker) AS running FROM nodes WHERE expires >= ? ORDER BY id",
        (now,),
    )
    return [node_from_row(row) for row in rows]


def schedule_states(db: sqlite3.Connection, ids: Sequence[str] | None) -> list[ScheduleState]:
    where = f"WHERE id IN ({marks(len(ids))})" if ids is not None else ""
    rows = fetch(db, f"SELECT {SCHEDULE_COLUMNS} FROM schedules {where}", ids or ())
    return [schedule_from_row(row) for row in rows]
