"""The job store: the interface (base), its backends, and what they share."""

from pathlib import Path

from taskd.config import PostgresOptions, SqliteOptions, is_postgres
from taskd.store.base import (
    Claimed,
    ClaimRequest,
    Failure,
    Finished,
    Hold,
    Inserted,
    InvalidTransition,
    JobFilter,
    JobNotFound,
    LimitState,
    LogNote,
    MissedTicks,
    NewJob,
    Outcome,
    ProgressNote,
    ScheduleState,
    SharedLimit,
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
    "Hold",
    "Inserted",
    "InvalidTransition",
    "JobEvents",
    "JobFilter",
    "JobNotFound",
    "LimitState",
    "LogNote",
    "MissedTicks",
    "NewJob",
    "Outcome",
    "ProgressNote",
    "ScheduleState",
    "SharedLimit",
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
    postgres: PostgresOptions | None = None,
    file_group: int | None = None,
    allow_empty: bool = False,
) -> Store:
    """The store a database URL names (not opened yet): `sqlite://PATH` or
    `postgresql://...` (asyncpg's form of libpq's URLs).

    For SQLite, `file_group` (the gid of `[sqlite] group`) may read the database's files,
    and `allow_empty` lets a store that taskd had created and that is now empty start empty.
    """
    if is_postgres(url):
        from taskd.store.postgres.store import PostgresStore

        shared = postgres or PostgresOptions()
        return PostgresStore(
            url,
            schema=shared.schema,
            pool_size=shared.pool_size,
            connect_timeout=shared.connect_timeout,
        )
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
    raise StoreError(
        f"unsupported database {url!r}: use sqlite:///path/to/taskd.db or "
        "postgresql://user@host/dbname"
    )
