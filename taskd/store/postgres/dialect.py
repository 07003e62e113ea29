"""PostgreSQL's own SQL, where it differs from SQLite's, and how a statement runs on it.

A claim walks the pending jobs' index as queues, as SQLite's does (so that the backlog of a
task held back costs it nothing), takes its jobs with FOR UPDATE SKIP LOCKED, so that
daemons never take the same job, and counts the limited tasks' running jobs under a
transaction-scoped advisory lock per task, so that two daemons cannot both fill the same
room. Batches are arrays; an
outcome, a recovery, a cancel and a prune are each one statement (data-modifying CTEs).
An insert notifies the other daemons itself (at its commit), so that it needs no
transaction around it, and `taskd.outbox` can run it in an application's.

No asyncpg here: the statements run on any connection with asyncpg's methods, and on
psycopg's (`taskd.outbox`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from operator import attrgetter, itemgetter
from types import SimpleNamespace
from typing import Any, Literal

from taskd.models import JobStatus
from taskd.store.base import ClaimRequest, NewJob, Outcome
from taskd.store.core.activity import trim_logs_sql
from taskd.store.core.deps import HELD
from taskd.store.core.jobs import (
    ABANDONED,
    CANCELLED,
    CLAIMED,
    ENDED,
    FINISHED,
    FINISHING,
    PRUNE_SLICE,
    RECOVERED,
    REGISTERED,
    interrupted,
)
from taskd.store.core.nodes import REGISTER_SQL
from taskd.store.core.statements import Statement, Steps, compose
from taskd.store.postgres.schema import channel
from taskd.store.rows import (
    CLAIMED_COLUMNS,
    ERROR_COLUMNS,
    FINISHED_COLUMNS,
    JOB_COLUMNS,
    NODE_COLUMNS,
    Row,
    job_columns,
)

# The columns of an insert, and their types. Each is sent as an array of one value a job, or,
# when every job of the batch has the same value (most do: the task, the origin, no key...),
# as that value once: unnest() pads the arrays not sent with NULLs, which coalesce() fills
# with the value sent once (`:name_all`); `pad` makes the rows however few arrays are sent.
# A driver checks each element of an array it sends: an array not sent costs nothing.
INSERT_COLUMNS = {
    "task": "text", "origin": "text", "payload": "bytea", "priority": "integer",
    "run_at": "double precision", "delay": "double precision", "max_attempts": "integer",
    "key": "text", "parent_id": "bigint", "batch_id": "bigint", "traceparent": "text",
    "limit_key": "text",
}  # fmt: skip
_INSERT_ROWS = (
    "SELECT "
    + ", ".join(f"coalesce(v.{name}, :{name}_all::{kind}) AS {name}"
                for name, kind in INSERT_COLUMNS.items())
    + ", n FROM unnest("
    + ", ".join(f":{name}::{kind}[]" for name, kind in INSERT_COLUMNS.items())
    + ", array_fill(0, ARRAY[:count::integer])) WITH ORDINALITY AS v("
    + ", ".join(INSERT_COLUMNS)
    + ", pad, n)"
)  # fmt: skip

# A job's values of INSERT_COLUMNS, in order; the parameters of the values sent once, and
# the arrays not sent when every value is.
_insert_values = attrgetter(*INSERT_COLUMNS)
_SENT_ONCE = tuple(f"{name}_all" for name in INSERT_COLUMNS)
_NOT_SENT = dict.fromkeys(INSERT_COLUMNS)

# The jobs' rows, of the values `given` has (one row a job, a column of INSERT_COLUMNS each).
_INSERT_GIVEN = """INSERT INTO {s}.jobs (task, status, origin, payload, priority, run_at,
        max_attempts, key, parent_id, batch_id, created_at, traceparent, limit_key)
    SELECT task, 'pending', origin, payload, priority, coalesce(run_at, (SELECT :now) + delay),
           max_attempts, key, parent_id, batch_id, (SELECT :now), traceparent, limit_key"""

# One job's values of INSERT_COLUMNS, as parameters (taskd.outbox's one-job statement).
_ONE_GIVEN = ", ".join(f":{name}::{kind} AS {name}" for name, kind in INSERT_COLUMNS.items())

# One row per job, in order. The statement tells the other daemons itself. Its clock is read
# once ((SELECT :now), an InitPlan), not for each row: {s}.now() converts the statement's
# time from numeric to double precision by way of text (some 1 µs a row, twice a row).
INSERT_SQL = f"""
WITH given AS MATERIALIZED ({_INSERT_ROWS}),
new AS (
    {_INSERT_GIVEN}
    FROM given
    ORDER BY n
    ON CONFLICT DO NOTHING
    RETURNING id, task, key, run_at - created_at AS due_in
), stirred AS (
    -- A keyed task's turn walks again (taskd.store.core.keys.stirred), written (locked) by
    -- the statement that commits the jobs: a claim after it waits, and sees them. Keyed:
    -- a job with a limit_key, or a task that has a turn (an insert from taskd.outbox).
    INSERT INTO {{s}}.key_turns (task)
    SELECT DISTINCT task FROM given
    WHERE limit_key IS NOT NULL OR task IN (SELECT task FROM {{s}}.key_turns)
    ON CONFLICT (task) DO UPDATE SET lap_from = NULL, lap_at = NULL, rested_at = NULL,
        rested_wake = NULL
), notice AS (
    SELECT {{s}}.notify(:channel, :node::text, json_build_object('sender', :sender::text,
                                                               'due', min(due_in))::text)
    FROM new HAVING count(*) > 0
)
SELECT id, task, key, due_in, (SELECT count(*) FROM notice) AS told FROM new
"""


def _rewritten(sql: str, *changes: tuple[str, str]) -> str:
    """`sql` with each (old, new) made, each old found exactly once (so a change to the
    statement it derives from cannot leave it silently unchanged)."""
    for old, new in changes:
        if sql.count(old) != 1:
            raise AssertionError(f"not once in the statement: {old!r}")
        sql = sql.replace(old, new)
    return sql


# The insert of a job alone (taskd.store.core.jobs.insert_jobs: an enqueue, taskd.outbox's),
# in one statement when its task is not keyed (the common case): a job of a task that has a
# `limit_key` path, or a turn among its keys (a walk to stir), is not inserted, and the rows
# of the result give its task's path instead (id NULL; path NULL for the turn), for the
# store's insert (INSERT_SQL) to be made instead, with the job's value of it. Both are read
# in the statement's own snapshot, as INSERT_SQL reads the turns it stirs. It is INSERT_SQL
# cut to what one unkeyed job needs: its values as parameters (no arrays), no write to the
# turns, its notice in the row that returns it (each CTE, each aggregate costs the server
# at every execution, a data-modifying CTE even when it writes nothing): some 50 µs less
# of the server's CPU a job, of about 300.
ONE_UNLESS_KEYED_SQL = f"""
WITH paths AS (
    SELECT task, path FROM {{s}}.limit_key_paths WHERE task = :task::text
    UNION ALL SELECT task, NULL FROM {{s}}.key_turns WHERE task = :task::text
), new AS (
    {_INSERT_GIVEN}
    FROM (SELECT {_ONE_GIVEN}) AS given
    WHERE NOT EXISTS (SELECT FROM paths)
    ON CONFLICT DO NOTHING
    RETURNING id, task, key, run_at - created_at AS due_in
)
SELECT id, task, key, due_in, NULL AS path,
    {{s}}.notify(:channel, :node::text,
                 json_build_object('sender', :sender::text, 'due', due_in)::text) AS told
FROM new
UNION ALL SELECT NULL, task, NULL, NULL, path, NULL FROM paths
"""

# INSERT_SQL for jobs without a key, which no unique index can refuse: a plain insert, where
# ON CONFLICT makes each row a speculative insertion (a probe of every unique index first,
# the primary key's too, a lock, and a second WAL record to confirm the row).
KEYLESS = ("    ON CONFLICT DO NOTHING\n", "")
KEYLESS_INSERT_SQL = _rewritten(INSERT_SQL, KEYLESS)
KEYLESS_ONE_UNLESS_KEYED_SQL = _rewritten(ONE_UNLESS_KEYED_SQL, KEYLESS)

# The statements a store prepares once on each connection (`connections.Prepared`): those of
# a lone enqueue, run at every one.
PREPARED = frozenset({ONE_UNLESS_KEYED_SQL, KEYLESS_ONE_UNLESS_KEYED_SQL})

# The job counters' rows folded into one per task and status (the schema's ledger), by one
# fold at a time: another one, under way, holds the lock, and this one folds nothing. A fold
# waits for no other, then: it can run in a transaction that goes on to lock jobs. A fold
# that takes the lock once another committed skips the rows it deleted; a row not yet
# committed stays for a later fold.
FOLD_COUNTS_SQL = """
WITH entries AS (
    DELETE FROM {s}.job_counts
    WHERE (SELECT pg_try_advisory_xact_lock(hashtextextended('{s}.job_counts', 0)))
    RETURNING task, status, n
)
INSERT INTO {s}.job_counts (task, status, n)
SELECT task, status, sum(n) FROM entries GROUP BY task, status HAVING sum(n) <> 0
"""

ACTIVE_KEYS_SQL = """
SELECT id, task, key FROM {s}.jobs
WHERE key IS NOT NULL AND status IN ('pending', 'running')
  AND (task, key) IN (SELECT * FROM unnest(:tasks::text[], :keys::text[]))
"""

# The (task, key) pairs an insert reads the window or the debounced job of, locked in one
# order (a chr(31) in no task name: no task's own lock above has the same text).
LOCK_WINDOWS_SQL = """
SELECT pg_advisory_xact_lock(k) FROM (
    SELECT DISTINCT hashtextextended(:prefix || w.task || chr(31) || w.key, 0) AS k
    FROM unnest(:tasks::text[], :keys::text[]) AS w(task, key)
    ORDER BY k) AS keys
"""

# Counts against concurrency limits: running, and not waiting for another job. A task in
# :tasks has a concurrency limit (:caps, NULL: none) or a quota of jobs this claim may start
# (:quotas, NULL: none; flow control: 0 for a paused task, what its rate limit allows now,
# a keyed task's jobs taken in its keys' turns). A task with a quota of none has its running
# jobs left uncounted: it has no room whatever they are.
ROOM = """
room AS MATERIALIZED (
    SELECT t.task, greatest(0, least(
        coalesce(CASE WHEN t.quota IS DISTINCT FROM 0 THEN t.cap - (SELECT count(*) FROM {s}.jobs r
            WHERE r.task = t.task AND r.status = 'running' AND NOT r.waiting) END, :limit),
        coalesce(t.quota, :limit))) AS free
    FROM unnest(:tasks::text[], :caps::integer[], :quotas::integer[]) AS t(task, cap, quota)
)"""
# The pending jobs, seen as queues: one per (task, priority) that has pending jobs, found by
# skipping along the pending jobs' (task, priority, run_at, id) index, one probe a queue
# (as SQLite's claim does). A claim, and its next due time, read per queue of a task with
# room only its first jobs, so that delayed jobs and the backlog of a task held back (at
# its concurrency, its rate limit, paused) cost nothing however many they are. Each probe
# is a range of that index bounded by a row comparison alone, read in its order: with an
# equality on the task the planner may take another index (jobs_task_status) and read the
# whole backlog of a task it believes small, as it does before its first ANALYZE. Each
# probe reads its row's (task, priority) from that index itself (LATERAL), joined to no
# other scan of the jobs: a generic plan (schema.py, claim_start) made while the table was
# small hashed a join by id over a scan of the whole table, at each claim.
QUEUES = (
    """
queues(task, priority) AS (
    (SELECT task, priority FROM {s}.jobs WHERE status = 'pending'
     ORDER BY task, priority, run_at, id LIMIT 1)
    UNION ALL
    SELECT later.task, later.priority FROM queues AS q, LATERAL (
        SELECT task, priority FROM {s}.jobs
        WHERE status = 'pending' AND (task, priority) > (q.task, q.priority)
        ORDER BY task, priority, run_at, id LIMIT 1) AS later
),"""
    + ROOM
)
# The pending jobs from the start of queue `q` on, in that index's order (a row comparison
# again). The rows read past the queue's due jobs, at most the LIMIT, are left out after it
# (a claim locks them until it commits: other daemons' claims skip them meanwhile).
FROM_QUEUE = (
    "SELECT id, task, priority, run_at FROM {s}.jobs WHERE status = 'pending'"
    " AND (task, priority) >= (q.task, q.priority) ORDER BY task, priority, run_at, id"
)

# Of each queue of a task with room, its first due jobs, locked (SKIP LOCKED: another
# daemon's claim takes those it locked); of those, no more per task than its room, in claim
# order, at most :limit.
CLAIM_SQL = compose(
    """
WITH RECURSIVE {queues}, picked AS (
    SELECT p.*, r.free FROM queues AS q LEFT JOIN room AS r ON r.task = q.task, LATERAL (
        {from_queue} LIMIT least(:limit, coalesce(r.free, :limit)) FOR UPDATE SKIP LOCKED
    ) AS p
    WHERE coalesce(r.free, 1) > 0
        AND p.task = q.task AND p.priority = q.priority AND p.run_at <= :now
), chosen AS (
    SELECT id FROM (
        SELECT id, priority, run_at, free,
            row_number() OVER (PARTITION BY task ORDER BY priority, run_at, id) AS nth
        FROM picked) AS ranked
    WHERE nth <= coalesce(free, :limit)
    ORDER BY priority, run_at, id LIMIT :limit
)
UPDATE {s}.jobs AS j SET {claimed}
FROM chosen
WHERE j.id = chosen.id AND {registered}
RETURNING {columns}
""",
    queues=QUEUES,
    from_queue=FROM_QUEUE,
    claimed=CLAIMED,
    registered=REGISTERED,
    columns=job_columns("j", CLAIMED_COLUMNS),
)

# When the next pending job of a task with room is due (room counted after the claim): a
# queue's first job.
NEXT_DUE_SQL = compose(
    """
WITH RECURSIVE {queues}
SELECT min((SELECT run_at FROM ({from_queue} LIMIT 1) AS first)) - :now AS due_in
FROM queues AS q LEFT JOIN room AS r ON r.task = q.task
WHERE coalesce(r.free, 1) > 0
""",
    queues=QUEUES,
    from_queue=FROM_QUEUE,
)


def _finish_sql(columns: str) -> str:
    """The statement that records outcomes and their errors; it returns `columns`, due_in
    and linked (not the errors it was given)."""
    return compose(
        """
WITH v AS (
    SELECT * FROM unnest(:job_id::bigint[], :epoch::integer[], :worker::text[],
                         :status::text[], :result::bytea[], :kind::text[],
                         :message::text[], :traceback::text[], :retry_in::double precision[])
        AS v(id, epoch, worker, outcome, result, kind, message, traceback, retry_in)
), done AS (
    UPDATE {s}.jobs SET {finished}
    FROM v WHERE {finishing}
    RETURNING {returned}, v.kind, v.message, v.traceback, v.worker AS ran_on,
        jobs.run_at - :now AS due_in,
        jobs.status IN ('succeeded', 'failed') AND {s}.has_children(jobs.id) AS linked
), errors AS (
    INSERT INTO {s}.job_errors ({error_columns})
    SELECT id, attempts, kind, message, traceback, :now, started_at, ran_on FROM done
    WHERE kind IS NOT NULL
)
SELECT {columns}, due_in, linked FROM done
""",
        finished=FINISHED,
        finishing=FINISHING,
        returned=job_columns("jobs", columns),
        columns=columns,
        error_columns=ERROR_COLUMNS,
    )


FINISH_SQL = {columns: _finish_sql(columns) for columns in (JOB_COLUMNS, FINISHED_COLUMNS)}


RECOVER_SQL = compose(
    """
WITH gone AS (
    SELECT id, worker FROM {s}.jobs WHERE {abandoned} FOR UPDATE SKIP LOCKED
), back AS (
    UPDATE {s}.jobs AS j SET {recovered}
    FROM gone WHERE j.id = gone.id
    RETURNING {columns}, gone.worker AS lost_worker
), errors AS (
    INSERT INTO {s}.job_errors ({error_columns})
    SELECT id, attempts, 'interrupted', {message}, NULL, :now, started_at, lost_worker
    FROM back
)
SELECT * FROM back
""",
    abandoned=ABANDONED,
    recovered=RECOVERED,
    message=interrupted("lost_worker"),
    columns=job_columns("j"),
    error_columns=ERROR_COLUMNS,
)

# A running attempt ends here: it is recorded like any other attempt's end.
CANCEL_SQL = compose(
    """
WITH target AS (
    SELECT id, status AS was, attempts, started_at, worker FROM {s}.jobs
    WHERE id = :id AND status IN ('pending', 'running') FOR UPDATE
), attempt AS (
    INSERT INTO {s}.job_errors ({error_columns})
    SELECT id, attempts, 'cancelled', 'cancelled by request', NULL, :now, started_at, worker
    FROM target WHERE was = 'running'
)
UPDATE {s}.jobs AS j SET {cancelled} FROM target WHERE j.id = target.id
RETURNING {columns}
""",
    cancelled=CANCELLED,
    columns=job_columns("j"),
    error_columns=ERROR_COLUMNS,
)

PRUNE_SQL = """
WITH doomed AS (
    SELECT id FROM {s}.jobs WHERE status = :status AND finished_at < :now - :age
    LIMIT :slice FOR UPDATE SKIP LOCKED
), errors AS (
    DELETE FROM {s}.job_errors WHERE job_id IN (SELECT id FROM doomed)
), logs AS (
    DELETE FROM {s}.job_logs WHERE job_id IN (SELECT id FROM doomed)
), links AS (
    DELETE FROM {s}.job_deps WHERE parent_id IN (SELECT id FROM doomed)
        OR child_id IN (SELECT id FROM doomed)
), deleted AS (
    DELETE FROM {s}.jobs WHERE id IN (SELECT id FROM doomed) RETURNING id
)
SELECT count(*) AS n FROM deleted
"""

RENEW_SQL = """
WITH alive AS (
    UPDATE {s}.nodes SET seen_at = :now, expires = :now + :lease
    WHERE worker = :worker AND expires IS NOT NULL RETURNING id
)
UPDATE {s}.jobs SET lease_expires = :now + :lease
WHERE status = 'running' AND worker = :worker AND id = ANY(:ids::bigint[])
  AND EXISTS (SELECT 1 FROM alive)
RETURNING id
"""


class PostgresSql:
    """PostgreSQL's SQL where it differs, for the store of one schema; its inserts tell the
    other daemons that `sender` wrote them."""

    insert_chunk = 1 << 62  # a statement takes any number of jobs
    register_sql = REGISTER_SQL + ", schedules = NULL RETURNING worker"  # to be announced
    node_columns = NODE_COLUMNS + ", schedules"
    errors_sql = compose(
        "SELECT {columns} FROM {s}.job_errors WHERE job_id = :id ORDER BY id", columns=ERROR_COLUMNS
    )
    pending_index = ""
    running_index = ""  # the planner picks jobs_task_limit_key_running for `status = 'running'`
    ended = ENDED
    # A row comparison, and an order, that only the index by (task, priority, run_at) serves.
    next_priority_sql = (
        "SELECT priority FROM (SELECT task, priority FROM {s}.jobs WHERE status = 'pending'"
        " AND (task, priority) > (:task, levels.priority) ORDER BY task, priority LIMIT 1)"
        " AS higher WHERE higher.task = :task"
    )
    fold_counts_sql = FOLD_COUNTS_SQL
    trim_logs_sql = trim_logs_sql("octet_length(message)")
    lock_rows = " FOR UPDATE"
    # A parent's end (an UPDATE of its row) waits for the insert linking a child to it.
    lock_shared = " FOR SHARE"
    payload_holds = "position(convert_to(:text, 'UTF8') in payload) > 0"
    insert_stirs = True  # INSERT_SQL stirs the keyed tasks' turns itself

    def __init__(self, schema: str, sender: str) -> None:
        self.schema = schema
        self.channel = channel(schema)
        self.sender = sender
        # The node whose writes these are, once registered (`register_node`): its notices go
        # to the other nodes only. None (an application's insert, a daemon before it
        # registers): to every node alive.
        self.node: str | None = None

    def flow_lock(self, exclusive: bool) -> Statement | None:
        # A claim reads what holds jobs back before its claim statement: a pause waits for
        # the claims in flight, and the claims after it see it.
        kind = "" if exclusive else "_shared"
        return Statement(
            f"SELECT pg_advisory_xact_lock{kind}(hashtextextended(:key, 0))",
            {"key": f"taskd:{self.schema}:flow"},
        )

    def lock_windows(self, keys: Sequence[tuple[str, str]]) -> Statement | None:
        return Statement(
            LOCK_WINDOWS_SQL,
            {"tasks": [task for task, _ in keys], "keys": [key for _, key in keys],
             "prefix": f"taskd:{self.schema}:window:"},
        )  # fmt: skip

    def claim_start(self, keyed: Sequence[str], limited: Sequence[str]) -> Statement:
        # The keyed tasks' turns, the shared flow lock, the read after it and the limited
        # tasks' locks, in one round trip (schema.py). A task's lock has the text of no
        # window's (LOCK_WINDOWS_SQL).
        return Statement(
            "SELECT t_kind AS kind, t_task AS task, t_last_key AS last_key,"
            " t_lap_from AS lap_from, t_lap_at AS lap_at, t_rested_at AS rested_at,"
            " t_rested_wake AS rested_wake, t_now AS now"
            " FROM {s}.claim_start(:key, :prefix, :keyed::text[], :limited::text[])",
            {"key": f"taskd:{self.schema}:flow", "prefix": f"taskd:{self.schema}:",
             "keyed": list(keyed), "limited": list(limited)},
        )  # fmt: skip

    def indexed_by(self, index: str) -> str:
        return ""  # the planner takes it

    def insert(self, jobs: Sequence[NewJob]) -> Steps[list[Row]]:
        return (yield self._insert(jobs, INSERT_SQL, KEYLESS_INSERT_SQL))

    def insert_one_unless_keyed(self, job: NewJob) -> Statement:
        """`insert` of one job, unless its task has a `limit_key` path or a turn: then a
        row (task, path) for each instead (ONE_UNLESS_KEYED_SQL)."""
        sql = ONE_UNLESS_KEYED_SQL if job.key is not None else KEYLESS_ONE_UNLESS_KEYED_SQL
        params = dict(zip(INSERT_COLUMNS, _insert_values(job), strict=True))
        return Statement(
            sql, {**params, "channel": self.channel, "sender": self.sender, "node": self.node}
        )

    def _insert(self, jobs: Sequence[NewJob], sql: str, keyless_sql: str) -> Statement:
        params: dict[str, Any] = {"count": len(jobs), "channel": self.channel,
                                  "sender": self.sender, "node": self.node}  # fmt: skip
        if all(job.key is None for job in jobs):
            sql = keyless_sql
        if len(jobs) == 1:  # each value sent once (the common case: built in few steps)
            params.update(_NOT_SENT)
            params.update(zip(_SENT_ONCE, _insert_values(jobs[0]), strict=True))
            return Statement(sql, params)
        columns = zip(*map(_insert_values, jobs), strict=True)
        for name, once, values in zip(INSERT_COLUMNS, _SENT_ONCE, columns, strict=True):
            if values.count(values[0]) == len(values):  # one value for all: sent once
                params[name], params[once] = None, values[0]
            else:
                params[name], params[once] = list(values), None
        return Statement(sql, params)

    def active_keys(self, keys: Sequence[tuple[str, str | None]]) -> Statement:
        return Statement(
            ACTIVE_KEYS_SQL, {"tasks": [key[0] for key in keys], "keys": [key[1] for key in keys]}
        )

    def claim(self, request: ClaimRequest, quotas: Mapping[str, int]) -> Steps[list[Row]]:
        params = _claim_params(request, quotas)
        # The tasks whose room this claim counts are locked already (`claim_start`); the others
        # have a quota of none, or are their own lock (taskd.store.core.flow).
        return (
            yield Statement(
                CLAIM_SQL,
                {"worker": request.worker, "limit": request.limit, "lease": request.lease,
                 **params},
            )
        )  # fmt: skip

    def next_due(self, request: ClaimRequest, quotas: Mapping[str, int]) -> Steps[float | None]:
        params = {"limit": request.limit, **_claim_params(request, quotas)}
        (next_due,) = yield Statement(NEXT_DUE_SQL, params)
        due_in: float | None = next_due["due_in"]
        if due_in is None or due_in >= HELD / 2:  # only jobs waiting for their parents
            return None
        return max(0.0, due_in)

    def finish(self, outcomes: Sequence[Outcome], columns: str) -> Steps[list[Row]]:
        errors = [outcome.error or NO_FAILURE for outcome in outcomes]
        params = _arrays(outcomes, OUTCOME_FIELDS) | _arrays(errors, FAILURE_FIELDS)
        return (yield Statement(FINISH_SQL[columns], params))

    def recover(self, quarantine_after: int) -> Steps[list[Row]]:
        return (yield Statement(RECOVER_SQL, {"quarantine": quarantine_after}))

    def cancel(self, job_id: int) -> Steps[list[Row]]:
        return (yield Statement(CANCEL_SQL, {"id": job_id}))

    def prune(self, status: JobStatus, age: float) -> Steps[int]:
        params = {"status": status, "age": age, "slice": PRUNE_SLICE}
        (deleted,) = yield Statement(PRUNE_SQL, params)
        return int(deleted["n"])

    def renew(self, worker: str, job_ids: Sequence[int], lease: float) -> Steps[set[int]]:
        params = {"worker": worker, "ids": list(job_ids), "lease": lease}
        return {row["id"] for row in (yield Statement(RENEW_SQL, params))}


OUTCOME_FIELDS = ("job_id", "epoch", "worker", "status", "result", "retry_in")
FAILURE_FIELDS = ("kind", "message", "traceback")
NO_FAILURE = SimpleNamespace(**dict.fromkeys(FAILURE_FIELDS))


def _claim_params(request: ClaimRequest, quotas: Mapping[str, int]) -> dict[str, list[Any]]:
    """The tasks a claim counts (with a concurrency limit or a quota), as arrays."""
    tasks = list({**request.limits, **quotas})
    return {
        "tasks": tasks,
        "caps": [request.limits.get(task) for task in tasks],
        "quotas": [quotas.get(task) for task in tasks],
    }


def _arrays(items: Sequence[Any], fields: Sequence[str]) -> dict[str, list[Any]]:
    """Each field of the items as an array (unnest() makes rows of them again)."""
    return {field: [getattr(item, field) for item in items] for field in fields}


# A parameter, `:name` (not a cast's `::type`).
_PARAMETER = re.compile(r"(?<![:\w]):(\w+)")


@lru_cache(maxsize=1024)
def render(
    sql: str, schema: str, style: Literal["asyncpg", "psycopg"] = "asyncpg"
) -> tuple[str, tuple[str, ...]]:
    """A statement in PostgreSQL's terms: `{s}` is the schema, `:now` its clock, and each
    `:name` a parameter (`$1`..., or psycopg's `%(name)s`); and the names in order."""
    names: list[str] = []

    def parameter(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "now":
            return f"{schema}.now()"
        if style == "psycopg":
            return f"%({name})s"
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _PARAMETER.sub(parameter, sql.replace("{s}", schema)), tuple(names)


@lru_cache(maxsize=1024)
def rendered(sql: str, schema: str) -> tuple[str, Callable[[Mapping[str, Any]], Any]]:
    """`render` for asyncpg, and what takes the arguments, in order, from the parameters."""
    sql, names = render(sql, schema)
    if len(names) == 1:
        (name,) = names
        return sql, lambda params: (params[name],)
    return sql, itemgetter(*names) if names else lambda params: ()


async def execute(db: Any, schema: str, statement: Statement) -> list[Row]:
    """Run a statement on an asyncpg connection (or one with its methods)."""
    sql, arguments = rendered(statement.sql, schema)
    if statement.many:
        await db.executemany(sql, [arguments(params) for params in statement.params])
        return []
    return list(await db.fetch(sql, *arguments(statement.params)))
