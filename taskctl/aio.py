"""`AsyncClient`: the asyncio client of taskd; calls may run concurrently on one connection.

It has every method of `Client`, with the same names and parameters, as coroutines (their
docstrings are Client's); a test holds the two to that.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import msgspec

from taskctl.client import (
    CLIENT_MAX_FRAME,
    MAX_HELD_EVENTS,
    Client,
    Enqueued,
    _reply_decoder,
    enqueue_params,
    hello_params,
    job_result,
    jobs_params,
    read_reply,
    request_limit,
    result_of,
    run_params,
    seconds,
    shorter,
    timed_out,
    unavailable,
)
from taskctl.errors import ProtocolError, TaskdError
from taskd import protocol
from taskd.models import AfterFailure, BatchInfo, Job, JobLogs, ScheduleInfo, Status, TaskInfo
from taskd.protocol import (
    HEADER,
    BatchParams,
    Call,
    CancelParams,
    EnqueueManyParams,
    EnqueueParams,
    EnqueueResult,
    HelloResult,
    JobEvent,
    JobParams,
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
    ReloadParams,
    ReloadResult,
    ResumeScheduleParams,
    ResumeTaskParams,
    RetryParams,
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
from taskd.traceparent import traceparent_or_current


class AsyncClient:
    """An asyncio connection to taskd. `async with AsyncClient() as client: ...`

    `timeout` limits the wait for each answer as in `Client`; then RequestTimeout.
    """

    def __init__(self, socket_path: str | None = None, *, timeout: float | None = None) -> None:
        self.socket_path = socket_path or client_socket_path()
        self._timeout = timeout
        self._connection: _Connection | None = None
        # The connection's loop, read as it connects: on Python 3.11 each
        # asyncio.get_running_loop() makes a getpid() system call.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[int, tuple[str, asyncio.Future[Any]]] = {}
        self._next_id = 1
        self._connecting = asyncio.Lock()
        self.server: HelloResult | None = None
        # Events of open subscriptions: given to `on_event` if set, else held for
        # `next_event`.
        self._events: collections.deque[JobEvent] = collections.deque(maxlen=MAX_HELD_EVENTS)
        self._event_came = asyncio.Event()
        self.on_event: Callable[[JobEvent], None] | None = None

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> HelloResult:
        return await self._connect(self._timeout)

    async def _connect(self, limit: float | None) -> HelloResult:
        async with self._connecting:
            if self.server is not None and self._connection is not None:
                return self.server
            if self._connection is not None:
                self._connection.close()  # taskd closed it (idle_timeout); a new one does as well
                self._connection = None
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(limit):
                    _, connection = await loop.create_unix_connection(
                        lambda: _Connection(self, loop), self.socket_path
                    )
            except TimeoutError:
                raise timed_out(self.socket_path, "connect", limit or 0.0) from None
            except OSError as exc:
                raise unavailable(self.socket_path, exc) from None
            self._connection, self._loop = connection, loop
            try:
                result: HelloResult = await self._send(protocol.HELLO.name, hello_params(), limit)
            except BaseException:
                await self.close()  # no half-open connection left behind
                raise
            self.server = result
            return result

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
            await connection.closed
        self._fail_pending(ProtocolError("the client was closed"))
        self.server = None

    def _call(self, method: Method[P, R], params: P) -> Awaitable[R]:
        # Connected, the coroutine of `_send` itself, not one of `call` that awaits it: a
        # frame less per call.
        if self.server is None:
            return self.call(method.name, params)
        return self._send(method.name, params, request_limit(params, self._timeout))

    async def call(self, method: str, params: Params) -> Any:
        limit = request_limit(params, self._timeout)
        if self.server is None:
            await self._connect(shorter(self._timeout, limit))
        return await self._send(method, params, limit)

    async def _send(self, method: str, params: Params, limit: float | None) -> Any:
        connection, loop = self._connection, self._loop
        if connection is None or loop is None:
            raise ProtocolError("not connected")
        request_id = self._next_id
        self._next_id += 1
        future: asyncio.Future[Any] = loop.create_future()
        self._pending[request_id] = (method, future)
        try:
            connection.transport.write(encode_frame(Call(request_id, method, params)))
            if limit is not None:
                async with asyncio.timeout(limit):
                    await connection.drain()
                    return await future
            # No limit, as is most often the case: no timer to set, and no drain to await
            # unless the requests sent are over the transport's buffer (drain waits while
            # taskd does not read them) or the connection is going (drain raises).
            if connection.paused or connection.transport.is_closing():
                await connection.drain()
            return await future
        except TimeoutError:
            raise timed_out(self.socket_path, method, limit or 0.0) from None
        finally:
            self._pending.pop(request_id, None)

    def _lost(self, connection: _Connection, error: TaskdError) -> None:
        """The connection is gone, or what taskd sent cannot be read (`error`): every call
        waiting on it fails, and the next call connects again."""
        if connection is not self._connection:
            return  # an earlier connection, replaced or closed by the client
        self._fail_pending(error)
        self.server = None
        self._event_came.set()  # a reader of events learns that the connection is gone

    def _deliver(self, body: bytes) -> None:
        try:  # as read_reply, inline: once per reply
            reply = _reply_decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            reply = read_reply(body)  # raises the ProtocolError that says so
        if reply.id is None:  # an error about the whole connection: this raises it
            result_of(protocol.HELLO.name, reply)
            return
        entry = self._pending.get(reply.id)
        future = entry[1] if entry is not None and not entry[1].done() else None
        if reply.event is not None:
            if future is not None and entry is not None and entry[0] == protocol.SUBSCRIBE.name:
                future.set_result(reply.id)  # the first event of a subscription: it is live
            elif self.on_event is not None:
                self.on_event(reply.event)
            else:
                self._events.append(reply.event)
                self._event_came.set()
            return
        if entry is None or future is None:
            return  # a subscription's end, or a reply nobody waits for any more
        try:
            result = result_of(entry[0], reply)
            if entry[0] == protocol.SUBSCRIBE.name:
                raise ProtocolError("taskd ended a subscription before it started")
            future.set_result(result)
        except TaskdError as exc:
            future.set_exception(exc)

    def _fail_pending(self, exc: TaskdError) -> None:
        for _, future in self._pending.values():
            if not future.done():
                future.set_exception(exc)

    # -- one method per call (the same as Client's) ----------------------------------------

    async def list_tasks(self) -> list[TaskInfo]:
        return await self._call(protocol.LIST_TASKS, ListTasksParams())

    async def run(
        self,
        task: str,
        payload: Any = None,
        *,
        key: str | None = None,
        max_attempts: int | None = None,
        traceparent: str | None = None,
    ) -> Any:
        # The traceparent is read here, in the caller's context, not in a task of the client.
        traceparent = traceparent_or_current(traceparent)
        job = await self.run_job(
            task, payload, key=key, max_attempts=max_attempts, traceparent=traceparent
        )
        return job_result(job)

    async def run_job(
        self,
        task: str,
        payload: Any = None,
        *,
        key: str | None = None,
        max_attempts: int | None = None,
        detach: bool = False,
        traceparent: str | None = None,
    ) -> RunResult:
        params = run_params(task, payload, key, max_attempts, detach, traceparent)
        return await self._call(protocol.RUN, params)

    async def enqueue(
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
        return await self._call(protocol.ENQUEUE, params)

    async def enqueue_many(
        self, jobs: list[EnqueueParams], on_finish: str | None = None
    ) -> Enqueued:
        params = EnqueueManyParams(jobs, on_finish)
        return Enqueued.of(await self._call(protocol.ENQUEUE_MANY, params))

    async def batch(self, batch_id: int) -> BatchInfo:
        return await self._call(protocol.BATCH, BatchParams(batch_id))

    async def job(self, job_id: int) -> Job:
        return await self._call(protocol.JOB, JobParams(job_id))

    async def jobs(
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
        params = jobs_params(
            status, task, limit, payloads, origin,
            key=key, before=before, since=since, until=until, text=text,
        )  # fmt: skip
        return await self._call(protocol.JOBS, params)

    async def wait(
        self,
        job_id: int,
        timeout: float | str | None = None,
        *,
        after_attempt: int | None = None,
        progress: bool = False,
    ) -> Job:
        params = WaitParams(job_id, seconds(timeout), after_attempt, progress)
        return await self._call(protocol.WAIT, params)

    async def why(self, job_id: int) -> WhyResult:
        return await self._call(protocol.WHY, WhyParams(job_id))

    async def cancel(self, job_id: int) -> Job:
        return await self._call(protocol.CANCEL, CancelParams(job_id))

    async def retry(self, job_id: int) -> Job:
        return await self._call(protocol.RETRY, RetryParams(job_id))

    async def status(self) -> Status:
        return await self._call(protocol.STATUS, StatusParams())

    async def prune(self, older_than: float | str | None = None) -> int:
        return (await self._call(protocol.PRUNE, PruneParams(seconds(older_than)))).deleted

    async def reload(self) -> ReloadResult:
        return await self._call(protocol.RELOAD, ReloadParams())

    async def schedules(self) -> list[ScheduleInfo]:
        return await self._call(protocol.SCHEDULES, SchedulesParams())

    async def pause_schedule(self, schedule: str) -> ScheduleInfo:
        return await self._call(protocol.PAUSE_SCHEDULE, PauseScheduleParams(schedule))

    async def resume_schedule(self, schedule: str) -> ScheduleInfo:
        return await self._call(protocol.RESUME_SCHEDULE, ResumeScheduleParams(schedule))

    async def trigger_schedule(self, schedule: str) -> ScheduleInfo:
        return await self._call(protocol.TRIGGER_SCHEDULE, TriggerScheduleParams(schedule))

    async def pause_task(self, task: str) -> TaskPauseResult:
        return await self._call(protocol.PAUSE_TASK, PauseTaskParams(task))

    async def resume_task(self, task: str) -> TaskPauseResult:
        return await self._call(protocol.RESUME_TASK, ResumeTaskParams(task))

    async def metrics(self) -> str:
        return await self._call(protocol.METRICS, MetricsParams())

    async def logs(self, job_id: int) -> JobLogs:
        return await self._call(protocol.LOGS, LogsParams(job_id))

    # -- live events -----------------------------------------------------------------------

    async def subscribe(
        self,
        job: int | None = None,
        *,
        logs: bool = True,
        task: str | None = None,
        timeout: float | None = None,
    ) -> int:
        limit = shorter(self._timeout, timeout)
        if self.server is None:
            await self._connect(limit)
        subscription: int = await self._send(
            protocol.SUBSCRIBE.name, SubscribeParams(job=job, logs=logs, task=task), limit
        )
        return subscription

    async def next_event(self, timeout: float | None = None) -> JobEvent | None:
        while not self._events:
            if self._connection is None or self.server is None:
                raise ProtocolError("no subscription is open")
            self._event_came.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._event_came.wait()
            except TimeoutError:
                return None
        return self._events.popleft()

    async def unsubscribe(self, subscription: int) -> None:
        await self._call(protocol.UNSUBSCRIBE, UnsubscribeParams(subscription))
        self._events.clear()


def _documented_as(cls: type, model: type) -> None:
    """Give each public method of `cls` without a docstring the docstring of `model`'s."""
    for name, method in vars(cls).items():
        if callable(method) and not name.startswith("_") and method.__doc__ is None:
            method.__doc__ = getattr(model, name).__doc__


_documented_as(AsyncClient, Client)


class _Connection(asyncio.Protocol):
    """An AsyncClient's connection: reply frames are cut from the bytes as they arrive and
    handed to the client at once (no reader task, no stream), and writers wait (`drain`)
    while the requests sent are over the transport's buffer."""

    transport: asyncio.Transport

    def __init__(self, client: AsyncClient, loop: asyncio.AbstractEventLoop) -> None:
        self._client = client
        self._buffer = bytearray()  # the start of a frame not all arrived yet
        self._needed = HEADER.size  # bytes the buffer must hold before a frame can be cut
        self._broken = False  # taskd sent what cannot be read: the rest is dropped
        self.paused = False  # the transport's buffer is over its limit
        self._room: list[asyncio.Future[None]] = []  # writers waiting while paused
        self._loss: Exception | None = None  # why the connection was lost, once it is
        self._gone = False
        self.closed: asyncio.Future[None] = loop.create_future()  # set once it is lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self._broken:
            return
        buffer = self._buffer
        if buffer:
            buffer += data
            if len(buffer) < self._needed:
                return  # most of a large reply: no copy until all of it is there
            data = bytes(buffer)
            buffer.clear()
        start, end = 0, len(data)
        try:
            while end - start >= HEADER.size:
                (size,) = HEADER.unpack_from(data, start)
                if size > CLIENT_MAX_FRAME:
                    raise ProtocolError(f"taskd announced a reply of {size} bytes; refusing it")
                if end - start - HEADER.size < size:
                    self._needed = HEADER.size + size
                    break
                start += HEADER.size
                body, start = data[start : start + size], start + size
                self._client._deliver(body)
            else:
                self._needed = HEADER.size
        except TaskdError as exc:
            self._broken = True
            self._client._lost(self, exc)
            self.transport.abort()
            return
        if start < end:
            buffer += data[start:]

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone = True
        if exc is not None:
            self._loss = exc
            self._lose(f"connection to taskd lost: {exc}")
        else:
            missing = asyncio.IncompleteReadError(bytes(self._buffer), self._needed)
            self._lose(f"connection to taskd lost: {missing}")
        for waiter in self._room:
            if not waiter.done():
                if exc is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(exc)
        self._room.clear()
        if not self.closed.done():
            self.closed.set_result(None)

    def _lose(self, message: str) -> None:
        if not self._broken:
            self._broken = True
            self._client._lost(self, ProtocolError(message))

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        for waiter in self._room:
            if not waiter.done():
                waiter.set_result(None)
        self._room.clear()

    async def drain(self) -> None:
        """Return once the transport has room for more requests (as StreamWriter.drain)."""
        if self._loss is not None:
            raise self._loss
        if self.transport.is_closing():
            await asyncio.sleep(0)  # let the connection's loss be told first
        if self._gone:
            raise ConnectionResetError("Connection lost")
        if not self.paused:
            return
        waiter = self.closed.get_loop().create_future()
        self._room.append(waiter)
        await waiter

    def close(self) -> None:
        """Close the connection; the client is not told (it closed it)."""
        self._broken = True
        self.transport.close()
