"""Progress and log lines of running jobs: written in batches, each job's lines bounded."""

from __future__ import annotations

from typing import Any

from taskd.models import JobLogs, LogLine
from taskd.store.base import MAX_LOG_BYTES, MAX_LOG_LINES, JobActivity, LogNote, ProgressNote
from taskd.store.core.dialect import Dialect, Tx
from taskd.store.core.statements import Statement, Steps
from taskd.store.rows import progress_from_row

Activity = tuple[list[ProgressNote], list[LogNote], dict[int, int]]


def trim_logs_sql(message_bytes: str) -> str:
    """The statement that deletes the newest line of job :job_id past :bytes or :lines, and
    every older line of it, in a dialect whose `message_bytes` counts a message's bytes."""
    return (
        "DELETE FROM {s}.job_logs WHERE job_id = :job_id AND id <= (SELECT max(id) FROM ("
        f" SELECT id, sum({message_bytes}) OVER newest AS bytes, row_number() OVER newest AS n"
        " FROM {s}.job_logs WHERE job_id = :job_id WINDOW newest AS (ORDER BY id DESC)"
        " ) AS ranked WHERE bytes > :bytes OR n > :lines) RETURNING id"
    )


def record_activity(tx: Tx, items: list[Activity]) -> Steps[list[None]]:
    for progress, lines, dropped in items:
        # The others hear which jobs wrote what (a reference: they read it if they care).
        first: dict[int, tuple[int, int]] = {}
        for line in lines:
            first.setdefault(line.job_id, (line.epoch, line.seq))
        for moving in progress:
            first.setdefault(moving.job_id, (moving.epoch, -1))
        moved = {note.job_id for note in progress}
        for job_id, (epoch, seq) in first.items():
            tx.notes.activity.append((job_id, epoch, seq, job_id in moved))
        if progress:
            yield Statement(
                "UPDATE {s}.jobs SET progress_done = :done, progress_total = :total,"
                " progress_message = :message, progress_at = :now - :ago"
                " WHERE id = :job_id AND epoch = :epoch",
                [
                    _fields(note, "job_id", "epoch", "done", "total", "message", "ago")
                    for note in progress
                ],
                many=True,
            )
        if lines:
            yield Statement(
                "INSERT INTO {s}.job_logs (job_id, epoch, seq, at, level, message)"
                " SELECT :job_id, :epoch, :seq, :now - :ago, :level, :message"
                " WHERE EXISTS (SELECT 1 FROM {s}.jobs WHERE id = :job_id)",
                [
                    _fields(note, "job_id", "epoch", "seq", "ago", "level", "message")
                    for note in lines
                ],
                many=True,
            )
        let_go = dict(dropped)
        for job_id in sorted({note.job_id for note in lines}):
            rows = yield Statement(
                tx.sql.trim_logs_sql,
                {"job_id": job_id, "bytes": MAX_LOG_BYTES, "lines": MAX_LOG_LINES},
            )
            let_go[job_id] = let_go.get(job_id, 0) + len(rows)
        if counts := [{"id": job, "count": n} for job, n in sorted(let_go.items()) if n]:
            yield Statement(
                "UPDATE {s}.jobs SET logs_dropped = logs_dropped + :count WHERE id = :id",
                counts,
                many=True,
            )
    return [None] * len(items)


def _fields(note: ProgressNote | LogNote, *names: str) -> dict[str, Any]:
    return {name: getattr(note, name) for name in names}


def job_logs(sql: Dialect, job_id: int) -> Steps[JobLogs | None]:
    """The lines kept of a job, oldest first; None if there is no such job."""
    jobs = yield Statement("SELECT logs_dropped FROM {s}.jobs WHERE id = :id", {"id": job_id})
    if not jobs:
        return None
    rows = yield Statement(
        "SELECT epoch, seq, at, level, message FROM {s}.job_logs WHERE job_id = :id ORDER BY id",
        {"id": job_id},
    )
    lines = [LogLine(r["epoch"], r["seq"], r["at"], r["level"], r["message"]) for r in rows]
    return JobLogs(job_id, lines, int(jobs[0]["logs_dropped"]))


def job_activity(
    sql: Dialect, job_id: int, after: tuple[int, int], limit: int
) -> Steps[JobActivity | None]:
    """A running job's task, status, progress and its newest `limit` lines after the line
    `after` (epoch, seq), with how many more there were; None if there is no such job."""
    jobs = yield Statement(
        "SELECT task, status, progress_done, progress_total, progress_message, progress_at"
        " FROM {s}.jobs WHERE id = :id",
        {"id": job_id},
    )
    if not jobs:
        return None
    epoch, seq = after
    rows = yield Statement(
        "SELECT epoch, seq, at, level, message, count(*) OVER () AS total FROM {s}.job_logs"
        " WHERE job_id = :id AND (epoch > :epoch OR (epoch = :epoch AND seq > :seq))"
        " ORDER BY id DESC LIMIT :limit",
        {"id": job_id, "epoch": epoch, "seq": seq, "limit": limit},
    )
    lines = [LogLine(r["epoch"], r["seq"], r["at"], r["level"], r["message"]) for r in rows]
    lines.reverse()
    skipped = int(rows[0]["total"]) - len(rows) if rows else 0
    row = jobs[0]
    return JobActivity(row["task"], row["status"], progress_from_row(row), lines, skipped)
