"""The job store on SQLite (aiosqlite): WAL, one writer connection with group commit.

One daemon owns a database file (an exclusive lock on `<file>.lock` says so), which lets
it hand out job ids itself and know that every `running` row it finds at start-up was
left behind by a crash. Reads use a second connection and never wait for the writer.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import wraps
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import aiosqlite
import msgspec

from taskd.models import AttemptError, FiredJob, Job, JobStatus, TaskCounts
from taskd.store.base import (
    Claimed,
    Inserted,
    InvalidTransition,
    JobFilter,
    JobNotFound,
    NewJob,
    Outcome,
    ScheduleState,
    StoreError,
)
from taskd.store.batching import GroupCommit
from taskd.store.events import JobEvents

logger = logging.getLogger(__name__)

MIGRATIONS = [
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
    );
    -- Single-flight and unique keys: one active job per (task, key).
    CREATE UNIQUE INDEX jobs_active_key ON jobs (task, key)
        WHERE key IS NOT NULL AND status IN ('pending', 'running');
    CREATE INDEX jobs_claim_order ON jobs (priority, run_at, id) WHERE status = 'pending';
    CREATE INDEX jobs_pending_due ON jobs (run_at) WHERE status = 'pending';
    CREATE INDEX jobs_running_lease ON jobs (lease_expires) WHERE status = 'running';
    CREATE INDEX jobs_finished ON jobs (status, finished_at)
        WHERE status IN ('succeeded', 'failed', 'cancelled');
    CREATE INDEX jobs_task_status ON jobs (task, status);
    CREATE TABLE job_errors (
        job_id INTEGER NOT NULL,
        attempt INTEGER NOT NULL,
        kind TEXT NOT NULL,
        message TEXT NOT NULL,
        traceback TEXT,
        at REAL NOT NULL
    );
    CREATE INDEX job_errors_job ON job_errors (job_id);
    CREATE TABLE schedules (
        id TEXT PRIMARY KEY,
        last_tick REAL,
        paused INTEGER NOT NULL DEFAULT 0,
        coalesced INTEGER NOT NULL DEFAULT 0,
        last_job_id INTEGER
    );
    """,
    # The fencing token: counts claims and, unlike attempts, is never reset by a retry.
    "ALTER TABLE jobs ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0",
    # The scheduler: what has been dealt with, when it last fired, and the jobs of its
    # latest firing (JSON: [{"task", "id", "joined"}]). They replace last_job_id, which
    # nothing wrote before this version (and SQLite before 3.35 cannot drop a column).
    """
    ALTER TABLE schedules ADD COLUMN covered_until REAL;
    ALTER TABLE schedules ADD COLUMN fired_at REAL;
    ALTER TABLE schedules ADD COLUMN last_jobs TEXT NOT NULL DEFAULT '[]';
    UPDATE schedules SET covered_until = last_tick;
    """,
]
SCHEDULE_COLUMNS = "id, last_tick, paused, coalesced, covered_until, fired_at, last_jobs"

COLUMNS = (
    "id, task, status, origin, payload, result, error, attempts, max_attempts, priority, key,"
    " crashes, parent_id, run_at, created_at, started_at, finished_at, lease_owner, epoch"
)
INSERT_COLUMNS = (
    "id, task, status, origin, payload, priority, run_at, max_attempts, key, parent_id, created_at"
)
INSERT_ROW = "(?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?)"
INSERT_CHUNK = 500  # rows per INSERT statement, well under SQLite's limit of bound variables
FINISHED = ("succeeded", "failed", "cancelled")

_fired_jobs = msgspec.json.Decoder(list[FiredJob])

P = ParamSpec("P")
R = TypeVar("R")


def _row_to_job(row: Sequence[Any]) -> Job:
    return Job(
        id=row[0],
        task=row[1],
        status=row[2],
        origin=row[3],
        payload=msgspec.Raw(row[4]),
        result=None if row[5] is None else msgspec.Raw(row[5]),
        error=row[6],
        attempts=row[7],
        max_attempts=row[8],
        priority=row[9],
        key=row[10],
        crashes=row[11],
        parent_id=row[12],
        run_at=row[13],
        created_at=row[14],
        started_at=row[15],
        finished_at=row[16],
        worker=row[17],
        epoch=row[18],
    )


def _marks(count: int) -> str:
    return ", ".join("?" * count)


def _hint(exc: sqlite3.Error) -> str:
    text = str(exc)
    if "locked" in text or "busy" in text:
        return " (another process holds a lock on the database; nothing was written, try again)"
    if "disk" in text or "full" in text:
        return " (check the free space and the file system; nothing was written)"
    return ""


def _translate_errors(method: Callable[P, Any]) -> Callable[P, Any]:
    """SQLite's exceptions leave the store as StoreError, with the database named."""

    @wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
        try:
            return await method(*args, **kwargs)
        except sqlite3.Error as exc:
            store = args[0]
            assert isinstance(store, SqliteStore)
            raise StoreError(f"job store {store.path}: {exc}{_hint(exc)}") from exc

    return wrapper


class SqliteStore:
    """The embedded job store."""

    def __init__(self, path: Path, *, synchronous: str = "FULL", busy_timeout: float = 5.0):
        self.path = path
        self.description = f"sqlite:{path}"
        self.events = JobEvents()
        self._synchronous = synchronous
        self._busy_timeout_ms = int(busy_timeout * 1000)
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._lock_fd: int | None = None
        self._next_id = 1
        self._commits = GroupCommit(self._transaction)

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        self._lock()
        try:
            self._writer = await self._connect()
            await self._configure(self._writer)
            await self._migrate(self._writer)
            rows = await self._writer.execute_fetchall(
                "SELECT seq FROM sqlite_sequence WHERE name = 'jobs'"
            )
            self._next_id = (next(iter(rows))[0] if rows else 0) + 1
            self._reader = await self._connect()
            await self._reader.execute("PRAGMA query_only = 1")
            await self._reader.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        except sqlite3.Error as exc:
            await self.close()
            raise StoreError(f"cannot open job store {self.path}: {exc}") from exc
        except BaseException:
            await self.close()
            raise
        self._commits.start()

    async def close(self) -> None:
        await self._commits.stop()
        for connection in (self._reader, self._writer):
            if connection is not None:
                try:
                    await connection.close()
                except sqlite3.Error as exc:
                    logger.warning("closing %s: %s", self.path, exc)
        self._reader = self._writer = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _lock(self) -> None:
        lock_path = f"{self.path}.lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot create lock file {lock_path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreError(
                f"job store {self.path} is in use by another taskd (pid {holder}); "
                "stop it or give this one another --database"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    async def _connect(self) -> aiosqlite.Connection:
        return await aiosqlite.connect(self.path, isolation_level=None)

    async def _configure(self, connection: aiosqlite.Connection) -> None:
        rows = list(await connection.execute_fetchall("PRAGMA journal_mode = WAL"))
        if rows[0][0] != "wal":
            raise StoreError(f"job store {self.path}: cannot switch to WAL mode ({rows[0][0]})")
        await connection.execute(f"PRAGMA synchronous = {self._synchronous}")
        await connection.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")

    async def _migrate(self, connection: aiosqlite.Connection) -> None:
        rows = list(await connection.execute_fetchall("PRAGMA user_version"))
        version = rows[0][0]
        if version > len(MIGRATIONS):
            raise StoreError(
                f"job store {self.path} has schema version {version}, newer than this taskd "
                f"understands ({len(MIGRATIONS)}); upgrade taskd"
            )
        for number in range(version, len(MIGRATIONS)):
            await connection.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[number].split(";"):
                    if statement.strip():
                        await connection.execute(statement)
                await connection.execute(f"PRAGMA user_version = {number + 1}")
                await connection.execute("COMMIT")
            except BaseException:
                await connection.execute("ROLLBACK")
                raise
            logger.info("job store %s migrated to schema version %d", self.path, number + 1)

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        writer = self._connection(self._writer)
        await writer.execute("BEGIN IMMEDIATE")
        try:
            yield
            await writer.execute("COMMIT")
        except BaseException:
            if writer.in_transaction:
                await writer.execute("ROLLBACK")
            raise

    def _connection(self, connection: aiosqlite.Connection | None) -> aiosqlite.Connection:
        if connection is None:
            raise StoreError(f"job store {self.path} is closed")
        return connection

    # -- writes (through group commit) ---------------------------------------------------

    @_translate_errors
    async def insert(self, jobs: Sequence[NewJob], now: float) -> list[Inserted]:
        if not jobs:
            return []
        items = [(job, now) for job in jobs]
        return await self._commits.submit(self._insert_batch, items, self._after_insert)

    def _after_insert(self, inserted: list[Inserted]) -> None:
        if any(not row.duplicate for row in inserted):
            self.events.nudge()

    async def _insert_batch(self, items: list[tuple[NewJob, float]]) -> list[Inserted]:
        writer = self._connection(self._writer)
        first_id = self._next_id
        self._next_id += len(items)
        inserted: set[int] = set()
        for start in range(0, len(items), INSERT_CHUNK):
            chunk = items[start : start + INSERT_CHUNK]
            params: list[Any] = []
            for offset, (job, now) in enumerate(chunk):
                params += (
                    first_id + start + offset,
                    job.task,
                    job.origin,
                    job.payload,
                    job.priority,
                    job.run_at,
                    job.max_attempts,
                    job.key,
                    job.parent_id,
                    now,
                )
            rows = await writer.execute_fetchall(
                f"INSERT INTO jobs ({INSERT_COLUMNS}) VALUES "
                + ", ".join([INSERT_ROW] * len(chunk))
                + " ON CONFLICT DO NOTHING RETURNING id",
                params,
            )
            inserted.update(row[0] for row in rows)
        duplicates = [
            (job.task, job.key)
            for index, (job, _) in enumerate(items)
            if first_id + index not in inserted
        ]
        active = await self._active_keys(writer, duplicates) if duplicates else {}
        result = []
        for index, (job, _) in enumerate(items):
            job_id = first_id + index
            if job_id in inserted:
                result.append(Inserted(job_id, duplicate=False))
            elif (existing := active.get((job.task, job.key))) is not None:
                result.append(Inserted(existing, duplicate=True))
            else:
                raise StoreError(f"job id {job_id} is taken: another process writes {self.path}")
        return result

    async def _active_keys(
        self, connection: aiosqlite.Connection, keys: list[tuple[str, str | None]]
    ) -> dict[tuple[str, str | None], int]:
        params = [value for pair in keys for value in pair]
        rows = await connection.execute_fetchall(
            "SELECT id, task, key FROM jobs WHERE key IS NOT NULL"
            " AND status IN ('pending', 'running') AND (task, key) IN (VALUES "
            + ", ".join(["(?, ?)"] * len(keys))
            + ")",
            params,
        )
        return {(row[1], row[2]): row[0] for row in rows}

    @_translate_errors
    async def claim(
        self, owner: str, limit: int, task_slots: Mapping[str, int], lease_until: float, now: float
    ) -> Claimed:
        request = (owner, limit, dict(task_slots), lease_until, now)
        (claimed,) = await self._commits.submit(self._claim_batch, [request])
        return claimed

    async def _claim_batch(
        self, requests: list[tuple[str, int, dict[str, int], float, float]]
    ) -> list[Claimed]:
        return [await self._claim_one(*request) for request in requests]

    async def _claim_one(
        self, owner: str, limit: int, slots: dict[str, int], lease_until: float, now: float
    ) -> Claimed:
        writer = self._connection(self._writer)
        jobs: list[Job] = []
        full = {task for task, free in slots.items() if free <= 0}
        while len(jobs) < limit:
            wanted = limit - len(jobs)
            fetch = wanted * 4 if slots else wanted
            candidates = list(
                await writer.execute_fetchall(
                    "SELECT id, task FROM jobs WHERE status = 'pending' AND run_at <= ?"
                    f" AND task NOT IN ({_marks(len(full))}) ORDER BY priority, run_at, id LIMIT ?",
                    (now, *full, fetch),
                )
            )
            picked: list[int] = []
            for job_id, task in candidates:
                if len(picked) == wanted:
                    break
                if task in slots:
                    if slots[task] <= 0:
                        continue
                    slots[task] -= 1
                    if slots[task] == 0:
                        full.add(task)
                picked.append(job_id)
            if picked:
                rows = await writer.execute_fetchall(
                    "UPDATE jobs SET status = 'running', attempts = attempts + 1,"
                    " epoch = epoch + 1, started_at = ?,"
                    " lease_owner = ?, lease_expires = ?"
                    f" WHERE status = 'pending' AND id IN ({_marks(len(picked))})"
                    f" RETURNING {COLUMNS}",
                    (now, owner, lease_until, *picked),
                )
                jobs.extend(_row_to_job(row) for row in rows)
            if len(candidates) < fetch:
                break  # every due job we may take has been taken
        rows = await writer.execute_fetchall(
            "SELECT run_at FROM jobs WHERE status = 'pending'"
            f" AND task NOT IN ({_marks(len(full))}) ORDER BY run_at LIMIT 1",
            tuple(full),
        )
        next_due = next(iter(rows))[0] if rows else None
        jobs.sort(key=lambda job: (job.priority, job.run_at, job.id))
        return Claimed(jobs=jobs, next_due=next_due)

    @_translate_errors
    async def finish(self, outcomes: Sequence[Outcome]) -> list[Job | None]:
        if not outcomes:
            return []
        return await self._commits.submit(self._finish_batch, list(outcomes), self._after_finish)

    def _after_finish(self, jobs: list[Job | None]) -> None:
        for job in jobs:
            if job is None:
                continue
            if job.status in FINISHED:
                self.events.finished(job)
            else:
                self.events.nudge()

    async def _finish_batch(self, outcomes: list[Outcome]) -> list[Job | None]:
        writer = self._connection(self._writer)
        params: list[Any] = []
        for outcome in outcomes:
            params += (
                outcome.job_id,
                outcome.epoch,
                outcome.owner,
                outcome.status,
                outcome.result,
                outcome.error.message if outcome.error else None,
                outcome.run_at,
                outcome.finished_at if outcome.status in FINISHED else None,
                int(outcome.release),
            )
        rows = await writer.execute_fetchall(
            "UPDATE jobs SET status = v.status, result = v.result,"
            " error = CASE WHEN v.status = 'succeeded' THEN NULL"
            "   ELSE coalesce(v.error, jobs.error) END,"
            " run_at = coalesce(v.run_at, jobs.run_at), attempts = jobs.attempts - v.release,"
            " finished_at = v.finished_at, lease_owner = NULL, lease_expires = NULL"
            " FROM (SELECT column1 AS id, column2 AS epoch, column3 AS owner, column4 AS status,"
            "   column5 AS result, column6 AS error, column7 AS run_at, column8 AS finished_at,"
            "   column9 AS release FROM (VALUES "
            + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * len(outcomes))
            + ")) AS v WHERE jobs.id = v.id AND jobs.epoch = v.epoch"
            " AND jobs.lease_owner = v.owner AND jobs.status = 'running'"
            f" RETURNING {COLUMNS}",
            params,
        )
        updated = {row[0]: _row_to_job(row) for row in rows}
        errors = [
            (
                o.job_id,
                o.error.attempt,
                o.error.kind,
                o.error.message,
                o.error.traceback,
                o.error.at,
            )
            for o in outcomes
            if o.error is not None and o.job_id in updated
        ]
        if errors:
            await writer.executemany("INSERT INTO job_errors VALUES (?, ?, ?, ?, ?, ?)", errors)
        return [updated.get(o.job_id) for o in outcomes]

    @_translate_errors
    async def renew(self, owner: str, job_ids: Sequence[int], lease_until: float) -> None:
        if job_ids:
            await self._commits.submit(self._renew_batch, [(owner, list(job_ids), lease_until)])

    async def _renew_batch(self, items: list[tuple[str, list[int], float]]) -> list[None]:
        writer = self._connection(self._writer)
        for owner, job_ids, lease_until in items:
            await writer.execute(
                "UPDATE jobs SET lease_expires = ? WHERE status = 'running' AND lease_owner = ?"
                f" AND id IN ({_marks(len(job_ids))})",
                (lease_until, owner, *job_ids),
            )
        return [None] * len(items)

    @_translate_errors
    async def recover(self, now: float, quarantine_after: int, *, everything: bool) -> list[Job]:
        (jobs,) = await self._commits.submit(
            self._recover_batch, [(now, quarantine_after, everything)], self._after_recover
        )
        return jobs

    def _after_recover(self, results: list[list[Job]]) -> None:
        jobs = [job for recovered in results for job in recovered]
        for job in jobs:
            if job.status in FINISHED:
                self.events.finished(job)
        if jobs:
            self.events.nudge()

    async def _recover_batch(self, items: list[tuple[float, int, bool]]) -> list[list[Job]]:
        writer = self._connection(self._writer)
        results = []
        for now, quarantine_after, everything in items:
            where = "status = 'running' AND (? OR lease_expires < ?)"
            await writer.execute(
                "INSERT INTO job_errors SELECT id, attempts, 'interrupted',"
                " 'interrupted: worker ' || coalesce(lease_owner, '?') || ' went away during"
                " attempt ' || attempts, NULL, ? FROM jobs WHERE " + where,
                (now, everything, now),
            )
            rows = await writer.execute_fetchall(
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
                " run_at = :now, lease_owner = NULL, lease_expires = NULL"
                " WHERE status = 'running' AND (:all OR lease_expires < :now)"
                f" RETURNING {COLUMNS}",
                {"q": quarantine_after, "now": now, "all": everything},
            )
            results.append([_row_to_job(row) for row in rows])
        return results

    @_translate_errors
    async def cancel(self, job_id: int, now: float) -> Job:
        (job,) = await self._commits.submit(
            self._cancel_batch, [(job_id, now)], lambda jobs: self.events.finished(jobs[0])
        )
        return job

    async def _cancel_batch(self, items: list[tuple[int, float]]) -> list[Job]:
        writer = self._connection(self._writer)
        jobs = []
        for job_id, now in items:
            # A running attempt ends here: it is recorded like any other attempt's end.
            await writer.execute(
                "INSERT INTO job_errors SELECT id, attempts, 'cancelled', 'cancelled by request',"
                " NULL, ? FROM jobs WHERE id = ? AND status = 'running'",
                (now, job_id),
            )
            rows = await writer.execute_fetchall(
                "UPDATE jobs SET status = 'cancelled', finished_at = ?,"
                " error = 'cancelled by request', lease_owner = NULL, lease_expires = NULL"
                f" WHERE id = ? AND status IN ('pending', 'running') RETURNING {COLUMNS}",
                (now, job_id),
            )
            if not rows:
                await self._refuse(writer, job_id, "cancelled")
            jobs.append(_row_to_job(next(iter(rows))))
        return jobs

    @_translate_errors
    async def retry(self, job_id: int, now: float) -> Job:
        (job,) = await self._commits.submit(
            self._retry_batch, [(job_id, now)], lambda _: self.events.nudge()
        )
        return job

    async def _retry_batch(self, items: list[tuple[int, float]]) -> list[Job]:
        writer = self._connection(self._writer)
        jobs = []
        for job_id, now in items:
            try:
                rows = await writer.execute_fetchall(
                    "UPDATE jobs SET status = 'pending', attempts = 0, crashes = 0, run_at = ?,"
                    " started_at = NULL, finished_at = NULL, result = NULL"
                    f" WHERE id = ? AND status IN ('failed', 'cancelled') RETURNING {COLUMNS}",
                    (now, job_id),
                )
            except sqlite3.IntegrityError:
                raise InvalidTransition(
                    f"job {job_id} cannot be retried: another pending or running job of its "
                    "task has the same key"
                ) from None
            if not rows:
                await self._refuse(writer, job_id, "retried")
            jobs.append(_row_to_job(next(iter(rows))))
        return jobs

    async def _refuse(self, connection: aiosqlite.Connection, job_id: int, verb: str) -> None:
        rows = list(
            await connection.execute_fetchall("SELECT status FROM jobs WHERE id = ?", (job_id,))
        )
        if not rows:
            raise JobNotFound(job_id)
        raise InvalidTransition(f"job {job_id} is {rows[0][0]} and cannot be {verb}")

    @_translate_errors
    async def prune(self, cutoffs: Mapping[JobStatus, float]) -> int:
        deleted = 0
        for status, cutoff in cutoffs.items():
            while True:  # in slices, so that pruning never holds the writer for long
                (count,) = await self._commits.submit(self._prune_batch, [(status, cutoff)])
                deleted += count
                if count < 2000:
                    break
        return deleted

    async def _prune_batch(self, items: list[tuple[JobStatus, float]]) -> list[int]:
        writer = self._connection(self._writer)
        counts = []
        for status, cutoff in items:
            ids = [
                row[0]
                for row in await writer.execute_fetchall(
                    "SELECT id FROM jobs WHERE status = ? AND finished_at < ? LIMIT 2000",
                    (status, cutoff),
                )
            ]
            if ids:
                marks = _marks(len(ids))
                await writer.execute(f"DELETE FROM job_errors WHERE job_id IN ({marks})", ids)
                await writer.execute(f"DELETE FROM jobs WHERE id IN ({marks})", ids)
            counts.append(len(ids))
        return counts

    @_translate_errors
    async def save_schedule_states(self, states: Sequence[ScheduleState]) -> None:
        if states:
            await self._commits.submit(self._save_schedules_batch, list(states))

    async def _save_schedules_batch(self, states: list[ScheduleState]) -> list[None]:
        writer = self._connection(self._writer)
        await writer.executemany(
            f"INSERT INTO schedules ({SCHEDULE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET last_tick = excluded.last_tick,"
            " paused = excluded.paused, coalesced = excluded.coalesced,"
            " covered_until = excluded.covered_until, fired_at = excluded.fired_at,"
            " last_jobs = excluded.last_jobs",
            [
                (
                    s.id,
                    s.last_tick,
                    int(s.paused),
                    s.coalesced,
                    s.covered_until,
                    s.fired_at,
                    msgspec.json.encode(s.last_jobs).decode(),
                )
                for s in states
            ],
        )
        return [None] * len(states)

    # -- reads ---------------------------------------------------------------------------

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return list(await self._connection(self._reader).execute_fetchall(sql, params))

    @_translate_errors
    async def get(self, job_id: int) -> Job | None:
        rows = await self._read(f"SELECT {COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            return None
        job = _row_to_job(rows[0])
        job.errors = [
            AttemptError(attempt=r[0], kind=r[1], message=r[2], traceback=r[3], at=r[4])
            for r in await self._read(
                "SELECT attempt, kind, message, traceback, at FROM job_errors"
                " WHERE job_id = ? ORDER BY rowid",
                (job_id,),
            )
        ]
        return job

    @_translate_errors
    async def list_jobs(self, query: JobFilter) -> list[Job]:
        clauses: list[str] = []
        params: list[Any] = []
        if query.statuses:
            clauses.append(f"status IN ({_marks(len(query.statuses))})")
            params += query.statuses
        if query.task is not None:
            clauses.append("task = ?")
            params.append(query.task)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = await self._read(
            f"SELECT {COLUMNS} FROM jobs {where} ORDER BY id DESC LIMIT ?", (*params, query.limit)
        )
        return [_row_to_job(row) for row in rows]

    @_translate_errors
    async def counts(self, now: float) -> list[TaskCounts]:
        by_task: dict[str, dict[str, int]] = {}
        for task, status, count in await self._read(
            "SELECT task, status, count(*) FROM jobs GROUP BY task, status"
        ):
            by_task.setdefault(task, {})[status] = count
        waiting = {
            row[0]: (row[1], row[2])
            for row in await self._read(
                "SELECT task, min(CASE WHEN run_at <= ? THEN run_at END),"
                " min(CASE WHEN run_at > ? THEN run_at END)"
                " FROM jobs WHERE status = 'pending' GROUP BY task",
                (now, now),
            )
        }
        result = []
        for task, counts in sorted(by_task.items()):
            oldest_due, next_due = waiting.get(task, (None, None))
            result.append(
                TaskCounts(
                    task=task,
                    counts=counts,
                    oldest_pending_age=None if oldest_due is None else now - oldest_due,
                    next_due_at=next_due,
                )
            )
        return result

    @_translate_errors
    async def queue_depth(self) -> int:
        # The partial index holds only pending jobs: counting them never scans the history.
        rows = await self._read(
            "SELECT count(*) FROM jobs INDEXED BY jobs_pending_due WHERE status = 'pending'"
        )
        return int(rows[0][0])

    @_translate_errors
    async def next_due(self) -> float | None:
        rows = await self._read(
            "SELECT run_at FROM jobs WHERE status = 'pending' ORDER BY run_at LIMIT 1"
        )
        return rows[0][0] if rows else None

    @_translate_errors
    async def schedule_states(self) -> list[ScheduleState]:
        return [
            ScheduleState(
                id=r[0],
                last_tick=r[1],
                paused=bool(r[2]),
                coalesced=r[3],
                covered_until=r[4],
                fired_at=r[5],
                last_jobs=_fired_jobs.decode(r[6]),
            )
            for r in await self._read(f"SELECT {SCHEDULE_COLUMNS} FROM schedules")
        ]
