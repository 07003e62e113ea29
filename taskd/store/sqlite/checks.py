"""What a SQLite job store is checked for as it opens: damage, after a stop that was not
clean, and the loss of a store that taskd had created. Run in the writer connection's thread.

`PRAGMA quick_check` reads the whole file (about a second for a million jobs), so it runs only
when the mark in `store_state` does not say that the last taskd closed the file cleanly and met
no damage: after kill -9, a crash or a power cut, on a file from elsewhere, and once after
an upgrade to the schema that has the mark.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

from taskd.store.base import StoreError
from taskd.store.sqlite import files

logger = logging.getLogger(__name__)

CHECK_NOTED = 1.0  # seconds: a start-up check that takes longer is logged at info


def closed_cleanly(db: sqlite3.Connection) -> bool:
    """Whether the last taskd to use the file closed it cleanly and met no damage."""
    try:
        row = db.execute("SELECT closed_cleanly FROM store_state").fetchone()
    except sqlite3.Error:  # no such table (a new or older file), or a damaged file: check it
        return False
    return bool(row and row[0])


SET_CLOSED_CLEANLY = "UPDATE store_state SET closed_cleanly = :closed"


def set_closed_cleanly(db: sqlite3.Connection, closed: bool) -> None:
    db.execute(SET_CLOSED_CLEANLY, {"closed": closed})


def check_pages(db: sqlite3.Connection, name: Path, file: Path) -> None:
    """Refuse a damaged database: `PRAGMA quick_check`, unless the file was closed cleanly."""
    if closed_cleanly(db):
        logger.debug("job store %s was closed cleanly: no PRAGMA quick_check", name)
        return
    started = time.monotonic()
    rows = [row[0] for row in db.execute("PRAGMA quick_check(5)")]
    took = time.monotonic() - started
    logger.log(
        logging.INFO if took > CHECK_NOTED else logging.DEBUG,
        "checked job store %s (PRAGMA quick_check) in %.2f s",
        name,
        took,
    )
    if rows != ["ok"]:
        problems = "; ".join(" ".join(row.split()) for row in rows)  # on one line
        raise StoreError(
            f"job store {name} is damaged (PRAGMA quick_check: {problems}): "
            f"stop taskd, keep a copy of {file}, then restore a backup or recover "
            f"what is readable (sqlite3 {file} .recover | sqlite3 new.db)"
        )


def check_not_emptied(
    db: sqlite3.Connection, name: Path, file: Path, *, created: bool, allow_empty: bool
) -> None:
    """Refuse an empty database (`created`: missing) where taskd had created a job store."""
    (tables,) = db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    marker = files.existing_marker(file)
    if tables or marker is None:
        return
    state = "missing" if created else "empty"
    if not allow_empty:
        raise StoreError(
            f"job store {name} is {state}, but taskd had created a job store there "
            f"({marker} says when): the file was truncated, replaced or deleted, and its "
            "jobs are gone. Restore it from a backup; or, to start with an empty store, "
            f"start taskd once with --allow-empty-store (or remove {marker})"
        )
    logger.warning(
        "job store %s was %s although taskd had created one there; starting with an "
        "empty store, as --allow-empty-store asks",
        name,
        state,
    )
