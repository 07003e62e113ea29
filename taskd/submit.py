"""Turning a request to run or enqueue a task into a job row, and waiting for its end.

Every way of starting a task (the socket, a cron tick, a task calling another) goes
through here, so payloads are validated once, in one way, before anything is stored.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from taskd.models import FINISHED_STATUSES, RUN_KEY, Job, JobOrigin
from taskd.policy import default_attempts
from taskd.store import Inserted, JobNotFound, NewJob, Store
from taskd.tasks import TaskRegistry

MAX_PRIORITY = 2**31
# Runs (taskctl run, ctx.run_task, cron ticks) have a caller or a clock waiting for them:
# they go ahead of enqueued jobs of the default priority 0.
RUN_PRIORITY = -10
NIL = b"\xc0"  # msgpack nil: the payload of a request that gave none
MAX_KEY_LENGTH = 1024


class UnknownTask(LookupError):
    def __init__(self, name: str, known: Sequence[str]) -> None:
        hint = f"; known tasks: {', '.join(known)}" if known else "; no tasks are loaded"
        super().__init__(f"unknown task {name!r}{hint}")
        self.name = name


class PayloadInvalid(ValueError):
    """The payload does not match the task's schema; the message names the field."""


class InvalidRequest(ValueError):
    """An option of the request is out of range."""


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


class Submitter:
    """Validates job requests against the loaded tasks and writes them to the store."""

    def __init__(self, store: Store, registry: Callable[[], TaskRegistry]) -> None:
        self._store = store
        self._registry = registry

    def prepare(self, request: JobRequest) -> NewJob:
        """The row for a request; raises UnknownTask, PayloadInvalid or InvalidRequest."""
        registry = self._registry()
        task = registry.get(request.task)
        if task is None:
            raise UnknownTask(request.task, registry.names())
        try:
            task.decode_payload(request.payload)
        except msgspec.ValidationError as exc:
            hint = " (no payload was given; this task needs one)" if request.payload == NIL else ""
            raise PayloadInvalid(f"payload rejected by task {task.name}: {exc}{hint}") from None
        except (msgspec.DecodeError, UnicodeError) as exc:
            raise PayloadInvalid(
                f"payload for task {task.name} is not valid msgpack: {exc}"
            ) from None
        except RecursionError:
            raise PayloadInvalid(
                f"payload for task {task.name} is nested too deeply to decode"
            ) from None
        priority = request.priority
        if priority is None:
            priority = RUN_PRIORITY if request.single_flight else 0
        if abs(priority) > MAX_PRIORITY:
            raise InvalidRequest(f"priority must be between -{MAX_PRIORITY} and {MAX_PRIORITY}")
        if request.max_attempts is not None and request.max_attempts < 1:
            raise InvalidRequest(f"max_attempts must be at least 1, got {request.max_attempts}")
        key = RUN_KEY if request.single_flight and request.key is None else request.key
        if key is not None and not 0 < len(key) <= MAX_KEY_LENGTH:
            raise InvalidRequest(f"key must have 1 to {MAX_KEY_LENGTH} characters")
        if request.delay is not None and not 0 <= request.delay < 10 * 365 * 86400:
            raise InvalidRequest(f"delay must be between 0 and 10 years, got {request.delay}")
        if request.run_at is not None and not math.isfinite(request.run_at):
            raise InvalidRequest(f"run_at must be a time in seconds, got {request.run_at}")
        return NewJob(
            task=task.name,
            payload=request.payload,
            origin=request.origin,
            delay=request.delay or 0.0,
            run_at=request.run_at,
            max_attempts=request.max_attempts
            or default_attempts(request.single_flight, task.max_attempts),
            priority=priority,
            key=key,
            parent_id=request.parent_id,
        )

    async def submit(self, requests: Sequence[JobRequest]) -> list[Inserted]:
        """Validate all, then insert all in one transaction; nothing is stored if one is bad."""
        return await self._store.insert([self.prepare(request) for request in requests])

    async def wait(self, job_id: int, timeout: float | None = None) -> Job:
        """The job once it has ended; raises JobNotFound, or TimeoutError after `timeout`."""
        async with asyncio.timeout(timeout):
            while True:  # again after a resync: the store may have missed the job's end
                finished = self._store.events.watch(job_id)
                try:
                    job = await self._store.get(job_id)
                    if job is None:
                        raise JobNotFound(job_id)
                    if job.status in FINISHED_STATUSES or (job := await finished) is not None:
                        return job
                finally:
                    finished.cancel()


def encode_payload(payload: Any) -> bytes:
    """A Python value as a msgpack payload; raises PayloadInvalid if it cannot be encoded."""
    try:
        return msgspec.msgpack.encode(payload)
    except (TypeError, ValueError, OverflowError) as exc:
        raise PayloadInvalid(f"payload cannot be encoded: {exc}") from None
