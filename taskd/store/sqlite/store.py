"""The job store on SQLite (aiosqlite): WAL, one writer connection with group commit.

One daemon owns a database file (it holds an exclusive lock on the file itself), so every
node row found at start-up belongs to a daemon that is gone. Reads use a second
connection and never wait for the writer. The clock is injectable: tests move it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from functools import wraps
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import aiosqlite
import msgspec

from taskd.models import Job, JobLogs, JobStatus, NodeInfo, TaskCounts
from taskd.store.base import (
    Claimed,
    ClaimRequest,
    Finished,
    Inserted,
    JobFilter,
    LogNote,
    NewJob,
    Outcome,
    ProgressNote,
    ScheduleState,
    StoreError,
    TickFired,
)
from taskd.store.batching import GroupCommit, Item, Operation
from taskd.store.core.notes import Notes, tell
from taskd.store.events import JobEvents
from taskd.store.health import StoreHealth
from taskd.store.sqlite import activity, files, jobs, nodes, reads, schedules
from taskd.store.sqlite.errors import is_space_error, store_error
from taskd.store.sqlite.jobs import PRUNE_SLICE, Tx
from taskd.store.sqlite.schema import migrate

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# The WAL is checkpointed into the database once it holds this many pages (SQLite's
# default, stated), and a WAL that grew past WAL_SIZE_LIMIT (a big batch, a checkpoint
# held up) is cut back to it once checkpointed, so that its space is given back.
WAL_AUTOCHECKPOINT = 1000
WAL_SIZE_LIMIT = 16 * 1024 * 1024
CHECK_NOTED = 1.0  # seconds: a start-up check that takes longer is logged at info


def _transact(
    db: sqlite3.Connection,
    clock: Callable[[], float],
    operations: list[tuple[Any, list[Any]]],
    notes: Notes,
) -> list[list[Any]]:
    """In the writer's thread: the operations of a batch in one IMMEDIATE transaction."""
    db.execute("BEGIN IMMEDIATE")
    try:
        tx = Tx(db, clock(), notes)
        outputs = [operation(tx, items) for operation, items in operations]
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return outputs


def _reads(method: Callable[P, Any]) -> Callable[P, Any]:
    """SQLite's exceptions leave the store as StoreError, with the database named."""

    @wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
        try:
            return await method(*args, **kwargs)
        except sqlite3.Error as exc:
            store = args[0]
            assert isinstance(store, SqliteStore)
            raise store_error(exc, store.path) from exc

    return wrapper


def _writes(method: Callable[P, Any]) -> Callable[P, Any]:
    """As `_reads`, and each write's end is reported to the store's health."""

    @wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
        store = args[0]
        assert isinstance(store, SqliteStore)
        try:
            result = await method(*args, **kwargs)
        except sqlite3.Error as exc:
            error = store_error(exc, store.path)
            await store._write_failed(method.__name__, exc, error)
            raise error from exc
        await store._write_succeeded(method.__name__)
        return result

    return wrapper


class SqliteStore:
    """The embedded job store."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "FULL",
        busy_timeout: float = 5.0,
        group: int | None = None,
        allow_empty: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.description = f"sqlite:{path}"
        self.events = JobEvents()
        self.health = StoreHealth(f"job store {path}")
        self._file = path  # the file itself, symlinks resolved, once open
        self._synchronous = synchronous
        self._busy_timeout_ms = int(busy_timeout * 1000)
        # The database and its side files are the owner's, or also its group's to read.
        self._group = group
        self._mode = 0o600 if group is None else 0o640
        self._allow_empty = allow_empty
        self._clock = clock
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._lock_fd: int | None = None
        self._commits: GroupCommit[Tx] = GroupCommit(self._run_batch)
        self._schedules: dict[str, str] = {}  # worker -> digest of its schedules
        self._short_of_space = False  # a write failed for want of space since the last reclaim
        self._reclaiming = False

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        self._take_file()
        try:
            files.secure(self._file, self._mode, self._group)  # left more open by an older taskd
            self._writer = await self._connect()
            await self._check(self._writer)
            await self._configure(self._writer)
            await self._checkpoint_at_start(self._writer)
            await migrate(self._writer, self.path)
            files.write_marker(self._file, self._mode)
            # We hold the lock: the daemons these rows name are gone, their jobs abandoned.
            await self._writer.execute("UPDATE nodes SET expires = NULL")
            files.secure(self._file, self._mode, self._group)  # the -wal and -shm now exist
            self._reader = await self._connect()
            await self._reader.execute_fetchall("PRAGMA query_only = 1")
            await self._reader.execute_fetchall(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        except sqlite3.Error as exc:
            await self.close()
            raise store_error(exc, self.path, "cannot open job store") from exc
        except asyncio.CancelledError:
            await self._abandon()
            raise
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

    async def _abandon(self) -> None:
        """Give up opening (a stop during start-up) without waiting for SQLite: interrupt a
        check in progress; a statement waiting for another process's lock cannot be
        interrupted, so its connection (and our lock) are left for the process's exit."""
        for connection in (self._reader, self._writer):
            if connection is not None:
                with suppress(sqlite3.Error, ValueError):
                    await connection.interrupt()

    def _take_file(self) -> None:
        """Resolve the database's name to the file itself, create its folder, lock it."""
        self._file = Path(os.path.realpath(self.path))
        files.make_folder(self._file.parent, self._group)
        self._lock_fd = files.lock_database(self._file, self._mode, self._group, name=self.path)

    async def _check(self, connection: aiosqlite.Connection) -> None:
        """Refuse a damaged database, and an empty one where taskd had created a store."""
        started = time.monotonic()
        rows = [row[0] for row in await connection.execute_fetchall("PRAGMA quick_check(5)")]
        took = time.monotonic() - started
        logger.log(
            logging.INFO if took > CHECK_NOTED else logging.DEBUG,
            "checked job store %s (PRAGMA quick_check) in %.2f s",
            self.path,
            took,
        )
        if rows != ["ok"]:
            problems = "; ".join(" ".join(row.split()) for row in rows)  # on one line
            raise StoreError(
                f"job store {self.path} is damaged (PRAGMA quick_check: {problems}): "
                f"stop taskd, keep a copy of {self._file}, then restore a backup or recover "
                f"what is readable (sqlite3 {self._file} .recover | sqlite3 new.db)"
            )
        ((tables,),) = await connection.execute_fetchall("SELECT count(*) FROM sqlite_master")
        marker = files.marker_path(self._file)
        if tables or not marker.exists():
            return
        if not self._allow_empty:
            raise StoreError(
                f"job store {self.path} is empty, but taskd had created a job store there "
                f"({marker} says when): the file was truncated, replaced or deleted, and its "
                "jobs are gone. Restore it from a backup; or, to start with an empty store, "
                f"start taskd once with --allow-empty-store (or remove {marker})"
            )
        logger.warning(
            "job store %s was empty although taskd had created one there; starting with an "
            "empty store, as --allow-empty-store asks",
            self.path,
        )

    async def _connect(self) -> aiosqlite.Connection:
        connection = await aiosqlite.connect(self._file, isolation_level=None)
        connection.row_factory = sqlite3.Row  # rows are read by column name
        return connection

    async def _configure(self, connection: aiosqlite.Connection) -> None:
        rows = list(await connection.execute_fetchall("PRAGMA journal_mode = WAL"))
        if rows[0][0] != "wal":
            raise StoreError(f"job store {self.path}: cannot switch to WAL mode ({rows[0][0]})")
        # Each read to its end: a statement left open would keep a checkpoint from running.
        for pragma in (
            f"synchronous = {self._synchronous}",
            f"busy_timeout = {self._busy_timeout_ms}",
            f"wal_autocheckpoint = {WAL_AUTOCHECKPOINT}",
            f"journal_size_limit = {WAL_SIZE_LIMIT}",
        ):
            await connection.execute_fetchall(f"PRAGMA {pragma}")

    async def _checkpoint_at_start(self, connection: aiosqlite.Connection) -> None:
        """A WAL left behind (a crash, a full disk at the last stop) gives its space back."""
        if _size(Path(f"{self._file}-wal")) == 0:
            return  # nothing to give back, and no need to wait for a lock another holds
        try:
            await self._checkpoint(connection)
        except sqlite3.Error as exc:  # the writes that follow say whether it matters
            logger.warning("cannot checkpoint the WAL of %s at start: %s", self.path, exc)

    async def _checkpoint(self, connection: aiosqlite.Connection) -> None:
        """Copy the WAL into the database and truncate it to nothing, if no reader needs it."""
        wal = Path(f"{self._file}-wal")
        before = _size(wal)
        await connection.execute_fetchall("PRAGMA wal_checkpoint(TRUNCATE)")
        if (after := _size(wal)) < before:
            logger.info(
                "checkpointed %s: %d bytes given back (%d left)", wal, before - after, after
            )

    # -- health --------------------------------------------------------------------------

    async def _write_failed(self, operation: str, exc: sqlite3.Error, error: StoreError) -> None:
        self.health.failed(operation, str(error))
        if is_space_error(exc):
            first = not self._short_of_space
            self._short_of_space = True
            await self._reclaim_space(logging.WARNING if first else logging.DEBUG)

    async def _write_succeeded(self, operation: str) -> None:
        if self.health.succeeded(operation) and self._short_of_space:
            self._short_of_space = False
            await self._reclaim_space()  # the WAL may have grown meanwhile: give that back

    async def _reclaim_space(self, level: int = logging.WARNING) -> None:
        """Checkpoint the WAL and truncate it, from the reader (the writer may be busy); on a
        full disk this works once the database has room for the WAL's pages."""
        if self._reclaiming or self._reader is None:
            return
        self._reclaiming = True
        try:
            await self._checkpoint(self._reader)
        except sqlite3.Error as exc:
            logger.log(level, "cannot checkpoint the WAL of %s: %s", self.path, exc)
        finally:
            self._reclaiming = False

    async def _run_batch(self, operations: list[tuple[Any, list[Any]]]) -> list[list[Any]]:
        """A batch of writes as one transaction, run whole in the writer's thread."""
        # aiosqlite runs each call in its connection's thread; `_execute` hands that thread
        # a function of ours, so that a transaction costs one hop instead of one per statement.
        writer: Any = self._connection(self._writer)
        notes = Notes()
        outputs: list[list[Any]] = await writer._execute(
            _transact, writer._conn, self._clock, operations, notes
        )
        tell(self.events, notes)
        return outputs

    async def _read(self, read: Callable[..., R], *args: Any) -> R:
        """A read function run whole in the reader's thread."""
        reader: Any = self._connection(self._reader)
        result: R = await reader._execute(read, reader._conn, *args)
        return result

    def _connection(self, connection: aiosqlite.Connection | None) -> aiosqlite.Connection:
        if connection is None:
            raise StoreError(f"job store {self.path} is closed")
        return connection

    # -- nodes ---------------------------------------------------------------------------

    @_writes
    async def register_node(self, node: str, ttl: float) -> str:
        (worker,) = await self._commits.submit(nodes.register, [(node, ttl)])
        return worker

    @_writes
    async def leave(self, worker: str) -> None:
        await self._commits.submit(nodes.leave, [worker])

    @_writes
    async def renew(self, worker: str, job_ids: Sequence[int], lease: float) -> list[int]:
        (lost,) = await self._commits.submit(nodes.renew, [(worker, list(job_ids), lease)])
        return lost

    async def announce_schedules(self, worker: str, digest: str) -> None:
        # One daemon per file: there is nobody to compare with, so memory will do.
        self._schedules[worker] = digest

    @_reads
    async def nodes(self) -> list[NodeInfo]:
        alive = await self._read(reads.nodes, self._clock())
        return [msgspec.structs.replace(n, schedules=self._schedules.get(n.worker)) for n in alive]

    # -- job writes ----------------------------------------------------------------------

    @_writes
    async def insert(self, new: Sequence[NewJob]) -> list[Inserted]:
        if not new:
            return []
        return await self._commits.submit(jobs.insert_jobs, list(new))

    @_writes
    async def insert_and_claim(
        self, new: Sequence[NewJob], claim: ClaimRequest
    ) -> tuple[list[Inserted], Claimed]:
        (result,) = await self._commits.submit(jobs.insert_and_claim, [(list(new), claim)])
        return result

    @_writes
    async def claim(self, request: ClaimRequest) -> Claimed:
        (claimed,) = await self._commits.submit(jobs.claim_jobs, [request])
        return claimed

    @_writes
    async def finish(
        self, outcomes: Sequence[Outcome], claim: ClaimRequest | None = None
    ) -> Finished:
        if claim is None:
            if not outcomes:
                return Finished(jobs=[])
            return Finished(jobs=await self._commits.submit(jobs.finish_jobs, list(outcomes)))
        if not outcomes:  # a claim alone: its health is the claims'
            return Finished(jobs=[], claimed=await self.claim(claim))
        (finished,) = await self._commits.submit(jobs.finish_and_claim, [(list(outcomes), claim)])
        return finished

    @_writes
    async def set_waiting(self, job_id: int, epoch: int, worker: str, waiting: bool) -> bool:
        (changed,) = await self._commits.submit(
            jobs.set_waiting, [(job_id, epoch, worker, waiting)]
        )
        return changed

    @_writes
    async def recover(self, quarantine_after: int) -> list[Job]:
        (recovered,) = await self._commits.submit(jobs.recover_jobs, [quarantine_after])
        return recovered

    @_writes
    async def cancel(self, job_id: int) -> Job:
        (job,) = await self._commits.submit(jobs.cancel_jobs, [job_id])
        return job

    @_writes
    async def retry(self, job_id: int) -> Job:
        (job,) = await self._commits.submit(jobs.retry_jobs, [job_id])
        return job

    @_writes
    async def prune(self, older_than: Mapping[JobStatus, float]) -> int:
        deleted = 0
        for status, age in older_than.items():
            deleted += await self._in_slices(jobs.prune_jobs, (status, age))
        if (ticks_age := older_than.get("succeeded")) is not None:
            # A tick's record is kept as long as the succeeded jobs it may have started.
            await self._in_slices(schedules.prune_ticks, ticks_age)
        return deleted

    async def _in_slices(self, operation: Operation[Tx, Item, int], item: Item) -> int:
        """Repeat a deleting write until it deletes less than a slice."""
        total = 0
        while True:
            (count,) = await self._commits.submit(operation, [item])
            total += count
            if count < PRUNE_SLICE:
                return total

    @_writes
    async def record_activity(
        self,
        progress: Sequence[ProgressNote],
        lines: Sequence[LogNote],
        dropped: Mapping[int, int] | None = None,
    ) -> None:
        if progress or lines or dropped:
            await self._commits.submit(
                activity.record_activity, [(list(progress), list(lines), dict(dropped or {}))]
            )

    # -- job reads -----------------------------------------------------------------------

    @_reads
    async def job_logs(self, job_id: int) -> JobLogs | None:
        return await self._read(activity.job_logs, job_id)

    @_reads
    async def get(self, job_id: int) -> Job | None:
        return await self._read(reads.get, job_id)

    @_reads
    async def list_jobs(self, query: JobFilter) -> list[Job]:
        return await self._read(reads.list_jobs, query)

    @_reads
    async def counts(self) -> list[TaskCounts]:
        return await self._read(reads.counts, self._clock())

    @_reads
    async def queue_depth(self) -> int:
        return await self._read(reads.queue_depth)

    # -- schedules -----------------------------------------------------------------------

    @_reads
    async def schedule_states(self, ids: Sequence[str] | None = None) -> list[ScheduleState]:
        return await self._read(reads.schedule_states, ids)

    @_writes
    async def add_schedules(self, ids: Sequence[str], first_seen: float) -> None:
        if ids:
            await self._commits.submit(schedules.add_schedules, [(i, first_seen) for i in ids])

    @_writes
    async def cover_schedules(self, ids: Sequence[str], until: float) -> None:
        if ids:
            await self._commits.submit(schedules.cover_schedules, [(i, until) for i in ids])

    @_writes
    async def set_paused(
        self, schedule: str, paused: bool, *, covered_until: float | None = None
    ) -> bool:
        (changed,) = await self._commits.submit(
            schedules.set_paused, [(schedule, paused, covered_until)]
        )
        return changed

    @_writes
    async def fire_tick(
        self,
        schedule: str,
        tick: float | None,
        jobs: Sequence[NewJob],
        *,
        covered_until: float | None = None,
        claim: ClaimRequest | None = None,
    ) -> TickFired:
        (fired,) = await self._commits.submit(
            schedules.fire_ticks, [(schedule, tick, jobs, covered_until, claim)]
        )
        return fired


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
