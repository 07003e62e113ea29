"""The job writes, each run inside a group-committed transaction (`Tx`).

Each function takes the writes of one kind that met in a batch and returns one result
per item, in order. A claim and a recovery each decide in one UPDATE statement.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import aiosqlite

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
)
from taskd.store.sqlite.schema import JOB_COLUMNS, job_from_row, marks

INSERT_CHUNK = 500  # rows per INSERT statement, well under SQLite's limit of bound variables
INSERT_ROUNDS = 3  # an insert that met an active job which then finished is tried again
# A claim has one UNION ALL branch per task with a concurrency limit; SQLite allows 500
# terms in a compound SELECT. Beyond this many limited tasks one window query serves them.
MAX_LIMIT_BRANCHES = 400
PRUNE_SLICE = 2000  # rows deleted per transaction, so that pruning never holds the writer long
# Counts against concurrency limits: running, and not waiting for another job.
BUSY = "status = 'running' AND NOT waiting"
# The worker may claim: its node names it and it has not left (a lapsed heartbeat is fine:
# `renew` revives it if nobody took its jobs meanwhile).
REGISTERED = "EXISTS (SELECT 1 FROM nodes WHERE worker = :worker AND expires IS NOT NULL)"


@dataclass(frozen=True, slots=True)
class Tx:
    """A write transaction: the writer connection, and the store's clock read once for it."""

    db: aiosqlite.Connection
    now: float


async def fetch(tx: Tx, sql: str, params: Iterable[Any] | Mapping[str, Any] = ()) -> list[Any]:
    return list(await tx.db.execute_fetchall(sql, params))


# -- insert ------------------------------------------------------------------------------


async def insert_jobs(tx: Tx, jobs: list[NewJob]) -> list[Inserted]:
    """Insert jobs; a job whose task and key are taken by an active job joins that job."""
    results: list[Inserted | None] = [None] * len(jobs)
    remaining = list(range(len(jobs)))
    for _ in range(INSERT_ROUNDS):
        remaining = await _insert_round(tx, jobs, remaining, results)
        if not remaining:
            return cast(list[Inserted], results)  # a round fills in each job it does not return
    raise StoreError("could not insert jobs: the active jobs with their keys kept changing")


async def _insert_round(
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
        rows = await fetch(
            tx,
            "INSERT INTO jobs (task, status, origin, payload, priority, run_at, max_attempts,"
            " key, parent_id, created_at) VALUES "
            + ", ".join(["(?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?)"] * len(chunk))
            + " ON CONFLICT DO NOTHING RETURNING id, task, key",
            params,
        )
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
    active = await _active_keys(tx, {(jobs[i].task, jobs[i].key) for i in conflicts})
    retry = []
    for index in conflicts:
        job_id = active.get((jobs[index].task, jobs[index].key))
        if job_id is None:
            retry.append(index)  # the active job ended after our insert met it
        else:
            results[index] = Inserted(job_id, duplicate=True)
    return retry


async def _active_keys(
    tx: Tx, keys: set[tuple[str, str | None]]
) -> dict[tuple[str, str | None], int]:
    params = [value for pair in keys for value in pair]
    rows = await fetch(
        tx,
        "SELECT id, task, key FROM jobs WHERE key IS NOT NULL"
        " AND status IN ('pending', 'running') AND (task, key) IN (VALUES "
        + ", ".join(["(?, ?)"] * len(keys))
        + ")",
        params,
    )
    return {(row["task"], row["key"]): row["id"] for row in rows}


# -- claim -------------------------------------------------------------------------------


async def claim_jobs(tx: Tx, requests: list[ClaimRequest]) -> list[Claimed]:
    return [await _claim(tx, request) for request in requests]


async def _claim(tx: Tx, request: ClaimRequest) -> Claimed:
    candidates, params = _candidates(request, tx.now)
    rows = await fetch(
        tx,
        "UPDATE jobs SET status = 'running', attempts = attempts + 1, epoch = epoch + 1,"
        " started_at = :now, worker = :worker, lease_expires = :now + :lease, waiting = 0"
        f" WHERE id IN (SELECT id FROM ({candidates}) ORDER BY priority, run_at, id"
        f" LIMIT :limit) AND {REGISTERED} RETURNING {JOB_COLUMNS}",
        {**params, "worker": request.worker, "lease": request.lease},
    )
    jobs = sorted(map(job_from_row, rows), key=lambda job: (job.priority, job.run_at, job.id))
    return Claimed(jobs=jobs, next_due_in=await _next_due_in(tx, request.limits))


def _candidates(request: ClaimRequest, now: float) -> tuple[str, dict[str, Any]]:
    """The due jobs a claim may take, as a compound SELECT of (id, priority, run_at).

    Jobs of unlimited tasks come in claim order from one index; each limited task gets a
    branch that takes, in order, no more of its jobs than its limit leaves room for.
    """
    limits = dict(request.limits)
    params: dict[str, Any] = {"now": now, "limit": request.limit}
    names = []
    for number, (task, limit) in enumerate(limits.items()):
        params[f"t{number}"], params[f"c{number}"] = task, limit
        names.append(f":t{number}")
    unlimited = (
        "SELECT * FROM (SELECT id, priority, run_at FROM jobs WHERE status = 'pending'"
        f" AND run_at <= :now AND task NOT IN ({', '.join(names)})"
        " ORDER BY priority, run_at, id LIMIT :limit)"
    )
    if len(limits) > MAX_LIMIT_BRANCHES:
        return f"{unlimited} UNION ALL {_limited_by_window(len(limits))}", params
    branches = [
        "SELECT * FROM (SELECT id, priority, run_at FROM jobs"
        f" WHERE task = :t{n} AND status = 'pending' AND run_at <= :now"
        " ORDER BY priority, run_at, id"
        f" LIMIT max(0, min(:limit, :c{n} - (SELECT count(*) FROM jobs WHERE task = :t{n}"
        f" AND {BUSY}))))"
        for n in range(len(limits))
    ]
    return " UNION ALL ".join([unlimited, *branches]), params


def _limited_by_window(count: int) -> str:
    """All limited tasks in one query (reads every due job of those tasks)."""
    room = " UNION ALL ".join(
        f"SELECT :t{n} AS task, :c{n} - (SELECT count(*) FROM jobs WHERE task = :t{n}"
        f" AND {BUSY}) AS free"
        for n in range(count)
    )
    return (
        "SELECT id, priority, run_at FROM (SELECT j.id, j.priority, j.run_at, r.free,"
        " row_number() OVER (PARTITION BY j.task ORDER BY j.priority, j.run_at, j.id) AS nth"
        f" FROM jobs AS j JOIN ({room}) AS r ON r.task = j.task"
        " WHERE j.status = 'pending' AND j.run_at <= :now) WHERE nth <= free"
    )


async def _next_due_in(tx: Tx, limits: Mapping[str, int]) -> float | None:
    """Seconds until the next pending job of a task with room is due."""
    full: list[str] = []
    if limits:
        rows = await fetch(
            tx,
            f"SELECT task, count(*) AS busy FROM jobs WHERE {BUSY}"
            f" AND task IN ({marks(len(limits))}) GROUP BY task",
            list(limits),
        )
        full = [row["task"] for row in rows if row["busy"] >= limits[row["task"]]]
    rows = await fetch(
        tx,
        "SELECT min(run_at) AS due FROM jobs WHERE status = 'pending'"
        f" AND task NOT IN ({marks(len(full))})",
        full,
    )
    due = rows[0]["due"]
    return None if due is None else max(0.0, due - tx.now)


# -- finish ------------------------------------------------------------------------------


async def finish_jobs(tx: Tx, outcomes: list[Outcome]) -> list[Job | None]:
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
    rows = await fetch(
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
    errors = [
        (
            o.job_id,
            updated[o.job_id].attempts,
            o.error.kind,
            o.error.message,
            o.error.traceback,
            tx.now,
        )
        for o in outcomes
        if o.error is not None and o.job_id in updated
    ]
    if errors:
        await tx.db.executemany("INSERT INTO job_errors VALUES (?, ?, ?, ?, ?, ?)", errors)
    return [updated.get(o.job_id) for o in outcomes]


async def finish_and_claim(
    tx: Tx, items: list[tuple[list[Outcome], ClaimRequest]]
) -> list[Finished]:
    """Outcomes and the claim that follows them, in one transaction."""
    results = []
    for outcomes, request in items:
        jobs = await finish_jobs(tx, outcomes) if outcomes else []
        results.append(Finished(jobs=jobs, claimed=await _claim(tx, request)))
    return results


async def set_waiting(tx: Tx, items: list[tuple[int, int, str, bool]]) -> list[bool]:
    results = []
    for job_id, epoch, worker, waiting in items:
        rows = await fetch(
            tx,
            "UPDATE jobs SET waiting = ? WHERE id = ? AND epoch = ? AND worker = ?"
            " AND status = 'running' RETURNING id",
            (waiting, job_id, epoch, worker),
        )
        results.append(bool(rows))
    return results


# -- recovery ----------------------------------------------------------------------------

# A running job whose lease expired or whose worker is not alive.
ABANDONED = (
    "status = 'running' AND (lease_expires < :now OR worker IS NULL"
    " OR worker NOT IN (SELECT worker FROM nodes WHERE expires >= :now))"
)


async def recover_jobs(tx: Tx, quarantine: list[int]) -> list[list[Job]]:
    results = []
    for quarantine_after in quarantine:
        # Only for the error messages; the UPDATE decides.
        workers = {
            row["id"]: row["worker"]
            for row in await fetch(
                tx, f"SELECT id, worker FROM jobs WHERE {ABANDONED}", {"now": tx.now}
            )
        }
        rows = await fetch(
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
        await tx.db.executemany(
            "INSERT INTO job_errors VALUES (?, ?, 'interrupted', ?, NULL, ?)",
            [
                (
                    job.id,
                    job.attempts,
                    f"interrupted: worker {workers.get(job.id) or '?'} went"
                    f" away during attempt {job.attempts}",
                    tx.now,
                )
                for job in jobs
            ],
        )
        results.append(jobs)
    return results


# -- cancel, retry, prune ----------------------------------------------------------------


async def cancel_jobs(tx: Tx, job_ids: list[int]) -> list[Job]:
    jobs = []
    for job_id in job_ids:
        # A running attempt ends here: it is recorded like any other attempt's end.
        await tx.db.execute(
            "INSERT INTO job_errors SELECT id, attempts, 'cancelled', 'cancelled by request',"
            " NULL, ? FROM jobs WHERE id = ? AND status = 'running'",
            (tx.now, job_id),
        )
        rows = await fetch(
            tx,
            "UPDATE jobs SET status = 'cancelled', finished_at = ?,"
            " error = 'cancelled by request', worker = NULL, lease_expires = NULL, waiting = 0"
            f" WHERE id = ? AND status IN ('pending', 'running') RETURNING {JOB_COLUMNS}",
            (tx.now, job_id),
        )
        if not rows:
            await _refuse(tx, job_id, "cancelled")
        jobs.append(job_from_row(rows[0]))
    return jobs


async def retry_jobs(tx: Tx, job_ids: list[int]) -> list[Job]:
    jobs = []
    for job_id in job_ids:
        try:
            rows = await fetch(
                tx,
                "UPDATE jobs SET status = 'pending', attempts = 0, crashes = 0, run_at = ?,"
                " started_at = NULL, finished_at = NULL, result = NULL"
                f" WHERE id = ? AND status IN ('failed', 'cancelled') RETURNING {JOB_COLUMNS}",
                (tx.now, job_id),
            )
        except sqlite3.IntegrityError:
            raise InvalidTransition(
                f"job {job_id} cannot be retried: another pending or running job of its "
                "task has the same key"
            ) from None
        if not rows:
            await _refuse(tx, job_id, "retried")
        jobs.append(job_from_row(rows[0]))
    return jobs


async def _refuse(tx: Tx, job_id: int, verb: str) -> None:
    rows = await fetch(tx, "SELECT status FROM jobs WHERE id = ?", (job_id,))
    if not rows:
        raise JobNotFound(job_id)
    raise InvalidTransition(f"job {job_id} is {rows[0]['status']} and cannot be {verb}")


async def prune_jobs(tx: Tx, slices: list[tuple[JobStatus, float]]) -> list[int]:
    """Delete up to PRUNE_SLICE finished jobs of a status that finished `age` seconds ago."""
    counts = []
    for status, age in slices:
        ids = [
            row["id"]
            for row in await fetch(
                tx,
                f"SELECT id FROM jobs WHERE status = ? AND finished_at < ? LIMIT {PRUNE_SLICE}",
                (status, tx.now - age),
            )
        ]
        if ids:
            await tx.db.execute(f"DELETE FROM job_errors WHERE job_id IN ({marks(len(ids))})", ids)
            await tx.db.execute(f"DELETE FROM jobs WHERE id IN ({marks(len(ids))})", ids)
        counts.append(len(ids))
    return counts
