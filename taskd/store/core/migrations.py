"""What every store says of its schema's version as it brings it up to date (each keeps its
migrations, and runs them its own way)."""

from __future__ import annotations

import logging

from taskd.store.base import StoreError

logger = logging.getLogger(__name__)

# Migrations both stores make the same way; `{s}` is where a backend puts its schema's name
# and a dot (PostgreSQL) or nothing (SQLite).
# The W3C traceparent of whoever created the job (tracing: its attempts are that span's
# children), at most 55 characters, checked before it is stored.
TRACEPARENT_COLUMN = "ALTER TABLE {s}jobs ADD COLUMN traceparent text"


def versions_to_apply(version: int, latest: int, name: str) -> range:
    """The migrations a schema at `version` needs; a schema newer than this taskd's is refused."""
    if version > latest:
        raise StoreError(
            f"job store {name} has schema version {version}, newer than this taskd "
            f"understands ({latest}); upgrade taskd"
        )
    return range(version, latest)


def log_migrated(version: int, latest: int, name: str) -> None:
    if version == 0:
        logger.info("created the job store %s at schema version %d", name, latest)
    elif version < latest:
        logger.info("job store %s migrated from schema version %d to %d", name, version, latest)
