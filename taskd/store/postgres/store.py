"""The job store on PostgreSQL (asyncpg), shared by several daemons on several hosts.

Writes go through one group-committing writer per daemon, as on SQLite: the writes that
arrive together share a transaction, and concurrent enqueues become one INSERT. Reads use
the other pooled connections. Claims and recoveries decide in one statement with
FOR UPDATE SKIP LOCKED, so daemons never take the same job; each claim counts the limited
tasks' running jobs under a transaction-scoped advisory lock per task, so two daemons
cannot both fill the same room. "Now" is the database's clock (`{schema}.now()`), unless a
clock is given (tests move theirs): the store then hands it to each session it uses.
Other daemons learn of writes through LISTEN/NOTIFY (`notices`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import partial, wraps
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlsplit, urlunsplit

from taskd.models import FINISHED_STATUSES, Job, JobLogs, JobStatus, NodeInfo, TaskCounts
from taskd.store.base import (
    Claimed,
    ClaimRequest,
    Finished,
    Inserted,
    JobFilter,
    LogNote,
    NewJob,
    Outcome,
    ProgressNote,
    ScheduleState,
    StoreError,
    TickFired,
)
from taskd.store.batching import GroupCommit, Item, Operation, in_transaction
from taskd.store.core.notes import Notes, tell
from taskd.store.events import JobEvents
from taskd.store.health import StoreHealth
from taskd.store.postgres import activity, jobs, nodes, reads, schedules
from taskd.store.postgres.connections import (
    DRIVER_ERRORS,
    Connections,
    Unreachable,
    connection_failed,
)
from taskd.store.postgres.jobs import PRUNE_SLICE
from taskd.store.postgres.migrate import migrate
from taskd.store.postgres.notices import Listener, Notice, decode_notice, encode_notices
from taskd.store.postgres.schema import channel
from taskd.store.postgres.tx import Tx

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

UNREACHABLE = " (the database is unreachable or restarting; taskd reconnects by itself: try again)"


def safe_url(url: str) -> str:
    """The URL without its password, for logs and status."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _translate_errors(method: Callable[P, Any]) -> Callable[P, Any]:
    """The driver's and the network's exceptions leave the store as StoreError."""

    @wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
        try:
            return await method(*args, **kwargs)
        except StoreError:
            raise
        except DRIVER_ERRORS as exc:
            store = args[0]
            assert isinstance(store, PostgresStore)
            hint = UNREACHABLE if connection_failed(exc) else ""
            raise StoreError(f"job store {store.description}: {exc}{hint}") from exc

    return wrapper


def _writes(method: Callable[P, Any]) -> Callable[P, Any]:
    """As `_translate_errors`, and each write's end is reported to the store's health (a
    refusal such as a conflict is an answer, not a failure of the store)."""

    @wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
        store = args[0]
        assert isinstance(store, PostgresStore)
        try:
            result = await method(*args, **kwargs)
        except StoreError as exc:
            if type(exc) is StoreError:
                store.health.failed(method.__name__, str(exc))
            raise
        except DRIVER_ERRORS as exc:
            hint = UNREACHABLE if connection_failed(exc) else ""
            error = StoreError(f"job store {store.description}: {exc}{hint}")
            store.health.failed(method.__name__, str(error))
            raise error from exc
        store.health.succeeded(method.__name__)
        return result

    return wrapper


class PostgresStore:
    """The shared job store."""

    def __init__(
        self,
        url: str,
        *,
        schema: str = "taskd",
        pool_size: int = 8,
        connect_timeout: float = 10.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.schema = schema
        self.description = f"{safe_url(url)} (schema {schema})"
        self.events = JobEvents()
        self.health = StoreHealth(f"job store {self.description}")
        self._connections = Connections(
            url,
            self.description,
            size=pool_size,
            connect_timeout=connect_timeout,
            clock=clock,
            application=f"taskd {schema}",
        )
        self._sender = secrets.token_hex(6)  # our notices are not news to us
        self._channel = channel(schema)
        self._listener = Listener(
            self._connections.connect,
            self._channel,
            self._on_notice,
            self.events.resync,
            self.description,
        )
        # Three writers, each committing what arrives together: the durable writes; inserts,
        # each a statement that commits (and tells the others) on its own; and claims, in
        # transactions that do not wait for the disk (a claim lost in a crash of the server
        # leaves its jobs pending, to run later; the outcome written after it is durable).
        self._commits: GroupCommit[Tx] = GroupCommit(
            in_transaction(self._transaction), worth_splitting=_worth_splitting
        )
        self._inserts: GroupCommit[Tx] = GroupCommit(
            in_transaction(self._statements), worth_splitting=lambda exc: False
        )
        self._claims: GroupCommit[Tx] = GroupCommit(
            in_transaction(partial(self._transaction, durable=False)),
            worth_splitting=_worth_splitting,
        )
        self._writers = (self._commits, self._inserts, self._claims)
        self._limited: frozenset[str] = frozenset()  # tasks with a limit, at the last claim
        self._fetching: set[asyncio.Task[None]] = set()

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        try:
            async with self._connections.acquire() as db:
                await migrate(db, self.schema, self.description)
            await self._listener.start()
        except StoreError:
            await self.close()
            raise
        except DRIVER_ERRORS as exc:
            await self.close()
            raise StoreError(f"cannot open job store {self.description}: {exc}") from exc
        for writer in self._writers:
            writer.start()

    async def close(self) -> None:
        for writer in self._writers:
            await writer.stop()
        for task in list(self._fetching):
            task.cancel()
        await asyncio.gather(*self._fetching, return_exceptions=True)
        await self._listener.close()
        await self._connections.close()

    @asynccontextmanager
    async def _transaction(self, durable: bool = True) -> AsyncIterator[Tx]:
        async with self._connections.acquire(begin=True) as db:
            tx = Tx(db, self.schema, self._sender)
            try:
                yield tx
                # The notice goes with the commit: the others hear of it once it holds.
                lazy = "" if durable else "SET LOCAL synchronous_commit TO off; "
                await db.execute(lazy + self._notify_sql(tx.notes) + "COMMIT")
            except BaseException:
                if not db.is_closed() and db.is_in_transaction():
                    with contextlib.suppress(Exception):
                        await db.execute("ROLLBACK")
                raise
        tell(self.events, tx.notes)

    @asynccontextmanager
    async def _statements(self) -> AsyncIterator[Tx]:
        """Statements that commit each on their own (and notify the others themselves)."""
        async with self._connections.acquire() as db:
            tx = Tx(db, self.schema, self._sender)
            yield tx
        tell(self.events, tx.notes)

    def _notify_sql(self, notes: Notes) -> str:
        """The notice to the others (new jobs told them already, with their statement)."""
        if notes.due is None and not (notes.finished or notes.retrying or notes.cancelled):
            return ""
        notice = Notice(
            self._sender,
            notes.due,
            # Jobs waiting for a retry are named too: callers elsewhere follow attempts.
            [(job.id, job.task) for job in [*notes.finished, *notes.retrying]],
            notes.cancelled,
        )
        return "".join(
            f"SELECT pg_notify({_literal(self._channel)}, {_literal(payload)}); "
            for payload in encode_notices(notice)
        )

    async def _read(self, read: Callable[[Any], Awaitable[T]]) -> T:
        """A read; tried again once on a new connection if the first one was lost."""
        try:
            async with self._connections.acquire() as db:
                return await read(db)
        except DRIVER_ERRORS as exc:
            if not connection_failed(exc) or isinstance(exc, Unreachable):
                raise
        async with self._connections.acquire() as db:
            return await read(db)

    # -- notices from the other daemons --------------------------------------------------

    def _on_notice(self, payload: str) -> None:
        notice = decode_notice(payload)
        if notice is None or notice.sender == self._sender:
            return
        wake = False
        for job_id, task in notice.finished:
            if self.events.watching(job_id):
                self._fetch_finished(job_id)
            wake = wake or task in self._limited  # its task may have room for ours again
        for job_id in notice.cancelled:
            self.events.cancel_requested(job_id)
        if notice.due is not None or wake:
            self.events.due(0.0 if wake else max(0.0, notice.due or 0.0))
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

    # -- nodes ---------------------------------------------------------------------------

    @_writes
    async def register_node(self, node: str, ttl: float) -> str:
        (worker,) = await self._commits.submit(nodes.register, [(node, ttl)])
        return worker

    @_writes
    async def leave(self, worker: str) -> None:
        await self._commits.submit(nodes.leave, [worker])

    @_writes
    async def renew(self, worker: str, job_ids: Sequence[int], lease: float) -> list[int]:
        (lost,) = await self._commits.submit(nodes.renew, [(worker, list(job_ids), lease)])
        return lost

    @_writes
    async def announce_schedules(self, worker: str, digest: str) -> None:
        await self._commits.submit(nodes.announce_schedules, [(worker, digest)])

    @_translate_errors
    async def nodes(self) -> list[NodeInfo]:
        return await self._read(lambda db: reads.nodes(db, self.schema))

    # -- job writes ----------------------------------------------------------------------

    @_writes
    async def insert(self, new: Sequence[NewJob]) -> list[Inserted]:
        if not new:
            return []
        return await self._inserts.submit(jobs.insert_jobs, list(new))

    @_writes
    async def insert_and_claim(
        self, new: Sequence[NewJob], claim: ClaimRequest
    ) -> tuple[list[Inserted], Claimed]:
        self._limited = frozenset(claim.limits)
        (result,) = await self._commits.submit(jobs.insert_and_claim, [(list(new), claim)])
        return result

    @_writes
    async def claim(self, request: ClaimRequest) -> Claimed:
        self._limited = frozenset(request.limits)
        (claimed,) = await self._claims.submit(jobs.claim_jobs, [request])
        return claimed

    @_writes
    async def finish(
        self, outcomes: Sequence[Outcome], claim: ClaimRequest | None = None
    ) -> Finished:
        if claim is None:
            if not outcomes:
                return Finished(jobs=[])
            return Finished(jobs=await self._commits.submit(jobs.finish_jobs, list(outcomes)))
        if not outcomes:  # a claim alone: in a claim's transaction, its health the claims'
            return Finished(jobs=[], claimed=await self.claim(claim))
        self._limited = frozenset(claim.limits)
        (finished,) = await self._commits.submit(jobs.finish_and_claim, [(list(outcomes), claim)])
        return finished

    @_writes
    async def set_waiting(self, job_id: int, epoch: int, worker: str, waiting: bool) -> bool:
        (changed,) = await self._commits.submit(
            jobs.set_waiting, [(job_id, epoch, worker, waiting)]
        )
        return changed

    @_writes
    async def recover(self, quarantine_after: int) -> list[Job]:
        (recovered,) = await self._commits.submit(jobs.recover_jobs, [quarantine_after])
        return recovered

    @_writes
    async def cancel(self, job_id: int) -> Job:
        (job,) = await self._commits.submit(jobs.cancel_jobs, [job_id])
        return job

    @_writes
    async def retry(self, job_id: int) -> Job:
        (job,) = await self._commits.submit(jobs.retry_jobs, [job_id])
        return job

    @_writes
    async def prune(self, older_than: Mapping[JobStatus, float]) -> int:
        deleted = 0
        for status, age in older_than.items():
            deleted += await self._in_slices(jobs.prune_jobs, (status, age))
        if (ticks_age := older_than.get("succeeded")) is not None:
            # A tick's record is kept as long as the succeeded jobs it may have started.
            await self._in_slices(schedules.prune_ticks, ticks_age)
        return deleted

    async def _in_slices(self, operation: Operation[Tx, Item, int], item: Item) -> int:
        """Repeat a deleting write until it deletes less than a slice."""
        total = 0
        while True:
            (count,) = await self._commits.submit(operation, [item])
            total += count
            if count < PRUNE_SLICE:
                return total

    @_writes
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

    @_translate_errors
    async def job_logs(self, job_id: int) -> JobLogs | None:
        return await self._read(lambda db: activity.job_logs(db, self.schema, job_id))

    @_translate_errors
    async def get(self, job_id: int) -> Job | None:
        return await self._read(lambda db: reads.get(db, self.schema, job_id))

    @_translate_errors
    async def list_jobs(self, query: JobFilter) -> list[Job]:
        return await self._read(lambda db: reads.list_jobs(db, self.schema, query))

    @_translate_errors
    async def counts(self) -> list[TaskCounts]:
        return await self._read(lambda db: reads.counts(db, self.schema))

    @_translate_errors
    async def queue_depth(self) -> int:
        return await self._read(lambda db: reads.queue_depth(db, self.schema))

    # -- schedules -----------------------------------------------------------------------

    @_translate_errors
    async def schedule_states(self, ids: Sequence[str] | None = None) -> list[ScheduleState]:
        return await self._read(lambda db: reads.schedule_states(db, self.schema, ids))

    @_writes
    async def add_schedules(self, ids: Sequence[str], first_seen: float) -> None:
        if ids:
            await self._commits.submit(schedules.add_schedules, [(i, first_seen) for i in ids])

    @_writes
    async def cover_schedules(self, ids: Sequence[str], until: float) -> None:
        if ids:
            await self._commits.submit(schedules.cover_schedules, [(i, until) for i in ids])

    @_writes
    async def set_paused(
        self, schedule: str, paused: bool, *, covered_until: float | None = None
    ) -> bool:
        (changed,) = await self._commits.submit(
            schedules.set_paused, [(schedule, paused, covered_until)]
        )
        return changed

    @_writes
    async def fire_tick(
        self,
        schedule: str,
        tick: float | None,
        jobs: Sequence[NewJob],
        *,
        covered_until: float | None = None,
        claim: ClaimRequest | None = None,
    ) -> TickFired:
        if claim is not None:
            self._limited = frozenset(claim.limits)
        (fired,) = await self._commits.submit(
            schedules.fire_ticks, [(schedule, tick, jobs, covered_until, claim)]
        )
        return fired


def _worth_splitting(exc: Exception) -> bool:
    return not connection_failed(exc)


def _literal(text: str) -> str:
    """A string literal (standard_conforming_strings, PostgreSQL's default since 9.1)."""
    return "'" + text.replace("'", "''") + "'"
