"""Flow control in the store, on every backend: a paused task starts nothing on any worker,
its jobs wait as pending and start again once it is resumed."""

from __future__ import annotations

import msgspec
import pytest

from taskd.store import ClaimRequest, NewJob, Outcome, Store
from tests.conftest import NOW
from tests.store.counting import counters_match_the_jobs  # noqa: F401
from tests.support import Clock

PAYLOAD = msgspec.msgpack.encode({})
LEASE = 60.0
W1, W2 = "w1/1", "w2/1"


@pytest.fixture(autouse=True)
async def workers(store: Store) -> None:
    assert [await store.register_node(node, LEASE) for node in ("w1", "w2")] == [W1, W2]


def new(task: str = "t", **fields: object) -> NewJob:
    values: dict[str, object] = {"task": task, "payload": PAYLOAD, "origin": "enqueue",
                                 "max_attempts": 3}  # fmt: skip
    values.update(fields)
    return NewJob(**values)  # type: ignore[arg-type]


def request(limit: int = 10, worker: str = W1, **options: object) -> ClaimRequest:
    return ClaimRequest(worker, limit, LEASE, **options)  # type: ignore[arg-type]


async def test_a_paused_task_starts_nothing_on_any_worker(store: Store) -> None:
    await store.insert([new("t"), new("t"), new("other")])
    assert await store.set_task_paused("t", True) == NOW
    first = await store.claim(request(worker=W1))
    second = await store.claim(request(worker=W2, limits={"t": 5}))
    assert [job.task for job in first.jobs + second.jobs] == ["other"]
    assert first.next_due_in is None  # nothing to wake for until it is resumed
    assert await store.paused_tasks() == {"t": NOW}


async def test_pausing_twice_keeps_the_first_time_and_resuming_lets_jobs_start(
    store: Store, clock: Clock
) -> None:
    await store.insert([new("t")])
    await store.set_task_paused("t", True)
    clock.now = NOW + 10
    assert await store.set_task_paused("t", True) == NOW
    assert not (await store.claim(request())).jobs
    woken: list[float] = []
    store.events.on_due(woken.append)
    assert await store.set_task_paused("t", False) is None
    assert woken == [0.0]  # the daemons claim again at once
    assert [job.task for job in (await store.claim(request())).jobs] == ["t"]
    assert await store.paused_tasks() == {}


async def test_a_paused_task_holds_back_only_new_attempts(store: Store) -> None:
    await store.insert([new("t"), new("t")])
    (running,) = (await store.claim(request(limit=1))).jobs
    await store.set_task_paused("t", True)
    assert not (await store.claim(request())).jobs
    job = await store.get(running.id)
    assert job is not None and job.status == "running"  # a running job finishes


async def test_a_rate_limit_spaces_the_starts_across_workers(store: Store, clock: Clock) -> None:
    await store.insert([new("t") for _ in range(8)] + [new("other")])
    rates = {"t": 0.5}  # 2/s: a start may come 0.5 s early, so an idle limit allows two
    first = await store.claim(request(worker=W1, rates=rates))
    assert sorted(job.task for job in first.jobs) == ["other", "t", "t"]
    assert first.next_due_in == pytest.approx(0.5)  # the claimer wakes when the next may start
    second = await store.claim(request(worker=W2, rates=rates))
    assert second.jobs == [] and second.next_due_in == pytest.approx(0.5)
    assert await store.rate_limit_starts(rates) == {"t": NOW + 0.5}
    clock.now = NOW + 0.5
    assert [job.task for job in (await store.claim(request(worker=W2, rates=rates))).jobs] == ["t"]
    clock.now = NOW + 0.7
    assert (await store.claim(request(rates=rates))).next_due_in == pytest.approx(0.3)
    # Idle time is not saved up: after a long pause, the burst again, then spaced.
    clock.now = NOW + 100
    assert len((await store.claim(request(rates=rates))).jobs) == 2
    assert (await store.claim(request(rates=rates))).jobs == []


async def test_a_slow_rate_limit_wakes_a_second_early_and_only_for_pending_jobs(
    store: Store,
) -> None:
    await store.insert([new("t")])
    rates = {"t": 3600.0}  # 1/h: a start may come one second early, no more
    assert len((await store.claim(request(rates=rates))).jobs) == 1
    assert (await store.claim(request(rates=rates))).next_due_in is None  # none pending
    await store.insert([new("t")])
    claimed = await store.claim(request(rates=rates))
    assert claimed.jobs == [] and claimed.next_due_in == pytest.approx(3599)


async def test_a_uniqueness_window_keeps_a_key_taken_after_its_job_finished(
    store: Store, clock: Clock
) -> None:
    (first,) = await store.insert([new("t", key="k", unique_for=600)])
    (job,) = (await store.claim(request())).jobs
    await store.finish([Outcome(job.id, job.epoch, W1, "succeeded")])
    clock.now = NOW + 599
    again, unwindowed = await store.insert([new("t", key="k", unique_for=600), new("t", key="x")])
    assert again.job_id == first.job_id and again.duplicate
    assert not unwindowed.duplicate
    clock.now = NOW + 601
    (later,) = await store.insert([new("t", key="k", unique_for=600)])
    assert not later.duplicate and later.job_id != first.job_id
    (plain,) = await store.insert([new("t", key="k")])  # without a window: the active job
    assert plain.job_id == later.job_id and plain.duplicate


async def test_a_debounce_gathers_a_burst_into_one_job_with_the_last_payload(
    store: Store, clock: Clock
) -> None:
    def burst(n: int) -> NewJob:
        return new("t", key="k", debounce=2.0, max_wait=5.0, delay=2.0,
                   payload=msgspec.msgpack.encode({"n": n}))  # fmt: skip

    (first,) = await store.insert([burst(1)])
    clock.now = NOW + 1.5
    (second,) = await store.insert([burst(2)])
    assert second.job_id == first.job_id and second.duplicate
    job = await store.get(first.job_id)
    assert job is not None and job.run_at == NOW + 3.5
    assert msgspec.msgpack.decode(job.payload) == {"n": 2}
    clock.now = NOW + 4.0
    await store.insert([burst(3)])
    job = await store.get(first.job_id)
    assert job is not None and job.run_at == NOW + 5.0  # never past created + max_wait
    clock.now = NOW + 5.0
    (started,) = (await store.claim(request())).jobs
    assert msgspec.msgpack.decode(started.payload) == {"n": 3}
    # While it runs its key is taken: an enqueue with the key returns the running job.
    (after,) = await store.insert([burst(4)])
    assert after.job_id == first.job_id and after.duplicate


async def test_a_debounce_of_a_job_waiting_for_its_parent_keeps_it_waiting(
    store: Store, clock: Clock
) -> None:
    """A debounce moves the time a job waiting for its parents (`after`) is due at, not
    its hold: it starts only once the parent has succeeded, and then at that time."""
    (parent,) = await store.insert([new("p")])

    def burst(n: int) -> NewJob:
        return new("t", key="k", debounce=2.0, delay=2.0, after=(parent.job_id,),
                   payload=msgspec.msgpack.encode({"n": n}))  # fmt: skip

    (first,) = await store.insert([burst(1)])
    clock.now = NOW + 1.0
    (second,) = await store.insert([burst(2)])
    assert second.job_id == first.job_id and second.duplicate
    job = await store.get(first.job_id)
    assert job is not None and job.blocked == 1 and job.run_at == NOW + 3.0
    clock.now = NOW + 10.0
    (started,) = (await store.claim(request())).jobs  # the parent only
    assert started.id == parent.job_id
    await store.finish([Outcome(parent.job_id, 1, W1, "succeeded")])
    (child,) = (await store.claim(request())).jobs
    assert child.id == first.job_id and msgspec.msgpack.decode(child.payload) == {"n": 2}
