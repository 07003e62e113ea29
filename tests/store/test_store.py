"""The job store's rules: uniqueness, claim order, fencing, recovery, transitions."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import msgspec
import pytest

from taskd.models import AttemptError, FiredJob
from taskd.store import (
    InvalidTransition,
    JobFilter,
    JobNotFound,
    NewJob,
    Outcome,
    ScheduleState,
    Store,
    StoreError,
)
from taskd.store.sqlite import MIGRATIONS, SqliteStore

NOW = 1_000_000.0
PAYLOAD = msgspec.msgpack.encode({"x": 1})


def new(task: str = "t", **fields: object) -> NewJob:
    values: dict[str, object] = {
        "task": task, "payload": PAYLOAD, "origin": "enqueue", "run_at": NOW, "max_attempts": 3,
    }  # fmt: skip
    values.update(fields)
    return NewJob(**values)  # type: ignore[arg-type]


async def claim(store: Store, limit: int = 10, now: float = NOW, owner: str = "w1", **slots: int):  # type: ignore[no-untyped-def]
    return await store.claim(owner, limit, slots, now + 60, now)


def succeeded(job_id: int, epoch: int = 1, owner: str = "w1", result: object = "ok") -> Outcome:
    return Outcome(
        job_id, epoch, owner, "succeeded", NOW + 1, result=msgspec.msgpack.encode(result)
    )


def error(attempt: int = 1) -> AttemptError:
    return AttemptError(attempt, "error", "ValueError: boom", NOW + 1, "Traceback ...")


async def test_insert_and_get_round_trip(store: Store) -> None:
    (inserted,) = await store.insert([new(priority=5, key="k", parent_id=None)], NOW)
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


async def test_unique_key_returns_the_active_job(store: Store) -> None:
    first, same, other_task, other_key, unkeyed = await store.insert(
        [new(key="k"), new(key="k"), new("u", key="k"), new(key="k2"), new()], NOW
    )
    assert same.job_id == first.job_id and same.duplicate
    assert not other_task.duplicate and not other_key.duplicate and not unkeyed.duplicate
    assert len({first.job_id, other_task.job_id, other_key.job_id, unkeyed.job_id}) == 4
    (again,) = await store.insert([new(key="k")], NOW)
    assert again == same
    # Once the keyed job has finished, the key is free again.
    claimed = await claim(store, limit=10)
    job_ids = {job.id for job in claimed.jobs}
    assert first.job_id in job_ids
    await store.finish([succeeded(first.job_id)])
    (fresh,) = await store.insert([new(key="k")], NOW)
    assert not fresh.duplicate and fresh.job_id != first.job_id


async def test_concurrent_inserts_in_one_tick_share_one_job(store: Store) -> None:
    results = await asyncio.gather(*(store.insert([new(key="@run")], NOW) for _ in range(100)))
    ids = {inserted.job_id for (inserted,) in results}
    assert len(ids) == 1
    assert sum(not inserted.duplicate for (inserted,) in results) == 1
    assert len(await store.list_jobs(JobFilter())) == 1


async def test_concurrent_unkeyed_inserts_all_land(store: Store) -> None:
    results = await asyncio.gather(*(store.insert([new(), new()], NOW) for _ in range(200)))
    ids = [inserted.job_id for pair in results for inserted in pair]
    assert len(set(ids)) == 400
    assert len(await store.list_jobs(JobFilter(limit=1000))) == 400


async def test_claim_order_priority_then_due_time_then_fifo(store: Store) -> None:
    inserted = await store.insert(
        [
            new(priority=0, run_at=NOW - 5),  # 0
            new(priority=-1, run_at=NOW),  # 1: lowest priority number first
            new(priority=0, run_at=NOW - 10),  # 2: earlier due among equal priority
            new(priority=0, run_at=NOW - 5),  # 3: FIFO after 0
            new(priority=-5, run_at=NOW + 30),  # 4: not due yet
        ],
        NOW,
    )
    ids = [i.job_id for i in inserted]
    claimed = await claim(store, limit=10)
    assert [job.id for job in claimed.jobs] == [ids[1], ids[2], ids[0], ids[3]]
    assert claimed.next_due == NOW + 30
    assert all(job.status == "running" and job.attempts == 1 for job in claimed.jobs)
    assert all(job.worker == "w1" for job in claimed.jobs)
    later = await claim(store, now=NOW + 31)
    assert [job.id for job in later.jobs] == [ids[4]]


async def test_claim_respects_limit_and_task_slots(store: Store) -> None:
    await store.insert([new("a") for _ in range(5)] + [new("b") for _ in range(5)], NOW)
    first = await claim(store, limit=4, a=1)
    tasks = [job.task for job in first.jobs]
    assert tasks.count("a") == 1 and len(tasks) == 4
    second = await claim(store, limit=10, a=0, b=0)
    assert second.jobs == [] and second.next_due is None  # only capped tasks remain
    third = await claim(store, limit=10, a=2)
    assert [job.task for job in third.jobs].count("a") == 2


async def test_finish_success_retry_and_failure(store: Store) -> None:
    a, b, c = (i.job_id for i in await store.insert([new(), new(), new(max_attempts=1)], NOW))
    await claim(store)
    done, retried, failed = await store.finish(
        [
            succeeded(a, result={"answer": 42}),
            Outcome(b, 1, "w1", "pending", NOW + 1, error=error(), run_at=NOW + 60),
            Outcome(c, 1, "w1", "failed", NOW + 1, error=error()),
        ]
    )
    assert done is not None and done.status == "succeeded" and done.finished_at == NOW + 1
    assert msgspec.msgpack.decode(done.result) == {"answer": 42}
    assert retried is not None and retried.status == "pending" and retried.run_at == NOW + 60
    assert retried.finished_at is None and retried.error == "ValueError: boom"
    assert failed is not None and failed.status == "failed"
    job = await store.get(c)
    assert job is not None and [e.message for e in job.errors] == ["ValueError: boom"]
    assert job.errors[0].traceback == "Traceback ..."


async def test_fencing_refuses_stale_and_foreign_outcomes(store: Store) -> None:
    (inserted,) = await store.insert([new()], NOW)
    job_id = inserted.job_id
    await claim(store, owner="w1")
    # The worker vanishes; its lease expires and the job is claimed again (attempt 2).
    recovered = await store.recover(NOW + 120, 3, everything=False)
    assert [job.id for job in recovered] == [job_id]
    await claim(store, owner="w2", now=NOW + 121)
    stale, foreign = await store.finish(
        [succeeded(job_id, epoch=1, owner="w1"), succeeded(job_id, epoch=2, owner="w1")]
    )
    assert stale is None and foreign is None
    job = await store.get(job_id)
    assert job is not None and job.status == "running" and (job.attempts, job.epoch) == (2, 2)
    (current,) = await store.finish([succeeded(job_id, epoch=2, owner="w2")])
    assert current is not None and current.status == "succeeded"
    (late,) = await store.finish([succeeded(job_id, epoch=2, owner="w2")])
    assert late is None  # an outcome is recorded once


async def test_fencing_survives_a_retry_that_resets_attempts(store: Store) -> None:
    (inserted,) = await store.insert([new()], NOW)
    job_id = inserted.job_id
    await claim(store)
    await store.cancel(job_id, NOW)  # the worker's thread may still be running attempt 1
    await store.retry(job_id, NOW)
    (again,) = (await claim(store)).jobs  # attempt 1 again, by the same worker
    assert (again.attempts, again.epoch) == (1, 2)
    (late,) = await store.finish([succeeded(job_id, epoch=1)])
    assert late is None  # the old thread's late result must not land on the new attempt
    (current,) = await store.finish([succeeded(job_id, epoch=2)])
    assert current is not None and current.status == "succeeded"


async def test_release_gives_the_attempt_back(store: Store) -> None:
    (inserted,) = await store.insert([new()], NOW)
    await claim(store)
    (job,) = await store.finish(
        [Outcome(inserted.job_id, 1, "w1", "pending", NOW + 1, run_at=NOW + 1, release=True)]
    )
    assert job is not None and job.status == "pending" and job.attempts == 0


async def test_recover_counts_crashes_and_quarantines(store: Store) -> None:
    crashy, last_try = (
        i.job_id for i in await store.insert([new(max_attempts=10), new(max_attempts=1)], NOW)
    )
    for crash in range(1, 4):
        await claim(store, now=NOW + crash)
        recovered = {job.id: job for job in await store.recover(NOW + crash, 3, everything=True)}
        if crash == 1:
            assert recovered[last_try].status == "failed"
            assert "last attempt" in (recovered[last_try].error or "")
        job = recovered[crashy]
        assert job.crashes == crash
        assert job.status == ("failed" if crash == 3 else "pending")
    job = await store.get(crashy)
    assert job is not None and job.error == "quarantined after 3 crashes"
    assert [e.kind for e in job.errors] == ["interrupted"] * 3


async def test_recover_expired_leaves_live_leases_alone(store: Store) -> None:
    await store.insert([new(), new()], NOW)
    live, expiring = (await claim(store, limit=2)).jobs
    await store.renew("w1", [live.id], NOW + 600)
    recovered = await store.recover(NOW + 100, 3, everything=False)
    assert [job.id for job in recovered] == [expiring.id]


async def test_cancel_and_retry_transitions(store: Store) -> None:
    pending, running = (i.job_id for i in await store.insert([new(run_at=NOW + 99), new()], NOW))
    await claim(store)
    assert (await store.cancel(pending, NOW)).status == "cancelled"
    assert (await store.cancel(running, NOW)).status == "cancelled"
    with pytest.raises(InvalidTransition, match="is cancelled"):
        await store.cancel(running, NOW)
    with pytest.raises(JobNotFound):
        await store.cancel(999_999, NOW)
    retried = await store.retry(running, NOW + 5)
    assert (retried.status, retried.attempts, retried.run_at) == ("pending", 0, NOW + 5)
    with pytest.raises(InvalidTransition, match="is pending"):
        await store.retry(running, NOW)


async def test_retry_refused_while_the_key_is_taken(store: Store) -> None:
    (first,) = await store.insert([new(key="k")], NOW)
    await store.cancel(first.job_id, NOW)
    (second,) = await store.insert([new(key="k")], NOW)
    assert not second.duplicate
    with pytest.raises(InvalidTransition, match="same key"):
        await store.retry(first.job_id, NOW)


async def test_a_bad_write_does_not_spoil_the_batch(store: Store) -> None:
    (keyed,) = await store.insert([new(key="k")], NOW)
    await store.cancel(keyed.job_id, NOW)
    await store.insert([new(key="k")], NOW)
    results = await asyncio.gather(
        store.insert([new()], NOW),
        store.retry(keyed.job_id, NOW),
        store.insert([new()], NOW),
        return_exceptions=True,
    )
    assert isinstance(results[1], InvalidTransition)
    assert len(await store.list_jobs(JobFilter())) == 4


async def test_list_counts_prune(store: Store) -> None:
    ids = [
        i.job_id for i in await store.insert([new("a"), new("a"), new("b", run_at=NOW + 9)], NOW)
    ]
    await claim(store, limit=1)
    await store.finish([succeeded(ids[0])])
    newest_first = await store.list_jobs(JobFilter())
    assert [job.id for job in newest_first] == sorted(ids, reverse=True)
    assert [job.id for job in await store.list_jobs(JobFilter(statuses=["succeeded"]))] == [ids[0]]
    assert [job.id for job in await store.list_jobs(JobFilter(task="b"))] == [ids[2]]
    counts = {entry.task: entry for entry in await store.counts(NOW + 4)}
    assert counts["a"].counts == {"pending": 1, "succeeded": 1}
    assert counts["a"].oldest_pending_age == 4
    assert counts["b"].next_due_at == NOW + 9
    assert await store.next_due() == NOW
    assert await store.queue_depth() == 2
    assert await store.prune({"succeeded": NOW}) == 0
    assert await store.prune({"succeeded": NOW + 2}) == 1
    assert await store.get(ids[0]) is None


async def test_events_wake_waiters_after_commit(store: Store) -> None:
    (inserted,) = await store.insert([new()], NOW)
    finished = store.events.watch(inserted.job_id)
    await claim(store)
    assert not finished.done()
    await store.finish([succeeded(inserted.job_id)])
    job = await asyncio.wait_for(finished, 1)
    assert job.status == "succeeded"


async def test_schedule_state_persists(store: Store) -> None:
    await store.save_schedule_states([ScheduleState("s1", last_tick=NOW, paused=True, coalesced=2)])
    jobs = [FiredJob("a", 7), FiredJob("b", 8, joined=True)]
    updated = ScheduleState(
        "s1", last_tick=NOW + 60, coalesced=3, covered_until=NOW + 61, fired_at=NOW + 60.5,
        last_jobs=jobs,
    )  # fmt: skip
    await store.save_schedule_states([updated, ScheduleState("s2")])
    states = {state.id: state for state in await store.schedule_states()}
    assert states["s1"] == updated
    assert states["s2"] == ScheduleState("s2")


# -- SQLite-specific: the file and its lock ------------------------------------------------


async def test_second_store_on_the_same_file_is_refused(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path / "jobs.db")
    await first.open()
    try:
        with pytest.raises(StoreError, match="in use by another taskd"):
            await SqliteStore(tmp_path / "jobs.db").open()
    finally:
        await first.close()


async def test_corrupt_or_newer_database_is_refused_clearly(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=r"cannot open job store .*garbage\.db"):
        await SqliteStore(garbage).open()
    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as connection:
        connection.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="newer than this taskd"):
        await SqliteStore(newer).open()


async def test_a_version_1_database_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as connection:
        connection.executescript(MIGRATIONS[0] + "; PRAGMA user_version = 1;")
        connection.execute(
            "INSERT INTO jobs (task, status, origin, payload, max_attempts, run_at, created_at)"
            " VALUES ('t', 'pending', 'enqueue', x'c0', 3, ?, ?)",
            (NOW, NOW),
        )
        connection.execute("INSERT INTO schedules (id, last_tick, paused) VALUES ('x', 5.0, 1)")
    store = SqliteStore(path)
    await store.open()
    try:
        (job,) = (await claim(store)).jobs
        assert (job.task, job.epoch) == ("t", 1)
        (state,) = await store.schedule_states()
        assert state == ScheduleState("x", last_tick=5.0, paused=True, covered_until=5.0)
    finally:
        await store.close()
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


async def test_data_survives_reopen(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "jobs.db")
    await store.open()
    (first,) = await store.insert([new()], NOW)
    await store.close()
    store = SqliteStore(tmp_path / "jobs.db")
    await store.open()
    (second,) = await store.insert([new()], NOW)
    assert second.job_id == first.job_id + 1
    assert await store.get(first.job_id) is not None
    await store.close()


async def test_others_are_told_of_a_write_whose_caller_gave_up(store: Store) -> None:
    # A client that hangs up right after `enqueue` cancels the request's task while the
    # insert is in flight; the job is committed all the same, so the executor must hear.
    store.events.nudge()
    await store.events.wait_for_nudge(0)  # start from a cleared nudge
    caller = asyncio.create_task(store.insert([new()], NOW))
    await asyncio.sleep(0)  # the write is queued
    caller.cancel()
    await asyncio.wait_for(store.events.wait_for_nudge(None), 5)
    (job,) = await store.list_jobs(JobFilter())
    # Likewise a cancel whose caller gave up still wakes the job's waiters.
    waiter = store.events.watch(job.id)
    canceller = asyncio.create_task(store.cancel(job.id, NOW))
    await asyncio.sleep(0)
    canceller.cancel()
    assert (await asyncio.wait_for(waiter, 5)).status == "cancelled"
