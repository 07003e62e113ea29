"""The methods that tell how things stand: the daemon and the store as a whole (`status`),
why a job is not running yet (`why`), and whether the store is healthy (HTTP's /healthz)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Protocol

import msgspec

from taskd import protocol
from taskd.logqueue import dropped_lines
from taskd.models import (
    ConnectionStats,
    HttpStats,
    Status,
    ThreadStats,
    WorkerSlots,
    limit_key_of,
)
from taskd.protocol import MAX_LIST, StatusParams, WhyParams, WhyResult
from taskd.service.dispatch import Binding, bind
from taskd.service.jobs import get_job
from taskd.shared_limits import keyed_uses, limit_uses
from taskd.store import JobFilter, Store, StoreError
from taskd.tasks import TaskRegistry
from taskd.why import Facts, LimitFact, explain


class DaemonInfo(msgspec.Struct, frozen=True):
    node: str
    version: str
    pid: int
    started_at: float
    database: str
    socket: str
    tasks_dir: str
    workers: int


class SlotState(msgspec.Struct, frozen=True):
    """This daemon's workers: how many are busy, and whether it is stopping; its worker id
    in the store, the jobs it runs, and those it holds that do not run (WorkerSlots)."""

    busy: int
    workers: int
    stopping: bool
    worker: str | None = None
    running: frozenset[int] = frozenset()
    claimed_ahead: int = 0
    ending: int = 0


class Node(Protocol):
    """What the daemon tells of its own parts as they run."""

    def slots(self) -> SlotState: ...

    def connections(self) -> ConnectionStats | None: ...

    def http(self) -> HttpStats | None: ...

    def threads(self) -> ThreadStats | None: ...


class StatusMethods:
    """This daemon and the store as a whole."""

    def __init__(
        self,
        store: Store,
        tasks: TaskRegistry,
        info: DaemonInfo,
        node: Node,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._tasks = tasks
        self._info = info
        self._node = node
        self._clock = clock

    def bindings(self) -> list[Binding]:
        return [bind(protocol.STATUS, self.status), bind(protocol.WHY, self.why)]

    async def why(self, params: WhyParams) -> WhyResult:
        """Why the job is not running yet, or what it is doing; and its timeline."""
        job = await get_job(self._store, params.id)
        task = self._tasks.get(job.task)
        running, key_value, key_start = 0, None, None
        if job.status == "pending" and task is not None and task.limit_key is not None:
            # Its limits count per value of its limit_key: this job's value's.
            key_value = limit_key_of(job.payload, task.limit_key)
            running, key_start = await self._store.key_state(
                job.task, key_value, task.rate_interval
            )
        elif job.status == "pending" and task is not None and task.concurrency is not None:
            counts = {entry.task: entry.counts for entry in await self._store.counts()}
            running = counts.get(job.task, {}).get("running", 0)
        parents = []
        if job.status == "pending" and job.blocked:
            for parent_id in job.parents:
                parent = await self._store.get(parent_id)
                if parent is not None and parent.status in ("pending", "running"):
                    parents.append((parent.id, parent.task, parent.status))
        slots = self._node.slots()
        paused = await self._store.paused_tasks() if job.status == "pending" else {}
        rate_limit = task.rate_limit if task is not None else None
        starts: Mapping[str, float] = {}
        if key_value is not None:
            starts = {job.task: key_start} if key_start is not None else {}
        elif job.status == "pending" and task is not None and task.rate_interval is not None:
            starts = await self._store.rate_limit_starts({job.task: task.rate_interval})
        limits: list[LimitFact] = []
        if job.status == "pending" and task is not None and task.limits:
            limits = [
                LimitFact(use.name, use.running, use.concurrency, use.rate, use.next_start)
                for use in await limit_uses(self._store, self._tasks)
                if use.name in task.limits
            ]
        busy, workers, daemons = slots.busy, slots.workers, 1
        if job.status == "pending":  # the other daemons sharing the store take jobs too
            for node in await self._store.nodes():
                if node.worker != slots.worker:
                    busy, workers, daemons = busy + node.running, workers + node.slots, daemons + 1
        facts = Facts(
            parents=tuple(parents),
            now=await self._store.clock(),  # run_at and the rest are the store's instants
            paused_since=paused.get(job.task),
            rate_limit=rate_limit,
            next_start=starts.get(job.task),
            task_loaded=task is not None,
            concurrency=task.concurrency if task is not None else None,
            task_running=running,
            busy=busy,
            workers=workers,
            stopping=slots.stopping,
            daemons=daemons,
            limits=tuple(limits),
            limit_key=task.limit_key if task is not None else None,
            key_value=key_value,
        )
        return explain(job, facts)

    async def status(self, params: StatusParams) -> Status:
        """This daemon, and the store as a whole: every node, every running job."""
        now = self._clock()
        per_task = await self._store.counts()
        totals: dict[str, int] = {}
        for entry in per_task:
            for status, count in entry.counts.items():
                totals[status] = totals.get(status, 0) + count
        ages = [t.oldest_pending_age for t in per_task if t.oldest_pending_age is not None]
        due = [t.next_due_at for t in per_task if t.next_due_at is not None]
        info = self._info
        running = await self._store.list_jobs(JobFilter(statuses=["running"], limit=MAX_LIST))
        slots = self._node.slots()
        # Of this daemon's jobs, those that run now: the store also counts as running those
        # claimed ahead and those whose outcome is being written.
        running = [j for j in running if j.worker != slots.worker or j.id in slots.running]
        return Status(
            version=info.version,
            pid=info.pid,
            started_at=info.started_at,
            uptime=now - info.started_at,
            database=info.database,
            socket=info.socket,
            tasks_dir=info.tasks_dir,
            workers=info.workers,
            counts=totals,
            running=running,
            tasks=per_task,
            oldest_pending_age=max(ages) if ages else None,
            next_due_at=min(due) if due else None,
            node=info.node,
            nodes=await self._store.nodes(),
            connections=self._node.connections(),
            http=self._node.http(),
            threads=self._node.threads(),
            slots=WorkerSlots(slots.busy, slots.claimed_ahead, slots.ending),
            store_failing=self._store.health.report(),
            log_dropped=dropped_lines(),
            paused_tasks=dict(await self._store.paused_tasks()),
            limits=await limit_uses(self._store, self._tasks),
            keyed=await keyed_uses(self._store, self._tasks),
        )

    async def healthy(self) -> None:
        """Return if the job store answers a cheap read and its writes go through; raise
        StoreError if not."""
        if (failing := self._store.health.report()) is not None:
            raise StoreError(failing.error)
        await self._store.queue_depth()
