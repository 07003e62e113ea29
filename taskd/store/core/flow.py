"""Flow control, written once for both stores: what holds a task's jobs back at claim time.

A claim first asks `holds` how many jobs of each held task it may start (its quota: 0 for a
paused task, what its rate limit allows now, its share of the shared limits it is in),
hands those quotas to the dialect's claim, tells `started` what it took, and asks for the
next due time with what is left of them, or when a task held back may start again. The
state lives in the store (`paused_tasks`, `rate_limits`), so that every daemon sharing it
holds the same jobs back.

A shared limit (`[limits.NAME]`, several tasks' budget) allows as many starts as its room
under its concurrency (its tasks' running jobs counted) and its rate (a GCRA row of kind
`limit`) leave; that budget goes to its tasks' first due jobs in claim order (read with one
bounded probe of the pending jobs' index per task, at most the claim's size each), so that
the claim never takes more of them than the budget, whichever of its tasks they are.

Rate limits are GCRA (the generic cell rate algorithm): per limit one row, its theoretical
arrival time (TAT). A start moves TAT to max(TAT, now) + interval (the period divided by
the starts allowed in it), and a start at `now` is allowed when TAT - tolerance <= now: a
start may come early by one interval, at least 50 ms and at most one second, which makes up
for the moment daemons take to wake and claim, so that over time the rate is held exactly.
The burst this allows, the starts an idle limit lets through at once, is 1 + tolerance //
interval (2 up to 20/s, 3 at 50/s; for limits slower than 1/s the second comes a second
before its time); any window of one period holds at most the limit plus the burst. A claim
locks the rows it reads (PostgreSQL: FOR UPDATE), so that two daemons cannot both spend the
same start; a shared limit has its row even without a rate, so that the claims counting its
room are one at a time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from taskd.models import Job
from taskd.store.base import ClaimRequest, LimitState, SharedLimit
from taskd.store.core.dialect import Tx
from taskd.store.core.statements import Statement, Steps, members
from taskd.store.rows import Row

TASK = "task"  # the kind of a task's own rate limit in `rate_limits` (by the task's name)
LIMIT = "limit"  # the kind of a shared limit's row in `rate_limits` (by the limit's name)
MIN_TOLERANCE = 0.05  # seconds a start may come early, at least (a daemon's claim latency)
MAX_TOLERANCE = 1.0  # seconds a start may come early, at most


def tolerance(interval: float) -> float:
    """How early a start may come under a limit with this interval (see above)."""
    return min(max(interval, MIN_TOLERANCE), MAX_TOLERANCE)


def allowed_starts(now: float, tat: float, interval: float) -> int:
    """The starts a GCRA limit allows at `now` (without a burst: one, or none until TAT)."""
    allowed = (now + tolerance(interval) - max(tat, now)) / interval
    return int(allowed + 1e-6) + 1 if allowed >= -1e-6 else 0


@dataclass(slots=True)
class SharedHold:
    """A shared limit in one claim: the starts it allows (`budget`: its room under its
    concurrency and its rate), of which its rate allows `by_rate` (None: it has no rate);
    both less the starts the claim made."""

    tasks: tuple[str, ...]
    budget: int
    by_rate: int | None = None


@dataclass(slots=True)
class Holds:
    """What holds jobs back in one claim: the most jobs of a task it may start by its own
    rules (`quotas`: paused, its rate limit), the shared limits (`shared`) and the share of
    their budgets each of their tasks got (`allotted`), and the clock and TAT of each rate
    limit read (`now`, `tats`, by kind and name)."""

    quotas: dict[str, int] = field(default_factory=dict)
    now: float = 0.0
    tats: dict[tuple[str, str], float] = field(default_factory=dict)
    shared: dict[str, SharedHold] = field(default_factory=dict)
    allotted: dict[str, int] = field(default_factory=dict)

    def for_claim(self) -> dict[str, int]:
        """The quota of each held task in this claim: its own, and its share."""
        quotas = dict(self.quotas)
        for task, share in self.allotted.items():
            quotas[task] = min(share, quotas.get(task, share))
        return quotas

    def left(self, jobs: list[Job]) -> dict[str, int]:
        """The quotas once these jobs have started (after `started`): a task in a shared
        limit whose budget is spent has none left."""
        left = dict(self.quotas)
        for job in jobs:
            if job.task in left:
                left[job.task] = max(0, left[job.task] - 1)
        for hold in self.shared.values():
            if hold.budget <= 0:
                left.update(dict.fromkeys(hold.tasks, 0))
        return left


def holds(tx: Tx, request: ClaimRequest) -> Steps[Holds]:
    """What holds back the jobs a claim may take (tiny tables, read at each claim)."""
    rows = yield tx.sql.paused()
    held = Holds(quotas={row["task"]: 0 for row in rows})
    # A keyed task's rate limit counts per key (taskd.store.core.keys).
    rates = {
        task: gap
        for task, gap in request.rates.items()
        if task not in held.quotas and task not in request.keyed
    }
    if rates or request.shared:
        yield from _rate_quotas(tx, rates, request.shared, held)
    if request.shared:
        yield from _shared_quotas(tx, request, held)
    return held


def _rate_quotas(
    tx: Tx, rates: Mapping[str, float], shared: Mapping[str, SharedLimit], held: Holds
) -> Steps[None]:
    """The starts each task rate limit allows now, and each shared limit's rate; their rows
    locked until the claim commits (a shared limit's even without a rate)."""
    limits = [(TASK, name) for name in rates] + [(LIMIT, name) for name in shared]
    rows = yield from _limit_rows(tx, limits)
    for row in rows:
        held.now, kind, name = float(row["now"]), row["kind"], row["name"]
        interval = rates[name] if kind == TASK else shared[name].interval
        if interval is None:
            continue  # a shared limit without a rate: its row is its lock
        tat = held.tats[kind, name] = float(row["tat"])
        allowed = allowed_starts(held.now, tat, interval)
        if kind == TASK:
            held.quotas[name] = allowed
        else:
            held.shared[name] = SharedHold(shared[name].tasks, allowed, allowed)


def _shared_quotas(tx: Tx, request: ClaimRequest, held: Holds) -> Steps[None]:
    """Each shared limit's budget (its room and what its rate allows), shared out among its
    tasks' first due jobs in claim order: each task's quota is its share."""
    tasks = sorted({task for limit in request.shared.values() for task in limit.tasks})
    listed, params = members("task", tasks)
    rows = yield Statement(
        "SELECT task, count(*) AS n FROM {s}.jobs WHERE status = 'running' AND NOT waiting"
        f" AND task IN ({listed}) GROUP BY task",
        params,
    )
    running = Counter({row["task"]: int(row["n"]) for row in rows})
    for name, limit in request.shared.items():
        budget = request.limit
        if limit.concurrency is not None:
            room = limit.concurrency - sum(running[task] for task in limit.tasks)
            budget = max(0, min(budget, room))
        hold = held.shared.setdefault(name, SharedHold(limit.tasks, budget))
        hold.budget = min(hold.budget, budget)
    caps = {task: _cap(request, held, running, task) for task in tasks}
    firsts = yield from _first_due(tx, {task: cap for task, cap in caps.items() if cap > 0})
    for hold in held.shared.values():
        chosen = sorted(job for task in hold.tasks for job in firsts.get(task, []))
        shares = Counter(task for *_, task in chosen[: hold.budget])
        for task in hold.tasks:
            held.allotted[task] = min(shares[task], held.allotted.get(task, shares[task]))


def _cap(request: ClaimRequest, held: Holds, running: Mapping[str, int], task: str) -> int:
    """The most jobs of a task in shared limits this claim could start: the least of the
    claim's size, its own quota and room, and the budget of each of its shared limits."""
    cap = min(request.limit, held.quotas.get(task, request.limit))
    concurrency = request.limits.get(task)
    if concurrency is not None and task not in request.keyed:  # else it counts per key
        cap = min(cap, concurrency - running.get(task, 0))
    for hold in held.shared.values():
        if task in hold.tasks:
            cap = min(cap, hold.budget)
    return cap


def _first_due(tx: Tx, caps: Mapping[str, int]) -> Steps[dict[str, list[tuple[object, ...]]]]:
    """The first due jobs of each task, at most its cap, as (priority, run_at, id, task):
    one bounded walk of the pending jobs' index a task, however long its backlog."""
    if not caps:
        return {}
    parts: list[str] = []
    params: dict[str, object] = {}
    for n, (task, cap) in enumerate(caps.items()):
        index = tx.sql.indexed_by("jobs_task_claim_order")
        parts.append(
            f"SELECT * FROM (SELECT priority, run_at, id, task FROM {{s}}.jobs{index}"
            f" WHERE task = :task_{n} AND status = 'pending'"
            f" AND run_at <= :now ORDER BY priority, run_at, id LIMIT :cap_{n}) AS first_{n}"
        )
        params |= {f"task_{n}": task, f"cap_{n}": cap}
    firsts: dict[str, list[tuple[object, ...]]] = {}
    for row in (yield Statement(" UNION ALL ".join(parts), params)):
        firsts.setdefault(row["task"], []).append(
            (row["priority"], row["run_at"], row["id"], row["task"])
        )
    return firsts


def wake(
    tx: Tx, request: ClaimRequest, held: Holds, left: Mapping[str, int]
) -> Steps[float | None]:
    """In how many seconds the first rate limit that holds back pending jobs allows a start
    again (after the claim's starts: 0 if it allows more now); None: none does. A limit
    with starts left held nothing back (its task had no more due jobs)."""
    waiting: list[tuple[float, tuple[str, ...]]] = []
    for (kind, name), tat in held.tats.items():
        if kind == TASK and left.get(name) == 0:
            early = tolerance(request.rates[name])
            waiting.append((max(0.0, tat - early - held.now), (name,)))
        elif kind == LIMIT and (hold := held.shared[name]).by_rate == 0:
            early = tolerance(request.shared[name].interval or 0.0)
            waiting.append((max(0.0, tat - early - held.now), hold.tasks))
    if not waiting:
        return None
    tasks = sorted({task for _, held_tasks in waiting for task in held_tasks})
    names = " UNION ALL ".join(f"SELECT CAST(:name_{n} AS TEXT) AS name" for n in range(len(tasks)))
    params = {f"name_{n}": task for n, task in enumerate(tasks)}
    # One index probe a task, however long its backlog.
    rows = yield Statement(
        f"SELECT name FROM ({names}) AS limited WHERE EXISTS (SELECT 1 FROM {{s}}.jobs"
        " WHERE task = limited.name AND status = 'pending')",
        params,
    )
    pending = {row["name"] for row in rows}
    due = [seconds for seconds, held_tasks in waiting if pending.intersection(held_tasks)]
    return min(due) if due else None


def _limit_rows(tx: Tx, limits: list[tuple[str, str]]) -> Steps[list[Row]]:
    """The rows of these limits (kind, name), locked in one order; a missing one is made
    first (allowing a start now), so that a first start is counted once however many
    daemons claim."""
    if not limits:
        return []
    where: list[str] = []
    params: dict[str, object] = {}
    for kind in (TASK, LIMIT):
        if names := [name for of, name in limits if of == kind]:
            listed, named = members(f"{kind}_name", names)
            where.append(f"(kind = '{kind}' AND name IN ({listed}))")
            params |= named
    select = Statement(
        f"SELECT kind, name, tat, :now AS now FROM {{s}}.rate_limits WHERE {' OR '.join(where)}"
        f" ORDER BY kind, name{tx.sql.lock_rows}",
        params,
    )
    rows = yield select
    if len(rows) < len(limits):
        known = {(row["kind"], row["name"]) for row in rows}
        for kind, name in sorted(set(limits) - known):
            yield Statement(
                "INSERT INTO {s}.rate_limits (kind, name, tat) VALUES (:kind, :name, :now)"
                " ON CONFLICT (kind, name) DO NOTHING",
                {"kind": kind, "name": name},
            )
        rows = yield select
    return rows


def started(tx: Tx, request: ClaimRequest, held: Holds, jobs: list[Job]) -> Steps[None]:
    """A claim started these jobs: each rate limit's TAT moves on by one interval a start,
    and each shared limit's budget is less by its tasks' starts."""
    counts = Counter(job.task for job in jobs)
    for hold in held.shared.values():
        spent = sum(counts[task] for task in hold.tasks)
        hold.budget -= spent
        if hold.by_rate is not None:
            hold.by_rate = max(0, hold.by_rate - spent)
    for (kind, name), tat in list(held.tats.items()):
        tasks: tuple[str, ...]
        if kind == TASK:
            tasks, interval = (name,), request.rates[name]
        else:
            tasks, interval = request.shared[name].tasks, request.shared[name].interval or 0.0
        count = sum(counts[task] for task in tasks)
        if not count:
            continue
        # From the start the jobs record (PostgreSQL: the claim statement's clock, a moment
        # after this claim read the limit), so that recorded starts are spaced too.
        began = max(job.started_at or held.now for job in jobs if job.task in tasks)
        tat = held.tats[kind, name] = max(tat, held.now, began) + count * interval
        yield Statement(
            "UPDATE {s}.rate_limits SET tat = :tat WHERE kind = :kind AND name = :name",
            {"tat": tat, "kind": kind, "name": name},
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


def limit_states(sql: object, limits: Mapping[str, SharedLimit]) -> Steps[dict[str, LimitState]]:
    """How each of these shared limits stands: its tasks' running and due jobs, and when
    its rate next allows a start (a read)."""
    if not limits:
        return {}
    listed, params = members("name", list(limits))
    rows = yield Statement(
        f"SELECT name, tat FROM {{s}}.rate_limits WHERE kind = '{LIMIT}' AND name IN ({listed})",
        params,
    )
    tats = {row["name"]: float(row["tat"]) for row in rows}
    states = {}
    for name, limit in limits.items():
        interval = limit.interval
        next_start = tats[name] - tolerance(interval) if interval and name in tats else None
        if not limit.tasks:
            states[name] = LimitState(0, 0, next_start)
            continue
        tasks, params = members("task", limit.tasks)
        (counted,) = yield Statement(
            "SELECT (SELECT count(*) FROM {s}.jobs WHERE status = 'running' AND NOT waiting"
            f" AND task IN ({tasks})) AS running, (SELECT count(*) FROM {{s}}.jobs"
            f" WHERE status = 'pending' AND run_at <= :now AND task IN ({tasks})) AS waiting",
            params,
        )
        states[name] = LimitState(int(counted["running"]), int(counted["waiting"]), next_start)
    return states


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
