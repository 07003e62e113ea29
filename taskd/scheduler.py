"""The scheduler: fires each schedule's ticks as jobs, through the single-flight path.

It sleeps until the next due tick, or until a reload, pause, resume or stop wakes it. A tick
submits one single-flight run per task (origin "schedule"); when the task's previous run is
still pending or running, the store's unique (task, key) index makes the tick join it, and
the tick counts as coalesced. Nothing here remembers what is running.

The state of the schedules (paused, covered, last fired) lives in the store, shared by
every daemon using it: the scheduler reads it when it wakes and changes it with targeted
updates. A tick's jobs and its record are written in one transaction (`fire_tick`), and
the store refuses a tick already fired, so a tick fires once however many daemons run the
schedule, and a crash between two writes cannot fire it again.

Missed ticks: a tick is on time if it is the latest due tick and fell after the daemon
started and less than ON_TIME_WINDOW ago; earlier due ticks were missed (taskd was down,
the machine was suspended, the clock was set forward) and the schedule's catch_up decides:
"skip" fires none, "latest" the most recent one unless an on-time tick fires anyway, "all"
up to max_catch_up of the most recent ones, one run after another. A tick at or before the
last one dealt with is never fired again, whatever the clock does. The ticks that go by
unfired are reported (a schedule.missed webhook event, if a [[webhook]] wants it) by the
write that covers the schedule past them, guarded by the covered_until they were counted
from: of several daemons, only the first to move it reports them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import msgspec

from taskd.cron import CronError, iso, next_tick, normalize, recent_ticks
from taskd.faults import crash_point
from taskd.models import FiredJob, Job, JobStatus, ScheduleInfo
from taskd.schedules import CatchUp, ScheduleSpec
from taskd.store import (
    InvalidTransition,
    JobNotFound,
    MissedTicks,
    NewJob,
    ScheduleState,
    Store,
    StoreError,
    TickFired,
)
from taskd.submit import InvalidRequest, JobRequest, PayloadInvalid, Submitter, UnknownTask

if TYPE_CHECKING:  # OpenTelemetry is imported only where taskd traces
    from taskd.otel import TickSpan, Tracing

logger = logging.getLogger(__name__)

ON_TIME_WINDOW = 60.0  # a due tick noticed later than this was missed, not merely late
# A schedule.missed webhook event lists the first missed ticks up to this, and counts them
# up to MISSED_COUNTED (a year of an every-second schedule would take minutes to count).
MISSED_LISTED = 100
MISSED_COUNTED = 1000
# The loop's sleep is measured on the monotonic clock, which stops while the machine is
# suspended and ignores changes to the wall clock; waking at least this often notices both
# (and a schedule resumed by another daemon sharing the store).
MAX_SLEEP = 30.0
# A cron tick fires this long before its time: its record and its jobs are committed then,
# the jobs held for this daemon's worker (taskd.store.base.Hold) and due at the tick, and
# at the tick a timer starts them from memory, with no commit in the way.
EARLY = 0.1
# Stopping waits this long at most for ticks fired ahead to come (a jittered one may be due
# later); those still held then go back to the queue, due at their time, as this node leaves.
STOP_WAITS_FOR_EARLY = 2.0
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


def missed_ticks(
    spec: ScheduleSpec, after: float, now: float, fired: Sequence[float]
) -> MissedTicks | None:
    """The ticks in (`after`, `now`] that go by unfired (the `fired` ones are the latest),
    for a schedule.missed event; None if there are none. Pure, but counting may take a few
    tenths of a second: run it in a thread."""
    assert spec.cron is not None
    until = min(fired) if fired else math.inf
    listed: list[str] = []
    count, last, tick = 0, after, after
    while True:
        tick = next_tick(spec.cron, spec.zone, tick)
        if tick > now or tick >= until:
            exact = True
            break
        if count == MISSED_COUNTED:
            exact = False
            last = recent_ticks(spec.cron, spec.zone, after, min(now, until - 0.001), 1)[-1]
            break
        count, last = count + 1, tick
        if len(listed) < MISSED_LISTED:
            listed.append(iso(tick, spec.zone))
    if not count:
        return None
    return MissedTicks(
        schedule=spec.id,
        tasks=spec.tasks,
        after=after,
        missed=listed,
        count=count,
        exact=exact,
        last=iso(last, spec.zone),
        fired=iso(min(fired), spec.zone) if fired else None,
    )


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


def _same_timing(old: ScheduleSpec, new: ScheduleSpec) -> bool:
    return (old.expression, old.timezone) == (new.expression, new.timezone)


class _Early:
    """A tick fired ahead of its time: its jobs, those held here to start at `due`, and the
    timer that starts them."""

    __slots__ = ("done", "due", "held", "jobs", "tick", "timer")

    def __init__(self, tick: float, due: float, jobs: list[FiredJob], held: list[Job]) -> None:
        self.tick = tick
        self.due = due
        self.jobs = jobs
        self.held = {job.id: job for job in held}
        self.timer: asyncio.TimerHandle | None = None
        self.done = asyncio.Event()  # started, or all its jobs cancelled

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.done.set()


class _Entry:
    """A schedule, its state as last read from the store, and its next tick (None: not
    ticking, because it is paused, disabled or @startup); `early`, its ticks fired ahead and
    not started yet (more than one only when jitter delays them past the next tick)."""

    __slots__ = ("early", "next_tick", "spec", "state")

    def __init__(self, spec: ScheduleSpec, state: ScheduleState) -> None:
        self.spec = spec
        self.state = state
        self.next_tick: float | None = None
        self.early: list[_Early] = []

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
        tracing: Tracing | None = None,
        early: float = EARLY,
    ) -> None:
        self._store = store
        self._early = early  # seconds ahead of its time a tick fires (0: at its time)
        self._tracing = tracing
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
        self._writes: set[asyncio.Task[None]] = set()  # started ticks being recorded
        store.events.on_resync(self._wake.set)
        store.events.on_cancel(self._cancelled)

    # -- configuration ---------------------------------------------------------------------

    async def load(self, specs: Sequence[ScheduleSpec]) -> None:
        """The schedules at start-up, with their state from the store. Ticks between a
        schedule's last firing and now are due at once: the first `run_due` catches up."""
        async with self._loading:
            now = self._clock()
            if self._up_since is None:
                self._up_since = now
            await self._store.add_schedules([spec.id for spec in specs], first_seen=now)
            self._entries = {spec.id: _Entry(spec, ScheduleState(spec.id)) for spec in specs}
            await self._refresh(self._entries.values())
            logger.info("schedules: %d", len(specs))

    async def replace(self, specs: Sequence[ScheduleSpec]) -> None:
        """A reload: the new schedules. Those whose id survives keep their state; new,
        changed or re-enabled ones start ticking from now (reloads never catch up)."""
        async with self._loading:
            now = self._clock()
            fresh = [spec.id for spec in specs if not self._keeps_ticking(spec)]
            try:
                await self._store.cover_schedules(fresh, until=now)
            except StoreError as exc:
                logger.error("cannot save the state of the schedules: %s", exc)
            entries = {spec.id: _Entry(spec, ScheduleState(spec.id)) for spec in specs}
            for spec in specs:  # a tick fired ahead for the same schedule still starts
                old = self._entries.get(spec.id)
                if old is not None and old.spec == spec:
                    entries[spec.id].early, old.early = old.early, []
            await self._withdraw([e for e in self._entries.values() if e.early])
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
            await self._refresh(entries.values())
        self._wake.set()

    def _keeps_ticking(self, spec: ScheduleSpec) -> bool:
        old = self._entries.get(spec.id)
        return old is not None and old.next_tick is not None and _same_timing(old.spec, spec)

    async def _refresh(self, entries: Iterable[_Entry]) -> None:
        """Read the entries' state from the store (another daemon may have fired, paused or
        resumed them) and work out their next ticks; wake the loop if one came closer."""
        entries = list(entries)
        try:
            states = {
                s.id: s for s in await self._store.schedule_states([e.spec.id for e in entries])
            }
        except StoreError as exc:
            logger.error("cannot read the state of the schedules: %s", exc)
            return
        for entry in entries:
            before = entry.next_tick
            entry.state = states.get(entry.spec.id) or ScheduleState(entry.spec.id)
            self._schedule_next(entry)
            if entry.next_tick is not None and (before is None or entry.next_tick < before):
                self._wake.set()

    # -- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """Fire the @startup schedules and what was missed, then each tick when it is due,
        until `stop()`."""
        self._running = True
        try:
            await self.fire_startup()
            read_at = time.monotonic()
            while not self._stopping:
                self._wake.clear()
                delay = await self.run_due()
                if self._stopping:
                    break
                timeout = MAX_SLEEP if delay is None else min(delay, MAX_SLEEP)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                if time.monotonic() - read_at >= MAX_SLEEP:  # resumed by another daemon?
                    await self._refresh(self._entries.values())
                    read_at = time.monotonic()
        finally:
            self._finished.set()

    def wake(self) -> None:
        """Look at the schedules again now (the clock changed, a test moved it)."""
        self._wake.set()

    async def stop(self) -> None:
        """Fire nothing more; wait for a firing in progress; drop unfinished catch-ups."""
        self._stopping = True
        self._wake.set()
        await self._wait_for_early()
        catching_up = list(self._catching_up.values())
        for task in catching_up:
            task.cancel()
        await asyncio.gather(*catching_up, return_exceptions=True)
        if self._running:
            await self._finished.wait()
        await asyncio.gather(*self._writes, return_exceptions=True)

    async def _wait_for_early(self) -> None:
        """Start the ticks fired ahead at their time (a little later than now) before the
        executor stops; those further off are left held: they go back to the queue, due at
        their time, when this node leaves the store."""
        waits = [early.done.wait() for e in self._entries.values() for early in e.early]
        if waits:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits), STOP_WAITS_FOR_EARLY)
        for entry in self._entries.values():
            for early in entry.early:
                early.cancel()
            entry.early = []

    async def settle(self) -> None:
        """Wait until the catch-up runs in progress have all fired (tests use it)."""
        while self._catching_up:
            await asyncio.wait(list(self._catching_up.values()))

    async def fire_startup(self) -> None:
        """Fire the @startup schedules (once each time the daemon starts)."""
        now = self._clock()
        entries = [e for e in self._entries.values() if e.spec.startup and e.active]
        if entries:
            await asyncio.gather(*(self._fire(entry, now) for entry in entries))

    async def run_due(self) -> float | None:
        """Fire what is due now, and ahead of its time the ticks due within EARLY; the
        seconds until the next firing (None: nothing ticks)."""
        now = self._clock()
        soon = now + self._early
        due = [e for e in self._entries.values() if e.next_tick is not None and e.next_tick <= soon]
        if due:
            await self._refresh(due)  # the store's word: paused or fired meanwhile?
            now = self._clock()
            late = [e for e in due if e.next_tick is not None and e.next_tick <= now]
            early = [e for e in due if e.next_tick is not None and now < e.next_tick <= soon]
            await asyncio.gather(
                *(self._fire_due(entry, now) for entry in late),
                *(self._fire_early(entry) for entry in early),
            )
        return self._delay()

    async def _fire_early(self, entry: _Entry) -> None:
        """Fire the next tick ahead of its time: its jobs are due at the tick, and those held
        here start then from memory (`_start_early`)."""
        tick = entry.next_tick
        assert tick is not None
        entry.state.last_tick = tick  # here even if the store fails: no busy loop
        entry.state.covered_until = max(entry.state.covered_until or tick, tick)
        self._schedule_next(entry)
        await self._fire(entry, tick, covered_until=tick, early=True)

    def _hold_early(self, entry: _Entry, tick: float, fired: TickFired) -> None:
        """Keep the jobs held for the tick, and set the timer that starts them."""
        if not fired.held:
            return
        due = fired.held[0].run_at
        early = _Early(tick, due, fired.jobs, fired.held)
        entry.early.append(early)
        self._arm(entry, early)
        crash_point("tick-held")

    def _arm(self, entry: _Entry, early: _Early) -> None:
        loop = asyncio.get_running_loop()
        at = loop.time() + max(0.0, early.due - self._clock())
        early.timer = loop.call_at(at, self._start_early, entry, early)

    def _start_early(self, entry: _Entry, early: _Early) -> None:
        """The tick's time: start its held jobs (a timer that fired a little early waits)."""
        if self._clock() < early.due:
            self._arm(entry, early)
            return
        if early in entry.early:
            entry.early.remove(early)
        early.done.set()
        now, started = self._clock(), time.monotonic()
        jobs = [msgspec.structs.replace(job, started_at=now) for job in early.held.values()]
        early.held.clear()
        if not jobs:
            return
        self._submitter.start_held(jobs)
        if self._on_fired is not None:
            self._on_fired(entry.spec.id, now - early.tick, early.jobs)
        write = asyncio.create_task(
            self._started(jobs, started), name=f"tick started {entry.spec.id}"
        )
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)

    async def _started(self, jobs: list[Job], started: float) -> None:
        """Record that the held jobs started (then a crash interrupts them, as any job)."""
        try:
            await self._store.ticks_started([(job.id, job.epoch) for job in jobs], started)
        except StoreError as exc:
            ids = ", ".join(str(job.id) for job in jobs)
            logger.warning("cannot record that the jobs %s of a tick started: %s", ids, exc)

    def _cancelled(self, job_id: int) -> None:
        """A job was cancelled (a pause here or on another daemon): not to start at its tick."""
        for entry in self._entries.values():
            for early in entry.early:
                if early.held.pop(job_id, None) is not None and not early.held:
                    early.cancel()
            entry.early = [early for early in entry.early if early.held]

    async def _withdraw(self, entries: Iterable[_Entry]) -> None:
        """Cancel the jobs of ticks fired ahead for these entries (changed or removed by a
        reload, or stopping), so that no stale tick runs."""
        for entry in entries:
            withdrawn, entry.early = entry.early, []
            for early in withdrawn:
                early.cancel()
                for job in early.jobs:
                    if job.joined:
                        continue
                    with contextlib.suppress(JobNotFound, InvalidTransition, StoreError):
                        await self._store.cancel(job.id)
                logger.info(
                    'schedule "%s": its tick of %s, fired ahead, withdrawn',
                    entry.spec.id,
                    iso(early.tick, entry.spec.zone),
                )

    async def _fire_due(self, entry: _Entry, now: float) -> None:
        """Plan the due ticks of one schedule, fire them, and cover it until now."""
        spec, state = entry.spec, entry.state
        assert spec.cron is not None and self._up_since is not None
        after = state.covered_until if state.covered_until is not None else now
        limit = spec.max_catch_up + 1 if spec.catch_up == "all" else 2
        due = recent_ticks(spec.cron, spec.zone, after, now, limit)
        on_time_after = max(self._up_since, now - ON_TIME_WINDOW)
        catch_up, on_time = plan_firings(spec.catch_up, spec.max_catch_up, due, on_time_after)
        if missed := [tick for tick in due if tick != on_time]:
            self._log_missed(spec, after, missed[-1], catch_up)
        ticks = catch_up + ([on_time] if on_time is not None else [])
        report = None
        if missed and state.covered_until is not None and self._reports_missed():
            report = await asyncio.to_thread(missed_ticks, spec, state.covered_until, now, ticks)
        state.covered_until = max(after, now)  # here even if the store fails: no busy loop
        self._schedule_next(entry)
        if len(ticks) == 1:
            await self._fire(entry, ticks[0], covered_until=now, missed=report)
            return
        try:
            await self._store.cover_schedules(
                [spec.id], until=now, missed=[report] if report is not None else []
            )
        except StoreError as exc:
            logger.error('schedule "%s": cannot save what was dealt with: %s', spec.id, exc)
            return
        if ticks:  # "all": one run after another, without holding up the loop
            self._start_catch_up(entry, ticks)

    def _reports_missed(self) -> bool:
        return any("schedule.missed" in rule.events for rule in self._store.webhooks)

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
        return max(0.0, min(ticks) - self._early - self._clock()) if ticks else None

    # -- firing ----------------------------------------------------------------------------

    async def _fire(
        self,
        entry: _Entry,
        tick: float,
        *,
        regular: bool = True,
        covered_until: float | None = None,
        missed: MissedTicks | None = None,
        early: bool = False,
    ) -> list[FiredJob]:
        """Start each task of the schedule for `tick` (a task that cannot be started is
        logged and spares the others) in one write with the tick's record. Only `regular`
        firings are ticks (unique, moving last_tick); a trigger is not. An `early` one fires
        ahead of the tick (run_due). Where taskd traces, the firing is a span, and its jobs
        are its children."""
        if self._tracing is None:
            return await self._fire_traced(entry, tick, regular, covered_until, missed, None, early)
        spec = entry.spec
        with self._tracing.tick(spec.id, spec.expression, tick, regular=regular) as span:
            return await self._fire_traced(entry, tick, regular, covered_until, missed, span, early)

    async def _fire_traced(
        self,
        entry: _Entry,
        tick: float,
        regular: bool,
        covered_until: float | None,
        missed: MissedTicks | None,
        span: TickSpan | None,
        early: bool = False,
    ) -> list[FiredJob]:
        spec = entry.spec
        when = iso(tick, spec.zone)
        traceparent = span.traceparent if span is not None else None
        jobs = [
            new
            for task in spec.tasks
            if (new := self._job(spec, task, tick, traceparent)) is not None
        ]
        if regular and (spec.jitter or early):  # due at the tick (plus its offset)
            jobs = [msgspec.structs.replace(job, run_at=spec.due_at(tick)) for job in jobs]
        try:
            if early:  # its jobs held here, to start at the tick
                hold = self._submitter.hold(spec.tasks)
                fired = await self._store.fire_tick(
                    spec.id, tick, jobs, covered_until=covered_until, hold=hold
                )
            else:  # with a claim for our free slots, so that its jobs start in one commit
                fired = await self._submitter.claiming(
                    lambda claim: self._store.fire_tick(
                        spec.id,
                        tick if regular else None,
                        jobs,
                        covered_until=covered_until,
                        claim=claim if jobs else None,
                        missed=missed,
                    ),
                    lambda result: result.claimed,
                )
        except StoreError as exc:
            logger.error('schedule "%s": cannot fire the tick of %s: %s', spec.id, when, exc)
            if span is not None:
                span.failed(f"cannot fire the tick: {exc}")
            return []
        crash_point("tick-fired")
        if early:
            self._hold_early(entry, tick, fired)
        if span is not None:
            joined = sum(job.joined for job in fired.jobs)
            span.fired(fired.fired, [job.id for job in fired.jobs], joined)
        if not fired.fired:
            logger.debug('schedule "%s": the tick of %s has fired already', spec.id, when)
            return fired.jobs
        for job in fired.jobs:
            if job.joined:
                logger.info(
                    'schedule "%s": %s is still pending or running (job %d); the tick of %s '
                    "joined it",
                    spec.id,
                    job.task,
                    job.id,
                    when,
                )
            else:
                logger.debug('schedule "%s": job %d of %s for %s', spec.id, job.id, job.task, when)
        if self._on_fired is not None and not fired.held:  # else told as they start
            late = self._clock() - tick if regular and not spec.startup else None
            self._on_fired(spec.id, None if early else late, fired.jobs)
        return fired.jobs

    def _job(
        self, spec: ScheduleSpec, task: str, tick: float, traceparent: str | None
    ) -> NewJob | None:
        request = JobRequest(
            task,
            spec.tick_payload(tick),
            "schedule",
            single_flight=True,
            traceparent=traceparent,
        )
        try:
            return self._submitter.prepare(request)
        except (UnknownTask, PayloadInvalid, InvalidRequest) as exc:
            logger.error(
                'schedule "%s": cannot start %s for %s: %s',
                spec.id,
                task,
                iso(tick, spec.zone),
                exc,
            )
            return None

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
        for tick in ticks:
            for job in await self._fire(entry, tick):
                with contextlib.suppress(JobNotFound, StoreError):
                    await self._submitter.wait(job.id)

    # -- control ---------------------------------------------------------------------------

    async def schedules(self) -> list[ScheduleInfo]:
        """Every schedule, in the order of the configuration."""
        return await self._infos(list(self._entries.values()))

    async def pause(self, reference: str) -> ScheduleInfo:
        """Stop a schedule ticking until `resume`; remembered across restarts."""
        entry = self._find(reference)
        if await self._store.set_paused(entry.spec.id, True):
            logger.info('schedule "%s" paused', entry.spec.id)
        return (await self._infos([entry]))[0]

    async def resume(self, reference: str) -> ScheduleInfo:
        """Tick again from now; ticks that passed while paused are not caught up."""
        entry = self._find(reference)
        if await self._store.set_paused(entry.spec.id, False, covered_until=self._clock()):
            logger.info('schedule "%s" resumed', entry.spec.id)
        return (await self._infos([entry]))[0]  # reads its state, which wakes the loop

    async def trigger(self, reference: str) -> ScheduleInfo:
        """Fire a schedule now, paused or not; its regular ticks stay as they are."""
        entry = self._find(reference)
        fired = await self._fire(entry, self._clock(), regular=False)
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
        await self._refresh(entries)
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
