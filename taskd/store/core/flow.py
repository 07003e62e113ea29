"""Flow control, written once for both stores: what holds a task's jobs back at claim time.

A claim first asks `holds` how many jobs of each held task it may start (its quota: 0 for a
paused task, what its rate limit allows now) and what its shared limits allow, then `share`
for each task's share of those (after the keyed tasks' walks), hands the quotas to the
dialect's claim, tells `started` what it took, and asks for the next due time with what is
left of them, or when a task held back may start again. The state lives in the store
(`paused_tasks`, `rate_limits`), so that every daemon sharing it holds the same jobs back.

A shared limit (`[limits.NAME]`, several tasks' budget) allows as many starts as its room
under its concurrency (its tasks' running jobs counted) and its rate (a GCRA row of kind
`limit`) leave; that budget goes, in claim order, to those of its tasks' jobs that can
start: a plain task's first due jobs as its own limits allow (read with one bounded probe
of the pending jobs' index per task, at most the claim's size each), a keyed task's jobs its
values' turns would take (taskd.store.core.keys), none of a task that another of its shared
limits holds back. So the claim never takes more of them than the budget, whichever of its
tasks they are, and gives none of it to a job that cannot start while another could.

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
from taskd.store.core.dialect import Dialect, Tx
from taskd.store.core.statements import Statement, Steps, members
from taskd.store.rows import Row

TASK = "task"  # the kind of a task's own rate limit in `rate_limits` (by the task's name)
LIMIT = "limit"  # the kind of a shared limit's row in `rate_limits` (by the limit's name)
MIN_TOLERANCE = 0.05  # seconds a start may come early, at least (a daemon's claim latency)
MAX_TOLERANCE = 1.0  # seconds a start may come early, at most
Order = tuple[int, float, int]  # a job's place in the claim order: priority, run_at, id


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
    concurrency and its rate), of which its rate allows `by_rate` (None: it has no rate)
    and its concurrency `room`; all less the starts the claim made."""

    tasks: tuple[str, ...]
    budget: int
    by_rate: int | None = None
    room: int | None = None  # under its concurrency (None: it has none)


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
    running: Counter[str] = field(default_factory=Counter)

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


def holds(tx: Tx, request: ClaimRequest, start: list[Row]) -> Steps[Holds]:
    """What holds back the jobs a claim may take (tiny tables, read at each claim), from
    what the claim read first (`start`: the dialect's claim_start)."""
    held = Holds(quotas={row["task"]: 0 for row in start if row["kind"] == "paused"})
    # A task with a concurrency limit whose room the claim may not count (PostgreSQL: it
    # had no pending job as the claim began, and is not locked) starts none of its jobs:
    # a job of it enqueued since is announced, and claimed again for.
    counted = {row["task"] for row in start if row["kind"] == "counted"}
    unlocked = dict.fromkeys(room_counted(request) - counted - held.quotas.keys(), 0)
    # A keyed task's rate limit counts per key (taskd.store.core.keys).
    rates = {
        task: gap
        for task, gap in request.rates.items()
        if task not in held.quotas and task not in request.keyed
    }
    if rates or request.shared:
        yield from _rate_quotas(tx, rates, request.shared, held)
    held.quotas |= unlocked  # after the rate limits' quotas: none whatever they allow
    if request.shared:
        yield from _shared_budgets(tx, request, held)
    return held


def room_counted(request: ClaimRequest) -> frozenset[str]:
    """The tasks whose room a claim counts under their concurrency limits itself (a keyed
    task's counts per value, in its turns: taskd.store.core.keys)."""
    return frozenset(request.limits) - request.keyed


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


def _shared_budgets(tx: Tx, request: ClaimRequest, held: Holds) -> Steps[None]:
    """Each shared limit's budget: its room under its concurrency (its tasks' running jobs
    counted) and what its rate allows, at most the claim's size."""
    tasks = sorted({task for limit in request.shared.values() for task in limit.tasks})
    listed, params = members("task", tasks)
    rows = yield Statement(
        "SELECT task, count(*) AS n FROM {s}.jobs WHERE status = 'running' AND NOT waiting"
        f" AND task IN ({listed}) GROUP BY task",
        params,
    )
    held.running = Counter({row["task"]: int(row["n"]) for row in rows})
    for name, limit in request.shared.items():
        budget, room = request.limit, None
        if limit.concurrency is not None:
            room = limit.concurrency - sum(held.running[task] for task in limit.tasks)
            budget = max(0, min(budget, room))
        hold = held.shared.setdefault(name, SharedHold(limit.tasks, budget))
        hold.budget, hold.room = min(hold.budget, budget), room


def keyed_caps(request: ClaimRequest, held: Holds) -> dict[str, int]:
    """The most jobs of each keyed task a claim could start (its turns read at most these):
    the least of the claim's size, its own quota and the budget of each of its shared
    limits."""
    return {task: _cap(request, held, task) for task in request.keyed}


def share(
    tx: Tx, request: ClaimRequest, held: Holds, keyed: Mapping[str, list[Order]]
) -> Steps[None]:
    """Each shared limit's budget shared out among the jobs of its tasks that can start, in
    claim order: the first due jobs of its plain tasks (their own limits allowing), and
    the jobs a keyed task's turns would take (`keyed`: none where its values have no room),
    so that no share goes to a job that cannot start."""
    tasks = {task for limit in request.shared.values() for task in limit.tasks}
    caps = {task: _cap(request, held, task) for task in sorted(tasks - request.keyed)}
    firsts = yield from _first_due(tx, {task: cap for task, cap in caps.items() if cap > 0})
    for task in tasks & request.keyed:
        firsts[task] = [(*order, task) for order in keyed.get(task, [])]
    held.allotted = _allot(held, {task: sorted(jobs) for task, jobs in firsts.items()})


def _allot(held: Holds, candidates: Mapping[str, list[tuple[object, ...]]]) -> dict[str, int]:
    """Each task's share: as many of its candidates (in claim order) as every one of its
    shared limits gives it. A task one limit gives less than another takes only that much
    of the others, whose rest goes to their other tasks: the shares are dealt again with
    its candidates cut to that, until its limits agree (they are only cut: it ends)."""
    bounds = {task: len(jobs) for task, jobs in candidates.items()}
    while True:
        given: dict[str, list[int]] = {}
        for hold in held.shared.values():
            chosen = sorted(
                job
                for task in hold.tasks
                for job in candidates.get(task, [])[: bounds.get(task, 0)]
            )
            shares = Counter(job[-1] for job in chosen[: max(0, hold.budget)])
            for task in hold.tasks:
                given.setdefault(task, []).append(shares[task])
        cut = {task: min(shares) for task, shares in given.items() if min(shares) < max(shares)}
        if not cut:
            return {task: min(shares) for task, shares in given.items()}
        bounds |= cut


def _cap(request: ClaimRequest, held: Holds, task: str) -> int:
    """The most jobs of a task this claim could start: the least of the claim's size, its
    own quota and room, and the budget of each of its shared limits."""
    cap = min(request.limit, held.quotas.get(task, request.limit))
    concurrency = request.limits.get(task)
    if concurrency is not None and task not in request.keyed:  # else it counts per key
        cap = min(cap, concurrency - held.running.get(task, 0))
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
    """In how many seconds the first task held back by rate limits with pending jobs may
    start again (after the claim's starts: 0 if it may start more now); None: none may
    before a job's end. A task held by several limits waits for the last of them (a task
    whose shared limit is full waits for a job's end, whatever its rates allow), so that a
    claim never says to claim again at once for a task still held."""
    held_tasks = {name for kind, name in held.tats if kind == TASK and left.get(name) == 0}
    for name, hold in held.shared.items():
        if (LIMIT, name) in held.tats and hold.by_rate == 0:
            held_tasks.update(hold.tasks)
    waiting = {
        task: seconds
        for task in sorted(held_tasks)
        if (seconds := _held_for(request, held, task)) is not None
    }
    if not waiting:
        return None
    names = " UNION ALL ".join(
        f"SELECT CAST(:name_{n} AS TEXT) AS name" for n in range(len(waiting))
    )
    params = {f"name_{n}": task for n, task in enumerate(waiting)}
    # One index probe a task, however long its backlog (or its history: read by the
    # pending jobs' index).
    rows = yield Statement(
        f"SELECT name FROM ({names}) AS limited WHERE EXISTS (SELECT 1 FROM"
        f" {{s}}.jobs{tx.sql.pending_index} WHERE task = limited.name AND status = 'pending')",
        params,
    )
    due = [waiting[row["name"]] for row in rows]
    return min(due) if due else None


def _held_for(request: ClaimRequest, held: Holds, task: str) -> float | None:
    """In how many seconds every rate limit over a task allows it a start again; None: it
    is paused, or a shared limit of it is full (a job's end wakes the claims)."""
    if held.quotas.get(task) == 0 and (TASK, task) not in held.tats:
        return None  # paused
    seconds = 0.0
    if (tat := held.tats.get((TASK, task))) is not None:
        seconds = tat - tolerance(request.rates[task]) - held.now
    for name, hold in held.shared.items():
        if task not in hold.tasks:
            continue
        if hold.room is not None and hold.room <= 0:
            return None  # full: it has room again when a job of it ends
        if hold.by_rate == 0:
            interval = request.shared[name].interval or 0.0
            seconds = max(seconds, held.tats[LIMIT, name] - tolerance(interval) - held.now)
    return max(0.0, seconds)


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
    if not held.shared and not held.tats:  # no limit held the claim: none to count
        return
    counts = Counter(job.task for job in jobs)
    for hold in held.shared.values():
        spent = sum(counts[task] for task in hold.tasks)
        hold.budget -= spent
        if hold.room is not None:
            hold.room -= spent
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


def limit_states(sql: Dialect, limits: Mapping[str, SharedLimit]) -> Steps[dict[str, LimitState]]:
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
            f"{sql.pending_index} WHERE status = 'pending' AND run_at <= :now"
            f" AND task IN ({tasks})) AS waiting",
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
