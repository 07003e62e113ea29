"""Flow control in the store, on every backend: a paused task starts nothing on any worker,
its jobs wait as pending and start again once it is resumed."""

from __future__ import annotations

import msgspec
import pytest

from taskd.models import Job
from taskd.store import ClaimRequest, LimitState, NewJob, Outcome, SharedLimit, Store
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


# -- shared limits ------------------------------------------------------------------------


def stripe(concurrency: int | None = None, interval: float | None = None) -> dict[str, object]:
    """A claim's shared limit `stripe` over tasks a and b (and c in none)."""
    return {"stripe": SharedLimit(("a", "b"), concurrency, interval)}


async def test_a_shared_concurrency_limit_counts_the_jobs_of_all_its_tasks_on_every_worker(
    store: Store,
) -> None:
    await store.insert([new("a"), new("b"), new("a"), new("b"), new("a"), new("c")])
    first = await store.claim(request(worker=W1, shared=stripe(concurrency=3)))
    # Its budget goes to its tasks' first due jobs in claim order, whichever task.
    assert [job.task for job in first.jobs] == ["a", "b", "a", "c"]
    second = await store.claim(request(worker=W2, shared=stripe(concurrency=3)))
    assert second.jobs == [] and second.next_due_in is None  # a finish wakes it, not a timer
    states = await store.limit_states(stripe(concurrency=3))
    assert states == {"stripe": LimitState(running=3, waiting=2, next_start=None)}
    done = first.jobs[1]
    await store.finish([Outcome(done.id, done.epoch, W1, "succeeded")])
    (third,) = (await store.claim(request(worker=W2, shared=stripe(concurrency=3)))).jobs
    assert third.task == "b"  # the oldest due job of its tasks


async def test_a_task_in_a_shared_limit_keeps_its_own_limits(store: Store) -> None:
    await store.insert([new("a"), new("a"), new("b"), new("b")])
    await store.set_task_paused("b", True)
    claimed = await store.claim(request(limits={"a": 1}, shared=stripe(concurrency=3)))
    assert [job.task for job in claimed.jobs] == ["a"]  # a's own limit, b paused


async def test_a_shared_rate_limit_spaces_the_starts_of_all_its_tasks(
    store: Store, clock: Clock
) -> None:
    await store.insert([new("a"), new("b"), new("a"), new("b"), new("c")])
    shared = stripe(interval=0.5)  # 2/s: an idle limit lets two through at once
    first = await store.claim(request(worker=W1, shared=shared))
    assert [job.task for job in first.jobs] == ["a", "b", "c"]
    assert first.next_due_in == pytest.approx(0.5)  # when the limit next allows a start
    assert (await store.claim(request(worker=W2, shared=shared))).jobs == []
    states = await store.limit_states(shared)
    assert states["stripe"].next_start == pytest.approx(NOW + 0.5)
    clock.now = NOW + 0.5
    assert [job.task for job in (await store.claim(request(worker=W2, shared=shared))).jobs] == [
        "a"
    ]
    # The task's own rate limit and the shared one: the stricter holds.
    clock.now = NOW + 100
    both = await store.claim(request(shared=shared, rates={"b": 100.0}))
    assert [job.task for job in both.jobs] == ["b"]
    assert (await store.claim(request(shared=shared, rates={"b": 100.0}))).jobs == []


# -- per-key limits and fairness ----------------------------------------------------------


def of(customer: object = None, n: int = 0) -> NewJob:
    """A job of the keyed task `t` for this customer (none: no such field)."""
    payload = {"n": n} if customer is None else {"n": n, "order": {"customer": customer}}
    return new("t", payload=msgspec.msgpack.encode(payload))


def keyed(**options: object) -> ClaimRequest:
    return request(keyed=frozenset({"t"}), **options)


def customers(jobs: list[Job]) -> list[object]:
    return [msgspec.msgpack.decode(job.payload).get("order", {}).get("customer") for job in jobs]


@pytest.fixture
def keyed_store(store: Store) -> Store:
    store.limit_keys = {"t": "order.customer"}
    return store


async def test_keys_take_turns_so_a_backlog_does_not_hold_another_keys_job(
    keyed_store: Store,
) -> None:
    store = keyed_store
    await store.insert([of("a", n) for n in range(50)])
    await store.insert([of("b"), of(None), new("other")])
    taken = [job for _ in range(4) for job in (await store.claim(keyed(limit=1))).jobs]
    # One job of each key in turn: b's single job and the keyless one (key '') are not
    # behind a's 50, and the unkeyed task takes its turn too.
    assert len(taken) == 4
    assert [job.task for job in taken].count("other") == 1
    assert sorted(map(str, customers([job for job in taken if job.task == "t"]))) == [
        "None",
        "a",
        "b",
    ]
    # Then a's backlog, one a claim.
    assert customers((await store.claim(keyed(limit=1))).jobs) == ["a"]


async def test_a_keyed_tasks_concurrency_counts_per_key(keyed_store: Store) -> None:
    store = keyed_store
    await store.insert([of("a", n) for n in range(5)] + [of("b", n) for n in range(5)])
    await store.insert([of(7), of(None)])  # a number is a key as well; no field: key ''
    claimed = await store.claim(keyed(limit=10, limits={"t": 1}))
    assert sorted(map(str, customers(claimed.jobs))) == ["7", "None", "a", "b"]
    assert claimed.next_due_in is None  # every key is at its limit: an end wakes the claims
    again = await store.claim(keyed(worker=W2, limit=10, limits={"t": 1}))
    assert again.jobs == [] and again.next_due_in is None
    a = next(job for job in claimed.jobs if customers([job]) == ["a"])
    await store.finish([Outcome(a.id, a.epoch, W1, "succeeded")])
    (next_a,) = (await store.claim(keyed(worker=W2, limit=10, limits={"t": 1}))).jobs
    assert customers([next_a]) == ["a"]


async def test_a_keyed_tasks_rate_limit_counts_per_key(keyed_store: Store, clock: Clock) -> None:
    store = keyed_store
    await store.insert([of("a", n) for n in range(3)] + [of("b", n) for n in range(3)])
    rates = {"t": 10.0}  # one start per key every 10 s
    first = await store.claim(keyed(rates=rates))
    assert sorted(customers(first.jobs)) == ["a", "b"]  # type: ignore[type-var]
    assert first.next_due_in == pytest.approx(9.0)  # a start may come a second early
    assert (await store.claim(keyed(rates=rates))).jobs == []
    clock.now = NOW + 9
    assert sorted(customers((await store.claim(keyed(rates=rates))).jobs)) == ["a", "b"]  # type: ignore[type-var]
    assert await store.key_state("t", "a", 10.0) == (2, pytest.approx(NOW + 18))
    # A value's row, once its limit has long allowed a start, is pruned: it allows one still.
    clock.now = NOW + 200
    await store.prune({"succeeded": 86400.0})
    assert await store.key_state("t", "a", 10.0) == (2, None)
    assert sorted(customers((await store.claim(keyed(rates=rates))).jobs)) == ["a", "b"]  # type: ignore[type-var]


async def test_a_claim_reads_a_bounded_number_of_keys_and_the_next_goes_on(
    keyed_store: Store,
) -> None:
    store = keyed_store
    await store.insert([of(f"k{n:03}") for n in range(100)])
    first = await store.claim(keyed(limit=500, limits={"t": 1}))
    assert len(first.jobs) == 64 and first.next_due_in == 0.0  # WALK keys, then at once
    second = await store.claim(keyed(limit=500, limits={"t": 1}))
    assert len(second.jobs) == 36
    assert len(set(customers(first.jobs + second.jobs))) == 100
    third = await store.claim(keyed(limit=500, limits={"t": 1}))
    assert third.jobs == [] and third.next_due_in is None


async def test_a_key_that_gets_room_behind_the_walk_is_found_on_its_next_round(
    keyed_store: Store, clock: Clock
) -> None:
    store = keyed_store
    await store.insert([of(f"k{n:03}", m) for n in range(100) for m in range(2)])
    full = keyed(limit=500, limits={"t": 1})
    running = (await store.claim(full)).jobs + (await store.claim(full)).jobs
    assert len(running) == 100  # one of each key: every key is at its limit now
    clock.now = NOW + 1
    third = await store.claim(full)  # k000..k063: nothing; the walk goes on at once
    assert third.jobs == [] and third.next_due_in == 0.0
    clock.now = NOW + 2
    k040 = next(job for job in running if customers([job]) == ["k040"])
    await store.finish([Outcome(k040.id, k040.epoch, W1, "succeeded")])
    # This round comes back to where the fruitless walks began, but k040, behind it, has
    # room since: the walk goes round again instead of waiting for an end.
    fourth = await store.claim(full)
    assert fourth.jobs == [] and fourth.next_due_in == 0.0
    taken = []
    for _ in range(3):
        taken += (await store.claim(full)).jobs
    assert customers(taken) == ["k040"]
    # Once round with nothing to take, the claims wait for an end: they do not spin.
    dues = [(await store.claim(full)).next_due_in for _ in range(4)]
    assert None in dues, dues


async def test_a_keyed_tasks_backlog_held_by_its_values_limit_leaves_its_shared_limit_to_others(
    keyed_store: Store,
) -> None:
    store = keyed_store
    await store.insert([new("other", priority=1)])
    await store.insert([of("a", n) for n in range(3)])  # key a: one at a time
    pool = {"pool": SharedLimit(("t", "other"), concurrency=2)}
    first = await store.claim(keyed(limit=2, limits={"t": 1}, shared=pool))
    second = await store.claim(keyed(limit=2, limits={"t": 1}, shared=pool))
    # The pool has room for two, and a's second job cannot start: the other task's can.
    assert sorted(job.task for job in first.jobs + second.jobs) == ["other", "t"]
    # Then nothing can start until a job ends (which wakes the claims): no claiming again
    # at once, over and over.
    third = await store.claim(keyed(limit=2, limits={"t": 1}, shared=pool))
    assert third.jobs == [] and third.next_due_in is None, third


async def test_a_share_a_task_cannot_use_goes_to_the_other_tasks_of_its_shared_limit(
    store: Store,
) -> None:
    await store.insert([new("b", priority=1), new("a"), new("c", priority=1)])
    shared = {
        "pool": SharedLimit(("a", "b"), concurrency=1),
        "api": SharedLimit(("b", "c"), concurrency=1),
    }
    first = await store.claim(request(shared=shared))
    # pool: a comes first (its priority); api: b, which pool holds back, then c.
    assert sorted(job.task for job in first.jobs) == ["a", "c"], first


async def test_a_task_its_own_rate_allows_waits_for_its_shared_limits_rate(
    store: Store, clock: Clock
) -> None:
    # Found by test_flow_model: c's own rate (4/s) allows a start before api's (2/s) does;
    # the claim said to claim again at once, and would have, until api allowed one.
    await store.insert([new("c") for _ in range(3)])
    options: dict[str, object] = {"rates": {"c": 0.25},
                                  "shared": {"api": SharedLimit(("c",), interval=0.5)}}  # fmt: skip
    assert len((await store.claim(request(limit=1, **options))).jobs) == 1
    assert len((await store.claim(request(limit=1, **options))).jobs) == 1  # the burst
    clock.now = NOW + 0.25
    held = await store.claim(request(limit=1, **options))
    assert held.jobs == [] and held.next_due_in == pytest.approx(0.25), held
    full = {"api": SharedLimit(("c",), concurrency=2, interval=0.5)}
    assert (await store.claim(request(limit=1, rates={"c": 0.25}, shared=full))).next_due_in is None


async def test_values_with_only_delayed_jobs_leave_their_turns_to_the_others(
    keyed_store: Store,
) -> None:
    # Found by test_flow_model: a claim read one job of each of as many values as it may
    # take, and left a's second though b (only a delayed job) took no turn.
    store = keyed_store
    await store.insert([msgspec.structs.replace(of("b"), delay=10.0)])
    await store.insert([of("a", n) for n in range(3)] + [of("c")])
    claimed = await store.claim(keyed(limit=3, limits={"t": 2}))
    assert sorted(customers(claimed.jobs)) == ["a", "a", "c"]  # type: ignore[type-var]


async def test_jobs_queued_before_their_task_is_keyed_count_under_their_values_once_rekeyed(
    store: Store,
) -> None:
    await store.insert([of("a", n) for n in range(2)] + [of("b"), of(None)])
    (running,) = (await store.claim(request(limit=1, limits={"t": 1}))).jobs
    assert customers([running]) == ["a"]
    store.limit_keys = {"t": "order.customer"}  # a reload gives t a limit_key
    await store.rekey("t", "order.customer")
    assert await store.key_state("t", "a", None) == (1, None)  # the running job's value too
    claimed = await store.claim(keyed(limit=10, limits={"t": 1}))
    assert sorted(map(str, customers(claimed.jobs))) == ["None", "b"]
    assert await store.key_state("t", "", None) == (1, None)  # the job without a customer
    store.limit_keys = {}
    await store.rekey("t", None)  # and one that takes it away: its jobs have no value now
    for value in ("a", "b", ""):
        assert await store.key_state("t", value, None) == (0, None)
    assert await store.values_in_use(["t"]) == {"t": (0, 0)}


async def test_a_keyed_task_without_pending_jobs_rests_until_a_write_stirs_it(
    keyed_store: Store,
) -> None:
    # Its claims then leave its turn unlocked (PostgreSQL): the daemons' claims do not wait
    # for each other on a task with nothing to start.
    store = keyed_store
    for _ in range(2):  # the first finds no value and rests the task; the second, resting
        claimed = await store.claim(keyed())
        assert claimed.jobs == [] and claimed.next_due_in is None
    await store.insert([of("a")])
    (job,) = (await store.claim(keyed())).jobs
    assert (await store.claim(keyed())).jobs == []  # a runs: nothing pending, it rests again
    await store.finish([Outcome(job.id, job.epoch, W1, "released")])
    assert customers((await store.claim(keyed())).jobs) == ["a"]  # put back: stirred
