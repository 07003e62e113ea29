"""Why a job is not running yet, and its timeline: pure functions over what the store holds.

The daemon gathers the facts (the job with its errors, its task's limit and running jobs,
the store's clock, the slots of this daemon and of the others sharing the store) and
`explain` turns them into a reason code and a sentence.
"""

from __future__ import annotations

import msgspec

from taskd.models import Job, counted, format_duration, utc_stamp
from taskd.protocol import TimelineEvent, WhyResult


class LimitFact(msgspec.Struct, frozen=True):
    """A shared limit the job's task counts against, and how it stands."""

    name: str
    running: int  # its tasks' running jobs, whoever runs them
    concurrency: int | None = None
    rate: str | None = None  # "25/s"
    next_start: float | None = None  # when its rate next allows a start


class Facts(msgspec.Struct, frozen=True):
    """What decides whether a pending job can start now."""

    now: float
    task_loaded: bool
    concurrency: int | None  # the task's limit, if it has one
    task_running: int  # the task's running jobs, whoever runs them
    busy: int  # slots taken: this daemon's, and the running jobs of the others alive
    workers: int  # this daemon's slots and those of the others alive
    stopping: bool
    paused_since: float | None = None  # the task is paused (`taskctl pause`) since then
    rate_limit: str | None = None  # the task's rate limit ("10/s"), if it has one
    next_start: float | None = None  # when that limit next allows a start
    parents: tuple[tuple[int, str, str], ...] = ()  # (id, task, status) of those it waits for
    daemons: int = 1  # alive and sharing the store, this one included
    limits: tuple[LimitFact, ...] = ()  # the shared limits its task counts against
    # The task's `limit_key` and the job's value of it: its concurrency (task_running) and
    # its rate limit (next_start) are those of that value.
    limit_key: str | None = None
    key_value: str | None = None


def explain(job: Job, facts: Facts) -> WhyResult:
    """The reason code, the sentence and the timeline of `job`."""
    reason, message, until = _reason(job, facts)
    now = facts.now
    return WhyResult(
        id=job.id,
        task=job.task,
        status=job.status,
        reason=reason,
        message=f"job {job.id} ({job.task}) {message}",
        until=until,
        timeline=timeline(job),
        at=facts.paused_since if reason == "task_paused" else until or _named_moment(job, now),
    )


def _named_moment(job: Job, now: float) -> float | None:
    """The moment the sentence names (in UTC), which a client may show in its own zone."""
    if job.status == "running":
        return job.started_at
    if job.status in ("succeeded", "failed", "cancelled"):
        return job.finished_at
    return job.run_at if job.run_at > now and not job.blocked else None


def _reason(job: Job, facts: Facts) -> tuple[str, str, float | None]:
    now = facts.now
    if job.status == "running":
        where = f" on {job.worker}" if job.worker else ""
        since = f" since {_when(job.started_at, now)}" if job.started_at else ""
        return "running", f"is running attempt {_of(job)}{where}{since}", None
    if job.status == "succeeded":
        return "succeeded", f"succeeded at {_when(job.finished_at, now)}", None
    if job.status in ("failed", "cancelled"):
        ended = f"{job.status} at {_when(job.finished_at, now)}"
        return job.status, f"{ended}: {job.error}" if job.error else ended, None
    if job.blocked and facts.parents:
        waits = ", ".join(f"job {id_} ({task}, {status})" for id_, task, status in facts.parents)
        return "parents", f"waits for {waits}", None
    if not facts.task_loaded:
        return "unknown_task", f"waits for task {job.task}, which taskd has not loaded", None
    if facts.stopping:
        return "draining", "waits: taskd is stopping and starts no new jobs", None
    if facts.paused_since is not None:
        since = utc_stamp(facts.paused_since)
        return "task_paused", f"waits: task {job.task} is paused (since {since})", None
    if job.run_at > now:
        if job.attempts > 0:
            message = (
                f"waits for a retry: attempt {job.attempts} of {job.max_attempts} failed"
                f"{': ' + job.error if job.error else ''}; attempt {job.attempts + 1} "
                f"starts at {_when(job.run_at, now)}"
            )
            return "retry_backoff", message, job.run_at
        return "delayed", f"waits for its delay, until {_when(job.run_at, now)}", job.run_at
    per = with_key = ""
    if facts.limit_key is not None:
        per = f" per {facts.limit_key} {facts.key_value!r}"
        with_key = f" with {facts.limit_key} {facts.key_value!r}"
    if facts.rate_limit is not None and facts.next_start is not None and facts.next_start > now:
        message = (
            f"waits for its rate limit ({facts.rate_limit}{per}): next start at "
            f"{utc_stamp(facts.next_start)}"
        )
        return "rate_limit", message, facts.next_start
    if facts.concurrency is not None and facts.task_running >= facts.concurrency:
        message = (
            f"waits for its task's concurrency limit ({facts.concurrency}{per}): "
            f"{counted(facts.task_running, 'job')} of {job.task}{with_key} running"
        )
        return "concurrency_limit", message, None
    if (shared := _shared_limit(facts)) is not None:
        return shared
    if facts.busy >= facts.workers:
        busy = "its one worker is" if facts.workers == 1 else f"all {facts.workers} workers are"
        if facts.daemons > 1:
            busy = f"all {facts.workers} workers of {facts.daemons} daemons are"
        message = f"waits for a free worker: {busy} busy"
        return "workers_busy", message, None
    return "due", "is due and starts as soon as a worker claims it", None


def _shared_limit(facts: Facts) -> tuple[str, str, float | None] | None:
    """The first shared limit that holds the task's jobs back, if one does: its rate (until
    its next start), or its concurrency."""
    for limit in facts.limits:
        if limit.rate is not None and (limit.next_start or 0.0) > facts.now:
            assert limit.next_start is not None
            message = (
                f"waits for shared limit {limit.name} ({limit.rate}): next start at "
                f"{utc_stamp(limit.next_start)}"
            )
            return "shared_limit", message, limit.next_start
    for limit in facts.limits:
        if limit.concurrency is not None and limit.running >= limit.concurrency:
            message = (
                f"waits for shared limit {limit.name} (concurrency {limit.concurrency},"
                f" {limit.running} running)"
            )
            return "shared_limit", message, None
    return None


def timeline(job: Job) -> list[TimelineEvent]:
    """Created, each attempt's start (where recorded) and end, retries, finished."""
    events = [TimelineEvent(job.created_at, "created", message=f"by {job.origin}")]
    for error in job.errors:
        attempt = error.attempt if error.kind != "retried" else None
        if error.started_at is not None:
            events.append(TimelineEvent(error.started_at, "started", attempt, error.worker))
        # An older taskd wrote "interrupted: worker ..." (the kind twice, once shown).
        message = error.message.removeprefix(f"{error.kind}: ")
        events.append(TimelineEvent(error.at, error.kind, attempt, error.worker, message))
    ended = {error.started_at for error in job.errors if error.started_at is not None}
    cancelled = any(error.kind == "cancelled" for error in job.errors)  # while running
    if job.started_at is not None and job.attempts and job.started_at not in ended:
        # The latest attempt's start and worker are on the job.
        start = TimelineEvent(job.started_at, "started", job.attempts, job.worker)
        events.append(start)
    if job.status in ("succeeded", "failed") and job.finished_at is not None:
        outcome = job.error if job.status == "failed" else None
        events.append(TimelineEvent(job.finished_at, job.status, job.attempts, job.worker, outcome))
    elif job.status == "cancelled" and job.finished_at is not None and not cancelled:
        events.append(TimelineEvent(job.finished_at, "cancelled", message=job.error))
    return sorted(events, key=lambda event: event.at)


def _of(job: Job) -> str:
    return f"{job.attempts} of {job.max_attempts}"


def _when(at: float | None, now: float) -> str:
    """A time in UTC (the daemon's zone need not be its callers'), and how far from now:
    `2026-11-30 12:00:05 UTC (in 55s)`."""
    if at is None:
        return "an unknown time"
    stamp = utc_stamp(at)
    delta = at - now
    if abs(delta) < 1:
        return f"{stamp} (now)"
    span = format_duration(abs(delta))
    return f"{stamp} (in {span})" if delta > 0 else f"{stamp} ({span} ago)"
