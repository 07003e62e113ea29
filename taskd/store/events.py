"""The store's notifications to its daemon: a job finished, work is due, a job was cancelled,
"read again" after a lost connection, and "changed" (for status lines). The daemon's own
news of the jobs it runs (started, progress, log lines) is not the store's: taskd.news.

A backend raises them after it commits (its own writes, and for a shared store those of
other daemons, from its database notifications); which and when is the contract in
`taskd.store.base`. Listeners subscribe here; nobody polls the store to find out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Container, Iterable

from taskd.listeners import Listeners as _Listeners
from taskd.models import Job


class JobEvents:
    """Futures for callers waiting on a job's end, and listeners of the other notifications."""

    def __init__(self) -> None:
        self._waiters: dict[int, list[asyncio.Future[Job | None]]] = {}
        self._finished = _Listeners("finished jobs")
        self._due = _Listeners("due work")
        self._cancelled = _Listeners("cancellations")
        self._resync = _Listeners("resyncs")
        self._changed = _Listeners("changes")
        self._activity = _Listeners("activity elsewhere")

    # -- subscribing ---------------------------------------------------------------------

    def watch(self, job_id: int) -> asyncio.Future[Job | None]:
        """A future that gets the job once it has finished or an attempt of it has failed
        (`retrying`), or None after a resync (the store may have missed its end: read it
        again).

        Register before reading the job's state, so that no finish falls between the two.
        A cancelled future (the caller stopped waiting) is forgotten.
        """
        future: asyncio.Future[Job | None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, []).append(future)
        future.add_done_callback(lambda f: self._forget(job_id, f))
        return future

    def watching(self, job_id: int) -> bool:
        """Whether anyone waits for the job's end (a shared store then reads it for them)."""
        return job_id in self._waiters

    def on_finished(self, listener: Callable[[Job], None]) -> None:
        self._finished.add(listener)

    def on_due(self, listener: Callable[[float], None]) -> None:
        """`listener(delay)`: jobs are claimable in `delay` seconds (0: now)."""
        self._due.add(listener)

    def on_cancel(self, listener: Callable[[int], None]) -> None:
        self._cancelled.add(listener)

    def on_resync(self, listener: Callable[[], None]) -> None:
        self._resync.add(listener)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` whenever jobs are added, started or ended (it must be cheap)."""
        self._changed.add(listener)

    def on_activity(self, listener: Callable[[int, int, int, bool], None]) -> None:
        """`listener(job_id, epoch, seq, progress)`: another daemon recorded progress or log
        lines (from line `seq` of attempt `epoch`; -1: none) of a job it runs."""
        self._activity.add(listener)

    def _forget(self, job_id: int, future: asyncio.Future[Job | None]) -> None:
        waiters = self._waiters.get(job_id)
        if waiters is None:
            return
        with contextlib.suppress(ValueError):
            waiters.remove(future)
        if not waiters:
            del self._waiters[job_id]

    # -- raised by the store -------------------------------------------------------------

    def finished(self, job: Job) -> None:
        """The job has ended: wake everyone waiting for it."""
        self.finished_all([job])

    def finished_all(self, jobs: Iterable[Job]) -> None:
        """These jobs have ended (in one transaction): wake everyone waiting for each; the
        listeners of changes hear of them once."""
        ended = False
        for job in jobs:
            for future in self._waiters.pop(job.id, ()):
                if not future.done():
                    future.set_result(job)
            self._finished(job)
            ended = True
        if ended:
            self._changed()

    def retrying(self, job: Job) -> None:
        """An attempt of the job failed and it waits for the next: wake its waiters, who
        read it again (those following its attempts report the failure)."""
        for future in self._waiters.pop(job.id, ()):
            if not future.done():
                future.set_result(job)

    def fail_waiting(
        self, error: Callable[[int], BaseException], spare: Container[int] = ()
    ) -> int:
        """Wake the callers waiting for jobs, but for those in `spare`, with `error(job_id)`
        (the daemon cannot start their jobs now); returns how many were woken."""
        woken = 0
        for job_id in [job_id for job_id in self._waiters if job_id not in spare]:
            for future in self._waiters.pop(job_id):
                if not future.done():
                    future.set_exception(error(job_id))
                    woken += 1
        return woken

    def due(self, delay: float) -> None:
        """Jobs are claimable in `delay` seconds (0: now)."""
        self._due(max(0.0, delay))
        self._changed()

    def cancel_requested(self, job_id: int) -> None:
        """The job was cancelled: whoever runs it must stop it."""
        self._cancelled(job_id)

    def resync(self) -> None:
        """Notifications may have been missed: every waiter and listener reads again."""
        waiters, self._waiters = self._waiters, {}
        for futures in waiters.values():
            for future in futures:
                if not future.done():
                    future.set_result(None)
        self._resync()
        self._changed()

    def activity(self, job_id: int, epoch: int, seq: int, progress: bool) -> None:
        """Another daemon recorded progress or log lines of a job it runs."""
        self._activity(job_id, epoch, seq, progress)

    def changed(self) -> None:
        """The queue or the running jobs changed (for status lines)."""
        self._changed()
