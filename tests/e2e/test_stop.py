"""A stop never strands a job: the jobs claimed but not started when taskd stops go back to
the queue without counting an attempt, so that the next start runs them as if nothing had
happened (no `interrupted` attempt, no crash counted)."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator

import pytest

from taskctl import enqueue_params
from taskd.models import Job
from tests.backends import drop_schema, postgres_url, unique_schema
from tests.support import RawConnection, Taskd

ROUNDS = 20


@pytest.fixture(params=["sqlite", "postgres"])
def daemon(request: pytest.FixtureRequest, taskd_factory: type[Taskd]) -> Iterator[Taskd]:
    """A taskd (not started) on each backend in turn: PostgreSQL in a schema of its own."""
    if request.param == "sqlite":
        yield taskd_factory(config="workers = 2\n")
        return
    url, schema = postgres_url(), unique_schema()
    made = taskd_factory(config=f'workers = 2\n[postgres]\nschema = "{schema}"\n')
    made.database = url  # type: ignore[assignment]
    yield made
    if made.running:
        made.stop()
    asyncio.run(drop_schema(url, schema))


def ran_once(jobs: list[Job]) -> list[str]:
    """What is wrong with jobs that should each have run once, in one attempt."""
    return [
        f"job {job.id}: {job.status}, attempts {job.attempts}, crashes {job.crashes}, "
        f"errors {[(error.kind, error.message) for error in job.errors]}"
        for job in jobs
        if job.status != "succeeded" or job.attempts != 1 or job.crashes or job.errors
    ]


def test_a_job_enqueued_just_before_sigterm_runs_once_after_the_restart(daemon: Taskd) -> None:
    ids = []
    for _ in range(ROUNDS):
        daemon.start()
        with daemon.client() as client:
            ids.append(client.enqueue("echo", {"n": len(ids)}).job_id)
        assert daemon.stop() == 0, daemon.log
    daemon.start()
    with daemon.client() as client:
        jobs = [client.wait(job_id, timeout=30) for job_id in ids]
        jobs = [client.job(job.id) for job in jobs]  # with their errors
    assert ran_once(jobs) == []
    assert "were running when taskd last stopped" not in daemon.log


def test_a_run_caught_by_sigterm_runs_once_after_the_restart(daemon: Taskd) -> None:
    """A run sent as taskd stops (the request taskctl sends, surely sent before SIGTERM):
    answered, or answered `shutting_down` with its job kept in the queue, which the next
    start runs once; `taskctl wait` then gives its result."""
    answers = []
    for round_ in range(ROUNDS):
        daemon.start()
        with daemon.client() as client:  # work for the executor as the stop comes
            client.enqueue_many([enqueue_params("echo", n) for n in range(4)])
        with RawConnection(daemon.socket) as connection:
            connection.sock.sendall(connection.request("run", {"task": "echo", "payload": round_}))
            assert daemon.process is not None
            daemon.process.send_signal(signal.SIGTERM)
            try:
                answers.append(connection.reply())
            except ConnectionError:
                answers.append({})
        assert daemon.stop() == 0, daemon.log
    daemon.start()
    with daemon.client() as client:
        runs = [job for job in client.jobs(limit=1000) if job.origin == "run"]
        jobs = [client.job(client.wait(job.id, timeout=30).id) for job in runs]
    assert ran_once(jobs) == []
    for answer in answers:
        error = answer.get("error", {}).get("code")
        assert "result" in answer or error in (None, "shutting_down"), json.dumps(answer)
    waited = daemon.ctl("wait", str(jobs[0].id))
    assert waited.returncode == 0 and waited.stdout.strip() == str(jobs[0].payload), waited
    assert "were running when taskd last stopped" not in daemon.log


def test_signals_while_taskd_exits_do_not_turn_a_clean_stop_into_a_failure(
    taskd_factory: type[Taskd],
) -> None:
    # SIGTERM again and again, as an impatient operator or a test harness may send it, and
    # a SIGHUP: whichever arrives after the event loop has closed finds the signal ignored,
    # not its default action (which would kill taskd and make its exit status -15).
    daemon = taskd_factory().start()
    assert daemon.process is not None
    statuses = []
    for _ in range(5):
        process = daemon.process
        while process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.send_signal(signal.SIGHUP)
        statuses.append(process.returncode)
        daemon.close()
        daemon.start()
    assert statuses == [0] * 5, daemon.log
    assert daemon.stop() == 0
