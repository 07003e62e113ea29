"""The HTTP API's routes and the shapes of their bodies, as msgspec types.

This module is the HTTP API's contract: `taskd.http.routes` serves these routes, and
`taskd.schema` generates the OpenAPI document (contrib/openapi.json) from the same table and
types, beside the protocol's JSON Schema, so that the two cannot drift. Where a route calls
a method of the protocol, it names it (`rpc`): the route's access is the method's, and
where it takes what the method takes, it uses the method's params type, with its limits.
Standard library and msgspec only.
"""

from __future__ import annotations

import enum
import re
from typing import Annotated, Any, Literal, NamedTuple

import msgspec

from taskd import protocol
from taskd.models import BatchInfo, Job, JobLogs
from taskd.protocol import (
    BatchParams,
    Duration,
    EnqueueParams,
    EnqueueResult,
    ErrorBody,
    ErrorCode,
    JobEvent,
    JobParams,
    Method,
    Timestamp,
)

JSON = "application/json"
# The text format prometheus_client's generate_latest writes.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
EVENT_STREAM = "text/event-stream"
EVENTS_DESCRIPTION = (
    "Server-Sent Events, one per event of the socket's `subscribe` stream (protocol.md, "
    '"Live events"): `event: KIND` and `data: JSON` (the event as a JSON object), the first '
    "`subscribed`. `job=ID` gives only that job's events, `task=NAME` only those of that "
    "task's jobs (and `changed`), `logs=false` leaves out log lines. A reader that falls "
    "behind gets a `dropped` event counting what was let go. A comment (`: keepalive`) comes "
    "every `event_heartbeat` seconds while nothing else does, so that proxies keep the "
    "connection open; the stream ends (the response's end) when taskd stops. At most "
    "`max_event_streams` are open at once; past that, 503 `busy`."
)


class ServerSentEvent(msgspec.Struct, frozen=True):
    """One event of `GET /events`: its `event` line is the kind, its `data` line the event
    (a JobEvent, as in the socket's `subscribe` stream) as JSON."""

    event: Literal["subscribed", "state", "progress", "log", "changed", "dropped"]
    data: Annotated[
        str,
        msgspec.Meta(
            extra_json_schema={
                "contentMediaType": "application/json",
                "contentSchema": {"$ref": "#/components/schemas/JobEvent"},
            }
        ),
    ]


# Response bodies that are streams of events, each described by the type's schema.
STREAMED: dict[Any, str] = {ServerSentEvent: EVENT_STREAM}
DOCUMENTED_TOO = (JobEvent,)  # in the document's schemas, for the events' `contentSchema`

# Nitro's paths come first; the short ones are aliases.
ALIASES = {"/_nitro/tasks": "/tasks", "/_nitro/tasks/{name}": "/tasks/{name}"}


class HttpErrorCode(enum.StrEnum):
    """Error codes only the HTTP API gives; the others are the protocol's `ErrorCode`s."""

    BAD_REQUEST = "bad_request"  # not HTTP, or a body that is not JSON
    UNAUTHORIZED = "unauthorized"  # no token, or an unknown one
    NOT_FOUND = "not_found"  # no such path
    METHOD_NOT_ALLOWED = "method_not_allowed"
    REQUEST_TIMEOUT = "request_timeout"  # the request did not arrive within read_timeout
    BODY_TOO_LARGE = "body_too_large"  # over max_body_size
    HEADERS_TOO_LARGE = "headers_too_large"
    JOB_FAILED = "job_failed"  # the task ran and failed (or was cancelled)


# Every error code and its HTTP status, in one table.
STATUS_FOR_CODE: dict[str, int] = {
    ErrorCode.BAD_FRAME: 400,
    ErrorCode.FRAME_TOO_LARGE: 413,
    ErrorCode.HELLO_REQUIRED: 400,
    ErrorCode.UNSUPPORTED_PROTOCOL: 400,
    ErrorCode.UNKNOWN_METHOD: 404,
    ErrorCode.INVALID_PARAMS: 400,
    ErrorCode.UNKNOWN_TASK: 404,
    ErrorCode.UNKNOWN_JOB: 404,
    ErrorCode.UNKNOWN_SCHEDULE: 404,
    ErrorCode.PAYLOAD_INVALID: 422,
    ErrorCode.CONFLICT: 409,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.PERMISSION_DENIED: 403,
    ErrorCode.RELOAD_FAILED: 500,
    ErrorCode.BUSY: 503,
    ErrorCode.SHUTTING_DOWN: 503,
    ErrorCode.STORE_ERROR: 503,
    ErrorCode.INTERNAL: 500,
    HttpErrorCode.BAD_REQUEST: 400,
    HttpErrorCode.UNAUTHORIZED: 401,
    HttpErrorCode.NOT_FOUND: 404,
    HttpErrorCode.METHOD_NOT_ALLOWED: 405,
    HttpErrorCode.REQUEST_TIMEOUT: 408,
    HttpErrorCode.BODY_TOO_LARGE: 413,
    HttpErrorCode.HEADERS_TOO_LARGE: 431,
    HttpErrorCode.JOB_FAILED: 500,
}


class ErrorReply(msgspec.Struct, frozen=True):
    """Every error: `{"error": {"code", "message", "data"}}`, as in the socket protocol."""

    error: ErrorBody


class NitroTask(msgspec.Struct, frozen=True):
    description: str


class NitroSchedule(msgspec.Struct, frozen=True):
    cron: str
    tasks: list[str]


class NitroTasks(msgspec.Struct, frozen=True, rename={"scheduled_tasks": "scheduledTasks"}):
    """The tasks and schedules, in the shape of Nitro's `GET /_nitro/tasks`."""

    tasks: dict[str, NitroTask]
    scheduled_tasks: list[NitroSchedule]


class TaskPath(msgspec.Struct, frozen=True):
    name: str


# A run's query parameters are payload keys; a repeated one becomes a list. Each is
# converted to the type the task's payload gives its field (`?sections=2` is 2 for an int).
RunQuery = dict[str, str | list[str]]
DurationText = Annotated[
    str, msgspec.Meta(description='a duration as taskctl takes it: "30s", "5m", "1h30m"')
]
TimeText = Annotated[
    str, msgspec.Meta(description="ISO-8601 with an offset: 2026-12-01T08:00:00+01:00")
]


class EnqueueBody(EnqueueParams):
    """What `POST /jobs` takes: the `enqueue` method's params, with `delay` and `run_at` also
    in the forms taskctl takes them (taskd.http.routes reads them as seconds)."""

    # Wider than the method's types, which is what mypy warns of: on purpose.
    delay: Duration | DurationText | None = None  # type: ignore[assignment]
    run_at: Timestamp | TimeText | None = None  # type: ignore[assignment]


class RunBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The body of a run: its payload, merged over the query parameters (its keys win).

    As in Nitro, this payload is an object; `POST /jobs` takes any payload.
    """

    payload: dict[str, Any] | None = None


class TaskResult(msgspec.Struct, frozen=True):
    """A run that succeeded: the task's return value."""

    result: Any


class JobList(msgspec.Struct, frozen=True):
    jobs: list[Job]


class Health(msgspec.Struct, frozen=True):
    """`ok` when the job store answers and its writes go through; else `unavailable`, and why."""

    status: Literal["ok", "unavailable"]
    message: str | None = None


Access = Literal["public", "read", "write"]


class Route(NamedTuple):
    """One operation: what it takes, what it answers, and who may call it."""

    method: Literal["GET", "POST"]
    path: str  # OpenAPI's template: /jobs/{id}
    operation: str  # the handler's name, and (with the method) the operationId
    summary: str
    access: Access
    responses: dict[int, Any]  # status -> body type (a str: a content type, any text)
    path_params: Any = None  # a Struct whose fields are the path's {names}
    query: Any = None  # a Struct (each field a parameter) or RunQuery (any parameters)
    body: Any = None
    body_required: bool = False
    rpc: Method[Any, Any] | None = None  # the protocol's method the route calls
    traced: bool = False  # takes a `traceparent` header: the jobs it starts are traced under it
    description: str | None = None


def _call(
    method: Literal["GET", "POST"],
    path: str,
    operation: str,
    summary: str,
    rpc: Method[Any, Any],
    responses: dict[int, Any],
    **takes: Any,
) -> Route:
    """A route that calls a method of the protocol: its access is the method's."""
    access: Access = "write" if rpc.writes else "read"
    return Route(method, path, operation, summary, access, responses, rpc=rpc, **takes)


_RUN_RESPONSES = {200: TaskResult, 404: ErrorReply, 422: ErrorReply, 500: ErrorReply}
_JOB_CHANGE = {200: Job, 404: ErrorReply, 409: ErrorReply}
_ENQUEUE_RESPONSES = {201: EnqueueResult, 200: EnqueueResult, 404: ErrorReply, 422: ErrorReply}

_ROUTES = [
    _call("GET", "/_nitro/tasks", "list_tasks", "List the tasks and schedules (Nitro's shape)",
          protocol.LIST_TASKS, {200: NitroTasks}),
    _call("GET", "/_nitro/tasks/{name}", "run_task",
          "Run a task with the query parameters as its payload, wait, return its result",
          protocol.RUN, _RUN_RESPONSES, path_params=TaskPath, query=RunQuery, traced=True),
    _call("POST", "/_nitro/tasks/{name}", "run_task",
          "Run a task with the body's payload over the query parameters, wait, return its result",
          protocol.RUN, _RUN_RESPONSES, path_params=TaskPath, query=RunQuery, body=RunBody,
          traced=True),
    _call("POST", "/jobs", "enqueue", "Add a job to the queue (200 if its key was taken)",
          protocol.ENQUEUE, _ENQUEUE_RESPONSES, body=EnqueueBody, body_required=True,
          traced=True),
    _call("GET", "/jobs", "list_jobs", "Recent jobs, newest first", protocol.JOBS,
          {200: JobList, 404: ErrorReply}, query=protocol.JOBS.params),  # 404: an unknown task
    _call("GET", "/jobs/{id}", "get_job", "One job, with the errors of all its attempts",
          protocol.JOB, {200: Job, 404: ErrorReply}, path_params=JobParams),
    _call("GET", "/jobs/{id}/logs", "job_logs", "The lines a job wrote with ctx.logger",
          protocol.LOGS, {200: JobLogs, 404: ErrorReply}, path_params=protocol.LOGS.params),
    _call("GET", "/events", "events",
          "Live events as Server-Sent Events: the `subscribe` stream", protocol.SUBSCRIBE,
          {200: ServerSentEvent}, query=protocol.SUBSCRIBE.params,
          description=EVENTS_DESCRIPTION),
    _call("POST", "/jobs/{id}/cancel", "cancel_job", "Cancel a pending or running job",
          protocol.CANCEL, _JOB_CHANGE, path_params=JobParams),
    _call("POST", "/jobs/{id}/retry", "retry_job",
          "Put a failed or cancelled job back in the queue", protocol.RETRY, _JOB_CHANGE,
          path_params=JobParams),
    _call("POST", "/tasks/{name}/pause", "pause_task",
          "Start no new job of the task, on any daemon, until it is resumed",
          protocol.PAUSE_TASK, {200: protocol.TaskPauseResult, 404: ErrorReply},
          path_params=TaskPath),
    _call("POST", "/tasks/{name}/resume", "resume_task", "Let a paused task's jobs start again",
          protocol.RESUME_TASK, {200: protocol.TaskPauseResult, 404: ErrorReply},
          path_params=TaskPath),
    _call("GET", "/batches/{id}", "get_batch",
          "A batch's progress: its jobs by status, and its on_finish callback", protocol.BATCH,
          {200: BatchInfo, 404: ErrorReply}, path_params=BatchParams),
    Route("GET", "/healthz", "health",
          "200 while the job store answers and its writes go through, else 503", "public",
          {200: Health, 503: Health}),
    _call("GET", "/metrics", "metrics", "The Prometheus exposition", protocol.METRICS,
          {200: METRICS_CONTENT_TYPE}),
    Route("GET", "/openapi.json", "openapi", "This document", "read", {200: JSON}),
]  # fmt: skip
ROUTES: list[Route] = _ROUTES + [
    route._replace(path=ALIASES[route.path]) for route in _ROUTES if route.path in ALIASES
]

_PARAMETER = re.compile(r"\{(\w+)\}")


def path_pattern(template: str) -> re.Pattern[str]:
    """The regular expression of a path template; each {name} matches one segment."""
    parts = _PARAMETER.split(template)
    pattern = "".join(
        re.escape(part) if index % 2 == 0 else f"(?P<{part}>[^/]+)"
        for index, part in enumerate(parts)
    )
    return re.compile(pattern)
