"""Flow control through the real interfaces: a paused task (taskctl, the clients, HTTP),
on a real daemon and its SQLite file; the PostgreSQL cluster cases are in
test_postgres_cluster.py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.http_support import READONLY_TOKEN, HttpClient, http_config
from tests.support import Taskd, wait_until


def ctl_json(daemon: Taskd, *args: str) -> object:
    done = daemon.ctl(*args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def enqueue(daemon: Taskd, *args: str) -> int:
    done = daemon.ctl("enqueue", *args)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


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
