"""The job store: the interface (base), its backends, and what they share."""

from pathlib import Path

from taskd.config import SqliteOptions
from taskd.store.base import (
    Claimed,
    ClaimRequest,
    Failure,
    Finished,
    Inserted,
    InvalidTransition,
    JobFilter,
    JobNotFound,
    NewJob,
    Outcome,
    ScheduleState,
    Store,
    StoreError,
    TickFired,
)
from taskd.store.events import JobEvents

__all__ = [
    "ClaimRequest",
    "Claimed",
    "Failure",
    "Finished",
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
    "TickFired",
    "store_for",
]


def store_for(url: str, *, sqlite: SqliteOptions | None = None) -> Store:
    """The store a database URL names (not opened yet): `sqlite://PATH` for now."""
    if url.startswith("sqlite://"):
        from taskd.store.sqlite import SqliteStore

        options = sqlite or SqliteOptions()
        return SqliteStore(
            Path(url.removeprefix("sqlite://")),
            synchronous=options.synchronous.upper(),
            busy_timeout=options.busy_timeout,
        )
    raise StoreError(f"unsupported database {url!r}: use sqlite:///path/to/taskd.db")
