"""The job store: the interface (base), its backends, and what they share."""

from taskd.store.base import (
    Claimed,
    Inserted,
    InvalidTransition,
    JobFilter,
    JobNotFound,
    NewJob,
    Outcome,
    ScheduleState,
    Store,
    StoreError,
)
from taskd.store.events import JobEvents

__all__ = [
    "Claimed",
    "Inserted",
    "InvalidTransition",
    "JobEvents",
    "JobFilter",
    "JobNotFound",
    "NewJob",
    "Outcome",
    "ScheduleState",
    "Store",
    "StoreError",
]


def open_store(url: str) -> Store:
    """The store a database setting names: a file path (SQLite) for now."""
    from pathlib import Path

    from taskd.store.sqlite import SqliteStore

    return SqliteStore(Path(url))
