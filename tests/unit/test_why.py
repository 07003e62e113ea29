"""The reasons `taskctl why` gives, from the facts the daemon gathers: checked in order."""

from __future__ import annotations

import pytest

from taskd.models import AttemptError, Job
from taskd.why import Facts, LimitFact, explain, timeline

NOW = 1_000_000.0


def pending(**fields: object) -> Job:
    values: dict[str, object] = {
        "id": 7, "task": "report", "status": "pending", "origin": "enqueue",
        "created_at": NOW - 60, "run_at": NOW - 1, "max_attempts": 3,
    }  # fmt: skip
    values.update(fields)
    return Job(**values)  # type: ignore[arg-type]


def facts(**fields: object) -> Facts:
    values: dict[str, object] = {
        "now": NOW, "task_loaded": True, "concurrency": None, "task_running": 0,
        "busy": 0, "workers": 4, "stopping": False,
    }  # fmt: skip
    values.update(fields)
    return Facts(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("job", "given", "reason"),
    [
        (pending(), facts(), "due"),
        (pending(run_at=NOW + 30), facts(), "delayed"),
        (pending(run_at=NOW + 30, attempts=1, error="boom"), facts(), "retry_backoff"),
        (pending(), facts(concurrency=2, task_running=2), "concurrency_limit"),
        (pending(), facts(concurrency=2, task_running=1), "due"),
        (pending(), facts(busy=4), "workers_busy"),
        (pending(), facts(paused_since=NOW - 5), "task_paused"),
        (pending(run_at=NOW + 30), facts(paused_since=NOW - 5), "task_paused"),
        (pending(), facts(rate_limit="10/s", next_start=NOW + 0.3), "rate_limit"),
        (pending(), facts(rate_limit="10/s", next_start=NOW - 0.3), "due"),
        (pending(run_at=NOW + 30), facts(rate_limit="10/s", next_start=NOW + 0.3), "delayed"),
        # A stopping daemon starts nothing, whatever else holds the job back.
        (pending(run_at=NOW + 30), facts(stopping=True, busy=4), "draining"),
        (pending(), facts(task_loaded=False, stopping=True), "unknown_task"),
        (pending(status="running", attempts=1, started_at=NOW - 5, worker="n/1"), facts(),
         "running"),
        (pending(status="failed", finished_at=NOW, error="boom"), facts(), "failed"),
    ],
)  # fmt: skip
def test_reasons(job: Job, given: Facts, reason: str) -> None:
    said = explain(job, given)
    assert said.reason == reason
    assert said.message.startswith("job 7 (report) ")


def test_the_limit_and_the_backoff_say_their_numbers() -> None:
    limited = explain(pending(), facts(concurrency=1, task_running=1)).message
    assert "concurrency limit (1): 1 job of report running" in limited
    backoff = explain(pending(run_at=NOW + 90, attempts=2, error="boom"), facts())
    assert backoff.until == NOW + 90
    assert "attempt 2 of 3 failed: boom; attempt 3 starts at " in backoff.message
    assert backoff.message.endswith("(in 1m30s)")


def test_a_timeline_in_order_with_each_attempt() -> None:
    job = pending(
        status="succeeded", attempts=2, started_at=NOW - 10, finished_at=NOW - 9, worker="m/1",
        errors=[AttemptError(1, "error", "boom", NOW - 40, started_at=NOW - 41, worker="n/1")],
    )  # fmt: skip
    events = [(e.event, e.attempt, e.worker) for e in timeline(job)]
    assert events == [  # where each attempt ran, the one that succeeded too
        ("created", None, None),
        ("started", 1, "n/1"),
        ("error", 1, "n/1"),
        ("started", 2, "m/1"),
        ("succeeded", 2, "m/1"),
    ]


def test_flow_control_says_what_holds_the_job_and_until_when() -> None:
    paused = explain(pending(), facts(paused_since=NOW - 5))
    assert (
        paused.message
        == "job 7 (report) waits: task report is paused (since 1970-01-12 13:46:35 UTC)"
    )
    assert paused.at == NOW - 5 and paused.until is None
    limited = explain(pending(), facts(rate_limit="10/s", next_start=NOW + 3))
    assert limited.message == (
        "job 7 (report) waits for its rate limit (10/s): next start at 1970-01-12 13:46:43 UTC"
    )
    assert limited.until == limited.at == NOW + 3


def test_a_shared_limit_says_its_name_and_its_use_or_its_next_start() -> None:
    full = LimitFact("stripe", running=4, concurrency=4)
    held = explain(pending(), facts(limits=(LimitFact("other", 0, concurrency=2), full)))
    assert held.reason == "shared_limit" and held.until is None
    assert held.message == "job 7 (report) waits for shared limit stripe (concurrency 4, 4 running)"
    spaced = LimitFact("stripe", running=1, concurrency=4, rate="25/s", next_start=NOW + 3)
    timed = explain(pending(), facts(limits=(spaced,)))
    assert timed.message == (
        "job 7 (report) waits for shared limit stripe (25/s): next start at 1970-01-12 13:46:43 UTC"
    )
    assert timed.until == timed.at == NOW + 3
    room = LimitFact("stripe", running=3, concurrency=4, rate="25/s", next_start=NOW - 1)
    assert explain(pending(), facts(limits=(room,))).reason == "due"
    # The task's own limits are named first.
    own = facts(concurrency=1, task_running=1, limits=(full,))
    assert explain(pending(), own).reason == "concurrency_limit"


def test_a_keyed_tasks_limits_say_the_key() -> None:
    keyed = {"limit_key": "customer", "key_value": "acme"}
    full = explain(pending(), facts(concurrency=2, task_running=2, **keyed))
    assert full.message == (
        "job 7 (report) waits for its task's concurrency limit (2 per customer 'acme'): "
        "2 jobs of report with customer 'acme' running"
    )
    rated = explain(pending(), facts(rate_limit="10/s", next_start=NOW + 3, **keyed))
    assert rated.message == (
        "job 7 (report) waits for its rate limit (10/s per customer 'acme'): next start at "
        "1970-01-12 13:46:43 UTC"
    )
