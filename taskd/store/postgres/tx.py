"""A write transaction, and what it will tell this daemon and the others once committed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from taskd.models import Job


@dataclass(slots=True)
class Notes:
    """What a transaction changed that listeners care about (see `Store.events`)."""

    due: float | None = None  # seconds until the earliest job it made claimable
    finished: list[Job] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)
    retrying: list[Job] = field(default_factory=list)  # an attempt failed; another follows
    told_due: float | None = None  # made due by a statement that notified the others itself

    def made_due(self, delay: float) -> None:
        self.due = delay if self.due is None else min(self.due, delay)

    def __bool__(self) -> bool:
        return (
            self.due is not None
            or bool(self.finished)
            or bool(self.cancelled)
            or bool(self.retrying)
        )


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

    def ended(self, job: Job, due_in: float) -> None:
        """Note a job an outcome or a recovery wrote: finished, or due again."""
        if job.status in ("succeeded", "failed", "cancelled"):
            self.notes.finished.append(job)
        else:
            self.notes.made_due(due_in)
