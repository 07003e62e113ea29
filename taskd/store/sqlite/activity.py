"""Progress and log lines of running jobs: written in batches, each job's lines bounded."""

from __future__ import annotations

import sqlite3

from taskd.models import JobLogs, LogLine
from taskd.store.base import MAX_LOG_BYTES, MAX_LOG_LINES, LogNote, ProgressNote
from taskd.store.sqlite.jobs import Tx

Activity = tuple[list[ProgressNote], list[LogNote], dict[int, int]]

# The newest line past either bound; it and every older line of the job are let go.
OLDEST_KEPT_SQL = """
SELECT id FROM (
    SELECT id, SUM(length(CAST(message AS BLOB))) OVER newest AS bytes,
        ROW_NUMBER() OVER newest AS n
    FROM job_logs WHERE job_id = ? WINDOW newest AS (ORDER BY id DESC)
) WHERE bytes > ? OR n > ? ORDER BY id DESC LIMIT 1
"""


def record_activity(tx: Tx, items: list[Activity]) -> list[None]:
    for progress, lines, dropped in items:
        tx.db.executemany(
            "UPDATE jobs SET progress_done = ?, progress_total = ?, progress_message = ?,"
            " progress_at = ? WHERE id = ? AND epoch = ?",
            [
                (note.done, note.total, note.message, tx.now - note.ago, note.job_id, note.epoch)
                for note in progress
            ],
        )
        tx.db.executemany(
            "INSERT INTO job_logs (job_id, epoch, seq, at, level, message)"
            " SELECT ?, ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM jobs WHERE id = ?)",
            [
                (n.job_id, n.epoch, n.seq, tx.now - n.ago, n.level, n.message, n.job_id)
                for n in lines
            ],
        )
        let_go = dict(dropped)
        for job_id in {note.job_id for note in lines}:
            row = tx.db.execute(OLDEST_KEPT_SQL, (job_id, MAX_LOG_BYTES, MAX_LOG_LINES)).fetchone()
            if row is not None:
                cursor = tx.db.execute(
                    "DELETE FROM job_logs WHERE job_id = ? AND id <= ?", (job_id, row["id"])
                )
                let_go[job_id] = let_go.get(job_id, 0) + cursor.rowcount
        tx.db.executemany(
            "UPDATE jobs SET logs_dropped = logs_dropped + ? WHERE id = ?",
            [(count, job_id) for job_id, count in let_go.items() if count],
        )
    return [None] * len(items)


def job_logs(db: sqlite3.Connection, job_id: int) -> JobLogs | None:
    job = db.execute("SELECT logs_dropped FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if job is None:
        return None
    rows = db.execute(
        "SELECT epoch, seq, at, level, message FROM job_logs WHERE job_id = ? ORDER BY id",
        (job_id,),
    ).fetchall()
    lines = [LogLine(r["epoch"], r["seq"], r["at"], r["level"], r["message"]) for r in rows]
    return JobLogs(job_id, lines, job["logs_dropped"])
