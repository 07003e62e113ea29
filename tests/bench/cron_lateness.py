"""Tick lateness of the scheduler, idle and with a busy queue, and idle CPU with 100 schedules.

    .venv/bin/python -m tests.bench.cron_lateness [--ticks 120] [--cpu-seconds 60]

Starts real taskd processes on a temporary folder. Lateness of a tick is measured from its
job row: `created_at` (taken when the scheduler submits the tick) minus the tick's
`scheduled_time`, and `started_at` (when a worker began running it) minus the same.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from taskctl import Client, enqueue_params
from tests.bench.workload import BenchTaskd
from tests.support import Taskd, short_tempdir, wait_until

TICK_TASK = """import time

from taskd import define_task


@define_task(description="A scheduled tick that says when its body began")
async def tick(payload: dict) -> float:
    return time.time()
"""
QUICK_TASK = """from taskd import define_task


@define_task(description="A quick queued job")
async def quick(payload: int) -> int:
    return payload
"""
FLOOD_BATCH = 500
FLOOD_BACKLOG = 4  # batches kept in the queue: about 2000 jobs waiting at any time


def make_tasks(root: Path) -> Path:
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "tick.py").write_text(TICK_TASK)
    (tasks / "quick.py").write_text(QUICK_TASK)
    return tasks


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def tick_jobs(client: Client, since: float) -> list[tuple[float, float, float | None]]:
    """(scheduled_time, created_at, when the task's body began) of the tick jobs scheduled
    after `since` (the last once the job has succeeded: the task returns its own clock)."""
    rows = []
    for job in client.jobs(task="tick", limit=10_000, payloads=True):
        scheduled = dt.datetime.fromisoformat(job.payload["scheduled_time"]).timestamp()
        if scheduled > since:
            began = job.result if job.status == "succeeded" else None
            rows.append((scheduled, job.created_at, began))
    return sorted(rows)


def measure(daemon: Taskd, ticks: int, label: str) -> list[float]:
    """Print the lateness of the next `ticks` ticks; the milliseconds from each tick to the
    start of its task's body."""
    since = time.time() + 1  # whole ticks measured from the next one on
    with daemon.client() as client:

        def enough() -> bool:
            rows = tick_jobs(client, since)
            return len(rows) >= ticks and all(row[2] is not None for row in rows[:ticks])

        wait_until(enough, timeout=ticks * 1.5 + 30, what=f"{ticks} ticks")
        rows = tick_jobs(client, since)[:ticks]
    fired = [(created - scheduled) * 1000 for scheduled, created, _ in rows]
    started = [(start - scheduled) * 1000 for scheduled, _, start in rows if start is not None]
    print(f"{label}: {len(rows)} ticks of an every-second schedule")
    for name, values in (("fired  ", fired), ("started", started)):
        print(
            f"  {name} median {statistics.median(values):7.2f} ms   p99 "
            f"{percentile(values, 0.99):7.2f} ms   max {max(values):7.2f} ms"
        )
    return started


def started_lateness(ticks: int, *, busy: bool = False) -> list[float]:
    """Milliseconds from each of `ticks` every-second ticks to its task's start, idle or
    (`busy`) while another process keeps about 2000 quick jobs queued."""
    root = short_tempdir()
    try:
        config = '[scheduled_tasks]\n"* * * * * *" = "tick"\n'
        daemon = BenchTaskd(root, tasks=make_tasks(root), config=config).start()
        try:
            if not busy:
                return measure(daemon, ticks, "idle")
            with flooding(daemon):
                return measure(daemon, ticks, BUSY)
        finally:
            daemon.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


BUSY = "busy (another process keeps ~2000 quick jobs queued)"


@contextlib.contextmanager
def flooding(daemon: Taskd) -> Iterator[None]:
    """Another process keeps about FLOOD_BATCH * FLOOD_BACKLOG quick jobs queued meanwhile."""
    flooder = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.cron_lateness", "--flood", str(daemon.socket)]
    )
    try:
        yield
    finally:
        flooder.kill()
        flooder.wait()


def uvloop_lateness(ticks: int) -> list[float]:
    """The floor: a bare uvloop loop sleeping until each whole second, in milliseconds late."""
    import asyncio

    import uvloop

    async def run() -> list[float]:
        late = []
        for _ in range(ticks):
            tick = float(int(time.time()) + 1)
            await asyncio.sleep(tick - time.time())
            late.append((time.time() - tick) * 1000)
        return late

    return uvloop.run(run())


def flood(socket: str) -> None:
    """Keep about FLOOD_BATCH * FLOOD_BACKLOG quick jobs waiting, until killed."""
    outstanding: deque[int] = deque()
    with Client(socket) as client:
        while True:
            batch = [enqueue_params("quick", n) for n in range(FLOOD_BATCH)]
            outstanding.append(client.enqueue_many(batch)[-1].job_id)
            if len(outstanding) > FLOOD_BACKLOG:
                client.wait(outstanding.popleft())


def lateness(ticks: int) -> None:
    root = short_tempdir()
    try:
        config = '[scheduled_tasks]\n"* * * * * *" = "tick"\n'
        daemon = BenchTaskd(root, tasks=make_tasks(root), config=config).start()
        try:
            measure(daemon, ticks, "idle")
            with flooding(daemon), daemon.client() as client:
                before = client.status().counts.get("succeeded", 0)
                started = time.time()
                measure(daemon, ticks, BUSY)
                done = client.status().counts.get("succeeded", 0) - before
                rate = done / (time.time() - started)
            print(f"  meanwhile the executor finished {rate:,.0f} queued jobs/s")
        finally:
            daemon.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU time of the process: utime + stime (10 ms resolution), and the sum over its
    threads of the nanosecond run time in /proc/PID/task/*/schedstat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    nanoseconds = sum(
        int(path.read_text().split()[0]) for path in Path(f"/proc/{pid}/task").glob("*/schedstat")
    )
    return ticks, nanoseconds / 1e9


def idle_cpu(seconds: float, count: int = 100) -> None:
    root = short_tempdir()
    try:
        config = "".join(
            f'[[schedule]]\nid = "s{n}"\ncron = "{n % 60} {n // 60} 1 1 *"\ntasks = "tick"\n'
            for n in range(count)
        )
        daemon = BenchTaskd(root, tasks=make_tasks(root), config=config).start()
        try:
            with daemon.client() as client:
                assert len(client.schedules()) == count
            time.sleep(2)  # let start-up settle
            assert daemon.process is not None
            pid = daemon.process.pid
            (ticks_before, ns_before), started = cpu_seconds(pid), time.monotonic()
            time.sleep(seconds)
            (ticks_after, ns_after), elapsed = cpu_seconds(pid), time.monotonic() - started
            print(f"idle CPU with {count} schedules over {elapsed:.0f} s:")
            for name, used in (
                ("utime+stime", ticks_after - ticks_before),
                ("schedstat  ", ns_after - ns_before),
            ):
                print(f"  {name} {used * 1000:8.2f} ms = {100 * used / elapsed:.4f}% of one core")
        finally:
            daemon.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ticks", type=int, default=120, help="ticks per measurement (0: none)")
    parser.add_argument("--cpu-seconds", type=float, default=60, help="idle CPU window")
    parser.add_argument("--flood", metavar="SOCKET", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.flood:
        flood(args.flood)
        return
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}")
    if args.ticks > 0:
        lateness(args.ticks)
    if args.cpu_seconds > 0:
        idle_cpu(args.cpu_seconds)


if __name__ == "__main__":
    main()
