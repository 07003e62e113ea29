"""Progress and log lines of jobs, on every backend: fenced by epoch, bounded, pruned."""

from __future__ import annotations

import msgspec
import pytest

from taskd.store import ClaimRequest, JobFilter, LogNote, NewJob, Outcome, ProgressNote, Store
from taskd.store.base import MAX_LOG_BYTES, MAX_LOG_LINES
from tests.conftest import NOW
from tests.store.counting import counters_match_the_jobs  # noqa: F401

W1 = "w1/1"


@pytest.fixture
async def running(store: Store) -> int:
    """A job claimed by W1 (epoch 1)."""
    assert await store.register_node("w1", 60.0) == W1
    payload = msgspec.msgpack.encode({})
    (inserted,) = await store.insert([NewJob("t", payload, "enqueue", 3)])
    claimed = await store.claim(ClaimRequest(W1, 1, 60.0))
    assert [job.id for job in claimed.jobs] == [inserted.job_id]
    return inserted.job_id


async def test_progress_is_kept_with_the_job_and_fenced_by_epoch(
    store: Store, running: int
) -> None:
    job = await store.get(running)
    assert job is not None and job.progress is None
    await store.record_activity([ProgressNote(running, 1, 40, 100, "resizing", ago=2.0)], [])
    await store.record_activity([ProgressNote(running, 0, 99, 100, "an older claim")], [])
    job = await store.get(running)
    assert job is not None and job.progress is not None
    assert (job.progress.done, job.progress.total, job.progress.message) == (40, 100, "resizing")
    assert job.progress.at == pytest.approx(NOW - 2.0)
    (listed,) = await store.list_jobs(JobFilter())
    assert listed.progress == job.progress


async def test_log_lines_come_back_in_order_with_time_and_level(store: Store, running: int) -> None:
    lines = [LogNote(running, 1, n, "INFO", f"line {n}", ago=1.0) for n in range(3)]
    await store.record_activity([], lines[:2])
    await store.record_activity([], [*lines[2:], LogNote(running, 1, 3, "ERROR", "bad")])
    logs = await store.job_logs(running)
    assert logs is not None and logs.dropped == 0
    assert [(line.seq, line.level, line.message) for line in logs.lines] == [
        (0, "INFO", "line 0"), (1, "INFO", "line 1"), (2, "INFO", "line 2"), (3, "ERROR", "bad"),
    ]  # fmt: skip
    assert logs.lines[0].at == pytest.approx(NOW - 1.0)
    assert await store.job_logs(running + 1000) is None


async def test_a_job_keeps_its_last_lines_and_counts_those_let_go(
    store: Store, running: int
) -> None:
    lines = [LogNote(running, 1, n, "INFO", f"{n:05}") for n in range(MAX_LOG_LINES + 20)]
    await store.record_activity([], lines, {running: 5})
    logs = await store.job_logs(running)
    assert logs is not None
    assert len(logs.lines) == MAX_LOG_LINES
    assert logs.lines[0].message == "00020" and logs.lines[-1].message == f"{MAX_LOG_LINES + 19:05}"
    assert logs.dropped == 25
    big = "x" * 1000
    await store.record_activity([], [LogNote(running, 1, 5000 + n, "INFO", big) for n in range(80)])
    logs = await store.job_logs(running)
    assert logs is not None
    assert sum(len(line.message) for line in logs.lines) <= MAX_LOG_BYTES
    assert [line.message for line in logs.lines] == [big] * (MAX_LOG_BYTES // 1000)
    assert logs.dropped == 25 + MAX_LOG_LINES + 80 - MAX_LOG_BYTES // 1000


async def test_lines_of_a_job_that_is_gone_are_not_kept(store: Store) -> None:
    await store.record_activity([ProgressNote(77, 1, 1)], [LogNote(77, 1, 0, "INFO", "x")])
    assert await store.job_logs(77) is None


async def test_a_new_attempt_starts_without_the_progress_of_the_last(
    store: Store, running: int
) -> None:
    await store.record_activity([ProgressNote(running, 1, 2, 3, "half")], [])
    finished = await store.finish([Outcome(running, 1, W1, "retry")])
    assert finished.jobs[0] is not None and finished.jobs[0].progress is not None
    (again,) = (await store.claim(ClaimRequest(W1, 1, 60.0))).jobs
    assert again.id == running and again.epoch == 2 and again.progress is None
