"""This daemon's worker slots: the jobs that hold one, the jobs claimed to take the next that
frees, the claims reserved for free slots in other writes, and the slots lent by jobs that
wait for another job.

Built before the executor and the submitter and given to both: the executor claims for the
free slots in its own writes, the submitter (taskd.submit.Claimer) in the insert of a run or
a tick, so that it starts with one commit; a running task lends its slot (taskd.runtime)
while it waits in `ctx.run_task`, so that waiting cannot deadlock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from taskd.models import Job
from taskd.shared_limits import store_limits
from taskd.store import Claimed, ClaimRequest, Store, StoreError
from taskd.tasks import TaskRegistry

logger = logging.getLogger(__name__)

SHORT_JOB = 0.02  # seconds: attempts shorter than this on average are claimed ahead
# Attempts shorter than this on average (a commit takes longer) are claimed further ahead:
# at least AHEAD_PER_SLOT per slot, and as many as take AHEAD_TIME per slot (at most
# MOST_AHEAD_PER_SLOT), so that the slots keep running through a whole store write, and the
# outcomes that write records and the jobs it claims come in bigger batches (fewer
# transactions, statements and syncs per job: a transaction costs the writer about a
# millisecond of CPU besides its jobs). A more urgent job that comes meanwhile waits for
# the jobs claimed ahead of its slot: under 10 ms.
VERY_SHORT_JOB = 0.0025
AHEAD_PER_SLOT = 4
AHEAD_TIME = VERY_SHORT_JOB * AHEAD_PER_SLOT
MOST_AHEAD_PER_SLOT = 32


class Slots:
    """The slots of one worker: `workers` of them, each held by at most one running job."""

    def __init__(
        self, store: Store, tasks: TaskRegistry, *, worker: str, workers: int, lease: float
    ) -> None:
        self._store = store
        self._tasks = tasks
        self.worker = worker
        self.workers = workers
        self.lease = lease
        self.busy = 0  # slots taken: running jobs that do not wait for another job
        self.running: dict[int, Job] = {}  # started here and not ended
        self._lent: set[int] = set()  # of them, those waiting for another job
        # Claimed ahead of the free slots, to start the moment one frees: (order, job) by
        # order negated, the most urgent last (popped in place).
        self._ready: list[tuple[tuple[int, float, int], Job]] = []
        self._typical = SHORT_JOB  # seconds an attempt takes, as a moving average
        self._reserved = 0  # jobs asked for by claims in flight in other writes
        self.claims_landed = asyncio.Event()  # set while no such claim is in flight
        self.claims_landed.set()
        self.limited: set[str] = set()  # tasks with a concurrency limit at the last claim
        self.stopping = False
        self.wake = asyncio.Event()  # the executor looks again: a slot, a job or work came
        self._on_claimed: Callable[[list[Job]], None] | None = None

    # -- claims --------------------------------------------------------------------------

    def wanted(self) -> int:
        """How many jobs to claim now: while slots are free, enough to fill them and a few
        more (`prefetch`) that start as soon as a slot frees. With no slot free nothing is
        claimed, so that a job due later but more urgent is not queued behind jobs claimed
        before it came."""
        free = self.workers - self.busy
        if self.stopping or free <= 0:
            return 0
        return max(0, free + self._ahead() - len(self._ready) - self._reserved)

    def _ahead(self) -> int:
        """How many jobs to claim beyond the free slots. Only while attempts are short (a few
        milliseconds, like a commit): then a slot that frees starts the next job at once
        instead of waiting for a claim; for longer jobs that wait is nothing, and jobs
        claimed ahead would wait here while another daemon on the same store has a slot."""
        if self._typical >= SHORT_JOB:
            return 0
        if self._typical >= VERY_SHORT_JOB:
            return self.workers
        per_slot = min(MOST_AHEAD_PER_SLOT, int(AHEAD_TIME / max(self._typical, 1e-6)))
        return self.workers * max(AHEAD_PER_SLOT, per_slot)

    def request(self, want: int) -> ClaimRequest:
        """A claim of `want` jobs, with the concurrency limits of the tasks loaded now."""
        limits = {t.name: t.concurrency for t in self._tasks if t.concurrency is not None}
        rates = {t.name: t.rate_interval for t in self._tasks if t.rate_interval is not None}
        request = ClaimRequest(
            self.worker, want, self.lease, limits, rates, store_limits(self._tasks),
            frozenset(self._tasks.limit_keys()),
        )  # fmt: skip
        self.limited = set(request.limited())
        return request

    def claim_request(self) -> ClaimRequest | None:
        """A claim for the free slots, to make in another write (a run's insert, a tick's):
        taskd.submit.Claimer. Its jobs are reserved until `accept`."""
        want = self.wanted()
        if want == 0:
            return None
        self._reserved += want
        self.claims_landed.clear()
        return self.request(want)

    def accept(self, request: ClaimRequest, claimed: Claimed | None) -> None:
        """The claim made in another write has landed: hand what it took to the executor."""
        self._reserved -= request.limit
        if self._reserved == 0:
            self.claims_landed.set()
        if claimed is not None and self._on_claimed is not None:
            self._on_claimed(claimed.jobs)

    def deliver(self, jobs: list[Job]) -> None:
        """Jobs held for this worker (a tick fired ahead of its time), to start now."""
        if self._on_claimed is not None:
            self._on_claimed(jobs)

    def on_claimed(self, listener: Callable[[list[Job]], None]) -> None:
        """`listener(jobs)`: the jobs a claim made in another write took (the executor)."""
        self._on_claimed = listener

    # -- jobs claimed ahead --------------------------------------------------------------

    def add_ready(self, jobs: list[Job]) -> None:
        """Jobs claimed, to start as slots free. A claim's come in claim order: sorting
        merges them with those claimed before (two runs) rather than moving the list
        for each."""
        self._ready += [((-job.priority, -job.run_at, -job.id), job) for job in jobs]
        self._ready.sort()

    def next_ready(self) -> Job | None:
        """The most urgent job claimed ahead, if a slot is free for it."""
        if self._ready and self.busy < self.workers and not self.stopping:
            return self._ready.pop()[1]
        return None

    def drop_ready(self, job_id: int) -> bool:
        """Forget a job claimed ahead that this worker no longer holds (it is not started)."""
        entries = [entry for entry in self._ready if entry[1].id == job_id]
        if entries:
            self._ready.remove(entries[0])
        return bool(entries)

    def ready_ids(self) -> list[int]:
        return [job.id for _, job in self._ready]

    @property
    def claimed_ahead(self) -> int:
        """Jobs claimed to start the moment a slot frees."""
        return len(self._ready)

    def stop(self) -> list[Job]:
        """Claim nothing more: the jobs claimed ahead, to go back to the queue."""
        self.stopping = True
        jobs = [job for _, job in self._ready]
        self._ready.clear()
        return jobs

    # -- running jobs --------------------------------------------------------------------

    def start(self, job: Job) -> None:
        """The job takes a slot."""
        self.running[job.id] = job
        self.busy += 1

    def end(self, job: Job) -> None:
        """The job's attempt has ended: its slot is free (a slot it lent is back already)."""
        if self.running.get(job.id) is job:  # not a later claim of the same job
            del self.running[job.id]
        self.busy -= 1

    def took(self, seconds: float) -> None:
        """An attempt took this long (for the moving average of `_ahead`)."""
        self._typical += (seconds - self._typical) / 8

    @contextlib.asynccontextmanager
    async def lend(self, job_id: int) -> AsyncIterator[None]:
        """While a job waits for another, it holds no slot and counts against no limit,
        so that waiting cannot deadlock."""
        job = self.running.get(job_id)
        if job is None or job_id in self._lent:
            yield
            return
        await self._store.set_waiting(job.id, job.epoch, self.worker, True)
        self._lent.add(job_id)
        self.busy -= 1
        self.wake.set()
        try:
            yield
        finally:
            self._lent.discard(job_id)
            self.busy += 1
            try:
                await self._store.set_waiting(job.id, job.epoch, self.worker, False)
            except StoreError as exc:  # it still holds its slot here; the store learns at its end
                logger.warning("job %d: cannot mark it as running again: %s", job.id, exc)
