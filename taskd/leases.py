"""Keeping this worker's place in the store: every lease/3 its heartbeat and the leases of
the jobs it holds are renewed, the jobs the store says it lost are stopped, and the jobs of
workers that went away are taken back, until the executor has drained."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from taskd.executor import Executor
from taskd.models import counted
from taskd.slots import Slots
from taskd.store import Store, StoreError
from taskd.tasks import TaskRegistry

logger = logging.getLogger("taskd.executor")  # the name operators know these lines by


class LeaseKeeper:
    """Renews the leases of one worker's jobs while its executor runs."""

    def __init__(
        self,
        store: Store,
        slots: Slots,
        executor: Executor,
        tasks: TaskRegistry,
        *,
        quarantine_after: int,
    ) -> None:
        self._store = store
        self._slots = slots
        self._executor = executor
        self._tasks = tasks  # their on_failure hooks, for the jobs a recovery fails
        self._quarantine_after = quarantine_after

    async def run(self) -> None:
        """Renew, stop what was lost, recover what others left, every lease/3 until drained."""
        closed = self._executor.closed
        while not closed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closed.wait(), self._slots.lease / 3)
            if closed.is_set():
                return
            try:
                await self._renew()
                recovered = await self._store.recover(
                    self._quarantine_after, self._tasks.failure_hooks()
                )
            except StoreError as exc:
                logger.error("cannot renew job leases: %s", exc)
                continue
            if recovered:
                logger.warning(
                    "took back %s of daemons that went away: %s",
                    counted(len(recovered), "job"),
                    ", ".join(f"job {job.id} {job.task} ({job.status})" for job in recovered),
                )

    async def _renew(self) -> None:
        held = self._executor.held_jobs()
        slots = self._slots
        for job_id in await self._store.renew(slots.worker, held, slots.lease):
            if self._executor.lose(job_id):
                logger.warning(
                    "job %d: this daemon no longer holds it (cancelled, or taken over after "
                    "its lease expired); stopping it",
                    job_id,
                )
