"""Creating and migrating the schema, safely when several daemons start at once."""

from __future__ import annotations

from typing import Any

from taskd.store.core.migrations import log_migrated, versions_to_apply
from taskd.store.postgres.schema import MIGRATIONS


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
        for number in versions_to_apply(version, len(MIGRATIONS), description):
            for statement in MIGRATIONS[number]:
                await db.execute(statement.format(s=schema))
            await db.execute(f"INSERT INTO {schema}.migrations (version) VALUES ($1)", number + 1)
    log_migrated(version, len(MIGRATIONS), description)
