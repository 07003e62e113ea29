"""SQLite's errors as StoreErrors that say what went wrong with which file, and what to do."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from taskd.store.base import StoreError

# Errors the file system gives when it has no room (or a quota, or a file size limit).
SPACE_ERRORS = (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR)


def primary_code(exc: BaseException) -> int | None:
    """SQLite's primary result code (SQLITE_BUSY, SQLITE_FULL, ...) of an error, if known."""
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def is_space_error(exc: BaseException) -> bool:
    return primary_code(exc) in SPACE_ERRORS


def is_damage(exc: sqlite3.Error) -> bool:
    return primary_code(exc) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def advice(exc: sqlite3.Error, path: Path) -> tuple[str, str]:
    """What the person at the terminal can do about an error of the database at `path`: while
    taskd runs, and when it cannot start (the same unless taskd gets over it by itself)."""
    code = primary_code(exc)
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        hint = (
            f"another process holds a lock on it (fuser -v {path} shows which); nothing was "
            "written, try again"
        )
    elif code == sqlite3.SQLITE_FULL:
        full = (
            f"the file system holding it is full: check the free space (df -h {path.parent}) "
            "and free some"
        )
        return (
            f"{full}; nothing was written, and taskd carries on by itself once there is room",
            f"{full}, then start taskd again",
        )
    elif code == sqlite3.SQLITE_IOERR:
        hint = (
            "a read or write failed: check the free space, quotas and file size limits of its "
            "file system and the disk's health (dmesg); nothing was written"
        )
    elif code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        hint = (
            f"the file is damaged: stop taskd, keep a copy of {path}, then restore a backup "
            f"or recover what is readable (sqlite3 {path} .recover | sqlite3 new.db)"
        )
    elif code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM):
        hint = (
            f"taskd must be able to write it and to create {path.name}-wal and "
            f"{path.name}-shm beside it: check the owner and mode of the file and its folder "
            f"(ls -la {path.parent}), chattr flags (lsattr {path}) and read-only mounts"
        )
    else:
        hint = ""
    return hint, hint


def store_error(exc: sqlite3.Error, path: Path, doing: str = "job store") -> StoreError:
    """`doing PATH: SQLite's message; what to do`, as the StoreError callers get."""
    running, starting = (f"; {hint}" if hint else "" for hint in advice(exc, path))
    what = f"{doing} {path}: {exc}"
    return StoreError(what + running, at_start_up=what + starting)
