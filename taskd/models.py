"""Data shapes shared by the daemon and its clients, and the units they are written in.

Standard library and msgspec only: taskctl imports this module.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from typing import Any, Literal, get_args

import msgspec

JobStatus = Literal["pending", "running", "succeeded", "failed", "cancelled"]
JOB_STATUSES: tuple[JobStatus, ...] = ("pending", "running", "succeeded", "failed", "cancelled")
ACTIVE_STATUSES: tuple[JobStatus, ...] = ("pending", "running")
FINISHED_STATUSES: tuple[JobStatus, ...] = ("succeeded", "failed", "cancelled")

# What a control connection may do: everything, or only the methods that change nothing.
Access = Literal["full", "readonly"]

# What created a job: `taskctl run`/Client.run, `enqueue`, a cron tick, or a task calling another.
JobOrigin = Literal["run", "enqueue", "schedule", "task", "hook", "batch"]
JOB_ORIGINS: tuple[JobOrigin, ...] = get_args(JobOrigin)
# What a job waiting for others (`after`) does when one of them fails or is cancelled:
# "cancel" it (and, in turn, the jobs waiting for it), or "run" it all the same.
AfterFailure = Literal["cancel", "run"]

# The unique key a `run` uses unless it is given one: at most one active run per task.
RUN_KEY = "@run"
# How concurrent runs of a task share an execution (Nitro's concurrency modes): "task", all
# of them (the key RUN_KEY); "payload", those with equal payloads (by a canonical hash);
# "none", none (each run its own job).
SingleFlight = Literal["task", "payload", "none"]
SINGLE_FLIGHT_MODES: tuple[SingleFlight, ...] = ("task", "payload", "none")


class AttemptError(msgspec.Struct, frozen=True):
    """The error of one failed or interrupted attempt."""

    attempt: int
    # "retried" marks a `retry` by request (attempt 0): the attempts after it count from 1.
    kind: Literal["error", "timeout", "interrupted", "cancelled", "retried"]
    message: str
    at: float
    traceback: str | None = None
    started_at: float | None = None  # when the attempt started (not known before schema 6)
    worker: str | None = None  # the worker (`node/N`) that ran it


def since_retry(errors: list[AttemptError]) -> list[AttemptError]:
    """The errors of the attempts since the latest `retry` by request (whose attempts count
    from 1 again), oldest first."""
    retried = [index for index, error in enumerate(errors) if error.kind == "retried"]
    return errors[retried[-1] + 1 :] if retried else errors


class Progress(msgspec.Struct, frozen=True):
    """How far a running job says it is (`ctx.progress`): `done` of `total` (None: unknown),
    what it is doing, and when taskd recorded it (Unix seconds)."""

    done: float
    total: float | None = None
    message: str | None = None
    at: float = 0.0


class LogLine(msgspec.Struct, frozen=True):
    """A line a task wrote with `ctx.logger`; lines are ordered by (epoch, seq): the claim
    of the job that wrote it, and the line's number within that attempt."""

    epoch: int
    seq: int
    at: float
    level: str
    message: str


class JobLogs(msgspec.Struct, frozen=True):
    """The lines kept of a job, oldest first; `dropped` older lines were let go (a job keeps
    its last 1,000 lines and 64 KiB)."""

    job_id: int
    lines: list[LogLine]
    dropped: int = 0


class Job(msgspec.Struct):
    """One execution of a task, as the job store records it (contrib/protocol.md: "The Job
    object"). `payload` and `result` are any msgpack value."""

    # Inside the daemon `payload` and `result` are msgspec.Raw, so that they travel without
    # being decoded and encoded again.

    id: int
    task: str
    status: JobStatus
    origin: JobOrigin
    created_at: float
    run_at: float
    payload: Any = None
    result: Any = None
    error: str | None = None
    attempts: int = 0
    max_attempts: int = 1
    priority: int = 0
    key: str | None = None
    crashes: int = 0
    parent_id: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    # The worker (`node/start`) of its latest attempt: running it now, or where it ran.
    worker: str | None = None
    epoch: int = 0  # claims so far: the fencing token (attempts is reset by a retry, this is not)
    errors: list[AttemptError] = []  # filled by the `job` method only
    progress: Progress | None = None  # the latest `ctx.progress` of its latest attempt
    traceparent: str | None = None  # the W3C traceparent of whoever created it (tracing)
    blocked: int = 0  # parents (`after`) it still waits for; it is pending meanwhile
    after_failure: AfterFailure = "cancel"  # what a parent that fails or is cancelled does
    parents: list[int] = []  # the jobs it waits for (`after`); filled by the `job` method only
    children: list[int] = []  # the jobs waiting for it; filled by the `job` method only
    batch_id: int | None = None  # the batch (`enqueue_many` with `on_finish`) it belongs to


class Hook(msgspec.Struct, frozen=True):
    """A hook job to enqueue as a job ends: its task, and the attempts that task gives."""

    task: str
    max_attempts: int


# The built-in task that delivers webhook events ([[webhook]] in taskd.toml); its jobs'
# own ends trigger no webhook, so that deliveries never loop.
WEBHOOK_TASK = "taskd:webhook"
WebhookEvent = Literal[
    "job.failed", "job.succeeded", "job.cancelled", "batch.finished", "schedule.missed"
]


class WebhookRule(msgspec.Struct, frozen=True):
    """Which events a [[webhook]] receives: its url, its events, and the fnmatch patterns of
    the tasks whose events it receives (none: every task's)."""

    url: str
    events: frozenset[str]
    tasks: tuple[str, ...] = ()
    max_attempts: int = 8  # of each delivery (the built-in task's, [task."taskd:webhook"])


class BatchInfo(msgspec.Struct, frozen=True):
    """A batch of jobs (`enqueue_many` with `on_finish`): its jobs by status, how many have
    ended, and its callback job once they all have."""

    id: int
    total: int
    ended: int
    counts: dict[str, int]  # jobs by status
    created_at: float
    on_finish: str | None = None
    finished_at: float | None = None  # when its last job ended
    callback_id: int | None = None  # the job of on_finish, once enqueued


class TaskInfo(msgspec.Struct, frozen=True):
    """A task as the daemon loaded it from the tasks folder."""

    name: str
    description: str
    file: str
    schedules: list[str] = []  # the expressions of the schedules that start this task
    next_run_at: float | None = None  # the next tick of those schedules (paused ones left out)
    timeout: float | None = None
    max_attempts: int | None = None
    backoff: float | None = None
    max_backoff: float | None = None
    concurrency: int | None = None
    rate_limit: str | None = None  # "10/s": at most that many attempts start per period
    single_flight: SingleFlight = "task"  # which concurrent runs share an execution
    payload_schema: dict[str, Any] | None = None
    paused_since: float | None = None  # `taskctl pause NAME`: no job of it starts until resumed
    on_success: str | None = None  # the task enqueued when one of its jobs succeeds
    on_failure: str | None = None  # ... and when one fails after its last attempt
    limits: list[str] = []  # the shared limits ([limits.NAME]) its jobs count against
    limit_key: str | None = None  # the payload field its limits count per value of


class LimitUse(msgspec.Struct, frozen=True):
    """A shared limit (`[limits.NAME]`) and its use across every daemon sharing the store:
    the jobs of its tasks running and due (`waiting`), and when its rate (if it has one)
    next allows a start (Unix seconds; None: now, or nothing started yet)."""

    name: str
    tasks: list[str]
    running: int
    waiting: int
    concurrency: int | None = None
    rate: str | None = None  # "25/s"
    next_start: float | None = None


class KeyedUse(msgspec.Struct, frozen=True):
    """A task with a `limit_key` and how its values stand across every daemon: the values
    with jobs running, and those with due jobs waiting to start."""

    task: str
    limit_key: str
    running: int  # values with jobs running
    waiting: int  # values with due jobs pending


class FiredJob(msgspec.Struct, frozen=True):
    """The job one task of a schedule got at a firing; `joined` when the firing coalesced
    into that task's run that was still pending or running."""

    task: str
    id: int
    joined: bool = False
    status: JobStatus | None = None  # filled in when shown; None once the job is pruned


class ScheduleInfo(msgspec.Struct, frozen=True):
    """A schedule as `taskctl schedules` shows it. Times are Unix seconds.

    `last_tick` is the scheduled time of the latest tick fired; `fired_at` when the schedule
    last fired (a tick, a catch-up or a trigger); `last_outcome` sums up the status of
    `last_jobs`; `coalesced` counts the firings of a task that joined its unfinished run.
    """

    id: str
    cron: str
    timezone: str
    tasks: list[str]
    catch_up: Literal["skip", "latest", "all"] = "skip"
    max_catch_up: int = 10
    enabled: bool = True
    paused: bool = False
    next_tick: float | None = None
    last_tick: float | None = None
    fired_at: float | None = None
    last_outcome: str | None = None
    last_jobs: list[FiredJob] = []
    coalesced: int = 0


class TaskCounts(msgspec.Struct, frozen=True):
    """Jobs of one task by status, and the age of its oldest due pending job."""

    task: str
    counts: dict[str, int]
    oldest_pending_age: float | None = None
    next_due_at: float | None = None


class ConnectionStats(msgspec.Struct, frozen=True):
    """The control socket's connections, their limits, and how often the limits were hit.

    Counters (`refused_*`, `closed_*`) count since the daemon started.
    """

    open: int
    max_connections: int  # for root and taskd's own user, and again for all other users
    max_per_user: int  # max_connections_per_user: what one other user may hold
    per_user: dict[int, int]  # uid -> open connections
    idle_timeout: float
    output_budget: int  # bytes of unsent replies a connection may have before it is paused
    paused: int  # connections not read now: their peer is not reading its replies
    unsent_bytes: int  # replies written but not yet taken by their peers, all connections
    refused_busy: int  # max_connections was reached
    refused_per_user: int  # the caller's user held max_connections_per_user already
    closed_idle: int  # nothing in flight and nothing sent for idle_timeout
    closed_unread: int  # the peer had not caught up with its replies within idle_timeout


class HttpStats(msgspec.Struct, frozen=True):
    """The HTTP listener's connections, its limits, and how often they were hit.

    Counters (`refused_*`, `closed_idle`) count since the daemon started.
    """

    open: int
    authenticated: int  # connections whose request carried a token (unix: an allowed peer)
    max_connections: int
    unauthenticated_share: int  # of max_connections, what the other connections may hold
    header_timeout: float
    keepalive_timeout: float
    refused_header_timeout: int  # the request line and headers came too slowly: 408
    refused_unauthenticated: int  # closed to make room for a newer connection in the share
    refused_busy: int  # a request with a token found every authenticated connection busy: 503
    closed_idle: int  # waiting for a request: after keepalive_timeout, or to make room
    event_streams: int = 0  # `GET /events` streams open (each also counted in `authenticated`)
    max_event_streams: int = 0
    refused_event_streams: int = 0  # a `GET /events` found max_event_streams open: 503
    sessions: int = 0  # dashboard sessions signed in (None of them idle past session_idle)
    max_sessions: int = 0  # 0: no dashboard
    sessions_evicted: int = 0  # signed out to make room for a newer one (max_sessions)


class ThreadStats(msgspec.Struct, frozen=True):
    """The threads that run plain-function tasks.

    A thread is *stuck* while it still runs a function whose job has ended (it timed out or
    was cancelled: a thread cannot be interrupted); another thread takes its place while
    fewer than `max_stuck` are stuck. `refused` counts attempts failed since the daemon
    started because no thread was left.
    """

    running: int
    stuck: int
    max_stuck: int
    refused: int


class WorkerSlots(msgspec.Struct, frozen=True):
    """This daemon's worker slots. `busy` ones run a job (at most `workers`; a job waiting
    in `ctx.run_task` holds none). The job store also counts as running the jobs this daemon
    holds that do not run: `claimed_ahead` of a slot that frees (while jobs are short), and
    `ending`, whose attempt has ended and whose outcome is being written."""

    busy: int
    claimed_ahead: int
    ending: int


class StoreFailing(msgspec.Struct, frozen=True):
    """Writes to the job store failing now (disk full, a lock held, a damaged file).

    `operations` are the kinds of write whose latest attempt failed (insert, claim, renew,
    ...); `failures` counts the failed attempts since `since`, when the first of them
    failed; `error` is the latest one's message, which says what to do.
    """

    since: float
    failures: int
    operations: list[str]
    error: str


class NodeInfo(msgspec.Struct, frozen=True):
    """A daemon using the job store, alive while its heartbeat is renewed.

    `worker` names its current start (`id/N`) on the jobs it runs; `seen_at` is its latest
    heartbeat; `running` counts the jobs it runs; `schedules` is a digest of the schedules
    it runs (daemons sharing a store should run the same ones).
    """

    id: str
    worker: str
    host: str
    pid: int
    started_at: float
    seen_at: float
    running: int = 0
    schedules: str | None = None
    slots: int = 0  # its `workers`: jobs it runs at once (0: a taskd that did not say)


class Status(msgspec.Struct, frozen=True):
    """What `taskctl status` shows: this daemon (`node`), and the job store as a whole."""

    version: str
    pid: int
    started_at: float
    uptime: float
    database: str
    socket: str
    tasks_dir: str
    workers: int
    counts: dict[str, int]
    running: list[Job] = []
    tasks: list[TaskCounts] = []
    oldest_pending_age: float | None = None
    next_due_at: float | None = None
    node: str | None = None  # this daemon's node id
    nodes: list[NodeInfo] = []  # the daemons alive on this job store
    connections: ConnectionStats | None = None
    http: HttpStats | None = None  # None without an [http] listener
    threads: ThreadStats | None = None
    slots: WorkerSlots | None = None  # this daemon's
    store_failing: StoreFailing | None = None  # None while the store's writes go through
    # Lines of taskd's own log dropped since it started: its output (the journal, a pipe)
    # did not take them as fast as they came.
    log_dropped: int = 0
    paused_tasks: dict[str, float] = {}  # task -> since when it is paused (`taskctl pause`)
    limits: list[LimitUse] = []  # the shared limits ([limits.NAME]) and their use
    keyed: list[KeyedUse] = []  # the tasks with a limit_key and their values' use


class Peer(msgspec.Struct, frozen=True):
    """Who is on the other end of a control connection (from SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int
    access: Access = "full"

    def __str__(self) -> str:
        return f"pid {self.pid} uid {self.uid}"


def cut_utf8(text: str, limit: int, *, mark: str = "…", keep_end: bool = False) -> str:
    """`text` in at most `limit` bytes of UTF-8: if it is longer, its start and `mark` (or,
    with `keep_end`, `mark` and its end), never splitting a character."""
    if len(text) * 4 <= limit:  # short enough whatever its characters
        return text
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text
    room = limit - len(mark.encode())
    if keep_end:
        start = len(data) - room
        while start < len(data) and 0x80 <= data[start] < 0xC0:  # inside a character
            start += 1
        return mark + data[start:].decode("utf-8", "surrogatepass")
    end = room
    while end > 0 and 0x80 <= data[end] < 0xC0:
        end -= 1
    return data[:end].decode("utf-8", "surrogatepass") + mark


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str) -> float:
    """Seconds in a duration such as `90`, `30s`, `5m`, `2h`, `1h30m`, `7d` or `250ms`.

    Raises ValueError with a message meant for the person who wrote it.
    """
    spec = text.strip().lower()
    try:
        seconds = float(spec)
    except ValueError:
        pass
    else:
        if seconds < 0 or seconds != seconds or seconds == float("inf"):
            raise ValueError(f"invalid duration {text!r}: must be a finite number >= 0")
        return seconds
    pos, total = 0, 0.0
    while pos < len(spec):
        match = _DURATION.match(spec, pos)
        if match is None:
            raise ValueError(
                f"invalid duration {text!r}: use a number of seconds or units such as "
                "250ms, 30s, 5m, 2h, 7d, 1w (combined as in 1h30m)"
            )
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if not spec:
        raise ValueError("invalid duration '': it is empty")
    return total


def parse_rate(text: str) -> tuple[int, float]:
    """A rate limit such as `10/s`, `600/m`, `1000/h`, `5/d` or `100/15m`: (starts, period
    in seconds). Raises ValueError with a message meant for the person who wrote it."""
    count, slash, period = str(text).partition("/")
    try:
        starts = int(count.strip())
        unit = period.strip().lower()
        seconds = _UNIT_SECONDS[unit] if unit in _UNIT_SECONDS else parse_duration(unit)
    except ValueError:
        starts, seconds = 0, 0.0
    if not slash or starts < 1 or seconds <= 0:
        raise ValueError(
            f"invalid rate limit {text!r}: use starts per period, such as 10/s, 600/m, "
            "1000/h or 100/15m"
        )
    return starts, seconds


def check_limit_key(path: str) -> str:
    """A `limit_key` as written: a payload field, dotted for a nested one; raises ValueError
    saying what to write."""
    if not isinstance(path, str) or not all(part.strip() for part in path.split(".")):
        raise ValueError(
            f'invalid limit_key {path!r}: name a payload field, such as "customer_id", or a '
            'nested one with dots, such as "customer.id"'
        )
    return path


def limit_key_of(payload: bytes, path: str) -> str:
    """The value of a task's `limit_key` in a payload (msgpack): the field `path` names
    (`customer_id`, or dotted for a nested one: `customer.id`) as text (a string as it is,
    anything else as JSON); '' where the payload has no such field."""
    try:
        value: Any = msgspec.msgpack.decode(payload)
    except (msgspec.DecodeError, RecursionError):
        return ""
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return ""
        value = value[part]
    if isinstance(value, str):
        return value
    try:
        return msgspec.json.encode(value, order="sorted").decode()
    except (TypeError, msgspec.EncodeError):
        return str(value)


def format_duration(seconds: float) -> str:
    """A short human form of a duration: 850ms, 12s, 5m30s, 2h5m, 3d4h."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    parts: list[str] = []
    remaining = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if remaining >= size:
            parts.append(f"{remaining // size}{unit}")
            remaining %= size
        if len(parts) == 2:
            break
    return "".join(parts)


def utc_stamp(timestamp: float) -> str:
    """A moment as daemons write it in messages: `2026-11-30 00:09:56 UTC`."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def counted(number: int, noun: str, plural: str | None = None) -> str:
    """`1 job`, `2 jobs` (`plural` for nouns that take more than an s)."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """`; did you mean "workers"?` when one of `known` is close to `word`, else nothing."""
    import difflib  # only when a name is wrong

    close = difflib.get_close_matches(word, list(known), n=1)
    return f'; did you mean "{close[0]}"?' if close else ""
