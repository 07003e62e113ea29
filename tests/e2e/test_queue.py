"""The durable queue through taskctl and the client: retries, keys, order, cancel, crashes."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from taskctl import Client, DaemonUnavailable, PayloadInvalid, ProtocolError, enqueue_params
from taskd.models import counted
from tests.support import RawConnection, Taskd, enqueue, wait_until


def job(daemon: Taskd, job_id: int) -> dict:  # type: ignore[type-arg]
    shown = daemon.ctl("--json", "job", str(job_id))
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)  # type: ignore[no-any-return]


def test_enqueue_runs_and_wait_prints_the_result(taskd: Taskd) -> None:
    job_id = enqueue(taskd, "email", "--payload", '{"to": "q@example.com", "subject": "s"}')
    waited = taskd.ctl("wait", str(job_id))
    assert waited.returncode == 0, waited.stderr
    assert json.loads(waited.stdout)["to"] == "q@example.com"
    shown = job(taskd, job_id)
    assert shown["origin"] == "enqueue" and shown["max_attempts"] == 3


def test_enqueue_validates_the_payload_before_storing(taskd: Taskd) -> None:
    refused = taskd.ctl("enqueue", "email", "--payload", '{"to": []}')
    assert refused.returncode == 65 and "$.to" in refused.stderr
    assert json.loads(taskd.ctl("--json", "jobs").stdout) == []


def test_an_option_over_its_limit_is_refused_with_the_limit_and_its_unit(taskd: Taskd) -> None:
    far = taskd.ctl("enqueue", "echo", "--delay", "4000d")
    assert far.returncode == 2, far.stderr
    assert "delay: at most 10 years, got 4000 days" in far.stderr
    assert json.loads(taskd.ctl("--json", "jobs").stdout) == []


def test_retries_with_backoff_then_success(taskd: Taskd, short_tmp: Path) -> None:
    log = short_tmp / "attempts.txt"
    job_id = enqueue(
        taskd, "flaky", "--payload", json.dumps({"log": str(log), "succeed_on": 3}),
        "--max-attempts", "5",
    )  # fmt: skip
    waited = taskd.ctl("wait", str(job_id), "--timeout", "20s")
    assert waited.returncode == 0, waited.stderr
    assert waited.stdout.strip() == "3"
    times = [float(line.split()[2]) for line in log.read_text().splitlines()]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    # backoff 0.2 s: 0.2 s then 0.4 s, each plus up to 10% jitter (tests/unit/test_models.py
    # checks the jitter) and the scheduling of a machine that may be loaded.
    assert 0.2 <= gaps[0] < 0.2 * 1.1 + 1.5, gaps
    assert 0.4 <= gaps[1] < 0.4 * 1.1 + 1.5, gaps
    shown = job(taskd, job_id)
    assert shown["attempts"] == 3 and shown["status"] == "succeeded" and shown["error"] is None
    assert [e["message"] for e in shown["errors"]] == [
        "RuntimeError: attempt 1 failed",
        "RuntimeError: attempt 2 failed",
    ]
    assert "retrying in 0." in taskd.log


def test_out_of_attempts_fails_with_every_error_kept(taskd: Taskd, short_tmp: Path) -> None:
    log = short_tmp / "attempts.txt"
    payload = json.dumps({"log": str(log)})
    job_id = enqueue(taskd, "flaky", "--payload", payload, "--max-attempts", "2")
    waited = taskd.ctl("wait", str(job_id))
    assert waited.returncode == 1
    assert "failed after 2 attempts: RuntimeError: attempt 2 failed" in waited.stderr
    shown = job(taskd, job_id)
    assert shown["status"] == "failed" and len(shown["errors"]) == 2
    assert all("Traceback" in e["traceback"] for e in shown["errors"])
    # Only the task's own frames: taskd's that called it are noise to its author.
    assert all("taskd/executor.py" not in e["traceback"] for e in shown["errors"])
    assert all("flaky.py" in e["traceback"] for e in shown["errors"])
    human = taskd.ctl("job", str(job_id)).stdout
    assert "attempt 1 error" in human and "attempt 2 error" in human


def test_retry_and_fail_signals_from_the_task(taskd: Taskd) -> None:
    job_id = enqueue(taskd, "signals", "--payload", '{"in": 0.3}', "--max-attempts", "5")
    with taskd.client() as client:
        done = client.wait(job_id, timeout=20)
    assert done.status == "failed" and done.attempts == 2  # Fail stops the remaining attempts
    assert done.error == "Fail: giving up on purpose"
    assert done.started_at is not None
    first = job(taskd, job_id)["errors"][0]
    assert first["message"] == "Retry: the task asked to be retried"


def test_timeout_fails_the_attempt(taskd: Taskd) -> None:
    failed = taskd.ctl("run", "timeout", "--payload", '{"seconds": 5}')
    assert failed.returncode == 1
    assert "timed out after 0.3 s" in failed.stderr
    jobs = json.loads(taskd.ctl("--json", "jobs", "--task", "timeout").stdout)
    assert job(taskd, jobs[0]["id"])["errors"][0]["kind"] == "timeout"


def test_unique_key_returns_the_existing_job(taskd: Taskd) -> None:
    first = taskd.ctl("--json", "enqueue", "echo", "--key", "invoice-7", "--delay", "1h")
    second = taskd.ctl("--json", "enqueue", "echo", "--key", "invoice-7", "--payload", "2")
    assert first.returncode == second.returncode == 0
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a == {"job_id": a["job_id"], "duplicate": False}
    assert b == {"job_id": a["job_id"], "duplicate": True}
    human = taskd.ctl("enqueue", "echo", "--key", "invoice-7")
    assert human.stdout.strip() == str(a["job_id"]) and "already pending" in human.stderr
    other = json.loads(taskd.ctl("--json", "enqueue", "echo", "--key", "invoice-8").stdout)
    assert not other["duplicate"] and other["job_id"] != a["job_id"]


def test_priority_then_due_time_order(taskd_factory: type[Taskd], short_tmp: Path) -> None:
    daemon = taskd_factory(config="workers = 1\n").start()
    gate = short_tmp / "gate"  # the one worker is busy until the test lets it go
    blocker = enqueue(daemon, "blocking", "--payload", json.dumps({"gate": str(gate)}))
    wait_until(lambda: job(daemon, blocker)["status"] == "running", what="the blocking job")
    log = short_tmp / "order.txt"
    ids = {}
    # All queued behind the one worker's blocking job, however long the enqueues take.
    for label, args in [
        ("p5", ["--priority", "5"]),
        ("p0-first", []),
        ("pminus3", ["--priority", "-3"]),
        ("p0-second", []),
    ]:
        payload = json.dumps({"log": str(log), "seconds": 0})
        ids[label] = enqueue(daemon, "work", "--payload", payload, *args)
    # Not due yet when the worker is let go (these two are the last calls before it), so
    # they run last however urgent: 2 s of margin for a loaded machine.
    payload = json.dumps({"log": str(log), "seconds": 0})
    ids["delayed-urgent"] = enqueue(
        daemon, "work", "--payload", payload, "--priority", "-9", "--delay", "2s"
    )
    at = time.time() + 2.5
    from datetime import datetime

    stamp = datetime.fromtimestamp(at).astimezone().isoformat()
    ids["at"] = enqueue(daemon, "work", "--payload", json.dumps({"log": str(log)}), "--at", stamp)
    gate.touch()
    with daemon.client() as client:
        for job_id in ids.values():
            client.wait(job_id, timeout=20)
        at_job = client.job(ids["at"])
        delayed = client.job(ids["delayed-urgent"])
    ran = [int(line) for line in log.read_text().split()]
    by_id = {v: k for k, v in ids.items()}
    assert [by_id[i] for i in ran] == [
        "pminus3", "p0-first", "p0-second", "p5", "delayed-urgent", "at",
    ]  # fmt: skip
    assert at_job.started_at is not None and at_job.started_at >= at
    assert delayed.started_at is not None and delayed.started_at >= delayed.created_at + 2
    assert daemon.stop() == 0


def test_runs_go_ahead_of_queued_jobs(taskd_factory: type[Taskd], short_tmp: Path) -> None:
    daemon = taskd_factory(config="workers = 1\n").start()
    started = short_tmp / "started.txt"
    log = short_tmp / "order.txt"
    enqueue(daemon, "slow", "--payload", json.dumps({"seconds": 1.5, "started": str(started)}))
    wait_until(started.exists, what="the blocking job to start")
    with daemon.client() as client:
        batch = client.enqueue_many([enqueue_params("work", {"log": str(log)})] * 5)
    queued = [result.job_id for result in batch]
    ran = daemon.ctl("--json", "run", "work", "--payload", json.dumps({"log": str(log)}))
    assert ran.returncode == 0, ran.stderr
    run_id = json.loads(ran.stdout)["id"]
    assert json.loads(ran.stdout)["priority"] == -10
    with daemon.client() as client:
        for job_id in queued:
            client.wait(job_id, timeout=20)
    assert [int(line) for line in log.read_text().split()] == [run_id, *queued]
    assert daemon.stop() == 0


def test_concurrency_limits_from_config(taskd_factory: type[Taskd], short_tmp: Path) -> None:
    daemon = taskd_factory(config='workers = 8\n[task."slow"]\nconcurrency = 2\n').start()
    started = short_tmp / "started.txt"
    payload = json.dumps({"seconds": 0.4, "started": str(started)})
    with daemon.client() as client:
        ids = [client.enqueue("slow", json.loads(payload)).job_id for _ in range(6)]
        for job_id in ids:
            client.wait(job_id, timeout=30)
        jobs = [client.job(i) for i in ids]
    # At no instant were more than two of them running.
    events = sorted([(j.started_at, 1) for j in jobs] + [(j.finished_at, -1) for j in jobs])
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    assert peak == 2
    assert daemon.stop() == 0


def test_cancelling_a_running_job_frees_its_tasks_limit(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    daemon = taskd_factory(config='[task."slow"]\nconcurrency = 1\n').start()
    started = short_tmp / "started.txt"
    first = enqueue(
        daemon, "slow", "--payload", json.dumps({"seconds": 600, "started": str(started)})
    )
    wait_until(started.exists, what="the first job to start")
    second = enqueue(daemon, "slow", "--payload", json.dumps({"seconds": 0}))
    assert daemon.ctl("cancel", str(first)).returncode == 0
    # The slot the cancelled job held is free at once, not at the next unrelated wake-up.
    waited = daemon.ctl("wait", str(second), "--timeout", "10s")
    assert waited.returncode == 0, waited.stderr
    assert daemon.stop() == 0


def test_cancel_pending_running_and_finished(taskd: Taskd, short_tmp: Path) -> None:
    later = enqueue(taskd, "echo", "--delay", "1h")
    assert taskd.ctl("cancel", str(later)).returncode == 0
    assert job(taskd, later)["status"] == "cancelled"
    started = short_tmp / "started.txt"
    record = short_tmp / "record.txt"
    payload = json.dumps({"seconds": 30, "started": str(started), "record": str(record)})
    running = enqueue(taskd, "slow", "--payload", payload)
    wait_until(started.exists, what="the job to start")
    cancelled = taskd.ctl("--json", "cancel", str(running))
    assert cancelled.returncode == 0 and json.loads(cancelled.stdout)["status"] == "cancelled"
    waited = taskd.ctl("wait", str(running), "--timeout", "5s")
    assert waited.returncode == 1 and "cancelled" in waited.stderr
    again = taskd.ctl("cancel", str(running))
    assert again.returncode == 3 and "was already cancelled and cannot be cancelled" in again.stderr
    # The attempt that was running ended by the cancel, and says so; the pending one had none.
    assert [(e["attempt"], e["kind"]) for e in job(taskd, running)["errors"]] == [(1, "cancelled")]
    assert job(taskd, later)["errors"] == []
    assert taskd.ctl("cancel", "424242").returncode == 4
    # The coroutine was cancelled: it never reached its end.
    assert not record.exists()
    # A thread cannot be interrupted; it is marked cancelled and its late result ignored.
    gate = short_tmp / "gate"  # the thread runs until the test lets it go
    thread_job = enqueue(taskd, "blocking", "--payload", json.dumps({"gate": str(gate)}))
    wait_until(lambda: job(taskd, thread_job)["status"] == "running", what="the thread job")
    assert taskd.ctl("cancel", str(thread_job)).returncode == 0
    gate.touch()
    late = f"job {thread_job} blocking: outcome of attempt 1 not recorded"
    wait_until(lambda: late in taskd.log, what="the thread's late result to be refused")
    assert job(taskd, thread_job)["status"] == "cancelled"


def test_retry_puts_a_failed_job_back(taskd: Taskd, short_tmp: Path) -> None:
    log = short_tmp / "attempts.txt"
    payload = json.dumps({"log": str(log), "succeed_on": 2})
    job_id = enqueue(taskd, "flaky", "--payload", payload, "--max-attempts", "1")
    assert taskd.ctl("wait", str(job_id)).returncode == 1
    retried = taskd.ctl("retry", str(job_id))
    assert retried.returncode == 0 and "pending again" in retried.stdout
    # attempts were reset to 0: the next attempt is number 1 again, and fails again...
    assert taskd.ctl("wait", str(job_id)).returncode == 1
    assert taskd.ctl("retry", str(job_id), "--json").returncode == 0  # --json may go after
    assert json.loads(taskd.ctl("--json", "wait", str(job_id)).stdout)["status"] == "failed"
    shown = job(taskd, job_id)
    history = [(e["attempt"], e["kind"]) for e in shown["errors"]]
    assert history == [(1, "error"), (0, "retried"), (1, "error"), (0, "retried"), (1, "error")]
    assert "attempts start again from 1" in taskd.ctl("job", str(job_id)).stdout
    assert taskd.ctl("retry", str(enqueue(taskd, "echo", "--delay", "1h"))).returncode == 3


def test_wait_timeout_exit_124(taskd: Taskd) -> None:
    job_id = enqueue(taskd, "echo", "--delay", "1h")
    waited = taskd.ctl("wait", str(job_id), "--timeout", "200ms")
    assert waited.returncode == 124 and "still pending" in waited.stderr


@pytest.mark.parametrize("timeout", [0.0, 0.0001])
def test_wait_with_no_time_left_returns_a_job_that_has_ended(taskd: Taskd, timeout: float) -> None:
    with RawConnection(taskd.socket) as connection:
        ended = connection.call("run", {"task": "echo", "payload": 1})["result"]["job"]
        waited = connection.call("wait", {"id": ended["id"], "timeout": timeout})
        assert waited.get("result", waited)["status"] == "succeeded"
        pending = connection.call("enqueue", {"task": "echo", "delay": 3600.0})["result"]
        waited = connection.call("wait", {"id": pending["job_id"], "timeout": timeout})
        assert waited["error"]["code"] == "timeout" and waited["error"]["data"] == {
            "status": "pending"
        }


def test_sigterm_returns_unfinished_jobs_to_pending(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    daemon = taskd_factory(config='grace_period = "300ms"\n').start()
    started = short_tmp / "started.txt"
    payload = json.dumps({"seconds": 30, "started": str(started)})
    job_id = enqueue(daemon, "slow", "--payload", payload)
    queued = enqueue(daemon, "echo", "--delay", "1h")
    wait_until(started.exists, what="the job to start")
    assert daemon.stop() == 0
    rows = {job.id: (job.status, job.attempts) for job in daemon.stored_jobs()}
    assert rows[job_id] == ("pending", 0)  # back in the queue, the attempt not counted
    assert rows[queued] == ("pending", 0)
    assert "returned to the queue, the daemon is stopping" in daemon.log


def test_prune_and_status(taskd: Taskd) -> None:
    for n in range(3):
        taskd.ctl("run", "echo", "--payload", str(n), "--key", f"k{n}")
    enqueue(taskd, "echo", "--delay", "1h")
    status = json.loads(taskd.ctl("--json", "status").stdout)
    assert status["counts"] == {"succeeded": 3, "pending": 1}
    echo = next(t for t in status["tasks"] if t["task"] == "echo")
    assert echo["next_due_at"] is not None
    assert "next delayed job due at" in taskd.ctl("status").stdout
    assert taskd.ctl("prune").stdout.strip() == "deleted 0 finished jobs"  # within retention
    pruned = json.loads(taskd.ctl("--json", "prune", "--older-than", "0s").stdout)
    assert pruned == {"deleted": 3}
    assert len(json.loads(taskd.ctl("--json", "jobs").stdout)) == 1


def test_enqueue_many_is_one_transaction(taskd: Taskd) -> None:
    with taskd.client() as client:
        results = client.enqueue_many(
            [enqueue_params("echo", n) for n in range(100)] + [enqueue_params("echo", key="u")] * 2
        )
        assert len({r.job_id for r in results}) == 101 and results[-1].duplicate
        with pytest.raises(PayloadInvalid, match=r"\$.to"):
            client.enqueue_many([enqueue_params("echo", 1), enqueue_params("email", {"to": 1})])
        assert len(client.jobs(limit=1000)) == 101  # the bad batch stored nothing


def test_quarantine_after_repeated_crashes(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory().start()
    job_id = enqueue(daemon, "crash", "--payload", "{}", "--max-attempts", "10")
    for _ in range(3):
        assert daemon.process is not None
        assert daemon.process.wait(30) == 3, daemon.log  # the task killed its daemon
        daemon.close()
        daemon.start()  # recovers the job; it runs and crashes again, until quarantined
    shown = job(daemon, job_id)
    assert shown["status"] == "failed" and shown["error"] == "quarantined after 3 crashes"
    assert shown["crashes"] == 3
    assert [e["kind"] for e in shown["errors"]] == ["interrupted"] * 3
    assert daemon.running and daemon.stop() == 0


def test_kill_9_loses_no_acknowledged_job(taskd_factory: type[Taskd], short_tmp: Path) -> None:
    """Enqueue while jobs run, kill -9 mid-way, restart: every acknowledged job succeeds."""
    daemon = taskd_factory(config="workers = 16\n").start()
    log = short_tmp / "executions.txt"
    acked: list[int] = []
    stop_enqueuing = threading.Event()

    def producer() -> None:
        n = 0
        with Client(str(daemon.socket)) as client:
            try:
                while not stop_enqueuing.is_set() and len(acked) < 4000:
                    # Durations that differ, so that jobs end one by one: all in step,
                    # they would leave moments with none running for the kill to hit.
                    batch = [
                        enqueue_params(
                            "work", {"log": str(log), "seconds": 0.01 + i % 4 * 0.01, "n": n + i}
                        )
                        for i in range(25)
                    ]
                    acked.extend(r.job_id for r in client.enqueue_many(batch))
                    n += 25
            except (DaemonUnavailable, ProtocolError, ConnectionError):
                pass  # the daemon died under us: what was acknowledged is what counts

    thread = threading.Thread(target=producer)
    thread.start()

    def busy_with_a_backlog() -> bool:
        with daemon.client() as client:
            counts = client.status().counts
        return counts.get("running", 0) >= 8 and counts.get("pending", 0) >= 100

    wait_until(lambda: len(acked) >= 3000 and log.exists() and busy_with_a_backlog(),
               timeout=60, what="jobs enqueued and running")  # fmt: skip
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait(10)
    stop_enqueuing.set()
    thread.join(30)
    daemon.close()
    running_at_kill = {job.id for job in daemon.stored_jobs("running")}
    stored = {job.id for job in daemon.stored_jobs()}
    assert set(acked) <= stored  # acknowledged means committed
    assert running_at_kill, "the kill should hit running jobs (16 workers, a backlog)"

    restart_began = time.monotonic()
    daemon.start()
    ready_after = time.monotonic() - restart_began
    with daemon.client() as client:

        def drained() -> bool:
            counts = client.status().counts
            return counts.get("pending", 0) + counts.get("running", 0) == 0

        wait_until(drained, timeout=120, what="the queue to drain")
        statuses = Counter(j.status for j in client.jobs(limit=10_000))
    executions = Counter(int(line) for line in log.read_text().split())
    lost = [job_id for job_id in acked if executions[job_id] == 0]
    duplicated = {job_id for job_id, count in executions.items() if count > 1}
    print(
        f"\ncrash test: {len(acked)} jobs acknowledged, {len(stored)} stored, "
        f"{len(running_at_kill)} running at the kill, {len(lost)} lost, "
        f"{len(duplicated)} executed twice, restart to READY {ready_after:.2f}s"
    )
    assert lost == []
    assert statuses == Counter({"succeeded": len(stored)})
    assert duplicated <= running_at_kill
    were = "was" if len(running_at_kill) == 1 else "were"
    recovered = f"{counted(len(running_at_kill), 'job')} {were} running when taskd last stopped"
    assert recovered in daemon.log
    assert daemon.stop() == 0


def test_client_library_enqueue_and_wait(taskd: Taskd) -> None:
    code = f"""
import asyncio
from taskctl import AsyncClient, Client, JobFailed, UnknownTask
with Client({str(taskd.socket)!r}) as client:
    job = client.enqueue("echo", {{"n": 1}}, delay="100ms", priority=-1)
    assert client.wait(job.job_id, timeout=10).result == {{"n": 1}}
    try:
        client.run("fail", 1)
    except JobFailed as exc:
        assert exc.job.error == "ValueError: boom: 1"
async def main():
    async with AsyncClient({str(taskd.socket)!r}) as client:
        results = await asyncio.gather(*(client.run("echo", n, key=str(n)) for n in range(20)))
        assert results == list(range(20)), results
        try:
            await client.enqueue("nope")
        except UnknownTask:
            print("ok")
asyncio.run(main())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


CONTEXT_TASK = """
import contextvars

from taskd import define_task

SEEN = contextvars.ContextVar("seen")


@define_task
async def remember(payload):
    before = SEEN.get(None)
    SEEN.set(payload)
    return before
"""


def test_a_job_does_not_see_the_context_variables_an_earlier_job_set(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    # Very short jobs are claimed ahead, and a freed slot runs the next in the same asyncio
    # task: a context variable a job set must not reach the next (as with a task each).
    tasks = short_tmp / "tasks"
    tasks.mkdir()
    (tasks / "remember.py").write_text(CONTEXT_TASK)
    daemon = taskd_factory(tasks=tasks, config="workers = 2\n").start()
    with daemon.client() as client:
        ids = [
            enqueued.job_id
            for start in range(0, 3000, 1000)
            for enqueued in client.enqueue_many(
                [enqueue_params("remember", n) for n in range(start, start + 1000)]
            )
        ]
        seen = Counter(repr(client.wait(job_id, timeout=60).result) for job_id in ids)
    assert seen == {"None": 3000}
    assert daemon.stop() == 0
