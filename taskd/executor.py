"""The executor: claims due jobs for this daemon's worker, runs them, records their outcomes.

A pipeline, driven by one loop (`run`): an attempt frees its slot the moment it ends and
leaves its outcome to the loop, which records every outcome that has come in and claims
the next jobs in one store call (one transaction), so that workers never wait for a commit
of their own. The loop claims a few jobs ahead of the free slots (they wait, leased to this
worker, in taskd.slots), so that a slot that frees is filled at once; it sleeps until
outcomes come in, or a slot is free and the store says work is due (or the next delayed
job's time comes). The store fences stale reports. The executor stops the jobs the store
says were cancelled, and those taskd.leases finds this worker lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Callable
from typing import Literal

from taskd.activity import ActivityRecorder
from taskd.attempt import Attempts
from taskd.models import Job, counted
from taskd.news import DaemonNews
from taskd.slots import Slots
from taskd.store import Claimed, ClaimRequest, Outcome, Store, StoreError

logger = logging.getLogger(__name__)

# Why the executor stops a job: it was cancelled, the store says this worker lost it
# (taken over after its lease expired), or the daemon stops.
StopReason = Literal["cancelled", "lost", "shutdown"]
# How an attempt ended, as an observer (the metrics) is told: its outcome's status, or why
# it was stopped.
AttemptEnd = Literal["succeeded", "failed", "retry", "released", "cancelled", "lost"]
AttemptObserver = Callable[[Job, AttemptEnd], None]
MAX_PAUSE = 30.0  # seconds at most between tries while the store fails
# Each claim waits busy_timeout for a lock: one that fails is more than a passing lock, and
# this many in a row (with the pauses between them, 2 s, then 4 s) mean the store cannot hand
# out jobs for now; callers waiting for jobs are told so then, and at each failure after.
CLAIM_FAILURES_BEFORE_TELLING_WAITERS = 3
# Seconds of jobs that start one after another in one turn of the loop (in all the slots):
# async jobs that compute without awaiting run back to back (a freed slot runs the next in
# the same asyncio task), and the loop serves no timer, socket or claim meanwhile.
TURN_BUDGET = 0.001
# Seconds at most that outcomes wait for the claim they are recorded with (while the slots
# run jobs claimed ahead, a slot frees and claims soon): rather than in a write of their own
# as the loop takes a turn between jobs, which doubled the writes of a no-op drain and cost
# its daemon about a third more CPU per job. A no-op drain claims every 20 to 40 ms.
OUTCOMES_WAIT = 0.05


class _Running:
    """A job running here: its asyncio task, and whether its outcome is being recorded
    (then it is not stopped) or why it was stopped."""

    __slots__ = ("job", "reporting", "stopped", "task")

    def __init__(self, job: Job, task: asyncio.Task[None]) -> None:
        self.job = job
        self.task = task
        self.reporting = False
        self.stopped: StopReason | None = None


class Executor:
    """Runs the jobs claimed for the slots of one worker, and records their outcomes."""

    def __init__(
        self,
        store: Store,
        slots: Slots,
        attempts: Attempts,
        activity: ActivityRecorder,
        news: DaemonNews,
        *,
        on_attempt: AttemptObserver | None = None,
    ) -> None:
        self._store = store
        self._slots = slots
        self._attempts = attempts
        self._activity = activity
        self._news = news
        self._on_attempt = on_attempt
        # Each job's asyncio task starts from this context, not from that of the code that
        # starts it (often the job just ended, with what it set in its context variables).
        self._context = contextvars.copy_context()
        self._running: dict[int, _Running] = {}
        self._outcomes: list[tuple[Job, Outcome]] = []  # ended attempts, to be recorded
        self._writing = 0  # outcomes being recorded now
        self._recording = asyncio.Lock()  # one store call at a time records outcomes
        self._maybe_due = True  # a claim may find work: cleared when one comes back short
        self._work_announced = 0  # times work was announced (a short claim reads it)
        self._stopping_jobs: dict[int, StopReason] = {}
        self.closed = asyncio.Event()  # drained: nothing runs or is claimed any more
        self._wake = slots.wake
        self._alarm: asyncio.TimerHandle | None = None
        # The loop `run` runs on: each get_running_loop() is a system call (getpid), and
        # `_due` hears every notice of new work.
        self._loop: asyncio.AbstractEventLoop | None = None
        # Jobs start in this turn of the loop until then (loop time; 0: from the next job's
        # start), later ones after the next turn: _wait_for_turn.
        self._turn_ends = 0.0
        self._turn_asked = False  # a callback starts the next turn's budget
        self._outcomes_alarm: asyncio.TimerHandle | None = None  # _outcomes_can_wait's
        store.events.on_due(self._due)
        store.events.on_cancel(self._cancel_requested)
        store.events.on_finished(self._finished)
        store.events.on_resync(self._wake.set)
        slots.on_claimed(self._claimed)

    # -- the claim loop ------------------------------------------------------------------

    async def run(self, *, until_idle: bool = False) -> None:
        """Record outcomes and claim jobs until drained; with `until_idle`, also return once
        nothing is running and nothing is due (the deterministic mode tests use)."""
        slots = self._slots
        self._loop = asyncio.get_running_loop()
        failures = 0
        while True:
            self._wake.clear()
            self._start_ready()
            want = slots.wanted() if self._maybe_due else 0
            if want == 0 and (not self._outcomes or self._outcomes_can_wait()):
                if self.closed.is_set():
                    return
                idle = not self._running and not slots.claimed_ahead and not self._maybe_due
                if until_idle and idle:
                    return
                await self._wake.wait()
                continue
            claim = slots.request(want) if want else None
            announced = self._work_announced
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
                    await asyncio.wait_for(self.closed.wait(), pause)
                continue
            failures = 0
            if claimed is not None:
                self._take(claimed.jobs)
                # Short of what it asked for, the claim found all that was due, unless work
                # came in while it ran.
                self._maybe_due = len(claimed.jobs) == want or self._work_announced != announced
                if not self._maybe_due and claimed.next_due_in is not None:
                    self._due(claimed.next_due_in)

    def _claimed(self, jobs: list[Job]) -> None:
        """Jobs a claim made in another write took (taskd.slots): start them."""
        self._take(jobs)
        self._start_ready()
        self._wake.set()

    def _take(self, jobs: list[Job]) -> None:
        """Jobs a claim took: ready to start, or, once the daemon stops, back to the queue
        without counting their attempt (a claim in flight as the stop began)."""
        if not self._slots.stopping:
            self._slots.add_ready(jobs)
            return
        for job in jobs:
            self._release(job)

    async def _record(self, claim: ClaimRequest | None) -> Claimed | None:
        """Record the outcomes that came in, and claim (if asked), in one store call."""
        async with self._recording:
            batch, self._outcomes = self._outcomes, []
            if self._outcomes_alarm is not None:
                self._outcomes_alarm.cancel()
                self._outcomes_alarm = None
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

    def _outcomes_can_wait(self) -> bool:
        """Whether the outcomes that came in can wait for the claim of a slot that frees
        soon, to be recorded in its transaction: while jobs claimed ahead wait for the
        slots, for OUTCOMES_WAIT at most (an alarm wakes the loop then)."""
        if not self._slots.claimed_ahead or self._slots.stopping:
            return False
        loop = asyncio.get_running_loop()
        if self._outcomes_alarm is None:
            self._outcomes_alarm = loop.call_later(OUTCOMES_WAIT, self._wake.set)
        return loop.time() < self._outcomes_alarm.when()

    def _fail_waiters(self, exc: StoreError, failures: int) -> None:
        """Callers waiting for jobs that do not run here get the error instead of waiting
        for claims that keep failing; their jobs stay queued."""
        reason = f"taskd cannot start queued jobs, its last {failures} claims failed: {exc}"
        woken = self._store.events.fail_waiting(
            lambda job_id: StoreError(
                f"job {job_id} has not started: {reason}. It stays queued: wait for it again "
                f"(taskctl wait {job_id}) once taskctl status shows no store problem"
            ),
            spare={*self._running, *self._slots.ready_ids()},
        )
        if woken:
            logger.warning(
                "%s waiting for jobs %s told that claims fail",
                counted(woken, "caller"),
                "was" if woken == 1 else "were",
            )

    def _due(self, delay: float) -> None:
        """Claim again now, or in `delay` seconds (unless woken earlier anyway)."""
        if delay <= 0:
            self._work_came()
            return
        loop = self._loop or asyncio.get_running_loop()
        when = loop.time() + delay
        if self._alarm is not None:
            if self._alarm.when() <= when:
                return
            self._alarm.cancel()
        self._alarm = loop.call_at(when, self._work_came)

    def _work_came(self) -> None:
        self._alarm = None
        self._maybe_due = True
        self._work_announced += 1
        self._wake.set()

    def limits_changed(self) -> None:
        """The tasks' limits changed (a reload): jobs a claim held back may start now."""
        self._work_came()

    def _finished(self, job: Job) -> None:
        # A job of a limited task ended elsewhere: its task may have room for ours again.
        if job.task in self._slots.limited and job.id not in self._running:
            self._work_came()

    def _start_ready(self) -> None:
        """Start claimed jobs in the free slots, most urgent first."""
        started = False
        while (job := self._slots.next_ready()) is not None:
            handle = asyncio.create_task(
                self._execute(job), name=f"taskd-job-{job.id}", context=self._context.copy()
            )
            self._run(job, handle)
            started = True
        if started:
            self._news.changed()

    def _run(self, job: Job, handle: asyncio.Task[None]) -> None:
        """The job takes a slot, its attempt run by `handle` (news.changed is the caller's)."""
        self._running[job.id] = _Running(job, handle)
        self._slots.start(job)
        self._news.started(job)

    async def _execute(self, job: Job) -> None:
        """Run the job's attempt, then, in the same asyncio task, those of the jobs claimed
        ahead that take the slot it frees (a task for each costs more than a no-op job); the
        loop still takes a turn every TURN_BUDGET of them (_attempt)."""
        fresh = contextvars.copy_context()  # each job's context starts as a new task's would
        next_job: Job | None = job
        while next_job is not None:
            next_job = await self._execute_one(next_job, fresh)

    async def _execute_one(self, job: Job, fresh: contextvars.Context) -> Job | None:
        """Run one attempt; the next job this asyncio task runs (now in the slot it freed),
        if the attempt left the task's context variables as they were (a task that set one
        and kept it would hand it to the next job: that job gets an asyncio task of its own)."""
        running = self._running[job.id]
        ended = False  # not stopped by a cancellation of this asyncio task
        self._activity.begin(job.id, job.epoch)
        try:
            try:
                outcome = await self._attempt(job, running)
            finally:
                if not self._activity.forgot(job.id):  # most jobs leave nothing: no await
                    await self._activity.end(job.id)  # its last progress and lines, first
            running.reporting = True
            if self._on_attempt is not None:
                cancelled = outcome is None and running.stopped == "cancelled"
                end: AttemptEnd = (
                    outcome.status if outcome else "cancelled" if cancelled else "lost"
                )
                self._on_attempt(job, end)
            if outcome is not None:
                self._outcomes.append((job, outcome))
            ended = True
        finally:
            if self._running.get(job.id) is running:  # not a later claim of the same job
                del self._running[job.id]
                self._stopping_jobs.pop(job.id, None)
            self._slots.end(job)
            if running.stopped is not None and job.task in self._slots.limited:
                # Cancelled or lost: no outcome will announce its task's room (_finished).
                self._work_came()
            # The freed slot takes a job claimed ahead at once: in this asyncio task, unless
            # it is cancelled (or a cancellation of it was swallowed), or the attempt left a
            # context variable set: a fresh one then.
            reuse = ended and not running.task.cancelling() and _unchanged(fresh)
            next_job = self._slots.next_ready() if reuse else None
            if next_job is not None:
                self._run(next_job, running.task)
            self._start_ready()
            self._wake.set()  # an outcome to record, maybe a slot to claim for: our own wake-up
            self._news.changed()
        return next_job

    async def _attempt(self, job: Job, running: _Running) -> Outcome | None:
        """Run one attempt, in this turn of the loop if its budget is not spent, else in the
        next; its outcome, or None if the job was lost meanwhile."""
        loop = self._loop or asyncio.get_running_loop()
        try:
            if loop.time() >= self._turn_ends:
                await self._wait_for_turn(loop)
            began = loop.time()
            try:
                return await self._attempts.run(job)
            finally:
                self._slots.took(loop.time() - began)
        except asyncio.CancelledError:
            reason = self._stopping_jobs.pop(job.id, None)
            if reason is None:
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            running.stopped = reason
            return self._stopped(job, reason)

    async def _wait_for_turn(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait for a turn of the loop (it polls timers and sockets first) whose budget is
        not spent: the first job to start in a turn starts its budget, and runs in any case.
        One callback per turn starts it, so the slots waiting share a turn's budget."""
        while True:
            now = loop.time()
            if now < self._turn_ends:
                return
            if not self._turn_ends:
                self._turn_ends = now + TURN_BUDGET
                return
            if not self._turn_asked:
                self._turn_asked = True
                loop.call_soon(self._turn_began)  # ahead of the jobs that wait for the turn
            await asyncio.sleep(0)

    def _turn_began(self) -> None:
        self._turn_asked = False
        self._turn_ends = 0.0

    def _stopped(self, job: Job, reason: StopReason) -> Outcome | None:
        """The outcome of an attempt we stopped: none to report for a job we lost."""
        if reason == "shutdown":
            logger.info(
                "job %d %s: returned to the queue, the daemon is stopping", job.id, job.task
            )
            return Outcome(job.id, job.epoch, self._slots.worker, "released", job=job)
        logger.info(
            "job %d %s: outcome of attempt %d not recorded, the job was cancelled or taken "
            "over meanwhile",
            job.id,
            job.task,
            job.attempts,
        )
        return None

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
        self._slots.drop_ready(job_id)
        self._stop_job(job_id, "cancelled")

    def lose(self, job_id: int) -> bool:
        """The store says this worker no longer holds the job: forget or stop it; whether it
        was held here."""
        return self._slots.drop_ready(job_id) or self._stop_job(job_id, "lost")

    def held_jobs(self) -> list[int]:
        """The jobs leased to this worker: running, claimed ahead, or to be recorded."""
        held = [*self._running, *self._slots.ready_ids()]
        return held + [job.id for job, _ in self._outcomes]

    @property
    def ending(self) -> int:
        """Jobs whose attempt has ended, with their outcome still to be recorded."""
        return len(self._outcomes) + self._writing

    def stop(self) -> None:
        """Claim and start nothing more: the jobs claimed but not started go back to the
        queue, in the next store write (and so do those of claims still in flight, as they
        land); what runs goes on until `drain`."""
        for job in self._slots.stop():
            self._release(job)
        self._wake.set()

    def _release(self, job: Job) -> None:
        outcome = Outcome(job.id, job.epoch, self._slots.worker, "released", job=job)
        self._outcomes.append((job, outcome))

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
        await self._activity.close()
        await self._slots.claims_landed.wait()  # their jobs are released, to be recorded now
        await self._flush()
        self.closed.set()
        self._wake.set()
        if self._alarm is not None:
            self._alarm.cancel()
        if self._outcomes_alarm is not None:
            self._outcomes_alarm.cancel()

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


def _unchanged(fresh: contextvars.Context) -> bool:
    """Whether the current context holds what `fresh` holds, and nothing more."""
    now = contextvars.copy_context()
    if len(now) != len(fresh):
        return False
    # A loop, not all() of a generator: no generator frame a job.
    for var, value in now.items():  # noqa: SIM110
        if fresh.get(var, _UNSET) is not value:
            return False
    return True


_UNSET = object()
