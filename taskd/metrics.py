"""The Prometheus exposition of taskd (`taskctl metrics`, `GET /metrics`), by prometheus-client.

Two kinds of figures. What the job store holds (jobs by task and status, queue depth, the
age of the oldest due job) is read from the store at each scrape, by a collector that keeps
nothing, and so are the HTTP listener's connections and refusals, from the listener. What
happens (an attempt ends, a tick fires) is counted as it happens, through the hooks the
executor and the scheduler call: attempt durations, retries, ticks, coalesced ticks and
tick lateness. Those counters live in this process and start at zero with it, as Prometheus
expects of counters.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from taskd.executor import AttemptEnd
from taskd.models import FiredJob, HttpStats, Job, KeyedUse, LimitUse, TaskCounts
from taskd.shared_limits import keyed_uses, limit_uses
from taskd.store import Store
from taskd.tasks import TaskRegistry

INF = float("inf")
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900,
                    3600, INF)  # fmt: skip
LATENESS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
                    60, INF)  # fmt: skip


class Listeners(Protocol):
    """What the daemon tells of its listeners (the HTTP listener's connections)."""

    def http(self) -> HttpStats | None: ...


class Metrics:
    """The observer the executor and the scheduler report to, and the scrape itself."""

    def __init__(
        self,
        store: Store,
        listeners: Listeners | None = None,
        clock: Callable[[], float] = time.time,
        tasks: TaskRegistry | None = None,
    ) -> None:
        self._store = store
        self._listeners = listeners
        self._tasks = tasks  # their shared limits' use is read at each scrape
        self._clock = clock
        self._duration_of: dict[tuple[str, str], _Observed] = {}  # by (task, end)
        self._durations = Histogram(
            "taskd_job_duration_seconds",
            "How long attempts took, by task and outcome (succeeded, failed, retry: failed "
            "and to run again, cancelled)",
            ["task", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=None,
        )
        self._retries = Counter(
            "taskd_job_retries",
            "Failed attempts after which the job was put back to run again",
            ["task"],
            registry=None,
        )
        self._ticks = Counter(
            "taskd_schedule_ticks", "Firings of each schedule", ["schedule"], registry=None
        )
        self._coalesced = Counter(
            "taskd_schedule_coalesced_ticks",
            "Tasks of a firing that joined the task's run still pending or running",
            ["schedule"],
            registry=None,
        )
        self._lateness = Histogram(
            "taskd_schedule_tick_lateness_seconds",
            "How long after its scheduled time a cron tick's jobs were created (caught-up "
            "ticks included; @startup and triggers not)",
            ["schedule"],
            buckets=LATENESS_BUCKETS,
            registry=None,
        )

    def attempt_ended(self, job: Job, end: AttemptEnd) -> None:
        """The executor's hook: one attempt of `job` (as claimed) ended so."""
        if end in ("released", "lost") or job.started_at is None:
            return  # handed back at a stop, or taken over: not an attempt that ended here
        duration = max(0.0, self._clock() - job.started_at)
        observed = self._duration_of.get((job.task, end))
        if observed is None:
            child = self._durations.labels(job.task, end)  # its _created: now, as before
            observed = self._duration_of[job.task, end] = _Observed(child)
        # Histogram.observe, without its five frames a job: the bucket it counts in, the sum.
        observed.counts[bisect_left(DURATION_BUCKETS, duration)] += 1
        observed.total += duration
        if end == "retry":
            self._retries.labels(job.task).inc()

    def tick_fired(self, schedule: str, lateness: float | None, jobs: Sequence[FiredJob]) -> None:
        """The scheduler's hook: a schedule fired; `lateness` is None unless a cron tick."""
        self._ticks.labels(schedule).inc()
        if joined := sum(job.joined for job in jobs):
            self._coalesced.labels(schedule).inc(joined)
        if lateness is not None:
            self._lateness.labels(schedule).observe(max(0.0, lateness))

    async def render(self) -> str:
        """The exposition in Prometheus's text format; raises StoreError."""
        counts = await self._store.counts()
        limits: list[LimitUse] = []
        keyed: list[KeyedUse] = []
        if self._tasks is not None:
            limits = await limit_uses(self._store, self._tasks)
            keyed = await keyed_uses(self._store, self._tasks)
        for observed in self._duration_of.values():
            observed.write()
        registry = CollectorRegistry(auto_describe=True)
        events = (self._durations, self._retries, self._ticks, self._coalesced, self._lateness)
        http = self._listeners.http() if self._listeners is not None else None
        for collector in (*events, _Queue(counts), _Limits(limits, keyed), _HttpConnections(http)):
            registry.register(collector)
        return generate_latest(registry).decode()


class _Observed:
    """The attempt durations of one (task, end) as counted since start, which a scrape writes
    into the histogram's child (prometheus_client's own exposition of them, then)."""

    __slots__ = ("_child", "counts", "total")

    def __init__(self, child: Histogram) -> None:
        self._child = child
        self.counts = [0] * len(DURATION_BUCKETS)  # not cumulative, as the child keeps them
        self.total = 0.0  # summed in the order observed, as the child would

    def write(self) -> None:
        self._child._sum.set(self.total)
        for value, count in zip(self._child._buckets, self.counts, strict=True):
            value.set(float(count))


class _Queue(Collector):
    """The jobs in the store, per task, as one scrape read them."""

    def __init__(self, counts: list[TaskCounts]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily(
            "taskd_jobs",
            "Jobs in the store by task and status (finished ones until they are pruned)",
            labels=["task", "status"],
        )
        depth = GaugeMetricFamily(
            "taskd_queue_depth",
            "Pending jobs by task: due, delayed, or waiting for a retry",
            labels=["task"],
        )
        oldest = GaugeMetricFamily(
            "taskd_oldest_pending_age_seconds",
            "How long the task's longest-waiting due job has waited (0: none is waiting)",
            labels=["task"],
        )
        for entry in self._counts:
            for status, count in sorted(entry.counts.items()):
                jobs.add_metric([entry.task, status], count)
            depth.add_metric([entry.task], entry.counts.get("pending", 0))
            oldest.add_metric([entry.task], entry.oldest_pending_age or 0.0)
        yield from (jobs, depth, oldest)


class _Limits(Collector):
    """The shared limits ([limits.NAME]): the jobs of their tasks waiting and running; the
    keyed tasks (limit_key): their values with jobs waiting and running."""

    def __init__(self, limits: list[LimitUse], keyed: list[KeyedUse]) -> None:
        self._limits = limits
        self._keyed = keyed

    def collect(self) -> Iterator[Metric]:
        if self._keyed:
            values = GaugeMetricFamily(
                "taskd_limit_key_values",
                "Values of a task's limit_key with due jobs waiting, and with jobs running",
                labels=["task", "state"],
            )
            for use in self._keyed:
                values.add_metric([use.task, "waiting"], use.waiting)
                values.add_metric([use.task, "running"], use.running)
            yield values
        if not self._limits:
            return
        waiting = GaugeMetricFamily(
            "taskd_limit_waiting_jobs",
            "Due jobs of the tasks sharing a limit ([limits.NAME]) that wait to start",
            labels=["limit"],
        )
        running = GaugeMetricFamily(
            "taskd_limit_running_jobs",
            "Running jobs of the tasks sharing a limit, on every daemon",
            labels=["limit"],
        )
        for limit in self._limits:
            waiting.add_metric([limit.name], limit.waiting)
            running.add_metric([limit.name], limit.running)
        yield from (waiting, running)


class _HttpConnections(Collector):
    """The HTTP listener's connections now, and its refusals since start (none: no [http])."""

    def __init__(self, stats: HttpStats | None) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        if (stats := self._stats) is None:
            return
        connections = GaugeMetricFamily(
            "taskd_http_connections",
            "Open HTTP connections: authenticated (a request with a token, or an allowed peer "
            "on a unix: listener) or not",
            labels=["pool"],
        )
        connections.add_metric(["authenticated"], stats.authenticated)
        connections.add_metric(["unauthenticated"], stats.open - stats.authenticated)
        refused = CounterMetricFamily(
            "taskd_http_refused",
            "HTTP connections refused or closed by the limits: header_timeout (its request "
            "line and headers came too slowly), unauthenticated_share (closed for a newer "
            "connection without a token), max_connections (a request with a token found "
            "every authenticated connection busy), max_event_streams (a GET /events found "
            "as many streams open)",
            labels=["reason"],
        )
        refused.add_metric(["header_timeout"], stats.refused_header_timeout)
        refused.add_metric(["unauthenticated_share"], stats.refused_unauthenticated)
        refused.add_metric(["max_connections"], stats.refused_busy)
        closed = CounterMetricFamily(
            "taskd_http_closed_idle",
            "HTTP connections closed while waiting for a request (new or kept alive): after "
            "keepalive_timeout, or to make room for one with a token",
        )
        closed.add_metric([], stats.closed_idle)
        streams = GaugeMetricFamily(
            "taskd_http_event_streams", "Open GET /events streams (Server-Sent Events)"
        )
        streams.add_metric([], stats.event_streams)
        refused.add_metric(["max_event_streams"], stats.refused_event_streams)
        yield from (connections, refused, closed, streams)
