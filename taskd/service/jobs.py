"""The methods on jobs: run and enqueue them, read them, wait for them, cancel and retry
them, and read their logs."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence

from taskd import protocol
from taskd.activity import ActivityRecorder
from taskd.deferred import Deferred
from taskd.models import BatchInfo, Job, JobLogs
from taskd.protocol import (
    HELD_REASONS,
    BatchParams,
    CancelParams,
    EnqueueManyParams,
    EnqueueManyResult,
    EnqueueParams,
    EnqueueResult,
    ErrorCode,
    JobParams,
    JobsParams,
    LogsParams,
    RetryParams,
    RpcError,
    RunParams,
    RunResult,
    WaitParams,
    WhyParams,
    WhyResult,
)
from taskd.service.dispatch import Binding, bind, bind_at_once
from taskd.store import Inserted, JobFilter, JobNotFound, Store
from taskd.submit import JobRequest, Submitter, UnknownTask
from taskd.tasks import TaskRegistry


async def get_job(store: Store, job_id: int) -> Job:
    """The job; JobNotFound if there is none."""
    job = await store.get(job_id)
    if job is None:
        raise JobNotFound(job_id)
    return job


class JobMethods:
    """Jobs, over the store and the submitter; the logs of jobs running here come from
    their activity recorder until they are written."""

    def __init__(
        self,
        store: Store,
        submitter: Submitter,
        tasks: TaskRegistry,
        activity: ActivityRecorder,
        why: Callable[[WhyParams], Awaitable[WhyResult]] | None = None,
    ) -> None:
        self._store = store
        self._submitter = submitter
        self._tasks = tasks
        self._activity = activity
        self._why = why  # what holds a detached run's pending job (the `why` method)
        # The outcomes of the runs waiting for a job's end, by job id (see `start_run`).
        self._ends: dict[int, tuple[Deferred[RunResult], Deferred[RunResult]]] = {}

    def bindings(self) -> list[Binding]:
        return [
            bind(protocol.RUN, self.start_run),
            bind_at_once(protocol.ENQUEUE, self.enqueue),
            bind_at_once(protocol.ENQUEUE_MANY, self.enqueue_many),
            bind(protocol.BATCH, self.batch),
            bind(protocol.JOB, self.job),
            bind(protocol.JOBS, self.jobs),
            bind(protocol.WAIT, self.wait),
            bind(protocol.CANCEL, self.cancel),
            bind(protocol.RETRY, self.retry),
            bind(protocol.LOGS, self.logs),
        ]

    async def run(self, params: RunParams) -> RunResult:
        """The run's outcome once its job has ended (with `detach`, once it is stored)."""
        outcome = await self.start_run(params)
        return await outcome.result() if isinstance(outcome, Deferred) else outcome

    async def start_run(self, params: RunParams) -> RunResult | Deferred[RunResult]:
        """Start (or join) the run; its outcome, Deferred to its job's end unless detached.

        Every caller of one job here shares one wait for its end, and one Deferred outcome
        per kind (the caller that started it, the callers that joined it): the control
        server answers them all from one callback."""
        request = JobRequest(
            task=params.task,
            payload=bytes(params.payload),
            origin="run",
            single_flight=True,
            key=params.key,
            max_attempts=params.max_attempts,
            traceparent=params.traceparent,
        )
        inserted, started = await self._submitter.submit_run(request)
        if params.detach:
            # The job as its insert's commit started it, else as the store has it now.
            job = started if started is not None else await get_job(self._store, inserted.job_id)
            if job.status != "pending" or self._why is None:
                return RunResult(job=job, joined=inserted.duplicate, held=None)
            why = await self._why(WhyParams(job.id))
            held = why.message if why.reason in HELD_REASONS else None
            return RunResult(job=job, joined=inserted.duplicate, held=held)
        return self._end_of(inserted.job_id)[inserted.duplicate]

    def _end_of(self, job_id: int) -> tuple[Deferred[RunResult], Deferred[RunResult]]:
        """The outcomes of the job's runs: for the caller that started it, for those that
        joined it. The first caller starts the one wait for its end."""
        ends = self._ends.get(job_id)
        if ends is None:
            loop = asyncio.get_running_loop()
            ends = self._ends[job_id] = (
                Deferred(loop.create_future()),
                Deferred(loop.create_future()),
            )
            waiting = asyncio.ensure_future(self._submitter.wait(job_id))
            waiting.add_done_callback(functools.partial(self._ended, job_id))
        return ends

    def _ended(self, job_id: int, waiting: asyncio.Future[Job]) -> None:
        """The wait for the job's end is over: its outcomes are known (or its error)."""
        ends = self._ends.pop(job_id)
        for joined, end in enumerate(ends):
            if waiting.cancelled():
                end.future.cancel()
            elif (error := waiting.exception()) is not None:
                end.future.set_exception(error)
                end.future.exception()  # retrieved: it is each waiting caller's to report
            else:
                end.future.set_result(
                    RunResult(job=waiting.result(), joined=bool(joined), held=None)
                )

    # Enqueues are answered at once (bind_at_once): refused now, or submitted now and
    # answered from their commit's future, with no task per request.

    def enqueue(self, params: EnqueueParams) -> Deferred[EnqueueResult]:
        return Deferred(self._submitter.enqueue([_job_request(params)]), _enqueued_one)

    def enqueue_many(self, params: EnqueueManyParams) -> Deferred[EnqueueManyResult]:
        requests = self._requests(params.jobs)
        if params.on_finish is None:
            inserted = self._submitter.enqueue(requests, numbered=True)
            return Deferred(inserted, _enqueued_many)
        batch = self._submitter.submit_batch(requests, params.on_finish)
        return Deferred(batch, _enqueued_batch)

    async def batch(self, params: BatchParams) -> BatchInfo:
        info = await self._store.batch(params.id)
        if info is None:
            raise RpcError(ErrorCode.UNKNOWN_JOB, f"no batch with id {params.id}")
        return info

    @staticmethod
    def _requests(jobs: Sequence[EnqueueParams]) -> list[JobRequest]:
        return [_job_request(p) for p in jobs]

    async def job(self, params: JobParams) -> Job:
        return await get_job(self._store, params.id)

    async def logs(self, params: LogsParams) -> JobLogs:
        """The lines kept of a job, with those of a job running here not yet written."""
        unwritten = self._activity.pending_lines(params.id)
        logs = await self._store.job_logs(params.id)
        if logs is None:
            raise JobNotFound(params.id)
        if unwritten:
            kept = {(line.epoch, line.seq) for line in logs.lines}
            extra = [line for line in unwritten if (line.epoch, line.seq) not in kept]
            logs = JobLogs(params.id, logs.lines + extra, logs.dropped)
        return logs

    async def jobs(self, params: JobsParams) -> list[Job]:
        query = JobFilter(
            statuses=params.status,
            task=params.task,
            limit=params.limit,
            origin=params.origin,
            key=params.key,
            before=params.before,
            since=params.since,
            until=params.until,
            text=params.text,
        )
        jobs = await self._store.list_jobs(query)
        if not jobs and params.task is not None and params.task not in self._tasks:
            raise UnknownTask(params.task, self._tasks.names())  # a typo, not "no jobs"
        if not params.payloads:
            for job in jobs:
                job.payload = job.result = None
        return jobs

    async def wait(self, params: WaitParams) -> Job:
        try:
            return await self._submitter.wait(params.id, params.timeout, params.after_attempt)
        except TimeoutError:
            job = await get_job(self._store, params.id)
            raise RpcError(
                ErrorCode.TIMEOUT,
                f"job {params.id} is still {job.status} after {params.timeout:g}s",
                {"status": job.status},
            ) from None

    async def cancel(self, params: CancelParams) -> Job:
        # The store tells whichever daemon runs the job to stop it.
        return await self._store.cancel(params.id)

    async def retry(self, params: RetryParams) -> Job:
        return await self._store.retry(params.id)


def _job_request(p: EnqueueParams) -> JobRequest:
    return JobRequest(
        task=p.task,
        payload=bytes(p.payload),
        origin="enqueue",
        delay=p.delay,
        run_at=p.run_at,
        priority=p.priority,
        max_attempts=p.max_attempts,
        key=p.key,
        unique_for=p.unique_for,
        debounce=p.debounce,
        max_wait=p.max_wait,
        traceparent=p.traceparent,
        after=tuple(p.after),
        after_failure=p.after_failure,
    )


def _enqueued(inserted: list[Inserted]) -> list[EnqueueResult]:
    return [EnqueueResult(i.job_id, i.duplicate) for i in inserted]


def _enqueued_one(inserted: list[Inserted]) -> EnqueueResult:
    (one,) = inserted  # an enqueue's reply: in a few frames fewer than `_enqueued`'s
    return EnqueueResult(one.job_id, one.duplicate)


def _enqueued_many(inserted: list[Inserted]) -> EnqueueManyResult:
    return EnqueueManyResult(_enqueued(inserted))


def _enqueued_batch(batch: tuple[int, list[Inserted]]) -> EnqueueManyResult:
    batch_id, inserted = batch
    return EnqueueManyResult(_enqueued(inserted), batch_id)
