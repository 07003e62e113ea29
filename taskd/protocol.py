"""The wire protocol of taskd's control socket (documented in contrib/protocol.md).

A frame is a 4-byte big-endian length followed by that many bytes of msgpack. The client
sends `Request` frames ({"id", "method", "params"}), the daemon answers each with a `Reply`
frame carrying the same id and either a `result` or an `error` ({"code", "message"}).
The first request on a connection must be `hello`.

Standard library and msgspec only: taskctl imports this module and must start fast.
"""

from __future__ import annotations

import enum
import os
import struct
from typing import Annotated, Any, Generic, Literal, TypeVar

import msgspec

from taskd.models import (
    Access,
    AfterFailure,
    BatchInfo,
    Job,
    JobLogs,
    JobOrigin,
    JobStatus,
    LogLine,
    Progress,
    ScheduleInfo,
    Status,
    TaskInfo,
)

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME = 16 * 1024 * 1024
HEADER = struct.Struct(">I")
EMPTY_MAP = msgspec.Raw(b"\x80")
NIL = msgspec.Raw(b"\xc0")
# Until `hello` has been answered a connection may send only frames up to this size.
MAX_HELLO_FRAME = 64 * 1024

# The limits of params live in their types, and nowhere else: an out-of-range value is an
# `invalid_params` naming the field and the limit with its unit (`extra`: taskd.limits), the
# JSON Schema (contrib/protocol.schema.json) states every limit, and requests that do not
# come through the decoder are checked against the same types (taskd.limits). msgpack
# integers go up to 2**64-1, the job store's up to 2**63-1.
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
MAX_SECONDS = 10 * 365 * 86400  # ten years: the longest delay, timeout or age
MAX_TIME = 253_402_300_799.0  # 9999-12-31T23:59:59Z, the latest run_at
MAX_PRIORITY = 2**31
MAX_KEY_LENGTH = 1024
MAX_LIST = 10_000
Duration = Annotated[
    float,
    msgspec.Meta(
        ge=0, le=MAX_SECONDS, description="seconds, 0 to ten years", extra={"unit": "seconds"}
    ),
]
Timestamp = Annotated[
    float,
    msgspec.Meta(
        ge=0, le=MAX_TIME, description="a Unix time in seconds", extra={"unit": "unix time"}
    ),
]
Priority = Annotated[
    int,
    msgspec.Meta(ge=-MAX_PRIORITY, le=MAX_PRIORITY, description="lower runs first"),
]
Attempts = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
Key = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=MAX_KEY_LENGTH,
        description="a unique key; keys starting with '@' are reserved for taskd",
    ),
]
Limit = Annotated[int, msgspec.Meta(ge=1, le=MAX_LIST)]
SearchText = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
# The W3C Trace Context `traceparent` of the caller's span (version 00, lowercase hex, the
# trace and parent ids not all zeros): the job's attempts are traced as its children.
TRACEPARENT_LENGTH = 55
TRACEPARENT_PATTERN = "^00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$"
Traceparent = Annotated[
    str,
    msgspec.Meta(
        min_length=TRACEPARENT_LENGTH,
        max_length=TRACEPARENT_LENGTH,
        pattern=TRACEPARENT_PATTERN,
        description="the W3C traceparent of the caller's span, 00-TRACEID-SPANID-FLAGS: "
        "the job's attempts are traced as its children",
        extra={
            "form": "a W3C traceparent: 00-<32 hex digits>-<16 hex digits>-<2 hex digits>, "
            "in lowercase, the ids not all zeros"
        },
    ),
]
MAX_PARENTS = 100
JobId = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
Parents = Annotated[
    list[JobId],
    msgspec.Meta(
        max_length=MAX_PARENTS,
        description="ids of jobs this job waits for: it stays pending until all succeeded",
    ),
]
Payload = Annotated[
    msgspec.Raw,
    msgspec.Meta(description="any msgpack value, passed to the task; absent: {}, as in Nitro"),
]


def _empty_map() -> msgspec.Raw:
    return EMPTY_MAP


# Absent payloads and params are {}: a factory, because the JSON Schema cannot show a Raw.
EMPTY_MAP_FIELD: Any = msgspec.field(default_factory=_empty_map)


class ErrorCode(enum.StrEnum):
    """Stable error codes of replies; clients branch on these, never on messages."""

    BAD_FRAME = "bad_frame"  # not msgpack or not a request map; or a frame too slow (then closed)
    FRAME_TOO_LARGE = "frame_too_large"  # over the size limit; the daemon closes the connection
    HELLO_REQUIRED = "hello_required"  # the first request was not `hello`
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"  # hello asked for a protocol we do not speak
    UNKNOWN_METHOD = "unknown_method"
    INVALID_PARAMS = "invalid_params"  # params of the wrong shape or type
    UNKNOWN_TASK = "unknown_task"
    UNKNOWN_JOB = "unknown_job"
    UNKNOWN_SCHEDULE = "unknown_schedule"
    PAYLOAD_INVALID = "payload_invalid"  # the payload does not match the task's schema
    CONFLICT = "conflict"  # the job is not in a state that allows this (e.g. retry a running job)
    TIMEOUT = "timeout"  # a wait ran out before the job ended
    PERMISSION_DENIED = "permission_denied"
    RELOAD_FAILED = "reload_failed"  # the old configuration keeps running
    BUSY = "busy"  # too many requests in flight, or connections (then closed)
    SHUTTING_DOWN = "shutting_down"
    STORE_ERROR = (
        "store_error"  # the job store failed (disk full, locked); nothing was acknowledged
    )
    INTERNAL = "internal"


class Request(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A request envelope; `params` is decoded later with the method's own type.

    `params` absent or nil means `{}`.
    """

    id: int
    method: str
    params: Annotated[msgspec.Raw, msgspec.Meta(description="absent or nil: {}")] = EMPTY_MAP_FIELD


class Call(msgspec.Struct, frozen=True):
    """A request envelope as a client writes it: `params` (a Params) encoded in place, in
    the same bytes as a `Request` whose `params` were encoded first (one encoding, not two)."""

    id: int
    method: str
    params: Any


class ErrorBody(msgspec.Struct, frozen=True):
    code: str
    message: str
    data: dict[str, Any] | None = None


class RpcError(Exception):
    """An error reply: raised by the daemon's handlers, and by clients that receive one."""

    def __init__(self, code: ErrorCode | str, message: str, data: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = str(code)
        self.message = message
        self.data = data

    def body(self) -> ErrorBody:
        return ErrorBody(self.code, self.message, self.data)


class JobEvent(msgspec.Struct, frozen=True):
    """One event of a `subscribe` stream (contrib/protocol.md: "Live events"), or a
    "progress" event of a `wait` that asked for them.

    kind "subscribed": the stream is live (the first event); "state": job `job_id` of `task`
    is now `status`; "progress": its `progress`; "log": a `line` it wrote (`task` named when
    known); "changed": jobs
    were added, started or ended (read again what you show); "dropped": `dropped` events
    were let go because the subscriber read too slowly.
    """

    kind: Literal["subscribed", "state", "progress", "log", "changed", "dropped"]
    job_id: int | None = None
    task: str | None = None
    status: JobStatus | None = None
    progress: Progress | None = None
    line: LogLine | None = None
    dropped: int = 0


class Reply(msgspec.Struct, frozen=True, omit_defaults=True):
    """A reply envelope as the daemon writes it: `result` or `error`, never both; or, for
    a `subscribe` request still open (or a `wait` with `progress`), an `event` (any number
    of them, before its reply).

    `id` is null when the request was too broken to read its id.
    """

    id: int | None
    result: Any = None
    error: ErrorBody | None = None
    event: JobEvent | None = None


class RawReply(msgspec.Struct, frozen=True):
    """A reply envelope as a client reads it; `result` is decoded with the method's type."""

    id: int | None
    result: msgspec.Raw = NIL
    error: ErrorBody | None = None
    event: JobEvent | None = None


# Params and results, one pair per method. Times are Unix timestamps in seconds (float),
# durations are seconds (float); payloads and results are any msgpack value.


class Params(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Base of all params; unknown fields are refused so that typos are not ignored.

    Clients leave out the fields that have their default: a daemon that predates an
    optional field (`traceparent`, say) still takes the requests that do not use it."""


P = TypeVar("P", bound=Params)
R = TypeVar("R")


class Method(Generic[P, R]):
    """One method of the protocol, declared once: its params and result types, whether it
    changes state (read-only peers may not call it), and what `taskctl --help` says of it.

    The daemon maps each method to one handler (the connection itself answers those marked
    `connection`); the clients have one typed call per method; taskctl's command table
    takes its help and examples from here. Plain strings: taskctl imports this module.
    """

    __slots__ = ("connection", "examples", "help", "name", "params", "result", "waits", "writes")

    def __init__(
        self,
        name: str,
        params: type[P],
        result: type[R],
        *,
        writes: bool = False,
        waits: bool = False,
        connection: bool = False,
        help: str = "",
        examples: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.params = params
        self.result: Any = result  # a type, or a generic alias such as list[Job]
        self.writes = writes  # changes state: refused to read-only peers
        self.waits = waits  # waits for a job to end: never queued behind other reads
        self.connection = connection  # answered by the connection, not by a handler
        self.help = help
        self.examples = examples

    def __repr__(self) -> str:
        return f"Method({self.name!r})"


class HelloParams(Params):
    protocol: int
    client: str = ""


class HelloResult(msgspec.Struct, frozen=True):
    protocol: int
    server: str
    pid: int
    access: Access


HELLO = Method("hello", HelloParams, HelloResult, connection=True)


class ListTasksParams(Params):
    pass


LIST_TASKS = Method(
    "list_tasks",
    ListTasksParams,
    list[TaskInfo],
    help="list the tasks taskd has loaded",
    examples=("taskctl list", "taskctl list --json"),
)


class RunParams(Params):
    task: str
    payload: Payload = EMPTY_MAP_FIELD
    key: Key | None = None
    detach: bool = False
    max_attempts: Attempts | None = None
    traceparent: Traceparent | None = None


class RunResult(msgspec.Struct, frozen=True):
    job: Job
    joined: bool  # true when the run joined an execution that was already pending or running
    # A detached run of a pending job: what holds it back (the `why` message when its
    # reason is one of HELD_REASONS); else nil. Always sent; UNSET only in a reply of a
    # daemon that predates it (then ask `why`).
    held: str | msgspec.UnsetType | None = msgspec.UNSET


RUN = Method(
    "run",
    RunParams,
    RunResult,
    writes=True,
    help="run a task (or join its running execution) and print its result",
    examples=(
        "taskctl run hello",
        "taskctl run jobs:send-email --payload @email.json",
        """echo '{"name": "Ada"}' | taskctl run hello --payload -""",
    ),
)


class EnqueueParams(Params):
    task: str
    payload: Payload = EMPTY_MAP_FIELD
    delay: Duration | None = None  # or run_at, not both
    run_at: Timestamp | None = None
    priority: Priority = 0
    max_attempts: Attempts | None = None
    key: Key | None = None
    # With `key`: the key stays taken this long after its job was created, even once that
    # job has finished (default: the task's `unique_for`).
    unique_for: Duration | None = None
    # With `key`: while its job is pending, an enqueue with the key replaces its payload and
    # makes it due `debounce` seconds from now, but never later than `max_wait` seconds
    # after its first enqueue.
    debounce: Duration | None = None
    max_wait: Duration | None = None
    traceparent: Traceparent | None = None
    after: Parents = []
    # A parent that fails or is cancelled cancels the job ("cancel"), or not ("run").
    after_failure: AfterFailure = "cancel"


class EnqueueResult(msgspec.Struct, frozen=True):
    job_id: int
    duplicate: bool  # true when an active job with the same task and key already existed


ENQUEUE = Method(
    "enqueue",
    EnqueueParams,
    EnqueueResult,
    writes=True,
    help="add a job to the queue and print its id",
    examples=(
        "taskctl enqueue jobs:send-email --delay 5m --payload "
        """'{"to": "ada@example.com", "subject": "Hi", "body": "Welcome!"}'""",
        "taskctl enqueue reports:daily --at 2027-01-04T08:00:00+01:00 --key 2027-01-04",
        "taskctl enqueue hello --key welcome-ada --unique-for 1h",
        "taskctl enqueue hello --key reindex --debounce 2s --max-wait 30s",
        "taskctl enqueue hello --after 42",
    ),
)


class EnqueueManyParams(Params):
    jobs: list[EnqueueParams]
    # Make the jobs a batch, and enqueue this task once they have all ended, with the
    # payload {"batch", "succeeded", "failed", "cancelled"}.
    on_finish: str | None = None


class EnqueueManyResult(msgspec.Struct, frozen=True):
    jobs: list[EnqueueResult]
    batch: int | None = None  # the batch's id, with `on_finish`


ENQUEUE_MANY = Method(
    "enqueue_many",
    EnqueueManyParams,
    EnqueueManyResult,
    writes=True,
    help="enqueue a batch in one transaction; nothing is enqueued if one is invalid",
)


class BatchParams(Params):
    id: Int64


BATCH = Method(
    "batch",
    BatchParams,
    BatchInfo,
    help="show a batch's progress: its jobs by status, and its on_finish callback",
    examples=("taskctl batch 42", "taskctl batch 42 --json"),
)


class JobParams(Params):
    id: Int64


JOB = Method(
    "job",
    JobParams,
    Job,
    help="show one job, with the errors of all its attempts",
    examples=("taskctl job 42",),
)


class JobsParams(Params):
    status: list[JobStatus] | None = None
    task: str | None = None
    limit: Limit = 50
    payloads: bool = False  # include each job's payload and result (else they are nil)
    origin: JobOrigin | None = None  # only jobs made so: run, enqueue, schedule (a tick), task
    key: Key | None = None  # only jobs with this unique key
    before: Int64 | None = None  # only jobs with a lower id: the next page after that id
    since: Timestamp | None = None  # only jobs created at or after this instant
    until: Timestamp | None = None  # only jobs created before this instant
    # Only jobs whose payload holds this text (not indexed: a scan of the other filters' jobs)
    text: SearchText | None = None


JOBS = Method(
    "jobs",
    JobsParams,
    list[Job],
    help="list recent jobs, newest first",
    examples=(
        "taskctl jobs --status failed --task jobs:send-email",
        "taskctl jobs --json --payloads --limit 10",
        "taskctl jobs --since 2h --until 30m --text ada@example.com",
        "taskctl jobs --task jobs:send-email --before 42    # the page after job 42",
        "taskctl jobs --watch --status running,pending",
    ),
)


class WaitParams(Params):
    id: Int64
    timeout: Duration | None = None
    # Also return as soon as an attempt numbered above this one has failed (the job is then
    # pending a retry, or running its next attempt): `taskctl run` shows each failure.
    after_attempt: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] | None = None
    # Also send the job's progress while it waits: "progress" events under the request's
    # id (the latest known first), then the reply; `taskctl run` and `wait` show them.
    progress: bool = False


WAIT = Method(
    "wait",
    WaitParams,
    Job,
    waits=True,
    help="wait for a job to end and print its result",
    examples=("taskctl wait 42 --timeout 1m",),
)


class CancelParams(Params):
    id: Int64


CANCEL = Method(
    "cancel",
    CancelParams,
    Job,
    writes=True,
    help="cancel a pending or running job",
    examples=("taskctl cancel 42",),
)


class RetryParams(Params):
    id: Int64


RETRY = Method(
    "retry",
    RetryParams,
    Job,
    writes=True,
    help="put a failed or cancelled job back in the queue",
    examples=("taskctl retry 42",),
)


class StatusParams(Params):
    pass


STATUS = Method(
    "status",
    StatusParams,
    Status,
    help="show the daemon, its queue and its running jobs",
    examples=("taskctl status", "taskctl status --json"),
)


class PruneParams(Params):
    older_than: Duration | None = None


class PruneResult(msgspec.Struct, frozen=True):
    deleted: int


PRUNE = Method(
    "prune",
    PruneParams,
    PruneResult,
    writes=True,
    help="delete finished jobs now (default: past their retention)",
    examples=("taskctl prune --older-than 1d",),
)


class ReloadParams(Params):
    pass


class ReloadResult(msgspec.Struct, frozen=True):
    tasks: int
    schedules: int
    # Settings that changed but take effect only when taskd restarts (`workers`, `[http]` ...).
    restart_needed: list[str] = []


RELOAD = Method(
    "reload",
    ReloadParams,
    ReloadResult,
    writes=True,
    help="re-read taskd.toml and the tasks folder (like SIGHUP)",
    examples=("taskctl reload",),
)


class SchedulesParams(Params):
    pass


SCHEDULES = Method(
    "schedules",
    SchedulesParams,
    list[ScheduleInfo],
    help="list the schedules (next and last tick, last outcome, coalesced ticks); "
    "or pause, resume or trigger one",
    examples=(
        "taskctl schedules",
        "taskctl schedules pause nightly-index",
        "taskctl schedules trigger '*/5 * * * *'",
    ),
)


class PauseScheduleParams(Params):
    schedule: str  # its id, or its cron expression if no other schedule has the same


PAUSE_SCHEDULE = Method(
    "pause_schedule",
    PauseScheduleParams,
    ScheduleInfo,
    writes=True,
    help="stop a schedule ticking (remembered across restarts); its task's jobs queued "
    "otherwise still start (to hold those back, see `taskctl pause TASK`)",
    examples=("taskctl schedules pause nightly-index",),
)


class ResumeScheduleParams(Params):
    schedule: str


RESUME_SCHEDULE = Method(
    "resume_schedule",
    ResumeScheduleParams,
    ScheduleInfo,
    writes=True,
    help="let a paused schedule tick again, from now on",
    examples=("taskctl schedules resume nightly-index",),
)


class TriggerScheduleParams(Params):
    schedule: str


TRIGGER_SCHEDULE = Method(
    "trigger_schedule",
    TriggerScheduleParams,
    ScheduleInfo,
    writes=True,
    help="fire a schedule now; its regular ticks stay",
    examples=("taskctl schedules trigger nightly-index",),
)


class PauseTaskParams(Params):
    task: str


class TaskPauseResult(msgspec.Struct, frozen=True):
    """A task's state after `pause_task` or `resume_task`: paused since `since` (Unix
    seconds; kept from the first pause), or not paused (None); `changed` is false when it
    already was so."""

    task: str
    since: float | None
    changed: bool


PAUSE_TASK = Method(
    "pause_task",
    PauseTaskParams,
    TaskPauseResult,
    writes=True,
    help="start no new job of a task, on any daemon, until it is resumed (jobs still queue "
    "up; running ones finish; remembered across restarts). For a schedule's ticks, see "
    "`taskctl schedules pause`",
    examples=("taskctl pause jobs:send-email",),
)


class ResumeTaskParams(Params):
    task: str


RESUME_TASK = Method(
    "resume_task",
    ResumeTaskParams,
    TaskPauseResult,
    writes=True,
    help="let a paused task's jobs start again",
    examples=("taskctl resume jobs:send-email",),
)


class MetricsParams(Params):
    pass


METRICS = Method(
    "metrics",
    MetricsParams,
    str,  # the Prometheus exposition, as text
    help="print the Prometheus metrics (jobs, durations, retries, ticks)",
    examples=("taskctl metrics", "taskctl metrics | grep '^taskd_queue_depth'"),
)


class LogsParams(Params):
    id: Int64


LOGS = Method(
    "logs",
    LogsParams,
    JobLogs,
    help="print the lines a job wrote with ctx.logger",
    examples=("taskctl logs 42", "taskctl logs 42 -f"),
)


class SubscribeParams(Params):
    job: Int64 | None = None  # only this job's events (and no "changed"); None: every job's
    logs: bool = True  # include "log" events
    task: str | None = None  # only the events of this task's jobs (and "changed")


class SubscribeResult(msgspec.Struct, frozen=True):
    """The reply that ends a subscription (after `unsubscribe`): events sent and dropped."""

    events: int
    dropped: int


# Events until unsubscribed, then this reply.
SUBSCRIBE = Method("subscribe", SubscribeParams, SubscribeResult, connection=True)


class UnsubscribeParams(Params):
    id: Int64  # the request id of the `subscribe` to end, on this connection


UNSUBSCRIBE = Method("unsubscribe", UnsubscribeParams, bool, connection=True)  # False: none


class WhyParams(Params):
    id: Int64


class TimelineEvent(msgspec.Struct, frozen=True):
    """One moment in a job's life: created, started, an attempt's end, retried, finished.

    Every key is sent, nil where the moment has no attempt, worker or message."""

    at: float
    event: (
        str  # created, started, error, timeout, interrupted, cancelled, retried, succeeded, failed
    )
    attempt: int | None = None
    worker: str | None = None
    message: str | None = None


class WhyResult(msgspec.Struct, frozen=True):
    """Why a job is not running yet (or what it is doing): a stable `reason` code, a
    sentence for people, the instant it is waiting for (`until`), and its timeline.

    `message` names a moment in UTC as `YYYY-MM-DD HH:MM:SS UTC`; that moment is `at`, so
    that a client can show it in its viewer's zone."""

    id: int
    task: str
    status: JobStatus
    reason: str
    message: str
    until: float | None = None
    timeline: list[TimelineEvent] = []
    at: float | None = None


# The `why` reasons of a pending job that flow control holds back (README: "Flow
# control"): `taskctl run` says so on stderr while it waits.
HELD_REASONS = ("task_paused", "rate_limit", "shared_limit")

WHY = Method(
    "why",
    WhyParams,
    WhyResult,
    help="say why a job is not running yet (or what it did), with its timeline",
    examples=("taskctl why 42", "taskctl why 42 --json"),
)

# Every method by name, in the order the protocol's documents list them.
METHODS: dict[str, Method[Any, Any]] = {
    method.name: method
    for method in (
        HELLO, LIST_TASKS, RUN, ENQUEUE, ENQUEUE_MANY, BATCH, JOB, JOBS, WAIT, CANCEL, RETRY,
        STATUS, PRUNE, RELOAD, SCHEDULES, PAUSE_SCHEDULE, RESUME_SCHEDULE, TRIGGER_SCHEDULE,
        PAUSE_TASK, RESUME_TASK, METRICS, LOGS, SUBSCRIBE, UNSUBSCRIBE, WHY,
    )
}  # fmt: skip


_encoder = msgspec.msgpack.Encoder()


def encode_frame(message: Any) -> bytes:
    """One frame: the length prefix and the msgpack body."""
    buffer = bytearray(HEADER.size)
    _encoder.encode_into(message, buffer, HEADER.size)
    HEADER.pack_into(buffer, 0, len(buffer) - HEADER.size)
    return bytes(buffer)


SYSTEM_SOCKET = "/run/taskd/taskd.sock"


def default_socket_path() -> str:
    """The socket taskd listens on when it is not told otherwise.

    `$TASKD_SOCKET`; under systemd `$RUNTIME_DIRECTORY/taskd.sock`; for root
    /run/taskd/taskd.sock; for other users `$XDG_RUNTIME_DIR/taskd/taskd.sock`, or
    /tmp/taskd-UID/taskd.sock without an XDG runtime directory.
    """
    if explicit := os.environ.get("TASKD_SOCKET"):
        return explicit
    if runtime := os.environ.get("RUNTIME_DIRECTORY"):
        return os.path.join(runtime.split(":")[0], "taskd.sock")
    uid = os.getuid()
    if uid == 0:
        return SYSTEM_SOCKET
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(xdg, "taskd", "taskd.sock")
    return f"/tmp/taskd-{uid}/taskd.sock"


def client_socket_path() -> str:
    """The socket a client calls by default: the daemon's default, else the system daemon's.

    A user without a daemon of their own talks to the system-wide one.
    """
    path = default_socket_path()
    if (
        "TASKD_SOCKET" not in os.environ
        and not os.path.exists(path)
        and os.path.exists(SYSTEM_SOCKET)
    ):
        return SYSTEM_SOCKET
    return path
