"""The threads of plain-function tasks: stuck ones are counted, replaced up to a cap, and
past it calls are refused at once instead of queueing forever."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from taskd.threads import NoThreadLeft, TaskThreads
from tests.support import wait_until


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Set at the end of each test, so that no thread outlives it."""
    event = threading.Event()
    yield event
    event.set()


async def stuck_call(threads: TaskThreads, release: threading.Event) -> None:
    """A call whose function blocks until `release`, given up on once it runs."""
    started = threading.Event()

    def block() -> None:
        started.set()
        release.wait()

    call = asyncio.create_task(threads.run(block, "job 1 hang"))
    await asyncio.to_thread(started.wait)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call


async def test_results_and_exceptions_come_back() -> None:
    threads = TaskThreads(workers=2, max_stuck=1)
    assert await threads.run(lambda: 41 + 1, "job 1 add") == 42
    with pytest.raises(ZeroDivisionError):
        await threads.run(lambda: 1 // 0, "job 2 divide")
    assert threads.stats().running == 0 and threads.busy == 0
    threads.close()


async def test_a_stuck_thread_is_counted_and_replaced(release: threading.Event) -> None:
    threads = TaskThreads(workers=1, max_stuck=1)
    await stuck_call(threads, release)
    assert threads.stats().stuck == 1 and threads.busy == 1
    # The only worker slot is stuck, yet new work runs in a thread that takes its place.
    name = await asyncio.wait_for(threads.run(lambda: threading.current_thread().name, "j"), 10)
    assert name == "taskd-task-2"
    release.set()  # the stuck function returns at last
    await asyncio.to_thread(wait_until, lambda: threads.busy == 0, what="the thread to return")
    assert threads.stats().stuck == 0
    threads.close()


async def test_past_the_cap_calls_are_refused_at_once(release: threading.Event) -> None:
    threads = TaskThreads(workers=1, max_stuck=1)
    await stuck_call(threads, release)
    await stuck_call(threads, release)  # the replacement gets stuck too: no more threads
    stats = threads.stats()
    assert (stats.stuck, stats.max_stuck, stats.refused) == (2, 1, 0)
    with pytest.raises(NoThreadLeft, match=r"2 threads are stuck .*\(max_stuck_threads\)"):
        await threads.run(lambda: None, "job 3 quick")
    assert threads.stats().refused == 1
    release.set()
    await asyncio.to_thread(wait_until, lambda: threads.busy == 0, what="the threads to return")
    assert await threads.run(lambda: "again", "job 4") == "again"
    threads.close()


async def test_a_thread_that_finished_is_reused_not_doubled() -> None:
    threads = TaskThreads(workers=1, max_stuck=0)
    names = {await threads.run(lambda: threading.current_thread().name, "j") for _ in range(50)}
    assert names == {"taskd-task-1"}  # never refused, never a second thread
    threads.close()


def test_a_reply_that_finds_the_event_loop_closed_is_no_traceback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A database call of a stopped start-up that ends after taskd's loop closed: its thread
    cannot hand the reply back, and says so at debug level only; other errors still show."""
    from taskd.cli import _quiet_replies_after_the_loop

    shown: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: shown.append(args.exc_value))
    _quiet_replies_after_the_loop()
    loop = asyncio.new_event_loop()
    loop.close()

    def late_reply() -> None:
        loop.call_soon_threadsafe(print)  # as aiosqlite's thread does

    def bug() -> None:
        raise ValueError("a real error")

    caplog.set_level("DEBUG", logger="taskd")
    for target in (late_reply, bug):
        thread = threading.Thread(target=target, name=target.__name__)
        thread.start()
        thread.join()
    assert [type(error) for error in shown] == [ValueError]
    assert "late_reply ended after the event loop closed" in caplog.text
