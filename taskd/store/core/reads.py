"""The reads, each run whole on a connection of its own (SQLite: the reader's, in one hop;
PostgreSQL: a pooled one), their statements in one snapshot: SQLite's reader wraps each read
in a transaction; PostgreSQL, whose transaction costs two round trips, only the reads in
SEVERAL_STATEMENTS."""

from __future__ import annotations

from collections.abc import Sequence

from taskd.models import ACTIVE_STATUSES, Job, NodeInfo, TaskCounts
from taskd.store.base import JobFilter, ScheduleState
from taskd.store.core.deps import HELD
from taskd.store.core.dialect import Dialect
from taskd.store.core.statements import Statement, Steps, compose, members
from taskd.store.rows import (
    JOB_COLUMNS,
    SCHEDULE_COLUMNS,
    error_from_row,
    job_from_row,
    node_from_row,
    schedule_from_row,
)

# The counters: PostgreSQL's are a ledger, rows to sum (see its schema).
COUNTS_SQL = (
    "SELECT task, status, sum(n) AS n FROM {s}.job_counts GROUP BY task, status HAVING sum(n) <> 0"
)
# A task's earliest pending job (`first_at`; due if not after `now`) and the earliest one
# due later that waits for no parent (`next_due`), from the pending jobs' index (task,
# priority, run_at): the minimum of each priority's, visiting the priorities one by one
# (`next_priority`: the dialect's). The row comparison, and the order only that index
# gives, keep PostgreSQL's planner off the index by (priority, run_at) of every task.
PENDING_EDGES_SQL = f"""
WITH RECURSIVE levels(priority) AS (
    SELECT min(priority) FROM {{s}}.jobs{{indexed}} WHERE status = 'pending' AND task = :task
    UNION ALL
    SELECT ({{next_priority}}) FROM levels WHERE levels.priority IS NOT NULL
)
SELECT :now AS now,
    min((SELECT min(run_at) FROM {{s}}.jobs{{indexed}}
         WHERE status = 'pending' AND task = :task AND priority = levels.priority)) AS first_at,
    min((SELECT run_at FROM (
            SELECT task, priority, run_at FROM {{s}}.jobs{{indexed}} WHERE status = 'pending'
                AND (task, priority, run_at) > (:task, levels.priority, :now)
            ORDER BY task, priority, run_at LIMIT 1
         ) AS later WHERE later.task = :task AND later.priority = levels.priority
             AND later.run_at < {HELD!r})) AS next_due
FROM levels WHERE levels.priority IS NOT NULL
"""


def get(sql: Dialect, job_id: int) -> Steps[Job | None]:
    rows = yield Statement(f"SELECT {JOB_COLUMNS} FROM {{s}}.jobs WHERE id = :id", {"id": job_id})
    if not rows:
        return None
    job = job_from_row(rows[0])
    job.errors = [error_from_row(row) for row in (yield Statement(sql.errors_sql, {"id": job_id}))]
    links = yield Statement(
        "SELECT parent_id, child_id FROM {s}.job_deps WHERE child_id = :id OR parent_id = :id"
        " ORDER BY parent_id, child_id",
        {"id": job_id},
    )
    job.parents = [row["parent_id"] for row in links if row["child_id"] == job_id]
    job.children = [row["child_id"] for row in links if row["parent_id"] == job_id]
    return job


# How far a job's created_at may lag behind that of a job with a lower id. Ids grow with
# creation: SQLite's one writer reads its clock once per transaction; PostgreSQL takes a
# job's id and its created_at (the statement's start) in the same statement. A clock stepped
# back further than this, or a statement that runs longer, can hide a job at the edge of a
# --since/--until window.
CREATION_ORDER_SLACK = 60.0


def list_jobs(sql: Dialect, query: JobFilter) -> Steps[list[Job]]:
    clauses: list[str] = []
    params: dict[str, object] = {"limit": query.limit}
    index = ""
    if list(query.statuses or ()) == ["running"]:
        # A few jobs, however long the backlog: read through the running jobs' own index
        # (a partial one, which a bound parameter would not select).
        clauses.append("status = 'running'")
        index = sql.running_index
    elif query.statuses:
        statuses, values = members("status", query.statuses)
        clauses.append(f"status IN ({statuses})")
        params.update(values)
        if not set(query.statuses) & set(ACTIVE_STATUSES):
            # Ended jobs only: the ended jobs' indexes (partial ones, which the bound
            # statuses alone would not select) find a task's without its other jobs.
            clauses.append(sql.ended)
    if query.task is not None:
        clauses.append("task = :task")
        params["task"] = query.task
    for column, value in (("origin", query.origin), ("key", query.key)):
        if value is not None:
            clauses.append(f"{column} = :{column}")
            params[column] = value
    # A time window is also an id range, found on the primary key, so that the newest jobs
    # of the window come first off the id order without an index on created_at.
    since_id = until_id = None
    if query.since is not None:
        since_id = yield from _first_created_at_or_after(query.since - CREATION_ORDER_SLACK)
        if since_id is None:
            return []
    if query.until is not None:
        until_id = yield from _first_created_at_or_after(query.until + CREATION_ORDER_SLACK)
    bounds: tuple[tuple[str, str, object], ...] = (
        ("id < :before", "before", query.before),
        ("id >= :since_id", "since_id", since_id),
        ("id < :until_id", "until_id", until_id),
        ("created_at >= :since", "since", query.since),
        ("created_at < :until", "until", query.until),
        (sql.payload_holds, "text", query.text),
    )
    for clause, name, bound in bounds:
        if bound is not None:
            clauses.append(clause)
            params[name] = bound
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = yield Statement(
        f"SELECT {JOB_COLUMNS} FROM {{s}}.jobs{index} {where} ORDER BY id DESC LIMIT :limit",
        params,
    )
    return [job_from_row(row) for row in rows]


def _first_created_at_or_after(moment: float) -> Steps[int | None]:
    """The lowest id of a job created at or after `moment` (None: no such job), by a binary
    search of the ids that holds as long as created_at grows with the id: some twenty
    lookups by primary key for a million jobs, however old the moment."""
    rows = yield Statement(  # each alone in its query, so that each is one index lookup
        "SELECT (SELECT min(id) FROM {s}.jobs) AS low, (SELECT max(id) FROM {s}.jobs) AS high"
    )
    if rows[0]["high"] is None:
        return None
    # Every job below `low` was created before the moment, every one from `high` on at or
    # after it; `end`: past the last job.
    low, high = int(rows[0]["low"]), int(rows[0]["high"]) + 1
    end = high
    while low < high:
        rows = yield Statement(
            "SELECT id, created_at FROM {s}.jobs WHERE id >= :id AND id < :high"
            " ORDER BY id LIMIT 1",
            {"id": (low + high) // 2, "high": high},
        )
        if not rows:  # no job in [middle, high): the jobs from the middle on are high's
            high = (low + high) // 2
        elif rows[0]["created_at"] >= moment:
            high = int(rows[0]["id"])
        else:
            low = int(rows[0]["id"]) + 1
    return None if low == end else low


def counts(sql: Dialect) -> Steps[list[TaskCounts]]:
    """Jobs per task and status (the counters the writes keep, see `job_counts` in the
    schemas), and per task the oldest due pending job's age and when the next one is due
    (each a few steps down the pending jobs' index)."""
    by_task: dict[str, dict[str, int]] = {}
    for row in (yield Statement(COUNTS_SQL)):
        by_task.setdefault(row["task"], {})[row["status"]] = int(row["n"])
    entries = []
    for task, task_counts in sorted(by_task.items()):
        oldest_age = next_due = None
        if task_counts.get("pending"):
            (row,) = yield Statement(compose(PENDING_EDGES_SQL, indexed=sql.pending_index,
                                             next_priority=sql.next_priority_sql),
                                     {"task": task})  # fmt: skip
            if row["first_at"] is not None and row["first_at"] <= row["now"]:
                oldest_age = row["now"] - row["first_at"]
            next_due = row["next_due"]
        entries.append(TaskCounts(task, task_counts, oldest_age, next_due))
    return entries


def finished_recently(sql: Dialect, window: float, buckets: int) -> Steps[list[tuple[int, int]]]:
    """Succeeded and failed jobs per span of the last `window` seconds (the index of ended
    jobs, on (status, finished_at), finds them); the spans' bounds are numbers, not
    parameters."""
    span = window / buckets
    sums = ", ".join(
        f"sum(CASE WHEN finished_at >= :now - {window - i * span!r}"
        f" AND finished_at < :now - {window - (i + 1) * span!r} THEN 1 ELSE 0 END) AS n{i}"
        for i in range(buckets)
    )
    rows = yield Statement(
        f"SELECT status, {sums} FROM {{s}}.jobs WHERE {sql.ended}"
        " AND status IN ('succeeded', 'failed')"
        f" AND finished_at >= :now - {float(window)!r} GROUP BY status"
    )
    by_status = {row["status"]: [int(row[f"n{i}"] or 0) for i in range(buckets)] for row in rows}
    succeeded = by_status.get("succeeded", [0] * buckets)
    failed = by_status.get("failed", [0] * buckets)
    return list(zip(succeeded, failed, strict=True))


def queue_depth(sql: Dialect) -> Steps[int]:
    rows = yield Statement(
        "SELECT coalesce(sum(n), 0) AS n FROM {s}.job_counts WHERE status = 'pending'"
    )
    return int(rows[0]["n"])


def clock(sql: Dialect) -> Steps[float]:
    """The store's "now"."""
    rows = yield Statement("SELECT :now AS now")
    return float(rows[0]["now"])


def nodes(sql: Dialect) -> Steps[list[NodeInfo]]:
    """The nodes alive, in the order of their ids."""
    rows = yield Statement(
        f"SELECT {sql.node_columns}, (SELECT count(*) FROM {{s}}.jobs WHERE status = 'running'"
        " AND worker = nodes.worker) AS running FROM {s}.nodes WHERE expires >= :now"
    )
    return sorted((node_from_row(row) for row in rows), key=lambda node: node.id)


def schedule_states(sql: Dialect, ids: Sequence[str] | None) -> Steps[list[ScheduleState]]:
    where, params = "", dict[str, str]()
    if ids is not None:
        if not ids:
            return []
        names, params = members("id", ids)
        where = f" WHERE id IN ({names})"
    rows = yield Statement(f"SELECT {SCHEDULE_COLUMNS} FROM {{s}}.schedules{where}", params)
    return [schedule_from_row(row) for row in rows]


# The reads that may run more than one statement (what they return must be of one moment).
SEVERAL_STATEMENTS = frozenset({get, list_jobs, counts})
