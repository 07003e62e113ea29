"""The WAL on a full disk: freed space goes to the database first.

Every commit is appended to `taskd.db-wal`, which is copied into the database and started
over once it holds WAL_AUTOCHECKPOINT pages. On a file system short of space the WAL grows
into whatever room is freed, while copying it into the database (which gives it back) needs
room in the database. So once a write fails for want of space, the writer checkpoints the
WAL and truncates it (`wal_checkpoint(TRUNCATE)`) at once, then before each transaction,
refusing the transaction while that finds no room, and after it, until the file system has
room for the WAL again. All of it runs in the writer connection's thread.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

from taskd.store.sqlite.errors import is_space_error

logger = logging.getLogger(__name__)

# The WAL is checkpointed into the database once it holds this many pages (SQLite's
# default, stated), and a WAL that grew past WAL_SIZE_LIMIT (a big batch, a checkpoint
# held up) is cut back to it once checkpointed, so that its space is given back.
WAL_AUTOCHECKPOINT = 1000
WAL_SIZE_LIMIT = 16 * 1024 * 1024
# A shortage of space ends when the file system has room for the WAL to grow to its
# checkpoint (1000 pages of 4 KiB) twice over.
ROOM_FOR_WAL = 8 * 1024 * 1024
# Short of space, a transaction starts only while the file system has this much room: a
# job's pages (its row and index entries) in the WAL and again in the database.
ROOM_FOR_COMMIT = 64 * 1024


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class WalSpace:
    """Whether the database's file system is short of space, and the checkpoints that follow."""

    def __init__(self, database: Path) -> None:
        self.database = database
        self.wal = Path(f"{database}-wal")
        self.short = False

    def checkpoint(self, db: sqlite3.Connection) -> int:
        """Copy the WAL into the database and truncate it to nothing, if no reader needs it;
        the bytes given back. Raises sqlite3.Error (SQLITE_FULL: no room in the database)."""
        before = size(self.wal)
        if before:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        return before - size(self.wal)

    def at_start(self, db: sqlite3.Connection) -> None:
        """A WAL left behind (a crash, a full disk at the last stop) gives its space back now
        if it grew past its limit or its file system is short of room; otherwise SQLite's
        checkpoints take it as writes come, and start-up does not wait for one."""
        if size(self.wal) <= WAL_SIZE_LIMIT and self._room() >= ROOM_FOR_WAL:
            return
        try:
            given = self.checkpoint(db)
        except sqlite3.Error as exc:  # the writes that follow say whether it matters
            logger.warning("cannot checkpoint the WAL of %s at start: %s", self.database, exc)
            if is_space_error(exc):
                self._begin_shortage()
            return
        if given:
            logger.info("checkpointed %s: %d bytes given back", self.wal, given)

    def before_transaction(self, db: sqlite3.Connection) -> None:
        """Short of space: the WAL's room goes to the database before anything else; raises
        the space error if there is none, or if the file system has no room left for a
        transaction's pages twice (in the WAL, then in the database when the WAL is copied
        back): then the transaction does not start. Without that room a commit could take
        the last of the space into the WAL, which then keeps it until space is freed."""
        if self.short:
            self.checkpoint(db)
            if self._room() < ROOM_FOR_COMMIT:
                full = sqlite3.OperationalError("database or disk is full")
                full.sqlite_errorcode = sqlite3.SQLITE_FULL  # as SQLite's own
                raise full

    def committed(self, db: sqlite3.Connection) -> None:
        if not self.short:
            return
        self._try_checkpoint(db)  # committed all the same; if it fails, the next write retries
        if (room := self._room()) >= ROOM_FOR_WAL:
            self.short = False
            logger.warning(
                "the file system of job store %s has room again (%d MiB free): its WAL is "
                "checkpointed as usual",
                self.database,
                room >> 20,
            )

    def failed(self, db: sqlite3.Connection, exc: sqlite3.Error) -> None:
        """A transaction failed and was rolled back: if for want of space, the shortage
        begins, and the WAL gives its room back now if the database has room for its pages."""
        if is_space_error(exc):
            if not self.short:
                self._begin_shortage()
            self._try_checkpoint(db)

    def at_stop(self, db: sqlite3.Connection) -> None:
        """A clean stop leaves no WAL behind, unless the database has no room for its pages."""
        try:
            self.checkpoint(db)
        except sqlite3.Error as exc:
            logger.warning(
                "cannot checkpoint the WAL of %s at stop (%s): it keeps %d bytes; free some "
                "space before taskd starts again",
                self.database,
                exc,
                size(self.wal),
            )

    def _begin_shortage(self) -> None:
        self.short = True
        logger.warning(
            "job store %s is short of space: until its file system has %d MiB free, its WAL "
            "is checkpointed and truncated around every write, and writes wait for room in "
            "the database",
            self.database,
            ROOM_FOR_WAL >> 20,
        )

    def _try_checkpoint(self, db: sqlite3.Connection) -> None:
        try:
            self.checkpoint(db)
        except sqlite3.Error as exc:
            logger.debug("cannot checkpoint the WAL of %s: %s", self.database, exc)

    def _room(self) -> int:
        try:
            info = os.statvfs(self.database.parent)
        except OSError:
            return 0
        return info.f_bavail * info.f_frsize
