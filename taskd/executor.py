"""The executor: claims due jobs for this daemon's worker, runs them, records their outcomes.

A pipeline, driven by one loop (`run`): an attempt frees its slot the moment it ends and
leaves its outcome to the loop, which records every outcome that has come in and claims
the next jobs in one store call (one transaction), so that workers never wait for a commit
of their own. The loop claims a few jobs ahead of the free slots (they wait, leased to this
worker, in `ready`), so that a slot that frees is filled at once; it sleeps until outcomes
come in, or a slot is free and the store says work is due (or the next delayed job's time
comes). The store fences stale reports. The executor keeps its worker's heartbeat and
leases, stops the jobs the store says it lost (cancelled, or taken over), and takes back
the jobs of workers that went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import heapq
import logging
import os
import random
import traceback
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import msgspec

from taskd.activity import ActivityRecorder
from taskd.definition import Fail, Retry, TaskContext
from taskd.models import Job, ThreadStats, counted, cut_utf8
from taskd.output import job_output
from taskd.policy import DEFAULT_BACKOFF, DEFAULT_MAX_BACKOFF, backoff_delay
from taskd.protocol import DEFAULT_MAX_FRAME
from taskd.runtime import Runtime
from taskd.store import Claimed, ClaimRequest, Failure, Outcome, Store, StoreError
from taskd.submit import Submitter, max_payload_size
from taskd.tasks import Task, TaskRegistry, read_tick
from taskd.threads import TaskThreads

logger = logging.getLogger(__name__)

# Why the executor stops a job: it was cancelled, the store says this worker lost it
# (taken over after its lease expired), or the daemon stops.
StopReason = Literal["cancelled", "lost", "shutdown"]
# How an attempt ended, as an observer (the metrics) is told: its outcome's status, or why
# it was stopped.
AttemptEnd = Literal["succeeded", "failed", "retry", "released", "cancelled", "lost"]
AttemptObserver = Callable[[Job, AttemptEnd], None]
MAX_PAUSE = 30.0  # seconds at most between tries while the store fails
SHORT_JOB = 0.02  # seconds: attempts shorter than this on average are claimed ahead
# Each claim waits busy_timeout for a lock: one that fails is more than a passing lock, and
# this many in a row (with the pauses between them, 2 s, then 4 s) mean the store cannot hand
# out jobs for now; callers waiting for jobs are told so then, and at each failure after.
CLAIM_FAILURES_BEFORE_TELLING_WAITERS = 3
# An attempt's error is kept with the job: its message and traceback are bounded, so that
# a job's errors fit in a reply (the most relevant frames of a traceback are the last).
MAX_ERROR_MESSAGE = 4096  # bytes of UTF-8
MAX_TRACEBACK = 16384  # bytes of UTF-8: its last ones


class _TimedOut(Exception):
    pass


class _Running:
    """A job running here: its asyncio task, whether it waits for another job (then it
    holds no slot), and whether its outcome is being recorded (then it is not stopped)."""

    __slots__ = ("job", "reporting", "stopped", "task", "waiting")

    def __init__(self, job: Job, task: asyncio.Task[None]) -> None:
        self.job = job
        self.task = task
        self.waiting = False
        self.reporting = False
        self.stopped: StopReason | None = None


class Executor:
    """Runs claimed jobs: coroutines on the loop, plain functions in a thread pool."""

    def __init__(
        self,
        store: Store,
        registry: Callable[[], TaskRegistry],
        submitter: Submitter,
        *,
        worker: str,
        workers: int,
        lease: float,
        quarantine_after: int,
        max_result: int = max_payload_size(DEFAULT_MAX_FRAME),
        max_stuck_threads: int,
        on_attempt: AttemptObserver | None = None,
    ) -> None:
        self._store = store
        self._on_attempt = on_attempt
        self._max_result = max_result
        self._registry = registry
        self.worker = worker
        self.workers = workers
        self._lease = lease
        self._quarantine_after = quarantine_after
        self.activity = ActivityRecorder(store)
        self._runtime = Runtime(submitter, self._lend_slot, self.activity)
        self._running: dict[int, _Running] = {}
        self._busy = 0  # slots taken: running jobs that do not wait for another job
        # Claimed ahead of the free slots, to start the moment one frees: (order, job).
        self._ready: list[tuple[tuple[int, float, int], Job]] = []
        # Jobs claimed ahead of free slots, while jobs are short (see `_ahead`).
        self._prefetch = workers
        self._typical = SHORT_JOB  # seconds an attempt takes, as a moving average
        self._outcomes: list[tuple[Job, Outcome]] = []  # ended attempts, to be recorded
        self._writing = 0  # outcomes being recorded now
        self._recording = asyncio.Lock()  # one store call at a time records outcomes
        self._maybe_due = True  # a claim may find work: cleared when one comes back short
        self._rings = 0  # times work was announced (a claim that came back short reads it)
        self._claiming = 0  # jobs asked for by claims in flight in other writes
        self._claims_landed = asyncio.Event()  # set while no such claim is in flight
        self._claims_landed.set()
        self._limited: set[str] = set()  # tasks with a concurrency limit at the last claim
        self._stopping_jobs: dict[int, StopReason] = {}
        self._stopping = False
        self._closed = asyncio.Event()
        self._wake = asyncio.Event()
        self._alarm: asyncio.TimerHandle | None = None
        self._threads = TaskThreads(workers, max_stuck_threads)
        store.events.on_due(self._due)
        store.events.on_cancel(self._cancel_requested)
        store.events.on_finished(self._finished)
        store.events.on_resync(self._wake.set)

    # -- the claim loop ------------------------------------------------------------------

    async def run(self, *, until_idle: bool = False) -> None:
        """Record outcomes and claim jobs until drained; with `until_idle`, also return once
        nothing is running and nothing is due (the deterministic mode tests use)."""
        failures = 0
        while True:
            self._wake.clear()
            self._start_ready()
            want = self._wanted()
            if not self._outcomes and want == 0:
                if self._closed.is_set():
                    return
                if until_idle and not self._running and not self._ready and not self._maybe_due:
                    return
                await self._wake.wait()
                continue
            claim = ClaimRequest(self.worker, want, self._lease, self._limits()) if want else None
            rings = self._rings
            try:
                claimed = await self._record(claim)
            except StoreError as exc:
                failures += 1
                pause = min(2.0**failures, MAX_PAUSE)
                logger.error("cannot record outcomes or claim jobs: %s; trying again in %gs",
                             exc, pause)  # fmt: skip
                if claim is not None and failures >= CLAIM_FAILURES_BEFORE_TELLING_WAITERS:
                    self._fail_waiters(exc, failures)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closed.wait(), pause)
                continue
            failures = 0
            if claimed is not None:
                self._take(claimed.jobs)
                # Short of what it asked for, the claim found all that was due, unless work
                # came in while it ran.
                self._maybe_due = len(claimed.jobs) == want or self._rings != rings
                if not self._maybe_due and claimed.next_due_in is not None:
                    self._due(claimed.next_due_in)

    def claim_request(self) -> ClaimRequest | None:
        """A claim for the free slots, to make in another write (a run's insert, a tick's):
        taskd.submit.Claimer. Its jobs are reserved until `accept`."""
        free = self.workers - self._busy
        if self._stopping or free <= 0:
            return None
        want = max(0, free + self._ahead() - len(self._ready) - self._claiming)
        if want == 0:
            return None
        self._claiming += want
        self._claims_landed.clear()
        return ClaimRequest(self.worker, want, self._lease, self._limits())

    def accept(self, request: ClaimRequest, claimed: Claimed | None) -> None:
        """The claim made in another write: start what it took."""
        self._claiming -= request.limit
        if self._claiming == 0:
            self._claims_landed.set()
        if claimed is not None:
            self._take(claimed.jobs)
            self._start_ready()
            self._wake.set()

    def _take(self, jobs: list[Job]) -> None:
        """Jobs a claim took: ready to start, or, once the daemon stops, back to the queue
        without counting their attempt (a claim in flight as the stop began)."""
        for job in jobs:
            if self._stopping:
                self._release(job)
            else:
                heapq.heappush(self._ready, ((job.priority, job.run_at, job.id), job))

    def _wanted(self) -> int:
        """How many jobs to claim now, if work may be due: while slots are free, enough to
        fill them and a few more (`prefetch`) that start as soon as a slot frees. With no
        slot free nothing is claimed, so that a job due later but more urgent is not queued
        behind jobs claimed before it came."""
        free = self.workers - self._busy
        if self._stopping or not self._maybe_due or free <= 0:
            return 0
        return max(0, free + self._ahead() - len(self._ready) - self._claiming)

    def _ahead(self) -> int:
        """How many jobs to claim beyond the free slots. Only while attempts are short (a few
        milliseconds, like a commit): then a slot that frees starts the next job at once
        instead of waiting for a claim; for longer jobs that wait is nothing, and jobs
        claimed ahead would wait here while another daemon on the same store has a slot."""
        return self._prefetch if self._typical < SHORT_JOB else 0

    async def _record(self, claim: ClaimRequest | None) -> Claimed | None:
        """Record the outcomes that came in, and claim (if asked), in one store call."""
        async with self._recording:
            batch, self._outcomes = self._outcomes, []
            self._writing = len(batch)
            try:
                finished = await self._store.finish([outcome for _, outcome in batch], claim)
            except StoreError:
                self._outcomes[:0] = batch  # kept, in order, for the next try
                raise
            finally:
                self._writing = 0
        for (job, outcome), recorded in zip(batch, finished.jobs, strict=True):
            if recorded is None and outcome.status != "released":
                logger.info(
                    "job %d %s: outcome of attempt %d not recorded, the job was cancelled or "
                    "taken over meanwhile",
                    job.id,
                    job.task,
                    job.attempts,
                )
        return finished.claimed

    def _fail_waiters(self, exc: StoreError, failures: int) -> None:
        """Callers waiting for jobs that do not run here get the error instead of waiting
        for claims that keep failing; their jobs stay queued."""
        reason = f"taskd cannot start queued jobs, its last {failures} claims failed: {exc}"
        woken = self._store.events.fail_waiting(
            lambda job_id: StoreError(
                f"job {job_id} has not started: {reason}. It stays queued: wait for it again "
                f"(taskctl wait {job_id}) once taskctl status shows no store problem"
            ),
            spare={*self._running, *(job.id for _, job in self._ready)},
        )
        if woken:
            logger.warning(
                "%s waiting for jobs %s told that claims fail",
                counted(woken, "caller"),
                "was" if woken == 1 else "were",
            )

    def _limits(self) -> dict[str, int]:
        limits = {t.name: t.concurrency for t in self._registry() if t.concurrency is not None}
        self._limited = set(limits)
        return limits

    def _due(self, delay: float) -> None:
        """Claim again now, or in `delay` seconds (unless woken earlier anyway)."""
        if delay <= 0:
            self._ring()
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        if self._alarm is not None:
            if self._alarm.when() <= when:
                return
            self._alarm.cancel()
        self._alarm = loop.call_at(when, self._ring)

    def _ring(self) -> None:
        self._alarm = None
        self._maybe_due = True
        self._rings += 1
        self._wake.set()

    def _finished(self, job: Job) -> None:
        # A job of a limited task ended elsewhere: its task may have room for ours again.
        if job.task in self._limited and job.id not in self._running:
            self._ring()

    def _start_ready(self) -> None:
        """Start claimed jobs in the free slots, most urgent first."""
        while self._ready and self._busy < self.workers and not self._stopping:
            _, job = heapq.heappop(self._ready)
            handle = asyncio.create_task(self._execute(job), name=f"taskd-job-{job.id}")
            self._running[job.id] = _Running(job, handle)
            self._busy += 1
            self._store.events.started(job)
            self._store.events.changed()

    async def _execute(self, job: Job) -> None:
        running = self._running[job.id]
        loop = asyncio.get_running_loop()
        began = loop.time()
        self.activity.begin(job.id, job.epoch)
        try:
            try:
                outcome = await self._attempt(job)
            finally:
                await self.activity.end(job.id)  # its last progress and lines, before its end
            self._typical += (loop.time() - began - self._typical) / 8
            running.reporting = True
            if self._on_attempt is not None:
                cancelled = outcome is None and running.stopped == "cancelled"
                end: AttemptEnd = (
                    outcome.status if outcome else "cancelled" if cancelled else "lost"
                )
                self._on_attempt(job, end)
            if outcome is not None:
                self._outcomes.append((job, outcome))
        finally:
            if self._running.get(job.id) is running:  # not a later claim of the same job
                del self._running[job.id]
                self._stopping_jobs.pop(job.id, None)
            if not running.waiting:
                self._busy -= 1
            if running.stopped is not None and job.task in self._limited:
                # Cancelled or lost: no outcome will ring for its task's room (see _finished).
                self._ring()
            self._start_ready()  # the freed slot takes a job claimed ahead at once
            self._wake.set()  # an outcome to record, maybe a slot to claim for: our own wake-up
            self._store.events.changed()

    # -- one attempt ---------------------------------------------------------------------

    async def _attempt(self, job: Job) -> Outcome | None:
        """Run one attempt; its outcome, or None if the job was lost meanwhile."""
        task = self._registry().get(job.task)
        if task is None:
            return self._failure(job, None, "error", f"task {job.task} is not loaded", final=True)
        tick = read_tick(bytes(job.payload)) if job.origin == "schedule" else None
        try:
            payload = task.decode_payload(bytes(job.payload), tick=tick is not None)
        except (msgspec.ValidationError, msgspec.DecodeError, UnicodeError, RecursionError) as exc:
            message = f"payload no longer matches the task's schema: {exc}"
            return self._failure(job, task, "error", message, final=True)
        ctx = TaskContext(job.task, job.id, job.attempts, job.max_attempts, self._runtime)
        if tick is not None:
            ctx.scheduled_time, ctx.cron = tick.scheduled_time, tick.cron
        try:
            result = await self._call(task, payload, ctx)
        except asyncio.CancelledError:
            reason = self._stopping_jobs.pop(job.id, None)
            if reason is None:
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            self._running[job.id].stopped = reason
            return self._stopped(job, reason)
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
        return Outcome(job.id, job.epoch, self.worker, "succeeded", result=encoded)

    async def _call(self, task: Task, payload: Any, ctx: TaskContext) -> Any:
        if task.timeout is None:
            return await self._invoke(task, payload, ctx)
        deadline = asyncio.timeout(task.timeout)
        try:
            async with deadline:
                return await self._invoke(task, payload, ctx)
        except TimeoutError:
            if deadline.expired():  # ours, not a TimeoutError the task raised itself
                raise _TimedOut from None
            raise

    async def _invoke(self, task: Task, payload: Any, ctx: TaskContext) -> Any:
        """The task's function: a coroutine on the loop, a plain function in a thread (in a
        copy of the context: what it prints is the job's too)."""
        with job_output(ctx.logger.log):
            if task.is_async:
                return await task.call(payload, ctx)
            call = functools.partial(contextvars.copy_context().run, task.call, payload, ctx)
            return await self._threads.run(call, f"job {ctx.job_id} {task.name}")

    def _stopped(self, job: Job, reason: StopReason) -> Outcome | None:
        """The outcome of an attempt we stopped: none to report for a job we lost."""
        if reason == "shutdown":
            logger.info(
                "job %d %s: returned to the queue, the daemon is stopping", job.id, job.task
            )
            return Outcome(job.id, job.epoch, self.worker, "released")
        logger.info(
            "job %d %s: outcome of attempt %d not recorded, the job was cancelled or taken "
            "over meanwhile",
            job.id,
            job.task,
            job.attempts,
        )
        return None

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
        trace = _task_traceback(exc) if exc is not None else None
        if trace is not None:
            trace = cut_utf8(trace, MAX_TRACEBACK, mark="...\n", keep_end=True)
        message = cut_utf8(message, MAX_ERROR_MESSAGE)
        error = Failure(kind, message, trace)
        where = f"job {job.id} {job.task} attempt {job.attempts}/{job.max_attempts}"
        if final or task is None or job.attempts >= job.max_attempts:
            logger.error("%s failed: %s%s", where, message, _indent(trace), extra=_fields(job))
            return Outcome(job.id, job.epoch, self.worker, "failed", error=error)
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
        return Outcome(job.id, job.epoch, self.worker, "retry", error=error, retry_in=delay)

    # -- control -------------------------------------------------------------------------

    def _stop_job(self, job_id: int, reason: StopReason) -> bool:
        """Cancel a job's coroutine (a thread running a plain function is left to finish)."""
        running = self._running.get(job_id)
        if running is None or running.reporting or job_id in self._stopping_jobs:
            return False
        self._stopping_jobs[job_id] = reason
        running.task.cancel()
        return True

    def _cancel_requested(self, job_id: int) -> None:
        self._drop_ready(job_id)
        self._stop_job(job_id, "cancelled")

    def _drop_ready(self, job_id: int) -> bool:
        """Forget a job claimed ahead that this worker no longer holds (it is not started)."""
        entries = [entry for entry in self._ready if entry[1].id == job_id]
        if entries:
            self._ready.remove(entries[0])
            heapq.heapify(self._ready)
        return bool(entries)

    @property
    def busy(self) -> int:
        """Slots taken: running jobs that do not wait for another job."""
        return self._busy

    @property
    def stopping(self) -> bool:
        return self._stopping

    def running_jobs(self) -> list[Job]:
        """The jobs started here that have not ended."""
        return [running.job for running in self._running.values()]

    @property
    def claimed_ahead(self) -> int:
        """Jobs claimed to start the moment a slot frees."""
        return len(self._ready)

    @property
    def ending(self) -> int:
        """Jobs whose attempt has ended, with their outcome still to be recorded."""
        return len(self._outcomes) + self._writing

    def stop(self) -> None:
        """Claim and start nothing more: the jobs claimed but not started go back to the
        queue, in the next store write (and so do those of claims still in flight, as they
        land); what runs goes on until `drain`."""
        self._stopping = True
        for _, job in self._ready:
            self._release(job)
        self._ready.clear()
        self._wake.set()

    def _release(self, job: Job) -> None:
        self._outcomes.append((job, Outcome(job.id, job.epoch, self.worker, "released")))

    async def drain(self, grace: float) -> None:
        """Wait up to `grace` seconds for running jobs, then cancel them back to pending."""
        self.stop()
        tasks = [running.task for running in self._running.values()]
        if tasks:
            logger.info("waiting up to %gs for %d running jobs", grace, len(tasks))
            await asyncio.wait(tasks, timeout=grace)
        leftover = list(self._running.values())
        for running in leftover:
            self._stop_job(running.job.id, "shutdown")
        if leftover:
            await asyncio.wait([running.task for running in leftover])
        await self.activity.close()
        await self._claims_landed.wait()  # their jobs are released, to be recorded now
        await self._flush()
        self._closed.set()
        self._wake.set()
        if self._alarm is not None:
            self._alarm.cancel()
        self._threads.close()

    async def _flush(self) -> None:
        """Record the outcomes still to be recorded, trying a few times if the store fails;
        what cannot be recorded comes back to the queue when its lease expires."""
        for pause in (0.5, 1.0, 2.0, 4.0, None):
            async with self._recording:  # one that the loop records now has committed after
                pass
            if not self._outcomes:
                return
            try:
                await self._record(None)
            except StoreError as exc:
                if pause is None:
                    logger.error(
                        "cannot record the outcomes of %s (%s); their leases will expire "
                        "and they will run again",
                        counted(len(self._outcomes), "job"),
                        exc,
                    )
                    return
                logger.warning("recording outcomes failed (%s); retrying", exc)
                await asyncio.sleep(pause)

    def threads_alive(self) -> int:
        """Task threads still running (plain functions that ignored their cancellation)."""
        return self._threads.busy

    def thread_stats(self) -> ThreadStats:
        return self._threads.stats()

    async def keep_leases(self) -> None:
        """Every lease/3 until drained: renew our heartbeat and leases, stop the jobs we
        lost, and take back the jobs of workers that went away."""
        interval = self._lease / 3
        while not self._closed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), interval)
            if self._closed.is_set():
                return
            try:
                held = [*self._running, *(job.id for _, job in self._ready)]
                held += [job.id for job, _ in self._outcomes]  # leased until recorded
                lost = await self._store.renew(self.worker, held, self._lease)
                for job_id in lost:
                    if self._drop_ready(job_id) or self._stop_job(job_id, "lost"):
                        logger.warning(
                            "job %d: this daemon no longer holds it (cancelled, or taken over "
                            "after its lease expired); stopping it",
                            job_id,
                        )
                recovered = await self._store.recover(self._quarantine_after)
            except StoreError as exc:
                logger.error("cannot renew job leases: %s", exc)
                continue
            if recovered:
                logger.warning(
                    "took back %s of daemons that went away: %s",
                    counted(len(recovered), "job"),
                    ", ".join(f"job {job.id} {job.task} ({job.status})" for job in recovered),
                )

    @contextlib.asynccontextmanager
    async def _lend_slot(self, job_id: int) -> AsyncIterator[None]:
        """While a job waits for another, it holds no slot and counts against no limit,
        so that waiting cannot deadlock."""
        running = self._running.get(job_id)
        if running is None or running.waiting:
            yield
            return
        job = running.job
        await self._store.set_waiting(job.id, job.epoch, self.worker, True)
        running.waiting = True
        self._busy -= 1
        self._wake.set()
        try:
            yield
        finally:
            running.waiting = False
            self._busy += 1
            try:
                await self._store.set_waiting(job.id, job.epoch, self.worker, False)
            except StoreError as exc:  # it still holds its slot here; the store learns at its end
                logger.warning("job %d: cannot mark it as running again: %s", job.id, exc)


TASKD_FILES = os.path.dirname(__file__) + os.sep


def _task_traceback(exc: BaseException) -> str:
    """The traceback from the task's own code on: taskd's frames that called it are noise
    to the person reading why their task failed."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(TASKD_FILES):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb or exc.__traceback__))


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _fields(job: Job) -> dict[str, object]:
    """The task and job of a log line, for log_format = "json"."""
    return {"task": job.task, "job_id": job.id}


def _indent(trace: str | None) -> str:
    return "" if not trace else "\n" + trace.rstrip()
