"""What is written to sys.stdout and sys.stderr, routed as lines: a job's to its log, the
rest to taskd's; and taskd's log queue, which drops and counts rather than wait."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading

import pytest

from taskd.activity import MAX_LINE
from taskd.logqueue import QueuedLog
from taskd.output import job_output, routed_output


class Kept:
    def __init__(self) -> None:
        self.lines: list[tuple[int, str]] = []

    def __call__(self, level: int, line: str) -> None:
        self.lines.append((level, line))


def test_pieces_become_lines_and_a_long_line_is_cut() -> None:
    job = Kept()
    with routed_output(), job_output(job):
        sys.stdout.write("a")
        sys.stdout.write("b\nc\n\nd")
        sys.stderr.write("x" * (MAX_LINE * 3) + "\n")
        print("y", file=sys.stderr)
    assert job.lines == [
        (logging.INFO, "ab"),
        (logging.INFO, "c"),
        (logging.INFO, ""),
        (logging.WARNING, "x" * (MAX_LINE + 1)),  # cut where it is recorded
        (logging.WARNING, "y"),
        (logging.INFO, "d"),  # the line left without its newline, when the job ends
    ]


async def test_the_job_follows_its_tasks_and_to_thread_but_not_its_own_threads(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "taskd.output")
    job = Kept()
    with routed_output():
        with job_output(job):
            await asyncio.gather(asyncio.create_task(say("task")), asyncio.to_thread(print, "th"))
            thread = threading.Thread(target=print, args=("own thread",))
            thread.start()
            thread.join()
        print("after")
    assert sorted(job.lines) == [(logging.INFO, "task"), (logging.INFO, "th")]
    outside = [r.getMessage() for r in caplog.records if r.name == "taskd.output"]
    assert outside == ["own thread", "after"]


async def say(text: str) -> None:
    print(text)


def test_a_handler_that_writes_to_stderr_does_not_loop() -> None:
    job = Kept()
    echo = logging.StreamHandler()  # sys.stderr: routed
    with routed_output():
        echo.stream = sys.stderr
        logging.getLogger("taskd.output").addHandler(echo)
        try:
            print("once", file=sys.stderr)
        finally:
            logging.getLogger("taskd.output").removeHandler(echo)
        with job_output(job):
            print("job")
    assert job.lines == [(logging.INFO, "job")]


def test_the_log_queue_drops_and_counts_rather_than_wait() -> None:
    read, write = os.pipe()
    handler = QueuedLog(write, max_queued=10_000)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("tests.logqueue")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        for number in range(2000):  # 200 KB: more than the pipe and the queue hold
            logger.warning("line %04d %s", number, "x" * 90)
        assert handler.dropped > 0
        taken = b""
        while b"lines of this log were dropped" not in taken:
            taken += os.read(read, 1 << 16)
        assert taken.startswith(b"line 0000 ")
    finally:
        logger.removeHandler(handler)
        handler.close()
        os.close(read)
        os.close(write)
