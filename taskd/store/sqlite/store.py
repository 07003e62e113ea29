"""The job store on SQLite (aiosqlite): WAL, one writer connection with group commit.

One daemon owns a database file (an exclusive lock on `<file>.lock` says so), so every
node row found at start-up belongs to a daemon that is gone. Reads use a second
connection and never wait for the writer. The clock is injectable: tests move it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from functools import wraps
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import aiosqlite
import msgspec

from taskd.models import FINISHED_STATUSES, Job, JobStatus, NodeInfo, TaskCounts
from taskd.store.base import (
    Claimed,
    ClaimRequest,
    Finished,
    Inserted,
    JobFilter,
    NewJob,
    Outcome,
    ScheduleState,
    StoreError,
    TickFired,
)
from taskd.store.batching import GroupCommit, Item, Operation
from taskd.store.events import JobEvents
from taskd.store.sqlite import jobs, nodes, reads, schedules
from taskd.store.sqlite.jobs import PRUNE_SLICE, Tx
from taskd.store.sqlite.schema import migrate

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


def _hint(exc: sqlite3.Error) -> str:
    text = str(exc)
    if "locked" in text or "busy" in text:
        return " (another process holds a lock on the database; nothing was written, try again)"
    if "disk" in text or "full" in text:
        return " (check the free space and the file system; nothing was written)"
    return ""


def _transact(
    db: sqlite3.Connection, clock: Callable[[], float], operations: list[tuple[Any, list[Any]]]
) -> list[list[Any]]:
    """In the writer's thread: the operations of a batch in one IMMEDIATE transaction."""
    db.execute("BEGIN IMMEDIATE")
    try:
        tx = Tx(db, clock())
        outputs = [operation(tx, items) for operation, items in operations]
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return outputs


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

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "FULL",
        busy_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.description = f"sqlite:{path}"
        self.events = JobEvents()
        self._synchronous = synchronous
        self._busy_timeout_ms = int(busy_timeout * 1000)
        self._clock = clock
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._lock_fd: int | None = None
        self._commits: GroupCommit[Tx] = GroupCommit(self._run_batch)
        self._schedules: dict[str, str] = {}  # worker -> digest of its schedules

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StoreError(f"cannot create {self.path.parent}: {exc.strerror}") from None
        self._lock()
        try:
            self._writer = await self._connect()
            await self._configure(self._writer)
            await migrate(self._writer, self.path)
            # We hold the lock: the daemons these rows name are gone, their jobs abandoned.
            await self._writer.execute("UPDATE nodes SET expires = NULL")
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
        connection = await aiosqlite.connect(self.path, isolation_level=None)
        connection.row_factory = sqlite3.Row  # rows are read by column name
        return connection

    async def _configure(self, connection: aiosqlite.Connection) -> None:
        rows = list(await connection.execute_fetchall("PRAGMA journal_mode = WAL"))
        if rows[0][0] != "wal":
            raise StoreError(f"job store {self.path}: cannot switch to WAL mode ({rows[0][0]})")
        await connection.execute(f"PRAGMA synchronous = {self._synchronous}")
        await connection.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")

    async def _run_batch(self, operations: list[tuple[Any, list[Any]]]) -> list[list[Any]]:
        """A batch of writes as one transaction, run whole in the writer's thread."""
        # aiosqlite runs each call in its connection's thread; `_execute` hands that thread
        # a function of ours, so that a transaction costs one hop instead of one per statement.
        writer: Any = self._connection(self._writer)
        outputs: list[list[Any]] = await writer._execute(
            _transact, writer._conn, self._clock, operations
        )
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

    @_translate_errors
    async def register_node(self, node: str, ttl: float) -> str:
        (worker,) = await self._commits.submit(nodes.register, [(node, ttl)])
        return worker

    @_translate_errors
    async def leave(self, worker: str) -> None:
        await self._commits.submit(nodes.leave, [worker])

    @_translate_errors
    async def renew(self, worker: str, job_ids: Sequence[int], lease: float) -> list[int]:
        (lost,) = await self._commits.submit(nodes.renew, [(worker, list(job_ids), lease)])
        return lost

    async def announce_schedules(self, worker: str, digest: str) -> None:
        # One daemon per file: there is nobody to compare with, so memory will do.
        self._schedules[worker] = digest

    @_translate_errors
    async def nodes(self) -> list[NodeInfo]:
        alive = await self._read(reads.nodes, self._clock())
        return [msgspec.structs.replace(n, schedules=self._schedules.get(n.worker)) for n in alive]

    # -- job writes ----------------------------------------------------------------------

    @_translate_errors
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

    @_translate_errors
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

    @_translate_errors
    async def claim(self, request: ClaimRequest) -> Claimed:
        (claimed,) = await self._commits.submit(jobs.claim_jobs, [request])
        return claimed

    @_translate_errors
    async def finish(
        self, outcomes: Sequence[Outcome], claim: ClaimRequest | None = None
    ) -> Finished:
        if claim is None:
            if not outcomes:
                return Finished(jobs=[])
            recorded = await self._commits.submit(
                jobs.finish_jobs, list(outcomes), self._after_finish
            )
            return Finished(jobs=recorded)
        (finished,) = await self._commits.submit(
            jobs.finish_and_claim,
            [(list(outcomes), claim)],
            lambda results: self._after_finish(results[0].jobs),
        )
        return finished

    def _after_finish(self, recorded: Sequence[Job | None]) -> None:
        now = self._clock()
        for job in recorded:
            if job is None:
                continue
            if job.status in FINISHED_STATUSES:
                self.events.finished(job)
            else:
                self.events.due(job.run_at - now)

    @_translate_errors
    async def set_waiting(self, job_id: int, epoch: int, worker: str, waiting: bool) -> bool:
        (changed,) = await self._commits.submit(
            jobs.set_waiting, [(job_id, epoch, worker, waiting)]
        )
        if changed and waiting:
            self.events.due(0)  # the job's task has room for another of its jobs
        return changed

    @_translate_errors
    async def recover(self, quarantine_after: int) -> list[Job]:
        (recovered,) = await self._commits.submit(
            jobs.recover_jobs, [quarantine_after], self._after_recover
        )
        return recovered

    def _after_recover(self, results: list[list[Job]]) -> None:
        recovered = [job for jobs_of_one in results for job in jobs_of_one]
        self._after_finish(recovered)

    @_translate_errors
    async def cancel(self, job_id: int) -> Job:
        (job,) = await self._commits.submit(jobs.cancel_jobs, [job_id], self._after_cancel)
        return job

    def _after_cancel(self, cancelled: list[Job]) -> None:
        for job in cancelled:
            self.events.finished(job)
            self.events.cancel_requested(job.id)

    @_translate_errors
    async def retry(self, job_id: int) -> Job:
        (job,) = await self._commits.submit(jobs.retry_jobs, [job_id], lambda _: self.events.due(0))
        return job

    @_translate_errors
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

    # -- job reads -----------------------------------------------------------------------

    @_translate_errors
    async def get(self, job_id: int) -> Job | None:
        return await self._read(reads.get, job_id)

    @_translate_errors
    async def list_jobs(self, query: JobFilter) -> list[Job]:
        return await self._read(reads.list_jobs, query)

    @_translate_errors
    async def counts(self) -> list[TaskCounts]:
        return await self._read(reads.counts, self._clock())

    @_translate_errors
    async def queue_depth(self) -> int:
        return await self._read(reads.queue_depth)

    # -- schedules -----------------------------------------------------------------------

    @_translate_errors
    async def schedule_states(self, ids: Sequence[str] | None = None) -> list[ScheduleState]:
        return await self._read(reads.schedule_states, ids)

    @_translate_errors
    async def add_schedules(self, ids: Sequence[str], first_seen: float) -> None:
        if ids:
            await self._commits.submit(schedules.add_schedules, [(i, first_seen) for i in ids])

    @_translate_errors
    async def cover_schedules(self, ids: Sequence[str], until: float) -> None:
        if ids:
            await self._commits.submit(schedules.cover_schedules, [(i, until) for i in ids])

    @_translate_errors
    async def set_paused(
        self, schedule: str, paused: bool, *, covered_until: float | None = None
    ) -> bool:
        (changed,) = await self._commits.submit(
            schedules.set_paused, [(schedule, paused, covered_until)]
        )
        return changed

    @_translate_errors
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
