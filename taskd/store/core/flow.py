"""Flow control, written once for both stores: what holds a task's jobs back at claim time.

A claim first asks `holds` how many jobs of each held task it may start (its quota: 0 for a
paused task, what its rate limit allows now), hands those quotas to the dialect's claim,
tells `started` what it took, and asks for the next due time with what is left of them, or
when a task held back may start again. The state lives in the store (`paused_tasks`,
`rate_limits`), so that every daemon sharing it holds the same jobs back.

Rate limits are GCRA (the generic cell rate algorithm): per limit one row, its theoretical
arrival time (TAT). A start moves TAT to max(TAT, now) + interval (the period divided by
the starts allowed in it), and a start at `now` is allowed when TAT - tolerance <= now: a
start may come early by one interval, at least 50 ms and at most one second, which makes up
for the moment daemons take to wake and claim, so that over time the rate is held exactly.
The burst this allows, the starts an idle limit lets through at once, is 1 + tolerance //
interval (2 up to 20/s, 3 at 50/s; for limits slower than 1/s the second comes a second
before its time); any window of one period holds at most the limit plus the burst. A claim
locks the rows it reads (PostgreSQL: FOR UPDATE), so that two daemons cannot both spend the
same start.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from taskd.models import Job
from taskd.store.base import ClaimRequest
from taskd.store.core.dialect import Tx
from taskd.store.core.statements import Statement, Steps, members
from taskd.store.rows import Row

TASK = "task"  # the kind of a task's own rate limit in `rate_limits` (by the task's name)
MIN_TOLERANCE = 0.05  # seconds a start may come early, at least (a daemon's claim latency)
MAX_TOLERANCE = 1.0  # seconds a start may come early, at most


def tolerance(interval: float) -> float:
    """How early a start may come under a limit with this interval (see above)."""
    return min(max(interval, MIN_TOLERANCE), MAX_TOLERANCE)


@dataclass(slots=True)
class Holds:
    """What holds jobs back in one claim: the most jobs of a task it may start (`quotas`),
    and the clock and TAT of each rate limit read (`now`, `tats`)."""

    quotas: dict[str, int] = field(default_factory=dict)
    now: float = 0.0
    tats: dict[str, float] = field(default_factory=dict)

    def left(self, jobs: list[Job]) -> dict[str, int]:
        """The quotas once these jobs have started."""
        left = dict(self.quotas)
        for job in jobs:
            if job.task in left:
                left[job.task] = max(0, left[job.task] - 1)
        return left


def holds(tx: Tx, request: ClaimRequest) -> Steps[Holds]:
    """What holds back the jobs a claim may take (tiny tables, read at each claim)."""
    if (lock := tx.sql.flow_lock(exclusive=False)) is not None:
        yield lock
    rows = yield Statement("SELECT task FROM {s}.paused_tasks")
    held = Holds(quotas={row["task"]: 0 for row in rows})
    rates = {task: gap for task, gap in request.rates.items() if task not in held.quotas}
    if rates:
        yield from _rate_quotas(tx, rates, held)
    return held


def _rate_quotas(tx: Tx, rates: Mapping[str, float], held: Holds) -> Steps[None]:
    """The starts each rate limit allows now (GCRA without a burst: one, or none until its
    TAT), its row locked until the claim commits."""
    rows = yield from _rate_rows(tx, list(rates))
    for row in rows:
        held.now, name = float(row["now"]), row["name"]
        tat = held.tats[name] = float(row["tat"])
        early = tolerance(rates[name])
        allowed = (held.now + early - max(tat, held.now)) / rates[name]
        held.quotas[name] = int(allowed + 1e-6) + 1 if allowed >= -1e-6 else 0


def wake(
    tx: Tx, request: ClaimRequest, held: Holds, left: Mapping[str, int]
) -> Steps[float | None]:
    """In how many seconds the first rate limit that holds back pending jobs allows a start
    again (after the claim's starts: 0 if it allows more now); None: none does. A limit
    with starts left held nothing back (its task had no more due jobs)."""
    waiting = {
        name: max(0.0, tat - tolerance(request.rates[name]) - held.now)
        for name, tat in held.tats.items()
        if left.get(name) == 0
    }
    if not waiting:
        return None
    names = " UNION ALL ".join(
        f"SELECT CAST(:name_{n} AS TEXT) AS name" for n in range(len(waiting))
    )
    params = {f"name_{n}": name for n, name in enumerate(waiting)}
    # One index probe a limit, however long its backlog.
    pending = yield Statement(
        f"SELECT name FROM ({names}) AS limited WHERE EXISTS (SELECT 1 FROM {{s}}.jobs"
        " WHERE task = limited.name AND status = 'pending')",
        params,
    )
    due = [waiting[row["name"]] for row in pending]
    return min(due) if due else None


def _rate_rows(tx: Tx, names: list[str]) -> Steps[list[Row]]:
    """The rows of these task rate limits, locked; a missing one is made first (allowing a
    start now), so that a first start is counted once however many daemons claim."""
    listed, params = members("name", names)
    select = Statement(
        f"SELECT name, tat, :now AS now FROM {{s}}.rate_limits WHERE kind = '{TASK}'"
        f" AND name IN ({listed}){tx.sql.lock_rows}",
        params,
    )
    rows = yield select
    if len(rows) < len(names):
        known = {row["name"] for row in rows}
        for name in names:
            if name not in known:
                yield Statement(
                    "INSERT INTO {s}.rate_limits (kind, name, tat) VALUES (:kind, :name, :now)"
                    " ON CONFLICT (kind, name) DO NOTHING",
                    {"kind": TASK, "name": name},
                )
        rows = yield select
    return rows


def started(tx: Tx, request: ClaimRequest, held: Holds, jobs: list[Job]) -> Steps[None]:
    """A claim started these jobs: each rate limit's TAT moves on by one interval a start."""
    counts = Counter(job.task for job in jobs if job.task in held.tats)
    for task, count in counts.items():
        # From the start the jobs record (PostgreSQL: the claim statement's clock, a moment
        # after this claim read the limit), so that recorded starts are spaced too.
        began = max(job.started_at or held.now for job in jobs if job.task == task)
        tat = max(held.tats[task], held.now, began) + count * request.rates[task]
        held.tats[task] = tat
        yield Statement(
            "UPDATE {s}.rate_limits SET tat = :tat WHERE kind = :kind AND name = :name",
            {"tat": tat, "kind": TASK, "name": task},
        )


def rate_limit_starts(sql: object, rates: Mapping[str, float]) -> Steps[Mapping[str, float]]:
    """When the next start of each of these task rate limits (task -> interval) is allowed
    (a read)."""
    if not rates:
        return {}
    listed, params = members("name", list(rates))
    rows = yield Statement(
        f"SELECT name, tat FROM {{s}}.rate_limits WHERE kind = '{TASK}' AND name IN ({listed})",
        params,
    )
    return {row["name"]: row["tat"] - tolerance(rates[row["name"]]) for row in rows}


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
