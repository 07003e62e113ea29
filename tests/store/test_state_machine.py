"""Property-based test of the job state machine against a model, on every backend.

Any sequence of enqueue/claim/complete/fail/cancel/expire/retry keeps the invariants: each job
in exactly the state the model predicts, attempts never above max_attempts, at most one active
job per unique key, and outcomes from stale attempts refused.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from taskd.models import AttemptError
from taskd.store import InvalidTransition, JobFilter, NewJob, Outcome, Store
from tests.store.conftest import BACKENDS, open_backend

QUARANTINE = 3
LEASE = 60.0


@dataclass
class ModelJob:
    status: str
    key: str | None
    max_attempts: int
    run_at: float
    attempts: int = 0
    epoch: int = 0
    crashes: int = 0
    owner: str | None = None


class JobStateMachine(RuleBasedStateMachine):
    backend = "sqlite"

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.folder = Path(tempfile.mkdtemp(prefix="tdsm"))
        self.store: Store = self.run(open_backend(self.backend, self.folder))
        self.now = 1_000_000.0
        self.model: dict[int, ModelJob] = {}
        self.stale: list[tuple[int, int, str]] = []  # (job, epoch, owner) no longer current

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def teardown(self) -> None:
        self.run(self.store.close())
        self.loop.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    jobs = Bundle("jobs")

    @rule(target=jobs, key=st.sampled_from([None, None, "a", "b"]), attempts=st.integers(1, 3))
    def enqueue(self, key: str | None, attempts: int) -> int:
        new = NewJob("t", msgspec.msgpack.encode(None), "enqueue", self.now, attempts, key=key)
        (inserted,) = self.run(self.store.insert([new], self.now))
        active = [
            job_id
            for job_id, job in self.model.items()
            if key is not None and job.key == key and job.status in ("pending", "running")
        ]
        if active:
            assert inserted.duplicate and inserted.job_id == active[0]
        else:
            assert not inserted.duplicate and inserted.job_id not in self.model
            self.model[inserted.job_id] = ModelJob("pending", key, attempts, self.now)
        return inserted.job_id

    @rule(limit=st.integers(1, 4), owner=st.sampled_from(["w1", "w2"]))
    def claim(self, limit: int, owner: str) -> None:
        claimed = self.run(self.store.claim(owner, limit, {}, self.now + LEASE, self.now))
        due = sorted(
            (job.run_at, job_id)
            for job_id, job in self.model.items()
            if job.status == "pending" and job.run_at <= self.now
        )
        assert [job.id for job in claimed.jobs] == [job_id for _, job_id in due[:limit]]
        for job in claimed.jobs:
            model = self.model[job.id]
            model.status, model.owner = "running", owner
            model.attempts += 1
            model.epoch += 1
            assert (job.attempts, job.epoch) == (model.attempts, model.epoch)

    def _running(self) -> list[int]:
        return [job_id for job_id, job in self.model.items() if job.status == "running"]

    @precondition(lambda self: self._running())
    @rule(data=st.data(), succeed=st.booleans(), final=st.booleans())
    def complete(self, data: st.DataObject, succeed: bool, final: bool) -> None:
        job_id = data.draw(st.sampled_from(self._running()))
        job = self.model[job_id]
        assert job.owner is not None
        if succeed:
            status = "succeeded"
        elif final or job.attempts >= job.max_attempts:
            status = "failed"
        else:
            status = "pending"  # a retry, as the executor decides it
        error = None if succeed else AttemptError(job.attempts, "error", "boom", self.now)
        outcome = Outcome(
            job_id,
            job.epoch,
            job.owner,
            status,
            self.now,
            error=error,
            run_at=self.now,  # type: ignore[arg-type]
        )
        (recorded,) = self.run(self.store.finish([outcome]))
        assert recorded is not None and recorded.status == status
        job.status, job.owner = status, None
        if status == "pending":
            job.run_at = self.now

    @precondition(lambda self: self.stale)
    @rule(data=st.data())
    def stale_completion_is_refused(self, data: st.DataObject) -> None:
        job_id, epoch, owner = data.draw(st.sampled_from(self.stale))
        outcome = Outcome(job_id, epoch, owner, "succeeded", self.now, result=b"\xc0")
        (recorded,) = self.run(self.store.finish([outcome]))
        assert recorded is None

    @rule(job_id=jobs)
    def cancel(self, job_id: int) -> None:
        job = self.model[job_id]
        try:
            cancelled = self.run(self.store.cancel(job_id, self.now))
        except InvalidTransition:
            assert job.status not in ("pending", "running")
            return
        assert job.status in ("pending", "running") and cancelled.status == "cancelled"
        if job.status == "running":
            assert job.owner is not None
            self.stale.append((job_id, job.epoch, job.owner))
        job.status, job.owner = "cancelled", None

    @rule(job_id=jobs)
    def retry(self, job_id: int) -> None:
        job = self.model[job_id]
        key_taken = job.key is not None and any(
            other.key == job.key and other.status in ("pending", "running")
            for other_id, other in self.model.items()
            if other_id != job_id
        )
        try:
            retried = self.run(self.store.retry(job_id, self.now))
        except InvalidTransition:
            assert job.status not in ("failed", "cancelled") or key_taken
            return
        assert job.status in ("failed", "cancelled") and not key_taken
        assert retried.attempts == 0
        job.status, job.attempts, job.crashes, job.run_at = "pending", 0, 0, self.now

    @rule(everything=st.booleans())
    def crash_or_expire(self, everything: bool) -> None:
        """The daemon died (everything) or the leases ran out (time passes beyond them)."""
        self.now += LEASE + 1
        recovered = self.run(self.store.recover(self.now, QUARANTINE, everything=everything))
        assert sorted(job.id for job in recovered) == sorted(self._running())
        for job_id in self._running():
            job = self.model[job_id]
            assert job.owner is not None
            self.stale.append((job_id, job.epoch, job.owner))
            job.crashes += 1
            out_of_luck = job.crashes >= QUARANTINE or job.attempts >= job.max_attempts
            job.status, job.owner = ("failed" if out_of_luck else "pending"), None
            job.run_at = self.now

    @invariant()
    def store_agrees_with_the_model(self) -> None:
        stored = self.run(self.store.list_jobs(JobFilter(limit=10_000)))
        assert {job.id: job.status for job in stored} == {
            job_id: job.status for job_id, job in self.model.items()
        }
        for job in stored:
            assert 0 <= job.attempts <= job.max_attempts
            assert job.attempts == self.model[job.id].attempts
        active_keys = [
            job.key for job in stored if job.key and job.status in ("pending", "running")
        ]
        assert len(active_keys) == len(set(active_keys))


def _test_case(backend: str) -> Any:
    machine = type(f"JobStateMachine_{backend}", (JobStateMachine,), {"backend": backend})
    case = machine.TestCase
    case.settings = settings(
        max_examples=100,
        stateful_step_count=50,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    return case


globals().update({f"TestJobStateMachine_{backend}": _test_case(backend) for backend in BACKENDS})
