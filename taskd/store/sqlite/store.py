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
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import msgspec

from taskd.models import NodeInfo, WebhookRule
from taskd.store.base import StoreError
from taskd.store.core.dialect import Operation, Tx
from taskd.store.core.notes import Notes
from taskd.store.core.statements import Statement, Steps, run_steps
from taskd.store.core.store import SqlStore
from taskd.store.sqlite import checks, files
from taskd.store.sqlite.dialect import SqliteSql, execute
from taskd.store.sqlite.errors import is_damage, store_error
from taskd.store.sqlite.schema import migrate
from taskd.store.sqlite.space import WAL_AUTOCHECKPOINT, WAL_SIZE_LIMIT, WalSpace

logger = logging.getLogger(__name__)

R = TypeVar("R")


def _transact(
    db: sqlite3.Connection,
    clock: Callable[[], float],
    operations: list[tuple[Operation, list[Any]]],
    notes: Notes,
    space: WalSpace,
    webhooks: Sequence[WebhookRule],
    limit_keys: Mapping[str, str],
) -> list[list[Any]]:
    """In the writer's thread: the operations of a batch in one IMMEDIATE transaction."""
    space.before_transaction(db)
    db.execute("BEGIN IMMEDIATE")
    try:
        now = clock()
        tx, run = Tx(SqliteSql(now), notes, webhooks, limit_keys), partial(execute, db, now)
        outputs = [run_steps(operation(tx, items), run) for operation, items in operations]
        db.execute("COMMIT")
    except BaseException as exc:
        if db.in_transaction:
            db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            space.failed(db, exc)
        raise
    space.committed(db)
    return outputs


def _run_read(db: sqlite3.Connection, now: float, read: Callable[..., Steps[R]], args: Any) -> R:
    """In the reader's thread: a whole read, in one snapshot (its statements see the same
    commits: a job's row and its errors, say, not the row before a finish and the errors
    after it)."""
    db.execute("BEGIN")
    try:
        return run_steps(read(SqliteSql(now), *args), partial(execute, db, now))
    finally:
        db.execute("COMMIT")  # a read-only transaction: it only lets go of the snapshot


def _take_over(tx: Tx, items: list[None]) -> Steps[list[None]]:
    """We hold the lock: the daemons the node rows name are gone, their jobs abandoned; and
    the file is in use until a clean stop marks it closed."""
    yield Statement("UPDATE nodes SET expires = NULL")
    yield Statement(checks.SET_CLOSED_CLEANLY, {"closed": False})
    return [None]


# Each connection's page cache, in KiB (a negative cache_size), set rather than left to how
# SQLite was built: a bound on the memory the database takes. Enough: the pages a claim and
# a finish touch stay in it next to a backlog of 100,000 keyed jobs (a drain reads no
# database page from the OS either way); a larger cache only keeps more of what was written.
PAGE_CACHE_KIB = 2 * 1024


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
        self._created = False  # this start created the database file
        self._opened = False
        self._damaged = False  # SQLite found damage: the next start checks the whole file
        # One writer: every write goes through the one writer connection anyway.
        self._commits = self._inserts = self._claims = self._group_commit(self._run_batch)
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
            await self._run_batch([(_take_over, [None])], Notes())
            files.secure(self._file, self._mode, self._group)  # the -wal and -shm now exist
            self._reader = await self._connect()
            await self._reader.execute_fetchall("PRAGMA query_only = 1")
            await self._reader.execute_fetchall(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
            await self._reader.execute_fetchall(f"PRAGMA cache_size = -{PAGE_CACHE_KIB}")
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

    def _store_error(self, exc: Exception) -> StoreError | None:
        """SQLite's error as the StoreError callers get; damage is remembered for the next
        start."""
        if not isinstance(exc, sqlite3.Error):
            return None
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
            f"cache_size = -{PAGE_CACHE_KIB}",
        ):
            await connection.execute_fetchall(f"PRAGMA {pragma}")

    async def _in_writer(self, function: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        """`function(connection, *args, **kwargs)` run whole in the writer connection's thread."""
        writer: Any = self._connection(self._writer)
        result: R = await writer._execute(function, writer._conn, *args, **kwargs)
        return result

    async def _run_batch(
        self, operations: list[tuple[Operation, list[Any]]], notes: Notes
    ) -> list[list[Any]]:
        """A batch of writes as one transaction, run whole in the writer's thread."""
        # aiosqlite runs each call in its connection's thread; `_execute` hands that thread
        # a function of ours, so that a transaction costs one hop instead of one per statement.
        return await self._in_writer(
            _transact, self._clock, operations, notes, self._space, self.webhooks, self.limit_keys
        )

    async def _read(self, read: Callable[..., Steps[R]], *args: Any) -> R:
        """A read run whole in the reader's thread."""
        reader: Any = self._connection(self._reader)
        result: R = await reader._execute(_run_read, reader._conn, self._clock(), read, args)
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
