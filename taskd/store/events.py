"""Notifications a store gives after it commits: a job finished, new work is pending.

A SQLite store raises them itself after each commit; a shared backend raises them from
its database notifications. Nobody polls the store to find out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from taskd.models import Job


class JobEvents:
    """Futures for callers waiting on a job's end, and the executor's wake-up call."""

    def __init__(self) -> None:
        self._waiters: dict[int, list[asyncio.Future[Job]]] = {}
        self._work = asyncio.Event()
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` whenever jobs are added, started or ended (it must be cheap)."""
        self._listeners.append(listener)

    def changed(self) -> None:
        """Tell the listeners that the queue or the running jobs changed."""
        for listener in self._listeners:
            listener()

    def watch(self, job_id: int) -> asyncio.Future[Job]:
        """A future that gets the job once it has finished.

        Register before reading the job's state, so that no finish falls between the two.
        A cancelled future (the caller stopped waiting) is forgotten.
        """
        future: asyncio.Future[Job] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, []).append(future)
        future.add_done_callback(lambda f: self._forget(job_id, f))
        return future

    def _forget(self, job_id: int, future: asyncio.Future[Job]) -> None:
        waiters = self._waiters.get(job_id)
        if waiters is None:
            return
        with contextlib.suppress(ValueError):
            waiters.remove(future)
        if not waiters:
            del self._waiters[job_id]

    def finished(self, job: Job) -> None:
        """Tell everyone waiting for this job that it has ended."""
        for future in self._waiters.pop(job.id, ()):
            if not future.done():
                future.set_result(job)
        self.changed()

    def nudge(self) -> None:
        """Tell the executor to look at the queue again: jobs were added, a slot freed."""
        self._work.set()
        self.changed()

    async def wait_for_nudge(self, timeout: float | None) -> None:
        """Return when nudged or after `timeout` seconds, whichever comes first."""
        if not self._work.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._work.wait(), timeout)
        self._work.clear()

    @property
    def waiting(self) -> int:
        return sum(len(w) for w in self._waiters.values())
