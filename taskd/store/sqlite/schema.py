"""The SQLite schema: its migrations, each a list of statements."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import aiosqlite

from taskd.store.base import StoreError
from taskd.store.core.migrations import TRACEPARENT_COLUMN, log_migrated, versions_to_apply

# A migration step SQL alone cannot say: it yields statements and is sent the rows of each
# (tuples), so that it runs on aiosqlite as on sqlite3 (`apply`).
Step = Callable[[], Generator[str, list[tuple[Any, ...]], None]]

# What a trigger adds to the count of a job's (task, status): `row` is new or old.
_COUNT = """INSERT INTO job_counts (task, status, n) VALUES ({row}.task, {row}.status, {n})
            ON CONFLICT (task, status) DO UPDATE SET n = n + {n}"""
# What a job's move (a claim, a finish) does to the counts: one statement of two rows, the
# count it leaves and the one it joins (the trigger's WHEN makes them two (task, status)).
_MOVE = """INSERT INTO job_counts (task, status, n)
            VALUES (old.task, old.status, -1), (new.task, new.status, 1)
            ON CONFLICT (task, status) DO UPDATE SET n = n + excluded.n"""


# The jobs table again, for a change of a column's constraints that ALTER TABLE cannot make:
# SQLite's "12 steps" (https://sqlite.org/lang_altertable.html#otheralter): a new table
# made from the text of the one there (whatever columns the migrations before this one
# added), the rows copied, the old one dropped, the new one renamed, then its indexes and
# triggers made again from their text read before the drop (`indexes` replaces those it
# names). The rows keep their ids, and AUTOINCREMENT its count (no id is given twice).
# No foreign key names the jobs table (none is declared): `PRAGMA foreign_key_check`
# finds nothing, and the migration fails if it ever does.
def rebuild_jobs(
    edits: list[tuple[str, str]], copied: dict[str, str], indexes: dict[str, str]
) -> Step:
    """The rebuild of the jobs table with each `edits` pattern of its text replaced (each
    must match once), each column in `copied` copied as that expression."""

    def step() -> Generator[str, list[tuple[Any, ...]], None]:
        rows = yield "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'jobs'"
        named = r'^\s*CREATE TABLE\s+"?jobs"?\s*\('
        table = re.sub(named, "CREATE TABLE jobs_rebuilt (", rows[0][0])
        for pattern, replacement in edits:
            table, found = re.subn(pattern, replacement, table)
            if found != 1 or not table.startswith("CREATE TABLE jobs_rebuilt ("):
                raise StoreError(f"cannot migrate the jobs table: {pattern!r} found {found} times")
        others = yield (
            "SELECT name, sql FROM sqlite_master WHERE tbl_name = 'jobs'"
            " AND type IN ('index', 'trigger') AND sql IS NOT NULL"
        )
        columns = [row[1] for row in (yield "PRAGMA table_info(jobs)")]
        counted = yield "SELECT seq FROM sqlite_sequence WHERE name = 'jobs'"
        yield table
        yield (
            f"INSERT INTO jobs_rebuilt ({', '.join(columns)})"
            f" SELECT {', '.join(copied.get(column, column) for column in columns)} FROM jobs"
        )
        yield "DROP TABLE jobs"
        yield "ALTER TABLE jobs_rebuilt RENAME TO jobs"
        for name, sql in others:
            yield indexes.get(name, sql)
        yield "DELETE FROM sqlite_sequence WHERE name = 'jobs'"
        yield (
            "INSERT INTO sqlite_sequence (name, seq) SELECT 'jobs',"
            f" max({int(counted[0][0]) if counted else 0}, coalesce(max(id), 0)) FROM jobs"
        )
        if (yield "PRAGMA foreign_key_check"):
            raise StoreError("cannot migrate the jobs table: a foreign key check failed")

    return step


# The jobs of a task without a `limit_key` have no value of one (NULL; '' is a keyed
# task's job whose payload has none), and the indexes of the keyed jobs leave them out:
# an insert, a claim and an end of theirs write no entry there. Their value was '',
# as that of a keyed job with none: a task whose path `limit_key_paths` does not record
# has none now (a start keys its jobs again if its configuration gives it one). The
# status CHECK compares in place: SQLite tested an IN list of five through a temporary
# table at every write of a job's row (a tenth of a no-op job's instructions).
KEYLESS_JOBS = rebuild_jobs(
    edits=[
        (r"\blimit_key TEXT NOT NULL DEFAULT ''", "limit_key TEXT"),
        (
            r"CHECK \(status IN \('pending', 'running', 'succeeded', 'failed',"
            r" 'cancelled'\)\)",
            "CHECK (status = 'pending' OR status = 'running' OR status = 'succeeded'"
            " OR status = 'failed' OR status = 'cancelled')",
        ),
    ],
    copied={"limit_key": "CASE WHEN task IN (SELECT task FROM limit_key_paths) THEN limit_key END"},
    indexes={
        "jobs_task_limit_key_claim": (
            "CREATE INDEX jobs_task_limit_key_claim"
            " ON jobs (task, limit_key, priority, run_at, id)"
            " WHERE status = 'pending' AND limit_key IS NOT NULL"
        ),
        "jobs_task_limit_key_running": (
            "CREATE INDEX jobs_task_limit_key_running ON jobs (task, limit_key)"
            " WHERE status = 'running' AND limit_key IS NOT NULL"
        ),
    },
)


# A task's jobs without their status: (task, status) took a delete and an insert at each
# claim and each finish. A task's jobs newest first read (task) (its rowids order them);
# its running jobs (the room under its limit) their own index, which a job enters at its
# claim and leaves at its end (an insert, a delete); its ended ones of a status theirs,
# which a job enters at its end; its pending ones jobs_task_claim_order (or, newest first,
# (task), where they are the newest).
TASK_INDEXES: list[str | Step] = [
    "DROP INDEX jobs_task_status",
    "CREATE INDEX jobs_task ON jobs (task)",
    "CREATE INDEX jobs_task_running ON jobs (task) WHERE status = 'running'",
    """
    CREATE INDEX jobs_task_ended ON jobs (task, status)
        WHERE status NOT IN ('pending', 'running')
    """,
]


# Version N of the schema is MIGRATIONS[:N]; PRAGMA user_version holds N. Never edit a
# released migration: add one.
MIGRATIONS: list[list[str | Step]] = [
    [
        """
        CREATE TABLE jobs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            task TEXT NOT NULL,
            status TEXT NOT NULL
                CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')),
            origin TEXT NOT NULL,
            payload BLOB NOT NULL,
            result BLOB,
            error TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            max_attempts INTEGER NOT NULL,
            priority INTEGER NOT NULL DEFAULT 0,
            key TEXT,
            crashes INTEGER NOT NULL DEFAULT 0,
            parent_id INTEGER,
            run_at REAL NOT NULL,
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            lease_owner TEXT,
            lease_expires REAL
        )
        """,
        # Single-flight and unique keys: one active job per (task, key).
        """
        CREATE UNIQUE INDEX jobs_active_key ON jobs (task, key)
            WHERE key IS NOT NULL AND status IN ('pending', 'running')
        """,
        "CREATE INDEX jobs_claim_order ON jobs (priority, run_at, id) WHERE status = 'pending'",
        "CREATE INDEX jobs_pending_due ON jobs (run_at) WHERE status = 'pending'",
        "CREATE INDEX jobs_running_lease ON jobs (lease_expires) WHERE status = 'running'",
        """
        CREATE INDEX jobs_finished ON jobs (status, finished_at)
            WHERE status IN ('succeeded', 'failed', 'cancelled')
        """,
        "CREATE INDEX jobs_task_status ON jobs (task, status)",
        """
        CREATE TABLE job_errors (
            job_id INTEGER NOT NULL,
            attempt INTEGER NOT NULL,
            kind TEXT NOT NULL,
            message TEXT NOT NULL,
            traceback TEXT,
            at REAL NOT NULL
        )
        """,
        "CREATE INDEX job_errors_job ON job_errors (job_id)",
        """
        CREATE TABLE schedules (
            id TEXT PRIMARY KEY,
            last_tick REAL,
            paused INTEGER NOT NULL DEFAULT 0,
            coalesced INTEGER NOT NULL DEFAULT 0,
            last_job_id INTEGER
        )
        """,
    ],
    # The fencing token: counts claims and, unlike attempts, is never reset by a retry.
    ["ALTER TABLE jobs ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0"],
    # The scheduler: what has been dealt with, when it last fired, and the jobs of its
    # latest firing (JSON: [{"task", "id", "joined"}]). They replace last_job_id, which
    # nothing wrote before this version.
    [
        "ALTER TABLE schedules ADD COLUMN covered_until REAL",
        "ALTER TABLE schedules ADD COLUMN fired_at REAL",
        "ALTER TABLE schedules ADD COLUMN last_jobs TEXT NOT NULL DEFAULT '[]'",
        "UPDATE schedules SET covered_until = last_tick",
    ],
    # Several daemons: the worker (`node/N`) holding a job's lease, running jobs waiting for
    # another job (they hold no slot), a heartbeat row per node (kept when it stops, with
    # `expires` NULL, so that N never repeats), a row per fired tick (a tick fires once),
    # and an index for claiming the jobs of one task in order.
    [
        "ALTER TABLE jobs RENAME COLUMN lease_owner TO worker",
        "ALTER TABLE jobs ADD COLUMN waiting INTEGER NOT NULL DEFAULT 0",
        """
        CREATE INDEX jobs_task_claim_order ON jobs (task, priority, run_at, id)
            WHERE status = 'pending'
        """,
        """
        CREATE TABLE nodes (
            id TEXT PRIMARY KEY,
            worker TEXT NOT NULL UNIQUE,
            starts INTEGER NOT NULL,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            started_at REAL NOT NULL,
            seen_at REAL NOT NULL,
            expires REAL
        )
        """,
        """
        CREATE TABLE schedule_ticks (
            schedule TEXT NOT NULL,
            tick REAL NOT NULL,
            fired_at REAL NOT NULL,
            jobs TEXT NOT NULL DEFAULT '[]',
            PRIMARY KEY (schedule, tick)
        ) WITHOUT ROWID
        """,
        "CREATE INDEX schedule_ticks_fired ON schedule_ticks (fired_at)",
    ],
    # Claims walk each task's pending jobs (jobs_task_claim_order): the claim-order and
    # due-time indexes of all pending jobs are only work for every write.
    [
        "DROP INDEX jobs_claim_order",
        "DROP INDEX jobs_pending_due",
    ],
    # Progress and logs of running jobs (`ctx.progress`, `ctx.logger`): the latest progress
    # in the job's row, its last lines in job_logs, and how many older lines were let go.
    [
        "ALTER TABLE jobs ADD COLUMN progress_done REAL",
        "ALTER TABLE jobs ADD COLUMN progress_total REAL",
        "ALTER TABLE jobs ADD COLUMN progress_message TEXT",
        "ALTER TABLE jobs ADD COLUMN progress_at REAL",
        "ALTER TABLE jobs ADD COLUMN logs_dropped INTEGER NOT NULL DEFAULT 0",
        """
        CREATE TABLE job_logs (
            id INTEGER PRIMARY KEY,
            job_id INTEGER NOT NULL,
            epoch INTEGER NOT NULL,
            seq INTEGER NOT NULL,
            at REAL NOT NULL,
            level TEXT NOT NULL,
            message TEXT NOT NULL
        )
        """,
        "CREATE INDEX job_logs_job ON job_logs (job_id, id)",
    ],
    # Each attempt's start and worker, for its timeline (`taskctl why`).
    [
        "ALTER TABLE job_errors ADD COLUMN started_at REAL",
        "ALTER TABLE job_errors ADD COLUMN worker TEXT",
    ],
    # Whether the last taskd to use the file closed it cleanly (and met no damage): then the
    # next start skips `PRAGMA quick_check`, which reads the whole file. Cleared at start.
    [
        """
        CREATE TABLE store_state (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            closed_cleanly INTEGER NOT NULL
        )
        """,
        "INSERT INTO store_state (id, closed_cleanly) VALUES (1, 0)",
    ],
    # Workflows: a job that waits for other jobs (`after`) counts the parents it still waits
    # for in `blocked`, and meanwhile keeps the time it is due in `release_at` (its `run_at`
    # is HELD, past any claim); `job_deps` links parents to children.
    [
        "ALTER TABLE jobs ADD COLUMN blocked INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN release_at REAL",
        "ALTER TABLE jobs ADD COLUMN after_failure TEXT NOT NULL DEFAULT 'cancel'",
        """
        CREATE TABLE job_deps (
            parent_id INTEGER NOT NULL,
            child_id INTEGER NOT NULL,
            PRIMARY KEY (parent_id, child_id)
        ) WITHOUT ROWID
        """,
        "CREATE INDEX job_deps_child ON job_deps (child_id)",
        # Batches (`enqueue_many(..., on_finish=TASK)`): a counter row each, so that a job's
        # end costs one update of it, never a scan of the batch.
        "ALTER TABLE jobs ADD COLUMN batch_id INTEGER",
        "CREATE INDEX jobs_batch ON jobs (batch_id) WHERE batch_id IS NOT NULL",
        """
        CREATE TABLE batches (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            on_finish TEXT,
            on_finish_attempts INTEGER NOT NULL DEFAULT 3,
            total INTEGER NOT NULL,
            ended INTEGER NOT NULL DEFAULT 0,
            succeeded INTEGER NOT NULL DEFAULT 0,
            failed INTEGER NOT NULL DEFAULT 0,
            cancelled INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            finished_at REAL,
            callback_id INTEGER
        )
        """,
    ],
    # Each worker's slots (`workers`), for `why` to count the workers busy everywhere.
    ["ALTER TABLE nodes ADD COLUMN slots INTEGER NOT NULL DEFAULT 0"],
    [TRACEPARENT_COLUMN.format(s="")],
    # Tasks paused (`taskctl pause NAME`): no attempt of theirs starts until resumed.
    [
        """
        CREATE TABLE paused_tasks (
            task TEXT PRIMARY KEY,
            since REAL NOT NULL
        ) WITHOUT ROWID
        """,
    ],
    # Rate limits (GCRA): per limit, the theoretical arrival time of its next start.
    [
        """
        CREATE TABLE rate_limits (
            kind TEXT NOT NULL,
            name TEXT NOT NULL,
            tat REAL NOT NULL,
            PRIMARY KEY (kind, name)
        ) WITHOUT ROWID
        """,
    ],
    # Uniqueness windows (`unique_for`): the jobs of a task and key, by creation.
    ["CREATE INDEX jobs_task_key ON jobs (task, key, created_at) WHERE key IS NOT NULL"],
    # Per-key limits (`limit_key`): each job's key value ('' for the tasks without one), the
    # pending jobs of each key in claim order and the running ones, and each task's turn
    # among its keys (round-robin).
    [
        "ALTER TABLE jobs ADD COLUMN limit_key TEXT NOT NULL DEFAULT ''",
        """
        CREATE INDEX jobs_task_limit_key_claim ON jobs (task, limit_key, priority, run_at, id)
            WHERE status = 'pending'
        """,
        """
        CREATE INDEX jobs_task_limit_key_running ON jobs (task, limit_key)
            WHERE status = 'running'
        """,
        """
        CREATE TABLE key_turns (
            task TEXT PRIMARY KEY,
            last_key TEXT,
            lap_from TEXT,
            lap_at REAL,
            rested_at REAL,
            rested_wake REAL
        ) WITHOUT ROWID
        """,
        "CREATE INDEX rate_limits_tat ON rate_limits (kind, tat)",
    ],
    # The Jobs page's origin filter: the newest jobs of an origin, however rare (the rowid
    # is in every index).
    ["CREATE INDEX jobs_origin ON jobs (origin)"],
    # The jobs per task and status, kept by triggers in the transaction of every write that
    # makes, moves or deletes a job: `status` and `/metrics` read them, never count the jobs.
    [
        """
        CREATE TABLE job_counts (
            task TEXT NOT NULL,
            status TEXT NOT NULL,
            n INTEGER NOT NULL,
            PRIMARY KEY (task, status)
        ) WITHOUT ROWID
        """,
        "INSERT INTO job_counts (task, status, n)"
        " SELECT task, status, count(*) FROM jobs GROUP BY task, status",
        f"""
        CREATE TRIGGER jobs_counted_insert AFTER INSERT ON jobs BEGIN
            {_COUNT.format(row="new", n=1)};
        END
        """,
        f"""
        CREATE TRIGGER jobs_counted_delete AFTER DELETE ON jobs BEGIN
            {_COUNT.format(row="old", n=-1)};
        END
        """,
        f"""
        CREATE TRIGGER jobs_counted_update AFTER UPDATE OF task, status ON jobs
        WHEN old.task IS NOT new.task OR old.status IS NOT new.status BEGIN
            {_COUNT.format(row="old", n=-1)};
            {_COUNT.format(row="new", n=1)};
        END
        """,
    ],
    # The `limit_key` path each task's active jobs were keyed by: a start whose
    # configuration changed it keys them again, as a reload does.
    ["CREATE TABLE limit_key_paths (task TEXT PRIMARY KEY, path TEXT NOT NULL)"],
    # The ended jobs' index says "ended" as two statuses a job is not (taskd.store.sqlite.
    # dialect.ENDED_SQLITE): SQLite tested its three statuses through a temporary table at
    # every write of a job's status (a claim, a finish), clearing it each time.
    [
        "DROP INDEX jobs_finished",
        """
        CREATE INDEX jobs_finished ON jobs (status, finished_at)
            WHERE status NOT IN ('pending', 'running')
        """,
    ],
    # The jobs of tasks without a `limit_key`: no value (see KEYLESS_JOBS).
    [KEYLESS_JOBS],
    # A task's jobs without their status (see TASK_INDEXES).
    TASK_INDEXES,
    # The running jobs in one index, not two: every read of them reads them all (a recovery,
    # `jobs --status running`) or a task's (the room under its limit), which jobs_task_running
    # holds; none reads them in lease order. A claim and a finish each wrote both.
    ["DROP INDEX jobs_running_lease"],
    # A job's move counted in one statement, not two: a statement of a trigger costs SQLite
    # its own setup at each job's claim and finish (the same counts: see _MOVE).
    [
        "DROP TRIGGER jobs_counted_update",
        f"""
        CREATE TRIGGER jobs_counted_update AFTER UPDATE OF task, status ON jobs
        WHEN old.task IS NOT new.task OR old.status IS NOT new.status BEGIN
            {_MOVE};
        END
        """,
    ],
]


def apply(connection: sqlite3.Connection, migration: list[str | Step]) -> None:
    """Run a migration's statements on a sqlite3 connection (in the caller's transaction)."""
    for statement in migration:
        if isinstance(statement, str):
            connection.execute(statement)
            continue
        steps, rows = statement(), None
        try:
            while True:
                sql = steps.send(rows)  # type: ignore[arg-type]
                rows = connection.execute(sql).fetchall()
        except StopIteration:
            pass


async def migrate(connection: aiosqlite.Connection, path: Path) -> None:
    """Bring the schema to the latest version, one transaction per version."""
    rows = list(await connection.execute_fetchall("PRAGMA user_version"))
    version = rows[0][0]
    for number in versions_to_apply(version, len(MIGRATIONS), str(path)):
        await connection.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[number]:
                if isinstance(statement, str):
                    await connection.execute(statement)
                else:
                    await _run(connection, statement)
            await connection.execute(f"PRAGMA user_version = {number + 1}")
            await connection.execute("COMMIT")
        except BaseException:
            await connection.execute("ROLLBACK")
            raise
    log_migrated(version, len(MIGRATIONS), str(path))


async def _run(connection: aiosqlite.Connection, step: Step) -> None:
    steps, rows = step(), None
    try:
        while True:
            sql = steps.send(rows)  # type: ignore[arg-type]
            rows = list(await connection.execute_fetchall(sql))
    except StopIteration:
        pass
