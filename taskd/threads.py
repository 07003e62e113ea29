"""The threads that run plain-function tasks, and the count of those that never come back.

A plain function cannot be interrupted. When its job ends without it (a timeout, a cancel)
its thread runs on, *stuck*, and no longer serves a worker slot: another thread takes its
place, so that new work still runs, until `max_stuck` threads are stuck. Past that, a call
is refused at once (the attempt fails, saying why) rather than queued behind threads that
may never return, so nothing waits forever and coroutine tasks keep running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from taskd.models import ThreadStats, counted

logger = logging.getLogger(__name__)

T = TypeVar("T")


class NoThreadLeft(Exception):
    """Every thread taskd may start is busy or stuck."""


class _Call:
    __slots__ = ("abandoned", "finished", "function", "future", "label")

    def __init__(self, function: Callable[[], Any], label: str) -> None:
        self.function = function
        self.label = label
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.abandoned = False  # its caller stopped waiting while it ran
        self.finished = False


class TaskThreads:
    """Runs functions in threads: at most `workers` at work, plus up to `max_stuck` stuck."""

    def __init__(self, workers: int, max_stuck: int) -> None:
        self._workers = workers
        self._max_stuck = max_stuck
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._alive = 0
        self._idle = 0
        self._busy = 0  # calls running, stuck ones included
        self._stuck = 0
        self._refused = 0
        self._started = 0
        self._closed = False

    async def run(self, function: Callable[[], T], label: str) -> T:
        """`function()` in a thread; if the caller stops waiting while it runs, its thread is
        counted as stuck until it returns. Raises NoThreadLeft if no thread may start."""
        call = _Call(function, label)
        self._submit(call)
        try:
            result: T = await asyncio.wrap_future(call.future)
        except asyncio.CancelledError:
            self._abandon(call)
            raise
        return result

    def _submit(self, call: _Call) -> None:
        with self._lock:
            if self._closed:
                raise NoThreadLeft("taskd is stopping; plain-function tasks are not started")
            if self._idle:
                self._idle -= 1
                self._queue.put(call)
                return
            if self._alive >= self._workers + self._max_stuck:
                self._refused += 1
                raise NoThreadLeft(self._refusal())
            self._alive += 1
            self._started += 1
            name = f"taskd-task-{self._started}"
        threading.Thread(target=self._work, args=(call,), name=name, daemon=True).start()

    def _refusal(self) -> str:
        return (
            f"no thread left for plain-function tasks: {counted(self._stuck, 'thread')} "
            f"{'is' if self._stuck == 1 else 'are'} stuck in "
            f"functions that did not return when their job ended, and taskd replaces at most "
            f"{self._max_stuck} (max_stuck_threads); make the task return (check a deadline, "
            "use timeouts on its I/O) or make it async, then restart taskd"
        )

    def _abandon(self, call: _Call) -> None:
        with self._lock:
            if call.finished or call.future.cancel():
                return  # it has just returned, or it never started (now it never will)
            call.abandoned = True
            self._stuck += 1
            stuck = self._stuck
        replaced = (
            "another thread takes its place"
            if stuck <= self._max_stuck
            else "it is not replaced: fewer plain functions can run at once until one returns"
        )
        logger.warning(
            "%s ended, but its function is still running in its thread, which cannot be "
            "interrupted; %s stuck (max_stuck_threads = %d), %s",
            call.label,
            counted(stuck, "thread"),
            self._max_stuck,
            replaced,
        )

    def _work(self, call: _Call | None) -> None:
        while call is not None:
            if call.future.set_running_or_notify_cancel():
                keep = self._execute(call)
            else:
                keep = self._park()  # given up on before it started
            if not keep:
                return
            call = self._queue.get()
        with self._lock:
            self._alive -= 1

    def _execute(self, call: _Call) -> bool:
        """Run the call; whether this thread stays for more work."""
        with self._lock:
            self._busy += 1
        try:
            result, error = call.function(), None
        except BaseException as exc:
            result, error = None, exc
        with self._lock:
            call.finished = True
            self._busy -= 1
            if call.abandoned:
                self._stuck -= 1
            keep = self._park_locked()
        # Parked before the caller learns the result, so that its next call finds this
        # thread idle rather than starting another.
        if error is not None:
            call.future.set_exception(error)
        else:
            call.future.set_result(result)
        if call.abandoned:
            logger.info("%s: its stuck thread has returned; its result is ignored", call.label)
        return keep

    def _park(self) -> bool:
        with self._lock:
            return self._park_locked()

    def _park_locked(self) -> bool:
        """Wait for more work, or end this thread if enough others are left."""
        if self._closed or self._alive - self._stuck > self._workers:
            self._alive -= 1
            return False
        self._idle += 1
        return True

    def close(self) -> None:
        """Start nothing more; idle threads end, busy ones when their function returns."""
        with self._lock:
            self._closed = True
            for _ in range(self._idle):
                self._queue.put(None)
            self._idle = 0

    @property
    def busy(self) -> int:
        """Threads running a function, stuck ones included."""
        return self._busy

    def stats(self) -> ThreadStats:
        with self._lock:
            return ThreadStats(
                running=self._busy - self._stuck,
                stuck=self._stuck,
                max_stuck=self._max_stuck,
                refused=self._refused,
            )
