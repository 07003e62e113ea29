"""Progress and log lines of the jobs running here: told to live views at once (the daemon's
news), written to the store in batches, at most one write every THROTTLE seconds and one
more at the end of each attempt, so that a task may report as often as it likes."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from taskd.models import LogLine, Progress, counted, cut_utf8
from taskd.news import DaemonNews
from taskd.store import LogNote, ProgressNote, Store, StoreError
from taskd.store.base import MAX_LOG_LINES

logger = logging.getLogger(__name__)

THROTTLE = 0.5  # seconds between writes
MAX_LINE = 4096  # bytes (UTF-8) of one log line; the rest is cut
MAX_MESSAGE = 200  # characters of a progress message
MAX_INBOX = 10_000  # reports from threads waiting for the event loop; more are let go


class _Attempt:
    __slots__ = ("dropped", "epoch", "lines", "progress", "seq", "writing")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.seq = 0  # lines written so far
        self.progress: tuple[Progress, float] | None = None  # unwritten, with its monotonic time
        self.lines: list[tuple[LogLine, float]] = []  # unwritten
        # Being written now (not yet readable from the store): still shown by `logs`.
        self.writing: list[LogLine] = []
        self.dropped = 0  # lines let go before they were written


class ActivityRecorder:
    """Runs on the event loop; `progress` and `log` may be called from any thread."""

    def __init__(self, store: Store, news: DaemonNews) -> None:
        self._store = store
        self._news = news
        self._attempts: dict[int, _Attempt] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._writing = asyncio.Lock()
        self._writes: set[asyncio.Task[None]] = set()
        self._last_write = 0.0
        self._inbox: list[tuple[Callable[..., None], float, tuple[object, ...]]] = []
        self._inbox_lock = threading.Lock()
        self._inbox_dropped: dict[object, int] = {}  # lines let go, by job
        self._inbox_progress: dict[object, tuple[float, tuple[object, ...]]] = {}

    def begin(self, job_id: int, epoch: int) -> None:
        """An attempt starts: its progress and lines are recorded from now on."""
        if self._loop is None:  # the daemon's one loop; asking again is a getpid each time
            self._loop = asyncio.get_running_loop()
        self._attempts[job_id] = _Attempt(epoch)

    async def end(self, job_id: int) -> None:
        """The attempt ended: write what it left unwritten, and record nothing more of it."""
        if self.unwritten(job_id):
            await self._write()
        self._attempts.pop(job_id, None)

    def unwritten(self, job_id: int) -> bool:
        """Whether the attempt has progress or lines to write (else `forgot` will do)."""
        attempt = self._attempts.get(job_id)
        return attempt is not None and bool(attempt.progress or attempt.lines or attempt.dropped)

    def forgot(self, job_id: int) -> bool:
        """The attempt ended: record nothing more of it if it has nothing to write (one
        call a job, not `unwritten` then a second); whether so (else `end` writes the rest)."""
        attempt = self._attempts.get(job_id)
        if attempt is not None and (attempt.progress or attempt.lines or attempt.dropped):
            return False
        self._attempts.pop(job_id, None)
        return True

    def pending_lines(self, job_id: int) -> list[LogLine]:
        """The lines of a job running here that are not written yet."""
        attempt = self._attempts.get(job_id)
        if attempt is None:
            return []
        return attempt.writing + [line for line, _ in attempt.lines]

    def progress(self, job_id: int, done: float, total: float | None, message: str | None) -> None:
        if message is not None and len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 1] + "…"
        self._from_any_thread(self._progress, job_id, float(done), total, message)

    def log(self, job_id: int, level: str, message: str) -> None:
        message = cut_utf8(message, MAX_LINE)
        self._from_any_thread(self._log, job_id, level, message)

    async def close(self) -> None:
        """Write what is unwritten (the daemon stops)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self._write()
        if self._writes:
            await asyncio.wait(self._writes)

    # -- on the loop ---------------------------------------------------------------------

    def _from_any_thread(self, record: Callable[..., None], *args: object) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            record(time.monotonic(), *args)
            return
        # From a thread: calls wait in an inbox, which one callback on the loop empties, so
        # that a task reporting in a tight loop does not flood the loop with callbacks.
        with self._inbox_lock:
            waiting = bool(self._inbox or self._inbox_progress)  # a callback is on its way
            if record == self._progress:  # only the latest counts
                self._inbox_progress[args[0]] = (time.monotonic(), args)
            elif len(self._inbox) < MAX_INBOX:
                self._inbox.append((record, time.monotonic(), args))
            else:
                job_id = args[0]
                self._inbox_dropped[job_id] = self._inbox_dropped.get(job_id, 0) + 1
            if waiting:
                return
        if not loop.is_closed():
            loop.call_soon_threadsafe(self._empty_inbox)

    def _empty_inbox(self) -> None:
        with self._inbox_lock:
            inbox, self._inbox = self._inbox, []
            progress, self._inbox_progress = self._inbox_progress, {}
            dropped, self._inbox_dropped = self._inbox_dropped, {}
        for record, when, args in inbox:
            record(when, *args)
        for when, args in progress.values():
            self._progress(when, *args)  # type: ignore[arg-type]
        for job_id, count in dropped.items():  # lines written faster than the loop took them
            attempt = self._attempts.get(job_id)  # type: ignore[call-overload]
            if attempt is not None:
                attempt.dropped += count
                self._soon()

    def _progress(
        self, when: float, job_id: int, done: float, total: float | None, message: str | None
    ) -> None:
        attempt = self._attempts.get(job_id)
        if attempt is None:
            return  # its attempt has ended (a thread left running, say)
        progress = Progress(done, None if total is None else float(total), message, time.time())
        attempt.progress = (progress, when)
        self._news.progress(job_id, progress)
        self._soon()

    def _log(self, when: float, job_id: int, level: str, message: str) -> None:
        attempt = self._attempts.get(job_id)
        if attempt is None:
            return
        line = LogLine(attempt.epoch, attempt.seq, time.time(), level, message)
        attempt.seq += 1
        attempt.lines.append((line, when))
        if len(attempt.lines) > MAX_LOG_LINES:  # the store could not keep more of them anyway
            del attempt.lines[0]
            attempt.dropped += 1
        self._news.log(job_id, line)
        self._soon()

    def _soon(self) -> None:
        """Write within THROTTLE seconds of the last write."""
        if self._timer is not None or self._loop is None:
            return
        delay = max(0.0, self._last_write + THROTTLE - time.monotonic())
        self._timer = self._loop.call_later(delay, self._start_write)

    def _start_write(self) -> None:
        self._timer = None
        task = asyncio.create_task(self._write(), name="taskd-activity")
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self) -> None:
        async with self._writing:
            progress, lines, dropped = self._take()
            if not (progress or lines or dropped):
                return
            try:
                await self._store.record_activity(progress, lines, dropped)
            except StoreError as exc:  # progress and lines are news, not state: let them go
                jobs = {note.job_id for note in progress} | {note.job_id for note in lines}
                logger.warning(
                    "could not record the progress and log lines of %s: %s",
                    counted(len(jobs), "job"),
                    exc,
                )
            finally:
                for attempt in self._attempts.values():
                    attempt.writing = []

    def _take(self) -> tuple[list[ProgressNote], list[LogNote], dict[int, int]]:
        """What is unwritten, as notes for the store."""
        progress: list[ProgressNote] = []
        lines: list[LogNote] = []
        dropped: dict[int, int] = {}
        now = self._last_write = time.monotonic()
        for job_id, attempt in self._attempts.items():
            if attempt.progress is not None:
                value, when = attempt.progress
                progress.append(
                    ProgressNote(
                        job_id, attempt.epoch, value.done, value.total, value.message, now - when
                    )
                )
            attempt.writing = [line for line, _ in attempt.lines]
            for line, when in attempt.lines:
                lines.append(
                    LogNote(job_id, attempt.epoch, line.seq, line.level, line.message, now - when)
                )
            if attempt.dropped:
                dropped[job_id] = attempt.dropped
            attempt.progress, attempt.lines, attempt.dropped = None, [], 0
        return progress, lines, dropped
