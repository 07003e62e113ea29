"""Workflows in the store, on each backend: children counted down by their parents' ends in
the same transaction, the cancellation of a failed parent's tree, batch counters."""

from __future__ import annotations

import msgspec

from taskd.models import Hook
from taskd.store import JobFilter, JobNotFound, Outcome, Store
from tests.conftest import NOW
from tests.store.counting import counters_match_the_jobs  # noqa: F401
from tests.store.test_store import ERROR, W1, claim, new, succeeded, workers  # noqa: F401


async def test_a_child_is_due_in_the_transaction_of_its_last_parents_success(
    store: Store,
) -> None:
    first, second = await store.insert([new(), new()])
    (child,) = await store.insert([new("c", after=(first.job_id, second.job_id), delay=5)])
    held = await store.get(child.job_id)
    assert held is not None and held.blocked == 2 and held.run_at == NOW + 5
    assert held.parents == [first.job_id, second.job_id]
    claimed = await claim(store)
    assert sorted(job.id for job in claimed.jobs) == [first.job_id, second.job_id]
    assert claimed.next_due_in is None  # the waiting child is due at no time yet
    # Both parents end in one transaction: the child is counted down by two.
    await store.finish([succeeded(first.job_id), succeeded(second.job_id)])
    released = await store.get(child.job_id)
    assert released is not None and released.blocked == 0 and released.run_at == NOW + 5
    assert (await claim(store)).next_due_in == 5  # due at its own delay, not before


async def test_a_failed_parent_cancels_its_tree_but_not_what_runs_anyway(store: Store) -> None:
    (parent,) = await store.insert([new(max_attempts=1)])
    (child,) = await store.insert([new(after=(parent.job_id,))])
    grandchild, rescued = await store.insert(
        [new(after=(child.job_id,)), new(after=(child.job_id,), after_failure="run")]
    )
    await claim(store)
    failed = Outcome(parent.job_id, 1, W1, "failed", error=ERROR)
    await store.finish([failed])
    jobs = {job.id: job for job in [await store.get(j.job_id) for j in (child, grandchild, rescued)]
            if job is not None}  # fmt: skip
    assert jobs[child.job_id].error == f"parent {parent.job_id} failed"
    assert jobs[grandchild.job_id].error == f"parent {child.job_id} was cancelled"
    assert jobs[rescued.job_id].status == "pending" and jobs[rescued.job_id].blocked == 0
    try:
        await store.insert([new(after=(424242,))])
    except JobNotFound as exc:
        assert "424242" in str(exc)
    else:
        raise AssertionError("an unknown parent was accepted")


async def test_a_batch_counts_its_jobs_and_enqueues_its_callback_once(store: Store) -> None:
    batch, _ = await store.insert_batch([new(), new(), new()], Hook("done", 2))
    jobs = (await claim(store)).jobs
    assert len(jobs) == 3
    outcomes = [succeeded(jobs[0].id), Outcome(jobs[1].id, 1, W1, "failed", error=ERROR)]
    await store.finish(outcomes)
    info = await store.batch(batch)
    assert info is not None and (info.total, info.ended, info.callback_id) == (3, 2, None)
    await store.cancel(jobs[2].id)
    info = await store.batch(batch)
    assert info is not None and info.ended == 3 and info.callback_id is not None
    callback = await store.get(info.callback_id)
    assert callback is not None and (callback.task, callback.origin, callback.max_attempts) == (
        "done", "batch", 2,
    )  # fmt: skip
    assert msgspec.msgpack.decode(callback.payload) == {
        "batch": batch, "succeeded": [jobs[0].id], "failed": [jobs[1].id],
        "cancelled": [jobs[2].id],
    }  # fmt: skip
    await store.retry(jobs[1].id)  # a finished batch stays finished: no second callback
    await claim(store)
    await store.finish([succeeded(jobs[1].id, epoch=2)])
    assert [j.task for j in await store.list_jobs(JobFilter(task="done"))] == ["done"]
