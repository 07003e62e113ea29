"""Live events for `subscribe`: what the store tells (`JobEvents`: jobs that finished) and
what the daemon tells of the jobs it runs (`DaemonNews`), fanned out to subscriptions, each
with a bounded queue: a subscriber that reads too slowly gets a job's latest progress in
place of the ones it missed, and a count of the events let go.

Covered: state changes of every job this daemon runs or ends, and progress and log lines
of the jobs it runs. On a shared store, the end of a job another daemon ran reaches a
subscription to that job (the store reads it on its notice), and "changed" events tell of
the others' writes; their jobs' progress and log lines are not relayed (read them from the
store: `job`, `logs`).
"""

from __future__ import annotations

import asyncio
import collections

from taskd.models import Job, LogLine, Progress
from taskd.news import DaemonNews
from taskd.protocol import JobEvent
from taskd.store.events import JobEvents

MAX_QUEUED = 256  # events a subscription holds for its reader


class Subscription:
    """The events for one subscriber, in order, at most MAX_QUEUED of them."""

    def __init__(self, job_id: int | None, logs: bool) -> None:
        self.job_id = job_id
        self.logs = logs
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
        while not self._queue and not self.closed:
            self._ready.clear()
            await self._ready.wait()
        events = list(self._queue)
        self._queue.clear()
        if self._unreported:
            events.append(JobEvent("dropped", dropped=self._unreported))
            self._unreported = 0
        self.sent += len(events)
        return [] if self.closed else events

    def close(self) -> None:
        self.closed = True
        self._queue.clear()
        self._ready.set()
        if self.watch is not None:
            self.watch.cancel()


class LiveEvents:
    """Turns the store's events and the daemon's news into `JobEvent`s for subscriptions."""

    def __init__(self, events: JobEvents, news: DaemonNews) -> None:
        self._events = events
        self._all: set[Subscription] = set()
        self._by_job: dict[int, set[Subscription]] = {}
        events.on_finished(self._state)
        news.on_started(self._state)
        news.on_progress(self._progress)
        news.on_log(self._log)
        news.on_change(self._changed)

    def subscribe(self, job_id: int | None, logs: bool) -> Subscription:
        subscription = Subscription(job_id, logs)
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

    def _publish(self, job_id: int, event: JobEvent) -> None:
        for subscription in (*self._all, *self._by_job.get(job_id, ())):
            if event.kind != "log" or subscription.logs:
                subscription.offer(event)

    def _state(self, job: Job) -> None:
        self._publish(job.id, JobEvent("state", job.id, task=job.task, status=job.status))

    def _progress(self, job_id: int, progress: Progress) -> None:
        self._publish(job_id, JobEvent("progress", job_id, progress=progress))

    def _log(self, job_id: int, line: LogLine) -> None:
        self._publish(job_id, JobEvent("log", job_id, line=line))

    def _changed(self) -> None:
        for subscription in self._all:
            subscription.offer(JobEvent("changed"))
