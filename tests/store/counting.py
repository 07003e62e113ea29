"""What `Store.counts()` must say of the jobs, computed the slow way: over every job."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import pytest

from taskd.models import Job, TaskCounts
from taskd.store import JobFilter, Store
from taskd.store.core.deps import HELD


def job_counts(jobs: Sequence[Job], now: float) -> list[TaskCounts]:
    """Per task, its jobs by status, its oldest due pending job's age, its next due time."""
    tasks = sorted({job.task for job in jobs})
    entries = []
    for task in tasks:
        mine = [job for job in jobs if job.task == task]
        counts: dict[str, int] = {}
        for job in mine:
            counts[job.status] = counts.get(job.status, 0) + 1
        # A job waiting for its parents is never due (a Job shows it with its own time).
        pending = [job.run_at for job in mine if job.status == "pending" and not job.blocked]
        due = [run_at for run_at in pending if run_at <= now]
        later = [run_at for run_at in pending if now < run_at < HELD]
        entries.append(
            TaskCounts(task, counts, now - min(due) if due else None, min(later) if later else None)
        )
    return entries


@pytest.fixture(autouse=True)
async def counters_match_the_jobs(store: Store) -> AsyncIterator[None]:
    """After each test of a module that imports this, the counters are the jobs counted."""
    yield
    stored = await store.list_jobs(JobFilter(limit=100_000))
    counted = job_counts(stored, await store.clock())
    kept = await store.counts()
    assert kept == counted, (kept, counted)
