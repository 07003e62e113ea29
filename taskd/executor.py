"""The executor: claims due jobs from the store, runs them, and records their outcomes.

It holds no queue of its own. It sleeps until the store nudges it (work added, a slot
freed) or until the next delayed job is due, claims as many jobs as it has free slots,
and reports each outcome back through the store, which fences stale reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import socket
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, Literal

import msgspec

from taskd.definition import Fail, Retry, TaskContext, TaskFailed
from taskd.models import AttemptError, Job, ThreadStats
from taskd.policy import DEFAULT_BACKOFF, DEFAULT_MAX_BACKOFF, backoff_delay
from taskd.protocol import DEFAULT_MAX_FRAME
from taskd.store import Outcome, Store, StoreError
from taskd.submit import JobRequest, Submitter, encode_payload, max_payload_size
from taskd.tasks import Task, TaskRegistry
from taskd.threads import TaskThreads

logger = logging.getLogger(__name__)

CancelReason = Literal["cancel", "shutdown"]
# Told of each attempt as it ends: the job as claimed, and the attempt's outcome.
AttemptObserver = Callable[[Job, Outcome], None]
REPORT_RETRIES = (0.5, 1.0, 2.0, 4.0)  # seconds between attempts to record an outcome
# An attempt's error is kept with the job: its message and traceback are bounded, so that
# a job's errors fit in a reply (the most relevant frames of a traceback are the last).
MAX_ERROR_MESSAGE = 4096
MAX_TRACEBACK = 16384


def worker_id() -> str:
    """This process's name on the leases it takes: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(16):04x}"


class _TimedOut(Exception):
    pass


class _Running:
    __slots__ = ("job", "suspended", "task")

    def __init__(self, job: Job, task: asyncio.Task[None]) -> None:
        self.job = job
        self.task = task
        self.suspended = False


class Executor:
    """Runs claimed jobs: coroutines on the loop, plain functions in a thread pool."""

    def __init__(
        self,
        store: Store,
        registry: Callable[[], TaskRegistry],
        submitter: Submitter,
        *,
        owner: str,
        workers: int,
        lease: float,
        quarantine_after: int,
        max_result: int = max_payload_size(DEFAULT_MAX_FRAME),
        max_stuck_threads: int,
        clock: Callable[[], float] = time.time,
        on_attempt: AttemptObserver | None = None,
    ) -> None:
        self._store = store
        self._on_attempt = on_attempt
        self._max_result = max_result
        self._registry = registry
        self._submitter = submitter
        self.owner = owner
        self.workers = workers
        self._lease = lease
        self._quarantine_after = quarantine_after
        self._clock = clock
        self._running: dict[int, _Running] = {}
        self._busy_by_task: Counter[str] = Counter()
        self._busy = 0
        self._cancelling: dict[int, CancelReason] = {}
        self._stopping = False
        self._closed = asyncio.Event()
        self._threads = TaskThreads(workers, max_stuck_threads)

    # -- the claim loop ------------------------------------------------------------------

    async def run(self, *, until_idle: bool = False) -> None:
        """Claim and start jobs until `stop()`; with `until_idle`, also return once nothing
        is running and nothing is due (the deterministic mode tests use)."""
        claim_failures = 0
        while not self._stopping:
            next_due: float | None = None
            free = self.workers - self._busy
            if free > 0:
                now = self._clock()
                try:
                    claimed = await self._store.claim(
                        self.owner, free, self._task_slots(), now + self._lease, now
                    )
                except StoreError as exc:
                    claim_failures += 1
                    pause = min(2.0**claim_failures, 30.0)
                    logger.error("cannot claim jobs: %s; trying again in %gs", exc, pause)
                    next_due = self._clock() + pause
                else:
                    claim_failures = 0
                    for job in claimed.jobs:
                        self._start(job)
                    next_due = claimed.next_due
                    if len(claimed.jobs) == free:
                        continue
            if until_idle and not self._running and (next_due is None or next_due > self._clock()):
                return
            timeout = None if next_due is None else max(0.0, next_due - self._clock())
            await self._store.events.wait_for_nudge(timeout)

    def _task_slots(self) -> dict[str, int]:
        registry = self._registry()
        return {
            task.name: task.concurrency - self._busy_by_task[task.name]
            for task in registry
            if task.concurrency is not None
        }

    def _start(self, job: Job) -> None:
        handle = asyncio.create_task(self._execute(job), name=f"taskd-job-{job.id}")
        self._running[job.id] = _Running(job, handle)
        self._busy += 1
        self._busy_by_task[job.task] += 1
        self._store.events.changed()

    async def _execute(self, job: Job) -> None:
        try:
            outcome = await self._attempt(job)
            if self._on_attempt is not None:
                self._on_attempt(job, outcome)
            await self._report(job, outcome)
        finally:
            running = self._running.pop(job.id)
            if not running.suspended:
                self._release_slot(job.task)
            self._store.events.nudge()

    def _release_slot(self, task: str) -> None:
        self._busy -= 1
        self._busy_by_task[task] -= 1

    # -- one attempt ---------------------------------------------------------------------

    async def _attempt(self, job: Job) -> Outcome:
        task = self._registry().get(job.task)
        if task is None:
            return self._failure(job, None, "error", f"task {job.task} is not loaded", final=True)
        try:
            payload = task.decode_payload(bytes(job.payload))
        except (msgspec.ValidationError, msgspec.DecodeError, UnicodeError, RecursionError) as exc:
            message = f"payload no longer matches the task's schema: {exc}"
            return self._failure(job, task, "error", message, final=True)
        ctx = TaskContext(job.task, job.id, job.attempts, job.max_attempts, self)
        try:
            result = await self._call(task, payload, ctx)
        except asyncio.CancelledError:
            reason = self._cancelling.pop(job.id, None)
            if reason is None:
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            return self._cancelled(job, reason)
        except _TimedOut:
            return self._failure(job, task, "timeout", f"timed out after {task.timeout:g} s")
        except Fail as exc:
            return self._failure(job, task, "error", _describe(exc), exc=exc, final=True)
        except Retry as exc:
            return self._failure(job, task, "error", _describe(exc), exc=exc, delay=exc.delay)
        except Exception as exc:
            return self._failure(job, task, "error", _describe(exc), exc=exc)
        try:
            encoded = msgspec.msgpack.encode(result)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            message = f"the result ({type(result).__name__}) cannot be encoded: {exc}"
            return self._failure(job, task, "error", message, final=True)
        if len(encoded) > self._max_result:
            message = (
                f"the result of {len(encoded)} bytes is over the limit of {self._max_result} "
                "(a quarter of max_frame_size); return a reference to the data instead"
            )
            return self._failure(job, task, "error", message, final=True)
        return Outcome(job.id, job.epoch, self.owner, "succeeded", self._clock(), result=encoded)

    async def _call(self, task: Task, payload: Any, ctx: TaskContext) -> Any:
        deadline = asyncio.timeout(task.timeout)
        try:
            async with deadline:
                if task.is_async:
                    return await task.call(payload, ctx)
                call = functools.partial(task.call, payload, ctx)
                return await self._threads.run(call, f"job {ctx.job_id} {task.name}")
        except TimeoutError:
            if deadline.expired():  # ours, not a TimeoutError the task raised itself
                raise _TimedOut from None
            raise

    def _cancelled(self, job: Job, reason: CancelReason) -> Outcome:
        now = self._clock()
        if reason == "shutdown":
            logger.info(
                "job %d %s: returned to the queue, the daemon is stopping", job.id, job.task
            )
            return Outcome(job.id, job.epoch, self.owner, "pending", now, run_at=now, release=True)
        error = AttemptError(job.attempts, "cancelled", "cancelled by request", now)
        return Outcome(job.id, job.epoch, self.owner, "cancelled", now, error=error)

    def _failure(
        self,
        job: Job,
        task: Task | None,
        kind: Literal["error", "timeout"],
        message: str,
        *,
        exc: BaseException | None = None,
        final: bool = False,
        delay: float | None = None,
    ) -> Outcome:
        now = self._clock()
        trace = "".join(traceback.format_exception(exc)) if exc is not None else None
        if trace is not None and len(trace) > MAX_TRACEBACK:
            trace = "...\n" + trace[-MAX_TRACEBACK:]
        message = (
            message if len(message) <= MAX_ERROR_MESSAGE else message[:MAX_ERROR_MESSAGE] + "…"
        )
        error = AttemptError(job.attempts, kind, message, now, trace)
        where = f"job {job.id} {job.task} attempt {job.attempts}/{job.max_attempts}"
        if final or task is None or job.attempts >= job.max_attempts:
            logger.error("%s failed: %s%s", where, message, _indent(trace), extra=_fields(job))
            return Outcome(job.id, job.epoch, self.owner, "failed", now, error=error)
        if delay is None:
            delay = backoff_delay(
                job.attempts,
                task.backoff if task.backoff is not None else DEFAULT_BACKOFF,
                task.max_backoff if task.max_backoff is not None else DEFAULT_MAX_BACKOFF,
                random.random(),
            )
        logger.warning(
            "%s failed, retrying in %.1fs: %s%s",
            where,
            delay,
            message,
            _indent(trace),
            extra=_fields(job),
        )
        return Outcome(
            job.id, job.epoch, self.owner, "pending", now, error=error, run_at=now + delay
        )

    async def _report(self, job: Job, outcome: Outcome) -> None:
        for pause in (*REPORT_RETRIES, None):
            try:
                (recorded,) = await self._store.finish([outcome])
            except StoreError as exc:
                if pause is None:
                    logger.error(
                        "job %d %s: cannot record its outcome (%s); its lease will expire and "
                        "it will run again",
                        job.id,
                        job.task,
                        exc,
                    )
                    return
                logger.warning("job %d: recording its outcome failed (%s); retrying", job.id, exc)
                await asyncio.sleep(pause)
                continue
            if recorded is None:
                logger.info(
                    "job %d %s: outcome of attempt %d not recorded, the job was cancelled or "
                    "taken over meanwhile",
                    job.id,
                    job.task,
                    job.attempts,
                )
            return

    # -- control -------------------------------------------------------------------------

    def cancel(self, job_id: int) -> bool:
        """Cancel a job running here; its thread, if it runs in one, is left to finish."""
        running = self._running.get(job_id)
        if running is None:
            return False
        self._cancelling[job_id] = "cancel"
        running.task.cancel()
        return True

    def running_jobs(self) -> list[Job]:
        return [running.job for running in self._running.values()]

    def stop(self) -> None:
        """Claim nothing more; what runs goes on until `drain`."""
        self._stopping = True
        self._store.events.nudge()

    async def drain(self, grace: float) -> None:
        """Wait up to `grace` seconds for running jobs, then cancel them back to pending."""
        self.stop()
        tasks = [running.task for running in self._running.values()]
        if tasks:
            logger.info("waiting up to %gs for %d running jobs", grace, len(tasks))
            await asyncio.wait(tasks, timeout=grace)
        leftover = list(self._running.values())
        for running in leftover:
            self._cancelling[running.job.id] = "shutdown"
            running.task.cancel()
        if leftover:
            await asyncio.wait([running.task for running in leftover])
        self._closed.set()
        self._threads.close()

    def threads_alive(self) -> int:
        """Task threads still running (plain functions that ignored their cancellation)."""
        return self._threads.busy

    def thread_stats(self) -> ThreadStats:
        return self._threads.stats()

    async def keep_leases(self) -> None:
        """Renew our leases and return other workers' expired jobs, until drained."""
        interval = self._lease / 3
        while not self._closed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), interval)
            if self._closed.is_set():
                return
            now = self._clock()
            try:
                await self._store.renew(self.owner, list(self._running), now + self._lease)
                await self._store.recover(now, self._quarantine_after, everything=False)
            except StoreError as exc:
                logger.error("cannot renew job leases: %s", exc)

    # -- what running tasks can ask for (taskd.definition.TaskRuntime) -------------------

    async def run_task(self, parent_id: int, name: str, payload: Any, key: str | None) -> Any:
        request = JobRequest(
            task=name,
            payload=encode_payload(payload),
            origin="task",
            single_flight=True,
            key=key,
            parent_id=parent_id,
        )
        (inserted,) = await self._submitter.submit([request])
        if inserted.job_id == parent_id:
            raise RuntimeError(f"task {name} cannot run_task itself; enqueue it instead")
        with self._suspended(parent_id):
            job = await self._submitter.wait(inserted.job_id)
        if job.status != "succeeded":
            raise TaskFailed(job.id, job.task, job.error or job.status)
        return None if job.result is None else msgspec.msgpack.decode(job.result)

    async def enqueue(
        self, parent_id: int, name: str, payload: Any, options: dict[str, Any]
    ) -> int:
        request = JobRequest(
            task=name,
            payload=encode_payload(payload),
            origin="task",
            parent_id=parent_id,
            **options,
        )
        (inserted,) = await self._submitter.submit([request])
        return inserted.job_id

    @contextlib.contextmanager
    def _suspended(self, job_id: int) -> Iterator[None]:
        """While a job waits for another, its slot is free, so that waiting cannot deadlock."""
        running = self._running.get(job_id)
        if running is None or running.suspended:
            yield
            return
        running.suspended = True
        self._release_slot(running.job.task)
        self._store.events.nudge()
        try:
            yield
        finally:
            running.suspended = False
            self._busy += 1
            self._busy_by_task[running.job.task] += 1


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _fields(job: Job) -> dict[str, object]:
    """The task and job of a log line, for log_format = "json"."""
    return {"task": job.task, "job_id": job.id}


def _indent(trace: str | None) -> str:
    return "" if not trace else "\n" + trace.rstrip()
