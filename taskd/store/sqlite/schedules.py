"""The schedules' writes: targeted updates of their state, and firing a tick atomically."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from taskd.models import FiredJob
from taskd.store.base import ClaimRequest, NewJob, TickFired
from taskd.store.rows import fired_jobs_json
from taskd.store.sqlite.jobs import PRUNE_SLICE, Tx, claim_in, fetch, insert_jobs

# What covering a schedule until :until means: the instant only moves forward.
COVER = "covered_until = max(coalesce(covered_until, :until), :until)"


def add_schedules(tx: Tx, items: list[tuple[str, float]]) -> list[None]:
    tx.db.executemany(
        "INSERT INTO schedules (id, covered_until) VALUES (?, ?) ON CONFLICT (id)"
        " DO UPDATE SET covered_until = coalesce(covered_until, excluded.covered_until)",
        items,
    )
    return [None] * len(items)


def cover_schedules(tx: Tx, items: list[tuple[str, float]]) -> list[None]:
    tx.db.executemany(
        "INSERT INTO schedules (id, covered_until) VALUES (:id, :until) ON CONFLICT (id)"
        f" DO UPDATE SET {COVER}",
        [{"id": schedule, "until": until} for schedule, until in items],
    )
    return [None] * len(items)


def set_paused(tx: Tx, items: list[tuple[str, bool, float | None]]) -> list[bool]:
    results = []
    for schedule, paused, covered_until in items:
        cover = f", {COVER}" if covered_until is not None else ""
        rows = fetch(
            tx,
            f"UPDATE schedules SET paused = :paused{cover} WHERE id = :id AND paused != :paused"
            " RETURNING id",
            {"id": schedule, "paused": paused, "until": covered_until},
        )
        results.append(bool(rows))
    return results


def fire_ticks(
    tx: Tx,
    items: list[tuple[str, float | None, Sequence[NewJob], float | None, ClaimRequest | None]],
) -> list[TickFired]:
    return [_fire(tx, *item) for item in items]


def _fire(
    tx: Tx,
    schedule: str,
    tick: float | None,
    jobs: Sequence[NewJob],
    covered_until: float | None,
    claim: ClaimRequest | None,
) -> TickFired:
    cover = f"DO UPDATE SET {COVER}" if covered_until is not None else "DO NOTHING"
    tx.db.execute(
        f"INSERT INTO schedules (id, covered_until) VALUES (:id, :until) ON CONFLICT (id) {cover}",
        {"id": schedule, "until": covered_until},
    )
    if tick is not None:
        claimed = fetch(
            tx,
            "INSERT INTO schedule_ticks (schedule, tick, fired_at) VALUES (?, ?, ?)"
            " ON CONFLICT DO NOTHING RETURNING tick",
            (schedule, tick, tx.now),
        )
        if not claimed:  # fired already, here or by another daemon
            rows = fetch(
                tx,
                "SELECT jobs FROM schedule_ticks WHERE schedule = ? AND tick = ?",
                (schedule, tick),
            )
            return TickFired(fired=False, jobs=fired_jobs_json.decode(rows[0]["jobs"]))
    inserted = insert_jobs(tx, list(jobs)) if jobs else []
    fired = [
        FiredJob(task=job.task, id=row.job_id, joined=row.duplicate)
        for job, row in zip(jobs, inserted, strict=True)
    ]
    encoded = msgspec.json.encode(fired).decode()
    if tick is not None:
        tx.db.execute(
            "UPDATE schedule_ticks SET jobs = ? WHERE schedule = ? AND tick = ?",
            (encoded, schedule, tick),
        )
    tx.db.execute(
        "UPDATE schedules SET fired_at = :now, last_jobs = :jobs,"
        " coalesced = coalesced + :joined,"
        " last_tick = CASE WHEN :tick IS NULL THEN last_tick"
        "   ELSE max(coalesce(last_tick, :tick), :tick) END"
        " WHERE id = :id",
        {
            "id": schedule,
            "now": tx.now,
            "jobs": encoded,
            "tick": tick,
            "joined": sum(job.joined for job in fired),
        },
    )
    return TickFired(fired=True, jobs=fired, claimed=claim_in(tx, claim))


def prune_ticks(tx: Tx, ages: list[float]) -> list[int]:
    """Forget ticks fired more than `age` seconds ago (a slice at a time)."""
    counts = []
    for age in ages:
        rows = fetch(
            tx,
            "DELETE FROM schedule_ticks WHERE (schedule, tick) IN (SELECT schedule, tick"
            f" FROM schedule_ticks WHERE fired_at < ? LIMIT {PRUNE_SLICE}) RETURNING tick",
            (tx.now - age,),
        )
        counts.append(len(rows))
    return counts
