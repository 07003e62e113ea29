"""The HTTP API's handlers: each request becomes a call of the control service.

They call the same handlers as the socket server (taskd.service.Dispatch), with the same
params types, so validation, single-flight, limits and errors are the socket's own; an
error's code becomes an HTTP status through `STATUS_FOR_CODE`. The wire (HTTP/1.1, timeouts,
limits) is taskd.http.server's business: nothing here knows the HTTP library.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, TypeVar

import msgspec

from taskd import protocol
from taskd.http.api import (
    EVENT_STREAM,
    JSON,
    METRICS_CONTENT_TYPE,
    ROUTES,
    STATUS_FOR_CODE,
    ErrorReply,
    Health,
    HttpErrorCode,
    JobList,
    NitroSchedule,
    NitroTask,
    NitroTasks,
    Route,
    RunBody,
    TaskPath,
    TaskResult,
    path_pattern,
)
from taskd.limits import out_of_limits
from taskd.live import LiveEvents, Subscription
from taskd.models import Job, Peer, counted, parse_duration
from taskd.protocol import (
    EMPTY_MAP,
    BatchParams,
    CancelParams,
    EnqueueParams,
    ErrorBody,
    ErrorCode,
    JobEvent,
    JobParams,
    JobsParams,
    ListTasksParams,
    LogsParams,
    MetricsParams,
    PauseTaskParams,
    ResumeTaskParams,
    RetryParams,
    RpcError,
    RunParams,
    SchedulesParams,
    SubscribeParams,
)
from taskd.schema import openapi_schema
from taskd.service import Dispatch
from taskd.store import StoreError
from taskd.tasks import TaskRegistry

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT = 5.0  # a store that takes longer than this to answer is not healthy
TOKEN_HINT = "send `Authorization: Bearer TOKEN` with a token from the [http] table of taskd.toml"
S = TypeVar("S", bound=msgspec.Struct)
_encoder = msgspec.json.Encoder()


class HttpRequest(NamedTuple):
    """A request as it arrived, and who sent it."""

    method: str
    target: str  # the path and the query, as sent
    body: bytes
    authorization: bytes | None  # the Authorization header, if any
    access: str | None  # "full" or "readonly" (from a token or the credentials), None: neither
    peer: Peer
    client: str  # who it is, for the log: an address, or a process and its user
    # Its `traceparent` header (W3C), if valid: a malformed one is ignored, as the standard
    # says; the jobs it starts are traced under it.
    traceparent: str | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()  # as h11 gives them: names in lower case


class HttpResponse(NamedTuple):
    status: int
    body: bytes
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()
    stream: EventStream | None = None  # a body that goes on (after `body`) until it ends


class EventStream:
    """The events of one `GET /events` as Server-Sent Events; the server writes them as they
    come (`take`), with heartbeats between, and closes the stream when it ends."""

    def __init__(self, live: LiveEvents, params: SubscribeParams) -> None:
        self._live = live
        self._params = params
        self._subscription: Subscription | None = None

    def open(self) -> bytes:
        """Subscribe; the first event ("subscribed"), encoded."""
        params = self._params
        self._subscription = self._live.subscribe(params.job, params.logs, params.task)
        return _sse([JobEvent("subscribed")])

    async def take(self) -> bytes:
        """The next events, encoded (waiting for them); b"" once the stream has ended."""
        assert self._subscription is not None
        return _sse(await self._subscription.take())

    def close(self) -> None:
        if self._subscription is not None:
            self._live.unsubscribe(self._subscription)
            self._subscription = None


def _sse(events: list[JobEvent]) -> bytes:
    return b"".join(
        b"event: " + event.kind.encode() + b"\ndata: " + _encoder.encode(event) + b"\n\n"
        for event in events
    )


class HttpError(Exception):
    """An error response: its code (which gives the status), message, data and headers."""

    def __init__(
        self,
        code: str,
        message: str,
        data: dict[str, Any] | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.code, self.message, self.data, self.headers = code, message, data, headers

    def response(self) -> HttpResponse:
        return error_response(self.code, self.message, self.data, self.headers)


def error_response(
    code: str,
    message: str,
    data: dict[str, Any] | None = None,
    headers: tuple[tuple[str, str], ...] = (),
) -> HttpResponse:
    body = _encoder.encode(ErrorReply(ErrorBody(code, message, data)))
    return HttpResponse(STATUS_FOR_CODE.get(code, 500), body, JSON, headers)


Handler = Callable[["HttpApi", HttpRequest, dict[str, str]], Awaitable[HttpResponse]]


class HttpApi:
    """Routes requests to their handlers, checks access, and turns errors into responses."""

    def __init__(
        self,
        dispatch: Dispatch,
        healthy: Callable[[], Awaitable[None]],
        tasks: TaskRegistry,
        live: LiveEvents | None = None,
    ) -> None:
        self._dispatch = dispatch
        self._live = live
        self._healthy = healthy  # returns while the job store is healthy, else StoreError
        self._tasks = tasks  # a run's query values take the types of its payload's fields
        self._openapi = msgspec.json.encode(openapi_schema())
        self._routes = [(route, path_pattern(route.path)) for route in ROUTES]

    async def handle(self, request: HttpRequest) -> HttpResponse:
        try:
            route, path = self._route(request.method, request.target)
            self._authorize(route, request)
            return await _HANDLERS[route.operation](self, request, path)
        except HttpError as exc:
            return exc.response()
        except RpcError as exc:
            return error_response(exc.code, exc.message, exc.data)

    def public(self, method: str, target: str) -> bool:
        """Whether the request is for a route that needs no token (`/healthz`)."""
        try:
            return self._route(method, target)[0].access == "public"
        except HttpError:
            return False

    def _route(self, method: str, target: str) -> tuple[Route, dict[str, str]]:
        path = urllib.parse.urlsplit(target).path
        allowed = []
        for route, pattern in self._routes:
            if (match := pattern.fullmatch(path)) is None:
                continue
            if route.method == method:
                return route, {k: urllib.parse.unquote(v) for k, v in match.groupdict().items()}
            allowed.append(route.method)
        if allowed:
            raise HttpError(
                HttpErrorCode.METHOD_NOT_ALLOWED,
                f"{method} is not allowed on {path}; use {' or '.join(allowed)}",
                headers=(("Allow", ", ".join(allowed)),),
            )
        raise HttpError(
            HttpErrorCode.NOT_FOUND, f"no such path: {path} (GET /openapi.json lists the routes)"
        )

    def _authorize(self, route: Route, request: HttpRequest) -> None:
        if route.access == "public":
            return
        if request.access is None:
            if request.authorization is None:
                message, challenge = f"this request needs a token: {TOKEN_HINT}", ""
            else:
                message = f"the token is not one this taskd accepts: {TOKEN_HINT}"
                challenge = ', error="invalid_token"'
            header = ("WWW-Authenticate", f'Bearer realm="taskd"{challenge}')
            raise HttpError(HttpErrorCode.UNAUTHORIZED, message, headers=(header,))
        if route.access == "write" and request.access != "full":
            path = urllib.parse.urlsplit(request.target).path
            logger.info("refused %s %s from %s: read-only", request.method, path, request.client)
            raise HttpError(
                ErrorCode.PERMISSION_DENIED,
                f"permission denied: {request.method} {path} changes state, and this caller "
                "has read-only access to taskd (a read-only token, or a user or group in "
                "readonly_users/readonly_groups); ask its administrator for full access",
            )

    # -- the routes ----------------------------------------------------------------------

    async def list_tasks(self, request: HttpRequest, path: dict[str, str]) -> HttpResponse:
        tasks = await self._dispatch.call(protocol.LIST_TASKS, ListTasksParams())
        schedules = await self._dispatch.call(protocol.SCHEDULES, SchedulesParams())
        return _json(
            200,
            NitroTasks(
                tasks={task.name: NitroTask(task.description) for task in tasks},
                scheduled_tasks=[NitroSchedule(s.cron, s.tasks) for s in schedules],
            ),
        )

    async def run_task(self, request: HttpRequest, path: dict[str, str]) -> HttpResponse:
        body = _convert(_body_object(request.body), RunBody) if request.body.strip() else RunBody()
        query = _query_payload(request.target)
        if (task := self._tasks.get(path["name"])) is not None:  # else: unknown_task below
            query = task.query_payload(query)
        payload = _merged(query, body.payload)
        params = RunParams(
            task=path["name"], payload=_msgpack(payload), traceparent=request.traceparent
        )
        outcome = await self._dispatch.call(protocol.RUN, params)
        job = outcome.job
        headers = (("Taskd-Job-Id", str(job.id)), ("Taskd-Joined", str(outcome.joined).lower()))
        if job.status == "succeeded":
            return _json(200, TaskResult(_value(job.result)), headers)
        attempts = counted(job.attempts, "attempt")
        raise HttpError(
            HttpErrorCode.JOB_FAILED,
            f"task {job.task} (job {job.id}) {job.status} after {attempts}: {job.error}",
            {"job": job.id, "status": job.status},
            headers,
        )

    async def enqueue(self, request: HttpRequest, path: dict[str, str]) -> HttpResponse:
        if not request.body.strip():
            raise HttpError(
                ErrorCode.INVALID_PARAMS,
                'the body must be a JSON object: {"task": NAME, "payload": ..., "delay": ...}',
            )
        fields = _body_object(request.body)
        payload = fields.pop("payload", None) if "payload" in fields else EMPTY_MAP
        params = _convert(_times_read(fields), EnqueueParams)
        if payload is not EMPTY_MAP:
            params.payload = _msgpack(payload)
        if params.traceparent is None:  # the body's, else the header's
            params.traceparent = request.traceparent
        result = await self._dispatch.call(protocol.ENQUEUE, params)
        location = ("Location", f"/jobs/{result.job_id}")
        return _json(200 if result.duplicate else 201, result, (location,))

    async def list_jobs(self, request: HttpRequest, path: dict[str, str]) -> HttpResponse:
        params = _query_params(request.target, JobsParams)
        jobs = await self._dispatch.call(protocol.JOBS, params)
        return _json(200, JobList([_plain(job) for job in jobs]))

    async def get_job(self, request: HttpRequest, path: dict[str, str]) -> HttpResponse:
        params = _path_params(path, JobParams)
        return _json(200, _plain(await self._dispatch.call(protocol.JOB, params)))

    async def get_batch(self, request: HttpRequest, path: dict[str, str]) -> HttpResponse:
        params = _path_params(path, BatchParams)
        return _json(200, await self._dispatch.call(protocol.BATCH, params))

    async def job_logs(self, request: HttpRequest, path: dict[str, str]) -> HttpResponse:
        params = _path_params(path, LogsParams)
        return _json(200, await self._dispatch.call(protocol.LOGS, params))

    async def events(self, request: HttpRequest, path: dict[str, str]) -> HttpResponse:
        params = _query_params(request.target, SubscribeParams)
        if self._live is None:
            raise HttpError(ErrorCode.SHUTTING_DOWN, "taskd is not serving live events")
        headers = (("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no"))
        stream = EventStream(self._live, params)
        return HttpResponse(200, b"", EVENT_STREAM, headers, stream=stream)

    async def cancel_job(self, request: HttpRequest, path: dict[str, str]) -> HttpResponse:
        job_id = _path_params(path, JobParams).id
        return _json(200, _plain(await self._dispatch.call(protocol.CANCEL, CancelParams(job_id))))

    async def retry_job(self, request: HttpRequest, path: dict[str, str]) -> HttpResponse:
        job_id = _path_params(path, JobParams).id
        return _json(200, _plain(await self._dispatch.call(protocol.RETRY, RetryParams(job_id))))

    async def pause_task(self, request: HttpRequest, path: dict[str, str]) -> HttpResponse:
        params = PauseTaskParams(_path_params(path, TaskPath).name)
        return _json(200, await self._dispatch.call(protocol.PAUSE_TASK, params))

    async def resume_task(self, request: HttpRequest, path: dict[str, str]) -> HttpResponse:
        params = ResumeTaskParams(_path_params(path, TaskPath).name)
        return _json(200, await self._dispatch.call(protocol.RESUME_TASK, params))

    async def health(self, request: HttpRequest, path: dict[str, str]) -> HttpResponse:
        try:
            await asyncio.wait_for(self._healthy(), HEALTH_TIMEOUT)
        except StoreError as exc:
            return _json(503, Health("unavailable", f"the job store failed: {exc}"))
        except TimeoutError:
            message = f"the job store did not answer within {HEALTH_TIMEOUT:g}s"
            return _json(503, Health("unavailable", message))
        return _json(200, Health("ok"))

    async def metrics(self, request: HttpRequest, path: dict[str, str]) -> HttpResponse:
        text = await self._dispatch.call(protocol.METRICS, MetricsParams())
        return HttpResponse(200, text.encode(), METRICS_CONTENT_TYPE)

    async def openapi(self, request: HttpRequest, path: dict[str, str]) -> HttpResponse:
        return HttpResponse(200, self._openapi)


_HANDLERS: dict[str, Handler] = {
    route.operation: getattr(HttpApi, route.operation) for route in ROUTES
}


# -- bodies, queries and values ---------------------------------------------------------


def _json(status: int, value: Any, headers: tuple[tuple[str, str], ...] = ()) -> HttpResponse:
    try:
        body = _encoder.encode(value)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        message = f"the reply cannot be written as JSON (use the socket protocol for it): {exc}"
        raise HttpError(ErrorCode.INTERNAL, message) from None
    return HttpResponse(status, body, JSON, headers)


def _body_object(body: bytes) -> dict[str, Any]:
    """The JSON object a body holds; its integral numbers outside the payload as ints, since
    JSON Schema counts 5.0 as an integer."""
    try:
        value = msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeError) as exc:
        raise HttpError(HttpErrorCode.BAD_REQUEST, f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise HttpError(HttpErrorCode.BAD_REQUEST, "the body is nested too deeply") from None
    if not isinstance(value, dict):
        raise HttpError(ErrorCode.INVALID_PARAMS, "the body must be a JSON object")
    return {
        key: int(item)
        if key != "payload" and isinstance(item, float) and item.is_integer()
        else item
        for key, item in value.items()
    }


def _convert(fields: dict[str, Any], kind: type[S]) -> S:
    try:
        return msgspec.convert(fields, kind)
    except msgspec.ValidationError as exc:
        problem = out_of_limits(kind, fields) or exc  # a limit, in taskd's words
        raise HttpError(ErrorCode.INVALID_PARAMS, f"invalid body: {problem}") from None


def _times_read(fields: dict[str, Any]) -> dict[str, Any]:
    """An enqueue's `delay` and `run_at` in seconds, from the forms taskctl takes too: a
    duration such as "5m", and ISO-8601 with an offset."""
    delay, run_at = fields.get("delay"), fields.get("run_at")
    if isinstance(delay, str):
        try:
            fields["delay"] = parse_duration(delay)
        except ValueError as exc:
            raise HttpError(ErrorCode.INVALID_PARAMS, f"invalid body: delay: {exc}") from None
    if isinstance(run_at, str):
        fields["run_at"] = instant(run_at, "invalid body: run_at")
    return fields


def instant(text: str, what: str) -> float:
    """An ISO-8601 time with an offset as Unix seconds; HttpError naming `what` if not one."""
    example = "such as 2026-12-01T08:00:00+01:00 or 2026-12-01T07:00:00Z"
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        message = f"{what} {text!r} is not an ISO-8601 time {example}"
        raise HttpError(ErrorCode.INVALID_PARAMS, message) from None
    if moment.tzinfo is None:
        message = (
            f"{what} {text!r} has no offset, and taskd's time zone need not be "
            f"the caller's: give one, {example}"
        )
        raise HttpError(ErrorCode.INVALID_PARAMS, message)
    try:
        return moment.timestamp()
    except (OverflowError, ValueError, OSError):
        message = f"{what} {text!r} is out of range"
        raise HttpError(ErrorCode.INVALID_PARAMS, message) from None


def _msgpack(payload: Any) -> msgspec.Raw:
    """A payload as the msgpack the task will decode."""
    try:
        return msgspec.Raw(msgspec.msgpack.encode(payload))
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        message = f"the payload cannot be passed to a task: {exc}"
        raise HttpError(ErrorCode.PAYLOAD_INVALID, message) from None


def _query_payload(target: str) -> dict[str, Any]:
    """The query parameters as payload keys, as Nitro reads them: a repeated key is a list."""
    pairs = urllib.parse.parse_qsl(urllib.parse.urlsplit(target).query, keep_blank_values=True)
    payload: dict[str, Any] = {}
    for key, value in pairs:
        if key not in payload:
            payload[key] = value
        elif isinstance(payload[key], list):
            payload[key].append(value)
        else:
            payload[key] = [payload[key], value]
    return payload


def _merged(query: dict[str, Any], body: dict[str, Any] | None) -> dict[str, Any]:
    """The body's payload over the query's (its keys win); neither: {}, as in Nitro."""
    return query if body is None else {**query, **body}


def _query_params(target: str, kind: type[S]) -> S:
    """The query parameters as a params Struct; list fields take repeated or a,b values."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query, keep_blank_values=True)
    lists = {field.name for field in msgspec.structs.fields(kind) if _is_list(field.type)}
    values: dict[str, Any] = {}
    for key, items in query.items():
        if key in lists:
            values[key] = [part for item in items for part in item.split(",") if part]
        elif len(items) > 1:
            raise HttpError(ErrorCode.INVALID_PARAMS, f"the query parameter {key} is given twice")
        else:
            values[key] = items[0]
    try:
        return msgspec.convert(values, kind, strict=False)
    except msgspec.ValidationError as exc:
        raise HttpError(ErrorCode.INVALID_PARAMS, f"invalid query: {exc}") from None


def _is_list(annotation: Any) -> bool:
    info = msgspec.inspect.type_info(annotation)
    kinds = info.types if isinstance(info, msgspec.inspect.UnionType) else (info,)
    return any(isinstance(kind, msgspec.inspect.ListType) for kind in kinds)


def _path_params(path: dict[str, str], kind: type[S]) -> S:
    try:
        return msgspec.convert(path, kind, strict=False)
    except msgspec.ValidationError as exc:
        raise HttpError(ErrorCode.INVALID_PARAMS, f"invalid path: {exc}") from None


def _value(raw: Any) -> Any:
    """A payload or result as Python data (in the daemon they stay msgpack)."""
    return msgspec.msgpack.decode(raw) if isinstance(raw, msgspec.Raw | bytes) else raw


def _plain(job: Job) -> Job:
    """The job with its payload and result as data that JSON can carry."""
    return msgspec.structs.replace(job, payload=_value(job.payload), result=_value(job.result))
