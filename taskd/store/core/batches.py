"""Batches (`enqueue_many(..., on_finish=TASK)`): a counter row per batch, counted up in the
transaction that ends each of its jobs, so that a job's end costs one update of that row and
never a scan of the batch. The update that counts the last job marks the batch finished
(once: `finished_at` is set only where it was NULL) and names its callback, which the caller
enqueues in the same transaction: exactly once, across daemons too (PostgreSQL serializes
the updates of the row).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import msgspec

from taskd.models import FINISHED_STATUSES, BatchInfo, Hook, Job
from taskd.store.base import NewJob
from taskd.store.core.dialect import Dialect, Tx
from taskd.store.core.statements import Statement, Steps
from taskd.store.rows import Row

BATCH_STATE = "ended, total, finished_at, on_finish, on_finish_attempts"


def create(tx: Tx, total: int, on_finish: Hook | None) -> Steps[int]:
    """A new batch of `total` jobs; its id."""
    (row,) = yield Statement(
        "INSERT INTO {s}.batches (on_finish, on_finish_attempts, total, created_at)"
        " VALUES (:task, :attempts, :total, :now) RETURNING id",
        {
            "task": on_finish.task if on_finish else None,
            "attempts": on_finish.max_attempts if on_finish else 3,
            "total": total,
        },
    )
    return int(row["id"])


def joined(tx: Tx, batch: int, duplicates: int) -> Steps[list[tuple[int, NewJob | None]]]:
    """Jobs of the batch that joined an active job with their key are not the batch's: its
    total without them (and its end, if its jobs have all ended already)."""
    rows = yield Statement(
        f"UPDATE {{s}}.batches SET total = total - :n WHERE id = :id RETURNING {BATCH_STATE}",
        {"n": duplicates, "id": batch},
    )
    return (yield from _finished(tx, batch, rows[0]))


def count_ended(tx: Tx, jobs: Sequence[Job]) -> Steps[list[tuple[int, NewJob | None]]]:
    """Count the jobs of batches that ended; the batches this finished, each with the
    callback job to enqueue (None: it has none)."""
    ended: dict[int, Counter[str]] = {}
    for job in jobs:
        if job.batch_id is not None and job.status in FINISHED_STATUSES:
            ended.setdefault(job.batch_id, Counter())[job.status] += 1
    finished = []
    for batch, counts in sorted(ended.items()):
        rows = yield Statement(
            "UPDATE {s}.batches SET ended = ended + :n, succeeded = succeeded + :succeeded,"
            " failed = failed + :failed, cancelled = cancelled + :cancelled"
            f" WHERE id = :id RETURNING {BATCH_STATE}",
            {"id": batch, "n": counts.total(), "succeeded": counts["succeeded"],
             "failed": counts["failed"], "cancelled": counts["cancelled"]},
        )  # fmt: skip
        if rows:
            finished += yield from _finished(tx, batch, rows[0])
    return finished


def uncount(tx: Tx, job_id: int) -> Steps[None]:
    """A job of a batch that ended is retried: it no longer counts as ended (a batch that
    finished stays finished: its callback was enqueued once)."""
    yield Statement(
        "UPDATE {s}.batches SET ended = ended - 1,"
        " failed = failed - CASE WHEN j.status = 'failed' THEN 1 ELSE 0 END,"
        " cancelled = cancelled - CASE WHEN j.status = 'cancelled' THEN 1 ELSE 0 END"
        " FROM (SELECT batch_id, status FROM {s}.jobs WHERE id = :id) AS j"
        " WHERE batches.id = j.batch_id AND j.status IN ('failed', 'cancelled')",
        {"id": job_id},
    )


def record_callback(batch: int, job_id: int) -> Statement:
    return Statement(
        "UPDATE {s}.batches SET callback_id = :job WHERE id = :id", {"job": job_id, "id": batch}
    )


def _finished(tx: Tx, batch: int, state: Row) -> Steps[list[tuple[int, NewJob | None]]]:
    if state["finished_at"] is not None or state["ended"] < state["total"]:
        return []
    marked = yield Statement(
        "UPDATE {s}.batches SET finished_at = :now WHERE id = :id AND finished_at IS NULL"
        " RETURNING id",
        {"id": batch},
    )
    if not marked or state["on_finish"] is None:
        return [(batch, None)] if marked else []
    # Once per batch, at its end: the only read of all its jobs.
    rows = yield Statement(
        "SELECT id, status FROM {s}.jobs WHERE batch_id = :id ORDER BY id", {"id": batch}
    )
    payload: dict[str, Any] = {"batch": batch, "succeeded": [], "failed": [], "cancelled": []}
    for row in rows:
        if row["status"] in payload:
            payload[row["status"]].append(row["id"])
    callback = NewJob(
        task=state["on_finish"],
        payload=msgspec.msgpack.encode(payload),
        origin="batch",
        max_attempts=state["on_finish_attempts"],
    )
    return [(batch, callback)]


def batch_info(sql: Dialect, batch: int) -> Steps[BatchInfo | None]:
    rows = yield Statement(
        "SELECT id, total, ended, on_finish, created_at, finished_at, callback_id"
        " FROM {s}.batches WHERE id = :id",
        {"id": batch},
    )
    if not rows:
        return None
    counts = yield Statement(
        "SELECT status, count(*) AS n FROM {s}.jobs WHERE batch_id = :id GROUP BY status",
        {"id": batch},
    )
    row = rows[0]
    return BatchInfo(
        id=row["id"],
        total=row["total"],
        ended=row["ended"],
        counts={count["status"]: count["n"] for count in counts},
        created_at=row["created_at"],
        on_finish=row["on_finish"],
        finished_at=row["finished_at"],
        callback_id=row["callback_id"],
    )
