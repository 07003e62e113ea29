"""The schedules' writes: targeted updates of their state, and firing a tick atomically."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from taskd.models import FiredJob
from taskd.store.base import ClaimRequest, MissedTicks, NewJob, TickFired
from taskd.store.core import webhooks
from taskd.store.core.dialect import Tx
from taskd.store.core.jobs import claim_in, insert_jobs
from taskd.store.core.statements import Statement, Steps
from taskd.store.rows import fired_jobs_json

# Covering a schedule until :until: the instant only moves forward.
COVER = (
    "covered_until = CASE WHEN schedules.covered_until > :until THEN schedules.covered_until"
    " ELSE :until END"
)

Firing = tuple[
    str, float | None, Sequence[NewJob], float | None, ClaimRequest | None, MissedTicks | None
]


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
        results.append(bool(rows))
    return results


def fire_ticks(tx: Tx, items: list[Firing]) -> Steps[list[TickFired]]:
    results = []
    for schedule, tick, jobs, covered_until, claim, missed in items:
        results.append((yield from _fire(tx, schedule, tick, jobs, covered_until, claim, missed)))
    return results


def _fire(
    tx: Tx,
    schedule: str,
    tick: float | None,
    jobs: Sequence[NewJob],
    covered_until: float | None,
    claim: ClaimRequest | None,
    missed: MissedTicks | None = None,
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
    return TickFired(fired=True, jobs=fired, claimed=(yield from claim_in(tx, claim)))


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
