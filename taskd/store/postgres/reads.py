"""The reads, each one statement on a pooled connection (no transaction of their own)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from taskd.models import Job, NodeInfo, TaskCounts
from taskd.store.base import JobFilter, ScheduleState
from taskd.store.postgres.schema import (
    JOB_COLUMNS,
    NODE_COLUMNS,
    SCHEDULE_COLUMNS,
    node_from_row,
)
from taskd.store.rows import error_from_row, job_from_row, schedule_from_row


async def get(db: Any, s: str, job_id: int) -> Job | None:
    row = await db.fetchrow(f"SELECT {JOB_COLUMNS} FROM {s}.jobs WHERE id = $1", job_id)
    if row is None:
        return None
    job = job_from_row(row)
    errors = await db.fetch(
        f"SELECT attempt, kind, message, traceback, at, started_at, worker FROM {s}.job_errors"
        " WHERE job_id = $1 ORDER BY id",
        job_id,
    )
    job.errors = [error_from_row(error) for error in errors]
    return job


async def list_jobs(db: Any, s: str, query: JobFilter) -> list[Job]:
    rows = await db.fetch(
        f"SELECT {JOB_COLUMNS} FROM {s}.jobs"
        " WHERE ($1::text[] IS NULL OR status = ANY($1::text[]))"
        " AND ($2::text IS NULL OR task = $2) ORDER BY id DESC LIMIT $3",
        list(query.statuses) if query.statuses else None,
        query.task,
        query.limit,
    )
    return [job_from_row(row) for row in rows]


async def counts(db: Any, s: str) -> list[TaskCounts]:
    by_task: dict[str, dict[str, int]] = {}
    for row in await db.fetch(
        f"SELECT task, status, count(*) AS n FROM {s}.jobs GROUP BY task, status"
    ):
        by_task.setdefault(row["task"], {})[row["status"]] = row["n"]
    waiting = {
        row["task"]: (row["oldest_age"], row["next_due"])
        for row in await db.fetch(
            f"SELECT task, {s}.now() - min(run_at) FILTER (WHERE run_at <= {s}.now())"
            f" AS oldest_age, min(run_at) FILTER (WHERE run_at > {s}.now()) AS next_due"
            f" FROM {s}.jobs WHERE status = 'pending' GROUP BY task"
        )
    }
    return [
        TaskCounts(
            task=task,
            counts=task_counts,
            oldest_pending_age=waiting.get(task, (None, None))[0],
            next_due_at=waiting.get(task, (None, None))[1],
        )
        for task, task_counts in sorted(by_task.items())
    ]


async def queue_depth(db: Any, s: str) -> int:
    return int(await db.fetchval(f"SELECT count(*) FROM {s}.jobs WHERE status = 'pending'"))


async def nodes(db: Any, s: str) -> list[NodeInfo]:
    rows = await db.fetch(
        f"SELECT {NODE_COLUMNS}, (SELECT count(*) FROM {s}.jobs WHERE status = 'running'"
        f" AND worker = nodes.worker) AS running FROM {s}.nodes"
        f' WHERE expires >= {s}.now() ORDER BY id COLLATE "C"'
    )
    return [node_from_row(row) for row in rows]


async def schedule_states(db: Any, s: str, ids: Sequence[str] | None) -> list[ScheduleState]:
    rows = await db.fetch(
        f"SELECT {SCHEDULE_COLUMNS} FROM {s}.schedules"
        " WHERE $1::text[] IS NULL OR id = ANY($1::text[])",
        list(ids) if ids is not None else None,
    )
    return [schedule_from_row(row) for row in rows]
