"""What is written to sys.stdout and sys.stderr while taskd runs (a task's `print`, a
library's warning), as lines that never block the event loop.

The code of a job writes into that job's log lines, as with `ctx.logger`: stdout at INFO,
stderr at WARNING, kept with the job (bounded in the same way) and in taskd's log with the
task and the job. What is written outside any job goes to taskd's log (logger
`taskd.output`). The job is the one whose call is running (`job_output`): it follows the
task into the asyncio tasks it creates and into `asyncio.to_thread`, which copy the context;
a thread the task starts by other means writes outside it. A line longer than MAX_LINE is
cut.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import io
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TextIO

from taskd.activity import MAX_LINE

# The level of each stream's lines.
LEVELS = {"stdout": logging.INFO, "stderr": logging.WARNING}
Log = Callable[[int, str], None]  # log(level, line)


class _Lines:
    """Text written in pieces, passed on a line at a time; the rest of a line over
    MAX_LINE characters is let go (the line is cut where it is recorded)."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self._emit = emit
        self._partial: list[str] = []
        self._size = 0
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
            *complete, rest = text.split("\n")
            for piece in complete:
                self._add(piece)
                self._emit_partial()
            self._add(rest)

    def close(self) -> None:
        with self._lock:
            if self._partial:
                self._emit_partial()

    def _add(self, piece: str) -> None:
        room = MAX_LINE + 1 - self._size  # one more, so that the line is seen to be cut
        if piece and room > 0:
            self._partial.append(piece[:room])
            self._size += min(len(piece), room)

    def _emit_partial(self) -> None:
        line = "".join(self._partial)
        self._partial.clear()
        self._size = 0
        self._emit(line)


class Output:
    """Where one writer's text goes: a line at a time, to `log(level, line)`. A stream's
    lines are set up when it is first written to (most jobs write nothing)."""

    def __init__(self, log: Log) -> None:
        self.closed = False
        self._log = log
        self._streams: dict[str, _Lines] = {}

    def write(self, stream: str, text: str) -> None:
        lines = self._streams.get(stream)
        if lines is None:  # setdefault: of two threads that write first, one's lines win
            made = _Lines(functools.partial(self._log, LEVELS[stream]))
            lines = self._streams.setdefault(stream, made)
        lines.write(text)

    def close(self) -> None:
        """Pass on the lines left without their newline."""
        self.closed = True
        for lines in list(self._streams.values()):
            lines.close()


_job = contextvars.ContextVar[Output | None]("taskd_job_output", default=None)
_emitting = threading.local()  # this thread is passing a line on


class RoutedStream(io.TextIOBase):
    """sys.stdout or sys.stderr while taskd runs: writes go to the job whose code writes
    them, else to taskd's log."""

    encoding = "utf-8"

    def __init__(self, name: str, original: TextIO | None, outside: Output) -> None:
        super().__init__()
        self.name = name
        self._original = original
        self._outside = outside

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if getattr(_emitting, "active", False):
            # Written while a line is passed on (a log handler a task added that writes
            # to sys.stderr): passing it on too would never end.
            return len(text)
        output = _job.get()
        if output is None or output.closed:
            output = self._outside
        _emitting.active = True
        try:
            output.write(self.name, text)
        finally:
            _emitting.active = False
        return len(text)

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        """The descriptor taskd was given (for faulthandler, or a child process)."""
        if self._original is None:
            raise io.UnsupportedOperation("fileno")
        return self._original.fileno()


@contextlib.contextmanager
def routed_output() -> Iterator[None]:
    """While within, sys.stdout and sys.stderr are routed (the daemon runs)."""
    outside = Output(logging.getLogger("taskd.output").log)
    saved = sys.stdout, sys.stderr
    sys.stdout = RoutedStream("stdout", sys.stdout, outside)
    sys.stderr = RoutedStream("stderr", sys.stderr, outside)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
        outside.close()


class job_output:
    """While within, what this context writes to sys.stdout and sys.stderr is a job's
    (`log` is its `ctx.logger.log`). A class rather than a generator: it is entered for
    every attempt."""

    __slots__ = ("_output", "_token")

    def __init__(self, log: Log) -> None:
        self._output = Output(log)

    def __enter__(self) -> None:
        self._token = _job.set(self._output)

    def __exit__(self, *exc: object) -> None:
        _job.reset(self._token)
        self._output.close()
