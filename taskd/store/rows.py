"""Jobs, attempt errors, nodes and schedule states from result rows: the same on every backend
(a `sqlite3.Row` and an asyncpg `Record` are both indexed by column name and by position; a
job, read on every claim and finish, by position)."""

from __future__ import annotations

from typing import Any, Protocol

import msgspec

from taskd.models import AttemptError, FiredJob, Job, NodeInfo, Progress
from taskd.store.base import ScheduleState

JOB_COLUMNS = (
    "id, task, status, origin, payload, result, error, attempts, max_attempts, priority, key,"
    " crashes, parent_id, run_at, created_at, started_at, finished_at, worker, epoch,"
    " progress_done, progress_total, progress_message, progress_at, blocked, release_at,"
    " after_failure, batch_id, traceparent"
)
# What a finish changes of a running job, or what may have changed while it ran (its
# progress; started_at, which the start of a tick's held job sets): with the job as its
# worker claimed it, the job as it ended (finished_job), for half the columns of a job.
FINISHED_COLUMNS = (
    "id, status, result, error, attempts, run_at, started_at, finished_at, worker,"
    " progress_done, progress_total, progress_message, progress_at"
)
# What a claim reads back of the jobs it takes: JOB_COLUMNS but those it sets to what the
# claiming worker knows (status running, the worker, no progress), which claimed_job fills
# in: fewer columns to convert, for every job claimed.
CLAIMED_COLUMNS = (
    "id, task, origin, payload, result, error, attempts, max_attempts, priority, key, crashes,"
    " parent_id, run_at, created_at, started_at, finished_at, epoch, blocked, release_at,"
    " after_failure, batch_id, traceparent"
)
ERROR_COLUMNS = "job_id, attempt, kind, message, traceback, at, started_at, worker"
SCHEDULE_COLUMNS = "id, last_tick, paused, coalesced, covered_until, fired_at, last_jobs"
NODE_COLUMNS = "id, worker, host, pid, started_at, seen_at, slots"  # PostgreSQL adds schedules

# A tick's jobs, as a schedule's state and a tick's record keep them.
fired_jobs_json = msgspec.json.Decoder(list[FiredJob])


_JOB_WIDTH = len(JOB_COLUMNS.split(","))
_FINISHED_WIDTH = len(FINISHED_COLUMNS.split(","))
_CLAIMED_WIDTH = len(CLAIMED_COLUMNS.split(","))


def job_columns(table: str, columns: str = JOB_COLUMNS) -> str:
    """JOB_COLUMNS (or others) qualified with a table name (for statements that join)."""
    return ", ".join(f"{table}.{column.strip()}" for column in columns.split(","))


class Row(Protocol):
    def __getitem__(self, column: Any, /) -> Any: ...


# Job's fields in the order job_from_row passes them (by position: a third of the cost of
# naming them); a change to Job's fields fails here, at import, not in a job read wrong.
_JOB_FIELDS = (
    "id", "task", "status", "origin", "created_at", "run_at", "payload", "result", "error",
    "attempts", "max_attempts", "priority", "key", "crashes", "parent_id", "started_at",
    "finished_at", "worker", "epoch", "errors", "progress", "traceparent", "blocked",
    "after_failure", "parents", "children", "batch_id",
)  # fmt: skip
if Job.__struct_fields__ != _JOB_FIELDS:
    raise ImportError("taskd.models.Job's fields changed: update taskd.store.rows.job_from_row")


def job_from_row(row: Row) -> Job:
    """A job from a row that starts with JOB_COLUMNS, in their order (every statement that
    reads a job puts them first): read by position, which costs a fraction of reading 28
    columns by name (a sqlite3.Row compares the name with each column's until it matches),
    and made by position (Job's field order: _JOB_FIELDS)."""
    (id_, task, status, origin, payload, result, error, attempts, max_attempts, priority, key,
     crashes, parent_id, run_at, created_at, started_at, finished_at, worker, epoch,
     progress_done, progress_total, progress_message, progress_at, blocked, release_at,
     after_failure, batch_id, traceparent) = row[:_JOB_WIDTH]  # fmt: skip
    return Job(
        id_, task, status, origin, created_at,
        # A job waiting for its parents keeps the time it is due in release_at.
        release_at if blocked else run_at,
        msgspec.Raw(payload), None if result is None else msgspec.Raw(result), error,
        attempts, max_attempts, priority, key, crashes, parent_id, started_at, finished_at,
        worker, epoch, [], _progress(progress_done, progress_total, progress_message, progress_at),
        traceparent, blocked, after_failure, [], [], batch_id,
    )  # fmt: skip


def claimed_job(row: Row, worker: str) -> Job:
    """A job as a claim by `worker` left it, from a row that starts with CLAIMED_COLUMNS."""
    (id_, task, origin, payload, result, error, attempts, max_attempts, priority, key, crashes,
     parent_id, run_at, created_at, started_at, finished_at, epoch, blocked, release_at,
     after_failure, batch_id, traceparent) = row[:_CLAIMED_WIDTH]  # fmt: skip
    return Job(
        id_, task, "running", origin, created_at, release_at if blocked else run_at,
        msgspec.Raw(payload), None if result is None else msgspec.Raw(result), error,
        attempts, max_attempts, priority, key, crashes, parent_id, started_at, finished_at,
        worker, epoch, [], None, traceparent, blocked, after_failure, [], [], batch_id,
    )  # fmt: skip


def finished_job(claimed: Job, row: Row) -> Job:
    """The job as a finish left it: the job as its worker claimed it, with what a row that
    starts with FINISHED_COLUMNS says (every other column of a running job stays as the
    claim left it: a change to any of them ends the attempt, and the finish with it)."""
    (_, status, result, error, attempts, run_at, started_at, finished_at, worker, progress_done,
     progress_total, progress_message, progress_at) = row[:_FINISHED_WIDTH]  # fmt: skip
    return msgspec.structs.replace(
        claimed,
        status=status,
        result=None if result is None else msgspec.Raw(result),
        error=error,
        attempts=attempts,
        run_at=claimed.run_at if claimed.blocked else run_at,  # as job_from_row reads it
        started_at=started_at,
        finished_at=finished_at,
        worker=worker,
        progress=_progress(progress_done, progress_total, progress_message, progress_at),
    )


def _progress(done: Any, total: Any, message: Any, at: Any) -> Progress | None:
    return None if done is None else Progress(done=done, total=total, message=message, at=at)


def progress_from_row(row: Row) -> Progress | None:
    return _progress(
        row["progress_done"], row["progress_total"], row["progress_message"], row["progress_at"]
    )


def error_from_row(row: Row) -> AttemptError:
    return AttemptError(
        attempt=row["attempt"],
        kind=row["kind"],
        message=row["message"],
        traceback=row["traceback"],
        at=row["at"],
        started_at=row["started_at"],
        worker=row["worker"],
    )


def schedule_from_row(row: Row) -> ScheduleState:
    return ScheduleState(
        id=row["id"],
        last_tick=row["last_tick"],
        paused=bool(row["paused"]),
        coalesced=row["coalesced"],
        covered_until=row["covered_until"],
        fired_at=row["fired_at"],
        last_jobs=fired_jobs_json.decode(row["last_jobs"]),
    )


def node_from_row(row: Row) -> NodeInfo:
    return NodeInfo(
        id=row["id"],
        worker=row["worker"],
        host=row["host"],
        pid=row["pid"],
        started_at=row["started_at"],
        seen_at=row["seen_at"],
        running=row["running"],
        schedules=row["schedules"],
        slots=row["slots"],
    )
