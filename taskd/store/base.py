"""The job store interface every backend implements, and the values that cross it.

Every execution of a task is a row in the store. The store enforces the uniqueness rules
(single-flight runs and unique keys), the state machine of a job, and fencing: only the
attempt that claimed a job may record its outcome.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

import msgspec

from taskd.models import AttemptError, FiredJob, Job, JobOrigin, JobStatus, TaskCounts
from taskd.store.events import JobEvents


class StoreError(Exception):
    """The store could not do what was asked (disk full, locked, corrupt); nothing was written."""


class JobNotFound(StoreError):
    def __init__(self, job_id: int) -> None:
        super().__init__(f"no job with id {job_id}")
        self.job_id = job_id


class InvalidTransition(StoreError):
    """The job is not in a state that allows the change (e.g. retry of a running job)."""


class NewJob(msgspec.Struct, frozen=True):
    """A job to insert; `payload` is msgpack already validated against the task's schema."""

    task: str
    payload: bytes
    origin: JobOrigin
    run_at: float
    max_attempts: int
    priority: int = 0
    key: str | None = None
    parent_id: int | None = None


class Inserted(msgspec.Struct, frozen=True):
    """The id of an inserted job, or of the active job with the same task and key."""

    job_id: int
    duplicate: bool


class Outcome(msgspec.Struct, frozen=True):
    """What one attempt of a claimed job came to, as its worker reports it.

    `epoch` (the job's claim count when this worker claimed it) and `owner` fence the
    write: it applies only while the job is still running that claim. `status` "pending"
    schedules a retry at `run_at`; `release` gives the job back without counting the
    attempt (graceful stop).
    """

    job_id: int
    epoch: int
    owner: str
    status: Literal["succeeded", "failed", "pending", "cancelled"]
    finished_at: float
    result: bytes | None = None
    error: AttemptError | None = None
    run_at: float | None = None
    release: bool = False


class Claimed(msgspec.Struct, frozen=True):
    """Jobs a claim handed out, and when the next pending job it could not take is due."""

    jobs: list[Job]
    next_due: float | None


class JobFilter(msgspec.Struct, frozen=True):
    statuses: Sequence[JobStatus] | None = None
    task: str | None = None
    limit: int = 50


class ScheduleState(msgspec.Struct):
    """What the store remembers of a schedule across restarts.

    `last_tick` is the latest tick fired (a tick is never fired twice); `covered_until` is
    the instant up to which every tick has been dealt with (fired, or deliberately not:
    paused, or dropped by catch_up), so that ticks after it and before a start-up are the
    missed ones. `last_jobs` are the jobs of the latest firing, one per task.
    """

    id: str
    last_tick: float | None = None
    paused: bool = False
    coalesced: int = 0
    covered_until: float | None = None
    fired_at: float | None = None
    last_jobs: list[FiredJob] = []


class Store(Protocol):
    """A durable job store. Batch methods take and return lists in the same order."""

    events: JobEvents
    description: str  # where the data lives, for status output

    async def open(self) -> None:
        """Create or migrate the schema; raise StoreError if the store cannot be used."""

    async def close(self) -> None: ...

    async def insert(self, jobs: Sequence[NewJob], now: float) -> list[Inserted]:
        """Insert jobs; one with the task and key of an active job returns that job instead."""

    async def claim(
        self, owner: str, limit: int, task_slots: Mapping[str, int], lease_until: float, now: float
    ) -> Claimed:
        """Mark up to `limit` due pending jobs running for `owner`, lowest priority first.

        `task_slots` caps how many jobs of a task may be claimed; tasks not in it are uncapped.
        """

    async def finish(self, outcomes: Sequence[Outcome]) -> list[Job | None]:
        """Record outcomes; each entry is the updated job, or None where fencing refused it."""

    async def renew(self, owner: str, job_ids: Sequence[int], lease_until: float) -> None:
        """Extend the leases `owner` holds on running jobs."""

    async def recover(self, now: float, quarantine_after: int, *, everything: bool) -> list[Job]:
        """Return interrupted running jobs (lease expired, or all if `everything`) to pending.

        The lost attempt is counted; a job interrupted `quarantine_after` times, or on its
        last attempt, fails instead.
        """

    async def cancel(self, job_id: int, now: float) -> Job:
        """Cancel a pending or running job; raise JobNotFound or InvalidTransition."""

    async def retry(self, job_id: int, now: float) -> Job:
        """Put a failed or cancelled job back to pending with its attempts reset."""

    async def get(self, job_id: int) -> Job | None:
        """One job with the errors of all its attempts."""

    async def list_jobs(self, query: JobFilter) -> list[Job]:
        """Jobs matching the filter, newest first."""

    async def counts(self, now: float) -> list[TaskCounts]:
        """Jobs per task and status, and per task the oldest due pending job's age."""

    async def queue_depth(self) -> int:
        """How many jobs are pending (cheap: for status lines updated as jobs come and go)."""

    async def next_due(self) -> float | None:
        """When the earliest pending job is due, or None if there is none."""

    async def prune(self, cutoffs: Mapping[JobStatus, float]) -> int:
        """Delete finished jobs of each status that finished before its cutoff."""

    async def schedule_states(self) -> list[ScheduleState]: ...

    async def save_schedule_states(self, states: Sequence[ScheduleState]) -> None: ...
