"""The recorder of progress and log lines, over every store backend: what a task reports
is told at once, and written in few batches, whatever the number of calls."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import msgspec
import pytest

from taskd.activity import MAX_INBOX, MAX_LINE, ActivityRecorder
from taskd.models import LogLine, Progress
from taskd.news import DaemonNews
from taskd.store import ClaimRequest, NewJob, Store
from taskd.store.base import MAX_LOG_LINES


@pytest.fixture
def clock() -> Callable[[], float]:
    return time.time


async def running_job(store: Store) -> tuple[int, int]:
    worker = await store.register_node("n", 60.0)
    (inserted,) = await store.insert([NewJob("t", msgspec.msgpack.encode({}), "enqueue", 1)])
    (job,) = (await store.claim(ClaimRequest(worker, 1, 60.0))).jobs
    assert job.id == inserted.job_id
    return job.id, job.epoch


async def test_many_reports_are_told_at_once_and_written_in_few_batches(store: Store) -> None:
    job_id, epoch = await running_job(store)
    writes = 0
    record = store.record_activity

    async def counting(*args: object) -> None:
        nonlocal writes
        writes += 1
        await record(*args)  # type: ignore[arg-type]

    store.record_activity = counting  # type: ignore[method-assign]
    told: list[Progress] = []
    lines: list[LogLine] = []
    news = DaemonNews()
    news.on_progress(lambda _, progress: told.append(progress))
    news.on_log(lambda _, line: lines.append(line))
    recorder = ActivityRecorder(store, news)
    recorder.begin(job_id, epoch)
    for done in range(1, 1001):
        recorder.progress(job_id, done, 1000, "counting")
    recorder.log(job_id, "INFO", "x" * (MAX_LINE + 10))

    def from_a_thread() -> None:  # a plain `def` task reports from the thread pool
        recorder.log(job_id, "WARNING", "from a thread")

    thread = threading.Thread(target=from_a_thread)
    thread.start()
    thread.join()
    await asyncio.sleep(0)  # the thread's call is handed to the loop
    assert len(told) == 1000 and [line.level for line in lines] == ["INFO", "WARNING"]
    assert len(lines[0].message.encode()) == MAX_LINE and lines[0].message.endswith("x…")
    await recorder.end(job_id)
    assert writes <= 2  # perhaps one on the timer, and the last at the end
    job = await store.get(job_id)
    assert job is not None and job.progress is not None
    assert (job.progress.done, job.progress.total, job.progress.message) == (1000, 1000, "counting")
    logs = await store.job_logs(job_id)
    assert logs is not None and [line.seq for line in logs.lines] == [0, 1]
    recorder.progress(job_id, 5, 5, "after its end")  # ignored: the attempt is over
    await recorder.close()
    job = await store.get(job_id)
    assert job is not None and job.progress is not None and job.progress.done == 1000


async def test_a_thread_reporting_in_a_tight_loop_costs_the_loop_little(store: Store) -> None:
    job_id, epoch = await running_job(store)
    told: list[Progress] = []
    news = DaemonNews()
    news.on_progress(lambda _, progress: told.append(progress))
    recorder = ActivityRecorder(store, news)
    recorder.begin(job_id, epoch)

    def busy() -> None:
        for done in range(1, 100_001):
            recorder.progress(job_id, done, 100_000, None)
        for number in range(MAX_INBOX + 500):
            recorder.log(job_id, "INFO", f"line {number}")

    thread = threading.Thread(target=busy)
    thread.start()
    thread.join()
    await asyncio.sleep(0)  # the one callback the thread scheduled runs
    assert len(told) == 1 and told[0].done == 100_000  # the latest only
    await recorder.end(job_id)
    logs = await store.job_logs(job_id)
    assert logs is not None and len(logs.lines) == MAX_LOG_LINES
    assert logs.dropped == MAX_INBOX + 500 - MAX_LOG_LINES
