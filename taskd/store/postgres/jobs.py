"""The job writes, each inside a group-committed transaction (`Tx`).

Each function takes the writes of one kind that met in a batch and returns one result per
item, in order. A claim decides in one statement (FOR UPDATE SKIP LOCKED), and so does a
recovery; the limits of tasks are counted under a transaction-scoped advisory lock per
limited task, so that two daemons claiming at once cannot both see room that one leaves.
"""

from __future__ import annotations

from typing import cast

import asyncpg

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
from taskd.store.postgres.inserts import ACTIVE_KEYS_SQL, INSERT_ROUNDS, INSERT_SQL, statement
from taskd.store.postgres.schema import JOB_COLUMNS, job_columns
from taskd.store.postgres.tx import Tx
from taskd.store.rows import job_from_row

PRUNE_SLICE = 2000  # rows deleted per transaction, so that pruning never holds the writer long

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
    chunk = [jobs[i] for i in indexes]
    rows = await tx.fetch(
        statement(INSERT_SQL, tx.s),
        [job.task for job in chunk],
        [job.origin for job in chunk],
        [job.payload for job in chunk],
        [job.priority for job in chunk],
        [job.run_at for job in chunk],
        [job.delay for job in chunk],
        [job.max_attempts for job in chunk],
        [job.key for job in chunk],
        [job.parent_id for job in chunk],
        tx.sender,
    )
    for row in rows:  # the statement told the other daemons itself
        tx.notes.new[row["id"]] = row["due_in"]
    keyed = {(row["task"], row["key"]): row["id"] for row in rows if row["key"] is not None}
    # Rows get ids in the order of the input: the unkeyed ones, sorted, are the unkeyed
    # jobs in order (a keyed row is matched by its key instead).
    unkeyed = iter(sorted(row["id"] for row in rows if row["key"] is None))
    conflicts: list[int] = []
    for index in indexes:
        job = jobs[index]
        if job.key is None:
            results[index] = Inserted(next(unkeyed), duplicate=False)
        elif (job_id := keyed.pop((job.task, job.key), None)) is not None:
            results[index] = Inserted(job_id, duplicate=False)
        else:
            conflicts.append(index)
    if not conflicts:
        return []
    pairs = sorted({(jobs[i].task, jobs[i].key) for i in conflicts}, key=str)
    active = {
        (row["task"], row["key"]): row["id"]
        for row in await tx.fetch(
            statement(ACTIVE_KEYS_SQL, tx.s), [p[0] for p in pairs], [p[1] for p in pairs]
        )
    }
    retry = []
    for index in conflicts:
        job_id = active.get((jobs[index].task, jobs[index].key))
        if job_id is None:
            retry.append(index)  # the active job ended after our insert met it
        else:
            results[index] = Inserted(job_id, duplicate=True)
    return retry


# -- claim -------------------------------------------------------------------------------

# Counts against concurrency limits: running, and not waiting for another job.
BUSY = "status = 'running' AND NOT waiting"

LOCK_LIMITED_SQL = """
SELECT pg_advisory_xact_lock(k) FROM (
    SELECT DISTINCT hashtextextended($2 || t.task, 0) AS k FROM unnest($1::text[]) AS t(task)
    WHERE EXISTS (SELECT 1 FROM {s}.jobs j WHERE j.task = t.task AND j.status = 'pending'
                  AND j.run_at <= {s}.now())
    ORDER BY k) AS keys
"""

CLAIM_SQL = """
WITH limited AS (
    SELECT t.task, greatest(0, t.cap - (SELECT count(*) FROM {s}.jobs r
                                        WHERE r.task = t.task AND r.{busy})) AS room
    FROM unnest($4::text[], $5::integer[]) AS t(task, cap)
), picked AS (
    SELECT * FROM (
        SELECT id, priority, run_at FROM {s}.jobs
        WHERE status = 'pending' AND run_at <= {s}.now() AND task <> ALL($4::text[])
        ORDER BY priority, run_at, id LIMIT $2 FOR UPDATE SKIP LOCKED) AS unlimited
    UNION ALL
    SELECT p.* FROM limited AS l, LATERAL (
        SELECT id, priority, run_at FROM {s}.jobs
        WHERE task = l.task AND status = 'pending' AND run_at <= {s}.now()
        ORDER BY priority, run_at, id LIMIT least($2, l.room) FOR UPDATE SKIP LOCKED) AS p
), chosen AS (
    SELECT id FROM picked ORDER BY priority, run_at, id LIMIT $2
)
UPDATE {s}.jobs AS j SET status = 'running', attempts = j.attempts + 1, epoch = j.epoch + 1,
    started_at = {s}.now(), worker = $1, lease_expires = {s}.now() + $3, waiting = false,
    progress_done = NULL, progress_total = NULL, progress_message = NULL, progress_at = NULL
FROM chosen
WHERE j.id = chosen.id
  AND EXISTS (SELECT 1 FROM {s}.nodes WHERE worker = $1 AND expires IS NOT NULL)
RETURNING {columns}
"""

NEXT_DUE_SQL = """
WITH full_tasks AS (
    SELECT t.task FROM unnest($1::text[], $2::integer[]) AS t(task, cap)
    WHERE (SELECT count(*) FROM {s}.jobs r WHERE r.task = t.task AND r.{busy}) >= t.cap
)
SELECT min(run_at) - {s}.now() FROM {s}.jobs
WHERE status = 'pending' AND task NOT IN (SELECT task FROM full_tasks)
"""


async def insert_and_claim(
    tx: Tx, items: list[tuple[list[NewJob], ClaimRequest]]
) -> list[tuple[list[Inserted], Claimed]]:
    """Jobs inserted, then a claim, in the same transaction."""
    return [(await insert_jobs(tx, jobs), await _claim(tx, request)) for jobs, request in items]


async def claim_in(tx: Tx, request: ClaimRequest | None) -> Claimed | None:
    """A claim as part of another write (a tick's), if one is asked for."""
    return None if request is None else await _claim(tx, request)


async def claim_jobs(tx: Tx, requests: list[ClaimRequest]) -> list[Claimed]:
    return [await _claim(tx, request) for request in requests]


async def _claim(tx: Tx, request: ClaimRequest) -> Claimed:
    s = tx.s
    tasks, caps = list(request.limits), list(request.limits.values())
    if tasks:
        await tx.db.execute(LOCK_LIMITED_SQL.format(s=s), tasks, f"taskd:{s}:")
    rows = await tx.fetch(
        CLAIM_SQL.format(s=s, busy=BUSY, columns=job_columns("j")),
        request.worker,
        request.limit,
        request.lease,
        tasks,
        caps,
    )
    jobs = sorted(map(job_from_row, rows), key=lambda job: (job.priority, job.run_at, job.id))
    tx.notes.claimed(jobs)
    next_due = await tx.db.fetchval(NEXT_DUE_SQL.format(s=s, busy=BUSY), tasks, caps)
    return Claimed(jobs=jobs, next_due_in=None if next_due is None else max(0.0, next_due))


# -- finish ------------------------------------------------------------------------------

FINISH_SQL = """
WITH v AS (
    SELECT * FROM unnest($1::bigint[], $2::integer[], $3::text[], $4::text[], $5::bytea[],
                         $6::text[], $7::text[], $8::text[], $9::double precision[])
        AS v(id, epoch, worker, outcome, result, kind, message, traceback, retry_in)
), done AS (
    UPDATE {s}.jobs AS j SET result = v.result,
        status = CASE WHEN v.outcome IN ('succeeded', 'failed') THEN v.outcome
            ELSE 'pending' END,
        error = CASE WHEN v.outcome = 'succeeded' THEN NULL ELSE coalesce(v.message, j.error) END,
        run_at = CASE v.outcome WHEN 'retry' THEN {s}.now() + v.retry_in
            WHEN 'released' THEN {s}.now() ELSE j.run_at END,
        attempts = j.attempts - (v.outcome = 'released')::integer,
        finished_at = CASE WHEN v.outcome IN ('succeeded', 'failed') THEN {s}.now() END,
        worker = NULL, lease_expires = NULL, waiting = false
    FROM v
    WHERE j.id = v.id AND j.epoch = v.epoch AND j.worker = v.worker AND j.status = 'running'
    RETURNING {columns}, v.kind, v.message, v.traceback, v.worker AS ran_on,
        j.run_at - {s}.now() AS due_in
), errors AS (
    INSERT INTO {s}.job_errors (job_id, attempt, kind, message, traceback, at, started_at, worker)
    SELECT id, attempts, kind, message, traceback, {s}.now(), started_at, ran_on FROM done
    WHERE kind IS NOT NULL
)
SELECT * FROM done
"""


async def finish_jobs(tx: Tx, outcomes: list[Outcome]) -> list[Job | None]:
    """Record outcomes; None where the job no longer runs under the outcome's claim."""
    rows = await tx.fetch(
        FINISH_SQL.format(s=tx.s, columns=job_columns("j")),
        [o.job_id for o in outcomes],
        [o.epoch for o in outcomes],
        [o.worker for o in outcomes],
        [o.status for o in outcomes],
        [o.result for o in outcomes],
        [o.error.kind if o.error else None for o in outcomes],
        [o.error.message if o.error else None for o in outcomes],
        [o.error.traceback if o.error else None for o in outcomes],
        [o.retry_in for o in outcomes],
    )
    updated = {}
    for row in rows:
        job = updated[row["id"]] = job_from_row(row)
        tx.notes.ended(job, row["due_in"], retrying=row["kind"] is not None)
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
        changed = await tx.db.fetchval(
            f"UPDATE {tx.s}.jobs SET waiting = $1 WHERE id = $2 AND epoch = $3 AND worker = $4"
            " AND status = 'running' RETURNING true",
            waiting,
            job_id,
            epoch,
            worker,
        )
        if changed and waiting:
            tx.notes.made_due(0.0)  # the job's task has room for another of its jobs
        results.append(bool(changed))
    return results


# -- recovery ----------------------------------------------------------------------------

RECOVER_SQL = """
WITH gone AS (
    SELECT id, worker FROM {s}.jobs
    WHERE status = 'running' AND (lease_expires < {s}.now() OR worker IS NULL
        OR worker NOT IN (SELECT worker FROM {s}.nodes WHERE expires >= {s}.now()))
    FOR UPDATE SKIP LOCKED
), back AS (
    UPDATE {s}.jobs AS j SET crashes = j.crashes + 1,
        status = CASE WHEN j.crashes + 1 >= $1 OR j.attempts >= j.max_attempts
            THEN 'failed' ELSE 'pending' END,
        error = CASE WHEN j.crashes + 1 >= $1
                THEN 'quarantined after ' || (j.crashes + 1) || ' crashes'
            WHEN j.attempts >= j.max_attempts THEN 'interrupted during its last attempt ('
                || j.attempts || ' of ' || j.max_attempts || ')'
            ELSE 'interrupted during attempt ' || j.attempts || '; it will run again' END,
        finished_at = CASE WHEN j.crashes + 1 >= $1 OR j.attempts >= j.max_attempts
            THEN {s}.now() END,
        run_at = {s}.now(), worker = NULL, lease_expires = NULL, waiting = false
    FROM gone
    WHERE j.id = gone.id
    RETURNING {columns}, gone.worker AS lost_worker, 0.0::double precision AS due_in
), errors AS (
    INSERT INTO {s}.job_errors (job_id, attempt, kind, message, traceback, at, started_at, worker)
    SELECT id, attempts, 'interrupted', 'interrupted: worker ' || coalesce(lost_worker, '?')
        || ' went away during attempt ' || attempts, NULL, {s}.now(), started_at, lost_worker
    FROM back
)
SELECT * FROM back
"""


async def recover_jobs(tx: Tx, quarantine: list[int]) -> list[list[Job]]:
    results = []
    for quarantine_after in quarantine:
        rows = await tx.fetch(
            RECOVER_SQL.format(s=tx.s, columns=job_columns("j")), quarantine_after
        )
        jobs = []
        for row in rows:
            job = job_from_row(row)
            tx.notes.ended(job, 0.0, retrying=True)  # an interrupted attempt is a failed one
            jobs.append(job)
        results.append(jobs)
    return results


# -- cancel, retry, prune ----------------------------------------------------------------

CANCEL_SQL = """
WITH target AS (
    SELECT id, status AS was, attempts, started_at, worker FROM {s}.jobs
    WHERE id = $1 AND status IN ('pending', 'running') FOR UPDATE
), attempt AS (
    INSERT INTO {s}.job_errors (job_id, attempt, kind, message, traceback, at, started_at, worker)
    SELECT id, attempts, 'cancelled', 'cancelled by request', NULL, {s}.now(), started_at,
        worker FROM target
    WHERE was = 'running'
)
UPDATE {s}.jobs AS j SET status = 'cancelled', finished_at = {s}.now(),
    error = 'cancelled by request', worker = NULL, lease_expires = NULL, waiting = false
FROM target WHERE j.id = target.id
RETURNING {columns}
"""


async def cancel_jobs(tx: Tx, job_ids: list[int]) -> list[Job]:
    jobs = []
    for job_id in job_ids:
        # A running attempt ends here: it is recorded like any other attempt's end.
        rows = await tx.fetch(CANCEL_SQL.format(s=tx.s, columns=job_columns("j")), job_id)
        if not rows:
            await _refuse(tx, job_id, "cancelled")
        job = job_from_row(rows[0])
        tx.notes.finished.append(job)
        tx.notes.cancelled.append(job.id)
        jobs.append(job)
    return jobs


async def retry_jobs(tx: Tx, job_ids: list[int]) -> list[Job]:
    jobs = []
    for job_id in job_ids:
        try:
            rows = await tx.fetch(
                f"UPDATE {tx.s}.jobs SET status = 'pending', attempts = 0, crashes = 0,"
                f" run_at = {tx.s}.now(), started_at = NULL, finished_at = NULL, result = NULL,"
                " error = NULL"
                f" WHERE id = $1 AND status IN ('failed', 'cancelled') RETURNING {JOB_COLUMNS}",
                job_id,
            )
        except asyncpg.UniqueViolationError:
            raise InvalidTransition(
                f"job {job_id} cannot be retried: another pending or running job of its "
                "task has the same key"
            ) from None
        if not rows:
            await _refuse(tx, job_id, "retried")
        # The history says where the attempts start again from 1.
        await tx.db.execute(
            f"INSERT INTO {tx.s}.job_errors (job_id, attempt, kind, message, traceback, at)"
            " VALUES ($1, 0, 'retried', 'retried by request: its attempts start again from 1',"
            f" NULL, {tx.s}.now())",
            job_id,
        )
        tx.notes.made_due(0.0)
        jobs.append(job_from_row(rows[0]))
    return jobs


async def _refuse(tx: Tx, job_id: int, verb: str) -> None:
    status = await tx.db.fetchval(f"SELECT status FROM {tx.s}.jobs WHERE id = $1", job_id)
    if status is None:
        raise JobNotFound(job_id)
    raise refused(job_id, status, verb)


PRUNE_SQL = """
WITH doomed AS (
    SELECT id FROM {s}.jobs WHERE status = $1 AND finished_at < {s}.now() - $2
    LIMIT {slice} FOR UPDATE SKIP LOCKED
), errors AS (
    DELETE FROM {s}.job_errors WHERE job_id IN (SELECT id FROM doomed)
), logs AS (
    DELETE FROM {s}.job_logs WHERE job_id IN (SELECT id FROM doomed)
), deleted AS (
    DELETE FROM {s}.jobs WHERE id IN (SELECT id FROM doomed) RETURNING id
)
SELECT count(*) FROM deleted
"""


async def prune_jobs(tx: Tx, slices: list[tuple[JobStatus, float]]) -> list[int]:
    """Delete up to PRUNE_SLICE finished jobs of a status that finished `age` seconds ago."""
    sql = PRUNE_SQL.format(s=tx.s, slice=PRUNE_SLICE)
    return [int(await tx.db.fetchval(sql, status, age)) for status, age in slices]
