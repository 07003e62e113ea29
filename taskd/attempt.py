"""One attempt of a claimed job: its task's function called with its payload and a
TaskContext, under the task's timeout, on the loop (a coroutine) or in a thread (a plain
function); what it returned, or how it failed, as the outcome the store records."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import msgspec

from taskd.definition import Fail, Retry, TaskContext, TaskRuntime
from taskd.failures import describe, failed
from taskd.models import Job
from taskd.output import job_output
from taskd.store import Outcome
from taskd.tasks import Task, TaskRegistry, read_tick
from taskd.threads import TaskThreads

if TYPE_CHECKING:  # OpenTelemetry is imported only where taskd traces
    from taskd.otel import AttemptSpan, Tracing


class _TimedOut(Exception):
    pass


class Attempts:
    """Runs attempts for one worker; a stop (the attempt's cancellation) goes through."""

    def __init__(
        self,
        tasks: TaskRegistry,
        runtime: TaskRuntime,
        threads: TaskThreads,
        *,
        worker: str,
        max_result: int,
        tracing: Tracing | None = None,
    ) -> None:
        self._tasks = tasks
        self._runtime = runtime
        self._threads = threads
        self._worker = worker
        self._max_result = max_result
        self._tracing = tracing

    async def run(self, job: Job) -> Outcome:
        """Run one attempt of `job`; its outcome (asyncio.CancelledError if stopped), with
        the hook its task enqueues should the job end so (never for a hook's own job)."""
        outcome = await (self._run(job, None) if self._tracing is None else self._traced(job))
        task = self._tasks.get(job.task)
        if outcome.status not in ("succeeded", "failed") or task is None or job.origin == "hook":
            return outcome
        if task.on_success is None and task.on_failure is None:
            return outcome  # most tasks: no look for a hook in the registry
        hook = self._tasks.hook(task, outcome.status)
        return outcome if hook is None else msgspec.structs.replace(outcome, hook=hook)

    async def _traced(self, job: Job) -> Outcome:
        """The attempt, in a span of its own when taskd traces."""
        if self._tracing is None:
            return await self._run(job, None)
        span = self._tracing.attempt(job, self._worker)
        try:
            with span.current():
                outcome = await self._run(job, span)
        except BaseException:
            span.stopped()
            raise
        span.ended(outcome)
        return outcome

    async def _run(self, job: Job, span: AttemptSpan | None) -> Outcome:
        task = self._tasks.get(job.task)
        if task is None:
            return self._failed(job, None, f"task {job.task} is not loaded", final=True)
        tick = read_tick(bytes(job.payload)) if job.origin == "schedule" else None
        try:
            payload = task.decode_payload(bytes(job.payload), tick=tick is not None)
        except (msgspec.ValidationError, msgspec.DecodeError, UnicodeError, RecursionError) as exc:
            message = f"payload no longer matches the task's schema: {exc}"
            return self._failed(job, task, message, final=True)
        ctx = TaskContext(job.task, job.id, job.attempts, job.max_attempts, self._runtime)
        ctx.traceparent = span.traceparent if span is not None else job.traceparent
        if tick is not None:
            ctx.scheduled_time, ctx.cron = tick.scheduled_time, tick.cron
        try:
            # The job's logger is made only if the job writes something.
            with job_output(lambda level, line: ctx.logger.log(level, line)):
                result = await self._call(task, payload, ctx)
        except _TimedOut:
            message = f"timed out after {task.timeout:g} s"
            return failed(job, task, "timeout", message, worker=self._worker)
        except Exception as exc:
            if span is not None:
                span.caught(exc)
            if isinstance(exc, Fail):
                return self._failed(job, task, describe(exc), exc=exc, final=True)
            if isinstance(exc, Retry):
                return self._failed(job, task, describe(exc), exc=exc, delay=exc.delay)
            return self._failed(job, task, describe(exc), exc=exc)
        try:
            encoded = msgspec.msgpack.encode(result)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            message = f"the result ({type(result).__name__}) cannot be encoded: {exc}"
            return self._failed(job, task, message, final=True)
        if len(encoded) > self._max_result:
            message = (
                f"the result of {len(encoded)} bytes is over the limit of {self._max_result} "
                "(a quarter of max_frame_size); return a reference to the data instead"
            )
            return self._failed(job, task, message, final=True)
        return Outcome(job.id, job.epoch, self._worker, "succeeded", result=encoded, job=job)

    def _failed(
        self,
        job: Job,
        task: Task | None,
        message: str,
        *,
        exc: BaseException | None = None,
        final: bool = False,
        delay: float | None = None,
    ) -> Outcome:
        return failed(
            job, task, "error", message, worker=self._worker, exc=exc, final=final, delay=delay
        )

    def _call(self, task: Task, payload: Any, ctx: TaskContext) -> Awaitable[Any]:
        if task.timeout is None:
            return self._invoke(task, payload, ctx)
        return self._within(task, task.timeout, payload, ctx)

    async def _within(self, task: Task, timeout: float, payload: Any, ctx: TaskContext) -> Any:
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                return await self._invoke(task, payload, ctx)
        except TimeoutError:
            if deadline.expired():  # ours, not a TimeoutError the task raised itself
                raise _TimedOut from None
            raise

    def _invoke(self, task: Task, payload: Any, ctx: TaskContext) -> Awaitable[Any]:
        """The task's function: a coroutine on the loop, a plain function in a thread (in a
        copy of the context: what it prints is the job's too). Called, and awaited, within
        the job's output (`_run`): a coroutine of its own would cost each attempt a frame."""
        if task.is_async:
            result: Awaitable[Any] = task.call(payload, ctx)
            return result
        call = functools.partial(contextvars.copy_context().run, task.call, payload, ctx)
        return self._threads.run(call, f"job {ctx.job_id} {task.name}")
