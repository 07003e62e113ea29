"""The other daemons sharing the job store: each publishes a digest of its schedules, and a
daemon says loudly when the others run different ones, since then ticks and their state
(shared under each schedule's id) disagree."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from taskd.schedules import ScheduleSpec, digest
from taskd.store import Store, StoreError

logger = logging.getLogger("taskd.daemon")  # the name operators know these lines by

CHECK_INTERVAL = 60.0  # how often the schedules of the other daemons are compared


class PeerSchedules:
    """Compares this worker's schedules with those of the other daemons on its store."""

    def __init__(self, store: Store, worker: str) -> None:
        self._store = store
        self._worker = worker
        self._digest = ""
        self._differing: frozenset[tuple[str, str]] = frozenset()

    async def announce(self, specs: Sequence[ScheduleSpec]) -> None:
        """Publish a digest of these schedules (at start-up and at each reload), and compare."""
        self._digest = digest(specs)
        try:
            await self._store.announce_schedules(self._worker, self._digest)
        except StoreError as exc:
            logger.warning("cannot compare the schedules with the other daemons: %s", exc)
            return
        await self.compare()

    async def compare_forever(self) -> None:
        while True:
            await asyncio.sleep(CHECK_INTERVAL)
            await self.compare()

    async def compare(self) -> None:
        """Say loudly when other daemons on the store run different schedules."""
        try:
            nodes = await self._store.nodes()
        except StoreError as exc:
            logger.warning("cannot compare the schedules with the other daemons: %s", exc)
            return
        mine = self._digest
        differing = frozenset(
            (node.id, node.schedules)
            for node in nodes
            if node.worker != self._worker and node.schedules not in (None, mine)
        )
        if differing and differing != self._differing:
            others = ", ".join(f"{node} has {theirs}" for node, theirs in sorted(differing))
            logger.error(
                "THE DAEMONS SHARING THIS JOB STORE RUN DIFFERENT SCHEDULES: this one's digest "
                "is %s, %s. Give every daemon the same [scheduled_tasks], [[schedule]] and "
                "timezone settings: a schedule only some of them know fires only while one of "
                "those runs, and its state (paused, last tick) is shared under its id",
                mine,
                others,
            )
        elif not differing and self._differing:
            logger.info("the daemons sharing this job store now run the same schedules")
        self._differing = differing
