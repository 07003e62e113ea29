"""What each control method does, over the store, the tasks, the submitter and the scheduler.

Domain exceptions become error replies with stable codes here, and nowhere else.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from taskd.config import Retention
from taskd.logqueue import dropped_lines
from taskd.models import (
    FINISHED_STATUSES,
    ConnectionStats,
    HttpStats,
    Job,
    JobLogs,
    JobStatus,
    LogLine,
    Peer,
    Status,
    TaskInfo,
    ThreadStats,
    WorkerSlots,
)
from taskd.protocol import (
    MAX_LIST,
    CancelParams,
    EnqueueManyParams,
    EnqueueManyResult,
    EnqueueParams,
    EnqueueResult,
    ErrorCode,
    JobParams,
    JobsParams,
    ListTasksParams,
    LogsParams,
    MetricsParams,
    Params,
    PauseScheduleParams,
    PruneParams,
    PruneResult,
    ReloadParams,
    ReloadResult,
    ResumeScheduleParams,
    RetryParams,
    RpcError,
    RunParams,
    RunResult,
    SchedulesParams,
    StatusParams,
    TriggerScheduleParams,
    WaitParams,
    WhyParams,
    WhyResult,
)
from taskd.scheduler import AmbiguousSchedule, Scheduler, UnknownSchedule
from taskd.store import InvalidTransition, JobFilter, JobNotFound, Store, StoreError
from taskd.submit import (
    JobRequest,
    PayloadInvalid,
    Refused,
    Submitter,
    UnknownTask,
)
from taskd.tasks import Task, TaskRegistry
from taskd.why import Facts, explain


class DaemonInfo(msgspec.Struct, frozen=True):
    node: str
    version: str
    pid: int
    started_at: float
    database: str
    socket: str
    tasks_dir: str
    workers: int


class Slots(msgspec.Struct, frozen=True):
    """This daemon's workers: how many are busy, and whether it is stopping; its worker id
    in the store, the jobs it runs, and those it holds that do not run (WorkerSlots)."""

    busy: int
    workers: int
    stopping: bool
    worker: str | None = None
    running: frozenset[int] = frozenset()
    claimed_ahead: int = 0
    ending: int = 0


class Service:
    """The control methods; `handle` is the control server's handler."""

    def __init__(
        self,
        *,
        store: Store,
        registry: Callable[[], TaskRegistry],
        submitter: Submitter,
        info: DaemonInfo,
        retention: Callable[[], Retention],
        reload: Callable[[], Awaitable[ReloadResult]],
        scheduler: Scheduler,
        connections: Callable[[], ConnectionStats | None] = lambda: None,
        http: Callable[[], HttpStats | None] = lambda: None,
        threads: Callable[[], ThreadStats | None] = lambda: None,
        metrics: Callable[[], Awaitable[str]] | None = None,
        slots: Callable[[], Slots] | None = None,
        clock: Callable[[], float] = time.time,
        unwritten_lines: Callable[[int], list[LogLine]] = lambda job_id: [],
    ) -> None:
        self._unwritten_lines = unwritten_lines
        self._store = store
        self._registry = registry
        self._submitter = submitter
        self._info = info
        self._retention = retention
        self._reload = reload
        self._scheduler = scheduler
        self._connections = connections
        self._http = http
        self._threads = threads
        self._metrics = metrics
        self._slots = slots
        self._clock = clock

    async def handle(self, method: str, params: Params, peer: Peer) -> Any:
        try:
            return await self._dispatch(params, peer)
        except Refused as exc:
            raise _refusal(exc) from None
        except UnknownSchedule as exc:
            data = {"schedule": exc.reference}
            raise RpcError(ErrorCode.UNKNOWN_SCHEDULE, str(exc), data) from None
        except AmbiguousSchedule as exc:
            raise RpcError(ErrorCode.INVALID_PARAMS, str(exc)) from None
        except JobNotFound as exc:
            raise RpcError(ErrorCode.UNKNOWN_JOB, str(exc), {"id": exc.job_id}) from None
        except InvalidTransition as exc:
            raise RpcError(ErrorCode.CONFLICT, str(exc)) from None
        except StoreError as exc:
            raise RpcError(ErrorCode.STORE_ERROR, str(exc)) from None

    async def _dispatch(self, params: Params, peer: Peer) -> Any:
        match params:
            case ListTasksParams():
                return self.list_tasks()
            case RunParams():
                return await self.run(params)
            case EnqueueParams():
                (result,) = await self.enqueue([params])
                return result
            case EnqueueManyParams():
                return EnqueueManyResult(await self.enqueue(params.jobs, numbered=True))
            case LogsParams():
                return await self.logs(params.id)
            case JobParams():
                return await self.job(params.id)
            case JobsParams():
                return await self.jobs(params)
            case WaitParams():
                return await self.wait(params)
            case CancelParams():
                return await self.cancel(params.id)
            case RetryParams():
                return await self._store.retry(params.id)
            case StatusParams():
                return await self.status()
            case PruneParams():
                return await self.prune(params)
            case ReloadParams():
                return await self._reload()
            case SchedulesParams():
                return await self._scheduler.schedules()
            case PauseScheduleParams():
                return await self._scheduler.pause(params.schedule)
            case ResumeScheduleParams():
                return await self._scheduler.resume(params.schedule)
            case TriggerScheduleParams():
                return await self._scheduler.trigger(params.schedule)
            case WhyParams():
                return await self.why(params.id)
            case MetricsParams() if self._metrics is not None:
                return await self._metrics()
        raise RpcError(ErrorCode.UNKNOWN_METHOD, f"no handler for {type(params).__name__}")

    def task(self, name: str) -> Task | None:
        """The loaded task of that name, if any."""
        return self._registry().get(name)

    def list_tasks(self) -> list[TaskInfo]:
        schedules = self._scheduler.task_schedules()
        return [task.info(*schedules.get(task.name, ([], None))) for task in self._registry()]

    async def run(self, params: RunParams) -> RunResult:
        request = JobRequest(
            task=params.task,
            payload=bytes(params.payload),
            origin="run",
            single_flight=True,
            key=params.key,
            max_attempts=params.max_attempts,
        )
        (inserted,) = await self._submitter.submit([request])
        if params.detach:
            job = await self.job(inserted.job_id)
        else:
            job = await self._submitter.wait(inserted.job_id)
        return RunResult(job=job, joined=inserted.duplicate)

    async def enqueue(
        self, jobs: list[EnqueueParams], *, numbered: bool = False
    ) -> list[EnqueueResult]:
        requests = [
            JobRequest(
                task=p.task,
                payload=bytes(p.payload),
                origin="enqueue",
                delay=p.delay,
                run_at=p.run_at,
                priority=p.priority,
                max_attempts=p.max_attempts,
                key=p.key,
            )
            for p in jobs
        ]
        inserted = await self._submitter.submit(requests, numbered=numbered)
        return [EnqueueResult(i.job_id, i.duplicate) for i in inserted]

    async def job(self, job_id: int) -> Job:
        job = await self._store.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    async def logs(self, job_id: int) -> JobLogs:
        """The lines kept of a job, with those of a job running here not yet written."""
        unwritten = self._unwritten_lines(job_id)
        logs = await self._store.job_logs(job_id)
        if logs is None:
            raise JobNotFound(job_id)
        if unwritten:
            kept = {(line.epoch, line.seq) for line in logs.lines}
            extra = [line for line in unwritten if (line.epoch, line.seq) not in kept]
            logs = JobLogs(job_id, logs.lines + extra, logs.dropped)
        return logs

    async def jobs(self, params: JobsParams) -> list[Job]:
        query = JobFilter(statuses=params.status, task=params.task, limit=params.limit)
        jobs = await self._store.list_jobs(query)
        registry = self._registry()
        if not jobs and params.task is not None and registry.get(params.task) is None:
            raise UnknownTask(params.task, registry.names())  # a typo, not "no jobs"
        if not params.payloads:
            for job in jobs:
                job.payload = job.result = None
        return jobs

    async def wait(self, params: WaitParams) -> Job:
        try:
            return await self._submitter.wait(params.id, params.timeout, params.after_attempt)
        except TimeoutError:
            job = await self.job(params.id)
            raise RpcError(
                ErrorCode.TIMEOUT,
                f"job {params.id} is still {job.status} after {params.timeout:g}s",
                {"status": job.status},
            ) from None

    async def why(self, job_id: int) -> WhyResult:
        """Why the job is not running yet, or what it is doing; and its timeline."""
        job = await self.job(job_id)
        task = self._registry().get(job.task)
        running = 0
        if job.status == "pending" and task is not None and task.concurrency is not None:
            counts = {entry.task: entry.counts for entry in await self._store.counts()}
            running = counts.get(job.task, {}).get("running", 0)
        slots = self._slots() if self._slots is not None else Slots(0, self._info.workers, False)
        facts = Facts(
            now=self._clock(),
            task_loaded=task is not None,
            concurrency=task.concurrency if task is not None else None,
            task_running=running,
            busy=slots.busy,
            workers=slots.workers,
            stopping=slots.stopping,
        )
        return explain(job, facts)

    async def cancel(self, job_id: int) -> Job:
        # The store tells whichever daemon runs the job to stop it.
        return await self._store.cancel(job_id)

    async def status(self) -> Status:
        """This daemon, and the store as a whole: every node, every running job."""
        now = self._clock()
        per_task = await self._store.counts()
        totals: dict[str, int] = {}
        for entry in per_task:
            for status, count in entry.counts.items():
                totals[status] = totals.get(status, 0) + count
        ages = [t.oldest_pending_age for t in per_task if t.oldest_pending_age is not None]
        due = [t.next_due_at for t in per_task if t.next_due_at is not None]
        info = self._info
        running = await self._store.list_jobs(JobFilter(statuses=["running"], limit=MAX_LIST))
        slots = self._slots() if self._slots is not None else None
        if slots is not None:
            # Of this daemon's jobs, those that run now: the store also counts as running
            # those claimed ahead and those whose outcome is being written.
            running = [j for j in running if j.worker != slots.worker or j.id in slots.running]
        return Status(
            version=info.version,
            pid=info.pid,
            started_at=info.started_at,
            uptime=now - info.started_at,
            database=info.database,
            socket=info.socket,
            tasks_dir=info.tasks_dir,
            workers=info.workers,
            counts=totals,
            running=running,
            tasks=per_task,
            oldest_pending_age=max(ages) if ages else None,
            next_due_at=min(due) if due else None,
            node=info.node,
            nodes=await self._store.nodes(),
            connections=self._connections(),
            http=self._http(),
            threads=self._threads(),
            slots=(
                None
                if slots is None
                else WorkerSlots(slots.busy, slots.claimed_ahead, slots.ending)
            ),
            store_failing=self._store.health.report(),
            log_dropped=dropped_lines(),
        )

    async def healthy(self) -> None:
        """Return if the job store answers a cheap read and its writes go through; raise
        StoreError if not."""
        if (failing := self._store.health.report()) is not None:
            raise StoreError(failing.error)
        await self._store.queue_depth()

    async def prune(self, params: PruneParams) -> PruneResult:
        if params.older_than is not None:
            ages: dict[JobStatus, float] = dict.fromkeys(FINISHED_STATUSES, params.older_than)
        else:
            ages = retention_ages(self._retention())
        return PruneResult(deleted=await self._store.prune(ages))


def _refusal(exc: Refused) -> RpcError:
    """The error reply for a request the submitter refused."""
    data: dict[str, Any] = {} if exc.index is None else {"index": exc.index}
    if isinstance(exc, UnknownTask):
        return RpcError(ErrorCode.UNKNOWN_TASK, str(exc), {"task": exc.name, **data})
    code = (
        ErrorCode.PAYLOAD_INVALID if isinstance(exc, PayloadInvalid) else ErrorCode.INVALID_PARAMS
    )
    return RpcError(code, str(exc), data or None)


def retention_ages(retention: Retention) -> dict[JobStatus, float]:
    """Finished jobs older than these many seconds are pruned."""
    return {
        "succeeded": retention.succeeded,
        "failed": retention.failed,
        "cancelled": retention.cancelled,
    }
