"""Live events for `subscribe`: what the store tells (`JobEvents`: jobs that finished) and
what the daemon tells of the jobs it runs (`DaemonNews`), fanned out to subscriptions, each
with a bounded queue: a subscriber that reads too slowly gets a job's latest progress in
place of the ones it missed, and a count of the events let go.

Covered: state changes of every job this daemon runs or ends, and progress and log lines
of the jobs it runs. On a shared store, the end of a job another daemon ran reaches a
subscription to that job (the store reads it on its notice), "changed" events tell of the
others' writes, and the progress and log lines of the jobs they run are relayed: their
notice names the jobs, and while someone here subscribes to them this daemon reads them
from the store (`Relay`), at most one read per job at a time (notices that come during a
read make one more), at most RELAY_READS reads at once and RELAY_LINES lines a read; lines
past those are counted as dropped, as a slow reader's are.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable

from taskd.models import FINISHED_STATUSES, Job, LogLine, Progress
from taskd.news import DaemonNews
from taskd.protocol import JobEvent
from taskd.store.base import JobActivity, StoreError
from taskd.store.events import JobEvents

logger = logging.getLogger(__name__)

MAX_QUEUED = 256  # events a subscription holds for its reader
RELAY_READS = 4  # reads of other daemons' activity at once
RELAY_LINES = MAX_QUEUED // 2  # lines a read takes (the newest; older ones count as dropped),
# so that the progress read with them finds room in a subscription
MAX_TRACKED = 10_000  # running jobs whose task and last relayed line are remembered

ReadActivity = Callable[[int, tuple[int, int], int], Awaitable[JobActivity | None]]


class Subscription:
    """The events for one subscriber, in order, at most MAX_QUEUED of them."""

    def __init__(self, job_id: int | None, logs: bool, task: str | None = None) -> None:
        self.job_id = job_id
        self.logs = logs
        self.task = task
        self.sent = 0
        self.dropped = 0  # all told
        self._unreported = 0  # let go since the last "dropped" event
        self._queue: collections.deque[JobEvent] = collections.deque()
        self._ready = asyncio.Event()
        self.closed = False
        self.watch: asyncio.Future[Job | None] | None = None

    def offer(self, event: JobEvent) -> None:
        if self.closed:
            return
        if event.kind == "changed" and self._queue and self._queue[-1].kind == "changed":
            return  # one says as much as two
        if len(self._queue) >= MAX_QUEUED and not self._replace(event):
            self.dropped += 1
            self._unreported += 1
            return
        self._queue.append(event)
        self._ready.set()

    def lost(self, count: int) -> None:
        """`count` events for it were let go before they reached it (counted as dropped)."""
        if self.closed or count <= 0:
            return
        self.dropped += count
        self._unreported += count
        self._ready.set()

    def _replace(self, event: JobEvent) -> bool:
        """In a full queue, put a job's progress in place of its older one (or not at all)."""
        if event.kind != "progress":
            return False
        for index, queued in enumerate(self._queue):
            if queued.kind == "progress" and queued.job_id == event.job_id:
                del self._queue[index]
                self._queue.append(event)
                self.dropped += 1
                self._unreported += 1
                return True
        return False

    async def take(self) -> list[JobEvent]:
        """The events queued (waiting for one); [] once closed."""
        while not self._queue and not self._unreported and not self.closed:
            self._ready.clear()
            await self._ready.wait()
        events = list(self._queue)
        self._queue.clear()
        if self._unreported:
            events.append(JobEvent("dropped", dropped=self._unreported))
            self._unreported = 0
        self.sent += len(events)
        return [] if self.closed else events

    def take_queued(self) -> list[JobEvent]:
        """The events queued now, without waiting for one."""
        events = list(self._queue)
        self._queue.clear()
        self.sent += len(events)
        return events

    def close(self) -> None:
        self.closed = True
        self._queue.clear()
        self._ready.set()
        if self.watch is not None:
            self.watch.cancel()


class LiveEvents:
    """Turns the store's events and the daemon's news into `JobEvent`s for subscriptions."""

    def __init__(
        self, events: JobEvents, news: DaemonNews, read: ReadActivity | None = None
    ) -> None:
        self._events = events
        self._all: set[Subscription] = set()
        self._by_job: dict[int, set[Subscription]] = {}
        self._tasks: dict[int, str] = {}  # the task of jobs running, as far as known
        self._latest: dict[int, Progress] = {}  # the attempt's latest progress, as far as known
        self._relay = Relay(self, read) if read is not None else None
        events.on_finished(self._state)
        news.on_started(self._state)
        news.on_progress(self._progress)
        news.on_log(self._log)
        news.on_change(self._changed)
        if self._relay is not None:
            events.on_activity(self._relay.heard)

    def subscribe(self, job_id: int | None, logs: bool, task: str | None = None) -> Subscription:
        subscription = Subscription(job_id, logs, task)
        if job_id is None:
            self._all.add(subscription)
        else:
            self._by_job.setdefault(job_id, set()).add(subscription)
            self._watch(subscription, job_id)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        subscription.close()
        self._all.discard(subscription)
        if subscription.job_id is not None:
            subscribers = self._by_job.get(subscription.job_id)
            if subscribers is not None:
                subscribers.discard(subscription)
                if not subscribers:
                    del self._by_job[subscription.job_id]

    async def close(self) -> None:
        if self._relay is not None:
            await self._relay.close()

    def interested(self, job_id: int) -> tuple[bool, bool]:
        """Whether anyone here wants the job's progress, and its log lines."""
        subscribers = [*self._all, *self._by_job.get(job_id, ())]
        return bool(subscribers), any(subscription.logs for subscription in subscribers)

    def _watch(self, subscription: Subscription, job_id: int) -> None:
        """Wait for the job's end, so that a shared store reads it when another daemon ends
        it (its `finished` then reaches us); after a resync, watch again."""
        watch = self._events.watch(job_id)
        subscription.watch = watch

        def again(future: asyncio.Future[Job | None]) -> None:
            if subscription.closed or future.cancelled() or future.exception() is not None:
                return
            if future.result() is None:  # the store may have missed its end: read again
                subscription.offer(JobEvent("changed", job_id))
                self._watch(subscription, job_id)

        watch.add_done_callback(again)

    def _subscribers(self, job_id: int, task: str | None) -> list[Subscription]:
        return [
            subscription
            for subscription in (*self._all, *self._by_job.get(job_id, ()))
            if subscription.task is None or subscription.task == task
        ]

    def _publish(self, job_id: int, event: JobEvent) -> None:
        for subscription in self._subscribers(job_id, event.task):
            if event.kind != "log" or subscription.logs:
                subscription.offer(event)

    def latest_progress(self, job_id: int) -> JobEvent | None:
        """The latest progress of the job's attempt heard here, as an event (None: none)."""
        progress = self._latest.get(job_id)
        if progress is None:
            return None
        return JobEvent("progress", job_id, task=self._tasks.get(job_id), progress=progress)

    def _state(self, job: Job) -> None:
        self._latest.pop(job.id, None)  # an attempt starts or the job ends: none yet
        if job.status in FINISHED_STATUSES:
            self._tasks.pop(job.id, None)
            if self._relay is not None:
                self._relay.forget(job.id)
        else:
            self.know_task(job.id, job.task)
        if self._all or job.id in self._by_job:  # told of every start and end: mostly to nobody
            self._publish(job.id, JobEvent("state", job.id, task=job.task, status=job.status))

    def knows(self, job_id: int) -> bool:
        """Whether the job is running as far as heard here (its progress would be known)."""
        return job_id in self._tasks

    def know_task(self, job_id: int, task: str) -> None:
        if job_id not in self._tasks and len(self._tasks) >= MAX_TRACKED:
            del self._tasks[next(iter(self._tasks))]
        self._tasks[job_id] = task

    def _progress(self, job_id: int, progress: Progress) -> None:
        if job_id not in self._latest and len(self._latest) >= MAX_TRACKED:
            del self._latest[next(iter(self._latest))]
        self._latest[job_id] = progress
        task = self._tasks.get(job_id)
        self._publish(job_id, JobEvent("progress", job_id, task=task, progress=progress))

    def _log(self, job_id: int, line: LogLine) -> None:
        self._publish(job_id, JobEvent("log", job_id, task=self._tasks.get(job_id), line=line))

    def relayed(self, job_id: int, activity: JobActivity, progress: bool) -> None:
        """What another daemon's job did, read from the store, to the subscribers here."""
        self.know_task(job_id, activity.task)
        if activity.skipped:
            for subscription in self._subscribers(job_id, activity.task):
                if subscription.logs:
                    subscription.lost(activity.skipped)
        for line in activity.lines:
            self._log(job_id, line)
        if progress and activity.progress is not None:
            self._progress(job_id, activity.progress)

    def _changed(self) -> None:
        for subscription in self._all:
            subscription.offer(JobEvent("changed"))


class Relay:
    """Reads the progress and log lines of jobs other daemons run, for the subscribers here
    (on a shared store): only of the jobs someone here subscribes to, one read per job at a
    time (what is heard meanwhile makes one more read), RELAY_READS at once."""

    def __init__(self, live: LiveEvents, read: ReadActivity) -> None:
        self._live = live
        self._read = read
        self._after: dict[int, tuple[int, int]] = {}  # the last line relayed, by job
        self._wanted: dict[int, tuple[int, int, bool]] = {}  # reads to make: after, progress
        self._reading: set[int] = set()
        self._turns = asyncio.Semaphore(RELAY_READS)
        self._tasks: set[asyncio.Task[None]] = set()

    def heard(self, job_id: int, epoch: int, seq: int, progress: bool) -> None:
        wants_progress, wants_logs = self._live.interested(job_id)
        if not wants_progress:
            return
        after = self._after.get(job_id)
        if after is None or after[0] < epoch:
            # New to us (or a new attempt): from this batch's first line on.
            after = (epoch, seq - 1) if seq >= 0 else (epoch, 1 << 62)
        if not wants_logs:
            after = (epoch, 1 << 62)  # no lines: progress only
        wanted = self._wanted.get(job_id)
        if wanted is not None:
            after = min(after, wanted[:2])
            progress = progress or wanted[2]
        self._wanted[job_id] = (after[0], after[1], progress)
        if job_id not in self._reading:
            self._start(job_id)

    def forget(self, job_id: int) -> None:
        self._after.pop(job_id, None)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)

    def _start(self, job_id: int) -> None:
        self._reading.add(job_id)
        task = asyncio.create_task(self._relay(job_id), name=f"taskd-relay-{job_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay(self, job_id: int) -> None:
        try:
            while (wanted := self._wanted.pop(job_id, None)) is not None:
                epoch, seq, progress = wanted
                known = self._after.get(job_id)  # lines relayed since that notice came
                if known is not None and known > (epoch, seq):
                    epoch, seq = known
                async with self._turns:
                    try:
                        activity = await self._read(job_id, (epoch, seq), RELAY_LINES)
                    except StoreError as exc:
                        logger.info(
                            "cannot read what job %d did on another daemon: %s", job_id, exc
                        )
                        return
                if activity is None or activity.status in FINISHED_STATUSES:
                    self._after.pop(job_id, None)
                    if activity is None:
                        return
                elif activity.lines:
                    last = activity.lines[-1]
                    self._remember(job_id, (last.epoch, last.seq))
                elif seq < (1 << 62):
                    self._remember(job_id, (epoch, seq))
                self._live.relayed(job_id, activity, progress)
        finally:
            self._reading.discard(job_id)

    def _remember(self, job_id: int, after: tuple[int, int]) -> None:
        if job_id not in self._after and len(self._after) >= MAX_TRACKED:
            del self._after[next(iter(self._after))]
        self._after[job_id] = after
