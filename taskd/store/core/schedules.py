"""The schedules' writes: targeted updates of their state, and firing a tick atomically."""

from __future__ import annotations

import time
from collections.abc import Sequence

import msgspec

from taskd.models import FiredJob, Job
from taskd.store.base import ClaimRequest, Hold, MissedTicks, NewJob, TickFired
from taskd.store.core import webhooks
from taskd.store.core.dialect import Tx
from taskd.store.core.jobs import CANCELLED, claim_in, insert_jobs, jobs_ended
from taskd.store.core.statements import Statement, Steps
from taskd.store.rows import JOB_COLUMNS, fired_jobs_json, job_from_row

# Covering a schedule until :until: the instant only moves forward.
COVER = (
    "covered_until = CASE WHEN schedules.covered_until > :until THEN schedules.covered_until"
    " ELSE :until END"
)

Firing = tuple[
    str,
    float | None,
    Sequence[NewJob],
    float | None,
    ClaimRequest | None,
    MissedTicks | None,
    Hold | None,
]
# What holding a tick's job does to it: claimed for :worker as a claim does (jobs.CLAIMED),
# leased until its due time plus :lease, but with no started_at: that marks a job held
# and not started, which a recovery puts back as it was (jobs.release_held).
HELD = (
    "status = 'running', attempts = attempts + 1, epoch = epoch + 1, started_at = NULL,"
    " worker = :worker, lease_expires = run_at + :lease, waiting = false,"
    " progress_done = NULL, progress_total = NULL, progress_message = NULL, progress_at = NULL"
)
# Pausing a schedule withdraws the jobs of its latest ticks that are not due yet: held ones
# (not started) and pending ones.
WITHDRAWN_TICKS = 2


def add_schedules(tx: Tx, items: list[tuple[str, float]]) -> Steps[list[None]]:
    yield Statement(
        "INSERT INTO {s}.schedules (id, covered_until) VALUES (:id, :until) ON CONFLICT (id)"
        " DO UPDATE SET covered_until = coalesce(schedules.covered_until, excluded.covered_until)",
        [{"id": schedule, "until": until} for schedule, until in items],
        many=True,
    )
    return [None] * len(items)


def cover_schedules(
    tx: Tx, items: list[tuple[str, float, MissedTicks | None]]
) -> Steps[list[None]]:
    for schedule, until, missed in items:
        if missed is not None:
            yield from _report_missed(tx, schedule, until, missed)
    yield Statement(
        "INSERT INTO {s}.schedules (id, covered_until) VALUES (:id, :until) ON CONFLICT (id)"
        f" DO UPDATE SET {COVER}",
        [{"id": schedule, "until": until} for schedule, until, _ in items],
        many=True,
    )
    return [None] * len(items)


def _report_missed(tx: Tx, schedule: str, until: float, missed: MissedTicks) -> Steps[None]:
    """Enqueue the schedule.missed deliveries of `missed` if this transaction is the one
    that moves the schedule's covered_until from where the missed ticks were counted: of the
    daemons that deal with the same ticks, the first reports them, the others find
    covered_until moved. Each tick missed is reported once, none twice."""
    deliveries = webhooks.schedule_events(tx, missed)
    if not deliveries:
        return
    owned = yield Statement(
        "UPDATE {s}.schedules SET covered_until = :until"
        " WHERE id = :id AND covered_until = :after RETURNING id",
        {"id": schedule, "until": until, "after": missed.after},
    )
    if owned:
        yield from insert_jobs(tx, deliveries)


def set_paused(tx: Tx, items: list[tuple[str, bool, float | None]]) -> Steps[list[bool]]:
    results = []
    for schedule, paused, covered_until in items:
        cover = f", {COVER}" if covered_until is not None else ""
        rows = yield Statement(
            "UPDATE {s}.schedules SET paused = :paused"
            + cover
            + " WHERE id = :id AND paused <> :paused RETURNING id",
            {"id": schedule, "paused": paused, "until": covered_until},
        )
        if rows and paused:
            yield from withdraw_early(tx, schedule)
        results.append(bool(rows))
    return results


def withdraw_early(tx: Tx, schedule: str) -> Steps[list[Job]]:
    """Cancel the jobs of the schedule's ticks fired ahead of their time (held and not
    started, or pending) that are not due yet: a paused or changed schedule must not run
    them. The daemon holding one hears of the cancel and drops it."""
    rows = yield Statement(
        "SELECT jobs FROM {s}.schedule_ticks WHERE schedule = :id ORDER BY tick DESC"
        f" LIMIT {WITHDRAWN_TICKS}",
        {"id": schedule},
    )
    ids = [
        job.id
        for row in rows
        if row["jobs"] is not None
        for job in fired_jobs_json.decode(row["jobs"])
        if not job.joined
    ]
    withdrawn = []
    for job_id in ids:
        cancelled = yield Statement(
            f"UPDATE {{s}}.jobs SET {CANCELLED} WHERE id = :id AND run_at > :now AND"
            " (status = 'pending' OR (status = 'running' AND started_at IS NULL))"
            f" RETURNING {JOB_COLUMNS}",
            {"id": job_id},
        )
        for row in cancelled:
            job = job_from_row(row)
            tx.notes.finished.append(job)
            tx.notes.cancelled.append(job.id)
            withdrawn.append(job)
    yield from jobs_ended(tx, withdrawn)
    return withdrawn


def ticks_started(
    tx: Tx, items: list[tuple[list[tuple[int, int]], float | None]]
) -> Steps[list[None]]:
    """Held jobs started, each list at its instant (time.monotonic(), None: now): the store's
    clock less how long ago that was (this write may come a while after the start)."""
    params = []
    for held, started in items:
        ago = 0.0 if started is None else max(0.0, time.monotonic() - started)
        params += [{"id": job_id, "epoch": epoch, "ago": ago} for job_id, epoch in held]
    yield Statement(
        "UPDATE {s}.jobs SET started_at = CASE WHEN run_at > :now - :ago THEN run_at"
        " ELSE :now - :ago END WHERE id = :id AND epoch = :epoch AND started_at IS NULL",
        params,
        many=True,
    )
    return [None] * len(items)


def fire_ticks(tx: Tx, items: list[Firing]) -> Steps[list[TickFired]]:
    results = []
    for schedule, tick, jobs, covered_until, claim, missed, hold in items:
        results.append(
            (yield from _fire(tx, schedule, tick, jobs, covered_until, claim, missed, hold))
        )
    return results


def _fire(
    tx: Tx,
    schedule: str,
    tick: float | None,
    jobs: Sequence[NewJob],
    covered_until: float | None,
    claim: ClaimRequest | None,
    missed: MissedTicks | None = None,
    hold: Hold | None = None,
) -> Steps[TickFired]:
    if missed is not None and covered_until is not None:
        yield from _report_missed(tx, schedule, covered_until, missed)
    cover = f"DO UPDATE SET {COVER}" if covered_until is not None else "DO NOTHING"
    yield Statement(
        "INSERT INTO {s}.schedules (id, covered_until) VALUES (:id, :until)"
        f" ON CONFLICT (id) {cover}",
        {"id": schedule, "until": covered_until},
    )
    if tick is not None:
        earlier = yield from _take_tick(schedule, tick)
        if earlier is not None:  # fired already, here or by another daemon
            return TickFired(fired=False, jobs=earlier)
    inserted = (yield from insert_jobs(tx, list(jobs))) if jobs else []
    fired = [
        FiredJob(task=job.task, id=row.job_id, joined=row.duplicate)
        for job, row in zip(jobs, inserted, strict=True)
    ]
    yield from _record_firing(schedule, tick, fired)
    held = (yield from _hold(tx, fired, hold)) if hold is not None else []
    claimed = yield from claim_in(tx, claim)
    return TickFired(fired=True, jobs=fired, claimed=claimed, held=held)


def _hold(tx: Tx, fired: list[FiredJob], hold: Hold) -> Steps[list[Job]]:
    """Hold the tick's new jobs for the worker (see HELD)."""
    held: list[Job] = []
    for job in fired:
        if job.joined:
            continue
        rows = yield Statement(
            f"UPDATE {{s}}.jobs SET {HELD} WHERE id = :id AND status = 'pending'"
            f" RETURNING {JOB_COLUMNS}",
            {"id": job.id, "worker": hold.worker, "lease": hold.lease},
        )
        held += map(job_from_row, rows)
    tx.notes.claimed(held)  # not news: nobody else is to claim them
    return held


def _take_tick(schedule: str, tick: float) -> Steps[list[FiredJob] | None]:
    """Record that the tick fires; None, or the jobs of its firing if it fired already."""
    # On PostgreSQL, a daemon firing the same tick at this moment makes this wait for it.
    taken = yield Statement(
        "INSERT INTO {s}.schedule_ticks (schedule, tick, fired_at) VALUES (:id, :tick, :now)"
        " ON CONFLICT DO NOTHING RETURNING tick",
        {"id": schedule, "tick": tick},
    )
    if taken:
        return None
    rows = yield Statement(
        "SELECT jobs FROM {s}.schedule_ticks WHERE schedule = :id AND tick = :tick",
        {"id": schedule, "tick": tick},
    )
    return fired_jobs_json.decode(rows[0]["jobs"])


def _record_firing(schedule: str, tick: float | None, fired: list[FiredJob]) -> Steps[None]:
    """The firing's jobs in the tick's record and the schedule's state."""
    encoded = msgspec.json.encode(fired).decode()
    if tick is not None:
        yield Statement(
            "UPDATE {s}.schedule_ticks SET jobs = :jobs WHERE schedule = :id AND tick = :tick",
            {"id": schedule, "tick": tick, "jobs": encoded},
        )
    yield Statement(
        "UPDATE {s}.schedules SET fired_at = :now, last_jobs = :jobs,"
        " coalesced = coalesced + :joined, last_tick = CASE"
        " WHEN CAST(:tick AS double precision) IS NULL OR last_tick > :tick THEN last_tick"
        " ELSE :tick END WHERE id = :id",
        {"id": schedule, "jobs": encoded, "tick": tick, "joined": sum(j.joined for j in fired)},
    )
