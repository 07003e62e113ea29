"""The job store's contract, on every backend: uniqueness, claim order, limits, fencing,
nodes and recovery, ticks, and the notifications."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from taskd.models import FiredJob
from taskd.store import (
    ClaimRequest,
    Failure,
    Hold,
    InvalidTransition,
    JobFilter,
    JobNotFound,
    NewJob,
    Outcome,
    ProgressNote,
    ScheduleState,
    Store,
)
from tests.conftest import NOW
from tests.store.counting import counters_match_the_jobs  # noqa: F401
from tests.support import Clock

PAYLOAD = msgspec.msgpack.encode({"x": 1})
LEASE = 60.0
W1, W2 = "w1/1", "w2/1"  # the workers of two daemons, registered for every test


@pytest.fixture(autouse=True)
async def workers(store: Store) -> None:
    assert [await store.register_node(node, LEASE) for node in ("w1", "w2")] == [W1, W2]


def new(task: str = "t", **fields: object) -> NewJob:
    values: dict[str, object] = {
        "task": task, "payload": PAYLOAD, "origin": "enqueue", "max_attempts": 3,
    }  # fmt: skip
    values.update(fields)
    return NewJob(**values)  # type: ignore[arg-type]


async def claim(store: Store, limit: int = 10, worker: str = W1, **limits: int):  # type: ignore[no-untyped-def]
    return await store.claim(ClaimRequest(worker, limit, LEASE, limits))


def succeeded(job_id: int, epoch: int = 1, worker: str = W1, result: object = "ok") -> Outcome:
    return Outcome(job_id, epoch, worker, "succeeded", result=msgspec.msgpack.encode(result))


ERROR = Failure("error", "ValueError: boom", "Traceback ...")


async def test_insert_and_get_round_trip(store: Store) -> None:
    (inserted,) = await store.insert([new(priority=5, key="k", parent_id=None)])
    assert not inserted.duplicate
    job = await store.get(inserted.job_id)
    assert job is not None
    assert (job.task, job.status, job.priority, job.key, job.attempts) == (
        "t",
        "pending",
        5,
        "k",
        0,
    )
    assert msgspec.msgpack.decode(job.payload) == {"x": 1}
    assert job.created_at == NOW and job.run_at == NOW
    assert await store.get(inserted.job_id + 1000) is None


TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def test_a_job_keeps_the_traceparent_it_was_created_with(store: Store) -> None:
    traced, untraced = await store.insert([new(traceparent=TRACEPARENT), new()])
    (joined,) = await store.insert([new(traceparent=TRACEPARENT.replace("b7", "c8"), key="k")])
    (again,) = await store.insert([new(key="k", traceparent=TRACEPARENT)])
    assert again.job_id == joined.job_id and again.duplicate
    jobs = {job.id: job for job in await store.list_jobs(JobFilter())}
    assert jobs[traced.job_id].traceparent == TRACEPARENT
    assert jobs[untraced.job_id].traceparent is None
    # A job joined by a later request keeps the traceparent of the request that created it.
    assert jobs[joined.job_id].traceparent == TRACEPARENT.replace("b7", "c8")
    claimed = {job.id: job for job in (await claim(store)).jobs}
    assert claimed[traced.job_id].traceparent == TRACEPARENT  # what the attempt is traced under


async def test_due_time_from_a_delay_or_a_given_instant(store: Store) -> None:
    delayed, at = await store.insert([new(delay=30), new(run_at=NOW + 99, delay=5)])
    jobs = {job.id: job for job in await store.list_jobs(JobFilter())}
    assert jobs[delayed.job_id].run_at == NOW + 30  # the store's clock plus the delay
    assert jobs[at.job_id].run_at == NOW + 99  # an instant a person gave wins


async def test_unique_key_returns_the_active_job(store: Store) -> None:
    first, same, other_task, other_key, unkeyed = await store.insert(
        [new(key="k"), new(key="k"), new("u", key="k"), new(key="k2"), new()]
    )
    assert same.job_id == first.job_id and same.duplicate
    assert not other_task.duplicate and not other_key.duplicate and not unkeyed.duplicate
    assert len({first.job_id, other_task.job_id, other_key.job_id, unkeyed.job_id}) == 4
    (again,) = await store.insert([new(key="k")])
    assert again == same
    # Once the keyed job has finished, the key is free again.
    claimed = await claim(store, limit=10)
    assert first.job_id in {job.id for job in claimed.jobs}
    await store.finish([succeeded(first.job_id)])
    (fresh,) = await store.insert([new(key="k")])
    assert not fresh.duplicate and fresh.job_id != first.job_id


async def test_ids_match_the_jobs_they_were_given_for(store: Store) -> None:
    # More than one INSERT statement's worth, keyed and unkeyed mixed, duplicates within.
    jobs = [
        new(f"t{n % 7}", payload=msgspec.msgpack.encode(n), key=f"k{n % 5}" if n % 3 else None)
        for n in range(1200)
    ]
    inserted = await store.insert(jobs)
    first_of_key: dict[tuple[str, str | None], int] = {}
    for n, (job, row) in enumerate(zip(jobs, inserted, strict=True)):
        stored = await store.get(row.job_id)
        assert stored is not None and (stored.task, stored.key) == (job.task, job.key)
        first = first_of_key.setdefault((job.task, job.key), n) if job.key else n
        assert row.duplicate == (first != n)
        assert msgspec.msgpack.decode(stored.payload) == first


async def test_concurrent_inserts_in_one_tick_share_one_job(store: Store) -> None:
    results = await asyncio.gather(*(store.insert([new(key="@run")]) for _ in range(100)))
    ids = {inserted.job_id for (inserted,) in results}
    assert len(ids) == 1
    assert sum(not inserted.duplicate for (inserted,) in results) == 1
    assert len(await store.list_jobs(JobFilter())) == 1


async def test_concurrent_unkeyed_inserts_all_land(store: Store) -> None:
    results = await asyncio.gather(*(store.insert([new(), new()]) for _ in range(200)))
    ids = [inserted.job_id for pair in results for inserted in pair]
    assert len(set(ids)) == 400
    assert len(await store.list_jobs(JobFilter(limit=1000))) == 400


async def test_claim_order_priority_then_due_time_then_fifo(store: Store, clock: Clock) -> None:
    inserted = await store.insert(
        [
            new(priority=0, run_at=NOW - 5),  # 0
            new(priority=-1),  # 1: lowest priority number first
            new(priority=0, run_at=NOW - 10),  # 2: earlier due among equal priority
            new(priority=0, run_at=NOW - 5),  # 3: FIFO after 0
            new(priority=-5, delay=30),  # 4: not due yet
        ],
    )
    ids = [i.job_id for i in inserted]
    claimed = await claim(store, limit=10)
    assert [job.id for job in claimed.jobs] == [ids[1], ids[2], ids[0], ids[3]]
    assert claimed.next_due_in == 30
    assert all(job.status == "running" and job.attempts == 1 for job in claimed.jobs)
    assert all(job.worker == W1 and job.started_at == NOW for job in claimed.jobs)
    clock.now = NOW + 31
    later = await claim(store)
    assert [job.id for job in later.jobs] == [ids[4]] and later.next_due_in is None


async def test_claim_respects_limit_and_concurrency_across_workers(store: Store) -> None:
    await store.insert([new("a") for _ in range(5)] + [new("b") for _ in range(5)])
    first = await claim(store, limit=4, worker=W1, a=2)
    assert [job.task for job in first.jobs].count("a") == 2 and len(first.jobs) == 4
    # Another worker with the same limits: a already runs twice, wherever that is.
    second = await claim(store, limit=10, worker=W2, a=2)
    assert {job.task for job in second.jobs} == {"b"} and len(second.jobs) == 3
    assert second.next_due_in is None  # only jobs of a task at its limit remain
    running_a = next(job for job in first.jobs if job.task == "a")
    await store.finish([succeeded(running_a.id)])
    third = await claim(store, limit=10, worker=W2, a=2)
    assert [job.task for job in third.jobs] == ["a"]


async def test_a_waiting_job_counts_against_no_limit(store: Store) -> None:
    await store.insert([new("a") for _ in range(3)])
    (parent,) = (await claim(store, limit=1, a=1)).jobs
    assert (await claim(store, a=1)).jobs == []
    assert await store.set_waiting(parent.id, parent.epoch, W1, True)
    (child,) = (await claim(store, a=1)).jobs  # the parent lends its place
    assert not await store.set_waiting(parent.id, parent.epoch, W2, False)  # fenced
    assert await store.set_waiting(parent.id, parent.epoch, W1, False)
    assert (await claim(store, a=1)).jobs == []  # both count again (one over the limit)
    await store.finish([succeeded(child.id)])
    assert (await claim(store, a=1)).jobs == []
    await store.finish([succeeded(parent.id)])
    assert len((await claim(store, a=1)).jobs) == 1


async def test_finish_success_retry_and_failure(store: Store) -> None:
    a, b, c = (i.job_id for i in await store.insert([new(), new(), new(max_attempts=1)]))
    await claim(store)
    finished = await store.finish(
        [
            succeeded(a, result={"answer": 42}),
            Outcome(b, 1, W1, "retry", error=ERROR, retry_in=60),
            Outcome(c, 1, W1, "failed", error=ERROR),
        ]
    )
    done, retried, failed = finished.jobs
    assert done is not None and done.status == "succeeded" and done.finished_at == NOW
    assert msgspec.msgpack.decode(done.result) == {"answer": 42}
    assert retried is not None and retried.status == "pending" and retried.run_at == NOW + 60
    assert retried.finished_at is None and retried.error == "ValueError: boom"
    assert failed is not None and failed.status == "failed"
    job = await store.get(c)
    assert job is not None and [(e.attempt, e.message, e.at) for e in job.errors] == [
        (1, "ValueError: boom", NOW)
    ]
    assert job.errors[0].traceback == "Traceback ..." and job.errors[0].kind == "error"


async def test_finish_and_claim_in_one_call(store: Store) -> None:
    first, second = (i.job_id for i in await store.insert([new(), new()]))
    await claim(store, limit=1)
    finished = await store.finish([succeeded(first)], ClaimRequest(W1, 5, LEASE))
    assert finished.jobs[0] is not None and finished.jobs[0].status == "succeeded"
    assert finished.claimed is not None and [j.id for j in finished.claimed.jobs] == [second]


async def test_a_finish_of_hundreds_of_outcomes_records_each(store: Store) -> None:
    """A drain's finish holds hundreds of outcomes (SQLite records them in chunks): each is
    recorded, fenced and returned in its place, with its result and error."""
    ids = [i.job_id for i in await store.insert([new(max_attempts=1) for _ in range(300)])]
    assert len((await claim(store, limit=300)).jobs) == 300
    outcomes = [
        Outcome(job_id, 1, W1, "failed", error=ERROR) if n % 7 == 3
        else succeeded(job_id, epoch=2) if n % 11 == 5  # a stale claim's: refused
        else succeeded(job_id, result=n)
        for n, job_id in enumerate(ids)
    ]  # fmt: skip
    finished = (await store.finish(outcomes)).jobs
    for n, (job_id, job) in enumerate(zip(ids, finished, strict=True)):
        if n % 7 == 3:
            assert job is not None and (job.id, job.status, job.error) == (
                job_id, "failed", "ValueError: boom"
            )  # fmt: skip
        elif n % 11 == 5:
            assert job is None
        else:
            assert job is not None and (job.id, job.status) == (job_id, "succeeded")
            assert job.result is not None and msgspec.msgpack.decode(job.result) == n
    failed = await store.get(ids[3])
    assert failed is not None and [e.message for e in failed.errors] == ["ValueError: boom"]
    stale = await store.get(ids[5])
    assert stale is not None and stale.status == "running"


async def test_fencing_refuses_stale_and_foreign_outcomes(store: Store, clock: Clock) -> None:
    (inserted,) = await store.insert([new()])
    job_id = inserted.job_id
    await claim(store, worker=W1)
    # The worker vanishes; its lease expires and the job is claimed again (attempt 2).
    clock.now = NOW + LEASE + 1
    recovered = await store.recover(3)
    assert [job.id for job in recovered] == [job_id]
    await claim(store, worker=W2)
    stale, foreign = (
        await store.finish(
            [succeeded(job_id, epoch=1, worker=W1), succeeded(job_id, epoch=2, worker=W1)]
        )
    ).jobs
    assert stale is None and foreign is None
    job = await store.get(job_id)
    assert job is not None and job.status == "running" and (job.attempts, job.epoch) == (2, 2)
    (current,) = (await store.finish([succeeded(job_id, epoch=2, worker=W2)])).jobs
    assert current is not None and current.status == "succeeded"
    (late,) = (await store.finish([succeeded(job_id, epoch=2, worker=W2)])).jobs
    assert late is None  # an outcome is recorded once


async def test_fencing_survives_a_retry_that_resets_attempts(store: Store) -> None:
    (inserted,) = await store.insert([new()])
    job_id = inserted.job_id
    await claim(store)
    await store.cancel(job_id)  # the worker's thread may still be running attempt 1
    await store.retry(job_id)
    (again,) = (await claim(store)).jobs  # attempt 1 again, by the same worker
    assert (again.attempts, again.epoch) == (1, 2)
    (late,) = (await store.finish([succeeded(job_id, epoch=1)])).jobs
    assert late is None  # the old thread's late result must not land on the new attempt
    (current,) = (await store.finish([succeeded(job_id, epoch=2)])).jobs
    assert current is not None and current.status == "succeeded"


async def test_released_gives_the_attempt_back(store: Store) -> None:
    (inserted,) = await store.insert([new()])
    await claim(store)
    (job,) = (await store.finish([Outcome(inserted.job_id, 1, W1, "released")])).jobs
    assert job is not None and job.status == "pending" and job.attempts == 0
    assert job.run_at == NOW and job.worker is None and job.crashes == 0


async def test_a_finish_given_the_claimed_jobs_returns_each_whole_job(
    store: Store, clock: Clock
) -> None:
    """The executor gives the finish the jobs as it claimed them, and the finish reads back
    only what their end changed: each job it returns is the job as the store keeps it."""
    (parent,) = await store.insert([new("p")])
    await claim(store)
    await store.finish([succeeded(parent.job_id)])
    kinds = ["succeeded", "failed", "retry", "released"]
    inserted = await store.insert(
        [new(priority=n, key=f"k{n}", parent_id=parent.job_id, traceparent=f"00-{n}")
         for n, _ in enumerate(kinds)]
    )  # fmt: skip
    claimed = sorted((await claim(store)).jobs, key=lambda job: job.id)
    assert [job.id for job in claimed] == [each.job_id for each in inserted]
    await store.record_activity([ProgressNote(claimed[0].id, claimed[0].epoch, 2, 3, "half")], [])
    clock.now += 5
    # A held job's start (a tick's) sets started_at after its worker had it: read back too.
    claimed[1] = msgspec.structs.replace(claimed[1], started_at=None)
    outcomes = [
        Outcome(job.id, job.epoch, W1, kind, result=msgspec.msgpack.encode(kind),  # type: ignore[arg-type]
                error=None if kind in ("succeeded", "released") else ERROR, retry_in=7, job=job)
        for job, kind in zip(claimed, kinds, strict=True)
    ]  # fmt: skip
    finished = (await store.finish(outcomes)).jobs
    assert [job.status if job else None for job in finished] == [
        "succeeded", "failed", "pending", "pending"
    ]  # fmt: skip
    for job in finished:
        assert job is not None
        kept = await store.get(job.id)
        assert kept is not None and job == msgspec.structs.replace(kept, errors=[])
    assert finished[0].progress is not None and finished[0].progress.message == "half"
    assert finished[2].run_at == NOW + 5 + 7 and finished[3].worker is None


# -- nodes, leases and recovery ----------------------------------------------------------


async def test_each_start_of_a_node_is_a_new_worker(store: Store, clock: Clock) -> None:
    first = await store.register_node("n1", ttl=LEASE)
    other = await store.register_node("n2", ttl=LEASE)
    assert (first, other) == ("n1/1", "n2/1")
    await store.insert([new()])
    await claim(store, worker=first)
    nodes = {node.id: node for node in await store.nodes()}
    assert (nodes["n1"].worker, nodes["n1"].running, nodes["n2"].running) == ("n1/1", 1, 0)
    assert nodes["n1"].started_at == nodes["n1"].seen_at == NOW and nodes["n1"].pid > 0
    assert await store.register_node("n1", ttl=LEASE) == "n1/2"
    await store.leave(other)
    assert [node.worker for node in await store.nodes()] == ["n1/2", W1, W2]
    assert await store.register_node("n2", ttl=LEASE) == "n2/2"  # never n2/1 again
    clock.now = NOW + LEASE + 1
    assert await store.nodes() == []  # its heartbeat expired


async def test_nodes_show_the_digest_of_their_schedules(store: Store) -> None:
    await store.announce_schedules(W1, "5f2c9a01b7de")
    nodes = {node.worker: node for node in await store.nodes()}
    assert (nodes[W1].schedules, nodes[W2].schedules) == ("5f2c9a01b7de", None)


async def test_recovery_takes_back_only_jobs_of_workers_that_are_gone(
    store: Store, clock: Clock
) -> None:
    alive = await store.register_node("alive", ttl=LEASE)
    restarted = await store.register_node("restarted", ttl=LEASE)
    silent = await store.register_node("silent", ttl=LEASE)
    leaving = await store.register_node("leaving", ttl=LEASE)
    await store.insert([new(), new(), new(), new()])
    ids = {}
    for worker in (alive, restarted, silent, leaving):
        (job,) = (await claim(store, limit=1, worker=worker)).jobs
        ids[worker] = job.id
    await store.register_node("restarted", ttl=LEASE)  # its jobs from before are abandoned
    await store.leave(leaving)
    recovered = {job.id for job in await store.recover(3)}
    assert recovered == {ids[restarted], ids[leaving]}
    clock.now = NOW + 30
    await store.renew(alive, [ids[alive]], LEASE)  # heartbeat and lease, not silent's
    clock.now = NOW + LEASE + 1
    assert [job.id for job in await store.recover(3)] == [ids[silent]]
    job = await store.get(ids[silent])
    assert job is not None and job.errors[0].kind == "interrupted"
    assert "silent/1 went away" in job.errors[0].message


async def test_a_worker_whose_heartbeat_lapsed_is_gone_though_its_leases_are_not(
    store: Store, clock: Clock
) -> None:
    await store.insert([new(), new()])
    late = await store.register_node("late", ttl=LEASE)  # its heartbeat: until NOW + 60
    clock.now = NOW + 30
    (first,) = (await claim(store, limit=1, worker=late)).jobs  # leased until NOW + 90
    clock.now = NOW + LEASE + 1
    assert [job.id for job in await store.recover(3)] == [first.id]
    # A lapsed heartbeat that nobody acted on yet: the next renewal carries on.
    (second,) = (await claim(store, limit=1, worker=late)).jobs
    assert await store.renew(late, [second.id], LEASE) == []
    assert await store.recover(3) == []


async def test_renew_returns_the_jobs_a_worker_lost(store: Store, clock: Clock) -> None:
    worker = await store.register_node("n1", ttl=LEASE)
    await store.insert([new(), new(), new(), new()])
    kept, cancelled, done, taken = (j.id for j in (await claim(store, worker=worker)).jobs)
    await store.cancel(cancelled)
    await store.finish([succeeded(done, worker=worker)])
    assert await store.renew(worker, [kept, cancelled, done], LEASE) == [cancelled, done]
    # `taken` was not renewed: its lease expires and another worker takes it over.
    clock.now = NOW + LEASE + 1
    await store.renew(worker, [kept], LEASE)
    assert [job.id for job in await store.recover(3)] == [taken]
    await claim(store, worker=W2)
    assert await store.renew(worker, [kept, taken], LEASE) == [taken]
    # A worker whose node started again has lost everything.
    await store.register_node("n1", ttl=LEASE)
    assert await store.renew(worker, [kept], LEASE) == [kept]


async def test_recover_counts_crashes_and_quarantines(store: Store, clock: Clock) -> None:
    crashy, last_try = (
        i.job_id for i in await store.insert([new(max_attempts=10), new(max_attempts=1)])
    )
    for crash in range(1, 4):
        clock.now = NOW + crash
        worker = await store.register_node("n", ttl=LEASE)
        await claim(store, worker=worker)
        await store.register_node("n", ttl=LEASE)  # the daemon died and started again
        recovered = {job.id: job for job in await store.recover(3)}
        if crash == 1:
            assert recovered[last_try].status == "failed"
            assert "last attempt" in (recovered[last_try].error or "")
        job = recovered[crashy]
        assert job.crashes == crash
        assert job.status == ("failed" if crash == 3 else "pending")
    job = await store.get(crashy)
    assert job is not None and job.error == "quarantined after 3 crashes"
    assert [e.kind for e in job.errors] == ["interrupted"] * 3


async def test_cancel_and_retry_transitions(store: Store, clock: Clock) -> None:
    pending, running = (i.job_id for i in await store.insert([new(delay=99), new()]))
    await claim(store)
    assert (await store.cancel(pending)).status == "cancelled"
    assert (await store.cancel(running)).status == "cancelled"
    with pytest.raises(InvalidTransition, match="was already cancelled and cannot be cancelled"):
        await store.cancel(running)
    with pytest.raises(JobNotFound):
        await store.cancel(999_999)
    clock.now = NOW + 5
    retried = await store.retry(running)
    assert (retried.status, retried.attempts, retried.run_at) == ("pending", 0, NOW + 5)
    with pytest.raises(InvalidTransition, match="is still pending and cannot be retried"):
        await store.retry(running)


async def test_retry_refused_while_the_key_is_taken(store: Store) -> None:
    (first,) = await store.insert([new(key="k")])
    await store.cancel(first.job_id)
    (second,) = await store.insert([new(key="k")])
    assert not second.duplicate
    with pytest.raises(InvalidTransition, match="same key"):
        await store.retry(first.job_id)


async def test_a_bad_write_does_not_spoil_the_batch(store: Store) -> None:
    (keyed,) = await store.insert([new(key="k")])
    await store.cancel(keyed.job_id)
    await store.insert([new(key="k")])
    results = await asyncio.gather(
        store.insert([new()]),
        store.retry(keyed.job_id),
        store.insert([new()]),
        return_exceptions=True,
    )
    assert isinstance(results[1], InvalidTransition)
    assert len(await store.list_jobs(JobFilter())) == 4


async def test_list_counts_prune(store: Store, clock: Clock) -> None:
    ids = [i.job_id for i in await store.insert([new("a"), new("a"), new("b", delay=9)])]
    await claim(store, limit=1)
    await store.finish([succeeded(ids[0])])
    newest_first = await store.list_jobs(JobFilter())
    assert [job.id for job in newest_first] == sorted(ids, reverse=True)
    assert [job.id for job in await store.list_jobs(JobFilter(statuses=["succeeded"]))] == [ids[0]]
    assert [job.id for job in await store.list_jobs(JobFilter(task="b"))] == [ids[2]]
    clock.now = NOW + 4
    counts = {entry.task: entry for entry in await store.counts()}
    assert counts["a"].counts == {"pending": 1, "succeeded": 1}
    assert counts["a"].oldest_pending_age == 4
    assert counts["b"].next_due_at == NOW + 9
    assert await store.queue_depth() == 2
    assert await store.prune({"succeeded": 4}) == 0  # finished exactly 4 s ago
    assert await store.prune({"succeeded": 2}) == 1
    assert await store.get(ids[0]) is None
    assert {entry.task: entry.counts for entry in await store.counts()} == {
        "a": {"pending": 1}, "b": {"pending": 1},
    }  # fmt: skip


async def test_counts_find_the_oldest_and_the_next_job_at_every_priority(
    store: Store, clock: Clock
) -> None:
    (parent,) = await store.insert([new("p", delay=1000)])
    await store.insert([
        new("c", priority=5),  # due now: the oldest
        new("c", priority=1, delay=20),
        new("c", priority=9, delay=7),  # the next due
        new("c", priority=-3, after=(parent.job_id,)),  # waits for its parent: never due
    ])  # fmt: skip
    clock.now = NOW + 2
    entry = {entry.task: entry for entry in await store.counts()}["c"]
    assert (entry.counts, entry.oldest_pending_age, entry.next_due_at) == (
        {"pending": 4}, 2, NOW + 7,
    )  # fmt: skip
    (running,) = (await claim(store, limit=1)).jobs
    assert [job.id for job in await store.list_jobs(JobFilter(statuses=["running"]))] == [
        running.id
    ]
    entry = {entry.task: entry for entry in await store.counts()}["c"]
    assert (entry.counts, entry.oldest_pending_age, entry.next_due_at) == (
        {"pending": 3, "running": 1}, None, NOW + 7,
    )  # fmt: skip


async def test_the_dashboards_filters_key_page_time_and_payload_text(
    store: Store, clock: Clock
) -> None:
    texts = [{"to": "ada@example.com"}, {"to": "bob@example.com", "note": "café"}, [1, 2]]
    ids = []
    for index, payload in enumerate(texts):
        clock.now = NOW + index * 10
        (inserted,) = await store.insert(
            [new(key=f"k{index}", payload=msgspec.msgpack.encode(payload))]
        )
        ids.append(inserted.job_id)

    async def listed(**query: object) -> list[int]:
        return [job.id for job in await store.list_jobs(JobFilter(**query))]  # type: ignore[arg-type]

    assert await listed(key="k1") == [ids[1]]
    assert await listed(before=ids[2]) == [ids[1], ids[0]]
    assert await listed(before=ids[2], limit=1) == [ids[1]]
    assert await listed(since=NOW + 10) == [ids[2], ids[1]]
    assert await listed(until=NOW + 10) == [ids[0]]
    assert await listed(since=NOW + 5, until=NOW + 15) == [ids[1]]
    assert await listed(text="example.com") == [ids[1], ids[0]]
    assert await listed(text="café") == [ids[1]]  # UTF-8, as msgpack holds it
    assert await listed(text="ada@", key="k1") == []
    assert await listed(text="%") == []  # no pattern: the text as it is


async def test_a_time_window_filter_finds_its_edges_across_gaps_in_the_ids(
    store: Store, clock: Clock
) -> None:
    """since/until are looked up as an id range: at every edge, with ids pruned away, and
    with a job whose clock read went back (less than the slack) after a later id's."""
    created: dict[int, float] = {}
    for index in range(40):
        clock.now = NOW + index * 100 - (130 if index == 25 else 0)  # 30 s before the last
        (inserted,) = await store.insert([new()])
        created[inserted.job_id] = clock.now
    for job_id in list(created)[5:30:3]:  # gaps: cancelled, then pruned
        await store.cancel(job_id)
        del created[job_id]
    clock.now = NOW + 10_000
    assert await store.prune({"cancelled": 0}) == 9

    async def listed(**query: object) -> list[int]:
        jobs = await store.list_jobs(JobFilter(**{"limit": 100, **query}))  # type: ignore[arg-type]
        return [job.id for job in jobs]

    newest_first = sorted(created, reverse=True)
    for moment in (NOW - 1, *sorted(created.values()), NOW + 2400, NOW + 2450, NOW + 9_999):
        assert await listed(since=moment) == [i for i in newest_first if created[i] >= moment]
        assert await listed(until=moment) == [i for i in newest_first if created[i] < moment]
    window = [i for i in newest_first if NOW + 1000 <= created[i] < NOW + 3000]
    assert await listed(since=NOW + 1000, until=NOW + 3000) == window
    assert await listed(since=NOW + 1000, until=NOW + 3000, limit=2) == window[:2]


async def test_jobs_finished_in_each_span_of_the_last_hour(store: Store, clock: Clock) -> None:
    ids = [i.job_id for i in await store.insert([new(max_attempts=1) for _ in range(4)])]
    await claim(store)
    clock.now = NOW + 100
    await store.finish([succeeded(ids[0]), succeeded(ids[1])])
    await store.finish([Outcome(ids[2], 1, W1, "failed", error=ERROR)])
    clock.now = NOW + 1900
    await store.finish([succeeded(ids[3])])
    clock.now = NOW + 2000
    spans = await store.finished_recently(3600, 12)  # 5 minutes each
    assert len(spans) == 12 and sum(s for s, _ in spans) == 3 and sum(f for _, f in spans) == 1
    assert spans[5] == (2, 1)  # 1900 s ago: the sixth span (2100..1800 s ago)
    assert spans[11] == (1, 0)  # 100 s ago: the last
    clock.now = NOW + 4000  # the first three finished over an hour ago, the last 2100 s ago
    assert await store.finished_recently(3600, 12) == [(0, 0)] * 5 + [(1, 0)] + [(0, 0)] * 6


# -- schedules -----------------------------------------------------------------------------


def tick_jobs(*tasks: str) -> list[NewJob]:
    return [new(task, origin="schedule", key="@run", priority=-10) for task in tasks]


async def test_schedule_state_by_targeted_updates(store: Store) -> None:
    await store.add_schedules(["s1", "s2"], first_seen=NOW)
    await store.add_schedules(["s1", "s3"], first_seen=NOW + 50)  # s1 keeps what it had
    await store.cover_schedules(["s2"], until=NOW + 10)
    await store.cover_schedules(["s2"], until=NOW + 5)  # never moves back
    assert await store.set_paused("s3", True)
    assert not await store.set_paused("s3", True)  # already paused
    assert await store.set_paused("s3", False, covered_until=NOW + 70)
    states = {state.id: state for state in await store.schedule_states()}
    assert states["s1"] == ScheduleState("s1", covered_until=NOW)
    assert states["s2"] == ScheduleState("s2", covered_until=NOW + 10)
    assert states["s3"] == ScheduleState("s3", covered_until=NOW + 70)
    assert [s.id for s in await store.schedule_states(["s2", "nope"])] == ["s2"]


async def test_a_tick_fires_once(store: Store, clock: Clock) -> None:
    await store.add_schedules(["s"], first_seen=NOW)
    clock.now = NOW + 60.5
    first = await store.fire_tick("s", NOW + 60, tick_jobs("a", "b"), covered_until=NOW + 60.5)
    assert first.fired and [(job.task, job.joined) for job in first.jobs] == [
        ("a", False), ("b", False),
    ]  # fmt: skip
    again = await store.fire_tick("s", NOW + 60, tick_jobs("a", "b"))
    assert not again.fired and again.jobs == first.jobs  # whoever fired it
    assert len(await store.list_jobs(JobFilter())) == 2
    (state,) = await store.schedule_states(["s"])
    assert state == ScheduleState(
        "s", last_tick=NOW + 60, covered_until=NOW + 60.5, fired_at=NOW + 60.5,
        last_jobs=first.jobs,
    )  # fmt: skip


async def test_a_tick_joins_runs_in_progress_and_a_trigger_is_no_tick(
    store: Store, clock: Clock
) -> None:
    await store.add_schedules(["s"], first_seen=NOW)
    first = await store.fire_tick("s", NOW + 60, tick_jobs("a"))
    later = await store.fire_tick("s", NOW + 120, tick_jobs("a"))
    assert later.fired and later.jobs == [FiredJob("a", first.jobs[0].id, joined=True)]
    clock.now = NOW + 150
    triggered = await store.fire_tick("s", None, tick_jobs("a"))
    assert triggered.fired and triggered.jobs[0].joined
    (state,) = await store.schedule_states(["s"])
    assert (state.last_tick, state.coalesced, state.fired_at) == (NOW + 120, 2, NOW + 150)
    # An older tick fired late (a catch-up) leaves last_tick where it is.
    assert (await store.fire_tick("s", NOW + 30, tick_jobs("a"))).fired
    (state,) = await store.schedule_states(["s"])
    assert state.last_tick == NOW + 120


async def test_a_tick_fired_ahead_holds_its_jobs_and_a_recovery_puts_them_back(
    store: Store, clock: Clock
) -> None:
    await store.add_schedules(["s"], first_seen=NOW)
    clock.now = NOW + 59.9  # 0.1 s before the tick
    jobs = [msgspec.structs.replace(job, run_at=NOW + 60) for job in tick_jobs("a")]
    fired = await store.fire_tick("s", NOW + 60, jobs, covered_until=NOW + 60, hold=Hold(W1, LEASE))
    (held,) = fired.held
    assert (held.status, held.worker, held.attempts, held.started_at) == ("running", W1, 1, None)
    assert held.run_at == NOW + 60
    assert (await claim(store, worker=W2)).jobs == []  # held for W1
    # W1 goes away before the tick: the job is back as it was, due at the tick, and its
    # attempt is not counted (it never started).
    await store.leave(W1)
    clock.now = NOW + 61
    assert await store.recover(3) == []  # nothing was interrupted
    back = await store.get(held.id)
    assert back is not None
    assert (back.status, back.attempts, back.crashes, back.run_at) == ("pending", 0, 0, NOW + 60)
    (claimed,) = (await claim(store, worker=W2)).jobs
    assert claimed.id == held.id and claimed.attempts == 1
    assert not (await store.fire_tick("s", NOW + 60, jobs)).fired  # still fired once


async def test_a_held_tick_that_started_is_interrupted_as_any_job(
    store: Store, clock: Clock
) -> None:
    clock.now = NOW + 59.9
    jobs = [msgspec.structs.replace(job, run_at=NOW + 60) for job in tick_jobs("a")]
    (held,) = (await store.fire_tick("s", NOW + 60, jobs, hold=Hold(W1, LEASE))).held
    clock.now = NOW + 60.001
    await store.ticks_started([(held.id, held.epoch)])
    started = await store.get(held.id)
    assert started is not None and started.started_at == NOW + 60.001
    await store.leave(W1)
    (recovered,) = await store.recover(3)
    assert (recovered.id, recovered.crashes, recovered.status) == (held.id, 1, "pending")


async def test_pausing_a_schedule_cancels_its_ticks_fired_ahead(store: Store, clock: Clock) -> None:
    clock.now = NOW + 59.9
    jobs = [msgspec.structs.replace(job, run_at=NOW + 60) for job in tick_jobs("a", "b")]
    fired = await store.fire_tick("s", NOW + 60, jobs, hold=Hold(W1, LEASE))
    cancelled: list[int] = []
    store.events.on_cancel(cancelled.append)
    assert await store.set_paused("s", True)
    assert sorted(cancelled) == sorted(job.id for job in fired.jobs)
    for job in fired.jobs:
        got = await store.get(job.id)
        assert got is not None and got.status == "cancelled"


async def test_pruning_forgets_old_ticks(store: Store, clock: Clock) -> None:
    await store.fire_tick("s", NOW, tick_jobs("a"))
    clock.now = NOW + 100
    await store.prune({"succeeded": 200})
    assert not (await store.fire_tick("s", NOW, [])).fired
    await store.prune({"succeeded": 50})
    assert (await store.fire_tick("s", NOW, [])).fired


# -- notifications -------------------------------------------------------------------------


async def test_events_after_commit(store: Store) -> None:
    due: list[float] = []
    cancelled: list[int] = []
    store.events.on_due(due.append)
    store.events.on_cancel(cancelled.append)
    now, later = await store.insert([new(), new(delay=30)])
    assert due == [0]  # the earliest of the batch
    await store.insert([new(delay=30)])
    assert due == [0, 30]
    finished = store.events.watch(now.job_id)
    await claim(store)
    assert not finished.done()
    await store.finish([succeeded(now.job_id)])
    job = await asyncio.wait_for(finished, 1)
    assert job is not None and job.status == "succeeded"
    await store.cancel(later.job_id)
    assert cancelled == [later.job_id]


async def test_a_retry_outcome_says_when_the_job_is_due(store: Store) -> None:
    (inserted,) = await store.insert([new()])
    await claim(store)
    due: list[float] = []
    store.events.on_due(due.append)
    await store.finish([Outcome(inserted.job_id, 1, W1, "retry", error=ERROR, retry_in=7)])
    assert due == [7]


async def test_a_failed_attempt_wakes_the_jobs_waiters(store: Store, clock: Clock) -> None:
    # `taskctl run` follows the attempts: a retry, and an interrupted attempt, wake it;
    # a released attempt (the daemon stopping) does not.
    (inserted,) = await store.insert([new()])
    job_id = inserted.job_id
    await claim(store)
    waiter = store.events.watch(job_id)
    await store.finish([Outcome(job_id, 1, W1, "retry", error=ERROR, retry_in=7)])
    job = await asyncio.wait_for(waiter, 1)
    assert job is not None and job.status == "pending" and job.attempts == 1
    clock.now += 7
    await claim(store)
    waiter = store.events.watch(job_id)
    await store.finish([Outcome(job_id, 2, W1, "released")])
    assert not waiter.done()
    await claim(store)
    await store.register_node("w1", ttl=LEASE)  # a new start of W1's node: W1 is gone
    await store.recover(quarantine_after=5)
    job = await asyncio.wait_for(waiter, 1)
    assert job is not None and job.status == "pending"
    stored = await store.get(job_id)
    assert stored is not None
    # Each failed attempt's start and worker are kept, for its timeline (`taskctl why`).
    ended = [(error.kind, error.started_at, error.worker) for error in stored.errors]
    assert ended == [("error", NOW, W1), ("interrupted", NOW + 7, W1)]


async def test_a_resync_tells_waiters_to_read_again(store: Store) -> None:
    (inserted,) = await store.insert([new()])
    waiter = store.events.watch(inserted.job_id)
    resynced: list[bool] = []
    store.events.on_resync(lambda: resynced.append(True))
    store.events.resync()
    assert await asyncio.wait_for(waiter, 1) is None and resynced == [True]


async def test_others_are_told_of_a_write_whose_caller_gave_up(store: Store) -> None:
    # A caller that gives up right after an insert (a task cancelled while it waits) stops
    # waiting while the insert is in flight; the job is committed all the same, so the
    # executor must hear.
    due = asyncio.Event()
    store.events.on_due(lambda _: due.set())
    caller = asyncio.ensure_future(store.insert([new()]))
    await asyncio.sleep(0)  # the write is queued
    caller.cancel()
    await asyncio.wait_for(due.wait(), 5)
    (job,) = await store.list_jobs(JobFilter())
    # Likewise a cancel whose caller gave up still wakes the job's waiters.
    waiter = store.events.watch(job.id)
    canceller = asyncio.create_task(store.cancel(job.id))
    await asyncio.sleep(0)
    canceller.cancel()
    cancelled = await asyncio.wait_for(waiter, 5)
    assert cancelled is not None and cancelled.status == "cancelled"


async def test_insert_and_claim_in_one_transaction(store: Store, clock: Clock) -> None:
    worker = await store.register_node("n", 60)
    urgent = NewJob("t", b"\x80", "run", 1, priority=-10, key="@run")
    later = msgspec.structs.replace(urgent, key="later", delay=60.0)
    due: list[float] = []
    store.events.on_due(due.append)
    inserted, claimed = await store.insert_and_claim([urgent, later], ClaimRequest(worker, 4, 60))
    assert [job.id for job in claimed.jobs] == [inserted[0].job_id]  # the due one only
    assert due == [pytest.approx(60.0)]  # the job the claim took is no news to anyone
    (job,) = claimed.jobs
    assert job.status == "running" and job.worker == worker and job.started_at == job.created_at
    again, none = await store.insert_and_claim([urgent], ClaimRequest(worker, 4, 60))
    assert again[0].duplicate and again[0].job_id == job.id and none.jobs == []
    assert due == [pytest.approx(60.0)]
