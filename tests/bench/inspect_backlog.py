"""What inspecting a big backlog costs: `taskctl status`, `taskctl jobs`, `taskctl why ID` and
`GET /metrics` with N pending jobs (half delayed by an hour, half due jobs of a task with
`concurrency = 1`, one of which runs), on SQLite and, with `--postgres`, on PostgreSQL.

    .venv/bin/python -m tests.bench.inspect_backlog [--jobs 1000000] [--repeat 3]
        [--postgres postgresql://postgres@127.0.0.1:5432/test]

The jobs are written straight into the store (a daemon would take minutes to enqueue a
million), by SQL that goes through the store's schema as any write does; a daemon then
starts on it and each command is timed as a whole process, medians of `--repeat` runs after
one run that warms the caches.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from taskctl.client import Client
from tests.backends import drop_schema, unique_schema
from tests.bench.workload import BenchTaskd, make_tasks
from tests.support import TASKCTL, Taskd, short_tempdir

COMMANDS = ("taskctl status", "taskctl jobs", "taskctl why ID", "GET /metrics")
# Half the jobs delayed by an hour (tasks `noop`), half due (task `limited`, concurrency 1).
FILL = """
INSERT INTO {s}jobs (task, status, origin, payload, priority, run_at, max_attempts,
                     created_at)
SELECT CASE WHEN n % 2 = 0 THEN 'noop' ELSE 'limited' END, 'pending', 'enqueue', {payload},
       0, CASE WHEN n % 2 = 0 THEN {now} + 3600 + n ELSE {now} - 1000 + n * 0.0001 END, 3,
       {now} - 1000
FROM {series}
"""
SQLITE_SERIES = "(WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < {jobs})"
SQLITE_SERIES += " SELECT n FROM s)"


def fill_sqlite(daemon: Taskd, jobs: int) -> None:
    with sqlite3.connect(daemon.database, isolation_level=None) as db:
        db.execute("BEGIN")
        db.execute(
            FILL.format(s="", payload="X'80'", now=time.time(),
                        series=SQLITE_SERIES.format(jobs=jobs))
        )  # fmt: skip
        db.execute("COMMIT")
    db.close()


def fill_postgres(url: str, schema: str, jobs: int) -> None:
    import asyncpg

    async def fill() -> None:
        connection = await asyncpg.connect(url)
        try:
            await connection.execute(
                FILL.format(s=f"{schema}.", payload="'\\x80'::bytea", now=time.time(),
                            series=f"generate_series(1, {jobs}) AS n")
            )  # fmt: skip
            await connection.execute(f"ANALYZE {schema}.jobs")
        finally:
            await connection.close()

    asyncio.run(fill())


@contextmanager
def backlog(jobs: int, url: str | None) -> Iterator[Taskd]:
    """A daemon (HTTP on a Unix socket) on a store holding the backlog."""
    root = short_tempdir()
    schema = unique_schema()
    config = f'workers = 16\n[http]\nlisten = "unix:{root}/http.sock"\n'
    if url is not None:
        config += f'[postgres]\nschema = "{schema}"\n'
    daemon = BenchTaskd(root, tasks=make_tasks(root), config=config)
    if url is not None:
        daemon.database = url  # type: ignore[assignment]
    try:
        daemon.start(timeout=120).stop(timeout=120)  # creates the schema
        if url is None:
            fill_sqlite(daemon, jobs)
        else:
            fill_postgres(url, schema, jobs)
        daemon.start(timeout=300)
        yield daemon
    finally:
        if daemon.running:
            daemon.stop(timeout=120)
        shutil.rmtree(root, ignore_errors=True)
        if url is not None:
            asyncio.run(drop_schema(url, schema))


def commands(daemon: Taskd) -> tuple[dict[str, list[str]], int]:
    taskctl = [TASKCTL or sys.executable, "--socket", str(daemon.socket)]
    if TASKCTL is None:
        taskctl[1:1] = ["-m", "taskctl"]
    listed = subprocess.run(
        [*taskctl, "jobs", "--task", "limited", "--status", "pending", "--limit", "1", "--json"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    job_id = json.loads(listed)[0]["id"]
    http = daemon.root / "http.sock"
    return {
        "taskctl status": [*taskctl, "status"],
        "taskctl jobs": [*taskctl, "jobs"],
        "taskctl why ID": [*taskctl, "why", str(job_id)],
        "GET /metrics": ["curl", "-sf", "--unix-socket", str(http), "http://taskd/metrics"],
    }, job_id


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def answers(client: Client, job_id: int) -> dict[str, Callable[[], object]]:
    """Each request alone, on one open connection (what the daemon takes to answer)."""
    return {
        "taskctl status": client.status,
        "taskctl jobs": lambda: client.jobs(),
        "taskctl why ID": lambda: client.why(job_id),
        "GET /metrics": client.metrics,
    }


def answered(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def measure(jobs: int, repeat: int, url: str | None) -> dict[str, tuple[float, float]]:
    """Median milliseconds of each request (alone, and as a whole process)."""
    with backlog(jobs, url) as daemon, daemon.client() as client:
        runs, job_id = commands(daemon)
        calls = answers(client, job_id)
        for name, command in runs.items():
            timed(command)  # warm
            answered(calls[name])
        whole: dict[str, list[float]] = {name: [] for name in runs}
        alone: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(repeat):
            for name, command in runs.items():
                alone[name].append(answered(calls[name]) * 1000)
                whole[name].append(timed(command) * 1000)
    return {name: (statistics.median(alone[name]), statistics.median(whole[name])) for name in runs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--postgres", default=None, help="also on this PostgreSQL database")
    args = parser.parse_args(argv)
    backends: list[tuple[str, str | None]] = [("SQLite", None)]
    if args.postgres:
        backends.append(("PostgreSQL", args.postgres))
    floor = statistics.median(timed([sys.executable, "-c", "import msgspec"]) * 1000
                              for _ in range(args.repeat))  # fmt: skip
    print(f"{args.jobs:,} pending jobs; medians of {args.repeat} runs, ms: the request alone"
          f" / the whole process (`python -c 'import msgspec'`: {floor:.0f} ms)")  # fmt: skip
    print("| backend | " + " | ".join(COMMANDS) + " |")
    print("|---|" + "---|" * len(COMMANDS))
    for name, url in backends:
        times = measure(args.jobs, args.repeat, url)
        cells = [f"{times[c][0]:.1f} / {times[c][1]:.0f}" for c in COMMANDS]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
