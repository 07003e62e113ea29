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
from typing import Annotated, Any, Literal

import msgspec

from taskd.models import (
    Access,
    Job,
    JobLogs,
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

# The limits of params live in their types, so that an out-of-range value is an
# `invalid_params` naming the field, and the JSON Schema (contrib/protocol.schema.json) states
# every limit. msgpack integers go up to 2**64-1, the job store's up to 2**63-1.
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
MAX_SECONDS = 10 * 365 * 86400  # ten years: the longest delay, timeout or age
MAX_TIME = 253_402_300_799.0  # 9999-12-31T23:59:59Z, the latest run_at
MAX_PRIORITY = 2**31
MAX_KEY_LENGTH = 1024
MAX_LIST = 10_000
Duration = Annotated[
    float, msgspec.Meta(ge=0, le=MAX_SECONDS, description="seconds, 0 to ten years")
]
Timestamp = Annotated[float, msgspec.Meta(ge=0, le=MAX_TIME, description="a Unix time in seconds")]
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
    """One event of a `subscribe` stream (contrib/protocol.md: "Live events").

    kind "subscribed": the stream is live (the first event); "state": job `job_id` of `task`
    is now `status`; "progress": its `progress`; "log": a `line` it wrote; "changed": jobs
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
    a `subscribe` request still open, an `event` (any number of them, before its reply).

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


class Params(msgspec.Struct, forbid_unknown_fields=True):
    """Base of all params; unknown fields are refused so that typos are not ignored."""


class HelloParams(Params):
    protocol: int
    client: str = ""


class HelloResult(msgspec.Struct, frozen=True):
    protocol: int
    server: str
    pid: int
    access: Access


class ListTasksParams(Params):
    pass


class RunParams(Params):
    task: str
    payload: Payload = EMPTY_MAP_FIELD
    key: Key | None = None
    detach: bool = False
    max_attempts: Attempts | None = None


class RunResult(msgspec.Struct, frozen=True):
    job: Job
    joined: bool  # true when the run joined an execution that was already pending or running


class EnqueueParams(Params):
    task: str
    payload: Payload = EMPTY_MAP_FIELD
    delay: Duration | None = None  # or run_at, not both
    run_at: Timestamp | None = None
    priority: Priority = 0
    max_attempts: Attempts | None = None
    key: Key | None = None


class EnqueueResult(msgspec.Struct, frozen=True):
    job_id: int
    duplicate: bool  # true when an active job with the same task and key already existed


class EnqueueManyParams(Params):
    jobs: list[EnqueueParams]


class EnqueueManyResult(msgspec.Struct, frozen=True):
    jobs: list[EnqueueResult]


class JobParams(Params):
    id: Int64


class JobsParams(Params):
    status: list[JobStatus] | None = None
    task: str | None = None
    limit: Limit = 50
    payloads: bool = False  # include each job's payload and result (else they are nil)


class WaitParams(Params):
    id: Int64
    timeout: Duration | None = None
    # Also return as soon as an attempt numbered above this one has failed (the job is then
    # pending a retry, or running its next attempt): `taskctl run` shows each failure.
    after_attempt: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] | None = None


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


class CancelParams(Params):
    id: Int64


class RetryParams(Params):
    id: Int64


class StatusParams(Params):
    pass


class PruneParams(Params):
    older_than: Duration | None = None


class PruneResult(msgspec.Struct, frozen=True):
    deleted: int


class ReloadParams(Params):
    pass


class ReloadResult(msgspec.Struct, frozen=True):
    tasks: int
    schedules: int
    # Settings that changed but take effect only when taskd restarts (`workers`, `[http]` ...).
    restart_needed: list[str] = []


class SchedulesParams(Params):
    pass


class PauseScheduleParams(Params):
    schedule: str  # its id, or its cron expression if no other schedule has the same


class ResumeScheduleParams(Params):
    schedule: str


class TriggerScheduleParams(Params):
    schedule: str


class MetricsParams(Params):
    pass


class LogsParams(Params):
    id: Int64


class SubscribeParams(Params):
    job: Int64 | None = None  # only this job's events (and no "changed"); None: every job's
    logs: bool = True  # include "log" events


class SubscribeResult(msgspec.Struct, frozen=True):
    """The reply that ends a subscription (after `unsubscribe`): events sent and dropped."""

    events: int
    dropped: int


class UnsubscribeParams(Params):
    id: Int64  # the request id of the `subscribe` to end, on this connection


# Method name -> (params type, result type, changes state). Read-only peers may call only
# the methods that do not change state.
METHODS: dict[str, tuple[type[Params], Any, bool]] = {
    "hello": (HelloParams, HelloResult, False),
    "list_tasks": (ListTasksParams, list[TaskInfo], False),
    "run": (RunParams, RunResult, True),
    "enqueue": (EnqueueParams, EnqueueResult, True),
    "enqueue_many": (EnqueueManyParams, EnqueueManyResult, True),
    "job": (JobParams, Job, False),
    "jobs": (JobsParams, list[Job], False),
    "wait": (WaitParams, Job, False),
    "cancel": (CancelParams, Job, True),
    "retry": (RetryParams, Job, True),
    "status": (StatusParams, Status, False),
    "prune": (PruneParams, PruneResult, True),
    "reload": (ReloadParams, ReloadResult, True),
    "schedules": (SchedulesParams, list[ScheduleInfo], False),
    "pause_schedule": (PauseScheduleParams, ScheduleInfo, True),
    "resume_schedule": (ResumeScheduleParams, ScheduleInfo, True),
    "trigger_schedule": (TriggerScheduleParams, ScheduleInfo, True),
    "metrics": (MetricsParams, str, False),  # the Prometheus exposition, as text
    "logs": (LogsParams, JobLogs, False),
    "subscribe": (SubscribeParams, SubscribeResult, False),  # events until unsubscribed
    "unsubscribe": (UnsubscribeParams, bool, False),  # False: no such subscription
    "why": (WhyParams, WhyResult, False),
}


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
