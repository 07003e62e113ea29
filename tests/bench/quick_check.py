"""What the start-up check of a SQLite job store costs: `PRAGMA quick_check` on N jobs.

    python -m tests.bench.quick_check --jobs 1000000

Builds a database with taskd's schema and N jobs (two in three finished with a result, the
rest pending; payloads of an email's size), then times the check with the file's pages in
the page cache ("warm") and after dropping them from it ("cold", as after a reboot).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from taskd.store.sqlite.schema import MIGRATIONS, apply

PAYLOAD = msgspec.msgpack.encode({"to": "ada@example.com", "subject": "Hi", "body": "Welcome!"})
RESULT = msgspec.msgpack.encode({"result": "success", "sent_at": "2026-11-29T20:26:24+00:00"})


def _rows(count: int, now: float) -> Iterator[tuple[Any, ...]]:
    for n in range(count):
        done = n % 3 != 0
        yield (
            f"jobs:task-{n % 50}",
            "succeeded" if done else "pending",
            PAYLOAD,
            RESULT if done else None,
            now + n,
            now,
            now if done else None,
        )


def build(path: Path, jobs: int) -> None:
    with sqlite3.connect(path, isolation_level=None) as db:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("BEGIN")
        for migration in MIGRATIONS:
            apply(db, migration)
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")
        db.executemany(
            "INSERT INTO jobs (task, status, origin, payload, result, attempts, max_attempts,"
            " run_at, created_at, finished_at) VALUES (?, ?, 'enqueue', ?, ?, 1, 3, ?, ?, ?)",
            _rows(jobs, time.time()),
        )
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def check(path: Path, *, cold: bool) -> float:
    """Seconds one `PRAGMA quick_check` takes."""
    if cold:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # this file's pages only
        finally:
            os.close(fd)
    db = sqlite3.connect(path)
    try:
        started = time.perf_counter()
        (result,) = db.execute("PRAGMA quick_check").fetchone()
        took = time.perf_counter() - started
    finally:
        db.close()
    assert result == "ok", result
    return took


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "taskd.db"
        build(path, args.jobs)
        size = path.stat().st_size / 1e6
        for cold in (False, True):
            times = sorted(check(path, cold=cold) for _ in range(args.repeat))
            print(
                f"quick_check, {args.jobs} jobs ({size:.0f} MB), {'cold' if cold else 'warm'}:"
                f" median {times[len(times) // 2]:.2f} s"
            )


if __name__ == "__main__":
    main()
