"""Flow control through the real interfaces: a paused task (taskctl, the clients, HTTP),
on a real daemon and its SQLite file; shared limits on a daemon of each store; the
PostgreSQL cluster cases are in test_postgres_cluster.py."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.backends import BACKENDS, drop_schema, postgres_url, unique_schema
from tests.e2e.test_metrics import scrape, value
from tests.http_support import READONLY_TOKEN, HttpClient, http_config
from tests.support import Gate, Taskd, enqueue, job_ids_in, wait_until


def ctl_json(daemon: Taskd, *args: str) -> object:
    done = daemon.ctl(*args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_paused_task_queues_jobs_that_start_once_resumed_even_after_a_restart(
    taskd_factory: type[Taskd],
) -> None:
    daemon = taskd_factory().start()
    paused = daemon.ctl("pause", "echo")
    assert paused.returncode == 0 and "task echo is paused since" in paused.stdout, paused
    assert "already paused" in daemon.ctl("pause", "echo").stdout
    job_id = enqueue(daemon, "echo", "--payload", '{"n": 1}')
    why = ctl_json(daemon, "why", str(job_id))
    assert isinstance(why, dict) and why["reason"] == "task_paused", why
    assert why["message"].startswith(f"job {job_id} (echo) waits: task echo is paused (since ")
    assert "paused since" in daemon.ctl("list").stdout
    assert "paused:    echo (since" in daemon.ctl("status").stdout
    status = ctl_json(daemon, "status")
    assert isinstance(status, dict) and list(status["paused_tasks"]) == ["echo"]
    # The pause is in the store: a restart keeps it, and the job still waits.
    assert daemon.stop() == 0
    daemon.start()
    with daemon.client() as client:
        assert client.job(job_id).status == "pending"
        assert client.why(job_id).reason == "task_paused"
        listed = {task.name: task.paused_since for task in client.list_tasks()}
        assert listed["echo"] is not None and listed["slow"] is None
        assert client.resume_task("echo").changed
        assert client.wait(job_id, timeout=30).status == "succeeded"
        assert not client.resume_task("echo").changed
    assert "was not paused" in daemon.ctl("resume", "echo").stdout
    assert daemon.stop() == 0


def test_taskctl_run_of_a_paused_task_says_so_and_waits(taskd: Taskd, short_tmp: Path) -> None:
    with taskd.client() as client:
        client.pause_task("echo")
    stderr = short_tmp / "run.err"
    with stderr.open("w") as errors:
        run = subprocess.Popen(
            [*taskd.ctl_command(), "run", "echo", "--payload", '"hi"'],
            stdout=subprocess.PIPE, stderr=errors, text=True,
        )  # fmt: skip
        wait_until(lambda: "is paused" in stderr.read_text(), what="the run saying so")
        assert run.poll() is None  # it waits
        assert "waits: task echo is paused (since" in stderr.read_text()
        assert taskd.ctl("resume", "echo").returncode == 0
        out, _ = run.communicate(timeout=30)
    assert run.returncode == 0 and out.strip() == '"hi"'


def test_a_detached_run_says_what_holds_its_job(taskd: Taskd) -> None:
    # In its reply: taskctl run needs no `why` to say it.
    with taskd.client() as client:
        client.pause_task("echo")
        held = client.run_job("echo", "held", detach=True)
        assert held.job.status == "pending"
        assert held.held is not None and "waits: task echo is paused (since" in held.held
        client.resume_task("echo")
        assert client.wait(held.job.id, 30).status == "succeeded"
        started = client.run_job("echo", "free", detach=True)
        assert started.job.status == "running" and started.held is None


def test_unknown_tasks_are_refused_with_the_closest_name(taskd: Taskd) -> None:
    refused = taskd.ctl("pause", "ecko")
    assert refused.returncode != 0 and "did you mean" in refused.stderr and "echo" in refused.stderr


def test_pause_and_resume_over_http_need_a_full_token(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory(config=http_config()).start()
    api = HttpClient.of(daemon)
    reply = api.post("/tasks/echo/pause")
    assert reply.status == 200 and reply.json()["changed"] and reply.json()["since"]
    job_id = enqueue(daemon, "echo")
    with daemon.client() as client:
        assert client.why(job_id).reason == "task_paused"
    readonly = HttpClient.of(daemon, token=READONLY_TOKEN).post("/tasks/echo/resume")
    assert readonly.status == 403, readonly
    assert api.post("/tasks/nope/pause").status == 404
    assert api.post("/tasks/echo/resume").json() == {"task": "echo", "since": None,
                                                    "changed": True}  # fmt: skip
    with daemon.client() as client:
        assert client.wait(job_id, timeout=30).status == "succeeded"
    assert daemon.stop() == 0


async def test_the_async_client_pauses_and_resumes(taskd: Taskd) -> None:
    from taskctl import AsyncClient

    async with AsyncClient(str(taskd.socket)) as client:
        paused = await client.pause_task("echo")
        assert paused.changed and paused.since is not None
        resumed = await client.resume_task("echo")
        assert resumed.changed and resumed.since is None


def test_a_rate_limit_spaces_starts_and_why_says_when_the_next_may_start(
    taskd_factory: type[Taskd],
) -> None:
    daemon = taskd_factory(config='workers = 8\n[task."echo"]\nrate_limit = "5/s"\n').start()
    with daemon.client() as client:
        assert {t.name: t.rate_limit for t in client.list_tasks()}["echo"] == "5/s"
        ids = [client.enqueue("echo", {"n": n}).job_id for n in range(10)]
        held = client.why(ids[-1])
        assert held.reason == "rate_limit", held
        assert held.message.startswith(f"job {ids[-1]} (echo) waits for its rate limit (5/s): "
                                       "next start at ")  # fmt: skip
        assert held.until is not None and held.until > time.time()
        jobs = [client.wait(job_id, timeout=30) for job_id in ids]
    starts = sorted(job.started_at or 0.0 for job in jobs)  # the store's clock
    # At most the limit and its burst of one in any second; the daemon wakes in time.
    assert max(sum(start <= s < start + 1 for s in starts) for start in starts) <= 5 + 1
    assert starts[-1] - starts[0] < 8 * 0.2 * 1.1 + 0.1, starts
    human = daemon.ctl("why", str(ids[0]))
    assert human.returncode == 0
    assert daemon.stop() == 0


def test_a_rate_limit_holds_across_a_restart(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory(config='[task."echo"]\nrate_limit = "1/h"\n').start()
    with daemon.client() as client:
        assert client.run("echo", "first") == "first"
        job_id = client.enqueue("echo", "second").job_id
    assert daemon.stop() == 0
    daemon.start()
    with daemon.client() as client:
        why = client.why(job_id)
        assert why.reason == "rate_limit" and why.until is not None, why
        assert 3500 < why.until - time.time() <= 3600
        assert client.job(job_id).status == "pending"
    assert daemon.stop() == 0


def test_a_bad_rate_limit_is_refused_with_what_to_write(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory(config='[task."echo"]\nrate_limit = "ten a second"\n')
    done = subprocess.run(daemon.command(), capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "invalid rate limit 'ten a second'" in done.stderr and "10/s" in done.stderr
    daemon = taskd_factory(config='[task."echo"]\nrate_limt = "10/s"\n')
    done = subprocess.run(daemon.command(), capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and 'did you mean "rate_limit"' in done.stderr, done.stderr


def test_a_uniqueness_window_outlives_its_job_across_a_restart(
    taskd_factory: type[Taskd],
) -> None:
    daemon = taskd_factory(config=http_config()).start()
    first = enqueue(daemon, "echo", "--key", "ada", "--unique-for", "10m")
    with daemon.client() as client:
        assert client.wait(first, timeout=30).status == "succeeded"
    again = daemon.ctl("enqueue", "echo", "--key", "ada", "--unique-for", "10m")
    assert again.returncode == 0 and int(again.stdout) == first
    assert "created within its uniqueness window" in again.stderr
    reply = HttpClient.of(daemon).post("/jobs", {"task": "echo", "key": "ada", "unique_for": 600})
    assert reply.status == 200 and reply.json() == {"job_id": first, "duplicate": True}, reply
    keyless = HttpClient.of(daemon).post("/jobs", {"task": "echo", "unique_for": 600})
    assert keyless.status == 400 and "give a key" in keyless.error["message"], keyless
    assert daemon.stop() == 0
    daemon.start()
    with daemon.client() as client:
        duplicate = client.enqueue("echo", key="ada", unique_for="10m")
        assert duplicate.job_id == first and duplicate.duplicate
        fresh = client.enqueue("echo", key="ada")  # no window: its job has finished
        assert fresh.job_id != first and not fresh.duplicate
    assert daemon.stop() == 0


def test_a_task_default_window_applies_to_enqueues_with_a_key(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory(config='[task."echo"]\nunique_for = "1h"\n').start()
    with daemon.client() as client:
        first = client.enqueue("echo", key="k").job_id
        client.wait(first, timeout=30)
        assert client.enqueue("echo", key="k").job_id == first
        assert not client.enqueue("echo", key="other").duplicate
    assert daemon.stop() == 0


def test_concurrency_modes_decide_which_runs_share_an_execution(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    config = '[task."slow"]\nsingle_flight = "payload"\n[task."echo"]\nsingle_flight = "none"\n'
    daemon = taskd_factory(config=config).start()
    long = {"seconds": 60, "started": str(short_tmp / "s.txt")}
    with daemon.client() as client:
        modes = {task.name: task.single_flight for task in client.list_tasks()}
        assert (modes["slow"], modes["echo"], modes["work"]) == ("payload", "none", "task")
        first = client.run_job("slow", long, detach=True)
        # Equal payloads (whatever the order of their keys) share one execution.
        same = client.run_job("slow", dict(reversed(list(long.items()))), detach=True)
        other = client.run_job("slow", {**long, "seconds": 61}, detach=True)
        assert same.joined and same.job.id == first.job.id
        assert not other.joined and other.job.id != first.job.id
        # "none": every run is its own job, even with the same payload.
        one, two = (client.run_job("echo", "x", detach=True) for _ in range(2))
        assert not two.joined and one.job.id != two.job.id
        for job_id in (first.job.id, other.job.id):
            client.cancel(job_id)
    assert daemon.stop() == 0


def test_an_unknown_concurrency_mode_is_refused(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory(config='[task."slow"]\nsingle_flight = "key"\n')
    done = subprocess.run(daemon.command(), capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and '"task", "payload", "none"' in done.stderr, done.stderr


def test_a_debounced_burst_runs_once_with_the_last_payload(taskd: Taskd) -> None:
    ids = [
        enqueue(taskd, "echo", "--key", "k", "--debounce", "1s", "--payload", json.dumps(n))
        for n in range(5)
    ]
    assert len(set(ids)) == 1
    with taskd.client() as client:
        job = client.wait(ids[0], timeout=30)
        assert job.status == "succeeded" and job.result == 4
        assert job.started_at is not None and job.started_at >= job.created_at + 1
        assert [j.id for j in client.jobs(task="echo")] == [ids[0]]
        # The clients take the same options; a debounce needs a key.
        again = client.enqueue("echo", 5, key="k2", debounce="1s", max_wait="2s")
        assert client.enqueue("echo", 6, key="k2", debounce=1.0).job_id == again.job_id
        assert client.wait(again.job_id, timeout=30).result == 6
    refused = taskd.ctl("enqueue", "echo", "--debounce", "1s")
    assert refused.returncode != 0 and "give a key" in refused.stderr


def test_200_jobs_at_50_per_second_on_one_daemon_keep_the_rate(
    taskd_factory: type[Taskd],
) -> None:
    """The issue's accuracy measure: no second holds more than the limit plus its burst (3
    at 50/s), and the whole takes at most 10% longer than 200/50 s."""
    from taskctl import enqueue_params

    daemon = taskd_factory(config='[task."echo"]\nrate_limit = "50/s"\n').start()
    with daemon.client() as client:
        ids = [r.job_id for r in client.enqueue_many([enqueue_params("echo")] * 200)]
        jobs = [client.wait(job_id, timeout=60) for job_id in ids]
    starts = sorted(job.started_at or 0.0 for job in jobs)
    busiest = max(sum(start <= s < start + 1 for s in starts) for start in starts)
    took = starts[-1] - starts[0]
    print(f"1 daemon, 200 jobs at 50/s: busiest second {busiest}, first to last start {took:.3f}s")
    assert busiest <= 50 + 3  # the limit and its burst (README: "Rate limits")
    assert took <= 200 / 50 * 1.1
    assert daemon.stop() == 0


# -- shared limits, on each store ----------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def on_store(
    request: pytest.FixtureRequest, taskd_factory: type[Taskd]
) -> Iterator[Callable[[str], Taskd]]:
    """Make a taskd with these configuration tables on SQLite, or on PostgreSQL (a schema
    of its own, dropped at the end)."""
    schemas: list[str] = []

    def make(tables: str) -> Taskd:
        if request.param == "sqlite":
            return taskd_factory(config=tables)
        schemas.append(unique_schema())
        daemon = taskd_factory(config=f'{tables}\n[postgres]\nschema = "{schemas[-1]}"\n')
        daemon.database = postgres_url()  # type: ignore[assignment]
        return daemon

    yield make
    for schema in schemas:
        asyncio.run(drop_schema(postgres_url(), schema))


SHARED = """
[limits.stripe]
concurrency = 1
[task."slow"]
limits = ["stripe"]
[task."echo"]
limits = ["stripe"]
"""


def test_a_shared_concurrency_limit_holds_the_jobs_of_all_its_tasks(
    on_store: Callable[[str], Taskd], short_tmp: Path
) -> None:
    daemon = on_store("workers = 4\n" + SHARED).start()
    release = short_tmp / "release"
    os.mkfifo(release)
    started = short_tmp / "started"
    running = enqueue(
        daemon,
        "slow",
        "--payload",
        json.dumps({"until": str(release), "started": str(started), "seconds": 0}),
    )
    wait_until(lambda: started.exists(), what="the slow job running")  # fmt: skip
    held = enqueue(daemon, "echo", "--payload", '"after"')
    why = ctl_json(daemon, "why", str(held))
    assert isinstance(why, dict) and why["reason"] == "shared_limit", why
    assert why["message"] == (
        f"job {held} (echo) waits for shared limit stripe (concurrency 1, 1 running)"
    )
    assert (
        "waits for shared limit stripe (concurrency 1, 1 running)"
        in daemon.ctl("why", str(held)).stdout
    )
    shown = daemon.ctl("status").stdout
    assert "limits:    stripe (echo, slow): 1 of 1 running, 1 waiting" in shown, shown
    status = ctl_json(daemon, "status")
    assert isinstance(status, dict)
    assert status["limits"] == [{"name": "stripe", "tasks": ["echo", "slow"], "running": 1,
                                 "waiting": 1, "concurrency": 1, "rate": None,
                                 "next_start": None}]  # fmt: skip
    metrics = scrape(daemon)
    assert value(metrics, "taskd_limit_waiting_jobs", limit="stripe") == 1
    assert value(metrics, "taskd_limit_running_jobs", limit="stripe") == 1
    listed = {task["name"]: task["limits"] for task in ctl_json(daemon, "list")}  # type: ignore[union-attr]
    assert listed["echo"] == ["stripe"] and listed["work"] == []
    with daemon.client() as client:
        assert client.job(held).status == "pending"
        with open(release, "w") as gate:
            gate.write("go")
        first, second = client.wait(running, timeout=30), client.wait(held, timeout=30)
    assert first.finished_at is not None and second.started_at is not None
    assert second.started_at >= first.finished_at  # never both at once
    assert daemon.stop() == 0


def test_a_shared_rate_limit_holds_across_a_restart(on_store: Callable[[str], Taskd]) -> None:
    tables = '[limits.api]\nrate = "1/h"\n[task."echo"]\nlimits = ["api"]\n'
    daemon = on_store(tables + '[task."work"]\nlimits = ["api"]\n').start()
    with daemon.client() as client:
        assert client.run("echo", "first") == "first"
        job_id = client.enqueue("work", {}).job_id  # another task of the same limit
    assert daemon.stop() == 0
    daemon.start()
    with daemon.client() as client:
        why = client.why(job_id)
        assert why.reason == "shared_limit" and why.until is not None, why
        assert why.message.startswith(f"job {job_id} (work) waits for shared limit api (1/h): "
                                      "next start at ")  # fmt: skip
        assert 3500 < why.until - time.time() <= 3600
        assert client.job(job_id).status == "pending"
    shown = daemon.ctl("status").stdout
    assert "limits:    api (echo, work): 0 running, 1/h next start at " in shown, shown
    assert daemon.stop() == 0


# -- nothing waiting on a limit is lost or run twice under kill -9, on each store ------------


@dataclass(frozen=True)
class HeldBack:
    """Jobs that wait on a limit: its tables, the jobs (task, payload fields), how many it
    lets run at once (None for a rate, which lets more through as time goes by), and the
    reason `why` gives for the jobs it holds."""

    tables: str
    jobs: list[tuple[str, dict[str, str]]]
    room: int | None
    reason: str


HELD_BACK = {
    "rate": HeldBack('[task."slow"]\nrate_limit = "2/s"\n', [("slow", {})] * 12, None,
                     "rate_limit"),
    "shared": HeldBack(  # two tasks, one budget
        '[limits.api]\nconcurrency = 2\n[task."slow"]\nlimits = ["api"]\n'
        '[task."work"]\nlimits = ["api"]\n',
        [("slow", {}), ("work", {})] * 6, 2, "shared_limit",
    ),
    "per-key": HeldBack(  # four customers, one of them with a backlog
        '[task."slow"]\nlimit_key = "customer"\nconcurrency = 1\n',
        [("slow", {"customer": c}) for c in "abc" * 2] + [("slow", {"customer": "big"})] * 8,
        4, "concurrency_limit",
    ),
}  # fmt: skip


@pytest.mark.parametrize("limit", HELD_BACK)
def test_nothing_waiting_on_a_limit_is_lost_or_run_twice_under_kill_9(
    on_store: Callable[[str], Taskd], short_tmp: Path, limit: str
) -> None:
    """taskd is killed while the jobs the limit let through wait at a gate (none has ended,
    so none may end twice) and the others wait on the limit; after the restart the limit
    holds again, and once the gate opens every job ends once. Only the attempts the kill
    interrupted run again."""
    case = HELD_BACK[limit]
    gate, started, record = Gate(short_tmp / "gate"), short_tmp / "started", short_tmp / "record"
    # slow records its end in "record", work in "log"
    files = {"gate": str(gate), "started": str(started), "record": str(record),
             "log": str(record), "seconds": 0}  # fmt: skip
    daemon = on_store("workers = 16\n" + case.tables).start()
    with daemon.client() as client:
        ids = [client.enqueue(task, {**files, **fields}).job_id for task, fields in case.jobs]
    first_room = case.room or 3
    wait_until(lambda: len(job_ids_in(started)) >= first_room, timeout=60, what="jobs at the gate")
    daemon.kill()
    interrupted_starts = set(job_ids_in(started))
    if case.room is not None:
        assert len(interrupted_starts) == case.room  # the limit held them back
    daemon.start()
    # The interrupted attempts run again, and the limit holds back the others as before.
    again = len(interrupted_starts) + (case.room or 1)
    wait_until(lambda: len(job_ids_in(started)) >= again, timeout=60, what="jobs at the gate again")
    with daemon.client() as client:
        pending = client.jobs(status=["pending"], limit=100)
        assert pending, "the limit held nothing back"
        last = max(pending, key=lambda job: (job.run_at, job.id))  # the last to start
        # (Between a rate's next start and the claim that takes it, a moment, every job the
        # rate holds is due: ask again.)
        wait_until(
            lambda: client.why(last.id).reason == case.reason, timeout=30, what="why's reason"
        )
        gate.open()
        jobs = [client.wait(job_id, timeout=120) for job_id in ids]
        jobs = [client.job(job.id) for job in jobs]  # with their attempts' errors
    assert {job.status for job in jobs} == {"succeeded"}
    assert Counter(job_ids_in(record)) == Counter(ids)  # each ran to its end, and once
    interrupted = {job.id for job in jobs if job.attempts > 1}
    assert interrupted_starts <= interrupted  # (a rate may have started one more unseen)
    if case.room is not None:
        assert interrupted == interrupted_starts
    for job in jobs:
        expected = ["interrupted"] if job.id in interrupted else []
        assert ([error.kind for error in job.errors], job.attempts) == (
            expected,
            len(expected) + 1,
        ), job
    assert daemon.stop() == 0


def test_a_task_naming_an_unknown_shared_limit_is_refused_with_the_closest_name(
    taskd_factory: type[Taskd],
) -> None:
    daemon = taskd_factory(config='[limits.stripe]\nrate = "25/s"\n[task."echo"]\n'
                                  'limits = ["strpe"]\n')  # fmt: skip
    done = subprocess.run(daemon.command(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 78, done.stderr
    assert "task echo: limits names 'strpe'" in done.stderr
    assert 'did you mean "stripe"?' in done.stderr
    empty = taskd_factory(config="[limits.stripe]\n")
    done = subprocess.run(empty.command(), capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "give rate" in done.stderr, done.stderr


# -- per-key limits and fairness, on each store ----------------------------------------------


def test_a_keyed_concurrency_limit_holds_one_key_and_lets_the_others_run(
    on_store: Callable[[str], Taskd], short_tmp: Path
) -> None:
    tables = '[task."slow"]\nlimit_key = "order.customer"\nconcurrency = 1\n'
    daemon = on_store("workers = 4\n" + tables).start()
    release, started = short_tmp / "release", short_tmp / "started"
    os.mkfifo(release)

    def slow(customer: str | None, **more: object) -> str:
        order = {} if customer is None else {"order": {"customer": customer}}
        return json.dumps({"seconds": 0, **order, **more})

    first = enqueue(daemon, "slow", "--payload",
                    slow("acme", until=str(release), started=str(started)))  # fmt: skip
    wait_until(lambda: started.exists(), what="acme's first job running")
    second = enqueue(daemon, "slow", "--payload", slow("acme"))
    why = ctl_json(daemon, "why", str(second))
    assert isinstance(why, dict) and why["reason"] == "concurrency_limit", why
    assert why["message"] == (
        f"job {second} (slow) waits for its task's concurrency limit (1 per order.customer"
        " 'acme'): 1 job of slow with order.customer 'acme' running"
    )
    listed = {task["name"]: task["limit_key"] for task in ctl_json(daemon, "list")}  # type: ignore[union-attr]
    assert listed["slow"] == "order.customer" and listed["echo"] is None
    shown = daemon.ctl("status").stdout
    assert "per key:   slow by order.customer: 1 value running, 1 value waiting" in shown, shown
    metrics = scrape(daemon)
    assert value(metrics, "taskd_limit_key_values", task="slow", state="waiting") == 1
    assert value(metrics, "taskd_limit_key_values", task="slow", state="running") == 1
    with daemon.client() as client:
        # Another customer, and a payload without the field (the empty key): not held.
        others = [enqueue(daemon, "slow", "--payload", slow(c)) for c in ("globex", None)]
        assert {client.wait(job_id, timeout=30).status for job_id in others} == {"succeeded"}
        assert client.job(second).status == "pending"
        with open(release, "w") as gate:
            gate.write("go")
        done = client.wait(first, timeout=30), client.wait(second, timeout=30)
    assert done[0].finished_at is not None and done[1].started_at is not None
    assert done[1].started_at >= done[0].finished_at
    assert daemon.stop() == 0


def test_a_keyed_rate_limit_holds_one_key_across_a_restart(
    on_store: Callable[[str], Taskd],
) -> None:
    daemon = on_store('[task."echo"]\nlimit_key = "customer"\nrate_limit = "1/h"\n').start()
    with daemon.client() as client:
        assert client.run("echo", {"customer": "acme", "n": 1})["n"] == 1
        held = client.enqueue("echo", {"customer": "acme", "n": 2}).job_id
        # Another customer's job is not held by acme's limit.
        assert client.run("echo", {"customer": "globex"})["customer"] == "globex"
    assert daemon.stop() == 0
    daemon.start()
    with daemon.client() as client:
        why = client.why(held)
        assert why.reason == "rate_limit" and why.until is not None, why
        assert why.message.startswith(
            f"job {held} (echo) waits for its rate limit (1/h per customer 'acme'): next start at "
        )
        assert 3500 < why.until - time.time() <= 3600
        assert client.job(held).status == "pending"
        assert client.run("echo", {"customer": "initech"})["customer"] == "initech"
    assert daemon.stop() == 0


def test_fair_turns_a_big_backlog_of_one_key_does_not_hold_the_others(
    on_store: Callable[[str], Taskd],
) -> None:
    """One customer's 2,000 jobs, then one job each of five others: with one worker, the
    five start within the next few starts, not after the 2,000."""
    from taskctl import enqueue_params

    daemon = on_store('workers = 1\n[task."echo"]\nlimit_key = "customer"\n').start()
    with daemon.client() as client:
        client.pause_task("echo")
        backlog = [enqueue_params("echo", {"customer": "big", "n": n}) for n in range(2000)]
        client.enqueue_many(backlog)
        small = [client.enqueue("echo", {"customer": f"c{n}"}).job_id for n in range(5)]
        client.resume_task("echo")
        jobs = [client.wait(job_id, timeout=60) for job_id in small]
        waiting = client.status().counts.get("pending", 0)
    assert {job.status for job in jobs} == {"succeeded"}
    assert waiting > 1900  # they started while nearly all of the backlog still waited
    assert daemon.stop() == 0


# -- a reload changes the limits of jobs already waiting, on each store -----------------------


class Gated:
    """Jobs of the fixture task `slow` that each wait for a FIFO of their own, and append
    their id to one file once they run."""

    def __init__(self, daemon: Taskd, folder: Path) -> None:
        self.daemon, self.folder = daemon, folder
        self.started = folder / "started"
        self.gates: dict[int, Path] = {}

    def enqueue(self, **payload: object) -> int:
        gate = self.folder / f"gate{len(self.gates)}"
        os.mkfifo(gate)
        body = {"seconds": 0, "until": str(gate), "started": str(self.started), **payload}
        job_id = enqueue(self.daemon, "slow", "--payload", json.dumps(body))
        self.gates[job_id] = gate
        return job_id

    def running(self) -> set[int]:
        text = self.started.read_text() if self.started.exists() else ""
        return {int(line) for line in text.split()}

    def wait_running(self, *job_ids: int) -> None:
        wait_until(lambda: self.running() >= set(job_ids), timeout=30, what=f"jobs {job_ids}")

    def release(self) -> None:
        """Let every running job end; then those still waiting start and end, in turn."""
        while pending := [job_id for job_id in self.gates if job_id in self.running()]:
            for job_id in pending:
                self.gates.pop(job_id).write_text("go")
            wait_until(lambda: not self.gates or self.running() & set(self.gates), timeout=30,
                       what="the next jobs running")  # fmt: skip


def reload_with(daemon: Taskd, old: str, new: str) -> None:
    """Rewrite a part of the daemon's configuration and `taskctl reload`."""
    text = daemon.config_file.read_text()
    assert old in text
    daemon.config_file.write_text(text.replace(old, new))
    reloaded = daemon.ctl("reload")
    assert reloaded.returncode == 0 and "restart" not in reloaded.stderr, reloaded


RAISED = {
    "shared": (SHARED, "[limits.stripe]\nconcurrency = 1", "[limits.stripe]\nconcurrency = 3"),
    "task": ('[task."slow"]\nconcurrency = 1\n', "concurrency = 1", "concurrency = 3"),
}


@pytest.mark.parametrize("limit", sorted(RAISED))
def test_a_reload_that_raises_a_concurrency_starts_the_jobs_waiting(
    on_store: Callable[[str], Taskd], short_tmp: Path, limit: str
) -> None:
    tables, old, new = RAISED[limit]
    daemon = on_store("workers = 4\n" + tables).start()
    gated = Gated(daemon, short_tmp)
    first = gated.enqueue()
    gated.wait_running(first)
    second, third = gated.enqueue(), gated.enqueue()
    why = ctl_json(daemon, "why", str(second))
    assert isinstance(why, dict) and why["reason"].endswith("limit"), why
    # Nothing ends, nothing is enqueued: the reload alone has the daemon claim again.
    reload_with(daemon, old, new)
    gated.wait_running(second, third)
    assert gated.running() == {first, second, third}
    gated.release()
    assert daemon.stop() == 0


def test_a_reload_that_keys_a_tasks_concurrency_lets_other_keys_waiting_start(
    on_store: Callable[[str], Taskd], short_tmp: Path
) -> None:
    daemon = on_store('workers = 4\n[task."slow"]\nconcurrency = 1\n').start()
    gated = Gated(daemon, short_tmp)
    acme = gated.enqueue(customer="acme")
    gated.wait_running(acme)
    waiting = [gated.enqueue(customer=customer) for customer in ("acme", "globex", "initech")]
    why = ctl_json(daemon, "why", str(waiting[1]))
    assert isinstance(why, dict) and why["reason"] == "concurrency_limit", why
    # Now one at a time per customer: globex's and initech's jobs have room, acme's not.
    reload_with(daemon, "concurrency = 1", 'concurrency = 1\nlimit_key = "customer"')
    gated.wait_running(*waiting[1:])
    assert gated.running() == {acme, *waiting[1:]}
    why = ctl_json(daemon, "why", str(waiting[0]))
    assert isinstance(why, dict) and why["reason"] == "concurrency_limit", why
    assert "per customer 'acme'" in why["message"], why
    gated.release()
    assert daemon.stop() == 0


def test_a_restart_that_keys_a_tasks_concurrency_keys_the_jobs_already_queued(
    on_store: Callable[[str], Taskd], short_tmp: Path
) -> None:
    """As a reload does: the store records the path its queued jobs were keyed by, and a
    start under another path keys them again (before, they kept the old values for good)."""
    daemon = on_store('workers = 4\n[task."slow"]\nconcurrency = 1\n').start()
    assert daemon.ctl("pause", "slow").returncode == 0
    gated = Gated(daemon, short_tmp)
    acme, later, globex = (gated.enqueue(customer=name) for name in ("acme", "acme", "globex"))
    assert daemon.stop() == 0
    text = daemon.config_file.read_text()
    daemon.config_file.write_text(
        text.replace("concurrency = 1", 'concurrency = 1\nlimit_key = "customer"')
    )
    daemon.start()
    assert daemon.ctl("resume", "slow").returncode == 0
    gated.wait_running(acme, globex)  # one at a time per customer, not one at a time
    why = ctl_json(daemon, "why", str(later))
    assert isinstance(why, dict) and why["reason"] == "concurrency_limit", why
    assert "per customer 'acme'" in why["message"], why
    wait_until(lambda: "keying them again" in daemon.log, timeout=30, what="the start's line")
    gated.release()
    assert gated.running() == {acme, later, globex}
    assert daemon.stop() == 0


def limit_key_values(daemon: Taskd, job_ids: list[int]) -> list[str | None]:
    """The `limit_key` value each job's row records (None: NULL, the job has none)."""
    database = str(daemon.database)
    if database.startswith("postgres"):
        import asyncpg

        schema = daemon.config_file.read_text().split('schema = "')[1].split('"')[0]

        async def read() -> list[str | None]:
            connection = await asyncpg.connect(database)
            try:
                rows = await connection.fetch(
                    f"SELECT id, limit_key FROM {schema}.jobs WHERE id = ANY($1)", job_ids
                )
            finally:
                await connection.close()
            found = {row["id"]: row["limit_key"] for row in rows}
            return [found[job_id] for job_id in job_ids]

        return asyncio.run(read())
    with closing(sqlite3.connect(database)) as connection:
        found = dict(connection.execute("SELECT id, limit_key FROM jobs").fetchall())
    return [found[job_id] for job_id in job_ids]


def test_a_restart_that_takes_a_tasks_limit_key_away_and_one_that_gives_it_back(
    on_store: Callable[[str], Taskd], short_tmp: Path
) -> None:
    """The queued jobs of a task without a `limit_key` have no value (NULL: they are in no
    index of the keyed jobs); a start that gives it one again keys them, and its
    concurrency counts per value again ('' for a job whose payload has none)."""
    keyed = '[task."slow"]\nconcurrency = 1\nlimit_key = "customer"\n'
    daemon = on_store("workers = 4\n" + keyed).start()
    assert daemon.ctl("pause", "slow").returncode == 0
    gated = Gated(daemon, short_tmp)
    jobs = [gated.enqueue(customer="acme"), gated.enqueue(customer="acme"),
            gated.enqueue(customer="globex"), gated.enqueue()]  # fmt: skip
    assert daemon.stop() == 0
    assert limit_key_values(daemon, jobs) == ["acme", "acme", "globex", ""]
    daemon.config_file.write_text(daemon.config_file.read_text().replace(keyed, ""))
    daemon.start()
    assert daemon.log.count("keying them again") == 2  # the first start, this one: before READY
    assert limit_key_values(daemon, jobs) == [None] * 4
    unkeyed = gated.enqueue(customer="acme")  # inserted while the task has no limit_key
    jobs.append(unkeyed)
    assert limit_key_values(daemon, [unkeyed]) == [None]
    assert daemon.stop() == 0
    daemon.config_file.write_text(daemon.config_file.read_text() + "\n" + keyed)
    daemon.start()
    assert daemon.log.count("keying them again") == 3
    assert limit_key_values(daemon, jobs) == ["acme", "acme", "globex", "", "acme"]
    assert daemon.ctl("resume", "slow").returncode == 0
    first, later, globex, nobody, _ = jobs
    gated.wait_running(first, globex, nobody)  # one at a time per value, not one at a time
    assert len(gated.running()) == 3
    why = ctl_json(daemon, "why", str(later))
    assert isinstance(why, dict) and why["reason"] == "concurrency_limit", why
    assert "per customer 'acme'" in why["message"], why
    gated.release()
    assert gated.running() == set(jobs)
    assert daemon.stop() == 0
