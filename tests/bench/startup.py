"""How long taskd takes to start on a SQLite store: from the process's start to READY=1.

    python -m tests.bench.startup [--jobs 1000000] [--repeat 3]

After a clean stop the start skips `PRAGMA quick_check`; after kill -9 it checks the whole
file. Measured with a store of `--jobs` jobs (built as tests/bench/quick_check.py builds
it), with an empty store, and with a small store killed while four connections enqueue.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.bench import quick_check
from tests.bench.workload import BenchTaskd, make_tasks
from tests.support import Taskd, short_tempdir, wait_until


@contextmanager
def daemon_on(jobs: int, config: str = "") -> Iterator[Taskd]:
    """A stopped taskd whose store holds `jobs` jobs (and has been opened once by taskd)."""
    root = short_tempdir()
    try:
        daemon = BenchTaskd(root, tasks=make_tasks(root), config=config)
        if jobs:
            quick_check.build(daemon.database, jobs)
        daemon.start(timeout=600).stop(timeout=120)
        yield daemon
    finally:
        shutil.rmtree(root, ignore_errors=True)


def timed_start(daemon: Taskd) -> float:
    """Seconds from starting the process to READY=1; the daemon is stopped again after."""
    started = time.perf_counter()
    daemon.start(timeout=600)
    took = time.perf_counter() - started
    daemon.stop(timeout=120)
    return took


def after_clean_stop(daemon: Taskd) -> float:
    return timed_start(daemon)


def after_kill(daemon: Taskd) -> float:
    daemon.start(timeout=600)
    daemon.kill()
    return timed_start(daemon)


def after_kill_under_load(daemon: Taskd) -> float:
    """kill -9 while four connections enqueue, once the WAL holds a megabyte of their jobs."""
    daemon.start(timeout=600)
    load = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.drivers", "taskd-enqueue", "--socket",
         str(daemon.socket), "--jobs", "100000000", "--connections", "4"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wal = Path(f"{daemon.database}-wal")
        wait_until(lambda: wal.exists() and wal.stat().st_size > 1 << 20, 60, "the WAL to grow")
        daemon.kill()
    finally:
        load.kill()
        load.wait()
    return timed_start(daemon)


def measure(jobs: int, repeat: int, config: str = "") -> dict[str, list[float]]:
    """Start-up times (s) by case, `repeat` of each, the cases taking turns."""
    cases = {
        f"{jobs:,} jobs, after a clean stop": (True, after_clean_stop),
        "empty store, after a clean stop": (False, after_clean_stop),
        f"{jobs:,} jobs, after kill -9": (True, after_kill),
        "empty store, after kill -9": (False, after_kill),
        "small store, after kill -9 under load": (False, after_kill_under_load),
    }
    times: dict[str, list[float]] = {case: [] for case in cases}
    with daemon_on(jobs, config) as big, daemon_on(0, config) as small:
        for _ in range(repeat):
            for case, (on_big, way) in cases.items():
                times[case].append(way(big if on_big else small))
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    for case, times in measure(args.jobs, args.repeat).items():
        print(f"start-up, {case}: median {statistics.median(times):.3f} s "
              f"({', '.join(f'{t:.3f}' for t in times)})")  # fmt: skip


if __name__ == "__main__":
    main()
