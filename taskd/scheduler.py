"""The scheduler: fires each schedule's ticks as jobs, through the single-flight path.

It sleeps until the next due tick, or until a reload, pause, resume or stop wakes it. A tick
submits one single-flight run per task (origin "schedule"); when the task's previous run is
still pending or running, the store's unique (task, key) index makes the tick join it, and
the tick counts as coalesced. Nothing here remembers what is running.

Missed ticks: a tick is on time if it is the latest due tick and fell after the daemon
started and less than ON_TIME_WINDOW ago; earlier due ticks were missed (taskd was down,
the machine was suspended, the clock was set forward) and the schedule's catch_up decides:
"skip" fires none, "latest" the most recent one unless an on-time tick fires anyway, "all"
up to max_catch_up of the most recent ones, one run after another. A tick at or before the
last one dealt with is never fired again, whatever the clock does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any

import msgspec

from taskd.cron import CronError, iso, next_tick, normalize, recent_ticks
from taskd.models import FiredJob, JobStatus, ScheduleInfo
from taskd.schedules import CatchUp, ScheduleSpec
from taskd.store import JobNotFound, ScheduleState, Store, StoreError
from taskd.submit import InvalidRequest, JobRequest, PayloadInvalid, Submitter, UnknownTask

logger = logging.getLogger(__name__)

ON_TIME_WINDOW = 60.0  # a due tick noticed later than this was missed, not merely late
# The loop's sleep is measured on the monotonic clock, which stops while the machine is
# suspended and ignores changes to the wall clock; waking at least this often notices both.
MAX_SLEEP = 30.0
# Told of each firing: the schedule's id, how late a cron tick fired (None for @startup and
# triggers), and the jobs it started or joined.
FiringObserver = Callable[[str, float | None, list[FiredJob]], None]


class UnknownSchedule(LookupError):
    def __init__(self, reference: str, known: Iterable[str]) -> None:
        listed = [f'"{name}"' for name in known]
        more = f" and {len(listed) - 10} more" if len(listed) > 10 else ""
        names = ", ".join(listed[:10]) + more if listed else "none are configured"
        super().__init__(
            f'no schedule with the id or expression "{reference}" (schedules: {names}); quote '
            "an expression so that the shell keeps it whole: '*/5 * * * *'"
        )
        self.reference = reference


class AmbiguousSchedule(ValueError):
    """An expression shared by several schedules; the message lists their ids."""


def plan_firings(
    catch_up: CatchUp, max_catch_up: int, due: Sequence[float], on_time_after: float
) -> tuple[list[float], float | None]:
    """Which of the due ticks (oldest first) fire: the missed ones to catch up, and the
    on-time one. Only the latest due tick can be on time, and only if after `on_time_after`."""
    on_time = due[-1] if due and due[-1] > on_time_after else None
    missed = list(due[:-1] if on_time is not None else due)
    if catch_up == "all":
        return missed[-max_catch_up:], on_time
    if catch_up == "latest" and on_time is None:
        return missed[-1:], None
    return [], on_time


def outcome(jobs: Sequence[FiredJob]) -> str | None:
    """One word for the jobs of a firing: unfinished, else the worst way one ended."""
    statuses = [job.status for job in jobs]
    if not statuses:
        return None
    if None in statuses:
        return "unknown"  # pruned
    for status in ("running", "pending", "failed", "cancelled"):
        if status in statuses:
            return status
    return "succeeded"


def _later(moment: float | None, now: float) -> float:
    return now if moment is None else max(moment, now)


def _same_timing(old: ScheduleSpec, new: ScheduleSpec) -> bool:
    return (old.expression, old.timezone) == (new.expression, new.timezone)


class _Entry:
    """A schedule with what the store remembers of it and its next tick (None: not
    ticking, because it is paused, disabled or @startup)."""

    __slots__ = ("next_tick", "spec", "state")

    def __init__(self, spec: ScheduleSpec, state: ScheduleState) -> None:
        self.spec = spec
        self.state = state
        self.next_tick: float | None = None

    @property
    def active(self) -> bool:
        return self.spec.enabled and not self.state.paused


class Scheduler:
    """Fires the schedules' ticks; `run()` is its loop, the other methods its controls."""

    def __init__(
        self,
        store: Store,
        submitter: Submitter,
        *,
        started_at: float | None = None,
        clock: Callable[[], float] = time.time,
        on_fired: FiringObserver | None = None,
    ) -> None:
        self._store = store
        self._on_fired = on_fired
        self._submitter = submitter
        self._clock = clock
        self._up_since = started_at
        self._entries: dict[str, _Entry] = {}
        self._wake = asyncio.Event()
        self._loading = asyncio.Lock()
        self._catching_up: dict[str, asyncio.Task[None]] = {}
        self._stopping = False
        self._running = False
        self._finished = asyncio.Event()

    # -- configuration ---------------------------------------------------------------------

    async def load(self, specs: Sequence[ScheduleSpec]) -> None:
        """The schedules at start-up, with their state from the store. Ticks between a
        schedule's last firing and now are due at once: the first `run_due` catches up."""
        async with self._loading:
            now = self._clock()
            if self._up_since is None:
                self._up_since = now
            stored = {state.id: state for state in await self._store.schedule_states()}
            entries = {}
            for spec in specs:
                state = stored.get(spec.id) or ScheduleState(spec.id, covered_until=now)
                if state.covered_until is None:
                    state.covered_until = now
                entries[spec.id] = entry = _Entry(spec, state)
                self._schedule_next(entry)
            self._entries = entries
            await self._save(entries.values())
            logger.info("schedules: %d", len(entries))

    async def replace(self, specs: Sequence[ScheduleSpec]) -> None:
        """A reload: the new schedules. Those whose id survives keep their state; new,
        changed or re-enabled ones start ticking from now (reloads never catch up)."""
        async with self._loading:
            returning: dict[str, ScheduleState] = {}
            if any(spec.id not in self._entries for spec in specs):
                returning = await self._stored_states()  # removed once, now back
            now = self._clock()
            entries = {}
            for spec in specs:
                old = self._entries.get(spec.id)
                state = old.state if old else returning.get(spec.id) or ScheduleState(spec.id)
                entries[spec.id] = entry = _Entry(spec, state)
                if old and old.next_tick is not None and _same_timing(old.spec, spec):
                    entry.next_tick = old.next_tick
                else:
                    state.covered_until = _later(state.covered_until, now)
                    self._schedule_next(entry)
            removed = self._entries.keys() - entries.keys()
            for key in removed:
                if (task := self._catching_up.get(key)) is not None:
                    task.cancel()
            kept = len(entries.keys() & self._entries.keys())
            logger.info(
                "schedules: %d (%d kept, %d new, %d removed)",
                len(entries),
                kept,
                len(entries) - kept,
                len(removed),
            )
            self._entries = entries
            await self._save(entries.values())
        self._wake.set()

    async def _stored_states(self) -> dict[str, ScheduleState]:
        try:
            return {state.id: state for state in await self._store.schedule_states()}
        except StoreError as exc:
            logger.error("cannot read the state of the schedules, starting afresh: %s", exc)
            return {}

    # -- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """Fire the @startup schedules and what was missed, then each tick when it is due,
        until `stop()`."""
        self._running = True
        try:
            await self.fire_startup()
            while not self._stopping:
                self._wake.clear()
                delay = await self.run_due()
                if self._stopping:
                    break
                timeout = MAX_SLEEP if delay is None else min(delay, MAX_SLEEP)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
        finally:
            self._finished.set()

    def wake(self) -> None:
        """Look at the schedules again now (the clock changed, a test moved it)."""
        self._wake.set()

    async def stop(self) -> None:
        """Fire nothing more; wait for a firing in progress; drop unfinished catch-ups."""
        self._stopping = True
        self._wake.set()
        catching_up = list(self._catching_up.values())
        for task in catching_up:
            task.cancel()
        await asyncio.gather(*catching_up, return_exceptions=True)
        if self._running:
            await self._finished.wait()

    async def settle(self) -> None:
        """Wait until the catch-up runs in progress have all fired (tests use it)."""
        while self._catching_up:
            await asyncio.wait(list(self._catching_up.values()))

    async def fire_startup(self) -> None:
        """Fire the @startup schedules (once each time the daemon starts)."""
        now = self._clock()
        entries = [e for e in self._entries.values() if e.spec.startup and e.active]
        if entries:
            await asyncio.gather(*(self._fire(entry, now, regular=True) for entry in entries))
            await self._save(entries)

    async def run_due(self) -> float | None:
        """Fire what is due now; the seconds until the next tick (None: nothing ticks)."""
        now = self._clock()
        firings: list[Coroutine[Any, Any, list[FiredJob]]] = []
        touched = []
        for entry in list(self._entries.values()):
            if entry.next_tick is not None and entry.next_tick <= now:
                touched.append(entry)
                firings += self._due(entry, now)
        if firings:
            await asyncio.gather(*firings)
        if touched:
            await self._save(touched)
        return self._delay()

    def _due(self, entry: _Entry, now: float) -> list[Coroutine[Any, Any, list[FiredJob]]]:
        """Plan the due ticks of one schedule and move it on to its next tick."""
        spec, state = entry.spec, entry.state
        assert spec.cron is not None and self._up_since is not None
        after = state.covered_until if state.covered_until is not None else now
        limit = spec.max_catch_up + 1 if spec.catch_up == "all" else 2
        due = recent_ticks(spec.cron, spec.zone, after, now, limit)
        on_time_after = max(self._up_since, now - ON_TIME_WINDOW)
        catch_up, on_time = plan_firings(spec.catch_up, spec.max_catch_up, due, on_time_after)
        if missed := [tick for tick in due if tick != on_time]:
            self._log_missed(spec, after, missed[-1], catch_up)
        state.covered_until = max(after, now)
        self._schedule_next(entry)
        ticks = catch_up + ([on_time] if on_time is not None else [])
        if len(ticks) > 1:  # "all": one run after another, without holding up the loop
            self._start_catch_up(entry, ticks)
            return []
        return [self._fire(entry, tick, regular=True) for tick in ticks]

    def _log_missed(
        self, spec: ScheduleSpec, after: float, last: float, catch_up: list[float]
    ) -> None:
        assert spec.cron is not None
        first = next_tick(spec.cron, spec.zone, after)
        span = iso(first, spec.zone) + (f" to {iso(last, spec.zone)}" if last != first else "")
        if catch_up:
            what = f"firing {len(catch_up)} of them, from {iso(catch_up[0], spec.zone)}"
        else:
            what = "not firing them"
        logger.info(
            'schedule "%s" missed its ticks at %s (taskd was not running, or the clock '
            "jumped); catch_up = %s: %s",
            spec.id,
            span,
            spec.catch_up,
            what,
        )

    def _schedule_next(self, entry: _Entry) -> None:
        spec, state = entry.spec, entry.state
        if spec.cron is None or not entry.active:
            entry.next_tick = None
            return
        known = [t for t in (state.covered_until, state.last_tick) if t is not None]
        after = max(known) if known else self._clock()
        try:
            entry.next_tick = next_tick(spec.cron, spec.zone, after)
        except CronError as exc:
            logger.error('schedule "%s" stops ticking: %s', spec.id, exc)
            entry.next_tick = None

    def _delay(self) -> float | None:
        ticks = [e.next_tick for e in self._entries.values() if e.next_tick is not None]
        return max(0.0, min(ticks) - self._clock()) if ticks else None

    # -- firing ----------------------------------------------------------------------------

    async def _fire(self, entry: _Entry, tick: float, *, regular: bool) -> list[FiredJob]:
        """Start each task of the schedule for `tick`, concurrently; a task that cannot be
        started is logged and does not stop the others. `regular` firings move last_tick."""
        spec, state = entry.spec, entry.state
        payload = spec.tick_payload(tick)
        results = await asyncio.gather(
            *(self._submit(spec, task, payload, tick) for task in spec.tasks)
        )
        fired = [job for job in results if job is not None]
        if regular:
            state.last_tick = tick if state.last_tick is None else max(state.last_tick, tick)
        state.fired_at = fired_at = self._clock()
        state.last_jobs = fired
        state.coalesced += sum(job.joined for job in fired)
        if self._on_fired is not None:
            late = fired_at - tick if regular and not spec.startup else None
            self._on_fired(spec.id, late, fired)
        return fired

    async def _submit(
        self, spec: ScheduleSpec, task: str, payload: bytes, tick: float
    ) -> FiredJob | None:
        request = JobRequest(task=task, payload=payload, origin="schedule", single_flight=True)
        when = iso(tick, spec.zone)
        try:
            (inserted,) = await self._submitter.submit([request])
        except (StoreError, UnknownTask, PayloadInvalid, InvalidRequest) as exc:
            logger.error('schedule "%s": cannot start %s for %s: %s', spec.id, task, when, exc)
            return None
        if inserted.duplicate:
            logger.info(
                'schedule "%s": %s is still pending or running (job %d); the tick of %s joined it',
                spec.id,
                task,
                inserted.job_id,
                when,
            )
        else:
            logger.debug('schedule "%s": job %d of %s for %s', spec.id, inserted.job_id, task, when)
        return FiredJob(task=task, id=inserted.job_id, joined=inserted.duplicate)

    def _start_catch_up(self, entry: _Entry, ticks: list[float]) -> None:
        key = entry.spec.id
        previous = self._catching_up.get(key)
        task = asyncio.create_task(self._catch_up(entry, ticks, previous), name=f"catch-up {key}")
        self._catching_up[key] = task

        def forget(done: asyncio.Task[None]) -> None:
            if self._catching_up.get(key) is done:
                del self._catching_up[key]
            if not done.cancelled() and (exc := done.exception()) is not None:
                logger.error('schedule "%s": catching up failed', key, exc_info=exc)

        task.add_done_callback(forget)

    async def _catch_up(
        self, entry: _Entry, ticks: list[float], previous: asyncio.Task[None] | None
    ) -> None:
        """Fire `ticks` in order, each once the runs of the one before have ended."""
        if previous is not None:
            await asyncio.wait([previous])
        try:
            for tick in ticks:
                fired = await self._fire(entry, tick, regular=True)
                await self._save([entry])
                for job in fired:
                    with contextlib.suppress(JobNotFound):
                        await self._submitter.wait(job.id)
        except StoreError as exc:
            logger.error('schedule "%s": catching up stopped: %s', entry.spec.id, exc)

    async def _save(self, entries: Iterable[_Entry]) -> None:
        try:
            await self._store.save_schedule_states([entry.state for entry in entries])
        except StoreError as exc:
            logger.error("cannot save the state of the schedules: %s", exc)

    # -- control ---------------------------------------------------------------------------

    async def schedules(self) -> list[ScheduleInfo]:
        """Every schedule, in the order of the configuration."""
        return await self._infos(list(self._entries.values()))

    async def pause(self, reference: str) -> ScheduleInfo:
        """Stop a schedule ticking until `resume`; remembered across restarts."""
        entry = self._find(reference)
        if not entry.state.paused:
            entry.state.paused = True
            self._schedule_next(entry)
            await self._save([entry])
            logger.info('schedule "%s" paused', entry.spec.id)
        return (await self._infos([entry]))[0]

    async def resume(self, reference: str) -> ScheduleInfo:
        """Tick again from now; ticks that passed while paused are not caught up."""
        entry = self._find(reference)
        if entry.state.paused:
            entry.state.paused = False
            entry.state.covered_until = _later(entry.state.covered_until, self._clock())
            self._schedule_next(entry)
            await self._save([entry])
            self._wake.set()
            logger.info('schedule "%s" resumed', entry.spec.id)
        return (await self._infos([entry]))[0]

    async def trigger(self, reference: str) -> ScheduleInfo:
        """Fire a schedule now, paused or not; its regular ticks stay as they are."""
        entry = self._find(reference)
        fired = await self._fire(entry, self._clock(), regular=False)
        await self._save([entry])
        jobs = ", ".join(f"{job.task} job {job.id}" for job in fired) or "no jobs"
        logger.info('schedule "%s" triggered: %s', entry.spec.id, jobs)
        return (await self._infos([entry]))[0]

    def task_schedules(self) -> dict[str, tuple[list[str], float | None]]:
        """Per task: the expressions of its enabled schedules, and their next tick."""
        result: dict[str, tuple[list[str], float | None]] = {}
        for entry in self._entries.values():
            if not entry.spec.enabled:
                continue
            for task in entry.spec.tasks:
                expressions, next_run = result.get(task, ([], None))
                expressions.append(entry.spec.expression)
                ticks = [t for t in (next_run, entry.next_tick) if t is not None]
                result[task] = (expressions, min(ticks) if ticks else None)
        return result

    def _find(self, reference: str) -> _Entry:
        text = normalize(reference)
        for key in (reference, reference.strip(), text):
            if (entry := self._entries.get(key)) is not None:
                return entry
        matches = [e for e in self._entries.values() if e.spec.expression == text]
        if len(matches) == 1:
            return matches[0]
        if matches:
            ids = ", ".join(f'"{e.spec.id}"' for e in matches)
            raise AmbiguousSchedule(
                f'"{text}" is the expression of several schedules ({ids}); name one by its id'
            )
        raise UnknownSchedule(reference, self._entries)

    async def _infos(self, entries: list[_Entry]) -> list[ScheduleInfo]:
        ids = {job.id for entry in entries for job in entry.state.last_jobs}
        jobs = await asyncio.gather(*(self._store.get(job_id) for job_id in ids))
        statuses: dict[int, JobStatus] = {job.id: job.status for job in jobs if job is not None}
        return [self._info(entry, statuses) for entry in entries]

    @staticmethod
    def _info(entry: _Entry, statuses: dict[int, JobStatus]) -> ScheduleInfo:
        spec, state = entry.spec, entry.state
        last_jobs = [
            msgspec.structs.replace(job, status=statuses.get(job.id)) for job in state.last_jobs
        ]
        return ScheduleInfo(
            id=spec.id,
            cron=spec.expression,
            timezone=spec.timezone,
            tasks=list(spec.tasks),
            catch_up=spec.catch_up,
            max_catch_up=spec.max_catch_up,
            enabled=spec.enabled,
            paused=state.paused,
            next_tick=entry.next_tick,
            last_tick=state.last_tick,
            fired_at=state.fired_at,
            last_outcome=outcome(last_jobs),
            last_jobs=last_jobs,
            coalesced=state.coalesced,
        )
