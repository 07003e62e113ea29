"""The job writes, each an operation run in a group-committed transaction (`Tx`).

Each takes the writes of one kind that met in a batch and returns one result per item, in
order, noting what listeners must hear of. What a claim, an outcome, a recovery and a
cancel do to a job's row is written here once; the statements around them that SQLite and
PostgreSQL write differently are their dialects'.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from typing import NoReturn, cast

import msgspec

from taskd.models import Hook, Job, JobStatus, limit_key_of
from taskd.store.base import (
    Claimed,
    ClaimRequest,
    Finished,
    Inserted,
    JobNotFound,
    NewJob,
    Outcome,
    StoreError,
    refused,
)
from taskd.store.core import batches, deps, flow, keys, webhooks
from taskd.store.core.dialect import Tx
from taskd.store.core.statements import Statement, Steps, members
from taskd.store.rows import (
    CLAIMED_COLUMNS,
    FINISHED_COLUMNS,
    JOB_COLUMNS,
    Row,
    claimed_job,
    finished_job,
    job_from_row,
)

# A job's place in the claim order (a key made in C: no Python frame for each job claimed).
CLAIM_ORDER = operator.attrgetter("priority", "run_at", "id")
JOB_WIDTH = len(JOB_COLUMNS.split(","))
FINISHED_WIDTH = len(FINISHED_COLUMNS.split(","))
INSERT_ROUNDS = 3  # an insert that met an active job which then finished is tried again
PRUNE_SLICE = 2000  # rows deleted per transaction, so that pruning never holds a writer long
# The ended jobs, as the WHERE of their index (status, finished_at) says it: SQLite reads a
# partial index only for a statement whose WHERE holds the index's own term, word for word.
ENDED = "status IN ('succeeded', 'failed', 'cancelled')"
MAX_WAIT = 10 * 365 * 86400.0  # a debounce without max_wait: ten years (no bound)
# When a debounced job is due again: `debounce` from now, never past `max_wait` after it was
# created (a job waiting for its parents keeps that time in `release_at`).
DEBOUNCED = (
    "CASE WHEN :now + :debounce < created_at + :max_wait THEN :now + :debounce"
    " ELSE created_at + :max_wait END"
)

# What a claim does to each job it takes for :worker.
CLAIMED = (
    "status = 'running', attempts = attempts + 1, epoch = epoch + 1, started_at = :now,"
    " worker = :worker, lease_expires = :now + :lease, waiting = false, progress_done = NULL,"
    " progress_total = NULL, progress_message = NULL, progress_at = NULL"
)
# The worker may claim: its node names it and it has not left (a lapsed heartbeat is fine:
# `renew` revives it if nobody took its jobs meanwhile).
REGISTERED = "EXISTS (SELECT 1 FROM {s}.nodes WHERE worker = :worker AND expires IS NOT NULL)"

# What an outcome `v` (id, epoch, worker, outcome, result, message, retry_in) does to a job
# running its claim: "retry" puts it back for later, "released" at once and without
# counting the attempt (nor its worker). The job keeps the worker of its latest attempt.
FINISHED = """result = v.result,
    status = CASE WHEN v.outcome IN ('succeeded', 'failed') THEN v.outcome ELSE 'pending' END,
    error = CASE WHEN v.outcome = 'succeeded' THEN NULL ELSE coalesce(v.message, jobs.error) END,
    run_at = CASE v.outcome WHEN 'retry' THEN :now + v.retry_in WHEN 'released' THEN :now
        ELSE jobs.run_at END,
    attempts = jobs.attempts - CASE WHEN v.outcome = 'released' THEN 1 ELSE 0 END,
    finished_at = CASE WHEN v.outcome IN ('succeeded', 'failed') THEN :now END,
    worker = CASE WHEN v.outcome = 'released' THEN NULL ELSE jobs.worker END,
    lease_expires = NULL, waiting = false"""
# The outcome's job still runs the claim it reports on (fencing).
FINISHING = (
    "jobs.id = v.id AND jobs.epoch = v.epoch AND jobs.worker = v.worker AND jobs.status = 'running'"
)

# A running job whose lease expired or whose worker is not alive.
ABANDONED = (
    "status = 'running' AND (lease_expires < :now OR worker IS NULL"
    " OR worker NOT IN (SELECT worker FROM {s}.nodes WHERE expires >= :now))"
)
# What a recovery does to an abandoned job: its attempt is lost, and counted as a crash; a
# job that crashed :quarantine times, or lost its last attempt, fails.
RECOVERED = """crashes = crashes + 1,
    status = CASE WHEN crashes + 1 >= :quarantine OR attempts >= max_attempts
        THEN 'failed' ELSE 'pending' END,
    error = CASE WHEN crashes + 1 >= :quarantine
            THEN 'quarantined after ' || (crashes + 1) || ' crashes'
        WHEN attempts >= max_attempts THEN 'interrupted during its last attempt ('
            || attempts || ' of ' || max_attempts || ')'
        ELSE 'interrupted during attempt ' || attempts || '; it will run again' END,
    finished_at = CASE WHEN crashes + 1 >= :quarantine OR attempts >= max_attempts
        THEN :now END,
    run_at = :now, lease_expires = NULL, waiting = false"""


def interrupted(worker: str) -> str:
    """What a recovery records of the attempt it took back (the worker in column `worker`)."""
    return f"'worker ' || coalesce({worker}, '?') || ' went away during attempt ' || attempts"


# What a cancel does to a pending or running job.
CANCELLED = (
    "status = 'cancelled', finished_at = :now, error = 'cancelled by request',"
    " lease_expires = NULL, waiting = false"
)


# -- insert ------------------------------------------------------------------------------


def windowed(job: NewJob) -> bool:
    """Whether inserting the job reads what else has its key first (a uniqueness window, a
    debounced job), which a concurrent insert of that key must not slip between."""
    return job.key is not None and (job.unique_for is not None or job.debounce is not None)


def insert_jobs(tx: Tx, jobs: list[NewJob]) -> Steps[list[Inserted]]:
    """Insert jobs; a job whose task and key are taken by an active job joins that job; a
    job with parents (`after`) waits for them."""
    if len(jobs) == 1 and (one := _one_job_statement(tx, jobs[0])) is not None:
        return (yield from _insert_one(tx, jobs[0], one))
    return (yield from _insert_all(tx, jobs))


def _one_job_statement(tx: Tx, job: NewJob) -> Statement | None:
    """The dialect's one-job statement for a job inserted alone that needs no more: no
    parents, no key's window, no `limit_key` known here (None: the full insert)."""
    if job.after or windowed(job) or job.task in tx.limit_keys:
        return None
    return tx.sql.insert_one_unless_keyed(job)


def _insert_one(tx: Tx, job: NewJob, statement: Statement) -> Steps[list[Inserted]]:
    """The job in one statement, as its task is not keyed (no `limit_key` path, no turn
    among its keys) and its key, if any, is free: the common case. Otherwise the full
    insert, with the paths the statement read (those known here come first)."""
    rows = yield statement
    for row in rows:
        if row["id"] is not None:
            tx.notes.new[row["id"]] = row["due_in"]
            return [Inserted(row["id"], duplicate=False)]
    if not rows and job.key is not None:  # its key is taken (else a row says why not)
        active = yield tx.sql.active_keys([(job.task, job.key)])
        if active:
            return [Inserted(active[0]["id"], duplicate=True)]
    paths = {row["task"]: row["path"] for row in rows if row["path"] is not None}
    if paths:
        tx = dataclasses.replace(tx, limit_keys={**paths, **tx.limit_keys})
    return (yield from _insert_all(tx, [job]))


def _insert_all(tx: Tx, jobs: list[NewJob]) -> Steps[list[Inserted]]:
    # Before any other lock: only inserts take these, and always first.
    keys_read = sorted(
        {(job.task, job.key) for job in jobs if job.key is not None and windowed(job)}
    )  # `windowed` asked only of keyed jobs: no call for each plain one
    if keys_read and (lock := tx.sql.lock_windows(keys_read)) is not None:
        yield lock
    if tx.limit_keys:
        jobs = [_with_limit_key(tx, job) for job in jobs]
        if any(job.after for job in jobs):  # a keyed task's turn before its parents' rows,
            yield from keys.stirred(tx, [job.task for job in jobs])  # as a claim locks them
    parents = yield from deps.lock_parents(tx, jobs)
    results: list[Inserted | None] = [None] * len(jobs)
    remaining = []
    for index, job in enumerate(jobs):
        if job.key is not None and job.debounce is not None:
            moved = yield Statement(
                f"UPDATE {{s}}.jobs SET payload = :payload, limit_key = :limit_key,"
                f" run_at = CASE WHEN blocked > 0 THEN run_at ELSE {DEBOUNCED} END,"
                f" release_at = CASE WHEN blocked > 0 THEN {DEBOUNCED} ELSE release_at END"
                " WHERE task = :task AND key = :key AND status = 'pending' RETURNING id",
                {"payload": job.payload, "debounce": job.debounce, "task": job.task,
                 "key": job.key, "max_wait": MAX_WAIT if job.max_wait is None else job.max_wait,
                 "limit_key": job.limit_key},
            )  # fmt: skip
            if moved:  # the pending job of the key takes this payload, and waits again
                results[index] = Inserted(moved[0]["id"], duplicate=True)
                continue
        if job.key is not None and job.unique_for is not None:
            taken = yield Statement(
                "SELECT id FROM {s}.jobs WHERE task = :task AND key = :key"
                " AND created_at >= :now - :window ORDER BY id DESC LIMIT 1",
                {"task": job.task, "key": job.key, "window": job.unique_for},
            )
            if taken:  # its key is still taken: within the uniqueness window
                results[index] = Inserted(taken[0]["id"], duplicate=True)
                continue
        remaining.append(index)
    for _ in range(INSERT_ROUNDS):
        if remaining:
            remaining = yield from _insert_round(tx, jobs, remaining, results)
        if not remaining:
            inserted = cast(list[Inserted], results)  # a round fills in each job it returns not
            new = [job.task for job, result in zip(jobs, inserted, strict=True)
                   if not result.duplicate]  # fmt: skip
            if not tx.sql.insert_stirs:
                yield from keys.stirred(tx, new)
            if parents:
                decided = yield from deps.link_children(tx, jobs, inserted, parents)
                yield from jobs_ended(tx, decided)
            return inserted
    raise StoreError("could not insert jobs: the active jobs with their keys kept changing")


def _with_limit_key(tx: Tx, job: NewJob) -> NewJob:
    """The job with its value of its task's `limit_key`, if the task has one (else None:
    the job has no value, NULL, and is in no index of the keyed jobs)."""
    path = tx.limit_keys.get(job.task)
    if path is None or job.limit_key is not None:
        return job
    return msgspec.structs.replace(job, limit_key=limit_key_of(job.payload, path))


def _insert_round(
    tx: Tx, jobs: list[NewJob], indexes: list[int], results: list[Inserted | None]
) -> Steps[list[int]]:
    """Insert the jobs at `indexes`; fill in `results`; return the indexes to try again."""
    conflicts: list[int] = []
    for start in range(0, len(indexes), tx.sql.insert_chunk):
        chunk = indexes[start : start + tx.sql.insert_chunk]
        rows = yield from tx.sql.insert([jobs[index] for index in chunk])
        for row in rows:
            tx.notes.new[row["id"]] = row["due_in"]
        conflicts += _match_inserted(jobs, chunk, rows, results)
    if not conflicts:
        return []
    keys = sorted({(jobs[index].task, jobs[index].key) for index in conflicts}, key=str)
    active = {(row["task"], row["key"]): row["id"] for row in (yield tx.sql.active_keys(keys))}
    retry = []
    for index in conflicts:
        job_id = active.get((jobs[index].task, jobs[index].key))
        if job_id is None:
            retry.append(index)  # the active job ended after our insert met it
        else:
            results[index] = Inserted(job_id, duplicate=True)
    return retry


def _match_inserted(
    jobs: list[NewJob], chunk: list[int], rows: list[Row], results: list[Inserted | None]
) -> list[int]:
    """Fill in the results of the jobs at `chunk` that its rows inserted; the indexes of
    those it did not (their key was taken)."""
    keyed: dict[tuple[str, str], int] = {}
    ids = []
    for row in rows:  # each column read once (by name: a lookup each)
        if (key := row["key"]) is None:
            ids.append(row["id"])
        else:
            keyed[row["task"], key] = row["id"]
    # Rows get ids in the order of the input: the unkeyed ones, sorted, are the unkeyed
    # jobs in order (a keyed row is matched by its key instead).
    ids.sort()
    unkeyed = iter(ids)
    conflicts = []
    for index in chunk:
        job = jobs[index]
        if job.key is None:
            results[index] = Inserted(next(unkeyed), duplicate=False)
        elif (job_id := keyed.pop((job.task, job.key), None)) is not None:
            results[index] = Inserted(job_id, duplicate=False)
        else:
            conflicts.append(index)
    return conflicts


def insert_and_claim(
    tx: Tx, items: list[tuple[list[NewJob], ClaimRequest]]
) -> Steps[list[tuple[list[Inserted], Claimed]]]:
    """Jobs inserted, then a claim, in the same transaction."""
    results = []
    for jobs, request in items:
        inserted = yield from insert_jobs(tx, jobs)
        results.append((inserted, (yield from claim(tx, request))))
    return results


# -- claim -------------------------------------------------------------------------------


def claim_jobs(tx: Tx, requests: list[ClaimRequest]) -> Steps[list[Claimed]]:
    results = []
    for request in requests:
        results.append((yield from claim(tx, request)))
    return results


def claim(tx: Tx, request: ClaimRequest) -> Steps[Claimed]:
    """The due jobs the request may take (flow control: `taskd.store.core.flow`), and when
    to claim again: at once if it took all it asked for, else when the next job is due or
    a task held back may start again."""
    # The keyed tasks' turns first: the writes that stir them lock them before anything
    # a claim locks after (taskd.store.core.keys.stirred).
    start = yield tx.sql.claim_start(sorted(request.keyed), sorted(flow.room_counted(request)))
    turns = (yield from keys.turns(tx, request, start)) if request.keyed else {}
    held = yield from flow.holds(tx, request, start)
    caps = flow.keyed_caps(request, held)
    walks = (yield from keys.walks(tx, request, caps, turns)) if request.keyed else []
    if request.shared:
        # Shared budgets go only to jobs that can start: a keyed task's, to its turns' picks.
        turned = {walk.task: [pick.order for pick in walk.picks] for walk in walks}
        yield from flow.share(tx, request, held, turned)
    quotas = held.for_claim()
    walks = keys.within(walks, quotas)
    # A keyed task's jobs are taken in its keys' turns (taskd.store.core.keys), not here.
    quotas |= dict.fromkeys(request.keyed, 0)
    rows = yield from tx.sql.claim(request, quotas)  # CLAIMED_COLUMNS
    jobs = sorted((claimed_job(row, request.worker) for row in rows), key=CLAIM_ORDER)
    if walks:
        picks = keys.chosen(walks, jobs, request.limit)
        rows = yield from _claim_ids(request, [pick.order[2] for pick in picks])
        jobs += (claimed_job(row, request.worker) for row in rows)
    tx.notes.claimed(jobs)
    yield from flow.started(tx, request, held, jobs)
    keyed_due = (yield from keys.settle(tx, request, walks, jobs)) if walks else None
    if len(jobs) >= request.limit:
        return Claimed(jobs=jobs, next_due_in=0.0)  # there may be more: no need to look
    left = held.left(jobs) | dict.fromkeys(request.keyed, 0)
    due = yield from tx.sql.next_due(request, left)
    for wake in (keyed_due, (yield from flow.wake(tx, request, held, left))):
        if wake is not None:
            due = wake if due is None else min(due, wake)
    return Claimed(jobs=jobs, next_due_in=due)


def _claim_ids(request: ClaimRequest, ids: list[int]) -> Steps[list[Row]]:
    """Marks these jobs running for the request's worker (those still pending); their rows."""
    if not ids:
        return []
    listed, params = members("id", ids)
    return (
        yield Statement(
            f"UPDATE {{s}}.jobs SET {CLAIMED} WHERE id IN ({listed}) AND status = 'pending'"
            f" AND {REGISTERED} RETURNING {CLAIMED_COLUMNS}",
            {**params, "worker": request.worker, "lease": request.lease},
        )
    )


def claim_in(tx: Tx, request: ClaimRequest | None) -> Steps[Claimed | None]:
    """A claim as part of another write (a tick's), if one is asked for."""
    if request is None:
        return None
    return (yield from claim(tx, request))


# -- finish ------------------------------------------------------------------------------


def finish_jobs(tx: Tx, outcomes: list[Outcome]) -> Steps[list[Job | None]]:
    """Record outcomes; None where the job no longer runs under the outcome's claim."""
    retried = {outcome.job_id for outcome in outcomes if outcome.status == "retry"}
    updated = {}
    parents = set()
    # With the jobs as their worker claimed them, the rows say only what their end changed.
    claimed = {outcome.job_id: outcome.job for outcome in outcomes}
    whole = any(job is None for job in claimed.values())
    columns, width = (JOB_COLUMNS, JOB_WIDTH) if whole else (FINISHED_COLUMNS, FINISHED_WIDTH)
    for row in (yield from tx.sql.finish(outcomes, columns)):
        job = job_from_row(row) if whole else finished_job(cast(Job, claimed[row[0]]), row)
        updated[job.id] = job
        # due_in and linked follow the columns: read by position (by name, a sqlite3.Row
        # compares the name with each of its columns' until one matches).
        tx.notes.ended(job, row[width], retrying=job.id in retried)
        if row[width + 1]:
            parents.add(job.id)
    yield from keys.stirred(tx, [job.task for job in updated.values()])
    hooks = [
        (updated[outcome.job_id], outcome.hook)
        for outcome in outcomes
        if outcome.hook is not None and outcome.job_id in updated
    ]
    yield from enqueue_hooks(tx, hooks)
    yield from jobs_ended(tx, list(updated.values()), parents)
    return [updated.get(outcome.job_id) for outcome in outcomes]


def finish_and_claim(
    tx: Tx, items: list[tuple[list[Outcome], ClaimRequest]]
) -> Steps[list[Finished]]:
    """Outcomes and the claim that follows them, in one transaction."""
    results = []
    for outcomes, request in items:
        jobs = (yield from finish_jobs(tx, outcomes)) if outcomes else []
        results.append(Finished(jobs=jobs, claimed=(yield from claim(tx, request))))
    return results


def jobs_ended(tx: Tx, jobs: Sequence[Job | None], parents: set[int] | None = None) -> Steps[None]:
    """What the end of jobs decides in their transaction: their children (due, or cancelled
    in turn), and the batches this finishes, whose callbacks it enqueues. `parents`: those
    of the jobs that have children, when the write that ended them read it (None: any)."""
    ended = [job for job in jobs if job is not None]
    if not ended:
        return
    ended += yield from deps.settle_children(tx, ended, parents)
    if deliveries := webhooks.job_events(tx, ended):
        yield from insert_jobs(tx, deliveries)
    if not any(job.batch_id is not None for job in ended):
        return
    yield from _enqueue_callbacks(tx, (yield from batches.count_ended(tx, ended)))


def _enqueue_callbacks(tx: Tx, finished: list[tuple[int, NewJob | None]]) -> Steps[None]:
    if deliveries := webhooks.batch_events(tx, finished):
        yield from insert_jobs(tx, deliveries)
    callbacks = [(batch, job) for batch, job in finished if job is not None]
    if callbacks:
        inserted = yield from insert_jobs(tx, [job for _, job in callbacks])
        for (batch, _), result in zip(callbacks, inserted, strict=True):
            yield batches.record_callback(batch, result.job_id)


def insert_batches(
    tx: Tx, items: list[tuple[list[NewJob], Hook | None]]
) -> Steps[list[tuple[int, list[Inserted]]]]:
    """Jobs inserted as a batch: its id, and theirs; its callback (a Hook) is enqueued in
    the transaction that ends its last job."""
    results = []
    for jobs, on_finish in items:
        batch = yield from batches.create(tx, len(jobs), on_finish)
        members = [msgspec.structs.replace(job, batch_id=batch) for job in jobs]
        inserted = yield from insert_jobs(tx, members)
        duplicates = sum(result.duplicate for result in inserted)
        if duplicates or not jobs:
            yield from _enqueue_callbacks(tx, (yield from batches.joined(tx, batch, duplicates)))
        results.append((batch, inserted))
    return results


def enqueue_hooks(tx: Tx, hooks: list[tuple[Job, Hook]]) -> Steps[None]:
    """The hook jobs of jobs that ended (succeeded, or failed for good), in the transaction
    that records their end: a crash never loses one nor makes two. A hook job's own end
    has no hook (its origin says so), so that hooks never loop."""
    jobs = [
        NewJob(
            task=hook.task,
            payload=_hook_payload(job),
            origin="hook",
            max_attempts=hook.max_attempts,
            parent_id=job.id,
        )
        for job, hook in hooks
        if job.status in ("succeeded", "failed") and job.origin != "hook"
    ]
    if jobs:
        yield from insert_jobs(tx, jobs)


def _hook_payload(job: Job) -> bytes:
    return msgspec.msgpack.encode(
        {
            "job": job.id,
            "task": job.task,
            "status": job.status,
            "error": job.error,
            "attempts": job.attempts,
        }
    )


def set_waiting(tx: Tx, items: list[tuple[int, int, str, bool]]) -> Steps[list[bool]]:
    results = []
    for job_id, epoch, worker, waiting in items:
        rows = yield Statement(
            "UPDATE {s}.jobs SET waiting = :waiting WHERE id = :id AND epoch = :epoch"
            " AND worker = :worker AND status = 'running' RETURNING id, task",
            {"waiting": waiting, "id": job_id, "epoch": epoch, "worker": worker},
        )
        if rows and waiting:
            tx.notes.made_due(0.0)  # the job's task has room for another of its jobs
            yield from keys.stirred(tx, [rows[0]["task"]])
        results.append(bool(rows))
    return results


# -- recovery ----------------------------------------------------------------------------


def recover_jobs(tx: Tx, items: list[tuple[int, dict[str, Hook]]]) -> Steps[list[list[Job]]]:
    results = []
    for quarantine_after, on_failure in items:
        yield from release_held(tx)
        jobs = [job_from_row(row) for row in (yield from tx.sql.recover(quarantine_after))]
        yield from keys.stirred(tx, [job.task for job in jobs])
        for job in jobs:  # an interrupted attempt is a failed one
            tx.notes.ended(job, 0.0, retrying=True)
        hooks = [
            (job, on_failure[job.task])
            for job in jobs
            if job.status == "failed" and job.task in on_failure
        ]
        yield from enqueue_hooks(tx, hooks)
        yield from jobs_ended(tx, jobs)
        results.append(jobs)
    yield from fold_counts(tx)
    return results


def release_held(tx: Tx) -> Steps[None]:
    """Put back the held jobs of workers that went away before starting them (schedules.HELD:
    running with no started_at) as they were before the hold: pending, due at their time,
    the attempt not counted. They never started: nothing was interrupted."""
    rows = yield Statement(
        "UPDATE {s}.jobs SET status = 'pending', attempts = attempts - 1, worker = NULL,"
        f" lease_expires = NULL WHERE {ABANDONED} AND started_at IS NULL"
        " RETURNING run_at - :now AS due_in"
    )
    for row in rows:
        tx.notes.made_due(max(0.0, row["due_in"]))


# -- cancel, retry, prune ----------------------------------------------------------------


def cancel_jobs(tx: Tx, job_ids: list[int]) -> Steps[list[Job]]:
    jobs = []
    for job_id in job_ids:
        if tx.limit_keys:  # its room, first: a claim locks a keyed task's turn, then jobs
            task = yield Statement("SELECT task FROM {s}.jobs WHERE id = :id", {"id": job_id})
            yield from keys.stirred(tx, [row["task"] for row in task])
        rows = yield from tx.sql.cancel(job_id)
        if not rows:
            yield from _refuse(job_id, "cancelled")
        job = job_from_row(rows[0])
        tx.notes.finished.append(job)
        tx.notes.cancelled.append(job.id)
        yield from jobs_ended(tx, [job])
        jobs.append(job)
    return jobs


def retry_jobs(tx: Tx, job_ids: list[int]) -> Steps[list[Job]]:
    """Failed or cancelled jobs back to pending (the store's `retry` says when another job
    holds the key)."""
    jobs = []
    for job_id in job_ids:
        yield from batches.uncount(tx, job_id)
        rows = yield Statement(
            "UPDATE {s}.jobs SET status = 'pending', attempts = 0, crashes = 0, run_at = :now,"
            " started_at = NULL, finished_at = NULL, result = NULL, error = NULL,"
            " blocked = 0, release_at = NULL"  # retried by a person: it waits for no parent
            f" WHERE id = :id AND status IN ('failed', 'cancelled') RETURNING {JOB_COLUMNS}",
            {"id": job_id},
        )
        if not rows:
            yield from _refuse(job_id, "retried")
        # The history says where the attempts start again from 1.
        yield Statement(
            "INSERT INTO {s}.job_errors (job_id, attempt, kind, message, at) VALUES (:id, 0,"
            " 'retried', 'retried by request: its attempts start again from 1', :now)",
            {"id": job_id},
        )
        tx.notes.made_due(0.0)
        jobs.append(job_from_row(rows[0]))
    yield from keys.stirred(tx, [job.task for job in jobs])
    return jobs


def _refuse(job_id: int, verb: str) -> Steps[NoReturn]:
    rows = yield Statement("SELECT status FROM {s}.jobs WHERE id = :id", {"id": job_id})
    if not rows:
        raise JobNotFound(job_id)
    raise refused(job_id, rows[0]["status"], verb)


def prune_jobs(tx: Tx, slices: list[tuple[JobStatus, float]]) -> Steps[list[int]]:
    """Delete up to PRUNE_SLICE finished jobs of a status that finished `age` seconds ago
    (and as many rows of per-key rate limits that allow a start now: taskd.store.core.keys)."""
    counts = []
    for status, age in slices:
        counts.append((yield from tx.sql.prune(status, age)))
    yield from keys.forget_idle(PRUNE_SLICE)
    yield from fold_counts(tx)
    return counts


def fold_counts(tx: Tx) -> Steps[None]:
    """Fold the job counters' rows, where the backend keeps more than one per task and
    status (PostgreSQL's ledger): run by each recovery, every lease/3 in each daemon, and
    each prune, it bounds the rows a read of the counters sums."""
    if tx.sql.fold_counts_sql:
        yield Statement(tx.sql.fold_counts_sql)
