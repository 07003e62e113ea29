"""Flow control, written once for both stores: what holds a task's jobs back at claim time.

A claim first asks `holds` how many jobs of each held task it may start (its quota: 0 for a
paused task), hands those quotas to the dialect's claim, and asks for the next due time
with what is left of them. The state lives in the store (`paused_tasks`), so that every
daemon sharing it holds the same jobs back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from taskd.models import Job
from taskd.store.base import ClaimRequest
from taskd.store.core.dialect import Tx
from taskd.store.core.statements import Statement, Steps


@dataclass(slots=True)
class Holds:
    """What holds jobs back in one claim: the most jobs of a task it may start (`quotas`),
    and in how many seconds a task held now may start again (`wake`, None: not by itself)."""

    quotas: dict[str, int] = field(default_factory=dict)
    wake: float | None = None

    def left(self, jobs: list[Job]) -> dict[str, int]:
        """The quotas once these jobs have started."""
        left = dict(self.quotas)
        for job in jobs:
            if job.task in left:
                left[job.task] = max(0, left[job.task] - 1)
        return left


def holds(tx: Tx, request: ClaimRequest) -> Steps[Holds]:
    """What holds back the jobs a claim may take (a tiny table, read at each claim)."""
    if (lock := tx.sql.flow_lock(exclusive=False)) is not None:
        yield lock
    rows = yield Statement("SELECT task FROM {s}.paused_tasks")
    return Holds(quotas={row["task"]: 0 for row in rows})


# -- pausing a task --------------------------------------------------------------------


def set_task_paused(tx: Tx, items: list[tuple[str, bool]]) -> Steps[list[float | None]]:
    """Pause or resume tasks; for each, since when it is paused (None: it is not, now)."""
    results: list[float | None] = []
    for task, paused in items:
        if paused:
            if (lock := tx.sql.flow_lock(exclusive=True)) is not None:
                yield lock
            yield Statement(
                "INSERT INTO {s}.paused_tasks (task, since) VALUES (:task, :now)"
                " ON CONFLICT (task) DO NOTHING",
                {"task": task},
            )
            rows = yield Statement(
                "SELECT since FROM {s}.paused_tasks WHERE task = :task", {"task": task}
            )
            results.append(float(rows[0]["since"]))
        else:
            rows = yield Statement(
                "DELETE FROM {s}.paused_tasks WHERE task = :task RETURNING since", {"task": task}
            )
            if rows:
                tx.notes.made_due(0.0)  # its jobs may start again, on every daemon
            results.append(None)
    return results


def paused_tasks(sql: object) -> Steps[Mapping[str, float]]:
    """The paused tasks and since when (a read)."""
    rows = yield Statement("SELECT task, since FROM {s}.paused_tasks")
    return {row["task"]: float(row["since"]) for row in rows}


def started(tx: Tx, request: ClaimRequest, jobs: list[Job]) -> Steps[None]:
    """A claim started these jobs: what their limits count is brought up to date."""
    return
    yield  # a generator: limits that count starts write here
