"""What only a SQLite job store does under a real taskd: its file's lock and its disk."""

from __future__ import annotations

import json
import resource
import sqlite3

from tests.support import Taskd


def enqueue(daemon: Taskd, *args: str) -> int:
    done = daemon.ctl("enqueue", *args)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_database_locked_gives_an_error_and_the_daemon_recovers(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory(config='[sqlite]\nbusy_timeout = "300ms"\n').start()
    locker = sqlite3.connect(daemon.database, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        refused = daemon.ctl("enqueue", "echo")
        assert refused.returncode == 75, refused.stderr
        assert "database is locked" in refused.stderr
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert daemon.running
    job_id = enqueue(daemon, "echo", "--payload", '"after"')
    assert daemon.ctl("wait", str(job_id)).stdout.strip() == '"after"'
    assert len(json.loads(daemon.ctl("--json", "jobs").stdout)) == 1  # the refused one is absent
    assert daemon.stop() == 0


def test_disk_full_refuses_the_write_and_keeps_serving(taskd_factory: type[Taskd]) -> None:
    # A file-size limit on the daemon makes its database writes fail as on a full disk.
    limit = 3_000_000
    daemon = taskd_factory().start(
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    )
    big = json.dumps("x" * 400_000)
    outcomes = [
        daemon.ctl("enqueue", "echo", "--payload", "-", "--delay", "1h", input=big)
        for _ in range(10)
    ]
    accepted = [int(o.stdout) for o in outcomes if o.returncode == 0]
    refused = [o for o in outcomes if o.returncode != 0]
    assert accepted and refused
    assert all(o.returncode == 75 and "check the free space" in o.stderr for o in refused)
    assert daemon.running
    jobs = json.loads(daemon.ctl("--json", "jobs", "--payloads").stdout)
    assert sorted(job["id"] for job in jobs) == sorted(accepted)  # refused ones were not stored
    assert all(len(job["payload"]) == 400_000 for job in jobs)  # accepted ones are intact
    assert daemon.stop() == 0
