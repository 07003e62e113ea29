"""The schedules' writes: targeted updates of their state, and firing a tick atomically."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from taskd.models import FiredJob
from taskd.store.base import ClaimRequest, NewJob, TickFired
from taskd.store.postgres.jobs import PRUNE_SLICE, claim_in, insert_jobs
from taskd.store.postgres.tx import Tx
from taskd.store.rows import fired_jobs_json

# Covering a schedule until $2: the instant only moves forward.
COVER = "covered_until = greatest(schedules.covered_until, $2)"


async def add_schedules(tx: Tx, items: list[tuple[str, float]]) -> list[None]:
    await tx.db.executemany(
        f"INSERT INTO {tx.s}.schedules (id, covered_until) VALUES ($1, $2) ON CONFLICT (id)"
        " DO UPDATE SET covered_until = coalesce(schedules.covered_until, excluded.covered_until)",
        items,
    )
    return [None] * len(items)


async def cover_schedules(tx: Tx, items: list[tuple[str, float]]) -> list[None]:
    await tx.db.executemany(
        f"INSERT INTO {tx.s}.schedules (id, covered_until) VALUES ($1, $2) ON CONFLICT (id)"
        f" DO UPDATE SET {COVER}",
        items,
    )
    return [None] * len(items)


async def set_paused(tx: Tx, items: list[tuple[str, bool, float | None]]) -> list[bool]:
    results = []
    for schedule, paused, covered_until in items:
        changed = await tx.db.fetchval(
            f"UPDATE {tx.s}.schedules SET paused = $3,"
            " covered_until = CASE WHEN $2::double precision IS NULL THEN covered_until"
            "   ELSE greatest(covered_until, $2) END"
            " WHERE id = $1 AND paused <> $3 RETURNING true",
            schedule,
            covered_until,
            paused,
        )
        results.append(bool(changed))
    return results


async def fire_ticks(
    tx: Tx,
    items: list[tuple[str, float | None, Sequence[NewJob], float | None, ClaimRequest | None]],
) -> list[TickFired]:
    return [await _fire(tx, *item) for item in items]


async def _fire(
    tx: Tx,
    schedule: str,
    tick: float | None,
    jobs: Sequence[NewJob],
    covered_until: float | None,
    claim: ClaimRequest | None,
) -> TickFired:
    s = tx.s
    cover = f"DO UPDATE SET {COVER}" if covered_until is not None else "DO NOTHING"
    await tx.db.execute(
        f"INSERT INTO {s}.schedules (id, covered_until) VALUES ($1, $2) ON CONFLICT (id) {cover}",
        schedule,
        covered_until,
    )
    if tick is not None:
        # A daemon firing the same tick at this moment makes this wait for its commit.
        claimed = await tx.db.fetchval(
            f"INSERT INTO {s}.schedule_ticks (schedule, tick, fired_at)"
            f" VALUES ($1, $2, {s}.now()) ON CONFLICT DO NOTHING RETURNING true",
            schedule,
            tick,
        )
        if not claimed:  # fired already, here or by another daemon
            fired = await tx.db.fetchval(
                f"SELECT jobs FROM {s}.schedule_ticks WHERE schedule = $1 AND tick = $2",
                schedule,
                tick,
            )
            return TickFired(fired=False, jobs=fired_jobs_json.decode(fired))
    inserted = await insert_jobs(tx, list(jobs)) if jobs else []
    fired_jobs = [
        FiredJob(task=job.task, id=row.job_id, joined=row.duplicate)
        for job, row in zip(jobs, inserted, strict=True)
    ]
    encoded = msgspec.json.encode(fired_jobs).decode()
    if tick is not None:
        await tx.db.execute(
            f"UPDATE {s}.schedule_ticks SET jobs = $3 WHERE schedule = $1 AND tick = $2",
            schedule,
            tick,
            encoded,
        )
    await tx.db.execute(
        f"UPDATE {s}.schedules SET fired_at = {s}.now(), last_jobs = $2,"
        " coalesced = coalesced + $4,"
        " last_tick = CASE WHEN $3::double precision IS NULL THEN last_tick"
        "   ELSE greatest(last_tick, $3) END"
        " WHERE id = $1",
        schedule,
        encoded,
        tick,
        sum(job.joined for job in fired_jobs),
    )
    return TickFired(fired=True, jobs=fired_jobs, claimed=await claim_in(tx, claim))


async def prune_ticks(tx: Tx, ages: list[float]) -> list[int]:
    """Forget ticks fired more than `age` seconds ago (a slice at a time)."""
    counts = []
    for age in ages:
        deleted = await tx.db.fetchval(
            f"WITH old AS (SELECT schedule, tick FROM {tx.s}.schedule_ticks"
            f" WHERE fired_at < {tx.s}.now() - $1 LIMIT {PRUNE_SLICE}),"
            f" gone AS (DELETE FROM {tx.s}.schedule_ticks AS t USING old"
            " WHERE t.schedule = old.schedule AND t.tick = old.tick RETURNING 1)"
            " SELECT count(*) FROM gone",
            age,
        )
        counts.append(int(deleted))
    return counts
