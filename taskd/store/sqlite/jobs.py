"""The job writes, each run inside a group-committed transaction (`Tx`).

Each function takes the writes of one kind that met in a batch and returns one result
per item, in order. They are plain functions: a whole transaction runs in the writer
connection's thread, one hop from the event loop. A claim and a recovery each decide in
one UPDATE statement.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from taskd.models import Job, JobStatus
from taskd.store.base import (
    Claimed,
    ClaimRequest,
    Finished,
    Inserted,
    InvalidTransition,
    JobNotFound,
    NewJob,
    Outcome,
    StoreError,
    refused,
)
from taskd.store.core.notes import Notes
from taskd.store.rows import job_from_row
from taskd.store.sqlite.schema import ERROR_COLUMNS, JOB_COLUMNS, marks

INSERT_CHUNK = 500  # rows per INSERT statement, well under SQLite's limit of bound variables
INSERT_ROUNDS = 3  # an insert that met an active job which then finished is tried again
PRUNE_SLICE = 2000  # rows deleted per transaction, so that pruning never holds the writer long
# Counts against concurrency limits: running, and not waiting for another job.
# The worker may claim: its node names it and it has not left (a lapsed heartbeat is fine:
# `renew` revives it if nobody took its jobs meanwhile).
REGISTERED = "EXISTS (SELECT 1 FROM nodes WHERE worker = :worker AND expires IS NOT NULL)"


@dataclass(frozen=True, slots=True)
class Tx:
    """A write transaction: the writer connection (in its own thread), the store's clock
    read once for it, and what it will tell once committed."""

    db: sqlite3.Connection
    now: float
    notes: Notes


def fetch(tx: Tx, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> list[Any]:
    return tx.db.execute(sql, params).fetchall()


# -- insert ------------------------------------------------------------------------------


def insert_jobs(tx: Tx, jobs: list[NewJob]) -> list[Inserted]:
    """Insert jobs; a job whose task and key are taken by an active job joins that job."""
    results: list[Inserted | None] = [None] * len(jobs)
    remaining = list(range(len(jobs)))
    for _ in range(INSERT_ROUNDS):
        remaining = _insert_round(tx, jobs, remaining, results)
        if not remaining:
            return cast(list[Inserted], results)  # a round fills in each job it does not return
    raise StoreError("could not insert jobs: the active jobs with their keys kept changing")


def _insert_round(
    tx: Tx, jobs: list[NewJob], indexes: list[int], results: list[Inserted | None]
) -> list[int]:
    """Insert the jobs at `indexes`; fill in `results`; return the indexes to try again."""
    conflicts: list[int] = []
    for start in range(0, len(indexes), INSERT_CHUNK):
        chunk = indexes[start : start + INSERT_CHUNK]
        params: list[Any] = []
        for index in chunk:
            job = jobs[index]
            run_at = job.run_at if job.run_at is not None else tx.now + job.delay
            params += (
                job.task,
                job.origin,
                job.payload,
                job.priority,
                run_at,
                job.max_attempts,
                job.key,
                job.parent_id,
                tx.now,
            )
        rows = fetch(
            tx,
            "INSERT INTO jobs (task, status, origin, payload, priority, run_at, max_attempts,"
            " key, parent_id, created_at) VALUES "
            + ", ".join(["(?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?)"] * len(chunk))
            + " ON CONFLICT DO NOTHING RETURNING id, task, key, run_at - ? AS due_in",
            [*params, tx.now],
        )
        for row in rows:
            tx.notes.new[row["id"]] = row["due_in"]
        keyed = {(row["task"], row["key"]): row["id"] for row in rows if row["key"] is not None}
        # Rows get ids in the order of the VALUES list: the unkeyed ones, sorted, are the
        # unkeyed jobs in order (a keyed row is matched by its key instead).
        unkeyed = iter(sorted(row["id"] for row in rows if row["key"] is None))
        for index in chunk:
            job = jobs[index]
            if job.key is None:
                results[index] = Inserted(next(unkeyed), duplicate=False)
            elif (job_id := keyed.pop((job.task, job.key), None)) is not None:
                results[index] = Inserted(job_id, duplicate=False)
            else:
                conflicts.append(index)
    if not conflicts:
        return []
    active = _active_keys(tx, {(jobs[i].task, jobs[i].key) for i in conflicts})
    retry = []
    for index in conflicts:
        job_id = active.get((jobs[index].task, jobs[index].key))
        if job_id is None:
            retry.append(index)  # the active job ended after our insert met it
        else:
            results[index] = Inserted(job_id, duplicate=True)
    return retry


def _active_keys(tx: Tx, keys: set[tuple[str, str | None]]) -> dict[tuple[str, str | None], int]:
    params = [value for pair in keys for value in pair]
    rows = fetch(
        tx,
        "SELECT id, task, key FROM jobs WHERE key IS NOT NULL"
        " AND status IN ('pending', 'running') AND (task, key) IN (VALUES "
        + ", ".join(["(?, ?)"] * len(keys))
        + ")",
        params,
    )
    return {(row["task"], row["key"]): row["id"] for row in rows}


def insert_and_claim(
    tx: Tx, items: list[tuple[list[NewJob], ClaimRequest]]
) -> list[tuple[list[Inserted], Claimed]]:
    """Jobs inserted, then a claim, in the same transaction."""
    return [(insert_jobs(tx, jobs), _claim(tx, request)) for jobs, request in items]


# -- claim -------------------------------------------------------------------------------


def claim_jobs(tx: Tx, requests: list[ClaimRequest]) -> list[Claimed]:
    return [_claim(tx, request) for request in requests]


def claim_in(tx: Tx, request: ClaimRequest | None) -> Claimed | None:
    """A claim as part of another write (a tick's), if one is asked for."""
    return None if request is None else _claim(tx, request)


def _claim(tx: Tx, request: ClaimRequest) -> Claimed:
    params = {
        "now": tx.now,
        "limit": request.limit,
        "limits": json.dumps(dict(request.limits)),
        "worker": request.worker,
        "lease": request.lease,
    }
    rows = fetch(
        tx,
        f"WITH RECURSIVE {QUEUES}, candidates(id) AS ({CANDIDATES})"
        " UPDATE jobs SET status = 'running', attempts = attempts + 1, epoch = epoch + 1,"
        " started_at = :now, worker = :worker, lease_expires = :now + :lease, waiting = 0,"
        " progress_done = NULL, progress_total = NULL, progress_message = NULL, progress_at = NULL"
        f" WHERE id IN (SELECT id FROM candidates) AND {REGISTERED} RETURNING {JOB_COLUMNS}",
        params,
    )
    jobs = sorted(map(job_from_row, rows), key=lambda job: (job.priority, job.run_at, job.id))
    tx.notes.claimed(jobs)
    if len(jobs) == request.limit:
        return Claimed(jobs=jobs, next_due_in=0.0)  # there may be more: no need to look
    rows = fetch(tx, f"WITH RECURSIVE {QUEUES} {NEXT_DUE}", params)
    due = rows[0]["due"]
    return Claimed(jobs=jobs, next_due_in=None if due is None else max(0.0, due - tx.now))


# The pending jobs, seen as queues: one per (task, priority) that has pending jobs, found by
# skipping along the pending jobs' (task, priority, run_at, id) index, and each task's room
# under its concurrency limit (:limits, JSON: {task: limit}). A claim reads, per queue of a
# task with room, only the due jobs it may take, so that delayed jobs and the backlog of a
# task at its limit cost nothing however many they are.
QUEUES = """
tasks(task) AS (
    SELECT min(task) FROM jobs INDEXED BY jobs_task_claim_order WHERE status = 'pending'
    UNION ALL
    SELECT (SELECT min(task) FROM jobs INDEXED BY jobs_task_claim_order
            WHERE status = 'pending' AND task > t.task)
    FROM tasks AS t WHERE t.task IS NOT NULL
),
queues(task, priority) AS (
    SELECT task, (SELECT min(priority) FROM jobs INDEXED BY jobs_task_claim_order
                  WHERE status = 'pending' AND task = tasks.task)
    FROM tasks WHERE task IS NOT NULL
    UNION ALL
    SELECT q.task, (SELECT min(priority) FROM jobs INDEXED BY jobs_task_claim_order
                    WHERE status = 'pending' AND task = q.task AND priority > q.priority)
    FROM queues AS q WHERE q.priority IS NOT NULL
),
room(task, free) AS MATERIALIZED (
    SELECT limits.key, max(0, limits.value - (SELECT count(*) FROM jobs
        WHERE task = limits.key AND status = 'running' AND NOT waiting))
    FROM tasks JOIN json_each(:limits) AS limits ON limits.key = tasks.task
)"""
# The jobs a claim takes: of each queue of a task with room, its first due jobs; of those,
# no more per task than its room, in claim order, at most :limit.
CANDIDATES = """
    SELECT id FROM (
        SELECT j.id, j.priority, j.run_at, r.free,
            row_number() OVER (PARTITION BY j.task ORDER BY j.priority, j.run_at, j.id) AS nth
        FROM queues AS q LEFT JOIN room AS r ON r.task = q.task
        JOIN jobs AS j ON j.id IN (
            SELECT k.id FROM jobs AS k INDEXED BY jobs_task_claim_order
            WHERE k.status = 'pending' AND k.task = q.task AND k.priority = q.priority
                AND k.run_at <= :now
            ORDER BY k.run_at, k.id LIMIT :limit)
        WHERE q.priority IS NOT NULL AND coalesce(r.free, 1) > 0)
    WHERE nth <= coalesce(free, :limit)
    ORDER BY priority, run_at, id LIMIT :limit"""
# When the next pending job of a task with room is due (room counted after the claim).
NEXT_DUE = """
    SELECT min((SELECT min(run_at) FROM jobs INDEXED BY jobs_task_claim_order
                WHERE status = 'pending' AND task = q.task AND priority = q.priority)) AS due
    FROM queues AS q LEFT JOIN room AS r ON r.task = q.task
    WHERE q.priority IS NOT NULL AND coalesce(r.free, 1) > 0"""


# -- finish ------------------------------------------------------------------------------


def finish_jobs(tx: Tx, outcomes: list[Outcome]) -> list[Job | None]:
    """Record outcomes; None where the job no longer runs under the outcome's claim."""
    params: list[Any] = []
    for outcome in outcomes:
        params += (
            outcome.job_id,
            outcome.epoch,
            outcome.worker,
            outcome.status,
            outcome.result,
            outcome.error.message if outcome.error else None,
            outcome.retry_in,
        )
    rows = fetch(
        tx,
        "UPDATE jobs SET result = v.result,"
        " status = CASE WHEN v.outcome IN ('succeeded', 'failed') THEN v.outcome"
        "   ELSE 'pending' END,"
        " error = CASE WHEN v.outcome = 'succeeded' THEN NULL"
        "   ELSE coalesce(v.error, jobs.error) END,"
        " run_at = CASE v.outcome WHEN 'retry' THEN ? + v.retry_in WHEN 'released' THEN ?"
        "   ELSE jobs.run_at END,"
        " attempts = jobs.attempts - (v.outcome = 'released'),"
        " finished_at = CASE WHEN v.outcome IN ('succeeded', 'failed') THEN ? END,"
        " worker = NULL, lease_expires = NULL, waiting = 0"
        " FROM (SELECT column1 AS id, column2 AS epoch, column3 AS worker, column4 AS outcome,"
        "   column5 AS result, column6 AS error, column7 AS retry_in FROM (VALUES "
        + ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * len(outcomes))
        + ")) AS v WHERE jobs.id = v.id AND jobs.epoch = v.epoch"
        " AND jobs.worker = v.worker AND jobs.status = 'running'"
        f" RETURNING {JOB_COLUMNS}",
        [tx.now, tx.now, tx.now, *params],
    )
    updated = {row["id"]: job_from_row(row) for row in rows}
    for o in outcomes:
        if (job := updated.get(o.job_id)) is not None:
            tx.notes.ended(job, job.run_at - tx.now, retrying=o.status == "retry")
    errors = [
        (
            o.job_id,
            updated[o.job_id].attempts,
            o.error.kind,
            o.error.message,
            o.error.traceback,
            tx.now,
            updated[o.job_id].started_at,
            o.worker,
        )
        for o in outcomes
        if o.error is not None and o.job_id in updated
    ]
    if errors:
        tx.db.executemany(f"INSERT INTO job_errors ({ERROR_COLUMNS}) VALUES ({marks(8)})", errors)
    return [updated.get(o.job_id) for o in outcomes]


def finish_and_claim(tx: Tx, items: list[tuple[list[Outcome], ClaimRequest]]) -> list[Finished]:
    """Outcomes and the claim that follows them, in one transaction."""
    results = []
    for outcomes, request in items:
        jobs = finish_jobs(tx, outcomes) if outcomes else []
        results.append(Finished(jobs=jobs, claimed=_claim(tx, request)))
    return results


def set_waiting(tx: Tx, items: list[tuple[int, int, str, bool]]) -> list[bool]:
    results = []
    for job_id, epoch, worker, waiting in items:
        rows = fetch(
            tx,
            "UPDATE jobs SET waiting = ? WHERE id = ? AND epoch = ? AND worker = ?"
            " AND status = 'running' RETURNING id",
            (waiting, job_id, epoch, worker),
        )
        if rows and waiting:
            tx.notes.made_due(0.0)  # the job's task has room for another of its jobs
        results.append(bool(rows))
    return results


# -- recovery ----------------------------------------------------------------------------

# A running job whose lease expired or whose worker is not alive.
ABANDONED = (
    "status = 'running' AND (lease_expires < :now OR worker IS NULL"
    " OR worker NOT IN (SELECT worker FROM nodes WHERE expires >= :now))"
)


def recover_jobs(tx: Tx, quarantine: list[int]) -> list[list[Job]]:
    results = []
    for quarantine_after in quarantine:
        # Only for the error messages; the UPDATE decides.
        workers = {
            row["id"]: row["worker"]
            for row in fetch(tx, f"SELECT id, worker FROM jobs WHERE {ABANDONED}", {"now": tx.now})
        }
        rows = fetch(
            tx,
            "UPDATE jobs SET crashes = crashes + 1,"
            " status = CASE WHEN crashes + 1 >= :q OR attempts >= max_attempts"
            "   THEN 'failed' ELSE 'pending' END,"
            " error = CASE WHEN crashes + 1 >= :q"
            "   THEN 'quarantined after ' || (crashes + 1) || ' crashes'"
            "   WHEN attempts >= max_attempts THEN 'interrupted during its last attempt ('"
            "     || attempts || ' of ' || max_attempts || ')'"
            "   ELSE 'interrupted during attempt ' || attempts || '; it will run again' END,"
            " finished_at = CASE WHEN crashes + 1 >= :q OR attempts >= max_attempts"
            "   THEN :now END,"
            " run_at = :now, worker = NULL, lease_expires = NULL, waiting = 0"
            f" WHERE {ABANDONED} RETURNING {JOB_COLUMNS}",
            {"q": quarantine_after, "now": tx.now},
        )
        jobs = [job_from_row(row) for row in rows]
        for job in jobs:  # an interrupted attempt is a failed one
            tx.notes.ended(job, 0.0, retrying=True)
        tx.db.executemany(
            f"INSERT INTO job_errors ({ERROR_COLUMNS})"
            " VALUES (?, ?, 'interrupted', ?, NULL, ?, ?, ?)",
            [
                (
                    job.id,
                    job.attempts,
                    f"interrupted: worker {workers.get(job.id) or '?'} went"
                    f" away during attempt {job.attempts}",
                    tx.now,
                    job.started_at,
                    workers.get(job.id),
                )
                for job in jobs
            ],
        )
        results.append(jobs)
    return results


# -- cancel, retry, prune ----------------------------------------------------------------


def cancel_jobs(tx: Tx, job_ids: list[int]) -> list[Job]:
    jobs = []
    for job_id in job_ids:
        # A running attempt ends here: it is recorded like any other attempt's end.
        tx.db.execute(
            f"INSERT INTO job_errors ({ERROR_COLUMNS}) SELECT id, attempts, 'cancelled',"
            " 'cancelled by request', NULL, ?, started_at, worker FROM jobs"
            " WHERE id = ? AND status = 'running'",
            (tx.now, job_id),
        )
        rows = fetch(
            tx,
            "UPDATE jobs SET status = 'cancelled', finished_at = ?,"
            " error = 'cancelled by request', worker = NULL, lease_expires = NULL, waiting = 0"
            f" WHERE id = ? AND status IN ('pending', 'running') RETURNING {JOB_COLUMNS}",
            (tx.now, job_id),
        )
        if not rows:
            _refuse(tx, job_id, "cancelled")
        job = job_from_row(rows[0])
        tx.notes.finished.append(job)
        tx.notes.cancelled.append(job.id)
        jobs.append(job)
    return jobs


def retry_jobs(tx: Tx, job_ids: list[int]) -> list[Job]:
    jobs = []
    for job_id in job_ids:
        try:
            rows = fetch(
                tx,
                "UPDATE jobs SET status = 'pending', attempts = 0, crashes = 0, run_at = ?,"
                " started_at = NULL, finished_at = NULL, result = NULL, error = NULL"
                f" WHERE id = ? AND status IN ('failed', 'cancelled') RETURNING {JOB_COLUMNS}",
                (tx.now, job_id),
            )
        except sqlite3.IntegrityError:
            raise InvalidTransition(
                f"job {job_id} cannot be retried: another pending or running job of its "
                "task has the same key"
            ) from None
        if not rows:
            _refuse(tx, job_id, "retried")
        job = job_from_row(rows[0])
        # The history says where the attempts start again from 1.
        tx.db.execute(
            "INSERT INTO job_errors (job_id, attempt, kind, message, at) VALUES (?, 0, 'retried',"
            " 'retried by request: its attempts start again from 1', ?)",
            (job_id, tx.now),
        )
        tx.notes.made_due(0.0)
        jobs.append(job)
    return jobs


def _refuse(tx: Tx, job_id: int, verb: str) -> None:
    rows = fetch(tx, "SELECT status FROM jobs WHERE id = ?", (job_id,))
    if not rows:
        raise JobNotFound(job_id)
    raise refused(job_id, rows[0]["status"], verb)


def prune_jobs(tx: Tx, slices: list[tuple[JobStatus, float]]) -> list[int]:
    """Delete up to PRUNE_SLICE finished jobs of a status that finished `age` seconds ago."""
    counts = []
    for status, age in slices:
        ids = [
            row["id"]
            for row in fetch(
                tx,
                f"SELECT id FROM jobs WHERE status = ? AND finished_at < ? LIMIT {PRUNE_SLICE}",
                (status, tx.now - age),
            )
        ]
        if ids:
            tx.db.execute(f"DELETE FROM job_errors WHERE job_id IN ({marks(len(ids))})", ids)
            tx.db.execute(f"DELETE FROM job_logs WHERE job_id IN ({marks(len(ids))})", ids)
            tx.db.execute(f"DELETE FROM jobs WHERE id IN ({marks(len(ids))})", ids)
        counts.append(len(ids))
    return counts
