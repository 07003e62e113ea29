"""A write transaction, and what it will tell this daemon and the others once committed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from taskd.store.core.notes import Notes


@dataclass(slots=True)
class Tx:
    """A write transaction (or, for inserts, statements that each commit on their own): its
    connection, the schema's name, the store's name in notices, and its notes."""

    db: Any  # asyncpg.Connection
    s: str
    sender: str
    notes: Notes = field(default_factory=Notes)

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        return list(await self.db.fetch(sql, *args))
