"""The executor and the single-flight rule, in-process over a real SQLite store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from taskd.executor import Executor
from taskd.protocol import RunParams
from taskd.scheduler import Scheduler
from taskd.service import DaemonInfo, Service
from taskd.store import JobFilter, NewJob
from taskd.store.sqlite import SqliteStore
from taskd.submit import JobRequest, Submitter
from taskd.tasks import TaskRegistry, load_tasks
from tests.support import FIXTURE_TASKS


class Stack:
    def __init__(self, store: SqliteStore, registry: TaskRegistry, workers: int = 8) -> None:
        self.store = store
        self.registry = registry
        self.submitter = Submitter(store, lambda: registry)
        self.executor = Executor(
            store, lambda: registry, self.submitter,
            owner="test", workers=workers, lease=30, quarantine_after=3, max_stuck_threads=4,
        )  # fmt: skip
        self.service = Service(
            store=store, registry=lambda: registry, submitter=self.submitter,
            executor=self.executor,
            info=DaemonInfo("t", 1, time.time(), "sqlite", "s", "t", workers),
            retention=lambda: None,  # type: ignore[arg-type, return-value]
            reload=None,  # type: ignore[arg-type]
            scheduler=Scheduler(store, self.submitter),
        )  # fmt: skip

    def run_params(self, task: str, payload: object) -> RunParams:
        return RunParams(task=task, payload=msgspec.Raw(msgspec.msgpack.encode(payload)))


def value(raw: object) -> object:
    """A payload or result as Python data (inside the daemon they stay msgpack)."""
    assert isinstance(raw, msgspec.Raw)
    return msgspec.msgpack.decode(raw)


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    store = SqliteStore(tmp_path / "jobs.db")
    await store.open()
    built = Stack(store, load_tasks(FIXTURE_TASKS))
    loop_task = asyncio.create_task(built.executor.run())
    yield built
    await built.executor.drain(5)
    await loop_task
    await store.close()


async def test_single_flight_100_callers_in_one_tick(stack: Stack, tmp_path: Path) -> None:
    record = tmp_path / "executions.txt"
    params = stack.run_params("slow", {"seconds": 0.3, "record": str(record)})
    # All 100 calls start in the same event-loop iteration.
    outcomes = await asyncio.gather(*(stack.service.run(params) for _ in range(100)))
    assert len({o.job.id for o in outcomes}) == 1
    assert sum(not o.joined for o in outcomes) == 1
    assert all(value(o.job.result) == {"seconds": 0.3, "record": str(record)} for o in outcomes)
    assert len(record.read_text().splitlines()) == 1  # the task executed once
    assert len(await stack.store.list_jobs(JobFilter())) == 1  # one job row


async def test_a_new_run_starts_after_the_previous_one_ended(stack: Stack) -> None:
    first = await stack.service.run(stack.run_params("echo", 1))
    second = await stack.service.run(stack.run_params("echo", 2))
    assert first.job.id != second.job.id
    assert (value(first.job.result), value(second.job.result)) == (1, 2)


async def test_plain_functions_run_in_threads_without_blocking_the_loop(stack: Stack) -> None:
    blocking = asyncio.create_task(
        stack.service.run(stack.run_params("blocking", {"seconds": 0.5}))
    )
    await asyncio.sleep(0.05)
    started = time.monotonic()
    quick = await stack.service.run(stack.run_params("echo", "fast"))
    assert value(quick.job.result) == "fast"
    assert time.monotonic() - started < 0.4  # answered while the thread still sleeps
    result = await blocking
    assert value(result.job.result)["thread"].startswith("taskd-task")  # type: ignore[index]


async def test_failure_is_recorded_with_traceback(stack: Stack) -> None:
    outcome = await stack.service.run(stack.run_params("fail", "x"))
    job = await stack.store.get(outcome.job.id)
    assert job is not None and job.status == "failed" and job.error == "ValueError: boom: x"
    assert job.errors[0].traceback and "raise ValueError" in job.errors[0].traceback


async def test_task_calls_task_through_the_store(stack: Stack) -> None:
    outcome = await stack.service.run(stack.run_params("child", {}))
    assert outcome.job.status == "succeeded", outcome.job.error
    parent = outcome.job.id
    assert value(outcome.job.result)["inner"] == {"from": parent}  # type: ignore[index]
    children = [job for job in await stack.store.list_jobs(JobFilter()) if job.parent_id == parent]
    assert sorted(job.origin for job in children) == ["task", "task"]


async def test_waiting_parents_do_not_starve_children(tmp_path: Path) -> None:
    # One worker: the parent's slot is lent to the child it waits for.
    store = SqliteStore(tmp_path / "jobs.db")
    await store.open()
    stack = Stack(store, load_tasks(FIXTURE_TASKS), workers=1)
    runner = asyncio.create_task(stack.executor.run())
    outcome = await asyncio.wait_for(stack.service.run(stack.run_params("child", {})), 10)
    assert outcome.job.status == "succeeded"
    await stack.executor.drain(5)
    await runner
    await store.close()


async def test_until_idle_processes_what_is_due_and_returns(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "jobs.db")
    await store.open()
    stack = Stack(store, load_tasks(FIXTURE_TASKS))
    payload = msgspec.msgpack.encode("x")
    await stack.submitter.submit([JobRequest("echo", payload, "enqueue") for _ in range(20)])
    await asyncio.wait_for(stack.executor.run(until_idle=True), 10)
    jobs = await store.list_jobs(JobFilter())
    assert [job.status for job in jobs] == ["succeeded"] * 20
    await stack.executor.drain(1)
    await store.close()


async def test_a_stored_payload_that_cannot_be_decoded_fails_its_job(stack: Stack) -> None:
    # Written past the submitter (say, by an older taskd): the job fails, it does not hang.
    rows = [
        NewJob("echo", b"\x91" * 100_000 + b"\xc0", "enqueue", time.time(), 1),
        NewJob("echo", b"\xa2\xff\xfe", "enqueue", time.time(), 1),
    ]
    inserted = await stack.store.insert(rows, time.time())
    for row in inserted:
        job = await asyncio.wait_for(stack.submitter.wait(row.job_id), 10)
        assert job.status == "failed" and "payload no longer matches" in (job.error or "")
