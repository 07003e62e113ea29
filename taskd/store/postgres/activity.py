"""Progress and log lines of running jobs: written in batches, each job's lines bounded."""

from __future__ import annotations

from typing import Any

from taskd.models import JobLogs, LogLine
from taskd.store.base import MAX_LOG_BYTES, MAX_LOG_LINES, LogNote, ProgressNote
from taskd.store.postgres.tx import Tx

Activity = tuple[list[ProgressNote], list[LogNote], dict[int, int]]

PROGRESS_SQL = """
UPDATE {s}.jobs AS j SET progress_done = v.done, progress_total = v.total,
    progress_message = v.message, progress_at = {s}.now() - v.ago
FROM unnest($1::bigint[], $2::int[], $3::float8[], $4::float8[], $5::text[], $6::float8[])
    AS v(id, epoch, done, total, message, ago)
WHERE j.id = v.id AND j.epoch = v.epoch
"""
LINES_SQL = """
INSERT INTO {s}.job_logs (job_id, epoch, seq, at, level, message)
SELECT v.id, v.epoch, v.seq, {s}.now() - v.ago, v.level, v.message
FROM unnest($1::bigint[], $2::int[], $3::int[], $4::float8[], $5::text[], $6::text[])
    WITH ORDINALITY AS v(id, epoch, seq, ago, level, message, n)
WHERE EXISTS (SELECT 1 FROM {s}.jobs WHERE id = v.id) ORDER BY v.n
"""
# The newest line past either bound goes, with every older line of the job.
TRIM_SQL = """
WITH ranked AS (
    SELECT id, SUM(octet_length(message)) OVER newest AS bytes, ROW_NUMBER() OVER newest AS n
    FROM {s}.job_logs WHERE job_id = $1 WINDOW newest AS (ORDER BY id DESC)
), deleted AS (
    DELETE FROM {s}.job_logs WHERE job_id = $1
        AND id <= (SELECT max(id) FROM ranked WHERE bytes > $2 OR n > $3)
    RETURNING 1
)
SELECT count(*) FROM deleted
"""


async def record_activity(tx: Tx, items: list[Activity]) -> list[None]:
    for progress, lines, dropped in items:
        if progress:
            await tx.db.execute(
                PROGRESS_SQL.format(s=tx.s),
                [n.job_id for n in progress],
                [n.epoch for n in progress],
                [n.done for n in progress],
                [n.total for n in progress],
                [n.message for n in progress],
                [n.ago for n in progress],
            )
        if lines:
            await tx.db.execute(
                LINES_SQL.format(s=tx.s),
                [n.job_id for n in lines],
                [n.epoch for n in lines],
                [n.seq for n in lines],
                [n.ago for n in lines],
                [n.level for n in lines],
                [n.message for n in lines],
            )
        let_go = dict(dropped)
        for job_id in sorted({n.job_id for n in lines}):
            count = await tx.db.fetchval(
                TRIM_SQL.format(s=tx.s), job_id, MAX_LOG_BYTES, MAX_LOG_LINES
            )
            let_go[job_id] = let_go.get(job_id, 0) + int(count)
        changed = sorted((job_id, count) for job_id, count in let_go.items() if count)
        if changed:
            await tx.db.execute(
                f"UPDATE {tx.s}.jobs AS j SET logs_dropped = j.logs_dropped + v.count"
                " FROM unnest($1::bigint[], $2::bigint[]) AS v(id, count) WHERE j.id = v.id",
                [job_id for job_id, _ in changed],
                [count for _, count in changed],
            )
    return [None] * len(items)


async def job_logs(db: Any, s: str, job_id: int) -> JobLogs | None:
    dropped = await db.fetchval(f"SELECT logs_dropped FROM {s}.jobs WHERE id = $1", job_id)
    if dropped is None:
        return None
    rows = await db.fetch(
        f"SELECT epoch, seq, at, level, message FROM {s}.job_logs WHERE job_id = $1 ORDER BY id",
        job_id,
    )
    lines = [LogLine(r["epoch"], r["seq"], r["at"], r["level"], r["message"]) for r in rows]
    return JobLogs(job_id, lines, int(dropped))
