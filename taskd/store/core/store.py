"""The store's methods, written once: what each write and read runs, through which writer,
with its errors translated and its end reported to the store's health."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import wraps
from typing import Any, ClassVar, TypeVar, cast

from taskd.models import (
    FINISHED_STATUSES,
    BatchInfo,
    Hook,
    Job,
    JobLogs,
    JobStatus,
    NodeInfo,
    TaskCounts,
    WebhookRule,
)
from taskd.store.base import (
    Claimed,
    ClaimRequest,
    Finished,
    Hold,
    Inserted,
    InvalidTransition,
    JobActivity,
    JobFilter,
    JobNotFound,
    LimitState,
    LogNote,
    MissedTicks,
    NewJob,
    Outcome,
    ProgressNote,
    ScheduleState,
    SharedLimit,
    StoreError,
    TickFired,
)
from taskd.store.batching import Finish, GroupCommit
from taskd.store.core import activity, batches, flow, jobs, keys, nodes, reads, retention, schedules
from taskd.store.core.dialect import Operation, Tx
from taskd.store.core.jobs import PRUNE_SLICE
from taskd.store.core.notes import Notes, tell
from taskd.store.core.statements import Steps
from taskd.store.events import JobEvents
from taskd.store.health import StoreHealth

logger = logging.getLogger(__name__)

T = TypeVar("T")
Method = TypeVar("Method", bound=Callable[..., Awaitable[Any]])
# Runs a batch's operations, each with its items, in one transaction that it commits; what
# they noted is in the notes it is given.
Transact = Callable[[list[tuple[Operation, list[Any]]], Notes], Awaitable[list[list[Any]]]]


def store_read(method: Method) -> Method:
    """The driver's exceptions leave the store as StoreError."""

    @wraps(method)
    async def wrapper(store: SqlStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return await method(store, *args, **kwargs)
        except StoreError:
            raise
        except Exception as exc:
            if (error := store._store_error(exc)) is None:
                raise
            raise error from exc

    return cast(Method, wrapper)


def store_write(method: Method) -> Method:
    """As `store_read`, and each write's end is reported to the store's health (a refusal, such
    as a job in another state, is an answer, not a failure of the store)."""

    @wraps(method)
    async def wrapper(store: SqlStore, *args: Any, **kwargs: Any) -> Any:
        try:
            result = await method(store, *args, **kwargs)
        except Exception as exc:
            error = store._write_failed(method.__name__, exc)
            if error is exc:
                raise
            raise error from exc
        store.health.succeeded(method.__name__)
        return result

    return cast(Method, wrapper)


class SqlStore:
    """A job store over SQL (see `taskd.store.base` for the contract); a backend gives it
    its connections, its transactions and its dialect (the hooks at the end)."""

    _key_taken: ClassVar[type[Exception]]  # the driver's error for a unique index violated

    def __init__(self, description: str, name: str) -> None:
        self.description = description
        self.events = JobEvents()
        self.health = StoreHealth(f"job store {name}")
        # The [[webhook]] rules: each write transaction enqueues the events they receive.
        self.webhooks: tuple[WebhookRule, ...] = ()
        # The `limit_key` of each task that has one: each insert records its jobs' values.
        self.limit_keys: Mapping[str, str] = {}
        self._limited: frozenset[str] = frozenset()  # tasks with a limit, at the last claim
        self._fetching: set[asyncio.Task[None]] = set()  # jobs others ended, read for waiters
        # The writers, which a backend sets (`_group_commit`): the durable writes; inserts
        # alone; claims alone. SQLite has one writer for all three.
        self._commits: GroupCommit[Tx]
        self._inserts: GroupCommit[Tx]
        self._claims: GroupCommit[Tx]
        # How the writes that are not awaited (`insert`, `insert_batch`) settle their future.
        self._inserted = self._finishing("insert")
        self._batch_inserted = self._finishing("insert_batch", _only)

    def _group_commit(
        self, transact: Transact, worth_splitting: Callable[[Exception], bool] = lambda _: True
    ) -> GroupCommit[Tx]:
        """A group-committing writer of transactions that `transact` runs; this daemon's
        listeners hear of each once it has committed."""

        async def run(operations: list[tuple[Operation, list[Any]]]) -> list[list[Any]]:
            notes = Notes()
            outputs = await transact(operations, notes)
            tell(self.events, notes)
            return outputs

        return GroupCommit(run, worth_splitting=worth_splitting)

    # -- nodes ---------------------------------------------------------------------------

    @store_write
    async def register_node(self, node: str, ttl: float, slots: int = 0) -> str:
        (worker,) = await self._commits.submit(nodes.register, [(node, ttl, slots)])
        return worker

    @store_write
    async def leave(self, worker: str) -> None:
        await self._commits.submit(nodes.leave, [worker])

    @store_write
    async def renew(self, worker: str, job_ids: Sequence[int], lease: float) -> list[int]:
        (lost,) = await self._commits.submit(nodes.renew, [(worker, list(job_ids), lease)])
        return lost

    @store_read
    async def nodes(self) -> list[NodeInfo]:
        return await self._read(reads.nodes)

    # -- job writes ----------------------------------------------------------------------

    def insert(self, new: Sequence[NewJob]) -> asyncio.Future[list[Inserted]]:
        # Linking jobs to their parents takes several statements, and so does reading a
        # key's window (or its debounced job) before inserting under its lock: a transaction.
        writer = self._inserts
        for job in new:  # a loop, not any(): no generator to make for each enqueue
            if job.after or (job.key is not None and jobs.windowed(job)):
                writer = self._commits
                break
        return writer.submit(jobs.insert_jobs, list(new), self._inserted)

    def insert_batch(
        self, new: Sequence[NewJob], on_finish: Hook | None = None
    ) -> asyncio.Future[tuple[int, list[Inserted]]]:
        # Its one result, (batch id, jobs), is what `_batch_inserted` settles the future with.
        write = self._commits.submit(
            jobs.insert_batches, [(list(new), on_finish)], self._batch_inserted
        )
        return cast(asyncio.Future[tuple[int, list[Inserted]]], write)

    @store_read
    async def batch(self, batch_id: int) -> BatchInfo | None:
        return await self._read(batches.batch_info, batch_id)

    @store_write
    async def insert_and_claim(
        self, new: Sequence[NewJob], claim: ClaimRequest
    ) -> tuple[list[Inserted], Claimed]:
        self._limited = claim.limited()
        (result,) = await self._commits.submit(jobs.insert_and_claim, [(list(new), claim)])
        return result

    @store_write
    async def claim(self, request: ClaimRequest) -> Claimed:
        self._limited = request.limited()
        (claimed,) = await self._claims.submit(jobs.claim_jobs, [request])
        return claimed

    @store_write
    async def finish(
        self, outcomes: Sequence[Outcome], claim: ClaimRequest | None = None
    ) -> Finished:
        if claim is None:
            if not outcomes:
                return Finished(jobs=[])
            return Finished(jobs=await self._commits.submit(jobs.finish_jobs, list(outcomes)))
        if not outcomes:  # a claim alone: in a claim's transaction, its health the claims'
            return Finished(jobs=[], claimed=await self.claim(claim))
        self._limited = claim.limited()
        (finished,) = await self._commits.submit(jobs.finish_and_claim, [(list(outcomes), claim)])
        return finished

    @store_write
    async def set_waiting(self, job_id: int, epoch: int, worker: str, waiting: bool) -> bool:
        (changed,) = await self._commits.submit(
            jobs.set_waiting, [(job_id, epoch, worker, waiting)]
        )
        return changed

    @store_write
    async def recover(
        self, quarantine_after: int, on_failure: Mapping[str, Hook] | None = None
    ) -> list[Job]:
        (recovered,) = await self._commits.submit(
            jobs.recover_jobs, [(quarantine_after, dict(on_failure or {}))]
        )
        return recovered

    @store_write
    async def cancel(self, job_id: int) -> Job:
        (job,) = await self._commits.submit(jobs.cancel_jobs, [job_id])
        return job

    @store_write
    async def retry(self, job_id: int) -> Job:
        try:
            (job,) = await self._commits.submit(jobs.retry_jobs, [job_id])
        except self._key_taken:
            raise InvalidTransition(
                f"job {job_id} cannot be retried: another pending or running job of its "
                "task has the same key"
            ) from None
        return job

    @store_write
    async def prune(self, older_than: Mapping[JobStatus, float]) -> int:
        deleted = 0
        for status, age in older_than.items():
            deleted += await self._in_slices(jobs.prune_jobs, (status, age))
        if (ticks_age := older_than.get("succeeded")) is not None:
            # A tick's record is kept as long as the succeeded jobs it may have started; a
            # batch's, as long as its jobs.
            for table in retention.RECORDS:
                await self._in_slices(retention.prune_records, (table, ticks_age))
        return deleted

    async def _in_slices(self, operation: Operation, item: Any) -> int:
        """Repeat a deleting write until it deletes less than a slice."""
        total = 0
        while True:
            (count,) = await self._commits.submit(operation, [item])
            total += int(count)
            if count < PRUNE_SLICE:
                return total

    @store_write
    async def record_activity(
        self,
        progress: Sequence[ProgressNote],
        lines: Sequence[LogNote],
        dropped: Mapping[int, int] | None = None,
    ) -> None:
        if progress or lines or dropped:
            await self._commits.submit(
                activity.record_activity, [(list(progress), list(lines), dict(dropped or {}))]
            )

    # -- job reads -----------------------------------------------------------------------

    @store_read
    async def job_logs(self, job_id: int) -> JobLogs | None:
        return await self._read(activity.job_logs, job_id)

    @store_read
    async def job_activity(
        self, job_id: int, after: tuple[int, int], limit: int
    ) -> JobActivity | None:
        return await self._read(activity.job_activity, job_id, after, limit)

    @store_read
    async def get(self, job_id: int) -> Job | None:
        return await self._read(reads.get, job_id)

    @store_read
    async def list_jobs(self, query: JobFilter) -> list[Job]:
        return await self._read(reads.list_jobs, query)

    @store_read
    async def counts(self) -> list[TaskCounts]:
        return await self._read(reads.counts)

    @store_read
    async def finished_recently(self, window: float, buckets: int) -> list[tuple[int, int]]:
        return await self._read(reads.finished_recently, window, buckets)

    @store_read
    async def clock(self) -> float:
        return await self._read(reads.clock)

    @store_read
    async def queue_depth(self) -> int:
        return await self._read(reads.queue_depth)

    # -- flow control --------------------------------------------------------------------

    @store_write
    async def set_task_paused(self, task: str, paused: bool) -> float | None:
        (since,) = await self._commits.submit(flow.set_task_paused, [(task, paused)])
        return since

    @store_write
    async def rekey(self, task: str, path: str | None) -> None:
        after: int | None = 0
        while after is not None:  # a slice a transaction: a long backlog holds no writer long
            (after,) = await self._commits.submit(keys.rekeyed, [(task, path, after)])

    @store_read
    async def paused_tasks(self) -> Mapping[str, float]:
        return await self._read(flow.paused_tasks)

    @store_read
    async def limit_key_paths(self) -> Mapping[str, str]:
        return await self._read(keys.limit_key_paths)

    @store_read
    async def rate_limit_starts(self, rates: Mapping[str, float]) -> Mapping[str, float]:
        return await self._read(flow.rate_limit_starts, dict(rates))

    @store_read
    async def values_in_use(self, tasks: Sequence[str]) -> Mapping[str, tuple[int, int]]:
        return await self._read(keys.values_in_use, list(tasks))

    @store_read
    async def key_state(
        self, task: str, key: str, interval: float | None
    ) -> tuple[int, float | None]:
        return await self._read(keys.key_state, task, key, interval)

    @store_read
    async def limit_states(self, limits: Mapping[str, SharedLimit]) -> Mapping[str, LimitState]:
        return await self._read(flow.limit_states, dict(limits))

    # -- schedules -----------------------------------------------------------------------

    @store_read
    async def schedule_states(self, ids: Sequence[str] | None = None) -> list[ScheduleState]:
        return await self._read(reads.schedule_states, ids)

    @store_write
    async def add_schedules(self, ids: Sequence[str], first_seen: float) -> None:
        if ids:
            await self._commits.submit(schedules.add_schedules, [(i, first_seen) for i in ids])

    @store_write
    async def cover_schedules(
        self, ids: Sequence[str], until: float, *, missed: Sequence[MissedTicks] = ()
    ) -> None:
        if ids:
            reports = {m.schedule: m for m in missed}
            await self._commits.submit(
                schedules.cover_schedules, [(i, until, reports.get(i)) for i in ids]
            )

    @store_write
    async def set_paused(
        self, schedule: str, paused: bool, *, covered_until: float | None = None
    ) -> bool:
        (changed,) = await self._commits.submit(
            schedules.set_paused, [(schedule, paused, covered_until)]
        )
        return changed

    @store_write
    async def fire_tick(
        self,
        schedule: str,
        tick: float | None,
        jobs: Sequence[NewJob],
        *,
        covered_until: float | None = None,
        claim: ClaimRequest | None = None,
        missed: MissedTicks | None = None,
        hold: Hold | None = None,
    ) -> TickFired:
        if claim is not None:
            self._limited = claim.limited()
        (fired,) = await self._commits.submit(
            schedules.fire_ticks, [(schedule, tick, jobs, covered_until, claim, missed, hold)]
        )
        return fired

    @store_write
    async def ticks_started(
        self, held: Sequence[tuple[int, int]], started: float | None = None
    ) -> None:
        if held:
            await self._commits.submit(schedules.ticks_started, [(list(held), started)])

    # -- the writes of other daemons sharing the store ------------------------------------

    def _heard(
        self,
        due: float | None,
        finished: Sequence[tuple[int, str]],
        cancelled: Sequence[int],
        activity: Sequence[tuple[int, int, int, bool]] = (),
    ) -> None:
        """Another daemon committed a transaction that made jobs due in `due` seconds, ended
        these (id, task) (or put them back for a retry), cancelled these, and recorded the
        activity of these: our listeners hear of it (see `Store.events`)."""
        for job_id, epoch, seq, progress in activity:
            self.events.activity(job_id, epoch, seq, progress)
        if not (due is not None or finished or cancelled):
            return  # only activity: no job changed state
        wake = False
        for job_id, task in finished:
            if self.events.watching(job_id):
                self._fetch_finished(job_id)
            wake = wake or task in self._limited  # its task may have room for ours again
        for job_id in cancelled:
            self.events.cancel_requested(job_id)
        if due is not None or wake:
            self.events.due(0.0 if wake else max(0.0, due or 0.0))
        else:
            self.events.changed()

    def _fetch_finished(self, job_id: int) -> None:
        """Read a job another daemon finished (or put back for a retry), for the callers
        here waiting for it."""

        async def fetch() -> None:
            try:
                job = await self.get(job_id)
            except StoreError as exc:
                logger.warning("cannot read job %d, which another daemon ended: %s", job_id, exc)
                self.events.resync()
                return
            if job is not None and job.status in FINISHED_STATUSES:
                job.errors = []
                self.events.finished(job)
            elif job is not None and job.status == "pending" and job.attempts:
                self.events.retrying(job)

        task = asyncio.create_task(fetch(), name=f"taskd-fetch-{job_id}")
        self._fetching.add(task)
        task.add_done_callback(self._fetching.discard)

    async def _stop_fetching(self) -> None:
        for task in list(self._fetching):
            task.cancel()
        await asyncio.gather(*self._fetching, return_exceptions=True)

    # -- what a backend provides ---------------------------------------------------------

    async def _read(self, read: Callable[..., Steps[T]], *args: Any) -> T:
        """Run `read(dialect, *args)` on a connection for reads; its result."""
        raise NotImplementedError

    def _store_error(self, exc: Exception) -> StoreError | None:
        """The StoreError an exception of the database's driver means (None: not one)."""
        raise NotImplementedError

    def _write_failed(self, operation: str, exc: Exception) -> Exception:
        """The exception a failed write raises (the driver's as StoreError, a refusal such
        as a job in another state as it is), reported to the store's health if a failure."""
        if isinstance(exc, InvalidTransition | JobNotFound):
            return exc
        error = exc if isinstance(exc, StoreError) else self._store_error(exc)
        if error is None:
            return exc
        self.health.failed(operation, str(error))
        if error is not exc:
            error.__cause__ = exc
        return error

    def _finishing(self, operation: str, shape: Callable[[list[Any]], Any] | None = None) -> Finish:
        """How a write submitted without awaiting it settles its future, as `store_write`
        ends an awaited one: its end reported to the store's health, the driver's errors as
        StoreError; its results given their `shape` (None: as they are)."""
        health = self.health
        failing = health.failing_kinds

        def finish(future: asyncio.Future[Any], results: list[Any], exc: Exception | None) -> None:
            # Called for each write (each enqueue): no call that has nothing to do.
            if exc is not None:
                error = self._write_failed(operation, exc)
                if not future.done():
                    future.set_exception(error)
                return
            if failing:
                health.succeeded(operation)
            if not future.done():
                future.set_result(results if shape is None else shape(results))

        return finish


def _only(results: list[T]) -> T:
    (result,) = results
    return result
