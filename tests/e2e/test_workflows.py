"""Workflows with real daemons on each store: jobs that wait for other jobs (`--after`),
task hooks, cron jitter."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
from pathlib import Path
from typing import Any

import pytest

from taskctl import enqueue_params
from taskd.models import Job
from taskd.schedules import jitter_offset
from tests.backends import Backend
from tests.http_support import HttpClient, http_config
from tests.support import Taskd, enqueue, wait_until


def job(daemon: Taskd, job_id: int) -> dict[str, Any]:
    shown = daemon.ctl("--json", "job", str(job_id))
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)  # type: ignore[no-any-return]


def ended(daemon: Taskd, job_id: int) -> Job:
    with daemon.client() as client:
        return client.wait(job_id, timeout=30)


def slow(record: Path, seconds: float = 0.2, **extra: Any) -> str:
    return json.dumps({"seconds": seconds, "record": str(record), **extra})


def test_a_three_job_chain_runs_in_order(backend: Backend, short_tmp: Path) -> None:
    daemon = backend.daemon("workers = 4\n").start()
    record = short_tmp / "record.txt"
    release = short_tmp / "release"
    os.mkfifo(release)
    first = enqueue(daemon, "slow", "--payload", slow(record, 0, until=str(release)))
    second = enqueue(daemon, "slow", "--payload", slow(record), "--after", str(first))
    third = enqueue(daemon, "slow", "--payload", slow(record), "--after", str(second))
    # The third waits for the second, which waits for the first (running or pending).
    shown = job(daemon, second)
    assert shown["status"] == "pending" and shown["blocked"] == 1, shown
    assert shown["parents"] == [first] and shown["children"] == [third]
    why = json.loads(daemon.ctl("why", str(third), "--json").stdout)
    assert why["reason"] == "parents", why
    assert f"waits for job {second} (slow, pending)" in why["message"]
    human = daemon.ctl("job", str(second)).stdout
    assert f"after:     {first}" in human and f"children:  {third}" in human
    release.write_bytes(b"go")  # once the first job reads it
    jobs = [ended(daemon, job_id) for job_id in (first, second, third)]
    assert [j.status for j in jobs] == ["succeeded"] * 3
    order = [int(line.split()[0]) for line in record.read_text().splitlines()]
    assert order == [first, second, third]
    for parent, child in itertools.pairwise(jobs):
        assert parent.finished_at is not None and child.started_at is not None
        assert child.started_at >= parent.finished_at
    assert daemon.stop() == 0


def test_a_failed_parent_cancels_its_child_and_grandchild(backend: Backend) -> None:
    daemon = backend.daemon().start()
    with daemon.client() as client:
        parent = client.enqueue("fail", "x", delay=1, max_attempts=1).job_id
        child = client.enqueue("echo", {"n": 1}, after=[parent]).job_id
        grandchild = client.enqueue("echo", {"n": 2}, after=[child]).job_id
        rescued = client.enqueue("echo", {"n": 3}, after=[child], after_failure="run").job_id
        assert client.wait(parent, timeout=30).status == "failed"
        cancelled = client.wait(child, timeout=30)
        assert cancelled.status == "cancelled" and cancelled.error == f"parent {parent} failed"
        last = client.wait(grandchild, timeout=30)
        assert last.status == "cancelled" and last.error == f"parent {child} was cancelled"
        assert client.wait(rescued, timeout=30).status == "succeeded"
        # A child enqueued after its parent ended is decided at once.
        late = client.enqueue("echo", after=[parent]).job_id
        assert client.job(late).status == "cancelled"
        anyway = client.enqueue("echo", after=[parent], after_failure="run").job_id
        assert client.wait(anyway, timeout=30).status == "succeeded"
    assert daemon.stop() == 0


def test_after_failure_run_and_unknown_parents(backend: Backend) -> None:
    daemon = backend.daemon().start()
    parent = enqueue(daemon, "fail", "--payload", '"x"', "--delay", "1s", "--max-attempts", "1")
    child = enqueue(daemon, "echo", "--after", str(parent), "--after-failure", "run")
    assert ended(daemon, child).status == "succeeded"
    missing = daemon.ctl("enqueue", "echo", "--after", "999999")
    assert missing.returncode == 4, missing
    assert "999999" in missing.stderr and "after" in missing.stderr
    with daemon.client() as client:  # nothing was enqueued
        assert [j.id for j in client.jobs(limit=10)] == [child, parent]
    assert daemon.stop() == 0


def test_a_child_waits_for_every_parent_across_a_restart(backend: Backend) -> None:
    daemon = backend.daemon().start()
    with daemon.client() as client:
        first = client.enqueue("echo", {"n": 1}, delay=1).job_id
        second = client.enqueue("echo", {"n": 2}, delay=60).job_id
        child = client.enqueue("echo", {"n": 3}, after=[first, second]).job_id
        assert client.wait(first, timeout=30).status == "succeeded"
        assert client.job(child).blocked == 1
    assert daemon.stop() == 0
    daemon = backend.daemon().start()  # the links and the count hold across a restart
    with daemon.client() as client:
        assert client.job(child).status == "pending"
        client.cancel(second)
        cancelled = client.wait(child, timeout=30)
        assert cancelled.error == f"parent {second} was cancelled"
    assert daemon.stop() == 0


# -- task hooks ----------------------------------------------------------------------------

HOOK_TASKS = {
    "build.py": """
from taskd import define_task


@define_task(on_failure="notify", on_success="notify", max_attempts=2, backoff=0)
async def build(payload: dict) -> str:
    if payload.get("fail"):
        raise ValueError("broken build")
    return "built"
""",
    "notify.py": """
from taskd import define_task


@define_task()
async def notify(payload: dict) -> dict:
    return payload
""",
    "loop.py": """
from taskd import define_task


@define_task(on_failure="loop", max_attempts=1)
async def loop(payload: dict) -> None:
    raise ValueError("a hook that fails")
""",
    "item.py": """
import asyncio

from taskd import define_task


@define_task(max_attempts=1)
async def item(payload: dict) -> int:
    await asyncio.sleep(payload.get("sleep", 0))
    if payload.get("fail"):
        raise ValueError(f"item {payload['n']} fails")
    return payload["n"]
""",
    "fanout.py": """
from taskd import TaskContext, define_task


@define_task()
async def fanout(payload: dict, ctx: TaskContext) -> int:
    # A job that runs once this one has succeeded.
    return await ctx.enqueue("notify", {"after": ctx.job_id}, after=[ctx.job_id])
""",
    "plain.py": """
from taskd import define_task


@define_task()
async def plain(payload: dict) -> None:
    raise ValueError("plain fails")
""",
}


def hook_tasks(root: Path) -> Path:
    folder = root / "hook_tasks"
    folder.mkdir(exist_ok=True)
    for name, text in HOOK_TASKS.items():
        (folder / name).write_text(text)
    return folder


def hooks_of(daemon: Taskd, job_id: int) -> list[Job]:
    with daemon.client() as client:
        return [j for j in client.jobs(limit=100, payloads=True) if j.parent_id == job_id]


def test_hooks_on_failure_and_success(backend: Backend, short_tmp: Path) -> None:
    config = '[task."plain"]\non_failure = "notify"\n'  # a hook from the configuration
    daemon = backend.daemon(config, tasks=hook_tasks(short_tmp)).start()
    with daemon.client() as client:
        good = client.enqueue("build", {}).job_id
        bad = client.enqueue("build", {"fail": True}).job_id
        plain = client.enqueue("plain", {}, max_attempts=1).job_id
        assert client.wait(good, timeout=30).status == "succeeded"
        assert client.wait(bad, timeout=30).status == "failed"
        assert client.wait(plain, timeout=30).status == "failed"
    for job_id, status, error, attempts in (
        (good, "succeeded", None, 1),
        (bad, "failed", "ValueError: broken build", 2),  # once, after the last attempt
        (plain, "failed", "ValueError: plain fails", 1),
    ):
        (hook,) = wait_for_hooks(daemon, job_id, 1)
        assert hook.task == "notify" and hook.origin == "hook"
        task = "plain" if job_id == plain else "build"
        expected = {"job": job_id, "task": task, "status": status, "error": error,
                    "attempts": attempts}  # fmt: skip
        assert hook.payload == expected and hook.result == expected
    assert daemon.stop() == 0


def test_a_hook_that_fails_triggers_no_hook(backend: Backend, short_tmp: Path) -> None:
    daemon = backend.daemon(tasks=hook_tasks(short_tmp)).start()
    with daemon.client() as client:
        first = client.enqueue("loop", {}).job_id
        assert client.wait(first, timeout=30).status == "failed"
        (hook,) = wait_for_hooks(daemon, first, 1)
        assert client.wait(hook.id, timeout=30).status == "failed"
        # Had the hook's failure had a hook, it would have been enqueued in the transaction
        # that recorded that failure, which has committed.
        assert [j.task for j in client.jobs(task="loop", limit=10)] == ["loop", "loop"]
    assert daemon.stop() == 0


def test_a_task_enqueues_a_job_that_waits_for_it(backend: Backend, short_tmp: Path) -> None:
    daemon = backend.daemon(tasks=hook_tasks(short_tmp)).start()
    with daemon.client() as client:
        parent = client.run("fanout", {}, max_attempts=1)  # its result: the child's id
        child = client.wait(parent, timeout=30)
        assert child.status == "succeeded" and client.job(child.id).parents
        (fanout,) = client.jobs(task="fanout", limit=1)
        assert child.started_at is not None and fanout.finished_at is not None
        assert child.started_at >= fanout.finished_at
    assert daemon.stop() == 0


def wait_for_hooks(daemon: Taskd, job_id: int, count: int) -> list[Job]:
    def found() -> list[Job] | None:
        hooks = [j for j in hooks_of(daemon, job_id) if j.status in ("succeeded", "failed")]
        return hooks if len(hooks) >= count else None

    hooks: list[Job] = wait_until(found, timeout=30, what=f"the hooks of job {job_id}")
    return hooks


# -- cron jitter ---------------------------------------------------------------------------

JITTERED = """
[[schedule]]
id = "spread"
cron = "*/2 * * * * *"
tasks = ["echo"]
jitter = 1.5
"""


def test_jitter_is_the_same_on_every_daemon_and_within_range(backend: Backend) -> None:
    count = 2 if backend.name == "postgres" else 1
    daemons = [backend.daemon(JITTERED, node=node).start() for node in "ab"[:count]]

    def ticks() -> list[Job] | None:
        with daemons[0].client() as client:
            jobs = [j for j in client.jobs(task="echo", limit=100, payloads=True)]
        return jobs if len(jobs) >= 4 else None

    jobs = wait_until(ticks, timeout=60, what="four ticks of the jittered schedule")
    for daemon in daemons:
        assert daemon.stop() == 0
    seen = set()
    offsets = []
    for fired in jobs:
        tick = dt.datetime.fromisoformat(fired.payload["scheduled_time"]).timestamp()
        assert tick not in seen  # each tick fired once, by one daemon or the other
        seen.add(tick)
        assert tick == int(tick) and int(tick) % 2 == 0  # scheduled_time stays the tick
        offset = fired.run_at - tick
        offsets.append(offset)
        assert 0 <= offset < 1.5
        assert offset == pytest.approx(jitter_offset("spread", tick, 1.5), abs=1e-6)
        if fired.started_at is not None:  # not before its offset
            assert fired.started_at >= fired.run_at
    assert len({round(offset, 6) for offset in offsets}) > 1  # each tick has its own


# -- batches -------------------------------------------------------------------------------


def callbacks(daemon: Taskd) -> list[Job]:
    with daemon.client() as client:
        return [j for j in client.jobs(task="notify", limit=100, payloads=True)]


def wait_for_callback(daemon: Taskd, batch: int) -> Job:
    def done() -> Job | None:
        with daemon.client() as client:
            info = client.batch(batch)
            if info.callback_id is None:
                return None
            return client.wait(info.callback_id, timeout=30)

    job: Job = wait_until(done, timeout=120, what=f"the callback of batch {batch}")
    return job


def check_batch(daemon: Taskd, batch: int, ids: list[int], failing: set[int]) -> None:
    callback = wait_for_callback(daemon, batch)
    assert callback.origin == "batch" and callback.status == "succeeded"
    expected_failed = sorted(ids[n] for n in failing)
    assert callback.payload == {
        "batch": batch,
        "succeeded": sorted(set(ids) - set(expected_failed)),
        "failed": expected_failed,
        "cancelled": [],
    }
    assert [j.origin for j in callbacks(daemon)] == ["batch"]  # exactly once
    shown = daemon.ctl("batch", str(batch))
    assert shown.returncode == 0, shown.stderr
    total = len(ids)
    assert f"batch {batch}: {total}/{total} ended, {len(failing)} failed" in shown.stdout
    info = json.loads(daemon.ctl("--json", "batch", str(batch)).stdout)
    counts = {"succeeded": total - len(failing), "failed": len(failing)}
    assert info["counts"] == {status: n for status, n in counts.items() if n}


def test_a_batch_fires_its_callback_once(backend: Backend, short_tmp: Path) -> None:
    daemon = backend.daemon("workers = 8\n", tasks=hook_tasks(short_tmp)).start()
    failing = {3, 500, 999}
    payloads = short_tmp / "payloads.jsonl"
    payloads.write_text("".join(json.dumps({"n": n, "fail": n in failing}) + "\n"
                                for n in range(1000)))  # fmt: skip
    done = daemon.ctl("enqueue", "item", "--each", f"@{payloads}", "--on-finish", "notify")
    assert done.returncode == 0, done.stderr
    batch = int(done.stdout)
    with daemon.client() as client:
        ids = sorted(j.id for j in client.jobs(task="item", limit=1000))
    assert len(ids) == 1000
    check_batch(daemon, batch, ids, failing)
    with daemon.client() as client:  # an empty batch ends at once; with the Python client
        empty = client.enqueue_many([], on_finish="notify")
        assert empty.batch is not None and client.batch(empty.batch).finished_at is not None
    assert daemon.stop() == 0


def test_a_batch_survives_kill_9_halfway(backend: Backend, short_tmp: Path) -> None:
    daemon = backend.daemon("workers = 4\n", tasks=hook_tasks(short_tmp)).start()
    failing = {7, 400}
    # A job running at the kill loses an attempt: those that succeed have a second one.
    jobs = [enqueue_params("item", {"n": n, "fail": n in failing, "sleep": 0.01},
                           max_attempts=1 if n in failing else 2)
            for n in range(1000)]  # fmt: skip
    with daemon.client() as client:
        enqueued = client.enqueue_many(jobs, on_finish="notify")
        batch = enqueued.batch
        assert batch is not None
        ids = [result.job_id for result in enqueued]
        wait_until(lambda: client.batch(batch).ended >= 300, timeout=60, what="300 ended")
    daemon.kill()
    daemon = backend.daemon("workers = 4\n", tasks=hook_tasks(short_tmp)).start()
    check_batch(daemon, batch, ids, failing)
    assert daemon.stop() == 0


def test_two_daemons_drain_a_batch_together(short_tmp: Path, taskd_factory: type[Taskd]) -> None:
    backend = Backend("postgres", taskd_factory, short_tmp)
    try:
        tasks = hook_tasks(short_tmp)
        first, second = (backend.daemon("workers = 4\n", node=n, tasks=tasks).start()
                         for n in "ab")  # fmt: skip
        jobs = [enqueue_params("item", {"n": n, "sleep": 0.005}) for n in range(1000)]
        with first.client() as client:
            enqueued = client.enqueue_many(jobs, on_finish="notify")
        assert enqueued.batch is not None
        check_batch(second, enqueued.batch, [r.job_id for r in enqueued], set())
        for daemon in (first, second):
            assert daemon.stop() == 0
    finally:
        backend.close()


def test_after_and_batches_over_http(backend: Backend, short_tmp: Path) -> None:
    daemon = backend.daemon(http_config(), tasks=hook_tasks(short_tmp)).start()
    api = HttpClient.of(daemon)
    parent = api.post("/jobs", {"task": "item", "payload": {"n": 1}, "delay": "1h"}).json()
    child = api.post("/jobs", {"task": "item", "payload": {"n": 2}, "after": [parent["job_id"]]})
    assert child.status == 201, child.json()
    shown = api.get(f"/jobs/{child.json()['job_id']}").json()
    assert shown["status"] == "pending" and shown["parents"] == [parent["job_id"]]
    missing = api.post("/jobs", {"task": "item", "payload": {"n": 3}, "after": [999999]})
    assert missing.status == 404 and missing.json()["error"]["code"] == "unknown_job"
    with daemon.client() as client:
        batch = client.enqueue_many([enqueue_params("item", {"n": 4})], on_finish="notify").batch
    assert batch is not None
    wait_until(lambda: api.get(f"/batches/{batch}").json()["callback_id"], timeout=30)
    reply = api.get(f"/batches/{batch}").json()
    assert reply["total"] == reply["ended"] == 1 and reply["counts"] == {"succeeded": 1}
    assert api.get("/batches/999999").status == 404
    assert daemon.ctl("prune", "--older-than", "0s").returncode == 0  # finished: pruned too
    assert api.get(f"/batches/{batch}").status == 404
    assert daemon.stop() == 0
