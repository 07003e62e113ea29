"""What only a SQLite job store does under a real taskd: its file's lock, its modes, its disk,
and start-up on a database taskd cannot use."""

from __future__ import annotations

import errno
import grp
import json
import os
import resource
import sqlite3
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest

from taskctl.errors import TaskdError
from taskd.store import NewJob
from tests.support import Taskd, enqueue, wait_until


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


# -- one daemon per database file, whatever its name -------------------------------------


@pytest.mark.parametrize("link", ["symlink", "hard link"])
def test_a_second_daemon_through_a_link_is_refused_with_the_first_ones_pid(
    taskd_factory: type[Taskd], short_tmp: Path, link: str
) -> None:
    first = taskd_factory().start()
    other = short_tmp / "second"
    other.mkdir()
    second = taskd_factory(root=other)
    if link == "symlink":
        second.database.symlink_to(first.database)
    else:
        os.link(first.database, second.database)
    log = second.refused()
    assert first.process is not None
    (line,) = [line for line in log.splitlines() if "cannot start" in line]
    assert f"job store {second.database}" in line
    assert f"is in use by another taskd (pid {first.process.pid})" in line
    assert first.running and first.stop() == 0


def test_a_second_daemon_on_the_same_socket_touches_no_database(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    first = taskd_factory().start()
    other = short_tmp / "second"
    other.mkdir()
    second = taskd_factory(root=other, socket_path=first.socket)
    log = second.refused()
    assert f"another taskd is already serving {first.socket}" in log
    assert not any(path.name.startswith("taskd.db") for path in other.iterdir())
    assert first.running and first.stop() == 0


def test_a_clean_stop_leaves_no_lock_files(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory().start()
    assert daemon.stop() == 0
    assert sorted(p.name for p in daemon.root.iterdir() if p.name.endswith(".lock")) == []
    assert daemon.start().stop() == 0  # and the next start takes its locks again


# -- start-up on a database taskd cannot use ----------------------------------------------


def test_start_up_on_a_locked_database_fails_in_one_line(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory(config='[sqlite]\nbusy_timeout = "1s"\n').start()
    assert daemon.stop() == 0
    locker = sqlite3.connect(daemon.database, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        log = daemon.refused(timeout=60)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    (line,) = [line for line in log.splitlines() if "cannot start" in line]
    assert f"cannot open job store {daemon.database}: " in line
    assert "another process holds a lock on it" in line


def test_sigterm_ends_a_start_up_that_waits_for_a_lock(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory(config='[sqlite]\nbusy_timeout = "10m"\n').start()
    assert daemon.stop() == 0
    locker = sqlite3.connect(daemon.database, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        before = len(daemon.log)
        daemon.start(wait=False)
        wait_until(lambda: "opening job store" in daemon.log[before:], what="the store opening")
        assert daemon.stop(timeout=30) == 0  # not after busy_timeout's 10 minutes
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert "stop requested during start-up" in daemon.log
    assert "Traceback" not in daemon.log


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run taskd as nobody")
def test_a_read_only_database_is_refused_clearly(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    daemon = taskd_factory().start()
    assert daemon.stop() == 0
    os.chmod(short_tmp, 0o755)  # nobody may read the configuration and reach the database
    run = short_tmp / "run"
    run.mkdir(mode=0o700)
    os.chown(run, 65534, 65534)
    os.chown(daemon.database, 65534, 65534)
    os.chmod(daemon.database, 0o444)
    daemon.socket = run / "taskd.sock"
    daemon.run_as = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    log = daemon.refused()
    assert f"cannot open job store {daemon.database} for writing: Permission denied" in log
    assert "taskd runs as uid 65534 and must be able to write the file" in log


def test_an_immutable_database_is_refused_clearly(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory().start()
    assert daemon.stop() == 0
    made = subprocess.run(["chattr", "+i", str(daemon.database)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"chattr +i does not work here: {made.stderr.strip()}")
    try:
        log = daemon.refused()
    finally:
        subprocess.run(["chattr", "-i", str(daemon.database)], check=True)
    assert f"cannot open job store {daemon.database} for writing" in log
    assert f"is it immutable or append-only? (lsattr {daemon.database}" in log


# -- a damaged database -------------------------------------------------------------------


def _checks(daemon: Taskd) -> int:
    return daemon.log.count(f"checked job store {daemon.database} (PRAGMA quick_check)")


def test_a_clean_stop_spares_the_next_start_the_check(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory().start()
    enqueue(daemon, "echo", "--delay", "1h")
    assert daemon.stop() == 0
    checks = _checks(daemon)
    assert daemon.start().stop() == 0
    assert _checks(daemon) == checks
    assert f"job store {daemon.database} was closed cleanly: no PRAGMA quick_check" in daemon.log
    daemon.start()
    enqueue(daemon, "echo", "--delay", "1h")
    daemon.kill()
    daemon.start()
    assert _checks(daemon) == checks + 1  # after kill -9 the whole file is checked
    assert len(json.loads(daemon.ctl("--json", "jobs").stdout)) == 2
    assert daemon.stop() == 0


def test_a_corrupt_page_is_refused_after_an_unclean_stop(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory().start()
    assert daemon.stop() == 0
    jobs = [NewJob("echo", msgspec.msgpack.encode("x" * 500), "enqueue", 3) for _ in range(300)]
    daemon.in_store(lambda store: store.insert(jobs))
    daemon.start()
    daemon.kill()
    with sqlite3.connect(daemon.database) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every page in the file itself
        (page_size,) = connection.execute("PRAGMA page_size").fetchone()
        (root,) = connection.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'jobs'"
        ).fetchone()
    connection.close()
    with open(daemon.database, "r+b") as file:
        file.seek((root - 1) * page_size)
        file.write(b"\xff" * page_size)
    log = daemon.refused()
    (line,) = [line for line in log.splitlines() if "cannot start" in line]
    assert f"job store {daemon.database} is damaged (PRAGMA quick_check:" in line
    assert "restore a backup or recover what is readable" in line


def test_waiting_callers_get_store_error_while_claims_keep_failing(
    taskd_factory: type[Taskd],
) -> None:
    daemon = taskd_factory(config='[sqlite]\nbusy_timeout = "200ms"\n').start()
    job_id = enqueue(daemon, "echo", "--payload", '"later"', "--delay", "2s")
    locker = sqlite3.connect(daemon.database, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # readers go on (WAL); every write, claims too, fails
    try:
        waited = daemon.ctl("wait", str(job_id), timeout=120)
        assert waited.returncode == 75, waited.stderr
        assert f"job {job_id} has not started: taskd cannot start queued jobs" in waited.stderr
        assert f"taskctl wait {job_id}" in waited.stderr
        failing = json.loads(daemon.ctl("--json", "status").stdout)["store_failing"]
        assert "claim" in failing["operations"]
        assert "another process holds a lock" in failing["error"]
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert daemon.ctl("wait", str(job_id)).stdout.strip() == '"later"'  # it stayed queued
    assert "callers waiting for jobs were told that claims fail" in daemon.log
    assert daemon.stop() == 0


# -- private files ------------------------------------------------------------------------


def _modes(database: Path) -> dict[str, tuple[int, int]]:
    files = [database, Path(f"{database}-wal"), Path(f"{database}-shm")]
    return {f.name: (stat.S_IMODE(f.stat().st_mode), f.stat().st_gid) for f in files}


def test_database_files_are_private_whatever_the_umask(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory().start(preexec_fn=lambda: os.umask(0o022))
    enqueue(daemon, "echo")  # the -wal and -shm files exist while taskd runs
    modes = _modes(daemon.database)
    assert all(mode == 0o600 for mode, _ in modes.values()), modes
    assert daemon.stop() == 0


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give files any group")
def test_database_files_can_be_readable_by_a_group(taskd_factory: type[Taskd]) -> None:
    group = grp.getgrgid(65534).gr_name
    daemon = taskd_factory(config=f'[sqlite]\ngroup = "{group}"\n')
    daemon.start(preexec_fn=lambda: os.umask(0o022))
    enqueue(daemon, "echo")
    assert set(_modes(daemon.database).values()) == {(0o640, 65534)}
    assert daemon.stop() == 0


# -- a database that is gone --------------------------------------------------------------


def test_an_emptied_database_is_refused_unless_allowed(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory().start()
    enqueue(daemon, "echo", "--delay", "1h")
    assert daemon.stop() == 0
    os.truncate(daemon.database, 0)
    log = daemon.refused()
    (line,) = [line for line in log.splitlines() if "cannot start" in line]
    assert f"job store {daemon.database} is empty, but taskd had created a job store" in line
    assert "start taskd once with --allow-empty-store" in line
    daemon.extra_args = ["--allow-empty-store"]
    daemon.start()
    assert json.loads(daemon.ctl("--json", "jobs").stdout) == []
    assert "starting with an empty store, as --allow-empty-store asks" in daemon.log
    assert daemon.stop() == 0
    daemon.extra_args = []
    assert daemon.start().stop() == 0  # the new store is the one taskd created now


def test_a_database_removed_with_rm_glob_is_refused_unless_allowed(
    taskd_factory: type[Taskd],
) -> None:
    daemon = taskd_factory().start()
    enqueue(daemon, "echo", "--delay", "1h")
    assert daemon.stop() == 0
    removed = subprocess.run(["sh", "-c", 'rm -v -- "$0"*', str(daemon.database)], text=True,
                             capture_output=True, check=True)  # fmt: skip
    assert f"{daemon.database}'" in removed.stdout  # `rm taskd.db*` took the database itself
    log = daemon.refused()
    (line,) = [line for line in log.splitlines() if "cannot start" in line]
    assert f"job store {daemon.database} is missing, but taskd had created a job store" in line
    assert "start taskd once with --allow-empty-store" in line
    assert not daemon.database.exists()  # the refused start created no empty file
    daemon.extra_args = ["--allow-empty-store"]
    daemon.start()
    assert json.loads(daemon.ctl("--json", "jobs").stdout) == []
    assert "starting with an empty store, as --allow-empty-store asks" in daemon.log
    assert daemon.stop() == 0
    daemon.extra_args = []
    assert daemon.start().stop() == 0  # the new store is the one taskd created now


def test_the_marker_where_earlier_versions_kept_it_is_honoured(
    taskd_factory: type[Taskd],
) -> None:
    daemon = taskd_factory().start()
    assert daemon.stop() == 0
    marker, old = daemon.root / ".taskd.db.created", daemon.root / "taskd.db.created"
    os.replace(marker, old)
    os.truncate(daemon.database, 0)
    assert f"(or remove {old})" in daemon.refused()
    daemon.extra_args = ["--allow-empty-store"]
    assert daemon.start().stop() == 0
    assert marker.exists() and not old.exists()


# -- a full disk --------------------------------------------------------------------------


@pytest.fixture
def tmpfs(short_tmp: Path) -> Iterator[Callable[[str], Path]]:
    """Mount a tmpfs of the size asked (`"2m"`) for the test (root only)."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        folder = short_tmp / f"disk{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(folder)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


@pytest.fixture
def small_disk(tmpfs: Callable[[str], Path]) -> Path:
    """A 16 MiB tmpfs."""
    return tmpfs("16m")


def _fill(path: Path) -> None:
    """Write to `path` until the file system is full."""
    chunk = b"\0" * 65536
    with open(path, "wb", buffering=0) as file:
        try:
            while True:
                file.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        try:
            while True:  # the last few bytes
                file.write(b"\0" * 512)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def test_a_full_disk_is_reported_and_its_space_comes_back(
    taskd_factory: type[Taskd], small_disk: Path
) -> None:
    daemon = taskd_factory()
    daemon.database = small_disk / "taskd.db"
    daemon.start()
    wal = Path(f"{daemon.database}-wal")
    filler = small_disk / "filler"
    _fill(filler)
    big = json.dumps("x" * 300_000)
    for _ in range(20):  # a write may still fit in space the WAL had grown to before
        refused = daemon.ctl("enqueue", "echo", "--payload", "-", "--delay", "1h", input=big)
        if refused.returncode != 0:
            break
    assert refused.returncode == 75 and "check the free space" in refused.stderr, refused.stderr
    status = daemon.ctl("status").stdout
    assert "WARNING:   writes to the job store fail since" in status and "insert" in status
    assert "writes to the job store are failing (" in daemon.log
    full = wal.stat().st_size

    filler.unlink()
    enqueue(daemon, "echo", "--payload", "-", "--delay", "1h", input=big)
    wait_until(lambda: wal.stat().st_size < full, what="the WAL to shrink")
    assert json.loads(daemon.ctl("--json", "status").stdout)["store_failing"] is None
    assert f"writes to job store {daemon.database} go through again" in daemon.log
    assert daemon.stop() == 0


def _enqueue_until_refused(daemon: Taskd) -> tuple[int, str]:
    """Enqueue email-sized jobs until one is refused: how many were accepted, and why not."""
    payload = {"to": "ada@example.com", "subject": "Hi", "body": "Welcome!"}
    accepted = 0
    with daemon.client() as client:
        while True:
            try:
                client.enqueue("echo", payload, delay="1h")
            except TaskdError as exc:
                return accepted, str(exc)
            accepted += 1


def test_freed_space_goes_to_the_database_first(
    taskd_factory: type[Taskd], tmpfs: Callable[[str], Path]
) -> None:
    disk = tmpfs("2m")
    freed, spare = disk / "freed", disk / "spare"
    freed.write_bytes(b"\0" * 512 * 1024)
    spare.write_bytes(b"\0" * 128 * 1024)
    daemon = taskd_factory()
    daemon.database = disk / "taskd.db"
    daemon.start()
    before, refusal = _enqueue_until_refused(daemon)
    assert "check the free space" in refusal and "carries on by itself" in refusal, refusal
    freed.unlink()
    after, _ = _enqueue_until_refused(daemon)
    assert daemon.stop() == 0
    assert not Path(f"{daemon.database}-wal").exists()  # the clean stop gave the WAL back
    # What 512 KiB holds at the size a job takes in the database (pages, indexes and all).
    per_job = daemon.database.stat().st_size / (before + after)
    assert after >= 512 * 1024 / per_job, (before, after, per_job)
    spare.unlink()
    daemon.start()  # and every job accepted is there
    assert json.loads(daemon.ctl("--json", "status").stdout)["counts"]["pending"] == before + after
    assert daemon.stop() == 0


def test_a_start_refused_on_a_full_disk_leaves_no_empty_database(
    taskd_factory: type[Taskd], tmpfs: Callable[[str], Path]
) -> None:
    disk = tmpfs("1m")
    _fill(disk / "filler")
    daemon = taskd_factory()
    daemon.database = disk / "taskd.db"
    (line,) = [line for line in daemon.refused().splitlines() if "cannot start" in line]
    assert "carries on by itself" not in line, line
    assert sorted(path.name for path in disk.iterdir()) == ["filler"]


def test_a_wal_left_by_kill_on_a_small_disk_is_given_back_at_start(
    taskd_factory: type[Taskd], tmpfs: Callable[[str], Path]
) -> None:
    daemon = taskd_factory()
    daemon.database = tmpfs("4m") / "taskd.db"
    daemon.start()
    wal = Path(f"{daemon.database}-wal")
    with daemon.client() as client:
        while wal.stat().st_size < 1 << 20:
            client.enqueue("echo", "x" * 1000, delay="1h")
    daemon.kill()
    left = wal.stat().st_size
    daemon.start()
    assert f"checkpointed {wal}: {left} bytes given back" in daemon.log
    assert daemon.stop() == 0
