"""SQLite's own SQL, where it differs from PostgreSQL's, and how a statement runs on SQLite.

Statements run in the connection's thread: a whole transaction, or a whole read, is one
hop from the event loop. A claim walks the pending jobs' index as queues; batches are
VALUES lists (at most INSERT_CHUNK rows, under SQLite's limit of bound variables); what
PostgreSQL does in one statement with data-modifying CTEs takes two here.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from taskd.models import JobStatus
from taskd.store.base import ClaimRequest, NewJob, Outcome, StoreError
from taskd.store.core.activity import trim_logs_sql
from taskd.store.core.deps import HELD
from taskd.store.core.jobs import (
    ABANDONED,
    CANCELLED,
    CLAIMED,
    FINISHED,
    FINISHING,
    PRUNE_SLICE,
    RECOVERED,
    REGISTERED,
    interrupted,
)
from taskd.store.core.nodes import REGISTER_SQL
from taskd.store.core.statements import Statement, Steps, members
from taskd.store.rows import (
    CLAIMED_COLUMNS,
    ERROR_COLUMNS,
    FINISHED_COLUMNS,
    JOB_COLUMNS,
    NODE_COLUMNS,
    Row,
)

INSERT_CHUNK = 500  # rows per INSERT statement, well under SQLite's limit of bound variables
# Outcomes per finish statement, at most; the last statement of a finish is padded with rows
# that match no job up to a power of two. So a finish of any size runs one of eight prepared
# statements: SQLite takes longer to prepare a VALUES list than to run it (before, a drain's
# batches of 514, 517, 522 ... outcomes were a new statement each, 17-25 ms to prepare; with
# 128-row chunks its writer's instructions per job are the same for any mix of sizes).
FINISH_CHUNK = 128
# A padding row: its id, 0, matches no job (ids start at 1), and none of its values is one
# sqlite3 offers to its adapters first (None, bytes; see _NONE below). Without its message
# for the statements of outcomes without one.
_NO_OUTCOME = (0, 0, "", "", "", "", 0.0)
_NO_OUTCOME_UNSAID = _NO_OUTCOME[:5] + _NO_OUTCOME[6:]
# What a finish reads back of the jobs it recorded: FINISHED_COLUMNS but the result (the
# outcome's, which it set) and the progress but whether there is some (progress_done is
# not NULL): sqlite3 converts each column of each row, letting go of the GIL around each.
# The progress of the jobs that reported some is read again.
FINISHED_COMPACT = (
    "id, status, error, attempts, run_at, started_at, finished_at, worker, progress_done"
)
_PROGRESS_AGAIN = (
    "SELECT id, progress_done, progress_total, progress_message, progress_at FROM jobs"
    " WHERE id IN (SELECT value FROM json_each(?))"
)
_NO_PROGRESS = (None, None, None, None)

# sqlite3 binds an int, a float or a str as it is, but offers any other value (None, bytes)
# to its adapters first; with none registered for its type it asks the protocol class for
# `__adapt__`, a failed lookup that builds an AttributeError, message and all, only to drop
# it: for each NULL and each payload bound, half the parameters of an insert (about a
# tenth of the writer thread's instructions per enqueue). Adapters that give the value back
# unchanged, in C, are found in the registry instead.
_NONE: dict[None, None] = {None: None}
sqlite3.register_adapter(type(None), _NONE.__getitem__)
sqlite3.register_adapter(bytes, bytes)  # bytes(value) is value

# What a claim reads back of the jobs it takes: the columns of CLAIMED_COLUMNS that most jobs
# do not leave at their defaults, and whether the job leaves any other at its default
# (`plain`: no result, error, key, crash, parent, batch, trace, hold). sqlite3 converts each
# column of each row, letting go of the GIL around each one: half the columns for a claim
# of plain jobs (a no-op drain's), and the others read again only for the jobs that are not.
CLAIMED_COMPACT = (
    "id, task, origin, payload, attempts, max_attempts, priority, run_at, created_at, epoch,"
    " result IS NULL AND error IS NULL AND key IS NULL AND crashes = 0 AND parent_id IS NULL"
    " AND finished_at IS NULL AND blocked = 0 AND release_at IS NULL"
    " AND after_failure = 'cancel' AND batch_id IS NULL AND traceparent IS NULL AS plain"
)
_CLAIMED_AGAIN = f"SELECT {CLAIMED_COLUMNS} FROM jobs WHERE id IN (SELECT value FROM json_each(?))"

# The pending jobs, seen as queues: one per (task, priority) that has pending jobs, found by
# skipping along the pending jobs' (task, priority, run_at, id) index, and each task's room
# under its concurrency limit (:limits, JSON: {task: limit}). A claim reads, per queue of a
# task with room, only the due jobs it may take, so that delayed jobs and the backlog of a
# task at its limit cost nothing however many they are. :quotas (JSON: {task: n}) caps the
# jobs of a task this claim may start (flow control: 0 for a paused task, what its rate
# limit allows now, a keyed task's jobs taken in its keys' turns): a task with none is no
# queue at all, so that its backlog costs a claim nothing (not even a look at its queues).
QUEUES_ONLY = """
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
        AND task NOT IN (SELECT key FROM json_each(:quotas) WHERE value = 0)
    UNION ALL
    SELECT q.task, (SELECT min(priority) FROM jobs INDEXED BY jobs_task_claim_order
                    WHERE status = 'pending' AND task = q.task AND priority > q.priority)
    FROM queues AS q WHERE q.priority IS NOT NULL
)"""
ROOM = """
room(task, free) AS MATERIALIZED (
    SELECT tasks.task, min(
        coalesce((SELECT max(0, l.value - (SELECT count(*) FROM jobs
            WHERE task = tasks.task AND status = 'running' AND NOT waiting))
            FROM json_each(:limits) AS l WHERE l.key = tasks.task
                AND tasks.task NOT IN (SELECT key FROM json_each(:quotas) WHERE value = 0)),
            :limit),
        coalesce((SELECT q.value FROM json_each(:quotas) AS q WHERE q.key = tasks.task), :limit))
    FROM tasks WHERE tasks.task IN (SELECT key FROM json_each(:limits)
                                    UNION ALL SELECT key FROM json_each(:quotas))
)"""
QUEUES = f"{QUEUES_ONLY},{ROOM}"
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
CLAIM_SQL = (
    f"WITH RECURSIVE {QUEUES}, candidates(id) AS ({CANDIDATES}) UPDATE jobs SET {CLAIMED}"
    f" WHERE id IN (SELECT id FROM candidates) AND {REGISTERED} RETURNING {CLAIMED_COMPACT}"
)
NEXT_DUE_SQL = f"WITH RECURSIVE {QUEUES} {NEXT_DUE}"
# A claim when no task has room to count (none with a concurrency limit, or a quota other
# than the 0 of a paused or keyed task, whose queues QUEUES_ONLY leaves out, has pending
# jobs): each queue's first due jobs, in claim order, at most :limit. The same jobs
# CLAIM_SQL takes then, without its room (json_each lookups, an automatic index), window
# function and second sort: a fifth less CPU for a claim of 80 jobs.
UNLIMITED_CANDIDATES = """
    SELECT j.id FROM queues AS q JOIN jobs AS j ON j.id IN (
        SELECT k.id FROM jobs AS k INDEXED BY jobs_task_claim_order
        WHERE k.status = 'pending' AND k.task = q.task AND k.priority = q.priority
            AND k.run_at <= :now
        ORDER BY k.run_at, k.id LIMIT :limit)
    WHERE q.priority IS NOT NULL
    ORDER BY j.priority, j.run_at, j.id LIMIT :limit"""
CLAIM_UNLIMITED_SQL = (
    f"WITH RECURSIVE {QUEUES_ONLY}, candidates(id) AS ({UNLIMITED_CANDIDATES}) UPDATE jobs"
    f" SET {CLAIMED} WHERE id IN (SELECT id FROM candidates) AND {REGISTERED}"
    f" RETURNING {CLAIMED_COMPACT}"
)
# An ended job, as the ended jobs' index (jobs_finished) says it since schema version 19,
# and as a statement must say it for SQLite to read that index: the two statuses it is not
# (the CHECK on status leaves the three ended ones). An IN list of three constants SQLite
# tests through a temporary table, cleared at every write of a job's status (a tenth of the
# writer's work in a no-op drain); two it compares in place.
ENDED_SQLITE = "status NOT IN ('pending', 'running')"
_ANY_PENDING = "SELECT 1 FROM job_counts WHERE status = 'pending' AND n > 0 AND task IN"
# A recovery's record of each attempt it takes back, written before it takes them back
# (while the jobs still name their workers).
RECORD_INTERRUPTED = (
    f"INSERT INTO job_errors ({ERROR_COLUMNS}) SELECT id, attempts, 'interrupted',"
    f" {interrupted('worker')}, NULL, :now, started_at, worker FROM jobs WHERE {ABANDONED}"
)
RECOVER_SQL = f"UPDATE jobs SET {RECOVERED} WHERE {ABANDONED} RETURNING {JOB_COLUMNS}"


class SqliteSql:
    """SQLite's SQL where it differs, for one transaction (or read) and its clock."""

    insert_chunk = INSERT_CHUNK
    register_sql = REGISTER_SQL + " RETURNING worker"
    node_columns = NODE_COLUMNS + ", NULL AS schedules"  # the store keeps them in memory
    errors_sql = f"SELECT {ERROR_COLUMNS} FROM job_errors WHERE job_id = :id ORDER BY rowid"
    # The planner would rather walk the (task) index, through every job of the task.
    pending_index = " INDEXED BY jobs_task_claim_order"
    running_index = " INDEXED BY jobs_task_running"
    ended = ENDED_SQLITE
    next_priority_sql = (
        "SELECT min(priority) FROM jobs INDEXED BY jobs_task_claim_order"
        " WHERE status = 'pending' AND task = :task AND priority > levels.priority"
    )
    fold_counts_sql = ""  # one row per task and status
    trim_logs_sql = trim_logs_sql("length(CAST(message AS BLOB))")
    lock_rows = ""  # one writer
    lock_shared = ""  # one writer: nothing else writes until the commit
    payload_holds = "instr(payload, CAST(:text AS BLOB)) > 0"
    insert_stirs = False  # the insert's transaction does (taskd.store.core.keys.stirred)

    def __init__(self, now: float) -> None:
        self.now = now

    def flow_lock(self, exclusive: bool) -> Statement | None:
        return None  # one writer: a pause and a claim never overlap

    def lock_windows(self, keys: Sequence[tuple[str, str]]) -> Statement | None:
        return None  # one writer: two inserts never overlap

    def claim_start(self, keyed: Sequence[str], limited: Sequence[str]) -> Statement:
        # The one writer: nothing to lock, and the claim counts every limited task's room.
        nulls = "NULL, NULL, NULL, NULL, NULL, NULL"
        return Statement(
            "SELECT 'turn' AS kind, task, last_key, lap_from, lap_at, rested_at, rested_wake,"
            " :now AS now FROM key_turns WHERE task IN (SELECT value FROM json_each(:keyed))"
            f" UNION ALL SELECT 'paused', task, {nulls} FROM paused_tasks"
            f" UNION ALL SELECT 'counted', value, {nulls} FROM json_each(:limited)",
            {"keyed": json.dumps(list(keyed)), "limited": json.dumps(list(limited))},
        )

    def indexed_by(self, index: str) -> str:
        return f" INDEXED BY {index}"

    def insert(self, jobs: Sequence[NewJob]) -> Steps[list[Row]]:
        # The clock is bound once (?1), and the columns that are NULL for every job (a plain
        # enqueue's key, parents, batch, traceparent and limit_key) not at all: each value
        # bound costs the writer thread, and a None is offered to its adapter first.
        now = self.now
        plain = all(
            (job.key, job.parent_id, job.batch_id, job.traceparent, job.limit_key) == _NO_EXTRAS
            for job in jobs
        )
        params: list[Any] = [now]
        for job in jobs:
            run_at = job.run_at if job.run_at is not None else now + job.delay
            # The payload as a bytearray, bound as the same BLOB: sqlite3 offers bytes to its
            # adapters first (a lookup of a couple of thousand instructions), a bytearray not.
            params += (job.task, job.origin, bytearray(job.payload), job.priority, run_at,
                       job.max_attempts)  # fmt: skip
            if not plain:
                params += (job.key, job.parent_id, job.batch_id, job.traceparent, job.limit_key)
        if plain:
            return (yield from self._insert_plain(jobs, params))
        return (yield Statement(_insert_sql(len(jobs)), params))

    def _insert_plain(self, jobs: Sequence[NewJob], params: list[Any]) -> Steps[list[Row]]:
        """Jobs without a key, which no unique index can turn away: inserted without
        RETURNING (which SQLite stores and sqlite3 reads back row by row, converting each
        column with the GIL let go around it), their rows made here. One writer, and the rows
        of one INSERT take their ids in order: the last id and the count give them all."""
        (counted,) = yield _Counted(_plain_insert_sql(len(jobs)), params)
        last, count = counted[0], counted[1]
        if count != len(jobs):
            raise StoreError(f"inserted {count} jobs of {len(jobs)}")
        now = self.now
        first = last - count + 1
        # As RETURNING's `run_at - ?1`: the same subtraction of the same two doubles.
        return [
            {"id": first + n, "task": job.task, "key": None,
             "due_in": (job.run_at if job.run_at is not None else now + job.delay) - now}
            for n, job in enumerate(jobs)
        ]  # fmt: skip

    def insert_one_unless_keyed(self, job: NewJob) -> None:
        return None  # `insert` is one VALUES row already, and stirs nothing itself

    def active_keys(self, keys: Sequence[tuple[str, str | None]]) -> Statement:
        return Statement(
            "SELECT id, task, key FROM jobs WHERE key IS NOT NULL"
            " AND status IN ('pending', 'running') AND (task, key) IN (VALUES "
            + ", ".join(["(?, ?)"] * len(keys))
            + ")",
            [value for key in keys for value in key],
        )

    def claim(self, request: ClaimRequest, quotas: Mapping[str, int]) -> Steps[list[Row]]:
        # Room is counted only for the tasks with a limit or a quota (other than 0) that have
        # pending jobs: job_counts (kept in this transaction) says whether any has.
        counted = {*request.limits, *(task for task, quota in quotas.items() if quota)}
        sql = CLAIM_UNLIMITED_SQL
        if counted:
            listed, params = members("task", sorted(counted))
            if (yield Statement(f"{_ANY_PENDING} ({listed}) LIMIT 1", params)):
                sql = CLAIM_SQL
        rows = yield Statement(sql, _claim_params(request, quotas))  # CLAIMED_COMPACT
        return (yield from self._claimed_rows(rows))

    def _claimed_rows(self, rows: list[Row]) -> Steps[list[Row]]:
        """The rows of CLAIMED_COLUMNS of the jobs a claim took, from its CLAIMED_COMPACT:
        a plain job's made here (the claim set started_at to now), the others' read again."""
        now = self.now
        whole: list[Row] = []
        others = []
        for row in rows:
            (id_, task, origin, payload, attempts, max_attempts, priority, run_at, created_at,
             epoch, plain) = row[:11]  # fmt: skip
            if plain:
                whole.append((id_, task, origin, payload, None, None, attempts, max_attempts,
                              priority, None, 0, None, run_at, created_at, now, None, epoch, 0,
                              None, "cancel", None, None))  # fmt: skip
            else:
                others.append(id_)
        if others:
            whole += yield Statement(_CLAIMED_AGAIN, [json.dumps(others)])
        return whole

    def next_due(self, request: ClaimRequest, quotas: Mapping[str, int]) -> Steps[float | None]:
        (next_due,) = yield Statement(NEXT_DUE_SQL, _claim_params(request, quotas))
        due: float | None = next_due["due"]
        if due is None or due >= HELD:  # only jobs waiting for their parents
            return None
        return max(0.0, due - self.now)

    def finish(self, outcomes: Sequence[Outcome], columns: str) -> Steps[list[Row]]:
        compact = columns == FINISHED_COLUMNS
        returned = FINISHED_COMPACT if compact else columns
        rows: list[Row] = []
        for start in range(0, len(outcomes), FINISH_CHUNK):
            chunk = outcomes[start : start + FINISH_CHUNK]
            size = 1 << (len(chunk) - 1).bit_length()
            # An outcome's result is bound as a bytearray (the same BLOB, not offered to the
            # adapters first), and outcomes without an error (a drain's) bind no message,
            # whose None would be: two adapter lookups an outcome otherwise.
            said = any(o.error is not None for o in chunk)
            params: list[Any] = [self.now]
            for o in chunk:
                result = None if o.result is None else bytearray(o.result)
                if said:
                    message = o.error.message if o.error is not None else None
                    params += (o.job_id, o.epoch, o.worker, o.status, result, message, o.retry_in)
                else:
                    params += (o.job_id, o.epoch, o.worker, o.status, result, o.retry_in)
            params += (_NO_OUTCOME if said else _NO_OUTCOME_UNSAID) * (size - len(chunk))
            rows += yield Statement(_finish_sql(size, returned, said), params)
        if any(outcome.error for outcome in outcomes):
            yield from self._record_errors(outcomes, rows)
        if compact:
            return (yield from _finished_rows(outcomes, rows))
        return rows

    def _record_errors(self, outcomes: Sequence[Outcome], rows: list[Row]) -> Steps[None]:
        """The errors of the attempts a finish recorded (`rows`: theirs)."""
        ended = {row["id"]: row for row in rows}
        errors = [
            {"job_id": o.job_id, "attempt": ended[o.job_id]["attempts"], "kind": o.error.kind,
             "message": o.error.message, "traceback": o.error.traceback,
             "started_at": ended[o.job_id]["started_at"], "worker": o.worker}
            for o in outcomes
            if o.error is not None and o.job_id in ended
        ]  # fmt: skip
        if errors:
            yield Statement(_INSERT_ERROR, errors, many=True)

    def recover(self, quarantine_after: int) -> Steps[list[Row]]:
        # The one writer: the jobs both statements find abandoned are the same.
        yield Statement(RECORD_INTERRUPTED)
        return (yield Statement(RECOVER_SQL, {"quarantine": quarantine_after}))

    def cancel(self, job_id: int) -> Steps[list[Row]]:
        # A running attempt ends here: it is recorded like any other attempt's end.
        yield Statement(
            f"INSERT INTO job_errors ({ERROR_COLUMNS}) SELECT id, attempts, 'cancelled',"
            " 'cancelled by request', NULL, :now, started_at, worker FROM jobs"
            " WHERE id = :id AND status = 'running'",
            {"id": job_id},
        )
        return (
            yield Statement(
                f"UPDATE jobs SET {CANCELLED} WHERE id = :id"
                f" AND status IN ('pending', 'running') RETURNING {JOB_COLUMNS}",
                {"id": job_id},
            )
        )

    def prune(self, status: JobStatus, age: float) -> Steps[int]:
        rows = yield Statement(
            f"SELECT id FROM jobs WHERE {ENDED_SQLITE} AND status = :status"
            " AND finished_at < :now - :age LIMIT :slice",
            {"status": status, "age": age, "slice": PRUNE_SLICE},
        )
        ids = [row["id"] for row in rows]
        if ids:
            marks = ", ".join("?" * len(ids))
            yield Statement(f"DELETE FROM job_errors WHERE job_id IN ({marks})", ids)
            yield Statement(f"DELETE FROM job_logs WHERE job_id IN ({marks})", ids)
            yield Statement(
                f"DELETE FROM job_deps WHERE parent_id IN ({marks}) OR child_id IN ({marks})",
                ids + ids,
            )
            yield Statement(f"DELETE FROM jobs WHERE id IN ({marks})", ids)
        return len(ids)

    def renew(self, worker: str, job_ids: Sequence[int], lease: float) -> Steps[set[int]]:
        alive = yield Statement(
            "UPDATE nodes SET seen_at = :now, expires = :now + :lease WHERE worker = :worker"
            " AND expires IS NOT NULL RETURNING id",
            {"worker": worker, "lease": lease},
        )
        if not (alive and job_ids):
            return set()
        ids, params = members("id", job_ids)
        rows = yield Statement(
            "UPDATE jobs SET lease_expires = :now + :lease WHERE status = 'running'"
            f" AND worker = :worker AND id IN ({ids}) RETURNING id",
            {**params, "worker": worker, "lease": lease},
        )
        return {row["id"] for row in rows}


def _finished_rows(outcomes: Sequence[Outcome], rows: list[Row]) -> Steps[list[Row]]:
    """The rows of FINISHED_COLUMNS, due_in and linked of the jobs a finish recorded, from
    its FINISHED_COMPACT: the result each outcome gave (the finish set it), and the progress
    of the jobs that reported some, read again."""
    results = {o.job_id: o.result for o in outcomes}
    progressed = [row[0] for row in rows if row[8] is not None]
    progress = {}
    if progressed:
        for row in (yield Statement(_PROGRESS_AGAIN, [json.dumps(progressed)])):
            progress[row[0]] = row[1:]
    whole: list[Row] = []
    for row in rows:
        (id_, status, error, attempts, run_at, started_at, finished_at, worker, done, due_in,
         linked) = row[:11]  # fmt: skip
        done, total, message, at = progress.get(id_, _NO_PROGRESS)
        whole.append((id_, status, results[id_], error, attempts, run_at, started_at, finished_at,
                      worker, done, total, message, at, due_in, linked))  # fmt: skip
    return whole


def _claim_params(request: ClaimRequest, quotas: Mapping[str, int]) -> dict[str, Any]:
    return {
        "limit": request.limit,
        "limits": json.dumps(dict(request.limits)),
        "quotas": json.dumps(dict(quotas)),
        "worker": request.worker,
        "lease": request.lease,
    }


@lru_cache(maxsize=64)
def _finish_sql(count: int, columns: str, said: bool = True) -> str:
    """The statement that records `count` outcomes, bound by position (quicker than by name,
    for a statement on the hot path): ?1 is now, then seven values per outcome (six unless
    `said`: the error's message is NULL); it returns `columns` and due_in. The outcomes'
    parameters are anonymous (`?`, numbered after the ?1 ahead of them): SQLite looks up the
    name of each numbered one (`?9`) in a list of them all as it codes the statement, which
    made preparing it quadratic (3,697 parameters for 528 outcomes: 17-25 ms)."""
    row = "(?, ?, ?, ?, ?, ?, ?)" if said else "(?, ?, ?, ?, ?, NULL, ?)"
    values = ", ".join([row] * count)
    return (
        f"UPDATE jobs SET {FINISHED.replace(':now', '?1')} FROM (SELECT column1 AS id,"
        " column2 AS epoch, column3 AS worker, column4 AS outcome, column5 AS result,"
        f" column6 AS message, column7 AS retry_in FROM (VALUES {values})) AS v"
        f" WHERE {FINISHING} RETURNING {columns}, run_at - ?1 AS due_in,"
        " EXISTS (SELECT 1 FROM job_deps WHERE parent_id = id) AS linked"
    )


_NO_EXTRAS = (None, None, None, None, None)  # key, parent_id, batch_id, traceparent, limit_key
_PLAIN_COLUMNS = "created_at, task, origin, payload, priority, run_at, max_attempts, status"
_ALL_COLUMNS = f"{_PLAIN_COLUMNS}, key, parent_id, batch_id, traceparent, limit_key"


@lru_cache(maxsize=64)
def _insert_sql(count: int) -> str:
    """The statement that inserts `count` jobs: ?1 is now (created_at, and what due_in is
    counted from), then each job's values by position."""
    return (
        f"INSERT INTO jobs ({_ALL_COLUMNS}) VALUES "
        + ", ".join(["(?1, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?)"] * count)
        + " ON CONFLICT DO NOTHING RETURNING id, task, key, run_at - ?1 AS due_in"
    )


@lru_cache(maxsize=64)
def _plain_insert_sql(count: int) -> str:
    """The statement that inserts `count` plain jobs (no key, parents, batch, traceparent or
    limit_key: NULL, not bound): ?1 is now, then each job's values by position."""
    return f"INSERT INTO jobs ({_PLAIN_COLUMNS}) VALUES " + ", ".join(
        ["(?1, ?, ?, ?, ?, ?, ?, 'pending')"] * count
    )


class _Counted(Statement):
    """An INSERT whose one row is (the last id it inserted, how many rows it inserted), read
    from its cursor (a trigger's own inserts count in neither)."""


_INSERT_ERROR = (
    f"INSERT INTO job_errors ({ERROR_COLUMNS}) VALUES (:job_id, :attempt, :kind, :message,"
    " :traceback, :now, :started_at, :worker)"
)


def execute(db: sqlite3.Connection, now: float, statement: Statement) -> list[Row]:
    """Run a statement on SQLite: tables without a schema, `:now` the transaction's clock."""
    sql, reads_now = _render(statement.sql)
    params = statement.params
    if type(statement) is _Counted:
        cursor = db.execute(sql, params)
        return [(cursor.lastrowid, cursor.rowcount)]
    if statement.many:
        db.executemany(sql, [{**p, "now": now} for p in params] if reads_now else params)
        return []
    return db.execute(sql, {**(params or {}), "now": now} if reads_now else params).fetchall()


@lru_cache(maxsize=512)
def _render(sql: str) -> tuple[str, bool]:
    """A statement as SQLite reads it (tables without a schema), and whether it reads `:now`."""
    sql = sql.replace("{s}.", "")
    return sql, ":now" in sql
