"""What each backend writes in its own SQL, and the transaction as the operations see it."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from taskd.models import JobStatus, WebhookRule
from taskd.store.base import ClaimRequest, NewJob, Outcome
from taskd.store.core.notes import Notes
from taskd.store.core.statements import Statement, Steps
from taskd.store.rows import Row


class Dialect(Protocol):
    """The SQL where SQLite and PostgreSQL differ: a claim (both walk the pending jobs' index
    as queues, SQLite with equalities under index hints, PostgreSQL with row-comparison
    ranges and FOR UPDATE SKIP LOCKED under advisory locks), batches (VALUES lists vs
    arrays), and what PostgreSQL does in one statement with data-modifying CTEs."""

    insert_chunk: int  # jobs per INSERT statement
    register_sql: str  # a node's next worker; returns `worker`
    node_columns: str  # NODE_COLUMNS and `schedules`
    errors_sql: str  # a job's attempt errors (`:id`), oldest first
    pending_index: str  # follows `{s}.jobs` to read it by (task, priority, run_at) of pending jobs
    running_index: str  # follows `{s}.jobs` to read the running jobs by their own index
    ended: str  # a condition: the job has ended, as the ended jobs' index (jobs_finished) says it
    next_priority_sql: (
        str  # the next priority of task `:task`'s pending jobs after `levels.priority`
    )
    fold_counts_sql: str  # folds the job counters' rows, at recoveries and prunes ("": none)
    trim_logs_sql: str  # deletes the lines of job `:job_id` past `:bytes` or `:lines`
    lock_rows: str  # ends a SELECT whose rows the transaction writes next (" FOR UPDATE")
    lock_shared: str  # ends a SELECT to lock its rows against writes until the commit
    payload_holds: str  # a condition: the payload's bytes hold `:text` (as UTF-8)
    # `insert` stirs the turns of the keyed tasks it inserts jobs of (PostgreSQL: an insert
    # may commit on its own, and must stir in its statement); else the insert's caller does.
    insert_stirs: bool

    def indexed_by(self, index: str) -> str:
        """Follows `FROM {s}.jobs` in a walk of an index of the pending jobs, to make sure
        it takes it (SQLite: INDEXED BY; PostgreSQL's planner does)."""
        ...

    def flow_lock(self, exclusive: bool) -> Statement | None:
        """Orders the claims (shared: `claim_start` takes it) after a pause (exclusive) that
        committed before them and before their claim statement (SQLite: its one writer
        does; None)."""
        ...

    def claim_start(self, keyed: Sequence[str], limited: Sequence[str]) -> Statement:
        """What a claim reads first, in one statement, as rows (kind, task, ...): the turn
        of each `keyed` task (kind `turn`, with TURN_COLUMNS of taskd.store.core.keys;
        PostgreSQL: locked unless it rests, made if new, in this order), then, after its
        flow lock (shared), the paused tasks (`paused`), then those of the `limited` tasks
        whose room under their concurrency limit the claim may count (`counted`;
        PostgreSQL: those with pending jobs, each locked until the commit, so that two
        daemons cannot both fill the same room; SQLite: every one, its one writer does)."""
        ...

    def lock_windows(self, keys: Sequence[tuple[str, str]]) -> Statement | None:
        """Holds these (task, key) pairs until the commit, so that a concurrent insert of
        one of them reads its uniqueness window or its debounced job only once this one's
        job is there to see (SQLite: its one writer does; None)."""
        ...

    def insert(self, jobs: Sequence[NewJob]) -> Steps[list[Row]]:
        """Inserts the jobs but those whose key is taken; their rows: id, task, key, due_in."""
        ...

    def insert_one_unless_keyed(self, job: NewJob) -> Statement | None:
        """`insert` of one job, unless its task has a `limit_key` path or a turn among its
        keys: then a row (task, path) for each instead, id NULL (path NULL: the turn). None:
        no such statement (SQLite: its `insert` of one job is as lean already)."""
        ...

    def active_keys(self, keys: Sequence[tuple[str, str | None]]) -> Statement:
        """The active jobs with these (task, key): id, task, key."""
        ...

    def claim(self, request: ClaimRequest, quotas: Mapping[str, int]) -> Steps[list[Row]]:
        """Marks the jobs the request takes running, no more of a task than its room under
        its concurrency limit and its quota (`quotas`: taskd.store.core.flow); their rows."""
        ...

    def next_due(self, request: ClaimRequest, quotas: Mapping[str, int]) -> Steps[float | None]:
        """In how many seconds the next pending job of a task with room is due (None: none)."""
        ...

    def finish(self, outcomes: Sequence[Outcome], columns: str) -> Steps[list[Row]]:
        """Records the outcomes (see FINISHED) and their errors; the jobs' rows: `columns`
        (JOB_COLUMNS, or FINISHED_COLUMNS), then due_in and `linked`: whether other jobs
        wait for it (`after`), read after any insert that linked one committed (false for a
        job that did not end: it has none to settle)."""
        ...

    def recover(self, quarantine_after: int) -> Steps[list[Row]]:
        """Takes back the ABANDONED jobs (see RECOVERED), recording why; their rows."""
        ...

    def cancel(self, job_id: int) -> Steps[list[Row]]:
        """Cancels a pending or running job (a running attempt is recorded); its row."""
        ...

    def prune(self, status: JobStatus, age: float) -> Steps[int]:
        """Deletes up to PRUNE_SLICE jobs that finished `age` seconds ago; how many."""
        ...

    def renew(self, worker: str, job_ids: Sequence[int], lease: float) -> Steps[set[int]]:
        """Extends a worker's heartbeat and its leases on `job_ids`; the ids it still holds."""
        ...


@dataclass(slots=True)
class Tx:
    """A write transaction as its operations see it: the dialect's SQL, and its notes."""

    sql: Dialect
    notes: Notes
    # The [[webhook]] rules of the daemon writing: the events they receive are enqueued in
    # the transaction that makes them.
    webhooks: Sequence[WebhookRule] = ()
    # The `limit_key` of the tasks that have one (task -> field path): an insert records
    # each job's value of it.
    limit_keys: Mapping[str, str] = field(default_factory=dict)


# A store operation: the writes of one kind that met in a batch, run in one transaction;
# one result per item, in order.
Operation = Callable[[Tx, list[Any]], Steps[list[Any]]]
