"""The job store interface every backend implements, the values that cross it, and its contract.

Every execution of a task is a row in the store. The store enforces the uniqueness rules
(single-flight runs and unique keys, a schedule's tick fired once), the state machine of a
job, the per-task concurrency limits, and fencing: only the attempt that claimed a job may
record its outcome. It is written for several daemons sharing one store; SQLite has one
(its lock file says so), PostgreSQL may have many.

The contract:

- **The store owns "now".** Callers pass durations (a lease, a delay, a retry's wait) and
  the store reads its own clock: the database server's, or for SQLite the clock it was
  given (tests move it). Instants come in only where a person or a cron expression gave
  them: an enqueue's `run_at`, a schedule's tick and what it has covered.
- **Nodes and workers.** A daemon is a node with a stable id. Each start of a node registers
  a new *worker* (`node/N`, N counting its starts) with a heartbeat; the worker holds the
  leases of the jobs it claims. A worker is alive while its node row names it and its
  heartbeat has not expired; `renew` extends both the heartbeat and the leases.
  `recover` takes back the running jobs whose lease expired or whose worker is not alive,
  which includes a node's own jobs from before its restart.
- **One statement decides.** A claim picks and marks its jobs in one statement, and so does
  recovery, so that two daemons can never take the same job (SQLite: one writer; a server:
  `FOR UPDATE SKIP LOCKED`). Ids come from the database.
- **Limits across everyone.** `claim` gets each task's configured concurrency and counts
  the task's running jobs whoever runs them; it starts no job of a paused task
  (`set_task_paused`, remembered in the store). A running job that waits for another job
  (`set_waiting`, for `ctx.run_task`) counts against neither.
- **Fencing.** Each claim increments the job's `epoch`; an outcome, a lease renewal or a
  change of the waiting flag applies only while the job runs under that worker (and epoch).
- **Health.** Every write reports its end to `Store.health`: a failure with its message
  (which names the store and says what to do), a success by its kind, so that the daemon
  can tell which kinds of write keep failing (`status`, `/healthz`).
- **Notifications** (`Store.events`, always after the write has committed, also when the
  caller of the write has given up, and for a shared store also for other daemons' writes):
  `finished(job)` when a job reaches succeeded, failed or cancelled; `due(delay)` when jobs
  became claimable or will in `delay` seconds (inserted, retried, returned to the queue) or
  a running job started waiting (its task's limit has room again);
  `cancel_requested(job_id)` when a job was cancelled (whoever runs it stops it);
  `activity(job_id, epoch, seq, progress)` when another daemon sharing the store recorded
  progress (`progress`) or log lines (from line `seq` of attempt `epoch`) of a job it runs
  (a daemon's own activity is its news, not a store event);
  `resync()` when the store may have missed some of these (a lost database connection):
  listeners then read again what they wait for. A daemon's own wake-ups (a slot it freed)
  are its business, not store events.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

import msgspec

from taskd.models import (
    AfterFailure,
    BatchInfo,
    FiredJob,
    Hook,
    Job,
    JobLogs,
    JobOrigin,
    JobStatus,
    LogLine,
    NodeInfo,
    Progress,
    TaskCounts,
    WebhookRule,
)
from taskd.store.events import JobEvents
from taskd.store.health import StoreHealth


class StoreError(Exception):
    """The store could not do what was asked (disk full, locked, corrupt); nothing was written.

    Its message may say what a running taskd does about it by itself (carry on once there
    is room, reconnect); `at_start_up` is the message without that, for a start-up that
    fails, after which the process exits.
    """

    def __init__(self, message: str, *, at_start_up: str | None = None) -> None:
        super().__init__(message)
        self.at_start_up = message if at_start_up is None else at_start_up


class JobNotFound(StoreError):
    def __init__(self, job_id: int) -> None:
        super().__init__(f"no job with id {job_id}")
        self.job_id = job_id


class ParentNotFound(JobNotFound):
    """A job was to wait for a job that does not exist (or was pruned)."""

    def __init__(self, job_id: int) -> None:
        StoreError.__init__(
            self, f"no job with id {job_id} to wait for (after); give the id of an existing job"
        )
        self.job_id = job_id


class InvalidTransition(StoreError):
    """The job is not in a state that allows the change (e.g. retry of a running job)."""


_STATES = {
    "pending": "is still pending",
    "running": "is still running",
    "succeeded": "has already succeeded",
    "failed": "has already failed",
    "cancelled": "was already cancelled",
}


def refused(job_id: int, status: str, verb: str) -> InvalidTransition:
    """`job 5 has already succeeded and cannot be cancelled`: the same words on every store."""
    return InvalidTransition(
        f"job {job_id} {_STATES.get(status, 'is ' + status)} and cannot be {verb}"
    )


class NewJob(msgspec.Struct, frozen=True):
    """A job to insert; `payload` is msgpack already validated against the task's schema.

    It is due `delay` seconds after the insert, or at `run_at` (a time a person gave) if set,
    and not before every job in `after` has succeeded (see `after_failure`).
    """

    task: str
    payload: bytes
    origin: JobOrigin
    max_attempts: int
    priority: int = 0
    key: str | None = None
    parent_id: int | None = None
    delay: float = 0.0
    run_at: float | None = None
    # With a key: a job of the task with this key created less than this many seconds ago,
    # whatever its status, is returned instead (a uniqueness window).
    unique_for: float | None = None
    # With a key: if a job of the task with this key is pending, its payload is replaced and
    # it is due `debounce` seconds from now, never later than `max_wait` after it was created;
    # that job is returned (else this one is inserted, due in `delay` = `debounce`).
    debounce: float | None = None
    max_wait: float | None = None
    traceparent: str | None = None  # the W3C traceparent of whoever created it
    after: tuple[int, ...] = ()
    after_failure: AfterFailure = "cancel"
    batch_id: int | None = None
    # The value of its task's `limit_key` in the payload ('' where the payload has none;
    # None: the store works it out if the task has one, else the job has no value (NULL),
    # and is in no index of the keyed jobs): its task's limits count per value.
    limit_key: str | None = None


class Inserted(msgspec.Struct, frozen=True):
    """The id of an inserted job, or of the active job with the same task and key."""

    job_id: int
    duplicate: bool


class Failure(msgspec.Struct, frozen=True):
    """Why an attempt failed; the store records it with the attempt's number and time."""

    kind: Literal["error", "timeout"]
    message: str
    traceback: str | None = None


class Outcome(msgspec.Struct, frozen=True):
    """What one attempt of a claimed job came to, as its worker reports it.

    `epoch` (the job's claim count when this worker claimed it) and `worker` fence the
    write: it applies only while the job is still running that claim. "retry" puts the job
    back in the queue for another attempt in `retry_in` seconds; "released" gives it back
    at once without counting the attempt (the daemon is stopping).
    """

    job_id: int
    epoch: int
    worker: str
    status: Literal["succeeded", "failed", "retry", "released"]
    result: bytes | None = None
    error: Failure | None = None
    retry_in: float = 0.0
    # The hook job its task enqueues should the job end with this outcome (succeeded, or
    # failed for good), in the same transaction.
    hook: Hook | None = None
    # The job as its worker claimed it: the finish then reads back only what the attempt's
    # end changed, or the run may have (its progress), not the whole row (taskd's executor
    # always gives it; without it the finish reads the whole job).
    job: Job | None = None


class SharedLimit(msgspec.Struct, frozen=True):
    """A limit several tasks share (`[limits.NAME]`): at most `concurrency` of their jobs
    running at once, and their starts spaced `interval` seconds apart (GCRA, as a task's
    own rate limit: taskd.store.core.flow)."""

    tasks: tuple[str, ...]
    concurrency: int | None = None
    interval: float | None = None


class LimitState(msgspec.Struct, frozen=True):
    """How a shared limit stands: its tasks' jobs running (those waiting for another job
    excepted), those due and pending, and when its rate next allows a start (None: it has
    no rate, or has started nothing yet)."""

    running: int
    waiting: int
    next_start: float | None = None


class ClaimRequest(msgspec.Struct, frozen=True):
    """A worker asks for up to `limit` due jobs, each leased to it for `lease` seconds.

    `limits` is the configured concurrency of the tasks that have one: the store counts
    each task's running jobs across every worker (those waiting for another job excepted).
    `rates` is, for the tasks with a rate limit, the seconds between two of their starts:
    the store spaces the starts of each across every worker (taskd.store.core.flow).
    `shared` are the limits several tasks share, by name: a job starts only when its own
    task's limits and every shared limit its task is in allow it.
    """

    worker: str
    limit: int
    lease: float
    limits: Mapping[str, int] = {}
    rates: Mapping[str, float] = {}
    shared: Mapping[str, SharedLimit] = {}
    # The tasks with a `limit_key`: their concurrency and rate count per key value, and
    # their keys take turns (taskd.store.core.keys).
    keyed: frozenset[str] = frozenset()

    def limited(self) -> frozenset[str]:
        """The tasks whose room a job of theirs frees when it ends: those with a
        concurrency limit of their own or in a shared one."""
        members = (task for limit in self.shared.values() for task in limit.tasks)
        return frozenset(self.limits).union(members)


class Claimed(msgspec.Struct, frozen=True):
    """Jobs a claim handed out (lowest priority number, then earliest due, then oldest
    first), and in how many seconds the next pending job it could not take is due (None:
    none is pending, besides those of tasks at their limit)."""

    jobs: list[Job]
    next_due_in: float | None


class Finished(msgspec.Struct, frozen=True):
    """What `finish` recorded (None where fencing refused an outcome), and the claim made
    in the same transaction, if one was asked for."""

    jobs: list[Job | None]
    claimed: Claimed | None = None


class JobFilter(msgspec.Struct, frozen=True):
    statuses: Sequence[JobStatus] | None = None
    task: str | None = None
    limit: int = 50
    origin: JobOrigin | None = None
    key: str | None = None
    before: int | None = None  # ids below this one
    since: float | None = None  # created_at at or after
    until: float | None = None  # created_at before
    text: str | None = None  # in the payload (its msgpack bytes hold strings as UTF-8)


class ScheduleState(msgspec.Struct):
    """What the store remembers of a schedule, shared by every daemon.

    `last_tick` is the latest tick fired; `covered_until` is the instant up to which every
    tick has been dealt with (fired, or deliberately not: paused, or dropped by catch_up),
    so that ticks after it and before a start-up are the missed ones. `last_jobs` are the
    jobs of the latest firing, one per task.
    """

    id: str
    last_tick: float | None = None
    paused: bool = False
    coalesced: int = 0
    covered_until: float | None = None
    fired_at: float | None = None
    last_jobs: list[FiredJob] = []


class TickFired(msgspec.Struct, frozen=True):
    """A firing: `fired` is False if the tick had fired already (here or on another daemon);
    `jobs` are the tick's jobs, whoever fired it; `claimed`, the claim made in the same
    transaction, if one was asked for."""

    fired: bool
    jobs: list[FiredJob]
    claimed: Claimed | None = None
    held: list[Job] = []  # the jobs a `hold` took, to start at their due time


class Hold(msgspec.Struct, frozen=True):
    """A tick fired ahead of its time holds its jobs for `worker`: they are claimed (leased
    until their due time plus `lease`) but not started, so that the worker starts them at
    their time without a commit; if it goes away first, recovery puts them back as they
    were (taskd.store.core.schedules.release_held)."""

    worker: str
    lease: float


class MissedTicks(msgspec.Struct, frozen=True):
    """Ticks of a schedule that went by unfired (taskd was down, catch_up dropped them),
    reported as a `schedule.missed` webhook event by the transaction that moves the
    schedule's covered_until from `after`, the value it was read with: of the daemons that
    deal with the same ticks, only the first reports them. `missed` holds the first of them
    (ISO times), `count` how many there were, counted up to a bound (`exact` False past it);
    `last` is the latest, `fired` the tick fired instead, if any."""

    schedule: str
    tasks: tuple[str, ...]
    after: float
    missed: list[str]
    count: int
    exact: bool
    last: str
    fired: str | None = None


class ProgressNote(msgspec.Struct, frozen=True):
    """A running job's latest progress, as of `ago` seconds before the write; applies only
    while the job is at claim `epoch`."""

    job_id: int
    epoch: int
    done: float
    total: float | None = None
    message: str | None = None
    ago: float = 0.0


class LogNote(msgspec.Struct, frozen=True):
    """A line `ctx.logger` wrote `ago` seconds before the write (see models.LogLine)."""

    job_id: int
    epoch: int
    seq: int
    level: str
    message: str
    ago: float = 0.0


class JobActivity(msgspec.Struct, frozen=True):
    """What a job did lately (`Store.job_activity`): its task and status, its latest
    progress, and its newest lines after a given one; `skipped` older ones were not read."""

    task: str
    status: JobStatus
    progress: Progress | None
    lines: list[LogLine]
    skipped: int = 0


MAX_LOG_LINES = 1000  # lines a job keeps; older ones are let go and counted
MAX_LOG_BYTES = 64 * 1024  # bytes (UTF-8) of messages a job keeps


class Store(Protocol):
    """A durable job store; see the module's docstring for the contract. Batch methods take
    and return lists in the same order."""

    events: JobEvents
    health: StoreHealth  # the kinds of write failing now; each write reports its end to it
    description: str  # where the data lives, for status output
    # The [[webhook]] rules of this daemon: its writes enqueue the events they receive, in
    # the transaction that makes them (a job's end, a batch's end).
    webhooks: tuple[WebhookRule, ...]
    # The `limit_key` of the tasks that have one (task -> field path): an insert records
    # each job's key value.
    limit_keys: Mapping[str, str]

    async def open(self) -> None:
        """Create or migrate the schema; raise StoreError if the store cannot be used."""

    async def close(self) -> None: ...

    # -- nodes ---------------------------------------------------------------------------

    async def register_node(self, node: str, ttl: float, slots: int = 0) -> str:
        """Start a new worker of `node` with a heartbeat of `ttl` seconds and `slots` jobs
        at once (its `workers`, which `nodes()` reports); return its id.

        The node's previous worker is no longer alive: its running jobs can be recovered.
        """

    async def leave(self, worker: str) -> None:
        """The worker stops (its jobs went back to the queue); it is not alive any more,
        and its node's next start is still a new worker."""

    async def announce_schedules(self, worker: str, digest: str) -> None:
        """Record a digest of the schedules the worker runs, for `nodes()` to show (daemons
        sharing a store with different schedules are told so)."""

    async def nodes(self) -> list[NodeInfo]:
        """The nodes alive, with the number of jobs each runs and their schedules' digest."""

    # -- job writes ----------------------------------------------------------------------

    def insert(self, jobs: Sequence[NewJob]) -> asyncio.Future[list[Inserted]]:
        """Insert jobs; one with the task and key of an active job returns that job instead,
        and so does one with `unique_for` and the key of a job created within that window.
        Submitted now; the future is done once they are committed (a caller may answer
        from its callback rather than wait)."""

    async def insert_and_claim(
        self, jobs: Sequence[NewJob], claim: ClaimRequest
    ) -> tuple[list[Inserted], Claimed]:
        """Insert jobs, then claim, in one transaction: a daemon with free slots takes the
        most urgent due jobs (the new ones, if nothing is more urgent) without a write of
        its own. The new jobs that the claim did not take are announced as due."""

    async def claim(self, request: ClaimRequest) -> Claimed:
        """Mark up to `request.limit` due pending jobs running for the worker; none if the
        worker is not registered (its node started again, or it left)."""

    async def finish(
        self, outcomes: Sequence[Outcome], claim: ClaimRequest | None = None
    ) -> Finished:
        """Record outcomes, then (if asked) claim, in one transaction."""

    async def renew(self, worker: str, job_ids: Sequence[int], lease: float) -> list[int]:
        """Extend the worker's heartbeat and its leases on `job_ids` by `lease` seconds.

        Returns the ids it no longer holds (cancelled, finished, or taken over after its
        lease or heartbeat expired): the worker must stop running them. All of them if
        the worker is not alive any more (its node started again elsewhere).
        """

    async def set_waiting(self, job_id: int, epoch: int, worker: str, waiting: bool) -> bool:
        """Mark a running job as waiting for another job (or no longer); False if fenced."""

    def insert_batch(
        self, new: Sequence[NewJob], on_finish: Hook | None = None
    ) -> asyncio.Future[tuple[int, list[Inserted]]]:
        """Insert jobs as a batch in one transaction (submitted now, as `insert`); its id,
        and the jobs' as `insert`. Once
        every job of the batch has ended, `on_finish` is enqueued (exactly once) with the
        payload {"batch", "succeeded", "failed", "cancelled"} (lists of ids)."""

    async def batch(self, batch_id: int) -> BatchInfo | None:
        """A batch's progress and its jobs by status; None if there is no such batch."""

    async def recover(
        self, quarantine_after: int, on_failure: Mapping[str, Hook] | None = None
    ) -> list[Job]:
        """Take back the running jobs whose lease expired or whose worker is not alive.

        The lost attempt is counted and recorded as `interrupted`; a job interrupted
        `quarantine_after` times, or on its last attempt, fails instead of going back (and
        the hook `on_failure` names for its task is enqueued).
        """

    async def cancel(self, job_id: int) -> Job:
        """Cancel a pending or running job; raise JobNotFound or InvalidTransition."""

    async def retry(self, job_id: int) -> Job:
        """Put a failed or cancelled job back to pending with its attempts reset."""

    async def prune(self, older_than: Mapping[JobStatus, float]) -> int:
        """Delete the jobs of each status that finished more than so many seconds ago."""

    async def record_activity(
        self,
        progress: Sequence[ProgressNote],
        lines: Sequence[LogNote],
        dropped: Mapping[int, int] | None = None,
    ) -> None:
        """Record jobs' latest progress and append their log lines, keeping each job's last
        MAX_LOG_LINES lines and MAX_LOG_BYTES; lines let go (and `dropped[job_id]` lines
        the caller let go) are counted. Raises no events."""

    # -- job reads -----------------------------------------------------------------------

    async def job_logs(self, job_id: int) -> JobLogs | None:
        """The lines kept of a job, oldest first; None if there is no such job."""

    async def job_activity(
        self, job_id: int, after: tuple[int, int], limit: int
    ) -> JobActivity | None:
        """A job's task, status and progress, and its newest `limit` lines after the line
        `after` (epoch, seq); None if there is no such job."""

    async def get(self, job_id: int) -> Job | None:
        """One job with the errors of all its attempts."""

    async def list_jobs(self, query: JobFilter) -> list[Job]:
        """Jobs matching the filter, newest first."""

    async def counts(self) -> list[TaskCounts]:
        """Jobs per task and status, and per task the oldest due pending job's age."""

    async def finished_recently(self, window: float, buckets: int) -> list[tuple[int, int]]:
        """Jobs that succeeded and failed in each of `buckets` equal spans of the last
        `window` seconds, oldest span first."""

    async def clock(self) -> float:
        """The store's "now" (Unix seconds): the clock every instant in it is written by."""

    async def queue_depth(self) -> int:
        """How many jobs are pending (cheap: for status lines updated as jobs come and go)."""

    # -- flow control --------------------------------------------------------------------

    async def set_task_paused(self, task: str, paused: bool) -> float | None:
        """Pause a task (no attempt of it starts on any daemon, its jobs wait as pending) or
        resume it; since when it is paused now (pausing a paused task keeps its time), None
        once resumed."""

    async def rekey(self, task: str, path: str | None) -> None:
        """Record again the `limit_key` value of a task's pending and running jobs, from
        their payloads under its new path (None: it has none now), and that path as the
        one they are keyed by: when a start or a reload gives a task a `limit_key`, changes
        it or takes it away (set `limit_keys` first)."""

    async def limit_key_paths(self) -> Mapping[str, str]:
        """The `limit_key` path each task's active jobs are keyed by (see `rekey`)."""

    async def paused_tasks(self) -> Mapping[str, float]:
        """The paused tasks, and since when."""

    async def rate_limit_starts(self, rates: Mapping[str, float]) -> Mapping[str, float]:
        """When the rate limit of each of these tasks (task -> seconds between starts) next
        allows a start (those that have started a job under one); a time past means now."""

    async def values_in_use(self, tasks: Sequence[str]) -> Mapping[str, tuple[int, int]]:
        """Of each of these keyed tasks, how many values of its `limit_key` have jobs
        running, and how many have due jobs pending (counts the backlog: for status)."""

    async def key_state(
        self, task: str, key: str, interval: float | None
    ) -> tuple[int, float | None]:
        """A value of a keyed task's `limit_key`: its running jobs (those waiting for another
        job excepted), and when its rate limit (`interval` seconds between starts) next
        allows a start (None: nothing started under it yet)."""

    async def limit_states(self, limits: Mapping[str, SharedLimit]) -> Mapping[str, LimitState]:
        """How each of these shared limits stands (a read)."""

    # -- schedules -----------------------------------------------------------------------

    async def schedule_states(self, ids: Sequence[str] | None = None) -> list[ScheduleState]:
        """The state of the given schedules (those the store knows), or of all."""

    async def add_schedules(self, ids: Sequence[str], first_seen: float) -> None:
        """Remember schedules: those new to the store, or never covered, are covered until
        `first_seen` (the ticks after it that go by unfired are the missed ones)."""

    async def cover_schedules(
        self, ids: Sequence[str], until: float, *, missed: Sequence[MissedTicks] = ()
    ) -> None:
        """Every tick of these schedules up to `until` has been dealt with (never moves back);
        `missed` ticks of them are reported in the same transaction."""

    async def set_paused(
        self, schedule: str, paused: bool, *, covered_until: float | None = None
    ) -> bool:
        """Pause or resume a schedule (resuming also covers it until `covered_until`);
        False if it already was so."""

    async def ticks_started(
        self, held: Sequence[tuple[int, int]], started: float | None = None
    ) -> None:
        """The held jobs (id, epoch) have started, at `started` (time.monotonic(); None: now):
        their attempts count from then on (their started_at is set, by the store's clock,
        never before their time), and a recovery takes them back as interrupted ones."""
        ...

    async def fire_tick(
        self,
        schedule: str,
        tick: float | None,
        jobs: Sequence[NewJob],
        *,
        covered_until: float | None = None,
        claim: ClaimRequest | None = None,
        missed: MissedTicks | None = None,
        hold: Hold | None = None,
    ) -> TickFired:
        """Insert a tick's jobs and record the firing in one transaction (with `claim`,
        claiming in it too, as `insert_and_claim` does), reporting the `missed` ticks
        before it in that transaction.

        A tick fires once, however many daemons try: the store keeps a unique (schedule,
        tick) row. `tick` None is a firing out of schedule (trigger), unique in nothing.
        The schedule is covered until `covered_until` either way. With `hold` (a tick
        fired ahead of its time), the new jobs are held for that worker (TickFired.held).
        """
