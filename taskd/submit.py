"""Turning a request to run or enqueue a task into a job row, and waiting for its end.

Every way of starting a task (the socket, a cron tick, a task calling another) goes
through here, so payloads are validated once, in one way, before anything is stored.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import msgspec

from taskd.limits import max_payload_size, out_of_limits, rule_broken
from taskd.models import (
    FINISHED_STATUSES,
    RUN_KEY,
    AfterFailure,
    Hook,
    Job,
    JobOrigin,
    SingleFlight,
    did_you_mean,
    since_retry,
)
from taskd.policy import default_attempts
from taskd.protocol import DEFAULT_MAX_FRAME, EnqueueParams
from taskd.store import Claimed, ClaimRequest, Hold, Inserted, JobNotFound, NewJob, Store
from taskd.tasks import TaskRegistry

# Runs (taskctl run, ctx.run_task, cron ticks) have a caller or a clock waiting for them:
# they go ahead of enqueued jobs of the default priority 0.
RUN_PRIORITY = -10
EMPTY_MAP = b"\x80"  # msgpack {}: the payload of a request that gave none, as in Nitro


class Refused(Exception):
    """A request refused before anything was stored; `index` numbers it within a batch."""

    index: int | None = None


class UnknownTask(Refused, LookupError):
    def __init__(self, name: str, known: Sequence[str]) -> None:
        tasks = f" (known tasks: {', '.join(known)})" if known else "; no tasks are loaded"
        super().__init__(f"unknown task {name!r}{did_you_mean(name, known)}{tasks}")
        self.name = name


class PayloadInvalid(Refused, ValueError):
    """The payload does not match the task's schema; the message names the field."""


class InvalidRequest(Refused, ValueError):
    """An option of the request is out of range, or options contradict each other."""


class JobRequest(msgspec.Struct, frozen=True):
    """What a caller asks for; `payload` is msgpack as it arrived."""

    task: str
    payload: bytes
    origin: JobOrigin
    single_flight: bool = False
    delay: float | None = None
    run_at: float | None = None
    priority: int | None = None  # default: RUN_PRIORITY for runs, 0 for enqueued jobs
    max_attempts: int | None = None
    key: str | None = None
    parent_id: int | None = None
    unique_for: float | None = None  # with a key: taken this long after its job's creation
    debounce: float | None = None  # with a key: a pending job's payload and due time move
    max_wait: float | None = None  # ... never past its first enqueue and this
    traceparent: str | None = None  # W3C: the span that asked for it (tracing)
    after: tuple[int, ...] = ()  # the jobs it waits for
    after_failure: AfterFailure = "cancel"


R = TypeVar("R")


class Claimer(Protocol):
    """The daemon's worker slots (taskd.slots), offered to a write that inserts due jobs, so
    that a run or a tick starts with one commit (its insert) instead of two."""

    def claim_request(self) -> ClaimRequest | None:
        """A claim for the free slots, reserved until `accept`; None if none is free."""

    def accept(self, request: ClaimRequest, claimed: Claimed | None) -> None:
        """What the claim took (None: the write failed, the slots are free again)."""

    @property
    def worker(self) -> str:
        """The worker the slots belong to (who holds the jobs of a tick fired early)."""

    @property
    def lease(self) -> float:
        """Seconds a claim leases its jobs for."""

    def deliver(self, jobs: list[Job]) -> None:
        """Jobs held for this worker, to start now (a tick's, at its time)."""


class Submitter:
    """Validates job requests against the loaded tasks and writes them to the store."""

    def __init__(
        self,
        store: Store,
        tasks: TaskRegistry,
        claimer: Claimer | None = None,
        *,
        max_payload: int = max_payload_size(DEFAULT_MAX_FRAME),
    ) -> None:
        self._store = store
        self._tasks = tasks
        self._claimer = claimer
        self._max_payload = max_payload

    def prepare(self, request: JobRequest) -> NewJob:
        """The row for a request; raises UnknownTask, PayloadInvalid or InvalidRequest."""
        task = self._tasks.get(request.task)
        if task is None:
            raise UnknownTask(request.task, self._tasks.names())
        if len(request.payload) > self._max_payload:
            raise PayloadInvalid(
                f"the payload of {len(request.payload)} bytes is over the limit of "
                f"{self._max_payload} (a quarter of max_frame_size); pass a reference to the "
                "data (a path, a URL, a row id) instead"
            )
        try:
            task.decode_payload(request.payload, tick=request.origin == "schedule")
        except msgspec.ValidationError as exc:
            # {} was given, or no payload (which is {}): the request cannot tell which.
            hint = " (the payload was {})" if request.payload == EMPTY_MAP else ""
            raise PayloadInvalid(f"payload rejected by task {task.name}: {exc}{hint}") from None
        except (msgspec.DecodeError, UnicodeError) as exc:
            raise PayloadInvalid(
                f"payload for task {task.name} is not valid msgpack: {exc}"
            ) from None
        except RecursionError:
            raise PayloadInvalid(
                f"payload for task {task.name} is nested too deeply to decode"
            ) from None
        self._check_options(request)
        priority = request.priority
        if priority is None:
            priority = RUN_PRIORITY if request.single_flight else 0
        key = request.key
        if request.single_flight and key is None:
            key = run_key(task.single_flight, request.payload)
        return NewJob(
            task=task.name,
            payload=request.payload,
            origin=request.origin,
            delay=request.delay or request.debounce or 0.0,
            run_at=request.run_at,
            max_attempts=request.max_attempts
            or default_attempts(request.single_flight, task.max_attempts),
            priority=priority,
            key=key,
            parent_id=request.parent_id,
            unique_for=None if request.key is None else _first(request.unique_for, task.unique_for),
            debounce=request.debounce,
            max_wait=request.max_wait,
            traceparent=request.traceparent,
            after=request.after,
            after_failure=request.after_failure,
        )

    @staticmethod
    def _check_options(request: JobRequest) -> None:
        """The rules of keys and times; and for requests from task code the limits the
        protocol's types state (a client's request was checked as it was decoded)."""
        if (problem := rule_broken(request.delay, request.run_at, request.key)) is not None:
            raise InvalidRequest(problem)
        if request.debounce is not None and request.key is None:
            raise InvalidRequest(
                "debounce gathers the enqueues of one key into one job: give a key with it"
            )
        if request.max_wait is not None and request.debounce is None:
            raise InvalidRequest("max_wait bounds a debounce: give debounce with it")
        if request.debounce is not None and (request.delay, request.run_at) != (None, None):
            raise InvalidRequest("give debounce or delay/run_at, not both")
        if request.unique_for is not None and request.key is None:
            raise InvalidRequest("unique_for keeps a key taken for a while: give a key with it")
        if request.origin == "task":
            options = {
                "delay": request.delay,
                "run_at": request.run_at,
                "priority": request.priority,
                "max_attempts": request.max_attempts,
                "key": request.key,
                "unique_for": request.unique_for,
                "debounce": request.debounce,
                "max_wait": request.max_wait,
                "traceparent": request.traceparent,
                "after": list(request.after),
            }
            if (problem := out_of_limits(EnqueueParams, options)) is not None:
                raise InvalidRequest(problem)

    async def submit(
        self, requests: Sequence[JobRequest], *, numbered: bool = False
    ) -> list[Inserted]:
        """Validate all, then insert all in one transaction; nothing is stored if one is bad.

        With `numbered` (a batch from a client), a refusal names the item: `jobs[3]: ...`.
        """
        rows = self._prepare_all(requests, numbered=numbered)
        if self._starts_now(rows, requests):
            inserted, _ = await self._insert_claiming(rows)
            return inserted
        # Enqueued jobs are acknowledged first, and claimed by the executor's next claim.
        return await self._store.insert(rows)

    def enqueue(
        self, requests: Sequence[JobRequest], *, numbered: bool = False
    ) -> asyncio.Future[list[Inserted]]:
        """As `submit`, for jobs no caller waits to start (enqueues): refusals are raised
        now, and the insert is submitted now; the future is done once it has committed."""
        if len(requests) == 1 and not numbered:  # one enqueue: a frame less
            return self._store.insert([self.prepare(requests[0])])
        return self._store.insert(self._prepare_all(requests, numbered=numbered))

    async def submit_run(self, request: JobRequest) -> tuple[Inserted, Job | None]:
        """Insert one run; with its job as the insert's commit claimed it for this daemon
        (None if it did not: a job joined, held, or no slot free)."""
        rows = self._prepare_all([request], numbered=False)
        if not self._starts_now(rows, [request]):
            (inserted,) = await self._store.insert(rows)
            return inserted, None
        (inserted,), claimed = await self._insert_claiming(rows)
        jobs = claimed.jobs if claimed is not None else []
        started = next((job for job in jobs if job.id == inserted.job_id), None)
        # A copy: the executor has the claimed one.
        return inserted, None if started is None else msgspec.structs.replace(started)

    def _starts_now(self, rows: list[NewJob], requests: Sequence[JobRequest]) -> bool:
        """Whether the insert is to claim too: a run starts in its insert's commit if it is
        due and a slot is free (its caller waits for it)."""
        if self._claimer is None:
            return False
        return any(
            request.single_flight and _due_now(row)
            for row, request in zip(rows, requests, strict=True)
        )

    def _insert_claiming(
        self, rows: list[NewJob]
    ) -> Awaitable[tuple[list[Inserted], Claimed | None]]:
        return self.claiming(lambda claim: self._insert(rows, claim), lambda r: r[1])

    def submit_batch(
        self, requests: Sequence[JobRequest], on_finish: str
    ) -> asyncio.Future[tuple[int, list[Inserted]]]:
        """Validate all (refusals are raised now), then insert all as a batch in one
        transaction, whose last job's end enqueues `on_finish`; the future of the batch's
        id and the jobs', done once it has committed."""
        task = self._tasks.get(on_finish)
        if task is None:
            raise UnknownTask(on_finish, self._tasks.names())
        rows = self._prepare_all(requests, numbered=True)
        hook = Hook(task.name, default_attempts(False, task.max_attempts))
        return self._store.insert_batch(rows, hook)

    def _prepare_all(self, requests: Sequence[JobRequest], *, numbered: bool) -> list[NewJob]:
        """The rows of all requests; the first refusal, which names its item if `numbered`."""
        rows = []
        for index, request in enumerate(requests):
            try:
                rows.append(self.prepare(request))
            except Refused as exc:
                if numbered:
                    exc.index = index
                    exc.args = (f"jobs[{index}]: {exc}",)
                raise
        return rows

    async def _insert(
        self, rows: list[NewJob], claim: ClaimRequest | None
    ) -> tuple[list[Inserted], Claimed | None]:
        if claim is None:
            return await self._store.insert(rows), None
        return await self._store.insert_and_claim(rows, claim)

    async def claiming(
        self,
        write: Callable[[ClaimRequest | None], Awaitable[R]],
        claimed: Callable[[R], Claimed | None],
    ) -> R:
        """Make `write` with a claim for this daemon's free slots (None if none is free).

        Shielded: the jobs the claim took reach the executor even if the caller stops
        waiting (a client that hangs up), since they are this daemon's to run.
        """
        claimer = self._claimer
        claim = claimer.claim_request() if claimer is not None else None
        if claim is None or claimer is None:
            return await write(None)

        async def shielded() -> R:
            result = None
            try:
                result = await write(claim)
            finally:
                claimer.accept(claim, claimed(result) if result is not None else None)
            return result

        return await asyncio.shield(shielded())

    def hold(self, tasks: Sequence[str]) -> Hold | None:
        """A hold for a tick fired ahead of its time, if this daemon runs jobs and none of
        `tasks` has a concurrency or rate limit (those are enforced by claims at the tick)."""
        claimer = self._claimer
        if claimer is None:
            return None
        for name in tasks:
            task = self._tasks.get(name)
            if task is None or task.concurrency is not None or task.rate_interval is not None:
                return None
        return Hold(claimer.worker, claimer.lease)

    def start_held(self, jobs: list[Job]) -> None:
        """Start jobs held for this worker (a tick's, at its time), from memory."""
        if self._claimer is not None and jobs:
            self._claimer.deliver(jobs)

    async def wait(
        self, job_id: int, timeout: float | None = None, after_attempt: int | None = None
    ) -> Job:
        """The job once it has ended; raises JobNotFound, or TimeoutError after `timeout`.

        With `after_attempt`, also the job (with its errors) as soon as an attempt numbered
        above it has failed: woken by the store's `retrying`, not by polling.
        """
        # The timeout bounds the wait for the end, not the reads: a job that has ended is
        # returned however little time is left (even none).
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        while True:  # again after a resync, or a failed attempt: read the job again
            finished = self._store.events.watch(job_id)
            try:
                job = await self._store.get(job_id)
                if job is None:
                    raise JobNotFound(job_id)
                if job.status in FINISHED_STATUSES:
                    job.errors = []  # as from a finish: only the `job` method lists them
                    return job
                if after_attempt is not None and _failed_after(job, after_attempt):
                    return job
                async with asyncio.timeout_at(deadline):
                    ended = await finished
                if ended is not None and ended.status in FINISHED_STATUSES:
                    return ended
            finally:
                finished.cancel()


def _failed_after(job: Job, attempt: int) -> bool:
    """Whether an attempt of the job numbered above `attempt` has failed (since its latest
    retry by request: attempts count from 1 again after one)."""
    return any(e.attempt > attempt for e in since_retry(job.errors))


def _due_now(job: NewJob) -> bool:
    return job.run_at is None and job.delay <= 0


def encode_payload(payload: Any) -> bytes:
    """A Python value as a msgpack payload (None: no payload, which is {});
    raises PayloadInvalid if it cannot be encoded."""
    if payload is None:
        return EMPTY_MAP
    try:
        return msgspec.msgpack.encode(payload)
    except (TypeError, ValueError, OverflowError) as exc:
        raise PayloadInvalid(f"payload cannot be encoded: {exc}") from None


def _first(given: float | None, default: float | None) -> float | None:
    return given if given is not None else default


_canonical = msgspec.msgpack.Encoder(order="sorted")


def run_key(mode: SingleFlight, payload: bytes) -> str | None:
    """The key a run without one is given, which decides the runs it joins: every run of
    its task ("task"), those with an equal payload ("payload": a hash of the payload with
    its maps' keys sorted), or none ("none")."""
    if mode == "none":
        return None
    if mode == "payload":
        try:
            canonical = _canonical.encode(msgspec.msgpack.decode(payload))
        except (msgspec.DecodeError, RecursionError):  # the payload was checked already
            canonical = payload
        return f"{RUN_KEY}:{hashlib.sha256(canonical).hexdigest()}"
    return RUN_KEY
