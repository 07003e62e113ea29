"""Flow control against a model, on every backend: for any sequence of enqueues, claims by
two workers, finishes, pauses and resumes, and clock steps, no limit is ever exceeded.

A task's concurrency: its running jobs never outnumber it. A rate limit (GCRA, see
taskd.store.core.flow): any two starts i < j of its task are at least (j - i) intervals
apart, less the tolerance, so that a window of one period holds at most the limit plus the
documented burst. A paused task starts nothing. And a claim leaves no job behind that it
could have taken: when it takes fewer than it asked for, every due job it left is held back
by one of those rules.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from taskd.models import Job
from taskd.store import ClaimRequest, JobFilter, NewJob, Outcome, Store
from taskd.store.core.flow import tolerance
from tests.backends import BACKENDS, open_backend
from tests.support import Clock

LEASE = 1e6  # no lease lapses: this model is about limits, not recovery
NODES = ("w1", "w2")
CONCURRENCY = {"capped": 2, "both": 1}
RATES = {"fast": 0.25, "slow": 3.0, "both": 0.5}  # seconds between two starts
TASKS = ("free", "capped", "fast", "slow", "both")
PAYLOAD = msgspec.msgpack.encode({})
EPSILON = 1e-6


class FlowMachine(RuleBasedStateMachine):
    backend = "sqlite"

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.folder = Path(tempfile.mkdtemp(prefix="tdflow"))
        self.clock = Clock(1_000_000.0)
        try:
            self.store: Store = self.run(open_backend(self.backend, self.folder, self.clock))
        except BaseException:  # a skip (no PostgreSQL here) too: teardown will not run
            self.loop.close()
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
        self.workers = [self.run(self.store.register_node(node, LEASE)) for node in NODES]
        self.running: dict[int, Job] = {}
        self.starts: dict[str, list[float]] = {task: [] for task in TASKS}
        self.paused: set[str] = set()

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def teardown(self) -> None:
        try:
            self.run(self.store.close())
        finally:
            self.loop.close()
            shutil.rmtree(self.folder, ignore_errors=True)

    @rule(task=st.sampled_from(TASKS), count=st.integers(1, 4), priority=st.integers(0, 1),
          delay=st.sampled_from([0.0, 0.0, 2.0]))  # fmt: skip
    def enqueue(self, task: str, count: int, priority: int, delay: float) -> None:
        job = NewJob(task, PAYLOAD, "enqueue", 3, priority=priority, delay=delay)
        self.run(self.store.insert([job] * count))

    @rule(worker=st.sampled_from(range(len(NODES))), limit=st.integers(1, 6))
    def claim(self, worker: int, limit: int) -> None:
        request = ClaimRequest(self.workers[worker], limit, LEASE, CONCURRENCY, RATES)
        claimed = self.run(self.store.claim(request))
        assert len(claimed.jobs) <= limit
        for job in claimed.jobs:
            assert job.task not in self.paused, f"paused task {job.task} started"
            self.running[job.id] = job
            self.starts[job.task].append(self.clock.now)
        for task, cap in CONCURRENCY.items():
            running = sum(job.task == task for job in self.running.values())
            assert running <= cap, f"{task}: {running} running, concurrency {cap}"
        for task, interval in RATES.items():
            self._check_rate(task, interval)
        if len(claimed.jobs) < limit:
            self._check_nothing_left_behind()

    def _check_rate(self, task: str, interval: float) -> None:
        starts = self.starts[task]
        early = tolerance(interval)
        for i, first in enumerate(starts):
            for j in range(i + 1, len(starts)):
                gap = starts[j] - first
                assert gap >= (j - i) * interval - early - EPSILON, (task, starts)

    def _check_nothing_left_behind(self) -> None:
        """Every due pending job the claim left is held back: its task paused, at its
        concurrency, or waiting for its rate limit."""
        pending = self.run(self.store.list_jobs(JobFilter(statuses=["pending"], limit=1000)))
        starts = self.run(self.store.rate_limit_starts(RATES))
        for job in pending:
            if job.run_at > self.clock.now:
                continue
            running = sum(other.task == job.task for other in self.running.values())
            held = (
                job.task in self.paused
                or running >= CONCURRENCY.get(job.task, running + 1)
                or starts.get(job.task, self.clock.now) > self.clock.now + EPSILON
            )
            assert held, f"job {job.id} of {job.task} was due, free to start, and left"

    @precondition(lambda self: self.running)
    @rule(data=st.data(), status=st.sampled_from(["succeeded", "failed"]))
    def finish(self, data: st.DataObject, status: str) -> None:
        job = self.running.pop(data.draw(st.sampled_from(sorted(self.running))))
        assert job.worker is not None
        outcome = Outcome(job.id, job.epoch, job.worker, status)  # type: ignore[arg-type]
        (ended,) = self.run(self.store.finish([outcome])).jobs
        assert ended is not None and ended.status == status

    @rule(task=st.sampled_from(TASKS), paused=st.booleans())
    def pause(self, task: str, paused: bool) -> None:
        self.run(self.store.set_task_paused(task, paused))
        (self.paused.add if paused else self.paused.discard)(task)

    @rule(seconds=st.sampled_from([0.05, 0.1, 0.25, 0.5, 1.0, 3.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.now += seconds


def _test_case(backend: str) -> Any:
    machine = type(f"FlowMachine_{backend}", (FlowMachine,), {"backend": backend})
    case = machine.TestCase
    case.settings = settings(
        max_examples=150 if backend == "sqlite" else 60,
        stateful_step_count=40,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    case.pytestmark = [pytest.mark.timeout(300)]
    return case


globals().update({f"TestFlowMachine_{backend}": _test_case(backend) for backend in BACKENDS})
