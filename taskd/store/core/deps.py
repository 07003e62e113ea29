"""Jobs that wait for other jobs (`after`): linked as they are inserted, released or
cancelled in the transaction that ends their last parent.

A child counts the parents it still waits for in `blocked` and, while it waits, its row's
`run_at` is HELD, past anything a claim or a "next due" reads, so that waiting children
cost the claim nothing however many they are; the time it is due keeps in `release_at`.
The parent's end decides (no polling): each child of a job that succeeded (or that fails
with `after_failure = 'run'`) is counted down, and the one whose count reaches 0 is due
again in the same statement; one that waits for a parent that failed or was cancelled is
cancelled, and so in turn are the jobs waiting for it.

On PostgreSQL an insert takes a share lock on the parents' rows, so that a parent's end
either sees the new link or is seen by the insert; a parent ending in a concurrent
transaction waits for the insert's commit, and the other way round.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from taskd.models import FINISHED_STATUSES as FINISHED
from taskd.models import Job, JobStatus
from taskd.store.base import Inserted, NewJob, ParentNotFound
from taskd.store.core import keys
from taskd.store.core.dialect import Tx
from taskd.store.core.statements import Statement, Steps, members
from taskd.store.rows import JOB_COLUMNS, Row, job_from_row

# The run_at of a job waiting for its parents: later than any time a job may be due at
# (protocol.MAX_TIME), so that no claim takes it and no "next due" counts it.
HELD = 1e15
RELEASE_CHUNK = 500  # children per statement, under SQLite's limit of bound variables
OPEN_STATUSES = ("pending", "running")

# Counts a child down by :n parents; the child that waits for none any more is due at the
# time it kept (or now, if that has passed). SET reads the row as it was.
RELEASE_SQL = """UPDATE {{s}}.jobs SET blocked = blocked - :n,
    run_at = CASE WHEN blocked = :n
        THEN (CASE WHEN release_at > :now THEN release_at ELSE :now END) ELSE run_at END,
    release_at = CASE WHEN blocked = :n THEN NULL ELSE release_at END
WHERE id IN ({ids}) AND status = 'pending' AND blocked >= :n
RETURNING id, task, blocked, run_at - :now AS due_in"""

CANCEL_CHILD_SQL = (
    "UPDATE {s}.jobs SET status = 'cancelled', finished_at = :now, error = :reason"
    f" WHERE id = :id AND status = 'pending' RETURNING {JOB_COLUMNS}"
)

HOLD_SQL = (
    "UPDATE {s}.jobs SET blocked = :blocked, after_failure = :after_failure,"
    f" release_at = run_at, run_at = {HELD!r} WHERE id = :id"
)

LINK_SQL = "INSERT INTO {s}.job_deps (parent_id, child_id) VALUES (:parent, :child)"


def lock_parents(tx: Tx, jobs: Sequence[NewJob]) -> Steps[dict[int, JobStatus]]:
    """The status of every job the new jobs wait for, each row locked against a concurrent
    end until the links are committed; ParentNotFound for an id with no job."""
    parents = sorted({parent for job in jobs for parent in job.after})
    if not parents:
        return {}
    statuses: dict[int, JobStatus] = {}
    for start in range(0, len(parents), RELEASE_CHUNK):
        ids, params = members("p", parents[start : start + RELEASE_CHUNK])
        rows = yield Statement(
            f"SELECT id, status FROM {{s}}.jobs WHERE id IN ({ids}) ORDER BY id"
            f"{tx.sql.lock_shared}",
            params,
        )
        statuses.update({row["id"]: row["status"] for row in rows})
    for parent in parents:
        if parent not in statuses:
            raise ParentNotFound(parent)
    return statuses


def link_children(
    tx: Tx, jobs: Sequence[NewJob], inserted: Sequence[Inserted], parents: dict[int, JobStatus]
) -> Steps[list[Job]]:
    """Link the new jobs to their parents; hold those with parents still to end, and decide
    at once those whose parents have all ended; the jobs it cancelled."""
    links: list[dict[str, int]] = []
    cancel: dict[int, str] = {}
    for job, result in zip(jobs, inserted, strict=True):
        if not job.after or result.duplicate:
            continue  # a job it joined waits for what it waited for
        child = result.job_id
        after = sorted(set(job.after))
        links += [{"parent": parent, "child": child} for parent in after]
        failed = next((p for p in after if parents[p] in ("failed", "cancelled")), None)
        if failed is not None and job.after_failure == "cancel":
            cancel[child] = parent_ended(failed, parents[failed])
            continue
        if blocked := sum(parents[p] in OPEN_STATUSES for p in after):
            params = {"id": child, "blocked": blocked, "after_failure": job.after_failure}
            yield Statement(HOLD_SQL, params)
            tx.notes.new.pop(child, None)  # not due: nobody need wake up for it
    if links:
        yield Statement(LINK_SQL, links, many=True)
    return (yield from _cancel(tx, cancel))  # new jobs: none waits for them yet


def settle_children(
    tx: Tx, jobs: Sequence[Job | None], parents: set[int] | None = None
) -> Steps[list[Job]]:
    """The children of the jobs that ended: counted down (and due once they wait for no
    parent), or cancelled, and so on down their own children; the jobs it cancelled.
    `parents`: those of the jobs that have children, if known (the others are not looked
    up: a job's end costs no probe of the links when none wait for it)."""
    ended = {
        job.id: job.status
        for job in jobs
        if job is not None and job.status in FINISHED and (parents is None or job.id in parents)
    }
    cancelled: list[Job] = []
    while ended:
        cancel: dict[int, str] = {}
        counted: Counter[int] = Counter()
        for row in (yield from _pending_children(sorted(ended))):
            parent, child, status = row["parent_id"], row["child_id"], ended[row["parent_id"]]
            if status == "succeeded" or row["after_failure"] == "run":
                counted[child] += 1
            else:
                cancel.setdefault(child, parent_ended(parent, status))
        for child in cancel:
            counted.pop(child, None)
        yield from _count_down(tx, counted)
        # The children it cancelled are ended parents in turn.
        round_ = yield from _cancel(tx, cancel)
        cancelled += round_
        ended = {job.id: job.status for job in round_}
    return cancelled


def parent_ended(parent: int, status: str) -> str:
    """Why a child was cancelled: `parent 12 failed`."""
    return f"parent {parent} failed" if status == "failed" else f"parent {parent} was cancelled"


def _pending_children(parents: list[int]) -> Steps[list[Row]]:
    """The links from these parents to children still pending, with what each child does
    when a parent fails."""
    rows: list[Row] = []
    for start in range(0, len(parents), RELEASE_CHUNK):
        ids, params = members("p", parents[start : start + RELEASE_CHUNK])
        # One probe of the jobs per link: as a join, a planner without statistics may read
        # every pending job instead (a backlog held by a limit makes every job's end slow).
        rows += yield Statement(
            "SELECT parent_id, child_id, after_failure FROM (SELECT d.parent_id, d.child_id,"
            " (SELECT c.after_failure FROM {s}.jobs AS c WHERE c.id = d.child_id"
            " AND c.status = 'pending') AS after_failure"
            f" FROM {{s}}.job_deps AS d WHERE d.parent_id IN ({ids})) AS links"
            " WHERE after_failure IS NOT NULL ORDER BY child_id",
            params,
        )
    return rows


def _cancel(tx: Tx, reasons: dict[int, str]) -> Steps[list[Job]]:
    """Cancel the pending children (id: why); the jobs cancelled."""
    cancelled: list[Job] = []
    for child, reason in sorted(reasons.items()):
        rows = yield Statement(CANCEL_CHILD_SQL, {"id": child, "reason": reason})
        cancelled += [job_from_row(row) for row in rows]
    tx.notes.finished += cancelled
    return cancelled


def _count_down(tx: Tx, counted: Counter[int]) -> Steps[None]:
    """Count each child down by the parents of it that ended; the ones left waiting for
    none are due."""
    by_count: dict[int, list[int]] = {}
    for child, n in sorted(counted.items()):
        by_count.setdefault(n, []).append(child)
    for n, children in by_count.items():
        for start in range(0, len(children), RELEASE_CHUNK):
            ids, params = members("c", children[start : start + RELEASE_CHUNK])
            rows = yield Statement(RELEASE_SQL.format(ids=ids), {**params, "n": n})
            for row in rows:
                if row["blocked"] == 0:
                    tx.notes.made_due(max(0.0, row["due_in"]))
            yield from keys.stirred(tx, [row["task"] for row in rows if row["blocked"] == 0])
