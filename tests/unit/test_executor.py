"""The executor and the single-flight rule, in-process over every store backend."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import msgspec
import pytest

from taskd.config import Config, TaskOptions
from taskd.daemon import build_engine
from taskd.news import DaemonNews
from taskd.protocol import RunParams, RunResult
from taskd.service import JobMethods
from taskd.store import ClaimRequest, Finished, JobFilter, NewJob, Outcome, Store
from taskd.submit import JobRequest
from taskd.tasks import TaskRegistry, load_tasks
from tests.support import FIXTURE_TASKS


@pytest.fixture
def clock() -> Callable[[], float]:
    return time.time  # these tests run real tasks for real


class Stack:
    """The daemon's parts over a store, its worker registered as the daemon does it."""

    def __init__(
        self, store: Store, registry: TaskRegistry, worker: str, workers: int = 8, lease: float = 30
    ) -> None:
        self.store = store
        self.registry = registry
        self.news = DaemonNews()
        store.events.on_change(self.news.changed)  # as the daemon relays them
        config = Config(workers=workers, lease=lease, quarantine_after=3, max_stuck_threads=4)
        self.engine = build_engine(store, registry, self.news, worker, config)
        self.submitter = self.engine.submitter
        self.executor = self.engine.executor
        self.jobs = JobMethods(store, self.submitter, registry, self.engine.activity)

    def run_params(self, task: str, payload: object) -> RunParams:
        return RunParams(task=task, payload=msgspec.Raw(msgspec.msgpack.encode(payload)))

    async def enqueue(self, task: str, payload: object) -> int:
        request = JobRequest(task, msgspec.msgpack.encode(payload), "enqueue")
        (inserted,) = await self.submitter.submit([request])
        return inserted.job_id


def value(raw: object) -> object:
    """A payload or result as Python data (inside the daemon they stay msgpack)."""
    assert isinstance(raw, msgspec.Raw)
    return msgspec.msgpack.decode(raw)


async def until(stack: Stack, predicate: Callable[[], bool]) -> None:
    """Wait, woken by the change notices the executor gives, until `predicate()` holds."""
    changed = asyncio.Event()
    stack.news.on_change(changed.set)
    while not predicate():
        await asyncio.wait_for(changed.wait(), 10)
        changed.clear()


def runs(stack: Stack, job_id: int) -> Callable[[], bool]:
    return lambda: job_id in stack.engine.slots.running


MakeStack = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def make_stack(store: Store) -> AsyncIterator[MakeStack]:
    """Stacks over the test's store, each with its executor running; drained at the end."""
    started: list[tuple[Stack, asyncio.Task[None]]] = []

    async def make(workers: int = 8, lease: float = 30, **options: TaskOptions) -> Stack:
        worker = await store.register_node("test", ttl=lease)
        built = Stack(store, load_tasks(FIXTURE_TASKS, options), worker, workers, lease)
        started.append((built, asyncio.create_task(built.executor.run())))
        return built

    yield make
    for built, loop_task in started:
        await built.engine.stop(5)
        await loop_task


@pytest.fixture
async def stack(make_stack: MakeStack) -> Stack:
    return await make_stack()


async def test_single_flight_100_callers_in_one_tick(stack: Stack, tmp_path: Path) -> None:
    record = tmp_path / "executions.txt"
    params = stack.run_params("slow", {"seconds": 0.3, "record": str(record)})
    # All 100 calls start in the same event-loop iteration.
    outcomes = await asyncio.gather(*(stack.jobs.run(params) for _ in range(100)))
    assert len({o.job.id for o in outcomes}) == 1
    assert sum(not o.joined for o in outcomes) == 1
    assert all(value(o.job.result) == {"seconds": 0.3, "record": str(record)} for o in outcomes)
    assert len(record.read_text().splitlines()) == 1  # the task executed once
    assert len(await stack.store.list_jobs(JobFilter())) == 1  # one job row


async def test_a_new_run_starts_after_the_previous_one_ended(stack: Stack) -> None:
    first = await stack.jobs.run(stack.run_params("echo", 1))
    second = await stack.jobs.run(stack.run_params("echo", 2))
    assert first.job.id != second.job.id
    assert (value(first.job.result), value(second.job.result)) == (1, 2)


async def test_plain_functions_run_in_threads_without_blocking_the_loop(
    stack: Stack, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"  # the thread holds until the test lets it go
    params = stack.run_params("blocking", {"gate": str(gate)})
    blocking = asyncio.create_task(stack.jobs.run(params))
    quick = await asyncio.wait_for(stack.jobs.run(stack.run_params("echo", "fast")), 30)
    assert value(quick.job.result) == "fast"
    assert not blocking.done()  # answered while the thread still blocks
    gate.touch()
    result = await blocking
    assert value(result.job.result)["thread"].startswith("taskd-task")  # type: ignore[index]


async def test_failure_is_recorded_with_traceback(stack: Stack) -> None:
    outcome = await stack.jobs.run(stack.run_params("fail", "x"))
    job = await stack.store.get(outcome.job.id)
    assert job is not None and job.status == "failed" and job.error == "ValueError: boom: x"
    assert job.errors[0].traceback and "raise ValueError" in job.errors[0].traceback
    assert (job.errors[0].attempt, job.errors[0].kind) == (1, "error")


async def test_task_calls_task_through_the_store(stack: Stack) -> None:
    outcome = await stack.jobs.run(stack.run_params("child", {}))
    assert outcome.job.status == "succeeded", outcome.job.error
    parent = outcome.job.id
    assert value(outcome.job.result)["inner"] == {"from": parent}  # type: ignore[index]
    children = [job for job in await stack.store.list_jobs(JobFilter()) if job.parent_id == parent]
    assert sorted(job.origin for job in children) == ["task", "task"]


async def test_waiting_parents_do_not_starve_children(make_stack: MakeStack) -> None:
    # One worker: the parent's slot is lent to the child it waits for.
    stack = await make_stack(workers=1)
    outcome = await asyncio.wait_for(stack.jobs.run(stack.run_params("child", {})), 10)
    assert outcome.job.status == "succeeded"


async def test_a_waiting_parent_lends_its_place_in_its_tasks_limit(make_stack: MakeStack) -> None:
    # parent may run one at a time; while one waits for its child, the next one runs.
    stack = await make_stack(parent=TaskOptions(concurrency=1))
    first, second = [await stack.enqueue("parent", {"seconds": 1}) for _ in range(2)]
    done = [await asyncio.wait_for(stack.submitter.wait(i), 20) for i in (first, second)]
    assert [job.status for job in done] == ["succeeded", "succeeded"]
    assert done[1].started_at is not None and done[0].finished_at is not None
    assert done[1].started_at < done[0].finished_at  # they overlapped


async def test_until_idle_processes_what_is_due_and_returns(store: Store) -> None:
    stack = Stack(store, load_tasks(FIXTURE_TASKS), await store.register_node("test", ttl=30))
    payload = msgspec.msgpack.encode("x")
    await stack.submitter.submit([JobRequest("echo", payload, "enqueue") for _ in range(20)])
    await asyncio.wait_for(stack.executor.run(until_idle=True), 10)
    jobs = await store.list_jobs(JobFilter())
    assert [job.status for job in jobs] == ["succeeded"] * 20
    await stack.executor.drain(1)


async def test_a_drain_records_the_outcomes_in_the_writes_of_its_claims(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Very short jobs run back to back, and the loop takes a turn now and then between them:
    # the outcomes that came in wait for the claim of the next slot that frees rather than
    # take a write of their own (which doubled the writes of a no-op drain).
    writes: list[bool] = []  # whether each write that records outcomes also claims
    finish = store.finish

    async def counted(outcomes: Sequence[Outcome], claim: ClaimRequest | None = None) -> Finished:
        if outcomes:
            writes.append(claim is not None)
        return await finish(outcomes, claim)

    monkeypatch.setattr(store, "finish", counted)
    stack = Stack(store, load_tasks(FIXTURE_TASKS), await store.register_node("test", ttl=30), 16)
    payload = msgspec.msgpack.encode("x")
    await stack.submitter.submit([JobRequest("echo", payload, "enqueue") for _ in range(6000)])
    await asyncio.wait_for(stack.executor.run(until_idle=True), 60)
    jobs = await store.list_jobs(JobFilter(limit=10_000))
    assert [job.status for job in jobs] == ["succeeded"] * 6000
    alone = writes.count(False)
    assert alone <= writes.count(True) // 2, f"{alone} of {len(writes)} writes only recorded"
    await stack.executor.drain(1)


async def test_a_stored_payload_that_cannot_be_decoded_fails_its_job(stack: Stack) -> None:
    # Written past the submitter (say, by an older taskd): the job fails, it does not hang.
    rows = [
        NewJob("echo", b"\x91" * 100_000 + b"\xc0", "enqueue", 1),
        NewJob("echo", b"\xa2\xff\xfe", "enqueue", 1),
    ]
    inserted = await stack.store.insert(rows)
    for row in inserted:
        job = await asyncio.wait_for(stack.submitter.wait(row.job_id), 10)
        assert job.status == "failed" and "payload no longer matches" in (job.error or "")


async def test_a_cancel_reaches_the_running_job_through_the_store(
    stack: Stack, tmp_path: Path
) -> None:
    record = tmp_path / "record.txt"
    job_id = await stack.enqueue("slow", {"seconds": 30, "record": str(record)})
    await until(stack, runs(stack, job_id))
    assert (await stack.store.cancel(job_id)).status == "cancelled"
    await until(stack, lambda: not runs(stack, job_id)())  # at once, not after 30 s
    assert not record.exists()


async def test_jobs_a_worker_lost_are_stopped_when_it_renews(
    store: Store, make_stack: MakeStack, tmp_path: Path
) -> None:
    # The worker's node started again elsewhere: this worker is dead to the store, and
    # another took the job over. Its renewal (every lease/3) learns that and stops the job.
    stack = await make_stack(lease=1.5)
    record = tmp_path / "record.txt"
    job_id = await stack.enqueue("slow", {"seconds": 30, "record": str(record)})
    await until(stack, runs(stack, job_id))
    await store.register_node("test", ttl=30)  # test/2: test/1 is gone
    (recovered,) = await store.recover(3)
    other = await store.register_node("other", ttl=30)
    (taken,) = (await store.claim(ClaimRequest(other, 1, 30))).jobs
    assert recovered.id == taken.id == job_id
    keep = asyncio.create_task(stack.engine.leases.run())
    await until(stack, lambda: not runs(stack, job_id)())
    keep.cancel()
    job = await store.get(job_id)
    assert job is not None and job.status == "running" and job.worker == other
    assert not record.exists()


async def test_a_resync_makes_waiters_read_again(stack: Stack) -> None:
    job_id = await stack.enqueue("slow", {"seconds": 0.3})
    waiter = asyncio.create_task(stack.submitter.wait(job_id))
    await asyncio.sleep(0.05)
    stack.store.events.resync()  # as after a lost connection: maybe the finish was missed
    assert (await asyncio.wait_for(waiter, 10)).status == "succeeded"


async def test_a_run_with_a_free_slot_starts_in_its_inserts_commit(make_stack: MakeStack) -> None:
    """One commit to start: the run's insert also claims it (same transaction, same time)."""
    stack = await make_stack()
    outcome = await stack.jobs.run(stack.run_params("echo", "one commit"))
    job = outcome.job
    assert job.status == "succeeded" and job.started_at == job.created_at
    enqueued = await stack.enqueue("echo", "queued")  # acknowledged first, claimed after
    done = await asyncio.wait_for(stack.submitter.wait(enqueued), 10)
    assert done.started_at is not None and done.started_at > done.created_at


async def test_a_detached_run_is_answered_with_the_job_its_commit_started(
    make_stack: MakeStack,
) -> None:
    """No read after the commit: the reply is the row the claim took, as the store has it."""
    stack = await make_stack()
    params = stack.run_params("echo", "detached")
    params.detach = True
    outcome = await stack.jobs.start_run(params)
    assert isinstance(outcome, RunResult) and not outcome.joined
    started = outcome.job
    assert started.status == "running" and started.started_at == started.created_at
    ended = await asyncio.wait_for(stack.submitter.wait(started.id), 10)
    stored = await stack.store.get(started.id)
    assert stored is not None and ended.status == "succeeded"
    same = {f: getattr(stored, f) for f in stored.__struct_fields__}
    same.update(status="running", finished_at=None, result=None)
    assert {f: getattr(started, f) for f in started.__struct_fields__} == same


async def test_news_of_work_due_later_asks_nothing_of_the_system(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every insert elsewhere (another daemon's, taskd.outbox's) is heard as "due in N
    seconds": hearing it asks the system nothing (each get_running_loop() is a getpid)."""
    await asyncio.sleep(0)  # the executor's loop has started
    real = asyncio.get_running_loop
    asked: list[str] = []

    def get_running_loop() -> asyncio.AbstractEventLoop:
        asked.append("loop")
        return real()

    monkeypatch.setattr(asyncio, "get_running_loop", get_running_loop)
    for n in range(100):
        stack.store.events.due(60.0 + n)
    monkeypatch.undo()
    assert asked == []
