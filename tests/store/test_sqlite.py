"""What only the SQLite store does: its file, lock, pragmas, migrations and SQL limits."""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import stat
from contextlib import closing
from pathlib import Path

import msgspec
import pytest

from taskd.store import (
    ClaimRequest,
    Failure,
    JobFilter,
    NewJob,
    Outcome,
    ProgressNote,
    ScheduleState,
    SharedLimit,
    StoreError,
    store_for,
)
from taskd.store.core import flow
from taskd.store.core import reads as reads_module
from taskd.store.core.statements import Statement, run_steps
from taskd.store.rows import FINISHED_COLUMNS, Row
from taskd.store.sqlite import SqliteStore
from taskd.store.sqlite.dialect import CANDIDATES, NEXT_DUE, QUEUES, SqliteSql
from taskd.store.sqlite.schema import KEYLESS_JOBS, MIGRATIONS, TASK_INDEXES, apply
from tests.conftest import NOW
from tests.support import Clock


def new(task: str = "t") -> NewJob:
    return NewJob(task, msgspec.msgpack.encode(None), "enqueue", 3)


async def test_second_store_on_the_same_file_is_refused(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path / "jobs.db")
    await first.open()
    try:
        with pytest.raises(StoreError, match="in use by another taskd"):
            await SqliteStore(tmp_path / "jobs.db").open()
    finally:
        await first.close()


async def test_wal_and_the_configured_durability(tmp_path: Path) -> None:
    store = store_for(f"sqlite://{tmp_path}/sub/jobs.db")  # the folder is created
    await store.open()
    await store.close()
    store = SqliteStore(tmp_path / "sub" / "jobs.db", synchronous="NORMAL")
    await store.open()
    try:
        writer = store._writer
        assert writer is not None
        (mode,) = await writer.execute_fetchall("PRAGMA journal_mode")
        (synchronous,) = await writer.execute_fetchall("PRAGMA synchronous")
        (cache,) = await writer.execute_fetchall("PRAGMA cache_size")
        assert (mode[0], synchronous[0], cache[0]) == ("wal", 1, -2048)  # 1: NORMAL; KiB
        reader = store._reader
        assert reader is not None
        (cache,) = await reader.execute_fetchall("PRAGMA cache_size")
        assert cache[0] == -2048
    finally:
        await store.close()
    assert oct((tmp_path / "sub").stat().st_mode & 0o777) == oct(0o700)


async def test_corrupt_or_newer_database_is_refused_clearly(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=r"cannot open job store .*garbage\.db"):
        await SqliteStore(garbage).open()
    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as connection:
        connection.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="newer than this taskd"):
        await SqliteStore(newer).open()


async def test_a_version_1_database_is_migrated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as connection:
        for statement in MIGRATIONS[0]:
            connection.execute(statement)
        connection.execute("PRAGMA user_version = 1")
        connection.execute(
            "INSERT INTO jobs (task, status, origin, payload, max_attempts, run_at, created_at)"
            " VALUES ('t', 'pending', 'enqueue', x'c0', 3, ?, ?)",
            (NOW, NOW),
        )
        # Left running by a taskd of that version: its owner is no worker of today's.
        connection.execute(
            "INSERT INTO jobs (task, status, origin, payload, max_attempts, run_at, created_at,"
            " started_at, attempts, lease_owner, lease_expires)"
            " VALUES ('t', 'running', 'enqueue', x'c0', 3, ?, ?, ?, 1, 'host:12:abcd', ?)",
            (NOW, NOW, NOW, NOW + 3600),
        )
        connection.execute("INSERT INTO schedules (id, last_tick, paused) VALUES ('x', 5.0, 1)")
    store = SqliteStore(path, clock=Clock(NOW))
    with caplog.at_level(logging.INFO, "taskd.store"):
        await store.open()
    migrated = [r.getMessage() for r in caplog.records if "schema version" in r.getMessage()]
    assert migrated == [f"job store {path} migrated from schema version 1 to {len(MIGRATIONS)}"]
    try:
        (entry,) = await store.counts()  # the migration counted the jobs there
        assert (entry.task, entry.counts) == ("t", {"pending": 1, "running": 1})
        (recovered,) = await store.recover(3)
        assert recovered.status == "pending" and recovered.errors == []
        job = await store.get(recovered.id)
        assert job is not None and "worker host:12:abcd went away" in job.errors[0].message
        claimed = await store.claim(ClaimRequest(await store.register_node("n", 60), 5, 60))
        assert [(job.task, job.epoch) for job in claimed.jobs] == [("t", 1), ("t", 1)]
        (entry,) = await store.counts()
        assert entry.counts == {"running": 2}
        (state,) = await store.schedule_states()
        assert state == ScheduleState("x", last_tick=5.0, paused=True, covered_until=5.0)
    finally:
        await store.close()
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


async def test_the_rebuild_of_the_jobs_table_keeps_them_and_their_indexes_and_triggers(
    tmp_path: Path,
) -> None:
    """The migration that rebuilds the jobs table (KEYLESS_JOBS), on a store of the version
    before it with jobs in it: the jobs of the tasks `limit_key_paths` records no path for
    have no value now (NULL), the others keep theirs ('' included); ids, counters, indexes,
    triggers and the status CHECK stay; no write of a job's row tests its status through a
    temporary table."""
    path = tmp_path / "old.db"
    before = next(n for n, migration in enumerate(MIGRATIONS) if KEYLESS_JOBS in migration)
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        for migration in MIGRATIONS[:before]:
            apply(db, migration)
        db.execute(f"PRAGMA user_version = {before}")
        db.execute("INSERT INTO limit_key_paths (task, path) VALUES ('k', 'customer')")
        db.executemany(
            "INSERT INTO jobs (task, status, origin, payload, max_attempts, run_at, created_at,"
            " limit_key) VALUES (?, ?, 'enqueue', x'c0', 3, ?, ?, ?)",
            [(task, status, NOW, NOW, value) for task, status, value in [
                ("k", "pending", "acme"), ("k", "pending", ""), ("k", "running", "acme"),
                ("u", "pending", ""), ("u", "succeeded", ""), ("v", "pending", "stale"),
                ("u", "failed", "")]],
        )  # fmt: skip
        db.execute("DELETE FROM jobs WHERE id = 7")  # pruned: its id is not given again
        objects = "SELECT type, name FROM sqlite_master WHERE tbl_name = 'jobs' ORDER BY name"
        made = db.execute(objects).fetchall()
    store = SqliteStore(path, clock=Clock(NOW))
    await store.open()
    try:
        counts = {entry.task: entry.counts for entry in await store.counts()}
        assert counts == {"k": {"pending": 2, "running": 1}, "u": {"pending": 1, "succeeded": 1},
                          "v": {"pending": 1}}  # fmt: skip
        (inserted,) = await store.insert([new("u")])
        assert inserted.job_id == 8
        assert {entry.task: entry.counts for entry in await store.counts()}["u"]["pending"] == 2
    finally:
        await store.close()
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT id, task, limit_key FROM jobs ORDER BY id").fetchall() == [
            (1, "k", "acme"), (2, "k", ""), (3, "k", "acme"), (4, "u", None), (5, "u", None),
            (6, "v", None), (8, "u", None)]  # fmt: skip
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        # Kept, but for (task, status), which a later migration replaces (TASK_INDEXES), and
        # the running jobs' lease index, which a later one drops (jobs_task_running holds them).
        replaced = [("index", n) for n in ("jobs_task", "jobs_task_ended", "jobs_task_running")]
        dropped = [("index", "jobs_task_status"), ("index", "jobs_running_lease")]
        kept = [o for o in made if o not in dropped]
        assert db.execute(objects).fetchall() == sorted(kept + replaced, key=lambda o: o[1])
        for index in ("jobs_task_limit_key_claim", "jobs_task_limit_key_running"):
            (sql,) = db.execute("SELECT sql FROM sqlite_master WHERE name = ?", (index,)).fetchone()
            assert sql.endswith("AND limit_key IS NOT NULL"), sql
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            db.execute("UPDATE jobs SET status = 'lost' WHERE id = 1")
        db.text_factory = lambda text: text.decode(errors="replace")  # EXPLAIN's p4
        for write in (
            "INSERT INTO jobs (task, status, origin, payload, max_attempts, run_at, created_at)"
            " VALUES ('u', 'pending', 'enqueue', x'c0', 3, 0, 0)",
            "UPDATE jobs SET status = 'running', worker = 'w' WHERE id = 8",
            "UPDATE jobs SET status = 'succeeded', finished_at = 1 WHERE id = 8",
        ):
            opcodes = {row[1] for row in db.execute(f"EXPLAIN {write}")}
            assert "OpenEphemeral" not in opcodes, write


async def test_a_plain_insert_binds_its_clock_once_and_no_null(tmp_path: Path) -> None:
    """The writer binds each value of an insert (a None is offered to its adapter first):
    plain jobs (no key, parents, batch, traceparent or limit_key) bind six values each and
    the clock once; a batch holding another job binds every column, and keeps them."""
    sql = SqliteSql(NOW)
    plain = next(sql.insert([new(), new("u")]))
    assert len(plain.params) == 1 + 6 * 2
    assert None not in plain.params
    keyed = msgspec.structs.replace(new(), key="k", traceparent=f"00-{'1' * 32}-{'2' * 16}-01")
    mixed = next(sql.insert([new(), keyed]))
    assert len(mixed.params) == 1 + 11 * 2
    store = SqliteStore(tmp_path / "jobs.db", clock=lambda: NOW)
    await store.open()
    first, second = await store.insert([new(), msgspec.structs.replace(keyed, delay=5.0)])
    third, fourth = await store.insert([new("u"), new("u")])
    one, two = await store.get(first.job_id), await store.get(second.job_id)
    assert one is not None and two is not None
    assert (one.key, one.traceparent, one.run_at, one.created_at) == (None, None, NOW, NOW)
    assert (two.key, two.traceparent, two.run_at) == ("k", keyed.traceparent, NOW + 5.0)
    assert one.payload is not None and two.payload is not None
    assert bytes(one.payload) == bytes(two.payload) == msgspec.msgpack.encode(None)
    assert third.job_id + 1 == fourth.job_id and first.job_id + 1 == second.job_id
    assert [job.task for job in await store.list_jobs(JobFilter(task="u"))] == ["u", "u"]
    await store.close()
    with closing(sqlite3.connect(tmp_path / "jobs.db")) as db:  # payloads are BLOBs, as before
        assert db.execute("SELECT DISTINCT typeof(payload) FROM jobs").fetchall() == [("blob",)]


async def test_plain_jobs_are_inserted_without_returning(tmp_path: Path) -> None:
    """Plain jobs are inserted without RETURNING (sqlite3 reads each returned row back with
    the GIL let go around each column): their ids are the INSERT's last id counted back, and
    when each is due is told as RETURNING told it, to the same double."""
    sql = SqliteSql(NOW)
    assert "RETURNING" not in next(sql.insert([new(), new("u")])).sql
    keyed = msgspec.structs.replace(new(), key="k")
    assert "RETURNING" in next(sql.insert([new(), keyed])).sql
    store = SqliteStore(tmp_path / "jobs.db", clock=lambda: NOW)
    await store.open()
    due: list[float] = []
    store.events.on_due(due.append)
    (first,) = await store.insert([new()])
    later = [msgspec.structs.replace(new("u"), delay=0.1 * n) for n in range(1, 4)]
    batch = await store.insert([*later, msgspec.structs.replace(new(), run_at=NOW + 7.3)])
    assert [i.job_id for i in batch] == [first.job_id + n for n in range(1, 5)]
    assert not any(i.duplicate for i in batch)
    for inserted, job in zip(batch, [*later, None], strict=True):
        row = await store.get(inserted.job_id)
        assert row is not None
        if job is not None:
            assert (row.task, row.run_at) == ("u", NOW + job.delay)
    assert due == [0.0, (NOW + 0.1) - NOW]
    await store.close()


async def test_ids_keep_counting_after_a_reopen(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "jobs.db")
    await store.open()
    (first,) = await store.insert([new()])
    await store.close()
    store = SqliteStore(tmp_path / "jobs.db")
    await store.open()
    (second,) = await store.insert([new()])
    assert second.job_id == first.job_id + 1
    assert await store.get(first.job_id) is not None
    await store.close()


async def test_the_lock_proves_every_node_row_stale(tmp_path: Path) -> None:
    # kill -9 leaves the node's row alive for up to its ttl; the next open knows better,
    # so its jobs come back at once even if the daemon starts under another node id.
    store = SqliteStore(tmp_path / "jobs.db", clock=Clock(NOW))
    await store.open()
    worker = await store.register_node("old-name", ttl=600)
    await store.insert([new()])
    await store.claim(ClaimRequest(worker, 1, 600))
    await store.close()
    store = SqliteStore(tmp_path / "jobs.db", clock=Clock(NOW + 1))
    await store.open()
    try:
        assert await store.nodes() == []
        await store.register_node("new-name", ttl=600)
        assert len(await store.recover(3)) == 1
    finally:
        await store.close()


async def test_claims_with_more_limited_tasks_than_a_compound_select_would_hold(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "jobs.db", clock=Clock(NOW))
    await store.open()
    try:
        tasks = [f"task{n}" for n in range(600)]  # SQLite's compound SELECTs hold 500 terms
        await store.insert([new(task) for task in tasks for _ in range(2)] + [new("free")] * 3)
        limits = dict.fromkeys(tasks, 1)
        worker = await store.register_node("n", 60)
        first = await store.claim(ClaimRequest(worker, 10_000, 60, limits))
        assert sorted(job.task for job in first.jobs) == sorted([*tasks, "free", "free", "free"])
        again = await store.claim(ClaimRequest(worker, 10_000, 60, limits))
        assert again.jobs == [] and again.next_due_in is None
    finally:
        await store.close()


TABLES = ("jobs", "j", "k")  # the jobs table and its aliases in the claim's SQL


async def test_a_claim_reads_only_what_it_can_take(tmp_path: Path) -> None:
    """Delayed jobs and the backlog of a task at its limit cost a claim nothing: its plan
    searches indexes and never scans the jobs table, and it takes the right jobs."""
    store = SqliteStore(tmp_path / "jobs.db", clock=Clock(NOW))
    await store.open()
    try:
        delayed = [msgspec.structs.replace(new("later"), delay=3600.0)] * 3000
        backlog = [new("throttled")] * 3000
        await store.insert([*delayed, *backlog, new("free"), new("free")])
        worker = await store.register_node("n", 60)
        limits = {"throttled": 1}
        first = await store.claim(ClaimRequest(worker, 16, 60, limits))
        assert sorted(job.task for job in first.jobs) == ["free", "free", "throttled"]
        second = await store.claim(ClaimRequest(worker, 16, 60, limits))
        assert second.jobs == [] and second.next_due_in == pytest.approx(3600)
    finally:
        await store.close()
    db = sqlite3.connect(tmp_path / "jobs.db")
    params = {"now": NOW, "limit": 16, "limits": '{"throttled": 1}', "worker": worker,
              "quotas": '{"throttled": 0, "later": 0}',
              "lease": 60}  # fmt: skip
    for sql in (
        f"WITH RECURSIVE {QUEUES}, candidates(id) AS ({CANDIDATES}) SELECT id FROM candidates",
        f"WITH RECURSIVE {QUEUES} {NEXT_DUE}",
    ):
        plan = [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
        scans = [step for step in plan if step.split()[:2] in (["SCAN", t] for t in TABLES)]
        assert not scans, plan
        assert any("jobs_task_claim_order" in step for step in plan), plan
    db.close()


async def test_a_status_change_writes_no_task_index_and_a_task_s_reads_stay_searched(
    tmp_path: Path,
) -> None:
    """A database of the version before TASK_INDEXES, opened: its (task, status) index is
    replaced by (task), which a claim and a finish do not write, the running jobs' own (task)
    index and the ended jobs' (task, status), and every read of a task's jobs searches an
    index that holds only the jobs it wants (the room under a limit: the running ones; the
    pending checks and counts: the pending ones; a listing of ended ones: those), or reads a
    task's jobs newest first without sorting them all."""
    path = tmp_path / "old.db"
    before = MIGRATIONS.index(TASK_INDEXES)
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        for migration in MIGRATIONS[:before]:
            apply(db, migration)
        db.execute(f"PRAGMA user_version = {before}")
    store = SqliteStore(path, clock=Clock(NOW))
    await store.open()
    try:
        await store.insert([new("t"), new("t"), new("u")])
        worker = await store.register_node("n", 60)
        claimed = await store.claim(ClaimRequest(worker, 1, 60, {"t": 1}))
        assert [job.task for job in claimed.jobs] == ["t"]
        (entry,) = [entry for entry in await store.counts() if entry.task == "t"]
        assert entry.counts == {"pending": 1, "running": 1}
    finally:
        await store.close()
    db = sqlite3.connect(path)
    indexes = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"jobs_task", "jobs_task_running", "jobs_task_ended"} <= indexes
    assert "jobs_task_status" not in indexes
    sql = SqliteSql(NOW)
    limited = {"l": SharedLimit(("t", "u"), concurrency=1)}
    states = flow.limit_states(sql, limited)
    next(states)
    listed = next(reads_module.list_jobs(sql, JobFilter(task="t"))).sql
    failed = JobFilter(task="t", statuses=["failed"])
    expected = {  # each read, and the index it must search
        f"WITH RECURSIVE {QUEUES}, candidates(id) AS ({CANDIDATES}) SELECT id FROM candidates": (
            "SEARCH jobs USING INDEX jobs_task_running (task=?)"
        ),
        states.send([]).sql: "SEARCH jobs USING INDEX jobs_task_claim_order (task=?)",
        listed: "SEARCH jobs USING INDEX jobs_task (task=?)",
        next(reads_module.list_jobs(sql, failed)).sql: (
            "SEARCH jobs USING INDEX jobs_task_ended (task=? AND status=?)"
        ),
    }
    params = {"now": NOW, "limit": 16, "limits": '{"t": 1}', "quotas": "{}", "worker": worker,
              "lease": 60, "task": "t", "task_0": "t", "task_1": "u",
              "status_0": "failed"}  # fmt: skip
    for statement, search in expected.items():
        text = statement.replace("{s}.", "")
        plan = [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {text}", params)]
        assert search in plan, (statement, plan)
        if statement == listed:  # newest first off the index: no sort of all the task's jobs
            assert "USE TEMP B-TREE FOR ORDER BY" not in plan, plan
        assert not any("jobs_task_status" in step for step in plan), plan
    db.close()


async def test_a_job_s_move_is_counted_in_one_statement_and_the_counts_stay_exact(
    tmp_path: Path,
) -> None:
    """A database of the version before, opened: a move of a job (a claim, a finish) is
    counted by one statement of its trigger, not two; the counts it keeps are the jobs
    counted, through claims, finishes, a change of a job's task and a delete."""
    path = tmp_path / "old.db"
    before = len(MIGRATIONS) - 1
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        for migration in MIGRATIONS[:before]:
            apply(db, migration)
        db.execute(f"PRAGMA user_version = {before}")
        db.execute(
            "INSERT INTO jobs (task, status, origin, payload, max_attempts, run_at, created_at)"
            " VALUES ('t', 'pending', 'enqueue', x'c0', 3, 0, 0)"
        )  # counted by the trigger of the version before
    store = SqliteStore(path, clock=Clock(NOW))
    await store.open()
    try:
        await store.insert([new("t"), new("t"), new("u")])
        worker = await store.register_node("n", 60)
        claimed = await store.claim(ClaimRequest(worker, 3, 60))
        (job, *_) = claimed.jobs
        await store.finish([Outcome(job.id, job.epoch, worker, "succeeded", job=job)])
    finally:
        await store.close()
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        (trigger,) = db.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'jobs_counted_update'"
        ).fetchone()
        assert trigger.count("INSERT INTO job_counts") == 1, trigger
        db.execute("UPDATE jobs SET task = 'v' WHERE status = 'pending'")
        db.execute("UPDATE jobs SET status = 'failed', task = 'w' WHERE status = 'running'")
        db.execute("UPDATE jobs SET error = 'x'")  # no move: nothing to count
        db.execute("DELETE FROM jobs WHERE task = 'v'")
        counted = db.execute(
            "SELECT task, status, n FROM job_counts WHERE n <> 0 ORDER BY task, status"
        ).fetchall()
        jobs = db.execute(
            "SELECT task, status, count(*) FROM jobs GROUP BY task, status ORDER BY task, status"
        ).fetchall()
    assert counted == jobs
    assert sum(n for _, _, n in counted) == 3


def test_finishes_of_any_size_share_a_few_statements_each_quick_to_prepare() -> None:
    """A drain's finishes come in every size (514, 517, 522 ... outcomes): each runs
    statements of eight sizes at most, already prepared after the first drains, and the
    statements number no parameter but ?1 (SQLite codes numbered parameters in quadratic
    time: 17-25 ms to prepare 528 outcomes' 3,697). Outcomes without an error bind no
    message, and no value sqlite3 would offer its adapters first (None, bytes), padding
    included."""
    sql = SqliteSql(NOW)
    statements: list[Statement] = []

    def execute(statement: Statement) -> list[Row]:
        statements.append(statement)
        return []

    for size in range(1, 601):
        outcomes = [Outcome(n, 1, "w/1", "succeeded", result=b"\xc0") for n in range(size)]
        run_steps(sql.finish(outcomes, FINISHED_COLUMNS), execute)
    assert len({statement.sql for statement in statements}) <= 8
    for statement in statements:
        assert re.findall(r"\?\d+", statement.sql) == ["?1"] * statement.sql.count("?1")
        anonymous = statement.sql.count("?") - statement.sql.count("?1")
        assert 1 + anonymous == len(statement.params)  # ?1 and 6 an outcome, padding too
        assert not [value for value in statement.params if value is None or type(value) is bytes]
    failure = Failure("error", "boom")
    failed = [Outcome(1, 1, "w/1", "failed", error=failure), Outcome(2, 1, "w/1", "succeeded")]
    run_steps(sql.finish(failed, FINISHED_COLUMNS), execute)
    with closing(sqlite3.connect(":memory:", isolation_level=None)) as db:
        for migration in MIGRATIONS:
            apply(db, migration)
        last = statements[-2]  # 600 = 4 x 128 + 88 outcomes, padded to 128
        assert len(last.params) == 1 + 6 * 128
        assert db.execute(last.sql, last.params).fetchall() == []  # it runs, padding bound
        said = statements[-1]  # with a message: 7 an outcome, padded to 2
        assert len(said.params) == 1 + 7 * 2 and "boom" in said.params
        assert db.execute(said.sql, said.params).fetchall() == []


async def test_the_reads_of_ended_jobs_search_their_index(tmp_path: Path) -> None:
    """A prune and the Dashboard's finished jobs per minute read the ended jobs through
    their index, however many jobs are pending (SQLite takes a partial index only for a
    statement whose WHERE holds the index's term as written)."""
    store = SqliteStore(tmp_path / "jobs.db", clock=Clock(NOW))
    await store.open()
    await store.close()
    sql = SqliteSql(NOW)
    reads = [next(reads_module.finished_recently(sql, 3600, 60)), next(sql.prune("failed", 60))]
    db = sqlite3.connect(tmp_path / "jobs.db")
    for statement in reads:
        params = {**(statement.params or {}), "now": NOW}
        text = statement.sql.replace("{s}.", "")  # as the store runs it
        plan = [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {text}", params)]
        assert any("INDEX jobs_finished" in step for step in plan), (statement.sql, plan)
    db.close()


@pytest.mark.parametrize("link", ["symlink", "hard link"])
async def test_a_store_opened_through_a_link_is_refused(tmp_path: Path, link: str) -> None:
    first = SqliteStore(tmp_path / "jobs.db")
    await first.open()
    other = tmp_path / "other.db"
    if link == "symlink":
        other.symlink_to(tmp_path / "jobs.db")
    else:
        os.link(tmp_path / "jobs.db", other)
    try:
        with pytest.raises(StoreError, match=rf"in use by another taskd \(pid {os.getpid()}\)"):
            await SqliteStore(other).open()
    finally:
        await first.close()


async def test_an_emptied_store_is_refused_unless_allowed(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    store = SqliteStore(path)
    await store.open()
    await store.insert([new()])
    await store.close()
    for gone, state in ((lambda: os.truncate(path, 0), "empty"), (path.unlink, "missing")):
        gone()
        with pytest.raises(StoreError, match=f"is {state}, but taskd had created a job store"):
            await SqliteStore(path).open()
        assert path.exists() == (state == "empty")  # a refused open created no file
        store = SqliteStore(path, allow_empty=True)
        await store.open()
        assert await store.list_jobs(JobFilter()) == []
        await store.close()
    store = SqliteStore(path)
    await store.open()  # not empty any more: fine without being allowed
    await store.close()


async def test_a_new_store_is_private_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    old = os.umask(0o000)
    try:
        store = SqliteStore(path)
        await store.open()
    finally:
        os.umask(old)
    try:
        await store.insert([new()])
        for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            assert stat.S_IMODE(name.stat().st_mode) == 0o600, name
    finally:
        await store.close()


async def test_a_store_left_readable_by_others_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    store = SqliteStore(path)
    await store.open()
    await store.close()
    path.chmod(0o644)
    store = SqliteStore(path)
    await store.open()
    await store.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def _spoil_jobs_root_page(path: Path) -> None:
    with sqlite3.connect(path) as connection:
        (page_size,) = connection.execute("PRAGMA page_size").fetchone()
        (root,) = connection.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'jobs'"
        ).fetchone()
    connection.close()
    with open(path, "r+b") as file:
        file.seek((root - 1) * page_size)
        file.write(b"\xff" * page_size)


async def test_damage_met_while_open_makes_the_next_open_check_the_file(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    store = SqliteStore(path)
    await store.open()
    await store.insert([new()] * 300)
    await store.close()  # closed cleanly: the next open does not check the file
    _spoil_jobs_root_page(path)
    store = SqliteStore(path)
    await store.open()
    with pytest.raises(StoreError, match="the file is damaged"):
        await store.list_jobs(JobFilter())
    await store.close()
    reopened = SqliteStore(path)
    try:
        with pytest.raises(StoreError, match=r"is damaged \(PRAGMA quick_check: "):
            await reopened.open()
    finally:
        await reopened.close()


async def test_a_read_sees_one_snapshot_whatever_commits_between_its_statements(
    tmp_path: Path,
) -> None:
    """A job's row and its errors are two statements of one read: a finish committed between
    them must not show a running job with the error of its failed attempt."""
    from taskd.store.core.statements import Statement

    store = SqliteStore(tmp_path / "jobs.db")
    await store.open()
    try:
        (inserted,) = await store.insert([new()])

        def read(sql: object) -> object:
            before = yield Statement("SELECT priority FROM jobs WHERE id = :id", {"id": job_id})
            with closing(sqlite3.connect(tmp_path / "jobs.db")) as other:
                other.execute("UPDATE jobs SET priority = 7 WHERE id = ?", (job_id,))
                other.commit()
            after = yield Statement("SELECT priority FROM jobs WHERE id = :id", {"id": job_id})
            return before[0]["priority"], after[0]["priority"]

        job_id = inserted.job_id
        assert await store._read(read) == (0, 0)
        assert await store._read(read) == (7, 7)  # the next read sees the commit
    finally:
        await store.close()


async def test_a_claim_reads_back_half_the_columns_of_plain_jobs_and_the_others_whole(
    tmp_path: Path,
) -> None:
    """sqlite3 converts every column of every row (letting go of the GIL around each): a
    claim returns a plain job's few columns that vary, and reads the jobs that are not plain
    (a key, a parent, a trace, a retried attempt's error ...) again; both as the store has
    them."""
    store = SqliteStore(tmp_path / "jobs.db", clock=Clock(NOW))
    await store.open()
    try:
        trace = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
        (parent,) = await store.insert([new("p")])
        await store.insert([
            new(), msgspec.structs.replace(new(), key="k", priority=3),
            msgspec.structs.replace(new(), traceparent=trace),
            msgspec.structs.replace(new(), parent_id=parent.job_id, delay=-1.0),
        ])  # fmt: skip
        worker = await store.register_node("n", 60)
        claimed = await store.claim(ClaimRequest(worker, 10, 60))
        assert len(claimed.jobs) == 5
        for job in claimed.jobs:
            stored = await store.get(job.id)
            assert stored is not None
            assert job == msgspec.structs.replace(stored, errors=[], parents=[], children=[])
    finally:
        await store.close()
    with closing(sqlite3.connect(tmp_path / "jobs.db", isolation_level=None)) as db:
        db.execute("UPDATE jobs SET status = 'pending'")
        steps = SqliteSql(NOW).claim(ClaimRequest(worker, 10, 60), {})
        statement = next(steps)
        sql = statement.sql.replace("{s}.", "")
        cursor = db.execute(sql, {**statement.params, "now": NOW})
        assert len(cursor.description) <= 11, [column[0] for column in cursor.description]
        plain = [row[-1] for row in cursor.fetchall()]
        assert sorted(plain) == [0, 0, 0, 1, 1]  # the key, the trace and the parent's


async def test_a_finish_reads_back_what_the_outcomes_do_not_say_and_progress_if_any(
    tmp_path: Path,
) -> None:
    """A finish returns neither the result (the outcome's) nor the progress but whether
    there is some (read again then): the jobs as the store has them, in fewer columns."""
    store = SqliteStore(tmp_path / "jobs.db", clock=Clock(NOW))
    await store.open()
    try:
        await store.insert([new(), new(), new()])
        worker = await store.register_node("n", 60)
        jobs = (await store.claim(ClaimRequest(worker, 10, 60))).jobs
        await store.record_activity([ProgressNote(jobs[0].id, jobs[0].epoch, 40, 100, "half")], [])
        outcomes = [
            Outcome(jobs[0].id, jobs[0].epoch, worker, "succeeded", result=b"\x01", job=jobs[0]),
            Outcome(jobs[1].id, jobs[1].epoch, worker, "succeeded", result=b"\xc0", job=jobs[1]),
            Outcome(jobs[2].id, jobs[2].epoch, worker, "released", job=jobs[2]),
        ]
        finished = await store.finish(outcomes)
        assert [job.status if job else None for job in finished.jobs] == [
            "succeeded", "succeeded", "pending"]  # fmt: skip
        for job in finished.jobs:
            assert job is not None
            stored = await store.get(job.id)
            assert job == msgspec.structs.replace(stored, errors=[], parents=[], children=[])
        assert finished.jobs[0] is not None and finished.jobs[0].progress is not None
        assert finished.jobs[0].progress.message == "half"
    finally:
        await store.close()
    statements: list[Statement] = []

    def execute(statement: Statement) -> list[Row]:
        statements.append(statement)
        return []

    run_steps(SqliteSql(NOW).finish(outcomes, FINISHED_COLUMNS), execute)
    with closing(sqlite3.connect(tmp_path / "jobs.db", isolation_level=None)) as db:
        cursor = db.execute(statements[0].sql, statements[0].params)
        assert len(cursor.description) <= 11, [column[0] for column in cursor.description]
