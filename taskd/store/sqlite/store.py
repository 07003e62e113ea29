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
from collections.abc import Callable
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import msgspec

from taskd.models import NodeInfo
from taskd.store.base import StoreError
from taskd.store.core.dialect import Operation, Tx
from taskd.store.core.notes import Notes
from taskd.store.core.statements import Steps, run_steps
from taskd.store.core.store import SqlStore
from taskd.store.sqlite import files
from taskd.store.sqlite.dialect import SqliteSql, execute
from taskd.store.sqlite.errors import is_space_error, store_error
from taskd.store.sqlite.schema import migrate

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The WAL is checkpointed into the database once it holds this many pages (SQLite's
# default, stated), and a WAL that grew past WAL_SIZE_LIMIT (a big batch, a checkpoint
# held up) is cut back to it once checkpointed, so that its space is given back.
WAL_AUTOCHECKPOINT = 1000
WAL_SIZE_LIMIT = 16 * 1024 * 1024
CHECK_NOTED = 1.0  # seconds: a start-up check that takes longer is logged at info


def _transact(
    db: sqlite3.Connection,
    clock: Callable[[], float],
    operations: list[tuple[Operation, list[Any]]],
    notes: Notes,
) -> list[list[Any]]:
    """In the writer's thread: the operations of a batch in one IMMEDIATE transaction."""
    db.execute("BEGIN IMMEDIATE")
    try:
        now = clock()
        tx, run = Tx(SqliteSql(now), notes), partial(execute, db, now)
        outputs = [run_steps(operation(tx, items), run) for operation, items in operations]
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return outputs


def _run_read(db: sqlite3.Connection, now: float, read: Callable[..., Steps[T]], args: Any) -> T:
    """In the reader's thread: a whole read."""
    return run_steps(read(SqliteSql(now), *args), partial(execute, db, now))


class SqliteStore(SqlStore):
    """The embedded job store."""

    _key_taken = sqlite3.IntegrityError

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
        super().__init__(f"sqlite:{path}", str(path))
        self.path = path
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
        # One writer: every write goes through the one writer connection anyway.
        self._commits = self._inserts = self._claims = self._group_commit(self._run_batch)
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

    def _store_error(self, exc: Exception) -> StoreError | None:
        return store_error(exc, self.path) if isinstance(exc, sqlite3.Error) else None

    async def _write_failed(self, operation: str, exc: Exception, error: StoreError) -> None:
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

    async def _run_batch(
        self, operations: list[tuple[Operation, list[Any]]], notes: Notes
    ) -> list[list[Any]]:
        """A batch of writes as one transaction, run whole in the writer's thread."""
        # aiosqlite runs each call in its connection's thread; `_execute` hands that thread
        # a function of ours, so that a transaction costs one hop instead of one per statement.
        writer: Any = self._connection(self._writer)
        outputs: list[list[Any]] = await writer._execute(
            _transact, writer._conn, self._clock, operations, notes
        )
        return outputs

    async def _read(self, read: Callable[..., Steps[T]], *args: Any) -> T:
        """A read run whole in the reader's thread."""
        reader: Any = self._connection(self._reader)
        result: T = await reader._execute(_run_read, reader._conn, self._clock(), read, args)
        return result

    def _connection(self, connection: aiosqlite.Connection | None) -> aiosqlite.Connection:
        if connection is None:
            raise StoreError(f"job store {self.path} is closed")
        return connection

    # -- nodes: one daemon per file, so there is nobody to compare schedules with ---------

    async def announce_schedules(self, worker: str, digest: str) -> None:
        self._schedules[worker] = digest  # memory will do

    async def nodes(self) -> list[NodeInfo]:
        alive = await super().nodes()
        return [msgspec.structs.replace(n, schedules=self._schedules.get(n.worker)) for n in alive]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
