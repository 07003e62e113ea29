"""`AsyncClient`: the asyncio client of taskd; calls may run concurrently on one connection."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import msgspec

from taskctl.client import (
    CLIENT_MAX_FRAME,
    CLIENT_NAME,
    decode_result,
    encode_payload,
    enqueue_params,
    jobs_params,
    request_limit,
    seconds,
    shorter,
    timed_out,
    unavailable,
)
from taskctl.errors import JobFailed, ProtocolError, TaskdError
from taskd.models import Job, JobLogs, ScheduleInfo, Status, TaskInfo
from taskd.protocol import (
    HEADER,
    PROTOCOL_VERSION,
    CancelParams,
    EnqueueManyParams,
    EnqueueManyResult,
    EnqueueParams,
    EnqueueResult,
    HelloParams,
    HelloResult,
    JobParams,
    ListTasksParams,
    LogsParams,
    MetricsParams,
    Params,
    PauseScheduleParams,
    PruneParams,
    PruneResult,
    ReloadParams,
    ReloadResult,
    Request,
    ResumeScheduleParams,
    RetryParams,
    RunParams,
    RunResult,
    SchedulesParams,
    StatusParams,
    TriggerScheduleParams,
    WaitParams,
    WhyParams,
    WhyResult,
    client_socket_path,
    encode_frame,
)

_id_decoder = msgspec.msgpack.Decoder(dict[str, Any])


class AsyncClient:
    """An asyncio connection to taskd. `async with AsyncClient() as client: ...`

    `timeout` limits the wait for each answer as in `Client`; then RequestTimeout.
    """

    def __init__(self, socket_path: str | None = None, *, timeout: float | None = None) -> None:
        self.socket_path = socket_path or client_socket_path()
        self._timeout = timeout
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[int, tuple[str, asyncio.Future[Any]]] = {}
        self._next_id = 1
        self._connecting = asyncio.Lock()
        self.server: HelloResult | None = None

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> HelloResult:
        """Connect and say hello; other methods do this on first use."""
        return await self._connect(self._timeout)

    async def _connect(self, limit: float | None) -> HelloResult:
        async with self._connecting:
            if self.server is not None and self._writer is not None:
                return self.server
            if self._writer is not None:
                self._writer.close()  # taskd closed it (idle_timeout); a new one does as well
            try:
                async with asyncio.timeout(limit):
                    reader, writer = await asyncio.open_unix_connection(self.socket_path)
            except TimeoutError:
                raise timed_out(self.socket_path, "connect", limit or 0.0) from None
            except OSError as exc:
                raise unavailable(self.socket_path, exc) from None
            self._writer = writer
            self._reader_task = asyncio.create_task(self._read_replies(reader))
            hello = HelloParams(protocol=PROTOCOL_VERSION, client=CLIENT_NAME)
            try:
                result: HelloResult = await self._send("hello", hello, limit)
            except BaseException:
                await self.close()  # no half-open connection left behind
                raise
            self.server = result
            return result

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._reader_task is not None:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)
            self._reader_task = None
        self._fail_pending(ProtocolError("the client was closed"))
        self.server = None

    async def call(self, method: str, params: Params) -> Any:
        """Send one request and await its result; raises TaskdError subclasses."""
        limit = request_limit(params, self._timeout)
        if self.server is None:
            await self._connect(shorter(self._timeout, limit))
        return await self._send(method, params, limit)

    async def _send(self, method: str, params: Params, limit: float | None) -> Any:
        writer = self._writer
        if writer is None:
            raise ProtocolError("not connected")
        request_id = self._next_id
        self._next_id += 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (method, future)
        raw = msgspec.Raw(msgspec.msgpack.encode(params))
        try:
            async with asyncio.timeout(limit):
                writer.write(encode_frame(Request(request_id, method, raw)))
                await writer.drain()
                return await future
        except TimeoutError:
            raise timed_out(self.socket_path, method, limit or 0.0) from None
        finally:
            self._pending.pop(request_id, None)

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
                if size > CLIENT_MAX_FRAME:
                    raise ProtocolError(f"taskd announced a reply of {size} bytes; refusing it")
                body = await reader.readexactly(size)
                self._deliver(body)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self._fail_pending(ProtocolError(f"connection to taskd lost: {exc}"))
        except TaskdError as exc:
            self._fail_pending(exc)
        finally:
            self.server = None

    def _deliver(self, body: bytes) -> None:
        try:
            request_id = _id_decoder.decode(body).get("id")
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ProtocolError(f"taskd sent a reply this client cannot read: {exc}") from None
        if request_id is None:  # an error about the whole connection: this raises it
            decode_result("hello", body, None)
            return
        entry = self._pending.get(request_id)
        if entry is None:
            return
        method, future = entry
        if future.done():
            return
        try:
            future.set_result(decode_result(method, body, request_id))
        except TaskdError as exc:
            future.set_exception(exc)

    def _fail_pending(self, exc: TaskdError) -> None:
        for _, future in self._pending.values():
            if not future.done():
                future.set_exception(exc)

    # -- one method per call (the same as Client's) ----------------------------------------

    async def list_tasks(self) -> list[TaskInfo]:
        result: list[TaskInfo] = await self.call("list_tasks", ListTasksParams())
        return result

    async def run(
        self,
        task: str,
        payload: Any = None,
        *,
        key: str | None = None,
        max_attempts: int | None = None,
    ) -> Any:
        """Run (or join) the task, wait, and return its result; raises JobFailed if it fails."""
        outcome = await self.run_job(task, payload, key=key, max_attempts=max_attempts)
        if outcome.job.status != "succeeded":
            raise JobFailed(outcome.job)
        return outcome.job.result

    async def run_job(
        self,
        task: str,
        payload: Any = None,
        *,
        key: str | None = None,
        max_attempts: int | None = None,
        detach: bool = False,
    ) -> RunResult:
        params = RunParams(task, encode_payload(payload), key, detach, max_attempts)
        result: RunResult = await self.call("run", params)
        return result

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
    ) -> EnqueueResult:
        params = enqueue_params(
            task,
            payload,
            delay=delay,
            run_at=run_at,
            priority=priority,
            max_attempts=max_attempts,
            key=key,
        )
        result: EnqueueResult = await self.call("enqueue", params)
        return result

    async def enqueue_many(self, jobs: list[EnqueueParams]) -> list[EnqueueResult]:
        result: EnqueueManyResult = await self.call("enqueue_many", EnqueueManyParams(jobs))
        return result.jobs

    async def job(self, job_id: int) -> Job:
        result: Job = await self.call("job", JobParams(job_id))
        return result

    async def jobs(
        self,
        *,
        status: list[str] | None = None,
        task: str | None = None,
        limit: int = 50,
        payloads: bool = False,
    ) -> list[Job]:
        """Recent jobs, newest first; their payload and result only with `payloads`."""
        result: list[Job] = await self.call("jobs", jobs_params(status, task, limit, payloads))
        return result

    async def wait(self, job_id: int, timeout: float | str | None = None) -> Job:
        result: Job = await self.call("wait", WaitParams(job_id, seconds(timeout)))
        return result

    async def why(self, job_id: int) -> WhyResult:
        """Why the job is not running yet (or what it is doing), and its timeline."""
        result: WhyResult = await self.call("why", WhyParams(job_id))
        return result

    async def cancel(self, job_id: int) -> Job:
        result: Job = await self.call("cancel", CancelParams(job_id))
        return result

    async def retry(self, job_id: int) -> Job:
        result: Job = await self.call("retry", RetryParams(job_id))
        return result

    async def status(self) -> Status:
        result: Status = await self.call("status", StatusParams())
        return result

    async def prune(self, older_than: float | str | None = None) -> int:
        result: PruneResult = await self.call("prune", PruneParams(seconds(older_than)))
        return result.deleted

    async def reload(self) -> ReloadResult:
        result: ReloadResult = await self.call("reload", ReloadParams())
        return result

    async def schedules(self) -> list[ScheduleInfo]:
        """Every schedule with its next and last tick, last outcome and coalesced count."""
        result: list[ScheduleInfo] = await self.call("schedules", SchedulesParams())
        return result

    async def pause_schedule(self, schedule: str) -> ScheduleInfo:
        """Stop a schedule (by id, or by its cron expression) ticking until resumed."""
        result: ScheduleInfo = await self.call("pause_schedule", PauseScheduleParams(schedule))
        return result

    async def resume_schedule(self, schedule: str) -> ScheduleInfo:
        """Let a paused schedule tick again from now (missed ticks are not caught up)."""
        result: ScheduleInfo = await self.call("resume_schedule", ResumeScheduleParams(schedule))
        return result

    async def trigger_schedule(self, schedule: str) -> ScheduleInfo:
        """Fire a schedule now; `last_jobs` of the result are the jobs it started or joined."""
        result: ScheduleInfo = await self.call("trigger_schedule", TriggerScheduleParams(schedule))
        return result

    async def logs(self, job_id: int) -> JobLogs:
        """The lines the job wrote with `ctx.logger` that are kept, oldest first."""
        result: JobLogs = await self.call("logs", LogsParams(job_id))
        return result

    async def metrics(self) -> str:
        """The Prometheus exposition of the daemon (text format), as `GET /metrics` gives it."""
        result: str = await self.call("metrics", MetricsParams())
        return result
