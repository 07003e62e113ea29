"""The relay of other daemons' activity: read only for subscribers, one read per job at a
time (what comes meanwhile makes one more read), lines past a read's bound counted."""

from __future__ import annotations

import asyncio

from taskd.live import RELAY_LINES, LiveEvents
from taskd.models import LogLine, Progress
from taskd.news import DaemonNews
from taskd.store.base import JobActivity
from taskd.store.events import JobEvents


class Reads:
    def __init__(self) -> None:
        self.calls: list[tuple[int, tuple[int, int], int]] = []
        self.gate = asyncio.Event()
        self.skipped = 0

    async def __call__(self, job_id: int, after: tuple[int, int], limit: int) -> JobActivity:
        self.calls.append((job_id, after, limit))
        await self.gate.wait()
        lines = [LogLine(1, seq, 0.0, "INFO", f"line {seq}") for seq in range(after[1] + 1, 3)]
        return JobActivity("t", "running", Progress(1.0), lines, self.skipped)


async def test_nobody_subscribed_nothing_read() -> None:
    events, reads = JobEvents(), Reads()
    LiveEvents(events, DaemonNews(), reads)
    events.activity(7, 1, 0, True)
    await asyncio.sleep(0)
    assert reads.calls == []


async def test_notices_during_a_read_make_one_more_read_from_the_last_line() -> None:
    events, reads = JobEvents(), Reads()
    live = LiveEvents(events, DaemonNews(), reads)
    subscription = live.subscribe(7, logs=True)
    events.activity(7, 1, 0, False)
    await asyncio.sleep(0)
    for _ in range(5):  # a flood of notices while the first read is under way
        events.activity(7, 1, 1, True)
    reads.gate.set()
    taken = await subscription.take()
    while len(reads.calls) < 2 or [e for e in taken if e.kind == "progress"] == []:
        taken += await subscription.take()
    assert reads.calls == [(7, (1, -1), RELAY_LINES), (7, (1, 2), RELAY_LINES)]
    assert [e.line.message for e in taken if e.line is not None] == ["line 0", "line 1", "line 2"]
    assert {e.task for e in taken if e.kind in ("log", "progress")} == {"t"}
    await live.close()


async def test_lines_past_a_reads_bound_are_counted_as_dropped() -> None:
    events, reads = JobEvents(), Reads()
    reads.gate.set()
    reads.skipped = 500
    live = LiveEvents(events, DaemonNews(), reads)
    subscription = live.subscribe(None, logs=True)
    events.activity(7, 1, 0, False)
    taken = await subscription.take()
    while not any(e.kind == "dropped" for e in taken):
        taken += await subscription.take()
    assert sum(e.dropped for e in taken) == 500 and subscription.dropped == 500
    await live.close()
