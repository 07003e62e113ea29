"""How long the daemon's loop goes without a turn while async jobs that compute without
awaiting run back to back in every slot.

    .venv/bin/python -m tests.bench.loop_turns [--jobs 3000] [--workers 16] [--ms 2]

Starts a real taskd (SQLite) with `--workers` slots and an every-second tick, queues `--jobs`
jobs of an async task that computes `--ms` milliseconds without awaiting, and meanwhile asks
`list_tasks` (answered from memory, no store read) over and over: each reply's round trip
is at least the gap the loop was in when the request came. Prints the round trips, the
ticks' lateness to their body during the drain, the drain rate and the daemon's CPU per job.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import statistics
import time
from pathlib import Path

from taskctl import enqueue_params
from tests.bench.cron_lateness import cpu_seconds, percentile
from tests.bench.workload import BenchTaskd
from tests.support import short_tempdir

SPIN_TASK = """import time

from taskd import define_task


@define_task(description="Computes for payload milliseconds without awaiting")
async def spin(payload: float) -> None:
    end = time.thread_time() + payload / 1000
    while time.thread_time() < end:
        pass
"""
PROBE_TASK = """import asyncio

from taskd import define_task


@define_task(description="How late 1 ms timers fire in the daemon's loop for payload s")
async def probe(payload: float) -> list[float]:
    loop = asyncio.get_running_loop()
    late = []
    end = loop.time() + payload
    while loop.time() < end:
        asked = loop.time()
        await asyncio.sleep(0.001)
        late.append((loop.time() - asked - 0.001) * 1000)
    return late
"""
TICK_TASK = """import time

from taskd import define_task


@define_task(description="A scheduled tick that says when its body began")
async def tick(payload: dict) -> float:
    return time.time()
"""

PROBE_SECONDS = 3.0  # the probe waits for 1 ms timers this long, from the drain's start


def make_tasks(root: Path) -> Path:
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "spin.py").write_text(SPIN_TASK)
    (tasks / "tick.py").write_text(TICK_TASK)
    (tasks / "probe.py").write_text(PROBE_TASK)
    return tasks


def summary(values: list[float]) -> str:
    if not values:
        return "none"
    return (
        f"median {statistics.median(values):7.2f} ms   p99 {percentile(values, 0.99):7.2f} ms"
        f"   max {max(values):7.2f} ms   ({len(values)})"
    )


def drain(jobs: int, workers: int, milliseconds: float) -> None:
    root = short_tempdir()
    try:
        config = f'workers = {workers}\n[scheduled_tasks]\n"* * * * * *" = "tick"\n'
        daemon = BenchTaskd(root, tasks=make_tasks(root), config=config).start()
        assert daemon.process is not None
        try:
            with daemon.client() as client:
                cpu_before = cpu_seconds(daemon.process.pid)[1]
                began = time.time()
                # Timers in the loop while the jobs drain, in a slot of its own from the start.
                probe = client.enqueue("probe", PROBE_SECONDS).job_id
                params = [enqueue_params("spin", milliseconds) for _ in range(jobs)]
                last = client.enqueue_many(params)[-1].job_id
                replies = []
                while client.job(last).status != "succeeded":
                    asked = time.perf_counter()
                    client.list_tasks()
                    replies.append((time.perf_counter() - asked) * 1000)
                seconds = time.time() - began
                timers = client.wait(probe, timeout=60).result
                cpu = cpu_seconds(daemon.process.pid)[1] - cpu_before
                ticks = [
                    (job.result - scheduled) * 1000
                    for job in client.jobs(task="tick", limit=10_000, payloads=True)
                    if job.status == "succeeded"
                    and began
                    < (
                        scheduled := dt.datetime.fromisoformat(
                            job.payload["scheduled_time"]
                        ).timestamp()
                    )
                    < began + seconds
                ]
        finally:
            daemon.stop(timeout=120)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"{jobs} jobs of {milliseconds:g} ms without awaiting, {workers} workers"
        f" (one for {PROBE_SECONDS:g} s the timers' probe)"
    )
    print(f"  list_tasks round trip  {summary(replies)}")
    print(f"  1 ms timer, late by    {summary(timers)}")
    print(f"  tick to its body       {summary(ticks)}")
    print(
        f"  drained {jobs / seconds:,.0f} jobs/s; daemon CPU {cpu / jobs * 1e6:,.0f} us per job"
        f" ({milliseconds * 1000:g} of them the job's)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--ms", type=float, default=2.0, help="each job's computing time")
    args = parser.parse_args()
    drain(args.jobs, args.workers, args.ms)


if __name__ == "__main__":
    main()
