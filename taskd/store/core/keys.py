"""Per-key limits and fairness (`limit_key`), written once for both stores: the jobs of a
keyed task take turns by their key's value.

Each job of a keyed task records the value of its task's `limit_key` in its payload
(`jobs.limit_key`; '' where the payload has none); the jobs of the other tasks record none
(NULL), and the indexes of the keyed jobs (SQLite's both, PostgreSQL's of the pending jobs)
leave them out: an insert of theirs writes no entry there. A keyed task's `concurrency`
counts its running jobs per value (an index of the running jobs by task and value) and its
`rate_limit` is a GCRA row per value (`rate_limits`, kind `key:TASK`, as in taskd.store.core.flow).

A claim walks the values that have pending jobs, in order, starting after the one it served
last (`key_turns.last_key`) and coming round to the first: a skip along the pending jobs'
(task, limit_key, priority, run_at, id) index, one probe a value however many jobs it
holds, at most WALK values a claim. Of each value with room it reads its first due jobs
(as many as the value may start), and takes one of each value in turn, then a second of
each, until the claim has what it may take: one value's backlog of 10,000 jobs is one
value among the others, and its next job waits for the others' turn. No claim reads more
than WALK values and WALK times its size of jobs, whatever the backlog.

A walk that found nothing to take moves on from where it stopped; once it has come round
to where its fruitless run began (`key_turns.lap_from`), the task rests (`rested_at`):
its claims walk no more until a write that may make room for a value (a job of it
inserted, ended, put back, released by its parents: `stirred`), or the moment a value's
rate limit allows a start again or a delayed job is due (`rested_wake`). On PostgreSQL a
task's `key_turns` row is locked for the claim, so that the claims of a keyed task are
one at a time across the daemons and count the same running jobs, and a write that stirs
it waits for the claim in flight.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from taskd.models import Job, limit_key_of
from taskd.store.base import ClaimRequest
from taskd.store.core.dialect import Tx
from taskd.store.core.flow import allowed_starts, tolerance
from taskd.store.core.statements import Statement, Steps, members
from taskd.store.rows import Row

WALK = 64  # key values a claim reads at most, per keyed task


def rate_kind(task: str) -> str:
    """The kind of the rows of a keyed task's rate limit in `rate_limits` (by value)."""
    return f"key:{task}"


@dataclass(slots=True)
class Pick:
    """A due job a keyed task may start: its place in the claim order across tasks."""

    order: tuple[int, float, int]  # priority, run_at, id
    task: str
    key: str


@dataclass(slots=True)
class Walk:
    """What one claim found of a keyed task's values: the jobs it may start, in turns."""

    task: str
    visited: list[str] = field(default_factory=list)
    picks: list[Pick] = field(default_factory=list)
    last_key: str | None = None  # where the previous claim stopped
    lap_from: str | None = None  # where a run of fruitless walks began, and when
    lap_at: float | None = None
    resting: bool = False  # it came round with nothing to take, and nothing changed since
    wake: float | None = None  # while resting: when a held value or a delayed job may start
    now: float = 0.0
    more: bool = False  # values it did not look at, or more jobs than it could take


def turns(tx: Tx, request: ClaimRequest, start: list[Row]) -> Steps[dict[str, Row]]:
    """The turn of each keyed task, locked until the claim commits (first of all that a
    claim locks, as the writes that stir them do: see `stirred`), unless it rests: a claim
    takes nothing of a resting task and writes nothing of its turn, so that the claims of
    several daemons do not wait for each other's commits on a task that has nothing to
    start (one with no pending job, as the others wait for a write that stirs it)."""
    found = {row["task"]: row for row in start if row["kind"] == "turn"}
    for task in sorted(request.keyed - found.keys()):  # SQLite's start makes none
        found[task] = yield from _turn(tx, task)
    return found


def walks(
    tx: Tx, request: ClaimRequest, caps: Mapping[str, int], turns: Mapping[str, Row]
) -> Steps[list[Walk]]:
    """For each keyed task the claim may start jobs of (`caps`: none if paused or its
    shared limits have no room), the jobs it may start, in turns by value."""
    found = []
    for task in sorted(request.keyed):
        cap = min(request.limit, caps.get(task, request.limit))
        if cap > 0:
            found.append((yield from _walk(tx, request, task, cap, turns[task])))
    return found


def within(walks: list[Walk], quotas: Mapping[str, int]) -> list[Walk]:
    """The walks with no more picks than their task's share of its shared limits
    (`quotas`), the first in turn; a walk whose jobs are all left to other tasks is as if
    not walked (its turn stays, and it does not rest: its values had room)."""
    kept = []
    for walk in walks:
        share = quotas.get(walk.task, len(walk.picks))
        if share < len(walk.picks):
            if share <= 0:
                continue
            # Its shared limits are spent: their jobs' ends wake the claims, not this one.
            walk.picks, walk.more = walk.picks[:share], False
        kept.append(walk)
    return kept


def _walk(tx: Tx, request: ClaimRequest, task: str, cap: int, turn: Row) -> Steps[Walk]:
    walk = Walk(task, last_key=turn["last_key"], lap_from=turn["lap_from"],
                lap_at=turn["lap_at"], now=float(turn["now"]))  # fmt: skip
    if turn["rested_at"] is not None:
        # Its last walk came round with nothing to take: none is needed until a write that
        # may make room (`stirred`), or the time it would wake at.
        wake = turn["rested_wake"]
        if wake is None or walk.now < float(wake):
            walk.resting, walk.wake = True, wake
            return walk
        walk.lap_from = walk.lap_at = None  # its rest is over: a new round
    rows = yield from _values(tx, request, task, walk.last_key)
    now = walk.now
    allowed: dict[str, int] = {}
    interval, concurrency = request.rates.get(task), request.limits.get(task)
    for row in rows:
        key = row["key"]
        walk.visited.append(key)
        room = cap if concurrency is None else concurrency - int(row["running"])
        if interval is not None:
            tat = now if row["tat"] is None else float(row["tat"])
            room = min(room, allowed_starts(now, tat, interval))
        if room > 0:
            allowed[key] = min(room, cap)
    if allowed:
        each = 1 if len(allowed) >= cap else cap
        due = yield from _first_due(tx, task, {key: min(n, each) for key, n in allowed.items()})
        if each < cap and sum(map(len, due.values())) < cap:
            # Some values had no due job (delayed ones): the others may take more turns.
            full = {key: min(n, cap) for key, n in allowed.items() if n > each and key in due}
            due |= (yield from _first_due(tx, task, full)) if full else {}
        walk.picks = _in_turns(due, [key for key in walk.visited if key in due], cap)
    # Values it did not look at, or a full claim: there may be more to take at once.
    walk.more = len(walk.visited) >= WALK or len(walk.picks) >= cap
    return walk


def _turn(tx: Tx, task: str) -> Steps[Row]:
    """The task's turn among its values, locked until the claim commits unless it rests
    (made if new)."""
    select = Statement(TURN.format(s="{s}", lock=tx.sql.lock_rows), {"task": task})
    rows = yield select
    if not rows:  # new (or it stopped resting between the two reads: the lock decides)
        yield Statement(
            "INSERT INTO {s}.key_turns (task) VALUES (:task) ON CONFLICT (task) DO NOTHING",
            {"task": task},
        )
        rows = yield Statement(
            f"SELECT {TURN_COLUMNS} FROM {{s}}.key_turns WHERE task = :task{tx.sql.lock_rows}",
            {"task": task},
        )
    return rows[0]


TURN_COLUMNS = "last_key, lap_from, lap_at, rested_at, rested_wake, :now AS now"
# A task's turn rests from the claim that came round with nothing to take until a write
# stirs it, or until the time it would wake at (a value's rate limit, a delayed job).
RESTS = "rested_at IS NOT NULL AND (rested_wake IS NULL OR :now < rested_wake)"
# A task's turn, locked ({lock}) only if it does not rest. A turn another claim is writing
# meanwhile may be found in neither part (the lock waits, then reads it resting).
TURN = (
    f"WITH resting AS (SELECT {TURN_COLUMNS} FROM {{s}}.key_turns"
    f" WHERE task = :task AND {RESTS}),"
    f" turning AS (SELECT {TURN_COLUMNS} FROM {{s}}.key_turns"
    f" WHERE task = :task AND NOT ({RESTS}){{lock}})"
    " SELECT * FROM resting UNION ALL SELECT * FROM turning"
)


# The values of a task's pending jobs after :after (or from the first, with >=), at most
# :most, each with its running jobs and its rate limit's TAT: one index probe a value. Each
# probe is a range of the (task, limit_key, priority, run_at, id) index of the keyed jobs
# (partial: each statement says `limit_key IS NOT NULL`, which PostgreSQL's planner does not
# infer from a row comparison; without it each probe read the whole table) bounded by a row
# comparison alone, read in its order, its first row's value kept if it is the task's: with
# equalities on the task PostgreSQL's planner may take another index and read the task's
# whole backlog a probe, as it does before its first ANALYZE (see its QUEUES).
VALUES = """
WITH RECURSIVE walk(n, key) AS (
    SELECT 1, (SELECT CASE WHEN task = :task THEN limit_key END FROM {s}.jobs{index}
               WHERE status = 'pending' AND limit_key IS NOT NULL
                   AND (task, limit_key) {first} (:task, :after)
               ORDER BY task, limit_key, priority, run_at, id LIMIT 1)
    UNION ALL
    SELECT n + 1, (SELECT CASE WHEN task = :task THEN limit_key END FROM {s}.jobs{index}
                   WHERE status = 'pending' AND limit_key IS NOT NULL
                       AND (task, limit_key) > (:task, walk.key)
                   ORDER BY task, limit_key, priority, run_at, id LIMIT 1)
    FROM walk WHERE walk.key IS NOT NULL AND n < :most{before}
)
SELECT key, :now AS now,
    (SELECT count(*) FROM {s}.jobs WHERE task = :task AND limit_key = walk.key
     AND limit_key IS NOT NULL AND status = 'running' AND NOT waiting) AS running,
    (SELECT tat FROM {s}.rate_limits WHERE kind = :kind AND name = walk.key) AS tat
FROM walk WHERE key IS NOT NULL{upto} ORDER BY n
"""


def _values(tx: Tx, request: ClaimRequest, task: str, last: str | None) -> Steps[list[Row]]:
    """The values the walk visits: those after the last one served, then from the first
    round to it; at most WALK."""
    index = tx.sql.indexed_by("jobs_task_limit_key_claim")
    params = {"task": task, "kind": rate_kind(task), "most": WALK}
    after: list[Row] = []
    if last is not None:
        sql = VALUES.format(s="{s}", index=index, first=">", before="", upto="")
        after = yield Statement(sql, {**params, "after": last})
    if len(after) >= WALK:
        return after
    bound = last is not None
    sql = VALUES.format(
        s="{s}", index=index, first=">=",
        before=" AND walk.key < :upto" if bound else "", upto=" AND key <= :upto" if bound else "",
    )  # fmt: skip
    extra = {"upto": last} if bound else {}
    wrapped = yield Statement(sql, {**params, "after": "", "most": WALK - len(after), **extra})
    return after + wrapped


def _first_due(tx: Tx, task: str, counts: Mapping[str, int]) -> Steps[dict[str, list[Pick]]]:
    """The first due jobs of each value (at most its count), in claim order."""
    index = tx.sql.indexed_by("jobs_task_limit_key_claim")
    parts: list[str] = []
    params: dict[str, object] = {"task": task}
    for n, (key, count) in enumerate(counts.items()):
        parts.append(
            f"SELECT * FROM (SELECT priority, run_at, id, limit_key FROM {{s}}.jobs{index}"
            f" WHERE task = :task AND limit_key = :key_{n} AND limit_key IS NOT NULL"
            " AND status = 'pending'"
            f" AND run_at <= :now ORDER BY priority, run_at, id LIMIT :count_{n}) AS due_{n}"
        )
        params |= {f"key_{n}": key, f"count_{n}": count}
    due: dict[str, list[Pick]] = {}
    for row in (yield Statement(" UNION ALL ".join(parts), params)):
        order = (int(row["priority"]), float(row["run_at"]), int(row["id"]))
        due.setdefault(row["limit_key"], []).append(Pick(order, task, row["limit_key"]))
    return due


def values_in_use(sql: object, tasks: list[str]) -> Steps[dict[str, tuple[int, int]]]:
    """Of each keyed task, how many values have jobs running and how many have due jobs
    pending (a read, for status: it counts the backlog)."""
    used = {}
    for task in tasks:
        (row,) = yield Statement(
            "SELECT (SELECT count(DISTINCT limit_key) FROM {s}.jobs WHERE task = :task"
            " AND limit_key IS NOT NULL AND status = 'running') AS running,"
            " (SELECT count(DISTINCT limit_key) FROM {s}.jobs WHERE task = :task"
            " AND limit_key IS NOT NULL AND status = 'pending' AND run_at <= :now) AS waiting",
            {"task": task},
        )
        used[task] = (int(row["running"]), int(row["waiting"]))
    return used


def key_state(
    sql: object, task: str, key: str, interval: float | None
) -> Steps[tuple[int, float | None]]:
    """A value of a keyed task: its running jobs, and when its rate limit next allows a
    start (None: it has started nothing yet, or has no rate limit) (a read)."""
    (row,) = yield Statement(
        "SELECT (SELECT count(*) FROM {s}.jobs WHERE task = :task AND limit_key = :key"
        " AND limit_key IS NOT NULL AND status = 'running' AND NOT waiting) AS running,"
        " (SELECT tat FROM {s}.rate_limits WHERE kind = :kind AND name = :key) AS tat",
        {"task": task, "key": key, "kind": rate_kind(task)},
    )
    tat = row["tat"]
    start = float(tat) - tolerance(interval) if tat is not None and interval else None
    return int(row["running"]), start


IDLE = 60.0  # seconds past its TAT after which a value's rate row is forgotten


def forget_idle(most: int) -> Steps[None]:
    """Forget up to `most` rate rows of values whose limit has allowed a start for IDLE
    seconds: a missing row allows a start now, as theirs does, so that the rows of a
    task's values do not pile up."""
    yield Statement(
        "DELETE FROM {s}.rate_limits WHERE (kind, name) IN (SELECT kind, name FROM"
        " {s}.rate_limits WHERE kind >= 'key:' AND kind < 'key;' AND tat < :now - :idle"
        " LIMIT :most)",
        {"idle": IDLE, "most": most},
    )


def _in_turns(due: Mapping[str, list[Pick]], keys: list[str], cap: int) -> list[Pick]:
    """One job of each value in turn, then a second of each, ... at most `cap`."""
    picks: list[Pick] = []
    for round_ in range(cap):
        for key in keys:
            if round_ < len(due[key]) and len(picks) < cap:
                picks.append(due[key][round_])
    return picks


def chosen(walks: list[Walk], others: list[Job], limit: int) -> list[Pick]:
    """The keyed jobs a claim takes beside the others it took (`others`, in claim order):
    keyed and other jobs meet by priority, and within one priority take turns, keyed ones
    in the order of their turns. The others are taken already: a claim may hold up to
    twice its size where keyed jobs come before some of them (they start as slots free,
    like jobs claimed ahead)."""
    keyed = [pick for walk in walks for pick in walk.picks]
    keyed.sort(key=lambda pick: pick.order[0])  # stable: each task's turns stay in order
    ranked = sorted(
        [(job.priority, n, 0, None) for n, job in enumerate(others)]
        + [(pick.order[0], n, 1, pick) for n, pick in enumerate(keyed)],
        key=lambda entry: entry[:3],
    )
    return [pick for *_, pick in ranked[:limit] if pick is not None]


def settle(
    tx: Tx, request: ClaimRequest, walks: list[Walk], jobs: list[Job]
) -> Steps[float | None]:
    """The keyed jobs a claim started (`jobs` holds them): each value's rate limit moves
    on, each task's turn comes after the last value it served (or the last it looked
    at); in how many seconds a keyed task may have a job to start again (see `_next_due`)."""
    taken = {job.id: job for job in jobs}
    due: list[float] = []
    for walk in walks:
        if walk.resting:
            if walk.wake is not None:
                due.append(max(0.0, walk.wake - walk.now))
            continue
        served = [pick for pick in walk.picks if pick.order[2] in taken]
        yield from _spaced(tx, request, walk.task, served, taken)
        if served:
            yield from _turned(tx, walk.task, served[-1].key, None, None)
        if walk.picks:  # at once while its turns go on (or others came first)
            if walk.more or len(served) < len(walk.picks):
                due.append(0.0)
            elif (wake := (yield from _next_due(tx, request, walk.task))) is not None:
                due.append(wake)
            continue
        if not walk.visited:  # no pending job: it rests until a write stirs it
            yield from _turned(tx, walk.task, walk.last_key, None, None, walk.now)
            continue
        # A fruitless walk: the next starts where it stopped; the run of them began at the
        # first value of the first (and at its time), unless something changed since.
        lap_from, lap_at = walk.lap_from, walk.lap_at
        come_round = lap_from is not None and lap_from in walk.visited
        if len(walk.visited) < WALK:  # it looked at every value: nothing is missed
            lap_from, lap_at, come_round = walk.visited[0], walk.now, True
        elif lap_from is None:
            lap_from, lap_at = walk.visited[0], walk.now
        if not come_round:
            yield from _turned(tx, walk.task, walk.visited[-1], lap_from, lap_at)
            due.append(0.0)
            continue
        # It rests until something changes, and remembers when it would wake.
        wake = yield from _next_due(tx, request, walk.task)
        rest = (walk.now, None if wake is None else walk.now + wake)
        yield from _turned(tx, walk.task, walk.visited[-1], lap_from, lap_at, *rest)
        if wake is not None:
            due.append(wake)
    return min(due) if due else None


def _turned(
    tx: Tx,
    task: str,
    last: str | None,
    lap_from: str | None,
    lap_at: float | None,
    rested_at: float | None = None,
    rested_wake: float | None = None,
) -> Steps[None]:
    yield Statement(
        "UPDATE {s}.key_turns SET last_key = :last, lap_from = :lap_from, lap_at = :lap_at,"
        " rested_at = :rested_at, rested_wake = :rested_wake WHERE task = :task",
        {"last": last, "lap_from": lap_from, "lap_at": lap_at, "rested_at": rested_at,
         "rested_wake": rested_wake, "task": task},
    )  # fmt: skip


# The first time after :after at which a pending job of :task is due: one seek per priority
# of its pending jobs (a skip along their index), never the backlog of those due before.
FIRST_DUE_AFTER = """
WITH RECURSIVE priorities(p) AS (
    SELECT (SELECT min(priority) FROM {s}.jobs{index} WHERE task = :task AND status = 'pending')
    UNION ALL
    SELECT (SELECT min(priority) FROM {s}.jobs{index}
            WHERE task = :task AND status = 'pending' AND priority > priorities.p)
    FROM priorities WHERE p IS NOT NULL
)
SELECT min((SELECT min(run_at) FROM {s}.jobs{index} WHERE task = :task AND status = 'pending'
            AND priority = priorities.p AND run_at > :after)) AS first
FROM priorities WHERE p IS NOT NULL
"""


def _first_due_after(tx: Tx, task: str, after: float) -> Steps[float | None]:
    sql = FIRST_DUE_AFTER.format(s="{s}", index=tx.sql.indexed_by("jobs_task_claim_order"))
    (row,) = yield Statement(sql, {"task": task, "after": after})
    return None if row["first"] is None else float(row["first"])


def stirred(tx: Tx, tasks: Iterable[str]) -> Steps[None]:
    """A write that may make room for these tasks' values (a job inserted, ended, put back,
    released by its parents, or waiting for another): a keyed task among them walks again
    from its next claim. Its row is written (and so, on PostgreSQL, locked) whatever it
    held: a claim in flight finishes first, and one that comes after waits for this write
    to commit, and sees it. Only the keyed tasks this daemon knows of (PostgreSQL's insert
    stirs any itself)."""
    keyed = sorted({task for task in tasks if task in tx.limit_keys})
    if not keyed:
        return
    listed, params = members("task", keyed)
    yield Statement(
        "UPDATE {s}.key_turns SET lap_from = NULL, lap_at = NULL, rested_at = NULL,"
        f" rested_wake = NULL WHERE task IN ({listed})",
        params,
    )


def _spaced(
    tx: Tx, request: ClaimRequest, task: str, served: list[Pick], taken: Mapping[int, Job]
) -> Steps[None]:
    """Each value's rate limit moves on by one interval a start (GCRA, as in flow)."""
    interval = request.rates.get(task)
    if interval is None:
        return
    by_key: dict[str, list[Job]] = {}
    for pick in served:
        by_key.setdefault(pick.key, []).append(taken[pick.order[2]])
    for key, started in by_key.items():
        began = max(job.started_at or 0.0 for job in started)
        spent = len(started) * interval
        yield Statement(
            "INSERT INTO {s}.rate_limits (kind, name, tat) VALUES (:kind, :name, :tat)"
            " ON CONFLICT (kind, name) DO UPDATE SET tat = CASE WHEN rate_limits.tat > :began"
            " THEN rate_limits.tat ELSE :began END + :spent",
            {"kind": rate_kind(task), "name": key, "began": began, "tat": began + spent,
             "spent": spent},
        )  # fmt: skip


def _next_due(tx: Tx, request: ClaimRequest, task: str) -> Steps[float | None]:
    """When a value held back by its rate limit may start again, or a delayed job of the
    task is due (None: neither; a job's end makes room, and wakes the claims)."""
    early = tolerance(request.rates.get(task) or 0.0)
    rows = yield Statement(
        "SELECT (SELECT min(tat) FROM {s}.rate_limits WHERE kind = :kind"
        " AND tat > :now + :early) - :early - :now AS held, :now AS now",
        {"kind": rate_kind(task), "early": early},
    )
    now = float(rows[0]["now"])
    delayed = yield from _first_due_after(tx, task, now)
    due = [float(rows[0]["held"])] if rows[0]["held"] is not None else []
    if delayed is not None:
        due.append(delayed - now)
    return max(0.0, min(due)) if due else None


REKEY_SLICE = 500  # jobs a transaction of `rekeyed` reads at most


def rekeyed(tx: Tx, items: list[tuple[str, str | None, int]]) -> Steps[list[int | None]]:
    """A slice of a task's active jobs (pending or running, ids after the given one) with
    their `limit_key` values computed again from their payloads under the task's new path
    (None: it has none now, and they no value: NULL); the last id read, None once none are
    left. The payloads are msgpack, which SQL cannot read: the values are computed here."""
    results: list[int | None] = []
    for task, path, after in items:
        rows = yield Statement(
            "SELECT id, payload, limit_key FROM {s}.jobs WHERE task = :task"
            " AND status IN ('pending', 'running') AND id > :after ORDER BY id LIMIT :most",
            {"task": task, "after": after, "most": REKEY_SLICE},
        )
        values = {
            int(row["id"]): value
            for row in rows
            if (value := None if path is None else limit_key_of(bytes(row["payload"]), path))
            != row["limit_key"]
        }
        if values:
            cases = " ".join(f"WHEN :id_{n} THEN :value_{n}" for n in range(len(values)))
            params: dict[str, object] = {f"id_{n}": id_ for n, id_ in enumerate(values)}
            params |= {f"value_{n}": value for n, value in enumerate(values.values())}
            yield Statement(
                f"UPDATE {{s}}.jobs SET limit_key = CASE id {cases} END"
                f" WHERE id IN ({', '.join(f':id_{n}' for n in range(len(values)))})",
                params,
            )
            yield from stirred(tx, [task])
        if len(rows) >= REKEY_SLICE:
            results.append(int(rows[-1]["id"]))
            continue
        results.append(None)  # the last slice: the task's jobs are keyed by `path` now
        if path is None:
            yield Statement("DELETE FROM {s}.limit_key_paths WHERE task = :task", {"task": task})
        else:
            yield Statement(
                "INSERT INTO {s}.limit_key_paths (task, path) VALUES (:task, :path)"
                " ON CONFLICT (task) DO UPDATE SET path = excluded.path",
                {"task": task, "path": path},
            )
    return results


def limit_key_paths(sql: object) -> Steps[Mapping[str, str]]:
    """The `limit_key` path each task's active jobs were keyed by (a read); a task that
    has none is not there."""
    rows = yield Statement("SELECT task, path FROM {s}.limit_key_paths")
    return {row["task"]: row["path"] for row in rows}
