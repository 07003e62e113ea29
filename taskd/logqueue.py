"""taskd's own log, written by a thread of its own.

The event loop only formats a line and puts it in a bounded queue; one thread writes the
queue to taskd's stderr. A slow reader (the journal under load, a pipe nobody reads) stalls
that thread, never the loop. Lines that do not fit in the queue are dropped and counted: the
count is in `taskctl status`, and the log says how many were dropped once lines go through
again.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import threading
import time

MAX_QUEUED = 1024 * 1024  # characters of lines waiting to be written
CLOSE_TIMEOUT = 2.0  # seconds the lines still queued at exit get to be written
CLOSE_STALLED = 0.25  # seconds without a byte written after which they are let go
REPORT_EVERY = 10.0  # seconds at least between two reports of dropped lines, while they go on


class QueuedLog(logging.Handler):
    """A log handler that never blocks its caller: lines go to `fd` from a thread."""

    def __init__(self, fd: int, max_queued: int = MAX_QUEUED) -> None:
        super().__init__()
        self._fd = fd
        self._max_queued = max_queued
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._queued = 0  # characters in `_lines`
        self._written = 0  # bytes written
        self._count_lock = threading.Lock()
        self.dropped = 0  # lines dropped since the start
        self._reported = 0  # of them, those the log has told of
        self._reported_at = 0.0
        self._closed = False
        self._writer = threading.Thread(target=self._write_lines, name="taskd-log", daemon=True)
        self._writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        with self._count_lock:
            if self._closed or self._queued + len(text) > self._max_queued:
                self.dropped += 1
                return
            self._queued += len(text)
        self._lines.put(text)

    def close(self) -> None:
        """Write what is queued, for up to CLOSE_TIMEOUT seconds; let the rest go."""
        with self._count_lock:
            closing, self._closed = not self._closed, True
        if closing:
            self._lines.put(None)
            deadline = time.monotonic() + CLOSE_TIMEOUT
            written = -1
            while self._writer.is_alive() and written != self._written:  # it makes progress
                written = self._written
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._writer.join(min(CLOSE_STALLED, remaining))
        super().close()

    # -- in the writer thread ------------------------------------------------------------

    def _write_lines(self) -> None:
        while (text := self._lines.get()) is not None:
            self._write(text)
            with self._count_lock:
                self._queued -= len(text)
                dropped = self.dropped
            if dropped > self._reported and (
                self._lines.empty() or time.monotonic() - self._reported_at >= REPORT_EVERY
            ):
                self._report(dropped)

    def _report(self, dropped: int) -> None:
        record = logging.makeLogRecord(
            {
                "name": "taskd.log",
                "levelno": logging.WARNING,
                "levelname": "WARNING",
                "msg": "%d lines of this log were dropped (%d since taskd started): its output "
                "(the journal, a pipe) did not take them as fast as they came",
                "args": (dropped - self._reported, dropped),
            }
        )
        self._reported, self._reported_at = dropped, time.monotonic()
        self._write(self.format(record) + "\n")

    def _write(self, text: str) -> None:
        data = memoryview(text.encode("utf-8", "replace"))
        while data:
            try:
                count = os.write(self._fd, data)
                self._written += count
                data = data[count:]
            except BlockingIOError:  # a non-blocking descriptor: wait until it takes more
                select.select([], [self._fd], [])
            except OSError:  # closed, or nobody reads it any more
                with self._count_lock:
                    self.dropped += 1
                return


def dropped_lines() -> int:
    """Lines of taskd's log dropped since it started (0 if its log is not queued)."""
    return sum(h.dropped for h in logging.getLogger().handlers if isinstance(h, QueuedLog))
