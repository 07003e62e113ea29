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
from taskd.store.health import StoreHealth

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
    "StoreHealth",
    "TickFired",
    "store_for",
]


def store_for(
    url: str,
    *,
    sqlite: SqliteOptions | None = None,
    file_group: int | None = None,
    allow_empty: bool = False,
) -> Store:
    """The store a database URL names (not opened yet): `sqlite://PATH` for now.

    `file_group` (the gid of `[sqlite] group`) may read the database's files; `allow_empty`
    lets a store that taskd had created and that is now empty start empty.
    """
    if url.startswith("sqlite://"):
        from taskd.store.sqlite import SqliteStore

        options = sqlite or SqliteOptions()
        return SqliteStore(
            Path(url.removeprefix("sqlite://")),
            synchronous=options.synchronous.upper(),
            busy_timeout=options.busy_timeout,
            group=file_group,
            allow_empty=allow_empty,
        )
    raise StoreError(f"unsupported database {url!r}: use sqlite:///path/to/taskd.db")
