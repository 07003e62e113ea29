"""What the dashboard costs, measured on a real taskd (SQLite unless --postgres URL).

    python -m tests.bench.dashboard [--jobs 1000000] [--postgres URL] [--idle 60]

- The Jobs page (`GET /ui/jobs?...`, signed in, HTML as a browser gets it) over a store of
  `--jobs` jobs: the first page, and each filter; the median of 5 requests after one
  warm-up, wall-clock at the client (127.0.0.1).
- Idle CPU: the daemon's CPU seconds (utime + stime from /proc) over `--idle` seconds while
  a headless Chromium holds the Overview and a job's page open and nothing happens.

The jobs are written straight into the store's table (as a long-running taskd would have
left them): 10 tasks, mostly succeeded, some failed, cancelled and pending (not due for a
year, so that nothing runs them), a tenth with a key, ids in creation order.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sqlite3
import statistics
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import msgspec

from tests.backends import unique_schema
from tests.http_support import TOKEN, HttpClient, http_config
from tests.support import Taskd, short_tempdir

TASKS = [f"bench:t{n}" for n in range(10)]
NOW = time.time()
FILTERS = [
    ("first page", {}),
    ("second page (before=id)", {"before": "BEFORE"}),
    ("task", {"task": "bench:t3"}),
    ("status=failed", {"status": "failed"}),
    ("task + status", {"task": "bench:t3", "status": "failed"}),
    ("origin=schedule", {"origin": "schedule"}),
    ("key", {"key": "key-4240"}),
    ("created since (newest 1%)", {"since": "SINCE"}),
    # Only old jobs, or none, match: an id range (found on the primary key), an index.
    ("created until (oldest 1%)", {"until": "UNTIL"}),
    ("created in an old hour", {"since": "OLD_SINCE", "until": "UNTIL"}),
    ("origin=hook (none)", {"origin": "hook"}),
    # Not indexed: the jobs are read, newest first, until a page is full.
    ("payload text", {"text": "user-4242"}),
    ("payload text (no match)", {"text": "no-such-text"}),
]


def rows(count: int) -> Iterator[tuple[object, ...]]:
    """(task, status, origin, payload, key, created_at, run_at, finished_at) per job."""
    for n in range(count):
        roll = n % 100
        status = (
            "pending"
            if roll < 3
            else "failed"
            if roll < 8
            else "cancelled"
            if roll < 9
            else "succeeded"
        )
        origin = "schedule" if n % 50 == 0 else "run" if n % 7 == 0 else "enqueue"
        created = NOW - (count - n) * 0.5
        payload = msgspec.msgpack.encode({"user": f"user-{n}", "n": n})
        key = f"key-{n}" if n % 10 == 0 else None
        run_at = NOW + 365 * 86400 if status == "pending" else created
        finished = None if status == "pending" else created + 0.1
        yield TASKS[n % 10], status, origin, payload, key, created, run_at, finished


COLUMNS = "task, status, origin, payload, key, created_at, run_at, finished_at, max_attempts"


def fill_sqlite(path: Path, count: int) -> None:
    with sqlite3.connect(path) as db:
        db.executemany(
            f"INSERT INTO jobs ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1)", rows(count)
        )
    with sqlite3.connect(path) as db:
        db.execute("ANALYZE")


def fill_postgres(url: str, schema: str, count: int) -> None:
    import asyncpg

    async def fill() -> None:
        connection = await asyncpg.connect(url)
        try:
            chunk: list[tuple[object, ...]] = []
            for row in rows(count):
                chunk.append((*row, 1))
                if len(chunk) == 50_000:
                    await connection.copy_records_to_table(
                        "jobs", schema_name=schema, records=chunk, columns=COLUMNS.split(", ")
                    )
                    chunk = []
            if chunk:
                await connection.copy_records_to_table(
                    "jobs", schema_name=schema, records=chunk, columns=COLUMNS.split(", ")
                )
            await connection.execute(f"ANALYZE {schema}.jobs")
        finally:
            await connection.close()

    asyncio.run(fill())


def port(daemon: Taskd) -> int:
    """The port of its latest start (the log has a line per start)."""
    return int(re.findall(r"HTTP API listening on http://127\.0\.0\.1:(\d+)", daemon.log)[-1])


def signed_in(daemon: Taskd) -> tuple[HttpClient, dict[str, str]]:
    client = HttpClient(port(daemon), token=None)
    body = urllib.parse.urlencode({"token": TOKEN})
    reply = client.post(
        "/ui/sign-in", body, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    return client, {"Cookie": reply.headers["set-cookie"].split(";")[0]}


def timed(client: HttpClient, headers: dict[str, str], path: str) -> tuple[float, int]:
    client.get(path, headers=headers)
    times = []
    for _ in range(5):
        started = time.perf_counter()
        reply = client.get(path, headers=headers)
        times.append(time.perf_counter() - started)
        assert reply.status == 200, (path, reply.status)
    return statistics.median(times) * 1000, reply.body.count(b"<tr data-status")


def jobs_page(daemon: Taskd, count: int) -> None:
    client, headers = signed_in(daemon)
    first = client.get("/ui/jobs", headers=headers).body.decode()
    before = re.search(r"before=(\d+)", first)
    since = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(NOW - count * 0.5 * 0.01))
    until = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(NOW - count * 0.5 * 0.99))
    old_since = time.strftime(
        "%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(NOW - count * 0.5 * 0.99 - 3600)
    )
    print(f"Jobs page, {count:,} jobs: median of 5 (ms), rows shown")
    for name, query in FILTERS:
        values = {
            k: {
                "BEFORE": before.group(1) if before else "",
                "SINCE": since,
                "OLD_SINCE": old_since,
                "UNTIL": until,
            }.get(v, v)
            for k, v in query.items()
        }
        path = "/ui/jobs" + ("?" + urllib.parse.urlencode(values) if values else "")
        ms, shown = timed(client, headers, path)
        print(f"  {name:28} {ms:8.1f} ms  {shown:3} rows   {path}")
    ms, _ = timed(client, headers, "/ui/")
    print(f"  {'Overview (counts, chart)':28} {ms:8.1f} ms")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu(daemon: Taskd, seconds: float) -> None:
    from playwright.sync_api import sync_playwright

    assert daemon.process is not None
    base = f"http://127.0.0.1:{port(daemon)}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium")
        context = browser.new_context()
        page = context.new_page()
        page.goto(base + "/ui/sign-in")
        page.get_by_label("Token").fill(TOKEN)
        page.get_by_role("button", name="Sign in").click()
        page.get_by_text("live", exact=True).wait_for()
        job = context.new_page()
        job.goto(base + "/ui/jobs/1")
        job.get_by_text("live", exact=True).wait_for()
        time.sleep(2)  # the pages' own first reads are done
        before, started = cpu_seconds(daemon.process.pid), time.monotonic()
        time.sleep(seconds)
        used, elapsed = cpu_seconds(daemon.process.pid) - before, time.monotonic() - started
        browser.close()
    print(
        f"Idle with the Overview and a job's page open: {used:.2f} CPU s in {elapsed:.0f} s "
        f"= {100 * used / elapsed:.2f}% of a core"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--postgres", metavar="URL")
    parser.add_argument("--idle", type=float, default=60.0)
    args = parser.parse_args()
    root = short_tempdir()
    schema = unique_schema() if args.postgres else None
    config = http_config() + (f'[postgres]\nschema = "{schema}"\n' if schema else "")
    daemon = Taskd(root, config=config, log_level="info")
    if args.postgres:
        daemon.database = args.postgres  # type: ignore[assignment]
    daemon.start()
    started = time.monotonic()
    if schema is not None:
        fill_postgres(args.postgres, schema, args.jobs)
    else:
        daemon.stop()
        fill_sqlite(daemon.database, args.jobs)
        daemon.start()
    print(f"{args.jobs:,} jobs written in {time.monotonic() - started:.0f} s")
    try:
        jobs_page(daemon, args.jobs)
        if args.idle:
            idle_cpu(daemon, args.idle)
    finally:
        daemon.stop()
        daemon.close()
        if schema is not None:
            from tests.backends import drop_schema

            asyncio.run(drop_schema(args.postgres, schema))


if __name__ == "__main__":
    main()
