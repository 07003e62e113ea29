"""`Client`: a blocking client of taskd's control socket, one typed method per call.

Plain sockets, no asyncio, so that a command-line call starts in milliseconds. One
`Client` holds one connection and is not meant to be shared between threads.
"""

from __future__ import annotations

# The C module: the `socket` module around it costs a command line milliseconds to import.
import _socket as socket
import collections
import errno
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from taskctl.errors import (
    DaemonUnavailable,
    InvalidParams,
    JobFailed,
    PermissionDenied,
    ProtocolError,
    RequestTimeout,
    error_for,
)
from taskd import protocol
from taskd.models import (
    AfterFailure,
    BatchInfo,
    Job,
    JobLogs,
    ScheduleInfo,
    Status,
    TaskInfo,
    format_duration,
    parse_duration,
)
from taskd.protocol import (
    EMPTY_MAP,
    HEADER,
    METHODS,
    PROTOCOL_VERSION,
    BatchParams,
    Call,
    CancelParams,
    EnqueueManyParams,
    EnqueueManyResult,
    EnqueueParams,
    EnqueueResult,
    HelloParams,
    HelloResult,
    JobEvent,
    JobParams,
    JobsParams,
    ListTasksParams,
    LogsParams,
    Method,
    MetricsParams,
    P,
    Params,
    PauseScheduleParams,
    PauseTaskParams,
    PruneParams,
    R,
    RawReply,
    ReloadParams,
    ReloadResult,
    ResumeScheduleParams,
    ResumeTaskParams,
    RetryParams,
    RunParams,
    RunResult,
    SchedulesParams,
    StatusParams,
    SubscribeParams,
    TaskPauseResult,
    TriggerScheduleParams,
    UnsubscribeParams,
    WaitParams,
    WhyParams,
    WhyResult,
    client_socket_path,
    encode_frame,
)
from taskd.traceparent import current_traceparent, traceparent_or_current

if TYPE_CHECKING:  # datetime costs a millisecond or two that `taskctl list` need not pay
    import datetime as dt

CLIENT_MAX_FRAME = 256 * 1024 * 1024
CLIENT_NAME = "taskctl/0.1.0"
WAIT_MARGIN = 2.0  # seconds a client waits past a wait's own timeout for taskd's answer
MAX_HELD_EVENTS = 10_000  # events of a subscription a client holds while it reads a reply

_reply_decoder = msgspec.msgpack.Decoder(RawReply)
_result_decoders: dict[str, msgspec.msgpack.Decoder[Any]] = {}  # built on first use: start-up


def _result_decoder(method: str) -> msgspec.msgpack.Decoder[Any]:
    decoder = _result_decoders.get(method)
    if decoder is None:
        decoder = _result_decoders[method] = msgspec.msgpack.Decoder(METHODS[method].result)
    return decoder


def hello_params() -> HelloParams:
    return HelloParams(protocol=PROTOCOL_VERSION, client=CLIENT_NAME)


def encode_payload(payload: Any) -> msgspec.Raw:
    """A Python value as the msgpack payload of a request; None sends none, which is {}."""
    return EMPTY_MAP if payload is None else msgspec.Raw(msgspec.msgpack.encode(payload))


def seconds(value: float | str | dt.timedelta | None) -> float | None:
    """Seconds from a number, a duration string ("5m") or a timedelta."""
    if value is None or isinstance(value, float | int):
        return value
    if isinstance(value, str):
        return parse_duration(value)
    return value.total_seconds()


def timestamp(value: float | dt.datetime | None) -> float | None:
    """A Unix timestamp from a number or a datetime (naive datetimes are local time)."""
    return value if value is None or isinstance(value, float | int) else value.timestamp()


class Enqueued(list[EnqueueResult]):
    """What `enqueue_many` returns: a result per job, in order; and `batch`, the batch's id
    when it was given `on_finish` (else None)."""

    batch: int | None = None

    @classmethod
    def of(cls, result: EnqueueManyResult) -> Enqueued:
        enqueued = cls(result.jobs)
        enqueued.batch = result.batch
        return enqueued


def enqueue_params(
    task: str,
    payload: Any = None,
    *,
    delay: float | str | dt.timedelta | None = None,
    run_at: float | dt.datetime | None = None,
    priority: int = 0,
    max_attempts: int | None = None,
    key: str | None = None,
    unique_for: float | str | dt.timedelta | None = None,
    debounce: float | str | dt.timedelta | None = None,
    max_wait: float | str | dt.timedelta | None = None,
    traceparent: str | None = None,
    after: Sequence[int] = (),
    after_failure: AfterFailure = "cancel",
) -> EnqueueParams:
    """The params of one enqueue; also what `enqueue_many` takes a list of. With `after`,
    the job waits until those jobs have succeeded (see `after_failure`).

    `traceparent` (W3C) defaults to the caller's current OpenTelemetry span, if any."""
    # The options most enqueues leave out are converted only when given: a call less each.
    return EnqueueParams(
        debounce=None if debounce is None else seconds(debounce),
        max_wait=None if max_wait is None else seconds(max_wait),
        unique_for=None if unique_for is None else seconds(unique_for),
        task=task,
        payload=EMPTY_MAP if payload is None else msgspec.Raw(msgspec.msgpack.encode(payload)),
        delay=seconds(delay),
        run_at=None if run_at is None else timestamp(run_at),
        priority=priority,
        max_attempts=max_attempts,
        key=key,
        traceparent=traceparent if traceparent is not None else current_traceparent(),
        after=list(after),
        after_failure=after_failure,
    )


def jobs_params(
    status: list[str] | None,
    task: str | None,
    limit: int,
    payloads: bool,
    origin: str | None = None,
    **filters: Any,
) -> JobsParams:
    """`filters`: key, before (an id), since and until (Unix seconds), text."""
    fields = {"status": status, "task": task, "limit": limit, "payloads": payloads}
    fields["origin"] = origin
    fields.update(filters)
    try:
        return msgspec.convert({k: v for k, v in fields.items() if v is not None}, JobsParams)
    except msgspec.ValidationError as exc:  # a filter out of range: as taskd would say it
        raise InvalidParams(f"invalid filter: {exc}") from None


def run_params(
    task: str,
    payload: Any,
    key: str | None,
    max_attempts: int | None,
    detach: bool,
    traceparent: str | None = None,
) -> RunParams:
    return RunParams(
        task,
        encode_payload(payload),
        key,
        detach,
        max_attempts,
        traceparent_or_current(traceparent),
    )


def job_result(outcome: RunResult) -> Any:
    """The result of a run's job; JobFailed if it failed (or was cancelled)."""
    if outcome.job.status != "succeeded":
        raise JobFailed(outcome.job)
    return outcome.job.result


def read_reply(body: bytes) -> RawReply:
    """A reply frame's envelope; ProtocolError if it is not one."""
    try:
        return _reply_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"taskd sent a reply this client cannot read: {exc}") from None


def result_of(method: str, reply: RawReply) -> Any:
    """The result of a reply to `method`, or the exception its error stands for."""
    if reply.error is not None:
        raise error_for(reply.error.code, reply.error.message, reply.error.data)
    decoder = _result_decoders.get(method)  # built already but for the first call's: a frame less
    try:
        return (decoder or _result_decoder(method)).decode(reply.result)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise ProtocolError(f"taskd's reply to {method} has an unexpected shape: {exc}") from None


def decode_result(method: str, reply_body: bytes, expected_id: int | None) -> Any:
    """The result of a reply frame, or the exception its error stands for."""
    reply = read_reply(reply_body)
    if reply.error is None and expected_id is not None and reply.id != expected_id:
        raise ProtocolError(f"reply for request {reply.id}, expected {expected_id}")
    return result_of(method, reply)


def request_limit(params: Params, timeout: float | None) -> float | None:
    """How long a client waits for the answer to `params`: `timeout`, except for the calls
    that wait for a job. A `run` without detach waits as long as its job runs; a `wait` for
    its own timeout plus WAIT_MARGIN, or as long as the job runs without one."""
    if isinstance(params, WaitParams):
        return None if params.timeout is None else params.timeout + WAIT_MARGIN
    if isinstance(params, RunParams) and not params.detach:
        return None
    return timeout


def shorter(first: float | None, second: float | None) -> float | None:
    """The shorter of two limits, None being no limit."""
    return second if first is None else first if second is None else min(first, second)


def timed_out(path: str, method: str, limit: float) -> RequestTimeout:
    return RequestTimeout(
        f"taskd at {path} did not answer {method} within {format_duration(limit)}: it may be "
        "stopped, frozen or overloaded (the request may still take effect)"
    )


def unavailable(path: str, exc: OSError) -> Exception:
    """The exception for a failed connect, saying what to do about it."""
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PermissionDenied(
            f"no permission to use {path}; ask an administrator to add you to the socket's "
            "group (socket_group) or to allow_users in taskd.toml"
        )
    reason = exc.strerror or str(exc)
    return DaemonUnavailable(
        f"cannot reach taskd at {path}: {reason}. Is taskd running? Start it with `taskd` "
        "(or `systemctl start taskd`), or point --socket / $TASKD_SOCKET at its socket"
    )


class Client:
    """A blocking connection to taskd. Use as a context manager, or call `close()`.

    `timeout`: seconds to wait for taskd's answer to a call that does not wait for a job
    (all but `run` without detach, and `wait`, which waits for its own timeout plus
    WAIT_MARGIN); then RequestTimeout. None waits as long as it takes.
    """

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        timeout: float | None = None,
        connect_timeout: float = 0.0,
    ) -> None:
        self.socket_path = socket_path or client_socket_path()
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._sock: socket.socket | None = None
        self._next_id = 1
        self.server: HelloResult | None = None
        # Events of open subscriptions that came while a reply was awaited: given to
        # `on_event` if set, else held for `next_event`.
        self._events: collections.deque[JobEvent] = collections.deque(maxlen=MAX_HELD_EVENTS)
        self.on_event: Callable[[JobEvent], None] | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def connect(self) -> HelloResult:
        """Connect and say hello; other methods do this on first use."""
        return self._connect(self._timeout)

    def _connect(self, limit: float | None) -> HelloResult:
        self._sock = self._open_socket()
        result: HelloResult = self._exchange(protocol.HELLO.name, hello_params(), limit)
        self.server = result
        return result

    def _open_socket(self) -> socket.socket:
        """Connect, retrying for `connect_timeout` seconds while taskd is still starting."""
        deadline = time.monotonic() + self._connect_timeout
        pause = 0.01
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self._timeout)
            try:
                sock.connect(self.socket_path)
                return sock
            except OSError as exc:
                sock.close()
                starting = exc.errno in (errno.ENOENT, errno.ECONNREFUSED)
                if not starting or time.monotonic() + pause > deadline:
                    raise unavailable(self.socket_path, exc) from None
            time.sleep(pause)
            pause = min(pause * 2, 0.25)

    def _call(self, method: Method[P, R], params: P) -> R:
        result: R = self.call(method.name, params)
        return result

    def call(self, method: str, params: Params) -> Any:
        """Send one request and return its decoded result; raises TaskdError subclasses."""
        if self._sock is not None and _hung_up(self._sock):
            self.close()  # taskd closed it after idle_timeout; a new one does as well
        limit = request_limit(params, self._timeout)
        if self._sock is None:
            self._connect(shorter(self._timeout, limit))
        return self._exchange(method, params, limit)

    def _exchange(self, method: str, params: Params, limit: float | None) -> Any:
        sock = self._sock
        assert sock is not None
        request_id = self._next_id
        self._next_id += 1
        deadline = None if limit is None else time.monotonic() + limit
        try:
            try:
                sock.settimeout(limit)
                sock.sendall(encode_frame(Call(request_id, method, params)))
            except OSError:
                # taskd may have refused the connection (permission, too many connections)
                # and hung up before the request was sent: its answer is still to be read.
                soon = time.monotonic() + 1.0
                deadline = soon if deadline is None else min(deadline, soon)
            body = self._read_reply(sock, request_id, deadline)
        except TimeoutError:
            self.close()
            raise timed_out(self.socket_path, method, limit or 1.0) from None
        except OSError as exc:
            self.close()
            raise ProtocolError(f"connection to taskd lost: {exc.strerror or exc}") from None
        return decode_result(method, body, request_id)

    def _read_reply(self, sock: socket.socket, request_id: int, deadline: float | None) -> bytes:
        """The frame answering `request_id`; events of subscriptions are held meanwhile,
        and the replies ending subscriptions are passed over."""
        while True:
            body = self._read_frame(sock, deadline)
            try:
                head = _reply_decoder.decode(body)
            except (msgspec.DecodeError, msgspec.ValidationError):
                return body  # decode_result says what is wrong with it
            if head.event is not None and self.on_event is not None:
                self.on_event(head.event)
            elif head.event is not None:
                self._events.append(head.event)
            elif head.id == request_id or head.id is None:
                return body

    def _read_frame(self, sock: socket.socket, deadline: float | None) -> bytes:
        (size,) = HEADER.unpack(_recv_exactly(sock, HEADER.size, deadline))
        if size > CLIENT_MAX_FRAME:
            raise ProtocolError(f"taskd announced a reply of {size} bytes; refusing it")
        return _recv_exactly(sock, size, deadline)

    # -- one method per call (AsyncClient has the same, as coroutines) ----------------------

    def list_tasks(self) -> list[TaskInfo]:
        return self._call(protocol.LIST_TASKS, ListTasksParams())

    def run(
        self,
        task: str,
        payload: Any = None,
        *,
        key: str | None = None,
        max_attempts: int | None = None,
        traceparent: str | None = None,
    ) -> Any:
        """Run (or join) the task, wait, and return its result; raises JobFailed if it fails.

        `traceparent` (W3C; default: the current OpenTelemetry span's, if any) is the span
        its attempts are traced under, where taskd traces (README, "Tracing")."""
        return job_result(
            self.run_job(task, payload, key=key, max_attempts=max_attempts, traceparent=traceparent)
        )

    def run_job(
        self,
        task: str,
        payload: Any = None,
        *,
        key: str | None = None,
        max_attempts: int | None = None,
        detach: bool = False,
        traceparent: str | None = None,
    ) -> RunResult:
        """Run (or join) the task; the finished job (or, with `detach`, the pending one)."""
        params = run_params(task, payload, key, max_attempts, detach, traceparent)
        return self._call(protocol.RUN, params)

    def enqueue(
        self,
        task: str,
        payload: Any = None,
        *,
        delay: float | str | dt.timedelta | None = None,
        run_at: float | dt.datetime | None = None,
        priority: int = 0,
        max_attempts: int | None = None,
        key: str | None = None,
        unique_for: float | str | dt.timedelta | None = None,
        debounce: float | str | dt.timedelta | None = None,
        max_wait: float | str | dt.timedelta | None = None,
        traceparent: str | None = None,
        after: Sequence[int] = (),
        after_failure: AfterFailure = "cancel",
    ) -> EnqueueResult:
        """Add a job to the queue; `duplicate` says an active job with this key was returned.

        With `after`, it stays pending until those jobs have succeeded; when one fails or is
        cancelled it is cancelled too, unless `after_failure="run"`. `traceparent` as for
        `run`: default, the current OpenTelemetry span's."""
        params = enqueue_params(
            task,
            payload,
            delay=delay,
            run_at=run_at,
            priority=priority,
            max_attempts=max_attempts,
            key=key,
            unique_for=unique_for,
            debounce=debounce,
            max_wait=max_wait,
            traceparent=traceparent,
            after=after,
            after_failure=after_failure,
        )
        return self._call(protocol.ENQUEUE, params)

    def enqueue_many(self, jobs: list[EnqueueParams], on_finish: str | None = None) -> Enqueued:
        """Enqueue a batch in one round trip and one transaction (build items with
        `taskctl.enqueue_params`); nothing is enqueued if one is invalid. With `on_finish`,
        the jobs are a batch (its id: `.batch` of the result) and that task is enqueued once
        they have all ended, with {"batch", "succeeded", "failed", "cancelled"}."""
        return Enqueued.of(self._call(protocol.ENQUEUE_MANY, EnqueueManyParams(jobs, on_finish)))

    def batch(self, batch_id: int) -> BatchInfo:
        """A batch's progress: its jobs by status, and its callback once they have ended."""
        return self._call(protocol.BATCH, BatchParams(batch_id))

    def job(self, job_id: int) -> Job:
        """The job, with the errors of all its attempts."""
        return self._call(protocol.JOB, JobParams(job_id))

    def jobs(
        self,
        *,
        status: list[str] | None = None,
        task: str | None = None,
        limit: int = 50,
        payloads: bool = False,
        origin: str | None = None,
        key: str | None = None,
        before: int | None = None,
        since: float | None = None,
        until: float | None = None,
        text: str | None = None,
    ) -> list[Job]:
        """Recent jobs, newest first; their payload and result only with `payloads`. Only
        those with `key`, with an id below `before` (the next page), created in
        [`since`, `until`), or whose payload holds `text`, when given."""
        params = jobs_params(
            status, task, limit, payloads, origin,
            key=key, before=before, since=since, until=until, text=text,
        )  # fmt: skip
        return self._call(protocol.JOBS, params)

    def wait(
        self,
        job_id: int,
        timeout: float | str | None = None,
        *,
        after_attempt: int | None = None,
        progress: bool = False,
    ) -> Job:
        """The job once it has ended; raises WaitTimeout after `timeout` (RequestTimeout if
        taskd has not answered WAIT_MARGIN seconds later). With `after_attempt`, also as soon
        as an attempt numbered above it has failed (the job is then not finished). With
        `progress`, the job's "progress" events meanwhile go to `on_event` (if set; else
        they are held for `next_event`)."""
        params = WaitParams(job_id, seconds(timeout), after_attempt, progress)
        return self._call(protocol.WAIT, params)

    def why(self, job_id: int) -> WhyResult:
        """Why the job is not running yet (or what it is doing), and its timeline."""
        return self._call(protocol.WHY, WhyParams(job_id))

    def cancel(self, job_id: int) -> Job:
        """Cancel a pending or running job (whichever daemon runs it stops it)."""
        return self._call(protocol.CANCEL, CancelParams(job_id))

    def retry(self, job_id: int) -> Job:
        """Put a failed or cancelled job back in the queue."""
        return self._call(protocol.RETRY, RetryParams(job_id))

    def status(self) -> Status:
        """The daemon, its queue, its running jobs, and every daemon sharing its store."""
        return self._call(protocol.STATUS, StatusParams())

    def prune(self, older_than: float | str | None = None) -> int:
        """Delete finished jobs (past their retention, or older than `older_than`); how many."""
        return self._call(protocol.PRUNE, PruneParams(seconds(older_than))).deleted

    def reload(self) -> ReloadResult:
        """Re-read taskd.toml and the tasks folder (like SIGHUP)."""
        return self._call(protocol.RELOAD, ReloadParams())

    def schedules(self) -> list[ScheduleInfo]:
        """Every schedule with its next and last tick, last outcome and coalesced count."""
        return self._call(protocol.SCHEDULES, SchedulesParams())

    def pause_schedule(self, schedule: str) -> ScheduleInfo:
        """Stop a schedule (by id, or by its cron expression) ticking until resumed."""
        return self._call(protocol.PAUSE_SCHEDULE, PauseScheduleParams(schedule))

    def resume_schedule(self, schedule: str) -> ScheduleInfo:
        """Let a paused schedule tick again from now (missed ticks are not caught up)."""
        return self._call(protocol.RESUME_SCHEDULE, ResumeScheduleParams(schedule))

    def trigger_schedule(self, schedule: str) -> ScheduleInfo:
        """Fire a schedule now; `last_jobs` of the result are the jobs it started or joined."""
        return self._call(protocol.TRIGGER_SCHEDULE, TriggerScheduleParams(schedule))

    def pause_task(self, task: str) -> TaskPauseResult:
        """Start no new job of the task, on any daemon sharing the store, until it is resumed
        (its jobs still queue up; running ones finish). Remembered across restarts."""
        return self._call(protocol.PAUSE_TASK, PauseTaskParams(task))

    def resume_task(self, task: str) -> TaskPauseResult:
        """Let a paused task's jobs start again."""
        return self._call(protocol.RESUME_TASK, ResumeTaskParams(task))

    def metrics(self) -> str:
        """The Prometheus exposition of the daemon (text format), as `GET /metrics` gives it."""
        return self._call(protocol.METRICS, MetricsParams())

    def logs(self, job_id: int) -> JobLogs:
        """The lines the job wrote with `ctx.logger` that are kept, oldest first."""
        return self._call(protocol.LOGS, LogsParams(job_id))

    # -- live events -----------------------------------------------------------------------

    def subscribe(
        self,
        job: int | None = None,
        *,
        logs: bool = True,
        task: str | None = None,
        timeout: float | None = None,
    ) -> int:
        """Start receiving events (of one job, of one `task`'s jobs, or of all, with "changed"
        events but for one job); returns
        the subscription's id once it is live. Read them with `next_event`. RequestTimeout
        if taskd has not started it within the client's timeout (or `timeout`, if shorter)."""
        limit = shorter(self._timeout, timeout)
        deadline = None if limit is None else time.monotonic() + limit
        if self._sock is None or _hung_up(self._sock):
            self.close()
            self._connect(limit)
        sock = self._sock
        assert sock is not None
        sock.settimeout(limit)  # _hung_up left it non-blocking
        request_id = self._next_id
        self._next_id += 1
        params = SubscribeParams(job=job, logs=logs, task=task)
        try:
            sock.sendall(encode_frame(Call(request_id, protocol.SUBSCRIBE.name, params)))
            while True:  # until the first event: "subscribed", or the error refusing it
                body = self._read_frame(sock, deadline)
                head = _reply_decoder.decode(body)
                if head.id == request_id and head.event is not None:
                    return request_id
                if head.id == request_id:
                    result_of(protocol.SUBSCRIBE.name, head)
                    raise ProtocolError("taskd ended a subscription before it started")
        except TimeoutError:
            self.close()
            raise timed_out(self.socket_path, protocol.SUBSCRIBE.name, limit or 1.0) from None

    def next_event(self, timeout: float | None = None) -> JobEvent | None:
        """The next event of the open subscriptions; None if none came within `timeout`."""
        if self._events:
            return self._events.popleft()
        sock = self._sock
        if sock is None:
            raise ProtocolError("no subscription is open")
        import select  # only for streams of events: the other commands start without it

        readable, _, _ = select.select([sock], [], [], timeout)
        if not readable:
            return None
        sock.settimeout(self._timeout)
        body = self._read_frame(sock, None)
        head = _reply_decoder.decode(body)
        if head.error is not None:
            raise error_for(head.error.code, head.error.message, head.error.data)
        return head.event if head.event is not None else self.next_event(0)

    def fileno(self) -> int:
        """The connection's descriptor, to wait on it with select (see `held_events`)."""
        if self._sock is None:
            raise ProtocolError("not connected")
        return self._sock.fileno()

    def held_events(self) -> int:
        """Events already read and held, which select cannot see coming."""
        return len(self._events)

    def unsubscribe(self, subscription: int) -> None:
        """End a subscription (its events not read yet are dropped)."""
        self._call(protocol.UNSUBSCRIBE, UnsubscribeParams(subscription))
        self._events.clear()


def _hung_up(sock: socket.socket) -> bool:
    """True if taskd has closed this connection (it closes idle ones)."""
    sock.setblocking(False)  # a socket with a timeout would wait for data first
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _recv_exactly(sock: socket.socket, size: int, deadline: float | None = None) -> bytes:
    """`size` bytes; TimeoutError if they have not all come by `deadline` (monotonic)."""
    if size == 0:
        return b""
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
        count = sock.recv_into(view[received:], size - received)
        if count == 0:
            raise ProtocolError("taskd closed the connection in the middle of a reply")
        received += count
    return bytes(buffer)
