"""Flow control against a model, on every backend: for any sequence of enqueues, claims by
two workers, finishes, pauses and resumes, and clock steps, no limit is ever exceeded.

A task's concurrency: its running jobs never outnumber it. A rate limit (GCRA, see
taskd.store.core.flow): any two starts i < j under it are at least (j - i) intervals
apart, less the tolerance, so that a window of one period holds at most the limit plus the
documented burst. A shared limit (`[limits.NAME]`) counts the same way over the running
jobs and the starts of all its tasks. A keyed task's (`limit_key`) concurrency and rate
count per value of its key, its jobs' values random. A paused task starts nothing. And a
claim leaves no job behind that it could have taken: when it takes fewer than it asked
for, every due job it left is held back by one of those rules.

`FlowMachine` checks a task's own limits; `SharedAndKeyedFlowMachine`, the same machine
over other tasks, adds shared limits and keyed tasks, one of them in a shared limit.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import msgspec
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule

from taskd.models import Job
from taskd.store import ClaimRequest, JobFilter, NewJob, Outcome, SharedLimit
from taskd.store.core.flow import tolerance
from tests.store.machine import StoreMachine, backend_cases

LEASE = 1e6  # no lease lapses: this model is about limits, not recovery
NODES = ("w1", "w2")
EPSILON = 1e-6
KEY_FIELD = "customer"
KEY_VALUES = ("x", "y", "z", None)  # None: a payload without the field (its value is '')

# The series of starts a rate limit spaces: a task's own, a keyed task's value's, a shared
# limit's (its tasks' starts together).
Series = tuple[str, ...]


class FlowMachine(StoreMachine):
    folder_prefix = "tdflow"
    TASKS: tuple[str, ...] = ("free", "capped", "fast", "slow", "both")
    CONCURRENCY: Mapping[str, int] = {"capped": 2, "both": 1}
    RATES: Mapping[str, float] = {"fast": 0.25, "slow": 3.0, "both": 0.5}  # s between starts
    SHARED: Mapping[str, SharedLimit] = {}
    KEYED: Mapping[str, str] = {}  # task -> its limit_key

    def __init__(self) -> None:
        super().__init__()
        self.store.limit_keys = dict(self.KEYED)  # as the daemon hands them to its store
        self.workers = [self.run(self.store.register_node(node, LEASE)) for node in NODES]
        self.running: dict[int, Job] = {}
        self.keys: dict[int, str] = {}  # each keyed job's value of its task's limit_key
        self.starts: dict[Series, list[float]] = {}
        self.paused: set[str] = set()

    @property
    def now(self) -> float:
        return self.clock.now

    # -- rules ------------------------------------------------------------------------------

    @rule(data=st.data(), count=st.integers(1, 4), priority=st.integers(0, 1),
          delay=st.sampled_from([0.0, 0.0, 2.0]))  # fmt: skip
    def enqueue(self, data: st.DataObject, count: int, priority: int, delay: float) -> None:
        task = data.draw(st.sampled_from(self.TASKS), label="task")
        keys = [None] * count
        if task in self.KEYED:
            keys = data.draw(st.lists(st.sampled_from(KEY_VALUES), min_size=count,
                                      max_size=count), label="keys")  # fmt: skip
        jobs = [
            NewJob(task, msgspec.msgpack.encode({} if key is None else {KEY_FIELD: key}),
                   "enqueue", 3, priority=priority, delay=delay)
            for key in keys
        ]  # fmt: skip
        inserted = self.run(self.store.insert(jobs))
        if task in self.KEYED:
            self.keys.update(
                (new.job_id, key or "") for new, key in zip(inserted, keys, strict=True)
            )

    @rule(worker=st.sampled_from(range(len(NODES))), limit=st.integers(1, 6))
    def claim(self, worker: int, limit: int) -> None:
        request = ClaimRequest(self.workers[worker], limit, LEASE, self.CONCURRENCY, self.RATES,
                               self.SHARED, frozenset(self.KEYED))  # fmt: skip
        claimed = self.run(self.store.claim(request))
        # Keyed jobs may come on top of a full claim of others (taskd.store.core.keys.chosen).
        keyed = sum(job.task in self.KEYED for job in claimed.jobs)
        assert keyed <= limit and len(claimed.jobs) - keyed <= limit, (limit, claimed.jobs)
        for job in claimed.jobs:
            assert job.task not in self.paused, f"paused task {job.task} started"
            self.running[job.id] = job
            for series in self._series(job):
                self.starts.setdefault(series, []).append(self.now)
        self._check_concurrency()
        for series, starts in self.starts.items():
            self._check_rate(series, starts)
        if len(claimed.jobs) < limit:
            self._check_nothing_left_behind()
        # A claim that took nothing has nothing to claim at once: claiming again now would
        # take nothing again (a busy loop).
        assert claimed.jobs or claimed.next_due_in != 0.0, claimed

    @precondition(lambda self: self.running)
    @rule(data=st.data(), status=st.sampled_from(["succeeded", "failed"]))
    def finish(self, data: st.DataObject, status: str) -> None:
        job = self.running.pop(data.draw(st.sampled_from(sorted(self.running))))
        assert job.worker is not None
        outcome = Outcome(job.id, job.epoch, job.worker, status)  # type: ignore[arg-type]
        (ended,) = self.run(self.store.finish([outcome])).jobs
        assert ended is not None and ended.status == status

    @rule(data=st.data(), paused=st.booleans())
    def pause(self, data: st.DataObject, paused: bool) -> None:
        task = data.draw(st.sampled_from(self.TASKS), label="task")
        self.run(self.store.set_task_paused(task, paused))
        (self.paused.add if paused else self.paused.discard)(task)

    @rule(seconds=st.sampled_from([0.05, 0.1, 0.25, 0.5, 1.0, 3.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.now += seconds

    # -- the model --------------------------------------------------------------------------

    def _limits_of(self, task: str) -> list[str]:
        return [name for name, limit in self.SHARED.items() if task in limit.tasks]

    def _series(self, job: Job) -> list[Series]:
        """The rate limits a start of this job counts against."""
        series: list[Series] = [("limit", name) for name in self._limits_of(job.task)
                                if self.SHARED[name].interval is not None]  # fmt: skip
        if job.task in self.RATES:
            own = (
                ("key", job.task, self.keys[job.id])
                if job.task in self.KEYED
                else ("task", job.task)
            )
            series.append(own)
        return series

    def _interval(self, series: Series) -> float:
        if series[0] == "limit":
            interval = self.SHARED[series[1]].interval
            assert interval is not None
            return interval
        return self.RATES[series[1]]

    def _running(self) -> tuple[Counter[str], Counter[tuple[str, str]], Counter[str]]:
        """The running jobs by task, by keyed task and value, by shared limit."""
        tasks = Counter(job.task for job in self.running.values())
        keys = Counter((job.task, self.keys[job.id]) for job in self.running.values()
                       if job.task in self.KEYED)  # fmt: skip
        limits = Counter({name: sum(tasks[task] for task in limit.tasks)
                          for name, limit in self.SHARED.items()})  # fmt: skip
        return tasks, keys, limits

    # -- invariants -------------------------------------------------------------------------

    def _check_concurrency(self) -> None:
        tasks, keys, limits = self._running()
        for task, cap in self.CONCURRENCY.items():
            if task not in self.KEYED:
                assert tasks[task] <= cap, f"{task}: {tasks[task]} running, concurrency {cap}"
        for (task, key), running in keys.items():
            cap = self.CONCURRENCY.get(task, running)
            assert running <= cap, f"{task} {key!r}: {running} running, concurrency {cap}"
        for name, limit in self.SHARED.items():
            if limit.concurrency is not None:
                assert limits[name] <= limit.concurrency, (
                    f"limit {name}: {limits[name]} running, concurrency {limit.concurrency}"
                )

    def _check_rate(self, series: Series, starts: list[float]) -> None:
        interval = self._interval(series)
        early = tolerance(interval)
        for i, first in enumerate(starts):
            for j in range(i + 1, len(starts)):
                gap = starts[j] - first
                assert gap >= (j - i) * interval - early - EPSILON, (series, starts)

    def _check_nothing_left_behind(self) -> None:
        """Every due pending job the claim left is held back: its task paused, or at its
        concurrency or waiting for its rate limit (a keyed task's: its value's), or one of
        its shared limits is."""
        pending = self.run(self.store.list_jobs(JobFilter(statuses=["pending"], limit=1000)))
        held_tasks = self._held_tasks()
        tasks, keys, _ = self._running()
        for job in pending:
            if job.run_at > self.now or job.task in held_tasks:
                continue
            if job.task in self.KEYED:
                held = self._value_held(job.task, self.keys[job.id], keys)
            else:
                held = tasks[job.task] >= self.CONCURRENCY.get(job.task, tasks[job.task] + 1)
            what = f"job {job.id} of {job.task} (key {self.keys.get(job.id)!r})"
            assert held, f"{what} was due, free to start, and left"

    def _value_held(self, task: str, key: str, running: Counter[tuple[str, str]]) -> bool:
        """A keyed task's value is at its concurrency, or waits for its rate limit."""
        counted, start = self.run(self.store.key_state(task, key, self.RATES.get(task)))
        assert counted == running[task, key], (task, key, counted, running[task, key])
        full = counted >= self.CONCURRENCY.get(task, counted + 1)
        return full or (start is not None and start > self.now + EPSILON)

    def _held_tasks(self) -> set[str]:
        """The tasks held back as a whole: paused, waiting for their own rate limit (those
        not keyed), or in a shared limit that is full or waiting for its rate."""
        held = set(self.paused)
        own = {task: gap for task, gap in self.RATES.items() if task not in self.KEYED}
        for task, start in self.run(self.store.rate_limit_starts(own)).items():
            if start > self.now + EPSILON:
                held.add(task)
        _, _, running = self._running()
        states = self.run(self.store.limit_states(self.SHARED))
        for name, limit in self.SHARED.items():
            assert states[name].running == running[name], (name, states[name], running[name])
            full = limit.concurrency is not None and running[name] >= limit.concurrency
            start = states[name].next_start
            if full or (start is not None and start > self.now + EPSILON):
                held.update(limit.tasks)
        return held


class SharedAndKeyedFlowMachine(FlowMachine):
    """Shared limits and keyed tasks: `pool` (a concurrency) over a, b and the keyed kp;
    `api` (a rate) over b and c, each with limits of its own; keyed k and kr, with a
    concurrency and a rate per value."""

    TASKS = ("a", "b", "c", "k", "kr", "kp")
    SHARED = {
        "pool": SharedLimit(("a", "b", "kp"), concurrency=2),
        "api": SharedLimit(("b", "c"), interval=0.5),
    }
    CONCURRENCY = {"b": 1, "k": 1, "kr": 2, "kp": 1}
    RATES = {"c": 0.25, "kr": 1.0}
    KEYED = {"k": KEY_FIELD, "kr": KEY_FIELD, "kp": KEY_FIELD}


# As for the store's state machine (test_state_machine.py): a failing example, shrunk on
# PostgreSQL on 2 busy cores, took over 300 s (a schema an example); its own, generous limit.
TIMEOUT = 900


def _settings(backend: str) -> settings:
    return settings(
        max_examples=150 if backend == "sqlite" else 60,
        stateful_step_count=40,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


for machine in (FlowMachine, SharedAndKeyedFlowMachine):
    globals().update(backend_cases(machine, machine.__name__, _settings, TIMEOUT))
