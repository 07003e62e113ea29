"""What the benchmarks run: their tasks, and a taskd on a temporary folder that logs little."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support import Taskd, short_tempdir

TASKS = {
    "noop.py": """from taskd import define_task


@define_task(description="Does nothing")
async def noop(payload) -> None:
    return None
""",
    "hold.py": """import asyncio

from taskd import define_task


@define_task(description="Holds its execution open for payload['seconds']: callers join it")
async def hold(payload) -> None:
    await asyncio.sleep(payload["seconds"])
""",
    "limited.py": """import asyncio

from taskd import define_task


@define_task(description="One at a time, slowly: a backlog that never drains", concurrency=1)
async def limited(payload) -> None:
    await asyncio.sleep(10)
""",
    "throttled.py": """from taskd import define_task


@define_task(
    description="One start an hour per customer: a backlog held by its per-key rate limit",
    rate_limit="1/h",
    limit_key="customer",
)
async def throttled(payload) -> None:
    return None
""",
}


def cpu_seconds(pid: int) -> float:
    """The CPU time (user and system, all threads) process `pid` has used so far, from
    /proc/PID/stat, in seconds (to the kernel's clock tick, 10 ms on most machines)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu_seconds(postmaster: int) -> dict[int, float]:
    """The CPU time so far of each process of a local PostgreSQL server (its postmaster and
    the postmaster's children: backends, writers), by pid, found in /proc; only read, never
    signalled. Empty for pid 0."""
    spent: dict[int, float] = {}
    if not postmaster:
        return spent
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:  # gone meanwhile
            continue
        if int(entry.name) == postmaster or int(fields[1]) == postmaster:
            spent[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    return spent


def daemon_pid(daemon: Taskd) -> int:
    assert daemon.process is not None
    return daemon.process.pid


class BenchTaskd(Taskd):
    """A taskd that logs at `info`: debug lines per job would be part of what is measured."""

    def command(self) -> list[str]:
        return [arg if arg != "debug" else "info" for arg in super().command()]


def make_tasks(root: Path) -> Path:
    tasks = root / "tasks"
    tasks.mkdir(exist_ok=True)
    for name, source in TASKS.items():
        (tasks / name).write_text(source)
    return tasks


@contextmanager
def bench_daemon(config: str = "") -> Iterator[Taskd]:
    """A fresh taskd (empty database) on the benchmark tasks; stopped and removed after."""
    root = short_tempdir()
    daemon = BenchTaskd(root, tasks=make_tasks(root), config=config).start()
    try:
        yield daemon
    finally:
        if daemon.running:
            daemon.stop(timeout=120)
        shutil.rmtree(root, ignore_errors=True)
