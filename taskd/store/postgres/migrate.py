"""Creating and migrating the schema, safely when several daemons start at once."""

from __future__ import annotations

import logging
from typing import Any

from taskd.store.base import StoreError
from taskd.store.postgres.schema import MIGRATIONS

logger = logging.getLogger(__name__)


async def migrate(db: Any, schema: str, description: str) -> None:
    """Bring the schema to the latest version in one transaction, under an advisory lock
    that makes the other daemons starting at the same moment wait for it."""
    async with db.transaction():
        await db.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"taskd-migrations:{schema}"
        )
        await db.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        await db.execute(
            f"CREATE TABLE IF NOT EXISTS {schema}.migrations (version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        version = await db.fetchval(f"SELECT coalesce(max(version), 0) FROM {schema}.migrations")
        if version > len(MIGRATIONS):
            raise StoreError(
                f"job store {description} has schema version {version}, newer than this taskd "
                f"understands ({len(MIGRATIONS)}); upgrade taskd"
            )
        for number in range(version, len(MIGRATIONS)):
            for statement in MIGRATIONS[number]:
                await db.execute(statement.format(s=schema))
            await db.execute(f"INSERT INTO {schema}.migrations (version) VALUES ($1)", number + 1)
    if version == 0:
        logger.info("created the job store %s at schema version %d", description, len(MIGRATIONS))
    elif version < len(MIGRATIONS):
        logger.info(
            "job store %s migrated from schema version %d to %d",
            description,
            version,
            len(MIGRATIONS),
        )
