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

from taskd.models import FINISHED_STATUSES, Job, JobLogs, JobStatus, NodeInfo, TaskCounts
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
from taskd.store.events import JobEvents
from taskd.store.health import StoreHealth
from taskd.store.sqlite import activity, checks, files, jobs, nodes, reads, schedules
from taskd.store.sqlite.errors import is_damage, store_error
from taskd.store.sqlite.jobs import PRUNE_SLICE, Tx
from taskd.store.sqlite.schema import migrate
from taskd.store.sqlite.space import WAL_AUTOCHECKPOINT, WAL_SIZE_LIMIT, WalSpace

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


def _transact(
    db: sqlite3.Connection,
    clock: Callable[[], float],
    operations: list[tuple[Any, list[Any]]],
    space: WalSpace,
) -> list[list[Any]]:
    """In the writer's thread: the operations of a batch in one IMMEDIATE transaction."""
    space.before_transaction(db)
    db.execute("BEGIN IMMEDIATE")
    try:
        tx = Tx(db, clock())
        outputs = [operation(tx, items) for operation, items in operations]
        db.execute("COMMIT")
    except BaseException as exc:
        if db.in_transaction:
            db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            space.failed(db, exc)
        raise
    space.committed(db)
    return outputs


def _take_over(tx: Tx, items: list[None]) -> list[None]:
    """We hold the lock: the daemons the node rows name are gone, their jobs abandoned; and
    the file is in use until a clean stop marks it closed."""
    tx.db.execute("UPDATE nodes SET expires = NULL")
    checks.set_closed_cleanly(tx.db, False)
    return [None]


def _reads(method: Callable[P, Any]) -> Callable[P, Any]:
    """SQLite's exceptions leave the store as StoreError, with the database named."""

    @wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
        try:
            return await method(*args, **kwargs)
        except sqlite3.Error as exc:
            store = args[0]
            assert isinstance(store, SqliteStore)
            raise store._error(exc) from exc

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
            error = store._error(exc)
            store.health.failed(method.__name__, str(error))
            raise error from exc
        store.health.succeeded(method.__name__)
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
        self._created = False  # this start created the database file
        self._opened = False
        self._damaged = False  # SQLite found damage: the next start checks the whole file
        self._commits: GroupCommit[Tx] = GroupCommit(self._run_batch)
        self._schedules: dict[str, str] = {}  # worker -> digest of its schedules
        self._space = WalSpace(path)  # used in the writer's thread only

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        self._take_file()
        try:
            files.secure(self._file, self._mode, self._group)  # left more open by an older taskd
            self._writer = await self._connect()
            await self._in_writer(checks.check_pages, self.path, self._file)
            await self._in_writer(
                checks.check_not_emptied,
                self.path,
                self._file,
                created=self._created,
                allow_empty=self._allow_empty,
            )
            await self._configure(self._writer)
            await self._in_writer(self._space.at_start)
            await migrate(self._writer, self.path)
            await self._run_batch([(_take_over, [None])])
            files.secure(self._file, self._mode, self._group)  # the -wal and -shm now exist
            self._reader = await self._connect()
            await self._reader.execute_fetchall("PRAGMA query_only = 1")
            await self._reader.execute_fetchall(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
            files.write_marker(self._file, self._mode)
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
        self._opened = True

    async def close(self) -> None:
        await self._commits.stop()
        await self._disconnect(self._reader)
        self._reader = None
        if self._opened and self._writer is not None:
            await self._mark_closed_cleanly()
            await self._in_writer(self._space.at_stop)  # no reader is left to hold the WAL
        await self._disconnect(self._writer)
        self._writer = None
        if self._lock_fd is not None:
            if self._created and not self._opened:  # a refused start leaves no new file behind
                files.remove_created(self._file)
            os.close(self._lock_fd)
            self._lock_fd = None
        self._opened = False

    async def _mark_closed_cleanly(self) -> None:
        if self._damaged:
            logger.warning(
                "job store %s: SQLite found damage while taskd ran; the next start checks the "
                "whole file (PRAGMA quick_check)",
                self.path,
            )
            return
        try:
            await self._in_writer(checks.set_closed_cleanly, True)
        except sqlite3.Error as exc:  # the next start checks the file: slower, no harm
            logger.warning("cannot mark job store %s as closed cleanly: %s", self.path, exc)

    def _error(self, exc: sqlite3.Error) -> StoreError:
        """SQLite's error as the StoreError callers get; damage is remembered for the next
        start."""
        self._damaged |= is_damage(exc)
        return store_error(exc, self.path)

    async def _disconnect(self, connection: aiosqlite.Connection | None) -> None:
        if connection is not None:
            try:
                await connection.close()
            except sqlite3.Error as exc:
                logger.warning("closing %s: %s", self.path, exc)

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
        self._space = WalSpace(self._file)
        files.make_folder(self._file.parent, self._group)
        self._lock_fd, self._created = files.lock_database(
            self._file, self._mode, self._group, name=self.path
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

    async def _in_writer(self, function: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        """`function(connection, *args, **kwargs)` run whole in the writer connection's thread."""
        writer: Any = self._connection(self._writer)
        result: R = await writer._execute(function, writer._conn, *args, **kwargs)
        return result

    async def _run_batch(self, operations: list[tuple[Any, list[Any]]]) -> list[list[Any]]:
        """A batch of writes as one transaction, run whole in the writer's thread."""
        # aiosqlite runs each call in its connection's thread; `_execute` hands that thread
        # a function of ours, so that a transaction costs one hop instead of one per statement.
        return await self._in_writer(_transact, self._clock, operations, self._space)

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
        items = list(new)
        return await self._commits.submit(
            jobs.insert_jobs, items, lambda inserted: self._after_insert(items, inserted)
        )

    def _after_insert(
        self, new: list[NewJob], inserted: list[Inserted], claimed: Claimed | None = None
    ) -> None:
        """Announce the new jobs that are pending (a claim in the same write took some)."""
        now = self._clock()
        taken = {job.id for job in claimed.jobs} if claimed is not None else set()
        delays = [
            job.delay if job.run_at is None else job.run_at - now
            for job, row in zip(new, inserted, strict=True)
            if not row.duplicate and row.job_id not in taken
        ]
        if delays:
            self.events.due(min(delays))

    @_writes
    async def insert_and_claim(
        self, new: Sequence[NewJob], claim: ClaimRequest
    ) -> tuple[list[Inserted], Claimed]:
        items = list(new)
        (result,) = await self._commits.submit(
            jobs.insert_and_claim,
            [(items, claim)],
            lambda results: self._after_insert(items, *results[0]),
        )
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
            recorded = await self._commits.submit(
                jobs.finish_jobs, list(outcomes), lambda done: self._after_finish(done, outcomes)
            )
            return Finished(jobs=recorded)
        if not outcomes:  # a claim alone: its health is the claims'
            return Finished(jobs=[], claimed=await self.claim(claim))
        (finished,) = await self._commits.submit(
            jobs.finish_and_claim,
            [(list(outcomes), claim)],
            lambda results: self._after_finish(results[0].jobs, outcomes),
        )
        return finished

    def _after_finish(
        self, recorded: Sequence[Job | None], outcomes: Sequence[Outcome] | None = None
    ) -> None:
        """Tell listeners of ended attempts (`outcomes` None: recovered, i.e. interrupted)."""
        now = self._clock()
        for index, job in enumerate(recorded):
            if job is None:
                continue
            if job.status in FINISHED_STATUSES:
                self.events.finished(job)
            else:
                if outcomes is None or outcomes[index].status == "retry":
                    self.events.retrying(job)
                self.events.due(job.run_at - now)

    @_writes
    async def set_waiting(self, job_id: int, epoch: int, worker: str, waiting: bool) -> bool:
        (changed,) = await self._commits.submit(
            jobs.set_waiting, [(job_id, epoch, worker, waiting)]
        )
        if changed and waiting:
            self.events.due(0)  # the job's task has room for another of its jobs
        return changed

    @_writes
    async def recover(self, quarantine_after: int) -> list[Job]:
        (recovered,) = await self._commits.submit(
            jobs.recover_jobs, [quarantine_after], self._after_recover
        )
        return recovered

    def _after_recover(self, results: list[list[Job]]) -> None:
        recovered = [job for jobs_of_one in results for job in jobs_of_one]
        self._after_finish(recovered)

    @_writes
    async def cancel(self, job_id: int) -> Job:
        (job,) = await self._commits.submit(jobs.cancel_jobs, [job_id], self._after_cancel)
        return job

    def _after_cancel(self, cancelled: list[Job]) -> None:
        for job in cancelled:
            self.events.finished(job)
            self.events.cancel_requested(job.id)

    @_writes
    async def retry(self, job_id: int) -> Job:
        (job,) = await self._commits.submit(jobs.retry_jobs, [job_id], lambda _: self.events.due(0))
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
            schedules.fire_ticks, [(schedule, tick, jobs, covered_until, claim)], self._after_fire
        )
        return fired

    def _after_fire(self, firings: list[TickFired]) -> None:
        for fired in firings:
            taken = {job.id for job in fired.claimed.jobs} if fired.claimed is not None else set()
            if fired.fired and any(not job.joined and job.id not in taken for job in fired.jobs):
                self.events.due(0)
                return
